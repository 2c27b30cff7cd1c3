"""Agreement: does the regime predicted from (W, A) match the fate that simulation shows?

    python -m analysis.agreement --instances N [--d 4 --n 8 --t-end 20 --seed 0] --out DIR

For every cell (regime, symmetric A or not, PE none / absolute / RoPE) N random instances are drawn
with their regime by construction (regimes.sample_instances), integrated with RK4 (ode_attention.
integrate, batched) and their fate read off the mean token norm (`observed_fate`). The prediction
is the regime of the position-free (W, A) (regimes.classify, docs/conventions.md); for RoPE the
table also counts the instances whose offset-dependent W(m) = Q R(m) Kᵀ keeps that regime at every
offset (docs/dynamics.md §1.3). Writes DIR/agreement.md and DIR/agreement.csv and prints the table.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from tqdm import tqdm

import ode_attention as oa
import regimes
import rope
import training

FATES = ("converged", "diverged", "neither")
PREDICTED_FATE = {"convergent": "converged", "divergent": "diverged"}


def observed_fate(norms: torch.Tensor, blown: torch.Tensor, grow: float = 10.0,
                  shrink: float = 0.5) -> list[str]:
    """Fate of each instance from its mean-token-norm curve norms (T, B) (of the DRIVING tokens):
    diverged  — it blew up (non-finite or past the norm bound) or ended ≥ `grow` × its start;
    converged — it ended ≤ `shrink` × its start and was still falling over the second half;
    neither   — anything else (bounded, oscillating, or too slow to tell within the horizon).
    The thresholds are generous on purpose: convergence is algebraic (~t^(−1/2)), not exponential.
    """
    first, last, mid = norms[0], norms[-1], norms[norms.shape[0] // 2]
    out = []
    for b in range(norms.shape[1]):
        if bool(blown[b]) or last[b] >= grow * first[b]:
            out.append("diverged")
        elif last[b] <= shrink * first[b] and last[b] < mid[b]:
            out.append("converged")
        else:
            out.append("neither")
    return out


def rope_predictions(Q, K, V, offsets, base: float = 10000.0, pairing: str = "interleaved",
                     tol: float | None = None) -> list:
    """For a batch of instances (B, d, d): the regime shared by every offset's (W(m), A(m)), or None
    when the offsets disagree (no uniform sufficient condition holds)."""
    Wm = regimes.rope_offset_matrices(Q, K, offsets, base, pairing)     # W(m) = Q R(m) Kᵀ, (B, M, d, d)
    Am = torch.linalg.solve(V[:, None], Wm.transpose(-1, -2)).transpose(-1, -2)  # A(m) Vᵀ = W(m)
    kappa = torch.linalg.cond(V.double())[:, None]                      # κ(V) per instance, every offset
    names = regimes.classify_batch(Wm, Am, tol, cond_V=kappa)
    M = len(offsets)
    out = []
    for b in range(Q.shape[0]):
        s = set(names[b * M:(b + 1) * M])
        out.append(s.pop() if len(s) == 1 else None)
    return out


def agreement_table(N: int, d: int = 4, n: int = 8, t_end: float = 20.0, dt: float = 0.2,
                    seed: int = 0, progress: bool = True) -> list[dict]:
    """Sample N instances per (regime, symmetric A?, PE) cell, integrate them (RK4, batched) and
    count fates. PE "none": the plain field; "abs": sinusoidal absolute PE (fate measured on the
    driving tokens y = x + p, whose rest point is 0); "rope": rotary encoding. The prediction is
    always the regime of the position-free (W, A): the table then shows how often RoPE keeps or
    breaks it. For RoPE it also counts the instances whose offset-dependent W(m) = Q R(m) Kᵀ,
    A(m) = W(m)(Vᵀ)⁻¹ keep that regime for EVERY offset |m| < n ("offsets_uniform"): only those
    are covered by the sufficient conditions. Intermediate instances have no predicted fate; their
    fates are reported. All six (regime, A) cells of one PE integrate as one batch of 6N instances,
    and the three PEs integrate the same 6N instances from the same driving tokens (paired).
    """
    if not isinstance(N, int) or N <= 0:
        raise ValueError(f"N must be a positive integer, got {N!r}.")
    g = torch.Generator().manual_seed(seed)
    pos_table = rope.sinusoidal_pe(n, d, dtype=torch.float64)
    offsets = list(range(-(n - 1), n))
    groups = [(r, s) for r in regimes.REGIME_NAMES for s in (True, False)]
    rows = []
    # one draw for every PE: the three arms see the same instances and the same initial DRIVING
    # tokens, so their differences are paired (and absolute PE's is a check of the code, below)
    inst = [regimes.sample_instances(r, d, N, symmetric_A=s, generator=g) for r, s in groups]
    Q, K, V = (torch.cat(m) for m in zip(*inst))
    Y0 = torch.randn(Q.shape[0], n, d, generator=g, dtype=torch.float64)
    for pe in tqdm(("none", "abs", "rope"), desc="agreement (per PE)", disable=not progress):
        # absolute PE: the field is driven by y = x + p, and y obeys the no-PE field exactly; starting
        # from x₀ = y₀ − p makes its y-trajectory the no-PE arm's, so every fate must be the same
        # (up to round-off in the last bit of a threshold): true by construction, a code check
        shift = pos_table if pe == "abs" else 0.0                         # y = x + p
        X0 = Y0 - shift
        opts = {"pos": pos_table} if pe == "abs" else ({"rope": True} if pe == "rope" else {})
        scale0 = float(oa.token_norm(Y0).max())
        tr = oa.integrate(X0, Q, K, V, t_end=t_end, dt=dt, method="rk4",
                          max_norm=1e4 * max(1.0, scale0), n_save=21, **opts)
        fates = observed_fate(oa.token_norm(tr.X + shift), tr.blown)
        uniform = rope_predictions(Q, K, V, offsets) if pe == "rope" else None
        for gi, (regime, symA) in enumerate(groups):
            sl = slice(gi * N, (gi + 1) * N)
            f_cell = fates[sl]
            agree = sum(f == PREDICTED_FATE.get(regime) for f in f_cell)
            rows.append({"regime": regime, "A": "symmetric" if symA else "general", "pe": pe, "N": N,
                         "offsets_uniform": (sum(u == regime for u in uniform[sl])
                                             if uniform is not None else ""),
                         **{f: f_cell.count(f) for f in FATES},
                         "agreement": agree / N if regime in PREDICTED_FATE else float("nan")})
    order = {(r, s): i for i, (r, s) in enumerate((r, "symmetric" if s else "general") for r, s in groups)}
    rows.sort(key=lambda r: (order[(r["regime"], r["A"])], ("none", "abs", "rope").index(r["pe"])))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of agreement_table's rows."""
    head = ("| regime (predicted) | A | PE | N | RoPE: regime holds at every offset | converged | "
            "diverged | neither | agreement |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ag = "no prediction" if r["agreement"] != r["agreement"] else f"{100 * r['agreement']:.1f}%"
        uni = "—" if r["offsets_uniform"] == "" else r["offsets_uniform"]
        lines.append(f"| {r['regime']} | {r['A']} | {r['pe']} | {r['N']} | {uni} | "
                     f"{r['converged']} | {r['diverged']} | {r['neither']} | {ag} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = training.ArgParser(
        description="Regimes of attention: agreement of predicted vs simulated fates on random "
                    "instances (N per cell of regime × symmetric/general A × PE none/abs/RoPE).")
    p.add_argument("--instances", type=int, required=True, metavar="N", help="instances per cell")
    p.add_argument("--d", type=int, default=4, help="token dimension (even, for RoPE)")
    p.add_argument("--n", type=int, default=8, help="tokens per instance")
    p.add_argument("--t-end", type=float, default=20.0, help="integration horizon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/regimes", help="output folder")
    a = p.parse_args(argv)
    try:
        if a.instances <= 0 or a.d < 2 or a.d % 2 or a.n < 2 or not a.t_end > 0:
            raise ValueError("need N > 0, an even --d >= 2, --n >= 2 and --t-end > 0.")
        t0 = time.time()
        rows = agreement_table(a.instances, d=a.d, n=a.n, t_end=a.t_end, seed=a.seed)
        secs = time.time() - t0
        table = format_table(rows)
        print(table)
        print(f"\n{a.instances} instances per cell, d={a.d}, n={a.n}, t_end={a.t_end}, RK4 dt=0.2; "
              f"{secs:.1f} s")
        training.atomic_write(os.path.join(a.out, "agreement.md"), lambda tmp: tmp.write_text(table + "\n"))
        buf = [",".join(rows[0].keys())] + [",".join(str(v) for v in r.values()) for r in rows]
        training.atomic_write(os.path.join(a.out, "agreement.csv"), lambda tmp: tmp.write_text("\n".join(buf) + "\n"))
        return 0
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        print(f"agreement.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(training.run_cli(main))
