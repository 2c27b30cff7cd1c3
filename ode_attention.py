"""Self-attention as a continuous-time dynamical system of tokens, and the Transformer block.

Conventions (stated once, here; DESIGN.md)
------------------------------------------
Tokens are ROWS: X has shape (..., n, d). The theoretical single-head field is

    dX/dt = softmax(X Q Kᵀ Xᵀ) X V,        W = Q Kᵀ,   A = W (Vᵀ)⁻¹   (so that A Vᵀ = W)     (F)

with Q, K of shape (d, d_k) and V of shape (d, d). No 1/√d inside the theoretical field (absorb it
into W); the trained blocks below use the usual 1/√d_head. In column form, token i moves as

    ẋᵢ = Σⱼ Pᵢⱼ Vᵀ xⱼ,        Pᵢⱼ = exp(xᵢᵀ W xⱼ) / Σₖ exp(xᵢᵀ W xₖ)                          (F')

(causal models sum over j ≤ i). The identity behind the whole analysis (notes §1.2):

    xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ A Vᵀ xⱼ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ                                         (I)

For symmetric A the left side is ½ d/dt (xᵢᵀ A xᵢ). Softmax weights are co-monotone with the
logits, so Σⱼ Pᵢⱼ sᵢⱼ ≥ (1/n) Σⱼ sᵢⱼ, and summing over i gives (1/n) Sᵀ W S ≥ 0 when W_sym ⪰ 0
(S = Σⱼ xⱼ). Hence E(t) = Σᵢ xᵢᵀ A xᵢ is non-decreasing when A is symmetric and W_sym ⪰ 0
(non-causal). With A ≺ 0 that bounds the tokens ("convergent" side); with A ≻ 0 it stops them
collapsing to 0 ("divergent" side). regimes.py turns this into the classification.

Why convergence is slow (measured; see tests/test_ode_attention.py and the README)
--------------------------------------------------------------------------------
Near X = 0 every logit xᵢᵀ W xⱼ → 0, attention becomes uniform, Pᵢⱼ → 1/n, and (F') becomes
ẋᵢ = Vᵀ x̄ for every i: the MEAN x̄ obeys the linear ODE dx̄/dt = Vᵀ x̄ and decays exponentially when
Vᵀ is stable, but the DIFFERENCES δᵢ = xᵢ − x̄ have zero velocity to first order. They decay only
through the correction Pᵢⱼ − 1/n ≈ (1/n)(sᵢⱼ − s̄ᵢ), quadratic in δ, so the velocity of δ is cubic,
d‖δ‖/dt ≈ −c ‖δ‖³, and ‖δ‖ ≈ (2ct)^(−1/2): algebraic, not exponential. Once the mean has caught
up with that cubic forcing it stays slaved to it, far below ‖δ‖. Measured (tests, 64 symmetric
instances, d = 4, n = 8, dopri5 to t = 400): log-log slope of the mean token norm over [50, 400]
−0.49 ± 0.02, and ‖x̄‖ ≤ 6e−6 ‖X‖ at t = 400. Tests therefore check what the theory guarantees
(monotone E, a falling norm with the measured power law) rather than waiting for 1e−6.

Positional encodings in the field
---------------------------------
* absolute PE: the token that drives the field is yᵢ = xᵢ + pᵢ (pᵢ fixed), and
  ẋᵢ = Σⱼ Pᵢⱼ(Y) Vᵀ yⱼ — "converges to zero" now means yᵢ → 0, i.e. xᵢ → −pᵢ (shifted equilibrium).
* RoPE: rotate the query row xᵢQ by position i and the key row xⱼK by position j (rope.py); the
  logit becomes xᵢᵀ Q R(j−i) Kᵀ xⱼ = xᵢᵀ (W + ΔWᵢⱼ) xⱼ with ΔWᵢⱼ = Q (R(j−i) − I) Kᵀ.
* λ-term: add λ xᵢᵀ M xⱼ to the logits (M = I, or M = A in the theoretical model): the logit
  matrix becomes W + λM. The seed summary uses λ < 0 ("subtract from the diagonal"); the authors'
  code adds a positive softplus-kept diagonal initialised at 0.05. Both signs are supported.

Contents: velocity, integrate (Euler, RK4, adaptive Dormand–Prince 5(4)), the token-geometry probes
(notes §5.4), and the trained layer: Attention and Block (one Euler step of the field plus an MLP).
Run `python ode_attention.py --help` for the simulation script.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import regimes
import rope as rope_mod

# ================================================================================================
# 1. The vector field
# ================================================================================================
FIELD_OPTIONS = ("causal", "pos", "rope", "rope_base", "rope_pairing", "lam", "lam_M")


def _check_tensor(name: str, t, ndim_min: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}.")
    if t.ndim < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimensions, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    return t


def _check_field_inputs(X, Q, K, V) -> None:
    _check_tensor("X", X, 2)
    _check_tensor("Q", Q, 2)
    _check_tensor("K", K, 2)
    _check_tensor("V", V, 2)
    d = X.shape[-1]
    if Q.shape[-2] != d or K.shape[-2] != d:
        raise ValueError(f"Q and K must have shape (d, d_k) with d = {d} (the token size); got "
                         f"{tuple(Q.shape)} and {tuple(K.shape)}.")
    if Q.shape[-1] != K.shape[-1]:
        raise ValueError(f"Q and K must share d_k; got {tuple(Q.shape)} and {tuple(K.shape)}.")
    if V.shape[-2:] != (d, d):
        raise ValueError(f"V must have shape (d, d) = ({d}, {d}), got {tuple(V.shape)}.")
    try:
        torch.broadcast_shapes(X.shape[:-2], Q.shape[:-2], K.shape[:-2], V.shape[:-2])
    except RuntimeError:
        raise ValueError(f"batch dimensions do not broadcast: X {tuple(X.shape)}, Q {tuple(Q.shape)}, "
                         f"K {tuple(K.shape)}, V {tuple(V.shape)}.") from None


def velocity(X: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, *,
             causal: bool = False, pos: torch.Tensor | None = None, rope: bool = False,
             rope_base: float = 10000.0, rope_pairing: str = "interleaved",
             lam: float = 0.0, lam_M: torch.Tensor | None = None) -> torch.Tensor:
    """dX/dt of the attention field (F), batched over any leading dimensions.

    X: (n, d) or (..., n, d). Q, K: (d, d_k) or (..., d, d_k); V: (d, d) or (..., d, d) — leading
    dimensions broadcast, so many instances (each with its own Q, K, V) integrate at once.
    causal: sum over j ≤ i only. pos: (n, d) absolute PE added to the driving token.
    rope: rotate xQ and xK by token position (needs even d_k). lam, lam_M: add λ xᵢᵀ M xⱼ to the
    logits (M = I when lam_M is None). With no options this is exactly softmax(X Q Kᵀ Xᵀ) X V.
    """
    _check_options(X, Q, K, V, pos=pos, rope=rope, lam=lam, lam_M=lam_M)
    return _velocity(X, Q, K, V, causal=causal, pos=pos, rope=rope, rope_base=rope_base,
                     rope_pairing=rope_pairing, lam=lam, lam_M=lam_M)


def _check_options(X, Q, K, V, *, pos=None, rope=False, lam=0.0, lam_M=None, **_) -> None:
    """Every check velocity() makes, without computing the field (integrate() calls it once)."""
    _check_field_inputs(X, Q, K, V)
    n, d = X.shape[-2:]
    if pos is not None:
        _check_tensor("pos", pos, 2)
        if pos.shape[-2:] != (n, d):
            raise ValueError(f"pos must have shape (n, d) = ({n}, {d}), got {tuple(pos.shape)}.")
    if rope and Q.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even d_k, got {Q.shape[-1]}.")
    if lam_M is not None:
        _check_tensor("lam_M", lam_M, 2)
        if lam_M.shape[-2:] != (d, d):
            raise ValueError(f"lam_M must have shape (d, d) = ({d}, {d}), got {tuple(lam_M.shape)}.")
    if not math.isfinite(lam):
        raise ValueError(f"lam must be finite, got {lam}.")


def _velocity(X, Q, K, V, *, causal=False, pos=None, rope=False, rope_base=10000.0,
              rope_pairing="interleaved", lam=0.0, lam_M=None):
    """The field itself, inputs already checked (integrate() calls this once per stage)."""
    n = X.shape[-2]
    # yᵢ = xᵢ + pᵢ: absolute PE shifts the token that drives the field (equilibrium at xᵢ = −pᵢ)
    Y = X if pos is None else X + pos
    q = Y @ Q                                                    # qᵢ = yᵢᵀ Q    (..., n, d_k)
    k = Y @ K                                                    # kⱼ = yⱼᵀ K
    if rope:
        t = torch.arange(n, device=X.device)
        q = rope_mod.apply_rope(q, t, rope_base, rope_pairing)  # qᵢ R(i)ᵀ
        k = rope_mod.apply_rope(k, t, rope_base, rope_pairing)  # kⱼ R(j)ᵀ
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
    # Pᵢⱼ = exp(sᵢⱼ − mᵢ) / Σₖ exp(sᵢₖ − mᵢ), mᵢ = maxₖ sᵢₖ  — softmax written out: for the toy
    # field's tiny rows it is ~3× faster on CPU than torch.softmax (measured), and identical.
    E = (S - S.amax(-1, keepdim=True)).exp()
    P = E / E.sum(-1, keepdim=True)
    return P @ (Y @ V)                                            # ẋᵢ = Σⱼ Pᵢⱼ yⱼᵀ V  (row form)


# ================================================================================================
# 2. Integrators: Euler, RK4, adaptive Dormand–Prince 5(4) — batched over instances
# ================================================================================================
@dataclass
class Trajectory:
    """What integrate() returns.

    t: (T,) saved times. X: (T, *batch, n, d) saved states, batch = the broadcast leading
    dimensions of X0, Q, K, V and the options (a blown-up instance stays frozen at its last good
    state, so X never holds NaNs). status: "ok", or a message saying which instances
    blew up, when and why. blown: (batch,) bool; t_blow: (batch,) time of blow-up (inf if none).
    """
    t: torch.Tensor
    X: torch.Tensor
    status: str
    blown: torch.Tensor
    t_blow: torch.Tensor
    n_steps: int = 0
    n_rejected: int = 0
    n_evals: int = 0
    reasons: list = field(default_factory=list)


# Dormand–Prince 5(4) Butcher tableau (Dormand & Prince 1980; the method of MATLAB's ode45).
# The field is autonomous (no explicit t), so the nodes c = (0, 1/5, 3/10, 4/5, 8/9, 1, 1) are
# not needed; only the stage weights a_ij and the two solution weights b are.
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)        # 5th order
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)  # 4th


def integrate(X0: torch.Tensor, Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, t_end: float,
              dt: float, method: str = "rk4", *, rtol: float = 1e-6, atol: float = 1e-9,
              max_norm: float = 1e6, n_save: int = 201, max_steps: int = 1_000_000,
              progress: bool = False, **options) -> Trajectory:
    """Integrate dX/dt = velocity(X, Q, K, V, **options) from t = 0 to t_end.

    method: "euler" (x ← x + h f), "rk4" (classical 4th order), "dopri5" (adaptive embedded
    Runge–Kutta 5(4); the error of each instance is kept within ‖err‖_RMS ≤ atol + rtol·|x|, and dt
    is the first trial step). All instances (the broadcast leading dimensions of X0, Q, K, V and the
    options) advance together. An instance whose state turns non-finite or whose largest token norm
    exceeds max_norm is frozen at its last good state, reported in `status`, and dropped from the
    working batch; the others go on. n_save evenly spaced times are saved (fixed-step methods save
    on the step grid nearest to them; dopri5 lands on them exactly).
    """
    unknown = set(options) - set(FIELD_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; the field accepts {list(FIELD_OPTIONS)}.")
    if method not in ("euler", "rk4", "dopri5"):
        raise ValueError(f"unknown method {method!r}; choose 'euler', 'rk4' or 'dopri5'.")
    for name, v in (("t_end", t_end), ("dt", dt), ("max_norm", max_norm), ("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    if not isinstance(n_save, int) or n_save < 2:
        raise ValueError(f"n_save must be an integer >= 2, got {n_save!r}.")
    _check_options(X0, Q, K, V, **options)                             # validate everything once

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
        """The field restricted to the active instances `act` (indices into the flat batch)."""
        p = {**shared, **{k: t[act] for k, t in batched.items()}}
        q_, k_, v_ = p.pop("Q"), p.pop("K"), p.pop("V")
        return lambda X: _velocity(X, q_, k_, v_, **p, **scalars)

    x = flat(X0).clone()                                               # (B, n, d), all instances
    alive = torch.ones(B, dtype=torch.bool)
    t_blow = torch.full((B,), math.inf, dtype=torch.float64)
    reasons: list[str] = []
    act = torch.arange(B)
    f = field_on(act)

    def advance(x_new_act: torch.Tensor, t_new: float):
        """Write the new states of the active instances back; freeze and drop the ones that blew up."""
        nonlocal act, f
        # largest token norm per instance against the bound; NaN or inf anywhere fails `<=` too.
        # Squared norms (no sqrt) unless the squared bound itself would overflow.
        if max_norm < 1e150:
            bad = ~(x_new_act.pow(2).sum(-1).amax(-1) <= max_norm * max_norm)
        else:
            bad = ~(torch.linalg.vector_norm(x_new_act, dim=-1).amax(-1) <= max_norm)
        if not bool(bad.any()):                                  # the common case: no gather/scatter
            if act.numel() == B:
                x.copy_(x_new_act)
            else:
                x[act] = x_new_act
            return bad
        good = ~bad
        finite = torch.isfinite(x_new_act).flatten(-2).all(-1)
        x[act[good]] = x_new_act[good]
        for j in bad.nonzero().flatten().tolist():
            i = int(act[j])
            t_blow[i] = t_new
            if len(reasons) < 3:
                idx = i if len(bshape) <= 1 else tuple(torch.unravel_index(torch.tensor(i), bshape))
                why = "non-finite" if not finite[j] else f"norm > {max_norm:g}"
                reasons.append(f"instance {idx} at t={t_new:.4g} ({why})")
        alive[act[bad]] = False
        act = act[good]
        f = field_on(act)
        return bad

    t_save = torch.linspace(0.0, float(t_end), n_save, dtype=torch.float64)
    ts, xs = [0.0], [x.clone()]
    n_steps = n_rej = n_evals = 0
    t = 0.0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=float(t_end), desc=f"integrate[{method}]", unit="t", leave=False)

    if method in ("euler", "rk4"):
        N = max(1, int(math.ceil(t_end / dt - 1e-9)))
        if N > max_steps:
            raise ValueError(f"t_end/dt needs {N} steps, more than max_steps={max_steps}.")
        h = t_end / N                                                  # lands exactly on t_end
        save_at = set(torch.round(t_save / h).long().tolist())
        for s in range(1, N + 1):
            xa = x if act.numel() == B else x[act]
            if method == "euler":
                # X_{k+1} = X_k + h f(X_k)
                x_new = xa + h * f(xa)
                n_evals += 1
            else:
                # classical RK4: k1 = f(x), k2 = f(x + h/2 k1), k3 = f(x + h/2 k2), k4 = f(x + h k3)
                k1 = f(xa)
                k2 = f(xa + 0.5 * h * k1)
                k3 = f(xa + 0.5 * h * k2)
                k4 = f(xa + h * k3)
                # X_{k+1} = X_k + h/6 (k1 + 2k2 + 2k3 + k4)
                x_new = xa + (h / 6.0) * (k1 + 2 * k2 + 2 * k3 + k4)
                n_evals += 4
            t = s * h
            advance(x_new, t)
            n_steps += 1
            if s in save_at:
                ts.append(t)
                xs.append(x.clone())
            if bar is not None:
                bar.update(h)
            if act.numel() == 0:
                break
    else:
        h = float(dt)
        k1 = f(x[act])
        n_evals += 1
        next_save = 1
        while t < t_end * (1 - 1e-12) and act.numel() > 0:
            if n_steps + n_rej >= max_steps:
                reasons.append(f"stopped after max_steps={max_steps} at t={t:.4g}")
                break
            h = min(h, float(t_save[next_save]) - t)                   # land on the save times
            xa = x[act]
            ks = [k1]
            for i in range(1, 7):
                # stage i: k_i = f(x + h Σⱼ a_ij k_j)
                ks.append(f(xa + h * sum(a * kj for a, kj in zip(_DP_A[i], ks))))
            n_evals += 6
            x5 = xa + h * sum(b * kj for b, kj in zip(_DP_B5, ks))         # 5th-order solution
            x4 = xa + h * sum(b * kj for b, kj in zip(_DP_B4, ks))         # embedded 4th order
            # scaled error per instance: RMS of |x5 − x4| / (atol + rtol·max(|x|, |x5|))
            scale = atol + rtol * torch.maximum(xa.abs(), torch.nan_to_num(x5.abs(), nan=0.0))
            err = torch.nan_to_num(((x5 - x4) / scale).pow(2).flatten(-2).mean(-1).sqrt(), nan=math.inf)
            err_max = float(err.max())
            # accept within tolerance — or when the step has shrunk to nothing (an instance is
            # blowing up: advance() then freezes and drops it instead of stalling everyone)
            if err_max <= 1.0 or h < 1e-10 * t_end:
                t += h
                bad = advance(x5, t)
                k1 = ks[6][~bad]                                           # FSAL: f(x5) is next k1
                n_steps += 1
                if bar is not None:
                    bar.update(h)
                if abs(t - float(t_save[next_save])) <= 1e-12 * t_end:
                    ts.append(t)
                    xs.append(x.clone())
                    next_save = min(next_save + 1, n_save - 1)
            else:
                n_rej += 1
            # step-size controller: h ← h · clip(0.9 err^(−1/5), 0.2, 5)
            h *= 5.0 if err_max == 0 else min(5.0, max(0.2, 0.9 * err_max ** -0.2))
    if bar is not None:
        bar.close()
    if t > ts[-1]:
        # stopped early (every instance blew up) between save times: keep the frozen final state
        ts.append(t)
        xs.append(x.clone())
    blown = ~alive
    if blown.any():
        status = f"{int(blown.sum())} of {B} instance(s) blew up; first: " + "; ".join(reasons[:3])
    else:
        status = "; ".join(reasons) if reasons else "ok"
    out_shape = bshape + X0.shape[-2:]
    return Trajectory(t=torch.tensor(ts, dtype=torch.float64),
                      X=torch.stack(xs).reshape(len(xs), *out_shape), status=status,
                      blown=blown.reshape(bshape), t_blow=t_blow.reshape(bshape), n_steps=n_steps,
                      n_rejected=n_rej, n_evals=n_evals, reasons=reasons)


# ================================================================================================
# 3. Token-geometry probes (notes §5.4), each X (..., n, d) -> (...,)
# ================================================================================================
def token_norm(X: torch.Tensor) -> torch.Tensor:
    """norm(X) = (1/N) Σᵢ ‖xᵢ‖  — the mean token norm."""
    return torch.linalg.vector_norm(X, dim=-1).mean(-1)


def pairwise_distance(X: torch.Tensor) -> torch.Tensor:
    """dist(X) = Σ_{i,j} ‖xᵢ − xⱼ‖² = 2N Σᵢ ‖xᵢ‖² − 2 ‖Σᵢ xᵢ‖²  (notes §5.4)
                                  = 2N Σᵢ ‖xᵢ − x̄‖²   (computed this way: the middle form cancels
    catastrophically for large, nearly parallel tokens — we saw it go negative on diverging runs)."""
    N = X.shape[-2]
    return 2 * N * (X - X.mean(-2, keepdim=True)).pow(2).sum((-1, -2))


def sharpness(X: torch.Tensor) -> torch.Tensor:
    """sharpness(X) = dist(X) / (2 (N − 1) Σᵢ ‖xᵢ‖²): 0 when all tokens coincide, N/(N−1) max."""
    N = X.shape[-2]
    return pairwise_distance(X) / (2 * (N - 1) * X.pow(2).sum((-1, -2)).clamp_min(1e-300))


def mean_cosine(X: torch.Tensor) -> torch.Tensor:
    """cosine(X) = 1/(N(N−1)) Σ_{i≠j} xᵢᵀxⱼ / (‖xᵢ‖ ‖xⱼ‖)."""
    N = X.shape[-2]
    U = X / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(1e-300)
    G = U @ U.transpose(-1, -2)
    return (G.sum((-1, -2)) - G.diagonal(dim1=-2, dim2=-1).sum(-1)) / (N * (N - 1))


PROBES = {"norm": token_norm, "pairwise_distance": pairwise_distance,
          "sharpness": sharpness, "cosine": mean_cosine}


def probe(X: torch.Tensor) -> dict:
    """All four probes, averaged over any batch dimensions: {name: float}."""
    return {k: float(fn(X.double()).mean()) for k, fn in PROBES.items()}


# ================================================================================================
# 4. The trained layer: multi-head attention (always through SDPA) and the Transformer block
# ================================================================================================
PE_IN_ATTENTION = ("none", "rope", "rope-axial", "rope-mixed")
LAM_MODES = ("identity", "softplus-diag")
REGIMES = ("free", "divergent", "intermediate", "convergent")


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


class Attention(nn.Module):
    """Multi-head self-attention with RoPE, the λ-term and definiteness-constrained weights.

    Head h of H (width d_h = d/H) computes, for the attention input rows xᵢ (after LayerNorm):
        logitᵢⱼ = [ (xᵢQₕ) R(i)ᵀ · (xⱼKₕ) R(j)ᵀ  +  λₕ xᵢ⁽ʰ⁾ᵀ Mₕ xⱼ⁽ʰ⁾ ] / √d_h + biasᵢⱼ
    where xᵢ⁽ʰ⁾ is head h's d_h-slice of xᵢ (the authors' choice, notes §3.2).

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
    positions through it. The rotary base defaults to 10⁴ here; train_vit.py passes its own
    (--rope-base, 100 for image grids, as rope.apply_rope_2d's default).

    regime != "free" (the paper's PD/HD/ND runs, notes §3.1): W = S_W + T_W and A = S_A + T_A with
    S = L D Lᵀ of fixed inertia (regimes.PrescribedInertia) and T antisymmetric; Q (d × d) is free
    and K, V are solved at every forward so that, in our row convention,
        Q Kᵀ = W   ⇒  Kᵀ = Q⁻¹ W            (the realised logit form Σₕ QₕKₕᵀ is exactly W)
        A Vᵀ = W   ⇒  Vᵀ = A⁻¹ W            (the realised value map gives exactly A)
    and there is no output projection (V is already the full d × d value map). W_sym ≻ 0 always;
    A_sym ≻ 0 (divergent, PD), ⌊d/2⌋ negative eigenvalues (intermediate, HD), ≺ 0 (convergent, ND).
    Unlike the authors' code this makes the constraint exact (notes §3.1's convention caveat).
    """

    def __init__(self, d: int, n_heads: int, *, causal: bool = False, pe: str = "none",
                 rope_base: float = 10000.0, rope_pairing: str = "interleaved",
                 rope_heads: int | None = None, lam: float = 0.0, lam_mode: str = "identity",
                 regime: str = "free", bias: bool = False, dropout: float = 0.0):
        super().__init__()
        if d <= 0 or n_heads <= 0 or d % n_heads:
            raise ValueError(f"model width {d} must be a positive multiple of n_heads={n_heads}.")
        if pe not in PE_IN_ATTENTION:
            raise ValueError(f"unknown attention PE {pe!r}; choose one of {PE_IN_ATTENTION} "
                             "(additive PEs are added at the embedding, ALiBi/T5 come as attn_bias).")
        if lam_mode not in LAM_MODES:
            raise ValueError(f"unknown lam_mode {lam_mode!r}; choose one of {LAM_MODES}.")
        if regime not in REGIMES:
            raise ValueError(f"unknown regime {regime!r}; choose one of {REGIMES}.")
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

        if regime == "free":
            self.qkv = nn.Linear(d, 3 * d, bias=bias)                            # [Q | K | V]ᵀ
            self.proj = nn.Linear(d, d, bias=bias)                               # output O
        else:
            from regimes import PrescribedInertia                                # lazy: no cycle
            n_neg = {"divergent": 0, "intermediate": d // 2, "convergent": d}[regime]
            self.Q = nn.Parameter(torch.nn.init.orthogonal_(torch.empty(d, d)))  # free query map
            self.W_form = PrescribedInertia(d, n_neg=0, init_scale=0.15)         # W_sym ≻ 0
            self.A_form = PrescribedInertia(d, n_neg=n_neg, init_scale=0.15)     # A_sym inertia
            self.qkv_bias = nn.Parameter(torch.zeros(3 * d)) if bias else None

    # -- matrices in our row convention -----------------------------------------------------------
    def qkv_matrices(self):
        """(Q, K, V) with queries = x Q etc., and the output map O (None = identity)."""
        if self.regime == "free":
            Wq, Wk, Wv = self.qkv.weight.split(self.d, dim=0)
            return Wq.T, Wk.T, Wv.T, self.proj.weight.T
        # solve in float32 at least (never in bf16 under autocast), float64 if the module is float64
        dt = torch.float64 if self.Q.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=self.Q.device.type, enabled=False):
            Q = self.Q.to(dt)
            W, A = self.W_form().to(dt), self.A_form().to(dt)
            # Kᵀ = Q⁻¹ W  (so that Q Kᵀ = W)  and  Vᵀ = A⁻¹ W  (so that A Vᵀ = W): two LU solves,
            # without the host sync of error checking (A is invertible by construction: A_sym is
            # definite or of fixed nonzero inertia; Q is checked below, off the hot path). Two
            # single solves, not one batched: on CUDA a batch of two 512×512 goes to the small-matrix
            # batched kernels, which took 54% of an H100 training step (torch.profiler).
            K, V, singular = regimes.keys_values(Q, W, A)
        if not self.training and bool(singular):
            raise ValueError("the constrained attention's query map Q became singular.")
        return Q, K, V, None

    def interaction(self) -> dict:
        """Everything regimes.analyse_layer needs, float64, row convention."""
        with torch.no_grad():
            Q, K, V, O = self.qkv_matrices()
            out = {"Q": Q.double(), "K": K.double(), "V": V.double(),
                   "O": None if O is None else O.double(), "n_heads": self.n_heads,
                   "scale": self.scale, "pe": self.pe, "regime": self.regime}
            out["lam"] = self.lam_values()
        return out

    def lam_values(self):
        if not self.use_lam:
            return None
        if self.lam_mode == "identity":
            return self.lam.detach().double().cpu()
        return F.softplus(self.lam_phi.detach().double()).cpu()

    # -- forward ------------------------------------------------------------------------------------
    def _rotate(self, t: torch.Tensor, positions) -> torch.Tensor:
        """Apply the attention PE to q or k of shape (B, H, n, d_h)."""
        if self.pe == "none" or self.rope_heads == 0:
            return t
        n = t.shape[-2]
        if positions is None:
            if self.pe != "rope":
                raise ValueError(f"pe={self.pe!r} needs (n, 2) patch positions.")
            positions = torch.arange(n, device=t.device)
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
        return torch.cat((torch.cat((keep, r), dim=2), t[:, self.rope_heads:]), dim=1)

    def forward(self, x: torch.Tensor, *, positions=None, attn_bias: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None,
                head_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, n, d) → (B, n, d). attn_bias: float (H, n, n) or (B, H, n, n) added to the logits.
        key_padding_mask: bool (B, n), True where the token is real. head_mask: (H,) multiplies each
        head's output before the output projection (0 ablates a head)."""
        B, n, d = x.shape
        H, dh = self.n_heads, self.d_h
        if d != self.d:
            raise ValueError(f"input width {d} does not match the layer's {self.d}.")
        Q, K, V, O = self.qkv_matrices()
        if self.regime == "free":
            qkv = self.qkv(x)
        else:
            Wqkv = torch.cat((Q, K, V), dim=1).to(x.dtype)                       # (d, 3d)
            qkv = x @ Wqkv if self.qkv_bias is None else torch.addmm(
                self.qkv_bias.to(x.dtype), x.reshape(-1, d), Wqkv).view(B, n, 3 * d)
        # (B, n, 3, H, d_h) → three (B, H, n, d_h)
        q, k, v = qkv.view(B, n, 3, H, dh).permute(2, 0, 3, 1, 4)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        if self.use_lam:
            xh = x.view(B, n, H, dh).transpose(1, 2)                            # xᵢ⁽ʰ⁾ (B, H, n, d_h)
            if self.lam_mode == "identity":
                lam_x = self.lam.to(x.dtype)[None, :, None, None] * xh          # λₕ xᵢ⁽ʰ⁾
            else:
                lam_x = F.softplus(self.lam_phi).to(x.dtype)[None, :, None, :] * xh  # Λₕ xᵢ⁽ʰ⁾
            q = torch.cat((q, lam_x), dim=-1)                                   # q̃ᵢ
            k = torch.cat((k, xh), dim=-1)                                      # k̃ⱼ
        mask, is_causal = attention_mask(n, q.dtype, x.device, attn_bias, key_padding_mask, self.causal)
        # softmax(q̃ k̃ᵀ / √d_h + bias) v  — fused on GPU
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           scale=self.scale)
        if head_mask is not None:
            y = y * head_mask.to(y.dtype)[None, :, None, None]
        y = y.transpose(1, 2).reshape(B, n, d)                                   # concat heads
        if self.regime == "free":
            return self.proj(y)                                                  # y O
        return y


