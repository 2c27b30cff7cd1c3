"""analysis/verdicts.py against known values, independent computations and cases whose answer is
known: the t and normal quantiles, Wilson/Newcombe intervals, Holm, the exact permutation test and
its floor, the verdict words, and the null rate of the rule (5%) against the old |Δ| > 2·SE rule."""
from __future__ import annotations

import decimal
import itertools
import math

import numpy as np
import pytest

from analysis import verdicts as v


# ------------------------------------------------------------------------------------------------
# Independent references
# ------------------------------------------------------------------------------------------------
def t_cdf_even_df(t: float, nu: int, prec: int = 50) -> float:
    """Student t CDF for EVEN ν by its finite closed form, in 50-digit decimals:
    F(t) = ½ + t/(2√(ν + t²)) · Σ_{j<ν/2} C(2j, j)/4ʲ · (ν/(ν + t²))ʲ."""
    assert nu % 2 == 0
    with decimal.localcontext() as ctx:
        ctx.prec = prec
        D = decimal.Decimal
        t_, nu_ = D(t), D(nu)
        r = nu_ / (nu_ + t_ * t_)
        s, c = D(0), D(1)
        for j in range(nu // 2):
            s += c * r ** j
            c = c * D(2 * j + 1) / D(2 * j + 2)          # C(2j,j)/4^j, updated to j + 1
        return float(D("0.5") + t_ / (2 * (nu_ + t_ * t_).sqrt()) * s)


def t_quantile_df2(p: float) -> float:
    """Exact t quantile for ν = 2: t = (2p − 1)/√(2p(1 − p))."""
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def t_pdf(x, nu):
    c = math.exp(math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2)) / math.sqrt(nu * math.pi)
    return c * (1 + x * x / nu) ** (-(nu + 1) / 2)


# ------------------------------------------------------------------------------------------------
# 1. The t and normal distribution functions
# ------------------------------------------------------------------------------------------------
# The quoted values (as scipy prints them) agree with the exact ones to ~4e-11 relative only: the
# df = 2 value 4.302652729911275 is 1.6e-10 above the exact (2p−1)/√(2p(1−p)) = 4.3026527297494…
# So: the quoted values at 1e-10, the exact references (closed forms, 50 digits) at 1e-13.
@pytest.mark.parametrize("p, df, quoted", [(0.975, 2, 4.302652729911275), (0.975, 4, 2.7764451051977987),
                                           (0.975, 10, 2.2281388519649385), (0.8, 2, 1.0606601717798212)])
def test_t_quantiles_known_values(p, df, quoted):
    q = v.t_ppf(p, df)
    assert q == pytest.approx(quoted, rel=1e-10)
    # exact: the even-df closed-form CDF at q is p (to double precision)
    assert t_cdf_even_df(q, df) == pytest.approx(p, abs=2e-15)
    assert v.t_ppf(1 - p, df) == -q                        # symmetry


def test_t_quantile_df2_exact():
    assert v.t_ppf(0.8, 2) == pytest.approx(math.sqrt(9 / 8), rel=1e-14)
    for p in (0.6, 0.9, 0.975, 0.999, 1e-6, 0.3):
        assert v.t_ppf(p, 2) == pytest.approx(t_quantile_df2(p), rel=1e-13)


def test_t_cdf_closed_forms():
    for df in (0.5, 1, 2, 3.7, 30, 1e4):
        assert v.t_cdf(0.0, df) == 0.5
        assert v.t_cdf(math.inf, df) == 1.0 and v.t_cdf(-math.inf, df) == 0.0
    for x in (-50.0, -3.0, -0.7, 0.1, 1.0, 2.5, 1e6):
        assert v.t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-15)   # Cauchy
        assert v.t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(x * x + 2)), abs=1e-15)
        for nu in (4, 6, 10, 20):
            assert v.t_cdf(x, nu) == pytest.approx(t_cdf_even_df(x, nu), abs=1e-14)
    # tails keep relative accuracy: Cauchy P(T ≤ −1e6) = atan(1e-6)/π
    assert v.t_cdf(-1e6, 1) == pytest.approx(math.atan(1e-6) / math.pi, rel=1e-12)


