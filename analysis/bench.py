"""analysis/bench.py — this project's speed against its peers, in one run, as ratios; and the
benchmark helpers (FLOPs per token, the GPU's peak, a timed training step, interleaved timing)
that analysis/bench_lm.py and analysis/bench_vit.py share.

    python -m analysis.bench                 # ODE integrator vs torchdiffeq, our GPT vs a plain SDPA GPT
    python -m analysis.bench --suite         # ... and the test suite's wall time
    python -m analysis.bench --all           # every ratio in one run: + --scaling --compiled --variants
    python -m analysis.bench --device cuda   # the same on a GPU

1. The batched ODE integrator (ode_attention.integrate) against torchdiffeq.odeint on the same
   10,000 random instances (regimes.sample_instances; d = 4, n = 8 tokens; each instance with
   its own Q, K, V), the same vector field (ode_attention's, called on the whole batch), the same
   method family and step count: fixed-step RK4 (ours classical, torchdiffeq's the 3/8 rule;
   both 4 evaluations per step) and adaptive Dormand–Prince 5(4) with the same tolerances (where
   the step counts differ, the number of field evaluations is reported beside the time).
   torchdiffeq is an optional extra (requirements-extra.txt); without it this part says so.
2. The language model: train_lm.py's GPT (ode_attention.Block, --pe learned, --lam 0) against a
   plain PyTorch GPT of the same shape written below in ~30 lines (pre-LN, learned positions,
   F.scaled_dot_product_attention with is_causal, tied embeddings): training tokens/s, timed in
   interleaved rounds (time_variants), same optimiser, same batch.
3. --suite: `python -m pytest -q` in a subprocess, wall time.
Results: printed, and written to --out (bench.json, bench.md).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import ode_attention as oa
import regimes
import train_lm
import training
from analysis import bench_lm
from training import Runtime, autocast, wrap_model

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)


# ------------------------------------------------------------------------------------------------
# Benchmark helpers (also used by analysis/bench_lm.py and analysis/bench_vit.py)
# ------------------------------------------------------------------------------------------------
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense


def measured_matmul_tflops(device, n: int = 8192, reps: int = 20, dtype=torch.bfloat16) -> float:
    """The chip's achieved dense matmul rate (TFLOP/s) on an n × n × n product in `dtype`: the
    ceiling an MFU should be read against beside the datasheet peak (2 n³ FLOPs per product)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def add_bench_args(p, variants: dict) -> None:
    """The flags of the training-step benchmarks (analysis.bench_lm, analysis.bench_vit): timing,
    the GPU's peak, and --bench-variants over the keys of `variants` (see select_variants)."""
    p.add_argument("--bench-steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--bench-rounds", type=int, default=3, help="rounds over all variants (median kept)")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (auto for A100/H100/H200)")
    p.add_argument("--bench-variants", help=f"comma-separated subset (plain is always first): {', '.join(variants)}")


def flops_per_token(model: torch.nn.Module, n_layers: int, n_ctx: int, d_model: int,
                    skip: tuple = ("pos",)) -> float:
    """Model FLOPs of one training token, forward + backward (PaLM / nanoGPT accounting):

        F = 6 N + 12 L n d
    N = parameters in weight matrices (dim ≥ 2; names containing one of `skip` — position tables,
    a class token — left out, as they are looked up, not multiplied); 12 L n d = the attention
    scores q·k and the mixing of v over n tokens in L layers of width d. MFU = F · tokens/s / peak."""
    n_mat = sum(p.numel() for n, p in model.named_parameters() if p.dim() >= 2 and not any(k in n for k in skip))
    return 6 * n_mat + 12 * n_layers * n_ctx * d_model


def peak_tflops(rt: Runtime, override: float | None = None) -> float | None:
    """The accelerator's dense bf16 peak (TFLOP/s) for MFU: `override`, else looked up by name."""
    if override is not None or rt.device.type != "cuda":
        return override
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if all(w in name for w in k.split())), None)


def bench_step(model: torch.nn.Module, optimizer, rt: Runtime, loss_of, *, compile: bool | None = None):
    """A zero-argument training step for benchmarks — loss = loss_of(forward), backward, optimiser
    step — after its warm-up steps (3 on CUDA, where they include compilation; 1 elsewhere)."""
    fwd = wrap_model(model, rt, compile=compile)

    def step():
        with autocast(rt):
            loss = loss_of(fwd)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(3 if rt.device.type == "cuda" else 1):
        step()
    return step


