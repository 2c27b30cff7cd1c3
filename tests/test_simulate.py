"""The ODE simulation demo (analysis/simulate.py): the script runs, writes its four files and
refuses bad input in one sentence."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

import regimes
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


def test_lambda_regime_is_read_off_the_realised_pair():
    """The λ-term changes the logits to W + λM, so the identity (I) needs A_λ = (W + λM)(Vᵀ)⁻¹, not A.
    The issue's counterexample, then a sampled instance (seed 7, d = 2) where the two readings differ."""
    W = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    A = -torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=torch.float64)
    V = torch.linalg.solve(A, W).T                               # A Vᵀ = W
    W_lam, A_lam = regimes.lam_interaction(W, V, -0.9)
    assert torch.allclose(A_lam @ V.T, W_lam, atol=1e-12)        # A_λ Vᵀ = W + λI
    ev = torch.linalg.eigvalsh((A_lam + A_lam.T) / 2)
    assert torch.allclose(ev, torch.tensor([-1.1328, 0.1228], dtype=torch.float64), atol=1e-4)
    assert regimes.classify_matrices(W_lam, A) == "convergent"   # the wrong reading
    assert regimes.classify_matrices(W_lam, A_lam) == "intermediate"
    res = simulate.simulate("convergent", lam=-0.9, d=2, n=4, t_end=1.0, dt=0.1, seed=7)
    assert res["predicted"] == "intermediate"                    # (W + λI, A) would say convergent
    assert regimes.classify_matrices(regimes.logit_form(res["W"], -0.9), res["A"]) == "convergent"
    # λ = 0: the pair is exactly (W, A)
    assert simulate.simulate("convergent", d=2, n=4, t_end=1.0, dt=0.1, seed=7)["predicted"] == "convergent"
