"""Results as files people read: results.json, a markdown report, plots, and the prompts."""
from __future__ import annotations

import json
import math
from pathlib import Path

from core.experiment import Results
from core.prompts import save_prompt


def percent(value: float | None, digits: int = 2, scale: float = 1.0, unit: str = "") -> str:
    """A signed percentage, or "n/a" where none is defined (PT scored 0)."""
    return "n/a" if value is None else f"{scale * value:+.{digits}f}{unit}"


def strict_json(data) -> str:
    """JSON any parser reads (Python's own writes NaN, which JavaScript's JSON.parse refuses):
    a NaN score (CrossFit's Pearson of constant predictions) and what it made NaN become null."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        return [finite(x) for x in v] if isinstance(v, (list, tuple)) else v
    return json.dumps(finite(data), indent=2, allow_nan=False)


def interval(ci: tuple[float, float] | None) -> str:
    return "n/a" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def markdown(results: Results) -> str:
    spec = results.spec
    lines = [f"# {spec.name}", "",
             f"backbone `{spec.backbone}`, prompt {spec.prompt.length} tokens ({spec.prompt.init} init), "
             f"{results.seconds / 60:.1f} min", ""]
    if results.selection:
        ranked = sorted(results.selection.scores.items(), key=lambda kv: -kv[1])
        lines += ["## Source tasks chosen by prompt-subspace similarity", "",
                  "| candidate | similarity to the targets | chosen |", "|---|---|---|"]
        lines += [f"| {n} | {v:.3f} | {'yes' if n in results.selection.chosen else ''} |" for n, v in ranked]
        lines += [""]
    pseudo = results.clusters.pseudo if results.clusters else None
    if pseudo:
        heldout = (f"; held-out accuracy {pseudo['heldout_accuracy']:.3f} on {pseudo['heldout_examples']} "
                   f"{pseudo['train_task']} test examples (trained on {pseudo['train_examples']})"
                   if "heldout_accuracy" in pseudo else "")
        lines += ["## Pseudo-labels", "", f"Classifier: {pseudo['classifier']}{heldout}. Of {pseudo['pooled']} "
                  f"pooled source texts, {pseudo['confident']} were labelled confidently enough and "
                  f"{pseudo['kept']} kept: {', '.join(f'{k} {v}' for k, v in pseudo['labels'].items())}.", ""]
    if results.clusters:
        lines += ["## MetaPT meta-tasks", "", "| cluster | size | labels | e.g. |", "|---|---|---|---|"]
        for c in results.clusters.summary:
            example = c["examples"][0].replace("|", "/") if c["examples"] else ""
            lines.append(f"| {c['cluster']} | {c['size']} | {c['labels']} | {example[:80]} |")
        lines += [""]
    if len(spec.methods) > 1:
        args, ci = results.arg(), results.arg_intervals()
        lines += ["## ARG over plain prompt tuning", "",
                  "| method | ARG (%) | 95% bootstrap CI (tasks × seeds) | upstream steps | upstream min |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {percent(args[m])} | {interval(ci[m])} | {u.steps} | {u.seconds / 60:.1f} |"
                  for m, u in results.upstream.items()]
        lines += [f"| ft | {percent(args['ft'])} | {interval(ci['ft'])} | — | — |"] if "ft" in args else []
        lines += [f"| {m} | diverged | — | — | — |" for m in results.diverged]
        if results.diverged:
            lines += [""] + [f"Left out: {why}." for why in results.diverged.values()] + [
                "", "A method whose meta-training diverged has no initial prompt, so it has no downstream runs; "
                "the other methods ran in full."]
        if left := results.left_out():
            lines += ["", f"Left out of every ARG: {', '.join(left)}. Plain prompt tuning scored 0 there, "
                      "so no relative gain is defined; the absolute scores are below."]
        if below := [t for t, r in results.tasks.items() if r["pt"].mean < 0]:
            lines += ["", f"Plain prompt tuning scored below 0 on {', '.join(below)}: there the papers' "
                      "(method − PT) / PT gives a better method a negative gain; read the absolute scores below."]
        if vs := results.vs_mtl():
            lines += ["", "## Against multi-task learning on the same sources", "",
                      "| method | ARG − ARG(mtl) (points) | paired 95% bootstrap CI |", "|---|---|---|"]
            lines += [f"| {m} | {d['difference']:+.2f} | {interval(d['ci95'])} |"
                      for m, d in vs.items()]
        lines += ["", "## Per target task", ""]
    gains = results.gains()
    lines += ["| task | method | metric | test (mean ± std) | rel. gain | per seed: test @ lr (dev at step 0 → best dev, step) |",
              "|---|---|---|---|---|---|"]
    for task, methods in results.tasks.items():
        for method, r in methods.items():
            gain = percent(gains[method][task], 1, 100, "%") if method in gains else "—"
            seeds = "; ".join(f"{b.seed}: {b.test:.3f} @ {b.lr:g} ({b.curve[0]['dev']:.3f} → {b.best_dev:.3f}, "
                              f"step {b.best_step})" for b in r.best)
            lines.append(f"| {task} | {method} | {r.metric} | {r.mean:.3f} ± {r.std:.3f} | {gain} | {seeds} |")
    return "\n".join(lines) + "\n"


def _figure(width: float = 6, height: float = 3.5):
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(results: Results, out: Path) -> list[Path]:
    """Per-task relative gain bars per method (the MPT paper's Figures 4-13) and upstream losses."""
    files = []
    gains = results.gains()
    if gains:
        tasks = list(results.tasks)
        fig, ax = _figure(max(5, 1.2 * len(tasks) * len(gains) / 2 + 2))
        width = 0.8 / len(gains)
        for i, (method, per_task) in enumerate(gains.items()):
            ax.bar([t + i * width for t in range(len(tasks))],  # no bar where no gain is defined
                   [float("nan") if per_task[t] is None else 100 * per_task[t] for t in tasks], width,
                   label=f"{method} (ARG {percent(results.arg()[method], 1, unit='%')})")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, ha="right")
        ax.set_ylabel("relative gain over PT (%)")
        files.append(_save(fig, ax, out / "relative_gain.png"))
    if results.upstream:
        fig, ax = _figure()
        for method, u in results.upstream.items():
            ax.plot([c["step"] for c in u.curve], [c["loss"] for c in u.curve], label=method)
        ax.set_xlabel("outer step")
        ax.set_ylabel("episode loss (query for MAML/FoMAML)")
        files.append(_save(fig, ax, out / "upstream_loss.png"))
    return files


