"""The ODE simulation demo: one random instance of a regime, integrated and drawn.

    python -m analysis.simulate --regime convergent --pe rope --lam -0.1   # → out/ode/convergent-rope-lam-0.1
    python -m analysis.simulate --regime divergent --gif                   # + out/ode/divergent-none/tokens.gif
    python -m analysis.simulate --gif-set                                  # → out/ode/gifs/<regime>-<pe>.gif (six)

Samples (Q, K, V) of the requested regime (regimes.sample_instance), integrates the attention field
dX/dt = softmax(X Q Kᵀ Xᵀ) X V (ode_attention.integrate) with the chosen positional encoding and
λ-term, and writes trajectories.png (the tokens y(t); the plane itself for d = 2, else the top-3
principal directions; each token one colour, by its position i, for its line and its start (o) and
end (x) markers), probes.png, probes.csv (the token-geometry probes over time) and summary.json
(the predicted regime of (W + λM, (W + λM)(Vᵀ)⁻¹) and the observed fate). See `--help` for the flags.

Animations (matplotlib.animation.PillowWriter; Pillow comes with matplotlib):
  --gif        also writes tokens.gif into the run's folder: the tokens moving in 2-D (the plane itself
               for d = 2, else a fixed PCA projection of the whole trajectory computed once), radially
               log-compressed as trajectories.png, with fixed axis limits over the whole run, the
               regime, PE, λ and t in the title, the colour of a token its position i (one colour bar).
  --gif-set    the six GIFs "each regime × without / with RoPE" (convergent, divergent, intermediate ×
               none, rope) into --out (default out/ode/gifs/<regime>-<pe>.gif) and nothing else; the
               other flags (--d, --n, --t-end, --seed, --frames, ...) apply to all six; not with
               --regime / --pe / --gif.
  --frames N   frames per GIF (default 60), at --frame-times log (default: 0 and N − 1 log-spaced times
               from 10⁻³·T to T, T the last saved time) or uniform; the trajectory is interpolated
               linearly between its saved points.
Every file is written atomically (training.atomic_write_all): a kill or a full disk leaves the old
file or none, never half a GIF. Defaults go under out/ (ignored by git), never into results/.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
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


_SUP = {-2: "⁻²", -1: "⁻¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸"}
GIF_FRAMES = 60                          # frames of an animation (--frames)
GIF_FPS = 12
SET_REGIMES = ("convergent", "divergent", "intermediate")
SET_PES = ("none", "rope")


def main(argv=None) -> int:
    p = training.ArgParser(
        description="Simulate the attention ODE dX/dt = softmax(X Q Kᵀ Xᵀ) X V for a random instance "
                    "of a regime and draw its tokens. Writes PNG figures, a CSV of the probes over "
                    "time and a JSON summary (--gif: also an animation; --gif-set: the six animations "
                    "regime × {no PE, RoPE}).")
    p.add_argument("--regime", default=None, choices=SET_REGIMES, help="default convergent")
    p.add_argument("--pe", default=None, choices=("none", "abs", "rope"),
                   help="positional encoding inside the field (default none)")
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
    p.add_argument("--gif", action="store_true", help="also write tokens.gif, the tokens moving (2-D)")
    p.add_argument("--gif-set", action="store_true",
                   help="write only the six GIFs regime × {none, rope} into --out (default out/ode/gifs)")
    p.add_argument("--frames", type=int, default=GIF_FRAMES, help="frames per GIF")
    p.add_argument("--frame-times", default="log", choices=("log", "uniform"),
                   help="frame times: 0 then log-spaced from 1e-3·T to T, or uniform on [0, T]")
    p.add_argument("--out", default=None,
                   help="output folder (default out/ode/<regime>-<pe>[-lam<λ>][-causal]: one per setting; "
                        "with --gif-set out/ode/gifs)")
    a = p.parse_args(argv)
    try:
        if a.gif_set and (a.regime is not None or a.pe is not None or a.gif):
            raise ValueError("--gif-set makes every regime × {none, rope}: leave out --regime, --pe and --gif.")
        a.regime = a.regime or "convergent"
        a.pe = a.pe or "none"
        if a.out is None:    # distinct settings, distinct folders: the README's three regimes all survive
            a.out = (os.path.join("out", "ode", "gifs") if a.gif_set else
                     os.path.join("out", "ode", f"{a.regime}-{a.pe}" + (f"-lam{a.lam:g}" if a.lam else "")
                                  + ("-causal" if a.causal else "")))
        if a.d < 1 or a.n < 2 or not (a.t_end > 0 and a.dt > 0) or a.dt > a.t_end:
            raise ValueError("need --d >= 1, --n >= 2 and 0 < --dt <= --t-end.")
        if (a.pe == "rope" or a.gif_set) and a.d % 2:
            raise ValueError(f"--pe rope needs an even --d, got {a.d}.")
        if a.pe == "abs" and a.d % 2:
            raise ValueError(f"--pe abs (sinusoidal) needs an even --d, got {a.d}.")
        if not math.isfinite(a.lam):
            raise ValueError("--lam must be a finite number.")
        if (a.gif or a.gif_set) and not 2 <= a.frames <= 1000:
            raise ValueError(f"--frames must be between 2 and 1000, got {a.frames}.")
        if a.gif or a.gif_set:
            _pillow_writer()                                     # refuse up front, before any work
        training.check_memory(memory_lower_bound(a.n, a.d), torch.device("cpu"),
                              f"a simulation of --n {a.n} tokens in --d {a.d}", hint="lower --n")
        if a.gif_set:
            return _gif_set(a)
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
        print(f"wrote {a.out}/trajectories.png, {a.out}/probes.png, {a.out}/probes.csv, {a.out}/summary.json"
              + (f", {a.out}/tokens.gif ({a.frames} frames)" if a.gif else ""))
        return 0
    except (ValueError, OSError) as e:
        print(f"simulate.py: {e}", file=sys.stderr)
        return 2


def _gif_set(a) -> int:
    """The six animations regime × {none, rope}, each written atomically as soon as it is drawn."""
    t0 = time.perf_counter()
    for regime in SET_REGIMES:
        for pe in SET_PES:
            t1 = time.perf_counter()
            res = simulate(regime, pe, a.lam, a.lam_matrix, a.d, a.n, a.t_end, a.dt, a.method,
                           a.symmetric_A, a.causal, a.seed)
            path = os.path.join(a.out, f"{regime}-{pe}.gif")
            training.atomic_write(path, gif_writer(res, _title(regime, pe, a.lam), a.frames, a.frame_times))
            print(f"wrote {path} ({os.path.getsize(path) / 1e3:.0f} kB, {a.frames} frames; predicted "
                  f"{res['predicted']}, observed {res['fate']}; {time.perf_counter() - t1:.1f} s)")
    print(f"{len(SET_REGIMES) * len(SET_PES)} GIFs in {time.perf_counter() - t0:.1f} s")
    return 0


def _title(regime: str, pe: str, lam: float) -> str:
    return f"{regime}, PE={pe}, λ={lam:g}"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _pillow_writer():
    """matplotlib.animation.PillowWriter, or one sentence (ValueError) when Pillow is missing."""
    try:
        import PIL  # noqa: F401  (matplotlib.animation needs it; say so plainly)
        from matplotlib.animation import PillowWriter
    except ImportError:
        raise ValueError("--gif needs Pillow, which comes with matplotlib and is missing here: "
                         "pip install pillow.") from None
    return PillowWriter


def token_colours(n: int) -> list:
    """One RGBA colour per token, by its position index i (viridis, i = 0 dark … n − 1 yellow):
    the same in every figure and animation, whatever the number of tokens."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    return [tuple(float(c) for c in cmap(i / max(1, n - 1))) for i in range(n)]


