"""The fast paths of the integrators against the reference ones: the batch-last layout
(ode_attention._BatchLastField with the lean RK4 / Euler steppers) against the batch-first loop with
rk4_step / euler_step, including blow-ups, shared and batched weights, and the causal mask."""

import pytest
import torch

import ode_attention as oa
import regimes

f64 = torch.float64


def _batch(regime, d, n, B, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    Q, K, V = regimes.sample_instances(regime, d, B, generator=g)
    return Q, K, V, scale * torch.randn(B, n, d, generator=g, dtype=f64)


def test_the_batch_last_field_is_the_field():
    for causal in (False, True):
        Q, K, V, X = _batch("intermediate", 4, 7, 300, 0)
        F = oa._BatchLastField(Q, K, V, causal)
        got = F(0.0, X.permute(1, 2, 0).contiguous()).permute(2, 0, 1)
        ref = oa.velocity(X, Q, K, V, causal=causal)
        assert (got - ref).abs().max() <= 1e-13 * ref.abs().max()
        keep = torch.arange(300) % 3 == 0                              # a subset keeps its own weights
        sub = F.select(keep)(0.0, X[keep].permute(1, 2, 0).contiguous()).permute(2, 0, 1)
        assert (sub - ref[keep]).abs().max() <= 1e-13 * ref.abs().max()


@pytest.mark.parametrize("method", ["rk4", "euler"])
@pytest.mark.parametrize("causal", [False, True])
def test_batch_last_and_batch_first_integrate_the_same_trajectories(method, causal):
    Q, K, V, X0 = _batch("convergent", 4, 8, 200, 1)
    kw = dict(t_end=3.0, dt=0.05, method=method, n_save=7, causal=causal)
    a = oa.integrate(X0, Q, K, V, layout="batch-last", **kw)
    b = oa.integrate(X0, Q, K, V, layout="batch-first", **kw)
    assert torch.equal(a.t, b.t) and a.status == b.status == "ok"
    assert (a.X - b.X).abs().max() <= 1e-12 * b.X.abs().max()
    assert a.n_evals == b.n_evals and a.n_steps == b.n_steps
    # "auto" picks the batch-last path here (small plain instances, a batch of 200)
    assert oa._batch_last_suits(8, 4, 200, {"causal": causal})
    c = oa.integrate(X0, Q, K, V, **kw)
    assert torch.equal(c.X, a.X)


def test_batch_last_freezes_blow_ups_like_the_reference():
    # half divergent (they leave the ball ‖x‖ ≤ 50 at different times), half convergent (they stay)
    Qd, Kd, Vd, Xd = _batch("divergent", 4, 6, 60, 2, scale=2.0)
    Qc, Kc, Vc, Xc = _batch("convergent", 4, 6, 60, 5)
    Q, K, V, X0 = (torch.cat(p) for p in ((Qd, Qc), (Kd, Kc), (Vd, Vc), (Xd, Xc)))
    kw = dict(t_end=6.0, dt=0.02, method="rk4", n_save=13, max_norm=50.0)
    a = oa.integrate(X0, Q, K, V, layout="batch-last", **kw)
    b = oa.integrate(X0, Q, K, V, layout="batch-first", **kw)
    assert 0 < int(b.blown.sum()) < 120                               # some blow up, not all
    assert torch.equal(a.blown, b.blown) and torch.equal(a.t_blow, b.t_blow)
    assert a.status == b.status and a.reasons == b.reasons
    assert (a.X - b.X).abs().max() <= 1e-10 * b.X.abs().max()
    assert torch.isfinite(a.X).all()


def test_shared_weights_broadcast_in_the_batch_last_path():
    Q, K, V, X0 = _batch("convergent", 4, 5, 100, 3)
    kw = dict(t_end=2.0, dt=0.1, method="rk4", n_save=3)
    a = oa.integrate(X0, Q[0], K[0], V[0], layout="batch-last", **kw)   # one (Q, K, V) for all
    b = oa.integrate(X0, Q[0], K[0], V[0], layout="batch-first", **kw)
    assert (a.X - b.X).abs().max() <= 1e-12 * b.X.abs().max()


def test_batch_last_refuses_what_it_does_not_do():
    Q, K, V, X0 = _batch("convergent", 4, 5, 100, 4)
    with pytest.raises(ValueError, match="plain or causal"):
        oa.integrate(X0, Q, K, V, 1.0, 0.1, layout="batch-last", rope=True)
    with pytest.raises(ValueError, match="fixed-step"):
        oa.integrate(X0, Q, K, V, 1.0, 0.1, method="dopri5", layout="batch-last")
    with pytest.raises(ValueError, match="layout"):
        oa.integrate(X0, Q, K, V, 1.0, 0.1, layout="columns")
    assert not oa._batch_last_suits(128, 16, 1000, {})               # large instances: batch-first
    assert not oa._batch_last_suits(8, 4, 1000, {"rope": True})


def test_the_batch_rms_error_norm_takes_fewer_steps_and_is_checked():
    Q, K, V, X0 = _batch("convergent", 4, 8, 64, 6)
    kw = dict(t_end=4.0, dt=0.05, method="dopri5", rtol=1e-7, atol=1e-10, n_save=2)
    ref = oa.integrate(X0, Q, K, V, **{**kw, "rtol": 1e-12, "atol": 1e-15}).X[-1]
    a = oa.integrate(X0, Q, K, V, error_norm="max", **kw)
    b = oa.integrate(X0, Q, K, V, error_norm="rms", **kw)
    assert b.n_evals < a.n_evals                                     # the worst instance no longer sets h
    err_a, err_b = (float((t.X[-1] - ref).abs().max()) for t in (a, b))
    assert err_a <= err_b < 1e-4                                     # ... and every instance pays less care
    with pytest.raises(ValueError, match="error_norm"):
        oa.integrate(X0, Q, K, V, 1.0, 0.1, method="dopri5", error_norm="mean")


@pytest.mark.parametrize("backend,causal", [(True, False), ("aot_eager", True)])
def test_the_compiled_steps_integrate_what_the_eager_loop_does(backend, causal):
    # True = inductor (generated C++), "aot_eager" = the traced graph run eagerly. A mixed batch:
    # the divergent half leaves ‖x‖ ≤ 50 at different times, so the compiled step must also take the
    # batch shrinking (one recompile with a dynamic batch dimension) and freeze exactly the same ones
    Qd, Kd, Vd, Xd = _batch("divergent", 4, 6, 40, 2, scale=2.0)
    Qc, Kc, Vc, Xc = _batch("convergent", 4, 6, 40, 5)
    Q, K, V, X0 = (torch.cat(p) for p in ((Qd, Qc), (Kd, Kc), (Vd, Vc), (Xd, Xc)))
    kw = dict(t_end=4.0, dt=0.02, method="rk4", n_save=9, max_norm=50.0, causal=causal)
    ref = oa.integrate(X0, Q, K, V, compile=False, layout="batch-first", **kw)
    got = oa.integrate(X0, Q, K, V, compile=backend, **kw)
    assert 0 < int(ref.blown.sum()) < 80
    assert torch.equal(got.blown, ref.blown) and torch.equal(got.t_blow, ref.t_blow)
    assert got.status == ref.status and got.n_steps == ref.n_steps and torch.equal(got.t, ref.t)
    conv = slice(40, 80)                                             # contracting: round-off stays round-off
    assert (got.X[:, conv] - ref.X[:, conv]).abs().max() <= 1e-11 * ref.X[:, conv].abs().max()
    # growing instances amplify the compiled kernels' different summation order, nothing more
    assert ((got.X - ref.X).abs() <= 1e-6 * (1 + ref.X.abs())).all()


def test_compile_auto_stays_eager_on_a_cpu_and_refuses_what_it_does_not_do(monkeypatch):
    assert not oa._compile_suits(torch.device("cpu"), 10**6, 10**6)  # measured 1.10x: never on CPU
    assert oa._compile_suits(torch.device("cuda"), 10**4, 10**3)
    assert not oa._compile_suits(torch.device("cuda"), 10**3, 10**5)
    monkeypatch.setattr(oa, "_compiled_stepper", lambda *a: pytest.fail("compiled on a CPU"))
    Q, K, V, X0 = _batch("convergent", 4, 20, 20, 7)
    oa.integrate(X0, Q, K, V, 0.5, 0.1, compile="auto")
    for kw, what in ((dict(rope=True), "plain or causal"), (dict(method="dopri5"), "fixed-step"),
                     (dict(layout="batch-last"), "batch-first"), (dict(compile=1), "compile must"),
                     (dict(compile=""), "compile must")):
        with pytest.raises(ValueError, match=what):
            oa.integrate(X0, Q, K, V, 1.0, 0.1, **{"compile": True, **kw})
