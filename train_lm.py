"""train_lm.py -- causal language models built from ode_attention.Block, with every positional
encoding, the λ-term and definiteness-constrained attention.

    python train_lm.py --pe rope --lam -0.1                 # ~2 MB of English that ships with Python
    python train_lm.py --preset enwik8 --regime divergent   # the paper's PD run (downloads enwik8)
    torchrun --nproc_per_node 4 train_lm.py --preset wikitext103 --pe rope --lam 0.05 --lam-mode softplus-diag
    python train_lm.py --sample RUN --prompt "The value of" --tokens 200 --temperature 0.8 --top-k 40 --seed 1
    python train_lm.py --eval-only RUN                       # RUN's val and test score, no training

The model (a compact GPT, pre-LN, causal)
-----------------------------------------
Tokens t₁..t_n (bytes, or words for WikiText-103) become rows of X⁰ ∈ R^{n×d}:

    x⁰ᵢ = E[tᵢ]                  --pe none | rope | alibi   (position enters the attention)
    x⁰ᵢ = √d E[tᵢ] + pᵢ           --pe sin     (Vaswani et al.'s table, rope.sinusoidal_pe)
    x⁰ᵢ = E[tᵢ] + Pᵢ              --pe learned (rope.LearnedPE)

then L blocks, each one Euler step of the attention field plus an MLP (ode_attention.Block):

    Xˡ⁺¹ = Xˡ + Attn(LN(Xˡ)),  Xˡ⁺¹ ← Xˡ⁺¹ + MLP(LN(Xˡ⁺¹))

with head h's logits  sᵢⱼ = [ (xᵢQₕ)R(i)ᵀ·(xⱼKₕ)R(j)ᵀ + λₕ xᵢ⁽ʰ⁾ᵀMₕxⱼ⁽ʰ⁾ ] / √d_h + bᵢⱼ for j ≤ i:
R = RoPE rotations (--pe rope), bᵢⱼ = −mₕ(i − j) (--pe alibi), λ the learnable λ-term (--lam, any
sign; --lam-mode identity: Mₕ = I, λₕ per head; softplus-diag: λₕMₕ = diag(softplus(φₕ)) > 0, the
authors' form), and --regime divergent|intermediate|convergent the definiteness-constrained
attention whose K and V are solved from (Q, W, A) at every step (the paper's PD/HD/ND runs).
All of it goes through F.scaled_dot_product_attention (ode_attention.Attention folds λ into the
query/key features), so fused kernels run on GPU.  Output: LN, then logits X E ᵀ (tied), or an
adaptive softmax (nn.AdaptiveLogSoftmaxWithLoss) for the 267k-word WikiText-103 vocabulary.

Loss and metrics.  ℓ = −(1/N) Σᵢ ln p(tᵢ₊₁ | t≤ᵢ) in nats;  bits per byte/character = ℓ / ln 2
(enwik8, text8, the embedded corpus, local files); perplexity = e^ℓ (WikiText-103).  Evaluation
uses non-overlapping windows of --seq-len tokens (every token sees the context since its
window's start; the final partial window is dropped), so numbers are comparable between runs of
one --seq-len, not with papers that evaluate with sliding windows or Transformer-XL memory.

The token probe (docs/dynamics.md §5.4) runs a fixed batch of validation windows through the
trained model twice -- full blocks, and attention-only updates x ← x + Attn(x) -- and records
after every layer the mean token norm, Σᵢⱼ‖xᵢ − xⱼ‖², the mean pairwise cosine and the sharpness
(probe.csv, probe.png): whether a run's tokens converge or spread.

Data (--data; data/text.py's docstring gives sources, sizes, checksums and splits)
-------------------------------------------------------------------------------
pydocs (default, no download): the Language Reference and the standard library's docstrings
that ship with Python (~2.0 MB, byte level, split by document);  enwik8, text8: byte level,
90M / 5M / 5M, bits per character;  wikitext103: word level, its own splits, perplexity;  PATH:
any local text file (.bz2 / .gz / .xz decompressed), byte level, 90% / 5% / 5%;  or a WikiText
release on disk -- wikitext-{2,103}-v1.zip (word level, perplexity), wikitext-{2,103}-raw-v1.zip
(byte level, bits per byte, its own splits), an extracted wiki.*.{tokens,raw} folder, or Hugging
Face's parquet files (needs pyarrow) -- named after what was read (wikitext2, wikitext103-raw, …).
Downloads go to --cache-dir (default ./cache) and are verified before every use.

A trained run (RUN: a run folder, or its ckpt.pt; both commands write nothing into it)
-------------------------------------------------------------------------------------
--sample RUN rebuilds the model from the checkpoint's "config" and weights and generates --tokens
new tokens after --prompt (its UTF-8 bytes; for WikiText its words, a line break = <eos>, an
unknown word = <unk>; no --prompt: start at a line break), one at a time: the scores z of the
next token given the last --seq-len tokens (a sliding window), then

    --temperature 0:  t = argmax z          T > 0:  t ~ p,  pᵥ ∝ exp(zᵥ / T) over the --top-k largest zᵥ

(--top-k 0 keeps all; T = 1, k = 0 is the model's own distribution), drawn from a torch.Generator
seeded with --seed, so one seed gives one text.  The adaptive softmax samples from its
log-probabilities.  The checkpoint holds WikiText's vocabulary size but not its words: a
word-level run reads its word list from the corpus cache it was trained with (--cache-dir,
from RUN/args.json; nothing is downloaded for that).  --eval-only RUN runs the final evaluation
of training again -- the whole validation and test splits of the corpus in RUN's args.json /
config, the same windows, batch and score -- and prints one line with both.

Run folder (--out, default runs/lm-…): config.json, versions.json, metrics.csv, loss.png,
ckpt.pt, probe.csv, probe.png, summary.json.  The checkpoint's "config" holds everything needed
to rebuild the model (d_model, n_layers, n_heads, mlp_ratio, pe, attn_pe, lam, lam_mode, regime,
vocab_size, seq_len, cutoffs); block i's attention is `blocks.{i}.attn.*` in its state dict.
Tokens/s of every λ mode and regime against the plain model: `python -m analysis.bench_lm`.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import ode_attention
import rope as rope_mod
import training
from data import text

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Defaults: the small CPU preset (used when no --preset is given) and the paper's two settings
# (docs/dynamics.md §4.2).  Any flag given on the command line overrides its preset value.
# ----------------------------------------------------------------------------------------------
PRESETS = {
    "small": dict(data="pydocs", pe="rope", d_model=128, n_layers=4, n_heads=4, mlp_ratio=4.0,
                  seq_len=128, batch_size=16, grad_accum=1, steps=800, lr=2e-3, min_lr=1e-4,
                  warmup=50, beta2=0.99, weight_decay=0.0, clip=1.0, dropout=0.0,
                  eval_every=400, eval_tokens=0, cutoffs=""),
    # enwik8 (x-transformers run): 6 × 512, 8 heads, learned absolute PE, 1024 bytes, batch 16 × 4,
    # Adam 6e-4 constant (min_lr = lr), clip 0.5, 25,000 steps, validation every 500 steps.
    "enwik8": dict(data="enwik8", pe="learned", d_model=512, n_layers=6, n_heads=8, mlp_ratio=4.0,
                   seq_len=1024, batch_size=64, grad_accum=4, steps=25000, lr=6e-4, min_lr=6e-4,
                   warmup=0, beta2=0.999, weight_decay=0.0, clip=0.5, dropout=0.0,
                   eval_every=500, eval_tokens=0, cutoffs=""),
    # WikiText-103 (Transformer-XL run, mem_len 0): 16 × 410, 10 heads, FFN 2100, context 150,
    # batch 60, Adam 2.5e-4 cosine to 0 over 200,000 steps, warmup 500, clip 0.25, dropout 0.05,
    # sinusoidal PE, adaptive softmax with cutoffs 20000/40000/200000.
    "wikitext103": dict(data="wikitext103", pe="sin", d_model=410, n_layers=16, n_heads=10,
                        mlp_ratio=2100 / 410, seq_len=150, batch_size=60, grad_accum=1,
                        steps=200000, lr=2.5e-4, min_lr=0.0, warmup=500, beta2=0.999,
                        weight_decay=0.0, clip=0.25, dropout=0.05, eval_every=4000,
                        eval_tokens=0, cutoffs="20000,40000,200000"),
}
PES = ("none", "sin", "learned", "rope", "alibi")
LAM_MODES = ode_attention.LAM_MODES          # ("identity", "softplus-diag")
REGIMES = ode_attention.REGIMES              # ("free", "divergent", "intermediate", "convergent")
# a checkpoint may only be resumed by a command that agrees on these
RESUME_KEYS = ("data", "pe", "lam", "lam_mode", "regime", "d_model", "n_layers", "n_heads",
               "mlp_ratio", "seq_len", "cutoffs", "dropout", "vocab_size", "batch_size", "seed",
               *ode_attention.ATTENTION_OPTIONS)
# --sample: at most this many new tokens (the loop runs the whole model once per token)
MAX_NEW_TOKENS = 100_000


# ==============================================================================================
# 1. The model
# ==============================================================================================
def check_sizes(**sizes) -> None:
    """Positive integer sizes, heads dividing the width, a positive MLP ratio."""
    for name, v in sizes.items():
        if name != "mlp_ratio" and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if sizes["d_model"] % sizes["n_heads"]:
        raise ValueError(f"--d-model {sizes['d_model']} is not divisible by --n-heads {sizes['n_heads']}")
    if not sizes["mlp_ratio"] > 0:
        raise ValueError(f"--mlp-ratio must be positive, got {sizes['mlp_ratio']}")


def memory_lower_bound(cfg: dict, micro: int, vocab: int = 256) -> int:
    """Bytes a training step needs at the very least (float32): weights, gradients and two AdamW
    moments of the 12·L·d² block parameters, plus one micro-batch's output logits
    (micro × seq × vocab) and one layer's attention scores (micro × heads × seq²). A bound from
    below, so refusing on it never refuses a run that would fit."""
    L, d, T = cfg["n_layers"], cfg["d_model"], cfg["seq_len"]
    params = 12 * L * d * d
    return 4 * (4 * params + micro * T * vocab + micro * cfg["n_heads"] * T * T)


class GPT(nn.Module):
    """Token embedding (+ absolute PE) → L × ode_attention.Block (causal) → LN → output."""

    def __init__(self, *, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 pe: str = "rope", lam: float = 0.0, lam_mode: str = "identity", regime: str = "free",
                 mlp_ratio: float = 4.0, dropout: float = 0.0, cutoffs=(), **attention_options):
        """attention_options: ode_attention.ATTENTION_OPTIONS (symmetric_A, rho_cap, lam_frozen, extra_qk)."""
        super().__init__()
        if pe not in PES:
            raise ValueError(f"unknown --pe {pe!r}: choose one of {', '.join(PES)}")
        check_sizes(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                    seq_len=seq_len, mlp_ratio=mlp_ratio)
        if pe == "sin" and d_model % 2:
            raise ValueError(f"--pe sin needs an even --d-model, got {d_model}")
        cutoffs = list(cutoffs)
        if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size - 1):
            raise ValueError(f"adaptive-softmax cutoffs {cutoffs} must increase strictly and stay "
                             f"below the vocabulary size minus one ({vocab_size - 1})")
        self.d, self.pe, self.seq_len = d_model, pe, seq_len
        self.tok = nn.Embedding(vocab_size, d_model)
        # √d scale for the sinusoidal table (Vaswani et al.): embeddings and positions of like size
        self.emb_scale = math.sqrt(d_model) if pe == "sin" else 1.0
        if pe == "sin":
            self.register_buffer("pos_table", rope_mod.sinusoidal_pe(seq_len, d_model), persistent=False)
        elif pe == "learned":
            self.pos = rope_mod.LearnedPE(seq_len, d_model)
        elif pe == "alibi":
            # bᵢⱼ = −mₕ (i − j) for j ≤ i, −inf above the diagonal
            self.register_buffer("alibi", rope_mod.alibi_bias(seq_len, rope_mod.alibi_slopes(n_heads),
                                                              causal=True), persistent=False)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ode_attention.Block(d_model, n_heads, mlp_ratio=mlp_ratio, dropout=dropout, causal=True,
                                pe="rope" if pe == "rope" else "none", lam=lam, lam_mode=lam_mode,
                                regime=regime, **attention_options) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.adaptive = (nn.AdaptiveLogSoftmaxWithLoss(d_model, vocab_size, cutoffs, div_value=1.0)
                         if cutoffs else None)
        self._init(n_layers)

    def _init(self, n_layers: int) -> None:
        """GPT-2 init: N(0, 0.02²) for linear maps and embeddings, N(0, (0.02/√(2L))²) for the maps
        that write into the residual stream; the constrained attention keeps its own LDL init."""
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def hidden(self, idx: torch.Tensor, *, attention_only: bool = False, record: list | None = None):
        """Residual stream after the last block (LN applied); `record` collects X⁰ … Xᴸ."""
        n = idx.shape[1]
        if n > self.seq_len:
            raise ValueError(f"a sequence of {n} tokens is longer than the model's --seq-len {self.seq_len}")
        x = self.emb_scale * self.tok(idx)
        if self.pe == "sin":
            x = x + self.pos_table[:n]                                         # x⁰ᵢ = √d E[tᵢ] + pᵢ
        elif self.pe == "learned":
            x = x + self.pos(n)                                                # x⁰ᵢ = E[tᵢ] + Pᵢ
        x = self.drop(x)
        bias = self.alibi[:, :n, :n] if self.pe == "alibi" else None
        if record is not None:
            record.append(x)
        for block in self.blocks:
            x = block(x, attn_bias=bias, attention_only=attention_only)
            if record is not None:
                record.append(x)
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """ℓ = −(1/N) Σ ln p(targetᵢ | idx≤ᵢ), nats."""
        h = self.hidden(idx)
        if self.adaptive is not None:
            return self.adaptive(h.reshape(-1, self.d), targets.reshape(-1)).loss
        logits = h @ self.tok.weight.T                                         # tied output E
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def next_token_logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Scores zᵥ of the token that follows each row of idx (batch, n ≤ seq_len): (batch, V),
        float32, with p(v | idx) = softmax(z)ᵥ.  Only the last position is projected onto the
        vocabulary (the only one sampling needs).  Tied output: z = h_n Eᵀ, the logits forward()
        feeds to the cross-entropy.  Adaptive softmax: z = ln p(v | h_n) from the head and tail
        clusters (AdaptiveLogSoftmaxWithLoss.log_prob), already normalised; softmax(ln p) = p,
        so the sampler treats both alike."""
        h = self.hidden(idx)[:, -1]                                            # h_n, (batch, d)
        if self.adaptive is not None:
            return self.adaptive.log_prob(h).float()
        return (h @ self.tok.weight.T).float()