def write(results: Results, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md"]
    files[0].write_text(strict_json(results.to_dict()))
    files[1].write_text(markdown(results))
    files += plots(results, out)
    if results.clusters and results.clusters.examples:  # the service plots them in its upstream step
        from core.algorithms.metapt import plot_clusters

        c = results.clusters
        files.append(plot_clusters(c.examples, c.ids, out / "clusters.png", method=results.spec.upstream.clustering.plot,
                                   title=f"MetaPT meta-tasks: {results.spec.upstream.clustering.method}"))
    for name, prompt in results.prompts.items():
        parts = name.split("/")
        files.append(save_prompt(prompt, out / "prompts" / (".".join(parts) + ".safetensors"),
                                 backbone=results.spec.backbone, name=name))
    return files


def _label(value) -> str:
    # A list of source tasks reads best as its size (the papers' 12/24/45-task ablation).
    return f"{len(value)} ({', '.join(map(str, value))})" if isinstance(value, list) else str(value)


def sweep_markdown(sweep) -> str:
    table = sweep.table()
    lines = [f"# {sweep.spec.name}: sweep over `{sweep.spec.sweep.field}`", "",
             "ARG (%) of each method over plain prompt tuning, per value.", "",
             "| " + sweep.spec.sweep.field + " | " + " | ".join(table) + " |",
             "|---|" + "---|" * len(table)]
    for i, (value, _) in enumerate(sweep.runs):
        diverged = sweep.runs[i][1].diverged
        lines.append(f"| {_label(value)} | " + " | ".join("diverged" if m in diverged else percent(table[m][i])
                                                         for m in table) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(sweep, path: Path) -> Path:
    values = [v for v, _ in sweep.runs]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else [len(v) if isinstance(v, list) else i for i, v in enumerate(values)]
    fig, ax = _figure()
    for method, args in sweep.table().items():
        ax.plot(xs, [float("nan") if a is None else a for a in args], marker="o", label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    lists = any(isinstance(v, list) for v in values)
    if not numeric and not lists:  # named values (a clustering method, an optimizer): one tick each
        ax.set_xticks(xs, [str(v) for v in values])
    ax.set_xlabel(sweep.spec.sweep.field + (" (size)" if lists else ""))
    ax.set_ylabel("ARG over PT (%)")
    return _save(fig, ax, path)


def write_sweep(sweep, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "sweep.json", out / "sweep.md"]
    files[0].write_text(strict_json(sweep.to_dict()))
    files[1].write_text(sweep_markdown(sweep))
    files.append(sweep_plot(sweep, out / "sweep.png"))
    for i, (_, results) in enumerate(sweep.runs):
        files += write(results, out / f"variant{i}")
    return files
