"""Every script's command line: a bad flag is one sentence on stderr and exit 2, never a usage block."""
import importlib
import runpy
import sys
from pathlib import Path

import pytest

import training


@pytest.mark.parametrize("module", ["analysis.agreement", "analysis.simulate", "analysis.phase", "analysis.reports",
                                    "spectral.decomposition", "spectral.tasks", "rope", "analysis.bench",
                                    "train_lm", "train_vit"])
def test_a_bad_flag_is_one_sentence_not_a_usage_block(module, capsys):
    """The scripts' parsers are training.ArgParser: an unknown flag or a bad value is one line on
    stderr and exit 2 (run_cli), not argparse's usage block."""
    mod = importlib.import_module(module)
    assert training.run_cli(mod.main, ["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err


def test_rope_script_is_one_sentence_without_a_usage_block(tmp_path, monkeypatch, capsys):
    """`python rope.py` itself (its __main__ block, run in-process), not only its main(): a bad flag
    is one line on stderr and exit 2."""
    root = Path(__file__).resolve().parents[1]
    monkeypatch.setattr(sys, "argv", ["rope.py", "--no-such-flag", "--out", str(tmp_path / "r.png")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(root / "rope.py"), run_name="__main__")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "unrecognized arguments: --no-such-flag" in err and not list(tmp_path.iterdir())
