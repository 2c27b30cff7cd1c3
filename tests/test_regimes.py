"""W, A, inertia, classification, prescribed inertia, sampling, RoPE offsets, the agreement run."""

import math

import pytest
import torch

import ode_attention as oa
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
    S = torch.diag(torch.tensor([3.0, -2.0, 1e-12, 0.5], dtype=f64))
    U = torch.linalg.qr(torch.randn(4, 4, generator=gen(1), dtype=f64))[0]
    assert regimes.inertia(U @ S @ U.T) == (2, 1, 1)                 # 1e−12 counts as zero
    assert regimes.inertia(U @ S @ U.T, tol=1e-14) == (3, 1, 0)
    # only the symmetric part matters: adding an antisymmetric part changes nothing
    T = torch.randn(4, 4, generator=gen(2), dtype=f64)
    assert regimes.inertia(U @ S @ U.T + (T - T.T)) == (2, 1, 1)


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


def test_rope_offset_regimes_and_batch_predictions_agree():
    Q, K, V = regimes.sample_instances("divergent", 4, 6, generator=gen(6))
    offs = list(range(-3, 4))
    preds = regimes.rope_predictions(Q, K, V, offs)
    for b in range(6):
        per = {r["regime"] for r in regimes.rope_offset_regimes(Q[b], K[b], V[b], offs)}
        assert preds[b] == (per.pop() if len(per) == 1 else None)
        assert regimes.rope_offset_regimes(Q[b], K[b], V[b], [0])[0]["regime"] == "divergent"


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


def test_agreement_small_run_confirms_the_predictions():
    rows = regimes.agreement_table(24, t_end=15.0, progress=False)
    cell = {(r["regime"], r["A"], r["pe"]): r for r in rows}
    assert len(rows) == 18
    for pe in ("none", "abs"):
        assert cell[("convergent", "symmetric", pe)]["agreement"] == 1.0
        assert cell[("divergent", "symmetric", pe)]["agreement"] == 1.0
        assert cell[("divergent", "general", pe)]["agreement"] == 1.0
    for r in rows:
        assert r["converged"] + r["diverged"] + r["neither"] == 24
    assert "| convergent | symmetric | none | 24 |" in regimes.format_table(rows)


def test_observed_fate_rules():
    norms = torch.tensor([[1.0, 1.0, 1.0], [0.6, 5.0, 1.0], [0.3, 20.0, 1.1]], dtype=f64)
    assert regimes.observed_fate(norms, torch.tensor([False, False, False])) == \
        ["converged", "diverged", "neither"]
    assert regimes.observed_fate(norms, torch.tensor([False, False, True]))[2] == "diverged"


def test_cli_agreement_and_bad_input(tmp_path, capsys):
    assert regimes.main(["--agreement", "3", "--t-end", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "agreement.md").read_text().count("\n") == 20
    assert (tmp_path / "agreement.csv").exists()
    capsys.readouterr()
    for bad in (["--agreement", "0"], ["--agreement", "3", "--d", "3"]):
        assert regimes.main([*bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("regimes.py: ") and "\n" not in err
        assert not (tmp_path / "x").exists()
