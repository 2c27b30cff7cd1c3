"""Regimes of the attention field: W, A, their symmetric parts, inertia and the classification.

For the field dX/dt = softmax(X Q Kᵀ Xᵀ) X V (ode_attention.py) the two matrices that decide where
tokens go are (docs/conventions.md, docs/dynamics.md §1):

    W = Q Kᵀ                  the query–key interaction: logit sᵢⱼ = xᵢᵀ W xⱼ
    A = W (Vᵀ)⁻¹              so that A Vᵀ = W and  xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ       (identity (I))

and only their symmetric parts matter for quadratic forms: M_sym = (M + Mᵀ)/2, xᵀ M x = xᵀ M_sym x.

Regimes (sufficient conditions, docs/conventions.md; docs/dynamics.md §1.2 derives them for symmetric A):
    convergent     W_sym ≻ 0 and A_sym ≺ 0   — all tokens go to zero (paper's ND scenario)
    divergent      W_sym ≻ 0 and A_sym ≻ 0   — norms grow without bound (PD scenario; the energy
                                                argument bounds norms, not distances: pairwise
                                                distances need not grow, README "Divergence does
                                                not always mean spreading")
    intermediate   anything else (mixed inertia; the paper's HD scenario is A_sym with ⌊d/2⌋
                   negative eigenvalues)
For symmetric A, E(t) = Σᵢ xᵢᵀ A xᵢ is non-decreasing whenever W_sym ⪰ 0 (non-causal), which is our
theorem; for non-symmetric A the conditions are the paper's claim, and they are not enough: near
X = 0 the mean token obeys x̄' = x̄V, so convergence also needs V Hurwitz (α(V) = max Re λ(V) < 0,
`value_abscissa`), automatic for symmetric A, not for a large antisymmetric part (docs/dynamics.md
§1.2). `regime_of` reports α(V) and warns when the sign conditions hold without it; the phase
diagrams (`python -m analysis.phase`) measure where simulation agrees.

Inertia = (n₊, n₋, n₀), the numbers of positive, negative and zero eigenvalues of a symmetric
matrix. An eigenvalue with |λ| ≤ τ · max|λ| counts as zero: a definiteness verdict that depends
on round-off is reported as "zero", i.e. not definite. τ is the round-off of the computation, not
a guess (`roundoff_tol`): τ = d·ε (ε = 2.2e-16, float64; the rule of numpy.linalg.matrix_rank) for
a matrix given exactly (W = Q Kᵀ, a sampled A), and τ = d·ε·κ(V) for A = W (Vᵀ)⁻¹ solved from a
value map with condition number κ(V), the forward-error bound of that solve. (It used to be a
flat 1e-6, ~10¹⁰ × round-off: a positive-definite W_sym with condition number ≥ 10⁶ was called
semi-definite.) Pass tol= to impose a threshold of your own.

Matrices with prescribed inertia (Sylvester's law of inertia): S = L D Lᵀ with L unit lower-
triangular (hence invertible) has exactly the inertia of the diagonal D. With D = σ ⊙ softplus(θ),
σ ∈ {±1} fixed, the inertia of S is fixed for every value of the parameters (L, θ) — which is how
the constrained training keeps its regime, and how random instances get their regime by design.

Positional encodings (docs/dynamics.md §1.3):
    RoPE:  sᵢⱼ = xᵢᵀ Q R(j−i) Kᵀ xⱼ, so W becomes offset-dependent, W(m) = Q R(m) Kᵀ = W + ΔW(m),
           A(m) = W(m) (Vᵀ)⁻¹; `rope_offset_regimes` classifies each offset m. R(m) is built in one
           place, `rope_rotations` (from rope.rotation_matrix).
    absolute PE: the driving token is yᵢ = xᵢ + pᵢ, so the equilibrium moves from xᵢ = 0 to −pᵢ.

What uses these criteria lives in analysis/: the agreement experiment (analysis/agreement.py) and
the regime reports of checkpoints and pretrained models (analysis/reports.py).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import rope

REGIME_NAMES = ("convergent", "divergent", "intermediate")


# ================================================================================================
# 1. W, A, symmetric parts, inertia, classification
# ================================================================================================
def sym(M: torch.Tensor) -> torch.Tensor:
    """M_sym = (M + Mᵀ) / 2 — the part that a quadratic form xᵀ M x sees."""
    return 0.5 * (M + M.transpose(-1, -2))


def _as_float64(name: str, M, square: bool = False) -> torch.Tensor:
    """The one input check: M is a finite floating-point matrix (or a batch of them; with square,
    exactly one square matrix). Returns M in float64, detached."""
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor.")
    if M.ndim < 2:
        raise ValueError(f"{name} must be a matrix, got shape {tuple(M.shape)}.")
    if M.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(M.shape)}): there is no regime to read off.")
    if square and (M.ndim != 2 or M.shape[0] != M.shape[1]):
        raise ValueError(f"{name} must be one square matrix, got shape {tuple(M.shape)}.")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    return M.detach().double()


EPS = torch.finfo(torch.float64).eps                            # 2.2e-16


def roundoff_tol(d: int, cond=1.0):
    """τ = d · ε · max(1, κ): the relative size below which an eigenvalue of a d × d symmetric
    matrix computed in float64 is round-off. κ = 1 for a matrix known exactly (eigvalsh is
    backward stable: each computed eigenvalue is within ~d·ε·max|λ| of the true one); κ = cond(V)
    for A = W (Vᵀ)⁻¹ from a linear solve, whose relative forward error is ≲ κ(V)·d·ε. cond may be
    a float or a tensor (one κ per matrix of a batch)."""
    c = torch.as_tensor(cond, dtype=torch.float64).clamp_min(1.0)
    return d * EPS * c if c.ndim else d * EPS * float(c)


def _check_tol(tol) -> None:
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ValueError(f"tol must be None (round-off) or a number in [0, 1), got {tol!r}.")


def inertia_counts(ev: torch.Tensor, tol: float | None = None,
                   cond=1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n₊, n₋, n₀) per row of eigenvalues ev (..., d): |λ| ≤ τ·max|λ| counts as zero, with
    τ = tol when given, else the round-off roundoff_tol(d, cond) (cond: κ(V) when the matrix was
    solved from V; a float, or one per row). The one inertia rule, batched; `inertia`, the regime
    rule and the reports all count with it."""
    _check_tol(tol)
    tau = torch.as_tensor(roundoff_tol(ev.shape[-1], cond) if tol is None else tol, dtype=ev.dtype)
    thr = (tau[..., None] if tau.ndim else tau) * ev.abs().amax(-1, keepdim=True)
    n_pos, n_neg = (ev > thr).sum(-1), (ev < -thr).sum(-1)
    return n_pos, n_neg, ev.shape[-1] - n_pos - n_neg


