"""The Spectral paper's synthetic tasks, an encoder classifier for every PE, and per-head ablation
(arXiv 2505.13027; reading notes: docs/spectral.md §2-§4).

The two tasks (docs/spectral.md §3; the authors' data-gen scripts, re-derived, seeded)
-------------------------------------------------------------------------------------
Vocabulary: a synthetic integer vocabulary of 574 ids (the models' hard-coded vocab size,
docs/spectral.md §3.1): 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK], and 569 word ids 5..573.
No tokenizer, no corpus.

Task 1, trigger distance (content-position DEPENDENT). One ordered pair of distinct trigger words
(w1, w2) for the whole data set. Per sample draw g ~ U{1..G} (words between the triggers) and
l, r ~ U{1..S} (left and right context); each segment is drawn without replacement from the word
ids; the sentence is  left + [w1] + middle + [w2] + right,  truncated to `max_words` (this can only
cut right context). Label: the distance  pos(w2) - pos(w1) = g + 1 in {2..G+1}, uniform, chance
1/G. (docs/spectral.md §3.1 writes "{1..71}"; with g >= 1 the smallest distance is 2.) Exact
duplicates are dropped and redrawn. Deviation, on purpose: the paper's fillers may contain the
trigger words themselves, which makes some labels ambiguous; our default draws fillers from the
other 567 words, and `fillers_include_triggers=True` restores the paper's draw.

Task 2, trigger counting (content-position INDEPENDENT). 30 fixed trigger words. Per sample draw
c ~ U{0..C}, c triggers with replacement from the 30, 120 - c fillers with replacement from the
other words, shuffle. Label: c. As in the paper's code, samples with c = 0 are ignored by the loss
and the accuracy (CrossEntropyLoss(ignore_index=0)): chance is about 1/C.

The classifier (docs/spectral.md §3.3, with the deviations §5 recommends)
------------------------------------------------------------------------
Token embedding (+ absolute PE) -> L pre-LN `ode_attention.Block`s (standard bidirectional SELF-
attention; key padding mask) -> final LayerNorm -> mean over the real tokens -> Linear to the
label space. (The authors' code lets every layer attend to the layer-0 embeddings, has no padding
mask and mean-pools over padding too; we use the standard wiring by default, and GELU not ReLU.
`--wiring paper` gives theirs: in layer l, x ← x + Attn(queries LN(x), keys and values x⁽⁰⁾),
x⁽⁰⁾ = the embeddings + APE, not normalised; MLA self-attends either way, as in their code.)
With no positional encoding, no causal mask and mean pooling, the model is a function of the
token multiset: exactly permutation-invariant (tested), so NoPE cannot beat chance on Task 1.

`--pe` chooses where position enters (docs/spectral.md §2):
    none            nowhere
    sin             sinusoidal table added to the embeddings (Vaswani, interleaved sin/cos)
    learned         a learned table added to the embeddings (N(0, 1) init, like nn.Embedding)
    t5              a learned Toeplitz bias per layer, one scalar per offset and head (no buckets)
    alibi           bias -m_h |i - j|, m_h = e^{-h/H} (the paper's code) or 2^{-8(h+1)/H}
    rope            PURE RoPE: every head's q and k rotated in every layer, no input PE
    rope-partial:K  RoPE on the first K heads, NoPE on the rest (the paper's partialrope.py)
    sin+rope        the paper code's "rope": sinusoidal APE at the input AND RoPE (explicit variant)
    mla             multi-head latent attention with decoupled RoPE (below), q_R per head
    mla-shared      the same with q_R shared by all heads too (the paper's mla.py; explicit variant)

MLA (DeepSeek-V2/V3; docs/spectral.md §4.3). With x the block input after LayerNorm:
    c_KV = x W_DKV,  c_Q = x W_DQ                             (latents, width d_c)
    k_C = c_KV W_UK,  v = c_KV W_UV,  q_C = c_Q W_UQ          (content parts, H heads of d_h)
    k_R = RoPE(x W_KR)               shared by all heads      (width d_R)
    q_R = RoPE(c_Q W_QR)             per head (DeepSeek; "mla") or shared ("mla-shared": the paper code)
    logit_h,ij = ([q_C; q_R]_h,i . [k_C; k_R]_j) / sqrt(d_h + d_R)
               = (q_C . k_C + Re sum_k G^(k)_{qR,kR} o E_theta_k) / sqrt(d_h + d_R)
                                                  (spectral.decomposition.mla_logits)
Position enters as an ADDITIVE, separately projected RoPE logit on top of a NoPE content logit.
Unlike the paper's mla.py the rotation is a true rotation (rope.apply_rope), and the MLA model
differs from the others ONLY in its attention module (same embedding, padding mask, pooling,
optimiser, epochs), so the comparison is not confounded (docs/spectral.md §4.3 caveat 3).

Training (docs/spectral.md §3.4): AdamW, lr 1e-4, weight decay 1e-5, betas (0.98, 0.9) exactly as
the paper's code writes them -- beta1 > beta2 is unusual (`--betas standard` gives (0.9, 0.98));
linear warmup over 6% of the steps then cosine to 0, per step; 70/30 train/test split; the
reported accuracy is the LAST epoch's, as in the paper.

Per-head ablation (docs/spectral.md §4.2): for every layer l and head h, zero head h's output
(its d_h slice of the concatenated attention output, before the output projection: `head_mask`)
and measure the test accuracy. The paper's code zeroes the rows of W_V instead (the same thing
when V has no bias); its MLA ablation zeroed latent channels by mistake, which we do not repeat.
"Single-head deposit" (our criterion; the paper's is not recoverable, docs/spectral.md, "Open
uncertainties" 5): in some layer one head's ablation costs >= 20 accuracy points and at least 4x
the runner-up in that layer.

Presets: "paper" (the authors' sizes: 100k/50k samples, 6 layers x 16 heads, d 256, 100 epochs,
batch 512, lr 1e-4), "medium" (the paper's model on mid-sized tasks, lr 5e-4, 20 epochs: one GPU,
~4 min a run), "small" (2 layers x 8 heads, d 64, lr 1e-3, 12 epochs: ~1 CPU-minute a run; the
README table) and "tiny" (tests). The smaller presets raise the learning rate because they train
for hundreds, not ten thousands, of steps.

Usage (from the project root):
    python -m spectral.tasks show --task 1                                   # a few samples
    python -m spectral.tasks train --task 1 --pe rope --preset small --seed 0
    python -m spectral.tasks table --preset small --seeds 0,1,2 --workers 2   # README table
    python -m spectral.tasks train --task 1 --pe rope --preset medium --device cuda
    python -m spectral.tasks report --runs results/spectral/runs --name mine  # table from run files
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import rope
import training
from ode_attention import Block, attention_mask

# ---- vocabulary (docs/spectral.md §3.1) ----
VOCAB_SIZE = 574
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
FIRST_WORD = 5

PES = ("none", "sin", "learned", "t5", "alibi", "rope", "rope-partial:K", "sin+rope", "mla", "mla-shared")
TABLE_PES = ("none", "sin", "learned", "t5", "alibi", "rope", "rope-partial:1", "mla")

# ---- presets: the paper's sizes, and CPU-sized ones ----
# task: data sizes; model: Classifier sizes; train: optimisation
PRESETS = {
    "paper": {  # docs/spectral.md §3.1-§3.4 (the authors' code)
        "task1": dict(n_samples=100_000, max_gap=70, max_side=25, max_words=120),
        "task2": dict(n_samples=50_000, n_triggers=30, max_count=100, seq_words=120),
        "model": dict(d=256, n_heads=16, n_layers=6, mlp_ratio=2.0, dropout=0.1, mla_latent=128),
        "train": dict(epochs=100, batch_size=512, lr=1e-4),
    },
    "small": {  # CPU: 3 seeds x 8 PEs x 2 tasks in ~30-40 min on 2 cores
        "task1": dict(n_samples=6_000, max_gap=16, max_side=6, max_words=40),
        "task2": dict(n_samples=6_000, n_triggers=8, max_count=16, seq_words=32),
        "model": dict(d=64, n_heads=8, n_layers=2, mlp_ratio=2.0, dropout=0.0, mla_latent=32),
        "train": dict(epochs=12, batch_size=64, lr=1e-3),
    },
    "medium": {  # one GPU: the paper's model (6 layers x 16 heads, d 256) on mid-sized tasks
        "task1": dict(n_samples=30_000, max_gap=32, max_side=10, max_words=64),
        "task2": dict(n_samples=30_000, n_triggers=16, max_count=32, seq_words=64),
        "model": dict(d=256, n_heads=16, n_layers=6, mlp_ratio=2.0, dropout=0.1, mla_latent=128),
        "train": dict(epochs=20, batch_size=256, lr=5e-4, ablation_samples=3000),
    },
    "tiny": {  # tests
        "task1": dict(n_samples=256, max_gap=6, max_side=3, max_words=14),
        "task2": dict(n_samples=256, n_triggers=4, max_count=6, seq_words=12),
        "model": dict(d=32, n_heads=4, n_layers=2, mlp_ratio=2.0, dropout=0.0, mla_latent=16),
        "train": dict(epochs=2, batch_size=32, lr=3e-3),
    },
}
WEIGHT_DECAY = 1e-5
BETAS = {"paper": (0.98, 0.9), "standard": (0.9, 0.98)}
# standard: self-attention; paper: the paper's code, keys and values of every layer from the layer-0
# embeddings + PE (its `memory`), queries from the LayerNorm'd stream (MLA self-attends in both)
WIRINGS = ("standard", "paper")
ADDED_LATER = {"wiring": "standard"}       # runs stored before --wiring existed were standard
WARMUP_FRACTION = 0.06
TRAIN_FRACTION = 0.7
DEPOSIT_MIN_DROP, DEPOSIT_RATIO = 20.0, 4.0   # our single-head-deposit criterion (points, ratio)


# ============================================================================================
# 1. Task generators
# ============================================================================================
@dataclass
class TaskData:
    tokens: torch.Tensor   # (N, L) int64, right-padded with PAD
    labels: torch.Tensor   # (N,) int64; label 0 is ignored by loss and accuracy
    n_classes: int         # size of the output layer (labels are 0..n_classes-1)
    meta: dict             # triggers, sizes, seed


def _words(vocab_size):
    if vocab_size <= FIRST_WORD + 2:
        raise ValueError(f"vocab_size must exceed {FIRST_WORD + 2}, got {vocab_size}")
    return np.arange(FIRST_WORD, vocab_size)


def _pad(rows, width):
    out = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def make_task1(n_samples, *, max_gap=70, max_side=25, max_words=120, seed=0, vocab_size=VOCAB_SIZE,
               fillers_include_triggers=False):
    """Task 1 (trigger distance): label = pos(w2) - pos(w1) = g + 1, g ~ U{1..max_gap}."""
    if n_samples < 1 or max_gap < 1 or max_side < 1:
        raise ValueError("n_samples, max_gap and max_side must be positive")
    if max_side + max_gap + 2 > max_words:
        raise ValueError(f"max_words={max_words} would cut a trigger: it must be >= max_side + max_gap + 2 "
                         f"= {max_side + max_gap + 2}")
    rng = np.random.default_rng(seed)
    words = _words(vocab_size)
    # one ordered pair of distinct trigger words for the whole data set
    w1, w2 = (int(w) for w in rng.choice(words, 2, replace=False))
    pool = words if fillers_include_triggers else words[(words != w1) & (words != w2)]
    if len(pool) < max(max_gap, max_side):
        raise ValueError(f"the vocabulary has {len(pool)} filler words, fewer than a segment of "
                         f"{max(max_gap, max_side)}")
    rows, labels, seen, tries = [], [], set(), 0
    while len(rows) < n_samples:
        tries += 1
        if tries > 50 * n_samples + 1000:
            raise ValueError(f"cannot draw {n_samples} distinct Task 1 samples with these sizes")
        g = int(rng.integers(1, max_gap + 1))      # words between the triggers
        l = int(rng.integers(1, max_side + 1))     # left context
        r = int(rng.integers(1, max_side + 1))     # right context
        # each segment without replacement within the segment
        left, mid, right = (rng.choice(pool, k, replace=False) for k in (l, g, r))
        seq = np.concatenate([left, [w1], mid, [w2], right])[:max_words]
        key = seq.tobytes()
        if key in seen:                            # exact duplicates are dropped (and redrawn)
            continue
        seen.add(key)
        rows.append(seq)
        # label = pos(w2) - pos(w1) = g + 1
        labels.append(g + 1)
    return TaskData(_pad(rows, max_words), torch.tensor(labels), max_gap + 2,
                    {"task": 1, "triggers": [w1, w2], "max_gap": max_gap, "max_side": max_side,
                     "max_words": max_words, "seed": seed, "fillers_include_triggers": fillers_include_triggers})


def length_only_accuracy(max_gap, max_side, max_words):
    """Bayes accuracy (%) of guessing the Task 1 label from the sentence LENGTH alone.

    The length is min(l + g + r + 2, max_words) with l, r ~ U{1..S}, g ~ U{1..G}, so it carries
    information about the label: a permutation-invariant model (NoPE + mean pooling) sees the
    length (through the 1/n weight of each token in the mean) and can reach this accuracy, but
    no more. accuracy = sum_length max_g P(g, length).
    """
    joint = {}
    for g in range(1, max_gap + 1):
        for l in range(1, max_side + 1):
            for r in range(1, max_side + 1):
                key = (min(l + g + r + 2, max_words), g)
                joint[key] = joint.get(key, 0) + 1
    best = {}
    for (length, g), c in joint.items():
        best[length] = max(best.get(length, 0), c)
    # P(g, length) = count / (G S^2)
    return 100.0 * sum(best.values()) / (max_gap * max_side ** 2)


def make_task2(n_samples, *, n_triggers=30, max_count=100, seq_words=120, seed=0, vocab_size=VOCAB_SIZE):
    """Task 2 (trigger counting): label = number of trigger tokens c ~ U{0..max_count} (0 ignored)."""
    if n_samples < 1 or n_triggers < 1 or max_count < 1:
        raise ValueError("n_samples, n_triggers and max_count must be positive")
    if max_count > seq_words:
        raise ValueError(f"max_count={max_count} exceeds the sequence length seq_words={seq_words}")
    rng = np.random.default_rng(seed)
    words = _words(vocab_size)
    if n_triggers >= len(words):
        raise ValueError(f"n_triggers={n_triggers} leaves no filler words in a vocabulary of {len(words)}")
    triggers = rng.choice(words, n_triggers, replace=False)
    fillers = np.setdiff1d(words, triggers)
    counts = rng.integers(0, max_count + 1, n_samples)                 # c ~ U{0..max_count}
    trig = rng.choice(triggers, (n_samples, seq_words))                # with replacement
    fill = rng.choice(fillers, (n_samples, seq_words))
    # the first c slots are triggers, the rest fillers, then shuffle each row
    seq = np.where(np.arange(seq_words)[None, :] < counts[:, None], trig, fill)
    order = np.argsort(rng.random((n_samples, seq_words)), axis=1)
    seq = np.take_along_axis(seq, order, axis=1)
    return TaskData(torch.as_tensor(seq, dtype=torch.long), torch.as_tensor(counts, dtype=torch.long),
                    max_count + 1, {"task": 2, "triggers": [int(t) for t in triggers], "max_count": max_count,
                                    "seq_words": seq_words, "seed": seed})


def make_task(task, preset="small", seed=0, **overrides):
    """Task 1 or 2 at a preset's sizes (overrides replace single sizes)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if task == 1:
        return make_task1(**{**PRESETS[preset]["task1"], **overrides}, seed=seed)
    if task == 2:
        return make_task2(**{**PRESETS[preset]["task2"], **overrides}, seed=seed)
    raise ValueError(f"unknown task {task!r}; choose 1 (trigger distance) or 2 (trigger counting)")


