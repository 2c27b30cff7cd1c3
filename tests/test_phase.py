"""The phase-diagram machinery and the ODE's rate laws: the per-instance integrator against the
batched one, V's spectral abscissa, the fate rule, and the three laws the fates rest on
(bidirectional convergent ‖X‖ ∝ t^(−1/2), causal convergent e^(α(V) t / n), divergent e^(α(V) t))."""

import json
import math

import pytest
import torch

import ode_attention as oa
import regimes
from analysis import phase

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def fit(x, y):
    """Least-squares slope of y on x."""
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


# ------------------------------------------------------------------------------------------------
# V's spectral abscissa and the antisymmetry ratio
# ------------------------------------------------------------------------------------------------
def test_value_abscissa_is_max_real_eigenvalue_of_V_and_rho_is_exact():
    Q, K, V = regimes.sample_instances("convergent", 6, 20, rho=1.5, generator=gen(1))
    W = Q @ K.transpose(-1, -2)
    A = regimes.value_form(W, V)
    ref = torch.linalg.eigvals(V).real.amax(-1)                     # eigenvalues of V itself
    assert torch.allclose(regimes.value_abscissa(W, A), ref, atol=1e-10)
    assert torch.allclose(regimes.antisymmetry_ratio(A), torch.full((20,), 1.5, dtype=f64), atol=1e-12)
    # the regime (symmetric parts) is untouched by ρ
    assert set(regimes.classify_batch(W, A)) == {"convergent"}
    with pytest.raises(ValueError, match="rho"):
        regimes.sample_instances("convergent", 4, 2, rho=-1.0)
    with pytest.raises(ValueError, match="symmetric_A"):
        regimes.sample_instances("convergent", 4, 2, rho=1.0, symmetric_A=True)


def test_symmetric_convergent_V_is_always_hurwitz_and_large_rho_breaks_it():
    # A = A_sym ≺ 0, W_sym ≻ 0: λ(A⁻¹W) = v*Wv / v*Av has negative real part (proof in regimes)
    Q, K, V = regimes.sample_instances("convergent", 8, 200, symmetric_A=True, generator=gen(2))
    W = Q @ K.transpose(-1, -2)
    assert bool((regimes.value_abscissa(W, regimes.value_form(W, V)) < 0).all())
    Q, K, V = regimes.sample_instances("convergent", 16, 50, rho=4.0, generator=gen(3))
    W = Q @ K.transpose(-1, -2)
    A = regimes.value_form(W, V)
    bad = (regimes.value_abscissa(W, A) >= 0).nonzero().flatten()
    assert len(bad) > 25                                             # most: measured 96% at d = 16
    r = regimes.regime_of(W[bad[0]], A[bad[0]])
    assert r["regime"] == "convergent" and not r["hurwitz_V"] and "not Hurwitz" in r["warning"]
    ok = (regimes.value_abscissa(W, A) < 0).nonzero().flatten()
    if len(ok):
        assert regimes.regime_of(W[ok[0]], A[ok[0]])["warning"] == ""


# ------------------------------------------------------------------------------------------------
# integrate_each: one step size per instance
# ------------------------------------------------------------------------------------------------
def test_integrate_each_matches_the_batched_integrator():
    g = gen(4)
    Q, K, V = regimes.sample_instances("convergent", 4, 6, generator=g)
    X0 = torch.randn(6, 5, 4, generator=g, dtype=f64)
    ts = torch.linspace(0, 3.0, 7, dtype=f64)
    for opts in ({}, {"causal": True}, {"rope": True}):
        ref = oa.integrate(X0, Q, K, V, t_end=3.0, dt=0.01, method="dopri5", rtol=1e-10, atol=1e-12,
                           n_save=7, **opts)
        got = oa.integrate_each(X0, Q, K, V, ts, rtol=1e-10, atol=1e-12, **opts)
        assert torch.allclose(got.t, ref.t)
        assert (got.X - ref.X).abs().max() < 1e-7
        assert not got.blown.any() and (got.t_reached == 3.0).all()


def test_a_stiff_instance_does_not_make_the_others_pay():
    """Instance 3 of this seeded intermediate batch turns stiff (hard attention) before t = 3: the
    batched integrator, one step size for all, runs out of a 20,000-step budget at t ≈ 1.8; per
    instance, the other five finish in a few hundred steps each."""
    g = gen(4)
    Q, K, V = regimes.sample_instances("intermediate", 4, 6, generator=g)
    X0 = torch.randn(6, 5, 4, generator=g, dtype=f64)
    fr = oa.integrate_each(X0, Q, K, V, torch.linspace(0, 3.0, 7, dtype=f64), rtol=1e-10, atol=1e-12,
                           max_steps=3000)
    easy = [b for b in range(6) if b != 3]
    assert int(fr.n_steps[3]) == 3000 and float(fr.t_reached[3]) < 3.0
    assert int(fr.n_steps[easy].max()) < 600 and bool((fr.t_reached[easy] == 3.0).all())


