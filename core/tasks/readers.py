"""Readers: turn task files into a ``Task``. One function per format, all in ``READERS``.

* ``crossfit``: a directory of CrossFit split files ``{task}_{k}_{seed}_{train,dev,test}.tsv``
  (ready-made splits, ``Task.splits`` keyed by seed).
* ``bigbench``: a BIG-bench JSON task (``task.json``), generative or multiple choice.
* ``table``: a CSV/TSV or JSONL file with a column mapping.

Every user-caused problem raises ``TaskError`` naming the file (and line or example) and what
was expected, never a bare KeyError.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from core.tasks.base import RANKED_TYPES, SPLIT_SEEDS, Example, Split, Task, TaskError, TaskInfo
from core.tasks.kshot import SPLIT_FILE_PATTERN, SPLIT_NAMES

__all__ = [
    "READERS",
    "ReaderWarning",
    "SPLIT_FILE_RE",
    "bigbench_metric",
    "parse_crossfit_line",
    "read_bigbench",
    "read_crossfit_dir",
    "read_crossfit_file",
    "read_table",
    "render_choices",
]

PathLike = str | os.PathLike


class ReaderWarning(UserWarning):
    """A reader left out examples it cannot use; the message names the file and examples."""


# ---------------------------------------------------------------------------------------------
# CrossFit TSV
# ---------------------------------------------------------------------------------------------

# The task name may hold underscores ("financial_phrasebank_16_100_train.tsv"); CrossFit itself
# recovers it as "_".join(name.split("_")[:-3]) (dataloader/fewshot_gym_singletask.py).
SPLIT_FILE_RE = re.compile(r"^(?P<task>.+)_(?P<k>\d+)_(?P<seed>\d+)_(?P<split>train|dev|test)\.tsv$")


def parse_crossfit_line(line: str, where: str) -> Example | None:
    """One CrossFit line ``input\\toutput[\\toutput...]``; None for a blank line.

    Several acceptable answers are separated by tabs: CrossFit's QA tasks write
    ``"\\t".join(answers)`` and its loader reads ``d[0], d[1:]``. `` [SEP] `` is only ever
    CrossFit's separator between the *fields of an input* (e.g. "premise [SEP] hypothesis"),
    so it is kept as text, in inputs and outputs alike.
    """
    text = line.rstrip("\r\n")
    if not text.strip():
        return None
    fields = text.split("\t")
    source = fields[0].strip()
    outputs = tuple(o.strip() for o in fields[1:] if o.strip())
    if len(fields) < 2:
        raise TaskError(f"{where}: no tab in the line; expected 'input<TAB>output[<TAB>output...]'")
    if not source:
        raise TaskError(f"{where}: empty input; expected 'input<TAB>output[<TAB>output...]'")
    if not outputs:
        raise TaskError(f"{where}: no output after the tab; expected 'input<TAB>output[<TAB>output...]'")
    return Example(input=source, outputs=outputs)


@contextlib.contextmanager
def _decoded(path: PathLike, encoding: str = "utf-8"):
    """Inside: a reader's pass over `path`, whose bytes that do not decode are the file's fault."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise TaskError(f"{path} is not {encoding} text: byte {e.object[e.start]:#04x} does not decode "
                        f"({e.reason}); save it as {encoding}") from None


def read_crossfit_file(path: PathLike) -> list[Example]:
    """All examples of one CrossFit TSV file; an empty file is an error."""
    path = Path(path)
    examples = []
    with _decoded(path), open(path, encoding="utf-8", newline="\n") as f:
        # Only "\n" ends a line: a stray "\r" inside a field must not split it in two.
        for number, line in enumerate(f, start=1):
            example = parse_crossfit_line(line, f"{path}, line {number}")
            if example is not None:
                examples.append(example)
    if not examples:
        raise TaskError(
            f"{path} is empty; a CrossFit split file holds one 'input<TAB>output[<TAB>output...]' per line"
        )
    return examples


