"""Every script's command line: a bad flag is one sentence on stderr and exit 2, never a usage block."""
import importlib

import pytest

import training


@pytest.mark.parametrize("module", ["analysis.agreement", "analysis.simulate", "analysis.phase", "analysis.reports",
                                    "spectral.decomposition", "spectral.tasks"])
def test_a_bad_flag_is_one_sentence_not_a_usage_block(module, capsys):
    """The scripts' parsers are training.ArgParser: an unknown flag or a bad value is one line on
    stderr and exit 2 (run_cli), not argparse's usage block."""
    mod = importlib.import_module(module)
    assert training.run_cli(mod.main, ["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "usage:" not in err
