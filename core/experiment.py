"""The job as a pure function: spec -> upstream -> downstream grid -> results.

No web, no queue: the CLI and the worker decide where results and checkpoints go. Progress
comes out through a callback of plain dicts ({phase, step, total, ...}); checkpoints go through
a small store (load/save by key) so that a crashed run resumes where it stopped and ends with
the result an uninterrupted run gets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Protocol

import torch

from core import backbones
from core.algorithms.finetune import finetune
from core.algorithms.pt import RunResult, TaskResult, TrainConfig, best_of, prompt_tune, train_prompt
from core.algorithms.upstream import Diverged, UpstreamConfig, UpstreamResult, meta_train
from core.backbones.soft_prompt import SoftPromptModel
from core.errors import UserError
from core.metrics import arg, arg_difference_interval, arg_interval, relative_gain
from core.names import BASELINES
from core.prompts import init_prompt
from core.settings import settings
from core.similarity import Selection, select_top_k, task_prompt
from core.spec import JobSpec, SourceSelection
from core.tasks import Example, Split, Task, get_split, load_task

Progress = Callable[[dict], None]


class Checkpoints(Protocol):
    def load(self, key: str) -> dict | None: ...
    def save(self, key: str, state: dict) -> None: ...


class NoCheckpoints:
    def load(self, key: str) -> dict | None:
        return None

    def save(self, key: str, state: dict) -> None:
        pass


class DirCheckpoints:
    """One torch file per key; written to a temporary name and renamed, so a crash mid-write
    leaves the previous checkpoint intact. Loaded with weights_only (no arbitrary pickles)."""

    def __init__(self, directory: Path, header: str | None = None, trusted: bool = False):
        self.directory = directory
        self.header = header  # written to spec.json with the first checkpoint: the spec that began here
        # True where spec.json's spec computes what this run's does: checkpoints written before
        # they were stamped with their inputs (`Stamped`) are this spec's own and count
        self.trusted = trusted

    def _path(self, key: str) -> Path:
        return self.directory / (key.replace("/", "__") + ".pt")

    def load(self, key: str) -> dict | None:
        path = self._path(key)
        return torch.load(path, weights_only=True) if path.exists() else None

    def save(self, key: str, state: dict) -> None:
        if not self.directory.exists():
            self.directory.mkdir(parents=True)
            if self.header is not None:
                (self.directory / "spec.json").write_text(self.header)
        tmp = self._path(key).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._path(key))


# How a meta-batch's episodes run (the same gradient up to rounding), how often checkpoints are
# written and whether a finished one may come from an earlier job: changing them leaves every
# checkpoint valid (say, one episode at a time after running out of memory).
NOT_COMPUTED = ("batch_episodes", "parallel_episodes", "checkpoint_every", "reuse_starts")


def computed(d: dict) -> dict:
    """A spec's fields (as model_dump gives them) less the NOT_COMPUTED ones."""
    up = d.get("upstream")
    return {**d, "upstream": {k: v for k, v in up.items() if k not in NOT_COMPUTED} if up else up}


def inputs(spec: JobSpec, key: str) -> str:
    """A digest of the spec fields that the work checkpointed under `key` can depend on. A rerun
    whose spec changed only elsewhere (another method's learning rate, one more target or
    method) reuses that checkpoint; a change that could alter it makes it stale."""
    return digest(depends_on(spec, key))


def depends_on(spec: JobSpec, key: str) -> dict:
    """The spec fields the work under `key` can depend on. Where a dependence is not plain
    (source selection, MetaPT's pooled methods, similarity prompts) that is the whole spec."""
    d = computed(spec.model_dump(mode="json", exclude={"name", "sweep"}))
    d["downstream"].pop("reuse_baselines")  # where a baseline's runs come from, not what they compute
    up = d["upstream"]
    kind, method, *task = key.split("/")
    if kind not in ("upstream", "downstream"):
        return d
    if method in BASELINES:
        d["upstream"] = None  # the baselines never see the upstream phase
    elif up:
        up["methods"], up["per_method"] = [method], {m: o for m, o in up["per_method"].items() if m == method}
        if method not in POOLED:
            up.pop("clustering")
    # Only a method trained on the sources as given is free of the targets and downstream settings
    # (selection tunes on the targets; MetaPT's pseudo-labelling batches by eval_batch_size).
    own = method in BASELINES or (method not in POOLED and not isinstance(spec.upstream.sources, SourceSelection))
    if kind == "upstream" and own:
        del d["targets"], d["downstream"]
    if kind == "downstream":
        if own:
            d["targets"] = [t for t in d["targets"] if t["name"] == task[0]]
        for k in ("lrs", "optimizer") if method == "ft" else ("finetune", "ft_lrs", "ft_optimizer"):
            d["downstream"].pop(k)  # fine-tuning's own lrs and optimizer replace PT's
    return d


