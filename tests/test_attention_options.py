"""The attention options beyond the papers' (ode_attention.ATTENTION_OPTIONS): a symmetric or
ρ-capped A in the constrained regimes, and the λ-term's two controls (λ frozen; an extra unrotated
learned q/k channel of the λ-term's logit rank). Each is checked against an independent computation
in float64, and the old runs / checkpoints that predate the options still read as made with them off."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import ode_attention
import regimes
import rope as rope_mod
import train_lm
import training
from analysis import experiments as ex


def test_rho_cap_bounds_the_antisymmetric_part_and_is_the_identity_below_the_cap():
    torch.manual_seed(0)
    for cap in (0.1, 0.5, 2.0):
        m = regimes.PrescribedInertia(12, n_neg=12, t_std=1.0, rho_cap=cap).double().requires_grad_(False)
        free = regimes.ldl_form(m.L_free, m.sigma * F.softplus(m.theta), m.T_free)
        rho_free = float(regimes.antisymmetry_ratio(free))
        rho = float(regimes.antisymmetry_ratio(m()))
        assert rho <= cap * (1 + 1e-12)
        if rho_free > cap:
            assert rho == pytest.approx(cap, rel=1e-10)           # scaled exactly onto the cap
        else:
            assert torch.equal(m(), free)                         # below it: the same form
        # the symmetric part (so the inertia, so the regime) is untouched
        assert torch.allclose(regimes.sym(m()), m.symmetric_part(), atol=1e-14)


def test_rho_cap_in_a_convergent_layer_keeps_rho_under_the_cap_after_training_steps():
    torch.manual_seed(1)
    attn = ode_attention.Attention(8, 1, regime="convergent", rho_cap=0.3)
    with torch.no_grad():
        attn.A_form.T_free.mul_(20.0)                             # far above the cap
    opt = torch.optim.SGD(attn.parameters(), lr=0.1)
    for _ in range(3):
        loss = attn(torch.randn(2, 5, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    rho = float(regimes.antisymmetry_ratio(attn.A_form().double()))
    assert rho <= 0.3 * (1 + 1e-5)


def test_extra_qk_adds_an_unrotated_learned_logit_channel():
    """softmax((R q · R k + q_c · k_c)/√d_h) v per head, written out here independently."""
    torch.manual_seed(2)
    d, H, n = 8, 2, 6
    attn = ode_attention.Attention(d, H, pe="rope", extra_qk=True, causal=True).double()
    x = torch.randn(3, n, d, dtype=torch.float64)
    dh = d // H
    Wq, Wk, Wv = attn.qkv.weight.split(d, dim=0)
    Wqc, Wkc = attn.extra_qk.weight.split(d, dim=0)
    heads = lambda t: t.view(3, n, H, dh).transpose(1, 2)          # noqa: E731
    cos, sin = rope_mod.rope_table(n, dh, 10000.0, torch.float64, x.device)
    q = rope_mod.rotate(heads(x @ Wq.T), cos, sin, "interleaved")
    k = rope_mod.rotate(heads(x @ Wk.T), cos, sin, "interleaved")
    logits = (q @ k.transpose(-1, -2) + heads(x @ Wqc.T) @ heads(x @ Wkc.T).transpose(-1, -2)) / math.sqrt(dh)
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    y = (logits.softmax(-1) @ heads(x @ Wv.T)).transpose(1, 2).reshape(3, n, d) @ attn.proj.weight.T
    assert torch.allclose(attn(x), y, atol=1e-12)


def test_lam_frozen_keeps_lambda_at_its_initial_value_while_the_rest_trains():
    torch.manual_seed(3)
    for mode, lam in (("identity", 0.1), ("softplus-diag", 0.05)):
        attn = ode_attention.Attention(8, 2, pe="rope", lam=lam, lam_mode=mode, lam_frozen=True)
        before = attn.lam_values().clone()
        q_before = attn.qkv.weight.detach().clone()
        opt = torch.optim.AdamW([p for p in attn.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            loss = attn(torch.randn(2, 5, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.equal(attn.lam_values(), before)
        assert not torch.equal(attn.qkv.weight, q_before)


@pytest.mark.parametrize("kw, words", [
    (dict(regime="free", symmetric_A=True), "constrained regime"),
    (dict(regime="free", rho_cap=0.5), "constrained regime"),
    (dict(regime="convergent", symmetric_A=True, rho_cap=0.5), "antisymmetric part"),
    (dict(regime="free", lam_frozen=True), "lam ≠ 0"),
    (dict(regime="convergent", extra_qk=True), "regime 'free'"),
    (dict(regime="convergent", rho_cap=-1.0), "rho_cap"),
])
def test_bad_combinations_are_one_sentence(kw, words):
    with pytest.raises(ValueError, match=words):
        ode_attention.Attention(8, 1, **kw)


@pytest.mark.parametrize("flags, words", [
    (["--symmetric-A"], "--symmetric-A and --rho-cap constrain A"),
    (["--regime", "convergent", "--symmetric-A", "--rho-cap", "1"], "give one of them"),
    (["--lam-frozen"], "--lam-frozen"),
    (["--regime", "convergent", "--extra-qk"], "--extra-qk"),
    (["--regime", "convergent", "--rho-cap", "nan"], "--rho-cap"),
])
def test_the_training_scripts_refuse_bad_combinations_in_one_sentence(flags, words, capsys):
    assert training.run_cli(train_lm.main, flags + ["--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_runs_and_checkpoints_made_before_the_options_read_as_made_with_them_off(tmp_path):
    argv = ["--pe", "rope", "--steps", "3"]
    expected = ex._expected_config("train_lm.py", argv)
    old = {k: v for k, v in expected.items() if k not in ode_attention.ATTENTION_OPTIONS}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert ex._made_with(tmp_path, expected)                                # still kept
    assert not ex._made_with(tmp_path, ex._expected_config("train_lm.py", argv + ["--extra-qk"]))
    training.check_config(old, expected, train_lm.RESUME_KEYS)              # resumable
    with pytest.raises(ValueError, match="extra_qk"):
        training.check_config(old, dict(expected, extra_qk=True), train_lm.RESUME_KEYS)
    # and the model an old checkpoint's config describes builds, with every option off
    cfg = dict(old, vocab_size=40)
    model = train_lm.build_lm(cfg)
    assert all(b.attn.extra_qk is None and not b.attn.lam_frozen for b in model.blocks)


def test_symmetric_A_in_the_language_model_gives_a_hurwitz_value_map():
    torch.manual_seed(4)
    cfg = dict(train_lm.resolve_config(train_lm.build_parser().parse_args(
        ["--regime", "convergent", "--symmetric-A", "--d-model", "16", "--n-layers", "2", "--n-heads", "1"])),
        vocab_size=40)
    model = train_lm.build_lm(cfg)
    for blk in model.blocks:
        assert blk.attn.A_form.T_free is None
        s = training.value_map_stats(blk.attn)
        assert s["abscissa_V"] < 0 and s["n_re_pos"] == 0 and s["rho_A"] < 1e-5     # (float32 K, V)


@pytest.mark.parametrize("kw", [dict(pe="rope", causal=True), dict(pe="rope", lam=-0.1),
                                dict(pe="rope", lam=0.05, lam_mode="softplus-diag", extra_qk=True),
                                dict(regime="convergent")])
def test_weights_are_the_probabilities_forward_applies(kw):
    """Attention.weights (the probes' P): P v per head, concatenated and projected, is forward()."""
    torch.manual_seed(5)
    attn = ode_attention.Attention(8, 2, **kw).double().eval()
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    bias = torch.randn(2, 7, 7, dtype=torch.float64)
    P = attn.weights(x, attn_bias=bias)
    assert torch.allclose(P.sum(-1), torch.ones(3, 2, 7, dtype=torch.float64), atol=1e-12)
    _, _, v = attn._qkv(x, None)
    y = (P @ v).transpose(1, 2).reshape(3, 7, 8)
    y = attn.proj(y) if attn.regime == "free" else y
    assert torch.allclose(attn(x, attn_bias=bias), y, atol=1e-12)
    if kw.get("causal"):
        assert float(P.triu(1).abs().max()) == 0.0