def build_lm(cfg: dict) -> GPT:
    """The model a config (or a checkpoint's "config") describes."""
    return GPT(vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], n_layers=cfg["n_layers"],
               n_heads=cfg["n_heads"], seq_len=cfg["seq_len"], pe=cfg["pe"], lam=cfg["lam"],
               lam_mode=cfg["lam_mode"], regime=cfg["regime"], mlp_ratio=cfg["mlp_ratio"],
               dropout=cfg["dropout"], cutoffs=parse_cutoffs(cfg["cutoffs"]),
               **training.attention_options(cfg))


def parse_cutoffs(spec: str) -> list:
    try:
        return [int(c) for c in str(spec).split(",") if c.strip()]
    except ValueError:
        raise ValueError(f"--cutoffs must be comma-separated integers, got {spec!r}") from None


def make_optimizer(model: nn.Module, cfg: dict, device: torch.device):
    """AdamW; weight decay only on weight matrices, never on norms, biases, λ or θ
    (training.make_adamw).  Learned positions are a matrix, and are decayed like the rest."""
    return training.make_adamw(model, lr=cfg["lr"], beta2=cfg["beta2"], weight_decay=cfg["weight_decay"],
                               device=device, no_decay=())


# ==============================================================================================
# 2. Evaluation
# ==============================================================================================
def evaluate(model: GPT, tokens: np.ndarray, *, seq_len: int, batch: int, rt: training.Runtime,
             max_tokens: int = 0) -> float:
    """Mean loss (nats per token) over non-overlapping windows, shared between processes."""
    n_win = (len(tokens) - 1) // seq_len
    if max_tokens:
        n_win = min(n_win, max(1, max_tokens // seq_len))
    mine = np.arange(n_win)[rt.rank::rt.world_size] * seq_len
    span = np.arange(seq_len + 1)
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)             # [Σ nll, N]
    for i in range(0, len(mine), batch):
        chunk = torch.from_numpy(tokens[mine[i: i + batch, None] + span].astype(np.int64)).to(rt.device)
        loss = model(chunk[:, :-1], chunk[:, 1:])
        n = chunk[:, 1:].numel()
        total += torch.stack((loss.double() * n, torch.tensor(float(n), dtype=torch.float64, device=rt.device)))
    total = training.all_reduce(total, rt, "sum")
    return float(total[0] / total[1])


# ==============================================================================================
# 3. Command line
# ==============================================================================================
def build_parser() -> training.ArgParser:
    p = training.ArgParser(description="Train a causal LM built from ode_attention.Block "
                           "(see the module docstring for the maths, data and outputs).",
                           epilog="Tokens/s of every λ mode and regime: python -m analysis.bench_lm")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default="small",
      help="settings: small (CPU, default), enwik8 or wikitext103 (the paper's, docs/dynamics.md §4.2)")
    a("--data", help=f"{', '.join(text.KNOWN)}, or a text file / archive path (preset's default)")
    a("--pe", choices=PES, help="positional encoding (preset: small rope, enwik8 learned, wikitext103 sin)")
    training.add_attention_args(a)
    for name, typ, h in (("d-model", int, "width d"), ("n-layers", int, "blocks L"),
                         ("n-heads", int, "heads H"), ("mlp-ratio", float, "MLP width / d"),
                         ("seq-len", int, "tokens per training window"),
                         ("batch-size", int, "GLOBAL sequences per optimiser step (all processes and micro-batches)"),
                         ("grad-accum", int, "micro-batches per optimiser step"),
                         ("steps", int, "optimiser steps"), ("lr", float, "peak learning rate"),
                         ("min-lr", float, "final learning rate of the cosine"),
                         ("warmup", int, "linear warmup steps"), ("beta2", float, "Adam β₂"),
                         ("weight-decay", float, "AdamW decay on matrices"),
                         ("clip", float, "gradient-norm clip (0 = off)"), ("dropout", float, "dropout"),
                         ("eval-every", int, "evaluate every N steps (0 = only at the end)"),
                         ("eval-tokens", int, "tokens per split in the periodic evaluations (0 = the whole split; the final one always uses it all)"),
                         ("cutoffs", str, "adaptive-softmax cutoffs, e.g. 20000,40000,200000 ('' = full softmax)")):
        a(f"--{name}", type=typ, help=f"{h} (preset's default)")
    training.add_run_args(a, default_out="runs/lm-<data>-<pe>-lam<λ>-<mode>-<regime>-<time>",
                          cache_help="where downloads and the embedded corpus are cached",
                          probe_help="validation windows in the token probe")
    # a trained run: sample from it, or evaluate it, instead of training (section 5)
    a("--layers-at-eval", action="store_true",
      help="at every periodic evaluation also record each layer's regime and field fate (training.layer_fields, "
           "about 20 s each at the small preset) as metrics.csv rows of the split 'layers'")
    a("--sample", metavar="RUN", help="generate text from RUN's checkpoint (its folder or ckpt.pt) instead of "
      "training; writes nothing into RUN")
    a("--eval-only", metavar="RUN", help="evaluate RUN's checkpoint on the whole validation and test splits "
      "of the corpus it was trained on, without training; writes nothing into RUN")
    a("--prompt", help="--sample: the text to continue (bytes, or words for WikiText; default: a line break)")
    a("--tokens", type=int, default=256, help=f"--sample: new tokens to generate (1 … {MAX_NEW_TOKENS:,}; default 256)")
    a("--temperature", type=float, default=0.8,
      help="--sample: divide the logits by T before the softmax; 0 = greedy argmax (default 0.8)")
    a("--top-k", type=int, default=200, help="--sample: draw from the k most likely tokens only; 0 = all (default 200)")
    return p


