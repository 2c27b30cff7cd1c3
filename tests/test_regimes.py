"""W, A, inertia, classification, prescribed inertia, sampling, RoPE offsets, the multi-head layer.

(The agreement experiment built on these is tested in test_agreement.py.)"""

import copy
import math

import pytest
import torch

import regimes
import rope

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_interaction_matrices_definitions():
    g = gen(0)
    Q, K = torch.randn(5, 3, generator=g, dtype=f64), torch.randn(5, 3, generator=g, dtype=f64)
    V = torch.randn(5, 5, generator=g, dtype=f64)
    W, A = regimes.interaction_matrices(Q, K, V)
    assert torch.allclose(W, Q @ K.T, atol=1e-14)                    # W = Q Kᵀ
    assert torch.allclose(A @ V.T, W, atol=1e-12)                    # A Vᵀ = W
    assert torch.allclose(A, W @ torch.linalg.inv(V.T), atol=1e-10)  # A = W (Vᵀ)⁻¹


def test_singular_or_ill_conditioned_V_is_refused_with_its_condition_number():
    Q = K = torch.eye(3, dtype=f64)
    V = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]], dtype=f64)  # rank 2
    with pytest.raises(ValueError, match="condition number"):
        regimes.interaction_matrices(Q, K, V)
    V2 = torch.diag(torch.tensor([1.0, 1.0, 1e-12], dtype=f64))
    with pytest.raises(ValueError, match=r"condition number 1e\+12"):
        regimes.interaction_matrices(Q, K, V2)
    with pytest.raises(ValueError, match="non-finite"):
        regimes.interaction_matrices(Q, K, torch.full((3, 3), float("nan"), dtype=f64))
    with pytest.raises(ValueError, match="V must be square"):
        regimes.interaction_matrices(Q, K, torch.eye(2, dtype=f64))


def test_inertia_and_tolerance():
    U = torch.linalg.qr(torch.randn(4, 4, generator=gen(1), dtype=f64))[0]
    S = U @ torch.diag(torch.tensor([3.0, -2.0, 0.0, 0.5], dtype=f64)) @ U.T
    assert regimes.inertia(S) == (2, 1, 1)                          # an exact 0 is round-off: zero
    S12 = U @ torch.diag(torch.tensor([3.0, -2.0, 1e-12, 0.5], dtype=f64)) @ U.T
    assert regimes.inertia(S12) == (3, 1, 0)                        # 1e−12 is 10³ × round-off: real
    assert regimes.inertia(S12, tol=1e-6) == (2, 1, 1)              # a threshold of one's own
    # only the symmetric part matters: adding an antisymmetric part changes nothing
    T = torch.randn(4, 4, generator=gen(2), dtype=f64)
    assert regimes.inertia(S + (T - T.T)) == (2, 1, 1)


def test_the_zero_threshold_is_round_off_not_a_flat_1e_6():
    """τ = d·ε for a matrix known exactly (was a flat 1e-6, 10¹⁰ × round-off): a positive-definite
    matrix with condition number 10⁷ is definite, while the round-off zeros of a rank-deficient
    W = Q Kᵀ (float32 weights, d up to 384) stay zero; A solved from V carries κ(V)."""
    assert regimes.roundoff_tol(8) == 8 * torch.finfo(f64).eps
    assert regimes.roundoff_tol(8, cond=1e6) == 8e6 * torch.finfo(f64).eps
    assert regimes.roundoff_tol(8, cond=0.5) == regimes.roundoff_tol(8)      # κ ≥ 1 always
    U = torch.linalg.qr(torch.randn(4, 4, generator=gen(3), dtype=f64))[0]
    P = U @ torch.diag(torch.tensor([2.0, 1.0, 3.0, 2e-7], dtype=f64)) @ U.T   # cond 1.5e7
    assert regimes.inertia(P) == (4, 0, 0)                          # the old rule said (3, 0, 1)
    g = gen(4)
    for d, dk in ((8, 2), (64, 8), (384, 32)):
        Q = torch.randn(d, dk, generator=g).float().double()
        K = torch.randn(d, dk, generator=g).float().double()
        assert regimes.inertia(Q @ K.T) == (dk, dk, d - 2 * dk)     # rank 2 d_k: the rest is zero
    # A's threshold carries κ(V): A_sym = diag(−1, −1e−10) is negative definite when A is known
    # exactly, but not when it came out of a solve with κ(V) = 1e8 (τ = 2·ε·1e8 ≈ 4e−8 > 1e−10)
    W, A = torch.eye(2, dtype=f64), torch.diag(torch.tensor([-1.0, -1e-10], dtype=f64))
    assert regimes.regime_of(W, A)["regime"] == "convergent"
    r = regimes.regime_of(W, A, cond_V=1e8)
    assert r["regime"] == "intermediate" and r["inertia_A"] == (0, 1, 1)
    assert regimes.classify_batch(W.expand(2, 2, 2), A.expand(2, 2, 2),
                                  cond_V=torch.tensor([1.0, 1e8])) == ["convergent", "intermediate"]