# ============================================================================================
# 2. MLA: multi-head latent attention with decoupled RoPE
# ============================================================================================
class MLAAttention(nn.Module):
    """DeepSeek-style MLA with a decoupled, truly rotating RoPE channel (module docstring).

    Same call signature as ode_attention.Attention, so it plugs into Block(attn=...).
    rope_sharing: "per-head-q" (DeepSeek-V2/V3: q_R per head, k_R shared) or "shared" (q_R and k_R
    both shared by all heads, as in the paper's mla.py: the positional logit is then the same
    for every head).
    """

    def __init__(self, d, n_heads, *, latent=None, rope_dim=None, rope_sharing="per-head-q",
                 rope_base=10000.0, dropout=0.0):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"model width {d} must be a multiple of n_heads={n_heads}")
        if rope_sharing not in ("per-head-q", "shared"):
            raise ValueError(f"unknown rope_sharing {rope_sharing!r}; use 'per-head-q' or 'shared'")
        self.d, self.n_heads, self.d_h = d, n_heads, d // n_heads
        self.latent = latent or d // 2
        self.d_r = rope_dim or self.d_h
        if self.d_r % 2:
            raise ValueError(f"the decoupled RoPE width must be even, got {self.d_r}")
        self.rope_sharing, self.rope_base, self.dropout = rope_sharing, rope_base, dropout
        self.down_kv = nn.Linear(d, self.latent, bias=False)     # W_DKV
        self.down_q = nn.Linear(d, self.latent, bias=False)      # W_DQ
        self.up_k = nn.Linear(self.latent, d, bias=False)        # W_UK
        self.up_v = nn.Linear(self.latent, d, bias=False)        # W_UV
        self.up_q = nn.Linear(self.latent, d, bias=False)        # W_UQ
        self.k_rope = nn.Linear(d, self.d_r, bias=False)         # W_KR (shared by the heads)
        n_qr = n_heads if rope_sharing == "per-head-q" else 1
        self.q_rope = nn.Linear(self.latent, n_qr * self.d_r, bias=False)   # W_QR
        self.proj = nn.Linear(d, d, bias=False)                  # output O
        # logit scale 1/sqrt(d_h + d_R) of the concatenated dot product
        self.scale = 1.0 / math.sqrt(self.d_h + self.d_r)

    def parts(self, x, positions=None):
        """q_C, k_C, v (B, H, n, d_h) and the rotated q_R (B, H or 1, n, d_R), k_R (B, 1, n, d_R)."""
        B, n, _ = x.shape
        H, dh = self.n_heads, self.d_h
        pos = torch.arange(n, device=x.device) if positions is None else torch.as_tensor(positions, device=x.device)
        # c_KV = x W_DKV,  c_Q = x W_DQ
        c_kv, c_q = self.down_kv(x), self.down_q(x)
        # k_C = c_KV W_UK, v = c_KV W_UV, q_C = c_Q W_UQ, split into heads
        heads = lambda t: t.view(B, n, H, dh).transpose(1, 2)
        k_c, v, q_c = heads(self.up_k(c_kv)), heads(self.up_v(c_kv)), heads(self.up_q(c_q))
        # k_R = RoPE(x W_KR), q_R = RoPE(c_Q W_QR): true rotations by the token positions
        k_r = rope.apply_rope(self.k_rope(x)[:, None], pos, self.rope_base)
        q_r = self.q_rope(c_q).view(B, n, -1, self.d_r).transpose(1, 2)
        q_r = rope.apply_rope(q_r, pos, self.rope_base)
        return q_c, k_c, v, q_r, k_r

    def forward(self, x, *, positions=None, attn_bias=None, key_padding_mask=None, head_mask=None):
        B, n, d = x.shape
        H = self.n_heads
        q_c, k_c, v, q_r, k_r = self.parts(x, positions)
        # q = [q_C; q_R], k = [k_C; k_R] (the shared parts broadcast over the heads)
        q = torch.cat((q_c, q_r.expand(B, H, n, self.d_r)), -1)
        k = torch.cat((k_c, k_r.expand(B, H, n, self.d_r)), -1)
        mask, _ = attention_mask(n, q.dtype, x.device, attn_bias, key_padding_mask)
        # softmax(q k^T / sqrt(d_h + d_R) + bias) v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        if head_mask is not None:
            y = y * head_mask.to(y.dtype)[None, :, None, None]   # zero an ablated head's output
        # concatenate the heads, then the output projection y O
        return self.proj(y.transpose(1, 2).reshape(B, n, d))


