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


def logit_form(W: torch.Tensor, lam: float = 0.0, M: torch.Tensor | None = None) -> torch.Tensor:
    """What the λ-term does to the logit matrix, written once: it adds λ xᵢᵀ M xⱼ to every logit
    xᵢᵀ W xⱼ, so the realised logit form is  W_λ = W + λ M  (M = I when None). The regime the λ-term
    aims at is read off W_λ (its symmetric part) with the same value map."""
    if lam == 0.0:
        return W
    return W + lam * (torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) if M is None else M)


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


def keys_values(Q: torch.Tensor, W: torch.Tensor, A: torch.Tensor):
    """The keys and values that realise a given (W, A) for a query map Q, in the row convention:
        Q Kᵀ = W   ⇒  Kᵀ = Q⁻¹ W            (the logit form is exactly W)
        A Vᵀ = W   ⇒  Vᵀ = A⁻¹ W            (the value map gives exactly A = W (Vᵀ)⁻¹)
    Q, W, A are (..., d, d). Returns (K, V, singular): `singular` is a bool tensor of the batch shape,
    True where Q or A is not invertible. No error checking inside the solves (no host sync): the
    caller decides when to look at `singular`. Used by sample_instances and by the constrained
    attention layer (ode_attention.Attention with regime != "free")."""
    Kt, info_q = torch.linalg.solve_ex(Q, W, check_errors=False)
    Vt, info_a = torch.linalg.solve_ex(A, W, check_errors=False)
    return Kt.transpose(-1, -2), Vt.transpose(-1, -2), (info_q != 0) | (info_a != 0)


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
    K, V, singular = keys_values(Q, W, A)
    if bool(singular.any()):
        raise ValueError("a sampled Q or A is singular; draw again with another generator state.")
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
    """`python regimes.py --ckpt RUN/ckpt.pt`: the regime of every layer and head of a trained model.

    The checkpoint is the one training.save_checkpoint writes (train_lm.py, train_vit.py): a dict
    with "config" and "model" (a state dict) among its keys. What is read from them:
      config  d_model, n_heads (required); n_layers; attn_pe (else pe when it is an attention PE,
              else "none"); rope_base, rope_pairing, rope_heads; lam, lam_mode, regime; causal
              (default: True when the config has a vocab_size, i.e. a language model);
      model   block i's attention under "…blocks.{i}.attn.*" (DDP's "module." and torch.compile's
              "_orig_mod." prefixes are ignored), exactly the state dict of ode_attention.Attention.
    Each layer is rebuilt as ode_attention.Attention(d_model, n_heads, …) WITHOUT the training
    script (this is a library file), its weights are loaded strictly (a checkpoint whose weights do
    not fit its config is refused in one sentence) and .interaction() gives Q, K, V, O and λ.
    Printed: per layer and head the inertia and balance β (see `layer_report`), the regime, the
    learned λ; with a λ-term both the attention weights alone ("W") and the realised logit form
    ("W+λ"). Written to OUT/<run folder name>/: layers.csv, heatmap.png, summary.md (and
    rope_offsets.csv for RoPE models).
    """
    specs, info = checkpoint_layers(path)
    name = info["name"]
    rep = analyse_specs(specs, name=name, info=info, far_max=max(1, info["seq_len"] - 1))
    folder = os.path.join(out, _safe_name(name))
    write_report(rep, folder)
    print(format_layer_table(rep))
    print(f"\nwrote {folder}/ (layers.csv, heatmap.png, summary.md"
          + (", rope_offsets.csv" if rep["offset_rows"] else "") + ")")
    return 0


def report_model(name: str, out: str, text) -> int:
    """`python regimes.py --model NAME[,NAME...]`: regimes and token probe of pretrained models.

    NAME is anything pretrained.load accepts ("minilm", "smollm2", a .gguf file, a transformers hub
    name or folder such as "gpt2"). For each model, OUT/<name>/ gets layers.csv, heatmap.png,
    probe.csv, probe.png and summary.md (+ rope_offsets.csv for rotary models); with two or more
    names, OUT/compare.png and OUT/compare.md put their token probes side by side (absolute PE
    vs rotary: full blocks and attention-only updates, each with its PE and with it removed).
    An unknown name or a missing optional package is a ValueError of one sentence (exit 2).
    """
    names = [s.strip() for s in str(name).split(",") if s.strip()]
    if not names:
        raise ValueError("--model needs at least one model name (comma-separated for a comparison).")
    text = PROBE_TEXT if text is None else text
    if not text.strip():
        raise ValueError("--text is empty: the token probe needs some text.")
    reports = []
    for nm in names:
        net = load_pretrained(nm)
        rep = analyse_model(net, text, name=nm)
        folder = os.path.join(out, _safe_name(nm))
        write_report(rep, folder)
        print(format_layer_table(rep, heads=False))
        print(f"wrote {folder}/\n")
        reports.append(rep)
        del net
    if len(reports) > 1:
        write_comparison(reports, out)
        print(f"wrote {os.path.join(out, 'compare.png')} and compare.md")
    return 0


