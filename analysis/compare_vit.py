"""analysis/compare_vit.py -- validation top-1 of train_vit.py with several positional encodings
after the same budget, over seeds: one training process per (PE, seed), then a table and a figure.

    python -m analysis.compare_vit --pes none,learned,sin2d,rope-axial,rope-mixed --seeds 3 --jobs 2 \\
        --eval-every 50 --eval-images 500 --out results/vit

--pes (was train_vit.py --compare; --compare is still accepted) lists the --pe values; every other
flag is train_vit.py's and is passed on to each run unchanged.  Each (PE, seed) is its own
`python train_vit.py … --pe PE --seed S --out RUNS_DIR/PE-seedS` process with one thread
(OMP_NUM_THREADS=1, analysis.experiments.run_processes), at most --jobs at once; a run folder that
already holds summary.json is kept, one with only a checkpoint is resumed.  Then the validation
top-1 of every run is tabulated (mean ± std over seeds, the first periodic evaluation reaching
95%) and drawn against the step, in --out: compare.csv, compare.md, compare.png.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import train_vit
import training
from analysis.experiments import run_processes

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)
SCRIPT = Path(train_vit.__file__).resolve()            # train_vit.py, run as a script
OWN_FLAGS = {"--pes": 1, "--compare": 1, "--seeds": 1, "--jobs": 1, "--out": 1, "--runs-dir": 1}


def build_parser() -> training.ArgParser:
    p = train_vit.build_parser()
    p.description = ("Train one train_vit.py run per PE and seed, as separate processes, and tabulate "
                     "their validation top-1 (compare.csv / .md / .png in --out).  Other flags go to every run.")
    a = p.add_argument
    a("--pes", "--compare", dest="pes", metavar="PES", required=True,
      help="comma-separated --pe values, one run per PE and seed (train_vit.py --compare before; "
           "--compare is accepted as another name)")
    a("--seeds", type=int, default=3, help="seeds 0 … N−1 per PE")
    a("--jobs", type=int, default=2, help="processes at once (each with 1 thread)")
    a("--runs-dir", help="where the run folders are kept (default runs/compare-<name of --out>); "
      "finished runs found there are reused")
    return p


def _strip(argv: list, flags: dict) -> list:
    """argv without the given flags (flag → number of values it takes)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in flags:
            i += 1 + (flags[name] if "=" not in a else 0)
            continue
        out.append(a)
        i += 1
    return out