def select_variants(table: dict, spec: str | None) -> list:
    """The (name, overrides) pairs of `table` (key → (name, overrides)) that --bench-variants
    `spec` names, comma-separated, "plain" always first; all of them when spec is empty."""
    if not spec:
        return list(table.values())
    keys = [k.strip() for k in spec.split(",") if k.strip()]
    unknown = [k for k in keys if k not in table]
    if unknown or not keys:
        raise ValueError(f"unknown --bench-variants entry {unknown[0] if unknown else ''!r}: choose from "
                         f"{', '.join(table)}")
    return [table[k] for k in ["plain"] + [k for k in keys if k != "plain"]]


def time_variants(runs: list, rt: Runtime, rounds: int, steps: int, raw: dict | None = None) -> dict:
    """Median seconds per step of each (name, step_fn) in `runs`, timed in interleaved rounds
    (every variant once per round), so that a noisy neighbour hits all variants alike.
    `raw`, if given, receives every round's seconds per step (to report the spread)."""
    gpu = rt.device.type == "cuda"
    times: dict = {} if raw is None else raw
    times.update({name: [] for name, _ in runs})
    for _ in tqdm(range(rounds), desc="bench rounds", disable=not rt.is_main):
        for name, step in runs:
            if gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if gpu:
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / steps)
    return {name: float(np.median(v)) for name, v in times.items()}


# ------------------------------------------------------------------------------------------------
# 1. ODE integrator vs torchdiffeq
# ------------------------------------------------------------------------------------------------
def build_and_time(variants: list, make, rt: Runtime, args) -> tuple[list, dict, dict]:
    """The training-step benchmarks' common part (analysis.bench_lm, analysis.bench_vit): build every
    variant — make(over) -> (model, step) — then time them all in interleaved rounds.
    Returns ([(name, model, step)], median seconds per step by name, every round's time by name)."""
    runs = []
    for name, over in variants:
        model, step = make(over)
        runs.append((name, model, step))
        if rt.is_main:
            print(f"built {name}", flush=True)
    rounds: dict = {}
    sec_per_step = time_variants([(n, s) for n, _, s in runs], rt, args.bench_rounds, args.bench_steps, raw=rounds)
    return runs, sec_per_step, rounds


def finish_report(rt: Runtime, out: Path, report: dict, title: str, rate: str, unit: str, width: int,
                  rate_fmt: str) -> None:
    """Write bench.json and print one row per variant: rate, ratio to plain, MFU."""
    if rt.is_main:
        training.RunDir(out).write_json("bench.json", report)
        print(title)
        print(f"{'variant':<{width}}{unit:>12}{'× plain':>9}{'MFU':>8}")
        for r in report["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{r['variant']:<{width}}{r[rate]:>12{rate_fmt}}{r['ratio_to_plain']:>9.3f}{mfu:>8}")
        print(f"(written to {out / 'bench.json'})")
    training.teardown(rt)


def _interleaved(fns: dict, rounds: int, device) -> dict:
    """time_variants over zero-argument fns, one call per variant and round, keeping what each
    returned last: {name: (median s, [every round's s], last result)}."""
    last = {}

    def keep(name, fn):
        return lambda: last.__setitem__(name, fn())
    raw: dict = {}
    med = time_variants([(k, keep(k, fn)) for k, fn in fns.items()], Runtime(device=device), rounds, 1, raw=raw)
    return {k: (med[k], raw[k], last[k]) for k in fns}


def _ratio(num: list, den: list) -> tuple[float, float, float]:
    """Median and min–max over rounds of the per-round ratio num/den (same round, same load)."""
    r = [a / b for a, b in zip(num, den)]
    return float(np.median(r)), float(min(r)), float(max(r))


