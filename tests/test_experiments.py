"""analysis.experiments: the runner plans, runs, resumes, tabulates and judges (smoke budget, tiny runs)."""
import csv
import json
import math
import os
import re
import shutil

import pytest

import training
from analysis import experiments as ex
from analysis import verdicts
from spectral import tasks as stt


def test_claims_pair_arms_by_seed_and_judge_them_by_the_verdict_rule():
    # seed-matched arms: a shared per-seed offset cancels in the paired difference
    data = {"a": {"seed": [2, 0, 1], "val": [3.02, 1.00, 2.01]}, "b": {"seed": [0, 1, 2], "val": [1.10, 2.11, 3.12]}}
    res = ex._test(data, "a", "b", "val", "bpb", True)
    assert res["test"] == "paired t" and res["diff"] == pytest.approx(-0.1, abs=1e-12)
    assert verdicts.decide(res) == "supported" and res["delta"] == ex.DELTA["bpb"]
    assert verdicts.decide(ex._test(data, "a", "b", "val", "bpb", False)) == "contradicted"
    # the same numbers unpaired: the seed offsets swamp the 0.1 difference
    welch = verdicts.compare(data["a"]["val"], data["b"]["val"], paired=False, delta=0.01)
    assert welch["p"] > 0.5 > res["p"]
    assert ex._proportion_verdict(100, 100, 0.95) == "supported"
    assert ex._proportion_verdict(50, 100, 0.95) == "contradicted"
    assert ex._proportion_verdict(0, 3, 0.5).startswith("unresolved (Wilson [0, 56]%)")


def test_phase_claims_read_the_phase_table(tmp_path):
    (tmp_path / "phase").mkdir()
    rows = []
    for pe, conv in (("none", 100), ("rope1e4", 40)):
        for mask in ("bidirectional", "causal"):
            k = conv if mask == "bidirectional" else 100
            rows.append({"grid": "pe", "d": 4, "n": 8, "pe": pe, "mask": mask, "rho": "default", "scale": 1.0,
                         "instances": 102 if k == 100 else 100, "converges": min(k, 100),
                         "share_converges": min(k, 100) / 100, "share_not_hurwitz": 0.0, "t_end": 2000.0})
    for rho, conv in ((0.5, 100), (2.0, 30)):
        rows.append({"grid": "rho", "d": 16, "n": 8, "pe": "none", "mask": "bidirectional", "rho": rho, "scale": 1.0,
                     "instances": 100, "converges": conv, "share_converges": conv / 100,
                     "share_not_hurwitz": 0.6 if rho > 1 else 0.0, "t_end": 2000.0})
    training.write_csv(tmp_path / "phase" / "phase.csv", rows)
    got = {c[1]: c for c in ex.claims(tmp_path)}
    bi = next(v for k, v in got.items() if "inhibits" in k and "bidirectional" in k)
    ca = next(v for k, v in got.items() if "inhibits" in k and "causal" in k)
    assert bi[2] == "supported" and "40% vs 100%" in bi[3]
    assert ca[2] == "no effect ≥ 10 points"              # 100 vs 100: Δ's interval inside ±10 points
    rho = next(v for k, v in got.items() if "non-symmetric" in k)
    assert rho[2] == "contradicted" and "V not Hurwitz in 60%" in rho[3]


@pytest.fixture
def two_variants(monkeypatch):
    """lm-regimes cut to PD and ND (the pair its claim compares), two seeds: four tiny runs."""
    script, _, key, sub, corpus = ex.TRAINING["lm-regimes"]
    variants = {r: ["--pe", "learned", "--regime", r] for r in ("divergent", "convergent")}
    monkeypatch.setitem(ex.TRAINING, "lm-regimes", (script, variants, key, sub, corpus))
    return variants