@pytest.mark.parametrize("symmetric_A", [True, False])
def test_sampled_instances_have_their_regime(symmetric_A):
    g = gen(3)
    for regime in regimes.REGIME_NAMES:
        for d in (2, 3, 6):
            Q, K, V = regimes.sample_instances(regime, d, 25, symmetric_A=symmetric_A, generator=g)
            for b in range(25):
                assert regimes.classify(Q[b], K[b], V[b]) == regime
                W, A = regimes.interaction_matrices(Q[b], K[b], V[b])
                assert torch.allclose(A, A.T, atol=1e-9) == symmetric_A
                if regime == "intermediate":
                    assert regimes.inertia(A)[1] == d // 2


def test_sample_instance_is_reproducible_and_validates():
    a = regimes.sample_instance("convergent", 4, generator=gen(7))
    b = regimes.sample_instance("convergent", 4, generator=gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    for bad, msg in ((("nope", 4), "unknown regime"), (("convergent", 0), "positive integer"),
                     (("intermediate", 1), "needs d >= 2")):
        with pytest.raises(ValueError, match=msg):
            regimes.sample_instance(*bad)


def test_classify_by_hand():
    I = torch.eye(3, dtype=f64)
    assert regimes.classify(I, I, -I) == "convergent"               # W = I, A = −I
    assert regimes.classify(I, I, I) == "divergent"                 # W = I, A = I
    assert regimes.classify(I, -I, I) == "intermediate"             # W = −I
    J = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=f64))
    assert regimes.classify(I, I, J) == "intermediate"              # A = J⁻¹ = J, mixed


def test_prescribed_inertia_exact_for_many_random_parameters_and_grads_flow():
    g = gen(4)
    for _ in range(200):
        d = int(torch.randint(1, 9, (1,), generator=g))
        n_neg = int(torch.randint(0, d + 1, (1,), generator=g))
        m = regimes.PrescribedInertia(d, n_neg).double()
        with torch.no_grad():
            m.L_free.copy_(torch.randn(d, d, generator=g, dtype=f64))
            m.theta.copy_(torch.randn(d, generator=g, dtype=f64))
            m.T_free.copy_(torch.randn(d, d, generator=g, dtype=f64))
        M = m()
        assert torch.allclose(regimes.sym(M), m.symmetric_part(), atol=1e-10)
        assert regimes.inertia(M, tol=1e-10) == (d - n_neg, n_neg, 0)
    m = regimes.PrescribedInertia(6, 3)
    loss = (m() ** 2).sum() + m()[0, 1]
    loss.backward()
    for p in (m.L_free, m.theta, m.T_free):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # inertia is kept through optimiser steps that pull toward a target of the opposite inertia
    target = -regimes.sym(torch.randn(6, 6, generator=g)) * 3 + torch.diag(torch.tensor([-5.0] * 3 + [5.0] * 3))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (m() - target).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]                               # it did learn
    assert regimes.inertia(m().double(), tol=1e-10) == (3, 3, 0)      # and kept its inertia


def test_rope_offset_matrices_match_rotated_logits():
    g = gen(5)
    d, dk = 4, 6
    Q, K = torch.randn(d, dk, generator=g, dtype=f64), torch.randn(d, dk, generator=g, dtype=f64)
    x = torch.randn(9, d, generator=g, dtype=f64)
    q = rope.apply_rope(x @ Q, torch.arange(9))
    k = rope.apply_rope(x @ K, torch.arange(9))
    Wm = regimes.rope_offset_matrices(Q, K, range(-8, 9))
    for i in range(9):
        for j in range(9):
            # (xᵢQ R(i)ᵀ)·(xⱼK R(j)ᵀ) = xᵢ W(j − i) xⱼᵀ
            assert math.isclose(float(q[i] @ k[j]), float(x[i] @ Wm[j - i + 8] @ x[j]), abs_tol=1e-12)
    assert torch.allclose(Wm[8], Q @ K.T, atol=1e-14)                # offset 0: W itself


def test_analyse_layer_single_head_equals_classify_and_heads_are_rank_deficient():
    Q, K, V = regimes.sample_instance("convergent", 6, generator=gen(8))
    r = regimes.analyse_layer(Q, K, V, None, n_heads=1)
    assert r["regime"] == "convergent" and r["inertia_A"] == (0, 6, 0)
    g = gen(9)
    d, H = 8, 4
    Qm, Km = torch.randn(d, d, generator=g, dtype=f64), torch.randn(d, d, generator=g, dtype=f64)
    Vm, Om = torch.randn(d, d, generator=g, dtype=f64), torch.randn(d, d, generator=g, dtype=f64)
    r = regimes.analyse_layer(Qm, Km, Vm, Om, n_heads=H, scale=0.5)
    for h in r["heads"]:
        p, n, z = h["inertia_W"]
        assert p <= 2 and n <= 2 and z >= d - 4                      # rank Wₕ ≤ d_h = 2
    assert torch.allclose(r["W"], 0.5 * Qm @ Km.T, atol=1e-12)       # Σₕ Wₕ = s Q Kᵀ
    assert torch.allclose(r["A"] @ (Vm @ Om).T, r["W"], atol=1e-9)   # A Mᵀ = W, M = V O
    # grouped-query-like rank-deficient value path: undefined A, least squares reported
    Om2 = Om.clone()
    Om2[4:] = 0
    r2 = regimes.analyse_layer(Qm, Km, Vm, Om2, n_heads=H)
    assert r2["regime"] == "undefined" and r2["rank_M"] == 4 and r2["A_lsq_residual"] > 1e-3