def read_crossfit_dir(path: PathLike, info: TaskInfo, k: int | None = None) -> Task:
    """Read the ready-made splits of ``info.name`` from a CrossFit data directory.

    The directory holds ``{task}_{k}_{seed}_{train,dev,test}.tsv`` (CrossFit's ``data/{task}/``);
    other files (CrossFit's tokenised ``*.json`` caches, other tasks) are ignored. Every seed
    needs all three files. If the directory holds splits for several k, pass ``k``.
    """
    directory = Path(path)
    pattern = SPLIT_FILE_PATTERN.format(task=info.name, k="{k}", seed="{seed}", split="{train,dev,test}")
    if not directory.is_dir():
        raise TaskError(f"{directory} is not a directory; expected one holding files named {pattern}")

    found: dict[tuple[int, int], dict[str, Path]] = {}
    other_tasks = set()
    for file in sorted(directory.iterdir()):
        m = SPLIT_FILE_RE.match(file.name)
        if not m or not file.is_file():
            continue
        if m["task"] != info.name:
            other_tasks.add(m["task"])
            continue
        found.setdefault((int(m["k"]), int(m["seed"])), {})[m["split"]] = file
    if k is not None:
        found = {key: files for key, files in found.items() if key[0] == k}
    if not found:
        also = f" (it has splits of {', '.join(sorted(other_tasks))})" if other_tasks else ""
        shots = f" with k={k}" if k is not None else ""
        raise TaskError(f"{directory} has no split files{shots} for task {info.name!r}{also}; expected {pattern}")
    shots_found = sorted({key[0] for key in found})
    if len(shots_found) > 1:
        raise TaskError(
            f"{directory} holds {info.name!r} splits for several k {shots_found}; pass k= one of them"
        )

    # CrossFit's seed order first (100, 13, 21, 42, 87), any other seeds after them.
    order = lambda seed: (SPLIT_SEEDS.index(seed), 0) if seed in SPLIT_SEEDS else (len(SPLIT_SEEDS), seed)  # noqa: E731
    splits = {}
    for (shots, seed), files in sorted(found.items(), key=lambda item: order(item[0][1])):
        missing = [s for s in SPLIT_NAMES if s not in files]
        if missing:
            names = ", ".join(SPLIT_FILE_PATTERN.format(task=info.name, k=shots, seed=seed, split=s) for s in missing)
            raise TaskError(f"{directory}: seed {seed} lacks {names}")
        parts = {s: read_crossfit_file(files[s]) for s in SPLIT_NAMES}
        splits[seed] = Split(**parts, seed=seed, k=shots)
    return Task(info=info, splits=splits)


# ---------------------------------------------------------------------------------------------
# BIG-bench JSON
# ---------------------------------------------------------------------------------------------

# bigbench/api/json_task.py (bigbench 1.0.0): which preferred_score values need target_scores.
BIGBENCH_MULTIPLE_CHOICE_METRICS = (
    "multiple_choice_grade",
    "calibration_multiple_choice_brier_score",
    "expected_calibration_error",
    "weighted_log_probabilities",
    "weighted_probabilities",
    "macro_f1",
)


def bigbench_metric(preferred_score: str | None, multiple_choice: bool) -> str:
    """The CrossFit metric closest to a BIG-bench task's ``preferred_score``.

    Multiple choice is ranked, so accuracy (multiple_choice_grade is accuracy), or
    Classification-F1 where the author asked for macro F1. For generation the task author's
    choice decides: exact/numeric string match -> EM (what 595 of the 705 generative task files
    in bigbench 1.0.0 prefer); BLEU/ROUGE/BLEURT -> Rouge-L (CrossFit's metric for free text); token F1
    -> QA-F1. A task that names nothing gets EM, BIG-bench's own most common choice.
    """
    score = (preferred_score or "").lower()
    if multiple_choice:
        return "Classification-F1" if score == "macro_f1" else "ACC"
    if score.startswith(("rouge", "bleu")) or score in ("bleurt", "log_likelihood"):
        return "Rouge-L"
    if score == "sequence_f1":
        return "QA-F1"
    return "EM"


def _choice_label(i: int) -> str:
    label = ""
    i += 1
    while i:  # A..Z, then AA, AB, ... (BIG-bench has tasks with more than 26 options)
        i, r = divmod(i - 1, 26)
        label = chr(ord("A") + r) + label
    return label


def render_choices(text: str, options: Sequence[str]) -> str:
    """CrossFit's multiple-choice input: ``question (A) opt1 (B) opt2 ...``.

    CrossFit builds ``choices_string += " (" + label + ") " + text`` and appends it to the
    question (tasks/commonsense_qa.py, tasks/ai2_arc.py, openbookqa, ...).
    """
    rendered = text + "".join(f" ({_choice_label(i)}) {option}" for i, option in enumerate(options))
    return rendered.strip()  # an empty question (BIG-bench has option-only tasks) adds no space