def bench_ode(device, n_inst: int, t_end: float, dt: float, rounds: int = 3,
              dopri_instances: int | None = None, rtols=(1e-4, 1e-6, 1e-8)) -> list[dict]:
    """The integrator against torchdiffeq on the same instances (d = 4, n = 8, convergent: none
    blows up, so both do the same work to t_end). Rows:
      rk4 (float64 and float32): the same steps and evaluations; torchdiffeq given the plain field
        oa._velocity (what a user writes: `speedup`) and our prepared field (`speedup_same_field`,
        only the steppers and layout differ). Ratios are per round (interleaved), median [min, max].
      dopri5 at each rtol (atol = rtol·1e−3), float64, for ours with error_norm "max" (every
        instance within tolerance) and "rms" (the batch's RMS, torchdiffeq's norm), and
        torchdiffeq: seconds, evaluations and the ACHIEVED error max|X(t_end) − X_ref| against a
        float64 reference (ours, rtol 1e−12). `speedup_equal_error`: torchdiffeq's time at the same
        achieved error (log–log interpolation over its rtols) / ours."""
    try:
        import torchdiffeq
    except ImportError:
        print("analysis.bench: torchdiffeq is not installed (pip install -r requirements-extra.txt); "
              "skipping the integrator comparison.", file=sys.stderr)
        return []

    g = torch.Generator().manual_seed(0)
    Q64, K64, V64 = (m.to(device) for m in regimes.sample_instances("convergent", 4, n_inst, generator=g))
    X64 = torch.randn(n_inst, 8, 4, generator=g, dtype=torch.float64).to(device)
    t_pts = torch.tensor([0.0, t_end], dtype=torch.float64, device=device)
    nfe = [0]
    rows = []
    for dtype in (torch.float64, torch.float32):
        Q, K, V, X0 = (m.to(dtype) for m in (Q64, K64, V64, X64))
        prepared = oa._prepared_field(Q, K, V)
        tp = t_pts.to(dtype)

        def tdq(field):
            def f(_t, X):                      # torchdiffeq's signature f(t, y); counts evaluations
                nfe[0] += 1
                return field(X)
            nfe[0] = 0
            return torchdiffeq.odeint(f, X0, tp, method="rk4", options={"step_size": dt})[-1]
        ours_tr = {}

        def ours():
            ours_tr["tr"] = oa.integrate(X0, Q, K, V, t_end=t_end, dt=dt, method="rk4", n_save=2)
            return ours_tr["tr"].X[-1]
        res = _interleaved({"ours": ours,
                            "torchdiffeq": lambda: tdq(lambda X: oa._velocity(X, Q, K, V)),
                            "torchdiffeq_same_field": lambda: tdq(lambda X: prepared(0.0, X))}, rounds, device)
        sp, lo, hi = _ratio(res["torchdiffeq"][1], res["ours"][1])
        sp2, lo2, hi2 = _ratio(res["torchdiffeq_same_field"][1], res["ours"][1])
        rows.append({"method": "rk4", "dtype": str(dtype).replace("torch.", ""), "instances": n_inst,
                     "t_end": t_end, "rounds": rounds, "ours_s": res["ours"][0], "ours_evals": ours_tr["tr"].n_evals,
                     "torchdiffeq_s": res["torchdiffeq"][0], "torchdiffeq_evals": nfe[0],
                     "torchdiffeq_same_field_s": res["torchdiffeq_same_field"][0],
                     "speedup": sp, "speedup_range": [lo, hi],
                     "speedup_same_field": sp2, "speedup_same_field_range": [lo2, hi2],
                     "max_abs_diff": float((res["ours"][2] - res["torchdiffeq"][2]).abs().max())})

    # dopri5: work against achieved error
    m = dopri_instances or n_inst
    Q, K, V, X0 = Q64[:m], K64[:m], V64[:m], X64[:m]
    ref = oa.integrate(X0, Q, K, V, t_end=t_end, dt=dt, method="dopri5", rtol=1e-12, atol=1e-15, n_save=2).X[-1]
    f_plain = lambda _t, X: (nfe.__setitem__(0, nfe[0] + 1), oa._velocity(X, Q, K, V))[1]   # noqa: E731
    per = {}
    for rtol in rtols:
        runs = {}
        for mode in ("max", "rms"):
            runs[f"ours_{mode}"] = (lambda mode=mode: oa.integrate(
                X0, Q, K, V, t_end=t_end, dt=dt, method="dopri5", rtol=rtol, atol=rtol * 1e-3,
                n_save=2, error_norm=mode))

        def tdq_run():
            nfe[0] = 0
            X1 = torchdiffeq.odeint(f_plain, X0, t_pts, method="dopri5", rtol=rtol, atol=rtol * 1e-3)[-1]
            return X1, nfe[0]
        runs["torchdiffeq"] = tdq_run
        res = _interleaved(runs, rounds, device)
        per[rtol] = res
    # torchdiffeq's (error, time) curve over the rtols, for the equal-error comparison
    curve = sorted((float((per[r]["torchdiffeq"][2][0] - ref).abs().max()), per[r]["torchdiffeq"][0]) for r in rtols)

    def tdq_time_at(err: float) -> float | None:
        """log-log interpolation of torchdiffeq's time at achieved error `err` (None outside its range)."""
        le = [math.log(e) for e, _ in curve]
        lt = [math.log(t) for _, t in curve]
        x = math.log(err)
        if not le[0] <= x <= le[-1]:
            return None
        return math.exp(float(np.interp(x, le, lt)))
    for rtol in rtols:
        res = per[rtol]
        X_t, ev_t = res["torchdiffeq"][2]
        err_t = float((X_t - ref).abs().max())
        for mode in ("max", "rms"):
            tr = res[f"ours_{mode}"][2]
            err = float((tr.X[-1] - ref).abs().max())
            t_eq = tdq_time_at(err)
            sp, lo, hi = _ratio(res["torchdiffeq"][1], res[f"ours_{mode}"][1])
            rows.append({"method": "dopri5", "error_norm": mode, "dtype": "float64", "rtol": rtol,
                         "instances": m, "t_end": t_end, "rounds": rounds,
                         "ours_s": res[f"ours_{mode}"][0], "ours_evals": tr.n_evals, "ours_error": err,
                         "torchdiffeq_s": res["torchdiffeq"][0], "torchdiffeq_evals": ev_t,
                         "torchdiffeq_error": err_t, "speedup": sp, "speedup_range": [lo, hi],
                         "speedup_equal_error": None if t_eq is None else t_eq / res[f"ours_{mode}"][0],
                         "max_abs_diff": float((tr.X[-1] - X_t).abs().max())})
    return rows


