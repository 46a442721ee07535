"""The job spec shared by the CLI, the API and the worker (pydantic: one place validates)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.names import ALGORITHM_NAMES as ALGORITHMS
from core.names import INIT_NAMES as INITS
from core.names import MAX_PROMPT_TOKENS, OPTIMIZERS
from core.tasks import catalog
from core.tasks.base import SPLIT_SEEDS, TASK_TYPES


def _as_refs(v, side: str = "train"):
    """`[sms_spam, {name: x, path: ...}]`: a bare name is short for `{name: ...}`, and
    `{partition: cls12}` for an MPT partition's source (train) or target (test) tasks."""
    if isinstance(v, dict) and set(v) == {"partition"}:
        found = catalog.partition(str(v["partition"]))
        v = list(found.train if side == "train" else found.test)
    return [{"name": t} if isinstance(t, str) else t for t in v] if isinstance(v, list) else v


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class PromptSpec(Strict):
    length: int = Field(20, ge=1, le=MAX_PROMPT_TOKENS)
    init: str = "vocab"
    text: str | None = None  # for init: text
    path: str | None = None  # for init: file
    seed: int = 0

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v not in INITS:
            raise ValueError(f"unknown prompt init {v!r}; accepted: {', '.join(INITS)}")
        return v


class TaskRef(Strict):
    """A task by name (a pack task, or a catalog task under PRIMER_CROSSFIT_DIR), or by files."""

    name: str = Field(min_length=1)
    path: str | None = None  # a CrossFit directory, a BIG-bench task.json, or a .csv/.jsonl file
    type: Literal[TASK_TYPES] | None = None  # type: ignore[valid-type]
    metric: str | None = None
    options: list[str] | None = None
    input_column: str | None = None
    output_column: str | None = None


def _shots(v):
    if v is None or v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return v
    raise ValueError(f"shots must be a positive number of examples per label or 'all', got {v!r}")


# Examples per label (per task if not classification); None: CrossFit's 16 (32 if not cls).
Shots = Annotated[int | Literal["all"] | None, BeforeValidator(_shots)]


class DownstreamSpec(Strict):
    shots: Shots = None  # target training examples per label; "all": all but a few-shot dev set
    lrs: list[float] = Field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: list(SPLIT_SEEDS), min_length=1)
    batch_size: int = Field(8, ge=1)
    max_steps: int = Field(1000, ge=1)
    eval_every: int = Field(50, ge=1)
    patience: int | None = Field(None, ge=1)
    optimizer: Literal[OPTIMIZERS] = "adafactor"  # type: ignore[valid-type]
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(None, gt=0)  # gradient-norm clip (Adafactor clips its update anyway)
    eval_batch_size: int = Field(32, ge=1)
    # A cap for CPU runs: the first N test examples (test files are in shuffled order).
    max_test_examples: int | None = Field(None, ge=1)
    # The fine-tuning baseline: all backbone weights, no prompt, same protocol (CrossFit's lrs).
    finetune: bool = False
    ft_lrs: list[float] = Field(default_factory=lambda: [1e-5, 2e-5, 5e-5], min_length=1)
    ft_optimizer: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]

    @field_validator("lrs", "ft_lrs")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if any(lr <= 0 for lr in v):
            raise ValueError(f"learning rates must be positive, got {v}")
        return v


class MethodOptions(Strict):
    """Per-method overrides of the upstream settings (e.g. Reptile's inner steps)."""

    inner_batch_size: int | None = Field(None, ge=1)
    inner_steps: int | None = Field(None, ge=1)
    meta_batch: int | None = Field(None, ge=1)
    inner_lr: float | None = Field(None, gt=0)
    outer_lr: float | None = Field(None, gt=0)
    steps: int | None = Field(None, ge=1)


