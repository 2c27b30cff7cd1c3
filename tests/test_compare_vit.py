"""analysis/compare_vit.py (was train_vit.py --compare): one train_vit.py process per (PE, seed),
finished runs reused, the table and the figure written; a bad --pes entry is one sentence, exit 2;
_strip removes exactly the given flags."""
import csv

import training
from analysis import compare_vit
from test_data_images import cifar_archive
from test_train_vit import TINY
from test_train_vit import cli as train_cli


def cli(argv):
    """python -m analysis.compare_vit, in-process: (exit code)."""
    return training.run_cli(compare_vit.main, [str(a) for a in argv])


def test_compare_runs_every_pe_and_tabulates(tmp_path):
    out = tmp_path / "cmp"
    common = ["--data", cifar_archive(tmp_path / "c.tar.gz"), "--patch-size", 8, "--steps", 2, "--eval-every", 0, *TINY]
    # one run made in-process beforehand (compare keeps finished runs), one launched as a process
    assert train_cli([*common, "--pe", "none", "--seed", 0, "--out", tmp_path / "runs" / "none-seed0"]) == 0
    assert cli(["--pes", "none,rope-axial", "--seeds", 1, "--jobs", 1, "--out", out,
                "--runs-dir", tmp_path / "runs", *common]) == 0
    assert (tmp_path / "runs" / "rope-axial-seed0" / "summary.json").exists()
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["pe"], r["seed"]) for r in rows] == [("none", "0"), ("rope-axial", "0")]
    assert "| rope-axial |" in (out / "compare.md").read_text() and (out / "compare.png").stat().st_size > 0


def test_strip_removes_the_given_flags_and_their_values():
    argv = ["--pes", "none,learned", "--steps", "5", "--seeds=2", "--out", "o", "--lr", "1e-3", "--jobs", "1"]
    assert compare_vit._strip(argv, compare_vit.OWN_FLAGS) == ["--steps", "5", "--lr", "1e-3"]


def test_an_unknown_pe_is_one_sentence_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    for flag in ("--pes", "--compare"):                 # --compare: the old name, still accepted
        assert cli([flag, "none,rope2d", "--out", out, "--steps", 2, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "unknown PE" in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