def bench_compiled(device, n_inst: int, t_end: float, dt: float, rounds: int = 3) -> dict:
    """integrate(compile=True) — torch.compile (inductor) of the whole RK4 step — against the eager
    loop on the same instances as bench_ode's (convergent, d = 4, n = 8, float64): the first call's
    seconds (compile + run), then interleaved rounds against eager batch-first (the compiled path's
    own reference) and eager "auto" (what integrate() runs by default: batch-last at this size)."""
    g = torch.Generator().manual_seed(0)
    Q, K, V = (m.to(device) for m in regimes.sample_instances("convergent", 4, n_inst, generator=g))
    X0 = torch.randn(n_inst, 8, 4, generator=g, dtype=torch.float64).to(device)
    kw = dict(t_end=t_end, dt=dt, method="rk4", n_save=2)
    t0 = time.perf_counter()
    first = oa.integrate(X0, Q, K, V, compile=True, **kw)
    first_s = time.perf_counter() - t0
    res = _interleaved({"compiled": lambda: oa.integrate(X0, Q, K, V, compile=True, **kw),
                        "eager_batch_first": lambda: oa.integrate(X0, Q, K, V, compile=False,
                                                                  layout="batch-first", **kw),
                        "eager_auto": lambda: oa.integrate(X0, Q, K, V, compile=False, **kw)}, rounds, device)
    sp, lo, hi = _ratio(res["eager_batch_first"][1], res["compiled"][1])
    sp2, lo2, hi2 = _ratio(res["eager_auto"][1], res["compiled"][1])
    return {"instances": n_inst, "t_end": t_end, "steps": first.n_steps, "first_call_s": first_s,
            "compiled_s": res["compiled"][0], "eager_batch_first_s": res["eager_batch_first"][0],
            "eager_auto_s": res["eager_auto"][0], "speedup_vs_batch_first": sp,
            "speedup_vs_batch_first_range": [lo, hi], "speedup_vs_auto": sp2, "speedup_vs_auto_range": [lo2, hi2],
            "max_abs_diff": float((res["compiled"][2].X[-1] - res["eager_batch_first"][2].X[-1]).abs().max())}


