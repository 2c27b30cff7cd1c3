"""Regimes of the attention field: W, A, their symmetric parts, inertia and the classification.

For the field dX/dt = softmax(X Q Kᵀ Xᵀ) X V (ode_attention.py) the two matrices that decide where
tokens go are (DESIGN.md, notes §1):

    W = Q Kᵀ                  the query–key interaction: logit sᵢⱼ = xᵢᵀ W xⱼ
    A = W (Vᵀ)⁻¹              so that A Vᵀ = W and  xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ       (identity (I))

and only their symmetric parts matter for quadratic forms: M_sym = (M + Mᵀ)/2, xᵀ M x = xᵀ M_sym x.

Regimes (the seed summary's sufficient conditions; the notes §1.2 derive them for symmetric A):
    convergent     W_sym ≻ 0 and A_sym ≺ 0   — all tokens go to zero (paper's ND scenario)
    divergent      W_sym ≻ 0 and A_sym ≻ 0   — norms and pairwise distances grow (PD scenario)
    intermediate   anything else (mixed inertia; the paper's HD scenario is A_sym with ⌊d/2⌋
                   negative eigenvalues)
For symmetric A, E(t) = Σᵢ xᵢᵀ A xᵢ is non-decreasing whenever W_sym ⪰ 0 (non-causal), which is our
theorem; for non-symmetric A the conditions are the paper's claim, and `--agreement` measures how
often simulation agrees with it.

Inertia = (n₊, n₋, n₀), the numbers of positive, negative and zero eigenvalues of a symmetric
matrix. An eigenvalue with |λ| ≤ tol · max|λ| counts as zero: a definiteness verdict that depends
on round-off is reported as "zero", i.e. not definite.

Matrices with prescribed inertia (Sylvester's law of inertia): S = L D Lᵀ with L unit lower-
triangular (hence invertible) has exactly the inertia of the diagonal D. With D = σ ⊙ softplus(θ),
σ ∈ {±1} fixed, the inertia of S is fixed for every value of the parameters (L, θ) — which is how
the constrained training keeps its regime, and how random instances get their regime by design.

Positional encodings (notes §1.3):
    RoPE:  sᵢⱼ = xᵢᵀ Q R(j−i) Kᵀ xⱼ, so W becomes offset-dependent, W(m) = Q R(m) Kᵀ = W + ΔW(m),
           A(m) = W(m) (Vᵀ)⁻¹; `rope_offset_regimes` classifies each offset m.
    absolute PE: the driving token is yᵢ = xᵢ + pᵢ, so the equilibrium moves from xᵢ = 0 to −pᵢ.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

REGIME_NAMES = ("convergent", "divergent", "intermediate")


# ================================================================================================
# 1. W, A, symmetric parts, inertia, classification
# ================================================================================================
def sym(M: torch.Tensor) -> torch.Tensor:
    """M_sym = (M + Mᵀ) / 2 — the part that a quadratic form xᵀ M x sees."""
    return 0.5 * (M + M.transpose(-1, -2))


def antisym(M: torch.Tensor) -> torch.Tensor:
    """M_anti = (M − Mᵀ) / 2, so M = M_sym + M_anti."""
    return 0.5 * (M - M.transpose(-1, -2))


def _as_float64(name: str, M) -> torch.Tensor:
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor.")
    if M.ndim < 2:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(M.shape)}.")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    return M.detach().double()


def inertia(S: torch.Tensor, tol: float = 1e-6) -> tuple[int, int, int]:
    """(n₊, n₋, n₀) of the symmetric matrix S; |λ| ≤ tol·max|λ| counts as zero."""
    S = _as_float64("S", S)
    if S.shape[-1] != S.shape[-2] or S.ndim != 2:
        raise ValueError(f"inertia needs one square matrix, got shape {tuple(S.shape)}.")
    ev = torch.linalg.eigvalsh(sym(S))
    thr = tol * float(ev.abs().max()) if ev.numel() else 0.0
    return int((ev > thr).sum()), int((ev < -thr).sum()), int((ev.abs() <= thr).sum())


def interaction_matrices(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor,
                         cond_max: float = 1e10) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, A) = (Q Kᵀ, W (Vᵀ)⁻¹), in float64.

    A is defined only when V is invertible: a singular or ill-conditioned V (condition number above
    cond_max) raises ValueError with the condition number, instead of a silent inverse of garbage.
    """
    Q, K, V = _as_float64("Q", Q), _as_float64("K", K), _as_float64("V", V)
    d = Q.shape[-2]
    if K.shape[-2:] != Q.shape[-2:]:
        raise ValueError(f"Q and K must have the same shape (d, d_k); got {tuple(Q.shape)}, {tuple(K.shape)}.")
    if V.shape[-2:] != (d, d):
        raise ValueError(f"V must be square (d, d) = ({d}, {d}), got {tuple(V.shape)}.")
    W = Q @ K.transpose(-1, -2)                                 # W = Q Kᵀ
    cond = torch.linalg.cond(V)
    worst = float(cond.max()) if cond.numel() else 0.0
    if not math.isfinite(worst) or worst > cond_max:
        raise ValueError(f"V is singular or ill-conditioned (condition number {worst:.3g} > {cond_max:.0e}); "
                         "A = W (Vᵀ)⁻¹ is not defined.")
    # A Vᵀ = W  ⇔  V Aᵀ = Wᵀ  ⇔  Aᵀ = V⁻¹ Wᵀ
    A = torch.linalg.solve(V, W.transpose(-1, -2)).transpose(-1, -2)
    return W, A