def resolve_config(args) -> dict:
    """Preset values, overridden by the flags that were given; validated."""
    cfg = dict(PRESETS[args.preset])
    for k in list(cfg):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    cfg.update(preset=args.preset, lam=float(args.lam), lam_mode=args.lam_mode, regime=args.regime,
               seed=args.seed, **training.attention_options(vars(args)))
    check_sizes(**{k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "seq_len", "mlp_ratio",
                                       "steps", "batch_size", "grad_accum")})
    training.check_finite(cfg)
    for k in ("warmup", "eval_every", "eval_tokens", "seed"):
        if cfg[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be 0 or more, got {cfg[k]}")
    if not (cfg["lr"] > 0 and 0 <= cfg["min_lr"] <= cfg["lr"]):
        raise ValueError(f"need --lr > 0 and 0 ≤ --min-lr ≤ --lr, got {cfg['lr']} and {cfg['min_lr']}")
    if not 0 <= cfg["dropout"] < 1 or not 0 < cfg["beta2"] < 1 or cfg["clip"] < 0 or cfg["weight_decay"] < 0:
        raise ValueError("need 0 ≤ --dropout < 1, 0 < --beta2 < 1, --clip ≥ 0 and --weight-decay ≥ 0")
    if not math.isfinite(cfg["lam"]):
        raise ValueError(f"--lam must be a finite number, got {cfg['lam']}")
    if cfg["lam_mode"] == "softplus-diag" and cfg["lam"] < 0:
        raise ValueError(f"--lam-mode softplus-diag keeps λ positive, so --lam must be ≥ 0 (got {cfg['lam']}); "
                         f"use --lam-mode identity for a negative λ")
    training.check_attention_options(cfg)
    parse_cutoffs(cfg["cutoffs"])
    return cfg


def default_run_name(cfg: dict) -> str:
    data = Path(cfg["data"]).name.split(".")[0] if cfg["data"] not in text.KNOWN else cfg["data"]
    lam = f"lam{cfg['lam']:g}-{cfg['lam_mode']}" if cfg["lam"] else "lam0"
    return f"lm-{data}-{cfg['pe']}-{lam}-{cfg['regime']}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    given = training.given_flags(build_parser, argv)
    check_command(args, given)
    if args.sample is not None or args.eval_only is not None:   # a trained run, not a new one (section 5)
        return sample_command(args, given) if args.sample is not None else eval_command(args, given)
    training.resume_from_run(args, build_parser, argv)     # --resume RUN alone: RUN's own settings
    cfg = resolve_config(args)
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    try:
        return train(cfg, args, rt)
    finally:
        training.teardown(rt)


# ==============================================================================================
# 4. Training
# ==============================================================================================
def train(cfg: dict, args, rt: training.Runtime) -> int:
    training.seed_everything(cfg["seed"])
    micro = training.split_batch(cfg["batch_size"], rt, cfg["grad_accum"])
    training.check_memory(memory_lower_bound(cfg, micro), rt.device, "this run")
    out = args.out or HERE / "runs" / default_run_name(cfg)
    # the embedded corpus, the downloads and WikiText's encoded ids are cached; a local text file is not
    training.check_run_folders(args, out, uses_cache=text.uses_cache(cfg["data"]))
    corpus = text.load_corpus(cfg["data"], Path(args.cache_dir))
    text.check_corpus(corpus, cfg["seq_len"])
    cfg.update(vocab_size=corpus.vocab_size, metric=corpus.metric,
               attn_pe="rope" if cfg["pe"] == "rope" else "none")
    model = training.build_on(build_lm, cfg, rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)

    run, start = training.open_run(resume=args.resume, out=out, config=cfg, model=model,
                                   optimizer=optimizer, resume_keys=RESUME_KEYS, rt=rt, args=args)

    n_params = sum(p.numel() for p in model.parameters())
    metric = corpus.metric
    # the realised regime of every layer and the fate of its own field, at init and at the end, on
    # the same validation windows (training.layer_fields; the init record survives a resume)
    n_probe = max(1, min(args.probe_batch, (len(corpus.val) - 1) // cfg["seq_len"]))
    starts = np.arange(n_probe)[:, None] * cfg["seq_len"] + np.arange(cfg["seq_len"])
    x_probe = torch.from_numpy(corpus.val[starts].astype(np.int64)).to(rt.device)
    if start == 0 and rt.is_main:
        run.write_json("layers-init.json", training.layer_fields(model, x_probe[:2]))
    title = (f"{corpus.name} pe={cfg['pe']} λ={cfg['lam']:g} ({cfg['lam_mode']}) regime={cfg['regime']} "
             f"{cfg['n_layers']}×{cfg['d_model']}")
    if rt.is_main:
        print(f"{corpus.name}: {len(corpus.train):,} / {len(corpus.val):,} / {len(corpus.test):,} tokens "
              f"(vocab {corpus.vocab_size:,});  model {n_params / 1e6:.2f}M parameters on {rt.device}"
              f"{' × ' + str(rt.world_size) if rt.distributed else ''};  run folder {run.path}", flush=True)

    def eval_fn(raw, final):  # periodic evaluations may be capped by --eval-tokens; the last never is
        out = {}
        for split, toks in (("val", corpus.val), ("test", corpus.test)):
            loss = evaluate(raw, toks, seq_len=cfg["seq_len"], batch=micro, rt=rt,
                            max_tokens=0 if final else cfg["eval_tokens"])
            out[split] = {"loss": loss, metric: corpus.score(loss)}
        if args.layers_at_eval and not final:
            # when does training leave the regime? the per-layer record at every periodic
            # evaluation, as metrics.csv rows of the split "layers" (the end of training: summary.json)
            rows = training.layer_fields(raw, x_probe[:2])
            out["layers"] = {"max_abscissa_V": max(r["abscissa_V"] for r in rows),
                             "n_re_pos": sum(r["n_re_pos"] for r in rows),
                             "n_euler_unstable": sum(r["n_euler_unstable"] for r in rows),
                             "mean_rho_A": float(np.mean([r["rho_A"] for r in rows])),
                             "fields_growing": sum(r["fates"]["grows"] for r in rows),
                             "fields_converging": sum(r["fates"]["converges"] + r["fates"]["slower"] for r in rows)}
        return out

    t0 = time.perf_counter()
    result = training.train_loop(
        training.wrap_model(model, rt, compile=False if args.no_compile else None,
                            find_unused_parameters=bool(parse_cutoffs(cfg["cutoffs"]))),
        optimizer, rt=rt, run=run, config=cfg, steps=cfg["steps"], raw_model=model,
        batch_fn=text.batch_fn_for(corpus.train, seq_len=cfg["seq_len"], global_batch=cfg["batch_size"],
                              micro=micro, rt=rt, seed=cfg["seed"]),
        loss_fn=lambda m, b: (m(*b), b[1].numel()), eval_fn=eval_fn, lr=cfg["lr"], warmup=cfg["warmup"],
        min_lr=cfg["min_lr"], grad_accum=cfg["grad_accum"], clip=cfg["clip"], eval_every=cfg["eval_every"],
        ckpt_every=args.ckpt_every or cfg["eval_every"], log_every=args.log_every, start_step=start,
        unit="tok", title=title,
        # a word-level corpus's words go into the checkpoint, so --sample needs no corpus
        extra_state={"itos": list(corpus.itos)} if corpus.itos else None)
    wall = time.perf_counter() - t0
    if result["status"] == "interrupted":
        return training.interrupted_exit(result, run, rt)
    if rt.is_main:
        model.eval()
        training.write_probe(training.token_probe(model, x_probe), run, title)
        ev = result["eval"]
        summary = {"step": result["step"], "wall_s": wall, "params": n_params, "metric": metric,
                   "val": ev.get("val"), "test": ev.get("test"),
                   "lam": [blk.attn.lam_values().tolist() if blk.attn.lam_values() is not None else None
                           for blk in model.blocks],
                   # constrained runs: the inertia each layer's forms really have in float32
                   "inertia": training.realised_inertia(model),
                   # per layer: α(V O), #Re λ > 0, #unstable under the unit Euler step, ρ_A, and the
                   # fate of the layer's own field from its LayerNorm'd inputs (t = 20), init and end
                   # (RoPE models: also with RoPE dropped from the field, the same weights and inputs)
                   "layers": {"init": json.loads((run.path / "layers-init.json").read_text())
                              if (run.path / "layers-init.json").exists() else None,
                              "end": training.layer_fields(model, x_probe[:2]),
                              **({"end_no_rope": training.layer_fields(model, x_probe[:2], drop_rope=True)}
                                 if cfg["pe"] == "rope" else {})}}
        run.write_json("summary.json", summary)
        print(f"done: step {result['step']}, validation {metric} {ev['val'][metric]:.4f}, "
              f"test {metric} {ev['test'][metric]:.4f}  ({wall:.0f} s; {run.path})")
    return 0


# ==============================================================================================
# 5. A trained run: sampling (--sample RUN) and evaluation (--eval-only RUN)
# ==============================================================================================
# Both read RUN and write nothing there: no lock is taken (a lock would rewrite .run.lock), and
# checkpoints are replaced atomically (training.save_checkpoint), so reading one while the run
# still trains sees the old file or the new one, never half of one.

# the flags the two commands take besides RUN; every other flag belongs to training
SAMPLE_FLAGS = ("prompt", "tokens", "temperature", "top_k")
RUN_COMMAND_FLAGS = ("sample", "eval_only", "device", "cache_dir", "no_amp")
# what a train_lm.py checkpoint's "config" holds for build_lm (and the data it was trained on)
LM_CONFIG = ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "pe", "lam", "lam_mode",
             "regime", "mlp_ratio", "dropout", "cutoffs", "data")
EOS, UNK = "<eos>", "<unk>"          # WikiText's line end and unknown word (data/text.load_wikitext)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_command(args, given: set) -> None:
    """Which command a command line is: training (no --sample / --eval-only), --sample RUN or
    --eval-only RUN.  A flag of another command is refused in one sentence rather than silently
    ignored: `--sample RUN --d-model 64` cannot change the model RUN's checkpoint holds."""
    if args.sample is not None and args.eval_only is not None:
        raise ValueError("--sample and --eval-only are two different commands: give one of them")
    order = [d for d in vars(args) if d in given]     # the parser's order: the first offender is named
    if args.sample is None and args.eval_only is None:
        stray = [d for d in order if d in SAMPLE_FLAGS]
        if stray:
            raise ValueError(f"{_flag(stray[0])} only applies to --sample RUN (generating text from a "
                             f"trained run): add --sample RUN, or drop {_flag(stray[0])}")
        return
    mode, run = ("--sample", args.sample) if args.sample is not None else ("--eval-only", args.eval_only)
    allowed = set(RUN_COMMAND_FLAGS) | ({"seed", *SAMPLE_FLAGS} if args.sample is not None else set())
    for d in order:
        if d in allowed:
            continue
        if d in SAMPLE_FLAGS or d == "seed":
            raise ValueError(f"{_flag(d)} only applies to --sample: --eval-only generates nothing and draws "
                             f"nothing at random, so drop {_flag(d)}")
        raise ValueError(f"{_flag(d)} is a training flag, but {mode} {run} rebuilds the model and reads "
                         f"the data exactly as the run was trained: drop {_flag(d)}")


def check_sample_args(args) -> None:
    """--tokens, --temperature, --top-k and --seed, before anything is loaded."""
    if not 1 <= args.tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"--tokens must be between 1 and {MAX_NEW_TOKENS:,}, got {args.tokens:,}")
    # NaN fails every comparison, so it is caught by the isfinite test, not by `< 0`
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number ≥ 0 (0 = greedy), got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be 0 (all tokens) or more, got {args.top_k}")
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")


def run_checkpoint(spec: str, flag: str) -> tuple[Path, Path]:
    """RUN as --resume takes it, a run folder or the ckpt.pt inside one: (folder, checkpoint)."""
    if not str(spec).strip():
        raise ValueError(f"{flag} needs a run folder (or its ckpt.pt), got an empty name")
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"{flag} {spec}: there is no run there (no such folder or file)")
    return (path, path / "ckpt.pt") if path.is_dir() else (path.parent, path)


