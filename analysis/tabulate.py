"""analysis/tabulate.py -- your own runs in a table like results/README.md's: arms, seeds, the mean of
the final metric with its 95% t-interval, and the difference to a baseline arm.

    python -m analysis.tabulate runs/                                   # every run one or two levels down
    python -m analysis.tabulate runs/lm-* --by pe,lam --baseline pe=learned,lam=0
    python -m analysis.tabulate results/lm/pe runs/mine --split test --csv table.csv
    python -m analysis.tabulate runs/vit-* --metric loss                # a ViT's validation loss, not top-1

Arguments
---------
Each RUN_DIR is a run folder (train_lm.py / train_vit.py --out: config.json, summary.json, ...) or a
folder holding run folders, one or two levels down (runs/<run>, or runs/<experiment>/<run>).  A
folder whose config.json has no summary.json beside it is an unfinished run (still training, or
stopped: `--resume` continues it); it is listed under the table and left out of it.  Files and
folders that hold no run (the experiment runner's .log files beside its run folders) are listed
as ignored.  Only a path that does not exist, or finding no finished run at all, is an error.
A run reached twice (a folder and its parent both given) counts once, and so does a copy of a run
(same settings, seed and value: the same run kept under runs/ and under results/).

    --by KEYS         the config.json keys that make an arm, comma-separated (default: every key
                      whose value differs between the runs, except the seed and the settings a
                      resumed run may change -- evaluation, logging, checkpoint and device flags,
                      training.resume_from_run -- and except derived keys such as attn_pe that the
                      others already determine).  The runs of one arm are its seeds.
    --metric NAME     a key of summary.json's split, e.g. bpb / bpc / ppl / loss for a language
                      model, top1 / top5 / loss for a ViT (default: the run's own: config.json's
                      "metric" for train_lm, top-1 accuracy for train_vit)
    --split NAME      val (default) or test (train_vit evaluates val only)
    --baseline K=V    the arm the others are compared with, e.g. pe=learned or pe=rope,lam=0 (its
                      keys must be --by keys; a value may hold commas: cutoffs=20000,40000)
    --csv OUT.csv     also write the table as CSV (atomically, training.write_csv)

The table is printed to stdout as Markdown (the look of results/*.md); the notes under it say what
was pooled, skipped or ignored.  Nothing is ever written into a run folder (--csv inside one is
refused).  One table holds one corpus and one metric: runs on different data (config "data",
compared by file name as analysis.experiments does) or reporting different metrics are refused.
Bad input -- a missing path, no finished run, an unreadable config.json / summary.json, an unknown
--by key, a --metric or --split a run lacks, a --baseline that names no arm or several -- is one
sentence on stderr and exit code 2 (training.run_cli), never a traceback.

The statistics (analysis/verdicts.py, the project's)
---------------------------------------------------
An arm with n seeds and final values x₁..xₙ:

    x̄ = Σxᵢ / n,   s² = Σ(xᵢ − x̄)² / (n − 1),   95% CI = x̄ ± t₀.₉₇₅,ₙ₋₁ · s / √n

(verdicts.t_ppf; t₀.₉₇₅,₂ = 4.303 for 3 seeds, so the interval is wide; one seed has no interval).
Against the baseline arm b, Δ = mean(arm) − mean(b) by verdicts.compare:

    paired t  when both arms hold the same seeds (seed s of both shares data order and the
              initialisation of shared parameters): dₛ = xₛ − bₛ, Δ = mean(d), SE = sd(d)/√n, df n − 1
    Welch t   otherwise: SE = √(s_a²/n_a + s_b²/n_b), Welch–Satterthwaite df

with Δ's 95% CI Δ ± t₀.₉₇₅,df · SE and the two-sided p.  The p's are NOT adjusted for the number of
arms compared (results/README.md Holm-adjusts within a family of claims; with k arms against one
baseline, multiply by k for Bonferroni, or read the intervals).
"""
from __future__ import annotations

import difflib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import training
from analysis import verdicts

