"""Tasks: the catalog, readers, k-shot splits and packs, and one way to resolve a task reference."""
from __future__ import annotations

from pathlib import Path

from core.settings import settings
from core.tasks.base import SPLIT_SEEDS, Example, Split, Task, TaskError, TaskInfo
from core.tasks import catalog, packs
from core.tasks.kshot import default_k, full_split, kshot
from core.tasks.readers import read_bigbench, read_crossfit_dir, read_table

__all__ = ["Example", "Split", "Task", "TaskError", "TaskInfo", "load_task", "get_split", "SPLIT_SEEDS"]


def _info(ref) -> TaskInfo:
    """The catalog entry, overridden by what the reference states; required for unknown names."""
    known = catalog.catalog().get(ref.name)
    kind = ref.type or (known.type if known else None)
    if kind is None:
        raise TaskError(f"task {ref.name!r} is not in the catalog, so its reference must give 'type' "
                        "(classification, multiple_choice, qa, generation or regression)")
    metric = ref.metric or (known.metric if known else None) or ("ACC" if kind in ("classification", "multiple_choice") else "EM")
    options = tuple(ref.options) if ref.options else (known.options if known else None)
    return catalog.check(TaskInfo(ref.name, kind, metric, options))


Shots = int | str | None  # examples per label (per task for non-classification), "all", or None: CrossFit's


def load_task(ref, shots: Shots = None) -> Task:
    """Resolve a spec's TaskRef: files at `path`, a pack task, or a catalog task found under
    $PRIMER_CROSSFIT_DIR/<name>/ (CrossFit's data layout). A pack task comes as its built
    16-shot files, or as its whole pool when other `shots` are asked for."""
    if ref.path:
        path = Path(ref.path).expanduser()
        if path.is_dir() and (path / "task.json").is_file() or path.name == "task.json":
            return read_bigbench(path, _info(ref) if (ref.type or ref.name in catalog.catalog()) else None)
        if path.is_dir():
            return read_crossfit_dir(path, _info(ref))
        if path.suffix in (".csv", ".tsv", ".jsonl", ".ndjson"):
            if not (ref.input_column and ref.output_column):
                raise TaskError(f"task {ref.name!r}: a table file needs 'input_column' and 'output_column'")
            return read_table(path, _info(ref), ref.input_column, ref.output_column)
        raise TaskError(f"task {ref.name!r}: {path} is neither a CrossFit directory, a BIG-bench "
                        "task.json nor a .csv/.tsv/.jsonl file")
    if ref.name in packs.PACKS:
        if shots is None or shots == default_k(packs.PACKS[ref.name].info.type):
            return packs.load(ref.name)
        return Task(packs.PACKS[ref.name].info, packs.examples(ref.name), packs.given_test(ref.name))
    crossfit = settings().crossfit_dir
    if crossfit and (crossfit / ref.name).is_dir():
        return read_crossfit_dir(crossfit / ref.name, _info(ref))
    if ref.name in catalog.catalog():
        raise TaskError(f"task {ref.name!r} is in the catalog but its data was not found: set "
                        f"PRIMER_CROSSFIT_DIR to CrossFit's data directory (holding {ref.name}/) or give "
                        f"'path'. Pack tasks that build offline: {', '.join(sorted(packs.PACKS))}")
    catalog.task_info(ref.name)  # raises the catalog's unknown-name error with close matches
    raise AssertionError("unreachable")


def get_split(task: Task, seed: int, shots: Shots = None) -> Split:
    """The ready-made split for `seed` if the task has one (and it has the shots asked for),
    else CrossFit's k-shot draw with k = `shots`, or every pool example but a k-shot dev set
    for "all"."""
    if task.splits and shots is not None and shots != next(iter(task.splits.values())).k:
        if not task.examples:
            raise TaskError(f"task {task.name!r} comes as ready-made "
                            f"{next(iter(task.splits.values())).k}-shot files, so shots={shots!r} cannot "
                            "be drawn: give its full data (a pack task, or a .csv/.jsonl file)")
        task = Task(task.info, task.examples, task.test)
    if shots == "all":
        return full_split(task, seed)
    if task.splits:
        if seed not in task.splits:
            raise TaskError(f"task {task.name!r} has splits for seeds {sorted(task.splits)}, not {seed}")
        return task.splits[seed]
    return kshot(task, seed, shots)