class Block(nn.Module):
    """Pre-LN Transformer block: one Euler step (step size 1) of the attention field, then an MLP.

        x ← x + DropPath(Attn(LN₁(x)))          (Euler step of (F) for the normalised tokens)
        x ← x + DropPath(MLP(LN₂(x)))
    attention_only=True gives x ← x + Attn(x): no LayerNorm, no MLP — the discrete field itself,
    as in the authors' probing mode (notes §5.4).
    """

    def __init__(self, d: int, n_heads: int, *, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0, attn: nn.Module | None = None, **attention_kwargs):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = attn if attn is not None else Attention(d, n_heads, dropout=dropout,
                                                             **attention_kwargs)
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
                head_mask=None, attention_only: bool = False) -> torch.Tensor:
        kw = dict(positions=positions, attn_bias=attn_bias, key_padding_mask=key_padding_mask,
                  head_mask=head_mask)
        if attention_only:
            return x + self.attn(x, **kw)                                       # x + Attn(x)
        x = x + self._dp(self.attn(self.ln1(x), **kw))
        return x + self._dp(self.mlp(self.ln2(x)))


# ================================================================================================
# 5. The simulation script: `python ode_attention.py --regime convergent --pe rope --lam -0.1`
# ================================================================================================
def _compress(Z: torch.Tensor) -> torch.Tensor:
    """Radial log-compression z ↦ z · log(1 + ‖z‖)/‖z‖: keeps directions, makes huge and tiny
    radii visible in one picture (diverging tokens would otherwise flatten everything else)."""
    r = torch.linalg.vector_norm(Z, dim=-1, keepdim=True)
    return Z * torch.log1p(r) / r.clamp_min(1e-12)