def test_t_cdf_fractional_df_against_integration():
    """Welch gives fractional df: compare with Simpson's rule on the density."""
    for nu in (2.5, 3.3, 7.9):
        for x in (0.5, 1.7, 4.0):
            grid = np.linspace(0.0, x, 4001)
            f = np.array([t_pdf(g, nu) for g in grid])
            h = grid[1] - grid[0]
            simpson = h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
            assert v.t_cdf(x, nu) == pytest.approx(0.5 + simpson, abs=1e-12)


def test_large_df_is_normal():
    for x in (-2.0, 0.3, 1.96):
        phi = 0.5 * math.erfc(-x / math.sqrt(2))
        assert v.t_cdf(x, 1e6) == pytest.approx(phi, abs=1e-6)
        assert v.t_cdf(x, math.inf) == pytest.approx(phi, abs=1e-16)
    assert v.t_ppf(0.975, 1e6) == pytest.approx(1.959963984540054, abs=1e-5)
    assert v.t_ppf(0.975, math.inf) == pytest.approx(1.959963984540054, rel=1e-15)


def test_t_round_trips():
    for df in (1, 2, 2.7, 5, 40):
        for p in (1e-10, 0.01, 0.2, 0.5, 0.77, 0.975, 1 - 1e-9):
            assert v.t_cdf(v.t_ppf(p, df), df) == pytest.approx(p, rel=1e-11, abs=1e-15)
        for x in (-6.0, -1.0, 0.4, 3.0):
            assert v.t_ppf(v.t_cdf(x, df), df) == pytest.approx(x, rel=1e-9)
    assert v.t_ppf(0.3, 1) == pytest.approx(math.tan(math.pi * (0.3 - 0.5)), rel=1e-13)


