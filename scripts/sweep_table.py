"""A sweep's report for the docs, from the files `primer run` wrote (sweep.json and each
variantN/results.json): per value, each method's ARG over PT with its 95% bootstrap interval and
test score mean ± std per target; each value's ARG minus a reference value's, paired on the
same resamples (PT is shared by every variant); each method's ARG across the values (mean, std,
range: the spread over repeated upstream runs when the field is upstream.episode_seed); and
sweep.png drawn again from sweep.json.

  .venv/bin/python scripts/sweep_table.py runs/metapt-clustering metapt kmeans
  .venv/bin/python scripts/sweep_table.py runs/metapt-k metapt 10
  .venv/bin/python scripts/sweep_table.py runs/metapt-episodes metapt 1
"""
import json
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

from core.metrics import arg_difference_interval, arg_interval
from core.report import sweep_plot

out, method, reference = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sweep = json.loads((out / "sweep.json").read_text())
values = sweep["values"]
runs = [json.loads((out / f"variant{i}" / "results.json").read_text()) for i in range(len(values))]
scores = lambda r, m: {t: {x["seed"]: x["test"] for x in per[m]["best"]} for t, per in r["tasks"].items()}  # noqa: E731
targets = list(runs[0]["tasks"])
pt = scores(runs[0], "pt")
for r in runs[1:]:
    assert scores(r, "pt") == pt, "the variants do not share their PT runs"

print(f"| {sweep['field']} | ARG (%) | 95 % CI | " + " | ".join(targets) + " |")
print("|---|---|---|" + "---|" * len(targets))
cells = lambda r, m: [f"{r['tasks'][t][m]['mean']:.3f} ± {r['tasks'][t][m]['std']:.3f}" for t in targets]  # noqa: E731
print("| PT | — | — | " + " | ".join(cells(runs[0], "pt")) + " |")
for value, r in zip(values, runs):
    lo, hi = arg_interval(scores(r, method), pt)
    print(f"| {value} | {r['arg'][method]:+.2f} | [{lo:+.2f}, {hi:+.2f}] | " + " | ".join(cells(r, method)) + " |")

base = runs[[str(v) for v in values].index(reference)]
print(f"\n| {sweep['field']} | ARG − ARG({reference}) (points) | paired 95 % CI |\n|---|---|---|")
for value, r in zip(values, runs):
    if r is not base:
        lo, hi = arg_difference_interval(scores(r, method), scores(base, method), pt)
        print(f"| {value} | {r['arg'][method] - base['arg'][method]:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")

print(f"\n| method | ARG over the {len(values)} values: mean ± std (min, max) |\n|---|---|")
for m, args in sweep["arg"].items():
    print(f"| {m} | {statistics.mean(args):+.2f} ± {statistics.stdev(args):.2f} ({min(args):+.2f}, {max(args):+.2f}) |")

stub = SimpleNamespace(runs=[(v, None) for v in values], table=lambda: sweep["arg"],
                       spec=SimpleNamespace(sweep=SimpleNamespace(field=sweep["field"])))
print(f"\n{sweep_plot(stub, out / 'sweep.png')}")