def simulate(regime: str, pe: str = "none", lam: float = 0.0, lam_matrix: str = "I", d: int = 2,
             n: int = 8, t_end: float = 20.0, dt: float = 0.05, method: str = "rk4",
             symmetric_A: bool = False, causal: bool = False, seed: int = 0) -> dict:
    """Sample one instance of `regime` (regimes.sample_instance), integrate it and return the
    trajectory, the probes over time, the predicted regime and the observed fate."""
    import regimes
    g = torch.Generator().manual_seed(seed)
    Q, K, V = regimes.sample_instance(regime, d, symmetric_A=symmetric_A, generator=g)
    W, A = regimes.interaction_matrices(Q, K, V)
    X0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    opts: dict = {"causal": causal}
    shift = 0.0
    if pe == "abs":
        shift = rope_mod.sinusoidal_pe(n, d, dtype=torch.float64)
        opts["pos"] = shift
    elif pe == "rope":
        opts["rope"] = True
    if lam != 0.0:
        opts["lam"] = lam
        if lam_matrix == "A":
            opts["lam_M"] = A
    # the logit matrix the λ-term produces: W + λM — its regime is the one we predict
    W_eff = regimes.logit_form(W, lam, A if lam_matrix == "A" else None)
    predicted = regimes.classify_matrices(W_eff, A)
    bound = 1e6 * max(1.0, float(token_norm(X0 + shift)))
    tr = integrate(X0, Q, K, V, t_end=t_end, dt=dt, method=method, max_norm=bound, n_save=401, **opts)
    Y = tr.X + shift                                             # driving tokens y = x + p
    fate = regimes.observed_fate(token_norm(Y)[:, None], tr.blown.reshape(1))[0]
    kept = None
    if pe == "rope":
        # RoPE makes W offset-dependent: W(m) = Q R(m) Kᵀ; count the offsets that keep the regime
        per = regimes.rope_offset_regimes(Q, K, V, range(-(n - 1), n))
        kept = (sum(r["regime"] == predicted for r in per), len(per))
    return {"traj": tr, "Y": Y, "W": W, "A": A, "predicted": predicted, "fate": fate, "rope_kept": kept,
            "probes": {k: fn(Y) for k, fn in PROBES.items()}, "regime_report": regimes.regime_of(W_eff, A)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Simulate the attention ODE dX/dt = softmax(X Q Kᵀ Xᵀ) X V for a random instance "
                    "of a regime and draw its tokens. Writes PNG figures, a CSV of the probes over "
                    "time and a JSON summary.")
    p.add_argument("--regime", default="convergent", choices=("convergent", "divergent", "intermediate"))
    p.add_argument("--pe", default="none", choices=("none", "abs", "rope"),
                   help="positional encoding inside the field")
    p.add_argument("--lam", type=float, default=0.0, help="λ of the λ-term λ xᵢᵀ M xⱼ (0 = off)")
    p.add_argument("--lam-matrix", default="I", choices=("I", "A"), help="M in the λ-term")
    p.add_argument("--d", type=int, default=2, help="token dimension (2 draws the plane itself)")
    p.add_argument("--n", type=int, default=8, help="number of tokens")
    p.add_argument("--t-end", type=float, default=20.0)
    p.add_argument("--dt", type=float, default=0.05)
    p.add_argument("--method", default="rk4", choices=("euler", "rk4", "dopri5"))
    p.add_argument("--symmetric-A", action="store_true", help="sample a symmetric A")
    p.add_argument("--causal", action="store_true", help="causal attention (j ≤ i)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/ode", help="output folder")
    a = p.parse_args(argv)
    try:
        if a.d < 1 or a.n < 2 or not (a.t_end > 0 and a.dt > 0) or a.dt > a.t_end:
            raise ValueError("need --d >= 1, --n >= 2 and 0 < --dt <= --t-end.")
        if a.pe == "rope" and a.d % 2:
            raise ValueError(f"--pe rope needs an even --d, got {a.d}.")
        if a.pe == "abs" and a.d % 2:
            raise ValueError(f"--pe abs (sinusoidal) needs an even --d, got {a.d}.")
        if not math.isfinite(a.lam):
            raise ValueError("--lam must be a finite number.")
        res = simulate(a.regime, a.pe, a.lam, a.lam_matrix, a.d, a.n, a.t_end, a.dt, a.method,
                       a.symmetric_A, a.causal, a.seed)
        _write_outputs(a, res)
        tr = res["traj"]
        print(f"regime sampled: {a.regime}; PE: {a.pe}; λ = {a.lam:g} (M = {a.lam_matrix})")
        rr = res["regime_report"]
        print(f"predicted regime: {res['predicted']}  (inertia of W_sym {rr['inertia_W']}, "
              f"A_sym {rr['inertia_A']} as (+, −, 0))")
        if res["rope_kept"] is not None:
            k, m = res["rope_kept"]
            print(f"  with RoPE the regime holds at {k} of the {m} offsets m = j − i "
                  "(W(m) = Q R(m) Kᵀ); the prediction above is the position-free one")
        print(f"observed fate:    {res['fate']}  (mean ‖y‖ {float(res['probes']['norm'][0]):.3g} → "
              f"{float(res['probes']['norm'][-1]):.3g} at t = {float(tr.t[-1]):.3g}; status: {tr.status})")
        print(f"wrote {a.out}/trajectories.png, {a.out}/probes.png, {a.out}/probes.csv, {a.out}/summary.json")
        return 0
    except (ValueError, OSError) as e:
        print(f"ode_attention.py: {e}", file=sys.stderr)
        return 2