# ------------------------------------------------------------------------------------------------
# 6. Reports on real layers. The maths of what is reported, and why.
#
# Per-head inertia is fixed by the architecture. For one head, Wₕ = s Qₕ Kₕᵀ (Qₕ, Kₕ ∈ R^{d×dₕ},
# s = 1/√dₕ) and
#     Wₕ,sym = ½ s (Qₕ Kₕᵀ + Kₕ Qₕᵀ) = Uₕ Cₕ Uₕᵀ,   Uₕ = [Qₕ Kₕ] ∈ R^{d×2dₕ},  Cₕ = ½ s [[0, I], [I, 0]].
# Cₕ has eigenvalues ±s/2 (inertia (dₕ, dₕ, 0)); when Uₕ has full column rank (generic, 2dₕ ≤ d)
# Sylvester's law of inertia (for a congruence by a full-column-rank Uₕ) gives
#     inertia(Wₕ,sym) = (dₕ, dₕ, d − 2dₕ)          for EVERY head of every model, trained or not.
# So the count "n₊ among the nonzero eigenvalues" is ½ by construction and tells nothing about a
# trained head. What differs between heads is how much of the spectrum sits on either side:
#     β(S) = Σᵢ λᵢ / Σᵢ |λᵢ| = tr S / ‖S‖_*  ∈ [−1, 1],   β = 1 ⇔ S ⪰ 0,  β = −1 ⇔ S ⪯ 0     (balance)
# (tr Wₕ,sym = tr Wₕ, and E xᵀWₕx = σ² tr Wₕ for isotropic x: β > 0 means the head's logit
# favours a token's own direction on average). The heat map shows β per head.
# The same argument at the layer: W = Σₕ Wₕ = s Q Kᵀ; with grouped-query attention K has rank
# ≤ H_kv·dₕ = r, hence inertia(W_sym) = (r, r, d − 2r) (SmolLM2-135M: (192, 192, 192)), and the
# value path M = V O has rank ≤ r < d, so A = W (Mᵀ)⁻¹ does not exist: analyse_layer reports
# rank(M), the least-squares A = W (Mᵀ)⁺ and its relative residual ‖A Mᵀ − W‖/‖W‖.
#
# Nonzero eigenvalues cheaply: for S = U C Uᵀ (U ∈ R^{d×r}, C symmetric r×r), S and C UᵀU share
# their nonzero eigenvalues, and C G (G = UᵀU ⪰ 0) is similar to G^{1/2} C G^{1/2}: an r×r
# symmetric eigenproblem instead of a d×d one; the other d − r eigenvalues of S are 0.
#
# RoPE. Head h rotates its query and key rows, q ↦ q R(i)ᵀ, k ↦ k R(j)ᵀ (rope.apply_rope), so the
# logit of (i, j) is xᵢ Qₕ R(i)ᵀR(j) Kₕᵀ xⱼᵀ = xᵢ Wₕ(m) xⱼᵀ with m = j − i (m ≤ 0 in causal models)
#     Wₕ(m) = s Qₕ R(m) Kₕᵀ,   R(m) = blockdiag(R_rot(m), I)                                  (notes §1.3)
# R_rot of size rotary_dim with the model's pairing and base (rope.rotation_matrix), identity on
# the features RoPE leaves alone. Wₕ(m) = s Qₕ (Kₕ R(m)ᵀ)ᵀ has the same structure as Wₕ, so its
# inertia is (dₕ, dₕ, ·) at every offset; we report how often βₕ(m) keeps the sign of βₕ(0). The
# layer's W(m) = Σₕ Wₕ(m) and A(m) = W(m) (Mᵀ)⁻¹ can change inertia and regime with m: per layer
# we report the fraction of offsets at which W_sym(m) keeps the inertia of W_sym(0), β(W_sym(m))
# keeps its sign, and (M invertible) the regime of (W(m), A(m)) equals that at m = 0 — over near
# offsets 1 ≤ |m| < 32 and far ones (32, 48, 64, 96, …, log-spaced up to the context length).
#
# λ-term (checkpoints). Head h's logit form becomes s (Qₕ Kₕᵀ + Eₕ Λₕ Eₕᵀ), Eₕ ∈ R^{d×dₕ} the
# selector of the head's coordinates, Λₕ = λₕ I ("identity") or diag(softplus φₕ) ("softplus-
# diag"). As in Attention.forward it is folded into the features: Q̃ₕ = [Qₕ | Eₕ Λₕ],
# K̃ₕ = [Kₕ | Eₕ], and the λ-part is not rotated (R̃(m) = blockdiag(R(m), I)). Both forms are
# reported: "W" (the attention weights alone) and "W+λ" (the logit form the model realises).
# ------------------------------------------------------------------------------------------------
PROBE_TEXT = ("The river starts as a thin stream high in the mountains, where snow melts slowly in "
              "the spring sun. It gathers water from many small valleys, grows wide and calm, and "
              "passes farms, villages and an old stone bridge before it reaches the city. There it "
              "turns a mill, feeds the gardens along its banks and finally flows into the sea, "
              "carrying sand and leaves that it picked up on its long journey.")