def token_limits(spec: JobSpec) -> dict:
    """The spec's limits on a row's tokens and its rule for cutting an input, as SoftPromptModel takes them."""
    return dict(max_input_tokens=spec.max_input_tokens, max_answer_tokens=spec.max_answer_tokens,
                truncation=spec.truncation)


def digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Stamped:
    """Checkpoints stamped with the digest of their inputs (`inputs`): one written for other
    inputs loads as none and is redone, so an output directory may be rerun with a changed spec."""

    def __init__(self, store: Checkpoints, spec: JobSpec, emit: Progress = lambda event: None):
        self.store, self.spec, self.emit = store, spec, emit

    def load(self, key: str) -> dict | None:
        state = self.store.load(key)
        if state is None:
            return None
        stamp = state.get("inputs")  # none: written before checkpoints were stamped, under spec.json's spec
        if stamp == inputs(self.spec, key) or (stamp is None and getattr(self.store, "trusted", False)):
            return state
        self.emit({"message": f"{key}: its checkpoint was made from other inputs (the spec has changed since), "
                              "so it is done again"})
        return None

    def save(self, key: str, state: dict) -> None:
        self.store.save(key, {**state, "inputs": inputs(self.spec, key)})


@dataclass
class Clusters:
    """MetaPT's meta-tasks and what they were made of, for the report and the cluster plot."""

    examples: list
    ids: list[int]
    meta_tasks: dict[str, list[Split]]
    summary: list[dict]
    pseudo: dict | None = None  # how the pool was pseudo-labelled (classifier, accuracy, counts)


@dataclass
class Results:
    spec: JobSpec
    tasks: dict[str, dict[str, TaskResult]]  # target task -> method -> result
    upstream: dict[str, UpstreamResult] = field(default_factory=dict)
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # "task/method/seedN" or "init/method"
    seconds: float = 0.0
    selection: Selection | None = None  # when the sources were chosen by similarity
    clusters: Clusters | None = None  # MetaPT's meta-tasks
    diverged: dict[str, str] = field(default_factory=dict)  # method -> why its meta-training stopped

    @property
    def methods(self) -> list[str]:
        """The spec's methods that have scores: all but those whose meta-training diverged."""
        return [m for m in self.spec.methods if m not in self.diverged]

    def gains(self) -> dict[str, dict[str, float | None]]:
        """Relative gain of every method over PT, per target task (None where PT scored 0)."""
        return {m: {t: relative_gain(r[m].mean, r["pt"].mean) for t, r in self.tasks.items()}
                for m in self.methods if m != "pt"}

    def left_out(self) -> list[str]:
        """The target tasks no ARG counts: PT scored 0 there, so no relative gain is defined."""
        return [t for t, r in self.tasks.items() if r["pt"].mean == 0] if self.gains() else []

    def arg(self) -> dict[str, float | None]:
        """ARG (%) of each method over the tasks with a relative gain; None if there are none."""
        return {m: arg(g) for m, g in self.gains().items()}

    def _scores(self, method: str) -> dict[str, dict[int, float]]:
        left = self.left_out()
        return {t: {r.seed: r.test for r in per[method].best} for t, per in self.tasks.items() if t not in left}

    def arg_intervals(self) -> dict[str, tuple[float, float] | None]:
        """95% bootstrap interval of each method's ARG over target tasks and split seeds; None
        where the ARG is not a number (no task left, or a NaN score: CrossFit's Pearson)."""
        return {m: arg_interval(self._scores(m), self._scores("pt")) if _finite(v) else None
                for m, v in self.arg().items()}

    def vs_mtl(self) -> dict[str, dict]:
        """Each method's ARG minus MTL's (points) with a paired 95% bootstrap interval: does
        learning to initialize beat plain multi-task training on the same sources?"""
        args = self.arg()
        if not _finite(args.get("mtl")):
            return {}
        return {m: {"difference": args[m] - args["mtl"],
                    "ci95": arg_difference_interval(self._scores(m), self._scores("mtl"), self._scores("pt"))
                    if _finite(args[m]) else None}
                for m in args if m != "mtl"}

    def to_dict(self) -> dict:
        return {
            "name": self.spec.name,
            "backbone": self.spec.backbone,
            "spec": self.spec.model_dump(),
            "code": code_version(),
            "seconds": round(self.seconds, 1),
            "methods": self.methods,
            "diverged": self.diverged,
            "tasks": {t: {m: r.summary() for m, r in methods.items()} for t, methods in self.tasks.items()},
            "relative_gain": self.gains(),
            "arg": self.arg(),
            "arg_95ci": self.arg_intervals(),
            "left_out_of_arg": self.left_out(),
            "vs_mtl": self.vs_mtl(),
            "upstream": {m: {"steps": u.steps, "seconds": round(u.seconds, 1), "curve": u.curve}
                         for m, u in self.upstream.items()},
            "source_selection": asdict(self.selection) if self.selection else None,
            "clusters": self.clusters.summary if self.clusters else None,
            "pseudo_labels": self.clusters.pseudo if self.clusters else None,
        }


