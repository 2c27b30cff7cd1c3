"""Phase diagrams of the attention ODE: where do convergent-predicted instances really converge?

    python -m analysis.phase --out out/phase                  # every grid, resumable per cell
    python -m analysis.phase --grid pe --part 0/2 --out DIR   # half of one grid (run two at once)
    python -m analysis.phase --jobs 2 --out DIR               # both halves, as two processes
    python -m analysis.phase --pilot                          # one cell per axis value, timed
    python -m analysis.phase --report --out DIR               # only rebuild the CSV and figures
    python -m analysis.phase --cells NAME --t-end 20000 --out DIR   # one cell, a longer horizon
    python -m analysis.phase --report --horizon 2000 --out DIR      # ... its fates at 2000 vs 20000
    python -m analysis.phase --compare REF --out DIR          # DIR's fates against REF's, per instance

Every instance is drawn convergent by construction (W_sym ≻ 0, A_sym ≺ 0: regimes.sample_instances)
and integrated to t = 2000 (default) with a step size per instance (ode_attention.integrate_each,
Dormand–Prince 5(4), rtol 1e-6, atol 1e-12). Its FATE is read off the mean token norm N(t) over the
last decade of time, [t_end/10, t_end] (the decade it reached, if it stopped early):

    converges   N fell below 1e-8 (settled at 0), or the late log–log slope d log N / d log t ≤ −0.35
                (the bidirectional law is N ∝ t^(−1/2); a causal mask gives exponential decay)
    slower      −0.35 < slope ≤ −0.05: still falling, slower than the algebraic law
    plateau     |slope| < 0.05: bounded and nonzero; ‖Ẋ‖/‖X‖ at the end tells a rest state from a drift
    grows       slope ≥ 0.05, or it blew up (a token norm > 1e6)

Grids (each cell ≥ 100 instances, 50 at n = 128, pooled over 3 sampling seeds; within one (d, n)
every PE and mask sees the same instances, so their differences are paired):

    pe     d ∈ {4, 8, 16, 32, 64} × n ∈ {8, 32, 128} × PE ∈ {none, RoPE base 10², 10⁴, 10⁶, RoPE on
           a quarter of the pairs (base 10⁴)} × mask ∈ {bidirectional, causal}
    rho    ρ = ‖A_anti‖₂/‖A_sym‖₂ ∈ {0, 0.5, 1, 2, 4} × d × mask, n = 8, no PE
    scale  initial scale X₀ ~ s·N(0, 1), s ∈ {0.5, 1, 2} × d ∈ {4, 16, 64} × PE ∈ {none, RoPE 10⁴}
           × mask, n = 8

Each cell is written to DIR/cells/<cell>.json as soon as it is done; while it runs, the integrator's
state is saved every 5 minutes to DIR/cells/.<cell>.partial.pt, so a killed run loses at most five
minutes of work and the next run goes on from there. Then DIR/phase.csv (one row per cell: counts
of each fate, the share converging with its Wilson 95% interval, the share of instances whose V is
not Hurwitz, mean ρ, median late slope and ‖Ẋ‖/‖X‖) and the figures DIR/pe.png (one panel per mask × PE, d × n, colour = share converging),
DIR/rho.png (share converging and share non-Hurwitz against ρ) and DIR/scale.png.
"""

from __future__ import annotations

import json
import math
import os
import statistics as st
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

import ode_attention as oa
import regimes
import training
from analysis import verdicts
# the fate rule and its probe live beside the integrators (train_tied.py uses them too)
from ode_attention import FATE_MAX_NORM as MAX_NORM, FATE_MIN_NORM as MIN_NORM, FATES, fate, field_fates, \
    late_slopes, log_times

DS, NS = (4, 8, 16, 32, 64), (8, 32, 128)
PES = ("none", "rope1e2", "rope1e4", "rope1e6", "rope-quarter")
MASKS = ("bidirectional", "causal")
RHOS = (0.0, 0.5, 1.0, 2.0, 4.0)
SCALES = (0.5, 1.0, 2.0)
SEEDS = (0, 1, 2)


def pe_options(pe: str, d: int) -> dict:
    """The field's options for a PE name. rope-quarter rotates ⌈d/8⌉ of the d/2 feature pairs."""
    if pe == "none":
        return {}
    if pe == "rope-quarter":
        return {"rope": True, "rope_base": 1e4, "rope_dim": 2 * max(1, round(d / 8))}
    if pe.startswith("rope"):
        return {"rope": True, "rope_base": float(pe[4:])}
    raise ValueError(f"unknown PE {pe!r}; choose one of {PES}.")


