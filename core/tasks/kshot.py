"""Few-shot splits drawn exactly as CrossFit draws them, and written as CrossFit's TSV files.

CrossFit (Ye et al. 2021, INK-USC/CrossFit, ``tasks/fewshot_gym_dataset.py``) builds every
split of every task the same way, and the papers' numbers depend on it, so this module copies
it step for step rather than "doing something equivalent":

1. The pool is the task's training data as a list, in its original order. A task without a
   test split first gives up its last 20 % as test: ``np.random.seed(42)``,
   ``np.random.shuffle(lines)``, test = ``lines[int(0.8 * n):]`` (e.g. ``tasks/ethos.py``,
   ``tasks/financial_phrasebank.py``, ``tasks/proto_qa.py``), so the test set is the same
   for every split seed.
2. ``np.random.seed(seed)`` then ``np.random.shuffle(pool)``: numpy's legacy global
   RandomState (Mersenne Twister), an in-place Fisher-Yates shuffle of the list.
   ``np.random.RandomState(seed).shuffle`` draws the very same permutation without touching
   numpy's global state, so that is what runs here.
3. Classification (``FewshotGymClassificationDataset``): group the shuffled pool by label
   (the output string), labels in order of first appearance; train = the first k of each
   label, label after label; dev = the next k of each (``[k:2k]``), in the same label order.
   Every other task (``FewshotGymTextToTextDataset``, which in CrossFit includes multiple-choice
   QA such as commonsense_qa and ai2_arc, regression and QA): train = ``pool[:k]``,
   dev = ``pool[k:2k]``.
4. test = the given test split, whole and in its own order; never what the sampling leaves.
5. k is 16 (per label) for classification and 32 otherwise; seeds 100, 13, 21, 42, 87.

A label with fewer than 2k examples: CrossFit just slices, so that label ends up with fewer
than k in train and/or dev and the split is silently unbalanced. The same happens here, so that
the splits stay identical to CrossFit's, but it is reported with a ``KShotWarning`` (or raised
as a TaskError with ``strict=True``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from core.tasks.base import SPLIT_SEEDS, Example, Split, Task, TaskError

__all__ = [
    "KShotWarning",
    "SPLIT_FILE_PATTERN",
    "default_k",
    "hold_out_test",
    "kshot",
    "kshot_all",
    "full_split",
    "split_file_name",
    "tsv_line",
    "write_split",
]

HOLDOUT_SEED = 42  # CrossFit's fixed seed for carving a test set out of a train-only dataset
HOLDOUT_TRAIN_FRACTION = 0.8
SPLIT_NAMES = ("train", "dev", "test")
SPLIT_FILE_PATTERN = "{task}_{k}_{seed}_{split}.tsv"


class KShotWarning(UserWarning):
    """A split came out smaller than asked for because the task has too few examples."""


def default_k(task_type: str) -> int:
    """CrossFit's shot count: 16 per label for classification, 32 for everything else."""
    return 16 if task_type == "classification" else 32