@lru_cache(maxsize=1)
def code_version() -> dict:
    """What computed a result: primer's version and, run from a git checkout, its commit and
    whether tracked files differ from it (None where there is no checkout or no git)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("primer")
    except PackageNotFoundError:
        release = None
    root, commit, modified = Path(__file__).resolve().parent.parent, None, None
    if (root / ".git").exists():
        git = lambda *a: subprocess.run(["git", "-C", str(root), *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10, check=True).stdout.strip()
        try:
            commit, modified = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            pass
    return {"version": release, "commit": commit, "modified": modified}


# Read once, as this module loads (with the rest of the code that learns): a run of hours, or a
# worker process waiting for its first job, records the checkout its code came from, not the one
# there when its first result is written.
code_version()


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def train_config(spec: JobSpec) -> TrainConfig:
    d = spec.downstream
    return TrainConfig(batch_size=d.batch_size, max_steps=d.max_steps, eval_every=d.eval_every,
                       patience=d.patience, optimizer=d.optimizer, weight_decay=d.weight_decay,
                       grad_clip=d.grad_clip, eval_batch_size=d.eval_batch_size, seed=spec.prompt.seed)


def upstream_config(spec: JobSpec, method: str) -> UpstreamConfig:
    u = spec.upstream
    cfg = UpstreamConfig(algorithm=method, steps=u.steps, inner_batch_size=u.inner_batch_size,
                         inner_steps=u.inner_steps, meta_batch=u.meta_batch, inner_lr=u.inner_lr,
                         outer_lr=u.outer_lr, optimizer=u.optimizer, weight_decay=u.weight_decay,
                         grad_clip=u.grad_clip, seed=spec.prompt.seed if u.episode_seed is None else u.episode_seed,
                         checkpoint_every=u.checkpoint_every, batch_episodes=u.batch_episodes,
                         parallel_episodes=u.parallel_episodes)
    own = u.per_method.get(method)
    return dataclasses.replace(cfg, **own.model_dump(exclude_none=True)) if own else cfg


def target_splits(task: Task, spec: JobSpec) -> list[Split]:
    cap = spec.downstream.max_test_examples
    out = []
    for seed in spec.downstream.seeds:
        s = get_split(task, seed, spec.downstream.shots)
        out.append(dataclasses.replace(s, test=s.test[:cap]) if cap else s)
    return out


def _save_task_result(result: TaskResult) -> dict:
    return {"task": result.task, "metric": result.metric, "runs": [asdict(r) for r in result.runs],
            "best": [result.runs.index(b) for b in result.best]}


def _load_task_result(state: dict) -> TaskResult:
    runs = [RunResult(**r) for r in state["runs"]]
    return TaskResult(state["task"], state["metric"], runs, [runs[i] for i in state["best"]])


@dataclass
class Prepared:
    """What every phase of a job needs: the tasks and their splits, the backbone and the model."""

    spec: JobSpec
    targets: dict[str, Task]
    splits: dict[str, list[Split]]
    sources: dict[str, list[Split]]
    infos: dict
    backbone: object
    init: torch.Tensor
    model: SoftPromptModel


def prepare(spec: JobSpec, emit: Progress, load=None) -> Prepared:
    """`load`: how the backbone is loaded (backbones.load; a worker passes backbones.load_kept)."""
    # Tasks first: a bad task name fails before minutes go into loading a model.
    targets = {ref.name: load_task(ref, spec.downstream.shots) for ref in spec.targets}
    splits = {name: target_splits(task, spec) for name, task in targets.items()}
    sources: dict[str, list[Split]] = {}
    infos = {}
    if spec.upstream:
        for ref in spec.upstream.source_refs:
            source = load_task(ref, spec.upstream.shots)
            sources[ref.name] = [get_split(source, seed, spec.upstream.shots) for seed in spec.upstream.seeds]
            infos[ref.name] = source.info

    emit({"phase": "load", "step": 0, "total": 1, "backbone": spec.backbone})
    backbone = (load or backbones.load)(spec.backbone, device=settings().torch_device(), dtype=backbones.DTYPES[spec.precision])
    p = spec.prompt
    init = init_prompt(backbone, p.length, p.init, p.seed, text=p.text or "", path=p.path or "")
    model = SoftPromptModel(backbone, init, **token_limits(spec))
    return Prepared(spec, targets, splits, sources, infos, backbone, init, model)


@dataclass
class Inits:
    """The upstream phase's product: an initial prompt per method ("pt": the plain init)."""

    prompts: dict[str, torch.Tensor]
    upstream: dict[str, UpstreamResult]
    selection: Selection | None
    clusters: Clusters | None
    diverged: dict[str, str]  # method -> why its meta-training stopped; it has no prompt


