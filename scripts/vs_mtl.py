"""Each method's ARG minus MTL's, with the paired 95% bootstrap interval, from a results.json
(what `primer run` now writes as "vs_mtl"; for results files written before it did).

  .venv/bin/python scripts/vs_mtl.py docs/study/results.json
"""
import json
import sys

from core.metrics import arg_difference_interval

results = json.load(open(sys.argv[1]))
scores = lambda m: {t: {r["seed"]: r["test"] for r in per[m]["best"]} for t, per in results["tasks"].items()}  # noqa: E731
args = results["arg"]
print("| method | ARG − ARG(mtl) (points) | paired 95% bootstrap CI |\n|---|---|---|")
for m in (m for m in args if m != "mtl"):
    lo, hi = arg_difference_interval(scores(m), scores("mtl"), scores("pt"))
    print(f"| {m} | {args[m] - args['mtl']:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