# ----------------------------------------------------------------------------------------------
# What makes an arm
# ----------------------------------------------------------------------------------------------
# Never part of the default arm: the seed (the seeds of an arm are its replicates) and what a
# resumed run may change without changing the trajectory (training.resume_from_run: evaluation,
# logging, checkpoint and device flags; the paths are not in config.json but are listed in case).
NOT_ARM = ("seed", "eval_every", "eval_tokens", "eval_images", "log_every", "ckpt_every", "probe_batch",
           "device", "no_compile", "no_amp", "workers", "out", "resume", "cache_dir")
# Written by the scripts after the flags are resolved, as functions of them (attn_pe of pe,
# vocab_size and metric of data, steps_per_epoch of the data size and the batch): in the default
# arm only when the flag keys chosen do not already determine them, so that a table of PEs does
# not grow a second, redundant "attn_pe" column.
DERIVED = ("attn_pe", "vocab_size", "metric", "n_classes", "classes", "steps_per_epoch")
SPLIT_NAMES = {"val": "validation", "test": "test"}
METRIC_NAMES = {"top1": "top-1 (%)", "top5": "top-5 (%)"}
PERCENT = ("top1", "top5")                     # accuracies in %: 2 decimals, like results/vit/*.md
# files of a run folder that may be given instead of the folder itself
RUN_FILES = ("config.json", "summary.json", "args.json", "ckpt.pt", "metrics.csv", "versions.json")
CONF = 0.95                                    # the intervals' level (verdicts.compare's alpha = 0.05)


@dataclass
class Run:
    """A finished run: its folder, config.json and summary.json, and the value tabulated."""
    path: Path
    config: dict
    summary: dict
    value: float = math.nan

    @property
    def seed(self):
        return self.config.get("seed")


# ----------------------------------------------------------------------------------------------
# 1. Finding and reading the runs
# ----------------------------------------------------------------------------------------------
def _shown(path: Path) -> str:
    """A path as the user would write it: relative to the working folder when it lies inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _run_folders(folder: Path, depth: int) -> list[Path]:
    """Run folders (holding config.json) at `folder` or up to `depth` levels below it, in name
    order; a run's own subfolders are not searched, nor hidden ones (.git, .cache)."""
    if (folder / "config.json").is_file():
        return [folder]
    if depth == 0:
        return []
    out = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            out += _run_folders(child, depth - 1)
    return out


def find_runs(paths: list) -> tuple[list[Path], list[Path], list[Path]]:
    """(finished run folders, unfinished ones, arguments that hold no run), each without repeats.
    A path that does not exist is a ValueError (a typo, most likely)."""
    found, ignored = [], []
    for arg in paths:
        p = Path(arg)
        if not p.exists():
            raise ValueError(f"{arg} does not exist: give run folders, or folders that hold them")
        if p.is_file():
            # a file of a run (its config.json, ckpt.pt, ...) stands for its folder; any other
            # file (a .log beside the run folders, when a shell glob catches it) holds no run
            if p.name in RUN_FILES and (p.parent / "config.json").is_file():
                p = p.parent
            else:
                ignored.append(p)
                continue
        hits = _run_folders(p, 2)
        if not hits:
            ignored.append(p)
        found += hits
    seen, unique = set(), []
    for d in found:                                   # the same run reached twice counts once
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(d)
    finished = [d for d in unique if (d / "summary.json").exists()]
    unfinished = [d for d in unique if not (d / "summary.json").exists()]
    return finished, unfinished, ignored


def _read_json(path: Path, what: str) -> dict:
    """A run's JSON file as a dict; anything else (unreadable, not JSON, not an object) is one
    sentence naming the file."""
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {_shown(path)} ({e.strerror or e})") from None
    except ValueError as e:                           # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"cannot read {_shown(path)} ({str(e).splitlines()[0]}): it is not the "
                         f"{what} of a run") from None
    if not isinstance(d, dict):
        raise ValueError(f"{_shown(path)} is not the {what} of a run (not a JSON object)")
    return d


def load_run(folder: Path) -> Run:
    return Run(folder, _read_json(folder / "config.json", "config.json"),
               _read_json(folder / "summary.json", "summary.json"))


