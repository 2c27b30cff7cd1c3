"""Regime reports of real layers: training checkpoints and pretrained models, per layer and head.

    python -m analysis.reports --ckpt RUN/ckpt.pt          [--out DIR]
    python -m analysis.reports --model NAME[,NAME...]      [--text TEXT] [--out DIR]

Each attention layer's (Q, K, V, O) goes through regimes.analyse_layer (W = Σₕ Wₕ, value path
M = V O, A = W (Mᵀ)⁻¹ and the regime rule of regimes.py, docs/conventions.md); around it this file
adds what a trained layer needs: the balance β of each head (its inertia is fixed by the
architecture), RoPE's offset-dependent W(m) (regimes.rope_rotations), the λ-term's realised logit
form, the token probe through depth for pretrained models (analysis.pretrained), and the tables,
CSV files and figures. The maths of what is reported is in the comment of section 2. Written to
DIR/<name>/ (default out/regimes): layers.csv, heatmap.png, summary.md, rope_offsets.csv (rotary
models), probe.csv and probe.png (pretrained models); with two or more models DIR/compare.png and
DIR/compare.md. Bad input (a checkpoint of another config, an unknown model, a missing optional
package) is one sentence on stderr and exit code 2.
"""

from __future__ import annotations

import math
import os
import re
import sys

import torch
from tqdm import tqdm

import ode_attention as oa
import regimes
import training
from analysis import pretrained


# ================================================================================================
# 1. The two reports and the command line
# ================================================================================================
def main(argv=None) -> int:
    p = training.ArgParser(
        description="Regimes of attention: the regime of each layer of a training checkpoint "
                    "(--ckpt RUN/ckpt.pt), or of a pretrained model (--model NAME).")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--ckpt", metavar="PATH", help="a checkpoint written by train_lm.py / train_vit.py")
    g.add_argument("--model", metavar="NAME", help="a pretrained model (see analysis/pretrained.py)")
    p.add_argument("--text", default=None, help="text for the --model token probe")
    p.add_argument("--out", default="out/regimes", help="output folder")
    a = p.parse_args(argv)
    try:
        if a.ckpt is not None:
            return report_checkpoint(a.ckpt, a.out)
        return report_model(a.model, a.out, a.text)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        print(f"reports.py: {e}", file=sys.stderr)
        return 2


def report_checkpoint(path: str, out: str) -> int:
    """`python -m analysis.reports --ckpt RUN/ckpt.pt`: the regime of every layer and head of a
    trained model.

    The checkpoint is the one training.save_checkpoint writes (train_lm.py, train_vit.py): a dict
    with "config" and "model" (a state dict) among its keys. What is read from them:
      config  d_model, n_heads (required); n_layers; attn_pe (else pe when it is an attention PE,
              else "none"); rope_base, rope_pairing, rope_heads; lam, lam_mode, regime; causal
              (default: True when the config has a vocab_size, i.e. a language model);
      model   block i's attention under "…blocks.{i}.attn.*" (DDP's "module." and torch.compile's
              "_orig_mod." prefixes are ignored), exactly the state dict of ode_attention.Attention.
    Each layer is rebuilt as ode_attention.Attention(d_model, n_heads, …) WITHOUT the training
    script, its weights are loaded strictly (a checkpoint whose weights do not fit its config is
    refused in one sentence) and .interaction() gives Q, K, V, O and λ.
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
    """`python -m analysis.reports --model NAME[,NAME...]`: regimes and token probe of pretrained
    models.

    NAME is anything analysis.pretrained.load accepts ("minilm", "smollm2", a .gguf file, a
    transformers hub name or folder such as "gpt2"). For each model, OUT/<name>/ gets layers.csv, heatmap.png,
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


# ================================================================================================
# 2. Reports on real layers. The maths of what is reported, and why.
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
# symmetric eigenproblem instead of a d×d one; the other d − r eigenvalues of S are 0. (head_spectra
# does this in G's eigenbasis, once per head for all offsets; layer_report's docstring says how the
# rest of a layer is organised so that nothing is decomposed twice.)
#
# RoPE. Head h rotates its query and key rows, q ↦ q R(i)ᵀ, k ↦ k R(j)ᵀ (rope.apply_rope), so the
# logit of (i, j) is xᵢ Qₕ R(i)ᵀR(j) Kₕᵀ xⱼᵀ = xᵢ Wₕ(m) xⱼᵀ with m = j − i (m ≤ 0 in causal models)
#     Wₕ(m) = s Qₕ R(m) Kₕᵀ,   R(m) = blockdiag(R_rot(m), I)                   (docs/dynamics.md §1.3)
# R_rot of size rotary_dim with the model's pairing and base (regimes.rope_rotations), identity on
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


