"""analysis/bench_lm.py -- training tokens/s of train_lm.py's GPT for every λ mode and constrained
regime, against the plain model (--lam 0, free attention), on random bytes, as ratios.

    python -m analysis.bench_lm                   # GPU: the enwik8 preset; CPU: 2 of its layers, seq 256
    python -m analysis.bench_lm --device cpu --bench-rounds 5 --bench-steps 5
    python -m analysis.bench_lm --device cuda --bench-variants plain,lam-identity,divergent
    python -m analysis.bench_lm --device cpu --bench-preset small --pe learned --bench-rounds 20 --bench-steps 2
        --bench-variants rope,rope-lam-identity,rope-lam-softplus      (one command line: RoPE ± λ vs learned PE)

The rope* variants (opt-in: only when --bench-variants names them) switch the model to --pe rope,
so with --pe learned their ratio is RoPE's cost against the learned-PE model of the same shape.

One process, one run: every variant is built, then timed in interleaved rounds (the median of the
rounds is kept, so a noisy neighbour on a shared machine hits all variants alike).

Model FLOPs per token (PaLM / nanoGPT accounting, forward + backward):
    F = 6 N + 12 L n d           (N = parameters in matrices; 12 L n d = attention scores)
MFU = F · tokens/s / peak.  The constrained variants' K, V solves (O(d³) per layer per step)
are not counted, so their MFU is "plain-model FLOPs per second".

Flags: train_lm.py's (the model ones are used: --pe, --d-model, --n-layers, --n-heads, --seq-len;
--batch-size is the micro-batch), plus --bench-variants, --bench-preset, --bench-steps,
--bench-rounds and --peak-tflops (was `train_lm.py --bench`).  Output: --out/bench.json (default runs/bench-<time>),
and a table on the console.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import train_lm
import training
# the shared benchmark helpers, read as kit.NAME when called: analysis.bench imports this module
# for its --variants table, so at import time either of the two may be half-initialised
from analysis import bench as kit

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)

BENCH_VARIANTS = {"plain": ("plain (--lam 0)", {}),
                  "lam-identity": ("lam identity -0.1", dict(lam=-0.1, lam_mode="identity")),
                  "lam-softplus": ("lam softplus-diag 0.05", dict(lam=0.05, lam_mode="softplus-diag")),
                  **{r: (f"regime {r}", dict(regime=r)) for r in ("divergent", "intermediate", "convergent")}}
# opt-in variants (never in the default set): the same model with --pe rope, plain and with each λ mode
PE_VARIANTS = {"rope": ("rope", dict(pe="rope")),
               "rope-lam-identity": ("rope + lam identity -0.1", dict(pe="rope", lam=-0.1, lam_mode="identity")),
               "rope-lam-softplus": ("rope + lam softplus 0.05", dict(pe="rope", lam=0.05, lam_mode="softplus-diag"))}


def build_parser() -> training.ArgParser:
    p = train_lm.build_parser()
    p.description = ("Training tokens/s of every λ mode and regime of train_lm.py's GPT against the "
                     "plain model (--lam 0), on random bytes (was train_lm.py --bench).")
    p.epilog = None
    kit.add_bench_args(p, BENCH_VARIANTS | PE_VARIANTS)
    p.add_argument("--bench-preset", choices=tuple(train_lm.PRESETS),
                   help="time this train_lm.py preset's model and micro-batch (default: enwik8's, cut to "
                        "2 layers, seq 256, batch 4 on CPU)")
    return p


def bench(args) -> int:
    """Time every variant (see the module docstring); write bench.json to --out and print the table."""
    rt, report, title = measure(args)
    out = Path(args.out or ROOT / "runs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    kit.finish_report(rt, out, report, title, "tokens_per_s", "tokens/s", 26, ",.0f")
    return 0


def measure(args) -> tuple:
    """Build and time every variant: (runtime, report with one row per variant, table title).
    Each row's ratio_range is the min–max over rounds of the per-round ratio to plain."""
    rt = training.setup_runtime(args.device, amp=not args.no_amp)
    gpu = rt.device.type == "cuda"
    # --bench-preset: that preset's model and micro-batch; otherwise width 512 everywhere: on a GPU
    # the enwik8 preset itself, on CPU a 2-layer cut of it
    presets = train_lm.PRESETS
    if args.bench_preset:
        cfg = dict(presets[args.bench_preset])
    else:
        cfg = dict(presets["enwik8"] if gpu else
                   presets["enwik8"] | dict(n_layers=2, seq_len=256, batch_size=4, grad_accum=1))
    cfg.update(pe=args.pe or cfg["pe"], vocab_size=256, cutoffs="")     # random bytes: no adaptive softmax
    for k in ("d_model", "n_layers", "n_heads", "seq_len"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    micro = args.batch_size or (cfg["batch_size"] // cfg["grad_accum"] if args.bench_preset else 16 if gpu else 4)
    variants = (kit.select_variants(BENCH_VARIANTS | PE_VARIANTS, args.bench_variants) if args.bench_variants
                else list(BENCH_VARIANTS.values()))
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (micro, cfg["seq_len"] + 1), generator=gen).to(rt.device)
    x, y = data[:, :-1], data[:, 1:]
    def make(over):
        c = dict(cfg, lam=0.0, lam_mode="identity", regime="free") | over
        model = train_lm.build_lm(c).to(rt.device)
        return model, kit.bench_step(model, train_lm.make_optimizer(model, c, rt.device), rt, lambda fwd: fwd(x, y),
                                 compile=False if args.no_compile else None)

    runs, sec_per_step, rounds = kit.build_and_time(variants, make, rt, args)
    tokens = micro * cfg["seq_len"]
    peak = kit.peak_tflops(rt, args.peak_tflops)
    # F = 6 N + 12 L n d of the plain model, for every variant
    plain = runs[0][1]
    flops = kit.flops_per_token(plain, cfg["n_layers"], cfg["seq_len"], cfg["d_model"])
    rows, base = [], None
    for name, model, _ in runs:
        sec = sec_per_step[name]
        tps = tokens / sec
        base = base or tps
        per_round = [p / v for p, v in zip(rounds[runs[0][0]], rounds[name])]
        rows.append({"variant": name, "tokens_per_s": tps, "ratio_to_plain": tps / base,
                     "ratio_range": [min(per_round), max(per_round)],
                     "step_s": sec, "step_s_rounds": rounds[name],
                     "mfu": (flops * tps / (peak * 1e12)) if peak else None})
    report = {"device": str(torch.cuda.get_device_name() if gpu else "cpu"), "threads": torch.get_num_threads(),
              "amp": str(rt.amp_dtype), "compile": gpu and not args.no_compile, "micro_batch": micro,
              "config": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "seq_len", "pe")},
              "peak_tflops": peak, "rows": rows}
    return rt, report, (f"\n{report['device']}, {cfg['n_layers']}×{cfg['d_model']} ({cfg['n_heads']} heads), "
                        f"seq {cfg['seq_len']}, batch {micro}, pe {cfg['pe']}, amp {report['amp']}:")


def main(argv=None) -> int:
    return bench(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
