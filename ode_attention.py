"""Self-attention as a continuous-time dynamical system of tokens, and the Transformer block.

Conventions (docs/conventions.md): tokens are ROWS, X has shape (..., n, d). The theoretical
single-head field is

    dX/dt = softmax(X Q Kᵀ Xᵀ) X V,        W = Q Kᵀ,   A = W (Vᵀ)⁻¹   (so that A Vᵀ = W)     (F)

with Q, K of shape (d, d_k) and V of shape (d, d). No 1/√d inside the theoretical field (absorb it
into W); the trained blocks below use the usual 1/√d_head. In column form, token i moves as

    ẋᵢ = Σⱼ Pᵢⱼ Vᵀ xⱼ,        Pᵢⱼ = exp(xᵢᵀ W xⱼ) / Σₖ exp(xᵢᵀ W xₖ)                          (F')

(causal models sum over j ≤ i). The identity behind the whole analysis (docs/dynamics.md §1.2):

    xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ A Vᵀ xⱼ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ                                         (I)

For symmetric A the left side is ½ d/dt (xᵢᵀ A xᵢ). Softmax weights are co-monotone with the
logits, so Σⱼ Pᵢⱼ sᵢⱼ ≥ (1/n) Σⱼ sᵢⱼ, and summing over i gives (1/n) Sᵀ W S ≥ 0 when W_sym ⪰ 0
(S = Σⱼ xⱼ). Hence E(t) = Σᵢ xᵢᵀ A xᵢ (`energy`) is non-decreasing when A is symmetric and
W_sym ⪰ 0 (non-causal). With A ≺ 0 that bounds the tokens ("convergent" side); with A ≻ 0 it stops
them collapsing to 0 ("divergent" side). regimes.py turns this into the classification.

Why convergence is slow. Near X = 0 every logit xᵢᵀ W xⱼ → 0 and Pᵢⱼ → 1/n, so (F') becomes
ẋᵢ = Vᵀ x̄ for every i: the MEAN x̄ decays exponentially when Vᵀ is stable, but the DIFFERENCES
δᵢ = xᵢ − x̄ have zero velocity to first order. They decay only through Pᵢⱼ − 1/n ≈ (1/n)(sᵢⱼ − s̄ᵢ),
quadratic in δ, so d‖δ‖/dt ≈ −c ‖δ‖³ and ‖δ‖ ≈ (2ct)^(−1/2): algebraic, not exponential (the mean,
slaved to that cubic forcing, stays far below ‖δ‖). Measured in tests/test_ode_attention.py (64
symmetric instances, d = 4, n = 8, dopri5 to t = 400): log-log slope of the mean token norm over
[50, 400] −0.49 ± 0.02, ‖x̄‖ ≤ 6e−6 ‖X‖; so tests check the guarantees (monotone E, the power law).

Positional encodings in the field
* absolute PE: the token that drives the field is yᵢ = xᵢ + pᵢ (pᵢ fixed), and
  ẋᵢ = Σⱼ Pᵢⱼ(Y) Vᵀ yⱼ — "converges to zero" now means yᵢ → 0, i.e. xᵢ → −pᵢ (shifted equilibrium).
* RoPE: rotate the query row xᵢQ by position i and the key row xⱼK by position j (rope.py); the
  logit becomes xᵢᵀ Q R(j−i) Kᵀ xⱼ = xᵢᵀ (W + ΔWᵢⱼ) xⱼ with ΔWᵢⱼ = Q (R(j−i) − I) Kᵀ.
* λ-term: add λ xᵢᵀ M xⱼ to the logits (M = I, or M = A in the theoretical model): the logit
  matrix becomes W + λM. The seed summary uses λ < 0 ("subtract from the diagonal"); the authors'
  code adds a positive softplus-kept diagonal initialised at 0.05. Both signs are supported.

The simulation demo with its figures is `python -m analysis.simulate` (analysis/simulate.py).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import regimes
import rope as rope_mod

# ================================================================================================
# 1. The vector field
# ================================================================================================
FIELD_OPTIONS = ("causal", "pos", "rope", "rope_base", "rope_pairing", "rope_dim", "lam", "lam_M")


def _check_inputs(X, Q, K, V, *, causal=False, pos=None, rope=False, rope_base=10000.0,
                  rope_pairing="interleaved", rope_dim=None, lam=0.0, lam_M=None, **unknown) -> None:
    """Every check velocity() makes, without computing the field (integrate() calls it once)."""
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; the field accepts {list(FIELD_OPTIONS)}.")
    for name, t in (("X", X), ("Q", Q), ("K", K), ("V", V), ("pos", pos), ("lam_M", lam_M)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}.")
        if t.ndim < 2:
            raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}.")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    n, d = X.shape[-2:]
    if Q.shape[-2] != d or K.shape[-2] != d:
        raise ValueError(f"Q and K must have shape (d, d_k) with d = {d} (the token size); got "
                         f"{tuple(Q.shape)} and {tuple(K.shape)}.")
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(f"Q and K must share d_k; got {tuple(Q.shape)} and {tuple(K.shape)}.")
    for name, t, form, shape in (("V", V, "(d, d)", (d, d)), ("pos", pos, "(n, d)", (n, d)),
                                 ("lam_M", lam_M, "(d, d)", (d, d))):
        if t is not None and t.shape[-2:] != shape:
            raise ValueError(f"{name} must have shape {form} = {shape}, got {tuple(t.shape)}.")
    try:
        torch.broadcast_shapes(X.shape[:-2], Q.shape[:-2], K.shape[:-2], V.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions do not broadcast: X {tuple(X.shape)}, Q {tuple(Q.shape)}, "
                         f"K {tuple(K.shape)}, V {tuple(V.shape)}.") from None
    if rope and Q.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even d_k, got {Q.shape[-1]}.")
    if rope_dim is not None and (isinstance(rope_dim, bool) or not isinstance(rope_dim, int)
                                 or rope_dim <= 0 or rope_dim % 2 or rope_dim > Q.shape[-1]):
        raise ValueError(f"rope_dim must be an even integer in [2, d_k = {Q.shape[-1]}], got {rope_dim!r}.")
    if not (isinstance(rope_base, (int, float)) and math.isfinite(rope_base) and rope_base > 1):
        raise ValueError(f"rope_base must be a finite number > 1, got {rope_base!r}.")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}.")


def velocity(X: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, *,
             causal: bool = False, pos: torch.Tensor | None = None, rope: bool = False,
             rope_base: float = 10000.0, rope_pairing: str = "interleaved", rope_dim: int | None = None,
             lam: float = 0.0, lam_M: torch.Tensor | None = None) -> torch.Tensor:
    """dX/dt of the attention field (F), batched over any leading dimensions.

    X: (n, d) or (..., n, d). Q, K: (d, d_k) or (..., d, d_k); V: (d, d) or (..., d, d) — leading
    dimensions broadcast, so many instances (each with its own Q, K, V) integrate at once.
    causal: sum over j ≤ i only. pos: (n, d) absolute PE added to the driving token.
    rope: rotate xQ and xK by token position (needs even d_k); rope_dim: rotate only the first
    rope_dim features of each (partial RoPE, GPT-NeoX style). lam, lam_M: add λ xᵢᵀ M xⱼ to the
    logits (M = I when lam_M is None). With no options this is exactly softmax(X Q Kᵀ Xᵀ) X V.
    """
    _check_inputs(X, Q, K, V, pos=pos, rope=rope, rope_base=rope_base, rope_dim=rope_dim, lam=lam, lam_M=lam_M)
    return _velocity(X, Q, K, V, causal=causal, pos=pos, rope=rope, rope_base=rope_base,
                     rope_pairing=rope_pairing, rope_dim=rope_dim, lam=lam, lam_M=lam_M)


@functools.lru_cache(maxsize=64)
def _rope_table(n: int, rotary_dim: int, base: float, dtype, device):
    """cos, sin of the angles i θ_k, i < n (rope.apply_rope's table), computed once per shape."""
    ang = torch.arange(n, dtype=torch.float64).unsqueeze(-1) * rope_mod.rope_frequencies(rotary_dim, base)
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


def _velocity(X, Q, K, V, *, causal=False, pos=None, rope=False, rope_base=10000.0,
              rope_pairing="interleaved", rope_dim=None, lam=0.0, lam_M=None):
    """The field itself, inputs already checked (integrate() calls this once per stage)."""
    n = X.shape[-2]
    # yᵢ = xᵢ + pᵢ: absolute PE shifts the token that drives the field (equilibrium at xᵢ = −pᵢ)
    Y = X if pos is None else X + pos
    q = Y @ Q                                                    # qᵢ = yᵢᵀ Q    (..., n, d_k)
    k = Y @ K                                                    # kⱼ = yⱼᵀ K
    if rope:
        cos, sin = _rope_table(n, rope_dim or q.shape[-1], float(rope_base), q.dtype, q.device)
        q = rope_mod.rotate(q, cos, sin, rope_pairing)          # qᵢ R(i)ᵀ
        k = rope_mod.rotate(k, cos, sin, rope_pairing)          # kⱼ R(j)ᵀ
    # sᵢⱼ = qᵢ · kⱼ = yᵢᵀ Q R(j−i) Kᵀ yⱼ  (= yᵢᵀ W yⱼ without RoPE)
    S = q @ k.transpose(-1, -2)
    if lam != 0.0:
        if lam_M is None:
            S = S + lam * (Y @ Y.transpose(-1, -2))              # + λ yᵢᵀ yⱼ
        else:
            S = S + lam * (Y @ lam_M @ Y.transpose(-1, -2))      # + λ yᵢᵀ M yⱼ
    if causal:
        # Pᵢⱼ = 0 for j > i
        S = S.masked_fill(torch.ones(n, n, dtype=torch.bool, device=X.device).triu(1), float("-inf"))
    # Pᵢⱼ = exp(sᵢⱼ − mᵢ) / Σₖ exp(sᵢₖ − mᵢ), mᵢ = maxₖ sᵢₖ  (softmax written out: quicker than
    # torch.softmax on the toy field's tiny rows)
    E = (S - S.amax(-1, keepdim=True)).exp()
    P = E / E.sum(-1, keepdim=True)
    return P @ (Y @ V)                                            # ẋᵢ = Σⱼ Pᵢⱼ yⱼᵀ V  (row form)


@functools.lru_cache(maxsize=16)
def _causal_mask(n: int, device) -> torch.Tensor:
    """(n, n) bool, True above the diagonal (the keys j > i a causal query i may not see)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu(1)


def _prepared_field(Q, K, V, **options):
    """f(t, X) = _velocity(X, Q, K, V, **options), with what does not depend on X computed once:
    the integrators evaluate one field thousands of times. Equal to _velocity to round-off (tested).

    Without RoPE the logits need only W = Q Kᵀ: sᵢⱼ = (yᵢᵀ W) yⱼ, so one product Y [W | V] gives
    both Y W and Y V (two d-wide products instead of three). With RoPE q and k must be rotated
    separately, and one product Y [Q | K | V] gives all three. Absolute PE and the λ-term (never on
    the integrators' hot path) take the plain field."""
    if options.get("pos") is not None or options.get("lam", 0.0) != 0.0:
        return lambda t, X: _velocity(X, Q, K, V, **options)
    causal, rope = options.get("causal", False), options.get("rope", False)
    lead = torch.broadcast_shapes(Q.shape[:-2], K.shape[:-2], V.shape[:-2])
    Q, K, V = (m.expand(*lead, *m.shape[-2:]) for m in (Q, K, V))
    dk, d = Q.shape[-1], V.shape[-1]
    if rope:
        M = torch.cat((Q, K, V), dim=-1)                           # (..., d, 2 d_k + d)
        rd, base = options.get("rope_dim") or dk, float(options.get("rope_base", 10000.0))
        pairing = options.get("rope_pairing", "interleaved")
    else:
        M = torch.cat((Q @ K.transpose(-1, -2), V), dim=-1)        # [W | V], (..., d, 2d)

    def f(t, X):
        n = X.shape[-2]
        mask = _causal_mask(n, X.device) if causal else None
        if not rope:
            return _plain_field_M(X, M, mask)                     # softmax((yᵢᵀ W) yⱼ) Y V
        Z = X @ M
        cos, sin = _rope_table(n, rd, base, X.dtype, X.device)
        q = rope_mod.rotate(Z[..., :dk], cos, sin, pairing)        # qᵢ R(i)ᵀ
        k = rope_mod.rotate(Z[..., dk:2 * dk], cos, sin, pairing)
        S = q @ k.transpose(-1, -2)                               # yᵢᵀ Q R(j−i) Kᵀ yⱼ
        if mask is not None:
            S = S.masked_fill(mask, float("-inf"))
        return torch.softmax(S, dim=-1) @ Z[..., -d:]             # Σⱼ Pᵢⱼ yⱼᵀ V

    return f


class _BatchLastField:
    """The same field for many SMALL instances, the batch as the LAST (innermost) axis.

    For n, d of a few (the agreement tables: n = 8, d = 4) the (B, n, d) layout spends its time in
    batched matmuls of 8 × 4 matrices (~2 µs each, whatever their size) and in softmaxes over rows
    of 8. With the state stored as Xt (n, d, B) every step of the field is an elementwise
    multiply-add over contiguous length-B vectors, and d + d + n of them make the field:

        Z[i, c]  = Σₖ Xt[i, k] M[k, c]              M = [W | V] (d, 2d, B): Z = [X W | X V]
        S[i, j]  = Σₖ Z[i, k] Xt[j, k]              sᵢⱼ = (xᵢᵀ W) xⱼ        (k < d)
        P[i, j]  = exp(S[i, j] − maxⱼ S) / Σⱼ …     (causal: S[i, j] = −∞ for j > i)
        out[i]   = Σⱼ P[i, j] Z[j, d:]              ẋᵢ = Σⱼ Pᵢⱼ yⱼᵀ V

    The work buffers are allocated once per batch size (a fresh multi-MB tensor per call costs page
    faults); the returned tensor is a buffer too, overwritten by the next call, so callers must use
    it before calling again (the lean steppers below do). No PE here: the plain and causal fields
    only, which is what integrate() routes through it (_batch_last_suits decides)."""

    def __init__(self, Q, K, V, causal: bool):
        # per instance M = [Q Kᵀ | V], (B, d, 2d) → (d, 2d, B)
        self.Mt = torch.cat((Q @ K.transpose(-1, -2), V), dim=-1).permute(1, 2, 0).contiguous()
        self.causal, self.buf = causal, None

    def select(self, keep: torch.Tensor) -> "_BatchLastField":
        """The field of the instances kept (bool or index over the current batch)."""
        out = _BatchLastField.__new__(_BatchLastField)
        out.Mt, out.causal, out.buf = self.Mt[..., keep].contiguous(), self.causal, None
        return out

    def __call__(self, t, Xt):
        n, d, B = Xt.shape
        if self.buf is None or self.buf[0].shape != (n, 2 * d, B) or self.buf[0].dtype != Xt.dtype:
            e = dict(dtype=Xt.dtype, device=Xt.device)
            self.buf = (torch.empty(n, 2 * d, B, **e), torch.empty(n, n, B, **e), torch.empty(n, d, B, **e))
            self.mask = _causal_mask(n, Xt.device)[:, :, None]           # (n, n, 1): j > i
        Z, S, out = self.buf
        M = self.Mt
        torch.mul(Xt[:, 0:1], M[0], out=Z)                              # Z = Σₖ Xt[:, k] M[k]
        for k in range(1, d):
            Z.addcmul_(Xt[:, k:k + 1], M[k])
        Zw, Zv = Z[:, :d], Z[:, d:]                                      # X W and X V, (n, d, B)
        torch.mul(Zw[:, None, 0], Xt[None, :, 0], out=S)                 # S[i, j] = Σₖ (XW)[i, k] X[j, k]
        for k in range(1, d):
            S.addcmul_(Zw[:, None, k], Xt[None, :, k])
        if self.causal:
            S.masked_fill_(self.mask, float("-inf"))                     # Pᵢⱼ = 0 for j > i
        S.sub_(S.amax(1, keepdim=True)).exp_()                           # exp(sᵢⱼ − maxⱼ sᵢⱼ)
        S.div_(S.sum(1, keepdim=True))                                   # P, rows summing to 1
        torch.mul(S[:, 0, None], Zv[0][None], out=out)                   # Σⱼ Pᵢⱼ (XV)[j]
        for j in range(1, n):
            out.addcmul_(S[:, j, None], Zv[j][None])
        return out


def _plain_field(options: dict) -> bool:
    """The field options leave the plain (or causal) field: no absolute PE, no RoPE, no λ-term."""
    return options.get("pos") is None and not options.get("rope", False) and options.get("lam", 0.0) == 0.0


def _batch_last_suits(n: int, d: int, B: int, options: dict) -> bool:
    """Route a fixed-step integration through _BatchLastField? Only for the plain / causal field
    and small instances, where it was measured faster. The field alone (one thread, float64, vs
    _prepared_field): n = 8, d = 4: 3.2×; n = 8, d = 16: 1.1×; n = 128, d = 16: 0.44×; d = 64:
    0.2–0.6× (a batched matmul wins once the matrices are not tiny). Whole RK4 runs of integrate()
    (`python -m analysis.bench --scaling`, 2 threads, quiet machine), batch-last / batch-first at
    n = 8, d = 4: 1.09× (B = 10²), 1.48× (10³), 1.94× (10⁴), 1.28× (10⁵); n = 32, d = 4: 0.72×.
    Hence n ≤ 16, d ≤ 8, and B ≥ 64 (the batch is the vector length)."""
    return _plain_field(options) and d <= 8 and n <= 16 and B >= 64


def _euler_lean(f, x, h, y):
    """x + h f(x), written into the buffer y (x itself is untouched)."""
    return torch.add(x, f(0.0, x), alpha=h, out=y)


def _rk4_lean(f, x, h, y, acc):
    """The classical RK4 step of rk4_step, x₁ = x + h/6 (k₁ + 2k₂ + 2k₃ + k₄), with two buffers:
    y holds the stage point, acc the running sum, and each kᵢ is used at once (the field may
    return a buffer that its next call overwrites). Returns acc = x₁; x is untouched."""
    k = f(0.0, x)                                                        # k₁ = f(x)
    torch.add(x, k, alpha=h / 6, out=acc)                                # acc = x + h/6 k₁
    torch.add(x, k, alpha=h / 2, out=y)                                  # y = x + h/2 k₁
    k = f(0.0, y)                                                        # k₂
    acc.add_(k, alpha=h / 3)
    torch.add(x, k, alpha=h / 2, out=y)                                  # y = x + h/2 k₂
    k = f(0.0, y)                                                        # k₃
    acc.add_(k, alpha=h / 3)
    torch.add(x, k, alpha=h, out=y)                                      # y = x + h k₃
    return acc.add_(f(0.0, y), alpha=h / 6)                              # + h/6 k₄


# The compiled path (integrate(compile=...)): one whole fixed step of the plain / causal field as a
# pure function of tensors, M = [W | V] and the mask passed in (not closed over), so that
# torch.compile traces one graph and keeps it when instances drop out (the batch dimension turns
# dynamic after the first change instead of recompiling for every size). The eager functions are the
# reference; the compiled ones are torch.compile of exactly these.
def _plain_field_M(X, M, mask):
    """softmax(X W Xᵀ) X V from M = [W | V] (d, 2d), −inf where mask (causal) is True."""
    d = X.shape[-1]
    Z = X @ M                                                          # [X W | X V]
    S = Z[..., :d] @ X.transpose(-1, -2)                               # (xᵢᵀ W) xⱼ
    if mask is not None:
        S = S.masked_fill(mask, float("-inf"))
    return torch.softmax(S, dim=-1) @ Z[..., d:]


def _rk4_plain(X, M, h, mask):
    """rk4_step of the plain field, h a 0-d tensor (a Python float would be baked into the graph)."""
    k1 = _plain_field_M(X, M, mask)
    k2 = _plain_field_M(X + 0.5 * h * k1, M, mask)
    k3 = _plain_field_M(X + 0.5 * h * k2, M, mask)
    k4 = _plain_field_M(X + h * k3, M, mask)
    return X + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


def _euler_plain(X, M, h, mask):
    return X + h * _plain_field_M(X, M, mask)


_COMPILED: dict = {}


def _compiled_stepper(method: str, backend: str):
    """torch.compile of _rk4_plain / _euler_plain (one per method and backend, made on first use)."""
    if (method, backend) not in _COMPILED:
        fn = {"rk4": _rk4_plain, "euler": _euler_plain}[method]
        _COMPILED[method, backend] = torch.compile(fn, backend=backend, dynamic=None, fullgraph=True)
    return _COMPILED[method, backend]


def _compile_suits(device, B: int, N: int) -> bool:
    """compile="auto": compile only where it was measured to pay. On a CPU it does not: 10⁴
    instances (n 8, d 4, float64, 100 RK4 steps) ran 1.24× the eager batch-first loop but 0.58× the
    default batch-last one, after a first call of 18.9 s (`python -m analysis.bench --compiled`). On
    a GPU — unmeasured here (analysis/gpu_speed.sh measures it) — only for many instances and many
    steps, where a compile of ~20 s can be repaid."""
    return device.type == "cuda" and B >= 10_000 and N >= 1_000


# ================================================================================================
# 2. Integrators: pure steppers step(f, t, x, dt) for Euler, RK4 and Dormand–Prince 5(4), then the
#    batched, blow-up-aware driver. f(t, x) is the field (autonomous here: t is passed, unused).
# ================================================================================================
@contextlib.contextmanager
def flush_subnormals():
    """Within the block, subnormal floats (|x| < 2.2e−308 in float64) read and are written as 0.

    Why the integrators need it: late in a run attention is often nearly hard, and the softmax
    weights exp(sᵢⱼ − mᵢ) of the far keys fall below 2.2e−308. x86 cores handle such operands in
    microcode, up to ~100× slower per operation, and a long run can spend most of its time there
    (measured: a d = 16, n = 128 causal RoPE instance set, 5,000 steps, 81.5 s → 51.2 s, the
    same step counts). Flushing them to 0 changes a row of P by < 1e−300 against a row sum of 1,
    below the 1e−16 round-off by ~284 orders, so the trajectories are the same to round-off.
    torch.set_flush_denormal sets the calling thread's mode (the single-thread runs the grids use);
    the previous mode is restored on exit, and where a CPU cannot flush this does nothing."""
    was = float(torch.tensor(1e-310, dtype=torch.float64) * 2.0) == 0.0   # already flushing?
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


# Explicit Euler (order 1):      0 | 0
#                                --+--         x₁ = x + h f(t, x)
#                                  | 1
def euler_step(f, t, x, dt):
    """One explicit Euler step."""
    return x + dt * f(t, x)


# Classical Runge–Kutta (order 4):
#      0  |                        k₁ = f(t, x)
#     1/2 | 1/2                    k₂ = f(t + h/2, x + h/2 k₁)
#     1/2 |  0   1/2               k₃ = f(t + h/2, x + h/2 k₂)
#      1  |  0    0    1           k₄ = f(t + h, x + h k₃)
#     ----+--------------------
#         | 1/6  1/3  1/3  1/6     x₁ = x + h/6 (k₁ + 2k₂ + 2k₃ + k₄)
def rk4_step(f, t, x, dt):
    """One classical RK4 step."""
    k1 = f(t, x)
    k2 = f(t + 0.5 * dt, x + 0.5 * dt * k1)
    k3 = f(t + 0.5 * dt, x + 0.5 * dt * k2)
    k4 = f(t + dt, x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)


# Dormand–Prince 5(4) (Dormand & Prince 1980; the method of MATLAB's ode45):
#     0    |
#     1/5  | 1/5
#     3/10 | 3/40        9/40
#     4/5  | 44/45       −56/15       32/9
#     8/9  | 19372/6561  −25360/2187  64448/6561  −212/729
#     1    | 9017/3168   −355/33      46732/5247  49/176    −5103/18656
#     1    | 35/384      0            500/1113    125/192   −2187/6784     11/84
#     -----+---------------------------------------------------------------------------
#     b⁵   | 35/384      0            500/1113    125/192   −2187/6784     11/84     0
#     b⁴   | 5179/57600  0            7571/16695  393/640   −92097/339200  187/2100  1/40
# kᵢ = f(t + cᵢh, x + h Σⱼ aᵢⱼ kⱼ); x⁵ = x + h Σᵢ b⁵ᵢ kᵢ (taken), x⁴ = x + h Σᵢ b⁴ᵢ kᵢ; x⁵ − x⁴ estimates
# the local error. The last row of a is b⁵, so k₇ = f(x⁵) is the next step's k₁ (FSAL).
_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_DP_A = ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
         (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
         (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656), _DP_B5[:6])


_DP_E = tuple(b5 - b4 for b5, b4 in zip(_DP_B5, _DP_B4))      # x⁵ − x⁴ = h Σᵢ (b⁵ᵢ − b⁴ᵢ) kᵢ


def _combine(coefs, ks):
    """Σⱼ cⱼ kⱼ over the nonzero cⱼ, accumulated in place (one buffer, no temporaries per term)."""
    acc = None
    for c, k in zip(coefs, ks):
        if c != 0.0:
            acc = k * c if acc is None else acc.add_(k, alpha=c)
    return acc


def dopri5_step(f, t, x, dt, k1=None):
    """One Dormand–Prince step: (x⁵, x⁵ − x⁴, k₇). k1 = f(t, x) if already known (FSAL).

    The seventh stage is evaluated at x + h Σⱼ a₇ⱼ kⱼ, and a₇ = b⁵: that point IS x⁵, so it is
    taken as the result; the error x⁵ − x⁴ is formed directly as h Σᵢ (b⁵ᵢ − b⁴ᵢ) kᵢ."""
    ks = [f(t, x) if k1 is None else k1]
    for i in range(1, 7):
        xi = x + dt * _combine(_DP_A[i], ks)
        ks.append(f(t + _DP_C[i] * dt, xi))
    return xi, dt * _combine(_DP_E, ks), ks[6]


@dataclass
class Trajectory:
    """What integrate() returns. t: (T,) saved times. X: (T, *batch, n, d) saved states, batch =
    the broadcast leading dimensions of X0, Q, K, V and the options (a blown-up instance stays
    frozen at its last good state, so X never holds NaNs). status: "ok", or a message saying which
    instances blew up or stalled, when and why. blown: (batch,) bool; t_blow: (batch,) blow-up time
    (inf: none); stalled / t_stall: the same for instances dopri5 froze because no step above
    1e-10·t_end met the tolerance while the state stayed finite and bounded (stiff, not blown up)."""
    t: torch.Tensor
    X: torch.Tensor
    status: str
    blown: torch.Tensor
    t_blow: torch.Tensor
    n_steps: int = 0
    n_rejected: int = 0
    n_evals: int = 0
    reasons: list = field(default_factory=list)
    stalled: torch.Tensor | None = None      # (batch,) bool: dopri5 froze it, stiff (step < 1e-10·t_end)
    t_stall: torch.Tensor | None = None      # (batch,) when (inf: never)


@flush_subnormals()
def integrate(X0: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, t_end: float,
              dt: float, method: str = "rk4", *, rtol: float = 1e-6, atol: float = 1e-9,
              max_norm: float = 1e6, n_save: int = 201, max_steps: int = 1_000_000,
              progress: bool = False, layout: str = "auto", error_norm: str = "max",
              compile: bool | str = "auto", **options) -> Trajectory:
    """Integrate dX/dt = velocity(X, Q, K, V, **options) from t = 0 to t_end.

    method: "euler" or "rk4" (fixed step: dt, shortened to fit t_end), or "dopri5" (adaptive: each
    instance's error kept within ‖err‖_RMS ≤ atol + rtol·|x|; dt is the first trial step). All
    instances (the broadcast leading dimensions of X0, Q, K, V and the options) advance together; one
    whose state turns non-finite or whose largest token norm exceeds max_norm is frozen at its last
    good state, reported in `status` and dropped from the working batch, and the others go on.
    n_save evenly spaced times are saved (fixed-step methods on the nearest step; dopri5 exactly).
    error_norm (dopri5): "max" accepts a step when EVERY instance's scaled RMS error is ≤ 1 (each
    instance within its tolerance: right for blow-up studies, paid by all for the worst one);
    "rms" when the RMS over the whole batch is ≤ 1 (torchdiffeq's norm: fewer steps, and no bound
    on any one instance's error).
    layout: "auto" runs the fixed-step methods on small plain / causal instances in the batch-last
    layout (_BatchLastField; whole runs 1.1–1.9× faster there, measured; the same trajectories to
    round-off), everything
    else batch-first; "batch-first" / "batch-last" force one (batch-last: euler / rk4 and the plain
    or causal field only).
    compile (fixed-step methods, plain or causal field, batch-first): True runs each step as
    torch.compile of _rk4_plain / _euler_plain (inductor); a backend name ("aot_eager", …) compiles
    with that backend; False never; "auto" only where it pays (_compile_suits: never on a CPU, where
    it did not beat the eager default). The eager loop is the reference: the compiled
    one gives the same trajectories to round-off (tested).
    """
    _check_inputs(X0, Q, K, V, **options)                              # validate everything once
    if layout not in ("auto", "batch-first", "batch-last"):
        raise ValueError(f"unknown layout {layout!r}; choose 'auto', 'batch-first' or 'batch-last'.")
    if error_norm not in ("max", "rms"):
        raise ValueError(f"unknown error_norm {error_norm!r}; choose 'max' or 'rms'.")
    if layout == "batch-last" and method == "dopri5":
        raise ValueError("layout='batch-last' is for the fixed-step methods (euler, rk4), not dopri5.")
    if method not in ("euler", "rk4", "dopri5"):
        raise ValueError(f"unknown method {method!r}; choose 'euler', 'rk4' or 'dopri5'.")
    for name, v in (("t_end", t_end), ("dt", dt), ("max_norm", max_norm), ("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    if not isinstance(n_save, int) or n_save < 2:
        raise ValueError(f"n_save must be an integer >= 2, got {n_save!r}.")
    if not (isinstance(compile, bool) or (isinstance(compile, str) and compile)):
        raise ValueError(f"compile must be True, False, 'auto' or a torch.compile backend name, got {compile!r}.")
    if compile not in (False, "auto") and (method == "dopri5" or layout == "batch-last"
                                            or not _plain_field(options)):
        raise ValueError("compile takes the fixed-step methods (euler, rk4) on the plain or causal field "
                         "in the batch-first layout (no dopri5, batch-last, pos, rope or lam).")

    # Flatten every batched tensor to (B, ...) so that instances can be dropped once they blow up.
    tensors = {"Q": Q, "K": K, "V": V}
    tensors.update({k: v for k, v in options.items() if isinstance(v, torch.Tensor)})
    bshape = torch.broadcast_shapes(X0.shape[:-2], *(t.shape[:-2] for t in tensors.values()))
    B = math.prod(bshape)
    flat = lambda t: t.broadcast_to(bshape + t.shape[-2:]).reshape(B, *t.shape[-2:])  # noqa: E731
    batched = {k: flat(t) for k, t in tensors.items() if t.ndim > 2}
    shared = {k: t for k, t in tensors.items() if t.ndim <= 2}
    scalars = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}

    def field_on(act: torch.Tensor):
        """The field f(t, X) restricted to the active instances `act` (indices into the flat batch)."""
        p = {**shared, **{k: t[act] for k, t in batched.items()}}
        q_, k_, v_ = p.pop("Q"), p.pop("K"), p.pop("V")
        return _prepared_field(q_, k_, v_, **p, **scalars)

    x = flat(X0).clone()                                               # (B, n, d), all instances
    alive, t_blow = torch.ones(B, dtype=torch.bool), torch.full((B,), math.inf, dtype=torch.float64)
    stalled, t_stall = torch.zeros(B, dtype=torch.bool), torch.full((B,), math.inf, dtype=torch.float64)
    reasons: list[str] = []
    act = torch.arange(B)                                              # the active instances
    f = field_on(act)

    def advance(x_new_act: torch.Tensor, t_new: float):
        """Write the new states of the active instances back; freeze and drop the ones that blew up."""
        nonlocal act, f
        bad = too_big(x_new_act)                               # largest token norm per instance
        if not bool(bad.any()):                                  # the common case: no gather/scatter
            if act.numel() == B:
                x.copy_(x_new_act)
            else:
                x[act] = x_new_act
            return bad
        good = ~bad
        x[act[good]] = x_new_act[good]
        blew_up(bad, torch.isfinite(x_new_act).flatten(-2).all(-1), t_new)
        act = act[good]
        f = field_on(act)
        return bad

    def blew_up(bad: torch.Tensor, finite: torch.Tensor, t_new: float) -> None:
        """Record the active instances `bad` (bool over act) as blown up at t_new."""
        for j in bad.nonzero().flatten().tolist():
            i = int(act[j])
            t_blow[i] = t_new
            if len(reasons) < 3:
                idx = i if len(bshape) <= 1 else tuple(torch.unravel_index(torch.tensor(i), bshape))
                why = "non-finite" if not finite[j] else f"norm > {max_norm:g}"
                reasons.append(f"instance {idx} at t={t_new:.4g} ({why})")
        alive[act[bad]] = False

    def too_big(x_new: torch.Tensor, batch_last: bool = False, scratch: torch.Tensor | None = None):
        """(instances,) bool: some token norm > max_norm, or a NaN/inf (which fails `<=` too).
        x_new: (B, n, d), or (n, d, B) if batch_last. Squared norms (no sqrt) unless the squared
        bound itself would overflow."""
        feat, tok = (1, 0) if batch_last else (-1, -1)        # the token's features; then the tokens
        if max_norm >= 1e150:
            return ~(torch.linalg.vector_norm(x_new, dim=feat).amax(tok) <= max_norm)
        sq = x_new.pow(2) if scratch is None else torch.mul(x_new, x_new, out=scratch)
        return ~(sq.sum(feat).amax(tok) <= max_norm * max_norm)

    t_save = torch.linspace(0.0, float(t_end), n_save, dtype=torch.float64)
    t, ts, xs = 0.0, [0.0], [x.clone()]
    n_steps = n_rej = n_evals = 0
    bar = tqdm(total=float(t_end), desc=f"integrate[{method}]", unit="t", leave=False, disable=not progress)

    if method != "dopri5":
        step, evals = {"euler": (euler_step, 1), "rk4": (rk4_step, 4)}[method]   # field evals per step
        N = max(1, int(math.ceil(t_end / dt - 1e-9)))
        if N > max_steps:
            raise ValueError(f"t_end/dt needs {N} steps, more than max_steps={max_steps}.")
        h = t_end / N                                                  # lands exactly on t_end
        save_at = set(torch.round(t_save / h).long().tolist())
        if layout == "batch-last" and not _plain_field(options):
            raise ValueError("layout='batch-last' takes the plain or causal field only (no pos, rope or lam).")
        batch_last = layout == "batch-last" or (
            layout == "auto" and _batch_last_suits(X0.shape[-2], X0.shape[-1], B, options))
        compiled = compile not in (False, "auto") or (
            compile == "auto" and layout != "batch-last" and _plain_field(options)
            and _compile_suits(X0.device, B, N))
        batch_last = batch_last and not compiled
    if method != "dopri5" and batch_last:
        # the same loop in the batch-last layout: state xt (n, d, active), lean steppers into two
        # buffers; x (batch-first) is written only at save times, blow-ups and the end
        F_ = _BatchLastField(flat(Q), flat(K), flat(V), bool(options.get("causal", False)))
        xt = x.permute(1, 2, 0).contiguous()
        y, acc = torch.empty_like(xt), torch.empty_like(xt)
        for s in range(1, N + 1):
            x_new = _rk4_lean(F_, xt, h, y, acc) if method == "rk4" else _euler_lean(F_, xt, h, acc)
            n_evals += evals
            n_steps += 1
            t = s * h
            bad = too_big(x_new, batch_last=True, scratch=y)           # y is free after the step
            if bool(bad.any()):
                good = ~bad
                x[act] = xt.permute(2, 0, 1)                           # last good states (frozen: bad)
                blew_up(bad, torch.isfinite(x_new).flatten(0, 1).all(0), t)
                act, F_ = act[good], F_.select(good)
                xt = x_new[..., good].contiguous()
                y, acc = torch.empty_like(xt), torch.empty_like(xt)
            else:
                xt, acc = x_new, xt                                    # the old state's buffer is free
            if s in save_at:
                x[act] = xt.permute(2, 0, 1)
                ts.append(t)
                xs.append(x.clone())
            bar.update(h)
            if act.numel() == 0:
                break
        x[act] = xt.permute(2, 0, 1)
    elif method != "dopri5":
        if compiled:
            # each step one compiled graph of the whole stage sequence; M = [W | V] per instance,
            # gathered again only when instances drop out (advance() shrinks act)
            cstep = _compiled_stepper(method, "inductor" if compile in (True, "auto") else compile)
            M_all = torch.cat((flat(Q) @ flat(K).transpose(-1, -2), flat(V)), dim=-1)   # (B, d, 2d)
            M_act = [M_all]
            mask = _causal_mask(X0.shape[-2], X0.device) if options.get("causal", False) else None
            h_t = torch.tensor(h, dtype=X0.dtype, device=X0.device)

            def one_step(xa, t):
                if M_act[0].shape[0] != act.numel():
                    M_act[0] = M_all[act]
                return cstep(xa, M_act[0], h_t, mask)
        else:
            def one_step(xa, t):
                return step(f, t, xa, h)                               # f: the active instances' field
        for s in range(1, N + 1):
            x_new = one_step(x if act.numel() == B else x[act], t)
            n_evals += evals
            t = s * h
            advance(x_new, t)
            n_steps += 1
            if s in save_at:
                ts.append(t)
                xs.append(x.clone())
            bar.update(h)
            if act.numel() == 0:
                break
    else:
        h, next_save, k1, n_evals = float(dt), 1, f(t, x[act]), 1
        while t < t_end * (1 - 1e-12) and act.numel() > 0:
            if n_steps + n_rej >= max_steps:
                reasons.append(f"stopped after max_steps={max_steps} at t={t:.4g}")
                break
            h = min(h, float(t_save[next_save]) - t)                   # land on the save times
            xa = x[act]
            x5, x5_minus_x4, k7 = dopri5_step(f, t, xa, h, k1)
            n_evals += 6
            # scaled error per instance: RMS of |x5 − x4| / (atol + rtol·max(|x|, |x5|))
            scale = atol + rtol * torch.maximum(xa.abs(), torch.nan_to_num(x5.abs(), nan=0.0))
            err = torch.nan_to_num((x5_minus_x4 / scale).pow(2).flatten(-2).mean(-1).sqrt(), nan=math.inf)
            # the controlled error: the worst instance's, or the batch's RMS (error_norm)
            err_ctl = float(err.max() if error_norm == "max" else err.pow(2).mean().sqrt())
            if err_ctl > 1.0 and h < 1e-10 * t_end:
                # the step has shrunk to nothing. An instance whose trial state overflows or passes
                # max_norm is blowing up: accepted below, advance() freezes it as blown. One that
                # stays finite and bounded is stiff, not blown: freeze it as "stalled", say so, and
                # let the others go on (they met the tolerance at this h).
                over = ~(torch.linalg.vector_norm(torch.nan_to_num(x5, nan=math.inf), dim=-1).amax(-1) <= max_norm)
                stall = (err > 1.0) & ~over
                if bool(stall.any()):
                    for j in stall.nonzero().flatten().tolist():
                        i = int(act[j])
                        stalled[i], t_stall[i] = True, t
                        if len(reasons) < 3:
                            reasons.append(f"instance {i} stalled at t={t:.4g} (step below {1e-10 * t_end:.2g}: "
                                           "stiff; frozen, not counted as blown up)")
                    keep = ~stall
                    act, k1 = act[keep], k1[keep]
                    f = field_on(act)
                    continue
            # accept within tolerance — or, once the step has shrunk to nothing, the instances that
            # are blowing up (advance() freezes and drops them instead of stalling everyone)
            if err_ctl <= 1.0 or h < 1e-10 * t_end:
                t += h
                bad = advance(x5, t)
                k1 = k7[~bad]                                              # FSAL: f(x5) is next k1
                n_steps += 1
                bar.update(h)
                if abs(t - float(t_save[next_save])) <= 1e-12 * t_end:
                    ts.append(t)
                    xs.append(x.clone())
                    next_save = min(next_save + 1, n_save - 1)
            else:
                n_rej += 1
            # step-size controller: h ← h · clip(0.9 err^(−1/5), 0.2, 5)
            h *= 5.0 if err_ctl == 0 else min(5.0, max(0.2, 0.9 * err_ctl ** -0.2))
    bar.close()
    if t > ts[-1]:
        # stopped early (every instance blew up) between save times: keep the frozen final state
        ts.append(t)
        xs.append(x.clone())
    blown = ~alive
    status = (f"{int(blown.sum())} of {B} instance(s) blew up; first: " + "; ".join(reasons[:3])
              if blown.any() else "; ".join(reasons) if reasons else "ok")
    if stalled.any():
        status = f"{int(stalled.sum())} of {B} instance(s) stalled (stiff); " + status
    return Trajectory(t=torch.tensor(ts, dtype=torch.float64),
                      X=torch.stack(xs).reshape(len(xs), *bshape, *X0.shape[-2:]), status=status,
                      blown=blown.reshape(bshape), t_blow=t_blow.reshape(bshape), n_steps=n_steps,
                      n_rejected=n_rej, n_evals=n_evals, reasons=reasons, stalled=stalled.reshape(bshape),
                      t_stall=t_stall.reshape(bshape))


class ResumeMismatch(ValueError):
    """integrate_each(resume=state) was given the state of another run (other inputs, save times,
    tolerances or options): a ValueError, its own type so that a caller can start afresh instead."""


@dataclass
class Fates:
    """What integrate_each() returns. t: (T,) save times; X: (T, B, n, d) states there (an instance
    that stopped early — blew up or spent its step budget — keeps its last state in later rows);
    t_reached: (B,) how far each instance got (t_end unless it stopped); blown: (B,) bool; settled:
    (B,) bool, every token norm fell below min_norm (it reached the rest point X = 0 to within the
    solver's accuracy); n_steps: (B,) steps tried per instance (accepted + rejected)."""
    t: torch.Tensor
    X: torch.Tensor
    t_reached: torch.Tensor
    blown: torch.Tensor
    settled: torch.Tensor
    n_steps: torch.Tensor


@flush_subnormals()
def integrate_each(X0: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, t_save,
                   *, dt: float = 0.05, rtol: float = 1e-6, atol: float = 1e-9, max_norm: float = 1e6,
                   min_norm: float = 0.0, max_steps: int = 200_000, resume: dict | None = None,
                   snapshot=None, snapshot_every_s: float = 600.0, **options) -> Fates:
    """Dormand–Prince 5(4) with a step size PER INSTANCE, for long horizons over many instances.

    integrate(method="dopri5") moves the whole batch with one step size, the smallest any instance
    needs; over t = 2000 one stiff instance (a hard-attention state: logits in the hundreds, the
    softmax switching between two tokens) then costs every instance thousands of steps. Here each
    instance b has its own time t_b and step h_b: all active instances take one step together (h is
    a (B, 1, 1) tensor), each is accepted or rejected on its own error, h_b ← h_b·clip(0.9 err_b^(−1/5),
    0.2, 5), and an instance leaves the working batch when it reaches the last save time, blows up
    (non-finite, or a token norm > max_norm), settles (every token norm < min_norm: below the
    solver's absolute tolerance an explicit method no longer tracks the decay, so stop there) or
    has tried max_steps steps (its budget; t_reached says where it stopped). t_save: increasing save times (t_save[0] = 0 ↔ X0), each one landed on
    exactly. X0, Q, K, V: (B, n, d), (B, d, d_k), (B, d, d_k), (B, d, d); options as for velocity().

    Long runs can be stopped and resumed: every snapshot_every_s seconds (wall clock) the loop calls
    snapshot(state) with its whole state, a dict of tensors, before it takes the next step; passing
    that dict back as resume= continues from there. Each instance's step depends only on its own
    state, so a resumed run ends with the same trajectories as one never stopped, to the last bit
    (tested). A state made for other inputs, tolerances or save times is refused (ResumeMismatch,
    a ValueError).
    """
    _check_inputs(X0, Q, K, V, **options)
    t_save = torch.as_tensor(t_save, dtype=torch.float64).flatten()
    if t_save.numel() < 2 or float(t_save[0]) != 0.0 or not bool((t_save.diff() > 0).all()) \
            or not math.isfinite(float(t_save[-1])):
        raise ValueError("t_save must be increasing finite times starting at 0, at least two of them.")
    for name, v in (("dt", dt), ("rtol", rtol), ("atol", atol), ("max_norm", max_norm)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    if isinstance(min_norm, bool) or not isinstance(min_norm, (int, float)) or not 0 <= min_norm < max_norm:
        raise ValueError(f"min_norm must be a number in [0, max_norm), got {min_norm!r}.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps <= 0:
        raise ValueError(f"max_steps must be a positive integer, got {max_steps!r}.")
    if snapshot is not None and not callable(snapshot):
        raise ValueError(f"snapshot must be a function of one argument (the state), got {snapshot!r}.")
    if isinstance(snapshot_every_s, bool) or not isinstance(snapshot_every_s, (int, float)) \
            or not (math.isfinite(snapshot_every_s) and snapshot_every_s >= 0):
        raise ValueError(f"snapshot_every_s must be a finite number of seconds >= 0, got {snapshot_every_s!r}.")
    if X0.ndim != 3 or any(t.ndim != 3 or t.shape[0] != X0.shape[0] for t in (Q, K, V)):
        raise ValueError("integrate_each takes one batch dimension: X0 (B, n, d) and Q, K, V (B, ·, ·).")
    B, T, t_end = X0.shape[0], t_save.numel(), float(t_save[-1])
    tensors = {"Q": Q, "K": K, "V": V}
    tensors.update({k: v for k, v in options.items() if isinstance(v, torch.Tensor)})
    scalars = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}

    def field_on(act):
        p = {k: (t[act] if t.ndim == 3 else t) for k, t in tensors.items()}
        q_, k_, v_ = p.pop("Q"), p.pop("K"), p.pop("V")
        return _prepared_field(q_, k_, v_, **p, **scalars)

    # what a saved state must agree with to be resumed here: the inputs (by shape and exact sums),
    # the save times, the tolerances and the field's options (only built when a state is saved or read)
    key = None if resume is None and snapshot is None else {
        "shape": list(X0.shape), "sums": [float(m.double().sum()) for m in (X0, Q, K, V)],
        "abs_sums": [float(m.double().abs().sum()) for m in (X0, Q, K, V)], "t_save": t_save.tolist(),
        "solver": [dt, rtol, atol, max_norm, min_norm, max_steps],
        "options": sorted((k, repr(v) if not isinstance(v, torch.Tensor) else float(v.double().sum()))
                          for k, v in options.items())}
    names = ("out", "t_reached", "blown", "settled", "steps", "act", "x", "tb", "hb", "nxt", "k1")
    if resume is not None:
        if not isinstance(resume, dict) or resume.get("key") != key or any(n not in resume for n in names):
            raise ResumeMismatch("resume= holds the state of a different run (other inputs, save times, "
                                 "tolerances or options); start without it.")
        out, t_reached, blown, settled, steps, act, x, tb, hb, nxt, k1 = (resume[n] for n in names)
        f = field_on(act)
    else:
        out = X0.unsqueeze(0).repeat(T, 1, 1, 1)              # row 0 = X0; later rows overwritten
        t_reached = torch.full((B,), t_end, dtype=torch.float64)
        blown = torch.zeros(B, dtype=torch.bool)
        settled = torch.zeros(B, dtype=torch.bool)
        steps = torch.zeros(B, dtype=torch.long)
        # the compact working batch: instance indices and their state, time, step size, next save row
        act = torch.arange(B)
        x, tb = X0.clone(), torch.zeros(B, dtype=torch.float64)
        hb = torch.full((B,), float(dt), dtype=torch.float64)
        nxt = torch.ones(B, dtype=torch.long)
        f = field_on(act)
        k1 = f(0.0, x)
    last_snap = time.monotonic()
    while act.numel():
        if snapshot is not None and time.monotonic() - last_snap >= snapshot_every_s:
            # copies: the loop goes on writing into its own tensors in place
            snapshot(dict(zip(names, (v.clone() for v in (out, t_reached, blown, settled, steps, act, x,
                                                          tb, hb, nxt, k1))), key=key))
            last_snap = time.monotonic()
        target = t_save[nxt]
        h = torch.minimum(hb, target - tb)                     # land exactly on the next save time
        x5, err_vec, k7 = dopri5_step(f, 0.0, x, h.to(x.dtype)[:, None, None], k1)
        # scaled RMS error per instance, as in integrate()
        scale = atol + rtol * torch.maximum(x.abs(), torch.nan_to_num(x5.abs(), nan=0.0))
        err = torch.nan_to_num((err_vec / scale).pow(2).flatten(-2).mean(-1).sqrt(), nan=math.inf)
        ok = err <= 1.0
        steps[act] += 1
        sq = x5.pow(2).sum(-1).amax(-1)                        # largest squared token norm
        bad = ok & ~(sq <= max_norm * max_norm)                 # accepted but blown up
        ok = ok & ~bad
        low = ok & (sq < min_norm * min_norm)                   # settled at X = 0
        okm = ok[:, None, None]
        x, k1 = torch.where(okm, x5, x), torch.where(okm, k7, k1)
        tb = torch.where(ok, tb + h, tb)
        landed = ok & ((tb - target).abs() <= 1e-12 * t_end)
        if bool(landed.any()):
            out[nxt[landed], act[landed]] = x[landed]
            tb = torch.where(landed, target, tb)
            nxt = nxt + landed.long()
        # step-size control; a step shortened to land on a save time does not shrink the next one
        fac = torch.where(err == 0, torch.full_like(err, 5.0), (0.9 * err.pow(-0.2)).clamp(0.2, 5.0))
        hb = torch.where(landed & (h < hb), torch.maximum(hb, h * fac), h * fac)
        spent = steps[act] >= max_steps
        leave = (nxt >= T) | bad | spent | low
        if bool(leave.any()):
            for j in leave.nonzero().flatten().tolist():
                i = int(act[j])
                if nxt[j] < T:                                  # stopped early: freeze its last state
                    out[int(nxt[j]):, i] = x[j]
                    t_reached[i] = float(tb[j])
                    blown[i], settled[i] = bool(bad[j]), bool(low[j])
            keep = ~leave
            act, x, tb, hb, nxt, k1 = act[keep], x[keep], tb[keep], hb[keep], nxt[keep], k1[keep]
            f = field_on(act)
    return Fates(t=t_save, X=out, t_reached=t_reached, blown=blown, settled=settled, n_steps=steps)


# The fate of an instance over a long horizon (analysis/phase.py's rule; train_tied.py's probe of a
# trained layer's own field): the late log–log slope of the mean token norm decides it.
FATES = ("converges", "slower", "plateau", "grows")
FATE_MIN_NORM, FATE_MAX_NORM = 1e-8, 1e6      # settled below, blown up above (every token norm)


def late_slopes(t: torch.Tensor, N: torch.Tensor, t_reached: torch.Tensor):
    """Least-squares slopes of log N against log t (the power) and against t (the exponential
    rate) over the saved times in [t_r/10, t_r] of each instance (t_r = how far it got). N: (T, B)."""
    logN = N.clamp_min(1e-300).log()
    power, rate = [], []
    for b in range(N.shape[1]):
        tr = float(t_reached[b])
        sel = (t >= tr / 10) & (t <= tr * (1 + 1e-12)) & (t > 0)
        if int(sel.sum()) < 3:
            power.append(math.nan)
            rate.append(math.nan)
            continue
        y = logN[sel, b]
        for x, out in ((t[sel].log(), power), (t[sel], rate)):
            xc = x - x.mean()
            out.append(float((xc * (y - y.mean())).sum() / (xc * xc).sum()))
    return power, rate


def fate(slope: float, settled: bool, blown: bool) -> str:
    """An instance's fate from the late log–log slope p of its mean token norm: "grows" if it blew
    up or p ≥ 0.05; "converges" if it settled (every token below FATE_MIN_NORM) or p ≤ −0.35 (the
    algebraic t^(−1/2) rate and faster); "slower" for −0.35 < p ≤ −0.05; "plateau" for |p| < 0.05."""
    if blown:
        return "grows"
    if settled or slope <= -0.35:
        return "converges"
    if slope <= -0.05:
        return "slower"
    if slope < 0.05:
        return "plateau"
    return "grows"


def field_fates(Q, K, V, X0, t_save, *, max_steps: int = 10_000, resume=None, snapshot=None,
                snapshot_every_s: float = 600.0, **opts) -> dict:
    """Integrate dX/dt = velocity(X, Q, K, V, **opts) from each X0[b] (per-instance dopri5, rtol
    1e-6) through the save times t_save, and classify each instance's fate by its late log–log
    slope (`fate`). Also a trained layer's fate probe (train_tied.py). Q, K, V: (B, d, ·).
    resume / snapshot / snapshot_every_s: integrate_each's, to stop a long run and go on later."""
    W = Q @ K.transpose(-1, -2)
    A = regimes.value_form(W, V)
    fr = integrate_each(X0, Q, K, V, t_save, rtol=1e-6, atol=1e-12, min_norm=FATE_MIN_NORM,
                        max_norm=FATE_MAX_NORM, max_steps=max_steps, resume=resume, snapshot=snapshot,
                        snapshot_every_s=snapshot_every_s, **opts)
    N = token_norm(fr.X)                                              # (T, B) mean token norm
    power, rate = late_slopes(fr.t, N, fr.t_reached)
    Xe = fr.X[-1]
    v = velocity(Xe, Q, K, V, **opts)
    rel = (torch.linalg.vector_norm(v, dim=(-2, -1))
           / torch.linalg.vector_norm(Xe, dim=(-2, -1)).clamp_min(1e-300))
    return {"fate": [fate(p, bool(s), bool(bl)) for p, s, bl in zip(power, fr.settled, fr.blown)],
            "slope": power, "rate": rate, "rel_speed": rel.tolist(),
            # α(V) = max Re λ(V) read off V itself (regimes.value_abscissa's A⁻¹W, the same spectrum,
            # needs A invertible: a layer with W = 0 has A = 0)
            "alpha_V": torch.linalg.eigvals(V.double()).real.amax(-1).tolist(),
            "rho": regimes.antisymmetry_ratio(A).tolist(),
            "t_reached": fr.t_reached.tolist(), "steps": fr.n_steps.tolist(), "final_norm": N[-1].tolist(),
            "settled": fr.settled.tolist(), "blown": fr.blown.tolist(),
            # the mean token norm at every save time (T × B), so any decade's slope can be read later
            "times": fr.t.tolist(), "norms": N.T.tolist()}


def log_times(t_end: float, n_save: int = 61) -> torch.Tensor:
    """0, then n_save log-spaced times from 0.1 to t_end (the slope window is the last decade)."""
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(-1, math.log10(t_end), n_save, dtype=torch.float64)])


# ================================================================================================
# 3. The energy E of (I) and the token-geometry probes (docs/dynamics.md §5.4): X (..., n, d) -> (...,)
# ================================================================================================
def energy(X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """E(X) = Σᵢ xᵢᵀ A xᵢ, non-decreasing along the field when A is symmetric and W_sym ⪰ 0 (I)."""
    return torch.einsum("...ni,...ij,...nj->...", X, A, X)


def token_norm(X: torch.Tensor) -> torch.Tensor:
    """norm(X) = (1/N) Σᵢ ‖xᵢ‖  — the mean token norm."""
    return torch.linalg.vector_norm(X, dim=-1).mean(-1)


def pairwise_distance(X: torch.Tensor) -> torch.Tensor:
    """dist(X) = Σ_{i,j} ‖xᵢ − xⱼ‖² = 2N Σᵢ ‖xᵢ‖² − 2 ‖Σᵢ xᵢ‖²  (docs/dynamics.md §5.4)
                                  = 2N Σᵢ ‖xᵢ − x̄‖²   (computed this way: the middle form cancels
    catastrophically for large, nearly parallel tokens — we saw it go negative on diverging runs)."""
    N = X.shape[-2]
    return 2 * N * (X - X.mean(-2, keepdim=True)).pow(2).sum((-1, -2))


def sharpness(X: torch.Tensor) -> torch.Tensor:
    """sharpness(X) = dist(X) / (2 (N − 1) Σᵢ ‖xᵢ‖²): 0 when all tokens coincide, N/(N−1) max."""
    N = X.shape[-2]
    return pairwise_distance(X) / (2 * (N - 1) * X.pow(2).sum((-1, -2)).clamp_min(1e-300))


def effective_rank(X: torch.Tensor) -> torch.Tensor:
    """erank = exp(H(σ/Σσ)) of the centred, normalised tokens uᵢ − ū, uᵢ = xᵢ/‖xᵢ‖ (Roy & Vetterli
    2007), per sequence (X: (..., n, d)): up to min(n − 1, d); 1 when the directions spread along one
    line; 0 when they have collapsed onto one direction (σ below 1e-10, round-off of the unit
    vectors, is 0)."""
    U = X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-300)
    s = torch.linalg.svdvals(U - U.mean(-2, keepdim=True))
    s = s.masked_fill(s < 1e-10, 0.0)
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    erank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum(-1))
    return torch.where(s.sum(-1) > 0, erank, torch.zeros_like(erank))


def mean_cosine(X: torch.Tensor) -> torch.Tensor:
    """cosine(X) = 1/(N(N−1)) Σ_{i≠j} xᵢᵀxⱼ / (‖xᵢ‖ ‖xⱼ‖)."""
    N = X.shape[-2]
    U = X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-300)
    G = U @ U.transpose(-1, -2)
    return (G.sum((-1, -2)) - G.diagonal(dim1=-2, dim2=-1).sum(-1)) / (N * (N - 1))