POOLED = {"metapt", "ppt"}  # the methods that train on MetaPT's pooled (clustered) source data


def learn_inits(prep: Prepared, emit: Progress, store: Checkpoints) -> Inits:
    """Source selection, MetaPT's clustering and every upstream method, in order."""
    spec, sources = prep.spec, prep.sources
    clusters = None
    if spec.upstream and POOLED & set(spec.upstream.methods):
        clusters = _cluster(spec, sources, prep.backbone)  # before any training: a bad k fails here

    selection = None
    if spec.upstream and isinstance(spec.upstream.sources, SourceSelection):
        selection = _select_sources(prep.backbone, spec, sources, prep.infos, prep.targets, prep.splits, emit, store)
        sources = {name: sources[name] for name in selection.chosen}

    inits = {"pt": prep.init}
    upstream: dict[str, UpstreamResult] = {}
    diverged: dict[str, str] = {}
    methods = spec.upstream.methods if spec.upstream else []
    for method in methods:
        tasks = clusters.meta_tasks if method in POOLED else sources
        try:
            upstream[method] = _upstream(prep.model, tasks, prep.init, upstream_config(spec, method), emit, store)
        except Diverged as e:  # the other methods' starts are still worth their downstream grid
            diverged[method] = str(e)
            emit({"phase": "upstream", "method": method, "step": e.step, "total": spec.upstream.steps,
                  "message": f"{e}; {method} is left out, the other methods go on"})
            continue
        inits[method] = upstream[method].prompt
    return Inits(inits, upstream, selection, clusters, diverged)


def require_a_start(learned: Inits) -> None:
    """A job whose every upstream method diverged has nothing to compare with PT: it fails here,
    before its downstream grid (a sweep goes on: that value's row says "diverged")."""
    if learned.diverged and not learned.upstream:
        raise UserError("every upstream method diverged, so there is nothing to compare with prompt tuning:\n"
                        + "\n".join(learned.diverged.values()))


def run(spec: JobSpec, progress: Progress | None = None, checkpoints: Checkpoints | None = None,
        load=None, in_sweep: bool = False) -> Results:
    start = time.perf_counter()
    emit = progress or (lambda event: None)
    store = Stamped(checkpoints or NoCheckpoints(), spec, emit)
    prep = prepare(spec, emit, load)
    learned = learn_inits(prep, emit, store)
    if not in_sweep:
        require_a_start(learned)
    inits, backbone, model, targets, splits = learned.prompts, prep.backbone, prep.model, prep.targets, prep.splits

    cfg, d = train_config(spec), spec.downstream
    ft_cfg = dataclasses.replace(cfg, optimizer=d.ft_optimizer)
    methods = [m for m in spec.methods if m not in learned.diverged]
    budget = {m: len(d.seeds) * len(d.ft_lrs if m == "ft" else d.lrs) * d.max_steps for m in methods}
    total, done = len(targets) * sum(budget.values()), 0
    results: dict[str, dict[str, TaskResult]] = {name: {} for name in targets}
    prompts = {f"init/{m}": inits[m] for m in learned.upstream}
    for name, task in targets.items():
        for method in methods:
            key = f"downstream/{method}/{name}"
            relay = _relay(emit, name, method, done, d.max_steps, total)
            state = store.load(key)
            if state is not None:
                result = _load_task_result(state)
            elif method == "ft":
                result = finetune(backbone, task, d.ft_lrs, splits[name], ft_cfg, relay, **token_limits(spec))
            else:
                result = prompt_tune(model, task, inits[method], d.lrs, splits[name], cfg, relay)
            if state is None:
                store.save(key, _save_task_result(result))
            results[name][method] = result
            prompts.update({f"{name}/{method}/seed{r.seed}": r.prompt for r in result.best if r.prompt is not None})
            done += budget[method]
    return Results(spec, results, learned.upstream, prompts, time.perf_counter() - start, learned.selection,
                   learned.clusters, learned.diverged)


