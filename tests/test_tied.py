"""train_tied.py: the weight-tied model is K Euler steps of its own field, its arms realise their
regimes (ND with symmetric A is Hurwitz), the probes agree with closed forms, and the script runs,
records and refuses bad input in one sentence."""

import json
import math

import pytest
import torch

import ode_attention as oa
import train_tied as tt
import training

f64 = torch.float64


def _model(regime="free", d=8, n=6, T=2.0, K=8, **kw):
    torch.manual_seed(0)
    return tt.TiedEncoder(257, n, d, T=T, K=K, regime=regime, **kw).double()


@pytest.mark.parametrize("regime", ["free", "convergent"])
def test_the_tied_model_is_K_euler_steps_of_its_own_field(regime):
    m = _model(regime)
    tokens = torch.randint(0, 257, (3, 6))
    states = []
    m.integrate(tokens, record=states)
    Q, K, V = m.field()
    assert len(states) == m.K + 1
    x = m.emb(tokens) + m.pos
    for k in range(m.K):                                             # x⁽ᵏ⁺¹⁾ = x⁽ᵏ⁾ + h velocity(x⁽ᵏ⁾)
        x = x + m.h * oa.velocity(x, Q, K, V)
        assert (states[k + 1] - x).abs().max() <= 1e-12
    assert m.h == 2.0 / 8


def test_the_constrained_arms_realise_their_regimes_and_symmetric_A_makes_V_hurwitz():
    for regime, n_neg in (("divergent", 0), ("intermediate", 4), ("convergent", 8)):
        r = _model(regime).regime()
        assert r["regime"] == regime and r["inertia_W"] == (8, 0, 0) and r["inertia_A"][1] == n_neg
        assert r["rho_A"] < 1e-10                                    # T_A = 0 (float64)
    nd = _model("convergent").regime()
    assert nd["hurwitz_V"] and nd["abscissa_V"] < 0 and nd["n_eig_V_positive"] == 0
    assert nd["cond_A_sym"] >= 1 and nd["min_abs_eig_A_sym"] > 0
    # a free antisymmetric part is kept only when asked for
    assert _model("convergent", antisymmetric_A=True).regime()["rho_A"] > 1e-3
    with pytest.raises(ValueError, match="constrained regime"):
        oa.Attention(8, 1, regime="free", symmetric_A=True)


def test_effective_rank_has_its_closed_forms():
    # n tokens along one direction: the centred normalised tokens vanish → 0 (collapsed)
    X = torch.randn(1, 4, dtype=f64) * torch.tensor([[1.0], [2.0], [0.5], [3.0]], dtype=f64)
    assert float(oa.effective_rank(X)) == 0.0
    # two opposite directions: one line → 1
    assert abs(float(oa.effective_rank(torch.cat([X, -X]))) - 1.0) < 1e-12
    # the d basis vectors: uᵢ − ū has d − 1 equal singular values → exp(log(d − 1)) = d − 1
    assert abs(float(oa.effective_rank(torch.eye(5, dtype=f64))) - 4.0) < 1e-10


def _set_free(m, V):
    """A free tied layer with W = 0 (uniform attention) and value map V (O = I)."""
    d = m.attn.d
    with torch.no_grad():
        w = torch.zeros(3 * d, d, dtype=f64)
        w[2 * d:] = V.T                                              # queries x Q, values x V: weight = [Q|K|V]ᵀ
        m.attn.qkv.weight.copy_(w)
        m.attn.proj.weight.copy_(torch.eye(d, dtype=f64))