def regime_of(W: torch.Tensor, A: torch.Tensor, tol: float = 1e-6) -> dict:
    """Eigenvalues and inertia of W_sym and A_sym, and the regime they imply."""
    W, A = _as_float64("W", W), _as_float64("A", A)
    iw, ia = inertia(W, tol), inertia(A, tol)
    d = W.shape[-1]
    w_pd = iw[0] == d                                           # W_sym ≻ 0
    if w_pd and ia[1] == d:
        regime = "convergent"                                   # W_sym ≻ 0, A_sym ≺ 0
    elif w_pd and ia[0] == d:
        regime = "divergent"                                    # W_sym ≻ 0, A_sym ≻ 0
    else:
        regime = "intermediate"
    return {"regime": regime, "inertia_W": iw, "inertia_A": ia,
            "eig_W_sym": torch.linalg.eigvalsh(sym(W)), "eig_A_sym": torch.linalg.eigvalsh(sym(A))}


def classify_matrices(W: torch.Tensor, A: torch.Tensor, tol: float = 1e-6) -> str:
    """"convergent" | "divergent" | "intermediate" from W and A."""
    return regime_of(W, A, tol)["regime"]


def classify(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, tol: float = 1e-6) -> str:
    """"convergent" | "divergent" | "intermediate" for the single-head field with Q, K, V."""
    return classify_matrices(*interaction_matrices(Q, K, V), tol=tol)


# ================================================================================================
# 2. Matrices with prescribed inertia (LDLᵀ) — random instances and constrained training
# ================================================================================================
class PrescribedInertia(nn.Module):
    """M = L D Lᵀ + T with exactly n_neg negative and d − n_neg positive eigenvalues in M_sym.

        L = I + tril₋₁(L_free)           unit lower-triangular, so invertible
        D = diag(σₖ softplus(θₖ)),        σₖ = −1 for k < n_neg, +1 otherwise (a fixed buffer)
        T = T_free − T_freeᵀ              antisymmetric (optional), so M_sym = L D Lᵀ exactly
    By Sylvester's law of inertia L D Lᵀ has the inertia of D for every (L_free, θ): the regime
    is fixed for all of training. Initialisation: |Dₖₖ| = init_scale (the authors' 0.15),
    L_free ~ N(0, l_std²), T_free ~ N(0, t_std²).
    """

    def __init__(self, d: int, n_neg: int = 0, antisymmetric: bool = True, init_scale: float = 0.15,
                 l_std: float | None = None, t_std: float | None = None, generator=None):
        super().__init__()
        if d <= 0 or not 0 <= n_neg <= d:
            raise ValueError(f"need d > 0 and 0 <= n_neg <= d, got d={d}, n_neg={n_neg}.")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}.")
        self.d, self.n_neg = d, n_neg
        l_std = 0.5 / math.sqrt(d) if l_std is None else l_std
        t_std = 0.5 * init_scale / math.sqrt(d) if t_std is None else t_std
        sigma = torch.ones(d)
        sigma[:n_neg] = -1.0
        self.register_buffer("sigma", sigma)
        self.L_free = nn.Parameter(torch.randn(d, d, generator=generator) * l_std)
        # softplus(θ) = init_scale  ⇔  θ = log(exp(init_scale) − 1)
        self.theta = nn.Parameter(torch.full((d,), math.log(math.expm1(init_scale))))
        self.T_free = nn.Parameter(torch.randn(d, d, generator=generator) * t_std) if antisymmetric else None

    def symmetric_part(self) -> torch.Tensor:
        """S = L D Lᵀ with Dₖₖ = σₖ softplus(θₖ)."""
        return ldl_form(self.L_free, self.sigma * F.softplus(self.theta))

    def forward(self) -> torch.Tensor:
        return ldl_form(self.L_free, self.sigma * F.softplus(self.theta), self.T_free)


