"""analysis/bench_lm.py (was train_lm.py --bench): every variant is built, timed and reported in
bench.json; a bad --bench-variants entry is one sentence, exit 2, nothing written."""
import json

import training
from analysis import bench_lm


def cli(argv):
    """python -m analysis.bench_lm, in-process: (exit code)."""
    return training.run_cli(bench_lm.main, [str(a) for a in argv])


def test_bench_reports_every_variant(tmp_path):
    assert cli(["--device", "cpu", "--d-model", 16, "--n-layers", 1, "--n-heads", 2, "--seq-len", 16,
                "--batch-size", 2, "--bench-steps", 1, "--bench-rounds", 1, "--out", tmp_path / "b"]) == 0
    rows = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert [r["variant"] for r in rows][0].startswith("plain") and len(rows) == 6
    assert rows[0]["ratio_to_plain"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)


def test_an_unknown_variant_is_one_sentence_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["--bench-variants", "plain,nope", "--device", "cpu", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown --bench-variants" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
