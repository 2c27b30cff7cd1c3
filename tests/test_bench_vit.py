"""analysis/bench_vit.py (was train_vit.py --bench): every variant is built, timed and reported,
with the FLOPs of F = n (6 N + 12 L n d); a bad --bench-variants entry is one sentence, exit 2."""
import json

import pytest

import training
from analysis import bench_vit


def cli(argv):
    """python -m analysis.bench_vit, in-process: (exit code)."""
    return training.run_cli(bench_vit.main, [str(a) for a in argv])


def test_bench_reports_every_variant(tmp_path):
    assert cli(["--device", "cpu", "--d-model", 16, "--n-layers", 1, "--n-heads", 2, "--image-size", 16,
                "--patch-size", 8, "--batch-size", 2, "--bench-steps", 1, "--bench-rounds", 1,
                "--peak-tflops", 1.0, "--out", tmp_path / "b"]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = report["rows"]
    assert rows[0]["variant"].startswith("plain") and rows[0]["ratio_to_plain"] == 1.0 and len(rows) == 10
    assert report["tokens_per_image"] == 5 and all(r["images_per_s"] > 0 and r["mfu"] > 0 for r in rows)
    # F = n (6 N + 12 L n d) for the plain model: N = 192·16 patch + 4·16² attention + 2·16·64 MLP + 16·1000 head
    assert rows[0]["gflop_per_image"] * 1e9 == pytest.approx(5 * (6 * (192 * 16 + 4 * 256 + 2 * 1024 + 16000)
                                                                   + 12 * 1 * 5 * 16))


def test_an_unknown_variant_is_one_sentence_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["--bench-variants", "plain,rope", "--device", "cpu", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown --bench-variants" in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()
