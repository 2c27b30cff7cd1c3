"""The attention field, its integrators, the probes and the trained layer — against independent,
plainly written computations (float64, CPU, seeded)."""

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import ode_attention as oa
import regimes
import rope

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# The field against a plain loop
# ------------------------------------------------------------------------------------------------
def field_by_loops(X, Q, K, V, causal=False, pos=None, use_rope=False, lam=0.0, M=None):
    """ẋᵢ = Σⱼ Pᵢⱼ Vᵀ yⱼ in column form, one token at a time, with explicit rotation matrices."""
    n, d = X.shape
    Y = X if pos is None else X + pos
    M = torch.eye(d, dtype=X.dtype) if M is None else M
    out = torch.zeros_like(X)
    for i in range(n):
        js = range(i + 1) if causal else range(n)
        logits = []
        for j in js:
            if use_rope:
                Rm = rope.rotation_matrix(j - i, Q.shape[1])
                s = Y[i] @ Q @ Rm @ K.T @ Y[j]                   # yᵢᵀ Q R(j−i) Kᵀ yⱼ
            else:
                s = Y[i] @ Q @ K.T @ Y[j]                        # yᵢᵀ W yⱼ
            logits.append(s + lam * (Y[i] @ M @ Y[j]))
        P = torch.softmax(torch.stack(logits), 0)
        out[i] = sum(P[k] * (V.T @ Y[j]) for k, j in enumerate(js))
    return out


@pytest.mark.parametrize("opts", [
    {}, {"causal": True}, {"pos": "abs"}, {"use_rope": True}, {"use_rope": True, "causal": True},
    {"lam": -0.3}, {"lam": 0.2, "M": "A"}, {"use_rope": True, "pos": "abs", "lam": 0.1},
])
def test_velocity_matches_plain_loop(opts):
    g = gen(1)
    n, d = 6, 4
    X = torch.randn(n, d, generator=g, dtype=f64)
    Q, K, V = regimes.sample_instance("intermediate", d, generator=g)
    W, A = regimes.interaction_matrices(Q, K, V)
    pos = rope.sinusoidal_pe(n, d, dtype=f64) if opts.get("pos") == "abs" else None
    M = A if opts.get("M") == "A" else None
    ref = field_by_loops(X, Q, K, V, opts.get("causal", False), pos, opts.get("use_rope", False),
                         opts.get("lam", 0.0), M)
    got = oa.velocity(X, Q, K, V, causal=opts.get("causal", False), pos=pos,
                      rope=opts.get("use_rope", False), lam=opts.get("lam", 0.0), lam_M=M)
    assert torch.allclose(got, ref, atol=1e-12, rtol=0)


def test_velocity_no_options_is_the_formula():
    g = gen(2)
    X = torch.randn(3, 5, 7, generator=g, dtype=f64)
    Q, K = torch.randn(7, 3, generator=g, dtype=f64), torch.randn(7, 3, generator=g, dtype=f64)
    V = torch.randn(7, 7, generator=g, dtype=f64)
    ref = torch.softmax(X @ Q @ K.T @ X.transpose(-1, -2), -1) @ X @ V
    assert torch.allclose(oa.velocity(X, Q, K, V), ref, atol=1e-13)
    assert oa.velocity(X.float(), Q.float(), K.float(), V.float()).dtype == torch.float32


def test_identity_xAxdot_equals_mean_logit():
    """xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ for general (non-symmetric) A — the identity (I)."""
    g = gen(3)
    for regime in regimes.REGIME_NAMES:
        Q, K, V = regimes.sample_instance(regime, 5, generator=g)
        W, A = regimes.interaction_matrices(Q, K, V)
        X = torch.randn(9, 5, generator=g, dtype=f64)
        S = X @ W @ X.T
        P = torch.softmax(S, -1)
        lhs = ((X @ A) * oa.velocity(X, Q, K, V)).sum(-1)       # xᵢᵀ A ẋᵢ (row form)
        rhs = (P * S).sum(-1)
        assert torch.allclose(lhs, rhs, atol=1e-11)