def grid_cells(grid: str) -> list[dict]:
    """Every cell of one grid, cheapest first (n, then d)."""
    if grid == "pe":
        cells = [dict(grid=grid, d=d, n=n, pe=pe, mask=m, rho=None, scale=1.0)
                 for n in NS for d in DS for pe in PES for m in MASKS]
    elif grid == "rho":
        cells = [dict(grid=grid, d=d, n=8, pe="none", mask=m, rho=r, scale=1.0)
                 for d in DS for r in RHOS for m in MASKS]
    elif grid == "scale":
        cells = [dict(grid=grid, d=d, n=8, pe=pe, mask=m, rho=None, scale=s)
                 for d in (4, 16, 64) for s in SCALES for pe in ("none", "rope1e4") for m in MASKS]
    else:
        raise ValueError(f"unknown grid {grid!r}; choose pe, rho or scale.")
    return cells


def cell_name(c: dict) -> str:
    rho = "default" if c["rho"] is None else f"{c['rho']:g}"
    return f"{c['grid']}-d{c['d']}-n{c['n']}-{c['pe']}-{c['mask']}-rho{rho}-s{c['scale']:g}"


def instances(c: dict, per_seed: int, seed: int):
    """(Q, K, V, X0) of one sampling seed of a cell. The generator depends on (seed, d, n, ρ) only,
    so every PE, mask and scale of a (d, n) sees the same instances (paired comparisons)."""
    rho_code = -1 if c["rho"] is None else int(round(100 * c["rho"]))
    g = torch.Generator().manual_seed(((seed * 1009 + c["d"]) * 1013 + c["n"]) * 1019 + rho_code + 7)
    Q, K, V = regimes.sample_instances("convergent", c["d"], per_seed, rho=c["rho"], generator=g)
    X0 = torch.randn(per_seed, c["n"], c["d"], generator=g, dtype=torch.float64)
    return Q, K, V, c["scale"] * X0


def run_cell(c: dict, n_inst: int, t_end: float, n_save: int = 61, max_steps: int = 10_000,
             partial: Path | None = None, snapshot_every_s: float = 300.0) -> dict:
    """Integrate one cell's instances (n_inst, split over SEEDS) and summarise their fates.

    partial: a file for the integrator's state, rewritten every snapshot_every_s seconds, so that a
    killed cell loses at most that much work: a later call with the same file goes on from it (to
    the same result, bit for bit; a file from another run, or unreadable, is set aside with a
    message and the cell starts afresh). The caller deletes it once the cell is written."""
    t0 = time.time()
    before, resume = 0.0, None
    if partial is not None and partial.exists():
        try:
            saved = torch.load(partial)
            resume, before = saved["state"], float(saved["seconds"])
        except Exception as e:                       # truncated or foreign file: start afresh
            tqdm.write(f"{partial.name}: cannot be read ({type(e).__name__}); the cell starts afresh")

    def snapshot(state):
        done = before + time.time() - t0
        training.atomic_write(partial, lambda tmp: torch.save({"state": state, "seconds": done}, tmp))
    per_seed = max(1, math.ceil(n_inst / len(SEEDS)))
    opts = pe_options(c["pe"], c["d"])
    if c["mask"] == "causal":
        opts["causal"] = True
    t_save = log_times(t_end, n_save)
    # the three sampling seeds' instances integrate as one batch (one step-size per instance)
    Q, K, V, X0 = (torch.cat(m) for m in zip(*(instances(c, per_seed, seed) for seed in SEEDS)))
    snap = dict(snapshot=snapshot if partial is not None else None, snapshot_every_s=snapshot_every_s)
    try:
        rec = field_fates(Q, K, V, X0, t_save, max_steps=max_steps, resume=resume, **snap, **opts)
    except oa.ResumeMismatch:
        tqdm.write(f"{partial.name}: saved for another run (other instances or settings); the cell starts afresh")
        before, t0 = 0.0, time.time()
        rec = field_fates(Q, K, V, X0, t_save, max_steps=max_steps, **snap, **opts)
    return {"cell": c, "instances": len(rec["fate"]), "t_end": t_end,
            "seconds": round(before + time.time() - t0, 2), "records": rec}


