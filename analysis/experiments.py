"""analysis/experiments.py — every experiment behind this project's results, at one budget, resumable.

    python -m analysis.experiments                 # --budget cpu-small: everything, on all CPU cores
    python -m analysis.experiments --budget gpu    # the same at GPU scale, runs one after another
    python -m analysis.experiments --only lm-regimes,agreement --jobs 2
    python -m analysis.experiments --enwiki PATH   # ... with lm-pe-enwiki on the enwiki sample at PATH
    python -m analysis.experiments --list          # what each experiment runs, and what is done
    python -m analysis.experiments --report        # only rebuild results/README.md from results/

Run from the project folder. Experiments (each training run is its own process,
`python train_lm.py …` etc., with one thread):

    lm-regimes     constrained attention, free vs divergent (PD) / intermediate (HD) / convergent (ND):
                   validation bpb and the per-layer token probe               → results/lm/regimes*
    lm-pe          none / sin / learned / rope, rope + λ −0.1, rope + softplus λ +0.05, learned + λ −0.1
                   on the embedded corpus                                      → results/lm/pe*
    lm-pe-enwiki   the same on the enwiki sample given with --enwiki PATH (enwiki-sample.xml.bz2;
                   skipped without it)                                         → results/lm/pe-enwiki*
    vit-pe         none / learned / sin2d / rope-axial / rope-mixed and three λ variants on the
                   embedded `shapes` images                                    → results/vit/pe-lam*
    agreement      python -m analysis.agreement --instances N for each seed, then mean ± std
                                                                               → results/core/agreement*
    pretrained     python -m analysis.reports --model minilm,smollm2 (needs requirements-extra.txt)
                                                                               → results/pretrained
    spectral       python -m spectral.decomposition, and python -m spectral.tasks table (Task 1 /
                   Task 2 × 9 PEs × seeds, with the per-head ablation grids)  → results/spectral
    speed          python -m analysis.bench (--suite on CPU)                   → results/speed

Resuming: a training run counts as done when its folder under results/ (or under --runs) holds a
summary.json whose config.json matches what this budget would run; anything else is (re)run, a
half-finished run continuing from its checkpoint. A one-shot step (agreement, pretrained, spectral,
speed) is done when `results/experiments-state.json` records it with the same settings: each
command's arguments after its module name, so renaming a program reruns nothing. Nothing else
is remembered, so deleting a result folder reruns exactly that. A second runner on the same results/ is refused
while the first is alive (results/.experiments.lock).

Claims: results/README.md gets one line per claim of the two papers (docs/dynamics.md,
docs/spectral.md), each "supported", "not supported" or "not resolved at this scale", with the
numbers it rests on. The rule for two means: resolved when they differ by more than twice the
standard error of the difference, √(s₁²/n₁ + s₂²/n₂), over seeds.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import train_lm
import train_vit
import training
from spectral import tasks as stt

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)
PY = sys.executable
SCRIPTS = {"train_lm.py": train_lm, "train_vit.py": train_vit}

# ------------------------------------------------------------------------------------------------
# 1. What runs: experiments, their variants, and the budgets
# ------------------------------------------------------------------------------------------------
LM_REGIMES = {r: ["--pe", "learned", "--regime", r] for r in ("free", "divergent", "intermediate", "convergent")}
LM_PE = {"none": ["--pe", "none"], "sin": ["--pe", "sin"], "learned": ["--pe", "learned"],
         "rope": ["--pe", "rope"],
         "rope-lam-0.1": ["--pe", "rope", "--lam", "-0.1"],                        # the seed's sign
         "rope-lam+0.05-softplus": ["--pe", "rope", "--lam", "0.05", "--lam-mode", "softplus-diag"],  # the authors'
         "learned-lam-0.1": ["--pe", "learned", "--lam", "-0.1"]}
VIT_PE = {"none": ["--pe", "none"], "learned": ["--pe", "learned"], "sin2d": ["--pe", "sin2d"],
          "rope-axial": ["--pe", "rope-axial"], "rope-mixed": ["--pe", "rope-mixed"],
          "rope-axial-lam-0.1": ["--pe", "rope-axial", "--lam", "-0.1"],
          "rope-axial-lam+0.05-softplus": ["--pe", "rope-axial", "--lam", "0.05", "--lam-mode", "softplus-diag"],
          "learned-lam-0.1": ["--pe", "learned", "--lam", "-0.1"]}
SPECTRAL_PES = "none,sin,learned,t5,alibi,rope,rope-partial:1,sin+rope,mla"
# The pretrained token probe has no seed: its randomness is the text. Seed 0 is analysis.reports'
# own paragraph; seeds 1, 2 are these two, of the same length and register.
PROBE_TEXTS = {
    1: ("The market opens before sunrise, when the first carts arrive from the farms outside the town. "
        "Traders set out baskets of apples, bread still warm from the oven and bolts of bright cloth. By "
        "noon the square is full of voices: children chase each other between the stalls, an old man "
        "sells honey from his own bees, and a musician plays near the fountain. In the evening the stalls "
        "are folded away, the stones are swept clean and the square grows quiet until the next morning."),
    2: ("A small boat left the harbour at dawn with three fishermen on board. The sea was calm at first, "
        "but clouds gathered in the west and the wind began to rise. They pulled in their nets, full of "
        "silver fish, and turned back towards the coast. Waves broke over the bow as they passed the "
        "lighthouse, and their families waited on the pier with lamps. When the boat finally touched the "
        "stones, everyone helped to carry the catch up to the village."),
}

BUDGETS = {
    # for the tests: seconds, two seeds, nothing downloaded or pretrained
    "smoke": dict(seeds=2, jobs=2, lm=["--steps", "3", "--eval-every", "0", "--probe-batch", "2", "--d-model", "32",
                                        "--n-layers", "2", "--n-heads", "2"],
                  vit=["--steps", "3", "--eval-images", "64", "--probe-batch", "2"], agreement=20,
                  spectral=["--preset", "tiny", "--seeds", "0,1", "--pes", "none,rope"], device="cpu",
                  speed=None),
    # a laptop: ~3 CPU-hours in all, 400-step language models, 1,000-step ViTs (see README)
    "cpu-small": dict(seeds=3, jobs=None, lm=["--steps", "400", "--eval-every", "0"], vit=[],
                      agreement=1000, spectral=["--preset", "small", "--seeds", "0,1,2", "--pes", SPECTRAL_PES],
                      device="cpu", speed=["--suite"]),
    # one GPU: a 6 × 256 language model for 3,000 steps, 4,000-step ViTs, the Spectral paper's model
    "gpu": dict(seeds=3, jobs=1, lm=["--d-model", "256", "--n-layers", "6", "--n-heads", "8", "--seq-len", "256",
                                     "--steps", "3000", "--eval-every", "0", "--device", "cuda"],
                vit=["--steps", "4000", "--device", "cuda"], agreement=10000,
                spectral=["--preset", "medium", "--seeds", "0,1,2", "--pes", SPECTRAL_PES, "--device", "cuda"],
                device="cuda", speed=["--device", "cuda"]),
}
TRAINING = {  # experiment → (script, variants, budget key, results sub-folder, corpus flags)
    "lm-regimes": ("train_lm.py", LM_REGIMES, "lm", "lm/regimes", []),
    "lm-pe": ("train_lm.py", LM_PE, "lm", "lm/pe", []),
    "lm-pe-enwiki": ("train_lm.py", LM_PE, "lm", "lm/pe-enwiki", ["--data", "ENWIKI"]),
    "vit-pe": ("train_vit.py", VIT_PE, "vit", "vit/pe-lam", []),
}
ONE_SHOT = ("agreement", "pretrained", "spectral", "speed")
EXPERIMENTS = tuple(TRAINING) + ONE_SHOT
KEEP = ("config.json", "summary.json", "probe.csv", "metrics.csv")       # small files kept in results/


def mean_std(v: list) -> tuple[float, float]:
    return (st.mean(v), st.stdev(v) if len(v) > 1 else 0.0) if v else (math.nan, math.nan)


def fmt(v: list, digits: int = 3) -> str:
    m, s = mean_std(v)
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(v) > 1 else f"{m:.{digits}f}"


# ------------------------------------------------------------------------------------------------
# 2. Training experiments: plan, run, keep, tabulate
# ------------------------------------------------------------------------------------------------
def _expected_config(script: str, argv: list) -> dict:
    """The config the script would resolve from argv (its own parser and resolve_config)."""
    mod = SCRIPTS[script]
    return mod.resolve_config(mod.build_parser().parse_args(argv))


def _made_with(folder: Path, expected: dict) -> bool:
    """folder's config.json has every setting of `expected` (data compared by file name)."""
    try:
        got = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for k, v in expected.items():
        g = got.get(k)
        if k == "data":
            v, g = Path(str(v)).name, Path(str(g)).name
        if g != v and not (isinstance(v, float) and isinstance(g, (int, float)) and math.isclose(v, g)):
            return False
    return True