def run_args(folder: Path) -> dict:
    """The command line RUN was started with (its args.json, written by training.open_run): the
    flags its checkpoint's config does not hold (--cache-dir, --no-amp).  {} for a run older
    than that file (then this command line's values, or their defaults, apply)."""
    path = folder / "args.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}): it is not the args.json of a run") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not the args.json of a run")
    return saved


def run_setting(args, given: set, saved: dict, dest: str):
    """A flag's value: the one on this command line if given there, else the run's (args.json),
    else this parser's default -- what training.resume_from_run does for a resumed run."""
    return getattr(args, dest) if dest in given or dest not in saved else saved[dest]


def load_trained(ckpt: Path, device: torch.device) -> tuple[GPT, dict]:
    """The model RUN's checkpoint describes (build_lm on its "config"), holding its weights, in
    eval mode (dropout off: the forward pass is a deterministic function of the tokens)."""
    state = training.load_checkpoint(ckpt)   # missing / corrupt / foreign file: one sentence
    cfg = state["config"]
    missing = [k for k in LM_CONFIG if k not in cfg] if isinstance(cfg, dict) else ["model settings"]
    if missing:
        raise ValueError(f"{ckpt} is not a train_lm.py checkpoint: its config has no {missing[0]}")
    try:
        # (the random initialisation, overwritten below, must not move the global RNG: a caller's
        # own draws, in-process, are the same with or without a model loaded in between)
        with torch.random.fork_rng(devices=[]):
            model = training.build_on(build_lm, cfg, device)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{ckpt} is not a train_lm.py checkpoint: its config does not describe a "
                         f"model ({e})") from None
    try:
        # strict: every tensor of the state dict must find its parameter, with its shape
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the weights in {ckpt} do not fit the model its config describes ({first})") from None
    model.eval()
    return model, state


