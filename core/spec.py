"""The job spec shared by the CLI, the API and the worker (pydantic: one place validates)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.errors import UserError
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


# Finite caps on what a spec may ask for: generous (the papers' settings are far below them), but
# a mistyped or hostile spec cannot ask for 10^12 steps, 10^5 seeds or a learning rate of 1e308.
MAX_STEPS = 10**6
MAX_SEED = 2**31 - 1  # the store keeps seeds in 32-bit integer columns
MAX_LR = 100.0
MAX_ITEMS = 100  # seeds, learning rates and sweep values per list
MAX_TASKS = 1000  # targets, sources or candidates per list
MAX_BATCH = 4096
MAX_TOKENS = 65536  # max_input_tokens, max_answer_tokens
MAX_SHOTS = 10**6



def Whole(lo: int, hi: int):
    """A whole number from lo to hi. A float beyond the range (JSON's 1e308) is refused here with
    the range, before pydantic's int parsing would refuse it as an integer "exceeding maximum size"."""
    def in_range(v):
        if isinstance(v, float) and not lo <= v <= hi:
            raise ValueError(f"Input should be a whole number from {lo} to {hi}, got {v!r}")
        return v

    return Annotated[int, BeforeValidator(in_range), Field(ge=lo, le=hi)]


Steps = Whole(1, MAX_STEPS)
Seed = Whole(0, MAX_SEED)
Batch = Whole(1, MAX_BATCH)
LearningRate = Annotated[float, Field(gt=0, le=MAX_LR)]


class Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silent default. allow_inf_nan=False:
    # JSON's NaN/Infinity (and YAML's .nan/.inf) would pass gt=0 and train into NaN.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class PromptSpec(Strict):
    length: Whole(1, MAX_PROMPT_TOKENS) = 20
    init: str = "vocab"
    text: str | None = None  # for init: text
    path: str | None = None  # for init: file
    seed: Seed = 0

    @field_validator("init")
    @classmethod
    def _known_init(cls, v: str) -> str:
        if v not in INITS:
            raise ValueError(f"unknown prompt init {v!r}; accepted: {', '.join(INITS)}")
        return v


class TaskRef(Strict):
    """A task by name (a pack task, or a catalog task under PRIMER_CROSSFIT_DIR), or by files."""

    name: str = Field(min_length=1, max_length=200)
    path: str | None = None  # a CrossFit directory, a BIG-bench task.json, or a .csv/.jsonl file
    type: Literal[TASK_TYPES] | None = None  # type: ignore[valid-type]
    metric: str | None = None
    options: list[str] | None = Field(None, max_length=1000)
    input_column: str | None = None
    output_column: str | None = None


def _shots(v):
    if v is None or v == "all" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SHOTS):
        return v
    raise ValueError(f"shots must be a number of examples per label from 1 to {MAX_SHOTS}, or 'all'; got {v!r}")


# Examples per label (per task if not classification); None: CrossFit's 16 (32 if not cls).
Shots = Annotated[int | Literal["all"] | None, BeforeValidator(_shots)]


class DownstreamSpec(Strict):
    shots: Shots = None  # target training examples per label; "all": all but a few-shot dev set
    lrs: list[LearningRate] = Field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2], min_length=1, max_length=MAX_ITEMS)
    seeds: list[Seed] = Field(default_factory=lambda: list(SPLIT_SEEDS), min_length=1, max_length=MAX_ITEMS)
    batch_size: Batch = 8
    max_steps: Steps = 1000
    eval_every: Steps = 50
    patience: Steps | None = None
    optimizer: Literal[OPTIMIZERS] = "adafactor"  # type: ignore[valid-type]
    weight_decay: float = Field(1e-5, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)  # gradient-norm clip (Adafactor clips its update anyway)
    eval_batch_size: Batch = 32
    # A cap for CPU runs: the first N test examples (test files are in shuffled order).
    max_test_examples: Whole(1, 10**7) | None = None
    # The fine-tuning baseline: all backbone weights, no prompt, same protocol (CrossFit's lrs).
    finetune: bool = False
    ft_lrs: list[LearningRate] = Field(default_factory=lambda: [1e-5, 2e-5, 5e-5], min_length=1, max_length=MAX_ITEMS)
    ft_optimizer: Literal[OPTIMIZERS] = "adamw"  # type: ignore[valid-type]
    # The service: take a PT or FT run from one of the owner's earlier jobs where it had the same
    # inputs (backbone, task, split seed, lr and every setting it reads) instead of training it
    # again; the job's events name each one and where it came from
    reuse_baselines: bool = False


class MethodOptions(Strict):
    """Per-method overrides of the upstream settings (e.g. Reptile's inner steps)."""

    inner_batch_size: Batch | None = None
    inner_steps: Steps | None = None
    meta_batch: Batch | None = None
    inner_lr: LearningRate | None = None
    outer_lr: LearningRate | None = None
    steps: Steps | None = None


