"""The ODE simulation demo (analysis/simulate.py): the script runs, writes its four files and
refuses bad input in one sentence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import simulate

ROOT = Path(__file__).resolve().parents[1]


def test_script_runs_and_bad_input_exits_2(tmp_path):
    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "analysis.simulate", "--regime", "divergent",
                        "--pe", "rope", "--lam", "-0.1", "--t-end", "5", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "predicted regime: divergent" in r.stdout and "observed fate:    diverged" in r.stdout
    for name in ("trajectories.png", "probes.png", "probes.csv", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["predicted"] == "divergent" and summary["observed"] == "diverged"
    assert (out / "probes.csv").read_text().splitlines()[0] == "t,norm,pairwise_distance,sharpness,cosine"
    r = subprocess.run([sys.executable, "-m", "analysis.simulate", "--d", "3", "--pe", "rope"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", [["--pe", "rope", "--d", "3"], ["--dt", "0"], ["--lam", "nan"],
                                 ["--pe", "abs", "--d", "5"], ["--n", "1"]])
def test_script_bad_input_one_sentence_exit_2(bad, tmp_path, capsys):
    assert simulate.main([*bad, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("simulate.py: ") and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_simulate_predicts_and_observes_the_convergent_regime():
    res = simulate.simulate("convergent", d=2, n=6, t_end=60.0, dt=0.1, symmetric_A=True, seed=1)
    assert res["predicted"] == "convergent" and res["rope_kept"] is None
    assert res["traj"].X.shape == (401, 6, 2) and set(res["probes"]) == {"norm", "pairwise_distance",
                                                                          "sharpness", "cosine"}
    assert float(res["probes"]["norm"][-1]) < float(res["probes"]["norm"][0])
