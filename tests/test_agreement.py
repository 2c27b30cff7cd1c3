"""analysis/agreement.py: the fate rules, the RoPE predictions, a small agreement run and its CLI."""

import torch

import regimes
from analysis import agreement

f64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rope_offset_regimes_and_batch_predictions_agree():
    Q, K, V = regimes.sample_instances("divergent", 4, 6, generator=gen(6))
    offs = list(range(-3, 4))
    preds = agreement.rope_predictions(Q, K, V, offs)
    for b in range(6):
        per = {r["regime"] for r in regimes.rope_offset_regimes(Q[b], K[b], V[b], offs)}
        assert preds[b] == (per.pop() if len(per) == 1 else None)
        assert regimes.rope_offset_regimes(Q[b], K[b], V[b], [0])[0]["regime"] == "divergent"


def test_agreement_small_run_confirms_the_predictions():
    rows = agreement.agreement_table(24, t_end=15.0, progress=False)
    cell = {(r["regime"], r["A"], r["pe"]): r for r in rows}
    assert len(rows) == 18
    for pe in ("none", "abs"):
        assert cell[("convergent", "symmetric", pe)]["agreement"] == 1.0
        assert cell[("divergent", "symmetric", pe)]["agreement"] == 1.0
        assert cell[("divergent", "general", pe)]["agreement"] == 1.0
    for r in rows:
        assert r["converged"] + r["diverged"] + r["neither"] == 24
    # the arms are paired: absolute PE starts from the same driving tokens y₀ = x₀ + p as no PE,
    # and y obeys the no-PE field, so every cell's fate counts are the same
    for regime in ("convergent", "divergent", "intermediate"):
        for A in ("symmetric", "general"):
            a, b = cell[(regime, A, "none")], cell[(regime, A, "abs")]
            assert [a[f] for f in agreement.FATES] == [b[f] for f in agreement.FATES]
    assert "| convergent | symmetric | none | 24 |" in agreement.format_table(rows)


def test_observed_fate_rules():
    norms = torch.tensor([[1.0, 1.0, 1.0], [0.6, 5.0, 1.0], [0.3, 20.0, 1.1]], dtype=f64)
    assert agreement.observed_fate(norms, torch.tensor([False, False, False])) == \
        ["converged", "diverged", "neither"]
    assert agreement.observed_fate(norms, torch.tensor([False, False, True]))[2] == "diverged"


def test_cli_agreement_and_bad_input(tmp_path, capsys):
    assert agreement.main(["--instances", "3", "--t-end", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "agreement.md").read_text().count("\n") == 20
    assert (tmp_path / "agreement.csv").exists()
    capsys.readouterr()
    for bad in (["--instances", "0"], ["--instances", "3", "--d", "3"]):
        assert agreement.main([*bad, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("agreement.py: ") and "\n" not in err
        assert not (tmp_path / "x").exists()