def _colourbar(fig, ax, n: int, **kw):
    """The colour bar of token_colours: token position 0 … n − 1."""
    import matplotlib
    sm = matplotlib.cm.ScalarMappable(cmap="viridis", norm=matplotlib.colors.Normalize(0, max(1, n - 1)))
    cb = fig.colorbar(sm, ax=ax, **kw)
    cb.set_label("token position i")
    if n <= 12:
        cb.set_ticks(range(n))
    return cb


def _pca(Y: torch.Tensor, k: int) -> torch.Tensor:
    """(d, k) the top-k principal directions of all the points of the trajectory Y (T, n, d), once."""
    P = Y.reshape(-1, Y.shape[-1])
    return torch.linalg.svd(P - P.mean(0), full_matrices=False)[2][:k].T


def trajectory_figure(res: dict, title: str):
    """trajectories.png: each token's path y(t) (the plane for d ≤ 2, else the top-3 principal
    directions), radially log-compressed; line, start (o) and end (x) in the token's own colour."""
    plt = _plt()
    Y = res["Y"]
    Z = Y if Y.shape[-1] <= 3 else Y @ _pca(Y, 3)
    Z = _compress(Z).numpy()
    n = Z.shape[1]
    colours = token_colours(n)
    fig = plt.figure(figsize=(6.6, 5.5))
    three_d = Z.shape[-1] == 3
    ax = fig.add_subplot(111, projection="3d" if three_d else None)
    extra = {"depthshade": False} if three_d else {}
    for i in range(n):
        pts = [Z[:, i, c] for c in range(min(Z.shape[-1], 3))]
        if len(pts) == 1:
            pts = [pts[0], 0 * pts[0]]
        (line,) = ax.plot(*pts, lw=1, color=colours[i])
        ax.scatter(*[q[:1] for q in pts], s=14, marker="o", color=line.get_color(), **extra)
        ax.scatter(*[q[-1:] for q in pts], s=24, marker="x", color=line.get_color(), **extra)
    if three_d:                         # matplotlib's default 3-D ticks overlap at this size
        import matplotlib.ticker
        for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
            axis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    _colourbar(fig, ax, n, shrink=0.8, pad=0.1 if three_d else 0.03)
    ax.set_title(f"{title}: tokens y(t)\n(o start, x end; radially log-compressed"
                 f"{'; top-3 PCA' if Y.shape[-1] > 3 else ''})")
    return fig


