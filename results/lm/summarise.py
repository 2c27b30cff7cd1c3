"""Summarise language-model runs (folders named <variant>-s<seed>) into a Markdown table.

    python results/lm/summarise.py runs/regimes-lm free divergent intermediate convergent
    python results/lm/summarise.py runs/pe-lm           # every variant found, in sorted order

Mean ± std over seeds of the final validation / test bits per byte (summary.json) and of the
token probe after the last layer (probe.csv): the mean pairwise cosine, and the mean token norm
relative to the input, for full blocks and for attention-only updates x ← x + Attn(x).
"""
import csv
import json
import os
import re
import statistics as st
import sys


def mean_std(values):
    return f"{st.mean(values):.3f} ± {st.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def probe_value(rows, mode, metric, layer):
    return next(float(r["mean"]) for r in rows
                if r["mode"] == mode and r["metric"] == metric and int(r["layer"]) == layer)


def main(root: str, variants=None) -> None:
    runs = {}                                                   # variant -> [run folder, ...]
    for name in sorted(os.listdir(root)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        if m and os.path.exists(os.path.join(root, name, "summary.json")):
            runs.setdefault(m.group(1), []).append(os.path.join(root, name))
    print("| variant | seeds | validation bpb | test bpb | cosine after the last block (full) | "
          "cosine after the last update (attention-only) | norm ratio last/input (full) | "
          "norm ratio last/input (attention-only) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant in variants or sorted(runs):
        cols = {k: [] for k in ("val", "test", "cos_full", "cos_ao", "norm_full", "norm_ao")}
        for run in runs.get(variant, []):
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
            print(f"| {variant} | {len(cols['val'])} | " + " | ".join(
                mean_std(cols[k]) for k in ("val", "test", "cos_full", "cos_ao", "norm_full", "norm_ao"))
                + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python results/lm/summarise.py RUNS_FOLDER [VARIANT ...]")
    main(sys.argv[1], sys.argv[2:] or None)
