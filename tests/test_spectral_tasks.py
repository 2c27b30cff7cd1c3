"""spectral.tasks: the task generators, the classifier for every PE, MLA, and per-head ablation."""
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ode_attention as oa
import rope
import training
from spectral import decomposition
from spectral import tasks as st

DT = torch.float64
TINY = st.PRESETS["tiny"]
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- generators
def test_paper_sizes_are_the_defaults():
    p = inspect.signature(st.make_task1).parameters
    assert (p["max_gap"].default, p["max_side"].default, p["max_words"].default) == (70, 25, 120)
    p = inspect.signature(st.make_task2).parameters
    assert (p["n_triggers"].default, p["max_count"].default, p["seq_words"].default) == (30, 100, 120)
    assert st.PRESETS["paper"]["task1"]["n_samples"] == 100_000 and st.PRESETS["paper"]["task2"]["n_samples"] == 50_000
    assert st.BETAS["paper"] == (0.98, 0.9) and st.WEIGHT_DECAY == 1e-5 and st.WARMUP_FRACTION == 0.06


def _uniform_ok(labels, values, tol):
    freq = torch.stack([(labels == v).double().mean() for v in values])
    assert freq.sum().item() == pytest.approx(1.0)          # no label outside the stated set
    assert (freq - 1.0 / len(values)).abs().max() < tol


def test_task1_labels_are_the_trigger_distance_and_uniform():
    G = 10
    d = st.make_task1(6000, max_gap=G, max_side=4, max_words=20, seed=3)
    w1, w2 = d.meta["triggers"]
    _uniform_ok(d.labels, range(2, G + 2), tol=0.02)
    t = d.tokens
    # fillers never contain the triggers: each appears exactly once per sentence
    assert ((t == w1).sum(1) == 1).all() and ((t == w2).sum(1) == 1).all()
    # label = pos(w2) - pos(w1)
    assert torch.equal((t == w2).long().argmax(1) - (t == w1).long().argmax(1), d.labels)
    # words first, then right padding only
    real = (t != st.PAD).sum(1, keepdim=True)
    is_word_slot = torch.arange(t.shape[1])[None, :] < real
    assert ((t >= st.FIRST_WORD) == is_word_slot).all()
    assert len({tuple(r.tolist()) for r in d.tokens}) == len(d.labels)      # no duplicates
    assert d.n_classes == G + 2


def test_task1_paper_fillers_may_contain_triggers():
    d = st.make_task1(300, max_gap=40, max_side=10, max_words=60, seed=0, vocab_size=60,
                      fillers_include_triggers=True)
    w1, _ = d.meta["triggers"]
    assert ((d.tokens == w1).sum(1) > 1).any()


def test_task2_labels_count_the_triggers_and_are_uniform():
    C = 8
    d = st.make_task2(9000, n_triggers=5, max_count=C, seq_words=16, seed=1)
    trig = torch.tensor(d.meta["triggers"])
    assert (torch.isin(d.tokens, trig).sum(1) == d.labels).all()
    assert (d.tokens != st.PAD).all()                        # every sequence has exactly seq_words words
    _uniform_ok(d.labels, range(0, C + 1), tol=0.015)


@pytest.mark.parametrize("task", [1, 2])
def test_generators_are_reproducible_by_seed(task):
    a, b, c = st.make_task(task, "tiny", 5), st.make_task(task, "tiny", 5), st.make_task(task, "tiny", 6)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.tokens, c.tokens)


def test_generators_refuse_bad_sizes():
    with pytest.raises(ValueError):
        st.make_task1(10, max_gap=20, max_side=5, max_words=20)     # would cut a trigger
    with pytest.raises(ValueError):
        st.make_task2(10, max_count=30, seq_words=20)
    with pytest.raises(ValueError):
        st.make_task(3)


def test_length_only_accuracy_matches_the_empirical_bayes_rule():
    G, S, Wmax = 6, 3, 14
    d = st.make_task1(20000, max_gap=G, max_side=S, max_words=Wmax, seed=0)
    length = (d.tokens != st.PAD).sum(1)
    correct = 0
    for L in length.unique():
        ys = d.labels[length == L]
        correct += int(torch.bincount(ys).max())
    assert 100.0 * correct / len(d.labels) == pytest.approx(st.length_only_accuracy(G, S, Wmax), abs=1.5)
    assert st.length_only_accuracy(1, 3, 10) == 100.0