def ldl_form(L_free: torch.Tensor, D: torch.Tensor, T_free: torch.Tensor | None = None) -> torch.Tensor:
    """L diag(D) Lᵀ (+ T_free − T_freeᵀ), L = I + strictly-lower part of L_free; batched over (...)."""
    d = L_free.shape[-1]
    L = torch.eye(d, device=L_free.device, dtype=L_free.dtype) + L_free.tril(-1)
    S = (L * D.unsqueeze(-2)) @ L.transpose(-1, -2)             # L diag(D) Lᵀ
    if T_free is None:
        return S
    return S + (T_free - T_free.transpose(-1, -2))              # + T, T = −Tᵀ


def _random_forms(count: int, d: int, n_neg: int, antisymmetric: bool, generator) -> torch.Tensor:
    """`count` random (d, d) matrices whose symmetric part has exactly n_neg negative eigenvalues:
    the same L D Lᵀ + T as PrescribedInertia, with L_free, T_free ~ N(0, 0.25/d) and |Dₖₖ| uniform
    in [0.5, 1.5] (signs fixed), so the inertia holds by Sylvester's law for every draw."""
    std = 0.5 / math.sqrt(d)
    L_free = torch.randn(count, d, d, generator=generator, dtype=torch.float64) * std
    sigma = torch.ones(d, dtype=torch.float64)
    sigma[:n_neg] = -1.0
    D = sigma * (0.5 + torch.rand(count, d, generator=generator, dtype=torch.float64))
    T_free = (torch.randn(count, d, d, generator=generator, dtype=torch.float64) * std
              if antisymmetric else None)
    return ldl_form(L_free, D, T_free)


