"""analysis.bench runs end to end on a tiny size, its two solvers agree on what they computed, and
its helpers (FLOPs per token, the variant selection) shared by analysis.bench_lm / bench_vit."""

import json

import pytest
import torch

from analysis import bench


def test_bench_runs_and_the_solvers_agree(tmp_path):
    pytest.importorskip("torchdiffeq", reason="pip install -r requirements-extra.txt")
    assert bench.main(["--device", "cpu", "--instances", "64", "--t-end", "0.5", "--dt", "0.05",
                       "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
                       "--batch-size", "2", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    rk, dp = [r for r in rep["ode"] if r["method"] == "rk4"], [r for r in rep["ode"] if r["method"] == "dopri5"]
    assert [r["dtype"] for r in rk] == ["float64", "float32"]
    assert [(r["rtol"], r["error_norm"]) for r in dp] == [(t, m) for t in (1e-4, 1e-6, 1e-8) for m in ("max", "rms")]
    for r in rep["ode"]:
        assert r["ours_s"] > 0 and r["torchdiffeq_s"] > 0
    # classical RK4 vs torchdiffeq's 3/8 rule: both O(h⁴), they differ by ~2e-5 here
    assert rk[0]["max_abs_diff"] < 1e-4 and rk[1]["max_abs_diff"] < 1e-4
    assert rk[0]["ours_evals"] == rk[0]["torchdiffeq_evals"] == 40                  # 10 steps × 4
    # dopri5: the achieved error falls with rtol; the batch RMS norm never needs more evaluations
    # than bounding every instance, and bounding every instance never ends less accurate
    for mode in ("max", "rms"):
        errs = [r["ours_error"] for r in dp if r["error_norm"] == mode]
        assert errs[0] > errs[2] and all(e < 1e-2 for e in errs)
    for a, b in zip(dp[::2], dp[1::2]):
        assert b["ours_evals"] <= a["ours_evals"] and a["ours_error"] <= 1.5 * b["ours_error"]
    ours, plain = rep["lm"]
    assert ours["parameters"] == plain["parameters"]               # the same shape, to the weight
    assert plain["ratio_to_plain"] == 1.0 and ours["tokens_per_s"] > 0
    assert "| rk4 to t = 0.5 | float64 |" in (tmp_path / "bench.md").read_text()


def test_the_scaling_sweep_reports_both_layouts_and_draws_its_figure(tmp_path):
    rows = bench.bench_scaling(torch.device("cpu"), rounds=1, steps=2, quick=True)
    assert [(r["n"], r["d"], r["layout"]) for r in rows] == [(8, 4, "batch-last"), (8, 16, "batch-first")]
    assert rows[0]["batch_first_instance_steps_per_s"] > 0 and "layout_speedup" not in rows[1]
    bench.plot_scaling(rows, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_flops_per_token_counts_weight_matrices_and_attention():
    # F = 6 N + 12 L n d, N = matrix parameters without the position table
    model = bench.PlainGPT(256, 32, 2, 2, 16)
    n_mat = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and "pos" not in n)
    assert bench.flops_per_token(model, 2, 16, 32) == 6 * n_mat + 12 * 2 * 16 * 32
    assert bench.peak_tflops(bench.Runtime(device=torch.device("cpu"))) is None
    assert bench.peak_tflops(bench.Runtime(device=torch.device("cpu")), 100.0) == 100.0


def test_select_variants_puts_plain_first_and_names_an_unknown_one():
    table = {"plain": ("plain", {}), "rope": ("rope", {"pe": "rope"}), "lam": ("λ", {"lam": -0.1})}
    assert bench.select_variants(table, None) == list(table.values())
    assert bench.select_variants(table, "lam, rope") == [table["plain"], table["lam"], table["rope"]]
    with pytest.raises(ValueError, match="unknown --bench-variants entry 'nope'"):
        bench.select_variants(table, "rope,nope")


def test_without_torchdiffeq_the_integrator_table_is_one_sentence(tmp_path, monkeypatch, capsys):
    """torchdiffeq is an optional extra: without it the report says so in one line instead of
    printing a table header with no rows."""
    import builtins
    real = builtins.__import__

    def no_tdq(name, *args, **kwargs):
        if name == "torchdiffeq":
            raise ImportError("No module named 'torchdiffeq'", name="torchdiffeq")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tdq)
    assert bench.main(["--device", "cpu", "--instances", "8", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
                       "--seq-len", "16", "--batch-size", "2", "--rounds", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "bench.md").read_text()
    assert "| integrator |" not in md and "not measured (torchdiffeq is not installed" in md
    assert json.loads((tmp_path / "bench.json").read_text())["ode"] == []


def test_the_compiled_row_and_the_variants_table_come_in_the_same_run(tmp_path, monkeypatch):
    # --all's two new parts at a tiny size: compiled vs eager RK4 (same answer to round-off: the
    # instances are convergent), and bench_lm's variants with a spread per variant
    real = bench.bench_variants
    monkeypatch.setattr(bench, "bench_variants", lambda dev, r, s: real(dev, r, s, shape=[
        "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "2"]))
    monkeypatch.setattr(bench, "bench_ode", lambda *a, **k: [])
    assert bench.main(["--device", "cpu", "--instances", "64", "--t-end", "0.5", "--dt", "0.05", "--compiled",
                       "--variants", "--variant-rounds", "1", "--d-model", "32", "--n-layers", "1", "--n-heads",
                       "2", "--seq-len", "16", "--batch-size", "2", "--rounds", "1", "--steps", "1",
                       "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "bench.json").read_text())
    c = rep["compiled"]
    assert c["steps"] == 10 and c["max_abs_diff"] < 1e-12 and c["first_call_s"] > 0 and c["speedup_vs_auto"] > 0
    names = [r["variant"] for r in rep["variants"]["rows"]]
    assert names[0] == "plain (--lam 0)" and "rope + lam identity -0.1" in names and "regime convergent" in names
    assert rep["variants"]["config"]["pe"] == "learned"
    for r in rep["variants"]["rows"]:
        assert r["ratio_range"][0] <= r["ratio_range"][1] and r["tokens_per_s"] > 0
    md = (tmp_path / "bench.md").read_text()
    assert "RK4 compiled" in md and "| rope + lam identity -0.1 |" in md