NEAR_OFFSETS = 32
FAR_OFFSETS = (32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
LAYER_FIELDS = ("source", "form", "layer", "head", "n_pos_W", "n_neg_W", "n_zero_W", "eig_W_min",
                "eig_W_max", "balance_W", "W_sym", "A", "n_pos_A", "n_neg_A", "n_zero_A", "balance_A",
                "A_lsq_residual", "cond_M", "rank_M", "regime", "rope_inertia_kept_near",
                "rope_inertia_kept_far", "rope_balance_sign_kept_near", "rope_balance_sign_kept_far",
                "rope_regime_kept_near", "rope_regime_kept_far", "lam")
OFFSET_FIELDS = ("source", "form", "layer", "offset", "n_pos_W", "n_neg_W", "n_zero_W", "balance_W",
                 "mean_head_balance", "regime")
PROBE_FIELDS = ("source", "pe", "mode", "pe_active", "depth", "n_tokens", "norm", "pairwise_distance",
                "mean_sq_distance", "sharpness", "cosine", "median_norm", "first_token_norm")


def balance(ev: torch.Tensor) -> torch.Tensor:
    """β = Σλ / Σ|λ| over the last dimension (0 for an all-zero spectrum)."""
    return ev.sum(-1) / ev.abs().sum(-1).clamp_min(1e-300)


def _inertia_of_eigs(ev: torch.Tensor, d: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n₊, n₋, n₀) per row of eigenvalues ev (..., r) of a d×d matrix whose other d − r are 0;
    |λ| ≤ tol·max|λ| counts as zero (the rule of `inertia`)."""
    thr = tol * ev.abs().amax(-1, keepdim=True)
    n_pos, n_neg = (ev > thr).sum(-1), (ev < -thr).sum(-1)
    return n_pos, n_neg, d - n_pos - n_neg


def lowrank_sym_eigs(U: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nonzero-part eigenvalues of S = U C Uᵀ (U (d, r), C (..., r, r) symmetric): those of
    G^{1/2} C G^{1/2}, G = UᵀU — r of them, ascending (S has d − r more zeros when r ≤ d)."""
    g, E = torch.linalg.eigh(U.T @ U)                           # G = E diag(g) Eᵀ ⪰ 0
    G_half = (E * g.clamp_min(0).sqrt()) @ E.T                  # G^{1/2}
    return torch.linalg.eigvalsh(G_half @ C @ G_half)


def rope_rotations(offsets, width: int, rotary_dim: int, base: float, pairing: str) -> torch.Tensor:
    """R(m) (M, width, width) for each offset: rope.rotation_matrix(m, rotary_dim) on the first
    rotary_dim features, identity on the rest (partial RoPE, and the unrotated λ features)."""
    import rope
    R = torch.eye(width, dtype=torch.float64).repeat(len(offsets), 1, 1)
    for i, m in enumerate(offsets):
        R[i, :rotary_dim, :rotary_dim] = rope.rotation_matrix(float(m), rotary_dim, base, pairing)
    return R


def offset_list(causal: bool, far_max: int) -> list:
    """m = j − i for the near (1 ≤ |m| < 32) and far (log-spaced, ≤ far_max) offsets; causal
    models only see keys before the query (m < 0), bidirectional ones both signs."""
    ks = [k for k in range(1, NEAR_OFFSETS) if k <= far_max] + [k for k in FAR_OFFSETS if k <= far_max]
    return [-k for k in ks] if causal else [s * k for k in ks for s in (-1, 1)]


def with_lam(spec: dict) -> dict:
    """The spec of the realised logit form W+λ: Q̃ₕ = [Qₕ | Eₕ Λₕ], K̃ₕ = [Kₕ | Eₕ] per head."""
    Q, K, H, lam = spec["Q"], spec["K"], spec["n_heads"], spec["lam"].double()
    d, dq = Q.shape[0], Q.shape[1] // H
    dh = d // H
    Qs, Ks = [], []
    for h in range(H):
        E = torch.zeros(d, dh, dtype=torch.float64)
        E[h * dh:(h + 1) * dh] = torch.eye(dh, dtype=torch.float64)             # Eₕ
        Lam = lam[h] * torch.eye(dh, dtype=torch.float64) if lam.ndim == 1 else torch.diag(lam[h])
        Qs += [Q[:, h * dq:(h + 1) * dq], E @ Lam]                              # [Qₕ | Eₕ Λₕ]
        Ks += [K[:, h * dq:(h + 1) * dq], E]                                    # [Kₕ | Eₕ]
    return dict(spec, Q=torch.cat(Qs, 1), K=torch.cat(Ks, 1), form="W+λ")


def layer_report(spec: dict, offsets=(), tol: float = 1e-6) -> dict:
    """Everything reported for one layer. spec: Q, K (d, H·d_q), V (d, d_v·H), O (or None),
    n_heads, scale, rot (None or {base, pairing, rotary_dim, rope_heads}), layer, form.
    Returns {"layer": row, "heads": [rows], "offsets": [rows]} (rows of LAYER_/OFFSET_FIELDS)."""
    Q, K = spec["Q"].detach().double(), spec["K"].detach().double()
    H, s = spec["n_heads"], float(spec["scale"])
    d, dq = Q.shape[0], Q.shape[1] // H
    r = analyse_layer(Q, K, spec["V"], spec["O"], H, s, tol=tol)
    rot = spec.get("rot")
    offs = [0] + (list(offsets) if rot else [])
    # R(m) per offset and head: (M, H, d_q, d_q); heads past rope_heads are not rotated
    R = torch.eye(dq, dtype=torch.float64).repeat(len(offs), H, 1, 1)
    if rot:
        Rm = rope_rotations(offs, dq, rot["rotary_dim"], rot["base"], rot["pairing"])
        R[:, : rot.get("rope_heads", H)] = Rm[:, None]
    base = {"source": spec.get("source", ""), "form": spec.get("form", "W"), "layer": spec["layer"]}

    def kept(flags):   # fraction over near (1 ≤ |m| < 32) and far offsets of a boolean per offset
        near = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) < NEAR_OFFSETS]
        far = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) >= NEAR_OFFSETS]
        return (sum(near) / len(near) if near else ""), (sum(far) / len(far) if far else "")

    heads, head_bal = [], []
    Z = torch.zeros(len(offs), dq, dq, dtype=torch.float64)
    for h, hr in enumerate(r["heads"]):
        sl = slice(h * dq, (h + 1) * dq)
        # Wₕ,sym(m) = Uₕ Cₕ(m) Uₕᵀ,  Uₕ = [Qₕ Kₕ],  Cₕ(m) = ½ s [[0, R(m)], [R(m)ᵀ, 0]]
        C = 0.5 * s * torch.cat((torch.cat((Z, R[:, h]), 2), torch.cat((R[:, h].transpose(1, 2), Z), 2)), 1)
        ev = lowrank_sym_eigs(torch.cat((Q[:, sl], K[:, sl]), 1), C)            # (M, 2 d_q)
        b = balance(ev)                                                         # βₕ(m)
        head_bal.append(b)
        sign_kept = [bool(torch.sign(x) == torch.sign(b[0])) for x in b]
        ip, ineg, iz = hr["inertia_W"]
        row = dict(base, head=h, n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=hr["eig_W_min"],
                   eig_W_max=hr["eig_W_max"], balance_W=float(b[0]), W_sym=hr["W_sym"])
        if rot:
            row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(sign_kept)
        heads.append(row)

    ew = r["eig_W_sym"]
    ip, ineg, iz = r["inertia_W"]
    M = r["M"]
    rank = int(torch.linalg.matrix_rank(M))
    row = dict(base, head="all", n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=float(ew[0]),
               eig_W_max=float(ew[-1]), balance_W=float(balance(ew)),
               W_sym="psd" if ineg == 0 else ("nsd" if ip == 0 else "indefinite"),
               cond_M=r["cond_M"], rank_M=rank, regime=r["regime"])
    if r["A"] is not None:
        row.update(A="exact", balance_A=float(balance(r["eig_A_sym"])))
        row["n_pos_A"], row["n_neg_A"], row["n_zero_A"] = r["inertia_A"]
    else:   # least-squares A = W (Mᵀ)⁺, with its residual (the identity (I) does not hold)
        row.update(A="least-squares", A_lsq_residual=r["A_lsq_residual"],
                   balance_A=float(balance(torch.linalg.eigvalsh(sym(r["A_lsq"])))))
        row["n_pos_A"], row["n_neg_A"], row["n_zero_A"] = r["inertia_A_lsq"]

    offset_rows = []
    if rot:
        Qh, Kh = Q.view(d, H, dq), K.view(d, H, dq)
        # W(m) = Σₕ s Qₕ R(m) Kₕᵀ   (M, d, d)
        Wm = s * torch.einsum("dhi,mhij,ehj->mde", Qh, R, Kh)
        ev = torch.linalg.eigvalsh(sym(Wm))
        n_pos, n_neg, n_zero = _inertia_of_eigs(ev, d, tol)
        bw = balance(ev)
        regimes_m = [""] * len(offs)
        if r["A"] is not None:   # A(m) Mᵀ = W(m)
            Am = torch.linalg.solve(M, Wm.transpose(1, 2)).transpose(1, 2)
            regimes_m = classify_batch(Wm, Am, tol)
        hb = torch.stack(head_bal).mean(0)
        for i, m in enumerate(offs):
            offset_rows.append(dict(base, offset=m, n_pos_W=int(n_pos[i]), n_neg_W=int(n_neg[i]),
                                    n_zero_W=int(n_zero[i]), balance_W=float(bw[i]),
                                    mean_head_balance=float(hb[i]), regime=regimes_m[i]))
        same = [(int(n_pos[i]), int(n_neg[i])) == (int(n_pos[0]), int(n_neg[0])) for i in range(len(offs))]
        row["rope_inertia_kept_near"], row["rope_inertia_kept_far"] = kept(same)
        row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(
            [bool(torch.sign(x) == torch.sign(bw[0])) for x in bw])
        if r["A"] is not None:
            row["rope_regime_kept_near"], row["rope_regime_kept_far"] = kept(
                [x == regimes_m[0] for x in regimes_m])
    if spec.get("lam") is not None and spec.get("form") == "W+λ":
        lam = spec["lam"]
        row["lam"] = " ".join(f"{float(x):.4g}" for x in (lam if lam.ndim == 1 else lam.mean(1)))
        for h, hr in enumerate(heads):
            hr["lam"] = f"{float(lam[h] if lam.ndim == 1 else lam[h].mean()):.4g}"
    return {"layer": row, "heads": heads, "offsets": offset_rows}