def word_level(cfg: dict) -> bool:
    """WikiText (perplexity) is the only word-level corpus; every other one is bytes, 256 symbols."""
    return cfg.get("metric", "ppl" if cfg["vocab_size"] != 256 else "bpb") == "ppl"


def run_corpus(cfg: dict, cache_dir: Path, *, download: bool = True) -> text.Corpus:
    """The corpus RUN was trained on, loaded as training loaded it (data/text.load_corpus with the
    run's --data and --cache-dir), checked to have the checkpoint's vocabulary size.
    download=False refuses, in one sentence, a known corpus that is not in the cache (sampling
    needs only its word list: a silent 190 MB download would be a surprise)."""
    data = cfg["data"]
    if data in text.SOURCES and not download and not (cache_dir / text.SOURCES[data]["file"]).exists():
        raise ValueError(f"the checkpoint holds no word list, and its corpus {data} is not in --cache-dir "
                         f"{cache_dir}: pass the --cache-dir the run was trained with")
    if data in text.KNOWN or str(data).endswith(".zip"):
        training.check_folder(cache_dir, "--cache-dir", writable=False)
    corpus = text.load_corpus(data, cache_dir)
    if corpus.vocab_size != cfg["vocab_size"]:
        raise ValueError(f"the corpus {data} now has a vocabulary of {corpus.vocab_size:,} symbols but the "
                         f"checkpoint's model has {cfg['vocab_size']:,}: it is not the data the run was trained on")
    return corpus