PROBES = {"norm": token_norm, "pairwise_distance": pairwise_distance,
          "sharpness": sharpness, "cosine": mean_cosine}


# ================================================================================================
# 4. The trained layer: multi-head attention (always through SDPA) and the Transformer block
# ================================================================================================
PE_IN_ATTENTION = ("none", "rope", "rope-axial", "rope-mixed")
LAM_MODES = ("identity", "softplus-diag")
REGIMES = ("free", "divergent", "intermediate", "convergent")
# Attention's options beyond the papers' (a symmetric or ρ-capped A, and the λ-term's controls), each
# with the value that means "off". A run or checkpoint made before an option existed was made at
# that value (training.check_config and the experiment runner read a missing key so).
ATTENTION_OPTIONS = {"symmetric_A": False, "rho_cap": 0.0, "lam_frozen": False, "extra_qk": False}


def attention_mask(n: int, dtype, device, attn_bias=None, key_padding_mask=None, causal=False):
    """SDPA's (attn_mask, is_causal) for n tokens: a float mask = bias, −inf on padded keys and,
    when causal, above the diagonal (j > i); or (None, causal) when there is nothing to add, so
    that the fused causal kernels can run."""
    if attn_bias is None and key_padding_mask is None:
        return None, causal
    mask = torch.zeros(1, 1, n, n, dtype=dtype, device=device)
    if attn_bias is not None:
        mask = mask + attn_bias.to(dtype)                                       # + bᵢⱼ
    if key_padding_mask is not None:
        mask = mask.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    if causal:
        mask = mask.masked_fill(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))
    return mask, False