def analyse_specs(specs: list, *, name: str, info: dict, far_max: int = 4096, progress: bool = True) -> dict:
    """layer_report for every spec (and for its W+λ form when the layer has a λ-term)."""
    from tqdm import tqdm
    layers, heads, offset_rows = [], [], []
    for spec in tqdm(specs, desc=f"{name}: layers", disable=not progress):
        offs = offset_list(spec.get("causal", True), far_max) if spec.get("rot") else ()
        forms = [dict(spec, form="W")] + ([with_lam(spec)] if spec.get("lam") is not None else [])
        for sp in forms:
            rep = layer_report(dict(sp, source=name), offs)
            layers.append(rep["layer"])
            heads.extend(rep["heads"])
            offset_rows.extend(rep["offsets"])
    return {"name": name, "info": info, "layers": layers, "heads": heads, "offset_rows": offset_rows,
            "probe": []}


# -- sources of layers: a training checkpoint, a pretrained model ---------------------------------
def checkpoint_layers(path: str) -> tuple[list, dict]:
    """(specs, info) for every block of a training checkpoint (format: report_checkpoint)."""
    import re
    import ode_attention as oa
    import training
    state = training.load_checkpoint(path)
    cfg, sd = state["config"], state["model"]
    if not isinstance(cfg, dict) or not isinstance(sd, dict):
        raise ValueError(f"{path} has no config dict and model state dict.")
    missing = [k for k in ("d_model", "n_heads") if k not in cfg]
    if missing:
        raise ValueError(f"the checkpoint {path} comes from another config: it has no {missing[0]!r}.")
    blocks = {}
    for key, t in sd.items():
        m = re.match(r"^(?:module\.|_orig_mod\.)*(?:.*\.)?blocks\.(\d+)\.attn\.(.+)$", key)
        if m:
            blocks.setdefault(int(m[1]), {})[m[2]] = t
    n_layers = int(cfg.get("n_layers", len(blocks)))
    if not blocks or sorted(blocks) != list(range(n_layers)):
        raise ValueError(f"the checkpoint {path} comes from another config: its config says {n_layers} "
                         f"layers but its weights hold blocks.{{i}}.attn.* for {len(blocks)}.")
    pe = cfg.get("attn_pe") or (cfg.get("pe") if cfg.get("pe") in oa.PE_IN_ATTENTION else "none")
    kw = dict(causal=bool(cfg.get("causal", "vocab_size" in cfg)), pe=pe,
              rope_base=float(cfg.get("rope_base", 10000.0)), rope_pairing=cfg.get("rope_pairing", "interleaved"),
              rope_heads=cfg.get("rope_heads"), lam=float(cfg.get("lam", 0.0) or 0.0),
              lam_mode=cfg.get("lam_mode", "identity"), regime=cfg.get("regime", "free"))
    d, H = int(cfg["d_model"]), int(cfg["n_heads"])
    desc = ", ".join(f"{k}={v!r}" for k, v in (("d_model", d), ("n_heads", H), ("pe", pe),
                                                 ("regime", kw["regime"]), ("lam", kw["lam"])))
    specs = []
    for i in range(n_layers):
        sub = blocks[i]
        try:
            attn = oa.Attention(d, H, bias=any(k in sub for k in ("qkv.bias", "qkv_bias")), **kw)
            attn.load_state_dict(sub, strict=True)
        except (RuntimeError, ValueError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0]).rstrip(".")
            raise ValueError(f"the checkpoint {path} comes from another config: block {i}'s attention "
                             f"does not fit {desc} ({detail}).") from None
        it = attn.double().interaction()
        rot = ({"base": attn.rope_base, "pairing": attn.rope_pairing, "rotary_dim": attn.d_h,
                "rope_heads": attn.rope_heads} if pe == "rope" else None)
        specs.append({"layer": i, "Q": it["Q"], "K": it["K"], "V": it["V"], "O": it["O"],
                      "n_heads": H, "scale": it["scale"], "rot": rot, "causal": attn.causal,
                      "lam": it["lam"]})
    p = os.path.abspath(path)
    run = os.path.basename(p if os.path.isdir(p) else os.path.dirname(p)) or "ckpt"
    info = {"kind": "checkpoint", "path": path, "d": d, "n_layers": n_layers, "n_heads": H,
            "n_kv_heads": H, "head_dim": d // H, "pe": cfg.get("pe", pe), "attn_pe": pe,
            "regime_config": kw["regime"], "lam": kw["lam"], "lam_mode": kw["lam_mode"],
            "causal": kw["causal"], "seq_len": int(cfg.get("seq_len", 4097)), "step": state.get("step"),
            "rope": (f"{attn.rope_pairing} pairing, base {attn.rope_base:g}, all {attn.d_h} head dims"
                     if pe == "rope" else None),
            "name": run}
    if pe in ("rope-axial", "rope-mixed"):
        info["note"] = f"{pe} is a 2-D encoding: the 1-D offset analysis is not done for it."
    return specs, info