# ---------------------------------------------------------------- the classifier
def _model(pe, n_classes=8, **kw):
    torch.manual_seed(0)
    m = st.Classifier(n_classes, pe=pe, d=16, n_heads=4, n_layers=2, mlp_ratio=2.0, dropout=0.0, max_len=12,
                      mla_latent=8, **kw)
    return m.double().eval()


def test_nope_with_mean_pooling_is_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(st.FIRST_WORD, st.VOCAB_SIZE, (3, 10), generator=g)
    tokens[0, 7:] = st.PAD
    tokens[1, 4:] = st.PAD
    perm = tokens.clone()
    for i in range(3):
        n = int((tokens[i] != st.PAD).sum())
        perm[i, :n] = tokens[i, torch.randperm(n, generator=g)]
    for pe, invariant in (("none", True), ("rope", False), ("sin", False)):
        m = _model(pe)
        with torch.no_grad():
            a, b = m(tokens), m(perm)
        assert torch.allclose(a, b, atol=1e-12) == invariant, pe
    # extra padding columns change nothing either (padding mask + mean over real tokens)
    m = _model("none")
    padded = torch.cat([tokens, torch.full((3, 2), st.PAD)], 1)
    torch.testing.assert_close(m(tokens), m(padded), rtol=0, atol=1e-12)


@pytest.mark.parametrize("pe", ["none", "sin", "learned", "t5", "alibi", "rope", "rope-partial:1", "sin+rope",
                                "mla", "mla-shared"])