def test_the_probes_on_a_layer_whose_trajectory_is_known_in_closed_form():
    # W = 0, V = −c I: every softmax row is uniform, ẋᵢ = −c x̄, so x̄(t) = x̄(0) e^{−ct} and
    # xᵢ − x̄ never moves: the tokens settle on their initial spread (a plateau), attention entropy
    # is log n at every step; V = +c I makes the mean grow like e^{ct} (grows)
    c, n = 0.5, 6
    m = _model(n=n, T=4.0, K=16)
    _set_free(m, -c * torch.eye(8, dtype=f64))
    tokens = torch.randint(0, 257, (4, n))
    rows = tt.integration_probe(m, tokens)
    assert all(abs(r["attention_entropy"] - math.log(n)) < 1e-12 for r in rows)
    states = []
    with torch.no_grad():
        m.integrate(tokens, record=states)
    assert abs(rows[-1]["norm"] - float(oa.token_norm(states[-1]).mean())) < 1e-12
    x0 = states[0]
    # Euler on x̄' = −c x̄: x̄ₖ = (1 − hc)ᵏ x̄₀, the spread untouched
    want = x0 - x0.mean(1, keepdim=True) * (1 - (1 - m.h * c) ** m.K)
    assert (states[-1] - want).abs().max() <= 1e-12
    fate = tt.field_fate(m, tokens, t_end=100.0)
    assert fate["counts"] == {"converges": 0, "slower": 0, "plateau": 4, "grows": 0}
    _set_free(m, c * torch.eye(8, dtype=f64))
    assert tt.field_fate(m, tokens, t_end=100.0)["counts"]["grows"] == 4
    assert abs(m.h_rho() - m.h * c) < 1e-12                          # ρ(cI) = c


