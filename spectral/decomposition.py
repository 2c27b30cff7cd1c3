"""Content-position coupling in attention logits, and the eigenvalue comparison behind
"spectral contraction" (the Spectral paper, arXiv 2505.13027; reading notes: docs/spectral.md).

What is the paper's and what is ours
------------------------------------
The paper's claim (abstract, v1): positional encodings (PEs) couple content and position in the
attention logits either *additively* (a Toeplitz bias B is added: ALiBi, T5) or *multiplicatively*
(RoPE: a Hadamard product with a relative-position Toeplitz kernel), and the multiplicative form
"induces spectral contraction (tighter eigenvalue bounds)". The paper's theorem statements could
not be read (docs/spectral.md §1.3 and "Open uncertainties" 1). **Everything below the
decomposition identities is our textbook reconstruction (docs/spectral.md §1.3 [I]), not the
paper's theorem**: Weyl's inequality for the additive case and Schur's product theorem for the
multiplicative case. The tests check each bound numerically on random instances.

Notation (tokens are rows)
--------------------------
Token i is x_i = c_i + p_i (content plus position, docs/spectral.md §1.2). Queries and keys are
rows of X Q and X K (Q, K are (d, d_k) matrices in row convention). For two stacks of rows a, b
the Gram matrix is G_{a,b} = a b^T, i.e. (G_{a,b})_ij = a_i . b_j.

1. Additive family (NoPE, absolute sinusoidal or learned PE, T5 bias, ALiBi; docs/spectral.md §1.2):

       L_Add = G_{qc,kc} + G_{qc,kp} + G_{qp,kc} + G_{qp,kp} + B,
       qc = C Q, qp = P Q, kc = C K, kp = P K.

   NoPE keeps only G_{qc,kc}; an absolute PE adds the three position terms; a relative scheme adds
   the Toeplitz bias B (B_ij = b_{j-i}): T5 learns b (one scalar per offset in the paper's code),
   ALiBi fixes b_{j-i} = -m |j - i| (bidirectional form).

2. Multiplicative family (RoPE). Pair the features (2k, 2k+1) ("interleaved" pairing, RoFormer;
   "half" pairs (k, k + d/2)) into complex numbers q~^(k)_i = q_{i,2k} + i q_{i,2k+1}. RoPE at
   position p multiplies q~^(k) by e^{i p theta_k}, theta_k = base^(-2k/d). Then

       L^RoPE_ij = Re sum_k q~^(k)_i conj(k~^(k)_j) e^{i (p_i - p_j) theta_k}
                 = Re sum_k ( G^(k)_{q,k} o E_{theta_k} )_ij ,   (E_theta)_ij = e^{i (p_i - p_j) theta}

   with o the Hadamard (entrywise) product. For p = 0..n-1 each E_theta is a Hermitian Toeplitz
   matrix of rank one: E_theta = u u^*, u_i = e^{i i theta}.

3. MLA with decoupled RoPE (DeepSeek-V2/V3; docs/spectral.md §1.2, §4.3): the logit is the *sum*
   of a NoPE content logit and a separately projected RoPE logit,

       L^MLA = ( G_{qC,kC} + Re sum_k G^(k)_{qR,kR} o E_{theta_k} ) / sqrt(d_C + d_R).

The eigenvalue comparison (our reconstruction, docs/spectral.md §1.3 [I])
-------------------------------------------------------------------------
Take a Hermitian content Gram matrix A (n, n). Only the symmetric part of a real logit matrix
matters for the quadratic form x^T L x, and a non-symmetric matrix has complex eigenvalues for
which neither bound below applies, so we study symmetric A and symmetric biases (a T5 table
b_{j-i} is symmetrised to (b_{j-i} + b_{i-j}) / 2).

* Weyl (additive): for Hermitian A, B and eigenvalues sorted ascending,
      lambda_i(A) + lambda_min(B) <= lambda_i(A + B) <= lambda_i(A) + lambda_max(B).
  The spectrum is shifted and spread by the spectrum of B. ALiBi's -m|i-j| is minus a Euclidean
  distance matrix: one eigenvalue of order -m n^2 / 3, the rest positive, so the spread grows
  like n^2.
* Schur (multiplicative): for Hermitian A and a PSD kernel G,
      (lambda_max(A) I - A) o G >= 0  =>  A o G <= lambda_max(A) Diag(G),
      (A - lambda_min(A) I) o G >= 0  =>  A o G >= lambda_min(A) Diag(G),
  (Schur product theorem; Horn & Johnson, Topics in Matrix Analysis, Thm 5.3.4). Every RoPE
  kernel E_theta, its real part cos((i-j) theta), and any convex combination of them is PSD with
  unit diagonal, so lambda(A o G) lies in [lambda_min(A), lambda_max(A)]: the coupled spectrum
  never leaves the content spectrum ("spectral contraction", a non-expansive bound).
* Single frequency: A o (u u^*) = D_u A D_u^* with D_u = diag(u) unitary, a similarity: the
  spectrum is preserved *exactly*. Strict contraction comes only from mixing frequencies (or from
  taking the real part).

`python -m spectral.decomposition` (from the project root) sweeps sequence length n and frequency
count K and writes a CSV table, a Markdown table and a figure (out/spectral/ by default; the committed
results/spectral/ copy is made with --out results/spectral).
"""
import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import rope
import training