def own_metric(run: Run) -> str | None:
    """The metric a run reports of itself: train_lm writes it into config.json (and summary.json):
    bpb / bpc for bytes and characters, ppl for WikiText-103's words; train_vit writes none, and its
    headline number is the validation top-1 accuracy (summary.json's val: loss, top1[, top5])."""
    m = run.config.get("metric") or run.summary.get("metric")
    if isinstance(m, str) and m:
        return m
    if run.config.get("model") == "vit" or "top1" in (run.summary.get("val") or {}):
        return "top1"
    return None


def _splits(run: Run) -> list[str]:
    """The splits a summary.json holds results for (train_lm: val and test; train_vit: val)."""
    return [k for k, v in run.summary.items() if isinstance(v, dict) and k in SPLIT_NAMES]


def _count(values: list) -> str:
    """"pydocs: 21 runs, eng.txt: 3 runs": how many runs hold each value, most first."""
    counts: dict = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{v}: {n} run{'s' if n > 1 else ''}" for v, n in sorted(counts.items(), key=lambda t: -t[1]))


def pick_values(runs: list[Run], metric: str | None, split: str) -> str:
    """Check that the runs make one table (one corpus, one metric) and set each run's value: its
    summary.json[split][metric].  Returns the metric."""
    # one corpus: config "data" by file name (a local file may be named by different paths)
    data = [Path(str(r.config.get("data"))).name for r in runs]
    if len(set(data)) > 1:
        raise ValueError(f"these runs are on different data ({_count(data)}): one table holds one corpus, "
                         f"so tabulate each separately")
    if metric is None:
        own = [own_metric(r) for r in runs]
        if None in own:
            r = runs[own.index(None)]
            raise ValueError(f"{_shown(r.path)} names no metric of its own (no \"metric\" in its config.json): "
                             f"choose one with --metric (its {split} results have "
                             f"{', '.join(r.summary.get(split) or {}) or 'nothing'})")
        if len(set(own)) > 1:
            raise ValueError(f"these runs report different metrics ({_count(own)}): one table holds one metric, "
                             f"so tabulate each kind separately or choose one with --metric")
        metric = own[0]
    for r in runs:
        if split not in _splits(r):
            raise ValueError(f"--split {split}: {_shown(r.path)} has no {split} results in its summary.json "
                             f"(it has {', '.join(_splits(r)) or 'none'})")
        res = r.summary[split]
        if metric not in res:
            raise ValueError(f"--metric {metric} is not in the {split} results of {_shown(r.path)} "
                             f"(its summary.json has {', '.join(res) or 'none'})")
        v = res[metric]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{_shown(r.path)}/summary.json gives {split} {metric} = {v!r}, not a number")
        r.value = float(v)
    return metric


# ----------------------------------------------------------------------------------------------
# 2. Arms
# ----------------------------------------------------------------------------------------------
def _canon(v):
    """A config value as a hashable, totally ordered key: numbers by value (0 and 0.0 are one arm),
    lists and dicts by their JSON text, a missing key (None) after everything else."""
    if v is None:
        return ("~",)
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, (int, float)):
        return ("n", float(v))
    if isinstance(v, str):
        return ("s", v)
    return ("j", json.dumps(v, sort_keys=True))


