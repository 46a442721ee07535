"""The data types every reader produces and every algorithm consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

from core.errors import UserError

TASK_TYPES = ("classification", "multiple_choice", "qa", "generation", "regression")
# Classification-like tasks are scored by ranking their option set; the rest generate.
RANKED_TYPES = ("classification", "multiple_choice")

SPLIT_SEEDS = (100, 13, 21, 42, 87)  # CrossFit's few-shot split seeds, in its order


class TaskError(UserError):
    """A task, its files or its name is not usable; the message says what and what is accepted."""


@dataclass(frozen=True)
class Example:
    input: str
    outputs: tuple[str, ...]  # one or more acceptable answers; the first is the reference
    options: tuple[str, ...] | None = None  # per-example choices (multiple choice), else the task's

    @property
    def output(self) -> str:
        return self.outputs[0]


@dataclass(frozen=True)
class TaskInfo:
    """A catalog entry: how a task is scored and, for ranked tasks, what its answers can be."""

    name: str
    type: str
    metric: str
    options: tuple[str, ...] | None = None  # label set of a classification task

    @property
    def ranked(self) -> bool:
        return self.type in RANKED_TYPES


@dataclass
class Split:
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    seed: int
    k: int


@dataclass
class Task:
    info: TaskInfo
    examples: list[Example] = field(default_factory=list)  # the pool k-shot splits are drawn from
    test: list[Example] | None = None  # a given test split; else k-shot holds out 20% (CrossFit)
    splits: dict[int, Split] = field(default_factory=dict)  # ready-made splits (CrossFit TSV dirs)
    notes: list[str] = field(default_factory=list)  # what the reader left out, and why (also warned)

    @property
    def name(self) -> str:
        return self.info.name

    def options_for(self, example: Example) -> tuple[str, ...] | None:
        return example.options or self.info.options