def test_one_regime_rule_batched_and_single_agree():
    # classify_batch (the batched rule) == regime_of / classify_matrices (single) == inertia counts
    g = gen(10)
    W = torch.randn(40, 3, 3, generator=g, dtype=f64) + 1.5 * torch.eye(3, dtype=f64)
    A = torch.randn(40, 3, 3, generator=g, dtype=f64)
    A[:10] = -(A[:10] @ A[:10].transpose(-1, -2)) - 0.1 * torch.eye(3, dtype=f64)     # A_sym ≺ 0
    A[10:20] = A[10:20] @ A[10:20].transpose(-1, -2) + 0.1 * torch.eye(3, dtype=f64)  # A_sym ≻ 0
    names = regimes.classify_batch(W, A)
    assert {"convergent", "divergent", "intermediate"} <= set(names)
    for b in range(40):
        r = regimes.regime_of(W[b], A[b])
        assert names[b] == r["regime"] == regimes.classify_matrices(W[b], A[b])
        assert r["inertia_W"] == regimes.inertia(W[b]) and r["inertia_A"] == regimes.inertia(A[b])
    assert regimes.classify_batch(W.view(4, 10, 3, 3), A.view(4, 10, 3, 3)) == names
    counts = regimes.inertia_counts(torch.tensor([[3.0, -1.0, 1e-17], [0.0, 0.0, 0.0]], dtype=f64))
    assert [c.tolist() for c in counts] == [[1, 0], [1, 0], [1, 3]]
    with pytest.raises(ValueError, match="one square matrix"):
        regimes.regime_of(W, A)


def test_rope_rotations_and_batched_offset_matrices():
    R = regimes.rope_rotations([0, 3, -5], 6, 4, 100.0, "half")
    assert torch.equal(R[0], torch.eye(6, dtype=f64))
    assert torch.equal(R[1, :4, :4], rope.rotation_matrix(3.0, 4, 100.0, "half"))
    assert torch.equal(R[2, 4:, 4:], torch.eye(2, dtype=f64)) and not R[2, :4, 4:].any()
    Q, K, _ = regimes.sample_instances("divergent", 4, 3, generator=gen(11))
    offs = [-2, 0, 5]
    Wb = regimes.rope_offset_matrices(Q, K, offs)                     # (B, M, d, d)
    assert Wb.shape == (3, 3, 4, 4)
    for b in range(3):
        torch.testing.assert_close(Wb[b], regimes.rope_offset_matrices(Q[b], K[b], offs), atol=1e-14, rtol=0)
    with pytest.raises(ValueError, match="even d_k"):
        regimes.rope_offset_matrices(torch.eye(3, dtype=f64), torch.eye(3, dtype=f64), offs)


def test_empty_matrices_and_a_bad_tolerance_are_refused():
    e = torch.zeros(0, 0, dtype=torch.float64)
    for call in (lambda: regimes.classify(e, e, e), lambda: regimes.inertia(e),
                 lambda: regimes.regime_of(e, e)):
        with pytest.raises(ValueError, match="empty"):
            call()
    Q, K, V = regimes.sample_instance("convergent", 3, generator=torch.Generator().manual_seed(0))
    for tol in (float("nan"), -1e-6, 1.0, True):
        with pytest.raises(ValueError, match="tol must be"):
            regimes.classify(Q, K, V, tol=tol)


def test_realised_inertia_sees_float32_lose_what_sylvester_promises():
    """L D Lᵀ with D ≺ 0 keeps its inertia in float64 (while κ² ≪ 1/(d ε₆₄)), but not in float32
    once κ = cond(L|D|^½) is large: realised_inertia reports it (kept False, κ > 3·10⁴), and never
    claims a loss for a well-conditioned form."""
    lost = []
    for s in range(40):
        m = regimes.PrescribedInertia(8, n_neg=8, antisymmetric=False, l_std=8.0, generator=gen(500 + s))
        r32 = regimes.realised_inertia(m)
        assert r32["prescribed"] == (0, 8, 0) and r32["dtype"] == "float32"
        r64 = regimes.realised_inertia(copy.deepcopy(m).double())
        assert r64["dtype"] == "float64"
        if r64["kappa"] < 1e6:                   # κ² ≪ 1/(d ε₆₄): float64 resolves the smallest λ
            assert r64["kept"]
        if not r32["kept"]:
            lost.append(r32["kappa"])
            assert r32["realised"] != (0, 8, 0)
    assert len(lost) >= 5 and min(lost) > 3e4                   # it happens, and only when κ is large
    ok = regimes.realised_inertia(regimes.PrescribedInertia(8, n_neg=3, generator=gen(7)))
    assert ok["kept"] and ok["realised"] == (5, 3, 0) and ok["kappa"] < 1e2
