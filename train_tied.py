"""train_tied.py — the model the attention ODE describes, trained: ONE single-head attention layer
whose weights are shared across depth, applied K times with the step h = T/K,

    x⁽ᵏ⁺¹⁾ = x⁽ᵏ⁾ + h · Attn(x⁽ᵏ⁾),     Attn(X)ᵢ = Σⱼ softmax_j(xᵢᵀ W xⱼ / √d) xⱼᵀ V        (k = 0 … K−1)

which is the explicit Euler discretisation of dX/dt = Attn(X) on [0, T]. Bidirectional, no MLP, no
LayerNorm inside the integration (an optional final LayerNorm before the read-out only), one head
(so the identity xᵢᵀ A ẋᵢ = Σⱼ Pᵢⱼ xᵢᵀ W xⱼ that the regimes rest on holds for the whole layer).
Here the regimes of regimes.py are statements about this model's forward pass, which is what
train_lm.py's pre-LN multi-head GPT with unit steps is not (docs/dynamics.md §4).

    python train_tied.py --task mlm --regime convergent --T 4          # ND arm, horizon 4
    python train_tied.py --task trigger --regime divergent --T 16      # PD arm on Task 1

Tasks
  mlm      byte-level masked language modelling on the embedded corpus (Python's own docs, no
           download): 15 % of the positions of each window are replaced by the [MASK] id 256; the
           loss is the cross-entropy on those positions, reported as bits per masked byte (bpb);
           the read-out is tied to the embedding (logits = LN(x) Eᵀ).
  trigger  the Spectral paper's Task 1 (spectral.tasks.make_task1: classify the distance between two
           trigger words): mean over the real tokens, a linear head, top-1 accuracy (%).
Position (--pe): learned (default) — x⁽⁰⁾ = E[token] + P[position], a learned absolute table, so
position enters the initial condition only and the field itself is the plain one; rope — x⁽⁰⁾ =
E[token] and the field rotates queries and keys (RoPE, base 10⁴: position lives in the field);
none — x⁽⁰⁾ = E[token], no position at all (the model sees a bag of bytes). For a RoPE run the fate
probe is run twice at the end: with the field's RoPE, and with it dropped (the same weights and
inputs) — the phase diagrams predict that RoPE keeps a bidirectional field from converging.

Arms (--regime), the paper's PD / HD / ND on the tied layer (ode_attention.Attention with one head;
W_sym ≻ 0 always, K and V solved so that QKᵀ = W and AVᵀ = W exactly):
  free          Q, K, V, O free (the realised value map is V O)
  divergent     PD: A ≻ 0
  intermediate  HD: A_sym with ⌊d/2⌋ negative eigenvalues
  convergent    ND: A ≺ 0
Constrained arms take A SYMMETRIC (T_A = 0) unless --antisymmetric-A: then V = Wᵀ A⁻¹ with A ≺ 0
and W_sym ≻ 0 is Hurwitz by construction (λ = v*Wv / v*Av), so the ND arm is convergent in fact,
not only in its sign conditions — and the run records that it stayed so (`regime` at init and end).

What every run records (summary.json, probe.csv)
  h·ρ(V)        the Euler step times V's spectral radius, at init and at every evaluation; the run
                refuses to start when it is ≥ 1 (raise --K), and summary.json says if training
                pushed it over (the discrete model is then no longer a faithful Euler solve)
  regime        regimes.regime_of(W, A) of the realised pair: inertias, α(V) = max Re λ(V), ρ_A
  probe.csv     per integration step k = 0 … K, at init and at the end, on validation inputs: the
                mean token norm, the effective rank of the centred normalised tokens, and the
                attention entropy (nats; log n is uniform attention)
  fate          the layer's OWN continuous field dX/dt = Attn(X), integrated from the same inputs
                far beyond T (--fate-t), each sequence classified by the phase diagrams' rule
                (converges / slower / plateau / grows), at init and at the end

If the Dynamics paper is right, ND loses to PD and the gap grows with T; a constant or reversed gap
contradicts it in the setting it describes (run all arms and horizons with
`python -m analysis.experiments --only tied-mlm`, `tied-trigger`).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ode_attention
import regimes
import training
from data import text
from spectral import tasks

HERE = Path(__file__).resolve().parent
MASK_ID = 256                       # the [MASK] byte id (bytes are 0 … 255)
MASK_FRACTION = 0.15
# Euler steps at every horizon: the same depth for every T, only the step h = T/K changes. Trained
# value maps grow where the horizon is short (ρ(V) ≈ 32 after 400 steps of PD at T = 1, ≈ 3 at
# T = 4, in the pilot), so h = 1/4 (K = 4T) left h·ρ(V) at 8 at T = 1; with K = 64, h·ρ(V) ≈ 0.5
DEFAULT_K = 64
# a checkpoint at every log step (every 10): a divergent arm whose loss turns NaN falls back on the
# model of at most 10 steps before (PD at T = 16 diverged at step 90, before the first evaluation)
CKPT_EVERY = 10
A_INIT_SCALE = 1.5                  # |D| of the constrained arms' A = L D Lᵀ at init (see TiedEncoder)
REGIMES = ode_attention.REGIMES     # ("free", "divergent", "intermediate", "convergent")
TASKS = ("mlm", "trigger")
PES = ("learned", "rope", "none")
RESUME_KEYS = ("task", "regime", "antisymmetric_A", "d_model", "seq_len", "T", "K", "final_ln", "batch_size",
               "lr", "steps", "seed", "pe")
# settings added after runs were made: a config.json without one was made at this value (the runner)
ADDED_LATER = {"pe": "learned"}
PRESETS = {   # CPU-sized: one run of 400 steps takes seconds to minutes (see the README)
    "mlm": dict(d_model=32, seq_len=64, batch_size=32, steps=400, lr=3e-3, eval_every=100),
    "trigger": dict(d_model=32, seq_len=120, batch_size=32, steps=400, lr=3e-3, eval_every=100),
}


# ==============================================================================================
# 1. The model
# ==============================================================================================
class TiedEncoder(nn.Module):
    """x⁽⁰⁾ = E[tokens] + P, then K Euler steps of ONE attention layer, an optional LayerNorm, and
    the read-out: tied to E (n_classes None: masked LM) or a linear head on the mean over the real
    tokens (a classifier)."""

    def __init__(self, vocab: int, n_ctx: int, d: int, *, T: float, K: int, regime: str = "free",
                 antisymmetric_A: bool = False, final_ln: bool = True, n_classes: int | None = None,
                 pe: str = "learned"):
        super().__init__()
        if not (K >= 1 and T > 0 and math.isfinite(T)):
            raise ValueError(f"need K >= 1 Euler steps and a horizon T > 0, got K={K}, T={T}.")
        if pe not in PES:
            raise ValueError(f"unknown pe {pe!r}; choose one of {PES}.")
        self.pe = pe
        self.T, self.K, self.h = float(T), int(K), float(T) / int(K)
        # token norms ~ 1 at init (E, P ~ N(0, 1/(2d)) each), so the logits xᵢᵀWxⱼ/√d start O(0.1)
        self.emb = nn.Embedding(vocab, d)
        nn.init.normal_(self.emb.weight, std=(2 * d) ** -0.5)
        # the learned table, or nothing (rope: position lives in the field; none: no position)
        self.pos = nn.Parameter(torch.randn(n_ctx, d) * (2 * d) ** -0.5) if pe == "learned" else None
        self.attn = ode_attention.Attention(d, 1, causal=False, regime=regime, bias=False,
                                            pe="rope" if pe == "rope" else "none",
                                            symmetric_A=regime != "free" and not antisymmetric_A)
        if regime != "free":
            # |D_A| = A_INIT_SCALE instead of the layer's 0.15: V = Wᵀ A⁻¹ then starts with ρ(V) ≈ 0.31
            # (d = 32; the free arm's 0.35), rather than ≈ 3, whose e^{3T} would overflow at T = 16
            with torch.no_grad():
                self.attn.A_form.theta.fill_(math.log(math.expm1(A_INIT_SCALE)))
        self.ln = nn.LayerNorm(d) if final_ln else nn.Identity()
        self.head = None if n_classes is None else nn.Linear(d, n_classes)

    def integrate(self, tokens: torch.Tensor, pad: torch.Tensor | None = None, record: list | None = None):
        """The K Euler steps from x⁽⁰⁾; `record` receives x⁽⁰⁾ … x⁽ᴷ⁾. pad: bool (B, n), True where
        the token is real (padded keys are masked out of every softmax)."""
        x = self.x0(tokens)
        if record is not None:
            record.append(x)
        for _ in range(self.K):
            x = x + self.h * self.attn(x, key_padding_mask=pad)             # x ← x + h Attn(x)
            if record is not None:
                record.append(x)
        return x

    def x0(self, tokens: torch.Tensor) -> torch.Tensor:
        """The initial condition x⁽⁰⁾ = E[tokens] (+ P with learned PE)."""
        x = self.emb(tokens)
        return x if self.pos is None else x + self.pos[: tokens.shape[1]]

    def forward(self, tokens: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln(self.integrate(tokens, pad))
        if self.head is None:
            return x @ self.emb.weight.T                                    # tied read-out
        w = pad.to(x.dtype)[..., None] if pad is not None else torch.ones_like(x[..., :1])
        return self.head((x * w).sum(1) / w.sum(1))                       # mean over the real tokens

    def field(self):
        """(Q, K, V) of the continuous field the steps discretise, in velocity()'s convention:
        Attn(X) = ode_attention.velocity(X, Q, K, V, **self.field_options()), the 1/√d logit scale
        folded into Q and the output map (free arm) into V. float64."""
        Q, K, V, O = (None if m is None else m.detach().double() for m in self.attn.qkv_matrices())
        return Q * self.attn.scale, K, V if O is None else V @ O

    def field_options(self) -> dict:
        """velocity()'s options for this model's field: RoPE (base 10⁴, interleaved pairs, positions
        0 … n − 1, as the layer rotates) when pe is rope."""
        return {"rope": True, "rope_base": self.attn.rope_base} if self.pe == "rope" else {}

    def h_rho(self) -> float:
        """h · ρ(V): the Euler step against the value map's spectral radius (< 1 to be a faithful
        solve of the linear part; near X = 0 the mean token obeys x̄' = x̄ V)."""
        return self.h * float(torch.linalg.eigvals(self.field()[2]).abs().max())

    def regime(self) -> dict:
        """regimes.regime_of(W, A) of the realised layer, W = Q Kᵀ and A = W V⁻ᵀ (JSON-ready)."""
        Q, K, V = self.field()
        W = Q @ K.T
        r = regimes.regime_of(W, regimes.value_form(W, V))
        ev = torch.linalg.eigvals(V)
        ea = r["eig_A_sym"].abs()
        # κ(A_sym): with A ≺ 0 symmetric the energy E = Σ xᵢᵀAxᵢ never decreases, which bounds the
        # token norms only up to √κ — a near-singular A lets tokens grow while E still rises
        return {"regime": r["regime"], "inertia_W": r["inertia_W"], "inertia_A": r["inertia_A"],
                "abscissa_V": r["abscissa_V"], "hurwitz_V": r["hurwitz_V"], "rho_A": r["rho_A"],
                "min_abs_eig_A_sym": float(ea.min()), "cond_A_sym": float(ea.max() / ea.min().clamp_min(1e-300)),
                "n_eig_V_positive": int((ev.real > 0).sum()), "h_rho_V": self.h_rho(), "warning": r["warning"]}


