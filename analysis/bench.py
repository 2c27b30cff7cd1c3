"""analysis/bench.py — this project's speed against its peers, in one run, as ratios; and the
benchmark helpers (FLOPs per token, the GPU's peak, a timed training step, interleaved timing)
that analysis/bench_lm.py and analysis/bench_vit.py share.

    python -m analysis.bench                 # ODE integrator vs torchdiffeq, our GPT vs a plain SDPA GPT
    python -m analysis.bench --suite         # ... and the test suite's wall time
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
from training import Runtime, autocast, wrap_model

ROOT = Path(__file__).resolve().parent.parent          # the project folder (analysis/ is inside it)


# ------------------------------------------------------------------------------------------------
# Benchmark helpers (also used by analysis/bench_lm.py and analysis/bench_vit.py)
# ------------------------------------------------------------------------------------------------
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}  # dense


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


def bench_ode(device, n_inst: int, t_end: float, dt: float) -> list[dict]:
    try:
        import torchdiffeq
    except ImportError:
        print("analysis.bench: torchdiffeq is not installed (pip install -r requirements-extra.txt); "
              "skipping the integrator comparison.", file=sys.stderr)
        return []
    g = torch.Generator().manual_seed(0)
    # convergent instances: none blows up, so both solvers do the same work to t_end
    Q, K, V = (m.to(device) for m in regimes.sample_instances("convergent", 4, n_inst, generator=g))
    X0 = torch.randn(n_inst, 8, 4, generator=g, dtype=torch.float64).to(device)
    nfe = [0]

    def f(_t, X):                       # torchdiffeq's signature f(t, y); counts evaluations
        nfe[0] += 1
        return oa._velocity(X, Q, K, V)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    t_pts = torch.tensor([0.0, t_end], dtype=torch.float64, device=device)
    for method, ours_kw, tdq_kw in (
            ("rk4", dict(method="rk4", dt=dt), dict(method="rk4", options={"step_size": dt})),
            ("dopri5", dict(method="dopri5", dt=dt, rtol=1e-6, atol=1e-9),
             dict(method="dopri5", rtol=1e-6, atol=1e-9))):
        best = {}
        for who in ("ours", "torchdiffeq", "ours", "torchdiffeq"):      # two rounds, best kept
            nfe[0] = 0
            sync()
            t0 = time.perf_counter()
            if who == "ours":
                tr = oa.integrate(X0, Q, K, V, t_end=t_end, n_save=2, **ours_kw)
                X1, evals = tr.X[-1], tr.n_evals
            else:
                X1 = torchdiffeq.odeint(f, X0, t_pts, **tdq_kw)[-1]
                evals = nfe[0]
            sync()
            sec = time.perf_counter() - t0
            if who not in best or sec < best[who][0]:
                best[who] = (sec, evals, X1)
        diff = float((best["ours"][2] - best["torchdiffeq"][2]).abs().max())
        rows.append({"method": method, "instances": n_inst, "t_end": t_end,
                     "ours_s": best["ours"][0], "ours_evals": best["ours"][1],
                     "torchdiffeq_s": best["torchdiffeq"][0], "torchdiffeq_evals": best["torchdiffeq"][1],
                     "speedup": best["torchdiffeq"][0] / best["ours"][0], "max_abs_diff": diff})
    return rows


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


def bench_lm(rt, d: int, layers: int, heads: int, seq_len: int, batch: int, rounds: int, steps: int) -> list[dict]:
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
    p.add_argument("--suite", action="store_true", help="also time `python -m pytest -q`")
    # an ignored folder by default: the committed results/speed is written only when asked for
    # (--out results/speed, as analysis.experiments does)
    p.add_argument("--out", default="out/speed", help="output folder (default out/speed)")
    a = p.parse_args(argv)
    if a.instances <= 0 or not (a.t_end > 0 and 0 < a.dt <= a.t_end) or a.rounds < 1 or a.steps < 1:
        raise ValueError("need --instances > 0, 0 < --dt <= --t-end, --rounds >= 1 and --steps >= 1")
    training.check_folder(a.out, "--out")          # before minutes of timing, not after
    rt = training.setup_runtime(a.device)
    gpu = rt.device.type == "cuda"
    report = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": torch.get_num_threads(),
              "versions": training.versions()}
    report["ode"] = bench_ode(rt.device, a.instances, a.t_end, a.dt)
    report["lm"] = bench_lm(rt, a.d_model, a.n_layers or (6 if gpu else 2), a.n_heads,
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
    if report["ode"]:
        lines += ["| integrator | instances | ours (s) | ours: evaluations | torchdiffeq (s) | torchdiffeq: evaluations | speed-up | max abs. difference |",
                  "|---|---|---|---|---|---|---|---|"]
    else:                                 # no header over an empty table: say why there are no rows
        lines.append("integrator vs torchdiffeq: not measured (torchdiffeq is not installed: "
                     "pip install -r requirements-extra.txt)")
    for r in report["ode"]:
        lines.append(f"| {r['method']} to t = {r['t_end']:g} | {r['instances']:,} | {r['ours_s']:.2f} | {r['ours_evals']} | "
                     f"{r['torchdiffeq_s']:.2f} | {r['torchdiffeq_evals']} | {r['speedup']:.2f}× | {r['max_abs_diff']:.1e} |")
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
    training.atomic_write_all({out / "bench.md": lambda tmp: Path(tmp).write_text(text),
                               out / "bench.json": lambda tmp: Path(tmp).write_text(
                                   json.dumps(report, indent=2, default=str))})
    training.teardown(rt)
    return 0


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