def hold_out_test(examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Split a train-only dataset into (pool, test) the way CrossFit's tasks do: 80/20, seed 42."""
    lines = list(examples)
    np.random.RandomState(HOLDOUT_SEED).shuffle(lines)
    cut = int(HOLDOUT_TRAIN_FRACTION * len(lines))  # float product then int(), as CrossFit
    return lines[:cut], lines[cut:]


def _label(example: Example) -> str:
    # CrossFit groups by line[-1], the output field as it would be written to the TSV file.
    return "\t".join(example.outputs)


def kshot(task: Task, seed: int, k: int | None = None, *, strict: bool = False) -> Split:
    """Draw the k-shot train/dev split of ``task`` for ``seed``, identical to CrossFit's.

    ``k`` defaults to 16 per label for classification and 32 otherwise. With ``strict`` a
    label (or, for non-classification tasks, the pool) holding fewer than 2k examples raises
    a TaskError instead of a KShotWarning.
    """
    name = task.name
    if k is None:
        k = default_k(task.info.type)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TaskError(f"k must be a positive integer, got {k!r}")
    if not task.examples:
        raise TaskError(
            f"task {name!r} has no examples to draw a {k}-shot split from"
            " (a CrossFit directory comes with its splits ready-made in task.splits)"
        )

    if task.test is None:
        pool, test = hold_out_test(task.examples)
    else:
        pool, test = list(task.examples), list(task.test)

    np.random.RandomState(seed).shuffle(pool)

    if task.info.type == "classification":
        by_label: dict[str, list[Example]] = {}
        for example in pool:
            by_label.setdefault(_label(example), []).append(example)
        train = [ex for group in by_label.values() for ex in group[:k]]
        dev = [ex for group in by_label.values() for ex in group[k : 2 * k]]
        counts = {label: len(group) for label, group in by_label.items()}
        for option in task.info.options or ():
            counts.setdefault(option, 0)
        short = {label: n for label, n in counts.items() if n < 2 * k}
        if short:
            listed = ", ".join(f"{label!r}: {n}" for label, n in short.items())
            _short(
                f"task {name!r}, seed {seed}: {k}-shot classification needs {2 * k} examples per"
                f" label ({k} train + {k} dev) but these labels have fewer in the pool of"
                f" {len(pool)}: {listed}. As in CrossFit, their train/dev sets are just smaller.",
                strict,
            )
    else:
        train, dev = pool[:k], pool[k : 2 * k]
        if len(pool) < 2 * k:
            _short(
                f"task {name!r}, seed {seed}: a {k}-shot split needs {2 * k} examples"
                f" ({k} train + {k} dev) but the pool has {len(pool)}: train gets {len(train)},"
                f" dev {len(dev)}. As in CrossFit, the sets are just smaller.",
                strict,
            )

    if not train or not dev or not test:
        source = "the given test split" if task.test is not None else "its 20% hold-out"
        raise TaskError(
            f"task {name!r} is too small for a {k}-shot split (seed {seed}):"
            f" {len(task.examples)} examples give train {len(train)}, dev {len(dev)},"
            f" test {len(test)} ({source}); every one of the three must be non-empty"
        )
    return Split(train=train, dev=dev, test=test, seed=seed, k=k)


def full_split(task: Task, seed: int) -> Split:
    """The papers' "all" setting: every pool example trains except a k-shot dev set drawn as
    ``kshot`` draws it (same shuffle, same per-label order), so dev stays few-shot and fixed."""
    split = kshot(task, seed)
    held = {id(e) for e in split.dev}
    pool = list(task.examples) if task.test is not None else hold_out_test(task.examples)[0]
    train = [e for e in pool if id(e) not in held]
    if not train:
        raise TaskError(f"task {task.name!r} is too small for shots='all': its dev set takes all "
                        f"{len(pool)} pool examples and leaves none to train on")
    return Split(train=train, dev=split.dev, test=split.test, seed=seed, k=len(train))


def kshot_all(
    task: Task, seeds: tuple[int, ...] = SPLIT_SEEDS, k: int | None = None, *, strict: bool = False
) -> dict[int, Split]:
    """One split per seed (CrossFit's five by default), keyed by seed like ``Task.splits``."""
    return {seed: kshot(task, seed, k, strict=strict) for seed in seeds}


def _short(message: str, strict: bool) -> None:
    if strict:
        raise TaskError(message)
    warnings.warn(message, KShotWarning, stacklevel=3)


def _field(text: str) -> str:
    # CrossFit writes fields unescaped ("{}\t{}\n"), so a tab or line break inside a field
    # would corrupt the file; its tasks flatten them to spaces first (tasks/utils.py clean()).
    for sep in ("\r\n", "\r", "\n", "\t"):
        text = text.replace(sep, " ")
    return text.strip()


def tsv_line(example: Example) -> str:
    """``input\\toutput[\\toutput...]\\n``: several acceptable answers are tab-separated, as in
    CrossFit's QA tasks (``"\\t".join(answers)``, e.g. tasks/squad.py, tasks/kilt_nq.py)."""
    return "\t".join([_field(example.input), *(_field(o) for o in example.outputs)]) + "\n"


def split_file_name(task_name: str, k: int, seed: int, split: str) -> str:
    return SPLIT_FILE_PATTERN.format(task=task_name, k=k, seed=seed, split=split)


def write_split(split: Split, task_name: str, directory: str | os.PathLike) -> list[Path]:
    """Write ``{task}_{k}_{seed}_{train,dev,test}.tsv`` into ``directory`` (created if needed).

    Tabs and line breaks inside a field become spaces and fields are stripped, the only change
    the one-line format forces; ``read_crossfit_dir`` reads the files back.
    """
    if not task_name or any(c in task_name for c in "/\\\t\n") or task_name != task_name.strip():
        raise TaskError(f"task name {task_name!r} cannot be used in a file name")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in SPLIT_NAMES:
        examples = getattr(split, part)
        lines = []
        for i, example in enumerate(examples):
            line = tsv_line(example)
            fields = line.rstrip("\n").split("\t")
            if not fields[0] or not all(fields[1:]) or len(fields) < 2:
                raise TaskError(
                    f"{part} example {i} of task {task_name!r} has an empty input or output"
                    f" and cannot be written as a CrossFit line: {example!r}"
                )
            lines.append(line)
        path = out / split_file_name(task_name, split.k, split.seed, part)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.writelines(lines)
        paths.append(path)
    return paths
