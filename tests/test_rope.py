"""Positional encodings: RoPE (both pairings, 1-D and 2-D), sinusoidal, ALiBi, T5 bias."""

import inspect
import math

import pytest
import torch

import rope

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pairing", rope.PAIRINGS)
def test_apply_rope_matches_explicit_rotation_matrix(pairing):
    x = torch.randn(7, 8, generator=gen(0), dtype=f64)
    y = rope.apply_rope(x, torch.arange(7), pairing=pairing)
    for t in range(7):
        R = rope.rotation_matrix(t, 8, pairing=pairing)
        assert torch.allclose(y[t], x[t] @ R.T, atol=1e-14)
        assert torch.allclose(R.T @ R, torch.eye(8, dtype=f64), atol=1e-14)      # orthogonal
    R2, R5, R3 = (rope.rotation_matrix(t, 8, pairing=pairing) for t in (2, 5, 3))
    assert torch.allclose(R2.T @ R5, R3, atol=1e-14)                              # R(i)ᵀR(j) = R(j−i)


@pytest.mark.parametrize("pairing", rope.PAIRINGS)
def test_scores_depend_only_on_offset_and_norms_are_kept(pairing):
    g = gen(1)
    q, k = torch.randn(16, generator=g, dtype=f64), torch.randn(16, generator=g, dtype=f64)
    def score(i, j):
        return float(rope.apply_rope(q, torch.tensor(i), pairing=pairing)
                     @ rope.apply_rope(k, torch.tensor(j), pairing=pairing))
    for i, j, s in ((3, 1, 10), (0, 7, 100), (5, 5, 1234)):
        assert math.isclose(score(i, j), score(i + s, j + s), rel_tol=1e-10, abs_tol=1e-10)
    x = torch.randn(3, 50, 16, generator=g, dtype=f64)
    assert torch.allclose(rope.apply_rope(x, torch.arange(50), pairing=pairing).norm(dim=-1),
                          x.norm(dim=-1), atol=1e-12)


def test_pairings_differ_by_a_fixed_permutation():
    x = torch.randn(5, 8, generator=gen(2), dtype=f64)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])                  # half-split index of each pair slot
    inter = rope.apply_rope(x[:, perm], torch.arange(5), pairing="interleaved")
    half = rope.apply_rope(x, torch.arange(5), pairing="half")
    assert torch.allclose(inter, half[:, perm], atol=1e-14)


def test_partial_rotary_dim_and_frequencies():
    x = torch.randn(4, 10, generator=gen(3), dtype=f64)
    y = rope.apply_rope(x, torch.arange(4), rotary_dim=6)
    assert torch.equal(y[:, 6:], x[:, 6:])
    assert torch.allclose(y[:, :6], rope.apply_rope(x[:, :6], torch.arange(4)), atol=1e-15)
    th = rope.rope_frequencies(8, 10000.0)
    assert torch.allclose(th, torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=f64))   # 10⁴^(−2k/8)


def test_angles_are_computed_in_float32_for_bf16_inputs():
    x = torch.randn(1, 64, generator=gen(4))
    pos = torch.tensor([30000])
    exact = rope.apply_rope(x.double(), pos).float()
    got = rope.apply_rope(x.bfloat16(), pos).float()
    # naive: angles formed in bf16 lose the low bits of 30000·θ
    theta = rope.rope_frequencies(64, dtype=torch.bfloat16)
    ang = (pos.bfloat16()[:, None] * theta)
    a, b = x[:, 0::2], x[:, 1::2]
    naive = torch.stack((a * ang.float().cos() - b * ang.float().sin(),
                         a * ang.float().sin() + b * ang.float().cos()), -1).flatten(-2)
    assert (got - exact).abs().max() < 0.05
    assert (naive - exact).abs().max() > 0.5