def _matches(folder: Path, expected: dict) -> bool:
    """folder holds a finished run (summary.json) made with `expected`."""
    return (folder / "summary.json").exists() and _made_with(folder, expected)


def plan_training(exp: str, budget: str, results: Path, runs: Path, enwiki: Path | None) -> tuple[list, list]:
    """(all (variant, seed, kept folder) rows, jobs still to run as (argv, log, run folder, kept folder));
    argv None: finished under runs/, only to be kept. Reads only: changes nothing on disk."""
    script, variants, key, sub, corpus = TRAINING[exp]
    b = BUDGETS[budget]
    corpus = [str(enwiki) if c == "ENWIKI" else c for c in corpus]
    rows, jobs = [], []
    for seed in range(b["seeds"]):
        for name, flags in variants.items():
            argv = [*corpus, *flags, *b[key], "--seed", str(seed)]
            kept, run = results / sub / f"{name}-s{seed}", runs / exp / f"{name}-s{seed}"
            rows.append((name, seed, kept))
            expected = _expected_config(script, argv)
            if _matches(kept, expected):
                continue
            if _matches(run, expected):
                jobs.append((None, None, run, kept))                  # finished earlier: only keep it
                continue
            # half-finished with these settings: continue it from its checkpoint
            resume = ["--resume", str(run)] if (run / "ckpt.pt").exists() and _made_with(run, expected) else []
            jobs.append(([PY, str(ROOT / script), *argv, "--out", str(run), *resume], run.with_suffix(".log"), run, kept))
    return rows, jobs


def enwiki_missing(exp: str, enwiki: Path | None) -> str | None:
    """Why `exp` cannot run for want of the enwiki sample (one sentence), or None."""
    if exp != "lm-pe-enwiki" or (enwiki is not None and enwiki.exists()):
        return None
    if enwiki is None:
        return "lm-pe-enwiki: no enwiki sample given; skipped (give its path with --enwiki)."
    return f"lm-pe-enwiki: {enwiki} not found; skipped (give its path with --enwiki)."