def test_runner_runs_tabulates_judges_and_resumes(tmp_path, two_variants, capsys):
    res, runs = tmp_path / "results", tmp_path / "runs"
    args = ["--budget", "smoke", "--only", "lm-regimes,agreement", "--results", str(res), "--runs", str(runs), "--jobs", "2"]
    assert ex.main(args) == 0
    out = capsys.readouterr().out
    assert "lm-regimes: 4 runs, 0 already" in out and "4 to run" in out
    # every kept run folder holds the small files; the table has both variants over 2 seeds
    for r in ("divergent", "convergent"):
        for s in (0, 1):
            kept = res / "lm" / "regimes" / f"{r}-s{s}"
            assert {"config.json", "summary.json", "probe.csv"} <= {p.name for p in kept.iterdir()}
    rows = {r["variant"]: r for r in csv.DictReader(open(res / "lm" / "regimes.csv"))}
    assert set(rows) == {"divergent", "convergent"} and all(r["seeds"] == "2" for r in rows.values())
    # the table's mean is the mean of the per-run summaries
    vals = [json.loads((res / "lm" / "regimes" / f"convergent-s{s}" / "summary.json").read_text())["val"]["bpb"] for s in (0, 1)]
    assert float(rows["convergent"]["val"]) == pytest.approx(sum(vals) / 2)
    assert (res / "lm" / "regimes.png").stat().st_size > 0
    # agreement: per-seed tables combined into mean ± std
    ag = list(csv.DictReader(open(res / "core" / "agreement.csv")))
    assert len(ag) == 18 and all(r["seeds"] == "2" for r in ag)
    readme = (res / "README.md").read_text()
    assert "The convergence regime (ND) degrades performance" in readme
    assert "The definiteness conditions predict the fate" in readme
    for line in readme.splitlines():
        if line.startswith("| dynamics |"):
            assert any(v in line for v in ("**supported**", "**contradicted**", "**no effect ≥ δ**", "**unresolved",
                                            "**theorem check**", "**true by construction**", "**not applicable**"))

    # a second call runs nothing: every run is found in results/, the agreement step in the state file
    assert ex.main(args) == 0
    out = capsys.readouterr().out
    assert "4 already" in out and "0 to run" in out and "agreement: done" in out

    # a run whose settings differ from the budget's is planned again; a deleted one too
    cfg_path = res / "lm" / "regimes" / "divergent-s0" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["steps"] = 999
    cfg_path.write_text(json.dumps(cfg))
    rows, jobs = ex.plan_training("lm-regimes", "smoke", res, runs, None)
    # the run folder under runs/ still matches, so it is only copied back (no process)
    assert [(j[0] is None, j[3].name) for j in jobs] == [(True, "divergent-s0")]
    shutil.rmtree(runs / "lm-regimes" / "convergent-s1")
    shutil.rmtree(res / "lm" / "regimes" / "convergent-s1")
    rows, jobs = ex.plan_training("lm-regimes", "smoke", res, runs, None)
    todo = [j for j in jobs if j[0] is not None]
    assert [j[3].name for j in todo] == ["convergent-s1"] and "--regime" in todo[0][0]