def summarise(res: dict) -> dict:
    """One CSV row per cell."""
    c, r = res["cell"], res["records"]
    n = res["instances"]
    k = {f: r["fate"].count(f) for f in FATES}
    lo, hi = verdicts.wilson(k["converges"], n)
    nonh = sum(a >= 0 for a in r["alpha_V"])
    nlo, nhi = verdicts.wilson(nonh, n)
    finite = [s for s in r["slope"] if s == s]
    # stopped on the step budget (a stiff hard-attention state), neither settled nor blown up
    unfinished = sum(t < res["t_end"] * (1 - 1e-9) and not s and not b
                     for t, s, b in zip(r["t_reached"], r["settled"], r["blown"]))
    hurwitz = [a < 0 for a in r["alpha_V"]]
    conv_h = sum(h and f == "converges" for h, f in zip(hurwitz, r["fate"]))
    grow_nh = sum(not h and f == "grows" for h, f in zip(hurwitz, r["fate"]))
    return {**{key: c[key] for key in ("grid", "d", "n", "pe", "mask")},
            "rho": "default" if c["rho"] is None else c["rho"], "scale": c["scale"], "instances": n,
            **k, "share_converges": k["converges"] / n, "converges_lo": lo, "converges_hi": hi,
            "share_not_hurwitz": nonh / n, "not_hurwitz_lo": nlo, "not_hurwitz_hi": nhi,
            "hurwitz": sum(hurwitz), "hurwitz_converges": conv_h, "not_hurwitz_grows": grow_nh,
            "mean_rho": st.mean(r["rho"]), "median_slope": st.median(finite) if finite else math.nan,
            "median_rel_speed": st.median(r["rel_speed"]), "stopped_on_budget": unfinished,
            "t_end": res["t_end"], "seconds": res["seconds"]}


def write_report(out: Path) -> list[dict]:
    """DIR/phase.csv and the figures from every finished cell in DIR/cells."""
    rows = []
    for p in sorted((out / "cells").glob("*.json")):
        rows.append(summarise(json.loads(p.read_text())))
    if not rows:
        return rows
    order = {g: i for i, g in enumerate(("pe", "rho", "scale"))}
    rows.sort(key=lambda r: (order[r["grid"]], r["mask"], r["pe"], str(r["rho"]), r["scale"], r["d"], r["n"]))
    training.write_csv(out / "phase.csv", rows)
    plot_pe(rows, out / "pe.png")
    plot_rho(rows, out / "rho.png")
    plot_scale(rows, out / "scale.png")
    return rows


def write_compare(out: Path, ref: Path) -> list[dict]:
    """DIR/compare.csv: every cell DIR and REF both hold, instance by instance (the same instances:
    cells are seeded by name). Per cell: the instances whose fate differs, how they moved (REF → DIR),
    the largest difference of late slope, and both cells' own timings. For a re-run of the grid
    with other code, on another machine or with the load gone: what changed, and what it cost."""
    rows = []
    for p in sorted((out / "cells").glob("*.json")):
        q = ref / "cells" / p.name
        if not q.exists():
            continue
        a, b = json.loads(p.read_text()), json.loads(q.read_text())
        fa, fb = a["records"]["fate"], b["records"]["fate"]
        if len(fa) != len(fb) or a["t_end"] != b["t_end"]:
            raise ValueError(f"{p.name}: {len(fa)} instances to t = {a['t_end']:g} here, {len(fb)} to "
                             f"t = {b['t_end']:g} in {ref}: not the same cell.")
        moves = Counter(f"{x}→{y}" for x, y in zip(fb, fa) if x != y)
        ds = [abs(x - y) for x, y in zip(a["records"]["slope"], b["records"]["slope"]) if x == x and y == y]
        rows.append({"cell": p.name[:-5], "n": a["cell"]["n"], "d": a["cell"]["d"], "instances": len(fa),
                     "fates_changed": sum(moves.values()),
                     "moves": "; ".join(f"{k} {v}" for k, v in sorted(moves.items())) or "none",
                     "max_slope_diff": max(ds) if ds else math.nan,
                     "seconds": a["seconds"], "ref_seconds": b["seconds"]})
    if not rows:
        raise ValueError(f"{out / 'cells'} and {ref / 'cells'} have no cell in common.")
    training.write_csv(out / "compare.csv", rows)
    return rows