def test_batched_parameters_equal_one_by_one():
    g = gen(4)
    Q, K, V = regimes.sample_instances("divergent", 4, 5, generator=g)
    X = torch.randn(5, 6, 4, generator=g, dtype=f64)
    batched = oa.velocity(X, Q, K, V, rope=True)
    single = torch.stack([oa.velocity(X[b], Q[b], K[b], V[b], rope=True) for b in range(5)])
    assert torch.allclose(batched, single, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Solvers against closed forms
# ------------------------------------------------------------------------------------------------
def uniform_attention_case(seed=5, n=5, d=3):
    """K = 0 ⇒ W = 0 ⇒ Pᵢⱼ = 1/n ⇒ ẋᵢ = x̄ V (row form): the mean obeys m' = m V, so
    m(t) = m₀ e^{tV} and xᵢ(t) = xᵢ(0) + m(t) − m₀ (every token moves with the mean)."""
    g = gen(seed)
    X0 = torch.randn(n, d, generator=g, dtype=f64)
    Q = torch.randn(d, d, generator=g, dtype=f64)
    K = torch.zeros(d, d, dtype=f64)
    V = 0.5 * torch.randn(d, d, generator=g, dtype=f64)

    def exact(t):
        m0 = X0.mean(0)
        return X0 + (m0 @ torch.linalg.matrix_exp(t * V) - m0)
    return X0, Q, K, V, exact


def test_steppers_are_pure_functions_with_their_formulas():
    """On the linear field f(t, x) = x M: Euler is x(I + hM), RK4 the 4th-order Taylor polynomial of
    e^{hM}, Dormand–Prince agrees with e^{hM} to O(h⁶) with a small error estimate and k₇ = f(x⁵)."""
    g = gen(42)
    M = 0.5 * torch.randn(3, 3, generator=g, dtype=f64)
    x = torch.randn(2, 4, 3, generator=g, dtype=f64)
    x_copy = x.clone()
    f = lambda t, y: y @ M                                          # noqa: E731
    h = 0.1
    I = torch.eye(3, dtype=f64)
    hM = h * M
    assert torch.allclose(oa.euler_step(f, 0.0, x, h), x @ (I + hM), atol=1e-15)
    taylor4 = I + hM + hM @ hM / 2 + hM @ hM @ hM / 6 + hM @ hM @ hM @ hM / 24
    assert torch.allclose(oa.rk4_step(f, 0.0, x, h), x @ taylor4, atol=1e-14)
    x5, err, k7 = oa.dopri5_step(f, 0.0, x, h)
    exact = x @ torch.linalg.matrix_exp(hM)
    assert (x5 - exact).abs().max() < 1e-9 and 0 < err.abs().max() < 1e-6
    assert torch.allclose(k7, f(0.0, x5), atol=1e-15)
    x5b, errb, _ = oa.dopri5_step(f, 0.0, x, h, k1=f(0.0, x))        # FSAL: a known k1 changes nothing
    assert torch.equal(x5, x5b) and torch.equal(err, errb)
    assert torch.equal(x, x_copy)                                   # pure: the input is untouched


def test_dopri5_step_matches_the_tableau_written_out():
    """x⁵ = x + h Σ b⁵ᵢ kᵢ and x⁵ − x⁴ = h Σ (b⁵ᵢ − b⁴ᵢ) kᵢ, with every stage computed from the
    Butcher tableau term by term (the stepper reuses stage 7's input as x⁵ and forms the error
    directly), on a nonlinear field: the attention field itself, with a (B, 1, 1) step per instance."""
    X0, Q, K, V, _ = uniform_attention_case(44)
    X0 = X0 + 0.3 * torch.randn(X0.shape, generator=gen(45), dtype=f64)
    f = lambda t, X: oa.velocity(X, Q, K, V)                        # noqa: E731
    h = torch.tensor([0.05, 0.2], dtype=f64)[:, None, None].expand(2, 1, 1)
    x = X0.expand(2, *X0.shape[-2:]).clone()
    ks = [f(0.0, x)]
    for i in range(1, 7):
        acc = torch.zeros_like(x)
        for a, k in zip(oa._DP_A[i], ks):
            acc = acc + a * k
        ks.append(f(0.0, x + h * acc))
    x5 = x + h * sum(b * k for b, k in zip(oa._DP_B5, ks))
    x4 = x + h * sum(b * k for b, k in zip(oa._DP_B4, ks))
    got5, got_err, got7 = oa.dopri5_step(f, 0.0, x, h)
    assert (got5 - x5).abs().max() < 1e-15 and (got_err - (x5 - x4)).abs().max() < 1e-15
    assert torch.allclose(got7, f(0.0, got5), atol=0, rtol=0)


@pytest.mark.parametrize("options", [{}, {"causal": True}, {"rope": True}, {"rope": True, "causal": True},
                                     {"rope": True, "rope_dim": 2, "rope_base": 100.0},
                                     {"rope": True, "rope_pairing": "half"}, {"lam": -0.1}])
def test_prepared_field_is_the_field(options):
    """The integrators' field (W = QKᵀ or [Q | K | V] multiplied once, the causal mask cached)
    equals velocity() to round-off, for shared and batched Q, K, V and X."""
    g = gen(46)
    for lead_qk, lead_v, lead_x in (((), (), ()), ((5,), (5,), (5,)), ((), (5,), (5,)), ((5,), (), ()),
                                    ((), (), (3,))):
        d, dk, n = 6, (6 if "lam" in options else 4), 7
        Q = torch.randn(*lead_qk, d, dk, generator=g, dtype=f64)
        K = torch.randn(*lead_qk, d, dk, generator=g, dtype=f64)
        V = torch.randn(*lead_v, d, d, generator=g, dtype=f64)
        X = torch.randn(*lead_x, n, d, generator=g, dtype=f64)
        want = oa.velocity(X, Q, K, V, **options)
        got = oa._prepared_field(Q, K, V, **options)(0.0, X)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-13 * want.abs().max()


def test_integrate_is_the_steppers_repeated():
    """One fixed step of integrate is exactly one stepper call (same floating-point operations)."""
    X0, Q, K, V, _ = uniform_attention_case(43)
    f = lambda t, X: oa.velocity(X, Q, K, V)                        # noqa: E731
    for method, step in (("euler", oa.euler_step), ("rk4", oa.rk4_step)):
        tr = oa.integrate(X0, Q, K, V, t_end=0.1, dt=0.1, method=method, n_save=2)
        assert torch.equal(tr.X[-1], step(f, 0.0, X0, 0.1))


def test_uniform_attention_closed_form_all_methods():
    X0, Q, K, V, exact = uniform_attention_case()
    for method, dt, tol in (("euler", 1e-3, 5e-3), ("rk4", 1e-2, 1e-9), ("dopri5", 0.1, 1e-7)):
        tr = oa.integrate(X0, Q, K, V, t_end=2.0, dt=dt, method=method, rtol=1e-10, atol=1e-12)
        assert tr.status == "ok"
        assert abs(float(tr.t[-1]) - 2.0) < 1e-12
        assert torch.allclose(tr.X[-1], exact(2.0), atol=tol, rtol=0), method


def test_rk4_error_falls_16x_and_euler_2x_when_dt_halves():
    X0, Q, K, V, _ = uniform_attention_case(6)
    # a non-trivial nonlinear field: reference from RK4 with a tiny step
    Q2, K2, V2 = regimes.sample_instance("convergent", 3, generator=gen(7))
    ref = oa.integrate(X0, Q2, K2, V2, t_end=1.0, dt=1e-3, method="rk4").X[-1]
    err = {}
    for method in ("rk4", "euler"):
        e1 = (oa.integrate(X0, Q2, K2, V2, t_end=1.0, dt=0.04, method=method).X[-1] - ref).abs().max()
        e2 = (oa.integrate(X0, Q2, K2, V2, t_end=1.0, dt=0.02, method=method).X[-1] - ref).abs().max()
        err[method] = float(e1 / e2)
    assert 13.0 < err["rk4"] < 19.0, err          # 2⁴ = 16 for a 4th-order method
    assert 1.7 < err["euler"] < 2.3, err          # 2¹ for Euler


def test_adaptive_meets_its_tolerance():
    X0, Q, K, V, exact = uniform_attention_case(8)
    errs = []
    for rtol in (1e-4, 1e-7, 1e-10):
        tr = oa.integrate(X0, Q, K, V, t_end=3.0, dt=0.5, method="dopri5", rtol=rtol, atol=rtol * 1e-2,
                          n_save=2)          # no save times: the controller alone picks steps
        rel = float(((tr.X[-1] - exact(3.0)).abs() / exact(3.0).abs().clamp_min(1e-3)).max())
        errs.append(rel)
        # a global error within a modest multiple of the local tolerance
        assert rel < 50 * rtol, (rtol, rel)
        assert tr.n_steps > 0
    assert errs[0] > errs[1] > errs[2]


def test_saved_times_and_shapes():
    X0, Q, K, V, _ = uniform_attention_case(9)
    Xb = X0.expand(4, -1, -1).clone()
    for method in ("rk4", "dopri5"):
        tr = oa.integrate(Xb, Q, K, V, t_end=1.0, dt=0.1, method=method, n_save=11)
        assert tr.X.shape == (11, 4, 5, 3)
        assert torch.allclose(tr.t, torch.linspace(0, 1, 11, dtype=f64), atol=1e-9)
        assert tr.blown.shape == (4,)


def test_blow_up_is_reported_not_nan_and_others_go_on():
    g = gen(10)
    Qd, Kd, Vd = regimes.sample_instance("divergent", 3, generator=g)
    Qc, Kc, Vc = regimes.sample_instance("convergent", 3, generator=g)
    Q, K, V = torch.stack([Qd, Qc]), torch.stack([Kd, Kc]), torch.stack([Vd, Vc])
    X0 = torch.randn(2, 6, 3, generator=g, dtype=f64)
    for method in ("euler", "rk4", "dopri5"):
        tr = oa.integrate(X0, Q, K, V, t_end=30.0, dt=0.05, method=method, max_norm=1e3)
        assert torch.isfinite(tr.X).all()
        assert tr.blown.tolist() == [True, False]
        assert "blew up" in tr.status and "instance 0" in tr.status and "norm > 1000" in tr.status
        assert 0 < float(tr.t_blow[0]) < 30 and math.isinf(float(tr.t_blow[1]))
        assert abs(float(tr.t[-1]) - 30.0) < 1e-9                   # the convergent one finished
        assert float(oa.token_norm(tr.X[-1, 1])) < float(oa.token_norm(X0[1]))
    # non-finite overflow is caught too (a huge V overflows float64 before the norm bound)
    tr = oa.integrate(X0[:1], Qd, Kd, 1e300 * Vd, t_end=1.0, dt=0.1, max_norm=1e308)
    assert tr.blown.all() and "non-finite" in tr.status and torch.isfinite(tr.X).all()


# ------------------------------------------------------------------------------------------------
# What the theory guarantees, on many random instances
# ------------------------------------------------------------------------------------------------
def test_energy_is_the_sum_of_quadratic_forms():
    X = torch.randn(3, 5, 4, generator=gen(40), dtype=f64)
    A = torch.randn(3, 4, 4, generator=gen(41), dtype=f64)
    E = oa.energy(X, A)
    assert E.shape == (3,)
    for b in range(3):
        ref = sum(float(X[b, i] @ A[b] @ X[b, i]) for i in range(5))
        assert math.isclose(float(E[b]), ref, rel_tol=1e-12)
    assert oa.energy(X[0], A[0]).shape == ()


@pytest.mark.parametrize("regime", regimes.REGIME_NAMES)
def test_energy_monotone_for_symmetric_A(regime):
    """For symmetric A and W_sym ⪰ 0, E(t) = Σ xᵢᵀ A xᵢ is non-decreasing (docs/dynamics.md §1.2)."""
    Q, K, V = regimes.sample_instances(regime, 4, 32, symmetric_A=True, generator=gen(11))
    W, A = regimes.interaction_matrices(Q, K, V)
    assert torch.allclose(A, A.transpose(-1, -2), atol=1e-10)
    X0 = torch.randn(32, 7, 4, generator=gen(12), dtype=f64)
    tr = oa.integrate(X0, Q, K, V, t_end=4.0, dt=0.01, max_norm=1e8, n_save=81)
    E = oa.energy(tr.X, A)                                          # (T, B)
    ok = ~tr.blown
    dE = E[1:] - E[:-1]
    assert (dE[:, ok] >= -1e-9 * E.abs()[1:, ok].clamp_min(1)).all()


def test_convergent_symmetric_instances_all_go_to_zero_like_t_minus_half():
    """64 seeded convergent instances: every mean token norm falls; late-time decay is algebraic,
    ‖X(t)‖ ∝ t^(−1/2) (the mean goes first, the differences only through the quadratic term of the
    softmax — see ode_attention's docstring), not exponential."""
    Q, K, V = regimes.sample_instances("convergent", 4, 64, symmetric_A=True, generator=gen(13))
    X0 = torch.randn(64, 8, 4, generator=gen(14), dtype=f64)
    tr = oa.integrate(X0, Q, K, V, t_end=400.0, dt=0.1, method="dopri5", rtol=1e-8, atol=1e-12,
                      n_save=401)
    assert tr.status == "ok"
    nrm = oa.token_norm(tr.X)                                       # (T, B)
    assert (nrm[-1] < 0.25 * nrm[0]).all()
    assert (nrm[1:] <= nrm[:-1] * (1 + 1e-9)).float().mean() > 0.99  # falling at (almost) all saves
    t = tr.t
    i0, i1 = int((t >= 50).nonzero()[0]), len(t) - 1
    slope = (nrm[i1].log() - nrm[i0].log()) / math.log(float(t[i1] / t[i0]))
    # t^(−1/2): measured mean −0.49, std 0.02, range [−0.53, −0.37] over these 64 instances
    assert ((slope > -0.65) & (slope < -0.3)).all(), slope
    assert -0.53 < float(slope.mean()) < -0.45, slope.mean()
    mean_norm = torch.linalg.vector_norm(tr.X[-1].mean(-2), dim=-1)
    # the mean is negligible beside the differences (measured ≤ 5.7e-6 of ‖X‖ at t = 400)
    assert (mean_norm < 1e-4 * nrm[-1]).all()


def test_divergent_instances_grow_in_norm_and_pairwise_distance():
    """Every divergent instance grows in norm and in pairwise distance; a few percent grow only a
    little in distance (measured 2.5% under 5× at t = 8 on 1000 instances): once every token attends
    to the same leader, all velocities are equal and the differences are conserved while the norm
    explodes. Both facts are asserted."""
    Q, K, V = regimes.sample_instances("divergent", 4, 200, generator=gen(15))
    X0 = torch.randn(200, 8, 4, generator=gen(16), dtype=f64)
    tr = oa.integrate(X0, Q, K, V, t_end=8.0, dt=0.02, max_norm=1e10, n_save=9)
    nrm, dist = oa.token_norm(tr.X), oa.pairwise_distance(tr.X)
    assert (nrm[-1] > 10 * nrm[0]).all()
    assert (dist[-1] > dist[0]).all()
    assert (dist[-1] > 5 * dist[0]).float().mean() > 0.9


def test_absolute_pe_equilibrium_is_minus_p():
    g = gen(17)
    Q, K, V = regimes.sample_instance("convergent", 4, generator=g)
    P = rope.sinusoidal_pe(6, 4, dtype=f64)
    Xeq = regimes.shifted_equilibrium(P)
    assert oa.velocity(Xeq, Q, K, V, pos=P).abs().max() == 0
    # and trajectories approach it: y = x + p → 0
    X0 = torch.randn(6, 4, generator=g, dtype=f64)
    tr = oa.integrate(X0, Q, K, V, t_end=40.0, dt=0.1, pos=P)
    assert float(oa.token_norm(tr.X[-1] + P)) < 0.3 * float(oa.token_norm(X0 + P))


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------
def test_probes_against_brute_force():
    X = torch.randn(3, 7, 5, generator=gen(18), dtype=f64)
    for b in range(3):
        x = X[b]
        dist = sum(float((x[i] - x[j]).pow(2).sum()) for i in range(7) for j in range(7))
        cos = sum(float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
                  for i in range(7) for j in range(7) if i != j) / 42
        assert math.isclose(float(oa.pairwise_distance(X)[b]), dist, rel_tol=1e-12)
        assert math.isclose(float(oa.mean_cosine(X)[b]), cos, rel_tol=1e-12, abs_tol=1e-14)
        assert math.isclose(float(oa.token_norm(X)[b]), float(x.norm(dim=-1).mean()), rel_tol=1e-12)
        assert math.isclose(float(oa.sharpness(X)[b]), dist / (2 * 6 * float(x.pow(2).sum())), rel_tol=1e-12)
    same = torch.ones(1, 4, 3, dtype=f64)
    assert float(oa.sharpness(same)) == 0 and math.isclose(float(oa.mean_cosine(same)), 1.0)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------
def test_bad_input_raises_value_error_naming_the_problem():
    X = torch.randn(5, 4, dtype=f64)
    Q = K = torch.randn(4, 2, dtype=f64)
    V = torch.eye(4, dtype=f64)
    cases = [
        (lambda: oa.velocity(X, torch.randn(3, 2, dtype=f64), K, V), "Q and K must have shape"),
        (lambda: oa.velocity(X, Q, K, torch.eye(3, dtype=f64)), "V must have shape"),
        (lambda: oa.velocity(X.clone().fill_(float("nan")), Q, K, V), "non-finite"),
        (lambda: oa.velocity(X.long(), Q, K, V), "floating-point"),
        (lambda: oa.velocity(X[0], Q, K, V), "at least 2 dimensions"),
        (lambda: oa.velocity(X, Q[:, :1], K[:, :1], V, rope=True), "even d_k"),
        (lambda: oa.velocity(X, Q, K, V, pos=torch.zeros(3, 4, dtype=f64)), "pos must have shape"),
        (lambda: oa.integrate(X, Q, K, V, 1.0, 0.1, method="rk5"), "unknown method"),
        (lambda: oa.integrate(X, Q, K, V, 1.0, -0.1), "dt must be"),
        (lambda: oa.integrate(X, Q, K, V, float("inf"), 0.1), "t_end must be"),
        (lambda: oa.integrate(X, Q, K, V, 1.0, 0.1, temperature=2), "unknown option"),
        (lambda: oa.integrate(X, Q, K, V, 1.0, 0.1, n_save=1), "n_save must be"),
        (lambda: oa.velocity(X, Q, K, V, lam=0.1, lam_M=torch.eye(3, dtype=f64)), "lam_M must have shape"),
        (lambda: oa.velocity(X, Q, K, V, pos=torch.full((5, 4), math.inf, dtype=f64)), "pos contains non-finite"),
        (lambda: oa.velocity(X, Q, K, V, lam=math.nan), "lam must be finite"),
        (lambda: oa.velocity(X, Q, torch.randn(4, 3, dtype=f64), V), "share d_k"),
        (lambda: oa.velocity(X.expand(2, 5, 4), Q.expand(3, 4, 2), K, V), "do not broadcast"),
        (lambda: oa.velocity(X.numpy(), Q, K, V), "must be a torch.Tensor"),
        (lambda: oa.Attention(10, 3), "multiple of n_heads"),
        (lambda: oa.Attention(8, 2, pe="alibi"), "unknown attention PE"),
        (lambda: oa.Attention(8, 2, regime="chaotic"), "unknown regime"),
        (lambda: oa.Attention(8, 2, lam=-0.1, lam_mode="softplus-diag"), "keeps λ positive"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


# ------------------------------------------------------------------------------------------------
# The trained layer
# ------------------------------------------------------------------------------------------------
def attention_by_heads(att, x, bias=None, positions=None):
    """softmax((xQₕ R)(xKₕ R)ᵀ/√d_h + λ-term + bias) xVₕ per head, written out; then · O."""
    Q, K, V, O = (None if m is None else m.double() for m in att.qkv_matrices())
    n, d = x.shape[-2:]
    dh = att.d_h
    outs = []
    for h in range(att.n_heads):
        sl = slice(h * dh, (h + 1) * dh)
        q, k, v = x @ Q[:, sl], x @ K[:, sl], x @ V[:, sl]
        if att.pe == "rope" and h < att.rope_heads:
            q = torch.stack([q[..., i, :] @ rope.rotation_matrix(i, dh).T for i in range(n)], -2)
            k = torch.stack([k[..., i, :] @ rope.rotation_matrix(i, dh).T for i in range(n)], -2)
        S = q @ k.transpose(-1, -2)
        if att.use_lam:
            xh, lam = x[..., sl], att.lam_values()
            S = S + (lam[h] * xh if att.lam_mode == "identity" else xh * lam[h]) @ xh.transpose(-1, -2)
        S = S / math.sqrt(dh) + (0 if bias is None else bias[h])
        if att.causal:
            S = S.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        outs.append(torch.softmax(S, -1) @ v)
    y = torch.cat(outs, -1)
    return y if O is None else y @ O


@pytest.mark.parametrize("kw", [
    {}, {"causal": True}, {"pe": "rope"}, {"pe": "rope", "rope_heads": 2, "causal": True},
    {"lam": -0.1}, {"lam": 0.05, "lam_mode": "softplus-diag", "pe": "rope", "causal": True},
    {"regime": "convergent"}, {"regime": "intermediate", "lam": 0.3, "pe": "rope", "causal": True},
])
def test_attention_matches_head_by_head_reference(kw):
    torch.manual_seed(0)
    att = oa.Attention(32, 4, **kw).double()
    if att.use_lam and att.lam_mode == "identity":
        with torch.no_grad():
            att.lam.copy_(torch.randn(4, dtype=f64))
    x = torch.randn(2, 9, 32, dtype=f64)
    assert torch.allclose(att(x), attention_by_heads(att, x), atol=1e-12)


def test_attention_bias_and_padding_mask():
    torch.manual_seed(1)
    att = oa.Attention(16, 2, causal=True).double()
    x = torch.randn(1, 7, 16, dtype=f64)
    bias = rope.alibi_bias(7, rope.alibi_slopes(2))
    assert torch.allclose(att(x, attn_bias=bias), attention_by_heads(att, x, bias=bias), atol=1e-12)
    enc = oa.Attention(16, 2).double()
    keep = torch.tensor([[True] * 5 + [False] * 2])
    full = enc(x, key_padding_mask=keep)
    assert torch.allclose(full[:, :5], enc(x[:, :5]), atol=1e-12)   # padding keys are invisible


def test_lambda_term_folds_into_the_features_and_zero_lambda_is_plain(monkeypatch):
    # q̃ = [q, λx⁽ʰ⁾], k̃ = [k, x⁽ʰ⁾] (2 d_h wide). On a CPU that pair goes through the written-out
    # softmax (_explicit_attention: SDPA would take its slow math kernel); padded keys and everything
    # without λ go through SDPA
    calls = []
    real_sdpa, real_explicit = F.scaled_dot_product_attention, oa._explicit_attention

    def spy(q, k, v, **kw):
        calls.append(("sdpa", q.shape[-1], k.shape[-1], v.shape[-1]))
        return real_sdpa(q, k, v, **kw)

    def spy_explicit(q, k, v, *a):
        calls.append(("explicit", q.shape[-1], k.shape[-1], v.shape[-1]))
        return real_explicit(q, k, v, *a)
    monkeypatch.setattr(oa.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(oa, "_explicit_attention", spy_explicit)
    x = torch.randn(2, 5, 16)
    for kw in ({"lam": -0.1}, {"lam": 0.05, "lam_mode": "softplus-diag"}, {"regime": "divergent"}):
        oa.Attention(16, 2, causal=True, **kw)(x)
    assert calls == [("explicit", 16, 16, 8), ("explicit", 16, 16, 8), ("sdpa", 8, 8, 8)]
    oa.Attention(16, 2, lam=-0.1)(x, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    assert calls[-1] == ("sdpa", 16, 16, 8)
    assert not any(isinstance(m, torch.nn.Parameter) for m in [getattr(oa.Attention(16, 2), "lam", None)])


@pytest.mark.parametrize("causal", [False, True])
def test_the_written_out_lambda_attention_is_sdpas_in_value_and_gradient(causal):
    # float64, every mask kind that reaches it: none, causal, a float bias (ALiBi-like), bias + causal;
    # the reference is SDPA itself on the same q̃, k̃, v, and the λ and input gradients follow
    torch.manual_seed(3)
    for lam_kw in ({"lam": -0.1}, {"lam": 0.05, "lam_mode": "softplus-diag"}):
        for bias in (None, torch.randn(2, 6, 6, dtype=f64)):
            att = oa.Attention(16, 2, causal=causal, pe="rope", **lam_kw).double()
            x = torch.randn(3, 6, 16, dtype=f64, requires_grad=True)
            y = att(x, attn_bias=bias)                               # written out
            y_ref = att(x, attn_bias=bias, key_padding_mask=torch.ones(3, 6, dtype=torch.bool))  # SDPA
            assert (y - y_ref).abs().max() <= 1e-13
            params = [x] + [p for n, p in att.named_parameters() if "lam" in n]
            g = torch.autograd.grad(y.square().sum(), params)
            g_ref = torch.autograd.grad(y_ref.square().sum(), params)
            assert all((a - b).abs().max() <= 1e-12 for a, b in zip(g, g_ref))


def test_constrained_attention_realises_W_and_A_exactly():
    for regime, n_neg in (("divergent", 0), ("intermediate", 6), ("convergent", 12)):
        att = oa.Attention(12, 3, regime=regime).double()
        Q, K, V, O = att.qkv_matrices()
        W, A = att.W_form(), att.A_form()
        assert O is None
        assert torch.allclose(Q @ K.T, W, atol=1e-12)                # realised logit form = W
        assert torch.allclose(A @ V.T, W, atol=1e-12)                # realised value map gives A
        assert regimes.inertia(W) == (12, 0, 0)
        assert regimes.inertia(A) == (12 - n_neg, n_neg, 0)


def test_block_attention_only_is_one_euler_step_of_the_field():
    torch.manual_seed(2)
    blk = oa.Block(8, 1, causal=False).double()
    x = torch.randn(1, 6, 8, dtype=f64)
    Q, K, V, O = blk.attn.qkv_matrices()
    # one head, scale 1/√8 absorbed into Q: x + softmax(x Q Kᵀ xᵀ/√d) x V O
    step = x + oa.velocity(x, Q.double() / math.sqrt(8), K.double(), V.double() @ O.double())
    assert torch.allclose(blk(x, attention_only=True), step, atol=1e-12)
    y = blk(x)
    assert y.shape == x.shape and not torch.allclose(y, step)


def test_block_takes_the_papers_knobs_by_name_and_passes_them_on():
    params = inspect.signature(oa.Block).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert list(params) == ["d", "n_heads", "mlp_ratio", "dropout", "drop_path", "causal", "pe",
                            "rope_base", "rope_pairing", "rope_heads", "lam", "lam_mode", "regime",
                            "bias", "attn", *oa.ATTENTION_OPTIONS]
    assert {k: params[k].default for k in oa.ATTENTION_OPTIONS} == oa.ATTENTION_OPTIONS
    blk = oa.Block(16, 2, causal=True, pe="rope", rope_base=500.0, rope_pairing="half", rope_heads=1,
                   lam=0.05, lam_mode="softplus-diag", regime="intermediate", bias=True, dropout=0.1)
    a = blk.attn
    assert (a.causal, a.pe, a.rope_base, a.rope_pairing, a.rope_heads, a.lam_mode, a.regime, a.dropout) == \
        (True, "rope", 500.0, "half", 1, "softplus-diag", "intermediate", 0.1)
    assert torch.allclose(a.lam_values(), torch.full((2, 8), 0.05, dtype=f64))
    b = oa.Block(16, 2, regime="convergent", rho_cap=0.5).attn
    assert b.A_form.rho_cap == 0.5 and oa.Block(16, 2, lam=0.1, lam_frozen=True, extra_qk=True).attn.lam_frozen
    with pytest.raises(TypeError):
        oa.Block(16, 2, temperature=2.0)
    # the same random numbers as building the Attention directly: same weights, bit for bit
    torch.manual_seed(3)
    b1 = oa.Block(16, 2, pe="rope", lam=-0.1)
    torch.manual_seed(3)
    att = oa.Attention(16, 2, pe="rope", lam=-0.1)
    assert all(torch.equal(p, q) for p, q in zip(b1.attn.parameters(), att.parameters()))


def test_no_decay_parameters_are_the_lambda_and_theta_parameters_by_type():
    net = torch.nn.ModuleDict({
        "plain": oa.Block(8, 2),
        "lam": oa.Block(8, 2, lam=-0.1),
        "diag": oa.Block(8, 2, lam=0.05, lam_mode="softplus-diag"),
        "odd_name": torch.nn.Sequential(oa.Attention(8, 2, regime="convergent", lam=0.2)),
    })
    got = oa.no_decay_parameters(net)
    c = net["odd_name"][0]
    want = [net["lam"].attn.lam, net["diag"].attn.lam_phi, c.lam, c.W_form.theta, c.A_form.theta]
    assert len(got) == len(want) and {id(p) for p in got} == {id(p) for p in want}
    assert all(isinstance(p, torch.nn.Parameter) for p in got)
    assert oa.no_decay_parameters(oa.Block(8, 2)) == []


def test_agrees_with_torchdiffeq():
    """A second, independent implementation of the solvers (torchdiffeq, a test extra)."""
    tdq = pytest.importorskip("torchdiffeq", reason="pip install -r requirements-extra.txt")
    Q, K, V = regimes.sample_instances("intermediate", 4, 3, generator=gen(30))
    X0 = torch.randn(3, 6, 4, generator=gen(31), dtype=f64)
    t = torch.linspace(0, 2.0, 5, dtype=f64)
    f = lambda _t, X: oa.velocity(X, Q, K, V, rope=True)            # noqa: E731
    ref = tdq.odeint(f, X0, t, method="dopri5", rtol=1e-11, atol=1e-13)
    ours = oa.integrate(X0, Q, K, V, t_end=2.0, dt=0.1, method="dopri5", rtol=1e-10, atol=1e-12,
                        n_save=5, rope=True)
    # the tokens grow to ~4e3 by t = 2: compare relative to their size
    assert float((ours.X - ref).abs().max() / ref.abs().max()) < 1e-9
    # fixed step 0.05: torchdiffeq's "rk4" is the 3/8-rule variant, ours the classical one — both
    # fourth order, so their errors against the tight reference are of the same size
    e_ours = (oa.integrate(X0, Q, K, V, t_end=2.0, dt=0.05, method="rk4", n_save=5, rope=True).X
              - ref).abs().max()
    e_tdq = (tdq.odeint(f, X0, t, method="rk4", options={"step_size": 0.05}) - ref).abs().max()
    assert 0.2 < float(e_ours / e_tdq) < 5.0, (e_ours, e_tdq)
    assert float(e_ours / ref.abs().max()) < 1e-3


def test_constrained_attention_has_no_biases_so_zero_is_its_rest_point():
    """The constrained field is linear in the tokens' values: Attn(0) = 0 even with bias=True (a
    trainable value bias would make Attn(0) = b_v), and its parameters are Q, the two forms, nothing else."""
    for regime in ("divergent", "intermediate", "convergent"):
        a = oa.Attention(8, 2, regime=regime, bias=True).double()
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.1)           # move every parameter off its init
        assert torch.equal(a(torch.zeros(1, 5, 8, dtype=f64)), torch.zeros(1, 5, 8, dtype=f64))
        assert not any("bias" in name for name, _ in a.named_parameters())
    free = oa.Attention(8, 2, bias=True)                    # free attention keeps its biases
    assert free.qkv.bias is not None and free.proj.bias is not None


def test_dopri5_freezes_a_stiff_instance_as_stalled_instead_of_force_accepting_it():
    """V = −10¹² I decays at rate 10¹²: explicit steps are stable only below ~3·10⁻¹², under the
    1e-10·t_end floor. That instance used to be force-accepted there in silence (its trial state
    grows by ~10⁸ per step); now it is frozen and reported as stalled — finite, bounded, not blown
    up — and the other instance of the batch finishes exactly as it does alone."""
    g = gen(9)
    d, n = 3, 4
    Q, K, V = regimes.sample_instances("convergent", d, 2, generator=g)
    V = V.clone()
    V[0] = -1e12 * torch.eye(d, dtype=f64)
    X0 = torch.randn(2, n, d, generator=g, dtype=f64)
    tr = oa.integrate(X0, Q, K, V, t_end=1.0, dt=0.1, method="dopri5", max_norm=1e20, n_save=3)
    assert tr.stalled.tolist() == [True, False] and not tr.blown.any()
    assert "stalled" in tr.status and "stiff" in tr.status
    assert torch.isfinite(tr.X).all() and (tr.X[-1, 0].abs().max() <= X0[0].abs().max())
    alone = oa.integrate(X0[1:], Q[1:], K[1:], V[1:], t_end=1.0, dt=0.1, method="dopri5", n_save=3)
    assert (tr.X[-1, 1] - alone.X[-1, 0]).abs().max() < 1e-6
    # a real overflow is still a blow-up, not a stall
    Qd, Kd, Vd = regimes.sample_instance("divergent", d, generator=g)
    tb = oa.integrate(X0[:1], Qd, Kd, 1e300 * Vd, t_end=1.0, dt=0.1, method="dopri5", max_norm=1e308)
    assert tb.blown.all() and not tb.stalled.any()