def test_every_pe_trains_a_few_steps_and_lowers_the_loss(pe):
    data = st.make_task(1, "tiny", 0)
    x, y = st._trim(data.tokens[:64]), data.labels[:64]
    torch.manual_seed(0)
    m = st.Classifier(data.n_classes, pe=pe, d=32, n_heads=4, n_layers=2, dropout=0.0, max_len=x.shape[1],
                      mla_latent=16)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=st.BETAS["paper"], weight_decay=st.WEIGHT_DECAY)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(m(x), y, ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_pe_names_are_checked():
    for bad in ("rotary", "rope-partial:x", "rope-partial:9", "rope-partial:K"):
        with pytest.raises(ValueError):
            st.parse_pe(bad, 8)
    assert st.parse_pe("rope-partial:3", 8) == ("rope-partial", 3)


def test_partial_rope_rotates_only_the_first_heads():
    m = _model("rope-partial:1")
    attn = m.blocks[0].attn
    assert attn.pe == "rope" and attn.rope_heads == 1
    assert all(b.attn.rope_heads == 1 for b in m.blocks)


# ---------------------------------------------------------------- MLA
def _mla_reference(mod, x, positions):
    """MLA output recomputed from decomposition.mla_logits (content term + RoPE Hadamard term)."""
    H, dh = mod.n_heads, mod.d_h
    c_q, c_kv = mod.down_q(x), mod.down_kv(x)
    k_r = mod.k_rope(x)                                      # unrotated, shared
    q_r = mod.q_rope(c_q).view(x.shape[0], -1, mod.d_r)      # (n, H or 1, d_R) unrotated
    q_c, k_c, v = mod.up_q(c_q), mod.up_k(c_kv), mod.up_v(c_kv)
    outs = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        L = decomposition.mla_logits(q_c[:, sl], k_c[:, sl], q_r[:, min(h, q_r.shape[1] - 1)], k_r, positions)["total"]
        outs.append(torch.softmax(L, -1) @ v[:, sl])
    return mod.proj(torch.cat(outs, -1)), outs


@pytest.mark.parametrize("sharing", ["per-head-q", "shared"])
def test_mla_equals_content_plus_decoupled_rope_logits(sharing):
    torch.manual_seed(1)
    mod = st.MLAAttention(16, 4, latent=8, rope_sharing=sharing).double()
    x = torch.randn(7, 16, dtype=DT)
    pos = torch.arange(7)
    ref, _ = _mla_reference(mod, x, pos.double())
    torch.testing.assert_close(mod(x[None])[0], ref, rtol=1e-10, atol=1e-12)


def test_mla_rope_is_a_true_rotation_relative_positions_only():
    torch.manual_seed(2)
    mod = st.MLAAttention(16, 4, latent=8).double()
    x = torch.randn(1, 9, 16, dtype=DT)
    q_c, k_c, v, q_r, k_r = mod.parts(x)
    # rotations preserve the norm of the RoPE parts
    torch.testing.assert_close(q_r.norm(dim=-1), mod.q_rope(mod.down_q(x)).view(1, 9, 4, -1).transpose(1, 2).norm(dim=-1))
    # shifting every position by the same amount leaves the output unchanged
    torch.testing.assert_close(mod(x), mod(x, positions=torch.arange(9) + 13), rtol=1e-10, atol=1e-12)


def test_mla_shared_gives_every_head_the_same_position_logits():
    torch.manual_seed(3)
    mod = st.MLAAttention(16, 4, latent=8, rope_sharing="shared").double()
    x = torch.randn(1, 6, 16, dtype=DT)
    _, _, _, q_r, k_r = mod.parts(x)
    assert q_r.shape[1] == 1 and k_r.shape[1] == 1


# ---------------------------------------------------------------- per-head ablation
@pytest.mark.parametrize("pe", ["rope", "mla"])
def test_ablating_a_head_changes_exactly_that_head(pe):
    m = _model(pe)
    attn = m.blocks[0].attn
    H, dh = attn.n_heads, attn.d // attn.n_heads
    captured = []
    hook = attn.proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach().clone()))
    x = torch.randn(2, 9, 16, dtype=DT, generator=torch.Generator().manual_seed(0))
    h = 2
    mask = torch.ones(H, dtype=DT)
    mask[h] = 0
    with torch.no_grad():
        full = attn(x)
        abl = attn(x, head_mask=mask)
    hook.remove()
    y_full, y_abl = captured
    sl = slice(h * dh, (h + 1) * dh)
    # the concatenated head outputs differ only in head h's slice, which is zero
    assert (y_abl[..., sl] == 0).all() and y_full[..., sl].abs().max() > 1e-3
    others = torch.ones(H * dh, dtype=torch.bool)
    others[sl] = False
    torch.testing.assert_close(y_abl[..., others], y_full[..., others], rtol=0, atol=0)
    # and the layer's output moves by exactly head h's contribution through the output map O
    O = attn.proj.weight.T                                  # row convention: y O
    torch.testing.assert_close(full - abl, y_full[..., sl] @ O[sl], rtol=1e-10, atol=1e-12)


def test_ablation_grid_and_deposit_statistics():
    data = st.make_task(1, "tiny", 0)
    m = st.Classifier(data.n_classes, pe="rope", d=16, n_heads=4, n_layers=2, dropout=0.0,
                      max_len=data.tokens.shape[1])
    base, grid = st.ablation_grid(m, data.tokens[:64], data.labels[:64])
    assert grid.shape == (2, 4)
    assert base == pytest.approx(st.accuracy(m, data.tokens[:64], data.labels[:64]))
    g = torch.full((3, 5), 80.0)
    g[0, 2] = 20.0                                          # one head costs 60 points
    g[0, 4] = 75.0
    s = st.deposit_stats(80.0, g)
    assert (s["top_layer"], s["top_head"], s["deposit"]) == (0, 2, True)
    assert s["top_drop"] == pytest.approx(60.0) and s["runner_up_drop"] == pytest.approx(5.0)
    g[0, 4] = 40.0                                          # two heads matter: no single-head deposit
    assert not st.deposit_stats(80.0, g)["deposit"]


# ---------------------------------------------------------------- training and the script
def test_train_run_learns_and_is_reproducible():
    a = st.train_run(2, "none", "tiny", 0, progress=False, ablate=False, epochs=4)
    b = st.train_run(2, "none", "tiny", 0, progress=False, ablate=False, epochs=4)
    assert a["test_acc"] == b["test_acc"] and a["history"] == b["history"]
    assert a["history"][-1]["train_loss"] < a["history"][0]["train_loss"]
    assert a["steps"] == 4 * math.ceil(a["n_train"] / TINY["train"]["batch_size"])