def fates_at(res: dict, t_cut: float) -> list[str]:
    """Each instance's fate as if the horizon had been t_cut < t_end: the same rule (`fate`) on the
    stored norm trajectory cut at t_cut (cells written since the trajectory is kept)."""
    r = res["records"]
    if "norms" not in r:
        raise ValueError(f"cell {cell_name(res['cell'])} predates the stored trajectories: run it again.")
    t = torch.tensor(r["times"], dtype=torch.float64)
    keep = t <= t_cut * (1 + 1e-12)
    N = torch.tensor(r["norms"], dtype=torch.float64).T[keep]          # (T', B)
    reached = torch.tensor(r["t_reached"], dtype=torch.float64).clamp(max=float(t[keep][-1]))
    power, _ = late_slopes(t[keep], N, reached)
    out = []
    for b, p in enumerate(power):
        stopped = r["t_reached"][b] <= t_cut * (1 + 1e-12)             # it ended before t_cut
        out.append(fate(p, bool(r["settled"][b]) and stopped or float(N[-1, b]) < MIN_NORM,
                        bool(r["blown"][b]) and stopped))
    return out


def write_horizon(out: Path, t_cut: float) -> list[dict]:
    """DIR/horizon.csv: for every cell in DIR/cells, the fates at t_cut and at the cell's t_end,
    and how many instances moved from each fate at t_cut to each at t_end (a horizon check)."""
    rows = []
    for p in sorted((out / "cells").glob("*.json")):
        res = json.loads(p.read_text())
        if res["t_end"] <= t_cut:
            continue
        early, late = fates_at(res, t_cut), res["records"]["fate"]
        row = {"cell": cell_name(res["cell"]), "instances": res["instances"], "t_cut": t_cut, "t_end": res["t_end"]}
        row.update({f"{f}_at_cut": early.count(f) for f in FATES})
        row.update({f"{f}_at_end": late.count(f) for f in FATES})
        row["moves"] = "; ".join(f"{a}→{b} {sum(x == a and y == b for x, y in zip(early, late))}"
                                 for a in FATES for b in FATES
                                 if a != b and any(x == a and y == b for x, y in zip(early, late)))
        rows.append(row)
    if not rows:
        raise ValueError(f"no cell in {out / 'cells'} was integrated beyond t = {t_cut:g}.")
    training.write_csv(out / "horizon.csv", rows)
    return rows


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_pe(rows: list, path: Path) -> None:
    rs = [r for r in rows if r["grid"] == "pe"]
    if not rs:
        return
    plt = _plt()
    fig, axes = plt.subplots(len(MASKS), len(PES), figsize=(3.0 * len(PES), 3.1 * len(MASKS)), squeeze=False,
                             constrained_layout=True)
    for i, m in enumerate(MASKS):
        for j, pe in enumerate(PES):
            ax = axes[i][j]
            grid = [[math.nan] * len(NS) for _ in DS]
            for r in rs:
                if r["mask"] == m and r["pe"] == pe:
                    grid[DS.index(r["d"])][NS.index(r["n"])] = r["share_converges"]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", origin="lower", aspect="auto")
            for a, row in enumerate(grid):
                for b, v in enumerate(row):
                    if v == v:
                        ax.text(b, a, f"{100 * v:.0f}", ha="center", va="center",
                                color="white" if v < 0.6 else "black", fontsize=8)
            ax.set_xticks(range(len(NS)), [str(n) for n in NS])
            ax.set_yticks(range(len(DS)), [str(d) for d in DS])
            ax.set_title(f"{m}, {pe}", fontsize=9)
            if i == len(MASKS) - 1:
                ax.set_xlabel("n (tokens)")
            if j == 0:
                ax.set_ylabel("d")
    fig.colorbar(im, ax=axes, shrink=0.8, label="share converging (convergent-predicted)")
    fig.suptitle("Convergent-predicted instances that converge by t = %g" % rs[0]["t_end"])
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve(ax, rs, key, x, label, style="-", color=None):
    rs = sorted(rs, key=lambda r: r[x])
    xs = [r[x] for r in rs]
    lo, hi = key + "_lo", key + "_hi"
    ys = [r["share_converges" if key == "converges" else "share_not_hurwitz"] for r in rs]
    line, = ax.plot(xs, ys, style, marker="o", ms=3, label=label, color=color)
    ax.fill_between(xs, [r[lo] for r in rs], [r[hi] for r in rs], alpha=0.15, color=line.get_color())