# ============================================================================================
# 3. The encoder classifier
# ============================================================================================
def parse_pe(pe, n_heads):
    """'rope-partial:K' -> ('rope-partial', K); other names -> (name, None). Raises ValueError."""
    if pe.startswith("rope-partial:"):
        try:
            k = int(pe.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"rope-partial needs an integer head count, e.g. rope-partial:1, got {pe!r}") from None
        if not 0 <= k <= n_heads:
            raise ValueError(f"rope-partial:K needs 0 <= K <= n_heads={n_heads}, got K={k}")
        return "rope-partial", k
    if pe not in PES or pe == "rope-partial:K":
        raise ValueError(f"unknown PE {pe!r}; choose one of {', '.join(PES)}")
    return pe, None


class Classifier(nn.Module):
    """Bidirectional encoder: embed (+ APE) -> Blocks -> LayerNorm -> mean over real tokens -> Linear."""

    def __init__(self, n_classes, *, pe="rope", d=256, n_heads=16, n_layers=6, mlp_ratio=2.0, dropout=0.1,
                 max_len=128, vocab_size=VOCAB_SIZE, alibi_schedule="exp", rope_base=10000.0,
                 mla_latent=None, wiring="standard"):
        super().__init__()
        if wiring not in WIRINGS:
            raise ValueError(f"unknown wiring {wiring!r}; choose one of {', '.join(WIRINGS)}")
        self.pe, k = parse_pe(pe, n_heads)
        # the paper's code: every layer's keys and values from the layer-0 embeddings (+ APE); its
        # MLA model self-attends (keys and values from the running stream), so MLA keeps that
        self.wiring = "standard" if self.pe in ("mla", "mla-shared") else wiring
        self.n_layers, self.n_heads, self.max_len = n_layers, n_heads, max_len
        self.embed = nn.Embedding(vocab_size, d)
        if self.pe in ("sin", "sin+rope"):
            # p_{t,2k} = sin(t w_k), p_{t,2k+1} = cos(t w_k)
            self.register_buffer("ape", rope.sinusoidal_pe(max_len, d, rope_base), persistent=False)
        if self.pe == "learned":
            self.learned_pe = rope.LearnedPE(max_len, d, init_std=1.0)
        if self.pe == "alibi":
            self.register_buffer("slopes", rope.alibi_slopes(n_heads, alibi_schedule).float(), persistent=False)
        if self.pe == "t5":
            # one learned Toeplitz table per layer, one scalar per offset and head (no buckets)
            self.t5 = nn.ModuleList(rope.T5RelativeBias(n_heads, max_len) for _ in range(n_layers))
        blocks = []
        for _ in range(n_layers):
            if self.pe in ("mla", "mla-shared"):
                sharing = "shared" if self.pe == "mla-shared" else "per-head-q"
                attn = MLAAttention(d, n_heads, latent=mla_latent, rope_sharing=sharing,
                                    rope_base=rope_base, dropout=dropout)
                blocks.append(Block(d, n_heads, mlp_ratio=mlp_ratio, dropout=dropout, attn=attn))
            else:
                rotate = self.pe in ("rope", "rope-partial", "sin+rope")
                blocks.append(Block(d, n_heads, mlp_ratio=mlp_ratio, dropout=dropout,
                                    pe="rope" if rotate else "none", rope_base=rope_base,
                                    rope_heads=k if self.pe == "rope-partial" else None))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, tokens, head_mask=None):
        """tokens (B, n) with PAD = 0 -> logits (B, n_classes). head_mask: (L, H), 0 ablates a head."""
        B, n = tokens.shape
        if n > self.max_len:
            raise ValueError(f"sequence of length {n} is longer than max_len={self.max_len}")
        real = tokens != PAD                                   # key padding mask, True = real token
        x = self.embed(tokens)
        if self.pe in ("sin", "sin+rope"):
            x = x + self.ape[:n]                               # x_i = c_i + p_i
        elif self.pe == "learned":
            x = x + self.learned_pe(n)
        x0 = x if self.wiring == "paper" else None                 # the memory: layer-0 tokens + APE
        bias = None
        if self.pe == "alibi":
            # B_ij = -m_h |i - j|, shared by the layers (built on the CPU: rope.alibi_bias's
            # index grid lives there), then moved to the tokens' device
            bias = rope.alibi_bias(n, self.slopes.cpu()).to(tokens.device)
        for l, block in enumerate(self.blocks):
            if self.pe == "t5":
                bias = self.t5[l](n)                           # B_ij = b_h[j - i]
            x = block(x, attn_bias=bias, key_padding_mask=real, kv=x0,
                      head_mask=None if head_mask is None else head_mask[l])
        x = self.norm(x)
        # mean over the real tokens: (1/|real|) sum_{i real} x_i
        w = real.to(x.dtype)[..., None]
        pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)
        return self.head(pooled)


