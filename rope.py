"""Positional encodings, one place for all of them.

Every encoding in this project lives here, written so that its maths can be read beside the line
that computes it. Conventions (docs/conventions.md): tokens are rows, ``x`` has shape ``(..., n, d)``.

Absolute encodings (added to the token embeddings once, at the input)
    sinusoidal   p_{t,2k} = sin(t ω_k),  p_{t,2k+1} = cos(t ω_k),  ω_k = base^(-2k/d)   (Vaswani et al.)
    learned      p_t = a free parameter row per position
    sinusoidal 2-D   half the features encode the row, half the column (ViT-style)

Rotary encoding (multiplies queries and keys inside every attention layer)
    Pair the features into 2-vectors and rotate pair k of a token at position t by the angle t θ_k,
    θ_k = base^(-2k/d_rot). With R(t) the block-diagonal rotation, a row vector is rotated as
    x ↦ x R(t)ᵀ, and because rotations compose, R(i)ᵀ R(j) = R(j − i):

        (x_i Q R(i)ᵀ) · (x_j K R(j)ᵀ) = x_i Q R(i)ᵀ R(j) Kᵀ x_jᵀ = x_i Q R(j − i) Kᵀ x_jᵀ,

    so the logit depends on positions only through the offset j − i (docs/conventions.md: W + ΔW_ij).

    Pairing convention — two are in use and they are NOT interchangeable for a given checkpoint:
      * "interleaved" (RoFormer, GPT-J, llama.cpp/GGUF, the Spectral paper's code):
            pairs are features (2k, 2k+1).                               ← this project's default
      * "half" (GPT-NeoX, Hugging Face Llama): pairs are (k, k + d_rot/2).
    Both rotate by the same angles; they differ by a fixed permutation of the features.

    2-D RoPE for image patches at (row r, column c):
      * axial: the first half of the features is rotated by r, the second half by c
        (each half with its own frequency ladder) — the logit depends on (Δr, Δc);
      * mixed (Heo et al. 2024, "Rotary Position Embedding for Vision Transformer"): pair k of head h
        is rotated by the angle r θ^y_{h,k} + c θ^x_{h,k} with learnable frequencies; still relative,
        and the frequencies can mix the two axes.

Relative biases (added to the logits, position only, content-blind)
    ALiBi   B_ij = −m_h |i − j|  (bidirectional),  B_ij = −m_h (i − j) for j ≤ i (causal)
            slopes: "geometric" m_h = 2^(−8(h+1)/H) (Press et al. 2022), or "exp" m_h = e^(−h/H)
            (what the Spectral paper's code uses; docs/spectral.md §2).
    T5      B_ij = b_h[bucket(j − i)] with learned scalars; with no buckets, one scalar per offset
            (the Spectral paper's code), with buckets T5's log-spaced buckets (Raffel et al. 2020).
    Both are Toeplitz: B_ij depends only on j − i.

Angles are always computed in float32 or better (float64 when x is float64): position × frequency
in bf16 would lose the low bits of the angle for long sequences.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import torch
import torch.nn as nn

PAIRINGS = ("interleaved", "half")
ALIBI_SCHEDULES = ("geometric", "exp")


def _broadcasts(small: tuple, big: tuple) -> bool:
    """True when shape `small` broadcasts against `big` (plain Python: this runs every forward)."""
    return len(small) <= len(big) and all(a in (1, b) or b == 1 for a, b in zip(small[::-1], big[::-1]))


def _angle_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 stays float64; anything lower (float32, bf16, fp16) gets float32 angles.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------------------
# 1-D rotary encoding
# ------------------------------------------------------------------------------------------------
def rope_frequencies(dim: int, base: float = 10000.0, device=None,
                     dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """θ_k = base^(−2k/dim) for k = 0 … dim/2 − 1 (RoFormer eq. 15)."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"rotary dimension must be a positive even number, got {dim}.")
    if not (base > 0 and math.isfinite(base)):
        raise ValueError(f"rotary base must be a positive finite number, got {base}.")
    k = torch.arange(dim // 2, device=device, dtype=torch.float64)
    # θ_k = base^(−2k/dim)
    return (base ** (-2.0 * k / dim)).to(dtype)


def _complex_view_ok(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """True when the pairs (2k, 2k+1) of x can be read as complex numbers in place and the complex
    product is the quicker form: eager CPU, float32/float64 throughout (no complex bf16 exists), x's
    features adjacent (stride 1) and every other stride and the offset even (torch.view_as_complex).
    On CUDA the real form below is kept: torch.compile fuses it into one kernel, and Inductor has no
    complex code generation (it would fall back to eager kernels)."""
    return (x.device.type == "cpu" and not torch.compiler.is_compiling()
            and x.dtype in (torch.float32, torch.float64) and cos.dtype == x.dtype and sin.dtype == x.dtype
            and x.dim() > 0 and x.stride(-1) == 1 and x.storage_offset() % 2 == 0
            and all(s % 2 == 0 for s in x.stride()[:-1]))


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate each feature pair (a, b) of x to (a cos − b sin, a sin + b cos)."""
    if pairing == "interleaved" and _complex_view_ok(x, cos, sin):
        # CPU: the pair (a, b) is the complex number a + ib, and the rotation one complex product,
        # (a + ib)(cos + i sin) = (a cos − b sin) + i(a sin + b cos): one kernel forward and one
        # backward instead of seven on strided halves (equal to round-off, not always bit for bit)
        z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2)
    if pairing == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]                     # pairs (2k, 2k+1)
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
        return out.flatten(-2)
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]                             # pairs (k, k + d/2)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)


def apply_rope(x: torch.Tensor, positions, base: float = 10000.0, pairing: str = "interleaved",
               rotary_dim: int | None = None) -> torch.Tensor:
    """Rotate the last dimension's feature pairs of ``x`` by ``positions × θ``.

    x: (..., n, d). positions: anything that broadcasts against x.shape[:-1] (usually (n,)).
    rotary_dim: rotate only the first ``rotary_dim`` features (partial RoPE); the rest pass through.
    Returns x R(t)ᵀ for each token's position t (see the module docstring); norms are preserved.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}; choose one of {PAIRINGS}.")
    if not x.is_floating_point():
        raise ValueError(f"apply_rope needs a floating-point x (a rotation of integers is not an integer), "
                         f"got {x.dtype}.")
    d = x.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    if rd <= 0 or rd % 2 or rd > d:
        raise ValueError(f"rotary_dim must be even and in [2, {d}], got {rd}.")
    pos = torch.as_tensor(positions, device=x.device)
    theta = rope_frequencies(rd, base, device=x.device, dtype=_angle_dtype(x))
    if not _broadcasts(tuple(pos.shape), tuple(x.shape[:-1])):
        raise ValueError(f"positions of shape {tuple(pos.shape)} do not fit x of shape {tuple(x.shape)}.")
    return rotate(x, *_cos_sin(pos, theta, x.dtype), pairing)


def _cos_sin(pos: torch.Tensor, theta: torch.Tensor, dtype: torch.dtype):
    """cos and sin of angle_{t,k} = t θ_k, (..., len(θ)) each: computed in θ's dtype (float32 or
    float64, see _angle_dtype), then cast to `dtype`."""
    ang = pos.to(theta.dtype).unsqueeze(-1) * theta
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope_table(n: int, rotary_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of the angles t θ_k for the positions t = 0 … n − 1, (n, rotary_dim/2) each, for an
    x of `dtype`: the very table apply_rope(x, torch.arange(n), base) builds, so that
    rotate(x, *rope_table(n, d, base, x.dtype, x.device)) == apply_rope(x, torch.arange(n), base).

    Built once per (n, rotary_dim, base, dtype, device) and then shared (an attention layer rotates
    the same positions 0 … n − 1 at every step): read it, never write into it. Not cached inside
    torch.compile (the table is then part of the compiled graph) nor under inference mode (a table
    made there could not be saved for a later backward)."""
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return _rope_table(n, rotary_dim, float(base), dtype, torch.device(device or "cpu"))
    return _rope_table_cached(n, rotary_dim, float(base), dtype, torch.device(device or "cpu"))


def _rope_table(n: int, rotary_dim: int, base: float, dtype: torch.dtype, device: torch.device):
    # θ_k in float32 (float64 for float64 x), angles t θ_k for t = 0 … n − 1, as in apply_rope
    adt = torch.float64 if dtype == torch.float64 else torch.float32
    theta = rope_frequencies(rotary_dim, base, device=device, dtype=adt)
    return _cos_sin(torch.arange(n, device=device), theta, dtype)


_rope_table_cached = functools.lru_cache(maxsize=64)(_rope_table)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str = "interleaved") -> torch.Tensor:
    """apply_rope with the angles' cos and sin given, (..., rotary_dim/2) each: the first rotary_dim
    features of x are rotated, the rest pass through. For a caller that rotates the same positions
    many times (the ODE field, evaluated thousands of times; an attention layer at every step) and
    computes the table once (rope_table for the positions 0 … n − 1)."""
    rd = 2 * cos.shape[-1]
    if rd == x.shape[-1]:
        return _rotate_pairs(x, cos, sin, pairing)
    return torch.cat((_rotate_pairs(x[..., :rd], cos, sin, pairing), x[..., rd:]), dim=-1)


def rotation_matrix(position: float, dim: int, base: float = 10000.0, pairing: str = "interleaved",
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The explicit (dim, dim) rotation R(t) with apply_rope(x, t) == x @ R(t).T.

    Block diagonal (after the pairing's permutation) with 2×2 blocks [[cos tθ_k, −sin tθ_k],
    [sin tθ_k, cos tθ_k]]. Used by tests and by regimes.py for W + ΔW(offset) = Q R(offset) Kᵀ.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown RoPE pairing {pairing!r}; choose one of {PAIRINGS}.")
    theta = rope_frequencies(dim, base, dtype=torch.float64)
    R = torch.zeros(dim, dim, dtype=torch.float64)
    for k, th in enumerate(theta.tolist()):
        c, s = math.cos(position * th), math.sin(position * th)
        a, b = (2 * k, 2 * k + 1) if pairing == "interleaved" else (k, k + dim // 2)
        # new_a = a cos − b sin ; new_b = a sin + b cos   (column form: R @ [a, b])
        R[a, a], R[a, b], R[b, a], R[b, b] = c, -s, s, c
    return R.to(dtype)


# ------------------------------------------------------------------------------------------------
# 2-D rotary encodings for image patches
# ------------------------------------------------------------------------------------------------
def apply_rope_2d(x: torch.Tensor, positions_yx, base: float = 100.0,
                  pairing: str = "interleaved") -> torch.Tensor:
    """Axial 2-D RoPE: first half of the features rotated by the row, second half by the column.

    positions_yx: (n, 2) integer or float (row, col) of each of the n tokens of x (..., n, d).
    Logit between patches (r, c) and (r', c') then depends only on (r' − r, c' − c).
    For the mixed variant (learnable frequencies) use RoPEMixed.
    """
    d = x.shape[-1]
    if d % 4:
        raise ValueError(f"axial 2-D RoPE needs a feature size divisible by 4, got {d}.")
    pos = torch.as_tensor(positions_yx, device=x.device)
    if pos.ndim != 2 or pos.shape[-1] != 2 or pos.shape[0] != x.shape[-2]:
        raise ValueError(f"positions_yx must have shape (n, 2) = ({x.shape[-2]}, 2), got {tuple(pos.shape)}.")
    h = d // 2
    # x = [x_row | x_col];  x_row rotated by r θ, x_col by c θ (θ over d/2 features each)
    xr = apply_rope(x[..., :h], pos[:, 0], base, pairing)
    xc = apply_rope(x[..., h:], pos[:, 1], base, pairing)
    return torch.cat((xr, xc), dim=-1)


class RoPEMixed(nn.Module):
    """RoPE-Mixed (Heo et al. 2024): learnable 2-D frequencies per head.

    Pair k of head h (interleaved pairing) at patch (r, c) is rotated by
        φ_{h,k}(r, c) = r θ^y_{h,k} + c θ^x_{h,k}.
    The logit between (r, c) and (r', c') depends only on (r' − r, c' − c) for any frequencies,
    because φ is linear in the position. Initialisation as Heo et al.'s: per head a random angle
    α_h; the first half of the pairs points along (cos α_h, sin α_h), the second half along the
    orthogonal direction α_h + π/2 (rank 2: the head sees both axes from the start), each half with
    the magnitude ladder |θ_j| = base^(−4j/d_h), j = 0, 1, … (base 10: 10^(−4j/d_h)).
    """

    def __init__(self, head_dim: int, n_heads: int, base: float = 10.0, generator=None):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE-Mixed needs an even head dimension, got {head_dim}.")
        P = head_dim // 2                                                      # pairs per head
        first, second = (P + 1) // 2, P // 2                                   # pairs along α, α + π/2
        ladder = lambda m: base ** (-4.0 * torch.arange(m, dtype=torch.float64) / head_dim)  # noqa: E731
        mag = torch.cat((ladder(first), ladder(second))).float()               # (d_h/2,)
        alpha = torch.rand(n_heads, 1, generator=generator) * 2 * math.pi      # per-head angle
        turn = torch.cat((torch.zeros(first), torch.full((second,), math.pi / 2)))
        direction = alpha + turn                                               # (n_heads, d_h/2)
        # θ^y = |θ| sin(direction), θ^x = |θ| cos(direction); learnable from there on
        self.freqs = nn.Parameter(torch.stack((mag * torch.sin(direction), mag * torch.cos(direction)), 0))
        # freqs: (2, n_heads, d_h/2)

    def forward(self, x: torch.Tensor, positions_yx) -> torch.Tensor:
        """x: (..., n_heads, n, head_dim); positions_yx: (n, 2)."""
        adt = _angle_dtype(x)                                                  # float32 or better
        pos = torch.as_tensor(positions_yx, device=x.device).to(adt)
        if pos.ndim != 2 or pos.shape[-1] != 2 or pos.shape[0] != x.shape[-2]:
            raise ValueError(f"positions_yx must have shape ({x.shape[-2]}, 2), got {tuple(pos.shape)}.")
        f = self.freqs.to(adt)
        # φ_{h,t,k} = r_t θ^y_{h,k} + c_t θ^x_{h,k}     → (n_heads, n, d_h/2)
        ang = pos[None, :, 0:1] * f[0][:, None, :] + pos[None, :, 1:2] * f[1][:, None, :]
        return _rotate_pairs(x, ang.cos().to(x.dtype), ang.sin().to(x.dtype), "interleaved")


# ------------------------------------------------------------------------------------------------
# Absolute encodings
# ------------------------------------------------------------------------------------------------
def sinusoidal_pe(n: int, d: int, base: float = 10000.0, layout: str = "interleaved",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Vaswani et al.'s table, (n, d): p_{t,2k} = sin(t ω_k), p_{t,2k+1} = cos(t ω_k), ω_k = base^(−2k/d).

    layout="concat" puts all sines first, then all cosines ([sin | cos]).
    """
    if n <= 0 or d <= 0 or d % 2:
        raise ValueError(f"sinusoidal_pe needs n > 0 and an even d > 0, got n={n}, d={d}.")
    if layout not in ("interleaved", "concat"):
        raise ValueError(f"unknown sinusoidal layout {layout!r}; choose 'interleaved' or 'concat'.")
    omega = rope_frequencies(d, base, dtype=torch.float64)
    # angle_{t,k} = t ω_k
    ang = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]
    if layout == "interleaved":
        pe = torch.stack((ang.sin(), ang.cos()), dim=-1).flatten(-2)
    else:
        pe = torch.cat((ang.sin(), ang.cos()), dim=-1)
    return pe.to(dtype)


def sinusoidal_pe_2d(h: int, w: int, d: int, base: float = 10000.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D sin-cos table for an h × w patch grid, (h·w, d): [sin-cos(row) | sin-cos(col)], row-major."""
    if d % 4:
        raise ValueError(f"2-D sinusoidal PE needs d divisible by 4, got {d}.")
    pr = sinusoidal_pe(h, d // 2, base, dtype=dtype)                  # (h, d/2)
    pc = sinusoidal_pe(w, d // 2, base, dtype=dtype)                  # (w, d/2)
    return torch.cat((pr[:, None, :].expand(h, w, d // 2), pc[None, :, :].expand(h, w, d // 2)),
                     dim=-1).reshape(h * w, d)


class LearnedPE(nn.Module):
    """Learned absolute positions: p_t is row t of a (n_max, d) table, N(0, init_std²) at start."""

    def __init__(self, n_max: int, d: int, init_std: float = 0.02):
        super().__init__()
        if n_max <= 0 or d <= 0:
            raise ValueError(f"LearnedPE needs n_max > 0 and d > 0, got {n_max}, {d}.")
        self.weight = nn.Parameter(torch.randn(n_max, d) * init_std)

    def forward(self, n: int) -> torch.Tensor:
        if n > self.weight.shape[0]:
            raise ValueError(f"sequence of length {n} is longer than the {self.weight.shape[0]} "
                             "learned positions.")
        return self.weight[:n]


# ------------------------------------------------------------------------------------------------
# Relative biases on the logits
# ------------------------------------------------------------------------------------------------
def alibi_slopes(n_heads: int, schedule: str = "geometric") -> torch.Tensor:
    """Per-head ALiBi slopes m_h, float64 (n_heads,)."""
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}.")
    h = torch.arange(n_heads, dtype=torch.float64)
    if schedule == "geometric":
        # Press et al.: for H = 2ᵏ the ladder m_h = 2^(−8(h+1)/H), h = 0 … H−1. Otherwise, with
        # P = 2^⌊log₂ H⌋: P's ladder, then the odd rungs of the 2P ladder, 2^(−8(2j+1)/(2P)),
        # for j = 0 … H−P−1 (as their released code and BLOOM's build_alibi_tensor do).
        P = 1 << (n_heads.bit_length() - 1)
        ladder = 2.0 ** (-8.0 * torch.arange(1, P + 1, dtype=torch.float64) / P)
        odd_rungs = 2.0 ** (-8.0 * (2 * torch.arange(n_heads - P, dtype=torch.float64) + 1) / (2 * P))
        return torch.cat([ladder, odd_rungs])
    if schedule == "exp":
        # Spectral paper's code (docs/spectral.md §2): m_h = e^(−h/H)
        return torch.exp(-h / n_heads)
    raise ValueError(f"unknown ALiBi schedule {schedule!r}; choose one of {ALIBI_SCHEDULES}.")


def alibi_bias(n: int, slopes: torch.Tensor, causal: bool = False) -> torch.Tensor:
    """(H, n, n) ALiBi bias. Bidirectional: −m_h |i − j|. Causal: −m_h (i − j) for j ≤ i, −inf above."""
    if n <= 0:
        raise ValueError(f"sequence length must be positive, got {n}.")
    i = torch.arange(n, device=slopes.device)
    off = (i[:, None] - i[None, :]).to(slopes.dtype)                  # i − j
    # B^h_ij = −m_h |i − j|
    bias = -slopes[:, None, None] * off.abs()[None]
    if causal:
        bias = bias.masked_fill((off < 0)[None], float("-inf"))      # j > i is never attended
    return bias


class T5RelativeBias(nn.Module):
    """Learned Toeplitz bias B^h_ij = b_h[bucket(j − i)], (H, n, n).

    num_buckets=None: one scalar per offset j − i ∈ [−(max_len−1), max_len−1], N(0, 0.02²) init
    (the Spectral paper's code). Otherwise T5's bidirectional buckets: half the buckets per sign,
    exact for small |offset|, log-spaced up to max_distance.
    """

    def __init__(self, n_heads: int, max_len: int, num_buckets: int | None = None,
                 max_distance: int = 128):
        super().__init__()
        if n_heads <= 0 or max_len <= 0:
            raise ValueError(f"T5RelativeBias needs n_heads > 0 and max_len > 0, got {n_heads}, {max_len}.")
        if num_buckets is not None and (num_buckets < 4 or num_buckets % 2):
            raise ValueError(f"num_buckets must be an even number >= 4, got {num_buckets}.")
        self.n_heads, self.max_len = n_heads, max_len
        self.num_buckets, self.max_distance = num_buckets, max_distance
        size = 2 * max_len - 1 if num_buckets is None else num_buckets
        self.table = nn.Parameter(torch.randn(size, n_heads) * 0.02)

    def bucket(self, offset: torch.Tensor) -> torch.Tensor:
        """Index into the table for each offset j − i."""
        if self.num_buckets is None:
            return offset + self.max_len - 1
        half = self.num_buckets // 2
        sign_part = (offset > 0).long() * half                         # positive offsets: upper half
        a = offset.abs()
        exact = half // 2
        # log-spaced buckets beyond `exact`: exact + log(a/exact)/log(max_dist/exact) · (half − exact)
        large = exact + (torch.log(a.clamp(min=1).double() / exact)
                         / math.log(self.max_distance / exact) * (half - exact)).long()
        large = large.clamp(max=half - 1)
        return sign_part + torch.where(a < exact, a, large)

    def forward(self, n: int) -> torch.Tensor:
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} is longer than the bias table's {self.max_len}.")
        i = torch.arange(n, device=self.table.device)
        idx = self.bucket(i[None, :] - i[:, None])                     # offset j − i
        return self.table[idx].permute(2, 0, 1)                        # (H, n, n)


# ------------------------------------------------------------------------------------------------
# A small demonstration: `python rope.py`
# ------------------------------------------------------------------------------------------------
class _ArgParser(argparse.ArgumentParser):
    """argparse whose errors are a ValueError (one sentence) instead of its usage block: what
    training.ArgParser does for the other scripts. rope.py is the bottom layer of the import order
    (tests/test_imports.py: rope → regimes → ode_attention → training), so it cannot import it."""

    def error(self, message):
        raise ValueError(message)


def _machine_memory() -> int:
    """Bytes of RAM (0: unknown), as training.device_memory reports it for the CPU."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def demo_memory_lower_bound(n: int, dim: int) -> int:
    """Bytes the demo needs at the very least: the 8-head ALiBi bias it draws is an (8, n, n)
    float64 array (64 n² bytes), the T5 bias an (n, n) table of float32 values gathered with (n, n)
    int64 bucket indices (12 n² bytes), the sinusoidal table n × dim float32 (4 n dim bytes)."""
    return 76 * n * n + 4 * n * dim


def main(argv=None) -> int:
    """`python rope.py`: draw the encodings. Bad input (a bad flag, a size the machine cannot
    hold) or an unwritable --out is one sentence on stderr and exit code 2, like training.run_cli."""
    p = _ArgParser(description="Draw the positional encodings: RoPE scores vs offset, "
                   "the sinusoidal table, ALiBi and T5 biases.")
    p.add_argument("--dim", type=int, default=64, help="feature size (even)")
    p.add_argument("--n", type=int, default=64, help="sequence length")
    p.add_argument("--base", type=float, default=10000.0, help="RoPE / sinusoid base")
    p.add_argument("--out", default="out/rope.png", help="figure path")
    try:
        a = p.parse_args(argv)
        if a.dim <= 0 or a.dim % 4 or a.n <= 1:
            raise ValueError(f"--dim must be a positive multiple of 4 and --n > 1 (got {a.dim}, {a.n}).")
        need, have = demo_memory_lower_bound(a.n, a.dim), _machine_memory()
        if have and need > have:
            raise ValueError(f"--n {a.n} needs at least {need / 2 ** 30:,.1f} GiB but this machine has "
                             f"{have / 2 ** 30:,.1f} GiB: lower --n")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        g = torch.Generator().manual_seed(0)
        q = torch.randn(a.dim, generator=g, dtype=torch.float64)
        offs = torch.arange(a.n)
        # score(m) = q R(0)ᵀ · (q R(m)ᵀ): RoPE's relative-offset kernel for a fixed vector
        scores = (apply_rope(q.expand(1, -1), torch.zeros(1), a.base)
                  * apply_rope(q.expand(a.n, -1), offs, a.base)).sum(-1)
        fig, ax = plt.subplots(1, 4, figsize=(16, 3.6))
        ax[0].plot(offs.numpy(), scores.numpy())
        ax[0].set(title="RoPE: q·R(m)q against offset m", xlabel="offset m")
        ax[1].imshow(sinusoidal_pe(a.n, a.dim).numpy(), aspect="auto", cmap="RdBu")
        ax[1].set(title="sinusoidal PE (n × d)", xlabel="feature", ylabel="position")
        ax[2].imshow(alibi_bias(a.n, alibi_slopes(8))[0].numpy(), cmap="viridis")
        ax[2].set(title="ALiBi bias, head 0")
        ax[3].imshow(T5RelativeBias(1, a.n, num_buckets=32)(a.n)[0].detach().numpy(), cmap="viridis")
        ax[3].set(title="T5 bias (random init), Toeplitz")
        fig.tight_layout()
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        tmp = a.out + ".tmp.png"
        try:
            fig.savefig(tmp, dpi=110)
            os.replace(tmp, a.out)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        print(f"wrote {a.out}")
        return 0
    except (ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, OSError) and e.strerror:
            msg = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