def test_integrate_each_resumed_from_a_snapshot_ends_bit_for_bit_as_one_never_stopped(tmp_path):
    """The seeded stiff batch above: five instances leave early, one spends its budget. Snapshots
    taken before steps 10, 200 and 700 (some instances already gone by then), written to disk and
    read back, each resume to the very same trajectories, times, step counts and flags."""
    g = gen(4)
    Q, K, V = regimes.sample_instances("intermediate", 4, 6, generator=g)
    X0 = torch.randn(6, 5, 4, generator=g, dtype=f64)
    ts = torch.linspace(0, 3.0, 7, dtype=f64)
    kw = dict(rtol=1e-10, atol=1e-12, max_steps=800)
    ref = oa.integrate_each(X0, Q, K, V, ts, **kw)
    seen, kept = [0], {}

    def snap(state):                      # snapshot_every_s=0: called before every step
        seen[0] += 1
        if seen[0] in (10, 200, 700):
            torch.save(state, tmp_path / f"s{seen[0]}.pt")
            kept[seen[0]] = int(state["act"].numel())

    full = oa.integrate_each(X0, Q, K, V, ts, snapshot=snap, snapshot_every_s=0, **kw)
    assert min(kept.values()) < 6 and max(kept.values()) == 6      # one snapshot after some left
    for r in (full, *(oa.integrate_each(X0, Q, K, V, ts, resume=torch.load(tmp_path / f"s{k}.pt"), **kw)
                      for k in kept)):
        assert torch.equal(r.X, ref.X) and torch.equal(r.t_reached, ref.t_reached)
        assert torch.equal(r.n_steps, ref.n_steps)
        assert torch.equal(r.blown, ref.blown) and torch.equal(r.settled, ref.settled)
    state = torch.load(tmp_path / "s200.pt")
    with pytest.raises(oa.ResumeMismatch, match="different run"):  # other inputs (a ValueError)
        oa.integrate_each(X0 * 2, Q, K, V, ts, resume=state, **kw)
    with pytest.raises(ValueError, match="different run"):        # other tolerance
        oa.integrate_each(X0, Q, K, V, ts, resume=state, rtol=1e-9, atol=1e-12, max_steps=800)
    with pytest.raises(ValueError, match="different run"):        # other field
        oa.integrate_each(X0, Q, K, V, ts, resume=state, causal=True, **kw)
    with pytest.raises(ValueError, match="snapshot"):
        oa.integrate_each(X0, Q, K, V, ts, snapshot="not a function", **kw)


def test_integrate_each_freezes_blown_settled_and_over_budget_instances():
    g = gen(5)
    d, n = 4, 6
    Qc, Kc, Vc = regimes.sample_instances("convergent", d, 2, generator=g)
    Qd, Kd, Vd = regimes.sample_instances("divergent", d, 2, generator=g)
    Q, K, V = torch.cat([Qc, Qd]), torch.cat([Kc, Kd]), torch.cat([Vc, Vd])
    X0 = torch.randn(4, n, d, generator=g, dtype=f64)
    ts = torch.linspace(0, 400.0, 9, dtype=f64)
    fr = oa.integrate_each(X0, Q, K, V, ts, causal=True, min_norm=1e-3, max_norm=1e3)
    assert fr.settled[:2].all() and not fr.blown[:2].any()          # causal convergent: reaches 0
    assert fr.blown[2:].all() and not fr.settled[2:].any()          # divergent: past the bound
    assert (fr.t_reached < 400).all()
    last = fr.X[-1]
    assert torch.isfinite(last).all() and (fr.X[-2] == last).all()   # frozen, never NaN
    # the steps are per instance: the ones that left early took fewer
    fr2 = oa.integrate_each(X0, Q, K, V, ts, max_steps=5)
    assert (fr2.n_steps <= 5).all() and (fr2.t_reached < 400).all()
    with pytest.raises(ValueError, match="t_save"):
        oa.integrate_each(X0, Q, K, V, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="max_steps"):
        oa.integrate_each(X0, Q, K, V, ts, max_steps=0)


