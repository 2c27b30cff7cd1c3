"""analysis/bench_vit.py -- training images/s of train_vit.py's ViT for every PE, λ mode and regime,
against the plain model (learned PE, --lam 0), on synthetic images, as ratios.

    python -m analysis.bench_vit                  # GPU: DeiT-Tiny at 224 px; CPU: 2 of its layers at 64 px
    python -m analysis.bench_vit --device cpu --bench-rounds 5 --bench-steps 5
    python -m analysis.bench_vit --device cuda --bench-variants plain,rope-axial,rope-mixed,lam-identity

One process, one run: every variant is built, warmed up, then timed in interleaved rounds (the
median of the rounds is kept, so a noisy neighbour on a shared machine hits all alike).

Model FLOPs per image (PaLM / nanoGPT accounting, forward + backward), n tokens per image:
    F = n · (6 N + 12 L n d)     (N = parameters in weight matrices, class token and positions
                                  excluded; 12 L n d per token = the attention scores and mixing)
MFU = F · images/s / peak.  DeiT-Tiny at 224 px: n = 197, N = 5.5 M, F ≈ 7.7 GFLOP per image.
The constrained variants' K, V solves (O(d³) per layer per step) are not counted.

Flags: train_vit.py's (the model ones are used: --d-model, --n-layers, --n-heads, --image-size,
--patch-size, --mlp-ratio, --pool, --rope-base; --batch-size is the micro-batch), plus
--bench-variants, --bench-steps, --bench-rounds and --peak-tflops.  Output: --out/bench.json
(default runs/bench-vit-<time>), and a table on the console.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import train_vit
import training
from analysis.bench import (add_bench_args, bench_step, build_and_time, finish_report, flops_per_token,
                            peak_tflops, select_variants)
from data import images

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)

BENCH_VARIANTS = {"plain": ("plain (learned, --lam 0)", {}),
                  **{pe: (f"pe {pe}", dict(pe=pe)) for pe in train_vit.PES if pe != "learned"},
                  "lam-identity": ("lam identity -0.1", dict(lam=-0.1)),
                  "lam-softplus": ("lam softplus-diag 0.05", dict(lam=0.05, lam_mode="softplus-diag")),
                  **{r: (f"regime {r}", dict(regime=r)) for r in train_vit.REGIMES if r != "free"}}


def build_parser() -> training.ArgParser:
    p = train_vit.build_parser()
    p.description = ("Training images/s of every PE, λ mode and regime of train_vit.py's ViT against "
                     "the plain model (learned PE, --lam 0), on synthetic images (was train_vit.py --bench).")
    add_bench_args(p, BENCH_VARIANTS)
    return p


def bench(args) -> int:
    """Time every variant (see the module docstring); write bench.json to --out and print the table."""
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    gpu = rt.device.type == "cuda"
    # DeiT-Tiny at 224 px on a GPU; on CPU a 2-layer cut of it at 64 px
    presets = train_vit.PRESETS
    cfg = dict(presets["deit-tiny"] if gpu else presets["deit-tiny"] | dict(n_layers=2, image_size=64))
    for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size", "mlp_ratio"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    cfg.update(n_classes=1000, rope_base=float(args.rope_base), dropout=0.0, drop_path=0.0,
               pool=args.pool or "cls")
    micro = args.batch_size or (256 if gpu else 8)
    plain = dict(pe="learned", lam=0.0, lam_mode="identity", regime="free")
    variants = select_variants(BENCH_VARIANTS, args.bench_variants)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(micro, 3, cfg["image_size"], cfg["image_size"], generator=gen).to(rt.device)
    t = images.soft_targets(torch.randint(0, 1000, (micro,), generator=gen), 1000, 0.1).to(rt.device)
    def make(over):
        c = dict(cfg, **plain) | over
        model = train_vit.build_vit(c).to(rt.device)
        return model, bench_step(model, train_vit.make_optimizer(model, c, rt.device), rt,
                                 lambda fwd: train_vit.soft_cross_entropy(fwd(x), t),
                                 compile=False if args.no_compile else None)

    runs, sec_per_step, rounds = build_and_time(variants, make, rt, args)
    peak = peak_tflops(rt, args.peak_tflops)
    n_tok = (cfg["image_size"] // cfg["patch_size"]) ** 2 + (cfg["pool"] == "cls")
    rows, base = [], None
    for name, model, _ in runs:
        sec = sec_per_step[name]
        ips = micro / sec
        base = base or ips
        # F = n (6 N + 12 L n d) per image of n tokens
        flops = n_tok * flops_per_token(model, cfg["n_layers"], n_tok, cfg["d_model"],
                                        skip=("cls", "pos.weight"))
        rows.append({"variant": name, "images_per_s": ips, "ratio_to_plain": ips / base, "step_s": sec,
                     "step_s_rounds": rounds[name],
                     "gflop_per_image": flops / 1e9, "mfu": (flops * ips / (peak * 1e12)) if peak else None})
    out = Path(args.out or ROOT / "runs" / f"bench-vit-{time.strftime('%Y%m%d-%H%M%S')}")
    report = {"device": str(torch.cuda.get_device_name() if gpu else "cpu"), "threads": torch.get_num_threads(),
              "amp": str(rt.amp_dtype), "compile": gpu and not args.no_compile, "micro_batch": micro,
              "config": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "image_size", "patch_size",
                                             "mlp_ratio", "pool")},
              "tokens_per_image": n_tok, "peak_tflops": peak, "rows": rows}
    finish_report(rt, out, report, f"\n{report['device']}, {cfg['n_layers']}×{cfg['d_model']} ({cfg['n_heads']} heads), "
                  f"{cfg['image_size']} px / patch {cfg['patch_size']} ({n_tok} tokens), batch {micro}, "
                  f"amp {report['amp']}:", "images_per_s", "images/s", 28, ",.1f")
    return 0


def main(argv=None) -> int:
    return bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