def test_norm_ppf():
    assert v.norm_ppf(0.975) == pytest.approx(1.959963984540054, rel=1e-15)
    assert v.norm_ppf(0.5) == 0.0
    for p in (1e-300, 1e-12, 1e-5, 0.01, 0.02425, 0.3, 0.7, 0.99, 1 - 1e-9):
        x = v.norm_ppf(p)
        lower_tail = 0.5 * math.erfc(-x / math.sqrt(2))
        assert lower_tail == pytest.approx(p, rel=1e-13)
        if p >= 1e-5:                                      # (1 − p rounds for tinier p)
            assert v.norm_ppf(1 - p) == pytest.approx(-x, rel=1e-9)
    # the upper side keeps the digits of its tail: P(Z ≥ x) = 1 − p
    for q in (1e-3, 1e-6, 1e-9):
        x = v.norm_ppf(1 - q)
        assert 0.5 * math.erfc(x / math.sqrt(2)) == pytest.approx(1 - (1 - q), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# 2. Proportions
# ------------------------------------------------------------------------------------------------
def wilson_closed_form(k, n, z=1.959963984540054):
    """Wilson's interval as the two roots of (p̂ − π)² = z² π(1 − π)/n (a quadratic in π)."""
    p = k / n
    A = 1 + z * z / n
    B = -(2 * p + z * z / n)
    C = p * p
    disc = math.sqrt(B * B - 4 * A * C)
    return (-B - disc) / (2 * A), (-B + disc) / (2 * A)


def test_wilson():
    assert v.wilson(0, 10)[0] == 0.0 and v.wilson(10, 10)[1] == 1.0
    lo, hi = v.wilson(81, 263)                             # Newcombe (1998a), 81/263
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    for k, n in ((81, 263), (0, 10), (3, 7), (620, 1000), (10, 10)):
        assert v.wilson(k, n) == pytest.approx(wilson_closed_form(k, n), abs=1e-12)
    # a wider conf gives a wider interval
    lo90, hi90 = v.wilson(81, 263, conf=0.90)
    assert lo < lo90 < hi90 < hi


def test_newcombe_difference():
    # Newcombe (1998b), method 10, his examples
    for (k1, n1, k2, n2), (d, lo, hi) in {(56, 70, 48, 80): (0.2000, 0.0524, 0.3339),
                                          (9, 10, 3, 10): (0.6000, 0.1705, 0.8090),
                                          (5, 56, 0, 29): (0.0893, -0.0381, 0.1926)}.items():
        got = v.newcombe_diff(k1, n1, k2, n2)
        assert tuple(round(x, 4) for x in got) == (d, lo, hi)


def test_proportion_string():
    s = v.proportion(620, 1000)
    assert s.startswith("62.0% [") and s.endswith("] (620/1000)")
    lo, hi = v.wilson(620, 1000)
    assert s == f"62.0% [{100 * lo:.1f}, {100 * hi:.1f}] (620/1000)" == "62.0% [59.0, 65.0] (620/1000)"


# ------------------------------------------------------------------------------------------------
# 3. Holm
# ------------------------------------------------------------------------------------------------
def test_holm():
    assert v.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert v.holm([0.5, 0.6]) == [1.0, 1.0]                # capped at 1, monotone
    assert v.holm([0.2]) == [0.2]
    rng = np.random.default_rng(1)
    ps = rng.uniform(size=12).tolist()
    adj = v.holm(ps)
    order = np.argsort(ps)
    assert np.all(np.diff(np.array(adj)[order]) >= 0)      # monotone in the p order
    assert all(a >= p for a, p in zip(adj, ps)) and max(adj) <= 1.0


# ------------------------------------------------------------------------------------------------
# 4. The exact permutation test and its floor
# ------------------------------------------------------------------------------------------------
def test_exact_floor_3_seeds_can_never_be_significant():
    # 3 vs 3 unpaired, perfectly separated: p = floor = 2/C(6,3) = 0.1
    assert v.exact_p([1, 2, 3], [10, 11, 12], paired=False) == (0.1, 0.1)
    # 3 pairs, every difference the same sign: p = floor = 2/2³ = 0.25
    assert v.exact_p([1, 2, 3], [11, 12, 13.5]) == (0.25, 0.25)
    r = v.compare([1, 2, 3], [11, 12, 13.5], paired=True, delta=0.1)
    assert r["exact_p"] == r["exact_p_floor"] == 0.25 > 0.05
    r = v.compare([1, 2, 3], [10, 11, 12], paired=False, delta=0.1)
    assert r["exact_p"] == r["exact_p_floor"] == 0.1 > 0.05


def test_exact_p_by_hand():
    # d = (1, 2, −0.5), Σd = 2.5; the 8 signed sums are ±3.5, ±2.5, ±1.5, ±0.5 → 4 of 8 are ≥ 2.5
    assert v.exact_p([1, 2, -0.5]) == (0.5, 0.25)
    assert v.exact_p([1, 2, 2.5], [0, 0, 3]) == (0.5, 0.25)          # same d, given as a, b
    # all differences zero: every flip ties
    assert v.exact_p([0.0, 0.0, 0.0]) == (1.0, 0.25)
    # n_a ≠ n_b: nothing is forced to tie, the floor is 1/C(5,2) = 0.1, and it is attained
    assert v.exact_p([100, 101], [0, 1, 2], paired=False) == (0.1, 0.1)
    # brute force against a direct count on random data
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=4), rng.normal(size=5)
    obs = abs(a.mean() - b.mean())
    pooled = np.concatenate([a, b])
    hits = sum(abs(pooled[list(c)].mean() - np.delete(pooled, list(c)).mean()) >= obs - 1e-12
               for c in itertools.combinations(range(9), 4))
    assert v.exact_p(a, b, paired=False)[0] == pytest.approx(hits / math.comb(9, 4))