def load_pretrained(name: str):
    """pretrained.load(name) in float64 (attention-only updates grow geometrically without the
    norms: SmolLM2's pass 1e19 by layer 18, where float32 logits overflow), with its errors as
    one-sentence ValueErrors (a missing optional package too)."""
    try:
        import pretrained
        return pretrained.load(name, dtype=torch.float64)
    except ImportError as e:
        raise ValueError(" ".join(str(e).split())) from None
    except ValueError as e:   # transformers' offline messages span several lines: keep one
        msg = " ".join(str(e).split())
        raise ValueError(msg if len(msg) < 300 else msg[:297] + "...") from None


def pretrained_layers(net) -> tuple[list, dict]:
    """(specs, info) of a pretrained.Net via pretrained.layer_matrices (GQA expanded to H heads)."""
    import pretrained
    c = net.config
    specs = []
    for L in pretrained.layer_matrices(net):
        rot = ({"base": L["rope_base"], "pairing": L["rope_pairing"], "rotary_dim": L["rotary_dim"],
                "rope_heads": L["n_heads"]} if L["pe"] == "rotary" else None)
        specs.append({"layer": L["layer"], "Q": L["Q"], "K": L["K"], "V": L["V"], "O": L["O"],
                      "n_heads": L["n_heads"], "scale": L["scale"], "rot": rot, "causal": L["causal"],
                      "lam": None})
    info = {"kind": "pretrained", "arch": c.arch, "d": c.d, "n_layers": c.n_layers, "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads, "head_dim": c.head_dim, "pe": c.pe, "causal": c.causal,
            "norm": ("pre-" if c.prenorm else "post-") + c.norm,
            "rope": (f"{c.rope_pairing} pairing, base {c.rope_base:g}, {c.rotary_dim or c.head_dim} of "
                     f"{c.head_dim} head dims rotated" if c.pe == "rotary" else None)}
    return specs, info


# -- the token probe through depth (notes §5.4) ----------------------------------------------------
class _PERemoved:
    """Context: the model's positional encoding switched off, weights untouched (absolute: the
    learned table is not added; rotary: q and k are not rotated). Restored on exit."""

    def __init__(self, net, active: bool):
        self.net, self.active, self.saved = net, active, None

    def __enter__(self):
        if self.active:
            self.saved = (self.net.pos_emb, [layer.attn.pe for layer in self.net.layers])
            self.net.pos_emb = None
            for layer in self.net.layers:
                layer.attn.pe = "none"
        return self

    def __exit__(self, *exc):
        if self.active:
            self.net.pos_emb = self.saved[0]
            for layer, pe in zip(self.net.layers, self.saved[1]):
                layer.attn.pe = pe
        return False


def probe_rows(net, inputs, source: str) -> list:
    """Probes of notes §5.4 after every block: full blocks and attention-only updates
    x ← x + Attn(x), each with the model's PE and with it removed. mean_sq_distance = dist/N²
    = mean over pairs (i, j) of ‖xᵢ − xⱼ‖², comparable across tokenisers of different N. The median
    and first-token norms show when one outlier token (an attention sink with a "massive
    activation", e.g. SmolLM2's first token from layer 12 on) dominates the means."""
    import ode_attention as oa
    import pretrained
    rows = []
    for pe_active in (True, False):
        for mode in ("full", "attention-only"):
            with _PERemoved(net, not pe_active):
                states = pretrained.hidden_states(net, inputs, attention_only=mode == "attention-only")
            for depth, X in enumerate(states):
                X = X.double()
                N = X.shape[-2]
                vals = ({k: float(fn(X)) for k, fn in oa.PROBES.items()} if torch.isfinite(X).all()
                        else {k: float("nan") for k in oa.PROBES})
                norms = torch.linalg.vector_norm(X, dim=-1)
                rows.append({"source": source, "pe": net.config.pe, "mode": mode, "pe_active": pe_active,
                             "depth": depth, "n_tokens": N, **vals, "median_norm": float(norms.median()),
                             "first_token_norm": float(norms[0]),
                             # mean over pairs: dist / N²
                             "mean_sq_distance": vals["pairwise_distance"] / N ** 2})
    return rows