def run_cell(prep: Prepared, method: str, task: str, seed: int, lr: float, init: torch.Tensor | None,
             progress: Progress | None = None) -> RunResult:
    """One cell of the downstream grid, on its own: train from `init` (FT: the backbone's own
    weights) on split `seed` with `lr`, and score the best-dev checkpoint on test. A grid of
    cells picked by `task_result` gives what `run` gets."""
    spec, d = prep.spec, prep.spec.downstream
    cfg = train_config(spec)
    split = next(s for s in prep.splits[task] if s.seed == seed)
    info = prep.targets[task].info
    if method == "ft":
        result = finetune(prep.backbone, prep.targets[task], [lr], [split],
                          dataclasses.replace(cfg, optimizer=d.ft_optimizer), progress,
                          **token_limits(spec))
        return result.runs[0]
    return train_prompt(prep.model, split, info, init, lr, cfg, progress, test=True)


def task_result(task: Task, seeds: list[int], lrs: list[float], runs: list[RunResult]) -> TaskResult:
    """The paper's protocol over finished cells: per seed, the lr with the best dev score (ties:
    the first of the grid), whose test score counts."""
    ordered = sorted(runs, key=lambda r: (seeds.index(r.seed), lrs.index(r.lr)))
    best = [best_of([r for r in ordered if r.seed == seed]) for seed in seeds]
    return TaskResult(task.name, task.info.metric, ordered, best)


def _relay(emit: Progress, task: str, method: str, before: int, max_steps: int, total: int) -> Progress:
    """Turn a run's own step count into progress over the whole downstream grid. Runs may stop
    early, so each run counts its full budget once the next one starts."""
    runs = [0]

    def relay(event: dict) -> None:
        if event["step"] == 1:
            runs[0] += 1
        done = before + (runs[0] - 1) * max_steps + event["step"]
        emit(event | {"task": task, "method": method, "done": done, "grand_total": total})

    return relay


def _upstream(model, sources, init, cfg: UpstreamConfig, emit: Progress, store: Checkpoints) -> UpstreamResult:
    key = f"upstream/{cfg.algorithm}"
    state = store.load(key)
    if state is not None and state.get("diverged"):  # resumed: it would diverge again at the same step
        raise Diverged(cfg.algorithm, state["step"], state["diverged"])
    if state is not None and state.get("final"):
        return UpstreamResult(cfg.algorithm, state["prompt"], state["step"], state["seconds"], state["curve"])
    try:
        result = meta_train(model, sources, init, cfg, emit, lambda s: store.save(key, s), resume=state)
    except Diverged as e:
        store.save(key, {"diverged": str(e), "step": e.step})
        raise
    store.save(key, {"final": True, "prompt": result.prompt, "step": result.steps,
                     "seconds": result.seconds, "curve": result.curve})
    return result


def _select_sources(backbone, spec: JobSpec, sources, infos, targets, splits, emit: Progress,
                    store: Checkpoints) -> Selection:
    """Tune a short prompt per candidate and per target (few-shot train/dev only, never test)
    and keep the k candidates whose prompt subspaces are closest to the targets'."""
    sel: SourceSelection = spec.upstream.sources
    init = init_prompt(backbone, sel.prompt_length, "vocab", spec.prompt.seed)
    model = SoftPromptModel(backbone, init, **token_limits(spec))
    cfg = TrainConfig(batch_size=spec.downstream.batch_size, max_steps=sel.steps, eval_every=sel.steps,
                      optimizer="adamw", weight_decay=0.0, seed=spec.prompt.seed)
    jobs = [(n, sources[n][0], infos[n]) for n in sources] + [(n, splits[n][0], t.info) for n, t in targets.items()]
    prompts = {}
    for i, (name, split, info) in enumerate(jobs):
        key = f"similarity/{name}"
        state = store.load(key)
        if state is None:
            relay = lambda e, i=i: emit(e | {"phase": "similarity", "task": name, "done": i * sel.steps + e["step"],
                                             "grand_total": len(jobs) * sel.steps})
            state = {"prompt": task_prompt(model, split, info, init, sel.lr, cfg, relay)}
            store.save(key, state)
        prompts[name] = state["prompt"]
    return select_top_k({n: prompts[n] for n in targets}, {n: prompts[n] for n in sources}, sel.k)