def lowrank_sym_eigs(U: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Nonzero-part eigenvalues of S = U C Uᵀ (U (d, r), C (..., r, r) symmetric): those of
    G^{1/2} C G^{1/2}, G = UᵀU — r of them, ascending (S has d − r more zeros when r ≤ d)."""
    g, E = torch.linalg.eigh(U.T @ U)                           # G = E diag(g) Eᵀ ⪰ 0
    G_half = (E * g.clamp_min(0).sqrt()) @ E.T                  # G^{1/2}
    return torch.linalg.eigvalsh(G_half @ C @ G_half)


def offset_list(causal: bool, far_max: int) -> list:
    """m = j − i for the near (1 ≤ |m| < 32) and far (log-spaced, ≤ far_max) offsets; causal
    models only see keys before the query (m < 0), bidirectional ones both signs."""
    ks = [k for k in range(1, NEAR_OFFSETS) if k <= far_max] + [k for k in FAR_OFFSETS if k <= far_max]
    return [-k for k in ks] if causal else [s * k for k in ks for s in (-1, 1)]


def with_lam(spec: dict) -> dict:
    """The spec of the realised logit form W+λ: the per-head form of regimes.logit_form
    (W_λ = W + λ M). Head h's Qₕ Kₕᵀ becomes Qₕ Kₕᵀ + Eₕ Λₕ Eₕᵀ (Λₕ = λₕ I or diag(softplus φₕ)),
    kept factorised as Q̃ₕ K̃ₕᵀ with Q̃ₕ = [Qₕ | Eₕ Λₕ], K̃ₕ = [Kₕ | Eₕ], so that the low-rank
    eigenproblem still applies and RoPE leaves the λ features unrotated."""
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


EPS = torch.finfo(torch.float64).eps
OFFSET_CHUNK_ELEMENTS = 1 << 26          # W_sym(m) are built and decomposed ≤ 512 MB of offsets at a time
BASIS_ELEMENTS = 1 << 23                 # … from the symmetric parts of A_k, B_k, ≤ 64 MB of them at a time


def head_spectra(Qh: torch.Tensor, Kh: torch.Tensor, R: torch.Tensor, s: float) -> torch.Tensor:
    """Nonzero part of the spectrum of Wₕ,sym(m) = ½ s (Qₕ R(m) Kₕᵀ + Kₕ R(m)ᵀ Qₕᵀ) for every
    rotation R (M, d_q, d_q): (M, ρ), ascending; ρ = rank [Qₕ Kₕ] and the other d − ρ eigenvalues
    are 0.

    Wₕ,sym(m) = U C(m) Uᵀ, U = [Qₕ Kₕ], C(m) = ½ s [[0, R(m)], [R(m)ᵀ, 0]], and with G = UᵀU =
    E diag(g) Eᵀ its nonzero eigenvalues are those of Fᵀ C(m) F, F = E diag(√g) (lowrank_sym_eigs,
    written in G's eigenbasis): Fᵀ C(m) F = ½ s (X + Xᵀ), X = F₁ᵀ R(m) F₂ (F₁, F₂ the top and bottom
    d_q rows of F). One eigh of G serves every offset, and the directions whose Gram eigenvalue g is
    round-off (g ≤ 2d_q·ε·max g, the matrix_rank rule) are left out: they add (near-)zero
    eigenvalues only. That shrinks the λ-form's problem (U = [Qₕ, EₕΛₕ, Kₕ, Eₕ] has rank 3d_h) from
    4d_h to 3d_h."""
    U = torch.cat((Qh, Kh), 1)
    g, E = torch.linalg.eigh(U.T @ U)
    keep = g > U.shape[1] * EPS * g[-1].clamp_min(0)
    F = E[:, keep] * g[keep].sqrt()
    dq = Qh.shape[1]
    X = F[:dq].T @ (R @ F[dq:])                                    # (M, ρ, ρ)
    return torch.linalg.eigvalsh(0.5 * s * (X + X.transpose(-1, -2)))


def _matrix(name: str, M) -> torch.Tensor:
    """M as a finite float64 matrix (the input check of regimes.analyse_layer)."""
    if not isinstance(M, torch.Tensor) or not M.is_floating_point() or M.ndim != 2 or M.numel() == 0:
        raise ValueError(f"{name} must be a non-empty floating-point matrix (torch.Tensor).")
    if not torch.isfinite(M).all():
        raise ValueError(f"{name} contains non-finite values (NaN or inf).")
    return M.detach().double()


def _layer_core(Q, K, V, O, H: int, s: float, tol, cond_max: float = 1e10) -> dict:
    """What layer_report uses of regimes.analyse_layer(Q, K, V, O, H, s, tol), computed once each:
    W = Σₕ Wₕ (summed in the same order, so W and everything read off it are the same numbers), its
    eigenvalues once (analyse_layer computes them twice), cond(M) and rank(M) from one set of
    singular values (torch.linalg.cond and matrix_rank compute each their own), A = W (Mᵀ)⁻¹ or the
    least-squares A = W (Mᵀ)⁺, and the regime by the one rule of regimes.py. Not computed: the
    per-head d × d spectra (head_spectra gives them from a 2d_h × 2d_h problem), α(M) and the
    antisymmetry ratio of A (the report shows neither)."""
    d, hq = Q.shape
    if K.shape != Q.shape:
        raise ValueError(f"Q and K must have the same shape, got {tuple(Q.shape)} and {tuple(K.shape)}.")
    if H <= 0 or hq % H or V.shape[1] % H:
        raise ValueError(f"{H} heads do not divide Q's {hq} or V's {V.shape[1]} columns.")
    M = V if O is None else V @ O                                  # value path Σₕ Vₕ Oₕ
    if M.shape != (d, d):
        raise ValueError(f"the value path V·O must be (d, d) = ({d}, {d}), got {tuple(M.shape)}.")
    dq = hq // H
    W = torch.zeros(d, d, dtype=torch.float64)
    for h in range(H):
        sl = slice(h * dq, (h + 1) * dq)
        W += s * Q[:, sl] @ K[:, sl].T                             # Wₕ = s Qₕ Kₕᵀ
    ew = torch.linalg.eigvalsh(regimes.sym(W))
    sv = torch.linalg.svdvals(M)
    cond = float(sv[0] / sv[-1])                                   # = torch.linalg.cond(M)
    rank = int((sv > sv[0] * max(M.shape) * EPS).sum())           # = torch.linalg.matrix_rank(M)
    out = {"W": W, "M": M, "cond_M": cond, "rank_M": rank, "eig_W_sym": ew,
           "inertia_W": tuple(int(c) for c in regimes.inertia_counts(ew, tol))}
    if math.isfinite(cond) and cond <= cond_max:
        A = torch.linalg.solve(M, W.T).T                           # A Mᵀ = W
        ea = torch.linalg.eigvalsh(regimes.sym(A))
        out.update(A=A, eig_A_sym=ea, regime=regimes.regime_rule(ew[None], ea[None], tol, cond)[0],
                   inertia_A=tuple(int(c) for c in regimes.inertia_counts(ea, tol, cond)))
    else:
        A_lsq = W @ torch.linalg.pinv(M.T)                         # least squares: A Mᵀ ≈ W
        ea = torch.linalg.eigvalsh(regimes.sym(A_lsq))
        out.update(A=None, regime="undefined", eig_A_sym=ea,
                   A_lsq_residual=float(torch.linalg.norm(A_lsq @ M.T - W) / torch.linalg.norm(W).clamp_min(1e-300)),
                   inertia_A=tuple(int(c) for c in regimes.inertia_counts(ea, tol)))
    return out


def layer_report(spec: dict, offsets=(), tol: float | None = None) -> dict:
    """Everything reported for one layer. spec: Q, K (d, H·d_q), V (d, d_v·H), O (or None),
    n_heads, scale, rot (None or {base, pairing, rotary_dim, rope_heads}), layer, form.
    Returns {"layer": row, "heads": [rows], "offsets": [rows]} (rows of LAYER_/OFFSET_FIELDS).

    The numbers are those of regimes.analyse_layer and the d × d spectra of W_sym(m), W_sym,ₕ(m) and
    A_sym(m) at every offset (tests/test_figures.py keeps that reference and compares); the work is
    organised so that no spectrum is computed twice and none larger than it must be:
      * heads: head_spectra, one 2d_q × 2d_q problem per offset (never d × d), one Gram eigh per head;
      * layer W_sym(m) = sym(W_un) + Σ_k cos(mθ_k) sym(A_k) + sin(mθ_k) sym(B_k) (_offset_spectra):
        the unrotated features (λ features, partial RoPE, heads past rope_heads) and the RoPE pair
        terms once, then r_d·d² per offset instead of a d × H·d_q × d product; eigvalsh of W_sym(m)
        once per offset (it was also recomputed inside classify_batch), m = 0 is the layer's own;
      * A(m) = W(m) (Mᵀ)⁻¹ from one LU of M, and only where W_sym(m) ≻ 0: elsewhere the regime rule
        says "intermediate" whatever A_sym(m) is.
    What remains is one d × d eigvalsh per offset and form (≈ 70% of the time at d = 768)."""
    Q, K = _matrix("Q", spec["Q"]), _matrix("K", spec["K"])
    V = _matrix("V", spec["V"])
    O = None if spec["O"] is None else _matrix("O", spec["O"])
    H, s = spec["n_heads"], float(spec["scale"])
    regimes.inertia_counts(torch.zeros(1, 1, dtype=torch.float64), tol)    # refuses a bad tol up front
    r = _layer_core(Q, K, V, O, H, s, tol)
    d, dq = Q.shape[0], Q.shape[1] // H
    rot = spec.get("rot")
    offs = [0] + (list(offsets) if rot else [])
    nh = rot.get("rope_heads", H) if rot else 0
    nh = H if nh is None else nh
    Rm = (regimes.rope_rotations(offs, dq, rot["rotary_dim"], rot["base"], rot["pairing"]) if rot
          else torch.eye(dq, dtype=torch.float64)[None])
    base = {"source": spec.get("source", ""), "form": spec.get("form", "W"), "layer": spec["layer"]}

    def kept(flags):   # fraction over near (1 ≤ |m| < 32) and far offsets of a boolean per offset
        near = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) < NEAR_OFFSETS]
        far = [f for m, f in zip(offs[1:], flags[1:]) if abs(m) >= NEAR_OFFSETS]
        return (sum(near) / len(near) if near else ""), (sum(far) / len(far) if far else "")

    heads, head_bal = [], []
    still = torch.eye(dq, dtype=torch.float64)[None]
    for h in range(H):
        sl = slice(h * dq, (h + 1) * dq)
        rotated = h < nh and rot
        ev = head_spectra(Q[:, sl], K[:, sl], Rm if rotated else still, s)   # (M or 1, ρ)
        if ev.shape[-1] > d:     # cannot happen in exact arithmetic (ρ ≤ d): the d × d spectrum
            ev0 = torch.linalg.eigvalsh(regimes.sym(s * Q[:, sl] @ K[:, sl].T))
        else:                    # the d − ρ zeros of Wₕ,sym
            ev0 = torch.cat((ev[0], torch.zeros(d - ev.shape[-1], dtype=torch.float64)))
        b = balance(ev)                                                       # βₕ(m)
        b = b if rotated else b.expand(len(offs))                             # the same at every m
        head_bal.append(b)
        ip, ineg, iz = (int(c) for c in regimes.inertia_counts(ev0, tol))
        row = dict(base, head=h, n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=float(ev0.min()),
                   eig_W_max=float(ev0.max()), balance_W=float(b[0]),
                   W_sym="psd" if ineg == 0 else ("nsd" if ip == 0 else "indefinite"))
        if rot:
            row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(
                (torch.sign(b) == torch.sign(b[0])).tolist())
        heads.append(row)

    ew = r["eig_W_sym"]
    ip, ineg, iz = r["inertia_W"]
    row = dict(base, head="all", n_pos_W=ip, n_neg_W=ineg, n_zero_W=iz, eig_W_min=float(ew[0]),
               eig_W_max=float(ew[-1]), balance_W=float(balance(ew)),
               W_sym="psd" if ineg == 0 else ("nsd" if ip == 0 else "indefinite"),
               cond_M=r["cond_M"], rank_M=r["rank_M"], regime=r["regime"],
               A="exact" if r["A"] is not None else "least-squares", balance_A=float(balance(r["eig_A_sym"])))
    row["n_pos_A"], row["n_neg_A"], row["n_zero_A"] = r["inertia_A"]
    if r["A"] is None:   # least-squares A = W (Mᵀ)⁺, with its residual (the identity (I) does not hold)
        row["A_lsq_residual"] = r["A_lsq_residual"]

    offset_rows = []
    if rot:
        ev, regimes_m = _offset_spectra(Q, K, r, Rm, H, nh, rot, s, tol)
        n_pos, n_neg, n_zero = regimes.inertia_counts(ev, tol)
        bw = balance(ev)
        hb = torch.stack(head_bal).mean(0)
        for i, m in enumerate(offs):
            offset_rows.append(dict(base, offset=m, n_pos_W=int(n_pos[i]), n_neg_W=int(n_neg[i]),
                                    n_zero_W=int(n_zero[i]), balance_W=float(bw[i]),
                                    mean_head_balance=float(hb[i]), regime=regimes_m[i]))
        same = ((n_pos == n_pos[0]) & (n_neg == n_neg[0])).tolist()
        row["rope_inertia_kept_near"], row["rope_inertia_kept_far"] = kept(same)
        row["rope_balance_sign_kept_near"], row["rope_balance_sign_kept_far"] = kept(
            (torch.sign(bw) == torch.sign(bw[0])).tolist())
        if r["A"] is not None:
            row["rope_regime_kept_near"], row["rope_regime_kept_far"] = kept(
                [x == regimes_m[0] for x in regimes_m])
    if spec.get("lam") is not None and spec.get("form") == "W+λ":
        lam = spec["lam"]
        row["lam"] = " ".join(f"{float(x):.4g}" for x in (lam if lam.ndim == 1 else lam.mean(1)))
        for h, hr in enumerate(heads):
            hr["lam"] = f"{float(lam[h] if lam.ndim == 1 else lam[h].mean()):.4g}"
    return {"layer": row, "heads": heads, "offsets": offset_rows}


def _rotation_pairs(R: torch.Tensor, pairing: str):
    """R (M, r, r) as RoPE's 2 × 2 rotations: the pairs (a_k, b_k) of the pairing and the cosines
    R[:, a, a] = R[:, b, b] and sines R[:, b, a] = −R[:, a, b] (M, r/2); None when R is not exactly
    that (then W(m) is built the direct way)."""
    P = R.shape[-1] // 2
    k = torch.arange(P)
    a, b = (2 * k, 2 * k + 1) if pairing == "interleaved" else (k, k + P)
    c, sn = R[:, a, a], R[:, b, a]
    rebuilt = torch.zeros_like(R)
    rebuilt[:, a, a], rebuilt[:, b, b], rebuilt[:, b, a], rebuilt[:, a, b] = c, c, sn, -sn
    return (a, b, c, sn) if R.shape[-1] % 2 == 0 and torch.equal(rebuilt, R) else None


def _offset_spectra(Q, K, r: dict, Rm: torch.Tensor, H: int, nh: int, rot: dict, s: float, tol):
    """Eigenvalues (M, d) of the layer's W_sym(m) = sym(Σₕ s Qₕ R(m) Kₕᵀ) at every offset, and the
    regime of (W(m), A(m) = W(m)(Mᵀ)⁻¹) ("" when M is singular).

    W(m) = W_un + s Σₕ Qₕ,rot R(m) Kₕ,rotᵀ: the features RoPE leaves alone (λ features, partial
    RoPE, heads past rope_heads) give W_un once. RoPE's R(m) is 2 × 2 rotations by the angles
    m θ_k, so the rotated part is Σ_k cos(mθ_k) A_k + sin(mθ_k) B_k with A_k = s Σₕ (q_a k_aᵀ + q_b k_bᵀ),
    B_k = s Σₕ (q_b k_aᵀ − q_a k_bᵀ) (q_a = column a_k of Qₕ, …): the symmetric parts of A_k and B_k
    are built once (2·d_h·H·d² flops, the cost of ONE W(m) = Q R Kᵀ) and every W_sym(m) is their
    combination (r_d·d² per offset instead of 2·d_h·H·d²). A(m) = W(m) (Mᵀ)⁻¹ needs W(m) itself,
    from one LU of M, and only where W_sym(m) ≻ 0 (elsewhere the rule says "intermediate").
    Offset 0 is the layer's own W: its spectrum and regime are taken from r, not recomputed."""
    d, dq, rd = Q.shape[0], Q.shape[1] // H, rot["rotary_dim"]
    cols = torch.arange(Q.shape[1]).view(H, dq)
    rot_cols = cols[:nh, :rd].reshape(-1)                         # features RoPE rotates
    un_cols = torch.cat((cols[:nh, rd:].reshape(-1), cols[nh:].reshape(-1)))
    Qu, Ku = Q[:, un_cols], K[:, un_cols]
    W_un = s * Qu @ Ku.T
    S_un = 0.5 * s * torch.cat((Qu, Ku), 1) @ torch.cat((Ku, Qu), 1).T   # sym(W_un) = ½ s [Qu Ku][Ku Qu]ᵀ
    Qr, Kr = Q[:, rot_cols].view(d, nh, rd), K[:, rot_cols].view(d, nh, rd)
    R = Rm[1:, :rd, :rd]                         # offset 0 is the layer's own W: r["eig_W_sym"], r["regime"]
    pairs = _rotation_pairs(R, rot["pairing"]) if nh else None
    exact = r["A"] is not None
    lu = torch.linalg.lu_factor(r["M"]) if exact else None

    def W_of(R_chunk):                                            # W(m), the direct way
        if nh == 0:
            return W_un.expand(len(R_chunk), d, d)
        Qhat = torch.einsum("dhi,mij->mdhj", Qr, R_chunk).reshape(-1, d, nh * rd)
        return W_un + s * Qhat @ Kr.reshape(d, nh * rd).T

    chunk = max(1, OFFSET_CHUNK_ELEMENTS // (d * d))
    evs, names = [r["eig_W_sym"][None]], [r["regime"] if exact else ""]
    for c0 in range(0, len(R), chunk):
        c1 = min(len(R), c0 + chunk)
        if pairs is None:
            Wm = W_of(R[c0:c1])
            S = regimes.sym(Wm)
        else:
            a, b, cos, sin = pairs
            S = S_un.reshape(1, d * d)                             # → (chunk, d²)
            step = max(1, BASIS_ELEMENTS // (2 * d * d))
            for p0 in range(0, len(a), step):
                aa, bb = a[p0:p0 + step], b[p0:p0 + step]
                qa, qb = Qr[:, :, aa].permute(2, 0, 1), Qr[:, :, bb].permute(2, 0, 1)   # (pairs, d, nh)
                kab = torch.cat((Kr[:, :, aa].permute(2, 0, 1), Kr[:, :, bb].permute(2, 0, 1)), 2)
                # sym(L kabᵀ) = ½ [L kab] [kab L]ᵀ, L = [q_a q_b] for A_k and [q_b −q_a] for B_k
                L = torch.cat((torch.cat((qa, qb), 2), torch.cat((qb, -qa), 2)))
                kk = torch.cat((kab, kab))
                basis = (0.5 * s) * torch.cat((L, kk), 2) @ torch.cat((kk, L), 2).transpose(1, 2)
                coef = torch.cat((cos[c0:c1, p0:p0 + step], sin[c0:c1, p0:p0 + step]), 1)
                S = torch.addmm(S, coef, basis.reshape(-1, d * d)) if p0 == 0 else S.addmm_(coef, basis.reshape(-1, d * d))
            S = S.view(c1 - c0, d, d)
        ev = torch.linalg.eigvalsh(S)
        evs.append(ev)
        if not exact:
            names += [""] * len(ev)
            continue
        pd = regimes.inertia_counts(ev, tol)[0] == d               # W_sym(m) ≻ 0
        part = ["intermediate"] * len(ev)
        if bool(pd.any()):
            Wpd = Wm[pd] if pairs is None else W_of(R[c0:c1][pd])
            Am = torch.linalg.lu_solve(*lu, Wpd.transpose(1, 2)).transpose(1, 2)   # A(m) Mᵀ = W(m)
            ea = torch.linalg.eigvalsh(regimes.sym(Am))
            # the one regime rule of regimes.py, on eigenvalues already computed
            for i, name in zip(pd.nonzero().flatten().tolist(), regimes.regime_rule(ev[pd], ea, tol, r["cond_M"])):
                part[i] = name
        names += part
    return torch.cat(evs), names


def analyse_specs(specs: list, *, name: str, info: dict, far_max: int = 4096, progress: bool = True) -> dict:
    """layer_report for every spec (and for its W+λ form when the layer has a λ-term)."""
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
        return pretrained.load(name, dtype=torch.float64)
    except ImportError as e:
        raise ValueError(" ".join(str(e).split())) from None
    except ValueError as e:   # transformers' offline messages span several lines: keep one
        msg = " ".join(str(e).split())
        raise ValueError(msg if len(msg) < 300 else msg[:297] + "...") from None


def pretrained_layers(net) -> tuple[list, dict]:
    """(specs, info) of a pretrained.Net via pretrained.layer_matrices (GQA expanded to H heads)."""
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


# -- the token probe through depth (docs/dynamics.md §5.4) -------------------------------------------
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
    """Probes of docs/dynamics.md §5.4 after every block: full blocks and attention-only updates
    x ← x + Attn(x), each with the model's PE and with it removed. mean_sq_distance = dist/N²
    = mean over pairs (i, j) of ‖xᵢ − xⱼ‖², comparable across tokenisers of different N. The median
    and first-token norms show when one outlier token (an attention sink with a "massive
    activation", e.g. SmolLM2's first token from layer 12 on) dominates the means."""
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


def _write_text(path: str, text: str) -> None:
    training.atomic_write(path, lambda tmp: tmp.write_text(text))


def _write_csv(path: str, fields, rows) -> None:
    lines = [",".join(fields)] + [",".join(_fmt(r.get(k, "")) for k in fields) for r in rows]
    _write_text(path, "\n".join(lines) + "\n")


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    training.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


REGIME_COLOURS = {"convergent": "#1b9e77", "divergent": "#d95f02", "intermediate": "#cab2d6",
                  "undefined": "#9e9e9e"}
_INCH_PER_PT = 1 / 72


def _every(n: int, cell_in: float, label_in: float) -> int:
    """Label every k-th of n cells of cell_in inches so that labels label_in inches long do not
    touch: the smallest k with k·cell_in ≥ label_in (k = 1 when there is room)."""
    return max(1, math.ceil(label_in / cell_in - 1e-9)) if n else 1


def _offset_ticks(offs: list, cell_in: float, label_in: float) -> list:
    """Indices of the offsets to label: 0, the two ends and the powers of two (and 31, the last
    near offset), greedily, each at least label_in inches from every label already placed."""
    gap = max(1, math.ceil(label_in / cell_in - 1e-9))
    nice = [i for i, m in enumerate(offs) if m == 0] + [0, len(offs) - 1] + sorted(
        (i for i, m in enumerate(offs) if abs(m) in (31, 4096, 1024, 256, 64, 16, 8, 4, 2, 1)
         or abs(m) & (abs(m) - 1) == 0), key=lambda i: -abs(offs[i]))
    chosen = []
    for i in nice:
        if all(abs(i - j) >= gap for j in chosen):
            chosen.append(i)
    return sorted(chosen)


def heatmap_figure(rep: dict):
    """The regime heat map of a report, sized from its grid (layers × heads, × offsets):
    (a) βₕ per layer × head; (b) per layer: n₊/(n₊+n₋) and β of W_sym and A_sym (A least-squares
    when M is singular), with the numbers when the cells have room; (c) the layer's regime per
    form (W, W+λ); rotary models: (d) β(W_sym(m)) per layer × offset and (e) the regime of
    (W(m), A(m)). One colour bar for β, one with the regime names. Cells keep a legible size
    (the figure grows with the grid, within limits), tick labels are thinned to every k-th where
    they would touch, and no two texts overlap (tests/test_figures.py checks 12 × 12 and 32 × 32)."""
    plt = _plt()
    import matplotlib.colors as mcolors
    fs = 7                                                            # tick labels, points
    rows = sorted((r for r in rep["layers"] if r["form"] == "W"), key=lambda r: r["layer"])
    heads = [r for r in rep["heads"] if r["form"] == "W"]
    forms = [f for f in ("W", "W+λ") if any(r["form"] == f for r in rep["layers"])]
    L, H = len(rows), rep["info"]["n_heads"]
    offs = sorted({o["offset"] for o in rep["offset_rows"]})
    if offs and max(offs) <= 0:
        offs = offs[::-1]                                             # causal: 0, −1, −2, …
    with_regime_m = any(o["regime"] for o in rep["offset_rows"])
    # --- sizes, in inches ---------------------------------------------------------------------
    ch = min(0.32, max(0.12, 7.0 / max(L, 1)))                        # cell height
    ch = max(ch, 2.4 / max(L, 1))                                     # few layers: room for the colour bars
    cw = min(0.32, max(0.14, 7.5 / max(H, 1)))                        # head cell width
    ow = min(0.14, max(0.04, 3.6 / max(len(offs), 1))) if offs else 0  # offset cell width
    label_h = 1.35 * fs * _INCH_PER_PT                                # one line of tick text
    digit_w = 0.62 * fs * _INCH_PER_PT
    panels = [("a", max(0.95, H * cw)), ("b", 4 * 0.58), ("c", max(0.75, 0.38 * len(forms)))]
    if offs:
        panels += [("d", len(offs) * ow)] + ([("e", len(offs) * ow)] if with_regime_m else [])
    gaps = {"a": 0.3, "b": 0.3, "c": 0.75 if offs else 0.45, "d": 0.3, "e": 0.45}
    left, right, top, bottom = 0.75, 1.35, 1.0, 0.95 if offs else 0.75
    cbar_w, cbar_gap = 0.14, 1.1
    width = left + sum(w for _, w in panels) + sum(gaps[k] for k, _ in panels) + 2 * cbar_w + cbar_gap + right
    extra = max(0.0, 7.5 - width)                                     # room for the two-line title
    panels[0] = ("a", panels[0][1] + extra)
    cw = panels[0][1] / max(H, 1)
    width += extra
    height = L * ch + top + bottom
    fig = plt.figure(figsize=(width, height))
    box = lambda x, w: [x / width, bottom / height, w / width, L * ch / height]   # noqa: E731
    x, axes = left, {}
    for k, w in panels:
        axes[k] = fig.add_axes(box(x, w))
        x += w + gaps[k]
    cax_beta, cax_reg = fig.add_axes(box(x, cbar_w)), fig.add_axes(box(x + cbar_w + cbar_gap, cbar_w))
    rdbu = plt.get_cmap("RdBu_r").with_extremes(bad="#eeeeee")
    names = list(REGIME_COLOURS)
    regime_cmap = mcolors.ListedColormap([REGIME_COLOURS[n] for n in names]).with_extremes(bad="white")
    regime_norm = mcolors.BoundaryNorm([i - 0.5 for i in range(len(names) + 1)], len(names))
    code = lambda name: float(names.index(name)) if name in names else float("nan")   # noqa: E731

    def layer_axis(ax, labels: bool):
        ax.set_ylim(L - 0.5, -0.5)
        k = _every(L, ch, label_h)
        ax.set_yticks(range(0, L, k), [str(i) for i in range(0, L, k)] if labels else [], fontsize=fs)
        if labels:
            ax.set_ylabel("layer", fontsize=8)

    # (a) head balance
    B = torch.full((L, H), float("nan"))
    for r in heads:
        B[r["layer"], r["head"]] = r["balance_W"]
    im = axes["a"].imshow(B.numpy(), cmap=rdbu, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    k = _every(H, cw, digit_w * len(str(H - 1)) + 0.06)
    axes["a"].set_xticks(range(0, H, k), [str(h) for h in range(0, H, k)], fontsize=fs)
    axes["a"].set_xlabel("head", fontsize=8)
    axes["a"].set_title("(a) head balance\nβ(W_h,sym)", fontsize=8)
    layer_axis(axes["a"], True)
    # (b) the layer's numbers
    frac = lambda p, n: p / (p + n) if p + n else float("nan")          # noqa: E731
    C = torch.full((L, 4), float("nan"), dtype=torch.float64)
    for r in rows:
        C[r["layer"]] = torch.tensor([frac(r["n_pos_W"], r["n_neg_W"]), frac(r["n_pos_A"], r["n_neg_A"]),
                                      r["balance_W"], r["balance_A"]], dtype=torch.float64)
    shown = torch.cat((C[:, :2] * 2 - 1, C[:, 2:]), 1)
    axes["b"].imshow(shown.numpy(), cmap=rdbu, vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    tfs = min(6.0, 0.62 * ch / _INCH_PER_PT)                            # the numbers fit their cells
    if tfs >= 4.5:
        for i in range(L):
            for j in range(4):
                v = float(C[i, j])
                if v == v:
                    axes["b"].text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=tfs,
                                   color="white" if abs(float(shown[i, j])) > 0.6 else "black")
    lsq = any(r.get("A") == "least-squares" for r in rows)
    aname = "A_lsq" if lsq else "A"
    axes["b"].set_xticks(range(4), ["n₊ share\nW_sym", f"n₊ share\n{aname}_sym", "β\nW_sym", f"β\n{aname}_sym"],
                         fontsize=fs)
    axes["b"].set_title("(b) layer W and " + ("A (least sq.)" if lsq else "A"), fontsize=8)
    layer_axis(axes["b"], False)
    # (c) the layer's regime, per form
    G = torch.full((L, len(forms)), float("nan"))
    for r in rep["layers"]:
        if r["form"] in forms:
            G[r["layer"], forms.index(r["form"])] = code(r["regime"])
    axes["c"].imshow(G.numpy(), cmap=regime_cmap, norm=regime_norm, aspect="auto", interpolation="nearest")
    axes["c"].set_xticks(range(len(forms)), forms, fontsize=fs)
    axes["c"].set_xlabel("form", fontsize=8)
    axes["c"].set_title("(c) regime", fontsize=8)
    layer_axis(axes["c"], False)
    if offs:
        T = torch.full((L, len(offs)), float("nan"))
        Rg = torch.full((L, len(offs)), float("nan"))
        for o in rep["offset_rows"]:
            if o["form"] == "W":
                T[o["layer"], offs.index(o["offset"])] = o["balance_W"]
                Rg[o["layer"], offs.index(o["offset"])] = code(o["regime"])
        ticks = _offset_ticks(offs, ow, label_h)
        for key, data, title in (("d", T, "(d) RoPE: β(W_sym(m))"), ("e", Rg, "(e) RoPE: regime of\n(W(m), A(m))")):
            if key not in axes:
                continue
            kw = dict(cmap=rdbu, vmin=-1, vmax=1) if key == "d" else dict(cmap=regime_cmap, norm=regime_norm)
            axes[key].imshow(data.numpy(), aspect="auto", interpolation="nearest", **kw)
            axes[key].set_xticks(ticks, [str(offs[i]) for i in ticks], fontsize=fs, rotation=90)
            axes[key].set_xlabel("offset m = j − i", fontsize=8)
            axes[key].set_title(title, fontsize=8)
            layer_axis(axes[key], key == "d")
    cb = fig.colorbar(im, cax=cax_beta)
    cb.set_ticks([-1, -0.5, 0, 0.5, 1])
    cb.ax.tick_params(labelsize=fs)
    cb.set_label("β = Σλ/Σ|λ|\n(n₊ share s shown as 2s − 1)", fontsize=7)
    cr = fig.colorbar(plt.cm.ScalarMappable(norm=regime_norm, cmap=regime_cmap), cax=cax_reg)
    cr.set_ticks(range(len(names)), labels=names)
    cr.ax.tick_params(labelsize=fs, length=0)
    i = rep["info"]
    fig.suptitle(f"{rep['name']}: {L} layers × {H} heads, d = {i.get('d', '?')}\n"
                 "W_h = s Q_h K_hᵀ per head (inertia always (d_h, d_h, d − 2d_h)); layer W = Σ W_h, "
                 "A = W (Mᵀ)⁻¹, M = V O", fontsize=8.5, y=1 - 0.12 / height, va="top")
    return fig


def plot_heatmap(rep: dict, path: str) -> None:
    """heatmap.png of a report (heatmap_figure), written atomically."""
    _save_figure(heatmap_figure(rep), path)


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
        _save_figure(_probe_axes(_plt(), [rep], f"{rep['name']}: tokens through depth (docs/dynamics.md §5.4)"),
                     os.path.join(folder, "probe.png"))
    _write_text(os.path.join(folder, "summary.md"), summary_markdown(rep))


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
    _write_text(os.path.join(out, "compare.md"), "\n".join(lines))


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
    sys.exit(training.run_cli(main))
