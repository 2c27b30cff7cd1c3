"""The README's quick commands, followed step by step in a fresh copy of the repository, change no
tracked file (`git status` stays clean): every output lands in an ignored folder (runs/, out/,
cache/).  The commands are read from the README itself, so a command added there is checked too;
only their sizes are shrunk (steps, tokens, instances) so that the whole walk takes seconds."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydoc_data.topics import topics

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
# train_lm.py at a size that trains in a second (the README's own flags are kept)
TINY_LM = ["--d-model", "16", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16", "--batch-size", "4",
           "--warmup", "0", "--eval-tokens", "64", "--eval-every", "0", "--probe-batch", "2", "--steps", "2"]
SHRINK = {"--tokens": "5", "--instances": "3", "--t-end": "5", "--steps": "3"}   # flag → small value


def _git(*args, cwd):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def readme_commands(section: str, blocks: bool = True) -> list[str]:
    """The `python …` lines of the bash blocks (blocks=True) and the claim table's quick `python …`
    cells of one README section, without their comments; pip and the test command are left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S) if blocks else ():
        cmds += [ln.split("  #")[0].strip() for ln in block.splitlines() if ln.startswith("python ")]
    # the claim table's quick cells (one phase cell, the agreement table; not the long experiments)
    # (one per script: the others differ only in which cells, and each script's default and
    # explicit --out are checked in tests/test_cli_errors.py)
    seen = set()
    for c in re.findall(r"\| `(python -m analysis\.(?:phase|agreement) [^`]*)` \|", body):
        if ("--cells" in c or "agreement" in c) and c.split()[2] not in seen:
            seen.add(c.split()[2])
            cmds.append(c)
    return [c for c in cmds if "pytest" not in c]


def shrink(cmd: str, run: str | None, data: Path) -> list[str]:
    """The command as argv, at a small size: the flags of SHRINK get small values, a fresh
    train_lm.py run gets TINY_LM and a small text file, and runs/<run> is the run just made."""
    argv = shlex.split(cmd.replace("runs/<run>", run or "runs/<run>"))
    for i, a in enumerate(argv[:-1]):
        if a in SHRINK:
            argv[i + 1] = SHRINK[a]
    if "analysis.phase" in argv and "--instances" not in argv:
        argv += ["--instances", SHRINK["--instances"], "--t-end", SHRINK["--t-end"]]
    if argv[:2] == ["python", "train_lm.py"] and not ({"--sample", "--eval-only", "--resume"} & set(argv)):
        argv += [*TINY_LM, "--data", str(data)]
    return [sys.executable, *argv[1:]]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git checkout of the project (CI has both)")
def test_following_the_readme_changes_no_tracked_file(tmp_path):
    # a fresh copy of the tracked files, committed, so that `git status` sees only what the
    # commands change (ignored outputs do not show)
    repo = tmp_path / "repo"
    for name in _git("ls-files", "-z", cwd=ROOT).split("\0"):
        if name and (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"]):
        _git(*args, cwd=repo)
    data = tmp_path / "english.txt"
    data.write_bytes("\n\n".join(topics[k] for k in sorted(topics))[:30000].encode())

    # (the runner of every experiment, under "Reproduce a claim", takes hours: its own tests
    # check that it writes only under its --results folder, out/results by default)
    cmds = readme_commands("Quick start") + readme_commands("Reproduce a claim", blocks=False)
    assert any("train_lm.py --pe rope --lam -0.1" in c for c in cmds)           # the main job is read
    assert any("--sample" in c for c in cmds) and any("analysis.phase" in c for c in cmds)
    # every command in ONE Python process of the copy (torch is imported once): each script runs as
    # `python …` would run it (runpy, __main__, its own argv), and runs/<run> is the run just made
    argvs = [shrink(cmd, "runs/<run>", data)[1:] for cmd in cmds]
    p = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs)], cwd=repo, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("ok: ") == len(argvs), p.stdout[-2000:]
    assert _git("status", "--porcelain", cwd=repo) == ""                         # nothing tracked changed


DRIVER = """
import glob, json, runpy, sys
sys.path.insert(0, ".")
for argv in json.loads(sys.argv[1]):
    made = sorted(glob.glob("runs/*/ckpt.pt"))
    argv = [a.replace("runs/<run>", made[0][:-len("/ckpt.pt")]) if made else a for a in argv]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code or 0
    if code:
        sys.exit(f"{' '.join(argv)} exited {code}")
    print("ok: " + " ".join(argv), flush=True)
"""