def plot_rho(rows: list, path: Path) -> None:
    rs = [r for r in rows if r["grid"] == "rho"]
    if not rs:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(MASKS), figsize=(10, 3.6), squeeze=False)
    for i, m in enumerate(MASKS):
        ax = axes[0][i]
        for j, d in enumerate(DS):
            sel = [r for r in rs if r["mask"] == m and r["d"] == d]
            if sel:                                   # one colour per d: solid converges, dashed not Hurwitz
                _curve(ax, sel, "converges", "rho", f"d={d} converges", color=f"C{j}")
                _curve(ax, sel, "not_hurwitz", "rho", f"d={d} V not Hurwitz", "--", color=f"C{j}")
        ax.set_xlabel("ρ = ‖A_anti‖₂ / ‖A_sym‖₂")
        ax.set_ylabel("share (Wilson 95% band)")
        ax.set_title(f"{m}, n = 8, no PE")
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(rows: list, path: Path) -> None:
    rs = [r for r in rows if r["grid"] == "scale"]
    if not rs:
        return
    plt = _plt()
    fig, axes = plt.subplots(1, len(MASKS), figsize=(10, 3.4), squeeze=False)
    for i, m in enumerate(MASKS):
        ax = axes[0][i]
        for d in (4, 16, 64):
            for pe in ("none", "rope1e4"):
                sel = [r for r in rs if r["mask"] == m and r["d"] == d and r["pe"] == pe]
                if sel:
                    _curve(ax, sel, "converges", "scale", f"d={d} {pe}", "-" if pe == "none" else "--")
        ax.set_xlabel("initial scale s (X₀ ~ s·N(0, 1))")
        ax.set_ylabel("share converging")
        ax.set_title(f"{m}, n = 8")
        ax.set_ylim(-0.02, 1.02)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = training.ArgParser(description="Phase diagrams of the attention ODE (fates of convergent-"
                                            "predicted instances over d, n, PE, mask, ρ and initial scale).")
    p.add_argument("--grid", default="pe,rho,scale", help="comma-separated: pe, rho, scale")
    p.add_argument("--out", default="out/phase", help="output folder (cells/ inside it)")
    p.add_argument("--instances", type=int, default=102, help="instances per cell (half at n = 128)")
    p.add_argument("--t-end", type=float, default=2000.0, help="integration horizon")
    p.add_argument("--max-steps", type=int, default=10_000, help="step budget per instance")
    p.add_argument("--cells", default="",
                   help="comma-separated cell names (as in cells/*.json): run only these, e.g. a "
                        "longer --t-end for a horizon check")
    p.add_argument("--part", default="0/1", help="i/k: run every k-th cell starting at i (parallel runs)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run this many parts at once, each a single-thread process (--part i/jobs)")
    p.add_argument("--pilot", action="store_true", help="time one small cell per axis value and stop")
    p.add_argument("--report", action="store_true", help="only rebuild phase.csv and the figures")
    p.add_argument("--compare", default=None, metavar="REF",
                   help="compare --out's cells with REF's, instance by instance, into OUT/compare.csv")
    p.add_argument("--horizon", type=float, default=None, metavar="T",
                   help="with --report: also DIR/horizon.csv, each cell's fates at T against its t_end")
    a = p.parse_args(argv)
    try:
        grids = [g for g in a.grid.split(",") if g]
        # cheapest first over all the grids asked for (cost grows with n, then d), so that a run
        # stopped early has the small cells of every grid
        cells = sorted((c for g in grids for c in grid_cells(g)), key=lambda c: (c["n"], c["d"]))
        if a.cells:
            wanted = [x.strip() for x in a.cells.split(",") if x.strip()]
            names = {cell_name(c): c for c in cells}
            unknown = [x for x in wanted if x not in names]
            if unknown:
                raise ValueError(f"no cell named {unknown[0]!r} in --grid {a.grid} (names look like "
                                 f"{cell_name(cells[0])}).")
            cells = [names[x] for x in wanted]
        try:
            i, k = (int(x) for x in a.part.split("/"))
        except ValueError:
            raise ValueError(f"--part must look like i/k with 0 <= i < k, got {a.part!r}.") from None
        if not 0 <= i < k:
            raise ValueError(f"--part must look like i/k with 0 <= i < k, got {a.part!r}.")
        if a.instances < 3 or not (math.isfinite(a.t_end) and a.t_end > 1) or a.max_steps <= 0:
            raise ValueError("need --instances >= 3, a finite --t-end > 1 and --max-steps > 0.")
        out = Path(a.out)
        if a.horizon is not None and not (math.isfinite(a.horizon) and a.horizon > 0):
            raise ValueError(f"--horizon must be a positive time, got {a.horizon}.")
        if a.compare is not None:
            if not (Path(a.compare) / "cells").is_dir() or not (out / "cells").is_dir():
                raise ValueError(f"--compare needs two phase folders with cells/ inside: {a.compare} and {out}.")
            rows = write_compare(out, Path(a.compare))
            k, n = sum(r["fates_changed"] for r in rows), sum(r["instances"] for r in rows)
            s, s_ref = sum(r["seconds"] for r in rows), sum(r["ref_seconds"] for r in rows)
            print(f"{len(rows)} cells in common: {k} of {n} instances changed fate; {s / 3600:.2f} CPU-hours "
                  f"here against {s_ref / 3600:.2f} in {a.compare} → {out / 'compare.csv'}")
            return 0
        if a.report:
            rows = write_report(out)
            print(f"{len(rows)} cells → {out / 'phase.csv'}")
            if a.horizon is not None:
                for h in write_horizon(out, a.horizon):
                    print(f"{h['cell']}: at t = {h['t_cut']:g} " +
                          ", ".join(f"{f} {h[f + '_at_cut']}" for f in FATES) + f"; at t = {h['t_end']:g} " +
                          ", ".join(f"{f} {h[f + '_at_end']}" for f in FATES) + f"  ({h['moves']})")
            return 0
        if a.pilot:
            return pilot(a)
        if a.jobs < 1:
            raise ValueError(f"--jobs must be >= 1, got {a.jobs}.")
        if a.jobs > 1:
            if k != 1:
                raise ValueError("give either --jobs or --part, not both.")
            return run_parts(argv if argv is not None else sys.argv[1:], a.jobs, out)
        mine = cells[i::k]
        (out / "cells").mkdir(parents=True, exist_ok=True)
        todo = [c for c in mine if not (out / "cells" / f"{cell_name(c)}.json").exists()]
        print(f"{len(mine)} cells in this part, {len(mine) - len(todo)} already done", flush=True)
        for c in tqdm(todo, desc="phase cells"):
            n_inst = a.instances if c["n"] < 128 else max(3, a.instances // 2)
            partial = out / "cells" / f".{cell_name(c)}.partial.pt"
            res = run_cell(c, n_inst, a.t_end, max_steps=a.max_steps, partial=partial)
            path = out / "cells" / f"{cell_name(c)}.json"
            training.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(res)))
            partial.unlink(missing_ok=True)
            s = summarise(res)
            tqdm.write(f"{cell_name(c)}: converges {100 * s['share_converges']:.0f}% "
                       f"[{100 * s['converges_lo']:.0f}, {100 * s['converges_hi']:.0f}], plateau {s['plateau']}, "
                       f"grows {s['grows']}, {res['seconds']:.0f} s")
        write_report(out)
        return 0
    except (ValueError, OSError) as e:
        print(f"analysis.phase: {e}", file=sys.stderr)
        return 2


