"""Summarise the constrained-regime language-model runs into the Markdown table of regimes.md.

    python results/lm/summarise.py runs/regimes-lm      # the run folders of the commands in README.md

Mean ± std over seeds of the final validation / test bits per byte (summary.json) and of the
token probe after the last layer (probe.csv): the mean pairwise cosine, and the mean token norm
relative to the input, for full blocks and for attention-only updates x ← x + Attn(x).
"""
import csv
import json
import os
import statistics as st
import sys

REGIMES = ("free", "divergent", "intermediate", "convergent")
SEEDS = (0, 1, 2)


def mean_std(values):
    return f"{st.mean(values):.3f} ± {st.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def probe_value(rows, mode, metric, layer):
    return next(float(r["mean"]) for r in rows
                if r["mode"] == mode and r["metric"] == metric and int(r["layer"]) == layer)


def main(root: str) -> None:
    print("| --regime | seeds | validation bpb | test bpb | cosine after the last block (full) | "
          "cosine after the last update (attention-only) | norm ratio last/input (full) | "
          "norm ratio last/input (attention-only) |")
    print("|---|---|---|---|---|---|---|---|")
    for regime in REGIMES:
        cols = {k: [] for k in ("val", "test", "cos_full", "cos_ao", "norm_full", "norm_ao")}
        for seed in SEEDS:
            run = os.path.join(root, f"{regime}-s{seed}")
            if not os.path.exists(os.path.join(run, "summary.json")):
                continue
            summary = json.load(open(os.path.join(run, "summary.json")))
            probe = list(csv.DictReader(open(os.path.join(run, "probe.csv"))))
            last = max(int(r["layer"]) for r in probe)
            cols["val"].append(summary["val"]["bpb"])
            cols["test"].append(summary["test"]["bpb"])
            for mode, key in (("full", "full"), ("attention-only", "ao")):
                cols[f"cos_{key}"].append(probe_value(probe, mode, "cosine", last))
                # ‖x‖ after the last layer / ‖x‖ at the input
                cols[f"norm_{key}"].append(probe_value(probe, mode, "norm", last)
                                           / probe_value(probe, mode, "norm", 0))
        if cols["val"]:
            print(f"| {regime} | {len(cols['val'])} | " + " | ".join(
                mean_std(cols[k]) for k in ("val", "test", "cos_full", "cos_ao", "norm_full", "norm_ao"))
                + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/regimes-lm")
