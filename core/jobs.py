"""A job as the service runs it: checked at the door, cut into units of work, run by workers.

`check` turns a request body into a JobSpec the service will run (or a SpecError naming the
field): only the operator's backbones, only known or uploaded tasks, no paths. `units` is the
work a job will do, for progress. The worker runs `upstream` once per job (source selection,
clustering, every upstream method, in order), then one `cell` per (method, target task, split
seed, lr) anywhere, then `aggregate`. Every step reads what it needs from the store and writes
what it made back, so any worker can pick up any step, and a step run twice (a redelivered
message) finds its result stored or resumes from its checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from core.settings import settings
from core.spec import JobSpec, SourceSelection, SpecError, TaskRef, parse_spec
from core.tasks import catalog, packs


@dataclass(frozen=True)
class Cell:
    method: str
    task: str
    seed: int
    lr: float

    @property
    def unit(self) -> str:
        return f"downstream/{self.method}/{self.task}/{self.seed}/{self.lr:g}"


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _task_refs(spec: JobSpec):
    for i, ref in enumerate(spec.targets):
        yield ("targets", i), ref
    if spec.upstream:
        sel = spec.upstream.sources
        where = ("upstream", "sources", "candidates") if isinstance(sel, SourceSelection) else ("upstream", "sources")
        for i, ref in enumerate(spec.upstream.source_refs):
            yield (*where, i), ref


def check(body: dict, store, owner: str) -> JobSpec:
    """The spec of a request, if the service can run it; SpecError (field, message) pairs if not."""
    spec = parse_spec(body)
    errors: list[tuple[tuple, str]] = []
    allowed = settings().backbone_allowlist()
    if spec.backbone not in allowed:
        errors.append((("backbone",), f"backbone {spec.backbone!r} is not served here; accepted: {', '.join(allowed)}"))
    if spec.sweep is not None:
        errors.append((("sweep",), "a sweep is several jobs: submit one job per value"))
    if spec.prompt.path or spec.prompt.init == "file":
        errors.append((("prompt", "path"), "prompt files are not read over the API; accepted inits: vocab, "
                                            "task_name, random, text"))
    if spec.upstream and spec.upstream.clustering.pseudo_label:
        errors.append((("upstream", "clustering", "pseudo_label"), "pseudo-labelling reads a prompt file, which "
                                                                     "the API does not accept; run it with the CLI"))
    uploaded = {t.name for t in store.list_tasks(owner)}
    crossfit = settings().crossfit_dir
    for where, ref in _task_refs(spec):
        if ref.path is not None:
            errors.append(((*where, "path"), "paths are not accepted over the API: upload the task with POST /tasks "
                                             "and name it"))
        elif not (ref.name in packs.PACKS or ref.name in uploaded
                  or (crossfit and ref.name in catalog.catalog() and (crossfit / ref.name).is_dir())):
            accepted = sorted(packs.PACKS) + sorted(uploaded)
            errors.append(((*where, "name"), f"unknown task {ref.name!r}; accepted: {', '.join(accepted)}"
                                             + (" and CrossFit's tasks" if crossfit else "")))
    if errors:
        raise SpecError("\n".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors), errors)
    return spec


def cells(spec: JobSpec) -> list[Cell]:
    d = spec.downstream
    return [Cell(m, t.name, seed, lr) for t in spec.targets for m in spec.methods
            for seed in d.seeds for lr in (d.ft_lrs if m == "ft" else d.lrs)]


def units(spec: JobSpec) -> dict[str, int]:
    """Every unit of work of the job and its steps, in the order they run."""
    out = {}
    if spec.upstream:
        sel = spec.upstream.sources
        if isinstance(sel, SourceSelection):
            out["similarity"] = sel.steps * (len(sel.candidates) + len(spec.targets))
        for m in spec.upstream.methods:
            out[f"upstream/{m}"] = spec.upstream.steps
    out.update({c.unit: spec.downstream.max_steps for c in cells(spec)})
    return out


def materialize(store, owner: str, spec: JobSpec) -> JobSpec:
    """The spec a worker runs: the backbone's location from the allowlist, and uploaded tasks
    written out of the store into the local cache and named by path."""
    location = settings().backbone_allowlist().get(spec.backbone)
    if location is None:
        raise SpecError(f"backbone {spec.backbone!r} is no longer served here")

    def local(ref: TaskRef) -> TaskRef:
        row = store.get_task(owner, ref.name) if ref.name not in packs.PACKS else None
        if row is None:
            return ref
        directory = settings().cache_dir / "uploads" / row.id
        if not (directory / ".complete").exists():
            directory.mkdir(parents=True, exist_ok=True)
            for filename, data in store.task_files(row.id).items():
                (directory / Path(filename).name).write_bytes(data)
            (directory / ".complete").write_text(row.id)
        path = {"crossfit": directory, "bigbench": directory / "task.json",
                "jsonl": directory / "task.jsonl"}[row.format]
        columns = {"input_column": "input", "output_column": "output"} if row.format == "jsonl" else {}
        return TaskRef(name=ref.name, path=str(path), type=row.type, metric=row.metric, options=row.options, **columns)

    data = spec.model_dump()
    data["backbone"] = location
    data["targets"] = [local(r).model_dump() for r in spec.targets]
    if spec.upstream:
        refs = [local(r).model_dump() for r in spec.upstream.source_refs]
        if isinstance(spec.upstream.sources, SourceSelection):
            data["upstream"]["sources"]["candidates"] = refs
        else:
            data["upstream"]["sources"] = refs
    return JobSpec.model_validate(data)