@pytest.mark.parametrize("task", ["mlm", "trigger"])
def test_a_tiny_run_records_regimes_probe_and_fate_at_init_and_end(tmp_path, task):
    out = tmp_path / "run"
    assert tt.main(["--task", task, "--regime", "convergent", "--T", "1", "--K", "4", "--d-model", "8",
                    "--seq-len", "16", "--batch-size", "4", "--steps", "4", "--eval-every", "2",
                    "--fate-t", "5", "--fate-seqs", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["step"] == 4 and s["metric"] == ("bpb" if task == "mlm" else "acc")
    for when in ("init", "end"):
        assert s[when]["regime"]["regime"] == "convergent" and s[when]["regime"]["hurwitz_V"]
        assert sum(s[when]["fate"]["counts"].values()) == 2
    assert s["faithful"] == (s["end"]["regime"]["h_rho_V"] < 1)
    probe = (out / "probe.csv").read_text().splitlines()
    assert probe[0] == "when,step,t,norm,effective_rank,attention_entropy" and len(probe) == 1 + 2 * 5


@pytest.mark.parametrize("argv,what", [
    (["--T", "0"], "--T 0"),
    (["--K", "0"], "--K 0"),
    (["--regime", "free", "--antisymmetric-A"], "constrained regimes"),
    (["--task", "trigger", "--seq-len", "200"], "120 words"),
    (["--regime", "convergent", "--T", "64", "--K", "1"], "raise --K"),
])
def test_bad_flags_are_one_sentence_and_exit_2(tmp_path, capsys, argv, what):
    assert training.run_cli(tt.main, argv + ["--steps", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert what in err and "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("eval_every,said", [(30, "loss nan at step 20"), (5, "non-finite weights")])
def test_a_run_whose_loss_turns_non_finite_keeps_its_last_checkpoint_and_says_so(tmp_path, monkeypatch,
                                                                                 eval_every, said):
    # a divergent arm can blow its own forward pass up; the run then evaluates the last good
    # checkpoint and records where training diverged (here: the loss is made NaN from the 13th step;
    # checkpoints every 10 steps; the NaN is seen by the log check at step 20, or first by the
    # evaluation at step 15, which meets the non-finite weights)
    calls = {"n": 0}
    real = tt.loss_of

    def failing(model, batch):
        calls["n"] += 1
        loss, units = real(model, batch)
        return (loss * float("nan") if calls["n"] > 12 else loss), units
    monkeypatch.setattr(tt, "loss_of", failing)
    out = tmp_path / "run"
    assert tt.main(["--regime", "divergent", "--T", "1", "--K", "4", "--d-model", "8", "--seq-len", "16",
                    "--batch-size", "4", "--steps", "30", "--eval-every", str(eval_every), "--fate-t", "5",
                    "--fate-seqs", "2",
                    "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["diverged"] == said and s["step"] == 10
    assert math.isfinite(s["val"]["bpb"]) and s["end"]["regime"]["regime"] == "divergent"


def test_weights_turned_non_finite_between_log_checks_are_never_checkpointed(tmp_path, monkeypatch):
    """The loss is checked at log steps only; an update can make the weights NaN while the loss it
    reports is finite. The checkpoint of that step must not be written over the last good one (a
    NaN checkpoint made three divergent runs fail at resume and at the fallback): the run falls
    back on step 10 and says the weights went non-finite."""
    calls = {"n": 0}
    real = tt.loss_of

    def poisoned(model, batch):
        calls["n"] += 1
        loss, units = real(model, batch)
        if calls["n"] == 20:           # a finite loss whose gradient is NaN: 0·√|0·p| at 0
            p = next(model.parameters())
            loss = loss + 0.0 * (0.0 * p.sum()).abs().sqrt()
        return loss, units
    monkeypatch.setattr(tt, "loss_of", poisoned)
    out = tmp_path / "run"
    assert tt.main(["--regime", "divergent", "--T", "1", "--K", "4", "--d-model", "8", "--seq-len", "16",
                    "--batch-size", "4", "--steps", "30", "--eval-every", "30", "--fate-t", "5",
                    "--fate-seqs", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["diverged"] == "non-finite weights" and s["step"] == 10 and math.isfinite(s["val"]["bpb"])
    state = training.load_checkpoint(out / "ckpt.pt")
    assert state["step"] == 10 and all(bool(torch.isfinite(v).all()) for v in state["model"].values())


def test_the_rope_tied_model_steps_along_the_rope_field_and_records_its_fate_without_rope(tmp_path):
    """--pe rope: x⁽⁰⁾ = E[token] (no table) and the layer rotates q, k; field() with field_options()
    is that same field (velocity with RoPE, float64), so the fate probe integrates the model's own
    field; the summary carries the fate with RoPE dropped too. --pe none: no position anywhere."""
    torch.manual_seed(0)
    m = tt.TiedEncoder(257, 16, 8, T=1.0, K=4, pe="rope").double()
    assert m.pos is None and m.attn.pe == "rope"
    tokens = torch.randint(0, 256, (3, 16))
    X = m.x0(tokens)
    Q, K, V = m.field()
    assert torch.allclose(m.attn(X), oa.velocity(X, Q, K, V, **m.field_options()), atol=1e-12)
    assert not torch.allclose(m.attn(X), oa.velocity(X, Q, K, V), atol=1e-6)       # the rotation matters
    out = tmp_path / "run"
    assert tt.main(["--pe", "rope", "--T", "1", "--K", "4", "--d-model", "8", "--seq-len", "16",
                    "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--fate-t", "5",
                    "--fate-seqs", "2", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["end"]["fate_no_rope"]["sequences"] == 2 and sum(s["end"]["fate_no_rope"]["counts"].values()) == 2
    none = tt.TiedEncoder(257, 16, 8, T=1.0, K=4, pe="none")
    perm = torch.randperm(16)
    assert none.pos is None and torch.allclose(none.integrate(tokens[:, perm]), none.integrate(tokens)[:, perm], atol=1e-5)


def test_a_checkpoint_from_before_pe_existed_resumes_as_learned_pe_and_no_other(tmp_path):
    """One rule for settings added later (training.config_defaults): the runner keeps an old run
    without "pe" as learned PE, so resume must read it the same way — and refuse it as RoPE."""
    out = tmp_path / "run"
    argv = ["--task", "mlm", "--regime", "free", "--T", "1", "--K", "4", "--d-model", "8", "--seq-len", "16",
            "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--fate-t", "5", "--fate-seqs", "2"]
    assert tt.main(argv + ["--out", str(out)]) == 0
    state = torch.load(out / "ckpt.pt", weights_only=False)
    del state["config"]["pe"]                                    # as written before --pe existed
    torch.save(state, out / "ckpt.pt")
    cfg = tt.resolve_config(tt.build_parser().parse_args(argv))
    training.check_config(state["config"], cfg, tt.RESUME_KEYS, later=tt.ADDED_LATER)
    with pytest.raises(ValueError, match="pe='learned'"):
        training.check_config(state["config"], dict(cfg, pe="rope"), tt.RESUME_KEYS, later=tt.ADDED_LATER)
    # and the script itself resumes it (a finished run: nothing left to train, exit 0)
    assert training.run_cli(tt.main, argv + ["--resume", str(out)]) == 0