def _flushing() -> bool:
    return float(torch.tensor(1e-310, dtype=f64) * 2.0) == 0.0


def test_subnormal_weights_are_flushed_inside_the_integrators_only_and_change_nothing():
    """Hard attention puts softmax weights below 2.2e-308 (subnormal): logit gaps of ~800 here.
    integrate_each flushes them to 0 (flush_subnormals); the trajectory equals the one computed
    without flushing to round-off, and the caller's mode is restored afterwards."""
    g = gen(6)
    Q, K, V = regimes.sample_instances("convergent", 4, 3, generator=g)
    Q = Q * 12.0                                                     # logits in the hundreds
    X0 = 3.0 * torch.randn(3, 6, 4, generator=g, dtype=f64)
    S = (X0 @ Q) @ (X0 @ K).transpose(-1, -2)
    w = torch.softmax(S, dim=-1)
    assert bool(((w > 0) & (w < 2.2e-308)).any())                    # the case exists at t = 0
    ts = torch.linspace(0, 0.01, 3, dtype=f64)
    assert not _flushing()
    got = oa.integrate_each(X0, Q, K, V, ts, rtol=1e-9, atol=1e-12)
    assert not _flushing()                                           # restored
    ref = oa.integrate_each.__wrapped__(X0, Q, K, V, ts, rtol=1e-9, atol=1e-12)   # no flushing
    assert torch.equal(got.n_steps, ref.n_steps)
    assert (got.X - ref.X).abs().max() <= 1e-12 * ref.X.abs().max()
    if torch.set_flush_denormal(True):                               # an x86 CPU: it can flush
        torch.set_flush_denormal(False)
        with oa.flush_subnormals():
            assert _flushing()
            with oa.flush_subnormals():
                pass
            assert _flushing()                                       # nested: the outer mode kept
        assert not _flushing()