def test_exact_p_too_many_arrangements():
    assert v.exact_p(np.arange(16.0) + 1)[1] == pytest.approx(2 / 2 ** 16)        # 2^16: allowed
    with pytest.raises(ValueError):
        v.exact_p(np.arange(17.0) + 1)
    with pytest.raises(ValueError):
        v.exact_p(np.arange(10.0), np.arange(10.0) + 1, paired=False)          # C(20,10) > 2^16
    r = v.compare(np.arange(20.0), np.arange(20.0) + 1 + np.sin(np.arange(20.0)), paired=True, delta=0.1)
    assert r["exact_p"] is None and r["exact_p_floor"] is None
    assert "too many" in v.describe(r)


# ------------------------------------------------------------------------------------------------
# 5. compare and decide
# ------------------------------------------------------------------------------------------------
def test_paired_t_against_closed_form():
    a, b = np.array([2.72, 2.70, 2.74]), np.array([2.732, 2.725, 2.74])
    r = v.compare(a, b, paired=True, delta=0.01)
    d = a - b
    se = d.std(ddof=1) / math.sqrt(3)
    t = d.mean() / se
    assert r["test"] == "paired t" and r["n"] == 3 and r["df"] == 2
    assert r["diff"] == pytest.approx(d.mean(), abs=1e-15) and r["se"] == pytest.approx(se, rel=1e-12)
    # two-sided p with the df = 2 closed form: 2(1 − F(|t|)), F(x) = ½ + x/(2√(x² + 2))
    assert r["p"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2), rel=1e-12)
    # CI: Δ ± t_{0.975,2}·SE with the exact df = 2 quantile
    tq = t_quantile_df2(0.975)
    assert r["ci"] == pytest.approx((d.mean() - tq * se, d.mean() + tq * se), rel=1e-12)
    # MDE = (t_{0.975,2} + t_{0.8,2})·SE
    assert r["mde"] == pytest.approx((tq + math.sqrt(9 / 8)) * se, rel=1e-12)


def test_welch_against_independent_formula_and_even_df():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]                   # equal variances, n: df = 2n − 2 = 4
    r = v.compare(a, b, paired=False, delta=0.5)
    assert r["test"] == "Welch t" and r["n"] == (3, 3)
    assert r["df"] == pytest.approx(4.0) and r["se"] == pytest.approx(math.sqrt(2 / 3))
    t = -3 / math.sqrt(2 / 3)
    assert r["p"] == pytest.approx(2 * t_cdf_even_df(t, 4), rel=1e-12)
    # unequal variances and sizes: the Welch–Satterthwaite df
    a, b = np.array([1.0, 1.2, 0.9, 1.4]), np.array([2.0, 0.5, 3.1])
    r = v.compare(a, b, paired=False, delta=0.5, direction="greater")
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    assert r["df"] == pytest.approx((va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2), rel=1e-12)
    assert r["se"] == pytest.approx(math.sqrt(va + vb), rel=1e-12)


def test_paired_p_monte_carlo():
    """The paired t p-value is the chance, under H₀ with normal differences, of |t| at least the
    observed one: check with 200,000 simulated 4-pair experiments (vectorised)."""
    r = v.compare([1.0, 1.3, 0.9, 1.25], [0.8, 1.1, 1.0, 0.95], paired=True, delta=0.1)
    rng = np.random.default_rng(7)
    d = rng.normal(size=(200_000, 4))
    t = d.mean(1) / (d.std(1, ddof=1) / 2)
    mc = np.mean(np.abs(t) >= abs(r["t"]))
    assert abs(mc - r["p"]) < 4 * math.sqrt(r["p"] * (1 - r["p"]) / 200_000)


def test_tost_is_the_1_minus_2alpha_ci_inside_delta():
    rng = np.random.default_rng(5)
    for _ in range(200):
        a = rng.normal(size=4)
        b = a + rng.normal(0.0, 0.3, size=4) + rng.normal(0.0, 0.2)
        for paired in (True, False):
            delta = float(rng.uniform(0.05, 1.5))
            r = v.compare(a, b, paired=paired, delta=delta)
            lo, hi = v.compare(a, b, paired=paired, delta=delta, alpha=0.10)["ci"]   # 90% CI
            assert (r["p_tost"] < 0.05) == (-delta < lo and hi < delta)