def test_2d_axial_rope_is_relative_in_both_axes_and_norm_preserving():
    g = gen(5)
    q, k = torch.randn(1, 16, generator=g, dtype=f64), torch.randn(1, 16, generator=g, dtype=f64)
    def score(pq, pk):
        return float((rope.apply_rope_2d(q, torch.tensor([pq]))
                      * rope.apply_rope_2d(k, torch.tensor([pk]))).sum())
    assert math.isclose(score((1, 2), (4, 0)), score((6, 9), (9, 7)), rel_tol=1e-10)
    assert not math.isclose(score((1, 2), (4, 0)), score((1, 2), (0, 4)), rel_tol=1e-3)  # axes differ
    x = torch.randn(12, 16, generator=g, dtype=f64)
    pos = torch.stack(torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij"), -1).reshape(12, 2)
    assert torch.allclose(rope.apply_rope_2d(x, pos).norm(dim=-1), x.norm(dim=-1), atol=1e-12)
    # axial: the first half rotated by the row, the second by the column, each with d/2 frequencies
    y = rope.apply_rope_2d(x, pos, base=100.0, pairing="half")
    assert torch.equal(y[:, :8], rope.apply_rope(x[:, :8], pos[:, 0], 100.0, "half"))
    assert torch.equal(y[:, 8:], rope.apply_rope(x[:, 8:], pos[:, 1], 100.0, "half"))
    assert list(inspect.signature(rope.apply_rope_2d).parameters) == ["x", "positions_yx", "base", "pairing"]


def test_rope_mixed_is_relative_and_norm_preserving():
    torch.manual_seed(6)
    m = rope.RoPEMixed(8, 2).double()
    q, k = torch.randn(2, 1, 8, dtype=f64), torch.randn(2, 1, 8, dtype=f64)
    def score(pq, pk):
        return (m(q, torch.tensor([pq])) * m(k, torch.tensor([pk]))).sum(-1).squeeze(-1)
    assert torch.allclose(score((1, 2), (4, 0)), score((5, 5), (8, 3)), atol=1e-12)
    x = torch.randn(2, 3, 8, dtype=f64)
    pos = torch.tensor([[0, 0], [1, 2], [3, 1]])
    assert torch.allclose(m(x, pos).norm(dim=-1), x.norm(dim=-1), atol=1e-12)


def test_sinusoidal_tables():
    pe = rope.sinusoidal_pe(20, 8, dtype=f64)
    assert math.isclose(float(pe[3, 2]), math.sin(3 * 10000 ** (-2 / 8)), rel_tol=1e-12)
    assert math.isclose(float(pe[3, 3]), math.cos(3 * 10000 ** (-2 / 8)), rel_tol=1e-12)
    G = pe @ pe.T                                                   # pᵢ·pⱼ = Σₖ cos((i−j)ωₖ): Toeplitz
    assert torch.allclose(G[1:, 1:], G[:-1, :-1], atol=1e-12)
    cat = rope.sinusoidal_pe(20, 8, layout="concat", dtype=f64)
    assert torch.allclose(cat[:, :4], pe[:, 0::2]) and torch.allclose(cat[:, 4:], pe[:, 1::2])
    pe2 = rope.sinusoidal_pe_2d(3, 4, 8)
    assert pe2.shape == (12, 8) and torch.allclose(pe2[5, :4], rope.sinusoidal_pe(3, 4)[1])


def test_alibi_and_t5_biases_are_toeplitz():
    for sched in rope.ALIBI_SCHEDULES:
        B = rope.alibi_bias(9, rope.alibi_slopes(4, sched))
        assert torch.equal(B[:, 1:, 1:], B[:, :-1, :-1]) and torch.equal(B, B.transpose(1, 2))
    assert torch.allclose(rope.alibi_slopes(8), torch.tensor([2.0 ** -(h + 1) for h in range(8)], dtype=f64))
    assert torch.allclose(rope.alibi_slopes(4, "exp"), torch.exp(-torch.arange(4) / 4.0).double())
    Bc = rope.alibi_bias(5, rope.alibi_slopes(2), causal=True)
    assert torch.isinf(Bc[:, 0, 1:]).all() and math.isclose(float(Bc[0, 3, 1]), -2 * 2.0 ** -4)  # m₀ = 2^(−8·1/2)
    for nb in (None, 8):
        t5 = rope.T5RelativeBias(3, 12, num_buckets=nb)
        B = t5(12).detach()
        assert B.shape == (3, 12, 12) and torch.equal(B[:, 1:, 1:], B[:, :-1, :-1])
    # one scalar per offset when unbucketed: all 23 offsets distinct
    assert len(set(rope.T5RelativeBias(1, 12)(12)[0].detach().flatten().tolist())) == 23


def test_bad_input():
    x = torch.randn(4, 8)
    for fn, msg in (
        (lambda: rope.apply_rope(x, torch.arange(4), pairing="zigzag"), "unknown RoPE pairing"),
        (lambda: rope.apply_rope(torch.randn(4, 7), torch.arange(4)), "rotary_dim must be even"),
        (lambda: rope.apply_rope(x, torch.arange(5)), "do not fit"),
        (lambda: rope.rope_frequencies(8, -1.0), "positive finite"),
        (lambda: rope.apply_rope_2d(torch.randn(4, 6), torch.zeros(4, 2)), "divisible by 4"),
        (lambda: rope.apply_rope_2d(x, torch.zeros(3, 2)), "shape"),
        (lambda: rope.alibi_slopes(4, "linear"), "unknown ALiBi schedule"),
        (lambda: rope.sinusoidal_pe(4, 7), "even d"),
        (lambda: rope.LearnedPE(4, 8)(5), "longer than"),
        (lambda: rope.T5RelativeBias(2, 4)(5), "longer than"),
    ):
        with pytest.raises(ValueError, match=msg):
            fn()


def test_demo_draws_the_encodings(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "fig" / "rope.png"
    assert rope.main(["--dim", "8", "--n", "6", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert rope.main(["--dim", "6", "--out", str(out)]) == 2               # not a multiple of 4


def test_alibi_slopes_follow_press_et_al_for_every_head_count():
    # powers of two: the plain ladder 2^(−8(h+1)/H)
    for H in (1, 2, 4, 8, 16):
        assert torch.equal(rope.alibi_slopes(H), 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=f64) / H))
    # H = 6: the ladder of 4 (2⁻², 2⁻⁴, 2⁻⁶, 2⁻⁸), then every other rung of the ladder of 8 (2⁻¹, 2⁻³)
    assert rope.alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    # H = 10 (the wikitext103 preset): ladder of 8, then 2^(−1/2), 2^(−3/2) from the ladder of 16
    want = [2.0 ** -(k + 1) for k in range(8)] + [2.0 ** -0.5, 2.0 ** -1.5]
    assert torch.allclose(rope.alibi_slopes(10), torch.tensor(want, dtype=f64), rtol=0, atol=1e-15)
    # every head count: H distinct slopes in (0, 1)
    for H in range(1, 41):
        m = rope.alibi_slopes(H)
        assert m.shape == (H,) and len(set(m.tolist())) == H and bool(((m > 0) & (m < 1)).all())


@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_rope_mixed_starts_rank_2_with_heo_et_als_magnitudes(head_dim):
    """Heo et al.'s initialisation: per head the first half of the pairs points along a random
    angle α, the second along α + π/2 — two orthogonal directions (rank 2), each with the ladder
    10^(−4j/d_h). (It used to be one direction per head: rank 1, one axis invisible at init.)"""
    m = rope.RoPEMixed(head_dim, 3, generator=torch.Generator().manual_seed(0))
    P = head_dim // 2
    ladder = 10.0 ** (-4.0 * torch.arange(P // 2, dtype=torch.float64) / head_dim)
    for h in range(3):
        F = m.freqs[:, h, :].detach().double().T                     # (pairs, 2): (θʸ, θˣ) per pair
        assert torch.linalg.matrix_rank(F) == 2
        a, b = F[: P // 2], F[P // 2:]
        assert torch.allclose(a.norm(dim=1), ladder, rtol=1e-6) and torch.allclose(b.norm(dim=1), ladder, rtol=1e-6)
        u, v = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        assert torch.allclose(u, u[:1].expand_as(u), atol=1e-6)      # one direction per half
        assert abs(float(u[0] @ v[0])) < 1e-6                        # the two are orthogonal


def test_apply_rope_refuses_an_integer_tensor():
    with pytest.raises(ValueError, match="floating-point"):
        rope.apply_rope(torch.ones(4, 2, dtype=torch.long), torch.arange(4))