def inertia(S: torch.Tensor, tol: float | None = None) -> tuple[int, int, int]:
    """(n₊, n₋, n₀) of the symmetric matrix S (known exactly); |λ| ≤ τ·max|λ| counts as zero,
    τ = tol or the round-off d·ε (inertia_counts)."""
    ev = torch.linalg.eigvalsh(sym(_as_float64("S", S, square=True)))
    return tuple(int(c) for c in inertia_counts(ev, tol))


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
    return W, value_form(W, V)


def value_form(W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A = W (Vᵀ)⁻¹, the matrix of the identity xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ for the value map V
    (V invertible; interaction_matrices checks its condition number)."""
    # A Vᵀ = W  ⇔  V Aᵀ = Wᵀ  ⇔  Aᵀ = V⁻¹ Wᵀ
    return torch.linalg.solve(V, W.transpose(-1, -2)).transpose(-1, -2)


def logit_form(W: torch.Tensor, lam: float = 0.0, M: torch.Tensor | None = None) -> torch.Tensor:
    """What the λ-term does to the logit matrix, written once: it adds λ xᵢᵀ M xⱼ to every logit
    xᵢᵀ W xⱼ, so the realised logit form is  W_λ = W + λ M  (M = I when None). Its regime is read
    off (W_λ, A_λ) with A_λ = W_λ (Vᵀ)⁻¹ for the same value map V (lam_interaction): the identity
    (I) holds for the logits the softmax really sees. (Per head of a trained layer the same rule
    reads Wₕ + λ Eₕ Λₕ Eₕᵀ: analysis.reports.with_lam.)"""
    if lam == 0.0:
        return W
    return W + lam * (torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) if M is None else M)


def lam_interaction(W: torch.Tensor, V: torch.Tensor, lam: float = 0.0, M: torch.Tensor | None = None):
    """(W_λ, A_λ) = (W + λM, (W + λM)(Vᵀ)⁻¹): the pair whose regime the λ-term realises. Reading it
    off (W + λM, A) instead is wrong: W = diag(1, 10), A = −[[1, .95], [.95, 1]], λ = −0.9 looks
    convergent that way, while sym(A_λ) has eigenvalues (−1.13, +0.12)."""
    W_lam = logit_form(W, lam, M)
    return W_lam, value_form(W_lam, V)


def regime_rule(ew: torch.Tensor, ea: torch.Tensor, tol: float | None, cond_V=1.0) -> list[str]:
    """THE regime rule, on eigenvalues (B, d) of W_sym and A_sym: one name per row. classify_batch
    and regime_of apply it; classify_matrices and classify go through regime_of. A's zero threshold
    carries κ(V) when A was solved from V (cond_V: a float or one per row)."""
    d = ew.shape[-1]
    (w_pos, _, _), (a_pos, a_neg, _) = inertia_counts(ew, tol), inertia_counts(ea, tol, cond_V)
    return ["convergent" if w == d and an == d                  # W_sym ≻ 0, A_sym ≺ 0
            else "divergent" if w == d and ap == d              # W_sym ≻ 0, A_sym ≻ 0
            else "intermediate"
            for w, ap, an in zip(w_pos.tolist(), a_pos.tolist(), a_neg.tolist())]


def classify_batch(W: torch.Tensor, A: torch.Tensor, tol: float | None = None, cond_V=1.0) -> list[str]:
    """The regime of every (W, A) of a batch (..., d, d) at once (vectorised eigvalsh): flat list.
    cond_V: κ(V) when A was solved from V — a float, or a tensor broadcastable to the batch shape."""
    ew = torch.linalg.eigvalsh(sym(W.double())).flatten(0, -2)
    ea = torch.linalg.eigvalsh(sym(A.double())).flatten(0, -2)
    if torch.is_tensor(cond_V) and cond_V.ndim:
        cond_V = cond_V.double().broadcast_to(W.shape[:-2]).flatten()
    return regime_rule(ew, ea, tol, cond_V)


def value_abscissa(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """α(V) = max Re λ(V), the spectral abscissa of the value map, from (W, A) alone (batched).

    A Vᵀ = W gives Vᵀ = A⁻¹ W, and V, Vᵀ share their eigenvalues. Why it matters: near X = 0 every
    softmax row is uniform, so the mean token obeys x̄' = x̄ V (row form) and can only decay when V
    is Hurwitz (α(V) < 0). For symmetric A ≺ 0 with W_sym ≻ 0 that is automatic — A⁻¹W v = λ v
    gives λ = v*Wv / v*Av, whose real part is negative — but for a general A the sign conditions
    on the symmetric parts do not imply it (docs/dynamics.md §1.2)."""
    Vt = torch.linalg.solve(A.double(), W.double())
    return torch.linalg.eigvals(Vt).real.amax(-1)


def antisymmetry_ratio(M: torch.Tensor) -> torch.Tensor:
    """ρ = ‖M_anti‖₂ / ‖M_sym‖₂ (spectral norms, batched): how far M is from symmetric."""
    M = M.double()
    anti = 0.5 * (M - M.transpose(-1, -2))
    return torch.linalg.matrix_norm(anti, 2) / torch.linalg.matrix_norm(sym(M), 2)


def regime_of(W: torch.Tensor, A: torch.Tensor, tol: float | None = None, cond_V: float = 1.0) -> dict:
    """Eigenvalues and inertia of W_sym and A_sym, the regime they imply, and V's spectral
    abscissa α(V) = max Re λ(V) with Vᵀ = A⁻¹W (`value_abscissa`). "warning" is set when the sign
    conditions say convergent but V is not Hurwitz (α(V) ≥ 0): then the mean token x̄' = x̄V does
    not decay, and the prediction is not to be trusted (possible only for non-symmetric A).
    cond_V: κ(V) when A was solved from V (its zero threshold is then d·ε·κ, `roundoff_tol`)."""
    W, A = _as_float64("W", W, square=True), _as_float64("A", A, square=True)
    ew, ea = torch.linalg.eigvalsh(sym(W)), torch.linalg.eigvalsh(sym(A))
    iw = tuple(int(c) for c in inertia_counts(ew, tol))
    ia = tuple(int(c) for c in inertia_counts(ea, tol, cond_V))
    regime = regime_rule(ew[None], ea[None], tol, cond_V)[0]
    alpha = float(value_abscissa(W, A))
    warning = (f"the sign conditions hold but V is not Hurwitz (max Re λ(V) = {alpha:.3g} ≥ 0): "
               "the mean token does not decay" if regime == "convergent" and alpha >= 0 else "")
    return {"regime": regime, "inertia_W": iw, "inertia_A": ia, "eig_W_sym": ew, "eig_A_sym": ea,
            "abscissa_V": alpha, "hurwitz_V": alpha < 0, "rho_A": float(antisymmetry_ratio(A)),
            "warning": warning}


def classify_matrices(W: torch.Tensor, A: torch.Tensor, tol: float | None = None, cond_V: float = 1.0) -> str:
    """"convergent" | "divergent" | "intermediate" from W and A (cond_V: as for regime_of)."""
    return regime_of(W, A, tol, cond_V)["regime"]


def classify(Q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, tol: float | None = None) -> str:
    """"convergent" | "divergent" | "intermediate" for the single-head field with Q, K, V
    (A = W (Vᵀ)⁻¹ is solved from V, so its zero threshold carries κ(V))."""
    _check_tol(tol)
    W, A = interaction_matrices(Q, K, V)
    return classify_matrices(W, A, tol=tol, cond_V=float(torch.linalg.cond(V.double())))


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
    rho_cap > 0: T is scaled by min(1, rho_cap·‖S‖₂/‖T‖₂), so that ρ = ‖M_anti‖₂/‖M_sym‖₂ ≤ rho_cap
    always (the scale is differentiable; below the cap the form is unchanged).
    """

    def __init__(self, d: int, n_neg: int = 0, antisymmetric: bool = True, init_scale: float = 0.15,
                 l_std: float | None = None, t_std: float | None = None, generator=None,
                 rho_cap: float = 0.0):
        super().__init__()
        if d <= 0 or not 0 <= n_neg <= d:
            raise ValueError(f"need d > 0 and 0 <= n_neg <= d, got d={d}, n_neg={n_neg}.")
        if not (math.isfinite(rho_cap) and rho_cap >= 0) or (rho_cap and not antisymmetric):
            raise ValueError(f"rho_cap must be 0 (off) or positive, with an antisymmetric part; got {rho_cap}.")
        self.rho_cap = float(rho_cap)
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
        if not self.rho_cap:
            return ldl_form(self.L_free, self.sigma * F.softplus(self.theta), self.T_free)
        S = self.symmetric_part()
        T = self.T_free - self.T_free.T                                  # antisymmetric
        # ρ = ‖T‖₂/‖S‖₂ ≤ rho_cap: T ← T · min(1, rho_cap ‖S‖₂ / ‖T‖₂)
        norm_S, norm_T = torch.linalg.matrix_norm(S, 2), torch.linalg.matrix_norm(T, 2)
        return S + T * torch.clamp(self.rho_cap * norm_S / norm_T.clamp_min(1e-30), max=1.0)


def realised_inertia(m: PrescribedInertia) -> dict:
    """Did the forward pass really get the inertia it was built for? Sylvester's law fixes the
    inertia of L D Lᵀ in EXACT arithmetic; training evaluates the product in the parameters' dtype
    (float32 / bf16), and once κ = cond(L |D|^½) is large the smallest eigenvalue, ~ ‖S‖/κ², falls
    below the product's round-off (~ d·ε₃₂·‖S‖) and its sign is arbitrary: in float32 with D ≺ 0
    a positive eigenvalue appears in about half of the draws once κ ≳ 3·10⁴ (tested).

    S is computed exactly as forward() does, then its eigenvalues are read in float64 (whose own
    round-off, d·ε₆₄·‖S‖, is 10⁹ × smaller). Returns {"prescribed": (d − n_neg, n_neg, 0),
    "realised": (n₊, n₋, n₀), "kept": bool, "min_rel_eig": min|λ|/max|λ|, "kappa": κ,
    "dtype": str}. The training scripts record it per layer (summary.json) and warn when lost."""
    with torch.no_grad():
        S = m.symmetric_part()                                  # in the parameters' own dtype
        ev = torch.linalg.eigvalsh(sym(S.double()))
        got = tuple(int(c) for c in inertia_counts(ev))
        L = torch.eye(m.d, dtype=torch.float64, device=S.device) + m.L_free.double().tril(-1)
        kappa = float(torch.linalg.cond(L * F.softplus(m.theta.double()).sqrt()))
    want = (m.d - m.n_neg, m.n_neg, 0)
    return {"prescribed": want, "realised": got, "kept": got == want,
            "min_rel_eig": float(ev.abs().min() / ev.abs().max().clamp_min(1e-300)), "kappa": kappa,
            "dtype": str(S.dtype).replace("torch.", "")}


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
    attention layer (ode_attention.Attention with regime != "free"), there through WarmKeysValues,
    which gets the same K, V by matmuls from the last step's inverses on a GPU."""
    Kt, info_q = torch.linalg.solve_ex(Q, W, check_errors=False)
    Vt, info_a = torch.linalg.solve_ex(A, W, check_errors=False)
    return Kt.transpose(-1, -2), Vt.transpose(-1, -2), (info_q != 0) | (info_a != 0)


# ------------------------------------------------------------------------------------------------
# keys_values without two LU factorisations per forward: Newton–Schulz from the last call's inverse
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _exact_matmul(device: torch.device):
    """Matmuls in the tensors' own precision here, whatever the run set: no autocast and, on CUDA,
    no TF32 (its 10-bit mantissa would stall Newton–Schulz at ~1e-3 instead of round-off)."""
    with torch.autocast(device_type=device.type, enabled=False):
        if device.type != "cuda":
            yield
            return
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old


class _InverseTimes(torch.autograd.Function):
    """Y = M⁻¹ W for a batch M (B, d, d) and one W (d, d), given X ≈ M⁻¹ (a constant, checked).

    forward   Y = X W                                       (a matmul instead of an LU solve)
    backward  the adjoint of the solve Y = M⁻¹ W, with M⁻ᵀ applied as Xᵀ:
              W̄ = Σ_b M_b⁻ᵀ Ȳ_b,    M̄ = −M⁻ᵀ Ȳ Yᵀ
    so the gradients are the solve's to O(‖I − M X‖), i.e. to round-off once the check passed."""

    @staticmethod
    def forward(ctx, M, W, X):
        Y = X @ W
        ctx.save_for_backward(X, Y)
        return Y

    @staticmethod
    def backward(ctx, G):
        X, Y = ctx.saved_tensors
        with _exact_matmul(G.device):
            GW = X.transpose(-1, -2) @ G                            # M⁻ᵀ Ȳ, one per matrix
            GM = -GW @ Y.transpose(-1, -2) if ctx.needs_input_grad[0] else None
        return GM, GW.sum(0), None


class WarmKeysValues:
    """keys_values(Q, W, A) for one constrained layer, with matmuls instead of two LU solves per
    forward (the LU is latency-bound on a GPU: ~0.9 ms for 512 × 512 on an H100).

    K, V depend on the parameters only, and those move a little per optimiser step, so the last
    call's inverses X ≈ [Q⁻¹, A⁻¹] are a good start for this call's. For M = [Q, A] (batched):
        Newton–Schulz  X ← X (2I − M X) = X + X R,   R = I − M X        (then R ← R²)
    n_iter times (measured, float32: Q needs ≤ 2 from the warm start, A 3–6 at the enwik8 lr);
        check          ‖I − M X‖_F ≤ min(τ ε ‖M‖_F ‖X‖_F, √ε)          (per matrix)
    i.e. the residual is round-off of the product M X (NS stalls at ≈ 0.12 of that bound, at
    any d and condition number; √ε caps it where κ(M) is so large that it would not be); then
        Kᵀ = X_Q W,  Vᵀ = X_A W     and the backward is the solve's adjoint (`_InverseTimes`).
    Where the check fails — the warm start was too far (the first Adam steps move A's inverse by
    ‖ΔA A⁻¹‖ > 1; the intermediate regime's A passes near singular matrices), or M is singular or
    too ill-conditioned — that matrix takes today's LU solve instead (values, gradients and the
    `singular` flag as keys_values), and its X restarts from the same LU.

    The check is one host read per call (one sync per layer per forward). It cannot be avoided
    while staying exact at every step: a device-side torch.where can only choose between results
    already computed, i.e. the LU would run every step anyway, and checking every k steps would let
    the first Adam steps run with an inexact V (measured: there the warm start of A fails in every
    layer). On a GPU-bound step the sync costs the re-launch gap, tens of µs (an estimate).
    (Nor is the work skipped when the parameters did not change: their `_version` would say so,
    but the fused AdamW that trains on CUDA here does not bump it — measured.)

    method: "newton" (the above), "solve" (keys_values), "auto" (newton on CUDA; the solve
    elsewhere — on a CPU, flop-bound, the 2·(2 n_iter + 4) d × d matmuls of a forward + backward
    cost more than the two LUs: 1.5× at d = 128, 2.5× at d = 512, measured).
    Not kept in checkpoints (the first call restarts from an LU): K, V agree with an unbroken run to
    round-off, not bit for bit. Q, W, A: (d, d) each; returns (K, V, singular) as keys_values.
    """

    def __init__(self, method: str = "auto", n_iter: int = 6, tau: float = 1.0):
        if method not in ("auto", "newton", "solve"):
            raise ValueError(f"unknown method {method!r}; choose auto, newton or solve.")
        self.method, self.n_iter, self.tau = method, n_iter, tau
        self.X = None                                           # [Q⁻¹, A⁻¹] of the last call
        self.calls = self.fallbacks = 0                         # fallbacks: matrices solved by LU

    @torch.compiler.disable                                     # host logic: runs eagerly
    def __call__(self, Q: torch.Tensor, W: torch.Tensor, A: torch.Tensor):
        if self.method == "solve" or (self.method == "auto" and Q.device.type != "cuda"):
            return keys_values(Q, W, A)
        self.calls += 1
        M = torch.stack((Q, A))                                 # (2, d, d): both at once
        d, eps = M.shape[-1], torch.finfo(M.dtype).eps
        with torch.no_grad(), _exact_matmul(M.device):
            Md, I = M.detach(), torch.eye(d, dtype=M.dtype, device=M.device)
            X = self.X
            if X is None or X.shape != Md.shape or X.dtype != Md.dtype or X.device != Md.device:
                X = torch.linalg.inv_ex(Md)[0]                  # first call: start from an LU
            # Newton–Schulz: X ← X + X R with R = I − M X, so that the new R is R²
            for _ in range(self.n_iter):
                X = X + X @ (I - Md @ X)
            # the check: ‖I − M X‖_F ≤ min(τ ε ‖M‖_F ‖X‖_F, √ε), per matrix (NaN and inf fail it;
            # a pass also proves M invertible: ‖I − M X‖ < 1)
            r = torch.linalg.matrix_norm(I - Md @ X)
            tol = self.tau * eps * torch.linalg.matrix_norm(Md) * torch.linalg.matrix_norm(X)
            ok = (r <= tol.clamp(max=eps ** 0.5)).tolist()      # the one host read
        with _exact_matmul(M.device):
            singular = torch.zeros((), dtype=torch.bool, device=M.device)
            if all(ok):
                Y = _InverseTimes.apply(M, W, X)                # [Kᵀ; Vᵀ] = X W
            else:                                               # (a failed X may be inf: keep it
                rows, inv = [], []                              #  out of every product)
                for i, good in enumerate(ok):
                    if good:
                        rows.append(_InverseTimes.apply(M[i:i + 1], W, X[i:i + 1])[0])
                        inv.append(X[i])
                        continue
                    self.fallbacks += 1
                    # today's solve M_i Y_i = W, by one LU that also restarts X_i
                    LU, piv, info = torch.linalg.lu_factor_ex(M[i])
                    rows.append(torch.linalg.lu_solve(LU, piv, W))
                    with torch.no_grad():
                        inv.append(torch.linalg.lu_solve(LU, piv, I))
                    singular = singular | (info != 0)
                Y, X = torch.stack(rows), torch.stack(inv)
        self.X = X
        return Y[0].transpose(-1, -2), Y[1].transpose(-1, -2), singular


def sample_instances(regime: str, d: int, count: int, *, symmetric_A: bool = False, rho: float | None = None,
                     generator=None):
    """`count` random instances at once: (Q, K, V), each (count, d, d), float64. See sample_instance.

    rho: when given, A's antisymmetric part is rescaled so that ‖A_anti‖₂ = ρ ‖A_sym‖₂ exactly
    (ρ = 0: symmetric A); the symmetric part, hence the regime, is unchanged. The default draw has
    ρ ≈ 0.4–0.5 (`antisymmetry_ratio`)."""
    if regime not in REGIME_NAMES:
        raise ValueError(f"unknown regime {regime!r}; choose one of {REGIME_NAMES}.")
    for name, v in (("d", d), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    if regime == "intermediate" and d < 2:
        raise ValueError("the intermediate regime needs d >= 2 (mixed inertia).")
    n_neg = {"divergent": 0, "convergent": d, "intermediate": d // 2}[regime]
    W = _random_forms(count, d, 0, True, generator)             # W_sym ≻ 0
    A = _random_forms(count, d, n_neg, not symmetric_A, generator)
    if rho is not None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
        if symmetric_A:
            raise ValueError("rho sets A's antisymmetric part; it cannot be combined with symmetric_A.")
        # A = S + c T with S = A_sym, T = A_anti and c = ρ ‖S‖₂ / ‖T‖₂
        S, T = sym(A), 0.5 * (A - A.transpose(-1, -2))
        c = rho * torch.linalg.matrix_norm(S, 2) / torch.linalg.matrix_norm(T, 2).clamp_min(1e-300)
        A = S + c[:, None, None] * T
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
def rope_rotations(offsets, width: int, rotary_dim: int | None = None, base: float = 10000.0,
                   pairing: str = "interleaved") -> torch.Tensor:
    """R(m) (M, width, width), float64, for each offset m: rope.rotation_matrix(m, rotary_dim) on the
    first rotary_dim features (default: all), identity on the rest (partial RoPE, unrotated λ
    features). The one place that builds RoPE's rotations for W(m) = Q R(m) Kᵀ."""
    rd = width if rotary_dim is None else rotary_dim
    R = torch.eye(width, dtype=torch.float64).repeat(len(offsets), 1, 1)
    for i, m in enumerate(offsets):
        R[i, :rd, :rd] = rope.rotation_matrix(float(m), rd, base, pairing)
    return R


def rope_offset_matrices(Q: torch.Tensor, K: torch.Tensor, offsets, base: float = 10000.0,
                         pairing: str = "interleaved") -> torch.Tensor:
    """W(m) = Q R(m) Kᵀ = W + ΔW(m), ΔW(m) = Q (R(m) − I) Kᵀ, for each offset m = j − i.

    Q, K (d, d_k) → (M, d, d); a batch Q, K (B, d, d_k) → (B, M, d, d)."""
    Q, K = _as_float64("Q", Q), _as_float64("K", K)
    dk = Q.shape[-1]
    if dk % 2:
        raise ValueError(f"RoPE needs an even d_k, got {dk}.")
    R = rope_rotations(offsets, dk, dk, base, pairing)
    if Q.ndim == 2:
        return Q @ R @ K.T                                      # (M, d, d_k) @ (d_k, d)
    return Q[:, None] @ R[None] @ K[:, None].transpose(-1, -2)  # (B, 1, d, d_k) @ (1, M, d_k, d_k) @ ..


def rope_offset_regimes(Q, K, V, offsets, base: float = 10000.0, pairing: str = "interleaved",
                        tol: float | None = None) -> list[dict]:
    """Classification of (W(m), A(m) = W(m)(Vᵀ)⁻¹) for every offset m: [{offset, regime, inertia}]."""
    interaction_matrices(Q, K, V)                               # validates Q, K and V (invertible)
    Vd = V.double()
    kappa = float(torch.linalg.cond(Vd))
    out = []
    for m, Wm in zip(offsets, rope_offset_matrices(Q, K, offsets, base, pairing)):
        Am = torch.linalg.solve(Vd, Wm.T).T                     # A(m) Vᵀ = W(m)
        r = regime_of(Wm, Am, tol, cond_V=kappa)
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
                  n_heads: int = 1, scale: float = 1.0, tol: float | None = None,
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
        r = regime_of(W, A, tol, cond_V=cond)                      # A's round-off carries κ(M)
        out.update(A=A, regime=r["regime"], inertia_A=r["inertia_A"],
                   eig_W_sym=r["eig_W_sym"], eig_A_sym=r["eig_A_sym"],
                   abscissa_M=r["abscissa_V"], warning=r["warning"])   # α of the value path M
    else:
        A_lsq = W @ torch.linalg.pinv(M.T)                          # least squares: A Mᵀ ≈ W
        resid = float(torch.linalg.norm(A_lsq @ M.T - W) / torch.linalg.norm(W).clamp_min(1e-300))
        out.update(A=None, regime="undefined", inertia_A=None, rank_M=int(torch.linalg.matrix_rank(M)),
                   A_lsq=A_lsq, A_lsq_residual=resid, inertia_A_lsq=inertia(A_lsq, tol),
                   eig_W_sym=torch.linalg.eigvalsh(sym(W)), eig_A_sym=None)
    return out