def run_parts(argv: list, jobs: int, out: Path) -> int:
    """`jobs` copies of this command, part i/jobs each, one thread each; then the report."""
    rest, skip = [], False
    for x in argv:                                           # drop --jobs N / --jobs=N
        if skip:
            skip = False
        elif x == "--jobs":
            skip = True
        elif not x.startswith("--jobs="):
            rest.append(x)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen([sys.executable, "-m", "analysis.phase", *rest, "--part", f"{i}/{jobs}"], env=env)
             for i in range(jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise ValueError(f"a part failed (exit codes {codes}); the finished cells are kept in {out / 'cells'}.")
    write_report(out)
    return 0


def pilot(a) -> int:
    """Time small cells along each axis (6 instances, the same horizon) to size the full grid."""
    base = dict(grid="pe", d=4, n=8, pe="none", mask="bidirectional", rho=None, scale=1.0)
    probes = [dict(base, d=d) for d in DS] + [dict(base, n=n) for n in NS[1:]] + \
             [dict(base, pe=pe) for pe in PES[1:]] + [dict(base, mask="causal")] + \
             [dict(base, d=64, n=128), dict(base, d=64, n=128, pe="rope1e4")]
    for c in probes:
        res = run_cell(c, 6, a.t_end, max_steps=a.max_steps)
        r = res["records"]
        print(f"{cell_name(c)}: {res['seconds']:.1f} s for 6 instances, steps median "
              f"{st.median(r['steps']):.0f} max {max(r['steps'])}, fates {r['fate']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