def _task_json_path(path: PathLike) -> Path:
    p = Path(path)
    return p / "task.json" if p.is_dir() else p


def _bigbench_name(file: Path) -> str:
    if file.name != "task.json":
        return file.stem
    # A subtask lives in <task>/<subtask>/task.json next to its container's <task>/task.json;
    # name it "<task>-<subtask>", CrossFit's way of naming subsets ("glue-sst2", "ethos-race").
    parent = file.parent
    if (parent.parent / "task.json").is_file():
        return f"{parent.parent.name}-{parent.name}"
    return parent.name


def read_bigbench(
    path: PathLike, info: TaskInfo | None = None, *, append_choices: bool | None = None
) -> Task:
    """Read a BIG-bench JSON task (``task.json`` or the directory holding it).

    Each example has ``input`` and ``target`` (a string or a list of acceptable strings) and/or
    ``target_scores`` (option -> score). The task is multiple choice when its ``preferred_score``
    is a multiple-choice metric, or when its examples only have ``target_scores``; otherwise it
    is generation. ``info`` (if given) decides instead, by ``info.type``.

    Multiple choice: ``outputs`` = the option(s) with the highest score (in option order, the
    first is the reference), ``options`` = all option texts in the file's order. When choices
    are shown (the task's ``append_choices_to_input``, default true in BIG-bench, unless
    ``append_choices`` overrides it) they are rendered into the input CrossFit's way,
    ``input (A) opt1 (B) opt2 ...``.

    Without ``info`` the TaskInfo is built from the file: name from the directory
    (``<task>`` or ``<task>-<subtask>``), type and metric as above. The task's ``task_prefix``
    (its instruction, often needed to make sense of the input) starts every input.
    ``example_input_prefix``/``example_output_prefix``/``choice_prefix`` only format BIG-bench's
    own few-shot prompts and are not used. Exact duplicate examples are dropped, as BIG-bench's
    loader does.
    """
    file = _task_json_path(path)
    try:
        with _decoded(file), open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TaskError(f"{file} does not exist; expected a BIG-bench task.json") from None
    except json.JSONDecodeError as e:
        raise TaskError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise TaskError(f"{file}: expected a JSON object with an 'examples' list")

    raw = data.get("examples")
    if raw is None:
        subtasks = sorted(str(p.parent) for p in file.parent.glob("*/task.json"))
        hint = f"; read one of its subtasks instead: {', '.join(subtasks)}" if subtasks else ""
        raise TaskError(f"{file} has no 'examples' list{hint}")
    if not isinstance(raw, list) or not raw:
        raise TaskError(f"{file}: 'examples' is empty; a task needs at least one example")

    examples_json, seen = [], set()
    for i, ex in enumerate(raw):
        if not isinstance(ex, dict) or "input" not in ex:
            raise TaskError(f"{file}, example {i}: expected an object with 'input' and 'target' or 'target_scores'")
        key = json.dumps(ex)
        if key not in seen:
            seen.add(key)
            examples_json.append((i, ex))

    preferred = data.get("preferred_score")
    if preferred is not None and not isinstance(preferred, str):
        raise TaskError(f"{file}: 'preferred_score' must be the name of a BIG-bench metric (text, e.g. "
                        f"\"exact_str_match\" or \"multiple_choice_grade\"), got {type(preferred).__name__}")
    if info is not None:
        multiple_choice = info.type in RANKED_TYPES
    elif preferred in BIGBENCH_MULTIPLE_CHOICE_METRICS:
        multiple_choice = True
    else:
        multiple_choice = not all("target" in ex for _, ex in examples_json)
    needed = "target_scores" if multiple_choice else "target"
    for i, ex in examples_json:
        if needed not in ex:
            kind = "multiple choice" if multiple_choice else "generation"
            raise TaskError(f"{file}, example {i}: no '{needed}', which a {kind} task needs in every example")

    show = append_choices if append_choices is not None else bool(data.get("append_choices_to_input", True))
    # The task's instruction goes in front of every input: the files are read on their own later.
    prefix = str(data.get("task_prefix") or "").strip()
    examples, skipped = [], []
    for i, ex in examples_json:
        # An empty input is valid BIG-bench (cause_and_effect only ranks its options).
        text = " ".join(filter(None, [prefix, _text(ex["input"], file, i, "input").strip()]))
        if multiple_choice:
            options, outputs = _bigbench_choices(ex["target_scores"], file, i)
            if not outputs:
                skipped.append(i)
                continue
            source = render_choices(text, options) if show else text
            examples.append(Example(input=source, outputs=outputs, options=options))
        else:
            outputs = _bigbench_targets(ex["target"], file, i)
            if not outputs:
                skipped.append(i)
                continue
            examples.append(Example(input=text, outputs=outputs))
    notes = [f"{file}: skipped {len(skipped)} example(s) whose answer is empty text, which cannot be trained "
             f"on or scored: {skipped[:20]}"] if skipped else []
    for note in notes:
        warnings.warn(note, ReaderWarning, stacklevel=2)
    if not examples:
        raise TaskError(f"{file}: no example has a non-empty answer")

    if info is None:
        info = TaskInfo(
            name=_bigbench_name(file),
            type="multiple_choice" if multiple_choice else "generation",
            metric=bigbench_metric(preferred, multiple_choice),
        )
    return Task(info=info, examples=examples, notes=notes)