def _show(v) -> str:
    """A config value in a table cell."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v)


def _splits_groups(runs: list[Run], keys: list[str], key: str) -> bool:
    """Whether `key` takes more than one value among runs that agree on `keys`."""
    groups: dict = {}
    for r in runs:
        groups.setdefault(tuple(_canon(r.config.get(k)) for k in keys), set()).add(_canon(r.config.get(key)))
    return any(len(v) > 1 for v in groups.values())


def default_keys(runs: list[Run]) -> list[str]:
    """Every config key whose value differs between the runs (in config.json's order), except
    NOT_ARM, and except a DERIVED key that the other keys chosen already determine."""
    order: list = []
    for r in runs:
        order += [k for k in r.config if k not in order]
    varying = [k for k in order if k not in NOT_ARM and len({_canon(r.config.get(k)) for r in runs}) > 1]
    keys = [k for k in varying if k not in DERIVED]
    for k in varying:
        if k in DERIVED and _splits_groups(runs, keys, k):
            keys.append(k)
    return keys


def check_keys(runs: list[Run], keys: list[str]) -> None:
    """Every --by key is a key of at least one run's config.json."""
    known = {k for r in runs for k in r.config}
    for k in keys:
        if k not in known:
            near = difflib.get_close_matches(k, sorted(known), n=3)
            hint = f"did you mean {' or '.join(near)}?" if near else f"the keys are {', '.join(sorted(known))}"
            raise ValueError(f"--by {k}: no run's config.json has that key ({hint})")


def _same_config(a: Run, b: Run) -> bool:
    """Whether two runs were made with the same settings (NOT_ARM aside: evaluation, logging and
    device flags do not change what is trained)."""
    keys = ({*a.config, *b.config} - set(NOT_ARM)) | {"seed"}
    return all(_canon(a.config.get(k)) == _canon(b.config.get(k)) for k in keys)


def group(runs: list[Run], keys: list[str], metric: str) -> tuple[dict, list[str]]:
    """arm (tuple of canonical key values) → its runs, in seed order; and notes on repeats.

    A run whose settings and seed are another's, with the same value, is a copy of it (a run kept
    both under runs/ and under results/): it is counted once.  A repeat that reports a different
    value (a rerun on other hardware, or with other code) is kept, and said to be so; an arm with
    a seed twice is then compared unpaired (Welch), as is one that pools several settings under
    one seed (a --by that leaves a varying key out)."""
    arms: dict = {}
    copies, reruns = [], []
    for r in runs:
        arm = arms.setdefault(tuple(_canon(r.config.get(k)) for k in keys), [])
        twin = next((o for o in arm if r.seed is not None and _same_config(o, r)), None)
        if twin is not None and (twin.value == r.value or math.isclose(twin.value, r.value, rel_tol=1e-12)):
            copies.append(f"{_shown(r.path)} = {_shown(twin.path)}")
            continue
        if twin is not None:
            reruns.append(f"{_shown(r.path)} ({twin.value:.6g} vs {r.value:.6g} in {_shown(twin.path)})")
        arm.append(r)
    for arm in arms.values():
        arm.sort(key=lambda r: _canon(r.seed))
    notes = []
    if copies:
        notes.append(f"Copies of one run (same settings, seed and {metric}), counted once: {'; '.join(copies)}")
    if reruns:
        notes.append(f"Reruns of one setting and seed with a different {metric}, both kept (such an arm is "
                     f"compared unpaired): {'; '.join(reruns)}")
    return arms, notes


def parse_baseline(spec: str, keys: list[str]) -> dict:
    """"pe=rope,lam=0" → {"pe": "rope", "lam": "0"}; a piece without "=" continues the value
    before it (cutoffs=20000,40000).  Every key must be one the runs are grouped by."""
    pairs: dict = {}
    last = None
    for piece in spec.split(","):
        if "=" in piece:
            k, v = piece.split("=", 1)
            last = k.strip()
            if not last:
                raise ValueError(f"--baseline {spec}: a KEY=VALUE pair has no key")
            pairs[last] = v.strip()
        elif last is not None:
            pairs[last] += "," + piece
        else:
            raise ValueError(f"--baseline takes KEY=VALUE pairs (e.g. pe=learned or pe=rope,lam=0), got {spec!r}")
    for k in pairs:
        if k not in keys:
            raise ValueError(f"--baseline {spec}: {k} is not one of the keys the runs are grouped by "
                             f"({', '.join(keys) or 'none'}): add it to --by, or leave it out of --baseline")
    return pairs


def _same(value, text: str) -> bool:
    """Whether a config value is what the user wrote: as shown in the table, or the same number
    (lam=0 is 0.0, lam=-0.10 is −0.1), or true/false, or none for a missing key."""
    if text == _show(value):
        return True
    if value is None:
        return text.lower() in ("none", "null", "—", "")
    if isinstance(value, bool):
        return text.lower() == str(value).lower()
    if isinstance(value, (int, float)):
        try:
            return math.isclose(float(text), float(value), rel_tol=1e-12, abs_tol=1e-15)
        except ValueError:
            return False
    return False


def find_baseline(arms: dict, keys: list[str], pairs: dict, spec: str):
    """The one arm whose key values match every pair of --baseline."""
    def value(arm, k):
        return arms[arm][0].config.get(k)
    hits = [arm for arm in arms if all(_same(value(arm, k), v) for k, v in pairs.items())]
    if not hits:
        have = "; ".join(f"{k}: {', '.join(sorted({_show(value(a, k)) for a in arms}))}" for k in pairs)
        raise ValueError(f"--baseline {spec} matches no arm (the runs have {have})")
    if len(hits) > 1:
        other = [k for k in keys if k not in pairs]
        raise ValueError(f"--baseline {spec} matches {len(hits)} arms: add a value for "
                         f"{' and '.join(other) if other else 'another --by key'}")
    return hits[0]


# ----------------------------------------------------------------------------------------------
# 3. The statistics of a row
# ----------------------------------------------------------------------------------------------
def interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sd, CI low, CI high): x̄ ± t₀.₉₇₅,ₙ₋₁ s/√n; sd and CI are NaN for one value."""
    x = np.asarray(values, dtype=float)
    n = x.size
    m = float(np.mean(x))
    if n < 2 or not np.all(np.isfinite(x)):
        return m, math.nan, math.nan, math.nan
    # s with the n − 1 denominator
    s = float(np.std(x, ddof=1))
    # half-width t_{1−α/2, n−1} · s / √n (verdicts' own t quantile)
    half = verdicts.t_ppf(0.5 + CONF / 2, n - 1) * s / math.sqrt(n)
    return m, s, m - half, m + half


def versus(arm: list[Run], base: list[Run]) -> tuple[dict | None, str]:
    """verdicts.compare(arm, baseline): paired by seed when both arms hold the same seeds (no seed
    missing or repeated), Welch otherwise; (None, why) when there are too few runs or a value is
    not finite."""
    a, b = [r.value for r in arm], [r.value for r in base]
    if not all(map(math.isfinite, a + b)):
        return None, "a value is not finite"
    sa, sb = [_canon(r.seed) for r in arm], [_canon(r.seed) for r in base]
    # paired only when every run has a seed, no seed repeats, and both arms hold the same ones
    paired = (_canon(None) not in sa + sb and len(set(sa)) == len(sa) and len(set(sb)) == len(sb)
              and set(sa) == set(sb))
    if paired:
        # both lists are in seed order (group sorts them), so aᵢ and bᵢ share seed i
        if len(a) < 2:
            return None, "one seed: no interval"
    elif len(a) < 2 or len(b) < 2:
        return None, "Welch needs ≥ 2 runs in each arm"
    # delta only feeds the equivalence test, which this table does not show
    return verdicts.compare(a, b, paired=paired, delta=0.0, alpha=1.0 - CONF), ""


def _num(x: float, digits: int) -> str:
    return "—" if not math.isfinite(x) else f"{x:.{digits}f}"


def _signed(x: float, digits: int) -> str:
    """+0.0123 / −0.0123 with a true minus sign, as analysis.verdicts.describe writes them."""
    if not math.isfinite(x):
        return "—"
    s = f"{x:+.{digits}f}"
    return s.replace("-", "−") if float(s) != 0 else s.replace("-", "+")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# ----------------------------------------------------------------------------------------------
# 4. The table
# ----------------------------------------------------------------------------------------------
def build_rows(arms: dict, keys: list[str], base) -> list[dict]:
    """One dict per arm (baseline first, then the arms in key order): the CSV's rows, with the
    numbers unrounded."""
    order = sorted(arms, key=lambda arm: (arm != base, arm))
    rows = []
    for arm in order:
        runs = arms[arm]
        m, s, lo, hi = interval([r.value for r in runs])
        row = {**{k: runs[0].config.get(k) for k in keys}, "seeds": len(runs),
               "seed_list": ";".join(_show(r.seed) for r in runs), "mean": m, "std": s, "ci_low": lo, "ci_high": hi}
        if base is not None:
            if arm == base:
                row.update(delta=0.0, delta_ci_low=math.nan, delta_ci_high=math.nan, p=math.nan, test="baseline")
            else:
                res, why = versus(runs, arms[base])
                if res is None:
                    row.update(delta=m - interval([r.value for r in arms[base]])[0], delta_ci_low=math.nan,
                               delta_ci_high=math.nan, p=math.nan, test=why)
                else:
                    n = res["n"]
                    size = f"{n} pairs" if res["paired"] else f"{n[0]} vs {n[1]} runs"
                    row.update(delta=res["diff"], delta_ci_low=res["ci"][0], delta_ci_high=res["ci"][1],
                               p=res["p"], test=f"{res['test']}, {size}")
        walls = [r.summary.get("wall_s") for r in runs]
        row["wall_s"] = (float(np.mean(walls)) if all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                      for w in walls) else math.nan)
        row["runs"] = ";".join(_shown(r.path) for r in runs)
        rows.append(row)
    return rows


def markdown(rows: list[dict], keys: list[str], metric: str, split: str, baseline: bool) -> str:
    """The rows as a Markdown table in results/*.md's look: mean ± std over seeds, then the
    intervals."""
    digits = 2 if metric in PERCENT else 4
    name = f"{SPLIT_NAMES.get(split, split)} {METRIC_NAMES.get(metric, metric)}"
    head = [*(keys or ["arm"]), "seeds", name, "95% CI"]
    if baseline:
        head += ["Δ vs baseline", "95% CI of Δ", "p", "test"]
    head.append("s / run")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_show(r[k]) for k in keys] if keys else ["all runs"]
        spread = f" ± {r['std']:.{digits}f}" if math.isfinite(r["std"]) else ""
        cells += [str(r["seeds"]), f"{_num(r['mean'], digits)}{spread}",
                  f"[{_num(r['ci_low'], digits)}, {_num(r['ci_high'], digits)}]" if math.isfinite(r["ci_low"]) else "—"]
        if baseline:
            if r["test"] == "baseline":
                cells += ["baseline", "—", "—", "—"]
            else:
                ci = (f"[{_signed(r['delta_ci_low'], digits)}, {_signed(r['delta_ci_high'], digits)}]"
                      if math.isfinite(r["delta_ci_low"]) else "—")
                cells += [_signed(r["delta"], digits), ci, f"{r['p']:.3g}" if math.isfinite(r["p"]) else "—", r["test"]]
        cells.append(f"{r['wall_s']:.0f}" if math.isfinite(r["wall_s"]) else "—")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: list[dict], keys: list[str], metric: str, split: str, baseline: str | None) -> list[dict]:
    """The CSV's rows: the arm's keys (renamed config.KEY where a key is also a column name), then
    split, metric and the numbers, unrounded (NaN left empty)."""
    out = []
    for r in rows:
        d = {}
        for k, v in r.items():
            name = f"config.{k}" if k in keys and k in ("seeds", "seed_list", "mean", "std", "ci_low", "ci_high",
                                                         "delta", "delta_ci_low", "delta_ci_high", "p", "test",
                                                         "wall_s", "runs", "split", "metric", "baseline") else k
            d[name] = "" if isinstance(v, float) and math.isnan(v) else (_show(v) if k in keys else v)
            if k == "seed_list":
                d.update(split=split, metric=metric, **({"baseline": baseline} if baseline else {}))
        out.append(d)
    return out


def pooled_differences(arms: dict, keys: list[str]) -> list[str]:
    """Config keys (outside NOT_ARM) whose value differs WITHIN some arm: pooled by the --by given."""
    out = []
    order: list = []
    for runs in arms.values():
        for r in runs:
            order += [k for k in r.config if k not in order]
    for k in order:
        if k in keys or k in NOT_ARM:
            continue
        if any(len({_canon(r.config.get(k)) for r in runs}) > 1 for runs in arms.values()):
            out.append(k)
    return out


# ----------------------------------------------------------------------------------------------
# 5. Command line
# ----------------------------------------------------------------------------------------------
def check_csv(path: Path) -> None:
    """Refuse up front, in one sentence, a --csv that could not be written: a folder, a path under
    a regular file, or one whose nearest existing folder refuses new files."""
    if path.is_dir():
        raise ValueError(f"--csv {path} is a folder: give the name of the CSV file to write")
    probe = path.parent
    while not os.path.lexists(probe) and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"--csv {path} lies under {probe}, which is not a folder: choose another --csv")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--csv {path} cannot be written: {probe} refuses new files; choose another --csv")


def build_parser() -> training.ArgParser:
    p = training.ArgParser(prog="python -m analysis.tabulate",
                           description="Tabulate finished train_lm.py / train_vit.py runs: arms (config keys), "
                                       "seeds, mean and 95% t-interval of the final metric, and the "
                                       "difference to a baseline arm (see the module docstring).")
    a = p.add_argument
    a("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders holding them (one or two levels down)")
    a("--by", help="comma-separated config keys that make an arm (default: the keys that differ, "
                   "except the seed and evaluation / logging / device settings)")
    a("--metric", help="summary.json key, e.g. bpb, bpc, ppl, loss, top1, top5 (default: the runs' own)")
    a("--split", default="val", help="val (default) or test")
    a("--baseline", metavar="KEY=VALUE[,KEY=VALUE]", help="the arm the others are compared with")
    a("--csv", metavar="OUT.csv", help="also write the table to this CSV file (atomically)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    finished, unfinished, ignored = find_runs(args.runs)
    if not finished:
        where = ", ".join(args.runs)
        if unfinished:
            raise ValueError(f"no finished run in {where}: {len(unfinished)} unfinished (no summary.json yet), "
                             f"e.g. {_shown(unfinished[0])}")
        raise ValueError(f"no runs found in {where} (a run folder holds config.json and summary.json; "
                         f"searched two levels down)")
    if args.csv:
        # nothing is written into a run folder: a table there would be taken for one of its files
        target = Path(args.csv).resolve()
        for d in finished + unfinished:
            if d.resolve() in target.parents:
                raise ValueError(f"--csv {args.csv} lies in the run folder {_shown(d)}: write it elsewhere "
                                 f"(nothing is written into run folders)")
        check_csv(Path(args.csv))
    runs = [load_run(d) for d in finished]
    metric = pick_values(runs, args.metric, args.split)

    if args.by is None:
        keys = default_keys(runs)
    else:
        keys = [k.strip() for k in args.by.split(",") if k.strip()]
        check_keys(runs, keys)
    arms, notes = group(runs, keys, metric)
    base = None
    if args.baseline:
        base = find_baseline(arms, keys, parse_baseline(args.baseline, keys), args.baseline)

    rows = build_rows(arms, keys, base)
    text = markdown(rows, keys, metric, args.split, base is not None)
    n = sum(len(v) for v in arms.values())
    text += (f"\n{n} run{'s' if n > 1 else ''} in {len(arms)} arm{'s' if len(arms) > 1 else ''}, "
             f"{SPLIT_NAMES.get(args.split, args.split)} {METRIC_NAMES.get(metric, metric)} from each run's summary.json: mean ± std over "
             f"seeds and its 95% t-interval (n − 1 df)")
    if base is not None:
        text += (f"; Δ = arm − baseline ({args.baseline}): paired t where both arms hold the same seeds, Welch t "
                 f"otherwise (analysis/verdicts.py), two-sided p not adjusted for the {len(arms) - 1} "
                 f"comparison{'s' if len(arms) > 2 else ''}")
    text += ".\n"
    pooled = pooled_differences(arms, keys)
    if pooled:
        text += f"\nPooled within arms although their configs differ: {', '.join(pooled)} (add to --by to split).\n"
    for line in notes:
        text += f"\n{line}.\n"
    bad = [r["runs"] for r in rows if not math.isfinite(r["mean"])]
    if bad:
        text += f"\nNot finite (a diverged run?), so no interval: {'; '.join(bad)}.\n"
    if unfinished:
        text += f"\nUnfinished (no summary.json yet), skipped: {', '.join(_shown(d) for d in unfinished)}.\n"
    if ignored:
        text += f"\nNot run folders, ignored: {', '.join(_shown(p) for p in ignored)}.\n"
    if args.csv:
        training.write_csv(args.csv, csv_rows(rows, keys, metric, args.split, args.baseline))
    print(text, end="")
    if args.csv:
        print(f"(table written to {args.csv})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