def bench_variants(device: str, rounds: int, steps: int, shape: list | None = None) -> tuple[dict, str]:
    """analysis.bench_lm's variants in this run: on a CPU the `small` preset against --pe learned
    (RoPE, RoPE + each λ mode, each λ mode, the constrained convergent regime); on a GPU the enwik8
    preset at batch 16 (each λ mode, RoPE + λ, the constrained regime). shape: bench_lm flags that
    override the preset's model (the tests' tiny run). Returns (report, title)."""
    gpu = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    argv = (["--device", device, "--bench-preset", "enwik8", "--batch-size", "16", "--bench-variants",
             "lam-identity,lam-softplus,convergent,rope-lam-identity"] if gpu else
            ["--device", device, "--bench-preset", "small", "--pe", "learned", "--bench-variants",
             "rope,rope-lam-identity,rope-lam-softplus,lam-identity,lam-softplus,convergent"])
    args = bench_lm.build_parser().parse_args(argv + (shape or []) + ["--bench-rounds", str(rounds),
                                                                        "--bench-steps", str(steps)])
    _, report, title = bench_lm.measure(args)
    return report, title.strip()


def bench_scaling(device, rounds: int = 3, steps: int = 10, quick: bool = False) -> list[dict]:
    """Instance-steps per second of oa.integrate (RK4, float64, `steps` steps of 0.05) over the
    batch (n = 8, d = 4: 10²…10⁵), n (8, 32, 128 at d = 16) and d (4, 16, 64 at n = 8), with the
    layout integrate() chose ("auto") and, where the batch-last one applies, the batch-first one
    beside it. Each shape's batch is sized to a few hundred MB of work at most."""
    shapes = ([(8, 4, b) for b in (100, 1000, 10_000, 100_000)] + [(32, 16, 300), (128, 16, 30)]
              + [(8, 16, 2000), (8, 64, 300)] + [(32, 4, 2000), (128, 64, 10)])
    if quick:
        shapes = [(8, 4, 100), (8, 16, 50)]
    rows = []
    for n, d, B in shapes:
        g = torch.Generator().manual_seed(1)
        Q, K, V = (t.to(device) for t in regimes.sample_instances("convergent", d, B, generator=g))
        X0 = (torch.randn(B, n, d, generator=g, dtype=torch.float64) / math.sqrt(d)).to(device)
        kw = dict(t_end=0.05 * steps, dt=0.05, method="rk4", n_save=2)
        fns = {"auto": lambda: oa.integrate(X0, Q, K, V, **kw)}
        suits = oa._batch_last_suits(n, d, B, {})
        if suits:
            fns["batch-first"] = lambda: oa.integrate(X0, Q, K, V, layout="batch-first", **kw)
        res = _interleaved(fns, rounds, device)
        row = {"n": n, "d": d, "batch": B, "steps": steps, "layout": "batch-last" if suits else "batch-first",
               "instance_steps_per_s": B * steps / res["auto"][0],
               "instance_steps_per_s_range": [B * steps / max(res["auto"][1]), B * steps / min(res["auto"][1])]}
        if suits:
            row["batch_first_instance_steps_per_s"] = B * steps / res["batch-first"][0]
            row["layout_speedup"] = _ratio(res["batch-first"][1], res["auto"][1])
        rows.append(row)
    return rows