class SourceSelection(Strict):
    """Pick the k candidate source tasks most similar to the targets (MPT appendix A.7): each
    task gets a short prompt tuned on its own few-shot train split; similarity is the overlap
    of the prompts' subspaces."""

    select: Literal["top_k_similar"]
    k: int = Field(ge=1)
    candidates: list[TaskRef] = Field(min_length=1)
    prompt_length: int = Field(5, ge=1, le=MAX_PROMPT_TOKENS)
    steps: int = Field(50, ge=1)
    lr: float = Field(0.01, gt=0)  # AdamW

    @field_validator("candidates", mode="before")
    @classmethod
    def _candidate_names(cls, v):
        return _as_refs(v)

    @model_validator(mode="after")
    def _enough(self) -> "SourceSelection":
        if self.k > len(self.candidates):
            raise ValueError(f"k = {self.k} but only {len(self.candidates)} candidate tasks are given")
        return self


class PseudoLabelSpec(Strict):
    """Label the pooled source text with a classifier first (MetaPT's pseudo-labelling), either
    `train: TASK` (logistic regression on all-MiniLM-L6-v2 embeddings of that labelled task,
    as MetaPT section 4.1) or `prompt: FILE` + `options` (a primer prompt on the job's backbone
    ranking the options). Only predictions at least `min_confidence` sure are kept; `balance`
    keeps as many of each label as the rarest has. `template` ("...{text}...") restates each
    pooled text as the classifier's task; a pack source's own template is taken off first."""

    train: TaskRef | None = None
    prompt: str | None = Field(None, min_length=1)
    options: list[str] | None = Field(None, min_length=2)
    min_confidence: float = Field(0.0, ge=0, lt=1)
    balance: bool = False
    template: str | None = None  # default: the train task's pack template, else the text as it is

    @field_validator("train", mode="before")
    @classmethod
    def _name(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str | None) -> str | None:
        if v is not None and v.count("{text}") != 1:
            raise ValueError(f"the template must hold {{text}} exactly once, got {v!r}")
        return v

    @model_validator(mode="after")
    def _one_classifier(self) -> "PseudoLabelSpec":
        if (self.train is None) == (self.prompt is None):
            raise ValueError("name exactly one classifier: train (a labelled task for logistic regression on "
                             "sentence embeddings) or prompt (a primer prompt file, with options)")
        if self.prompt is not None and not self.options:
            raise ValueError("a prompt classifier needs the options it ranks (at least 2)")
        if self.prompt is not None and self.min_confidence:
            raise ValueError("min_confidence needs the train classifier's probabilities; a prompt classifier "
                             "gives none")
        if self.train is not None and self.options:
            raise ValueError("options come from the train task's labels; drop options")
        return self


class ClusteringSpec(Strict):
    """MetaPT: how the pooled source data (task labels dropped) is cut into meta-tasks."""

    method: Literal["kmeans", "lda", "random", "label"] = "kmeans"  # kmeans: MiniLM sentence embeddings
    k: int | None = Field(10, ge=2)  # number of clusters; label grouping takes one per label
    dev_fraction: float = Field(0.5, gt=0, lt=1)  # of each cluster, for the query side
    plot: Literal["pca", "tsne"] = "pca"
    pool_size: int | None = Field(None, ge=2)  # at most this many pooled source examples (seeded draw)
    pseudo_label: PseudoLabelSpec | None = None