def _write_outputs(a, res) -> None:
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(a.out, exist_ok=True)
    tr, Y = res["traj"], res["Y"]
    t = tr.t.numpy()

    def save(fig, name):
        tmp = os.path.join(a.out, f".{name}.tmp.png")
        fig.savefig(tmp, dpi=110)
        plt.close(fig)
        os.replace(tmp, os.path.join(a.out, name))

    # token trajectories: the plane itself for d = 2, else the top-3 principal directions
    Z = Y if Y.shape[-1] <= 3 else Y @ torch.linalg.svd(Y.reshape(-1, Y.shape[-1]) -
                                                         Y.reshape(-1, Y.shape[-1]).mean(0),
                                                         full_matrices=False)[2][:3].T
    Z = _compress(Z).numpy()
    fig = plt.figure(figsize=(6, 5.5))
    ax = fig.add_subplot(111, projection="3d" if Z.shape[-1] == 3 else None)
    for i in range(Z.shape[1]):
        pts = [Z[:, i, c] for c in range(min(Z.shape[-1], 3))]
        if len(pts) == 1:
            pts = [pts[0], 0 * pts[0]]
        ax.plot(*pts, lw=1)
        ax.scatter(*[q[:1] for q in pts], s=12, marker="o")
        ax.scatter(*[q[-1:] for q in pts], s=20, marker="x")
    ax.set_title(f"{a.regime}, PE={a.pe}, λ={a.lam:g}: tokens y(t)\n"
                 f"(o start, x end; radially log-compressed{'; top-3 PCA' if Y.shape[-1] > 3 else ''})")
    save(fig, "trajectories.png")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].semilogy(t, res["probes"]["norm"].numpy())
    ax[0].set(xlabel="t", ylabel="mean token norm", title=f"predicted {res['predicted']}, observed {res['fate']}")
    ax[1].semilogy(t, res["probes"]["pairwise_distance"].numpy().clip(1e-300))
    ax[1].set(xlabel="t", ylabel="Σᵢⱼ ‖yᵢ − yⱼ‖²", title="pairwise distance")
    fig.tight_layout()
    save(fig, "probes.png")

    lines = ["t," + ",".join(res["probes"])]
    for k in range(len(t)):
        lines.append(f"{t[k]:.6g}," + ",".join(f"{float(v[k]):.6g}" for v in res["probes"].values()))
    for name, text in (("probes.csv", "\n".join(lines) + "\n"),
                       ("summary.json", json.dumps({
                           "regime": a.regime, "pe": a.pe, "lam": a.lam, "lam_matrix": a.lam_matrix,
                           "d": a.d, "n": a.n, "seed": a.seed, "predicted": res["predicted"],
                           "observed": res["fate"], "status": tr.status,
                           "inertia_W_sym": res["regime_report"]["inertia_W"],
                           "inertia_A_sym": res["regime_report"]["inertia_A"]}, indent=2) + "\n")):
        tmp = os.path.join(a.out, f".{name}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, os.path.join(a.out, name))


if __name__ == "__main__":
    sys.exit(main())
