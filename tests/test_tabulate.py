"""analysis/tabulate.py: runs group into arms by their config, the mean and the 95% t-interval and
the paired / Welch difference to a baseline match closed-form computations, unfinished runs are
skipped and listed, every bad input is one sentence and exit 2, and nothing is written into the
run folders.  Fake run folders (config.json + summary.json with known numbers), and one real tiny
train_lm.py run."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_lm
import training
from analysis import tabulate, verdicts
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parents[1]
T975_DF2 = 4.302652729911275            # t₀.₉₇₅ with 2 degrees of freedom (3 seeds), from tables

# arm → per-seed validation bpb (seeds 0, 1, 2): made-up numbers with distinct spreads
BPB = {("learned", 0.0): [3.60, 3.65, 3.69],
       ("rope", 0.0): [2.73, 2.75, 2.72],
       ("rope", -0.1): [2.70, 2.74, 2.71]}


def make_run(folder: Path, *, value=None, seed=0, metric="bpb", finished=True, vit=False, **config) -> Path:
    """A run folder as train_lm.py (or train_vit.py, vit=True) leaves it: config.json, and
    summary.json when finished.  `config` overrides the settings."""
    folder.mkdir(parents=True)
    if vit:
        cfg = {"data": "shapes", "pe": "learned", "lam": 0.0, "lam_mode": "identity", "regime": "free",
               "steps": 20, "eval_every": 10, "seed": seed, "model": "vit", "attn_pe": "none", **config}
    else:
        cfg = {"data": "pydocs", "pe": "rope", "lam": 0.0, "lam_mode": "identity", "regime": "free",
               "steps": 20, "eval_every": 0, "eval_tokens": 0, "seed": seed, "vocab_size": 256, "metric": metric,
               **config}
        cfg.setdefault("attn_pe", "rope" if cfg["pe"] == "rope" else "none")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if finished:
        if vit:
            summ = {"step": 20, "wall_s": 3.0, "params": 10, "val": {"loss": 1.0 + seed, "top1": value}}
        else:
            summ = {"step": 20, "wall_s": 7.0 + seed, "params": 10, "metric": metric,
                    "val": {"loss": value * math.log(2), metric: value},
                    "test": {"loss": 0.0, metric: value - 0.05}, "lam": [None]}
        (folder / "summary.json").write_text(json.dumps(summ, indent=2))
    (folder / "metrics.csv").write_text("step,split,metric,value\n")
    return folder


@pytest.fixture
def runs(tmp_path) -> Path:
    """runs/<experiment>/<arm>-s<seed>: 3 arms × 3 seeds, two levels down; one of them evaluated
    more often (not a setting of the arm), one unfinished run and a .log file beside them."""
    root = tmp_path / "runs"
    for (pe, lam), values in BPB.items():
        for seed, v in enumerate(values):
            extra = {"eval_every": 5} if (pe, lam, seed) == ("rope", 0.0, 1) else {}
            make_run(root / "lm" / f"{pe}-lam{lam:g}-s{seed}", value=v, seed=seed, pe=pe, lam=lam, **extra)
    make_run(root / "lm" / "rope-lam0-s3", seed=3, finished=False)
    (root / "lm" / "rope-lam0-s0.log").write_text("log\n")
    return root


def cli(argv, capsys) -> tuple[int, str, str]:
    """analysis.tabulate's command line, in-process: (exit code, stdout, stderr)."""
    code = training.run_cli(tabulate.main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table(out: str) -> list[dict]:
    """The Markdown table at the top of stdout as a list of {column: cell}."""
    lines = [ln for ln in out.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= {"|", "-"}
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def numbers(cell: str) -> list[float]:
    """The numbers of a cell: "[−0.0285, +0.0711]" → [-0.0285, 0.0711]; "3.6473 ± 0.0282" → both."""
    for junk in "[],±":
        cell = cell.replace(junk, " ")
    return [float(x.replace("−", "-")) for x in cell.split()]


def snapshot(folder: Path) -> dict:
    """Every file under folder: its bytes and modification time."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# -- grouping, the mean and its interval ------------------------------------------------------------
def test_runs_group_into_arms_with_the_t_interval(runs, tmp_path, capsys):
    out_csv = tmp_path / "out" / "table.csv"
    # (the .log is given as a shell glob would give it; inside a searched folder files are skipped)
    code, out, err = cli([runs, runs / "lm" / "rope-lam0-s0.log", "--csv", out_csv], capsys)
    assert code == 0, err
    rows = table(out)
    # default arm keys: pe and lam differ; the seed, eval_every (an evaluation setting) and attn_pe
    # (derived from pe) do not make arms
    assert list(rows[0])[:3] == ["pe", "lam", "seeds"] and "validation bpb" in rows[0]
    got = {(r["pe"], float(r["lam"])): r for r in rows}
    assert set(got) == set(BPB) and all(r["seeds"] == "3" for r in rows)
    with open(out_csv, newline="") as f:
        exact = {(r["pe"], float(r["lam"])): r for r in csv.DictReader(f)}
    for arm, values in BPB.items():
        x = np.array(values)
        m, s = x.mean(), x.std(ddof=1)
        half = T975_DF2 * s / math.sqrt(3)                        # x̄ ± t₀.₉₇₅,₂ s/√3
        assert numbers(got[arm]["validation bpb"]) == pytest.approx([m, s], abs=5e-5)
        assert numbers(got[arm]["95% CI"]) == pytest.approx([m - half, m + half], abs=5e-5)
        r = exact[arm]
        assert float(r["mean"]) == pytest.approx(m, rel=1e-12) and float(r["std"]) == pytest.approx(s, rel=1e-12)
        assert [float(r["ci_low"]), float(r["ci_high"])] == pytest.approx([m - half, m + half], rel=1e-11)
        assert r["seed_list"] == "0;1;2" and r["split"] == "val" and r["metric"] == "bpb"
    assert got[("rope", 0.0)]["s / run"] == "8"                   # mean wall_s 7, 8, 9
    # the unfinished run and the log file are listed, not tabulated
    assert "Unfinished (no summary.json yet), skipped: " in out and "rope-lam0-s3" in out
    assert "Not run folders, ignored: " in out and "rope-lam0-s0.log" in out
    assert not list(out_csv.parent.glob(".*tmp*"))               # written atomically: no temporary left


def test_by_names_the_arm_keys_and_says_what_it_pooled(runs, capsys):
    code, out, err = cli([runs / "lm", "--by", "pe", "--split", "test"], capsys)
    assert code == 0, err
    rows = {r["pe"]: r for r in table(out)}
    assert rows["rope"]["seeds"] == "6" and "test bpb" in rows["rope"]
    pooled = np.array(BPB[("rope", 0.0)] + BPB[("rope", -0.1)]) - 0.05       # the test values
    assert numbers(rows["rope"]["test bpb"]) == pytest.approx([pooled.mean(), pooled.std(ddof=1)], abs=5e-5)
    assert "Pooled within arms although their configs differ: lam" in out


# -- the difference to a baseline -------------------------------------------------------------------
def test_paired_difference_is_the_mean_of_the_per_seed_differences(runs, tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    code, out, err = cli([runs, "--baseline", "pe=learned", "--csv", out_csv], capsys)
    assert code == 0, err
    rows = table(out)
    assert (rows[0]["pe"], rows[0]["Δ vs baseline"]) == ("learned", "baseline")      # the baseline first
    with open(out_csv, newline="") as f:
        exact = {(r["pe"], float(r["lam"])): r for r in csv.DictReader(f)}
    base = np.array(BPB[("learned", 0.0)])
    for arm in (("rope", 0.0), ("rope", -0.1)):
        d = np.array(BPB[arm]) - base                             # dₛ = arm − baseline, seed by seed
        m, s = d.mean(), d.std(ddof=1)
        half = T975_DF2 * s / math.sqrt(3)
        t = m / (s / math.sqrt(3))
        p = 1 - abs(t) / math.sqrt(t * t + 2)                     # P(|T₂| ≥ |t|), closed form for 2 df
        r = exact[arm]
        assert float(r["delta"]) == pytest.approx(m, rel=1e-12)
        assert [float(r["delta_ci_low"]), float(r["delta_ci_high"])] == pytest.approx([m - half, m + half], rel=1e-10)
        assert float(r["p"]) == pytest.approx(p, rel=1e-9)
        assert r["test"] == "paired t, 3 pairs"
        row = next(x for x in rows if (x["pe"], float(x["lam"])) == arm)
        assert numbers(row["Δ vs baseline"]) == pytest.approx([m], abs=5e-5)
        assert numbers(row["95% CI of Δ"]) == pytest.approx([m - half, m + half], abs=5e-5)
        assert row["Δ vs baseline"].startswith("−")               # a true minus, as verdicts.describe writes
    assert "paired t where both arms hold the same seeds" in out


def test_arms_with_different_seeds_are_compared_by_welch(runs, capsys):
    shutil.rmtree(runs / "lm" / "rope-lam0-s2")                   # rope λ=0 keeps seeds 0 and 1 only
    code, out, err = cli([runs, "--baseline", "pe=learned"], capsys)
    assert code == 0, err
    row = next(r for r in table(out) if r["pe"] == "rope" and r["lam"] == "0")
    a, b = np.array(BPB[("rope", 0.0)][:2]), np.array(BPB[("learned", 0.0)])
    va, vb = a.var(ddof=1) / 2, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 1 + vb ** 2 / 2)             # Welch–Satterthwaite
    half = verdicts.t_ppf(0.975, df) * math.sqrt(va + vb)
    diff = a.mean() - b.mean()
    assert row["test"] == "Welch t, 2 vs 3 runs" and row["seeds"] == "2"
    assert numbers(row["Δ vs baseline"]) == pytest.approx([diff], abs=5e-5)
    assert numbers(row["95% CI of Δ"]) == pytest.approx([diff - half, diff + half], abs=5e-5)


def test_a_copy_of_a_run_counts_once(runs, tmp_path, capsys):
    kept = tmp_path / "results" / "rope-s0"
    shutil.copytree(runs / "lm" / "rope-lam0-s0", kept)        # the same run kept twice
    code, out, err = cli([runs, kept], capsys)
    assert code == 0, err
    assert next(r for r in table(out) if r["pe"] == "rope" and r["lam"] == "0")["seeds"] == "3"
    assert "counted once" in out


def test_a_vit_run_reports_top1_by_default(tmp_path, capsys):
    for seed, v in enumerate([90.0, 95.0, 100.0]):
        make_run(tmp_path / f"v{seed}", value=v, seed=seed, vit=True)
    code, out, err = cli([tmp_path], capsys)
    assert code == 0, err
    (row,) = table(out)
    assert row["arm"] == "all runs" and numbers(row["validation top-1 (%)"]) == pytest.approx([95.0, 5.0])
    code, out, err = cli([tmp_path, "--metric", "loss"], capsys)
    assert code == 0 and numbers(table(out)[0]["validation loss"]) == pytest.approx([2.0, 1.0])


# -- a real run ---------------------------------------------------------------------------------------
def test_a_real_train_lm_run(tmp_path, capsys):
    """One tiny train_lm.py run (its own flags, ~5 s): its summary's validation bpb is the table's,
    tabulating writes nothing into it, and beside runs on another corpus it is refused."""
    data = tmp_path / "english.txt"
    data.write_bytes("\n\n".join(topics[k] for k in sorted(topics))[:20000].encode())
    run = tmp_path / "real"
    tiny = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
            "--warmup", "0", "--eval-tokens", "64", "--probe-batch", "2", "--device", "cpu", "--steps", "2"]
    assert training.run_cli(train_lm.main, ["--data", str(data), "--out", str(run), *tiny]) == 0
    capsys.readouterr()
    before = snapshot(run)
    code, out, err = cli([run / "ckpt.pt", "--split", "test"], capsys)    # a file of the run stands for it
    assert code == 0, err
    summ = json.loads((run / "summary.json").read_text())
    (row,) = table(out)
    assert row["seeds"] == "1" and row["95% CI"] == "—"
    assert numbers(row["test bpb"]) == pytest.approx([summ["test"]["bpb"]], abs=5e-5)
    make_run(tmp_path / "other", value=3.0)                              # data pydocs, not english.txt
    code, out, err = cli([run, tmp_path / "other"], capsys)
    assert code == 2 and "different data" in err and err.count("\n") == 1
    assert snapshot(run) == before


# -- bad input: one sentence, exit 2 -----------------------------------------------------------------
BAD = {
    "nothing there": (["{tmp}/nope"], "does not exist"),
    "no runs": (["{tmp}/empty"], "no runs found"),
    "only unfinished": (["{runs}/lm/rope-lam0-s3"], "no finished run"),
    "unreadable summary": (["{tmp}/broken"], "cannot read"),
    "unknown --by": (["{runs}", "--by", "lamda"], "did you mean lam"),
    "--metric absent": (["{runs}", "--metric", "bpc"], "--metric bpc is not in the val results"),
    "--split absent": (["{runs}", "--split", "train"], "no train results"),
    "--baseline no arm": (["{runs}", "--baseline", "pe=lerned"], "matches no arm"),
    "--baseline several arms": (["{runs}", "--baseline", "pe=rope"], "matches 2 arms"),
    "--baseline not a key": (["{runs}", "--baseline", "regime=free"], "not one of the keys"),
    "--baseline no =": (["{runs}", "--baseline", "learned"], "KEY=VALUE"),
    "mixed metrics": (["{runs}", "{tmp}/bpc"], "different metrics"),
    "mixed corpora": (["{runs}", "{tmp}/vit"], "different data"),
    "--csv in a run": (["{runs}", "--csv", "{runs}/lm/rope-lam0-s0/t.csv"], "lies in the run folder"),
    "--csv under a file": (["{runs}", "--csv", "{runs}/lm/rope-lam0-s0.log/t.csv"], "not a folder"),
    "unknown flag": (["{runs}", "--no-such-flag"], "unrecognized arguments"),
    "no arguments": ([], "required: RUN_DIR"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_sentence_and_exit_2(case, runs, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    make_run(tmp_path / "broken", value=1.0)
    (tmp_path / "broken" / "summary.json").write_text('{"val": {"bpb": 1.0')           # cut short
    make_run(tmp_path / "bpc", value=1.0, data="pydocs", metric="bpc")
    make_run(tmp_path / "vit", value=50.0, vit=True)
    before = snapshot(runs)
    argv, words = BAD[case]
    code, out, err = cli([a.format(tmp=tmp_path, runs=runs) for a in argv], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err and out == ""
    assert snapshot(runs) == before


def test_the_module_as_a_script(runs):
    """`python -m analysis.tabulate` itself, as a process: a bad --by is one line and exit 2, no
    traceback (the table itself is checked in-process above)."""
    before = snapshot(runs)
    bad = subprocess.run([sys.executable, "-m", "analysis.tabulate", str(runs), "--by", "nope"], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert bad.stderr.startswith("error: --by nope") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert snapshot(runs) == before