@functools.lru_cache(maxsize=16)
def _causal_bias(n: int, dtype, device) -> torch.Tensor:
    """(1, n, n) additive causal mask: 0 on and below the diagonal, −inf above it (j > i)."""
    bias = torch.zeros(n, n, dtype=dtype, device=device)
    return bias.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=device).triu(1), float("-inf"))[None]


def _explicit_attention(q, k, v, mask, is_causal: bool, dropout_p: float, scale: float):
    """softmax(q kᵀ · scale + mask) v for (B, H, n, ·) tensors, as SDPA's math kernel computes it,
    with the logits made by one batched multiply-add (baddbmm: bias + scale · q kᵀ). No padded keys
    (a fully masked row would be NaN here, 0 in SDPA): Attention sends those to SDPA."""
    B, H, n, w = q.shape
    if mask is None and is_causal:
        mask = _causal_bias(n, q.dtype, q.device)
    if mask is not None and mask.dim() == 4 and mask.shape[:2] == (1, 1):
        mask = mask[0]                                                        # (1, n, n) broadcasts
    q3, k3 = q.reshape(B * H, n, w), k.reshape(B * H, n, w)
    if mask is None:
        S = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
    elif mask.dim() == 3:
        S = torch.baddbmm(mask, q3, k3.transpose(1, 2), alpha=scale)           # bias + scale q kᵀ
    else:
        S = (torch.bmm(q3, k3.transpose(1, 2)) * scale).view(B, H, n, n) + mask
    P = torch.softmax(S.view(B, H, n, n), dim=-1)
    if dropout_p > 0.0:
        P = F.dropout(P, p=dropout_p)
    return P @ v


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, the λ-term and definiteness-constrained weights.

    Head h of H (width d_h = d/H) computes, for the attention input rows xᵢ (after LayerNorm):
        logitᵢⱼ = [ (xᵢQₕ) R(i)ᵀ · (xⱼKₕ) R(j)ᵀ  +  λₕ xᵢ⁽ʰ⁾ᵀ Mₕ xⱼ⁽ʰ⁾ ] / √d_h + biasᵢⱼ
    where xᵢ⁽ʰ⁾ is head h's d_h-slice of xᵢ (the authors' choice, docs/dynamics.md §3.2).

    The λ-term is folded into SDPA's features instead of an n×n bias: with
        q̃ᵢ = [ qᵢ R(i)ᵀ , λₕ Mₕ xᵢ⁽ʰ⁾ ]   and   k̃ⱼ = [ kⱼ R(j)ᵀ , xⱼ⁽ʰ⁾ ]
    q̃ᵢ · k̃ⱼ is exactly the bracket above (Mₕ diagonal), so F.scaled_dot_product_attention (with
    scale = 1/√d_h passed explicitly) computes it with fused kernels on GPU.
      lam_mode "identity":      Mₕ = I, λₕ a learnable scalar per head, any sign (init `lam`);
      lam_mode "softplus-diag": λₕMₕ = diag(softplus(φₕ)) per dimension, always positive
                                (the authors' code, init softplus(φ) = lam > 0).

    2-D RoPE (pe "rope-axial" / "rope-mixed") takes (n_patches, 2) positions for the LAST n_patches
    tokens; leading tokens without a position (a class token) are not rotated, which makes them
    behave as if they sat at (0, 0) — so with class-token pooling a RoPE model can read absolute
    positions through it. The rotary base defaults to 10⁴ (image grids usually want ~100).

    regime != "free" (the paper's PD/HD/ND runs, docs/dynamics.md §3.1): W = S_W + T_W and
    A = S_A + T_A, S = L D Lᵀ of fixed inertia (regimes.PrescribedInertia), T antisymmetric. Q (d × d)
    is free and K, V are computed at every forward so that Q Kᵀ = W (the realised logit form
    Σₕ QₕKₕᵀ is exactly W) and A Vᵀ = W (the value map gives exactly A) — regimes.WarmKeysValues: on
    CUDA by Newton–Schulz from the last call's inverses, checked to round-off, with an LU solve where
    the check fails; the LU solve on a CPU. (A is invertible in the definite regimes, σ_min(A) ≥
    min|λ(A_sym)|; the intermediate regime's indefinite A can pass near singular.) No output projection (V
    is the full d × d value map) and no biases whatever `bias` says (a value bias would make
    Attn(0) = b_v, an affine layer, not the field). W_sym ≻ 0 always; A_sym ≻ 0 (divergent, PD), ⌊d/2⌋ negative
    eigenvalues (intermediate, HD), ≺ 0 (convergent, ND). Unlike the authors' code the constraint is
    exact (docs/dynamics.md §3.1, the convention caveat). symmetric_A: no antisymmetric part in A
    (train_tied.py's arms; the authors' runs leave T_A free, and training grows it). rho_cap > 0: T_A
    is scaled down, where needed, so that ρ = ‖T_A‖₂/‖S_A‖₂ ≤ rho_cap at every forward (a cap on ρ
    does not by itself make V Hurwitz; only ρ = 0 does in the convergent regime).

    Controls for the λ-term (issue: is its gain the definiteness mechanism or extra capacity?):
    lam_frozen keeps λ at its initial value (not trained); extra_qk adds a second, unrotated, learned
    query/key channel of width d_h per head, q̃ = [R q, x Q_c], k̃ = [R k, x K_c]: the same extra
    logit rank (d_h) as the λ-term's [λx, x], but with no sign and no definiteness to it (the free
    regime only: a constrained layer's logit form must stay exactly W).
    """

    def __init__(self, d: int, n_heads: int, *, causal: bool = False, pe: str = "none",
                 rope_base: float = 10000.0, rope_pairing: str = "interleaved",
                 rope_heads: int | None = None, lam: float = 0.0, lam_mode: str = "identity",
                 regime: str = "free", bias: bool = False, dropout: float = 0.0,
                 symmetric_A: bool = False, rho_cap: float = 0.0, lam_frozen: bool = False,
                 extra_qk: bool = False):
        super().__init__()
        if d <= 0 or n_heads <= 0 or d % n_heads:
            raise ValueError(f"model width {d} must be a positive multiple of n_heads={n_heads}.")
        if pe not in PE_IN_ATTENTION:
            raise ValueError(f"unknown attention PE {pe!r}; choose one of {PE_IN_ATTENTION} "
                             "(additive PEs are added at the embedding, ALiBi/T5 come as attn_bias).")
        for name, v, choices in (("lam_mode", lam_mode, LAM_MODES), ("regime", regime, REGIMES)):
            if v not in choices:
                raise ValueError(f"unknown {name} {v!r}; choose one of {choices}.")
        if not math.isfinite(lam):
            raise ValueError(f"lam must be finite, got {lam}.")
        if lam_mode == "softplus-diag" and lam < 0:
            raise ValueError(f"lam_mode 'softplus-diag' keeps λ positive; got a negative lam={lam} "
                             "(use lam_mode 'identity' for a negative λ).")
        self.d, self.n_heads, self.d_h = d, n_heads, d // n_heads
        self.causal, self.pe, self.rope_base, self.rope_pairing = causal, pe, rope_base, rope_pairing
        if pe != "none" and self.d_h % (4 if pe == "rope-axial" else 2):
            raise ValueError(f"{pe} needs a head width divisible by {4 if pe == 'rope-axial' else 2}, "
                             f"got {self.d_h}.")
        self.rope_heads = n_heads if rope_heads is None else rope_heads
        if not 0 <= self.rope_heads <= n_heads:
            raise ValueError(f"rope_heads must be in [0, {n_heads}], got {rope_heads}.")
        if symmetric_A and regime == "free":
            raise ValueError("symmetric_A constrains A, so it needs a constrained regime, not 'free'.")
        if not (math.isfinite(rho_cap) and rho_cap >= 0):
            raise ValueError(f"rho_cap must be 0 (off) or a positive number, got {rho_cap}.")
        if rho_cap and (regime == "free" or symmetric_A):
            raise ValueError("rho_cap caps A's antisymmetric part, so it needs a constrained regime "
                             "with an antisymmetric part (not 'free', not symmetric_A).")
        if lam_frozen and lam == 0.0:
            raise ValueError("lam_frozen freezes the λ-term, so it needs lam ≠ 0.")
        if extra_qk and regime != "free":
            raise ValueError("extra_qk adds a learned logit channel, which a constrained regime's exact "
                             "logit form W does not allow: use it with regime 'free'.")
        self.regime, self.lam_mode, self.dropout = regime, lam_mode, dropout
        self.scale = 1.0 / math.sqrt(self.d_h)
        if pe == "rope-mixed":
            self.rope_mixed = rope_mod.RoPEMixed(self.d_h, n_heads)

        # λ-term parameters (none when lam == 0: the plain model, bit for bit)
        self.use_lam = lam != 0.0
        if self.use_lam and lam_mode == "identity":
            self.lam = nn.Parameter(torch.full((n_heads,), float(lam)))          # λₕ
        elif self.use_lam:
            # softplus(φ) = lam  ⇔  φ = log(exp(lam) − 1)
            self.lam_phi = nn.Parameter(torch.full((n_heads, self.d_h), math.log(math.expm1(lam))))
        self.lam_frozen = lam_frozen
        if lam_frozen:                          # kept in state_dict, never trained (no gradient)
            (self.lam if lam_mode == "identity" else self.lam_phi).requires_grad_(False)
        # the capacity control: [Q_c | K_c]ᵀ, initialised as the layer's own q/k (nn.Linear's default)
        self.extra_qk = nn.Linear(d, 2 * d, bias=False) if extra_qk else None

        if regime == "free":
            self.qkv = nn.Linear(d, 3 * d, bias=bias)                            # [Q | K | V]ᵀ
            self.proj = nn.Linear(d, d, bias=bias)                               # output O
        else:
            n_neg = {"divergent": 0, "intermediate": d // 2, "convergent": d}[regime]
            self.Q = nn.Parameter(torch.nn.init.orthogonal_(torch.empty(d, d)))  # free query map
            self.W_form = regimes.PrescribedInertia(d, n_neg=0, init_scale=0.15)     # W_sym ≻ 0
            # A = S_A + T_A, or S_A alone when symmetric_A (T_A = 0: then V = Wᵀ A⁻¹ is Hurwitz in the
            # convergent regime by construction, λ(V) = v*Wv / v*Av)
            self.A_form = regimes.PrescribedInertia(d, n_neg=n_neg, init_scale=0.15,   # A_sym inertia
                                                    antisymmetric=not symmetric_A, rho_cap=rho_cap)
            # K, V from (Q, W, A): Newton–Schulz from the last call's inverses on CUDA, the LU
            # solve on a CPU (regimes.WarmKeysValues). A plain attribute, not a module or buffer:
            # no parameters, nothing in state_dict (checkpoints unchanged), nothing for DDP to
            # broadcast; it re-starts from an LU after .to() / .double()
            self.kv = regimes.WarmKeysValues()

    def qkv_matrices(self):
        """(Q, K, V) in our row convention (queries = x Q etc.) and the output map O (None = identity)."""
        if self.regime == "free":
            Wq, Wk, Wv = self.qkv.weight.split(self.d, dim=0)
            return Wq.T, Wk.T, Wv.T, self.proj.weight.T
        # solve in float32 at least (never in bf16 under autocast), float64 if the module is float64
        dt = torch.float64 if self.Q.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=self.Q.device.type, enabled=False):
            Q = self.Q.to(dt)
            W, A = self.W_form().to(dt), self.A_form().to(dt)
            # Kᵀ = Q⁻¹ W, Vᵀ = A⁻¹ W: on CUDA by Newton–Schulz from the last call's inverses, checked to
            # round-off, with an LU solve where the check fails (regimes.WarmKeysValues); the LU solve
            # on a CPU. No error raised inside (Q is checked below, off the hot path)
            K, V, singular = self.kv(Q, W, A)
        if not self.training and bool(singular):
            raise ValueError("the constrained attention's query map Q became singular.")
        return Q, K, V, None

    def interaction(self) -> dict:
        """Everything regimes.analyse_layer needs, float64, row convention."""
        with torch.no_grad():
            Q, K, V, O = self.qkv_matrices()
            return {"Q": Q.double(), "K": K.double(), "V": V.double(),
                    "O": None if O is None else O.double(), "n_heads": self.n_heads,
                    "scale": self.scale, "pe": self.pe, "regime": self.regime, "lam": self.lam_values()}

    def lam_values(self):
        if not self.use_lam:
            return None
        if self.lam_mode == "identity":
            return self.lam.detach().double().cpu()
        return F.softplus(self.lam_phi.detach().double()).cpu()

    def _rotate(self, t: torch.Tensor, positions) -> torch.Tensor:
        """Apply the attention PE to q or k of shape (B, H, n, d_h)."""
        if self.pe == "none" or self.rope_heads == 0:
            return t
        n = t.shape[-2]
        if positions is None:
            if self.pe != "rope":
                raise ValueError(f"pe={self.pe!r} needs (n, 2) patch positions.")
            # positions i = 0 … n − 1: cos, sin of i θ_k from rope_table's cache (built once per shape)
            cos, sin = rope_mod.rope_table(n, self.d_h, self.rope_base, t.dtype, t.device)
            if self.rope_heads == self.n_heads:
                return rope_mod.rotate(t, cos, sin, self.rope_pairing)             # qᵢ R(i)ᵀ, every head
            r = rope_mod.rotate(t[:, : self.rope_heads], cos, sin, self.rope_pairing)
            return torch.cat((r, t[:, self.rope_heads:]), dim=1)                  # the rest unrotated
        positions = torch.as_tensor(positions, device=t.device)
        # tokens before the first positioned one (e.g. a class token) are not rotated
        n_pre = n - positions.shape[0]
        if n_pre < 0:
            raise ValueError(f"{positions.shape[0]} positions for a sequence of {n} tokens.")
        r, keep = t[:, : self.rope_heads, n_pre:], t[:, : self.rope_heads, :n_pre]
        if self.pe == "rope":
            r = rope_mod.apply_rope(r, positions, self.rope_base, self.rope_pairing)
        elif self.pe == "rope-axial":
            r = rope_mod.apply_rope_2d(r, positions, base=self.rope_base, pairing=self.rope_pairing)
        else:  # RoPE-Mixed holds frequencies for every head: rotate all, keep the first rope_heads
            r = self.rope_mixed(t[:, :, n_pre:], positions)[:, : self.rope_heads]
        if n_pre:
            r = torch.cat((keep, r), dim=2)                                       # prefix unrotated
        if self.rope_heads < self.n_heads:
            r = torch.cat((r, t[:, self.rope_heads:]), dim=1)                     # heads ≥ rope_heads
        return r

    def _qkv(self, x: torch.Tensor, positions, kv: torch.Tensor | None = None):
        """The per-head queries, keys and values (B, H, n, ·) the softmax sees: q, k rotated by the
        PE, then widened by the λ-term [λx, x] and the extra channel [x Q_c, x K_c] where present.
        kv: the tokens keys and values are read from (B, n, d), when not x itself — the Spectral
        paper's wiring, where every layer attends from its stream x to the layer-0 embeddings."""
        B, n, d = x.shape
        H, dh = self.n_heads, self.d_h
        if d != self.d:
            raise ValueError(f"input width {d} does not match the layer's {self.d}.")
        if kv is not None and kv.shape != x.shape:
            raise ValueError(f"the key/value tokens have shape {tuple(kv.shape)}, the queries' {tuple(x.shape)}.")
        Q, K, V, O = self.qkv_matrices()

        def project(t):                                                         # (B, n, 3, H, d_h) → 3 × (B, H, n, d_h)
            out = self.qkv(t) if self.regime == "free" else t @ torch.cat((Q, K, V), dim=1).to(t.dtype)
            return out.view(B, n, 3, H, dh).permute(2, 0, 3, 1, 4)                # x [Q | K | V] (no bias if constrained)
        q, k, v = project(x)
        if kv is not None:
            _, k, v = project(kv)                                               # kⱼ, vⱼ from the kv tokens
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        if self.use_lam:
            xh = x.view(B, n, H, dh).transpose(1, 2)                            # xᵢ⁽ʰ⁾ (B, H, n, d_h)
            sh = xh if kv is None else kv.view(B, n, H, dh).transpose(1, 2)     # the keys' tokens
            if self.lam_mode == "identity":
                lam_x = self.lam.to(x.dtype)[None, :, None, None] * xh          # λₕ xᵢ⁽ʰ⁾
            else:
                lam_x = F.softplus(self.lam_phi).to(x.dtype)[None, :, None, :] * xh  # Λₕ xᵢ⁽ʰ⁾
            q = torch.cat((q, lam_x), dim=-1)                                   # q̃ᵢ
            k = torch.cat((k, sh), dim=-1)                                      # k̃ⱼ
        if self.extra_qk is not None:
            # the unrotated learned channel: logits + (x Q_c)ᵢ · (x K_c)ⱼ per head
            qc, kc = self.extra_qk(x).view(B, n, 2, H, dh).permute(2, 0, 3, 1, 4)
            if kv is not None:
                _, kc = self.extra_qk(kv).view(B, n, 2, H, dh).permute(2, 0, 3, 1, 4)
            q, k = torch.cat((q, qc), dim=-1), torch.cat((k, kc), dim=-1)
        return q, k, v

    def weights(self, x: torch.Tensor, *, positions=None, attn_bias=None, key_padding_mask=None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """The attention probabilities P (B, H, n, n) that forward() applies (no dropout), written
        out: softmax(q̃ k̃ᵀ / √d_h + mask) per head. For probes (entropy), not the hot path."""
        q, k, _ = self._qkv(x, positions, kv)
        n = x.shape[1]
        mask, is_causal = attention_mask(n, q.dtype, x.device, attn_bias, key_padding_mask, self.causal)
        S = (q @ k.transpose(-1, -2)) * self.scale
        if mask is None and is_causal:
            mask = _causal_bias(n, S.dtype, S.device)                          # (1, n, n)
        return torch.softmax(S if mask is None else S + mask, dim=-1)

    def forward(self, x: torch.Tensor, *, positions=None, attn_bias: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None, kv: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, d) → (B, n, d). attn_bias: float (H, n, n) or (B, H, n, n) added to the logits.
        key_padding_mask: bool (B, n), True where the token is real. head_mask: (H,) multiplies each
        head's output before the output projection (0 ablates a head). kv: keys and values from these
        tokens instead of x (see _qkv)."""
        B, n, d = x.shape
        q, k, v = self._qkv(x, positions, kv)
        mask, is_causal = attention_mask(n, q.dtype, x.device, attn_bias, key_padding_mask, self.causal)
        dropout_p = self.dropout if self.training else 0.0
        if q.shape[-1] != v.shape[-1] and x.device.type == "cpu" and key_padding_mask is None:
            # softmax(q̃ k̃ᵀ / √d_h + bias) v written out: with λ (or extra_qk), q̃, k̃ and v differ in
            # width, which sends SDPA on a CPU to its math kernel; the same three steps written here
            # run faster (measured in analysis/bench_lm.py, see the README's speed section)
            y = _explicit_attention(q, k, v, mask, is_causal, dropout_p, self.scale)
        else:
            # fused on GPU. With λ the flash kernels refuse the unequal widths: the GPU takes cuDNN /
            # memory-efficient attention (zero-padding v admits flash but was slower on the H100;
            # see results/speed/h100/README.md)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               dropout_p=dropout_p, scale=self.scale)
        if head_mask is not None:
            y = y * head_mask.to(y.dtype)[None, :, None, None]
        y = y.transpose(1, 2).reshape(B, n, d)                                   # concat heads
        return self.proj(y) if self.regime == "free" else y                      # y O, or y


class Block(nn.Module):
    """Pre-LN Transformer block: one Euler step (step size 1) of the attention field, then an MLP.

        x ← x + DropPath(Attn(LN₁(x)))          (Euler step of (F) for the normalised tokens)
        x ← x + DropPath(MLP(LN₂(x)))
    attention_only=True gives x ← x + Attn(x): no LayerNorm, no MLP — the discrete field itself,
    as in the authors' probing mode (docs/dynamics.md §5.4).
    """

    def __init__(self, d: int, n_heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0, causal: bool = False, pe: str = "none",
                 rope_base: float = 10000.0, rope_pairing: str = "interleaved",
                 rope_heads: int | None = None, lam: float = 0.0, lam_mode: str = "identity",
                 regime: str = "free", bias: bool = False, attn: nn.Module | None = None,
                 symmetric_A: bool = False, rho_cap: float = 0.0, lam_frozen: bool = False,
                 extra_qk: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = attn if attn is not None else Attention(       # the knobs: unused if `attn` is given
            d, n_heads, causal=causal, pe=pe, rope_base=rope_base, rope_pairing=rope_pairing,
            rope_heads=rope_heads, lam=lam, lam_mode=lam_mode, regime=regime, bias=bias, dropout=dropout,
            symmetric_A=symmetric_A, rho_cap=rho_cap, lam_frozen=lam_frozen, extra_qk=extra_qk)
        hidden = int(round(mlp_ratio * d))
        if hidden <= 0:
            raise ValueError(f"mlp_ratio={mlp_ratio} gives an empty MLP.")
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d),
                                 nn.Dropout(dropout))
        self.drop_path = drop_path

    def _dp(self, y: torch.Tensor) -> torch.Tensor:
        """Stochastic depth: drop the whole residual branch per sample with prob. p, rescale by 1/(1−p)."""
        if not self.training or self.drop_path == 0.0:
            return y
        keep = torch.rand(y.shape[0], *([1] * (y.ndim - 1)), device=y.device) >= self.drop_path
        return y * keep.to(y.dtype) / (1.0 - self.drop_path)

    def forward(self, x: torch.Tensor, *, positions=None, attn_bias=None, key_padding_mask=None,
                head_mask=None, attention_only: bool = False, kv: torch.Tensor | None = None) -> torch.Tensor:
        """kv: the Spectral paper's wiring — keys and values from these tokens (its layer-0
        embeddings + PE, not normalised), queries from LN₁(x): x ← x + Attn(LN₁(x) → kv)."""
        kw = dict(positions=positions, attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                  head_mask=head_mask)
        if kv is not None:
            kw["kv"] = kv
        if attention_only:
            return x + self.attn(x, **kw)                                       # x + Attn(x)
        x = x + self._dp(self.attn(self.ln1(x), **kw))
        return x + self._dp(self.mlp(self.ln2(x)))


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters that weight decay must not drag towards 0: every λ-term parameter (Attention.lam,
    Attention.lam_phi) and every LDL diagonal θ (regimes.PrescribedInertia), found by module type."""
    out = []
    for m in model.modules():
        if isinstance(m, Attention):
            out += [p for p in (getattr(m, "lam", None), getattr(m, "lam_phi", None)) if p is not None]
        elif isinstance(m, regimes.PrescribedInertia):
            out.append(m.theta)
    return out