# ------------------------------------------------------------------------------------------------
# The rate laws
# ------------------------------------------------------------------------------------------------
def test_causal_convergent_decays_exponentially_at_alpha_V_over_n():
    """Causal mask: token 1 attends only to itself, ẋ₁ = x₁V. Linearised at X = 0 every row of P
    is uniform over j ≤ i, so ẋᵢ = (1/i) Σ_{j≤i} xⱼ V: block lower-triangular with diagonal blocks
    V/i, eigenvalues λ(V)/i. The slowest is the last token's: ‖X‖ ∝ exp(α(V) t / n), α(V) = max Re λ(V)."""
    g = gen(3)
    d, n, N = 4, 4, 8
    Q, K, V = regimes.sample_instances("convergent", d, N, generator=g)
    X0 = torch.randn(N, n, d, generator=g, dtype=f64)
    alpha = regimes.value_abscissa(Q @ K.transpose(-1, -2), regimes.value_form(Q @ K.transpose(-1, -2), V))
    ts = torch.linspace(0, 200, 61, dtype=f64)
    fr = oa.integrate_each(X0, Q, K, V, ts, rtol=1e-9, atol=1e-30, causal=True)
    norms = oa.token_norm(fr.X)
    sel = ts > 100
    ratios = sorted(fit(ts[sel], norms[sel, b].log()) / float(alpha[b] / n) for b in range(N))
    # measured: 0.9895 … 1.0053, median 0.9996 (n = 6 to t = 400: median 1.001, one at 1.26 — a
    # second mode not yet died out)
    assert abs(ratios[N // 2] - 1) < 0.005
    assert min(ratios) > 0.98 and max(ratios) < 1.02


def test_divergent_grows_exponentially_at_alpha_V():
    """A ≻ 0: tokens grow until attention is hard; each token then follows ẋ = x V and grows at
    α(V) = max Re λ(V) > 0."""
    g = gen(3)
    d, n, N = 4, 6, 8
    Q, K, V = regimes.sample_instances("divergent", d, N, generator=g)
    X0 = torch.randn(N, n, d, generator=g, dtype=f64)
    W = Q @ K.transpose(-1, -2)
    alpha = regimes.value_abscissa(W, regimes.value_form(W, V))
    assert bool((alpha > 0).all())
    ts = torch.linspace(0, 30, 301, dtype=f64)
    # rtol 1e-7: at 1e-9 one instance's switching between two hard-attention targets costs 10⁵ steps
    fr = oa.integrate_each(X0, Q, K, V, ts, rtol=1e-7, atol=1e-12, max_norm=1e100)
    norms = oa.token_norm(fr.X)
    ratios = sorted(fit(ts[ts > 15], norms[ts > 15, b].log()) / float(alpha[b]) for b in range(N))
    # measured: 0.9972 … 1.0020, median 1.0000
    assert abs(ratios[N // 2] - 1) < 0.005 and min(ratios) > 0.99 and max(ratios) < 1.01


def test_bidirectional_convergent_follows_t_to_the_minus_half():
    """Without a mask the differences δᵢ = xᵢ − x̄ decay only through the softmax's
    first-order term in the (quadratic) logits, d‖δ‖/dt ≈ −c‖δ‖³, so ‖X‖ ∝ t^(−1/2): the fate rule calls it "converges"."""
    g = gen(6)
    Q, K, V = regimes.sample_instances("convergent", 4, 6, symmetric_A=True, generator=g)
    X0 = torch.randn(6, 8, 4, generator=g, dtype=f64)
    ts = torch.cat([torch.zeros(1, dtype=f64), torch.logspace(-1, math.log10(400), 31, dtype=f64)])
    fr = oa.integrate_each(X0, Q, K, V, ts, rtol=1e-8, atol=1e-12)
    power, _ = phase.late_slopes(fr.t, oa.token_norm(fr.X), fr.t_reached)
    assert all(-0.56 < p < -0.44 for p in power), power
    assert {phase.fate(p, False, False) for p in power} == {"converges"}


# ------------------------------------------------------------------------------------------------
# The fate rule and the cell machinery
# ------------------------------------------------------------------------------------------------
def test_fate_rule_on_known_curves():
    t = torch.cat([torch.zeros(1, dtype=f64), torch.logspace(-1, 3, 41, dtype=f64)])
    curves = torch.stack([1 + t, (1 + t) ** -0.5, (1 + t) ** -0.2, 2 + 0 * t, (1 + t) ** 0.3], 1)
    power, rate = phase.late_slopes(t, curves, torch.full((5,), 1000.0, dtype=f64))
    assert power[0] == pytest.approx(1.0, abs=0.01) and power[1] == pytest.approx(-0.5, abs=0.01)
    assert [phase.fate(p, False, False) for p in power] == ["grows", "converges", "slower", "plateau", "grows"]
    assert phase.fate(0.0, True, False) == "converges" and phase.fate(-1.0, False, True) == "grows"
    e = torch.exp(-0.1 * t)[:, None]
    assert phase.late_slopes(t, e, torch.tensor([1000.0], dtype=f64))[1][0] == pytest.approx(-0.1, rel=1e-9)


def test_cells_are_paired_across_pe_and_mask_and_a_cell_runs(tmp_path):
    c = dict(grid="pe", d=4, n=8, pe="none", mask="bidirectional", rho=None, scale=1.0)
    a = phase.instances(c, 3, 0)
    b = phase.instances(dict(c, pe="rope1e4", mask="causal"), 3, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(phase.instances(c, 3, 1)[0], a[0])
    assert len(phase.grid_cells("pe")) == 150 and len(phase.grid_cells("rho")) == 50
    assert phase.pe_options("rope-quarter", 16) == {"rope": True, "rope_base": 1e4, "rope_dim": 4}
    res = phase.run_cell(dict(c, mask="causal"), 6, t_end=200.0)
    assert res["instances"] == 6 and res["records"]["fate"] == ["converges"] * 6
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / f"{phase.cell_name(c)}.json").write_text(json.dumps(res))
    rows = phase.write_report(tmp_path)
    assert rows[0]["share_converges"] == 1.0 and rows[0]["converges_lo"] < 1.0
    assert (tmp_path / "phase.csv").exists() and (tmp_path / "pe.png").exists()
    # the stored trajectory of norms gives back the late slope the fate was read from
    r = res["records"]
    t, N = torch.tensor(r["times"], dtype=torch.float64), torch.tensor(r["norms"], dtype=torch.float64).T
    power, _ = phase.late_slopes(t, N, torch.tensor(r["t_reached"], dtype=torch.float64))
    assert power == r["slope"]
    # cut at its own horizon the trajectory gives back its fates; cut earlier, the fates of a shorter
    # run of the same instances (the same rule on the same curve up to the step sizes)
    assert phase.fates_at(res, 200.0) == r["fate"]
    short = phase.run_cell(dict(c, mask="causal"), 6, t_end=20.0)
    assert phase.fates_at(res, 20.0) == short["records"]["fate"]
    h = phase.write_horizon(tmp_path, 20.0)
    assert h[0]["converges_at_end"] == 6 and (tmp_path / "horizon.csv").exists()


@pytest.mark.parametrize("argv", [["--part", "2/2"], ["--part", "x"], ["--grid", "nope"],
                                  ["--instances", "1"], ["--t-end", "inf"], ["--cells", "pe-d5-n8"],
                                  ["--report", "--horizon", "nan"]])
def test_bad_flags_exit_2_with_one_sentence(argv, tmp_path, capsys):
    assert phase.main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("analysis.phase:") and err.count("\n") == 1


def test_cells_flag_runs_only_the_named_cell_at_its_own_horizon(tmp_path):
    name = "pe-d4-n8-none-causal-rhodefault-s1"
    assert phase.main(["--grid", "pe", "--cells", name, "--instances", "3", "--t-end", "50",
                       "--out", str(tmp_path)]) == 0
    assert [p.name for p in (tmp_path / "cells").iterdir()] == [f"{name}.json"]
    res = json.loads((tmp_path / "cells" / f"{name}.json").read_text())
    assert res["t_end"] == 50 and res["records"]["times"][-1] == pytest.approx(50)


def test_a_cell_goes_on_from_its_partial_file_and_sets_a_bad_one_aside(tmp_path, capsys):
    """run_cell(partial=...) saves the integrator's state (here every 20 ms); a second call
    with that file goes on from it and gives the very records a run never stopped gives. A file
    that cannot be read, or was saved for another cell, is set aside with a message."""
    c = dict(grid="pe", d=4, n=8, pe="rope1e4", mask="causal", rho=None, scale=1.0)
    ref = phase.run_cell(c, 6, t_end=30.0)["records"]
    part = tmp_path / ".cell.partial.pt"
    assert phase.run_cell(c, 6, t_end=30.0, partial=part, snapshot_every_s=0.02)["records"] == ref
    assert part.exists()                                   # the last state saved
    saved = torch.load(part)
    assert int(saved["state"]["act"].numel()) >= 1 and saved["seconds"] >= 0
    assert phase.run_cell(c, 6, t_end=30.0, partial=part)["records"] == ref
    assert capsys.readouterr().out == ""                    # resumed, nothing set aside
    part.write_bytes(b"truncated")
    assert phase.run_cell(c, 6, t_end=30.0, partial=part)["records"] == ref
    assert "cannot be read" in capsys.readouterr().out
    phase.run_cell(dict(c, d=8), 6, t_end=30.0, partial=part, snapshot_every_s=0.02)   # another cell's
    assert phase.run_cell(c, 6, t_end=30.0, partial=part)["records"] == ref
    assert "saved for another run" in capsys.readouterr().out


def test_compare_counts_the_instances_whose_fate_moved(tmp_path, capsys):
    """The same cell run twice has the same fates (0 changed); one fate edited in the reference is
    found and named; folders without a common cell, or a cell of another size, are refused."""
    c = dict(grid="pe", d=4, n=8, pe="none", mask="causal", rho=None, scale=1.0)
    name = f"{phase.cell_name(c)}.json"
    for folder in ("a", "b"):
        (tmp_path / folder / "cells").mkdir(parents=True)
        res = phase.run_cell(c, 6, t_end=30.0)
        (tmp_path / folder / "cells" / name).write_text(json.dumps(res))
    assert phase.main(["--compare", str(tmp_path / "b"), "--out", str(tmp_path / "a")]) == 0
    assert "0 of 6 instances changed fate" in capsys.readouterr().out
    edited = json.loads((tmp_path / "b" / "cells" / name).read_text())
    edited["records"]["fate"][2] = "plateau"
    (tmp_path / "b" / "cells" / name).write_text(json.dumps(edited))
    row = phase.write_compare(tmp_path / "a", tmp_path / "b")[0]
    assert row["fates_changed"] == 1 and row["moves"] == f"plateau→{res['records']['fate'][2]} 1"
    assert (tmp_path / "a" / "compare.csv").exists()
    (tmp_path / "c" / "cells").mkdir(parents=True)
    assert phase.main(["--compare", str(tmp_path / "c"), "--out", str(tmp_path / "a")]) == 2
    assert phase.main(["--compare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")]) == 2
    short = dict(res, records=dict(res["records"], fate=res["records"]["fate"][:3]))
    (tmp_path / "c" / "cells" / name).write_text(json.dumps(short))
    assert phase.main(["--compare", str(tmp_path / "c"), "--out", str(tmp_path / "a")]) == 2
    assert "not the same cell" in capsys.readouterr().err