def one_process(mode: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"{mode} runs in one process: start it with python, not torchrun")


# -- tokens ↔ text -----------------------------------------------------------------------------
def encode_prompt(prompt: str | None, itos: list | None) -> tuple[list, list]:
    """--prompt as token ids, and the prompt's words the vocabulary lacks.

    Bytes (itos None): its UTF-8 bytes (surrogateescape: a command-line argument that was not
    valid UTF-8 gives back its own bytes).  Words: WikiText is whitespace-tokenised with <eos>
    at every line end, so each line's words are looked up (an unknown one becomes <unk>, as
    training mapped the words the training split lacks) and a line break becomes <eos>.
    No prompt: start at a line boundary ("\\n", or <eos>), as nanoGPT starts from "\\n"."""
    if itos is None:
        ids = list(("\n" if prompt is None else prompt).encode("utf-8", errors="surrogateescape"))
        if not ids:
            raise ValueError("--prompt is empty: give some text to continue, or leave --prompt out to "
                             "start from a line break")
        return ids, []
    stoi = {w: i for i, w in enumerate(itos)}
    ids, unknown = [], []
    for i, line in enumerate(("\n" if prompt is None else prompt).split("\n")):
        if i and EOS in stoi:
            ids.append(stoi[EOS])
        for w in line.split():
            if w not in stoi:
                unknown.append(w)
            ids.append(stoi.get(w, stoi.get(UNK, 0)))
    if len(ids) == len(unknown):       # nothing the model knows: there is nothing to continue
        raise ValueError(f"--prompt {prompt!r} holds no word of the model's {len(itos):,}-word vocabulary: "
                         f"give words of the corpus (case as written, punctuation split off by spaces), "
                         f"or leave --prompt out")
    return ids, unknown


