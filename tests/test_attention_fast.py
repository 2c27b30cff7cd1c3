"""The attention layer's fast paths (rope.rope_table's cached angles, the complex-product rotation on
CPU, no concatenation when nothing is left unrotated) against an independent, plainly written
float64 computation: explicit rotation matrices, explicit logits with the λ-term added as
λ xᵢ⁽ʰ⁾·xⱼ⁽ʰ⁾, an explicit softmax — outputs and the gradients of the input and of every parameter."""

import math

import pytest
import torch

import ode_attention as oa
import rope

f64 = torch.float64
D, H, DH, GRID = 16, 2, 8, 3                   # width, heads, head width, 3 × 3 patch grid


def rotations(att, n, positions):
    """(H, n, d_h, d_h): R⁽ʰ⁾(tᵢ) with qᵢ ↦ qᵢ R⁽ʰ⁾(tᵢ)ᵀ; identity for unrotated heads and prefix tokens."""
    eye = torch.eye(DH, dtype=f64)
    if att.pe == "none" or att.rope_heads == 0:
        return eye.repeat(H, n, 1, 1)
    pos = torch.arange(n) if positions is None else torch.as_tensor(positions)
    n_pre = n - pos.shape[0]
    heads = []
    for h in range(H):
        mats = [eye] * n
        for i in range(n_pre, n if h < att.rope_heads else 0):
            t = pos[i - n_pre]
            if att.pe == "rope":
                mats[i] = rope.rotation_matrix(float(t), DH, att.rope_base, att.rope_pairing)
            elif att.pe == "rope-axial":              # rows rotate the first half, columns the second
                mats[i] = torch.block_diag(rope.rotation_matrix(float(t[0]), DH // 2, att.rope_base, att.rope_pairing),
                                           rope.rotation_matrix(float(t[1]), DH // 2, att.rope_base, att.rope_pairing))
            else:                                      # RoPE-Mixed: pair k turns by r θʸₕₖ + c θˣₕₖ
                f = att.rope_mixed.freqs.double()
                phi = float(t[0]) * f[0, h] + float(t[1]) * f[1, h]
                mats[i] = torch.block_diag(*[torch.stack((torch.stack((c, -s)), torch.stack((s, c))))
                                             for c, s in zip(torch.cos(phi), torch.sin(phi))])
        heads.append(torch.stack(mats))
    return torch.stack(heads)


def reference(att, x, positions=None, attn_bias=None, key_padding_mask=None, head_mask=None):
    """Attention written out head by head, float64, differentiable in x and in att's parameters."""
    B, n, _ = x.shape
    Q, K, V, O = (None if m is None else m.double() for m in att.qkv_matrices())
    b = att.qkv.bias.double() if att.regime == "free" and att.qkv.bias is not None else torch.zeros(3 * D, dtype=f64)
    R = rotations(att, n, positions)
    outs = []
    for h in range(H):
        sl = slice(h * DH, (h + 1) * DH)
        q = x @ Q[:, sl] + b[sl]
        k = x @ K[:, sl] + b[D:][sl]
        v = x @ V[:, sl] + b[2 * D:][sl]
        q = torch.einsum("bie,ife->bif", q, R[h])                            # qᵢ R(i)ᵀ
        k = torch.einsum("bje,jfe->bjf", k, R[h])                            # kⱼ R(j)ᵀ
        S = q @ k.transpose(-1, -2)                                          # qᵢ R(i)ᵀ R(j) kⱼᵀ
        if att.use_lam:
            xh = x[..., sl]
            if att.lam_mode == "identity":
                S = S + att.lam[h].double() * (xh @ xh.transpose(-1, -2))      # + λₕ xᵢ⁽ʰ⁾·xⱼ⁽ʰ⁾
            else:
                lam = torch.nn.functional.softplus(att.lam_phi[h].double())
                S = S + (xh * lam) @ xh.transpose(-1, -2)                    # + Σₑ λₕₑ xᵢₑ xⱼₑ
        S = S / math.sqrt(DH)
        if attn_bias is not None:
            S = S + (attn_bias[h] if attn_bias.dim() == 3 else attn_bias[:, h])
        if key_padding_mask is not None:
            S = S.masked_fill(~key_padding_mask[:, None, :], -math.inf)
        if att.causal:
            S = S.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        E = torch.exp(S - S.amax(-1, keepdim=True))
        y = (E / E.sum(-1, keepdim=True)) @ v                                # softmax(S) v
        outs.append(y if head_mask is None else y * head_mask[h])
    y = torch.cat(outs, -1)
    if O is None:
        return y
    return y @ O + (att.proj.bias.double() if att.proj.bias is not None else 0.0)


def grid_positions():
    r, c = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    return torch.stack((r, c), -1).reshape(-1, 2)


CASES = []
for pe, pos in (("none", None), ("rope", None), ("rope", "shifted"), ("rope", "float"),
                ("rope-axial", "grid"), ("rope-mixed", "grid")):
    for rope_heads, n_pre, pairing in ((None, 0, "interleaved"), (1, 0, "interleaved"), (1, 1, "interleaved"),
                                       (None, 1, "half")):
        if (pe == "none" and (rope_heads or n_pre or pairing == "half")) or (pos is None and n_pre) \
                or (pe == "rope-mixed" and pairing == "half"):
            continue
        for lam, lam_mode in ((0.0, "identity"), (0.4, "identity"), (-0.3, "identity"), (0.2, "softplus-diag")):
            CASES.append(dict(pe=pe, pos=pos, rope_heads=rope_heads, n_pre=n_pre, pairing=pairing,
                              lam=lam, lam_mode=lam_mode))


def build(c, causal, extras, seed, dtype=f64):
    torch.manual_seed(seed)
    att = oa.Attention(D, H, causal=causal, pe=c["pe"], rope_heads=c["rope_heads"], rope_pairing=c["pairing"],
                       rope_base=10000.0 if c["pe"] == "rope" else 100.0, lam=c["lam"], lam_mode=c["lam_mode"],
                       regime=c.get("regime", "free"), bias=True)
    with torch.no_grad():
        for p in att.parameters():                  # every head its own λ, non-zero biases
            p.add_(0.1 * torch.randn(p.shape))
    att = att.to(dtype)
    n = GRID * GRID + c["n_pre"]
    kw = {}
    if c["pos"] == "grid":
        kw["positions"] = grid_positions()
    elif c["pos"] == "shifted":
        kw["positions"] = torch.arange(GRID * GRID) + 5
    elif c["pos"] == "float":
        kw["positions"] = torch.linspace(0.0, 6.5, GRID * GRID, dtype=dtype)
    if "bias" in extras:
        kw["attn_bias"] = 0.5 * torch.randn(H, n, n, dtype=dtype)
    if "bias4" in extras:
        kw["attn_bias"] = 0.5 * torch.randn(2, H, n, n, dtype=dtype)
    if "padding" in extras:
        kw["key_padding_mask"] = torch.ones(2, n, dtype=torch.bool)
        kw["key_padding_mask"][1, -3:] = False
    if "heads" in extras:
        kw["head_mask"] = torch.tensor([0.5, 1.0], dtype=dtype)
    x = torch.randn(2, n, D, dtype=dtype)
    return att, x, kw


def compare(att, x, kw, rtol):
    """Output and gradients (x and every parameter) of att against reference(), relative to their size."""
    w = torch.randn(x.shape[0], x.shape[1], D, dtype=f64)
    params = [p for p in att.parameters()]
    xa = x.clone().requires_grad_()
    y = att(xa, **kw)
    got = [y.double()] + list(torch.autograd.grad((y.double() * w).sum(), [xa] + params, allow_unused=True))
    att64 = att.double() if x.dtype != f64 else att
    kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() and k != "positions" else v)
            for k, v in kw.items()}
    xr = x.double().requires_grad_()
    yr = reference(att64, xr, **kw64)
    want = [yr] + list(torch.autograd.grad((yr * w).sum(), [xr] + list(att64.parameters()), allow_unused=True))
    names = ["y", "x.grad"] + [n for n, _ in att.named_parameters()]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        err = (a.double() - b).abs().max() / b.abs().max().clamp_min(1e-300)
        assert err < rtol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("c", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_attention_and_its_gradients_match_the_written_out_float64_computation(c, causal):
    att, x, kw = build(c, causal, (), seed=len(str(c)) + causal)
    compare(att, x, kw, rtol=1e-12)


@pytest.mark.parametrize("extras", [("bias",), ("bias4",), ("padding",), ("heads",), ("bias", "padding", "heads")])
@pytest.mark.parametrize("c", [CASES[i] for i in (0, 2, 3, 5)] + [c for c in CASES if c["pe"] != "none"][-8:],
                         ids=lambda c: "-".join(str(v) for v in c.values()))
def test_biases_padding_and_head_masks_on_every_path(c, extras):
    att, x, kw = build(c, True, extras, seed=7)
    compare(att, x, kw, rtol=1e-12)


@pytest.mark.parametrize("regime", ["divergent", "intermediate"])
@pytest.mark.parametrize("lam, lam_mode", [(0.0, "identity"), (-0.2, "identity"), (0.1, "softplus-diag")])
def test_constrained_regimes_with_rope_and_lambda(regime, lam, lam_mode):
    c = dict(pe="rope", pos=None, rope_heads=None, n_pre=0, pairing="interleaved", lam=lam, lam_mode=lam_mode,
             regime=regime)
    att, x, kw = build(c, True, (), seed=3)
    compare(att, x, kw, rtol=1e-11)


@pytest.mark.parametrize("c", [c for c in CASES if c["lam"] in (0.0, -0.3, 0.2)][::2],
                         ids=lambda c: "-".join(str(v) for v in c.values()))
def test_float32_layer_is_the_float64_computation_to_float32_round_off(c):
    att, x, kw = build(c, True, ("bias", "heads"), seed=11, dtype=torch.float32)
    compare(att, x, kw, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# rope.rope_table and the complex-product rotation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("pairing", rope.PAIRINGS)
def test_rope_table_is_apply_ropes_table_bit_for_bit_and_built_once(dtype, pairing):
    x = torch.randn(3, 2, 37, 12, dtype=dtype)
    cos, sin = rope.rope_table(37, 12, 500.0, dtype, x.device)
    assert cos.shape == sin.shape == (37, 6) and cos.dtype == sin.dtype == dtype
    assert torch.equal(rope.rotate(x, cos, sin, pairing), rope.apply_rope(x, torch.arange(37), 500.0, pairing))
    again = rope.rope_table(37, 12, 500.0, dtype, x.device)
    assert again[0] is cos and again[1] is sin                                   # cached
    ang = torch.arange(37, dtype=f64)[:, None] * rope.rope_frequencies(12, 500.0)
    assert torch.allclose(cos.double(), ang.cos(), atol=1e-6) and torch.allclose(sin.double(), ang.sin(), atol=1e-6)


def test_a_table_first_made_under_inference_mode_still_trains():
    att = oa.Attention(D, H, pe="rope", rope_base=4321.5, causal=True)          # a base no other test uses
    x = torch.randn(2, 11, D)
    with torch.inference_mode():
        y0 = att(x)
    y = att(x)
    y.sum().backward()                                                          # no inference tensor saved
    assert torch.allclose(y0, y.detach()) and att.qkv.weight.grad is not None


def pair_rotation(x, cos, sin):
    """(a, b) ↦ (a cos − b sin, a sin + b cos) on the pairs (2k, 2k+1), written out."""
    out = torch.empty(torch.broadcast_shapes(x.shape, torch.Size([*cos.shape[:-1], 2 * cos.shape[-1]])), dtype=x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return out


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_complex_rotation_is_the_pair_rotation_for_any_layout_and_its_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 7, 3, 4, 9, generator=g, dtype=dtype)
    cos, sin = torch.randn(7, 1, 1, 4, generator=g, dtype=dtype), torch.randn(7, 1, 1, 4, generator=g, dtype=dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    for x in (base[..., :8],                          # odd strides: the real form
              base[..., 1:9].contiguous(),            # contiguous: the complex product
              base[..., :8].contiguous().transpose(0, 2).transpose(0, 2),
              base[..., :8].contiguous()[:, :, 1:]):  # even strides and offset: the complex product
        assert torch.allclose(rope._rotate_pairs(x, cos, sin, "interleaved"), pair_rotation(x, cos, sin), atol=tol)
    assert rope._complex_view_ok(base[..., 1:9].contiguous(), cos, sin)
    assert not rope._complex_view_ok(base[..., :8], cos, sin)
    x = base[..., :8].contiguous().double().requires_grad_()
    c, s = cos.double().requires_grad_(), sin.double().requires_grad_()
    w = torch.randn(2, 7, 3, 4, 8, generator=g, dtype=f64)
    got = torch.autograd.grad((rope._rotate_pairs(x, c, s, "interleaved") * w).sum(), (x, c, s))
    want = torch.autograd.grad((pair_rotation(x, c, s) * w).sum(), (x, c, s))
    for a, b in zip(got, want):                       # gradients of x and of the angles (RoPE-Mixed)
        assert torch.allclose(a, b, atol=1e-12)


def test_positions_none_and_explicit_arange_agree():
    torch.manual_seed(2)
    for rope_heads in (None, 1):
        att = oa.Attention(D, H, pe="rope", rope_heads=rope_heads, lam=-0.1, causal=True).double()
        x = torch.randn(2, 9, D, dtype=f64)
        assert torch.allclose(att(x), att(x, positions=torch.arange(9)), atol=1e-14)