def build_model(cfg: dict, n_classes: int | None) -> TiedEncoder:
    vocab = 257 if cfg["task"] == "mlm" else cfg["vocab_size"]
    return TiedEncoder(vocab, cfg["seq_len"], cfg["d_model"], T=cfg["T"], K=cfg["K"], regime=cfg["regime"],
                       antisymmetric_A=cfg["antisymmetric_A"], final_ln=cfg["final_ln"], n_classes=n_classes,
                       pe=cfg.get("pe", ADDED_LATER["pe"]))


# ==============================================================================================
# 2. What a run records: the integration probe and the field's own fate
# ==============================================================================================
def integration_probe(model: TiedEncoder, tokens, pad=None) -> list[dict]:
    """Per Euler step k = 0 … K (batch means, float64): mean token norm, effective rank of the
    centred normalised tokens, and the attention entropy −Σⱼ Pᵢⱼ log Pᵢⱼ (mean over the real
    queries; P is the layer's own softmax, Attention.weights, RoPE included)."""
    with torch.no_grad():
        states: list = []
        model.integrate(tokens, pad, record=states)
    real = pad if pad is not None else torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    rows = []
    for k, X in enumerate(states):
        with torch.no_grad():
            P = model.attn.weights(X, key_padding_mask=pad)[:, 0].double()         # (B, n, n), one head
        X = X.double()
        H = -(P * P.clamp_min(1e-300).log()).sum(-1)                        # (B, n) per query
        H = (H * real).sum(-1) / real.sum(-1)
        keep = [X[b, real[b]] for b in range(X.shape[0])]
        rows.append({"step": k, "t": k * model.h,
                     "norm": float(np.mean([float(ode_attention.token_norm(x)) for x in keep])),
                     "effective_rank": float(np.mean([float(ode_attention.effective_rank(x)) for x in keep])),
                     "attention_entropy": float(H.mean())})
    return rows