def decode(ids: list, itos: list | None) -> str:
    """Token ids as text: bytes decoded as UTF-8 (an invalid sequence, e.g. a character cut in
    two, becomes U+FFFD), or words joined by spaces with <eos> written as a line break."""
    if itos is None:
        return bytes(ids).decode("utf-8", errors="replace")
    out, line_start = [], True
    for i in ids:
        w = itos[i]
        if w == EOS:
            out.append("\n")
            line_start = True
        else:
            out.append(w if line_start else " " + w)
            line_start = False
    return "".join(out)


# -- sampling ----------------------------------------------------------------------------------
def pick_token(z: torch.Tensor, *, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """One token from the scores z (V,) of the next position:

        T = 0:  v = argmax z                                     (greedy; a tie → the lowest id)
        T > 0:  v ~ p,  pᵥ ∝ exp(zᵥ / T) for v among the k largest zᵥ, 0 for the others

    T < 1 sharpens the model's distribution (T → 0 is the argmax), T > 1 flattens it (T → ∞ is
    uniform over the k kept tokens); T = 1 and k = 0 draw from the model's own p(v | context).
    top-k 1 keeps one token, whatever T: greedy again."""
    if torch.isnan(z).any() or not torch.isfinite(z.max()):
        raise ValueError("the model's output scores are not finite numbers: the checkpoint's weights are broken")
    if temperature == 0:
        return int(torch.argmax(z))
    if 0 < top_k < z.numel():
        # keep exactly the k largest scores (ties at the k-th broken by torch.topk), −inf elsewhere
        vals, ix = torch.topk(z, top_k)
        z = torch.full_like(z, -math.inf).scatter_(0, ix, vals)
    # softmax(z / T), with max z subtracted first: softmax is shift-invariant, and every exponent
    # is then ≤ 0 (the largest exactly 0), so a tiny T underflows to 0 instead of overflowing
    p = torch.softmax((z - z.max()) / temperature, dim=0)
    # one draw from p with our own generator: the global RNG is left untouched
    return int(torch.multinomial(p, 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt_ids: list, n_new: int, *, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, rt: training.Runtime | None = None) -> list:
    """n_new tokens after prompt_ids, autoregressively: at step t the model reads the context
    c = (x_{t−L} … x_{t−1}), the last L = seq_len tokens so far (a sliding window: the model never
    saw a position ≥ L, and its learned / sinusoidal / ALiBi tables stop there), and
    x_t = pick_token(scores of the position after c).  Each step recomputes the whole window
    (no key/value cache): O(n_new · L²) attention, simple and exactly the training forward pass.
    The draws come from a CPU torch.Generator seeded with `seed`, so a seed gives one sequence
    on every device that computes the same scores.  Returns the new ids."""
    if not prompt_ids:
        raise ValueError("sampling needs a prompt of at least one token")
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n0 = len(prompt_ids)
    seq = torch.empty(n0 + n_new, dtype=torch.long, device=device)
    seq[:n0] = torch.tensor(prompt_ids, dtype=torch.long)
    model.eval()
    with training.autocast(rt) if rt is not None else nullcontext():
        for t in range(n0, n0 + n_new):
            ctx = seq[max(0, t - model.seq_len): t][None]                     # (1, ≤ L)
            z = model.next_token_logits(ctx)[0].float().cpu()                  # (V,)
            seq[t] = pick_token(z, temperature=temperature, top_k=top_k, generator=gen)
    return seq[n0:].tolist()


def emit(s: str) -> None:
    """Print s whatever stdout's encoding (a character it cannot show becomes '?' there)."""
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(s.encode(enc, errors="replace").decode(enc, errors="replace"), flush=True)


def open_trained(args, given: set, flag: str, run: str):
    """What --sample and --eval-only both start with: one process, RUN's folder, checkpoint and
    saved flags, the runtime (its autocast as the run had it) and the rebuilt model.
    Returns (folder, ckpt, saved args, rt, model, checkpoint state)."""
    one_process(flag)
    folder, ckpt = run_checkpoint(run, flag)
    saved = run_args(folder)
    rt = training.setup_runtime(args.device, amp=not run_setting(args, given, saved, "no_amp"))
    model, state = load_trained(ckpt, rt.device)
    return folder, ckpt, saved, rt, model, state


def sample_command(args, given: set) -> int:
    """--sample RUN: print the prompt and its continuation of --tokens tokens."""
    check_sample_args(args)
    folder, ckpt, saved, rt, model, state = open_trained(args, given, "--sample", args.sample)
    cfg = state["config"]
    itos = None
    if word_level(cfg):
        # the words are in the checkpoint (runs made since they are stored there); an older
        # checkpoint holds only the vocabulary's size, and then the word list is the corpus's,
        # rebuilt as training built it (WikiText's encoded ids are cached in --cache-dir)
        itos = (state.get("extra") or {}).get("itos")
        if itos is None:
            itos = run_corpus(cfg, Path(run_setting(args, given, saved, "cache_dir")), download=False).itos
        elif len(itos) != cfg["vocab_size"]:
            raise ValueError(f"{ckpt} holds {len(itos):,} words for a {cfg['vocab_size']:,}-word model: "
                             f"the checkpoint is inconsistent")
    ids, unknown = encode_prompt(args.prompt, itos)
    if unknown:
        print(f"note: {len(unknown)} word(s) of --prompt are not in the vocabulary and became {UNK}: "
              f"{' '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}", file=sys.stderr)
    new = generate(model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, rt=rt)
    emit(decode(ids + new, itos))
    return 0


def evaluate_checkpoint(model: GPT, cfg: dict, corpus: text.Corpus, rt: training.Runtime) -> dict:
    """{"val": {"loss", metric}, "test": ...}: train()'s final evaluation (eval_fn with final=True)
    of a rebuilt model -- the same `evaluate` over every whole window of each split, the same
    batch of windows (the run's micro-batch: only the summation order depends on it), the same
    autocast and the same score (bits per byte/character = ℓ / ln 2, perplexity = e^ℓ)."""
    text.check_corpus(corpus, cfg["seq_len"])
    micro = max(1, int(cfg.get("batch_size", 1)) // max(1, int(cfg.get("grad_accum", 1))))
    model.eval()
    out = {}
    with torch.no_grad(), training.autocast(rt):
        for split, toks in (("val", corpus.val), ("test", corpus.test)):
            loss = evaluate(model, toks, seq_len=cfg["seq_len"], batch=micro, rt=rt)
            out[split] = {"loss": loss, corpus.metric: corpus.score(loss)}
    return out


def eval_command(args, given: set) -> int:
    """--eval-only RUN: one line with the validation and test scores of RUN's checkpoint."""
    folder, ckpt, saved, rt, model, state = open_trained(args, given, "--eval-only", args.eval_only)
    cfg = state["config"]
    corpus = run_corpus(cfg, Path(run_setting(args, given, saved, "cache_dir")))
    ev = evaluate_checkpoint(model, cfg, corpus, rt)
    m = corpus.metric
    print(f"{folder} step {state['step']}: val {m} {ev['val'][m]:.6f}  test {m} {ev['test'][m]:.6f}  "
          f"(nats per token: val {ev['val']['loss']:.6f}, test {ev['test']['loss']:.6f}; {corpus.name})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