def compare(args, argv: list) -> int:
    """Run the missing (PE, seed) runs, then write compare.csv, compare.md and compare.png to --out."""
    pes = [p.strip() for p in args.pes.split(",") if p.strip()]
    for pe in pes:
        if pe not in train_vit.PES:
            raise ValueError(f"unknown PE {pe!r} in --pes: choose from {', '.join(train_vit.PES)}")
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError("--seeds and --jobs must be at least 1")
    out = Path(args.out or ROOT / "runs" / f"compare-vit-{time.strftime('%Y%m%d-%H%M%S')}")
    runs_dir = Path(args.runs_dir or ROOT / "runs" / f"compare-{out.name}")
    base = _strip(list(argv), {**OWN_FLAGS, "--pe": 1, "--seed": 1})
    jobs = [(pe, s) for s in range(args.seeds) for pe in pes]
    todo = []
    for pe, s in jobs:
        rdir = runs_dir / f"{pe}-seed{s}"
        if (rdir / "summary.json").exists():        # done in an earlier call: keep it
            continue
        todo.append(([sys.executable, str(SCRIPT), *base, "--pe", pe, "--seed", str(s),
                      "--out", str(rdir)] + (["--resume", str(rdir)] if (rdir / "ckpt.pt").exists() else []),
                     rdir / "stdout.txt"))
    failed = run_processes(todo, args.jobs, desc="compare runs")
    if failed:
        raise ValueError(f"{len(failed)} comparison run(s) failed: {failed[0]}")
    rows, curves = [], {}
    for pe, s in jobs:
        rdir = runs_dir / f"{pe}-seed{s}"
        summ = json.loads((rdir / "summary.json").read_text())
        cfg = json.loads((rdir / "config.json").read_text())
        rows.append({"pe": pe, "seed": s, "steps": summ["step"], "top1": summ["val"]["top1"],
                     "val_loss": summ["val"]["loss"], "wall_s": round(summ["wall_s"], 1),
                     "params": summ["params"], "data": cfg["data"]})
        curves[(pe, s)] = [(r["step"], r["value"]) for r in training.RunDir(rdir).read()
                           if r["split"] == "val" and r["metric"] == "top1"]
    training.write_csv(out / "compare.csv", rows)
    cfg0 = json.loads((runs_dir / f"{pes[0]}-seed0" / "config.json").read_text())
    lines = ["| --pe | top-1 (%) mean ± std | top-1 per seed | first evaluation ≥ 95% (step, per seed) "
             "| wall s / run | parameters |", "|---|---|---|---|---|---|"]
    for pe in pes:
        v = np.array([r["top1"] for r in rows if r["pe"] == pe])
        w = np.mean([r["wall_s"] for r in rows if r["pe"] == pe])
        n_p = next(r["params"] for r in rows if r["pe"] == pe)
        # learning speed: the first periodic evaluation that reaches 95% ("–": none did)
        hit = [next((str(st) for st, v95 in curves[(pe, s)] if v95 >= 95.0), "–") for s in range(args.seeds)]
        lines.append(f"| {pe} | {v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in v)} | {', '.join(hit)} | {w:.0f} | {n_p:,} |")
    chance = 100.0 / cfg0["n_classes"]
    md = "\n".join(lines) + (f"\n\n{cfg0['data']}, {cfg0['steps']} steps of batch {cfg0['batch_size']}, "
                             f"{cfg0['n_layers']} × {cfg0['d_model']} ({cfg0['n_heads']} heads), "
                             f"patch {cfg0['patch_size']} of {cfg0['image_size']} px, pool {cfg0['pool']}; "
                             f"final top-1 over the whole validation split, periodic evaluations every "
                             f"{cfg0['eval_every']} steps on {cfg0['eval_images'] or 'all'} images; chance "
                             f"{chance:.0f}%.  Wall-clock: one thread per run, {args.jobs} runs at once "
                             f"(indicative only on a shared machine).\n")
    training.atomic_write(out / "compare.md", lambda tmp: tmp.write_text(md))
    _figure(out / "compare.png", pes, rows, curves, args.seeds, chance, cfg0)
    print(md)
    print(f"(written to {out}/compare.csv, compare.md, compare.png)")
    return 0


def _figure(path: Path, pes: list, rows: list, curves: dict, seeds: int, chance: float, cfg0: dict) -> None:
    """Left: validation top-1 against the step, every seed; right: final top-1, mean bar and seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, pe in enumerate(pes):
        col = f"C{i}"
        for s in range(seeds):
            pts = curves[(pe, s)]
            if pts:
                ax[0].plot(*zip(*pts), "o-", color=col, ms=3, alpha=0.8, label=pe if s == 0 else None)
        v = [r["top1"] for r in rows if r["pe"] == pe]
        ax[1].bar(i, np.mean(v), color=col, alpha=0.6)
        ax[1].plot([i] * len(v), v, "k.", ms=6)
    for a in ax:
        a.axhline(chance, color="gray", ls=":", lw=1)
        a.grid(alpha=0.3)
    ax[0].set(xlabel="optimiser step", ylabel="validation top-1 (%)", title="every seed")
    ax[0].legend(fontsize=8)
    ax[1].set_xticks(range(len(pes)), pes)
    ax[1].set(ylabel="final validation top-1 (%)", title=f"mean and seeds (dotted: chance {chance:.0f}%)")
    fig.suptitle(f"{cfg0['data']}: --pe after {cfg0['steps']} steps", fontsize=10)
    fig.tight_layout()
    training.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    return compare(build_parser().parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