def plot_scaling(rows: list, path: Path) -> None:
    """The log–log figure of bench_scaling: instance-steps/s against the batch (n = 8, d = 4), and
    each other shape as a point labelled (n, d)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sweep = [r for r in rows if (r["n"], r["d"]) == (8, 4)]
    ax.loglog([r["batch"] for r in sweep], [r["instance_steps_per_s"] for r in sweep], "o-", label="n 8, d 4 (auto)")
    bf = [r for r in sweep if "batch_first_instance_steps_per_s" in r]
    if bf:
        ax.loglog([r["batch"] for r in bf], [r["batch_first_instance_steps_per_s"] for r in bf], "s--",
                  label="n 8, d 4 (batch-first)")
    for r in rows:
        if (r["n"], r["d"]) != (8, 4):
            ax.loglog([r["batch"]], [r["instance_steps_per_s"]], "^", color="C2")
            ax.annotate(f"n {r['n']}, d {r['d']}", (r["batch"], r["instance_steps_per_s"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("instances in the batch")
    ax.set_ylabel("RK4 instance-steps per second")
    ax.set_title("integrate(): throughput by batch and shape (float64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# 2. Our GPT vs a plain PyTorch GPT of the same shape
# ------------------------------------------------------------------------------------------------
class PlainBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, n, d))
        return x + self.mlp(self.ln2(x))


class PlainGPT(nn.Module):
    """nanoGPT's shape in plain PyTorch: token + learned position embeddings, pre-LN blocks, tied head."""

    def __init__(self, vocab, d, layers, heads, seq_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(PlainBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        logits = self.ln_f(x) @ self.tok.weight.T
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def bench_gpt(rt, d: int, layers: int, heads: int, seq_len: int, batch: int, rounds: int, steps: int) -> list[dict]:
    cfg = dict(vocab_size=256, d_model=d, n_layers=layers, n_heads=heads, seq_len=seq_len, pe="learned",
               lam=0.0, lam_mode="identity", regime="free", mlp_ratio=4.0, dropout=0.0, cutoffs="")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (batch, seq_len + 1), generator=g).to(rt.device)
    x, y = data[:, :-1], data[:, 1:]
    models = {"ours (train_lm.GPT, --pe learned --lam 0)": train_lm.build_lm(cfg),
              "plain PyTorch GPT (learned PE, SDPA)": PlainGPT(256, d, layers, heads, seq_len)}
    runs = []
    for name, model in models.items():
        model = model.to(rt.device)
        step = bench_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), rt,
                                   lambda fwd: fwd(x, y))
        runs.append((name, step, sum(p.numel() for p in model.parameters())))
    sec = time_variants([(n, s) for n, s, _ in runs], rt, rounds, steps)
    base = batch * seq_len / sec[runs[1][0]]
    # MFU (GPU only): F = 6 N + 12 L n d model FLOPs per token (N = matrix parameters; the same for
    # both models, which share one shape), as in analysis/bench_lm.py
    peak = peak_tflops(rt)
    flops = flops_per_token(models[runs[1][0]], layers, seq_len, d)
    return [{"model": n, "parameters": p, "tokens_per_s": batch * seq_len / sec[n],
             "ratio_to_plain": batch * seq_len / sec[n] / base,
             "mfu": flops * batch * seq_len / sec[n] / (peak * 1e12) if peak else None} for n, _, p in runs]