def run_training(exp: str, budget: str, results: Path, runs: Path, n_jobs: int, enwiki: Path | None) -> None:
    missing = enwiki_missing(exp, enwiki)
    if missing:
        print(missing, file=sys.stderr)
        return
    rows, jobs = plan_training(exp, budget, results, runs, enwiki)
    todo = [(argv, log) for argv, log, _, _ in jobs if argv is not None]
    for argv, _, run, _ in jobs:                     # (planning never deletes: --list must be harmless)
        if argv is not None and "--resume" not in argv and run.exists():
            shutil.rmtree(run)                       # an unfinished run without a checkpoint, or other settings
    print(f"{exp}: {len(rows)} runs, {len(rows) - len(jobs)} already in {results}, {len(todo)} to run", flush=True)
    failed = run_processes(todo, n_jobs, desc=exp)
    if failed:
        raise RuntimeError(f"{exp}: {len(failed)} run(s) failed; the first: {failed[0]}")
    for _, _, run, kept in jobs:                                      # keep the small files in results/
        kept.mkdir(parents=True, exist_ok=True)
        for f in KEEP:
            if (run / f).exists():
                shutil.copy2(run / f, kept / f)
    tabulate(exp, rows, results)


def _probe_last(kept: Path) -> dict:
    """Mean pairwise cosine and token norm / input norm after the last layer, full and attention-only."""
    path = kept / "probe.csv"
    if not path.exists():
        return {}
    rows = list(csv.DictReader(open(path)))
    out = {}
    for mode in ("full", "attention-only"):
        rs = [r for r in rows if r["mode"] == mode]
        if not rs:
            continue
        last = max(int(r["layer"]) for r in rs)
        val = {(int(r["layer"]), r["metric"]): float(r["mean"]) for r in rs}
        out[mode] = {"cosine": val[(last, "cosine")],
                     "norm_ratio": val[(last, "norm")] / val[(0, "norm")],
                     "norm_by_layer": [val[(layer, "norm")] / val[(0, "norm")] for layer in range(last + 1)]}
    return out


def collect(exp: str, rows: list) -> dict:
    """variant → {metric: [value per seed]} from the kept folders."""
    lm = TRAINING[exp][0] == "train_lm.py"
    data: dict = {}
    for name, seed, kept in rows:
        s = json.loads((kept / "summary.json").read_text())
        d = data.setdefault(name, {"seed": [], "val": [], "test": [], "wall_s": []})
        d["seed"].append(seed)
        d["wall_s"].append(s["wall_s"])
        if lm:
            d["val"].append(s["val"][s["metric"]])
            d["test"].append(s["test"][s["metric"]])
            d["metric"] = s["metric"]
        else:
            d["val"].append(s["val"]["loss"])
            d.setdefault("top1", []).append(s["val"]["top1"])
            hits = [int(r["step"]) for r in csv.DictReader(open(kept / "metrics.csv"))
                    if r["split"] == "val" and r["metric"] == "top1" and float(r["value"]) >= 95.0]
            d.setdefault("step95", []).append(min(hits) if hits else None)
        if s.get("lam"):
            lam = list(_flat(s["lam"]))                               # learned λ (or softplus diagonal) values
            if lam:
                d.setdefault("lam_mean", []).append(st.mean(lam))
        for mode, p in _probe_last(kept).items():
            for k in ("cosine", "norm_ratio"):
                d.setdefault(f"{k} {mode}", []).append(p[k])
            d.setdefault(f"norm_by_layer {mode}", []).append(p["norm_by_layer"])
    return data


def _flat(x):
    """The numbers in a nested list (per layer, per head, per coordinate); None skipped."""
    if isinstance(x, list):
        for y in x:
            yield from _flat(y)
    elif x is not None:
        yield float(x)


def tabulate(exp: str, rows: list, results: Path) -> None:
    """results/<sub>.md / .csv / .png and results/summary/<exp>.json (what the claims read)."""
    data = collect(exp, rows)
    sub = TRAINING[exp][3]
    lm = TRAINING[exp][0] == "train_lm.py"
    metric = next(iter(data.values())).get("metric", "bpb") if lm else "loss"
    if lm:
        head = (f"| variant | seeds | validation {metric} | test {metric} | cosine, last block (full) | "
                "cosine, last update (attention-only) | norm last/input (full) | norm last/input (attention-only) | s / run |")
        keys = ("val", "test", "cosine full", "cosine attention-only", "norm_ratio full", "norm_ratio attention-only")
    else:
        head = ("| variant | seeds | top-1 (%) | validation loss | first evaluation ≥ 95% (step, per seed) | "
                "cosine, last block (full) | norm last/input (full) | s / run |")
        keys = ("top1", "val", "step95", "cosine full", "norm_ratio full")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    table = []
    for name, d in data.items():
        cells = []
        for k in keys:
            if k == "step95":
                cells.append(", ".join("—" if v is None else str(v) for v in d[k]))
            else:
                cells.append(fmt(d[k], 2 if k == "top1" else 4 if k in ("val", "test") else 3) if d.get(k) else "—")
        lines.append(f"| {name} | {len(d['seed'])} | " + " | ".join(cells) + f" | {st.mean(d['wall_s']):.0f} |")
        table.append({"variant": name, "seeds": len(d["seed"]),
                      **{k: mean_std(d[k])[0] for k in keys if k != "step95" and d.get(k)},
                      **{f"{k}_std": mean_std(d[k])[1] for k in keys if k != "step95" and d.get(k)}})
    out = results / sub
    text = "\n".join(lines) + "\n"
    _write(out.with_suffix(".md"), text)
    training.write_csv(out.with_suffix(".csv"), table,
                       sorted({k for r in table for k in r}, key=lambda k: (k != "variant", k)))
    _write((results / "summary" / exp).with_suffix(".json"),
           json.dumps({k: {m: v for m, v in d.items() if not m.startswith("norm_by_layer")} for k, d in data.items()},
                      indent=1))
    plot(exp, data, out.with_suffix(".png"), lm, metric)
    print(text)


