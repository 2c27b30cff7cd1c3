"""Every script's command line: a bad flag is one sentence on stderr and exit 2, never a usage block."""
import argparse
import importlib
import runpy
import sys
from pathlib import Path

import pytest

import training
from analysis import simulate

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("module", ["analysis.agreement", "analysis.simulate", "analysis.phase", "analysis.reports",
                                    "spectral.decomposition", "spectral.tasks", "rope", "analysis.bench",
                                    "train_lm", "train_vit", "analysis.tabulate"])
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


@pytest.mark.parametrize("module", ["analysis.agreement", "analysis.simulate", "analysis.phase", "analysis.reports",
                                    "analysis.bench", "spectral.decomposition"])
def test_default_outputs_go_to_an_ignored_folder_never_into_results(module, monkeypatch):
    """Nothing a user runs with its defaults may overwrite a tracked file: every script's default
    --out lies under out/ (ignored by git); results/ is written only when asked for (--out
    results/..., which analysis.experiments passes)."""
    mod = importlib.import_module(module)
    seen = {}

    class Stop(Exception):
        pass

    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        ns = real(self, args, namespace)
        seen["out"] = ns.out
        raise Stop
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    argv = {"analysis.reports": ["--model", "minilm"], "analysis.agreement": ["--instances", "1"]}.get(module, [])
    with pytest.raises(Stop):
        mod.main(argv)
    out = seen["out"]
    assert out is None or str(out).startswith("out/"), out
    assert (ROOT / ".gitignore").read_text().count("\nout/\n") == 1


def test_the_simulation_demo_gives_each_setting_its_own_folder(tmp_path, monkeypatch):
    """The README's three `analysis.simulate --regime R` commands no longer share one folder."""
    monkeypatch.chdir(tmp_path)
    for regime in ("convergent", "divergent"):
        assert simulate.main(["--regime", regime, "--t-end", "0.2", "--dt", "0.1"]) == 0
    assert sorted(p.name for p in (tmp_path / "out" / "ode").iterdir()) == ["convergent-none", "divergent-none"]
