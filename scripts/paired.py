"""ARG(A) minus ARG(B) for two methods of two runs on the same targets, split seeds and PT
baseline, with the paired 95% bootstrap interval (both ARGs recomputed on the same resamples).

  .venv/bin/python scripts/paired.py docs/study/attempts/select/results.json:maml docs/study/results.json:maml
"""
import json
import sys

from core.metrics import arg_difference_interval


def scores(path: str, method: str) -> dict:
    tasks = json.load(open(path))["tasks"]
    return {t: {r["seed"]: r["test"] for r in per[method]["best"]} for t, per in tasks.items()}


(a, ma), (b, mb) = (arg.rsplit(":", 1) for arg in sys.argv[1:3])
pt_a, pt_b = scores(a, "pt"), scores(b, "pt")
if pt_a != pt_b:
    sys.exit("the two runs' PT baselines differ: a paired comparison needs the same targets, seeds and baseline")
lo, hi = arg_difference_interval(scores(a, ma), scores(b, mb), pt_a)
diff = json.load(open(a))["arg"][ma] - json.load(open(b))["arg"][mb]
print(f"| {a}:{ma} − {b}:{mb} | {diff:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