def main(argv=None) -> int:
    p = training.ArgParser(prog="python -m analysis.bench",
                           description="Speed against peers: the ODE integrator vs torchdiffeq, the "
                           "LM vs a plain SDPA GPT, and (--suite) the test suite's wall time.")
    p.add_argument("--device", default="auto")
    p.add_argument("--instances", type=int, default=10_000, help="ODE instances (d = 4, n = 8)")
    p.add_argument("--t-end", type=float, default=5.0)
    p.add_argument("--dt", type=float, default=0.05, help="RK4 step (and dopri5's first trial step)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--n-layers", type=int, default=None, help="default 2 on CPU, 6 on GPU")
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None, help="default 256 on CPU, 1024 on GPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 4 on CPU, 16 on GPU")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dopri-instances", type=int, default=2000,
                   help="instances of the dopri5 work-precision comparison (default 2000)")
    p.add_argument("--scaling", action="store_true",
                   help="also the integrator's throughput by batch, n and d (table + scaling.png)")
    p.add_argument("--compiled", action="store_true",
                   help="also integrate(compile=True) against the eager loop (compiles for 20-60 s)")
    p.add_argument("--variants", action="store_true",
                   help="also every λ mode, RoPE and the constrained regime against the plain model "
                        "(analysis.bench_lm: the small preset on a CPU, enwik8 at batch 16 on a GPU)")
    p.add_argument("--variant-rounds", type=int, default=12,
                   help="interleaved rounds of --variants (2 steps each; default 12)")
    p.add_argument("--all", action="store_true", help="--scaling --compiled --variants: every ratio in one run")
    p.add_argument("--suite", action="store_true", help="also time `python -m pytest -q`")
    # an ignored folder by default: the committed results/speed is written only when asked for
    # (--out results/speed, as analysis.experiments does)
    p.add_argument("--out", default="out/speed", help="output folder (default out/speed)")
    a = p.parse_args(argv)
    if a.instances <= 0 or not (a.t_end > 0 and 0 < a.dt <= a.t_end) or a.rounds < 1 or a.steps < 1 \
            or a.dopri_instances <= 0 or a.variant_rounds < 1:
        raise ValueError("need --instances > 0, --dopri-instances > 0, 0 < --dt <= --t-end, --rounds >= 1, "
                         "--variant-rounds >= 1 and --steps >= 1")
    training.check_folder(a.out, "--out")          # before minutes of timing, not after
    rt = training.setup_runtime(a.device)
    gpu = rt.device.type == "cuda"
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": torch.get_num_threads(),
              "versions": training.versions()}
    if gpu:
        report["matmul_bf16_tflops_measured"] = measured_matmul_tflops(rt.device)
        report["matmul_bf16_tflops_datasheet"] = peak_tflops(rt)
    report["ode"] = bench_ode(rt.device, a.instances, a.t_end, a.dt, rounds=a.rounds,
                              dopri_instances=min(a.dopri_instances, a.instances))
    if a.all:
        a.scaling = a.compiled = a.variants = True
    if a.compiled:
        report["compiled"] = bench_compiled(rt.device, a.instances, a.t_end, a.dt, rounds=a.rounds)
    if a.scaling:
        report["scaling"] = bench_scaling(rt.device, rounds=a.rounds)
    if a.variants:
        report["variants"], variants_title = bench_variants(a.device, a.variant_rounds, 2)
    report["lm"] = bench_gpt(rt, a.d_model, a.n_layers or (6 if gpu else 2), a.n_heads,
                            a.seq_len or (1024 if gpu else 256), a.batch_size or (16 if gpu else 4),
                            a.rounds, a.steps)
    report["lm_shape"] = {"d_model": a.d_model, "n_layers": a.n_layers or (6 if gpu else 2),
                          "seq_len": a.seq_len or (1024 if gpu else 256), "batch": a.batch_size or (16 if gpu else 4)}
    if a.suite:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=ROOT, capture_output=True, text=True)
        report["suite"] = {"seconds": time.perf_counter() - t0, "returncode": r.returncode,
                           "summary": (r.stdout.strip().splitlines() or [""])[-1]}
    lines = [f"device: {report['device']} ({report['threads']} threads)", ""]
    if "matmul_bf16_tflops_measured" in report:
        ds = report["matmul_bf16_tflops_datasheet"]
        lines += [f"bf16 8192² matmul: measured {report['matmul_bf16_tflops_measured']:.0f} TFLOP/s"
                  + (f" (datasheet dense peak {ds:.0f}); MFU below is against the datasheet, "
                     f"× {ds / report['matmul_bf16_tflops_measured']:.2f} for the measured rate" if ds else ""), ""]
    if report["ode"]:
        rk = [r for r in report["ode"] if r["method"] == "rk4"]
        lines += ["Fixed-step RK4, the same steps and evaluations (ratio = torchdiffeq's time / ours, per "
                  f"interleaved round: median [min, max] of {rk[0]['rounds']}):", "",
                  "| integrator | dtype | instances | ours (s) | evaluations | torchdiffeq, plain field (s) "
                  "| speed-up | torchdiffeq, our field (s) | speed-up, same field | max abs. difference |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rk:
            lines.append(f"| rk4 to t = {r['t_end']:g} | {r['dtype']} | {r['instances']:,} | {r['ours_s']:.2f} | "
                         f"{r['ours_evals']} / {r['torchdiffeq_evals']} | {r['torchdiffeq_s']:.2f} | "
                         f"{r['speedup']:.2f}× [{r['speedup_range'][0]:.2f}, {r['speedup_range'][1]:.2f}] | "
                         f"{r['torchdiffeq_same_field_s']:.2f} | {r['speedup_same_field']:.2f}× "
                         f"[{r['speedup_same_field_range'][0]:.2f}, {r['speedup_same_field_range'][1]:.2f}] | "
                         f"{r['max_abs_diff']:.1e} |")
        dp = [r for r in report["ode"] if r["method"] == "dopri5"]
        lines += ["", f"Dormand–Prince 5(4), float64, {dp[0]['instances']:,} instances to t = {dp[0]['t_end']:g}, "
                  "atol = rtol·1e-3; achieved error = max |X(t_end) − X_ref| (X_ref: rtol 1e-12). "
                  "Equal-error speed-up: torchdiffeq's time at our achieved error (log–log "
                  "interpolation over its rtols; '-' outside its range) / ours:", "",
                  "| rtol | error norm | ours (s) | evaluations | achieved error | torchdiffeq (s) | evaluations "
                  "| achieved error | speed-up, same rtol | speed-up, equal error |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in dp:
            eq = "-" if r["speedup_equal_error"] is None else f"**{r['speedup_equal_error']:.2f}×**"
            lines.append(f"| {r['rtol']:g} | {r['error_norm']} | {r['ours_s']:.2f} | {r['ours_evals']} | "
                         f"{r['ours_error']:.1e} | {r['torchdiffeq_s']:.2f} | {r['torchdiffeq_evals']} | "
                         f"{r['torchdiffeq_error']:.1e} | {r['speedup']:.2f}× | {eq} |")
    else:                                 # no header over an empty table: say why there are no rows
        lines.append("integrator vs torchdiffeq: not measured (torchdiffeq is not installed: "
                     "pip install -r requirements-extra.txt)")
    if report.get("scaling"):
        lines += ["", "Throughput of integrate() (RK4, float64; instance-steps/s, median of the rounds "
                  "[slowest, fastest]; the layout 'auto' chose, and batch-first beside it where that differs):", "",
                  "| n | d | batch | layout | instance-steps/s | batch-first | layout speed-up |", "|---|---|---|---|---|---|---|"]
        for r in report["scaling"]:
            lo, hi = r["instance_steps_per_s_range"]
            bf = f"{r['batch_first_instance_steps_per_s']:,.0f}" if "batch_first_instance_steps_per_s" in r else "-"
            ls = f"{r['layout_speedup'][0]:.2f}×" if "layout_speedup" in r else "-"
            lines.append(f"| {r['n']} | {r['d']} | {r['batch']:,} | {r['layout']} | {r['instance_steps_per_s']:,.0f} "
                         f"[{lo:,.0f}, {hi:,.0f}] | {bf} | {ls} |")
    if report.get("compiled"):
        c = report["compiled"]
        lines += ["", f"RK4 compiled (torch.compile, inductor) against the eager loop, {c['instances']:,} instances, "
                  f"{c['steps']} steps, float64 (ratio = eager's time / compiled, median [min, max] of the rounds):", "",
                  "| first call (compile + run) | compiled (s) | eager batch-first (s) | speed-up | eager auto (s) "
                  "| speed-up | max abs. difference |", "|---|---|---|---|---|---|---|",
                  f"| {c['first_call_s']:.1f} s | {c['compiled_s']:.2f} | {c['eager_batch_first_s']:.2f} | "
                  f"{c['speedup_vs_batch_first']:.2f}× [{c['speedup_vs_batch_first_range'][0]:.2f}, "
                  f"{c['speedup_vs_batch_first_range'][1]:.2f}] | {c['eager_auto_s']:.2f} | {c['speedup_vs_auto']:.2f}× "
                  f"[{c['speedup_vs_auto_range'][0]:.2f}, {c['speedup_vs_auto_range'][1]:.2f}] | {c['max_abs_diff']:.1e} |"]
    if report.get("variants"):
        v = report["variants"]
        lines += ["", f"Training-step variants ({variants_title.rstrip(':')}; ratio = tokens/s / the first row's, "
                  "median of the rounds [min, max of the per-round ratio]):", "",
                  "| variant | tokens/s | × first row | MFU |", "|---|---|---|---|"]
        for r in v["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            lines.append(f"| {r['variant']} | {r['tokens_per_s']:,.0f} | {r['ratio_to_plain']:.3f} "
                         f"[{r['ratio_range'][0]:.2f}, {r['ratio_range'][1]:.2f}] | {mfu} |")
    s = report["lm_shape"]
    lines += ["", f"LM training step, {s['n_layers']} × {s['d_model']}, seq {s['seq_len']}, batch {s['batch']}:", "",
              "| model | parameters | tokens/s | × plain | MFU |", "|---|---|---|---|---|"]
    for r in report["lm"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['tokens_per_s']:,.0f} | {r['ratio_to_plain']:.3f} | {mfu} |")
    if "suite" in report:
        lines += ["", f"test suite: {report['suite']['seconds']:.1f} s wall ({report['suite']['summary']})"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    # both files or neither: a disk that fills up leaves no new bench.md beside an old bench.json
    if report.get("scaling"):
        files = {out / "scaling.png": lambda tmp: plot_scaling(report["scaling"], Path(tmp))}
    else:
        files = {}
    training.atomic_write_all({**files, out / "bench.md": lambda tmp: Path(tmp).write_text(text),
                               out / "bench.json": lambda tmp: Path(tmp).write_text(
                                   json.dumps(report, indent=2, default=str))})
    training.teardown(rt)
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
