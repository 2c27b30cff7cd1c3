"""analysis/verdicts.py — the one rule that turns a handful of seeds into a verdict on a claim.

Every claim in results/README.md ("RoPE beats absolute PE", "the λ-term improves bpb", ...) is a
comparison of two arms, a and b, run with a few seeds each (typically 3). The runs are usually
seed-matched: seed s of arm a and seed s of arm b share data order and initialisation, so they are
PAIRED, and the seed-to-seed noise they share cancels in the difference aᵢ − bᵢ.

Why a new rule
--------------
The old rule said "resolved when |Δ| > 2·SE". With 3 seeds per arm the SE is itself estimated from
3 numbers, so Δ/SE follows a Student t with very few degrees of freedom, whose tails are far
heavier than the normal's: 2 is nowhere near its 97.5% point (t₀.₉₇₅,₂ = 4.30, t₀.₉₇₅,₄ = 2.78).
Under the null (no effect at all) the old rule fires 12–18% of the time instead of 5%.

The rule (compare → decide, or decide_family for a family of claims)
-----------------------------------------------------------------
1. Δ = mean(a) − mean(b), and its standard error SE:
     paired   — dᵢ = aᵢ − bᵢ, SE = sd(d)/√n, df = n − 1             (the paired t-test);
     unpaired — SE = √(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite df (Welch's t-test).
2. Three questions are asked of the same t statistic:
     • is there an effect?       two-sided t-test p of H₀: Δ = 0;
     • is the effect negligible? TOST (two one-sided tests) p of H₀: |Δ| ≥ δ, where δ is the
                                 smallest difference the claim cares about;
     • how big an effect could this design have seen?  the minimum detectable effect
                                 MDE = (t₁₋α/₂ + t₀.₈₀)·SE (80% power, two-sided α).
3. Over a family of claims the p's are Holm-adjusted (the two-sided ones as one family, the TOST
   ones as another), so that the chance of ANY false "supported" in the table stays ≤ α.
4. The verdict word:
     "supported"             adjusted p < α and Δ has the claimed sign;
     "contradicted"          adjusted p < α and Δ has the other sign;
     "no effect ≥ δ"         not significant, and adjusted TOST p < α (Δ is inside ±δ);
     "unresolved (MDE = X)"  anything else: the data cannot tell, and X says how large an effect
                             would have been needed to tell.
Under the null, step 4 says "supported" or "contradicted" 5% of the time (the test's α), whatever
the number of seeds (tests/test_verdicts.py simulates it).

The exact permutation test (exact_p) is reported beside the t-test as a sanity check that does
not assume normality. It has a floor: with 3 pairs there are only 2³ = 8 sign flips, so the
smallest p it can ever give is 2/8 = 0.25; with 3 vs 3 unpaired runs, 2/C(6,3) = 0.1. Neither can
ever reach 0.05, however clear the effect — a fact worth printing beside every 3-seed verdict.

Also here: Wilson and Newcombe intervals for proportions (accuracies counted out of n), Holm's
step-down adjustment, and the Student t and normal distribution functions they all rest on
(written out with the standard library; no scipy). Every function raises ValueError, with one
sentence, on input it cannot honestly answer.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

# Verdict words for claims that are not decided by a statistical test (used in the same table).
THEOREM = "theorem check"                     # checked against a proved statement, not sampled
CONSTRUCTION = "true by construction"         # holds because of how the code builds the object
NOT_APPLICABLE = "not applicable"             # the claim does not apply to this setting

SUPPORTED = "supported"
CONTRADICTED = "contradicted"
NO_EFFECT = "no effect ≥ δ"
UNRESOLVED = "unresolved"

MAX_ARRANGEMENTS = 2 ** 16                    # the most permutations exact_p will enumerate

_EPS = 1e-15                                  # relative accuracy the continued fraction aims for
_TINY = 1e-300                                # Lentz's guard against division by zero
_MAXIT = 100_000                              # continued-fraction terms before giving up


class TooManyArrangements(ValueError):
    """exact_p was asked to enumerate more than MAX_ARRANGEMENTS arrangements."""


# ================================================================================================
# 1. Input checks (one sentence each)
# ================================================================================================
def _check_prob(p, name: str) -> float:
    """p as a float strictly inside (0, 1)."""
    p = float(p)
    if not (0.0 < p < 1.0):                   # also false for NaN
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {p!r}.")
    return p


def _check_sample(x, name: str) -> np.ndarray:
    """x as a 1-D float array of at least 2 finite values."""
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of numbers.") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, got shape {arr.shape}.")
    if arr.size == 0:
        raise ValueError(f"{name} is empty.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if arr.size < 2:
        raise ValueError(f"{name} needs at least 2 values to estimate a spread, got {arr.size}.")
    return arr


def _check_count(k, n) -> tuple[int, int]:
    """(k, n) as integers with n ≥ 1 and 0 ≤ k ≤ n."""
    try:
        whole = not isinstance(k, bool) and not isinstance(n, bool) and int(k) == k and int(n) == n
    except (TypeError, ValueError, OverflowError):    # None, NaN, inf, text
        whole = False
    if not whole:
        raise ValueError(f"counts must be whole numbers, got k={k!r}, n={n!r}.")
    k, n = int(k), int(n)
    if n < 1 or not (0 <= k <= n):
        raise ValueError(f"need n ≥ 1 and 0 ≤ k ≤ n, got k={k}, n={n}.")
    return k, n


# ================================================================================================
# 2. Distribution functions: the regularised incomplete beta, Student t, the normal
# ================================================================================================
def _lentz(aa: float, c: float, d: float) -> tuple[float, float]:
    """One step of Lentz's method for the coefficient aa: d ← 1/(1 + aa·d), c ← 1 + aa/c, each
    kept away from 0 by _TINY. Returns (c, d); the fraction's value is multiplied by c·d."""
    d = 1.0 + aa * d
    if -_TINY < d < _TINY:            # |d| < tiny
        d = _TINY
    c = 1.0 + aa / c
    if -_TINY < c < _TINY:            # |c| < tiny
        c = _TINY
    return c, 1.0 / d


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method
    (Numerical Recipes' betacf). It converges fast for x < (a + 1)/(a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    # Lentz: f = b₀ + a₁/(b₁ + a₂/(b₂ + ...)) is built as a product of ratios C_m·D_m;
    # first denominator D₁ = 1/(1 − (a+b)x/(a+1)), C₁ = 1
    c = 1.0
    d = 1.0 - qab * x / qap
    if -_TINY < d < _TINY:        # |d| < tiny
        d = _TINY
    d = 1.0 / d
    h = d
    for m in range(1, _MAXIT + 1):
        m2 = 2 * m
        # even coefficient: d_{2m} = m(b − m)x / ((a + 2m − 1)(a + 2m))
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        c, d = _lentz(aa, c, d)
        h *= d * c
        # odd coefficient: d_{2m+1} = −(a + m)(a + b + m)x / ((a + 2m)(a + 2m + 1))
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        c, d = _lentz(aa, c, d)
        delta = d * c
        h *= delta
        if -_EPS < delta - 1.0 < _EPS:        # |Δ_m − 1| < ε: converged
            return h
    raise RuntimeError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x}).")


