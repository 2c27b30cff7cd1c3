"""regimes.WarmKeysValues: the constrained attention's K, V by Newton–Schulz from the last call's
inverses instead of two LU solves per forward (issue #17). What must hold, at every step of a
training run, including a parameter jump that the warm start cannot follow:
    Q Kᵀ = W and A Vᵀ = W to round-off (relative to ‖W‖), the LU solve's gradients, the LU
    fallback where the check fails, and the `singular` flag / eval ValueError as before.
The layer is the real ode_attention.Attention (its qkv_matrices calls Attention.kv)."""
import pytest
import torch

import ode_attention as oa
import regimes
import train_lm

f64 = torch.float64


def use(model, method, **kw):
    """Give every constrained Attention of `model` its own WarmKeysValues(method); returns them."""
    kvs = []
    for m in model.modules():
        if isinstance(m, oa.Attention) and m.regime != "free":
            m.kv = regimes.WarmKeysValues(method, **kw)
            kvs.append(m.kv)
    return kvs


def layer(regime="intermediate", d=32, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return oa.Attention(d, 4, regime=regime).to(dtype)


def triple(form):
    """M ← 3M for M = L D Lᵀ + T: D ← 3D (θ through softplus), T ← 3T; then R₀ = I − 3 M X = −2I."""
    form.theta.copy_(torch.log(torch.expm1(3 * torch.nn.functional.softplus(form.theta))))
    form.T_free.mul_(3.0)


def rel_residuals(att):
    """‖Q Kᵀ − W‖/‖W‖ and ‖A Vᵀ − W‖/‖W‖, evaluated in float64 from the layer's own K, V."""
    with torch.no_grad():
        Q, K, V, _ = att.qkv_matrices()
        W, A = att.W_form().double(), att.A_form().double()
        nw = W.norm()
        return float((Q.double() @ K.double().T - W).norm() / nw), float((A @ V.double().T - W).norm() / nw)


def grads(att, x, G):
    att.zero_grad(set_to_none=True)
    (att(x) * G).sum().backward()
    return {n: p.grad.clone() for n, p in att.named_parameters()}


def test_auto_off_cuda_is_the_lu_solve_bit_for_bit():
    att = layer()
    kv, = use(att, "auto")
    Q, K, V, _ = att.qkv_matrices()
    K0, V0, s0 = regimes.keys_values(Q, att.W_form(), att.A_form())
    assert torch.equal(K, K0) and torch.equal(V, V0) and kv.calls == 0 and kv.X is None
    with pytest.raises(ValueError, match="unknown method"):
        regimes.WarmKeysValues("qr")


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_newton_realises_W_and_A_to_round_off_through_training_steps_and_a_jump(dtype):
    """Smooth AdamW steps (the warm start converges: no fallback, the matmul path really runs),
    then a jump no warm start can follow (Q ← 3Q and A ← 3A: R₀ = I − 3 M M⁻¹ = −2I): the
    check sends both matrices to the LU on that very call; then the warm path resumes."""
    eps = torch.finfo(dtype).eps
    att = layer(dtype=dtype)
    kv, = use(att, "newton")
    bound = 40 * 32 ** 0.5 * eps                               # ~ round-off of d-term sums
    opt = torch.optim.AdamW(att.parameters(), lr=1e-4, weight_decay=0.0)
    x = torch.randn(2, 7, 32, dtype=dtype)
    for step in range(8):
        if step == 4:
            with torch.no_grad():                          # Q ← 3Q and A ← 3A exactly
                att.Q.mul_(3.0)
                triple(att.A_form)
        before = kv.fallbacks
        att.zero_grad()
        (att(x) ** 2).mean().backward()
        assert kv.fallbacks - before == (2 if step == 4 else 0), step
        assert max(rel_residuals(att)) < bound, (step, rel_residuals(att))
        opt.step()
    # the same K, V as the LU solve, to the solve's own round-off (κ-sized)
    with torch.no_grad():
        Q, K, V, _ = att.qkv_matrices()
        K0, V0, _ = regimes.keys_values(Q, att.W_form(), att.A_form())
    for got, want in ((K, K0), (V, V0)):
        assert float((got - want).norm() / want.norm()) < 1e3 * eps


def test_gradients_are_the_lu_solves_through_the_layer_also_after_a_fallback():
    """Loss through the whole layer; ∂/∂ Q, L_free, θ, T_free of both forms. float64: equal to
    ~1e-12 — with both warm starts good, after A ← 3A (only A falls back) and with A's warm start
    overflowed to inf (as a diverged NS leaves it: it must not reach any product, inf · 0 = NaN);
    float32: as close to the float64 truth as the float32 LU solve is."""
    torch.manual_seed(1)
    x, G = torch.randn(2, 9, 32, dtype=f64), torch.randn(2, 9, 32, dtype=f64)
    for case in ("warm", "A <- 3A", "X_A = inf"):
        ref, new = layer(seed=2, dtype=f64), layer(seed=2, dtype=f64)
        use(ref, "solve")
        kv, = use(new, "newton")
        new.qkv_matrices()                                     # the warm start of these parameters
        with torch.no_grad():
            if case == "A <- 3A":
                triple(ref.A_form)
                triple(new.A_form)
            elif case == "X_A = inf":
                kv.X[1] = float("inf")
        before = kv.fallbacks
        g_new, g_ref = grads(new, x, G), grads(ref, x, G)
        assert kv.fallbacks - before == (0 if case == "warm" else 1), case
        assert set(g_new) == {"Q", "W_form.L_free", "W_form.theta", "W_form.T_free",
                              "A_form.L_free", "A_form.theta", "A_form.T_free"}
        for n in g_ref:
            assert float((g_new[n] - g_ref[n]).norm() / g_ref[n].norm()) < 1e-12, (case, n)
    # float32: error of each against the float64 truth, the Newton one no worse than the solve's
    truth = layer(seed=4, dtype=f64)
    use(truth, "solve")
    truth = grads(truth, x, G)
    errs = {}
    for method in ("newton", "solve"):
        m32 = layer(seed=4)
        use(m32, method)
        g = grads(m32, x.float(), G.float())
        errs[method] = max(float((g[n].double() - truth[n]).norm() / truth[n].norm()) for n in truth)
    assert errs["newton"] < max(3 * errs["solve"], 1e-5), errs


def test_a_warm_start_that_did_not_converge_is_caught_by_the_check():
    """n_iter = 0: after an optimiser step X is last step's inverse, off by ‖ΔM M⁻¹‖ ≫ round-off.
    The check must notice and solve; the unchecked X W would miss W by that much."""
    att = layer(regime="divergent")
    kv, = use(att, "newton", n_iter=0)
    att.qkv_matrices()
    X_old = kv.X.clone()
    with torch.no_grad():
        for p in att.parameters():
            p.add_(1e-2 * torch.randn_like(p))
    att.qkv_matrices()
    assert kv.fallbacks == 2
    assert max(rel_residuals(att)) < 40 * 32 ** 0.5 * torch.finfo(torch.float32).eps
    with torch.no_grad():
        W, A = att.W_form(), att.A_form()
        assert float((att.Q @ (X_old[0] @ W) - W).norm() / W.norm()) > 1e-4  # what it would have used


def test_singular_Q_is_flagged_in_training_and_refused_in_eval_as_with_the_solve():
    att = layer(regime="convergent")
    kv, = use(att, "newton")
    att.qkv_matrices()
    with torch.no_grad():
        att.Q[:, 3] = 0.0                                      # an exactly singular query map
    _, _, s0 = regimes.keys_values(att.Q, att.W_form(), att.A_form())
    assert bool(s0)                                            # today's flag
    with torch.no_grad():
        _, _, singular = kv(att.Q, att.W_form(), att.A_form())
    assert bool(singular) and kv.fallbacks == 1                # training: flagged, no error
    att.eval()
    with pytest.raises(ValueError, match="became singular"):
        att.qkv_matrices()
    att.train()
    with torch.no_grad():                                      # invertible again: the warm
        att.Q[:, 3] = torch.randn(32) / 32 ** 0.5              # start (NaN) fails once, then
    for _ in range(2):                                         # the LU restart carries on
        _, _, singular = kv(att.Q, att.W_form(), att.A_form())
        assert not bool(singular)
    assert kv.fallbacks == 3 and max(rel_residuals(att)) < 1e-4


def test_bf16_autocast_does_not_reach_the_inverse():
    """Under CPU autocast (bf16, 8-bit mantissa) the matmuls of WarmKeysValues stay float32."""
    att = layer()
    use(att, "newton")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        att.qkv_matrices()
        _, K, V, _ = att.qkv_matrices()
    assert K.dtype == V.dtype == torch.float32
    assert max(rel_residuals(att)) < 40 * 32 ** 0.5 * torch.finfo(torch.float32).eps


def test_a_tiny_constrained_lm_trains_alike_with_newton_and_solve():
    """End to end (train_lm's GPT, float64 to see the methods, not round-off): six AdamW steps,
    losses equal to 1e-12, and the Newton path ran without fallbacks after its first LU."""
    cfg = dict(train_lm.PRESETS["small"], d_model=32, n_layers=2, n_heads=4, seq_len=16, vocab_size=64,
               lam=0.0, lam_mode="identity", regime="divergent", pe="rope")
    data = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))
    losses = {}
    for method in ("newton", "solve"):
        torch.manual_seed(0)
        model = train_lm.build_lm(cfg).double()
        kvs = use(model, method)
        opt = train_lm.make_optimizer(model, dict(cfg, lr=1e-3), torch.device("cpu"))
        losses[method] = []
        for _ in range(6):
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[method].append(loss.item())
        if method == "newton":
            assert all(kv.calls == 6 and kv.fallbacks == 0 for kv in kvs)
    assert losses["newton"] == pytest.approx(losses["solve"], rel=1e-12)