# ---- defaults of the sweep (visible at the top, nanoGPT style) ----
N_VALUES = (16, 32, 64, 128, 256)   # sequence lengths n
FREQ_COUNTS = (1, 2, 4, 8, 16, 32)  # number of RoPE frequencies K mixed in the kernel
CONTENT_DIM = 64                    # content features d: A = C C^T / d is PSD of rank min(n, d)
ALIBI_SLOPE = 1.0                   # m of the paper code's first head (m_h = e^{-h/H}, h = 0)
T5_STD = 1.0                        # std of a random T5 offset table (a trained table, not the init)
BASE = 10000.0                      # RoPE base
TRIALS = 5                          # random content matrices per (n, K)
FIG_N, FIG_K = 64, 8                # the instance drawn in panel (a)


# ============================================================================================
# 1. Gram matrices and the logit decomposition
# ============================================================================================
def gram(a, b):
    """G_{a,b} = a b^T, (G)_ij = a_i . b_j for row stacks a (..., n, d), b (..., m, d)."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"gram needs the same feature size, got {a.shape[-1]} and {b.shape[-1]}")
    # (G_{a,b})_ij = a_i^T b_j  (docs/spectral.md §1.2)
    return a @ b.transpose(-1, -2)


def toeplitz(offset_values, n):
    """Toeplitz T (n, n) with T_ij = b_{j-i}; offset_values (..., 2n-1) holds b_{-(n-1)}..b_{n-1}."""
    if offset_values.shape[-1] != 2 * n - 1:
        raise ValueError(f"toeplitz needs 2n-1 = {2 * n - 1} offset values, got {offset_values.shape[-1]}")
    i = torch.arange(n, device=offset_values.device)
    # T_ij = b_{j - i}, stored at index (j - i) + (n - 1)
    return offset_values[..., (i[None, :] - i[:, None]) + n - 1]


def is_toeplitz(T, atol=1e-10):
    """True when every diagonal of T (n, n) is constant."""
    n = T.shape[-1]
    return all(torch.allclose(torch.diagonal(T, k), torch.diagonal(T, k)[:1].expand(n - abs(k)), atol=atol)
               for k in range(-(n - 1), n))


def additive_logits(C, P, Q, K, bias=None):
    """The additive decomposition L_Add = G_{qc,kc} + G_{qc,kp} + G_{qp,kc} + G_{qp,kp} + B.

    C, P: content and position rows (n, d) (P = 0 for NoPE/T5/ALiBi); Q, K: (d, d_k); bias: B (n, n)
    or None. Returns a dict of the five terms and their sum 'total', which equals
    ((C + P) Q)((C + P) K)^T + B.
    """
    if C.shape != P.shape:
        raise ValueError(f"content and position rows must have the same shape, got {tuple(C.shape)} and {tuple(P.shape)}")
    # qc = C Q, qp = P Q, kc = C K, kp = P K
    qc, qp, kc, kp = C @ Q, P @ Q, C @ K, P @ K
    terms = {"content": gram(qc, kc),           # G_{qc,kc}: content-content
             "content_position": gram(qc, kp),  # G_{qc,kp}
             "position_content": gram(qp, kc),  # G_{qp,kc}
             "position": gram(qp, kp),          # G_{qp,kp}: Toeplitz when Q K^T = I and P sinusoidal
             "bias": torch.zeros_like(gram(qc, kc)) if bias is None else bias}
    # L_Add = sum of the five terms (docs/spectral.md §1.2)
    terms["total"] = sum(terms[k] for k in ("content", "content_position", "position_content", "position", "bias"))
    return terms


def to_complex_pairs(x, pairing="interleaved"):
    """Feature pairs as complex numbers: x~^(k) = x_{2k} + i x_{2k+1} (interleaved) or x_k + i x_{k+d/2} (half)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even feature size, got {d}")
    if pairing == "interleaved":
        re, im = x[..., 0::2], x[..., 1::2]
    elif pairing == "half":
        re, im = x[..., : d // 2], x[..., d // 2:]
    else:
        raise ValueError(f"unknown pairing {pairing!r}; use 'interleaved' or 'half'")
    return torch.complex(re.double(), im.double())


def rope_kernel(positions, theta):
    """E_theta (n, n), (E_theta)_ij = e^{i (p_i - p_j) theta}: Hermitian, rank one (u u^*), unit diagonal."""
    p = positions.double()
    angle = (p[:, None] - p[None, :]) * float(theta)
    # (E_theta)_ij = exp(i (p_i - p_j) theta)  (docs/spectral.md §1.2)
    return torch.polar(torch.ones_like(angle), angle)


def rope_logits_hadamard(q, k, positions, base=BASE, pairing="interleaved"):
    """RoPE logits as a sum of per-frequency Hadamard products (docs/spectral.md §1.2).

    q, k: unrotated queries and keys (n, d); positions (n,). Returns (total (n, n), terms) with
    terms[k] = Re(G^(k)_{q,k} o E_{theta_k}) and total = sum_k terms[k], which equals
    apply_rope(q, p) apply_rope(k, p)^T.
    """
    qz, kz = to_complex_pairs(q, pairing), to_complex_pairs(k, pairing)
    thetas = rope.rope_frequencies(q.shape[-1], base).double()
    terms = []
    for f, theta in enumerate(thetas.tolist()):
        # G^(k)_{q,k} = q~^(k) (k~^(k))^*  (complex Gram of frequency pair k)
        G = qz[:, f, None] * kz[None, :, f].conj()
        # Re(G^(k) o E_{theta_k})
        terms.append((G * rope_kernel(positions, theta)).real)
    # L^RoPE = Re sum_k G^(k) o E_{theta_k}
    return torch.stack(terms).sum(0), terms


def mla_logits(q_content, k_content, q_rope, k_rope, positions, base=BASE, pairing="interleaved"):
    """MLA's decoupled-RoPE logit: an additive content term plus a RoPE Hadamard term
    (docs/spectral.md §1.2, §4.3).

    q_content, k_content (n, d_C); q_rope, k_rope (n, d_R) unrotated. Returns a dict with
    'content' = G_{qC,kC} / s, 'position' = Re sum_k G^(k)_{qR,kR} o E_k / s and 'total', where
    s = sqrt(d_C + d_R) is the scale of the concatenated dot product [qC; qR] . [kC; kR].
    """
    # s = sqrt(d_C + d_R)  (the paper code's 1/sqrt(2 * 16))
    s = math.sqrt(q_content.shape[-1] + q_rope.shape[-1])
    content = gram(q_content.double(), k_content.double()) / s
    position = rope_logits_hadamard(q_rope, k_rope, positions, base, pairing)[0] / s
    # L^MLA = (G_{qC,kC} + Re sum_k G^(k)_{qR,kR} o E_k) / sqrt(d_C + d_R)
    return {"content": content, "position": position, "total": content + position}


# ============================================================================================
# 2. Position matrices for the eigenvalue comparison
# ============================================================================================
def alibi_matrix(n, slope=ALIBI_SLOPE):
    """B_ALiBi (n, n) = -m |i - j| (bidirectional; symmetric Toeplitz), via rope.alibi_bias."""
    return rope.alibi_bias(n, torch.tensor([float(slope)], dtype=torch.float64))[0].double()


def t5_matrix(n, std=T5_STD, generator=None):
    """A random T5-style bias, one scalar per offset (the paper code), symmetrised:
    B_ij = (b_{j-i} + b_{i-j}) / 2 with b ~ N(0, std^2)."""
    b = torch.randn(2 * n - 1, generator=generator, dtype=torch.float64) * std
    B = toeplitz(b, n)
    # sym(B) = (B + B^T) / 2 keeps the Toeplitz structure: entries (b_{j-i} + b_{i-j}) / 2
    return (B + B.T) / 2


def rope_mixture_kernel(n, n_freqs, base=BASE, kind="complex", weights=None):
    """G_RoPE (n, n) = sum_k w_k E_{theta_k} (complex) or sum_k w_k cos((i-j) theta_k) (real),
    theta_k = base^(-2k/(2K)), k = 0..K-1, weights uniform by default ('average of K RoPE
    frequencies', docs/spectral.md §1.3). PSD with unit diagonal when the weights are a convex
    combination."""
    if n_freqs < 1:
        raise ValueError(f"the number of RoPE frequencies must be >= 1, got {n_freqs}")
    thetas = rope.rope_frequencies(2 * n_freqs, base).double()
    w = torch.full((n_freqs,), 1.0 / n_freqs, dtype=torch.float64) if weights is None else weights.double()
    pos = torch.arange(n)
    # G = sum_k w_k E_{theta_k}
    G = sum(wk * rope_kernel(pos, th) for wk, th in zip(w.tolist(), thetas.tolist()))
    if kind == "complex":
        return G
    if kind == "real":
        # Re E_theta = cos((i - j) theta) = c c^T + s s^T: PSD, rank two, unit diagonal
        return G.real
    raise ValueError(f"unknown kernel kind {kind!r}; use 'complex' or 'real'")


def content_gram(n, d=CONTENT_DIM, generator=None, psd=True):
    """A random Hermitian content Gram matrix: A = C C^T / d (PSD) or C S C^T / d with a random
    symmetric S (indefinite), C ~ N(0, 1) of shape (n, d)."""
    C = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if psd:
        # A = C C^T / d  (Q = K: the content logit form is PSD)
        return C @ C.T / d
    S = torch.randn(d, d, generator=generator, dtype=torch.float64)
    # A = C sym(S) C^T / d  (a symmetric, indefinite content logit form)
    return C @ ((S + S.T) / 2) @ C.T / d


# ============================================================================================
# 3. Eigenvalues and the two bounds
# ============================================================================================
def eigvalsh(M):
    """Ascending real eigenvalues of a Hermitian (real symmetric or complex) matrix."""
    if not torch.allclose(M, M.mH, atol=1e-9 * max(1.0, M.abs().max().item())):
        raise ValueError("the eigenvalue comparison needs a Hermitian matrix; symmetrise it first")
    return torch.linalg.eigvalsh(M)


def weyl_bounds(A, B):
    """Weyl: lambda_i(A) + lambda_min(B) <= lambda_i(A + B) <= lambda_i(A) + lambda_max(B) (ascending i)."""
    la, lb = eigvalsh(A), eigvalsh(B)
    # [lambda_i(A) + lambda_min(B), lambda_i(A) + lambda_max(B)]
    return la + lb[0], la + lb[-1]


def schur_bounds(A, G):
    """Schur: for Hermitian A and PSD G, lambda_min(A) Diag(G) <= A o G <= lambda_max(A) Diag(G).
    Returns the scalar interval (lo, hi) that contains every eigenvalue of A o G."""
    la = eigvalsh(A)
    g = torch.diagonal(G).real
    lmin, lmax = la[0].item(), la[-1].item()
    # lambda_min(A) Diag(G) >= lambda_min(A) * (min g if lambda_min >= 0 else max g)
    lo = lmin * (g.min() if lmin >= 0 else g.max()).item()
    # lambda_max(A) Diag(G) <= lambda_max(A) * (max g if lambda_max >= 0 else min g)
    hi = lmax * (g.max() if lmax >= 0 else g.min()).item()
    return lo, hi


def compare_spectra(A, n_freqs, alibi_slope=ALIBI_SLOPE, t5_std=T5_STD, base=BASE, kernel="complex",
                    generator=None):
    """Spectra of A, A + B_ALiBi, A + B_T5 and A o G_RoPE for one content matrix A, with bounds."""
    n = A.shape[-1]
    B_alibi, B_t5 = alibi_matrix(n, alibi_slope), t5_matrix(n, t5_std, generator)
    G = rope_mixture_kernel(n, n_freqs, base, kernel)
    out = {"A": eigvalsh(A),
           "A+B_alibi": eigvalsh(A + B_alibi),  # additive: L = A + B
           "A+B_t5": eigvalsh(A + B_t5),
           "AoG_rope": eigvalsh(A * G)}          # multiplicative: L = A o G (Hadamard)
    out["weyl_alibi"], out["weyl_t5"] = weyl_bounds(A, B_alibi), weyl_bounds(A, B_t5)
    out["schur_rope"] = schur_bounds(A, G)
    return out


def sweep(n_values=N_VALUES, freq_counts=FREQ_COUNTS, d=CONTENT_DIM, trials=TRIALS, alibi_slope=ALIBI_SLOPE,
          t5_std=T5_STD, base=BASE, kernel="complex", seed=0, progress=True):
    """Rows (dicts) of the table: for each n, K, method, the mean lambda_min / lambda_max over trials,
    the bound interval and whether every trial stayed inside its bound."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    grid = [(n, K) for n in n_values for K in freq_counts]
    for n, K in tqdm(grid, desc="spectra", disable=not progress):
        acc = {m: [] for m in ("A", "A+B_alibi", "A+B_t5", "AoG_rope")}
        bounds = {m: [] for m in acc}
        holds = {m: True for m in acc}
        for _ in range(trials):
            A = content_gram(n, d, g)
            s = compare_spectra(A, K, alibi_slope, t5_std, base, kernel, g)
            for m in acc:
                acc[m].append((s[m][0].item(), s[m][-1].item()))
            bounds["A"].append((s["A"][0].item(), s["A"][-1].item()))
            for m, key in (("A+B_alibi", "weyl_alibi"), ("A+B_t5", "weyl_t5")):
                lo, hi = s[key]
                bounds[m].append((lo[0].item(), hi[-1].item()))
                # Weyl holds eigenvalue by eigenvalue (1e-9 relative slack for round-off)
                tol = 1e-9 * (1 + s[m].abs().max().item())
                holds[m] &= bool(((s[m] >= lo - tol) & (s[m] <= hi + tol)).all())
            lo, hi = s["schur_rope"]
            bounds["AoG_rope"].append((lo, hi))
            tol = 1e-9 * (1 + abs(lo) + abs(hi))
            holds["AoG_rope"] &= bool(s["AoG_rope"][0] >= lo - tol and s["AoG_rope"][-1] <= hi + tol)
        for m in acc:
            lmin = sum(a for a, _ in acc[m]) / trials
            lmax = sum(b for _, b in acc[m]) / trials
            rows.append({"n": n, "n_freqs": K, "method": m,
                         "lambda_min": lmin, "lambda_max": lmax, "spread": lmax - lmin,
                         "bound": {"A": "-", "A+B_alibi": "Weyl", "A+B_t5": "Weyl", "AoG_rope": "Schur"}[m],
                         "bound_lo": sum(a for a, _ in bounds[m]) / trials,
                         "bound_hi": sum(b for _, b in bounds[m]) / trials,
                         "bound_holds": holds[m]})
    return rows


# ============================================================================================
# 4. Outputs: table and figure (atomic writes)
# ============================================================================================
def write_table(rows, csv_path, md_path, md_n_freqs=FIG_K):
    """The sweep as a CSV table (every row) and a Markdown table (the rows at K = md_n_freqs)."""
    training.write_csv(csv_path, [{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                                  for r in rows], list(rows[0].keys()))
    lines = [f"Spectra at K = {md_n_freqs} RoPE frequencies (mean over trials); bound = Weyl for "
             "A + B, Schur for A o G. Ours, not the paper's theorem.", "",
             "| n | method | lambda_min | lambda_max | spread | bound interval | holds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["n_freqs"] != md_n_freqs:
            continue
        bound = "-" if r["bound"] == "-" else f"{r['bound']} [{r['bound_lo']:.4g}, {r['bound_hi']:.4g}]"
        lines.append(f"| {r['n']} | {r['method']} | {r['lambda_min']:.4g} | {r['lambda_max']:.4g} | "
                     f"{r['spread']:.4g} | {bound} | {'yes' if r['bound_holds'] else 'NO'} |")
    _write_text(md_path, "\n".join(lines) + "\n")


def _write_text(path, text):
    """Atomic text write (training.atomic_write: a temporary file, then os.replace)."""
    training.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot(rows, fig_path, d=CONTENT_DIM, alibi_slope=ALIBI_SLOPE, t5_std=T5_STD, base=BASE, kernel="complex",
         seed=0, fig_n=FIG_N, fig_k=FIG_K):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    # (a) one instance: sorted eigenvalues with the Weyl band (ALiBi) and the Schur interval (RoPE)
    g = torch.Generator().manual_seed(seed)
    A = content_gram(fig_n, d, g)
    s = compare_spectra(A, fig_k, alibi_slope, t5_std, base, kernel, g)
    idx = torch.arange(fig_n)
    colors = {"A": "k", "A+B_alibi": "tab:red", "A+B_t5": "tab:orange", "AoG_rope": "tab:blue"}
    labels = {"A": "A (content)", "A+B_alibi": "A + B_ALiBi", "A+B_t5": "A + B_T5", "AoG_rope": "A o G_RoPE"}
    for m in colors:
        ax[0].plot(idx, s[m], ".-", color=colors[m], label=labels[m], ms=3, lw=1)
    lo, hi = s["weyl_alibi"]
    ax[0].fill_between(idx, lo, hi, color="tab:red", alpha=0.12, label="Weyl band (ALiBi)")
    lo, hi = s["schur_rope"]
    ax[0].axhspan(lo, hi, color="tab:blue", alpha=0.12, label="Schur interval (RoPE)")
    ax[0].set_yscale("symlog", linthresh=1.0)
    ax[0].set(title=f"(a) eigenvalues, n = {fig_n}, K = {fig_k}", xlabel="index (ascending)", ylabel="eigenvalue")
    ax[0].legend(fontsize=7, loc="upper left")
    # (b) spread lambda_max - lambda_min against n at K = fig_k
    for m in colors:
        pts = [(r["n"], r["spread"]) for r in rows if r["method"] == m and r["n_freqs"] == fig_k]
        ax[1].plot(*zip(*pts), "o-", color=colors[m], label=labels[m])
    ax[1].set(xscale="log", yscale="log", title=f"(b) spectral spread vs n (K = {fig_k})", xlabel="n",
              ylabel="lambda_max - lambda_min")
    ns = sorted({r["n"] for r in rows})
    ax[1].set_xticks(ns, [str(n) for n in ns])
    ax[1].minorticks_off()
    ax[1].legend(fontsize=7)
    # (c) lambda_max(A o G) / lambda_max(A) against K, per n, with the Schur bound (= 1)
    for n in ns:
        a = {r["n_freqs"]: r["lambda_max"] for r in rows if r["n"] == n and r["method"] == "A"}
        c = {r["n_freqs"]: r["lambda_max"] for r in rows if r["n"] == n and r["method"] == "AoG_rope"}
        ks = sorted(c)
        ax[2].plot(ks, [c[k] / a[k] for k in ks], "o-", label=f"n = {n}")
    ax[2].axhline(1.0, color="k", ls="--", lw=1, label="Schur bound (unit diagonal)")
    ax[2].set(xscale="log", title="(c) RoPE contraction: lambda_max(A o G) / lambda_max(A)",
              xlabel="K (RoPE frequencies averaged)", ylabel="ratio", ylim=(0, 1.1))
    ax[2].legend(fontsize=7)
    fig.suptitle("Spectral comparison (our Weyl/Schur reconstruction of the paper's 'spectral contraction', "
                 f"{kernel} RoPE kernel, ALiBi m = {alibi_slope}, T5 std = {t5_std})", fontsize=9)
    fig.tight_layout()
    training.atomic_write(fig_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def memory_lower_bound(n, d=CONTENT_DIM):
    """Bytes one (n, K) cell of the sweep needs at the very least: compare_spectra holds the content
    Gram A, the ALiBi and T5 biases (three real n × n float64 matrices, 24 n² bytes) and the RoPE
    kernel G (complex128, 16 n² bytes) at once, beside the n × d content rows (8 n d bytes)."""
    return 40 * n * n + 8 * n * d


def _int_list(text):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def main(argv=None):
    p = training.ArgParser(prog="python -m spectral.decomposition",
                                description="Eigenvalue comparison of additive (ALiBi, T5) and multiplicative "
                                "(RoPE) content-position coupling; writes a table and a figure.")
    p.add_argument("--n", type=_int_list, default=list(N_VALUES), help="sequence lengths, e.g. 16,32,64")
    p.add_argument("--freqs", type=_int_list, default=list(FREQ_COUNTS), help="RoPE frequency counts K")
    p.add_argument("--dim", type=int, default=CONTENT_DIM, help="content features d (A = C C^T / d)")
    p.add_argument("--trials", type=int, default=TRIALS, help="random content matrices per (n, K)")
    p.add_argument("--alibi-slope", type=float, default=ALIBI_SLOPE)
    p.add_argument("--t5-std", type=float, default=T5_STD)
    p.add_argument("--base", type=float, default=BASE)
    p.add_argument("--kernel", choices=["complex", "real"], default="complex",
                   help="RoPE kernel: mean of e^{i(i-j)theta_k} or of cos((i-j)theta_k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/spectral", help="output folder (results/spectral is written by "
                   "analysis.experiments --only spectral)")
    args = p.parse_args(argv)
    try:
        if args.dim < 1 or args.trials < 1:
            raise ValueError("--dim and --trials must be positive")
        if not all(math.isfinite(v) for v in (args.alibi_slope, args.t5_std, args.base)) or args.base <= 1:
            raise ValueError("--alibi-slope, --t5-std and --base must be finite and --base > 1")
        training.check_memory(memory_lower_bound(max(args.n), args.dim), torch.device("cpu"),
                              f"the sweep at --n {max(args.n)}", hint="lower --n")
        rows = sweep(args.n, args.freqs, args.dim, args.trials, args.alibi_slope, args.t5_std, args.base,
                     args.kernel, args.seed)
        write_table(rows, os.path.join(args.out, "spectral_table.csv"), os.path.join(args.out, "spectral_table.md"),
                    md_n_freqs=FIG_K if FIG_K in args.freqs else args.freqs[0])
        fig_n = FIG_N if FIG_N in args.n else args.n[0]
        fig_k = FIG_K if FIG_K in args.freqs else args.freqs[0]
        plot(rows, os.path.join(args.out, "spectral.png"), args.dim, args.alibi_slope, args.t5_std, args.base,
             args.kernel, args.seed, fig_n, fig_k)
        meta = {"args": vars(args), "torch": torch.__version__,
                "all_bounds_hold": all(r["bound_holds"] for r in rows)}
        _write_text(os.path.join(args.out, "spectral_config.json"), json.dumps(meta, indent=2))
    except (ValueError, OSError) as e:
        print(f"spectral.decomposition: {e}", file=sys.stderr)
        return 2
    print(Path(args.out, "spectral_table.md").read_text().rstrip() + "\n")      # the table, as written
    print(f"wrote {args.out}/spectral_table.csv, spectral_table.md, spectral.png "
          f"(all bounds hold: {meta['all_bounds_hold']})")
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