def test_the_null_rate_is_alpha_and_the_old_rule_is_not():
    """The case that motivated the module: 20,000 paired 3-seed experiments with no true effect."""
    rng = np.random.default_rng(2024)
    n_exp = 20_000
    a, b = rng.normal(size=(n_exp, 3)), rng.normal(size=(n_exp, 3))
    words = [v.decide(v.compare(a[i], b[i], paired=True, delta=0.5)) for i in range(n_exp)]
    rate = np.mean([w in ("supported", "contradicted") for w in words])
    # binomial noise: sd = √(0.05·0.95/20000) ≈ 0.0015
    assert 0.04 < rate < 0.06, rate
    # the old rule |Δ| > 2·SE (Welch SE) on the same draws
    se = np.sqrt(a.var(1, ddof=1) / 3 + b.var(1, ddof=1) / 3)
    old = np.mean(np.abs(a.mean(1) - b.mean(1)) > 2 * se)
    assert old > 0.10, old


def test_verdict_words():
    base = np.array([1.00, 1.10, 0.90, 1.05, 0.95])
    noise = np.array([0.01, -0.01, 0.005, 0.0, -0.005])
    better = base - 0.2 + noise                              # clearly lower (better bpb)
    assert v.decide(v.compare(better, base, paired=True, delta=0.01)) == "supported"
    assert v.decide(v.compare(base, better, paired=True, delta=0.01)) == "contradicted"
    assert v.decide(v.compare(better, base, paired=True, delta=0.01, direction="greater")) == "contradicted"
    same = base + np.array([1e-4, -1e-4, 5e-5, -5e-5, 0.0])
    assert v.decide(v.compare(same, base, paired=True, delta=0.05)) == "no effect ≥ δ"
    # noisy 3 pairs: unresolved, and the MDE printed is (t_{0.975,2} + t_{0.8,2})·sd(d)/√3
    a, b = np.array([1.0, 1.3, 0.8]), np.array([1.1, 0.9, 1.2])
    r = v.compare(a, b, paired=True, delta=0.01)
    word = v.decide(r)
    assert word.startswith("unresolved (MDE =")
    mde = (t_quantile_df2(0.975) + math.sqrt(9 / 8)) * (a - b).std(ddof=1) / math.sqrt(3)
    assert word == f"unresolved (MDE = {mde:.3g})"
    assert float(word[len("unresolved (MDE = "):-1]) == pytest.approx(mde, rel=1e-2)


def test_paired_beats_unpaired_when_the_seed_effect_dominates():
    seed_effect = np.array([0.0, 0.5, -0.3, 0.8])           # shared by both arms of seed i
    a = 3.0 + seed_effect + np.array([-0.020, -0.022, -0.019, -0.021])
    b = 3.0 + seed_effect
    rp = v.compare(a, b, paired=True, delta=0.005)
    ru = v.compare(a, b, paired=False, delta=0.005)
    assert rp["p"] < 1e-4 and ru["p"] > 0.5
    assert v.decide(rp) == "supported" and v.decide(ru).startswith("unresolved")


def test_decide_uses_adjusted_p_values():
    r = v.compare([1.0, 1.3, 0.8], [1.1, 0.9, 1.2], paired=True, delta=0.01)
    assert r["diff"] < 0
    assert v.decide(r, p_adjusted=0.01) == "supported"       # diff < 0, the claimed "less"
    assert v.decide(r, p_adjusted=0.01, p_tost_adjusted=0.01) == "supported"   # p comes first
    r = v.compare([1.1, 0.9, 1.2], [1.0, 1.3, 0.8], paired=True, delta=0.01)
    assert v.decide(r, p_adjusted=0.01) == "contradicted"    # diff > 0 against the claim
    assert v.decide(r, p_tost_adjusted=0.01) == "no effect ≥ δ"