def sample_instances(regime: str, d: int, count: int, *, symmetric_A: bool = False, generator=None):
    """`count` random instances at once: (Q, K, V), each (count, d, d), float64. See sample_instance."""
    if regime not in REGIME_NAMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {REGIME_NAMES}.")
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ValueError(f"d must be a positive integer, got {d!r}.")
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        raise ValueError(f"count must be a positive integer, got {count!r}.")
    if regime == "intermediate" and d < 2:
        raise ValueError("the intermediate regime needs d >= 2 (mixed inertia).")
    n_neg = {"divergent": 0, "convergent": d, "intermediate": d // 2}[regime]
    W = _random_forms(count, d, 0, True, generator)             # W_sym ≻ 0
    A = _random_forms(count, d, n_neg, not symmetric_A, generator)
    # Haar-orthogonal Q: QR of a Gaussian matrix with the signs of R's diagonal moved into Q
    Z = torch.randn(count, d, d, generator=generator, dtype=torch.float64)
    Qm, R = torch.linalg.qr(Z)
    Q = Qm * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
    K = torch.linalg.solve(Q, W).transpose(-1, -2)              # Kᵀ = Q⁻¹ W  ⇒  Q Kᵀ = W
    V = torch.linalg.solve(A, W).transpose(-1, -2)              # Vᵀ = A⁻¹ W  ⇒  A Vᵀ = W
    return Q, K, V


def sample_instance(regime: str, d: int, *, symmetric_A: bool = False, generator=None):
    """Random (Q, K, V), float64, whose (W, A) are in `regime` by construction.

    W = S_W + T_W with S_W ≻ 0 (all three regimes keep W_sym ≻ 0, as the paper's PD/HD/ND runs do);
    A = S_A (+ T_A unless symmetric_A) with S_A ≻ 0 (divergent), ≺ 0 (convergent) or ⌊d/2⌋
    negative eigenvalues (intermediate, needs d ≥ 2). Q is Haar-orthogonal; then
        K = (Q⁻¹ W)ᵀ  so that  Q Kᵀ = W,         V = (A⁻¹ W)ᵀ  so that  A Vᵀ = W.
    """
    Q, K, V = sample_instances(regime, d, 1, symmetric_A=symmetric_A, generator=generator)
    return Q[0], K[0], V[0]


# ================================================================================================
# 3. Positional encodings: RoPE's offset-dependent W, absolute PE's shifted equilibrium
# ================================================================================================
def rope_offset_matrices(Q: torch.Tensor, K: torch.Tensor, offsets, base: float = 10000.0,
                         pairing: str = "interleaved") -> torch.Tensor:
    """W(m) = Q R(m) Kᵀ = W + ΔW(m), ΔW(m) = Q (R(m) − I) Kᵀ, for each offset m = j − i: (M, d, d)."""
    import rope
    Q, K = _as_float64("Q", Q), _as_float64("K", K)
    dk = Q.shape[-1]
    if dk % 2:
        raise ValueError(f"RoPE needs an even d_k, got {dk}.")
    R = torch.stack([rope.rotation_matrix(float(m), dk, base, pairing) for m in offsets])
    return Q @ R @ K.T


def rope_offset_regimes(Q, K, V, offsets, base: float = 10000.0, pairing: str = "interleaved",
                        tol: float = 1e-6) -> list[dict]:
    """Classification of (W(m), A(m) = W(m)(Vᵀ)⁻¹) for every offset m: [{offset, regime, inertia}]."""
    W0, _ = interaction_matrices(Q, K, V)                       # validates V
    Vd = V.double()
    out = []
    for m, Wm in zip(offsets, rope_offset_matrices(Q, K, offsets, base, pairing)):
        Am = torch.linalg.solve(Vd, Wm.T).T                     # A(m) Vᵀ = W(m)
        r = regime_of(Wm, Am, tol)
        out.append({"offset": int(m), "regime": r["regime"], "inertia_W": r["inertia_W"],
                    "inertia_A": r["inertia_A"]})
    return out


def shifted_equilibrium(pos: torch.Tensor) -> torch.Tensor:
    """With absolute PE the driving token is yᵢ = xᵢ + pᵢ, and Y = 0 is a rest point of
    ẋᵢ = Σⱼ Pᵢⱼ(Y) Vᵀ yⱼ: the equilibrium moves from X = 0 to X = −P."""
    return -pos


# ================================================================================================
# 4. Multi-head layers of trained / pretrained models
# ================================================================================================
def analyse_layer(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, O: torch.Tensor | None = None,
                  n_heads: int = 1, scale: float = 1.0, tol: float = 1e-6,
                  cond_max: float = 1e10) -> dict:
    """Regime report for one multi-head attention layer (row convention: queries = x Q).

    Q, K: (d, H·d_h); V: (d, H·d_v); O: (H·d_v, d) or None (identity). Head h uses the column
    block h of each. What is computed, and why (the honest treatment of rank deficiency):
    * per head, Wₕ = scale · Qₕ Kₕᵀ is d × d but of rank ≤ d_h < d, so Wₕ,sym is never definite
      on the whole space: we report its inertia (≤ d_h positive and ≤ d_h negative eigenvalues, the
      rest zero) and whether it is semi-definite; no per-head A is formed — Aₕ = Wₕ (Mₕᵀ)⁻¹ would
      need the rank-d_v map Mₕ = Vₕ Oₕ to be invertible, which it is not;
    * the layer: W = Σₕ Wₕ (the logit form when all heads attend alike) and the multi-head value
      path M = Σₕ Vₕ Oₕ = V O (the d × d map that a token's attention update applies), so the
      layer's A = W (Mᵀ)⁻¹, classified as for the single-head field, with cond(M) reported. When M
      is singular or ill-conditioned (cond > cond_max — e.g. grouped-query attention, where
      rank M ≤ n_kv·d_h < d) no A satisfies A Mᵀ = W in general (it needs ker Mᵀ ⊆ ker W). The
      layer regime is then "undefined"; we report rank(M) and the least-squares A = W (Mᵀ)⁺ with its
      relative residual ‖A Mᵀ − W‖/‖W‖, which says how far the identity (I) is from holding.
    """
    Q, K, V = _as_float64("Q", Q), _as_float64("K", K), _as_float64("V", V)
    d, hq = Q.shape
    if K.shape != Q.shape:
        raise ValueError(f"Q and K must have the same shape, got {tuple(Q.shape)} and {tuple(K.shape)}.")
    if n_heads <= 0 or hq % n_heads or V.shape[1] % n_heads:
        raise ValueError(f"{n_heads} heads do not divide Q's {hq} or V's {V.shape[1]} columns.")
    M = V if O is None else V @ _as_float64("O", O)                # value path Σₕ Vₕ Oₕ
    if M.shape != (d, d):
        raise ValueError(f"the value path V·O must be (d, d) = ({d}, {d}), got {tuple(M.shape)}.")
    dh = hq // n_heads
    heads = []
    W = torch.zeros(d, d, dtype=torch.float64)
    for h in range(n_heads):
        sl = slice(h * dh, (h + 1) * dh)
        Wh = scale * Q[:, sl] @ K[:, sl].T                          # Wₕ = s Qₕ Kₕᵀ
        W += Wh
        ev = torch.linalg.eigvalsh(sym(Wh))
        ip, ineg, iz = inertia(Wh, tol)
        heads.append({"head": h, "inertia_W": (ip, ineg, iz), "eig_W_min": float(ev.min()),
                      "eig_W_max": float(ev.max()),
                      "W_sym": "psd" if ineg == 0 else ("nsd" if ip == 0 else "indefinite")})
    cond = float(torch.linalg.cond(M))
    out = {"heads": heads, "W": W, "M": M, "cond_M": cond, "inertia_W": inertia(W, tol)}
    if math.isfinite(cond) and cond <= cond_max:
        A = torch.linalg.solve(M, W.T).T                            # A Mᵀ = W
        r = regime_of(W, A, tol)
        out.update(A=A, regime=r["regime"], inertia_A=r["inertia_A"],
                   eig_W_sym=r["eig_W_sym"], eig_A_sym=r["eig_A_sym"])
    else:
        A_lsq = W @ torch.linalg.pinv(M.T)                          # least squares: A Mᵀ ≈ W
        resid = float(torch.linalg.norm(A_lsq @ M.T - W) / torch.linalg.norm(W).clamp_min(1e-300))
        out.update(A=None, regime="undefined", inertia_A=None, rank_M=int(torch.linalg.matrix_rank(M)),
                   A_lsq=A_lsq, A_lsq_residual=resid, inertia_A_lsq=inertia(A_lsq, tol),
                   eig_W_sym=torch.linalg.eigvalsh(sym(W)), eig_A_sym=None)
    return out


# ================================================================================================
# 5. Agreement: does the predicted regime match the simulated fate?
# ================================================================================================
FATES = ("converged", "diverged", "neither")
PREDICTED_FATE = {"convergent": "converged", "divergent": "diverged"}


def observed_fate(norms: torch.Tensor, blown: torch.Tensor, grow: float = 10.0,
                  shrink: float = 0.5) -> list[str]:
    """Fate of each instance from its mean-token-norm curve norms (T, B) (of the DRIVING tokens):
    diverged  — it blew up (non-finite or past the norm bound) or ended ≥ `grow` × its start;
    converged — it ended ≤ `shrink` × its start and was still falling over the second half;
    neither   — anything else (bounded, oscillating, or too slow to tell within the horizon).
    The thresholds are generous on purpose: convergence is algebraic (~t^(−1/2)), not exponential.
    """
    first, last, mid = norms[0], norms[-1], norms[norms.shape[0] // 2]
    out = []
    for b in range(norms.shape[1]):
        if bool(blown[b]) or last[b] >= grow * first[b]:
            out.append("diverged")
        elif last[b] <= shrink * first[b] and last[b] < mid[b]:
            out.append("converged")
        else:
            out.append("neither")
    return out


def classify_batch(W: torch.Tensor, A: torch.Tensor, tol: float = 1e-6) -> list[str]:
    """classify_matrices for a batch (..., d, d) at once (vectorised eigvalsh): flat list of names."""
    ew = torch.linalg.eigvalsh(sym(W.double())).flatten(0, -2)
    ea = torch.linalg.eigvalsh(sym(A.double())).flatten(0, -2)
    w_pd = (ew > tol * ew.abs().amax(-1, keepdim=True)).all(-1)          # W_sym ≻ 0
    a_thr = tol * ea.abs().amax(-1, keepdim=True)
    a_pd, a_nd = (ea > a_thr).all(-1), (ea < -a_thr).all(-1)
    return ["convergent" if w and an else "divergent" if w and ap else "intermediate"
            for w, ap, an in zip(w_pd.tolist(), a_pd.tolist(), a_nd.tolist())]


def rope_predictions(Q, K, V, offsets, base: float = 10000.0, pairing: str = "interleaved",
                     tol: float = 1e-6) -> list:
    """For a batch of instances (B, d, d): the regime shared by every offset's (W(m), A(m)), or None
    when the offsets disagree (no uniform sufficient condition holds)."""
    import rope
    R = torch.stack([rope.rotation_matrix(float(m), Q.shape[-1], base, pairing) for m in offsets])
    Wm = Q[:, None] @ R[None] @ K[:, None].transpose(-1, -2)             # W(m) = Q R(m) Kᵀ
    Am = torch.linalg.solve(V[:, None], Wm.transpose(-1, -2)).transpose(-1, -2)  # A(m) Vᵀ = W(m)
    names = classify_batch(Wm, Am, tol)
    M = len(offsets)
    out = []
    for b in range(Q.shape[0]):
        s = set(names[b * M:(b + 1) * M])
        out.append(s.pop() if len(s) == 1 else None)
    return out


def agreement_table(N: int, d: int = 4, n: int = 8, t_end: float = 20.0, dt: float = 0.2,
                    seed: int = 0, progress: bool = True) -> list[dict]:
    """Sample N instances per (regime, symmetric A?, PE) cell, integrate them (RK4, batched) and
    count fates. PE "none": the plain field; "abs": sinusoidal absolute PE (fate measured on the
    driving tokens y = x + p, whose rest point is 0); "rope": rotary encoding. The prediction is
    always the regime of the position-free (W, A): the table then shows how often RoPE keeps or
    breaks it. For RoPE it also counts the instances whose offset-dependent W(m) = Q R(m) Kᵀ,
    A(m) = W(m)(Vᵀ)⁻¹ keep that regime for EVERY offset |m| < n ("offsets_uniform"): only those
    are covered by the sufficient conditions. Intermediate instances have no predicted fate; their
    fates are reported. All six (regime, A) cells of one PE integrate as one batch of 6N instances.
    """
    import ode_attention as oa
    import rope
    from tqdm import tqdm
    if not isinstance(N, int) or N <= 0:
        raise ValueError(f"N must be a positive integer, got {N!r}.")
    g = torch.Generator().manual_seed(seed)
    pos_table = rope.sinusoidal_pe(n, d, dtype=torch.float64)
    offsets = list(range(-(n - 1), n))
    groups = [(r, s) for r in REGIME_NAMES for s in (True, False)]
    rows = []
    for pe in tqdm(("none", "abs", "rope"), desc="agreement (per PE)", disable=not progress):
        inst = [sample_instances(r, d, N, symmetric_A=s, generator=g) for r, s in groups]
        Q, K, V = (torch.cat(m) for m in zip(*inst))
        X0 = torch.randn(Q.shape[0], n, d, generator=g, dtype=torch.float64)
        shift = pos_table if pe == "abs" else 0.0                         # y = x + p
        opts = {"pos": pos_table} if pe == "abs" else ({"rope": True} if pe == "rope" else {})
        scale0 = float(oa.token_norm(X0 + shift).max())
        tr = oa.integrate(X0, Q, K, V, t_end=t_end, dt=dt, method="rk4",
                          max_norm=1e4 * max(1.0, scale0), n_save=21, **opts)
        fates = observed_fate(oa.token_norm(tr.X + shift), tr.blown)
        uniform = rope_predictions(Q, K, V, offsets) if pe == "rope" else None
        for gi, (regime, symA) in enumerate(groups):
            sl = slice(gi * N, (gi + 1) * N)
            f_cell = fates[sl]
            agree = sum(f == PREDICTED_FATE.get(regime) for f in f_cell)
            rows.append({"regime": regime, "A": "symmetric" if symA else "general", "pe": pe, "N": N,
                         "offsets_uniform": (sum(u == regime for u in uniform[sl])
                                             if uniform is not None else ""),
                         **{f: f_cell.count(f) for f in FATES},
                         "agreement": agree / N if regime in PREDICTED_FATE else float("nan")})
    order = {(r, s): i for i, (r, s) in enumerate((r, "symmetric" if s else "general") for r, s in groups)}
    rows.sort(key=lambda r: (order[(r["regime"], r["A"])], ("none", "abs", "rope").index(r["pe"])))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of agreement_table's rows."""
    head = ("| regime (predicted) | A | PE | N | RoPE: regime holds at every offset | converged | "
            "diverged | neither | agreement |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ag = "no prediction" if r["agreement"] != r["agreement"] else f"{100 * r['agreement']:.1f}%"
        uni = "—" if r["offsets_uniform"] == "" else r["offsets_uniform"]
        lines.append(f"| {r['regime']} | {r['A']} | {r['pe']} | {r['N']} | {uni} | "
                     f"{r['converged']} | {r['diverged']} | {r['neither']} | {ag} |")
    return "\n".join(lines)


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="Regimes of attention: agreement of predicted vs simulated fates on random "
                    "instances (--agreement N), the regime of each layer of a training checkpoint "
                    "(--ckpt RUN/ckpt.pt), or of a pretrained model (--model NAME).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--agreement", type=int, metavar="N", help="instances per cell")
    g.add_argument("--ckpt", metavar="PATH", help="a checkpoint written by train_lm.py / train_vit.py")
    g.add_argument("--model", metavar="NAME", help="a pretrained model (see pretrained.py)")
    p.add_argument("--d", type=int, default=4, help="token dimension for --agreement (even, for RoPE)")
    p.add_argument("--n", type=int, default=8, help="tokens per instance for --agreement")
    p.add_argument("--t-end", type=float, default=20.0, help="integration horizon for --agreement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", default=None, help="text for the --model token probe")
    p.add_argument("--out", default="out/regimes", help="output folder")
    a = p.parse_args(argv)
    try:
        if a.agreement is not None:
            if a.agreement <= 0 or a.d < 2 or a.d % 2 or a.n < 2 or not a.t_end > 0:
                raise ValueError("need N > 0, an even --d >= 2, --n >= 2 and --t-end > 0.")
            t0 = time.time()
            rows = agreement_table(a.agreement, d=a.d, n=a.n, t_end=a.t_end, seed=a.seed)
            secs = time.time() - t0
            table = format_table(rows)
            print(table)
            print(f"\n{a.agreement} instances per cell, d={a.d}, n={a.n}, t_end={a.t_end}, RK4 dt=0.2; "
                  f"{secs:.1f} s")
            _write_atomic(os.path.join(a.out, "agreement.md"), table + "\n")
            buf = [",".join(rows[0].keys())] + [",".join(str(v) for v in r.values()) for r in rows]
            _write_atomic(os.path.join(a.out, "agreement.csv"), "\n".join(buf) + "\n")
            return 0
        if a.ckpt is not None:
            return report_checkpoint(a.ckpt, a.out)
        return report_model(a.model, a.out, a.text)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        print(f"regimes.py: {e}", file=sys.stderr)
        return 2


def report_checkpoint(path: str, out: str) -> int:
    raise ValueError("checkpoint reports are not available yet.")


def report_model(name: str, out: str, text) -> int:
    raise ValueError("pretrained-model reports are not available yet.")


if __name__ == "__main__":
    sys.exit(main())