class SourceSelection(Strict):
    """Pick the k candidate source tasks most similar to the targets (MPT appendix A.7): each
    task gets a short prompt tuned on its own few-shot train split; similarity is the overlap
    of the prompts' subspaces."""

    select: Literal["top_k_similar"]
    k: Whole(1, MAX_TASKS)
    candidates: list[TaskRef] = Field(min_length=1, max_length=MAX_TASKS)
    prompt_length: Whole(1, MAX_PROMPT_TOKENS) = 5
    steps: Steps = 50
    lr: LearningRate = 0.01  # AdamW

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
    options: list[str] | None = Field(None, min_length=2, max_length=1000)
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
    k: Whole(2, 10_000) | None = 10  # number of clusters; label grouping takes one per label
    dev_fraction: float = Field(0.5, gt=0, lt=1)  # of each cluster, for the query side
    plot: Literal["pca", "tsne"] = "pca"
    pool_size: Whole(2, 10**7) | None = None  # at most this many pooled source examples (seeded draw)
    pseudo_label: PseudoLabelSpec | None = None


class UpstreamSpec(Strict):
    """Meta-learn (or multi-task learn) prompt initializations on source tasks."""

    sources: list[TaskRef] | SourceSelection  # tasks, or {select: top_k_similar, k, candidates}
    methods: list[str] = Field(default_factory=lambda: ["maml"], min_length=1)
    # source splits
    seeds: list[Seed] = Field(default_factory=lambda: list(SPLIT_SEEDS), min_length=1, max_length=MAX_ITEMS)
    shots: Shots = None  # source examples per label, as downstream.shots
    steps: Steps = 5000  # outer steps
    # which episodes (or mixed batches) are drawn, in what order; None: prompt.seed. Sweep it to see
    # how much a method's result depends on its upstream run, with the prompt's start held fixed.
    episode_seed: Seed | None = None
    inner_lr: LearningRate = 3e-5
    outer_lr: LearningRate = 0.5
    optimizer: Literal[OPTIMIZERS] = "adafactor"  # type: ignore[valid-type]
    weight_decay: float = Field(1e-5, ge=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    # None: each method's paper default (MAML 2/1/2, FoMAML 4/1/2, Reptile 4/10/2, MTL 4/-/1).
    inner_batch_size: Batch | None = None
    inner_steps: Steps | None = None
    meta_batch: Batch | None = None
    checkpoint_every: Whole(0, MAX_STEPS) = 50
    # the meta-batch's episodes through the backbone together, one prompt copy each: the same
    # meta-gradient (up to float rounding) from fewer, larger forward passes. null: on a CPU, 2
    # at a time (MAML, FoMAML and Reptile 1.20-1.21x in fp32, 1.26-1.35x in bf16 on 2 Xeon
    # cores; at most twice one episode's memory), one at a time on a GPU; true: the whole
    # meta-batch in one forward; false: one at a time (docs/performance.md)
    batch_episodes: bool | None = None
    # on a CPU, the meta-batch's episodes in parallel threads, each with its share of the cores,
    # up to one per core: the same meta-gradient up to rounding, for one episode's memory per
    # thread (what MAML ran by default before batch_episodes did); null or false: off
    parallel_episodes: bool | None = None
    # The service: take each method's finished meta-training from one of the owner's earlier jobs
    # where it had the same inputs (backbone, sources, split seeds, prompt and every upstream
    # setting it reads) instead of running it again; the job's events name each one and where it
    # came from; so is each downstream run made from such a start whose own inputs match. Not for
    # methods that depend on the targets (chosen sources, metapt and ppt)
    reuse_starts: bool = False
    per_method: dict[str, MethodOptions] = Field(default_factory=dict)  # e.g. {reptile: {inner_steps: 3}}
    clustering: ClusteringSpec = Field(default_factory=ClusteringSpec)  # for the metapt and ppt methods

    @field_validator("sources", mode="before")
    @classmethod
    def _source_names(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("the source set is empty: name at least one source task")
        if isinstance(v, list) and len(v) > MAX_TASKS:
            raise ValueError(f"{len(v)} source tasks; accepted: at most {MAX_TASKS}")
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
    values: list = Field(min_length=2, max_length=MAX_ITEMS)

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
    targets: list[TaskRef] = Field(min_length=1, max_length=MAX_TASKS)
    upstream: UpstreamSpec | None = None  # without it: plain prompt tuning of the targets
    downstream: DownstreamSpec = Field(default_factory=DownstreamSpec)
    max_input_tokens: Whole(8, MAX_TOKENS) = 256
    max_answer_tokens: Whole(1, MAX_TOKENS) = 32
    # an input past max_input_tokens: "middle" drops its middle (its template and its end stay),
    # "left" its start (primer's causal rule until 2026-12-07, which the committed studies ran)
    truncation: Literal["middle", "left"] = "middle"
    # the frozen backbone's weights and activations; the prompt and the optimizer stay float32
    precision: Literal["fp32", "bf16"] = "fp32"
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


class SpecError(UserError):
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
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from None
    return parse_spec(data)