def frame_times(t_last: float, frames: int, spacing: str = "log") -> torch.Tensor:
    """`frames` times in [0, t_last]: uniform, or 0 followed by frames − 1 log-spaced times from
    10⁻³·t_last to t_last (the early motion is fast, the late one slow)."""
    if spacing == "uniform":
        return torch.linspace(0.0, t_last, frames, dtype=torch.float64)
    return torch.cat((torch.zeros(1, dtype=torch.float64),
                      torch.logspace(math.log10(t_last) - 3, math.log10(t_last), frames - 1, dtype=torch.float64)))


def _interpolate(t: torch.Tensor, Y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Y (T, ...) saved at the increasing times t, linearly interpolated at the times tau (F,)."""
    k = torch.searchsorted(t, tau).clamp(1, len(t) - 1)
    w = ((tau - t[k - 1]) / (t[k] - t[k - 1]).clamp_min(1e-300)).clamp(0, 1)
    w = w.reshape(-1, *([1] * (Y.ndim - 1)))
    return Y[k - 1] * (1 - w) + Y[k] * w


def gif_frames(res: dict, frames: int = GIF_FRAMES, spacing: str = "log") -> dict:
    """What the animation shows, computed once: the frame times, the tokens' 2-D positions at
    every saved time (trails) and at every frame (both radially log-compressed, in the plane for
    d ≤ 2, else in a fixed PCA projection of the whole trajectory) and the fixed axis limits."""
    tr, Y = res["traj"], res["Y"]
    t = tr.t
    if Y.shape[-1] == 1:
        P = None
        project = lambda X: torch.cat((X, torch.zeros_like(X)), -1)   # noqa: E731
    else:
        P = torch.eye(2, dtype=Y.dtype) if Y.shape[-1] == 2 else _pca(Y, 2)
        project = lambda X: X @ P                                       # noqa: E731
    tau = frame_times(float(t[-1]), frames, spacing)
    trail = _compress(project(Y))                                       # (T, n, 2)
    pos = _compress(project(_interpolate(t, Y, tau)))                   # (F, n, 2)
    both = torch.cat((trail.reshape(-1, 2), pos.reshape(-1, 2)))
    lo, hi = both.amin(0), both.amax(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2 * 1.08 + 1e-9
    limits = [(float(centre[0]) - half, float(centre[0]) + half), (float(centre[1]) - half, float(centre[1]) + half)]
    return {"t": t.numpy(), "tau": tau.numpy(), "trail": trail.numpy(), "pos": pos.numpy(),
            "limits": limits, "pca": Y.shape[-1] > 2}


def gif_writer(res: dict, title: str, frames: int = GIF_FRAMES, spacing: str = "log", fps: int = GIF_FPS,
               dpi: int = 72):
    """write(tmp): draws the animation of `res` and saves it as a GIF at tmp, for
    training.atomic_write / atomic_write_all (PillowWriter takes the image format from the file
    name, so it writes to tmp + ".gif" and renames that onto tmp; nothing is left if it fails)."""
    PillowWriter = _pillow_writer()
    import matplotlib.patches
    plt = _plt()
    G = gif_frames(res, frames, spacing)
    n = G["pos"].shape[1]
    colours = token_colours(n)
    fig, ax = plt.subplots(figsize=(5.0, 4.4))
    ax.set_xlim(*G["limits"][0])
    ax.set_ylim(*G["limits"][1])
    ax.set_aspect("equal")
    ax.set_autoscale_on(False)
    # no tick numbers (a log-compressed coordinate reads badly, and text is most of the drawing
    # time of a frame): rings at ‖y‖ = 10^k say the scale instead
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set(xlabel=("fixed PCA plane of y" if G["pca"] else "the plane of y") + ", radially log-compressed")
    (x0, x1), (y0, y1) = G["limits"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    phi = math.atan2(cy, cx) if math.hypot(cx, cy) > 0.05 * (x1 - x0) else math.pi / 4
    inside = lambda x, y: x0 < x < x1 and y0 < y < y1                  # noqa: E731
    if inside(0.0, 0.0):
        ax.plot([0], [0], marker="+", color="0.5", ms=6, lw=0)          # the origin y = 0
    # rings ‖y‖ = 10^k inside the tokens' reach, outermost first, at least 15% of the box apart
    reach = 1.05 * float(max((G["trail"] ** 2).sum(-1).max(), (G["pos"] ** 2).sum(-1).max())) ** 0.5
    placed = []
    for k in range(8, -3, -1):
        r = math.log1p(10.0 ** k)
        lx, ly = r * math.cos(phi), r * math.sin(phi)                   # label towards the tokens
        if (len(placed) == 4 or r > reach or r < 0.08 * (x1 - x0) or not inside(lx, ly)
                or any(abs(r - q) < 0.15 * (x1 - x0) for q in placed)):
            continue
        placed.append(r)
        ax.add_patch(matplotlib.patches.Circle((0, 0), r, fill=False, lw=0.5, ls=":", color="0.6"))
        ax.text(lx, ly, f"‖y‖=10{_SUP[k]}" if k in _SUP else f"‖y‖={10 ** k:g}", fontsize=7, color="0.45",
                ha="center", va="center", bbox={"fc": "white", "ec": "none", "pad": 0.5, "alpha": 0.8})
    trails = [ax.plot([], [], lw=0.8, color=colours[i], alpha=0.6)[0] for i in range(n)]
    dots = ax.scatter(G["pos"][0, :, 0], G["pos"][0, :, 1], s=28, color=colours, zorder=3)
    ax.scatter(G["trail"][0, :, 0], G["trail"][0, :, 1], s=10, marker="o", facecolors="none",
               edgecolors=colours, lw=0.6, zorder=2)                   # where each token started
    _colourbar(fig, ax, n, shrink=0.85)
    head = ax.set_title(f"{title}\nt = {G['tau'][-1]:.3g}")                 # sized for the layout
    fig.tight_layout()
    fig.set_layout_engine(None)        # laid out once: no layout draw before every frame's savefig

    def draw(f):
        k = int((G["t"] <= G["tau"][f]).sum())
        for i, line in enumerate(trails):
            line.set_data(list(G["trail"][:k, i, 0]) + [G["pos"][f, i, 0]],
                          list(G["trail"][:k, i, 1]) + [G["pos"][f, i, 1]])
        dots.set_offsets(G["pos"][f])
        head.set_text(f"{title}\nt = {G['tau'][f]:.3g}")

    def write(tmp):
        # PillowWriter directly, one figure draw per frame (FuncAnimation.save draws each frame
        # three times: its own draw, draw_idle, then the writer's savefig)
        gif = Path(f"{tmp}.gif")
        try:
            writer = PillowWriter(fps=fps)
            with writer.saving(fig, str(gif), dpi):
                for f in range(len(G["tau"])):
                    draw(f)
                    writer.grab_frame()
            os.replace(gif, tmp)
        finally:
            plt.close(fig)
            if gif.exists():
                gif.unlink()
    return write


def _write_outputs(a, res) -> None:
    plt = _plt()
    tr = res["traj"]
    t = tr.t.numpy()
    # the files are written together at the end, all or none (training.atomic_write_all): a disk
    # that fills up leaves neither a temporary file nor a new figure beside an old summary
    outputs = {}

    def save(fig, name):
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        plt.close(fig)
        outputs[os.path.join(a.out, name)] = lambda tmp, data=buf.getvalue(): Path(tmp).write_bytes(data)

    title = _title(a.regime, a.pe, a.lam)
    save(trajectory_figure(res, title), "trajectories.png")

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
    if a.gif:
        outputs[os.path.join(a.out, "tokens.gif")] = gif_writer(res, title, a.frames, a.frame_times)
    training.atomic_write_all(outputs)


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