def _betai(a: float, b: float, x: float, xc: float) -> float:
    """Regularised incomplete beta I_x(a, b), given both x and xc = 1 − x (passed separately so
    that neither loses digits to the subtraction)."""
    if x <= 0.0:
        return 0.0
    if xc <= 0.0:
        return 1.0
    # front factor: x^a (1−x)^b / B(a, b), with B(a, b) = Γ(a)Γ(b)/Γ(a+b), in logs
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log(xc))
    if x < (a + 1.0) / (a + b + 2.0):
        # I_x(a, b) = front · CF(a, b, x) / a
        return front * _betacf(a, b, x) / a
    # symmetry: I_x(a, b) = 1 − I_{1−x}(b, a), where the continued fraction converges
    return 1.0 - front * _betacf(b, a, xc) / b


def _norm_cdf(x: float) -> float:
    """Standard normal CDF."""
    # Φ(x) = ½ erfc(−x/√2)   (erfc keeps the lower tail accurate)
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _t_two_tail(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for T ~ Student t with df degrees of freedom."""
    t = abs(t)
    if math.isinf(t):
        return 0.0
    if math.isinf(df):
        # ν → ∞: the t becomes the standard normal, P(|Z| ≥ t) = erfc(t/√2)
        return math.erfc(t / math.sqrt(2.0))
    # u = t/√ν, so that t²/ν = u² (cannot overflow where t² would)
    u = t / math.sqrt(df)
    if u > 1e150:
        return 0.0
    # x = ν/(ν + t²) = 1/(1 + u²),  1 − x = u²/(1 + u²)
    x = 1.0 / (1.0 + u * u)
    xc = u * u / (1.0 + u * u)
    # P(|T| ≥ t) = I_x(ν/2, ½)
    return _betai(0.5 * df, 0.5, x, xc)


def _check_df(df) -> float:
    df = float(df)
    if not (df > 0.0):                        # also false for NaN
        raise ValueError(f"degrees of freedom must be positive, got {df!r}.")
    return df


def t_cdf(x: float, df: float) -> float:
    """Student t CDF P(T ≤ x) with df > 0 degrees of freedom (df may be fractional, as Welch's is,
    or math.inf for the normal); x may be ±inf. Computed from the regularised incomplete beta:
    P(|T| ≥ |x|) = I_{ν/(ν+x²)}(ν/2, ½), and the CDF is half of that on the tail side."""
    x = float(x)
    df = _check_df(df)
    if math.isnan(x):
        raise ValueError("t_cdf got x = NaN.")
    tail = 0.5 * _t_two_tail(x, df)           # P(T ≥ |x|), by symmetry of T about 0
    # F(x) = 1 − P(T ≥ x) for x ≥ 0;  F(x) = P(T ≥ −x) for x < 0
    return 1.0 - tail if x >= 0 else tail


def _t_pdf(t: float, df: float) -> float:
    """Student t density (used for Newton steps in t_ppf)."""
    # f(t) = Γ((ν+1)/2) / (Γ(ν/2) √(νπ)) · (1 + t²/ν)^(−(ν+1)/2)
    log_c = math.lgamma(0.5 * (df + 1.0)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - 0.5 * (df + 1.0) * math.log1p(t * t / df))


@functools.lru_cache(maxsize=4096)
def _t_ppf_cached(p: float, df: float) -> float:
    if p == 0.5:
        return 0.0
    # work on the small tail q = P(T ≥ t) so that p near 1 keeps its digits (1 − p is exact here)
    q = 1.0 - p if p > 0.5 else p
    sign = 1.0 if p > 0.5 else -1.0

    def upper(t):                             # P(T ≥ t) for t ≥ 0, decreasing in t
        return 0.5 * _t_two_tail(t, df)

    # bracket the root: upper(0) = ½ > q; double hi until upper(hi) ≤ q
    lo, hi = 0.0, 1.0
    while upper(hi) > q:
        lo, hi = hi, 2.0 * hi
        if hi > 1e300:
            return sign * math.inf
    # safeguarded Newton: t ← t + (upper(t) − q)/f(t)  (d upper/dt = −f), bisect when it leaves
    # the bracket; stop when the bracket or the step is below ~1e-13 relative
    t = 0.5 * (lo + hi)
    for _ in range(500):
        g = upper(t) - q
        if g > 0:
            lo = t                            # still above the target tail: root is to the right
        else:
            hi = t
        f = _t_pdf(t, df)
        step = g / f if f > 0 else math.inf
        new = t + step
        if not (lo < new < hi):
            new = 0.5 * (lo + hi)             # Newton left the bracket: bisect instead
        if abs(new - t) <= 1e-13 * max(1.0, abs(t)) or hi - lo <= 1e-14 * max(1.0, hi):
            t = new
            break
        t = new
    return sign * t


def t_ppf(p: float, df: float) -> float:
    """Student t quantile: the x with t_cdf(x, df) = p, for 0 < p < 1 and df > 0 (math.inf gives
    the normal quantile). Safeguarded Newton on t_cdf, to ~1e-13 relative."""
    p = _check_prob(p, "p")
    df = _check_df(df)
    if math.isinf(df):
        return norm_ppf(p)
    return _t_ppf_cached(p, df)


# Acklam's rational approximation of the normal quantile (relative error < 1.2e-9), then one
# Halley step on the exact Φ brings it to double precision.
_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
      1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
      6.680131188771972e+01, -1.328068155288572e+01)
_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
      -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00)


def norm_ppf(p: float) -> float:
    """Standard normal quantile Φ⁻¹(p), 0 < p < 1 (Acklam's approximation + one Halley step)."""
    p = _check_prob(p, "p")
    p_low = 0.02425
    if p < p_low:
        # lower tail: q = √(−2 ln p), x = C(q)/D(q)  (rational in q)
        q = math.sqrt(-2.0 * math.log(p))
        x = ((((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5])
             / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0))
    elif p <= 1.0 - p_low:
        # central region: r = (p − ½)², x = (p − ½)·A(r)/B(r)
        q = p - 0.5
        r = q * q
        x = ((((((_A[0] * r + _A[1]) * r + _A[2]) * r + _A[3]) * r + _A[4]) * r + _A[5]) * q
             / (((((_B[0] * r + _B[1]) * r + _B[2]) * r + _B[3]) * r + _B[4]) * r + 1.0))
    else:
        # upper tail: mirror of the lower tail with 1 − p
        q = math.sqrt(-2.0 * math.log1p(-p))
        x = -((((((_C[0] * q + _C[1]) * q + _C[2]) * q + _C[3]) * q + _C[4]) * q + _C[5])
              / ((((_D[0] * q + _D[1]) * q + _D[2]) * q + _D[3]) * q + 1.0))
    # Halley refinement: e = Φ(x) − p, u = e·√(2π)·exp(x²/2), x ← x − u/(1 + x·u/2)
    # (on the upper side the error is taken on the upper tail, to keep its digits)
    if p > 0.5:
        e = -(0.5 * math.erfc(x / math.sqrt(2.0)) - (1.0 - p))
    else:
        e = _norm_cdf(x) - p
    u = e * math.sqrt(2.0 * math.pi) * math.exp(0.5 * x * x)
    return x - u / (1.0 + 0.5 * x * u)


# ================================================================================================
# 3. Proportions: Wilson's interval, Newcombe's difference interval
# ================================================================================================
def wilson(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion of k successes in n trials, at confidence conf.
    Unlike p̂ ± z·√(p̂(1−p̂)/n) it never leaves [0, 1] and is not degenerate at k = 0 or k = n."""
    k, n = _check_count(k, n)
    conf = _check_prob(conf, "conf")
    # z = Φ⁻¹(1 − (1 − conf)/2), the two-sided normal critical value
    z = norm_ppf(1.0 - 0.5 * (1.0 - conf))
    p = k / n
    # the interval solves |p̂ − π| = z·√(π(1−π)/n) for π:
    # centre = (p̂ + z²/(2n)) / (1 + z²/n)
    centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n)
    # half-width = z/(1 + z²/n) · √(p̂(1−p̂)/n + z²/(4n²))
    half = z / (1.0 + z * z / n) * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    lo = 0.0 if k == 0 else max(0.0, centre - half)      # exact ends: round-off cannot move them
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def newcombe_diff(k1: int, n1: int, k2: int, n2: int, conf: float = 0.95) -> tuple[float, float, float]:
    """(p₁ − p₂, lo, hi): Newcombe's hybrid score interval for a difference of two independent
    proportions (method 10 of Newcombe 1998), built from the two Wilson intervals [l₁, u₁], [l₂, u₂]."""
    k1, n1 = _check_count(k1, n1)
    k2, n2 = _check_count(k2, n2)
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, conf)
    l2, u2 = wilson(k2, n2, conf)
    # D = p₁ − p₂
    d = p1 - p2
    # lower: D − √((p₁ − l₁)² + (u₂ − p₂)²)
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    # upper: D + √((u₁ − p₁)² + (p₂ − l₂)²)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, lo, hi


def proportion(k: int, n: int, conf: float = 0.95) -> str:
    """One human string for k of n with its Wilson interval, in percent: "62.0% [58.9, 65.0] (620/1000)"."""
    k, n = _check_count(k, n)
    lo, hi = wilson(k, n, conf)
    return f"{100.0 * k / n:.1f}% [{100.0 * lo:.1f}, {100.0 * hi:.1f}] ({k}/{n})"


# ================================================================================================
# 4. Holm's step-down adjustment
# ================================================================================================
def holm(pvalues: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input's order. Rejecting every claim whose adjusted
    p is < α keeps the chance of any false rejection in the family ≤ α (whatever the dependence)."""
    ps = [float(p) for p in pvalues]
    if not ps:
        raise ValueError("holm got an empty list of p-values.")
    if any(not (0.0 <= p <= 1.0) for p in ps):           # also catches NaN
        raise ValueError("holm needs p-values in [0, 1] (no NaN).")
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        # p̃₍ⱼ₎ = max over j' ≤ j of min(1, (m − j' + 1)·p₍ⱼ'₎)   (j counted from 1; rank = j − 1)
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


# ================================================================================================
# 5. The exact permutation test
# ================================================================================================
@functools.lru_cache(maxsize=32)
def _sign_matrix(n: int) -> np.ndarray:
    """All 2ⁿ sign vectors (±1)ⁿ as a (2ⁿ, n) array."""
    bits = (np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]) & 1
    return 1.0 - 2.0 * bits


def exact_p(a, b=None, paired: bool = True) -> tuple[float, float]:
    """Exact two-sided permutation p-value of a mean difference, and the smallest p the design can
    ever give. Returns (p, p_floor).

    paired=True: the differences dᵢ = aᵢ − bᵢ (or a itself, when b is None, read as differences).
    Under H₀ each dᵢ is as likely to be +|dᵢ| as −|dᵢ|, so all 2ⁿ sign flips are equally likely;
    p = #{flips with |mean(±d)| ≥ |mean(d)|} / 2ⁿ. The flip of all signs always ties the observed
    one, so p ≥ p_floor = 2/2ⁿ.

    paired=False: under H₀ the labels are exchangeable, so all C(n_a + n_b, n_a) ways of choosing
    which values are "a" are equally likely; p = #{|mean(A) − mean(B)| ≥ observed} / C. With
    n_a = n_b relabelling a ↔ b ties the observed arrangement, so p_floor = 2/C; with n_a ≠ n_b
    no arrangement is forced to tie and p_floor = 1/C (capped at 1 either way).

    Ties (equal up to round-off) count as ≥ observed. Raises ValueError when there would be more
    than 2**16 arrangements."""
    if paired:
        if b is None:
            d = _check_sample(a, "the differences")
        else:
            a_ = _check_sample(a, "a")
            b_ = _check_sample(b, "b")
            if a_.size != b_.size:
                raise ValueError(f"a paired test needs equal lengths, got {a_.size} and {b_.size}.")
            d = a_ - b_
        return _exact_paired(d)
    if b is None:
        raise ValueError("an unpaired test needs both a and b.")
    return _exact_unpaired(_check_sample(a, "a"), _check_sample(b, "b"))


def _exact_paired(d: np.ndarray) -> tuple[float, float]:
    """exact_p for checked differences d (all 2ⁿ sign flips)."""
    n = d.size
    if 2 ** n > MAX_ARRANGEMENTS:
        raise TooManyArrangements(f"{n} pairs give 2^{n} sign flips, more than 2^16.")
    # every flipped sum Σ sᵢ dᵢ at once: S · d, with S the (2ⁿ, n) sign matrix
    sums = np.abs(_sign_matrix(n) @ d)
    observed = abs(float(d.sum()))
    # ties up to round-off count as "at least as extreme"
    tol = 1e-12 * max(1.0, float(np.abs(d).sum()))
    count = int(np.count_nonzero(sums >= observed - tol))
    total = 2 ** n
    # floor = 2/2ⁿ (the observed flip and its mirror image)
    return count / total, min(1.0, 2.0 / total)


def _exact_unpaired(a_: np.ndarray, b_: np.ndarray) -> tuple[float, float]:
    """exact_p for checked independent samples (all C(n_a + n_b, n_a) relabellings)."""
    na, nb = a_.size, b_.size
    total = math.comb(na + nb, na)
    if total > MAX_ARRANGEMENTS:
        raise TooManyArrangements(f"{na} vs {nb} runs give C({na + nb},{na}) = {total} relabellings, "
                                  "more than 2^16.")
    pooled = np.concatenate([a_, b_])
    # every choice of na indices for arm "a", as a (C, na) index array
    idx = np.array(list(itertools.combinations(range(na + nb), na)), dtype=np.int64)
    sum_a = pooled[idx].sum(axis=1)
    # mean(A) − mean(B) = ΣA/n_a − (Σall − ΣA)/n_b
    stats = np.abs(sum_a / na - (pooled.sum() - sum_a) / nb)
    observed = abs(float(a_.mean() - b_.mean()))
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    count = int(np.count_nonzero(stats >= observed - tol))
    floor = (2.0 if na == nb else 1.0) / total
    return count / total, min(1.0, floor)


# ================================================================================================
# 6. compare: the statistics of one claim
# ================================================================================================
def _mean_var(x: np.ndarray) -> tuple[float, float]:
    """(mean, sample variance with the n − 1 denominator) of a short sample, in plain floats
    (math.fsum: exactly rounded sums; faster than numpy on the 3–10 values a claim has)."""
    xs = x.tolist()
    n = len(xs)
    # x̄ = Σxᵢ / n
    m = math.fsum(xs) / n
    # s² = Σ(xᵢ − x̄)² / (n − 1)
    return m, math.fsum((v - m) * (v - m) for v in xs) / (n - 1)


def compare(a, b, *, paired: bool, delta: float, direction: str = "less", alpha: float = 0.05) -> dict:
    """All the statistics of one claim about Δ = mean(a) − mean(b).

    paired     — True for seed-matched runs (aᵢ and bᵢ share seed i): paired t-test on dᵢ = aᵢ − bᵢ;
                 False for independent runs: Welch's t-test.
    delta      — δ ≥ 0, the smallest |Δ| the claim cares about (for the equivalence test, TOST).
    direction  — the CLAIMED sign of Δ: "less" (claim a < b, e.g. a's bpb is lower) or "greater".
    alpha      — the test level; the CI reported is the two-sided 1 − α interval.

    Returns a dict: test, n, diff, se, df, t, ci, p, p_tost, mde, exact_p, exact_p_floor, delta,
    direction, alpha, paired, mean_a, mean_b. Zero spread (SE = 0, up to round-off) gives
    p = 0 if Δ ≠ 0 else 1, ci = (Δ, Δ), p_tost = 0 if |Δ| < δ else 1, mde = 0."""
    a_ = _check_sample(a, "a")
    b_ = _check_sample(b, "b")
    delta = float(delta)
    if not (delta >= 0.0) or math.isinf(delta):          # also false for NaN
        raise ValueError(f"delta must be a finite number ≥ 0, got {delta!r}.")
    if direction not in ("less", "greater"):
        raise ValueError(f"direction must be 'less' or 'greater', got {direction!r}.")
    alpha = _check_prob(alpha, "alpha")
    # the size of the numbers, to tell a zero spread from round-off
    scale = max(max(map(abs, a_.tolist())), max(map(abs, b_.tolist())))

    if paired:
        if a_.size != b_.size:
            raise ValueError(f"a paired comparison needs equal lengths, got {a_.size} and {b_.size}.")
        d = a_ - b_
        n = int(d.size)
        # Δ = mean(d) = mean(a) − mean(b)
        diff, var_d = _mean_var(d)
        # SE = sd(d)/√n, sd with the n − 1 denominator
        se = math.sqrt(var_d / n)
        # the paired t statistic has n − 1 degrees of freedom
        df = float(n - 1)
        test, n_out = "paired t", n
    else:
        na, nb = int(a_.size), int(b_.size)
        mean_a, var_a = _mean_var(a_)
        mean_b, var_b = _mean_var(b_)
        # Δ = mean(a) − mean(b)
        diff = mean_a - mean_b
        # each arm's squared standard error: s²/n
        va = var_a / na
        vb = var_b / nb
        # SE = √(s_a²/n_a + s_b²/n_b)
        se = math.sqrt(va + vb)
        if va + vb > 0:
            # Welch–Satterthwaite: ν = (v_a + v_b)² / (v_a²/(n_a − 1) + v_b²/(n_b − 1))
            df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
        else:
            # 0/0: both arms constant; take the pooled df (nothing below depends on it)
            df = float(na + nb - 2)
        test, n_out = "Welch t", (na, nb)

    zero_se = se <= 1e-13 * scale
    if zero_se:
        se = 0.0
        t = math.copysign(math.inf, diff) if diff != 0 else 0.0
        p = 0.0 if diff != 0 else 1.0
        ci = (diff, diff)
        p_tost = 0.0 if abs(diff) < delta else 1.0
        mde = 0.0
    else:
        # t = Δ / SE
        t = diff / se
        # two-sided p = P(|T_ν| ≥ |t|)
        p = _t_two_tail(t, df)
        # CI: Δ ± t_{1−α/2, ν}·SE
        t_crit = t_ppf(1.0 - 0.5 * alpha, df)
        ci = (diff - t_crit * se, diff + t_crit * se)
        # TOST. H₀⁻: Δ ≤ −δ, rejected for large t⁻ = (Δ + δ)/SE: p⁻ = P(T ≥ t⁻) = 1 − F(t⁻)
        p_low = 1.0 - t_cdf((diff + delta) / se, df)
        # H₀⁺: Δ ≥ +δ, rejected for small t⁺ = (Δ − δ)/SE: p⁺ = P(T ≤ t⁺) = F(t⁺)
        p_high = t_cdf((diff - delta) / se, df)
        # equivalence is shown only if both are rejected: p_TOST = max(p⁻, p⁺)
        # (p_TOST < α ⇔ the 1 − 2α CI lies inside (−δ, δ))
        p_tost = max(p_low, p_high)
        # MDE (standard normal-shift approximation, with t quantiles): the |Δ| detected with 80%
        # power by a two-sided level-α test is (t_{1−α/2, ν} + t_{0.80, ν})·SE
        mde = (t_crit + t_ppf(0.80, df)) * se

    try:
        ep, floor = _exact_paired(d) if paired else _exact_unpaired(a_, b_)
    except TooManyArrangements:
        ep, floor = None, None

    return {"test": test, "paired": bool(paired), "n": n_out,
            "mean_a": _mean_var(a_)[0], "mean_b": _mean_var(b_)[0],
            "diff": diff, "se": se, "df": df, "t": t, "ci": ci,
            "p": p, "p_tost": p_tost, "mde": mde,
            "exact_p": ep, "exact_p_floor": floor,
            "delta": delta, "direction": direction, "alpha": alpha}


# ================================================================================================
# 7. decide: the verdict word(s)
# ================================================================================================
def decide(result: dict, p_adjusted: float | None = None, p_tost_adjusted: float | None = None) -> str:
    """The verdict word for one compare() result: "supported", "contradicted", "no effect ≥ δ" or
    "unresolved (MDE = X)". The adjusted p's (e.g. Holm's, from decide_family) replace the raw ones
    when given."""
    try:
        p = result["p"] if p_adjusted is None else p_adjusted
        p_tost = result["p_tost"] if p_tost_adjusted is None else p_tost_adjusted
        alpha, diff, direction, mde = result["alpha"], result["diff"], result["direction"], result["mde"]
    except (KeyError, TypeError):
        raise ValueError("decide needs a result dict from compare().") from None
    p, p_tost = float(p), float(p_tost)
    if not (0.0 <= p <= 1.0) or not (0.0 <= p_tost <= 1.0):
        raise ValueError("decide needs p-values in [0, 1] (no NaN).")
    if p < alpha:
        # significant: the sign of Δ against the claimed one
        claimed = diff < 0 if direction == "less" else diff > 0
        return SUPPORTED if claimed else CONTRADICTED
    if p_tost < alpha:
        return NO_EFFECT
    return f"{UNRESOLVED} (MDE = {mde:.3g})"


def decide_family(results: list[dict]) -> list[str]:
    """Verdicts for a family of claims, Holm-adjusting the two-sided p's as one family and the
    TOST p's as another. Adds "p_holm" and "p_tost_holm" to each result dict (in place)."""
    results = list(results)
    if not results:
        raise ValueError("decide_family got an empty list of results.")
    try:
        p_holm = holm([r["p"] for r in results])
        p_tost_holm = holm([r["p_tost"] for r in results])
    except (KeyError, TypeError):
        raise ValueError("decide_family needs result dicts from compare().") from None
    words = []
    for r, ph, pth in zip(results, p_holm, p_tost_holm):
        r["p_holm"], r["p_tost_holm"] = ph, pth
        words.append(decide(r, ph, pth))
    return words


# ================================================================================================
# 8. describe: one human line
# ================================================================================================
def _num(x: float, digits: int, sign: bool = False) -> str:
    """x to `digits` significant digits, with a true minus sign (and a + when sign=True)."""
    if x == 0:
        x = 0.0                               # no "−0"
    mag = f"{abs(x):.{digits}g}"
    return ("−" if x < 0 else ("+" if sign else "")) + mag


def describe(result: dict, unit: str = "", digits: int = 3) -> str:
    """One line, e.g.
    Δ −0.0119 [95% CI −0.061, +0.037] (paired t, 3 pairs, p 0.44, Holm p 0.87; TOST ±0.01 p 0.52;
    MDE 0.11; exact-test p 0.25, floor 0.25).
    Holm p's appear only when decide_family has put them in the dict."""
    if not isinstance(digits, int) or digits < 1:
        raise ValueError(f"digits must be a positive whole number, got {digits!r}.")
    try:
        r = result
        u = f" {unit}" if unit else ""
        level = f"{100.0 * (1.0 - r['alpha']):g}%"
        lo, hi = r["ci"]
        n = r["n"]
        size = f"{n} pairs" if r["test"] == "paired t" else f"{n[0]} vs {n[1]} runs"
        stats = f"{r['test']}, {size}, p {_num(r['p'], digits)}"
        if r.get("p_holm") is not None:
            stats += f", Holm p {_num(r['p_holm'], digits)}"
        tost = f"TOST ±{_num(r['delta'], digits)}{u} p {_num(r['p_tost'], digits)}"
        if r.get("p_tost_holm") is not None:
            tost += f", Holm p {_num(r['p_tost_holm'], digits)}"
        mde = f"MDE {_num(r['mde'], digits)}{u}"
        if r.get("exact_p") is None:
            exact = "exact test: too many arrangements"
        else:
            exact = f"exact-test p {_num(r['exact_p'], digits)}, floor {_num(r['exact_p_floor'], digits)}"
        return (f"Δ {_num(r['diff'], digits)}{u} [{level} CI {_num(lo, digits, True)}, "
                f"{_num(hi, digits, True)}] ({stats}; {tost}; {mde}; {exact})")
    except (KeyError, TypeError, IndexError):
        raise ValueError("describe needs a result dict from compare().") from None


# ------------------------------------------------------------------------------------------------
# Time to an event with censoring: "epochs to 90%" where some runs never get there
# ------------------------------------------------------------------------------------------------
# A run that never reaches the threshold within its budget is CENSORED at the budget: we know only
# that its time is > budget. Averaging the times of the runs that got there (survivorship) or
# writing "budget + 1" for the others both bias the comparison; the Kaplan–Meier curve and the
# log-rank test use each censored run for exactly what it says.
def _check_survival(times, events, name: str) -> tuple[np.ndarray, np.ndarray]:
    t = _check_sample(times, f"{name}'s times")
    try:
        e = np.asarray(events, dtype=float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{name}'s events must be 0/1 (1 = reached, 0 = censored).") from None
    if e.size != t.size or not np.isin(e, (0.0, 1.0)).all():
        raise ValueError(f"{name}'s events must be one 0/1 flag per time (1 = reached, 0 = censored), "
                         f"got {e.size} flags for {t.size} times.")
    if (t < 0).any():
        raise ValueError(f"{name}'s times must be ≥ 0.")
    return t, e.astype(bool)


def kaplan_meier(times, events) -> list[tuple[float, float]]:
    """The Kaplan–Meier estimate of S(t) = P(T > t): [(t, S(t))] at each distinct event time.
    S(t) = ∏_{t_k ≤ t} (1 − d_k / n_k), n_k = runs still at risk at t_k (time ≥ t_k; a run censored
    at t_k counts as at risk there), d_k = events at t_k."""
    t, e = _check_survival(times, events, "the sample")
    out, s = [], 1.0
    for tk in np.unique(t[e]):
        n_k, d_k = int((t >= tk).sum()), int(((t == tk) & e).sum())
        s *= 1.0 - d_k / n_k
        out.append((float(tk), s))
    return out


def km_median(times, events) -> float:
    """The Kaplan–Meier median: the first event time with S(t) ≤ 1/2; inf when the curve never gets
    there (more than half the runs censored before it)."""
    for tk, s in kaplan_meier(times, events):
        if s <= 0.5 + 1e-12:
            return tk
    return math.inf


def _logrank_z(t: np.ndarray, e: np.ndarray, in_a: np.ndarray) -> float:
    """(O_a − E_a) / √V over the distinct event times of the pooled sample; 0 when V = 0."""
    o_minus_e = v = 0.0
    for tk in np.unique(t[e]):
        risk = t >= tk
        n, n_a = int(risk.sum()), int((risk & in_a).sum())
        hit = (t == tk) & e
        d, d_a = int(hit.sum()), int((hit & in_a).sum())
        # hypergeometric mean and variance of a's events at t_k, given the risk sets
        o_minus_e += d_a - d * n_a / n
        if n > 1:
            v += d * (n_a / n) * (1 - n_a / n) * (n - d) / (n - 1)
    return o_minus_e / math.sqrt(v) if v > 0 else 0.0


def logrank(times_a, events_a, times_b, events_b) -> dict:
    """The log-rank test of equal time-to-event curves for arms a and b (unpaired; censored runs
    count for the time they were watched). z = (O_a − E_a)/√V: z > 0 means a has MORE events than
    expected — a reaches the threshold sooner. p_normal: two-sided, z ~ N(0, 1) (large samples);
    p_exact: the exact permutation p over every relabelling of the pooled runs (what to trust with
    5 runs per arm: C(10, 5) = 252 arrangements), with its floor. Also each arm's KM median."""
    ta, ea = _check_survival(times_a, events_a, "a")
    tb, eb = _check_survival(times_b, events_b, "b")
    t, e = np.concatenate((ta, tb)), np.concatenate((ea, eb))
    n_a, n = ta.size, ta.size + tb.size
    if math.comb(n, n_a) > 2 ** 16:
        raise ValueError(f"{math.comb(n, n_a)} relabellings are too many for the exact log-rank p.")
    in_a = np.arange(n) < n_a
    z = _logrank_z(t, e, in_a)
    hits, total = 0, 0
    for idx in itertools.combinations(range(n), n_a):
        lab = np.zeros(n, dtype=bool)
        lab[list(idx)] = True
        hits += abs(_logrank_z(t, e, lab)) >= abs(z) - 1e-12
        total += 1
    return {"z": z, "p_normal": 2.0 * (1.0 - _norm_cdf(abs(z))), "p_exact": hits / total,
            "p_floor": (2.0 if ta.size == tb.size else 1.0) / total,
            "median_a": km_median(ta, ea), "median_b": km_median(tb, eb),
            "reached_a": int(ea.sum()), "reached_b": int(eb.sum()), "n_a": int(ta.size), "n_b": int(tb.size)}