def _cluster(spec: JobSpec, sources: dict[str, list[Split]], backbone) -> Clusters:
    """Pool every source example (task identity dropped, duplicates once), pseudo-label it if
    asked, and cut the pool into meta-tasks."""
    from core.algorithms import metapt

    c = spec.upstream.clustering
    owner: dict[Example, str] = {}  # each pooled example and the first source it came from
    for name, splits in sources.items():
        for e in (e for s in splits for e in s.train + s.dev):
            owner.setdefault(e, name)
    pooled = list(owner)
    if c.pool_size and len(pooled) > c.pool_size:  # MetaPT's source-data size ablation
        keep = sorted(random.Random(spec.prompt.seed).sample(range(len(pooled)), c.pool_size))
        pooled = [pooled[i] for i in keep]
    pseudo = None
    if c.pseudo_label:
        pooled, pseudo = _pseudo_label(spec, pooled, [owner[e] for e in pooled], backbone)
    ids = metapt.cluster(pooled, c.method, c.k if c.method != "label" else None, spec.prompt.seed)
    tasks = metapt.meta_tasks(pooled, c.method, None, spec.prompt.seed, c.dev_fraction, ids=ids)
    return Clusters(pooled, ids, tasks, metapt.cluster_summary(pooled, ids), pseudo)


def _pseudo_label(spec: JobSpec, pooled: list[Example], names: list[str], backbone
                  ) -> tuple[list[Example], dict]:
    """MetaPT section 4.1: restate each pooled text as the classifier's task, label it, keep the
    confident labels (balanced if asked). Returns the examples and what was done, in numbers."""
    from core.algorithms import metapt
    from core.prompts import load_prompt
    from core.tasks.packs import PACKS, untemplated

    pl = spec.upstream.clustering.pseudo_label
    texts = [untemplated(n, e.input) for n, e in zip(names, pooled)]
    stats: dict = {"pooled": len(pooled)}
    if pl.train is not None:
        task = load_task(pl.train, "all")
        split = get_split(task, spec.prompt.seed, "all")
        options = tuple(task.info.options or sorted({e.output for e in split.train}))
        raw = lambda examples: [untemplated(pl.train.name, e.input) for e in examples]  # noqa: E731
        classify = metapt.fit_classifier(raw(split.train), [e.output for e in split.train], spec.prompt.seed)
        heldout = split.test or split.dev
        predicted, _ = classify(raw(heldout))
        stats |= {"classifier": "logistic regression on all-MiniLM-L6-v2 embeddings", "train_task": pl.train.name,
                  "train_examples": len(split.train), "heldout_examples": len(heldout),
                  "heldout_accuracy": sum(p == e.output for p, e in zip(predicted, heldout)) / len(heldout)}
        template = pl.template or (PACKS[pl.train.name].template if pl.train.name in PACKS else "{text}")
        labels, confidence = classify(texts)
    else:
        classifier = SoftPromptModel(backbone, load_prompt(pl.prompt)[0], max_input_tokens=spec.max_input_tokens,
                                     truncation=spec.truncation)
        options, template = tuple(pl.options), pl.template or "{text}"
        labels = classifier.rank([Example(template.replace("{text}", t), ("",)) for t in texts],
                                 [options] * len(texts), spec.downstream.eval_batch_size)
        confidence = [1.0] * len(texts)
        stats |= {"classifier": f"prompt {Path(pl.prompt).name}"}
    restated = [Example(template.replace("{text}", t), ("?",), options) for t in texts]
    labelled = metapt.pseudo_label(restated, lambda _: labels)
    kept = metapt.confident(labelled, confidence, pl.min_confidence, pl.balance, options, spec.prompt.seed)
    stats |= {"confident": sum(float(x) >= pl.min_confidence for x in confidence), "kept": len(kept),
              "labels": {o: sum(e.output == o for e in kept) for o in options}}
    return kept, stats