def field_fate(model: TiedEncoder, tokens, t_end: float, drop_rope: bool = False) -> dict:
    """The fate of the layer's own continuous field dX/dt = Attn(X) from x⁽⁰⁾ of each sequence (padded
    tokens dropped: sequences of unequal length go one by one), by ode_attention.field_fates
    (analysis/phase.py's rule). drop_rope: the same weights and inputs, the field without RoPE."""
    Q, K, V = model.field()
    if drop_rope and model.pe != "rope":
        raise ValueError("drop_rope needs a RoPE model (--pe rope).")
    with torch.no_grad():
        X0 = model.x0(tokens).double()
    B = len(X0)
    recs = ode_attention.field_fates(Q.expand(B, *Q.shape), K.expand(B, *K.shape), V.expand(B, *V.shape), X0,
                                     ode_attention.log_times(t_end), **({} if drop_rope else model.field_options()))
    counts = {f: recs["fate"].count(f) for f in ode_attention.FATES}
    return {"t_end": t_end, "sequences": len(X0), "counts": counts, "slope": recs["slope"],
            "final_norm": recs["final_norm"]}


# ==============================================================================================
# 3. Data: masked byte windows, or Task 1
# ==============================================================================================
def mlm_unigram_bpb(cache_dir: Path = HERE / "cache") -> float:
    """The floor a masked-byte model must beat to have used any context: the cross-entropy (bits) of
    the validation bytes under the training split's byte frequencies (the masked positions are a
    uniform 15% sample of them). A model at or above it predicts from the byte prior alone."""
    corpus = text.load_corpus("pydocs", cache_dir)
    p = (np.bincount(corpus.train, minlength=256) + 1.0) / (len(corpus.train) + 256.0)   # add-one
    val = np.bincount(corpus.val, minlength=256)
    return float(-(val * np.log2(p)).sum() / val.sum())