def test_decide_family():
    base = np.array([1.00, 1.10, 0.90, 1.05, 0.95])
    clear = v.compare(base - 0.2 + np.array([0.01, -0.01, 0.005, 0.0, -0.005]), base, paired=True, delta=0.01)
    borderline = v.compare([1.0, 1.3, 0.8], [1.1, 0.9, 1.2], paired=True, delta=0.01)
    borderline["p"] = 0.03                                   # significant alone ...
    noise = v.compare([1.0, 1.3, 0.8], [1.2, 0.9, 1.1], paired=True, delta=0.01)
    assert v.decide(borderline) == "supported"
    words = v.decide_family([clear, borderline, noise])
    assert words[0] == "supported"
    assert words[1].startswith("unresolved")                 # ... not after Holm (0.03·2 = 0.06)
    adj = v.holm([clear["p"], 0.03, noise["p"]])
    assert [r["p_holm"] for r in (clear, borderline, noise)] == adj
    assert [r["p_tost_holm"] for r in (clear, borderline, noise)] == v.holm(
        [clear["p_tost"], borderline["p_tost"], noise["p_tost"]])
    assert "Holm p" in v.describe(borderline) and "Holm p" not in v.describe(v.compare(
        [1.0, 1.3, 0.8], [1.1, 0.9, 1.2], paired=True, delta=0.01))


def test_describe_format():
    r = {"test": "paired t", "n": 3, "diff": -0.0119, "ci": (-0.061, 0.037), "p": 0.44, "p_holm": 0.87,
         "delta": 0.01, "p_tost": 0.52, "mde": 0.11, "exact_p": 0.25, "exact_p_floor": 0.25, "alpha": 0.05}
    assert v.describe(r) == ("Δ −0.0119 [95% CI −0.061, +0.037] (paired t, 3 pairs, p 0.44, Holm p 0.87; "
                             "TOST ±0.01 p 0.52; MDE 0.11; exact-test p 0.25, floor 0.25)")
    r = v.compare([1, 2, 3], [4, 5, 7], paired=False, delta=0.5)
    s = v.describe(r, unit="bpb")
    assert s.startswith("Δ −3.33 bpb [95% CI −6.45, −0.212] (Welch t, 3 vs 3 runs, p 0.0419;") and "Welch t, 3 vs 3 runs" in s and "Holm" not in s


def test_zero_variance_does_not_crash():
    r = v.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0], paired=True, delta=0.1)
    assert (r["p"], r["ci"], r["p_tost"], r["mde"]) == (1.0, (0.0, 0.0), 0.0, 0.0)
    assert v.decide(r) == "no effect ≥ δ"
    assert v.decide(v.compare([1.0, 1.0], [1.0, 1.0], paired=True, delta=0.0)) == "unresolved (MDE = 0)"
    r = v.compare([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], paired=True, delta=0.1)      # d ≡ −1
    assert (r["p"], r["ci"], r["p_tost"], r["mde"]) == (0.0, (-1.0, -1.0), 1.0, 0.0)
    assert v.decide(r) == "supported"
    for paired in (True, False):
        r = v.compare([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], paired=paired, delta=0.1)
        assert r["p"] == 0.0 and v.decide(r) == "contradicted"
        v.describe(r)
    r = v.compare([2.0, 2.0, 2.0], [1.0, 1.5, 1.2], paired=False, delta=0.1)  # one constant arm
    assert r["df"] == pytest.approx(2.0) and 0 < r["p"] < 1


