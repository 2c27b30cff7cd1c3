"""The ODE simulation demo: one random instance of a regime, integrated and drawn.

    python -m analysis.simulate --regime convergent --pe rope --lam -0.1   # → out/ode/convergent-rope-lam-0.1

Samples (Q, K, V) of the requested regime (regimes.sample_instance), integrates the attention field
dX/dt = softmax(X Q Kᵀ Xᵀ) X V (ode_attention.integrate) with the chosen positional encoding and
λ-term, and writes trajectories.png (the tokens y(t); the plane itself for d = 2, else the top-3
principal directions), probes.png, probes.csv (the token-geometry probes over time) and
summary.json (the predicted regime of (W + λM, (W + λM)(Vᵀ)⁻¹) and the observed fate). See `--help` for the flags.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
from pathlib import Path

import torch

import regimes
import rope
import training
from analysis.agreement import observed_fate
from ode_attention import PROBES, integrate, token_norm


def _compress(Z: torch.Tensor) -> torch.Tensor:
    """Radial log-compression z ↦ z · log(1 + ‖z‖)/‖z‖: keeps directions, makes huge and tiny
    radii visible in one picture (diverging tokens would otherwise flatten everything else)."""
    r = torch.linalg.vector_norm(Z, dim=-1, keepdim=True)
    return Z * torch.log1p(r) / r.clamp_min(1e-12)


N_SAVE = 401                            # saved time points of the trajectory


def memory_lower_bound(n: int, d: int, n_save: int = N_SAVE) -> int:
    """Bytes a simulation of n tokens in R^d needs at the very least (float64): every evaluation
    of the field builds the n × n softmax weights from the n × n logits, two n × n arrays alive
    at once (16 n² bytes), the trajectory keeps n_save × n × d values (8 n_save n d bytes), and
    the instance is three d × d matrices Q, K, V (24 d² bytes)."""
    return 16 * n * n + 8 * n_save * n * d + 24 * d * d


def simulate(regime: str, pe: str = "none", lam: float = 0.0, lam_matrix: str = "I", d: int = 2,
             n: int = 8, t_end: float = 20.0, dt: float = 0.05, method: str = "rk4",
             symmetric_A: bool = False, causal: bool = False, seed: int = 0) -> dict:
    """Sample one instance of `regime` (regimes.sample_instance), integrate it and return the
    trajectory, the probes over time, the predicted regime and the observed fate."""
    g = torch.Generator().manual_seed(seed)
    Q, K, V = regimes.sample_instance(regime, d, symmetric_A=symmetric_A, generator=g)
    W, A = regimes.interaction_matrices(Q, K, V)
    X0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    opts: dict = {"causal": causal}
    shift = 0.0
    if pe == "abs":
        shift = rope.sinusoidal_pe(n, d, dtype=torch.float64)
        opts["pos"] = shift
    elif pe == "rope":
        opts["rope"] = True
    if lam != 0.0:
        opts["lam"] = lam
        if lam_matrix == "A":
            opts["lam_M"] = A
    # the λ-term's realised pair (W + λM, (W + λM)(Vᵀ)⁻¹) — its regime is the one we predict
    W_eff, A_eff = regimes.lam_interaction(W, V, lam, A if lam_matrix == "A" else None)
    predicted = regimes.classify_matrices(W_eff, A_eff)
    bound = 1e6 * max(1.0, float(token_norm(X0 + shift)))
    tr = integrate(X0, Q, K, V, t_end=t_end, dt=dt, method=method, max_norm=bound, n_save=N_SAVE, **opts)
    Y = tr.X + shift                                             # driving tokens y = x + p
    fate = observed_fate(token_norm(Y)[:, None], tr.blown.reshape(1))[0]
    kept = None
    if pe == "rope":
        # RoPE makes W offset-dependent: W(m) = Q R(m) Kᵀ; count the offsets that keep the regime
        per = regimes.rope_offset_regimes(Q, K, V, range(-(n - 1), n))
        kept = (sum(r["regime"] == predicted for r in per), len(per))
    return {"traj": tr, "Y": Y, "W": W, "A": A, "predicted": predicted, "fate": fate, "rope_kept": kept,
            "probes": {k: fn(Y) for k, fn in PROBES.items()}, "regime_report": regimes.regime_of(W_eff, A_eff)}


def main(argv=None) -> int:
    p = training.ArgParser(
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
    p.add_argument("--out", default=None,
                   help="output folder (default out/ode/<regime>-<pe>[-lam<λ>][-causal]: one per setting)")
    a = p.parse_args(argv)
    if a.out is None:        # distinct settings, distinct folders: the README's three regimes all survive
        a.out = os.path.join("out", "ode", f"{a.regime}-{a.pe}" + (f"-lam{a.lam:g}" if a.lam else "")
                             + ("-causal" if a.causal else ""))
    try:
        if a.d < 1 or a.n < 2 or not (a.t_end > 0 and a.dt > 0) or a.dt > a.t_end:
            raise ValueError("need --d >= 1, --n >= 2 and 0 < --dt <= --t-end.")
        if a.pe == "rope" and a.d % 2:
            raise ValueError(f"--pe rope needs an even --d, got {a.d}.")
        if a.pe == "abs" and a.d % 2:
            raise ValueError(f"--pe abs (sinusoidal) needs an even --d, got {a.d}.")
        if not math.isfinite(a.lam):
            raise ValueError("--lam must be a finite number.")
        training.check_memory(memory_lower_bound(a.n, a.d), torch.device("cpu"),
                              f"a simulation of --n {a.n} tokens in --d {a.d}", hint="lower --n")
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
        print(f"simulate.py: {e}", file=sys.stderr)
        return 2


def _write_outputs(a, res) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tr, Y = res["traj"], res["Y"]
    t = tr.t.numpy()
    # the four files are written together at the end, all or none (training.atomic_write_all): a
    # disk that fills up leaves neither a temporary file nor a new figure beside an old summary
    outputs = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        outputs[os.path.join(a.out, name)] = lambda tmp, data=buf.getvalue(): Path(tmp).write_bytes(data)

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
        outputs[os.path.join(a.out, name)] = lambda tmp, text=text: Path(tmp).write_text(text)
    training.atomic_write_all(outputs)


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