def test_schedule_is_warmup_then_cosine():
    lrs = [training.cosine_lr(s, lr=1.0, total=100, warmup=6) for s in range(100)]
    assert lrs[5] == pytest.approx(1.0) and lrs[0] == pytest.approx(1 / 6)
    assert all(x >= y for x, y in zip(lrs[6:], lrs[7:])) and lrs[-1] < 1e-3


def test_script_train_and_table(tmp_path, capsys):
    out = tmp_path / "res"
    assert training.run_cli(st.main, ["train", "--preset", "tiny", "--task", "2", "--pe", "alibi", "--epochs", "1",
                                      "--out", str(out)]) == 0
    res = json.loads((out / "runs" / "task2_alibi_tiny_seed0.json").read_text())
    assert len(res["ablation"]["grid"]) == TINY["model"]["n_layers"]
    assert training.run_cli(st.main, ["table", "--preset", "tiny", "--seeds", "0", "--tasks", "1", "--pes",
                                      "none,rope", "--epochs", "1", "--cache", str(tmp_path / "c"),
                                      "--out", str(out)]) == 0
    md = (out / "synthetic_tiny_results.md").read_text()
    assert "| rope |" in md and (out / "synthetic_tiny_ablation_task1_rope_mla.png").exists()
    runs = json.loads((out / "synthetic_tiny_runs.json").read_text())
    assert len(runs) == 2
    # `report` rebuilds the same table from the run files
    assert training.run_cli(st.main, ["report", "--runs", str(tmp_path / "c"), "--name", "again",
                                      "--out", str(out)]) == 0
    assert (out / "again_results.md").read_text() == md
    # a cache made with other settings is refused, not silently reused
    assert training.run_cli(st.main, ["table", "--preset", "tiny", "--seeds", "0", "--tasks", "1", "--pes", "none",
                                      "--epochs", "2", "--cache", str(tmp_path / "c"), "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_script_bad_input_is_one_sentence_and_exit_2(tmp_path, capsys):
    assert training.run_cli(st.main, ["train", "--preset", "tiny", "--pe", "rotary", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rotary" in err
    assert not any(tmp_path.iterdir())


def test_script_runs_in_module_form_from_the_project_root():
    r = subprocess.run([sys.executable, "-m", "spectral.tasks", "show", "--task", "2", "--preset", "tiny", "--n", "1"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("task 2: 256 samples"), r.stderr
    assert "python -m spectral.tasks" in st.__doc__


def test_the_concentration_index_runs_from_one_over_H_to_one():
    g = torch.full((3, 4), 80.0)
    g[0] = torch.tensor([70.0, 70.0, 70.0, 70.0])            # layer 0: every head costs 10 → C = 1/4
    g[1] = torch.tensor([20.0, 80.0, 80.0, 85.0])            # layer 1: one head costs 60, one helps → C = 1
    c = st.concentration(80.0, g)
    assert c[0] == pytest.approx(0.25) and c[1] == pytest.approx(1.0) and c[2] is None   # layer 2: no cost
    g[1, 1] = 60.0                                           # 60 and 20 → C = 0.75: graded, not binary
    assert st.concentration(80.0, g)[1] == pytest.approx(0.75)
    assert st.deposit_stats(80.0, g)["concentration"] == st.concentration(80.0, g)
    g[2, 0] = 79.7                                           # a 0.3-point drop: noise, not concentration
    assert st.concentration(80.0, g)[2] is None and st.concentration(80.0, g, min_drop=0.1)[2] == pytest.approx(1.0)
    assert st._spread("c", [0.5, None, 1.0, 0.25]) == {"c_median": 0.5, "c_min": 0.25, "c_max": 1.0, "c_n": 3}
    assert st._spread("c", [None]) == {"c_median": None, "c_min": None, "c_max": None, "c_n": 0}


def test_the_papers_wiring_takes_keys_and_values_from_the_layer0_embeddings():
    torch.manual_seed(0)
    att = oa.Attention(16, 1, pe="rope").double()
    x, x0 = torch.randn(2, 6, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    assert torch.allclose(att(x, kv=x), att(x))                     # kv = x is self-attention
    # written out for one head: softmax(R(xW_q) R(x0 W_k)ᵀ/√d) (x0 W_v) W_o
    Wq, Wk, Wv = att.qkv.weight.double().split(16, dim=0)
    cos, sin = rope.rope_table(6, 16, att.rope_base, torch.float64, x.device)
    q = rope.rotate((x @ Wq.T)[:, None], cos, sin, att.rope_pairing)[:, 0]
    k = rope.rotate((x0 @ Wk.T)[:, None], cos, sin, att.rope_pairing)[:, 0]
    P = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    want = att.proj(P @ (x0 @ Wv.T))
    assert torch.allclose(att(x, kv=x0), want, atol=1e-12)
    # the classifier hands every layer the same x⁽⁰⁾ = embeddings + APE, and keeps MLA self-attending
    m = st.Classifier(8, pe="sin+rope", d=16, n_heads=2, n_layers=3, dropout=0.0, max_len=12, wiring="paper")
    seen = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("kv")), with_kwargs=True)
    tokens = torch.randint(1, 50, (2, 12))
    m(tokens)
    x0 = m.embed(tokens) + m.ape[:12]
    assert len(seen) == 3 and all(torch.equal(kv, x0) for kv in seen)
    assert st.Classifier(8, pe="mla", d=16, n_heads=2, n_layers=1, max_len=12, wiring="paper").wiring == "standard"
    with pytest.raises(ValueError, match="wiring"):
        st.run_config(1, "rope", "tiny", 0, wiring="sideways")
    # a run stored before --wiring existed reads as standard
    old = {k: v for k, v in st.run_config(1, "rope", "tiny", 0).items() if k != "wiring"}
    assert st.made_with(old) == st.run_config(1, "rope", "tiny", 0)


def test_the_prepared_gpu_script_runs_tables_this_parser_accepts(tmp_path, monkeypatch):
    # analysis/gpu_spectral.sh, run with a `python` that only records its arguments: every command it
    # would run is a `spectral.tasks table` that parses, names its PEs correctly and runs the paper's setting
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls.txt"}\n')
    (shim / "python").chmod(0o755)
    env = {"PATH": f"{shim}:/usr/bin:/bin", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(ROOT / "analysis" / "gpu_spectral.sh"), str(tmp_path / "out")], check=True,
                   env=env, capture_output=True, timeout=60)
    calls = [line.split() for line in (tmp_path / "calls.txt").read_text().splitlines()]
    assert len(calls) == 2 and all(c[:3] == ["-m", "spectral.tasks", "table"] for c in calls)
    seen = []
    monkeypatch.setattr(st, "run_all", lambda tasks, pes, seeds, preset, cache, workers, over:
                        seen.append((tasks, pes, seeds, preset, workers, over)) or [])
    monkeypatch.setattr(st, "write_report", lambda results, out, name: None)
    for c in calls:
        assert st.main(c[2:]) == 0
    assert [(s[0], s[1]) for s in seen] == [([1], ["sin+rope", "rope", "sin", "mla"]), ([2], ["rope", "sin+rope", "mla"])]
    assert all(s[3] == "medium" and s[4] == 8 and s[5]["wiring"] == s[5]["betas"] == "paper" and s[5]["device"] == "cuda"
               and s[5]["max_minutes"] == 4 for s in seen)


def test_layer_deposits_agree_with_deposit_stats_in_the_layer_of_the_largest_drop():
    # spectral.tasks.deposit_stats judges only the largest drop of the whole model; layer_deposits applies
    # the same criterion within every layer, so the two must agree in that layer (random grids)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        base = 90.0
        grid = base - torch.rand(3, 4, generator=g) * torch.tensor([60.0, 10.0, 1.0, 0.5])[torch.randperm(4, generator=g)]
        grid = grid * (torch.rand(3, 1, generator=g) < 0.8) + base * (torch.rand(3, 1, generator=g) >= 0.8)
        ref = st.deposit_stats(base, grid)
        mine = st.layer_deposits(base, grid.tolist())
        assert mine[ref["top_layer"]] == ref["deposit"]