def trigger_chance_acc() -> float:
    """The floor a Task-1 model must beat to have used the triggers' positions: the validation
    accuracy (%) of always answering the training split's most frequent distance (about 1/16)."""
    data, n_train = trigger_set()
    most = int(np.bincount(data.labels[:n_train].numpy()).argmax())
    return float(100.0 * (data.labels[n_train:] == most).double().mean())


def mask_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int, rng: np.random.Generator):
    """(inputs, targets): windows tokens[s : s + seq_len] with a random 15 % (at least one) of each
    replaced by MASK_ID; targets hold the original byte there and −100 (ignored) elsewhere."""
    x = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len)].astype(np.int64))
    n_mask = max(1, round(MASK_FRACTION * seq_len))
    where = torch.from_numpy(np.argsort(rng.random((len(starts), seq_len)), axis=1)[:, :n_mask])
    m = torch.zeros_like(x, dtype=torch.bool).scatter_(1, where, True)
    return x.masked_fill(m, MASK_ID), torch.where(m, x, torch.full_like(x, -100))


def mlm_data(cfg: dict, cache_dir: Path):
    corpus = text.load_corpus("pydocs", cache_dir)
    text.check_corpus(corpus, cfg["seq_len"])
    n = cfg["seq_len"]

    def batch_fn(step: int, _micro: int):
        rng = np.random.default_rng([cfg["seed"], step])
        starts = rng.integers(0, len(corpus.train) - n, size=cfg["batch_size"], endpoint=True)
        x, y = mask_windows(corpus.train, starts, n, rng)
        return x, None, y

    # a fixed validation set: 512 windows evenly spaced through the validation split, fixed masks
    starts = np.linspace(0, len(corpus.val) - n, min(512, (len(corpus.val) - n) // 4 + 1)).astype(np.int64)
    vx, vy = mask_windows(corpus.val, starts, n, np.random.default_rng(12345))
    return batch_fn, (vx, None, vy)


def trigger_set():
    """Task 1's one fixed data set and its training size (the first n_train samples train)."""
    data = tasks.make_task(1, "small", seed=0)
    return data, int(tasks.TRAIN_FRACTION * len(data.labels))


def trigger_data(cfg: dict):
    data, n_train = trigger_set()
    tok = data.tokens[:, : cfg["seq_len"]]
    pad = tok != tasks.PAD
    cfg.update(vocab_size=tasks.VOCAB_SIZE)
    tr, va = slice(0, n_train), slice(n_train, None)

    def batch_fn(step: int, _micro: int):
        rng = np.random.default_rng([cfg["seed"], step])
        i = torch.from_numpy(rng.integers(0, n_train, size=cfg["batch_size"]))
        return tok[tr][i], pad[tr][i], data.labels[tr][i]
    return batch_fn, (tok[va], pad[va], data.labels[va]), data.n_classes


def loss_of(model, batch):
    x, pad, y = batch
    z = model(x, pad)
    if z.dim() == 3:                                                       # masked LM
        return F.cross_entropy(z.flatten(0, 1), y.flatten(), ignore_index=-100), int((y >= 0).sum())
    return F.cross_entropy(z, y), len(y)


def evaluate(model, val, batch: int = 128) -> dict:
    x, pad, y = val
    tot, units, correct = 0.0, 0, 0
    for i in range(0, len(x), batch):
        sl = slice(i, i + batch)
        z = model(x[sl], None if pad is None else pad[sl])
        if z.dim() == 3:
            tot += float(F.cross_entropy(z.flatten(0, 1), y[sl].flatten(), ignore_index=-100, reduction="sum"))
            units += int((y[sl] >= 0).sum())
        else:
            tot += float(F.cross_entropy(z, y[sl], reduction="sum"))
            units += len(z)
            correct += int((z.argmax(-1) == y[sl]).sum())
    out = {"loss": tot / units}
    out.update({"bpb": out["loss"] / math.log(2)} if pad is None and y.dim() == 2 else {"acc": 100.0 * correct / units})
    return out


# ==============================================================================================
# 4. CLI and the training run
# ==============================================================================================
def build_parser() -> training.ArgParser:
    a = training.ArgParser(prog="train_tied.py", description=__doc__.split("\n\n")[0].split(" — ", 1)[-1])
    a.add_argument("--task", choices=TASKS, default="mlm")
    a.add_argument("--regime", choices=REGIMES, default="free")
    a.add_argument("--pe", choices=PES, default="learned",
                   help="learned: a learned absolute table in x⁽⁰⁾ (default); rope: RoPE in the field; none")
    a.add_argument("--antisymmetric-A", action="store_true",
                   help="constrained arms: keep a free antisymmetric part T_A (default: A symmetric)")
    a.add_argument("--T", type=float, default=4.0, help="the horizon: the steps integrate dX/dt = Attn(X) to t = T")
    a.add_argument("--K", type=int, default=None, help=f"Euler steps (default {DEFAULT_K} at every T: h = T/{DEFAULT_K})")
    a.add_argument("--no-final-ln", action="store_true", help="no LayerNorm before the read-out")
    for k in ("d_model", "seq_len", "batch_size", "steps", "eval_every"):
        a.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="default: the task's preset")
    a.add_argument("--lr", type=float, default=None, help="default: the task's preset")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--fate-t", type=float, default=200.0, help="horizon of the field-fate probe (default 200)")
    a.add_argument("--fate-seqs", type=int, default=8, help="validation sequences the fate probe integrates")
    a.add_argument("--out", default=None, help="run folder (default runs/tied-…)")
    a.add_argument("--resume", default=None, help="continue the run in this folder")
    a.add_argument("--cache-dir", default=str(HERE / "cache"))
    a.add_argument("--device", default="cpu")
    return a


def resolve_config(args) -> dict:
    cfg = dict(PRESETS[args.task], task=args.task, regime=args.regime, antisymmetric_A=args.antisymmetric_A,
               T=args.T, final_ln=not args.no_final_ln, seed=args.seed, pe=args.pe)
    for k in ("d_model", "seq_len", "batch_size", "steps", "eval_every", "lr"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    cfg["K"] = args.K if args.K is not None else DEFAULT_K
    bad = [f"--{k.replace('_', '-')} {cfg[k]}" for k in ("d_model", "seq_len", "batch_size", "steps", "K")
           if not cfg[k] >= 1] + [f"--{k} {cfg[k]}" for k in ("T", "lr") if not (math.isfinite(cfg[k]) and cfg[k] > 0)]
    if bad or not (math.isfinite(args.fate_t) and args.fate_t > 0) or args.fate_seqs < 1 or cfg["eval_every"] < 1:
        raise ValueError(f"{', '.join(bad) or 'the fate probe / --eval-every'}: need positive finite sizes, "
                         "horizons and rates.")
    if args.antisymmetric_A and args.regime == "free":
        raise ValueError("--antisymmetric-A is for the constrained regimes (free A has one anyway).")
    if args.task == "trigger" and cfg["seq_len"] > 120:
        raise ValueError(f"Task 1 sentences have 120 words; --seq-len {cfg['seq_len']} is longer.")
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    rt = training.setup_runtime(args.device, amp=False)
    training.seed_everything(cfg["seed"])
    out = args.out or HERE / "runs" / (f"tied-{cfg['task']}-{cfg['regime']}-T{cfg['T']:g}-seed{cfg['seed']}")
    training.check_run_folders(args, out, uses_cache=cfg["task"] == "mlm")
    if cfg["task"] == "mlm":
        batch_fn, val = mlm_data(cfg, Path(args.cache_dir))
        n_classes, metric = None, "bpb"
    else:
        batch_fn, val, n_classes = trigger_data(cfg)
        metric = "acc"
    model = build_model(cfg, n_classes).to(rt.device)
    init = model.regime()
    if init["h_rho_V"] >= 1:
        # h ρ(V) < 1  ⇔  K > T ρ(V)
        raise ValueError(f"h·ρ(V) = {init['h_rho_V']:.3g} ≥ 1 at init (h = T/K = {model.h:g}): the Euler steps "
                         f"would not follow the field; raise --K above {math.floor(cfg['T'] * init['h_rho_V'] / model.h)}.")
    optimizer = training.make_adamw(model, lr=cfg["lr"], beta2=0.99, weight_decay=0.0, device=rt.device)
    run, start = training.open_run(resume=args.resume, out=out, config=cfg, model=model, optimizer=optimizer,
                                   resume_keys=RESUME_KEYS, rt=rt, args=args, later=ADDED_LATER)
    probe_x = tuple(None if v is None else v[: args.fate_seqs] for v in val)
    before = None
    if start == 0:
        before = {"regime": init, "probe": integration_probe(model, probe_x[0], probe_x[1]),
                  "fate": field_fate_of(model, probe_x, args.fate_t)}
        run.write_json("init.json", before)
    title = f"tied {cfg['task']} {cfg['regime']} T={cfg['T']:g} K={cfg['K']} d={cfg['d_model']}"
    print(f"{title}: {sum(p.numel() for p in model.parameters()):,} parameters; h·ρ(V) at init "
          f"{init['h_rho_V']:.3f}; run folder {run.path}", flush=True)

    def eval_fn(raw, final):
        r = raw.regime()
        return {"val": {**evaluate(raw, val), "h_rho_V": r["h_rho_V"], "abscissa_V": r["abscissa_V"]}}

    t0 = time.perf_counter()
    diverged = None
    try:
        result = training.train_loop(model, optimizer, rt=rt, run=run, config=cfg, steps=cfg["steps"],
                                     batch_fn=batch_fn, loss_fn=loss_of, eval_fn=eval_fn, lr=cfg["lr"],
                                     warmup=min(50, cfg["steps"] // 10), min_lr=cfg["lr"] / 10, clip=1.0,
                                     eval_every=cfg["eval_every"], ckpt_every=CKPT_EVERY, log_every=CKPT_EVERY,
                                     start_step=start, unit="seq", title=title)
    except ValueError as e:
        # A divergent arm can blow its own forward pass up (tokens grow like e^{α(V) t}, and training
        # raises α(V)): that is an outcome of the arm, not a failure of the run. Keep it — the last
        # checkpoint (the model before the loss turned non-finite) is evaluated and the summary says
        # at which step training diverged. No checkpoint yet: the run fails as before.
        nan_loss = "the training loss became" in str(e)
        bad_weights = not all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if not (nan_loss or bad_weights) or not run.ckpt.exists():
            raise
        # seen by the loss check at a log step, or by an evaluation that met non-finite weights first
        diverged = (str(e).split(":")[0].replace("the training loss became", "loss").strip() if nan_loss
                    else "non-finite weights")
        step = training.restore(training.load_checkpoint(run.ckpt), model, optimizer)
        model.eval()
        with torch.no_grad():
            result = {"status": "done", "step": step, "eval": eval_fn(model, True)}
        print(f"training diverged ({diverged}); evaluating the last checkpoint, step {step}", file=sys.stderr)
    wall = time.perf_counter() - t0
    if result["status"] == "interrupted":
        return training.interrupted_exit(result, run, rt)
    model.eval()
    end = model.regime()
    after = {"regime": end, "probe": integration_probe(model, probe_x[0], probe_x[1]),
             "fate": field_fate_of(model, probe_x, args.fate_t)}
    init_rec = before or json.loads((run.path / "init.json").read_text())
    rows = [{"when": w, **r} for w, rec in (("init", init_rec), ("end", after)) for r in rec["probe"]]
    training.write_csv(run.path / "probe.csv", rows)
    summary = {"step": result["step"], "wall_s": wall, "metric": metric, "val": result["eval"]["val"],
               "init": {"regime": init_rec["regime"], "fate": init_rec["fate"]},
               "end": {"regime": end, "fate": after["fate"],
                       # RoPE runs: the same weights and inputs, the field without its rotation
                       **({"fate_no_rope": field_fate_of(model, probe_x, args.fate_t, drop_rope=True)}
                          if cfg["pe"] == "rope" else {})},
               "faithful": end["h_rho_V"] < 1 and init_rec["regime"]["h_rho_V"] < 1,
               # None, or e.g. "loss nan at step 280": training stopped there, `step` is the model kept
               "diverged": diverged}
    run.write_json("summary.json", summary)
    print(f"done: step {result['step']}, validation {metric} {summary['val'][metric]:.4f}; regime at the end "
          f"{end['regime']} (α(V) = {end['abscissa_V']:.3g}, h·ρ(V) = {end['h_rho_V']:.3g}); field fate "
          f"{after['fate']['counts']} ({wall:.0f} s; {run.path})")
    return 0


def field_fate_of(model: TiedEncoder, probe, t_end: float, drop_rope: bool = False) -> dict:
    """field_fate on the probe sequences, one by one where they carry padding (Task 1)."""
    x, pad, _ = probe
    if pad is None or bool(pad.all()):
        return field_fate(model, x, t_end, drop_rope)
    parts = [field_fate(model, x[b: b + 1, pad[b]], t_end, drop_rope) for b in range(len(x))]
    return {"t_end": t_end, "sequences": len(parts),
            "counts": {f: sum(p["counts"][f] for p in parts) for f in parts[0]["counts"]},
            "slope": [s for p in parts for s in p["slope"]], "final_norm": [v for p in parts for v in p["final_norm"]]}


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
