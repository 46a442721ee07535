"""Each method's ARG minus a baseline method's (MTL unless named), with the paired 95% bootstrap
interval, from a results.json (what `primer run` writes as "vs_mtl"; for results files written
before it did, and for other baselines, e.g. MetaPT's PPT).

  .venv/bin/python scripts/vs_mtl.py docs/study/results.json
  .venv/bin/python scripts/vs_mtl.py docs/metapt/results.json ppt
"""
import json
import sys

from core.metrics import arg_difference_interval

results = json.load(open(sys.argv[1]))
scores = lambda m: {t: {r["seed"]: r["test"] for r in per[m]["best"]} for t, per in results["tasks"].items()}  # noqa: E731
args, base = results["arg"], sys.argv[2] if len(sys.argv) > 2 else "mtl"
print(f"| method | ARG − ARG({base}) (points) | paired 95% bootstrap CI |\n|---|---|---|")
for m in (m for m in args if m != base):
    lo, hi = arg_difference_interval(scores(m), scores(base), scores("pt"))
    print(f"| {m} | {args[m] - args[base]:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