def _text(value: Any, file: Path, i: int, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TaskError(f"{file}, example {i}: '{field}' must be text, got {type(value).__name__}")
    return str(value)


def _bigbench_targets(target: Any, file: Path, i: int) -> tuple[str, ...]:
    """The non-empty acceptable answers; () when there is none (the caller skips the example)."""
    values = target if isinstance(target, list) else [target]
    texts = (_text(v, file, i, "target").strip() for v in values)
    return tuple(dict.fromkeys(t for t in texts if t))


def _bigbench_choices(scores: Any, file: Path, i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(scores, dict) or not scores:
        raise TaskError(f"{file}, example {i}: 'target_scores' must be a non-empty object option -> score")
    for option, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise TaskError(f"{file}, example {i}: score of option {option!r} must be a number, got {score!r}")
    best, worst = max(scores.values()), min(scores.values())
    # BIG-bench's own rule (json_task.default_format_fn): a correct choice must score higher.
    if (len(scores) == 1 and best == 0) or (len(scores) > 1 and best <= worst):
        raise TaskError(f"{file}, example {i}: no option scores higher than the others in 'target_scores'")
    # An empty option (a few BIG-bench files have "" as a distractor) would win any
    # log-likelihood ranking for free, so it is left out; outputs () if it was the answer.
    kept = {option: score for option, score in scores.items() if option.strip()}
    options = tuple(kept)
    outputs = tuple(option for option, score in kept.items() if score == best)
    return options, outputs


# ---------------------------------------------------------------------------------------------
# CSV / TSV / JSONL
# ---------------------------------------------------------------------------------------------

TABLE_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def read_table(
    path: PathLike,
    info: TaskInfo,
    input_col: str | Sequence[str],
    output_col: str,
    *,
    label_map: Mapping[Any, str] | None = None,
    test_path: PathLike | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8-sig",
) -> Task:
    """Read a CSV/TSV (header row) or JSONL file, mapping columns onto input and output.

    ``input_col`` is one column, or several joined CrossFit's way:
    ``"col1: v1 [SEP] col2: v2"``. In JSONL the output column may hold a list of acceptable
    answers. ``label_map`` maps raw label values to words (``{0: "negative", 1: "positive"}``);
    keys match by their text, so the CSV cell "0" finds the key 0, and an unmapped value is an
    error. ``test_path`` (same layout) becomes the task's given test split; without it k-shot
    holds out a test set CrossFit's way. A classification task without ``info.options`` gets
    the label words as its options (``label_map`` order, else order of first appearance).
    ``encoding`` defaults to UTF-8 with or without a byte-order mark; some shipped corpora need
    ``"latin-1"``. ``delimiter`` defaults to "," for .csv and a tab for .tsv.
    """
    columns = [input_col] if isinstance(input_col, str) else list(input_col)
    if not columns:
        raise TaskError("input_col names no column")
    mapping = None if label_map is None else _text_keys(label_map)
    read = lambda p: _read_rows(Path(p), columns, output_col, mapping, delimiter, encoding)  # noqa: E731
    examples = read(path)
    test = read(test_path) if test_path is not None else None

    if info.type == "classification":
        seen = [o for ex in [*examples, *(test or [])] for o in ex.outputs]
        if info.options is None:
            labels = list(mapping.values()) if mapping is not None else seen
            info = dataclasses.replace(info, options=tuple(dict.fromkeys(labels)))
        else:
            unknown = sorted(set(seen) - set(info.options))
            if unknown:
                raise TaskError(
                    f"{path}: labels {unknown} are not among the options of task {info.name!r}:"
                    f" {list(info.options)}"
                )
    return Task(info=info, examples=examples, test=test)


def _read_rows(
    path: Path,
    columns: list[str],
    output_col: str,
    mapping: dict[str, str] | None,
    delimiter: str | None,
    encoding: str,
) -> list[Example]:
    kind = TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TaskError(f"{path}: unknown table format {path.suffix!r}; accepted: {sorted(TABLE_SUFFIXES)}")
    if not path.is_file():
        raise TaskError(f"{path} does not exist")
    needed = [*columns, output_col]
    with _decoded(path, encoding):
        rows = list(_csv_rows(path, needed, delimiter, encoding) if kind == "csv" else _jsonl_rows(path, encoding))
    examples = []
    for where, row in rows:
        missing = [c for c in needed if c not in row]
        if missing:
            raise TaskError(
                f"{where}: no column {', '.join(map(repr, missing))}; columns present: {list(row)}"
            )
        if len(columns) == 1:
            source = _cell(row[columns[0]], where, columns[0])
        else:
            source = " [SEP] ".join(f"{c}: {_cell(row[c], where, c)}" for c in columns)
        value = row[output_col]
        values = value if isinstance(value, list) and kind == "jsonl" else [value]
        if not values:
            raise TaskError(f"{where}: column {output_col!r} holds an empty list")
        outputs = tuple(_label(v, mapping, where, output_col) for v in values)
        examples.append(Example(input=source, outputs=outputs))
    if not examples:
        raise TaskError(f"{path} has no rows; expected a header and one example per row" if kind == "csv"
                        else f"{path} has no rows; expected one JSON object per line")
    return examples


def _csv_rows(path: Path, needed: list[str], delimiter: str | None, encoding: str):
    sep = delimiter or ("\t" if path.suffix.lower() == ".tsv" else ",")
    with open(path, encoding=encoding, newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        if reader.fieldnames is None:
            return
        missing = [c for c in needed if c not in reader.fieldnames]
        if missing:
            raise TaskError(
                f"{path}, header: no column {', '.join(map(repr, missing))}; columns present: {reader.fieldnames}"
            )
        for row in reader:
            # DictReader numbers physical lines; a row past the header is line_num.
            where = f"{path}, line {reader.line_num}"
            if None in row:
                raise TaskError(f"{where}: more cells than the {len(reader.fieldnames)} header columns")
            if None in row.values():
                raise TaskError(f"{where}: fewer cells than the {len(reader.fieldnames)} header columns")
            yield where, row


def _jsonl_rows(path: Path, encoding: str):
    with open(path, encoding=encoding) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _cell(value: Any, where: str, column: str) -> str:
    if value is None or isinstance(value, (dict, list)):
        raise TaskError(f"{where}: column {column!r} must hold text, got {json.dumps(value)}")
    text = _as_text(value)
    if not text.strip():
        raise TaskError(f"{where}: column {column!r} is empty")
    return text.strip()


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # 0 -> "0", true -> "true"


def _text_keys(label_map: Mapping[Any, str]) -> dict[str, str]:
    # A CSV cell is always text and a JSONL value may be typed, so both sides are compared as
    # text: the key 0 matches the cell "0" and the JSON 0; True matches "True" and true.
    mapping = {}
    for key, word in label_map.items():
        for text in dict.fromkeys((str(key), _as_text(key))):
            mapping.setdefault(text.strip(), str(word))
    return mapping


def _label(value: Any, mapping: dict[str, str] | None, where: str, column: str) -> str:
    text = _cell(value, where, column)
    if mapping is None:
        return text
    if text not in mapping:
        raise TaskError(
            f"{where}: value {text!r} of column {column!r} is not in label_map; mapped values: {list(mapping)}"
        )
    return mapping[text]


READERS: dict[str, Callable[..., Task]] = {
    "crossfit": read_crossfit_dir,
    "bigbench": read_bigbench,
    "table": read_table,
}