@pytest.mark.parametrize("call", [
    lambda: v.compare([], [1.0, 2.0], paired=False, delta=0.1),
    lambda: v.compare([1.0], [1.0], paired=True, delta=0.1),
    lambda: v.compare([1.0, 2.0, 3.0], [1.0, 2.0], paired=True, delta=0.1),
    lambda: v.compare([1.0, float("nan")], [1.0, 2.0], paired=True, delta=0.1),
    lambda: v.compare([1.0, 2.0], [1.0, 3.0], paired=True, delta=-0.1),
    lambda: v.compare([1.0, 2.0], [1.0, 3.0], paired=True, delta=float("nan")),
    lambda: v.compare([1.0, 2.0], [1.0, 3.0], paired=True, delta=0.1, alpha=1.0),
    lambda: v.compare([1.0, 2.0], [1.0, 3.0], paired=True, delta=0.1, alpha=0.0),
    lambda: v.compare([1.0, 2.0], [1.0, 3.0], paired=True, delta=0.1, direction="lower"),
    lambda: v.exact_p([1.0, 2.0], paired=False),
    lambda: v.exact_p([1.0, 2.0], [1.0, 2.0, 3.0]),
    lambda: v.t_cdf(1.0, 0.0),
    lambda: v.t_cdf(float("nan"), 3),
    lambda: v.t_ppf(1.0, 3),
    lambda: v.t_ppf(0.5, -1),
    lambda: v.norm_ppf(0.0),
    lambda: v.norm_ppf(float("nan")),
    lambda: v.wilson(11, 10),
    lambda: v.wilson(1, 0),
    lambda: v.wilson(1.5, 10),
    lambda: v.wilson(1, 10, conf=1.5),
    lambda: v.newcombe_diff(1, 10, -1, 10),
    lambda: v.proportion(3, 2),
    lambda: v.holm([]),
    lambda: v.holm([0.1, float("nan")]),
    lambda: v.holm([1.2]),
    lambda: v.decide_family([]),
    lambda: v.decide({"p": 0.1}),
    lambda: v.describe({}),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_constants():
    assert (v.THEOREM, v.CONSTRUCTION, v.NOT_APPLICABLE) == ("theorem check", "true by construction",
                                                           "not applicable")


def test_kaplan_meier_and_its_median_by_hand():
    # 4 runs: events at 1, 2, 3; one censored at 2 (still at risk at 2)
    # S(1) = 3/4; S(2) = 3/4 · (1 − 1/3) = 1/2; S(3) = 1/2 · (1 − 1/1) = 0
    km = v.kaplan_meier([1, 2, 2, 3], [1, 0, 1, 1])
    assert km == [(1.0, 0.75), (2.0, pytest.approx(0.5)), (3.0, 0.0)]
    assert v.km_median([1, 2, 2, 3], [1, 0, 1, 1]) == 2.0
    assert v.km_median([5, 10, 10], [1, 0, 0]) == math.inf        # two of three never got there
    with pytest.raises(ValueError, match="0/1 flag"):
        v.kaplan_meier([1, 2], [1, 2])


def test_logrank_by_hand_and_its_exact_permutation_p():
    # a reaches at 1 and 2, b at 3 and 4. At t=1: n=4, n_a=2 → E_a 1/2, V 1/4; at t=2: n=3, n_a=1 →
    # E_a 1/3, V 2/9; later n_a = 0. O_a − E_a = 2 − 5/6 = 7/6, V = 17/36 → z = 7/√17
    r = v.logrank([1, 2], [1, 1], [3, 4], [1, 1])
    assert r["z"] == pytest.approx(7 / math.sqrt(17), abs=1e-12)
    assert r["p_normal"] == pytest.approx(2 * (1 - v._norm_cdf(7 / math.sqrt(17))), abs=1e-12)
    # 6 relabellings; {1,2} and {3,4} as "a" give |z| = 7/√17, the other four less: p = 2/6
    assert r["p_exact"] == pytest.approx(2 / 6) and r["p_floor"] == pytest.approx(2 / 6)
    # censoring is not survivorship: a run censored at the budget counts as watched that long
    r = v.logrank([2, 3, 3, 3, 3], [1, 1, 1, 1, 1], [2, 10, 10, 10, 10], [1, 0, 0, 0, 0])
    assert r["z"] > 0 and r["median_a"] == 3 and r["median_b"] == math.inf
    assert r["p_exact"] < 0.05 and r["reached_b"] == 1
    # swapping the arms flips z; the same curves give z = 0 and p = 1
    assert v.logrank([2, 10, 10, 10, 10], [1, 0, 0, 0, 0], [2, 3, 3, 3, 3], [1] * 5)["z"] == pytest.approx(-r["z"])
    same = v.logrank([1, 2, 3], [1, 1, 0], [1, 2, 3], [1, 1, 0])
    assert same["z"] == 0 and same["p_exact"] == 1.0
