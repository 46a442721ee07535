"""One row per method and run for docs/study.md's attempts: ARG over PT with its interval, the
mean dev score at step 0 (the init before any target step), the mean test score, the run's
wall time. Arguments are results.json files, or a sweep.json (one row per variant).

  .venv/bin/python scripts/attempts.py docs/study/results.json docs/study/attempts/*/sweep.json
"""
import json
import sys
from statistics import mean


def runs(path: str):
    data = json.load(open(path))
    if "runs" in data:  # a sweep
        for value, run in zip(data["values"], data["runs"]):
            yield f"{path} ({data['field']} = {value})", run
    else:
        yield path, data


print("| run | method | ARG (%) | 95% CI | dev at step 0 | test | minutes |\n|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    for name, run in runs(path):
        for method in ["pt", *run["arg"]]:
            cells = [c for t in run["tasks"].values() for c in t[method]["best"]]
            dev0 = mean(next(p["dev"] for p in c["curve"] if p["step"] == 0 and "dev" in p) for c in cells)
            test = mean(c["test"] for c in cells)
            arg, ci = run["arg"].get(method), run["arg_95ci"].get(method)
            print(f"| {name} | {method} | {'—' if arg is None else f'{arg:+.2f}'} | "
                  f"{'—' if ci is None else f'[{ci[0]:+.2f}, {ci[1]:+.2f}]'} | {dev0:.3f} | {test:.3f} | "
                  f"{run['seconds'] / 60:.1f} |")
