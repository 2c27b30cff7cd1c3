"""training.py: schedule, checkpoints, exact resume through a real SIGTERM, gradient accumulation,
run folder, AdamW's parameter groups, verified downloads, and the one-sentence / exit-2 contract."""
import hashlib
import http.server
import os
import random
import signal
import threading

import numpy as np
import pytest
import torch

import ode_attention
import regimes
import training
from data import download as data_download


def test_cosine_lr_closed_form():
    lr, lo, w, S = 1e-3, 1e-4, 10, 110
    f = lambda s: training.cosine_lr(s, lr=lr, total=S, warmup=w, min_lr=lo)
    # warmup: lr (s + 1) / w, reaching the peak at s = w − 1
    assert [f(s) for s in range(w)] == pytest.approx([lr * (s + 1) / w for s in range(w)])
    assert f(w) == pytest.approx(lr)
    # half-way through the cosine: (lr + lr_min) / 2; at the end: lr_min
    assert f(w + (S - w) // 2) == pytest.approx((lr + lo) / 2)
    assert f(S) == pytest.approx(lo) and f(S + 50) == pytest.approx(lo)
    after = [f(s) for s in range(w, S + 1)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    # min_lr = lr is a constant schedule (the enwik8 preset)
    assert training.cosine_lr(37, lr=lr, total=S, min_lr=lr) == pytest.approx(lr)


def test_checkpoint_roundtrip_corruption_and_config_check(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "run" / "ckpt.pt"
    training.save_checkpoint(path, model=model, optimizer=opt, step=7, config={"d": 3})
    assert sorted(os.listdir(path.parent)) == ["ckpt.pt"]          # no temporary file left
    state = training.load_checkpoint(path.parent)                  # a folder finds its ckpt.pt
    assert state["step"] == 7 and state["config"] == {"d": 3}
    assert torch.equal(state["model"]["weight"], model.weight)
    # truncated and garbage files are one ValueError sentence
    (tmp_path / "trunc.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    for bad in ("trunc.pt", "junk.pt", "missing.pt"):
        with pytest.raises(ValueError, match="checkpoint"):
            training.load_checkpoint(tmp_path / bad)
    with pytest.raises(ValueError, match=r"d=3.*d=4"):
        training.check_config({"d": 3}, {"d": 4}, ["d"])
    with pytest.raises(ValueError, match="does not fit"):
        training.restore(state, torch.nn.Linear(3, 5), opt)


def test_rng_state_roundtrip():
    training.seed_everything(3)
    state = training.rng_state()
    a = (torch.rand(3), np.random.rand(2), random.random())
    training.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


# -- the shared loop on a tiny regression model ----------------------------------------------------
def _tiny_run(tmp, *, steps, grad_accum=1, kill_at=None, resume=False, batch=8, dropout=0.3,
              kill_in_final=False):
    """A 2-layer MLP with dropout (so RNG state matters) trained by training.train_loop."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(dropout), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rt = training.Runtime(device=torch.device("cpu"))
    run = training.RunDir(tmp)
    start = training.restore(training.load_checkpoint(run.ckpt), model, opt) if resume else 0
    run.start({"d": 4}, resume_step=start if resume else None)
    micro = training.split_batch(batch, rt, grad_accum)

    def batch_fn(step, m):  # a pure function of (step, micro)
        g = torch.Generator().manual_seed(1000 * step + 1)
        x = torch.randn(batch, 4, generator=g)
        y = torch.sin(x.sum(1, keepdim=True))
        return x[m * micro:(m + 1) * micro], y[m * micro:(m + 1) * micro]

    def loss_fn(mdl, b):
        if loss_fn.step == kill_at:
            os.kill(os.getpid(), signal.SIGTERM)                       # a real signal, mid-step
        loss_fn.step += 1
        return torch.nn.functional.mse_loss(mdl(b[0]), b[1]), len(b[0])
    loss_fn.step = start * grad_accum

    def evals(m, final):
        if final and kill_in_final:
            os.kill(os.getpid(), signal.SIGTERM)                       # a real signal, mid-evaluation
            for _ in range(10 ** 7):                                   # a long evaluation ...
                pass
            evals.finished = True                                      # ... that must not finish
        return {"val": {"loss": float(torch.nn.functional.mse_loss(m(torch.ones(2, 4)), torch.zeros(2, 1)))}}
    evals.finished = False
    out = training.train_loop(model, opt, rt=rt, run=run, config={"d": 4}, steps=steps, batch_fn=batch_fn,
                              loss_fn=loss_fn, eval_fn=evals, lr=0.05, warmup=2, grad_accum=grad_accum,
                              clip=1.0, eval_every=3, log_every=1, start_step=start)
    out["evals"] = evals
    return out, model, run


def test_sigterm_saves_and_resume_replays_the_uninterrupted_run(tmp_path):
    full, m_full, run_full = _tiny_run(tmp_path / "a", steps=8)
    assert full["status"] == "done"
    part, _, run = _tiny_run(tmp_path / "b", steps=8, kill_at=4)
    assert part["status"] == "interrupted" and part["signal"] == signal.SIGTERM and part["step"] == 5
    assert training.load_checkpoint(run.ckpt)["step"] == 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # handlers restored
    done, m_res, run = _tiny_run(tmp_path / "b", steps=8, resume=True)
    assert done["status"] == "done"
    key = lambda rows: [(r["step"], r["split"], r["metric"], r["value"]) for r in rows
                        if not r["metric"].endswith("_per_s")]
    assert key(run.read()) == key(run_full.read())                 # bit-for-bit the same losses
    for p, q in zip(m_full.parameters(), m_res.parameters()):
        assert torch.equal(p, q)
    assert (run.path / "loss.png").stat().st_size > 1000


def test_a_signal_during_the_final_evaluation_stops_it_and_resume_only_evaluates(tmp_path, capsys):
    full, _, run_full = _tiny_run(tmp_path / "a", steps=6)
    part, _, run = _tiny_run(tmp_path / "b", steps=6, kill_in_final=True)
    # the evaluation was cut short at once (not run to the end and then reported as done)
    assert not part["evals"].finished
    assert part["status"] == "interrupted" and part["during"] == "final evaluation"
    assert part["signal"] == signal.SIGTERM and part["step"] == 6
    assert training.load_checkpoint(run.ckpt)["step"] == 6                # training was saved first
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    # nothing of the unfinished evaluation was written: the rows end with the last periodic one
    assert not [r for r in run.read() if r["split"] == "val" and r["step"] == 6]
    code = training.interrupted_exit(part, run, training.Runtime(device=torch.device("cpu")))
    assert code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "during the final evaluation" in err and f"--resume {run.path}" in err
    # resuming trains nothing and writes exactly the rows an unbroken run has
    done, _, run = _tiny_run(tmp_path / "b", steps=6, resume=True)
    assert done["status"] == "done" and done["step"] == 6
    key = lambda rows: [(r["step"], r["split"], r["metric"], r["value"]) for r in rows
                        if not r["metric"].endswith("_per_s")]
    assert key(run.read()) == key(run_full.read())


def test_grad_accumulation_is_the_full_batch_gradient(tmp_path):
    # Σₘ ∇ mean_loss(m) / k = ∇ mean_loss(batch): 1, 2 and 4 micro-batches take the same steps
    params = []
    for k in (1, 2, 4):
        _, model, run = _tiny_run(tmp_path / f"k{k}", steps=4, grad_accum=k, dropout=0.0)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert [r["step"] for r in run.read() if r["metric"] == "loss" and r["split"] == "train"] == [1, 2, 3, 4]
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(params[0], params[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple"):
        training.split_batch(6, training.Runtime(device=torch.device("cpu"), world_size=2), 2)


def test_run_dir_truncates_rows_after_the_checkpoint(tmp_path):
    run = training.RunDir(tmp_path / "r")
    run.start({"a": 1})
    for s in range(1, 6):
        run.log(s, "train", {"loss": 1.0 / s})
    with open(run.metrics, "a") as f:
        f.write("6,train,lo")                                      # a row cut by a hard kill
    run.start({"a": 1}, resume_step=3)
    assert [r["step"] for r in run.read()] == [1, 2, 3]
    assert (tmp_path / "r" / "config.json").exists() and (tmp_path / "r" / "versions.json").exists()


class _Net(torch.nn.Module):
    """Blocks with every kind of λ-term and θ parameter, a learned position table and a class token."""

    def __init__(self):
        super().__init__()
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = torch.nn.Embedding(4, 8)
        self.blocks = torch.nn.ModuleList([
            ode_attention.Block(8, 2, lam=-0.1, lam_mode="identity", regime="free"),
            ode_attention.Block(8, 2, lam=0.05, lam_mode="softplus-diag", regime="convergent"),
            ode_attention.Block(8, 2, lam=0.05, lam_mode="softplus-diag", regime="intermediate", bias=True)])
        self.head = torch.nn.Linear(8, 3)


def test_make_adamw_decays_weight_matrices_only():
    model = _Net()
    opt = training.make_adamw(model, lr=1e-3, beta2=0.95, weight_decay=0.1, device=torch.device("cpu"),
                              no_decay=[model.cls, model.pos.weight])
    decay, rest = (g["params"] for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # the rule the groups replace (by name suffix): the same members, in the same order
    old = [p for n, p in model.named_parameters()
           if p.dim() >= 2 and not n.endswith(("lam", "lam_phi", "theta", "cls", "pos.weight"))]
    assert [id(p) for p in decay] == [id(p) for p in old]
    assert [id(p) for p in rest] == [id(p) for p in model.parameters() if id(p) not in {id(q) for q in old}]
    kept = {id(p) for p in rest}
    assert any(p.dim() >= 2 for p in ode_attention.no_decay_parameters(model))       # lam_phi is (H, d_h)
    assert all(id(p) in kept for p in ode_attention.no_decay_parameters(model))
    assert id(model.cls) in kept and id(model.pos.weight) in kept
    # without the explicit list the class token and positions are decayed like any matrix
    opt = training.make_adamw(model, lr=1e-3, beta2=0.95, weight_decay=0.1, device=torch.device("cpu"))
    assert {id(model.cls), id(model.pos.weight)} <= {id(p) for p in opt.param_groups[0]["params"]}


# -- downloads ------------------------------------------------------------------------------------
@pytest.fixture
def http_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "data.zip").write_bytes(b"real bytes " * 1000)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(root))
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", root
    srv.shutdown()


def test_download_verifies_before_renaming(http_server, tmp_path):
    url, root = http_server
    body = (root / "data.zip").read_bytes()
    good = hashlib.sha256(body).hexdigest()
    cache = tmp_path / "cache"
    # a wrong checksum: ValueError, and nothing at the destination
    with pytest.raises(ValueError, match="checksum"):
        data_download.download(f"{url}/data.zip", cache / "d.zip", sha256="0" * 64)
    assert list(cache.iterdir()) == []
    # the first URL is dead, the mirror works: downloaded, verified, renamed into place
    p = data_download.download([f"{url}/missing.zip", f"{url}/data.zip"], cache / "d.zip", sha256=good, size=len(body))
    assert p.read_bytes() == body and sorted(os.listdir(cache)) == ["d.zip"]
    md5 = hashlib.md5(body).hexdigest()
    assert data_download.download("http://127.0.0.1:9/never", cache / "d.zip", md5=md5) == p  # cached: no network
    # a cached file that no longer matches is refused
    (cache / "d.zip").write_bytes(body[:-1])
    with pytest.raises(ValueError, match="truncated|checksum"):
        data_download.download(f"{url}/data.zip", cache / "d.zip", size=len(body))
    # offline: one sentence naming where to put the file by hand
    with pytest.raises(ValueError, match=r"offline.*put it at .*e\.zip"):
        data_download.download("http://127.0.0.1:9/e.zip", cache / "e.zip", timeout=5)
    assert not (cache / "e.zip").exists() and not any(n.startswith("e.zip.part") for n in os.listdir(cache))


def test_run_cli_turns_user_errors_into_exit_2(capsys):
    def bad(argv):
        raise ValueError("the corpus is empty\nsecond line never shown")
    assert training.run_cli(bad, []) == 2
    err = capsys.readouterr().err
    assert err == "error: the corpus is empty\n"
    p = training.ArgParser()
    p.add_argument("--pe", choices=("rope",))
    with pytest.raises(ValueError, match="invalid choice"):
        p.parse_args(["--pe", "nope"])


def test_realised_inertia_names_each_form_and_warns_when_float32_lost_it(capsys):
    """training.realised_inertia (written to summary.json by both training scripts): one row per
    constrained form, by module path, and one warning line for a form whose float32 L D Lᵀ no
    longer has the inertia it was built with (an ill-conditioned L: cond(L|D|^½) ≫ 3·10⁴)."""
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.good = regimes.PrescribedInertia(8, n_neg=8, generator=torch.Generator().manual_seed(0))
            self.bad = regimes.PrescribedInertia(8, n_neg=8, antisymmetric=False, l_std=8.0,
                                                 generator=torch.Generator().manual_seed(500))
    rows = training.realised_inertia(Two())
    assert [(r["module"], r["kept"]) for r in rows] == [("good", True), ("bad", False)]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: bad was built with inertia (0, 8, 0)")
    assert training.realised_inertia(torch.nn.Linear(3, 3)) == []


def test_progress_in_a_log_is_one_line_per_log_step_not_bar_frames(tmp_path, capsys):
    """stderr not a terminal (a log file, pytest): no tqdm bar frames, one nanoGPT-style line per
    log step on stdout:  step N | loss L | R unit/s | T s."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = training.Runtime(device=torch.device("cpu"))
    (tmp_path / "r").mkdir()
    run = training.RunDir(tmp_path / "r")
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    res = training.train_loop(model, opt, rt=rt, run=run, config={}, steps=6, log_every=2, lr=0.1,
                              batch_fn=lambda step, micro: (x, y),
                              loss_fn=lambda m, b: (torch.nn.functional.mse_loss(m(b[0]), b[1]), len(b[0])))
    assert res["status"] == "done"
    cap = capsys.readouterr()
    lines = [l for l in cap.out.splitlines() if l.startswith("step ")]
    assert [l.split(" | ")[0] for l in lines] == ["step 2", "step 4", "step 6"]
    assert all(len(l.split(" | ")) == 4 and l.endswith(" s") and " tok/s" in l for l in lines)
    assert "\r" not in cap.err and "it/s" not in cap.err and "step/s" not in cap.err
    assert training._si(11234.5) == "11.2k" and training._si(3.4e6) == "3.4M" and training._si(12) == "12"


def test_atomic_write_flushes_the_file_and_the_folder_before_and_after_the_rename(tmp_path, monkeypatch):
    """Nothing was fsynced: after a power cut a renamed file could be empty. Now the temporary
    file is flushed before os.replace and its folder after it."""
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (order.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(("replace", str(b))), real_replace(a, b)))
    training.atomic_write(tmp_path / "a.json", lambda tmp: open(tmp, "w").write("{}"))
    kinds = [k for k, _ in order]
    assert kinds == ["fsync", "replace", "fsync"]
    assert ".a.json.tmp" in order[0][1] and order[2][1] == str(tmp_path)
    assert (tmp_path / "a.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_an_interrupted_download_leaves_no_part_file(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM turned into an exception) in the middle of a download: the .partPID file
    is removed and the interrupt goes on."""
    class Body:
        headers = {"Content-Length": "10"}

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self, n):
            raise KeyboardInterrupt
    monkeypatch.setattr(data_download.urllib.request, "urlopen", lambda url, timeout=None: Body())
    with pytest.raises(KeyboardInterrupt):
        data_download.download("http://example.invalid/x.bin", tmp_path / "x.bin", size=10)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_outside_the_training_loop_is_one_line_and_exit_130(capsys):
    """A KeyboardInterrupt while data loads or a report is written used to print a traceback."""
    def main(argv):
        raise KeyboardInterrupt
    assert training.run_cli(main, []) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted (Ctrl-C)") and "Traceback" not in err
