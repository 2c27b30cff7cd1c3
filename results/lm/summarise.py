"""Summarise the constrained-regime language-model runs into the Markdown table of results/lm/regimes.md.

    python results/lm/summarise.py runs/regimes-lm      (the run folders of the commands in README.md)
Mean ± std over seeds of the final validation/test bits per byte (summary.json) and of the token
probe after the last layer (probe.csv): mean pairwise cosine, and the mean token norm relative to
the input, for full blocks and for attention-only updates x <- x + Attn(x).
"""
import csv
import json
import os
import statistics as st
import sys

root=sys.argv[1] if len(sys.argv) > 1 else "runs/regimes-lm"
rows=[]
for reg in ["free","divergent","intermediate","convergent"]:
    vals=[];tests=[];cos_ao=[];cos_full=[];norm_ao=[];norm_full=[]
    for s in [0,1,2]:
        d=f"{root}/{reg}-s{s}"
        if not os.path.exists(f"{d}/summary.json"): continue
        j=json.load(open(f"{d}/summary.json")); vals.append(j["val"]["bpb"]); tests.append(j["test"]["bpb"])
        pr=list(csv.DictReader(open(f"{d}/probe.csv")))
        L=max(int(r["layer"]) for r in pr)
        g=lambda mode,m,l: float([r for r in pr if r["mode"]==mode and r["metric"]==m and int(r["layer"])==l][0]["mean"])
        cos_ao.append((g("attention-only","cosine",0),g("attention-only","cosine",L))); cos_full.append((g("full","cosine",0),g("full","cosine",L)))
        norm_ao.append(g("attention-only","norm",L)/g("attention-only","norm",0)); norm_full.append(g("full","norm",L)/g("full","norm",0))
    if not vals: continue
    ms=lambda v: f"{st.mean(v):.3f} ± {st.stdev(v):.3f}" if len(v)>1 else f"{v[0]:.3f}"
    rows.append(f"| {reg} | {len(vals)} | {ms(vals)} | {ms(tests)} | {ms([c[1] for c in cos_full])} | {ms([c[1] for c in cos_ao])} | {ms(norm_full)} | {ms(norm_ao)} |")
print("| --regime | seeds | validation bpb | test bpb | cosine after the last block (full) | cosine after the last update (attention-only) | norm ratio last/input (full) | norm ratio last/input (attention-only) |")
print("|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