class UpstreamSpec(Strict):
    """Meta-learn (or multi-task learn) prompt initializations on source tasks."""

    sources: list[TaskRef] | SourceSelection  # tasks, or {select: top_k_similar, k, candidates}
    methods: list[str] = Field(default_factory=lambda: ["maml"], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: list(SPLIT_SEEDS), min_length=1)  # source splits
    shots: Shots = None  # source examples per label, as downstream.shots
    steps: int = Field(5000, ge=1)  # outer steps
    inner_lr: float = Field(3e-5, gt=0)
    outer_lr: float = Field(0.5, gt=0)
    optimizer: Literal[OPTIMIZERS] = "adafactor"  # type: ignore[valid-type]
    weight_decay: float = Field(1e-5, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    # None: each method's paper default (MAML 2/1/2, FoMAML 4/1/2, Reptile 4/10/2, MTL 4/-/1).
    inner_batch_size: int | None = Field(None, ge=1)
    inner_steps: int | None = Field(None, ge=1)
    meta_batch: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(50, ge=0)
    per_method: dict[str, MethodOptions] = Field(default_factory=dict)  # e.g. {reptile: {inner_steps: 3}}
    clustering: ClusteringSpec = Field(default_factory=ClusteringSpec)  # for the metapt and ppt methods

    @field_validator("sources", mode="before")
    @classmethod
    def _source_names(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the source set is empty: name at least one source task")
        v = _as_refs(v)  # a partition's source tasks, if it names one
        if isinstance(v, dict):  # a selection: validated here so errors name its own fields only
            try:
                return SourceSelection.model_validate(v)
            except ValidationError as e:
                raise ValueError("; ".join(line.removeprefix("(spec): ") for line in format_errors(e).splitlines())) from None
        return _as_refs(v)

    @property
    def source_refs(self) -> list[TaskRef]:
        """The given sources, or the candidates a selection chooses from."""
        return self.sources.candidates if isinstance(self.sources, SourceSelection) else self.sources

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in ALGORITHMS]
        if unknown:
            raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; accepted: {', '.join(ALGORITHMS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"methods are listed twice: {v}")
        return v

    @model_validator(mode="after")
    def _overrides_listed(self) -> "UpstreamSpec":
        stray = sorted(set(self.per_method) - set(self.methods))
        if stray:
            raise ValueError(f"per_method names {', '.join(stray)}, which is not among methods {self.methods}")
        return self


class SweepSpec(Strict):
    """Vary one field of the spec (a dotted path, e.g. upstream.steps or prompt.length)."""

    field: str = Field(min_length=1)
    values: list = Field(min_length=2)

    @field_validator("field")
    @classmethod
    def _exists(cls, v: str) -> str:
        model: type[BaseModel] | None = JobSpec
        for part in v.split("."):
            fields = model.model_fields if model else {}
            if part not in fields or part == "sweep":
                raise ValueError(f"{v!r} is not a field of the spec; e.g. upstream.steps, upstream.sources, "
                                 "prompt.length, downstream.max_steps")
            annotation = fields[part].annotation
            model = next((a for a in getattr(annotation, "__args__", (annotation,))
                          if isinstance(a, type) and issubclass(a, BaseModel)), None)
        return v


class JobSpec(Strict):
    name: str = Field("primer-job", max_length=200)  # the jobs.name column is String(200)
    backbone: str = "smollm2-135m"
    prompt: PromptSpec = Field(default_factory=PromptSpec)
    targets: list[TaskRef] = Field(min_length=1)
    upstream: UpstreamSpec | None = None  # without it: plain prompt tuning of the targets
    downstream: DownstreamSpec = Field(default_factory=DownstreamSpec)
    max_input_tokens: int = Field(256, ge=8)
    max_answer_tokens: int = Field(32, ge=1)
    sweep: SweepSpec | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _names(cls, v):
        return _as_refs(v, "test")

    @model_validator(mode="after")
    def _targets_unseen(self) -> "JobSpec":
        if self.upstream:
            both = sorted({t.name for t in self.targets} & {s.name for s in self.upstream.source_refs})
            if both:
                raise ValueError(f"target tasks must be unseen upstream, but {', '.join(both)} "
                                 "is also a source task")
        return self

    @property
    def methods(self) -> list[str]:
        """What is compared downstream: the PT baseline, each upstream method's init, then FT."""
        return (["pt"] + (self.upstream.methods if self.upstream else [])
                + (["ft"] if self.downstream.finetune else []))


class SpecError(ValueError):
    """A spec that cannot run; the message names each bad field and what it accepts.
    `errors` holds the same as (field path, message) pairs, for an API's 422 body."""

    def __init__(self, message: str, errors: list[tuple[tuple, str]] | None = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [((), message)]


def format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(spec)"
        lines.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_spec(data: dict) -> JobSpec:
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(format_errors(e), [(tuple(err["loc"]), err["msg"].removeprefix("Value error, "))
                                           for err in e.errors()]) from None


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    return parse_spec(data)
