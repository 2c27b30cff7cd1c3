"""train_vit.py -- vision transformers built from ode_attention.Block, with 2-D positional
encodings, the λ-term and definiteness-constrained attention.

    python train_vit.py                                       # embedded "shapes" data, CPU, minutes
    python train_vit.py --pe none                             # ... and watch it stay at chance (25%)
    python train_vit.py --data cifar10 --preset cifar10       # downloads CIFAR-10 (163 MB)
    torchrun --nproc_per_node 4 train_vit.py --preset deit-tiny --data /data/imagenet --regime divergent
    python -m analysis.bench_vit                              # images/s of every variant, as ratios
    python -m analysis.compare_vit --pes none,learned,rope-axial --seeds 3 --out results/vit   # top-1 table

The model (ViT / DeiT, pre-LN)
------------------------------
An image of H × W pixels is cut into a g_h × g_w grid of p × p patches (H = g_h p, W = g_w p),
patch (r, c) flattened to a row u_rc ∈ R^{3p²} and embedded linearly (a Conv2d with kernel =
stride = p, written as the matrix product it is):

    x⁰_rc = u_rc E + b                 E ∈ R^{3p² × d}
    X⁰ = [ x_cls ; x⁰_11 ; … ; x⁰_{g_h g_w} ]      (--pool cls: a learned class token first)

Positional encodings (--pe), the 2-D counterparts of train_lm.py's:
    none        nothing: the model sees a SET of patches (tested: permuting the patches permutes
                the patch outputs and leaves the class token's output unchanged)
    learned     x⁰_rc += P_{rc}, one free row per patch (rope.LearnedPE; DeiT's pos_embed)
    sin2d       x⁰_rc += [sin-cos(r) | sin-cos(c)] (rope.sinusoidal_pe_2d; MAE's fixed table)
    rope-axial  inside every attention layer, the first half of each head's query/key features is
                rotated by the row r, the second half by the column c (rope.apply_rope_2d):
                    (q R(r,c)ᵀ)·(k R(r',c')ᵀ) = q R(r'−r, c'−c) kᵀ        relative in both axes
    rope-mixed  pair k of head h rotated by r θʸ_hk + c θˣ_hk with LEARNED frequencies
                (rope.RoPEMixed, Heo et al. 2024): still relative, and able to mix the axes.
The class token carries no absolute PE (it is a free parameter: a PE on it would be redundant)
and is not rotated by 2-D RoPE, which is the same as placing it at (0, 0): its logits with patch
(r, c) see (r, c) itself.  So a RoPE model is exactly translation-invariant with --pool mean
(only offsets between patches exist; tested), and sees absolute positions through the class token
with --pool cls.

Then L blocks, each one Euler step of the attention field plus an MLP (ode_attention.Block):

    Xˡ⁺¹ = Xˡ + DropPath(Attn(LN(Xˡ))),   Xˡ⁺¹ ← Xˡ⁺¹ + DropPath(MLP(LN(Xˡ⁺¹)))

with head h's logits sᵢⱼ = [ (xᵢQₕ)Rᵢᵀ·(xⱼKₕ)Rⱼᵀ + λₕ xᵢ⁽ʰ⁾ᵀMₕxⱼ⁽ʰ⁾ ] / √d_h — the λ-term (--lam,
--lam-mode) and the constrained regimes (--regime) exactly as in train_lm.py. Stochastic depth
grows linearly with depth, p_l = drop_path · l / (L − 1) (DeiT / timm). Output: LN, then the
class token's row (--pool cls) or the mean of the patch rows (--pool mean), then a linear head.

Loss and metrics.  Targets are probability vectors y (label smoothing and mixup make them soft):
ℓ = −(1/B) Σ_b Σ_k y_bk ln softmax(z_b)_k.  Evaluation: top-1 and top-5 accuracy (%) and the
plain cross-entropy on the validation split, centre-cropped, no mixing, no smoothing.

The token probe (docs/dynamics.md §5.4) and the regime report: after training, a fixed batch of
validation images runs through the model with full blocks and with attention-only updates
x ← x + Attn(x), recording per layer the mean token norm, Σᵢⱼ‖xᵢ − xⱼ‖², the mean cosine and the
sharpness (probe.csv, probe.png; training.token_probe, the same code as the language model); and
every layer's (Q, K, V, O) goes through regimes.analyse_layer (regimes.csv: inertia of W_sym and
A_sym, the layer's regime).  Whether that regime is realised: at init and at the end, for each
layer, α(V O), the count of Re λ > 0, ρ_A and the fate of the layer's OWN field dX/dt = Attn_l(X)
integrated from its LayerNorm'd inputs on 8 validation images (training.layer_fields, 2-D RoPE
rotating by the patch positions; with 2-D RoPE also with RoPE dropped from the field): summary.json
"layers" (the init record, layers-init.json, survives a resume).

Data (--data; data/images.py has the datasets, transforms and batches)
----------------------------------------------------------------------
shapes (default, embedded, no download)  32 × 32 images, a 4 × 4 grid of 8 × 8 cells holding a
    square A, a plus sign B and distractors; the label is where B lies relative to A (4 classes).
    Every cell's CONTENT is drawn independently of WHERE the cell is, so a model without positions
    sees the same distribution of patches for every class and cannot beat chance (25%).
shapes-hard (--preset hard, embedded)  48 × 48 images, a 6 × 6 grid: the label is one of 16
    relations (8 compass directions × near / far of B seen from A), with up to 4 decoys (near
    twins of A and B among them) and Gaussian pixel noise of std 48; blind to positions: chance.
cifar10  downloaded and md5-checked into --cache-dir (or a local archive: --data PATH.tar.gz, or
    the extracted cifar-10-batches-py/ folder or the folder holding it, torchvision's root=).
PATH     an ImageNet-style folder, PATH/train/<class>/*.JPEG and PATH/val/<class>/ (or validation/),
    or a flat val/ labelled by Kaggle's LOC_val_solution.csv or a val_labels.txt of `file,class`
    lines (python -m data.images --sort-val PATH sorts it into classes); decoded in DataLoader workers.
Random-resized-crop, flip, mixup / cutmix and label smoothing; batches are a pure function of
(seed, step), so `--resume` and any number of workers or processes give the same batches.

Run folder (--out, default runs/vit-…): config.json, versions.json, metrics.csv, loss.png, ckpt.pt,
probe.csv, probe.png, regimes.csv, layers-init.json, summary.json.  The checkpoint's "config" holds everything
needed to rebuild the model; block i's attention is `blocks.{i}.attn.*` in its state dict.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import ode_attention
import regimes
import rope as rope_mod
import training
from data import images

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------------------------
# Defaults: the small CPU preset (used when no --preset is given), a CIFAR-10 preset (ours, not
# tuned, not from the paper) and DeiT-Tiny / DeiT-Small at 224 px (docs/dynamics.md §4.2: the
# paper's ImageNet run is DeiT-Tiny, 300 epochs, AdamW 1e-3 at batch 1024, wd 0.05, 5 warmup
# epochs, label smoothing 0.1, drop-path 0.1, mixup 0.8 / cutmix 1.0, min lr 1e-5).  Schedules
# are given in steps (steps, warmup, eval_every) or, where those are None, in epochs.
# ----------------------------------------------------------------------------------------------
_DEIT = dict(data=None, image_size=224, patch_size=16, pe="learned", pool="cls", mlp_ratio=4.0,
             batch_size=1024, grad_accum=1, steps=None, epochs=300.0, warmup=None, warmup_epochs=5.0,
             lr=1e-3, min_lr=1e-5, beta2=0.999, weight_decay=0.05, clip=0.0, dropout=0.0,
             drop_path=0.1, label_smoothing=0.1, mixup=0.8, cutmix=1.0, crop_min_scale=0.08,
             hflip=0.5, eval_every=None, eval_images=0)
PRESETS = {
    "small": dict(data="shapes", image_size=32, patch_size=8, pe="rope-axial", pool="cls",
                  d_model=64, n_layers=4, n_heads=4, mlp_ratio=2.0, batch_size=128, grad_accum=1,
                  steps=1000, epochs=None, warmup=50, warmup_epochs=None, lr=2e-3, min_lr=1e-5,
                  beta2=0.99, weight_decay=0.05, clip=1.0, dropout=0.0, drop_path=0.0,
                  label_smoothing=0.0, mixup=0.0, cutmix=0.0, crop_min_scale=1.0, hflip=0.0,
                  eval_every=250, eval_images=2000),
    "cifar10": dict(data="cifar10", image_size=32, patch_size=4, pe="rope-axial", pool="cls",
                    d_model=192, n_layers=6, n_heads=3, mlp_ratio=2.0, batch_size=128, grad_accum=1,
                    steps=None, epochs=50.0, warmup=None, warmup_epochs=5.0, lr=1e-3, min_lr=1e-5,
                    beta2=0.999, weight_decay=0.05, clip=1.0, dropout=0.0, drop_path=0.1,
                    label_smoothing=0.1, mixup=0.0, cutmix=0.0, crop_min_scale=0.35, hflip=0.5,
                    eval_every=None, eval_images=0),
    # the harder embedded task (data/images.py, shapes-hard: 16 relations on a 6 × 6 grid, decoys,
    # pixel noise), 48 px in 36 patches; the small model and recipe, with the steps tuned so the
    # best PE ends near 85–90% top-1 (pilots, seed 0, rope-mixed: 84.05% at 1,000 steps, 92.7% at
    # 1,300), evaluated every 100 steps for the area under the validation-loss curve
    "hard": None,
    "deit-tiny": dict(_DEIT, d_model=192, n_layers=12, n_heads=3),
    "deit-small": dict(_DEIT, d_model=384, n_layers=12, n_heads=6),
}
PRESETS["hard"] = dict(PRESETS["small"], data="shapes-hard", image_size=48, steps=1100, eval_every=100)
PES = ("none", "learned", "sin2d", "rope-axial", "rope-mixed")
POOLS = ("cls", "mean")
LAM_MODES = ode_attention.LAM_MODES          # ("identity", "softplus-diag")
REGIMES = ode_attention.REGIMES              # ("free", "divergent", "intermediate", "convergent")
# a checkpoint may only be resumed by a command that agrees on these
RESUME_KEYS = ("data", "pe", "pool", "lam", "lam_mode", "regime", "d_model", "n_layers", "n_heads",
               "mlp_ratio", "image_size", "patch_size", "rope_base", "dropout", "drop_path",
               "n_classes", "batch_size", "seed", "label_smoothing", "mixup", "cutmix",
               "crop_min_scale", "hflip", *ode_attention.ATTENTION_OPTIONS)


# ==============================================================================================
# 1. The model
# ==============================================================================================
def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, g_h g_w, 3p²): row-major patches (r, c) → r·g_w + c, each flattened as
    (channel, row, column) — the layout of a Conv2d(3, d, p, stride=p) weight."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def memory_lower_bound(cfg: dict, micro: int) -> int:
    """Bytes a training step needs at the very least, counted from below so that refusing on it
    never refuses a run that would fit (L = --n-layers, d = --d-model, r = --mlp-ratio,
    S = --image-size, p = --patch-size, T = (S/p)² patches, + 1 with the class token):

        16 P                    float32 weights, gradients and AdamW's two moments of the P
                                entries of the weight matrices: per block 4d² (Q, K, V, O) and
                                2 r d² (the MLP's two), plus the patch embedding 3p²·d (norms,
                                biases, positions, class token and head left out);
      +  4 · micro · 3 S²       one micro-batch of float32 images on the device (Batches crops
                                and normalises them there);
      +  2 · micro · (L+1) T d  the token states X⁰ … Xᴸ that backward keeps (each block's input
                                feeds its LayerNorm), at 2 bytes (bf16) or more.

    Attention scores are not counted: fused kernels never hold all B·H·T² of them."""
    L, d, S, p = cfg["n_layers"], cfg["d_model"], cfg["image_size"], cfg["patch_size"]
    T = (S // p) ** 2 + (cfg["pool"] == "cls")
    P = L * (4 + 2 * cfg["mlp_ratio"]) * d * d + 3 * p * p * d
    return int(16 * P + 4 * micro * 3 * S * S + 2 * micro * (L + 1) * T * d)


class ViT(nn.Module):
    """Patch embedding (+ absolute PE) → [class token] → L × ode_attention.Block → LN → pool → head."""

    def __init__(self, *, image_size: int, patch_size: int, n_classes: int, d_model: int, n_layers: int,
                 n_heads: int, mlp_ratio: float = 4.0, pe: str = "learned", pool: str = "cls",
                 lam: float = 0.0, lam_mode: str = "identity", regime: str = "free", dropout: float = 0.0,
                 drop_path: float = 0.0, rope_base: float = 100.0, qkv_bias: bool = True,
                 **attention_options):
        """attention_options: ode_attention.ATTENTION_OPTIONS (symmetric_A, rho_cap, lam_frozen, extra_qk)."""
        super().__init__()
        if pe not in PES:
            raise ValueError(f"unknown --pe {pe!r}: choose one of {', '.join(PES)}")
        if pool not in POOLS:
            raise ValueError(f"unknown --pool {pool!r}: choose cls or mean")
        for name, v in (("--image-size", image_size), ("--patch-size", patch_size), ("classes", n_classes),
                        ("--d-model", d_model), ("--n-layers", n_layers), ("--n-heads", n_heads)):
            if v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v}")
        if image_size % patch_size:
            raise ValueError(f"--image-size {image_size} is not a multiple of --patch-size {patch_size}")
        if d_model % n_heads:
            raise ValueError(f"--d-model {d_model} is not divisible by --n-heads {n_heads}")
        if pe == "sin2d" and d_model % 4:
            raise ValueError(f"--pe sin2d needs --d-model divisible by 4, got {d_model}")
        if pe in ("rope-axial", "rope-mixed") and (d_model // n_heads) % (4 if pe == "rope-axial" else 2):
            raise ValueError(f"--pe {pe} needs a head width d/H divisible by {4 if pe == 'rope-axial' else 2}, "
                             f"got {d_model // n_heads}")
        self.p, self.pe, self.pool = patch_size, pe, pool
        g = image_size // patch_size
        self.grid, self.n_patches = g, g * g
        self.patch = nn.Linear(3 * patch_size ** 2, d_model)                # u E + b
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model)) if pool == "cls" else None
        if pe == "learned":
            self.pos = rope_mod.LearnedPE(self.n_patches, d_model)
        elif pe == "sin2d":
            self.register_buffer("pos_table", rope_mod.sinusoidal_pe_2d(g, g, d_model), persistent=False)
        # (row, column) of every patch, row-major — what 2-D RoPE rotates by
        rc = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).reshape(-1, 2)
        self.register_buffer("positions", rc, persistent=False)
        self.rope = pe in ("rope-axial", "rope-mixed")
        self.drop = nn.Dropout(dropout)
        # stochastic depth p_l = drop_path · l / (L − 1)
        rates = [drop_path * i / max(1, n_layers - 1) for i in range(n_layers)]
        self.blocks = nn.ModuleList(
            ode_attention.Block(d_model, n_heads, mlp_ratio=mlp_ratio, dropout=dropout, drop_path=r,
                                causal=False, pe=pe if self.rope else "none", rope_base=rope_base,
                                lam=lam, lam_mode=lam_mode, regime=regime, bias=qkv_bias,
                                **attention_options)
            for r in rates)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self._init()

    def _init(self) -> None:
        """N(0, 0.02²) for linear maps and the class token, zero biases (DeiT / timm); positions,
        RoPE-Mixed frequencies and the constrained attention keep their own inits."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.cls is not None:
            nn.init.normal_(self.cls, 0.0, 0.02)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """X⁰: patch embeddings (+ absolute PE), class token first."""
        if images.shape[-1] != self.grid * self.p or images.shape[-2] != self.grid * self.p:
            raise ValueError(f"images of {tuple(images.shape[-2:])} pixels, but the model takes "
                             f"{self.grid * self.p} × {self.grid * self.p}")
        x = self.patch(patchify(images, self.p))                              # x⁰_rc = u_rc E + b
        if self.pe == "learned":
            x = x + self.pos(self.n_patches)                                  # + P_rc
        elif self.pe == "sin2d":
            x = x + self.pos_table.to(x.dtype)                                # + [sc(r) | sc(c)]
        if self.cls is not None:
            x = torch.cat((self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        return self.drop(x)

    def hidden(self, images: torch.Tensor, *, attention_only: bool = False, record: list | None = None):
        """Residual stream after the last block (LN applied); `record` collects X⁰ … Xᴸ."""
        x = self.embed(images)
        pos = self.positions if self.rope else None   # the class token (if any) comes first: not rotated
        if record is not None:
            record.append(x)
        for block in self.blocks:
            x = block(x, positions=pos, attention_only=attention_only)
            if record is not None:
                record.append(x)
        return self.ln_f(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores z (B, K)."""
        h = self.hidden(images)
        feat = h[:, 0] if self.cls is not None else h.mean(1)                 # class token | mean
        return self.head(feat)


def build_vit(cfg: dict) -> ViT:
    """The model a config (or a checkpoint's "config") describes."""
    return ViT(image_size=cfg["image_size"], patch_size=cfg["patch_size"], n_classes=cfg["n_classes"],
               d_model=cfg["d_model"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"],
               mlp_ratio=cfg["mlp_ratio"], pe=cfg["pe"], pool=cfg["pool"], lam=cfg["lam"],
               lam_mode=cfg["lam_mode"], regime=cfg["regime"], dropout=cfg["dropout"],
               drop_path=cfg["drop_path"], rope_base=cfg["rope_base"], **training.attention_options(cfg))


# ==============================================================================================
# 2. Evaluation and the regime report
# ==============================================================================================
def evaluate(model: ViT, data, cfg: dict, rt: training.Runtime, *, split: str = "val", batch: int = 256,
             max_images: int = 0, workers: int = 0) -> dict:
    """loss (nats), top-1 and top-5 accuracy (%) over a split, shared between processes."""
    k5 = min(5, cfg["n_classes"])
    total = torch.zeros(5, dtype=torch.float64, device=rt.device)    # [Σ nll, top1, top5, N, unreadable]
    for x, y, bad in images.eval_batches(data, split, cfg, rt, batch, max_images, workers):
        total[4] += len(bad)
        if len(y) == 0:
            continue
        x, y = images.normalise(x.to(rt.device), data.norm), y.to(rt.device)
        z = model(x).float()
        hit = z.topk(k5, dim=-1).indices == y[:, None]                       # (B, k)
        total[:4] += torch.stack((F.cross_entropy(z, y, reduction="sum").double(), hit[:, 0].sum().double(),
                                  hit.any(-1).sum().double(), torch.tensor(float(len(y)), device=rt.device,
                                                                            dtype=torch.float64)))
    total = training.all_reduce(total, rt, "sum")
    n = float(total[3])
    if n == 0:
        raise ValueError(f"the {split} split has no readable images to evaluate")
    out = {"loss": float(total[0]) / n, "top1": 100 * float(total[1]) / n}
    if cfg["n_classes"] > 5:
        out["top5"] = 100 * float(total[2]) / n
    if total[4] > 0:
        out["unreadable"] = float(total[4])
    return out


def regime_report(model: ViT) -> list[dict]:
    """Every layer's (Q, K, V, O) through regimes.analyse_layer: inertia (positive, negative, zero)
    of the layer's W_sym = sym(Σₕ Wₕ) and A_sym (A = W (Mᵀ)⁻¹, M = V O), and its regime.  The
    λ-term is not part of W here: its per-layer mean is listed beside it."""
    rows = []
    for i, block in enumerate(model.blocks):
        m = block.attn.interaction()
        r = regimes.analyse_layer(m["Q"], m["K"], m["V"], m["O"], n_heads=m["n_heads"], scale=m["scale"])
        lam = m.get("lam")
        rows.append({"layer": i, "regime": r["regime"], "inertia_W_sym": "/".join(map(str, r["inertia_W"])),
                     "inertia_A_sym": "/".join(map(str, r["inertia_A"])) if r.get("inertia_A") else "",
                     "cond_M": r["cond_M"], "lam_mean": float(lam.mean()) if lam is not None else 0.0})
    return rows


# ==============================================================================================
# 3. Command line
# ==============================================================================================
def build_parser() -> training.ArgParser:
    p = training.ArgParser(description="Train a vision transformer built from ode_attention.Block "
                           "(see the module docstring for the maths, data and outputs).")
    a = p.add_argument
    a("--preset", choices=tuple(PRESETS), default="small",
      help="settings: small (CPU, shapes, default), hard (CPU, shapes-hard, 48 px), cifar10, deit-tiny or deit-small (224 px, docs/dynamics.md §4.2)")
    a("--data", help="shapes or shapes-hard (embedded), cifar10 (downloaded), a CIFAR-10 .tar.gz or its extracted "
                     "cifar-10-batches-py/ (or the folder holding it), or an ImageNet-style folder with "
                     "train/<class>/ and val/<class>/ (or validation/, or a flat val/ with LOC_val_solution.csv "
                     "or val_labels.txt) (preset's default)")
    a("--pe", choices=PES, help="positional encoding (preset: small rope-axial, deit learned)")
    a("--pool", choices=POOLS, help="class token (cls) or mean of the patch tokens (preset's default)")
    training.add_attention_args(a)
    for name, typ, h in (("d-model", int, "width d"), ("n-layers", int, "blocks L"),
                         ("n-heads", int, "heads H"), ("mlp-ratio", float, "MLP width / d"),
                         ("image-size", int, "input pixels (square)"), ("patch-size", int, "patch pixels p"),
                         ("batch-size", int, "GLOBAL images per optimiser step (all processes and micro-batches)"),
                         ("grad-accum", int, "micro-batches per optimiser step"),
                         ("steps", int, "optimiser steps (overrides --epochs)"),
                         ("epochs", float, "passes over the training split (when --steps is not set)"),
                         ("lr", float, "peak learning rate"), ("min-lr", float, "final learning rate of the cosine"),
                         ("warmup", int, "linear warmup steps (overrides --warmup-epochs)"),
                         ("warmup-epochs", float, "linear warmup in epochs"), ("beta2", float, "Adam β₂"),
                         ("weight-decay", float, "AdamW decay on weight matrices"),
                         ("clip", float, "gradient-norm clip (0 = off)"), ("dropout", float, "dropout"),
                         ("drop-path", float, "stochastic depth of the last block"),
                         ("label-smoothing", float, "ε of the smoothed targets"),
                         ("mixup", float, "mixup Beta(α, α) parameter (0 = off)"),
                         ("cutmix", float, "cutmix Beta(α, α) parameter (0 = off)"),
                         ("crop-min-scale", float, "random-resized-crop: smallest area fraction (1 = no crop)"),
                         ("hflip", float, "probability of a horizontal flip"),
                         ("eval-every", int, "evaluate every N steps (default: the preset's, or once per epoch)"),
                         ("eval-images", int, "validation images in the periodic evaluations (0 = the "
                                              "whole split; the final one always uses it all)")):
        a(f"--{name}", type=typ, help=f"{h} (preset's default)")
    a("--rope-base", type=float, default=100.0, help="base of the rope-axial frequency ladder (Heo et al.: 100)")
    a("--workers", type=int, default=None, help="DataLoader workers for image folders (default min(8, CPUs))")
    training.add_run_args(a, default_out="runs/vit-<data>-<pe>-lam<λ>-<mode>-<regime>-<time>",
                          cache_help="where downloads are cached", probe_help="validation images in the token probe")
    return p


def resolve_config(args) -> dict:
    """Preset values, overridden by the flags that were given; validated.  (Epoch-based settings
    are turned into steps by `schedule`, once the dataset size is known.)"""
    cfg = dict(PRESETS[args.preset])
    for k in list(cfg):
        v = getattr(args, k, None)
        if v is not None:
            cfg[k] = v
    if args.steps is not None:
        cfg["epochs"] = None
    if args.warmup is not None:
        cfg["warmup_epochs"] = None
    cfg.update(preset=args.preset, lam=float(args.lam), lam_mode=args.lam_mode, regime=args.regime,
               seed=args.seed, rope_base=float(args.rope_base), model="vit", causal=False, qkv_bias=True,
               **training.attention_options(vars(args)))
    if cfg["data"] is None:
        raise ValueError(f"the {args.preset} preset trains on ImageNet: pass --data with a folder that "
                         f"holds train/<class>/*.JPEG and val/<class>/*.JPEG")
    for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size", "batch_size", "grad_accum"):
        if cfg[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1, got {cfg[k]}")
    if cfg["steps"] is not None and cfg["steps"] < 1 or cfg["epochs"] is not None and not cfg["epochs"] > 0:
        raise ValueError("--steps must be at least 1 and --epochs positive")
    for k in ("warmup", "warmup_epochs", "eval_every", "eval_images"):
        if cfg[k] is not None and cfg[k] < 0:
            raise ValueError(f"--{k.replace('_', '-')} must be 0 or more, got {cfg[k]}")
    if args.seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {args.seed}")
    training.check_finite(cfg)
    if cfg["image_size"] % cfg["patch_size"]:
        raise ValueError(f"--image-size {cfg['image_size']} is not a multiple of --patch-size {cfg['patch_size']}")
    if cfg["d_model"] % cfg["n_heads"]:
        raise ValueError(f"--d-model {cfg['d_model']} is not divisible by --n-heads {cfg['n_heads']}")
    if not cfg["mlp_ratio"] > 0:
        raise ValueError(f"--mlp-ratio must be positive, got {cfg['mlp_ratio']}")
    if not (cfg["lr"] > 0 and 0 <= cfg["min_lr"] <= cfg["lr"]):
        raise ValueError(f"need --lr > 0 and 0 ≤ --min-lr ≤ --lr, got {cfg['lr']} and {cfg['min_lr']}")
    if not 0 <= cfg["dropout"] < 1 or not 0 <= cfg["drop_path"] < 1 or not 0 < cfg["beta2"] < 1 \
            or cfg["clip"] < 0 or cfg["weight_decay"] < 0:
        raise ValueError("need 0 ≤ --dropout < 1, 0 ≤ --drop-path < 1, 0 < --beta2 < 1, --clip ≥ 0 "
                         "and --weight-decay ≥ 0")
    if not 0 <= cfg["label_smoothing"] < 1 or cfg["mixup"] < 0 or cfg["cutmix"] < 0 \
            or not 0 < cfg["crop_min_scale"] or not 0 <= cfg["hflip"] <= 1:
        raise ValueError("need 0 ≤ --label-smoothing < 1, --mixup ≥ 0, --cutmix ≥ 0, "
                         "--crop-min-scale > 0 and 0 ≤ --hflip ≤ 1")
    if not (math.isfinite(cfg["lam"]) and math.isfinite(cfg["rope_base"]) and cfg["rope_base"] > 0):
        raise ValueError(f"--lam must be finite and --rope-base positive, got {cfg['lam']} and {cfg['rope_base']}")
    if cfg["lam_mode"] == "softplus-diag" and cfg["lam"] < 0:
        raise ValueError(f"--lam-mode softplus-diag keeps λ positive, so --lam must be ≥ 0 (got {cfg['lam']}); "
                         f"use --lam-mode identity for a negative λ")
    training.check_attention_options(cfg)
    return cfg


def schedule(cfg: dict, n_train: int) -> None:
    """Epoch-based settings → steps: steps = ⌈epochs · N / B⌉, warmup likewise, evaluation once per
    epoch when not given."""
    per_epoch = max(1, math.ceil(n_train / cfg["batch_size"]))
    if cfg["steps"] is None:
        cfg["steps"] = max(1, math.ceil(cfg["epochs"] * per_epoch))
    if cfg["warmup"] is None:
        cfg["warmup"] = int(round(cfg["warmup_epochs"] * per_epoch))
    if cfg["eval_every"] is None:
        cfg["eval_every"] = per_epoch
    cfg["steps_per_epoch"] = per_epoch


def default_run_name(cfg: dict) -> str:
    data = cfg["data"] if cfg["data"] in ("shapes", "shapes-hard", "cifar10") else Path(cfg["data"]).name.split(".")[0]
    lam = f"lam{cfg['lam']:g}-{cfg['lam_mode']}" if cfg["lam"] else "lam0"
    return f"vit-{data}-{cfg['pe']}-{lam}-{cfg['regime']}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    training.resume_from_run(args, build_parser, argv)     # --resume RUN alone: RUN's own settings
    cfg = resolve_config(args)
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    try:
        return train(cfg, args, rt)
    finally:
        training.teardown(rt)


# ==============================================================================================
# 4. Training: the loss, the optimiser, the run
# ==============================================================================================
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ = −(1/B) Σ_b Σ_k t_bk ln softmax(z_b)_k  (float32 even under bf16 autocast)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def make_optimizer(model: ViT, cfg: dict, device: torch.device):
    """AdamW; weight decay only on weight matrices: never on norms, biases, λ, the class token,
    the learned positions or RoPE-Mixed's frequencies (DeiT's no_weight_decay list)."""
    no_decay = [m.freqs for m in model.modules() if isinstance(m, rope_mod.RoPEMixed)]
    no_decay += [model.cls] if model.cls is not None else []
    no_decay += [model.pos.weight] if model.pe == "learned" else []
    return training.make_adamw(model, lr=cfg["lr"], beta2=cfg["beta2"], weight_decay=cfg["weight_decay"],
                               device=device, no_decay=no_decay)


def train(cfg: dict, args, rt: training.Runtime) -> int:
    training.seed_everything(cfg["seed"])
    micro = training.split_batch(cfg["batch_size"], rt, cfg["grad_accum"])
    training.check_memory(memory_lower_bound(cfg, micro), rt.device, "this run")
    out = args.out or HERE / "runs" / default_run_name(cfg)
    training.check_run_folders(args, out, uses_cache=cfg["data"] == "cifar10")   # only downloads are cached
    data = images.load_data(cfg["data"], Path(args.cache_dir))
    folder = isinstance(data, images.FolderData)
    workers = (args.workers if args.workers is not None else min(8, os.cpu_count() or 1)) if folder else 0
    if workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {workers}")
    schedule(cfg, data.n_train)
    cfg.update(n_classes=len(data.classes), classes=data.classes,
               attn_pe=cfg["pe"] if cfg["pe"] in ("rope-axial", "rope-mixed") else "none",
               seq_len=(cfg["image_size"] // cfg["patch_size"]) ** 2 + (cfg["pool"] == "cls"))
    model = training.build_on(build_vit, cfg, rt.device)
    optimizer = make_optimizer(model, cfg, rt.device)

    run, start = training.open_run(resume=args.resume, out=out, config=cfg, model=model,
                                   optimizer=optimizer, resume_keys=RESUME_KEYS, rt=rt, args=args)

    n_params = sum(p.numel() for p in model.parameters())
    # the realised regime of every layer and the fate of its own field, at init and at the end, on the
    # same 8 validation images (training.layer_fields; the init record survives a resume)
    fields_dev = torch.device("cpu") if rt.device.type == "mps" else rt.device   # float64: not on MPS

    def probe_images(k):
        xs = [x for x, y, _ in images.eval_batches(data, "val", cfg, training.Runtime(device=fields_dev),
                                                   max(1, k), k, 0) if len(y)]
        return images.normalise(torch.cat(xs).to(fields_dev), data.norm)

    if start == 0 and rt.is_main:
        run.write_json("layers-init.json", training.layer_fields(model, probe_images(8)))
    title = (f"{data.name} pe={cfg['pe']} λ={cfg['lam']:g} ({cfg['lam_mode']}) regime={cfg['regime']} "
             f"{cfg['n_layers']}×{cfg['d_model']}")
    if rt.is_main:
        print(f"{data.name}: {data.n_train:,} train / {data.n_val:,} val images, {len(data.classes)} classes;  "
              f"model {n_params / 1e6:.2f}M parameters on {rt.device}"
              f"{' × ' + str(rt.world_size) if rt.distributed else ''};  {cfg['steps']} steps "
              f"({cfg['steps'] / cfg['steps_per_epoch']:.1f} epochs);  run folder {run.path}", flush=True)

    batches = images.Batches(data, cfg, rt, micro, workers=workers)
    eval_batch = max(1, min(512, 2 * micro))

    def eval_fn(raw, final=False):  # periodic evaluations may be capped by --eval-images; the last never is
        return {"val": evaluate(raw, data, cfg, rt, batch=eval_batch,
                                max_images=0 if final else cfg["eval_images"], workers=workers)}

    def loss_fn(m, batch):
        x, t = batch
        return soft_cross_entropy(m(x), t), x.shape[0]

    t0 = time.perf_counter()
    result = training.train_loop(
        training.wrap_model(model, rt, compile=False if args.no_compile else None),
        optimizer, rt=rt, run=run, config=cfg, steps=cfg["steps"], raw_model=model,
        batch_fn=batches, loss_fn=loss_fn, eval_fn=eval_fn, lr=cfg["lr"], warmup=cfg["warmup"],
        min_lr=cfg["min_lr"], grad_accum=cfg["grad_accum"], clip=cfg["clip"], eval_every=cfg["eval_every"],
        ckpt_every=args.ckpt_every or cfg["eval_every"], log_every=args.log_every, start_step=start,
        unit="img", title=title)
    wall = time.perf_counter() - t0
    if result["status"] == "interrupted":
        return training.interrupted_exit(result, run, rt)
    if rt.is_main:
        # the probe and the regime report work in float64, which MPS lacks: there, on the CPU
        model.to(fields_dev).eval()
        # one load: the first probe_batch images for the token probe, the first 8 (the init record's) for the fields
        x_val = probe_images(max(8, args.probe_batch))
        x_fields = x_val[:8]
        with training.autocast(rt):
            training.write_probe(training.token_probe(model, x_val[:args.probe_batch]),
                                 run, title, what="validation images")
        report = regime_report(model)
        training.write_csv(run.path / "regimes.csv", report)
        ev = result["eval"]
        summary = {"step": result["step"], "wall_s": wall, "params": n_params, "val": ev.get("val"),
                   "classes": data.classes, "unreadable_train_images": sorted(batches.unreadable),
                   "regimes": [r["regime"] for r in report],
                   "lam": [blk.attn.lam_values().tolist() if blk.attn.lam_values() is not None else None
                           for blk in model.blocks],
                   # constrained runs: the inertia each layer's forms really have in float32
                   "inertia": training.realised_inertia(model),
                   # per layer: α(V O), #Re λ > 0, ρ_A, and the fate of the layer's own field from its
                   # LayerNorm'd inputs (t = 20), init and end (2-D RoPE: also with RoPE dropped)
                   "layers": {"init": json.loads((run.path / "layers-init.json").read_text())
                              if (run.path / "layers-init.json").exists() else None,
                              "end": training.layer_fields(model, x_fields),
                              **({"end_no_rope": training.layer_fields(model, x_fields, drop_rope=True)}
                                 if model.rope else {})}}
        run.write_json("summary.json", summary)
        top5 = f", top-5 {ev['val']['top5']:.2f}%" if "top5" in ev["val"] else ""
        print(f"done: step {result['step']}, validation top-1 {ev['val']['top1']:.2f}%{top5}, "
              f"loss {ev['val']['loss']:.4f}; layer regimes {', '.join(summary['regimes'])}  "
              f"({wall:.0f} s; {run.path})")
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