def test_a_failing_run_stops_with_its_log(tmp_path, monkeypatch, capsys):
    script, _, key, sub, corpus = ex.TRAINING["lm-regimes"]
    monkeypatch.setitem(ex.TRAINING, "lm-regimes", (script, {"bad": ["--pe", "learned", "--lam", "-0.1",
                                                                      "--lam-mode", "softplus-diag"]}, key, sub, corpus))
    monkeypatch.setitem(ex.BUDGETS["smoke"], "seeds", 1)
    monkeypatch.setattr(ex, "_expected_config", lambda script, argv: {"never": "matches"})
    rc = ex.main(["--budget", "smoke", "--only", "lm-regimes", "--results", str(tmp_path / "r"), "--runs", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert rc == 1 and "lm-regimes: 1 run(s) failed" in err and "bad-s0.log" in err


def test_spectral_resumes_from_the_runs_stored_in_results(tmp_path):
    (tmp_path / "spectral").mkdir()
    run = {"config": stt.run_config(1, "rope", "small", 2), "test_acc": 50.0}
    (tmp_path / "spectral" / "synthetic_small_runs.json").write_text(json.dumps([run]))
    cache = tmp_path / "cache"
    assert ex._seed_spectral_cache(["--preset", "small"], tmp_path, cache) == 1
    assert json.loads((cache / stt.run_name(1, "rope", "small", 2)).read_text()) == run
    assert ex._seed_spectral_cache(["--preset", "small"], tmp_path, cache) == 0      # already there


def test_unknown_experiment_is_one_sentence(capsys):
    assert training.run_cli(ex.main, ["--only", "lm-nothing"]) == 2
    assert "unknown experiment 'lm-nothing'" in capsys.readouterr().err


@pytest.mark.parametrize("budget", sorted(ex.BUDGETS))
def test_every_budget_plans_runs_the_scripts_accept(tmp_path, budget):
    """Each budget's flags go through the training scripts' own parsers and resolve_config (a typo
    in a budget would otherwise surface only hours into `--budget gpu`)."""
    enwiki = tmp_path / "enwiki-sample.xml.bz2"          # planning does not open it
    for exp, (script, variants, *_rest) in ex.TRAINING.items():
        rows, jobs = ex.plan_training(exp, budget, tmp_path / "r", tmp_path / "w", enwiki)
        assert len(rows) == len(jobs) == len(variants) * ex.BUDGETS[budget]["seeds"]
        assert all(j[0][1] == str(ex.ROOT / script) and "--out" in j[0] for j in jobs)
    for step in ex.ONE_SHOT:
        for cmd in ex.one_shot_commands(step, budget, tmp_path / "r", tmp_path / "w", 2):
            assert cmd[1] == "-m" and (ex.ROOT / (cmd[2].replace(".", "/") + ".py")).exists()
    assert not list(tmp_path.iterdir())                  # planning wrote nothing


def test_list_plans_without_writing_and_skips_a_missing_enwiki_sample(tmp_path, capsys):
    args = ["--budget", "smoke", "--list", "--results", str(tmp_path / "r"), "--runs", str(tmp_path / "w")]
    assert ex.main(args) == 0
    out = capsys.readouterr().out
    assert "lm-pe-enwiki: no enwiki sample given; skipped (give its path with --enwiki)." in out
    assert "lm-regimes: 8 runs, 0 in results" in out and "agreement: 2 command(s) to run" in out
    assert ex.main(args + ["--enwiki", str(tmp_path / "missing.xml.bz2")]) == 0
    assert f"lm-pe-enwiki: {tmp_path / 'missing.xml.bz2'} not found; skipped" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_one_shot_steps_are_keyed_on_their_settings_not_the_program():
    cmds = ex.one_shot_commands("speed", "cpu-small", ex.ROOT / "results", ex.ROOT / "runs", 2)
    assert cmds == [[ex.PY, "-m", "analysis.bench", "--suite", "--out", "results/speed"]]
    assert ex.settings_key(cmds) == ["--suite --out results/speed"]
    # the stored state of results/ is that of the cpu-small commands: no one-shot step reruns
    state_path = ex.ROOT / "results" / "experiments-state.json"
    if not state_path.exists():
        pytest.skip("no results/experiments-state.json")
    state = json.loads(state_path.read_text())
    workers = re.search(r"--workers (\d+)", " ".join(state["spectral"]["commands"]))
    for step in ex.ONE_SHOT:
        if step == "phase" and step not in state:
            continue                    # recorded when its grid has finished (resumable per cell)
        cmds = ex.one_shot_commands(step, "cpu-small", ex.ROOT / "results",
                                    ex.ROOT / "runs" / "experiments" / "cpu-small", int(workers.group(1)))
        assert state[step]["commands"] == ex.settings_key(cmds), step


def test_a_second_runner_on_the_same_results_is_refused(tmp_path, capsys):
    res = tmp_path / "results"
    held = ex._take_lock(res)                                        # a live runner holds it
    assert (res / ".experiments.lock").read_text() == str(os.getpid())
    args = ["--budget", "smoke", "--only", "agreement", "--results", str(res), "--runs", str(tmp_path / "w")]
    assert training.run_cli(ex.main, args) == 2
    err = capsys.readouterr().err
    assert "another analysis.experiments" in err and f"pid {os.getpid()}" in err
    held.release()
    # a lock file left by a runner that died (kill -9: the kernel dropped its flock) does not block
    (res / ".experiments.lock").write_text("999999999")
    ex._take_lock(res).release()


def test_two_runners_started_at_the_same_instant_exactly_one_proceeds(tmp_path):
    """The old lock was check-then-write (34 of 300 synchronised starts both got it). Four
    processes start together on one folder (the runner's lock and the run folder's are both a
    training.FolderLock): exactly one gets it."""
    import subprocess
    import sys
    # each child imports, says it is ready, waits for all four, then tries; the winner holds the
    # lock until the three others have failed (so a late starter cannot take a released lock)
    code = ("import sys, time, pathlib, training\n"
            "d, name, i = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
            "(d / f'ready{i}').touch()\n"
            "t0 = time.time()\n"
            "while len(list(d.glob('ready*'))) < 4 and time.time() < t0 + 60: pass\n"
            "try:\n    l = training.FolderLock(d / 'f', name, 'x')\n"
            "except ValueError:\n    (d / f'lost{i}').touch(); sys.exit(3)\n"
            "while len(list(d.glob('lost*'))) < 3 and time.time() < t0 + 60: time.sleep(0.01)\n")
    for name in (".experiments.lock",):
        sync = tmp_path / name.strip(".")
        sync.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", code, str(sync), name, str(i)], cwd=ex.ROOT)
                 for i in range(4)]
        codes = sorted(p.wait() for p in procs)
        assert codes == [0] + [3] * 3, codes


def test_jobs_zero_is_refused_not_taken_as_the_default(tmp_path, capsys):
    args = ["--budget", "smoke", "--only", "agreement", "--results", str(tmp_path / "r"), "--jobs", "0"]
    assert training.run_cli(ex.main, args) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