def plot(exp: str, data: dict, path: Path, lm: bool, metric: str) -> None:
    """Left: the headline metric per variant (mean ± std over seeds). Right: the token norm through
    depth relative to the input, attention-only updates (LM) or full blocks (ViT), mean over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(data)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    key = "val" if lm else "top1"
    m = [mean_std(data[n][key])[0] for n in names]
    s = [mean_std(data[n][key])[1] for n in names]
    a.bar(range(len(names)), m, yerr=s, capsize=4, color="tab:blue", alpha=0.8)
    a.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    a.set_ylabel(f"validation {metric}" if lm else "validation top-1 (%)")
    if lm:
        a.set_ylim(min(m) - 3 * max(s + [0.01]) - 0.05, max(m) + 3 * max(s + [0.01]) + 0.05)
    a.set_title(f"{exp}: mean ± std over seeds")
    mode = "attention-only" if lm else "full"
    for n in names:
        curves = data[n].get(f"norm_by_layer {mode}")
        if curves:
            b.plot(np.mean(np.array(curves), axis=0), marker="o", label=n)
    b.set_yscale("log")
    b.set_xlabel("layer (0 = input)")
    b.set_ylabel("mean token norm / input norm")
    b.set_title(f"token probe ({mode})")
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 3. One-shot steps: agreement, pretrained, spectral, speed
# ------------------------------------------------------------------------------------------------
def _rel(path: Path) -> Path:
    """path relative to the project when inside it (the tools record their --out in their outputs)."""
    try:
        return path.resolve().relative_to(ROOT)
    except ValueError:
        return path


def one_shot_commands(step: str, budget: str, results: Path, runs: Path, n_jobs: int) -> list:
    """The commands of a one-shot step, each `[python, "-m", module, *arguments]` (empty: skipped at
    this budget); run from the project folder."""
    b = BUDGETS[budget]
    results, runs = _rel(results), _rel(runs)
    if step == "agreement":
        return [[PY, "-m", "analysis.agreement", "--instances", str(b["agreement"]), "--seed", str(s),
                 "--out", str(results / "core" / f"agreement-seed{s}")] for s in range(b["seeds"])]
    if step == "pretrained":
        if budget == "smoke":
            return []
        return [[PY, "-m", "analysis.reports", "--model", "minilm,smollm2", "--out", str(results / "pretrained")]] + [
            [PY, "-m", "analysis.reports", "--model", "minilm,smollm2", "--text", PROBE_TEXTS[s],
             "--out", str(results / "pretrained" / f"text{s}")] for s in range(1, min(b["seeds"], 3))]
    if step == "spectral":
        spec = b["spectral"]
        return [[PY, "-m", "spectral.decomposition", "--out", str(results / "spectral")],
                [PY, "-m", "spectral.tasks", "table", *spec, "--workers", str(n_jobs),
                 "--cache", str(runs / "spectral"), "--out", str(results / "spectral")]]
    if step == "speed":
        return [] if b["speed"] is None else [[PY, "-m", "analysis.bench", *b["speed"], "--out", str(results / "speed")]]
    raise ValueError(step)


def settings_key(cmds: list) -> list[str]:
    """What a one-shot step's done check compares: each command's arguments after `python -m
    module` (its settings, not the program's name, so moving a program reruns nothing)."""
    return [" ".join(c[3:]) for c in cmds]


def _overrides(spec: list) -> dict:
    """The run settings a budget's spectral.tasks flags change (only --device among them)."""
    return {"device": spec[spec.index("--device") + 1]} if "--device" in spec else {}


def _seed_spectral_cache(spec: list, results: Path, cache: Path) -> int:
    """Resume the Spectral table from results/: every run stored in results/spectral/<preset>_runs.json
    is written back into the per-run cache that spectral.tasks skips (it re-checks each config)."""
    preset = spec[spec.index("--preset") + 1]
    stored = results / "spectral" / f"synthetic_{preset}_runs.json"
    if not stored.exists():
        return 0
    cache.mkdir(parents=True, exist_ok=True)
    n = 0
    for r in json.loads(stored.read_text()):
        c = r["config"]
        path = cache / stt.run_name(c["task"], c["pe"], c["preset"], c["seed"])
        # only runs made with exactly the settings this code would use (else they are run again)
        if not path.exists() and c == stt.run_config(c["task"], c["pe"], c["preset"], c["seed"], **_overrides(spec)):
            path.write_text(json.dumps(r))
            n += 1
    return n


def run_one_shot(step: str, budget: str, results: Path, runs: Path, n_jobs: int, state: dict) -> None:
    cmds = one_shot_commands(step, budget, results, runs, n_jobs)
    if not cmds:
        print(f"{step}: not part of the {budget} budget", flush=True)
        return
    key = settings_key(cmds)
    if state.get(step, {}).get("commands") == key:
        print(f"{step}: done ({state[step]['finished']}), kept", flush=True)
        return
    if step == "pretrained":
        try:
            import gguf  # noqa: F401  (the SmolLM2 GGUF reader) and safetensors (MiniLM)
            import safetensors  # noqa: F401
        except ImportError as e:
            print(f"pretrained: skipped, an optional extra is missing ({e.name}): "
                  "pip install -r requirements-extra.txt", file=sys.stderr)
            return
    if step == "spectral":
        n = _seed_spectral_cache(BUDGETS[budget]["spectral"], results, runs / "spectral")
        if n:
            print(f"spectral: {n} finished runs taken from {results / 'spectral'}", flush=True)
    t0 = time.time()
    for c in cmds:
        print(f"{step}: python {' '.join(c[1:])}", flush=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        r = subprocess.run(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = results / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"$ {' '.join(c)}\n{r.stdout}\n")
        if r.returncode != 0:
            raise RuntimeError(f"{step} failed (exit {r.returncode}); its output is in {log}")
    if step == "agreement":
        combine_agreement(results, BUDGETS[budget]["seeds"])
    state[step] = {"commands": key, "finished": time.strftime("%Y-%m-%d %H:%M"), "seconds": round(time.time() - t0, 1)}


def combine_agreement(results: Path, seeds: int) -> None:
    """results/core/agreement.md / .csv: each cell's agreement and fates, mean ± std over seeds."""
    per = [list(csv.DictReader(open(results / "core" / f"agreement-seed{s}" / "agreement.csv"))) for s in range(seeds)]
    lines = ["| regime (predicted) | A | PE | N per seed | seeds | converged | diverged | neither | agreement (%) |",
             "|---|---|---|---|---|---|---|---|---|"]
    out = []
    for i, row in enumerate(per[0]):
        cells = [p[i] for p in per]
        assert all((c["regime"], c["A"], c["pe"]) == (row["regime"], row["A"], row["pe"]) for c in cells)
        fates = {k: [float(c[k]) for c in cells] for k in ("converged", "diverged", "neither")}
        agree = [100 * float(c["agreement"]) for c in cells if c["agreement"] not in ("", "None", "nan")]
        out.append({"regime": row["regime"], "A": row["A"], "pe": row["pe"], "N": int(row["N"]), "seeds": seeds,
                    **{k: st.mean(v) for k, v in fates.items()},
                    "agreement_mean": st.mean(agree) if agree else "", "agreement_std": mean_std(agree)[1] if agree else ""})
        lines.append(f"| {row['regime']} | {row['A']} | {row['pe']} | {row['N']} | {seeds} | "
                     + " | ".join(fmt(fates[k], 1) for k in ("converged", "diverged", "neither"))
                     + f" | {fmt(agree, 1) if agree else 'no prediction'} |")
    _write(results / "core" / "agreement.md", "\n".join(lines) + "\n")
    training.write_csv(results / "core" / "agreement.csv", out)


# ------------------------------------------------------------------------------------------------
# 4. The claims: one verdict line each, from what is in results/
# ------------------------------------------------------------------------------------------------
def compare(a: list, b: list, lower_is_better: bool = True) -> tuple[str, float, float]:
    """('a better' / 'b better' / 'tie', Δ = mean(a) − mean(b), 2·SE): resolved when |Δ| > 2·SE."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    d = ma - mb
    if abs(d) <= 2 * se or d == 0:
        return "tie", d, 2 * se
    return ("a better" if (d < 0) == lower_is_better else "b better"), d, 2 * se


def _load(results: Path, exp: str) -> dict | None:
    p = results / "summary" / f"{exp}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _verdict_pair(data: dict, a: str, b: str, claim_a_better: bool, key: str = "val", lower=True) -> tuple[str, str]:
    outcome, d, two_se = compare(data[a][key], data[b][key], lower)
    g = lambda v: f"{mean_std(v)[0]:.4g} ± {mean_std(v)[1]:.2g}"              # noqa: E731
    nums = f"{a} {g(data[a][key])} vs {b} {g(data[b][key])} (Δ {d:+.3g}, 2·SE {two_se:.2g}, {len(data[a][key])} seeds)"
    if outcome == "tie":
        return "not resolved at this scale", nums
    return ("supported" if (outcome == "a better") == claim_a_better else "not supported"), nums


def claims(results: Path) -> list[tuple[str, str, str, str]]:
    """(paper, claim, verdict, evidence) for every claim whose experiment has results."""
    out = []
    ag = results / "core" / "agreement.csv"
    rows = {(r["regime"], r["A"], r["pe"]): r for r in csv.DictReader(open(ag))} if ag.exists() else {}
    if rows and "agreement_mean" in next(iter(rows.values())):          # (written by combine_agreement)
        pct = lambda k: float(rows[k]["agreement_mean"])            # noqa: E731
        sym = [pct((r, "symmetric", "none")) for r in ("convergent", "divergent")]
        gen = [pct((r, "general", "none")) for r in ("convergent", "divergent")]
        n = rows[("convergent", "symmetric", "none")]
        seeds = f"{n['N']} instances per cell × {n['seeds']} seeds"
        out.append(("dynamics", "The definiteness conditions predict the fate: W_sym ≻ 0, A_sym ≺ 0 → tokens converge "
                    "to 0; A_sym ≻ 0 → they diverge (symmetric A)",
                    "supported" if min(sym) >= 95 else "not supported",
                    f"agreement convergent {sym[0]:.1f}%, divergent {sym[1]:.1f}% ({seeds})"))
        out.append(("dynamics", "The conditions also predict the fate for a non-symmetric A (the paper's open question)",
                    "supported" if min(gen) >= 95 else "not supported",
                    f"agreement convergent {gen[0]:.1f}%, divergent {gen[1]:.1f}%"))
        ab = [pct((r, A, "abs")) - pct((r, A, "none")) for r in ("convergent", "divergent") for A in ("symmetric", "general")]
        out.append(("dynamics", "Absolute PE only shifts the equilibrium: the regime is that of no PE",
                    "supported" if max(map(abs, ab)) <= 2 else "not supported",
                    f"agreement with absolute PE minus without: {', '.join(f'{x:+.1f}' for x in ab)} points"))
        rc, rd = pct(("convergent", "symmetric", "rope")), pct(("divergent", "symmetric", "rope"))
        out.append(("dynamics", "RoPE inhibits convergence (and keeps divergence)",
                    "supported" if rc <= sym[0] - 10 and rd >= sym[1] - 1 else "not supported",
                    f"symmetric A: convergent-predicted instances converge in {rc:.1f}% with RoPE ({sym[0]:.1f}% "
                    f"without); divergent-predicted ones diverge in {rd:.1f}% ({sym[1]:.1f}% without)"))
    reg = _load(results, "lm-regimes")
    if reg and {"convergent", "divergent"} <= set(reg):
        v, nums = _verdict_pair(reg, "divergent", "convergent", True)
        out.append(("dynamics", "The convergence regime (ND) degrades performance against the divergence regime (PD)", v,
                    f"validation bpb {nums}"))
        if "norm_ratio attention-only" in reg["convergent"]:
            ratio = reg["convergent"]["norm_ratio attention-only"]
            cos = reg["convergent"]["cosine attention-only"]
            out.append(("dynamics", "In a trained convergent-regime model the tokens collapse towards 0 through depth",
                        "supported" if max(ratio) < 1 else "not supported",
                        f"attention-only updates, after the last layer: token norm / input norm {fmt(ratio)}, "
                        f"mean pairwise cosine {fmt(cos)}"))
    for exp, corpus in (("lm-pe", "embedded corpus"), ("lm-pe-enwiki", "enwiki sample")):
        pe = _load(results, exp)
        if not pe:
            continue
        v, nums = _verdict_pair(pe, "rope", "learned", True)
        out.append(("dynamics", f"RoPE beats absolute PE on a language model ({corpus})", v, f"bpb {nums}"))
        for lam, who in (("rope-lam-0.1", "λ = −0.1 (the seed's λI, negative)"),
                         ("rope-lam+0.05-softplus", "the authors' positive softplus diagonal, 0.05")):
            v, nums = _verdict_pair(pe, lam, "rope", True)
            out.append(("dynamics", f"The λ-term improves a RoPE language model: {who} ({corpus})", v, f"bpb {nums}"))
        v, nums = _verdict_pair(pe, "learned-lam-0.1", "learned", True)
        out.append(("dynamics", f"The λ-term (−0.1) improves an absolute-PE language model ({corpus})", v, f"bpb {nums}"))
    vit = _load(results, "vit-pe")
    if vit:
        for lam in ("rope-axial-lam-0.1", "rope-axial-lam+0.05-softplus"):
            v, nums = _verdict_pair(vit, lam, "rope-axial", True)
            out.append(("dynamics", f"The λ-term improves a 2-D RoPE ViT ({lam}, embedded shapes)", v, f"validation loss {nums}"))
        v, nums = _verdict_pair(vit, "learned-lam-0.1", "learned", True, key="top1", lower=False)
        out.append(("dynamics", "The λ-term (−0.1) improves a learned-PE ViT (embedded shapes)", v, f"top-1 {nums}"))
    out += _pretrained_claims(results)
    out += _spectral_claims(results)
    return out


def _pretrained_claims(results: Path) -> list:
    out = []
    found = {}
    for name in ("minilm", "smollm2"):
        p = results / "pretrained" / name / "layers.csv"
        if p.exists():
            rows = [r for r in csv.DictReader(open(p)) if r["form"] == "W" and r["head"] == "all"]
            found[name] = rows
    if found:
        conv = {n: sum(r["regime"] == "convergent" for r in rs) for n, rs in found.items()}
        definite = {n: sum(r["W_sym"] != "indefinite" for r in rs) for n, rs in found.items()}
        out.append(("dynamics", "Pretrained models avoid the convergence regime",
                    "supported" if not any(conv.values()) else "not supported",
                    "; ".join(f"{n}: {conv[n]} of {len(found[n])} layers convergent, {definite[n]} with a semi-definite W_sym"
                              for n in found) + " — no layer meets either sufficient condition"))
    probes = [f for f in [results / "pretrained" / "smollm2" / "probe.csv"]
              + sorted((results / "pretrained").glob("text*/smollm2/probe.csv")) if f.exists()]
    if probes:
        grow, cos = {"True": [], "False": []}, {"True": [], "False": []}
        for f in probes:
            rows = [r for r in csv.DictReader(open(f)) if r["mode"] == "attention-only"]
            for on in ("True", "False"):
                rs = sorted((r for r in rows if r["pe_active"] == on), key=lambda r: int(r["depth"]))
                # distances grow by up to ~1e70 without LayerNorm: compare orders of magnitude
                grow[on].append(math.log10(float(rs[-1]["mean_sq_distance"]) / float(rs[0]["mean_sq_distance"])))
                cos[on].append(float(rs[-1]["cosine"]))
        # separation: distances grow more AND directions stay more apart (lower cosine) with RoPE
        g = compare(grow["True"], grow["False"], lower_is_better=False)[0] if len(probes) > 1 else \
            ("a better" if grow["True"] > grow["False"] else "b better")
        c = compare(cos["True"], cos["False"])[0] if len(probes) > 1 else \
            ("a better" if cos["True"] < cos["False"] else "b better")
        verdict = ("supported" if g == c == "a better" else "not supported" if g == c == "b better"
                   else "not resolved at this scale")
        out.append(("dynamics", "RoPE keeps tokens more separated through depth (SmolLM2, attention-only updates, "
                    "RoPE on vs removed)", verdict,
                    f"log₁₀ of the mean squared distance's growth, first → last layer: {fmt(grow['True'], 1)} with "
                    f"RoPE vs {fmt(grow['False'], 1)} without; mean pairwise cosine after the last layer "
                    f"{fmt(cos['True'])} vs {fmt(cos['False'])} ({len(probes)} texts)"))
    return out


def _spectral_claims(results: Path) -> list:
    out = []
    p = results / "spectral" / "spectral_table.csv"
    if p.exists():
        rows = list(csv.DictReader(open(p)))
        holds = all(r["bound_holds"] == "True" for r in rows)
        spread = {}
        for r in rows:
            spread.setdefault(r["method"], []).append(float(r["spread"]))
        rope = [k for k in spread if "RoPE" in k or "rope" in k]
        worst_rope = max(max(spread[k]) for k in rope) if rope else math.nan
        out.append(("spectral", "Multiplicative (RoPE) coupling contracts the logit spectrum; additive biases spread it",
                    "supported" if holds and rope and worst_rope <= max(spread["A"]) + 1e-9 else "not supported",
                    f"largest spectral spread: A {max(spread['A']):.3g}, RoPE (A∘G) {worst_rope:.3g}, "
                    + ", ".join(f"{k} {max(v):.3g}" for k, v in spread.items() if k not in rope and k != "A")
                    + f"; every bound held: {holds} (our reconstruction of the bounds)"))
    tabs = sorted((results / "spectral").glob("synthetic_*_results.csv")) if (results / "spectral").exists() else []
    tab = next((t for t in tabs if "small" in t.name), tabs[0] if tabs else None)
    if tab:
        rows = {(int(r["task"]), r["pe"]): r for r in csv.DictReader(open(tab))}
        runs = json.loads(tab.with_name(tab.name.replace("_results.csv", "_runs.json")).read_text())
        acc = {}
        for r in runs:
            acc.setdefault((r["config"]["task"], r["config"]["pe"]), []).append(r["test_acc"])
        if (1, "rope") in acc:
            others = {pe: v for (t, pe), v in acc.items() if t == 1 and pe not in ("rope", "sin+rope")}
            best = max(others, key=lambda k: st.mean(others[k]))
            v, nums = _verdict_pair({"rope": {"a": acc[(1, "rope")]}, best: {"a": others[best]}}, "rope", best, True,
                                    key="a", lower=False)
            out.append(("spectral", "RoPE outperforms the other PEs on the position-sensitive task (Task 1)", v,
                        f"test accuracy (%) {nums} ({tab.name})"))
            dep = rows[(1, "rope")]
            out.append(("spectral", "RoPE concentrates positional processing in one early head (single-head deposit)",
                        "supported" if int(dep["deposit_runs"]) * 2 > int(dep["seeds"]) else "not supported",
                        f"deposit (one head's ablation costs far more than any other's) in {dep['deposit_runs']} of "
                        f"{dep['seeds']} RoPE runs; mean largest single-head drop {float(dep['top_drop_mean']):.1f} points"))
            if (1, "mla") in rows:
                m = rows[(1, "mla")]
                out.append(("spectral", "MLA's decoupled RoPE mitigates that concentration",
                            "not resolved at this scale" if int(dep["deposit_runs"]) == 0 else
                            ("supported" if int(m["deposit_runs"]) < int(dep["deposit_runs"]) else "not supported"),
                            f"deposits: MLA {m['deposit_runs']} of {m['seeds']}, RoPE {dep['deposit_runs']} of {dep['seeds']} "
                            "(nothing to mitigate where RoPE shows none)"))
            e = {pe: rows[(1, pe)] for pe in ("rope", "learned", "sin") if (1, pe) in rows}
            fast = {pe: (float(r["epochs_to_90_mean"]) if r["epochs_to_90_mean"] else math.inf, r["reached_90"]) for pe, r in e.items()}
            rope_ep = fast.get("rope", (math.inf,))[0]
            out.append(("spectral", "RoPE optimises faster (spectral contraction → better conditioning)",
                        "supported" if all(rope_ep < f[0] for k, f in fast.items() if k != "rope") else
                        "not supported" if any(rope_ep > f[0] for k, f in fast.items() if k != "rope") else
                        "not resolved at this scale",
                        "epochs to 90% test accuracy on Task 1 (mean over the seeds that reached it): "
                        + ", ".join(f"{k} {f[0]:.1f} ({f[1]} seeds)" for k, f in fast.items())))
    return out


def write_report(results: Path, budget: str, state: dict) -> None:
    lines = ["# Results", "",
             f"Made by `python -m analysis.experiments --budget {budget}` (resumable; `--report` rebuilds this page). "
             "Every table has mean ± std over seeds; the commands and settings of each run are in its "
             "`config.json`. Verdicts compare means against twice the standard error of their difference.", "",
             "## The papers' claims", "", "| paper | claim | verdict | numbers |", "|---|---|---|---|"]
    for paper, claim, verdict, nums in claims(results):
        lines.append(f"| {paper} | {claim} | **{verdict}** | {nums} |")
    lines += ["", "## Tables", ""]
    for rel, what in (("lm/regimes.md", "constrained attention (PD / HD / ND), language model"),
                      ("lm/pe.md", "positional encoding × λ, language model, embedded corpus"),
                      ("lm/pe-enwiki.md", "positional encoding × λ, language model, enwiki sample"),
                      ("vit/pe-lam.md", "positional encoding × λ, ViT, embedded shapes"),
                      ("core/agreement.md", "predicted vs simulated regime, random instances"),
                      ("pretrained/compare.md", "pretrained models: regimes and token probe"),
                      ("spectral/README.md", "the Spectral paper: bounds, task table, ablations"),
                      ("speed/bench.md", "speed against peers")):
        if (results / rel).exists():
            lines.append(f"- [{rel}]({rel}): {what}")
    sp = results / "speed" / "bench.json"
    if sp.exists():
        b = json.loads(sp.read_text())
        lines += ["", f"## Speed against peers ({b['device']}, {b['threads']} threads; `python -m analysis.bench`)", ""]
        for r in b.get("ode", []):
            lines.append(f"- {r['method']}, {r['instances']:,} instances: ours {r['ours_s']:.2f} s ({r['ours_evals']} "
                         f"evaluations) vs torchdiffeq {r['torchdiffeq_s']:.2f} s ({r['torchdiffeq_evals']}): "
                         f"**{r['speedup']:.2f}×** (torchdiffeq's time / ours)")
        for r in b.get("lm", []):
            lines.append(f"- {r['model']}: {r['tokens_per_s']:,.0f} tokens/s, **{r['ratio_to_plain']:.3f}×** the plain GPT")
        if "suite" in b:
            lines.append(f"- test suite: {b['suite']['seconds']:.0f} s wall ({b['suite']['summary']})")
        if (results / "speed" / "h100" / "README.md").exists():
            lines.append("- on an H100: [speed/h100/README.md](speed/h100/README.md)")
    if state:
        lines += ["", "## Steps and their time", "",
                  "Seconds of each one-shot step's last call (training runs reused from earlier calls "
                  "are not counted; each training run's own time is in its summary.json).", "",
                  "| step | finished | seconds |", "|---|---|---|"]
        lines += [f"| {k} | {v['finished']} | {v['seconds']} |" for k, v in state.items()]
    _write(results / "README.md", "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------
# 5. The command line
# ------------------------------------------------------------------------------------------------
def run_processes(jobs: list, n_jobs: int, desc: str = "runs") -> list[str]:
    """Run each (argv, log_path) as its own process with one thread (OMP_NUM_THREADS=1), at most
    `n_jobs` at once, stdout and stderr to log_path. Returns one line per failed job."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    todo, running, failed = list(jobs), [], []
    bar = tqdm(total=len(jobs), desc=desc, unit="run")
    while todo or running:
        while todo and len(running) < max(1, n_jobs):
            argv, log_path = todo.pop(0)
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            log = open(log_path, "w")
            running.append((argv, log_path, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(0.2)
        for item in list(running):
            argv, log_path, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(f"exit {proc.returncode}: {' '.join(map(str, argv[1:]))} (see {log_path})")
    bar.close()
    return failed


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    training.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _take_lock(results: Path) -> Path:
    """results/.experiments.lock with our pid: a second runner on the same results/ would clear
    the first one's unfinished runs, so it is refused while the first is alive."""
    lock = results / ".experiments.lock"
    results.mkdir(parents=True, exist_ok=True)
    if lock.exists():
        try:
            pid = int(lock.read_text().strip())
            os.kill(pid, 0)                               # alive? (raises if not)
        except (ValueError, OSError):
            pass                                          # stale: its runner is gone
        else:
            raise ValueError(f"another analysis.experiments (pid {pid}) is running on {results}; wait for it, "
                             f"or delete {lock} if that process is not this runner")
    lock.write_text(str(os.getpid()))
    return lock


def main(argv=None) -> int:
    p = training.ArgParser(prog="python -m analysis.experiments",
                           description="Run every experiment at one budget (resumable) and write results/.")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="cpu-small")
    p.add_argument("--only", help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--jobs", type=int, default=None, help="processes at once (default: the budget's, or every CPU core)")
    p.add_argument("--results", help="results folder (default results/, results/gpu for --budget gpu)")
    p.add_argument("--runs", help="where the full run folders go (default runs/experiments/<budget>)")
    p.add_argument("--enwiki", metavar="PATH", help="the enwiki sample (enwiki-sample.xml.bz2) for "
                   "lm-pe-enwiki; without it that experiment is skipped")
    p.add_argument("--list", action="store_true", help="print what would run and what is done, run nothing")
    p.add_argument("--report", action="store_true", help="only rebuild results/README.md")
    a = p.parse_args(argv)
    b = BUDGETS[a.budget]
    exps = [e.strip() for e in a.only.split(",")] if a.only else list(EXPERIMENTS)
    bad = [e for e in exps if e not in EXPERIMENTS]
    if bad:
        raise ValueError(f"unknown experiment {bad[0]!r}: choose from {', '.join(EXPERIMENTS)}")
    results = Path(a.results or (ROOT / "results" / ("gpu" if a.budget == "gpu" else ""))).resolve()
    if a.budget == "smoke" and not a.results:
        results = ROOT / "runs" / "experiments" / "smoke" / "results"
    runs = Path(a.runs or ROOT / "runs" / "experiments" / a.budget).resolve()
    n_jobs = a.jobs or b["jobs"] or os.cpu_count() or 1
    if n_jobs < 1:
        raise ValueError("--jobs must be at least 1")
    state_path = results / "experiments-state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    enwiki = Path(a.enwiki) if a.enwiki else None
    if a.list:
        for e in exps:
            if e in TRAINING:
                missing = enwiki_missing(e, enwiki)
                if missing:
                    print(missing)
                    continue
                rows, jobs = plan_training(e, a.budget, results, runs, enwiki)
                todo = sum(j[0] is not None for j in jobs)
                print(f"{e}: {len(rows)} runs, {len(rows) - len(jobs)} in results, {len(jobs) - todo} finished "
                      f"under {runs} (to be kept), {todo} to run")
            else:
                cmds = one_shot_commands(e, a.budget, results, runs, n_jobs)
                done = state.get(e, {}).get("commands") == settings_key(cmds)
                print(f"{e}: " + ("not part of this budget" if not cmds else "done" if done else f"{len(cmds)} command(s) to run"))
        return 0
    if not a.report:
        t0 = time.time()
        lock = _take_lock(results)
        try:
            for e in exps:
                if e in TRAINING:
                    run_training(e, a.budget, results, runs, n_jobs, enwiki)
                else:
                    run_one_shot(e, a.budget, results, runs, n_jobs, state)
                    _write(state_path, json.dumps(state, indent=1))
        except RuntimeError as err:                       # a run failed: say which, keep what is done
            print(f"error: {err}", file=sys.stderr)
            return 1
        finally:
            lock.unlink(missing_ok=True)
        print(f"all done in {time.time() - t0:.0f} s")
    write_report(results, a.budget, state)
    print(f"claims and tables: {results / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