def analyse_model(net, inputs, *, name: str, progress: bool = True) -> dict:
    """Layer analysis + token probe of a pretrained.Net; inputs: text or token ids."""
    specs, info = pretrained_layers(net)
    info["name"] = name
    rep = analyse_specs(specs, name=name, info=info, progress=progress)
    try:
        rep["probe"] = probe_rows(net, inputs, name)
    except ValueError as e:   # e.g. a local folder without tokenizer: the regimes still stand
        rep["info"]["note"] = f"no token probe: {e}"
    if rep["probe"]:
        rep["info"]["n_tokens"] = rep["probe"][0]["n_tokens"]
    return rep


# -- writing: CSV, figures, Markdown (all atomic) --------------------------------------------------
def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in os.path.basename(name.rstrip("/\\")) or name) or "model"


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.6g}"
    return str(v)


def _write_csv(path: str, fields, rows) -> None:
    lines = [",".join(fields)] + [",".join(_fmt(r.get(k, "")) for k in fields) for r in rows]
    _write_atomic(path, "\n".join(lines) + "\n")


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    os.replace(tmp, path)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmap(rep: dict, path: str) -> None:
    """(a) βₕ per layer × head; (b) per layer: n₊/(n₊+n₋) and β of W_sym and A_sym (A least-squares
    when M is singular); (c) rotary: β(W_sym(m)) per layer × offset."""
    plt = _plt()
    rows = [r for r in rep["layers"] if r["form"] == "W"]
    heads = [r for r in rep["heads"] if r["form"] == "W"]
    L, H = len(rows), rep["info"]["n_heads"]
    offs = sorted({o["offset"] for o in rep["offset_rows"]}, key=abs)
    ncol = 3 if offs else 2
    fig, axes = plt.subplots(1, ncol, figsize=(4.5 * ncol + 1.5, 3.0 + 0.22 * L),
                             gridspec_kw={"width_ratios": [3, 2.2] + ([3] if offs else [])})
    B = torch.full((L, H), float("nan"))
    for r in heads:
        B[r["layer"], r["head"]] = r["balance_W"]
    im = axes[0].imshow(B.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    axes[0].set(title="(a) head balance β(W_h,sym)", xlabel="head", ylabel="layer")
    frac = lambda p, n: p / (p + n) if p + n else float("nan")
    cols = [[frac(r["n_pos_W"], r["n_neg_W"]), frac(r["n_pos_A"], r["n_neg_A"]), r["balance_W"], r["balance_A"]]
            for r in rows]
    C = torch.tensor(cols, dtype=torch.float64)
    axes[1].imshow(torch.cat((C[:, :2] * 2 - 1, C[:, 2:]), 1).numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(L):
        for j in range(4):
            axes[1].text(j, i, f"{float(C[i, j]):.2f}", ha="center", va="center", fontsize=6)
    lsq = rows[0].get("A") == "least-squares"
    aname = "A_lsq" if lsq else "A"
    axes[1].set_xticks(range(4), ["n₊ share\nW_sym", f"n₊ share\n{aname}_sym", "β\nW_sym", f"β\n{aname}_sym"],
                       fontsize=7)
    axes[1].set(title="(b) layer W and A" + (" (least squares)" if lsq else ""), ylabel="layer")
    if offs:
        T = torch.full((L, len(offs)), float("nan"))
        for o in rep["offset_rows"]:
            if o["form"] == "W":
                T[o["layer"], offs.index(o["offset"])] = o["balance_W"]
        axes[2].imshow(T.numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ticks = [i for i, m in enumerate(offs) if abs(m) in (0, 8, 16, 31, 64, 256, 1024, 4096)]
        axes[2].set_xticks(ticks, [str(offs[i]) for i in ticks], fontsize=7, rotation=90)
        axes[2].set(title="(c) RoPE: β(W_sym(m)) of the layer", xlabel="offset m = j − i", ylabel="layer")
    fig.colorbar(im, ax=axes, shrink=0.6, label="β = Σλ/Σ|λ| (n₊ share mapped to 2s−1)")
    fig.suptitle(f"{rep['name']}: W_h = s Q_h K_hᵀ per head (inertia always (d_h, d_h, d−2d_h)), "
                 f"layer W = Σ W_h, A = W (Mᵀ)⁻¹, M = V O", fontsize=9)
    _save_figure(fig, path)


PROBE_PANELS = (("norm", "mean token norm", True), ("mean_sq_distance", "mean ‖xᵢ − xⱼ‖²", True),
                ("cosine", "mean pairwise cosine", False), ("sharpness", "sharpness", False))


def _probe_axes(plt, reps: list, title: str):
    """4 probes (rows) × 2 modes (columns); colour = model, solid = with PE, dashed = PE removed;
    x = depth ℓ / L so that models of different depth share an axis."""
    fig, axes = plt.subplots(4, 2, figsize=(11, 12), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, rep in enumerate(reps):
        L = rep["info"]["n_layers"]
        for col, mode in enumerate(("full", "attention-only")):
            for pe_active in (True, False):
                rows = [r for r in rep["probe"] if r["mode"] == mode and r["pe_active"] == pe_active]
                x = [r["depth"] / L for r in rows]
                for row_i, (key, label, logy) in enumerate(PROBE_PANELS):
                    ax = axes[row_i, col]
                    lab = f"{rep['name']} ({rep['info']['pe']}{'' if pe_active else ', PE removed'})"
                    ax.plot(x, [r[key] for r in rows], color=colours[ci % len(colours)],
                            ls="-" if pe_active else "--", marker="o" if pe_active else None, ms=3, label=lab)
                    if logy:
                        ax.set_yscale("log")
                    ax.set_ylabel(label)
                    ax.grid(alpha=0.3)
    axes[0, 0].set_title("full blocks (norms, MLP)")
    axes[0, 1].set_title("attention-only: x ← x + Attn(x)")
    for ax in axes[-1]:
        ax.set_xlabel("depth ℓ / L")
    axes[0, 1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.05, top=0.94, hspace=0.12, wspace=0.22)
    return fig


def write_report(rep: dict, folder: str) -> None:
    """layers.csv, heatmap.png, summary.md (+ rope_offsets.csv; probe.csv, probe.png)."""
    _write_csv(os.path.join(folder, "layers.csv"), LAYER_FIELDS,
               [r for L in rep["layers"] for r in
                [L] + [h for h in rep["heads"] if h["layer"] == L["layer"] and h["form"] == L["form"]]])
    if rep["offset_rows"]:
        _write_csv(os.path.join(folder, "rope_offsets.csv"), OFFSET_FIELDS, rep["offset_rows"])
    plot_heatmap(rep, os.path.join(folder, "heatmap.png"))
    if rep["probe"]:
        _write_csv(os.path.join(folder, "probe.csv"), PROBE_FIELDS, rep["probe"])
        _save_figure(_probe_axes(_plt(), [rep], f"{rep['name']}: tokens through depth (notes §5.4)"),
                     os.path.join(folder, "probe.png"))
    _write_atomic(os.path.join(folder, "summary.md"), summary_markdown(rep))


def write_comparison(reps: list, out: str) -> None:
    """compare.png (token probes side by side) and compare.md (the headline numbers)."""
    with_probe = [r for r in reps if r["probe"]]
    if with_probe:
        names = " vs ".join(f"{r['name']} ({r['info']['pe']})" for r in with_probe)
        _save_figure(_probe_axes(_plt(), with_probe, f"{names}: tokens through depth on the same text"),
                     os.path.join(out, "compare.png"))
    lines = ["# Pretrained models side by side", "", headline_table(reps), ""]
    for r in with_probe:
        lines += [f"## {r['name']}: token probe (first → last depth)", "", probe_table(r), ""]
    _write_atomic(os.path.join(out, "compare.md"), "\n".join(lines))


def _tri(r, key):
    return f"({r[f'n_pos_{key}']}, {r[f'n_neg_{key}']}, {r[f'n_zero_{key}']})"


def _num(v, spec=".3g"):
    return "—" if v in ("", None) else format(v, spec)


def headline_table(reps: list) -> str:
    """One row per model: shapes, structural facts and layer/head balances."""
    lines = ["| model | PE | d × layers, heads (kv) × d_h | layers W_sym definite | mean β(W_sym) | "
             "heads with βₕ > 0 | A | mean β(A_sym) | median cond(M) | RoPE: β(W_sym(m)) sign kept near / far |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rep in reps:
        i = rep["info"]
        rows = [r for r in rep["layers"] if r["form"] == "W"]
        hs = [h for h in rep["heads"] if h["form"] == "W"]
        definite = sum(r["W_sym"] in ("psd", "nsd") and r["n_zero_W"] == 0 for r in rows)
        mb = sum(r["balance_W"] for r in rows) / len(rows)
        ma = sum(r["balance_A"] for r in rows) / len(rows)
        conds = sorted(r["cond_M"] for r in rows)
        lsq = [r for r in rows if r["A"] == "least-squares"]
        kind = ("exact" if not lsq else
                f"least-squares in {len(lsq)} of {len(rows)} (rank M = {min(r['rank_M'] for r in lsq)}"
                + ("" if len({r['rank_M'] for r in lsq}) == 1 else f"–{max(r['rank_M'] for r in lsq)}")
                + f", residual {min(r['A_lsq_residual'] for r in lsq):.2f}–{max(r['A_lsq_residual'] for r in lsq):.2f})")
        near = [r["rope_balance_sign_kept_near"] for r in rows if r.get("rope_balance_sign_kept_near", "") != ""]
        far = [r["rope_balance_sign_kept_far"] for r in rows if r.get("rope_balance_sign_kept_far", "") != ""]
        rope_txt = (f"{sum(near) / len(near):.2f} / " + (f"{sum(far) / len(far):.2f}" if far else "—")
                    if near else "—")
        lines.append(f"| {rep['name']} | {i['pe']} | {i['d']} × {i['n_layers']}, {i['n_heads']} "
                     f"({i['n_kv_heads']}) × {i['head_dim']} | {definite} of {len(rows)} | {mb:+.3f} | "
                     f"{sum(h['balance_W'] > 0 for h in hs)} of {len(hs)} | {kind} | {ma:+.3f} | "
                     f"{conds[len(conds) // 2]:.3g} | {rope_txt} |")
    return "\n".join(lines)


def probe_table(rep: dict) -> str:
    """First and last depth of each probe in the four settings."""
    lines = ["| setting | norm | mean ‖xᵢ−xⱼ‖² | cosine | sharpness |", "|---|---|---|---|---|"]
    for mode in ("full", "attention-only"):
        for pe_active in (True, False):
            rows = [r for r in rep["probe"] if r["mode"] == mode and r["pe_active"] == pe_active]
            a, b = rows[0], rows[-1]
            cell = lambda k: f"{a[k]:.3g} → {b[k]:.3g}"
            lines.append(f"| {mode}, PE {'on' if pe_active else 'removed'} | {cell('norm')} | "
                         f"{cell('mean_sq_distance')} | {cell('cosine')} | {cell('sharpness')} |")
    return "\n".join(lines)


def summary_markdown(rep: dict) -> str:
    """The per-model (or per-checkpoint) Markdown summary."""
    i = rep["info"]
    out = [f"# Regimes of {rep['name']}", ""]
    facts = [f"width d = {i['d']}, {i['n_layers']} layers, {i['n_heads']} heads ({i['n_kv_heads']} key/value) "
             f"of d_h = {i['head_dim']}, PE: {i['pe']}" + (f" ({i['rope']})" if i.get("rope") else "")]
    if i.get("kind") == "checkpoint":
        facts.append(f"checkpoint {i['path']} (step {i['step']}): constrained regime in the config: "
                     f"{i['regime_config']}; λ = {i['lam']:g} ({i['lam_mode']})")
    if i.get("n_tokens"):
        facts.append(f"token probe on {i['n_tokens']} tokens of text")
    if i.get("note"):
        facts.append(i["note"])
    out += [f"- {f}" for f in facts]
    out += ["", "Per head, Wₕ = s Qₕ Kₕᵀ has rank ≤ d_h, so Wₕ,sym is never definite; by Sylvester's law "
            "its inertia is (d_h, d_h, d − 2d_h) whenever [Qₕ Kₕ] has full column rank, for any "
            "weights: the table reports the balance βₕ = Σλ/Σ|λ| ∈ [−1, 1] instead (1: ⪰ 0, −1: ⪯ 0). "
            "The layer: W = Σₕ Wₕ, value path M = Σₕ Vₕ Oₕ = V O, A = W (Mᵀ)⁻¹ when cond(M) ≤ 1e10, "
            "else regime \"undefined\" with rank(M) and the least-squares A = W (Mᵀ)⁺ and its relative "
            "residual. Inertia (n₊, n₋, n₀) counts |λ| ≤ 1e-6·max|λ| as zero.", "",
            "## Summary", "", headline_table([rep]), "", "## Layers", ""]
    has_rope = any(r.get("rope_inertia_kept_near", "") != "" for r in rep["layers"])
    has_lam = any(r["form"] == "W+λ" for r in rep["layers"])
    head = ("| layer | form | W_sym inertia | β(W_sym) | A | A_sym inertia | β(A_sym) | cond(M) | rank(M) | "
            "regime | heads βₕ min / max | heads βₕ > 0 |")
    sep = "|---" * 12
    if has_rope:
        head += " RoPE inertia kept near / far | RoPE β sign kept near / far | RoPE regime kept near / far |"
        sep += "|---|---|---"
    if has_lam:
        head += " λ per head |"
        sep += "|---"
    out += [head, sep + "|"]
    for r in rep["layers"]:
        hs = [h for h in rep["heads"] if h["layer"] == r["layer"] and h["form"] == r["form"]]
        bs = [h["balance_W"] for h in hs]
        a_txt = r["A"] + (f" (residual {r['A_lsq_residual']:.3f})" if r["A"] == "least-squares" else "")
        line = (f"| {r['layer']} | {r['form']} | {_tri(r, 'W')} | {r['balance_W']:+.3f} | {a_txt} | "
                f"{_tri(r, 'A')} | {r['balance_A']:+.3f} | {r['cond_M']:.3g} | {r['rank_M']} | {r['regime']} | "
                f"{min(bs):+.2f} / {max(bs):+.2f} | {sum(b > 0 for b in bs)} of {len(bs)} |")
        if has_rope:
            line += " | ".join(f" {_num(r.get(a, ''), '.2f')} / {_num(r.get(b, ''), '.2f')}" for a, b in (
                ("rope_inertia_kept_near", "rope_inertia_kept_far"),
                ("rope_balance_sign_kept_near", "rope_balance_sign_kept_far"),
                ("rope_regime_kept_near", "rope_regime_kept_far"))) + " |"
        if has_lam:
            line += f" {r.get('lam', '') or '—'} |"
        out.append(line)
    if rep["offset_rows"]:
        out += ["", "## RoPE: the layer's W_sym(m) against the offset m = j − i (mean over layers)", "",
                "| offset m | mean β(W_sym(m)) | mean head βₕ(m) | layers whose W_sym(m) keeps the inertia at m = 0 |",
                "|---|---|---|---|"]
        offs = sorted({o["offset"] for o in rep["offset_rows"]}, key=abs)
        ref = {o["layer"]: o for o in rep["offset_rows"] if o["offset"] == 0 and o["form"] == "W"}
        for m in offs:
            if abs(m) not in (0, 1, 2, 4, 8, 16, 31, 64, 256, 1024, 4096):
                continue
            os_ = [o for o in rep["offset_rows"] if o["offset"] == m and o["form"] == "W"]
            kept = sum((o["n_pos_W"], o["n_neg_W"]) == (ref[o["layer"]]["n_pos_W"], ref[o["layer"]]["n_neg_W"])
                       for o in os_)
            out.append(f"| {m} | {sum(o['balance_W'] for o in os_) / len(os_):+.3f} | "
                       f"{sum(o['mean_head_balance'] for o in os_) / len(os_):+.3f} | {kept} of {len(os_)} |")
    if rep["probe"]:
        out += ["", "## Token probe (first → last depth; probe.csv has every depth)", "", probe_table(rep)]
    return "\n".join(out) + "\n"


def format_layer_table(rep: dict, heads: bool = True) -> str:
    """Plain-text table for the terminal: one line per layer (and per head)."""
    i = rep["info"]
    lines = [f"{rep['name']}: d={i['d']}, {i['n_layers']} layers, {i['n_heads']} heads "
             f"({i['n_kv_heads']} kv) of {i['head_dim']}, PE {i['pe']}" + (f" ({i['rope']})" if i.get("rope") else ""),
             f"{'layer':>5} {'form':>4} {'regime':>12} {'W_sym (+,-,0)':>16} {'β(W)':>7} "
             f"{'A':>13} {'A_sym (+,-,0)':>16} {'β(A)':>7} {'cond(M)':>9} {'rank M':>6}"]
    for r in rep["layers"]:
        lines.append(f"{r['layer']:>5} {r['form']:>4} {r['regime']:>12} {_tri(r, 'W'):>16} {r['balance_W']:+7.3f} "
                     f"{r['A']:>13} {_tri(r, 'A'):>16} {r['balance_A']:+7.3f} {r['cond_M']:9.3g} {r['rank_M']:>6}"
                     + (f"   RoPE inertia kept near/far {_num(r.get('rope_inertia_kept_near', ''), '.2f')}"
                        f"/{_num(r.get('rope_inertia_kept_far', ''), '.2f')}"
                        if r.get("rope_inertia_kept_near", "") != "" else "")
                     + (f"   λ = {r['lam']}" if r.get("lam") else ""))
        if heads:
            for h in rep["heads"]:
                if h["layer"] == r["layer"] and h["form"] == r["form"]:
                    lines.append(f"{'':>11} head {h['head']:<3} W_h,sym {_tri(h, 'W'):>14} {h['W_sym']:>10} "
                                 f"β_h {h['balance_W']:+.3f}  eig min/max {h['eig_W_min']:+.3g}/{h['eig_W_max']:+.3g}"
                                 + (f"  λ_h = {h['lam']}" if h.get("lam") else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