# ============================================================================================
# 4. Training, evaluation, ablation
# ============================================================================================
def _batches(n, batch_size, generator=None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


def _trim(tokens):
    """Drop columns that are padding in every row (sequences are right-padded)."""
    width = int((tokens != PAD).sum(1).max())
    return tokens[:, :max(width, 1)]


@torch.no_grad()
def accuracy(model, data_tokens, labels, head_mask=None, batch_size=512):
    """Accuracy in % over the samples whose label is not 0 (the paper's metric)."""
    model.eval()
    dev = next(model.parameters()).device
    correct = total = 0
    for idx in _batches(len(labels), batch_size):
        y = labels[idx].to(dev)
        keep = y != 0
        pred = model(_trim(data_tokens[idx]).to(dev),
                     head_mask=None if head_mask is None else head_mask.to(dev)).argmax(-1)
        correct += int((pred[keep] == y[keep]).sum())
        total += int(keep.sum())
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def ablation_grid(model, tokens, labels):
    """(L, H) accuracies with head (l, h)'s output zeroed, plus the unablated baseline."""
    L, H = model.n_layers, model.n_heads
    base = accuracy(model, tokens, labels)
    grid = torch.zeros(L, H)
    for l in range(L):
        for h in range(H):
            mask = torch.ones(L, H)
            mask[l, h] = 0.0                                  # zero head h's slice in layer l
            grid[l, h] = accuracy(model, tokens, labels, head_mask=mask)
    return base, grid


def concentration(base, grid, min_drop=1.0):
    """The graded version of the deposit, per layer: C_l = max_h drop_lh / Σ_h drop_lh, with
    drop_lh = max(base − grid_lh, 0) the accuracy lost by ablating head h of layer l. C_l = 1/H
    when every head costs the same, 1 when one head carries all of the layer's loss; None for a
    layer where no ablation costs min_drop points (1: about the noise of the evaluation set — a
    0.3-point drop "concentrated" in one head says nothing). base: float; grid: (L, H)."""
    drop = (float(base) - torch.as_tensor(grid, dtype=torch.float64)).clamp(min=0.0)
    top, total = drop.max(1).values, drop.sum(1)
    return [None if float(m) < min_drop else float(m / t) for m, t in zip(top, total)]


def is_deposit(top: float, runner: float) -> bool:
    """Our single-head-deposit criterion: one head's drop ≥ DEPOSIT_MIN_DROP points and ≥
    DEPOSIT_RATIO × the runner-up of its own layer (a negative runner-up counts as 0)."""
    return top >= DEPOSIT_MIN_DROP and top >= DEPOSIT_RATIO * max(runner, 0.0)


def layer_deposits(base, grid) -> list[bool]:
    """Per layer l, is_deposit of that layer's largest drop against its runner-up, drop_lh = base −
    grid_lh. Unlike deposit_stats, which judges only the largest drop of the whole model, an early
    layer's deposit is not hidden by a larger, shared loss in a later layer. grid: (L, H)."""
    drop = float(base) - torch.as_tensor(grid, dtype=torch.float64)
    out = []
    for row in drop:
        v = row.sort(descending=True).values
        out.append(is_deposit(float(v[0]), float(v[1]) if len(v) > 1 else 0.0))
    return out


def deposit_stats(base, grid):
    """Per run: the largest drop (points), where it is, the runner-up in that layer and the verdict."""
    drop = base - grid                                        # accuracy lost by ablating (l, h)
    l, h = divmod(int(drop.argmax()), drop.shape[1])
    top = float(drop[l, h])
    runner = float(torch.cat((drop[l, :h], drop[l, h + 1:])).max()) if drop.shape[1] > 1 else 0.0
    return {"top_drop": top, "top_layer": l, "top_head": h, "runner_up_drop": runner,
            "deposit": is_deposit(top, runner), "concentration": concentration(base, grid)}


def run_config(task, pe, preset="small", seed=0, **overrides):
    """The full configuration of one run (preset values, then overrides)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    cfg = {"task": task, "pe": pe, "preset": preset, "seed": seed,
           "weight_decay": WEIGHT_DECAY, "betas": "paper", "warmup_fraction": WARMUP_FRACTION,
           "alibi_schedule": "exp", "fillers_include_triggers": False, "device": "auto",
           "ablation_samples": None, "max_minutes": None, "wiring": "standard", **p["model"], **p["train"]}
    for k, v in overrides.items():
        if k not in cfg:
            raise ValueError(f"unknown setting {k!r}")
        if v is not None:
            cfg[k] = v
    if cfg["wiring"] not in WIRINGS:
        raise ValueError(f"unknown wiring {cfg['wiring']!r}; choose one of {', '.join(WIRINGS)}")
    if cfg["betas"] not in BETAS:
        raise ValueError(f"unknown betas {cfg['betas']!r}; choose one of {sorted(BETAS)}")
    if cfg["epochs"] < 1 or cfg["batch_size"] < 1 or not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise ValueError("epochs and batch_size must be >= 1 and lr a positive number")
    return cfg


def train_run(task, pe, preset="small", seed=0, *, ablate=True, progress=True, return_model=False, **overrides):
    """Generate the data, train one classifier, evaluate it, ablate every head. Returns a dict."""
    cfg = run_config(task, pe, preset, seed, **overrides)
    t0 = time.time()
    extra = {"fillers_include_triggers": cfg["fillers_include_triggers"]} if task == 1 else {}
    data = make_task(task, preset, seed, **extra)
    # 70/30 train/test split, seeded
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(data.labels), generator=g)
    n_train = int(TRAIN_FRACTION * len(perm))
    tr, te = perm[:n_train], perm[n_train:]
    torch.manual_seed(seed)
    model = Classifier(data.n_classes, pe=pe, d=cfg["d"], n_heads=cfg["n_heads"], n_layers=cfg["n_layers"],
                       mlp_ratio=cfg["mlp_ratio"], dropout=cfg["dropout"], max_len=data.tokens.shape[1],
                       alibi_schedule=cfg["alibi_schedule"], mla_latent=cfg["mla_latent"], wiring=cfg["wiring"])
    device = training.pick_device(cfg["device"])
    torch.backends.cuda.matmul.allow_tf32 = True             # GPU: TF32 matmuls (CPU: float32)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=BETAS[cfg["betas"]],
                            weight_decay=cfg["weight_decay"])
    steps_per_epoch = math.ceil(n_train / cfg["batch_size"])
    total = cfg["epochs"] * steps_per_epoch
    warmup = round(cfg["warmup_fraction"] * total)
    history, step = [], 0
    bar = tqdm(total=total, desc=f"task {task} {pe} seed {seed}", disable=not progress, leave=False)
    for epoch in range(cfg["epochs"]):
        model.train()
        loss_sum, n_loss = 0.0, 0
        for idx in _batches(n_train, cfg["batch_size"], g):
            # lr(s): linear warmup over 6% of the steps, then cosine to 0 (training.cosine_lr)
            for group in opt.param_groups:
                group["lr"] = training.cosine_lr(step, lr=cfg["lr"], total=total, warmup=warmup)
            tokens, y = _trim(data.tokens[tr[idx]]).to(device), data.labels[tr[idx]].to(device)
            if bool((y == 0).all()):                           # every label ignored: nothing to learn
                step += 1
                continue
            # cross-entropy over the labels != 0 (ignore_index = 0, as the paper's code)
            loss = F.cross_entropy(model(tokens), y, ignore_index=0)
            if not torch.isfinite(loss):
                raise ValueError(f"the training loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            n_loss += 1
            step += 1
            bar.update(1)
        history.append({"epoch": epoch + 1, "train_loss": float(loss_sum) / max(n_loss, 1),
                        "test_acc": accuracy(model, data.tokens[te], data.labels[te])})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", test=f"{history[-1]['test_acc']:.1f}")
        if cfg["max_minutes"] and time.time() - t0 > 60 * cfg["max_minutes"]:
            break                                              # safety stop (recorded in history)
    bar.close()
    out = {"config": cfg, "meta": data.meta, "n_train": n_train, "n_test": len(te), "steps": total,
           "history": history, "train_acc": accuracy(model, data.tokens[tr], data.labels[tr]),
           "test_acc": history[-1]["test_acc"],
           # chance: 1 / (number of possible labels != 0)
           "chance_acc": 100.0 / (data.meta["max_gap"] if task == 1 else data.meta["max_count"]),
           "length_only_acc": (length_only_accuracy(data.meta["max_gap"], data.meta["max_side"],
                                                    data.meta["max_words"]) if task == 1 else None),
           "train_seconds": time.time() - t0}
    if ablate:
        sub = te[: cfg["ablation_samples"]] if cfg["ablation_samples"] else te
        base, grid = ablation_grid(model, data.tokens[sub], data.labels[sub])
        out["ablation"] = {"baseline": base, "grid": grid.tolist(), **deposit_stats(base, grid)}
    out["seconds"] = time.time() - t0
    if return_model:
        out["model"] = model
    return out


# ============================================================================================
# 5. The results table and the heat maps
# ============================================================================================
def run_name(task, pe, preset, seed):
    return f"task{task}_{pe.replace(':', '')}_{preset}_seed{seed}.json"


def _write_text(path, text):
    """Atomic text write (training.atomic_write: a temporary file, then os.replace)."""
    training.atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_json(path, obj):
    _write_text(path, json.dumps(obj, indent=1))


def _worker(args):
    task, pe, preset, seed, path, overrides = args
    torch.set_num_threads(1)
    res = train_run(task, pe, preset, seed, progress=False, **overrides)
    res["versions"] = training.versions()
    _write_json(path, res)
    return path


def made_with(config):
    """A stored run's config with the settings added after it was made at their defaults."""
    return None if config is None else {**ADDED_LATER, **config}


def run_all(tasks, pes, seeds, preset, cache, workers=1, overrides=None):
    """Train every (task, pe, seed) whose JSON is not in `cache` yet; returns all results."""
    jobs = [(t, pe, preset, s, os.path.join(cache, run_name(t, pe, preset, s)), overrides or {})
            for t in tasks for pe in pes for s in seeds]
    todo = [j for j in jobs if not os.path.exists(j[4])]
    if todo and workers == 1:
        for j in tqdm(todo, desc="runs"):
            _worker(j)
    elif todo:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            for _ in tqdm(ex.map(_worker, todo), total=len(todo), desc="runs"):
                pass
    results = []
    for j in jobs:
        try:
            with open(j[4]) as f:
                res = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the run file {j[4]}: {e}") from None
        # a cached run must have been made with exactly these settings (one made before a setting
        # existed was made at its default: ADDED_LATER)
        if made_with(res.get("config")) != run_config(j[0], j[1], j[2], j[3], **j[5]):
            raise ValueError(f"the cached run {j[4]} was made with other settings; use another --cache")
        results.append(res)
    return results


def _first_epoch(run, threshold):
    return next((h["epoch"] for h in run["history"] if h["test_acc"] >= threshold), None)


def _mean_or_none(values):
    """Mean over the runs that reached the threshold (None if none did)."""
    hit = [v for v in values if v is not None]
    return sum(hit) / len(hit) if hit else None


def _spread(name, values):
    """{name_median, name_min, name_max, name_n} of the values that are not None (None when none are)."""
    v = sorted(x for x in values if x is not None)
    med = None if not v else (v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2)
    return {f"{name}_median": med, f"{name}_min": v[0] if v else None, f"{name}_max": v[-1] if v else None,
            f"{name}_n": len(v)}


def summarise(results):
    """Rows: task, pe, n seeds, mean and std of the last-epoch test accuracy, deposit counts."""
    rows = []
    keys = sorted({(r["config"]["task"], r["config"]["pe"]) for r in results},
                  key=lambda k: (k[0], PES.index(k[1]) if k[1] in PES else PES.index("rope-partial:K")))
    for task, pe in keys:
        rs = [r for r in results if r["config"]["task"] == task and r["config"]["pe"] == pe]
        acc = torch.tensor([r["test_acc"] for r in rs], dtype=torch.float64)
        dep = [r["ablation"] for r in rs if "ablation" in r]
        rows.append({"task": task, "pe": pe, "seeds": len(rs), "test_acc_mean": acc.mean().item(),
                     "test_acc_std": acc.std().item() if len(rs) > 1 else 0.0,
                     "train_acc_mean": sum(r["train_acc"] for r in rs) / len(rs),
                     "chance": rs[0]["chance_acc"], "length_only": rs[0].get("length_only_acc"),
                     "top_drop_mean": sum(d["top_drop"] for d in dep) / max(len(dep), 1),
                     "runner_up_mean": sum(d["runner_up_drop"] for d in dep) / max(len(dep), 1),
                     "top_layer0_runs": sum(d["top_layer"] == 0 for d in dep),
                     "deposit_runs": sum(d["deposit"] for d in dep),
                     # graded: C of the layer holding the largest drop, per run (from the stored
                     # grid), as median and range over the runs (None where no ablation cost anything)
                     **_spread("concentration", [concentration(d["baseline"], d["grid"])[d["top_layer"]] for d in dep]),
                     # optimisation speed: first epoch with test accuracy >= 90% (None: never)
                     "epochs_to_90_mean": _mean_or_none([_first_epoch(r, 90.0) for r in rs]),
                     "reached_90": sum(_first_epoch(r, 90.0) is not None for r in rs),
                     "minutes": sum(r["seconds"] for r in rs) / 60})
    return rows


def write_tables(rows, out, name="synthetic_small"):
    training.write_csv(os.path.join(out, f"{name}_results.csv"),
                       [{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                       list(rows[0].keys()))
    pes = []
    for r in rows:
        if r["pe"] not in pes:
            pes.append(r["pe"])
    by = {(r["task"], r["pe"]): r for r in rows}
    lines = ["| PE | Task 1 (distance) acc % | Task 2 (count) acc % | Task 1 epochs to 90% test acc | "
             "Task 1 top head drop (pts) | Task 1 deposit runs | Task 1 concentration C, median [range] "
             "(runs with a drop ≥ 1 point) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for pe in pes:
        cells = []
        for t in (1, 2):
            r = by.get((t, pe))
            cells.append("-" if r is None else
                         f"{r['test_acc_mean']:.1f} ± {r['test_acc_std']:.1f}" if r["seeds"] > 1 else
                         f"{r['test_acc_mean']:.1f} (1 seed)")
        r1 = by.get((1, pe))
        cells.append("-" if r1 is None else "never" if r1["epochs_to_90_mean"] is None else
                     f"{r1['epochs_to_90_mean']:.1f} ({r1['reached_90']}/{r1['seeds']} runs)")
        cells.append("-" if r1 is None else f"{r1['top_drop_mean']:.1f} (runner-up {r1['runner_up_mean']:.1f})")
        cells.append("-" if r1 is None else f"{r1['deposit_runs']}/{r1['seeds']}")
        cells.append("-" if r1 is None or r1.get("concentration_median") is None else
                     f"{r1['concentration_median']:.2f} [{r1['concentration_min']:.2f}, {r1['concentration_max']:.2f}]"
                     f" ({r1['concentration_n']} of {r1['seeds']} runs)")
        lines.append(f"| {pe} | " + " | ".join(cells) + " |")
    chance = {t: next((r["chance"] for r in rows if r["task"] == t), None) for t in (1, 2)}
    lines.append("")
    length_only = next((r["length_only"] for r in rows if r["task"] == 1 and r["length_only"] is not None), None)
    lines.append("Chance: " + ", ".join(f"Task {t} {c:.1f}%" for t, c in chance.items() if c is not None)
                 + ("" if length_only is None else
                    f"; guessing the Task 1 distance from the sentence length alone: {length_only:.1f}%")
                 + ". Mean ± std over seeds of the last-epoch test accuracy. C = max_h drop / Σ_h drop in the "
                 "layer of the largest single-head drop (1/H: every head alike; 1: one head).")
    _write_text(os.path.join(out, f"{name}_results.md"), "\n".join(lines) + "\n")


def plot_ablation(results, task, pes, path):
    """Heat maps of the accuracy drop (points) for every (l, h): one row per seed, one column per PE."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sel = {pe: sorted((r for r in results if r["config"]["task"] == task and r["config"]["pe"] == pe
                       and "ablation" in r), key=lambda r: r["config"]["seed"]) for pe in pes}
    sel = {pe: rs for pe, rs in sel.items() if rs}
    if not sel:
        return
    n_rows = max(len(rs) for rs in sel.values())
    fig, axes = plt.subplots(n_rows, len(sel), figsize=(3.2 * len(sel), 2.0 * n_rows + 0.8), squeeze=False,
                             constrained_layout=True)
    vmax = max(max(r["ablation"]["baseline"] - min(min(row) for row in r["ablation"]["grid"]) for r in rs)
               for rs in sel.values())
    im = None
    for c, (pe, rs) in enumerate(sel.items()):
        for r_i in range(n_rows):
            ax = axes[r_i, c]
            if r_i >= len(rs):
                ax.axis("off")
                continue
            a = rs[r_i]["ablation"]
            drop = (a["baseline"] - torch.tensor(a["grid"])).numpy()
            im = ax.imshow(drop, cmap="magma", vmin=0, vmax=max(vmax, 20.0), aspect="auto")
            ax.set_title(f"{pe}, seed {rs[r_i]['config']['seed']}: base {a['baseline']:.0f}%", fontsize=8)
            ax.set_xlabel("head", fontsize=7)
            ax.set_ylabel("layer", fontsize=7)
            ax.set_xticks(range(0, drop.shape[1], 1 if drop.shape[1] <= 8 else 2))
            ax.set_yticks(range(drop.shape[0]))
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy drop when the head is zeroed (points)")
    fig.suptitle(f"Task {task}: per-head ablation (zero one head's output)", fontsize=10)
    training.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


# ============================================================================================
# 6. Command line
# ============================================================================================
def _csv_list(text, conv=str):
    try:
        return [conv(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"cannot read the list {text!r}") from None


def _common(p):
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--betas", choices=sorted(BETAS), default=None,
                   help="paper: (0.98, 0.9) as the authors' code writes it (beta1 > beta2, unusual); "
                        "standard: (0.9, 0.98)")
    p.add_argument("--wiring", choices=WIRINGS, default=None,
                   help="standard self-attention (default) or the paper's: every layer's keys and values from "
                        "the layer-0 embeddings + PE")
    p.add_argument("--alibi-schedule", choices=["exp", "geometric"], default=None,
                   help="ALiBi slopes: exp = e^{-h/H} (paper code), geometric = 2^{-8(h+1)/H} (Press et al.)")
    p.add_argument("--device", default=None, help="auto (default: cuda > mps > cpu, as the training "
                   "scripts), cuda, mps or cpu")
    p.add_argument("--ablation-samples", type=int, default=None,
                   help="ablate on the first N test samples (default: the preset's; None = all)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="safety stop: end training after the epoch that passes this wall time")
    p.add_argument("--out", default="out/spectral", help="output folder")


def _overrides(a):
    return {"lr": a.lr, "epochs": a.epochs, "batch_size": a.batch_size, "betas": a.betas,
            "alibi_schedule": a.alibi_schedule, "device": a.device, "ablation_samples": a.ablation_samples,
            "max_minutes": a.max_minutes, "wiring": a.wiring}


def main(argv=None):
    p = training.ArgParser(prog="python -m spectral.tasks",
                                description="The Spectral paper's synthetic tasks: train encoder classifiers "
                                "with each PE, ablate every head, write the results table and heat maps.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one model and ablate its heads")
    t.add_argument("--task", type=int, choices=[1, 2], default=1)
    t.add_argument("--pe", default="rope", help=f"one of {', '.join(PES)}")
    t.add_argument("--seed", type=int, default=0)
    _common(t)
    s = sub.add_parser("table", help="every PE x task x seed, then the results table and heat maps")
    s.add_argument("--tasks", type=lambda x: _csv_list(x, int), default=[1, 2])
    s.add_argument("--pes", type=_csv_list, default=list(TABLE_PES))
    s.add_argument("--seeds", type=lambda x: _csv_list(x, int), default=[0, 1, 2])
    s.add_argument("--workers", type=int, default=1, help="parallel processes (one thread each)")
    s.add_argument("--cache", default="runs/spectral", help="folder of per-run JSON files (resumable)")
    _common(s)
    r = sub.add_parser("report", help="the table and heat maps from a folder of run files (e.g. GPU runs)")
    r.add_argument("--runs", required=True, help="folder of run JSON files written by `train`, or a *_runs.json")
    r.add_argument("--name", default="synthetic_report", help="prefix of the output files")
    r.add_argument("--out", default="out/spectral", help="output folder")
    e = sub.add_parser("show", help="print a few generated samples")
    e.add_argument("--task", type=int, choices=[1, 2], default=1)
    e.add_argument("--preset", default="small", choices=sorted(PRESETS))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--n", type=int, default=5)
    a = p.parse_args(argv)

    if a.cmd == "show":
        d = make_task(a.task, a.preset, a.seed)
        print(f"task {a.task}: {len(d.labels)} samples, triggers {d.meta['triggers'][:8]}, "
              f"{d.n_classes} classes")
        for i in range(min(a.n, len(d.labels))):
            toks = d.tokens[i][d.tokens[i] != PAD].tolist()
            print(f"label {int(d.labels[i]):3d}: {toks}")
        return 0
    if a.cmd == "train":
        parse_pe(a.pe, PRESETS[a.preset]["model"]["n_heads"])
        res = train_run(a.task, a.pe, a.preset, a.seed, **_overrides(a))
        res["versions"] = training.versions()
        path = os.path.join(a.out, "runs", run_name(a.task, a.pe, a.preset, a.seed))
        _write_json(path, res)
        print(f"task {a.task} pe {a.pe} seed {a.seed}: test acc {res['test_acc']:.1f}% "
              f"(train {res['train_acc']:.1f}%, chance {res['chance_acc']:.1f}%), "
              f"largest head-ablation drop {res['ablation']['top_drop']:.1f} points at layer "
              f"{res['ablation']['top_layer']} head {res['ablation']['top_head']}; wrote {path}")
        return 0
    if a.cmd == "report":
        # a folder of run files, or one JSON list of runs (a *_runs.json written by `table`)
        files = ([os.path.join(a.runs, f) for f in sorted(os.listdir(a.runs)) if f.endswith(".json")]
                 if os.path.isdir(a.runs) else [a.runs] if os.path.isfile(a.runs) else [])
        if not files:
            raise ValueError(f"no run files (*.json) in {a.runs}")
        results = []
        for f in files:
            try:
                with open(f) as fh:
                    obj = json.load(fh)
            except (OSError, json.JSONDecodeError) as err:
                raise ValueError(f"cannot read the run file {f}: {err}") from None
            results.extend(obj if isinstance(obj, list) else [obj])
        write_report(results, a.out, a.name)
        return 0
    # table
    if a.workers < 1:
        raise ValueError("--workers must be >= 1")
    for pe in a.pes:
        parse_pe(pe, PRESETS[a.preset]["model"]["n_heads"])
    results = run_all(a.tasks, a.pes, a.seeds, a.preset, a.cache, a.workers, _overrides(a))
    write_report(results, a.out, f"synthetic_{a.preset}")
    return 0


def write_report(results, out, name):
    """The results table (CSV + Markdown), all runs in one JSON, and the ablation heat maps."""
    try:
        rows = summarise(results)
        tasks = sorted({r["config"]["task"] for r in results})
        pes = [pe for pe in PES + tuple(sorted({r["config"]["pe"] for r in results}))
               if any(r["config"]["pe"] == pe for r in results)]
        pes = list(dict.fromkeys(pes))
    except (KeyError, TypeError) as err:
        raise ValueError(f"a run file lacks the field {err}") from None
    write_tables(rows, out, name)
    _write_json(os.path.join(out, f"{name}_runs.json"), results)
    for task in tasks:
        plot_ablation(results, task, [pe for pe in pes if pe in ("rope", "mla", "mla-shared")],
                      os.path.join(out, f"{name}_ablation_task{task}_rope_mla.png"))
        plot_ablation(results, task, pes, os.path.join(out, f"{name}_ablation_task{task}_all.png"))
    print(open(os.path.join(out, f"{name}_results.md")).read())


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
