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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from core.fetch import once
from core.names import BASELINES
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
        pl = spec.upstream.clustering.pseudo_label
        if pl and pl.train:
            yield ("upstream", "clustering", "pseudo_label", "train"), pl.train


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
    if spec.upstream and spec.upstream.clustering.pseudo_label and spec.upstream.clustering.pseudo_label.prompt:
        errors.append((("upstream", "clustering", "pseudo_label"), "pseudo-labelling reads a prompt file, which "
                                                                     "the API does not accept; run it with the CLI"))
    crossfit = settings().crossfit_dir
    uploaded: set[str] | None = None  # read from the store only for a name that is not built in
    for where, ref in _task_refs(spec):
        if ref.path is not None:
            errors.append(((*where, "path"), "paths are not accepted over the API: upload the task with POST /tasks "
                                             "and name it"))
            continue
        if ref.name in packs.PACKS or (crossfit and ref.name in catalog.catalog() and (crossfit / ref.name).is_dir()):
            continue
        if uploaded is None:
            uploaded = {t.name for t in store.list_tasks(owner)}
        if ref.name not in uploaded:
            accepted = sorted(packs.PACKS) + sorted(uploaded)
            errors.append(((*where, "name"), f"unknown task {ref.name!r}; accepted: {', '.join(accepted)}"
                                             + (" and CrossFit's tasks" if crossfit else "")))
    if errors:
        raise SpecError("\n".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in errors), errors)
    return spec


def warnings(spec: JobSpec) -> list[str]:
    """What the service accepts but this host cannot fetch: packs whose dataset is no longer
    served and is not in its cache (a worker with the file placed by hand still runs them)."""
    seen, out = set(), []
    for where, ref in _task_refs(spec):
        if ref.path is None and ref.name not in seen and (why := packs.unfetchable(ref.name)):
            seen.add(ref.name)
            out.append(f"{'.'.join(map(str, where))}: {why}")
    return out


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


def materialize(store, owner: str, spec: JobSpec, backbone: bool = True) -> JobSpec:
    """The spec a worker runs: the backbone's location from the allowlist (unless `backbone` is
    False: aggregation needs none), and uploaded tasks written out of the store into the local
    cache and named by path."""
    location = settings().backbone_allowlist().get(spec.backbone) if backbone else spec.backbone
    if location is None:
        raise SpecError(f"backbone {spec.backbone!r} is no longer served here")

    def local(ref: TaskRef) -> TaskRef:
        row = store.get_task(owner, ref.name) if ref.name not in packs.PACKS else None
        if row is None:
            return ref

        def write(tmp: Path) -> None:
            tmp.mkdir()
            for filename, data in store.task_files(row.id).items():
                (tmp / Path(filename).name).write_bytes(data)
            (tmp / ".complete").write_text(row.id)

        # once: workers sharing the cache and running the same job's cells write it once between them
        directory = once(settings().cache_dir / "uploads" / row.id, lambda d: (d / ".complete").exists(), write)
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


# --- running a job (the worker's side) ---------------------------------------------------------
class Cancelled(Exception):
    """The job was cancelled; the step that notices stops where it is."""


class LeaseLost(Exception):
    """Another worker holds this step now (this one was silent past the lease, or the step was
    finished elsewhere): the step stops where it is and leaves the work to that worker."""


# Set by the worker's heartbeat when its lease is gone; one step per worker process at a time.
lease_lost = threading.Event()


class Reporter:
    """A progress callback for one unit of work: checks for cancellation and for a lost lease at
    every step (one indexed read), writes its step to the store at most every `every` seconds,
    and records metric points (losses, dev scores) as events."""

    def __init__(self, store, job_id: str, unit: str, every: float = 1.0):
        self.store, self.job_id, self.unit, self.every = store, job_id, unit, every
        self.last = 0.0

    def __call__(self, event: dict) -> None:
        step = event.get("step", 0)
        if "dev" in event:
            self.store.add_event(self.job_id, kind="metric", name=f"{self.unit}/dev", step=step, value=event["dev"])
        if event.get("diverged"):
            self.store.add_event(self.job_id, f"{self.unit} stopped at step {step}: its loss is {event['loss']:g} "
                                              f"(diverged); its best dev score so far, {event['best_dev']:.3f}, counts",
                                 step=step)
        if "message" in event:  # e.g. an upstream method that diverged and is left out
            self.store.add_event(self.job_id, event["message"], step=step)
        if self.store.is_cancelled(self.job_id):
            self.store.progress(self.job_id, self.unit, step)
            self.store.add_event(self.job_id, f"{self.unit} stopped at step {step}: cancelled", step=step)
            raise Cancelled(self.job_id)
        if lease_lost.is_set():
            self.store.add_event(self.job_id, f"{self.unit} stopped at step {step} on this worker: "
                                              "another worker holds it now", step=step)
            raise LeaseLost(self.unit)
        if time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            if "loss" in event:
                self.store.add_event(self.job_id, kind="metric", name=f"{self.unit}/loss", step=step, value=event["loss"])
            self.store.progress(self.job_id, self.unit, step)


class UnitRouter:
    """core.experiment's progress events name their phase; send each to its unit's Reporter."""

    def __init__(self, store, job_id: str):
        self.store, self.job_id, self.reporters = store, job_id, {}

    def __call__(self, event: dict) -> None:
        phase = event.get("phase")
        unit = "similarity" if phase == "similarity" else f"upstream/{event['method']}" if phase == "upstream" else None
        if unit is None:
            return
        if unit not in self.reporters:
            self.reporters[unit] = Reporter(self.store, self.job_id, unit)
            self.store.add_event(self.job_id, f"{unit} started")
        event = event | {"step": event.get("done", event["step"])} if unit == "similarity" else event
        self.reporters[unit](event)


def preload(value: str):
    """Load the backbone PRIMER_PRELOAD_BACKBONE names ("name" or "name:precision") and keep it
    for this process's jobs, as their first one would."""
    from core.backbones import DTYPES, BackboneError, load_kept

    name, _, precision = value.partition(":")
    precision, allowed = precision or "fp32", settings().backbone_allowlist()
    if name not in allowed or precision not in DTYPES:
        raise BackboneError(f"PRIMER_PRELOAD_BACKBONE={value!r}: accepted is an allowed backbone ({', '.join(allowed)}), "
                            f"optionally with ':' and a precision ({', '.join(DTYPES)})")
    return load_kept(allowed[name], device=settings().torch_device(), dtype=DTYPES[precision])


_prepared: dict = {}  # job id -> core.experiment.Prepared; one job per worker process at a time


def prepared(store, job):
    """The job's tasks, splits, backbone and model, loaded once per worker process; the
    backbone is kept for the next job that runs on the same one."""
    from core.backbones import load_kept
    from core.backbones.registry import first_use
    from core.experiment import prepare

    if job.id not in _prepared:
        _prepared.clear()
        spec = materialize(store, job.owner, parse_spec(job.spec))
        if note := first_use(spec.backbone):
            store.add_event(job.id, note)
        _prepared[job.id] = prepare(spec, lambda e: None, load_kept)
    return _prepared[job.id]


def start(store, job_id: str) -> list[Cell]:
    """The upstream step: learn every method's initial prompt and store it; the cells to run next."""
    from core.experiment import learn_inits, require_a_start
    from core.store import StoreCheckpoints

    job = store.get_job(job_id)
    if job is None or job.status in ("succeeded", "failed", "cancelled"):
        return []
    spec = parse_spec(job.spec)
    store.set_status(job_id, "running", phase="loading")
    store.add_event(job_id, f"job started: {len(cells(spec))} downstream runs")
    stamps = {m: upstream_inputs(store, job.owner, spec, m) for m in spec.upstream.methods} if spec.upstream else {}
    if spec.upstream and spec.upstream.reuse_starts:
        reuse_starts(store, job, stamps)
    prep = prepared(store, job)
    if spec.upstream:
        store.set_phase(job_id, "upstream")
    learned = learn_inits(prep, UnitRouter(store, job_id), StoreCheckpoints(store, job_id))
    for method, stamp in stamps.items():  # each is finished now: a later job may reuse it
        if stamp:
            store.stamp_checkpoint(job_id, f"upstream/{method}", stamp)
    require_a_start(learned)
    for method, prompt in learned.prompts.items():
        store.save_prompt(job, f"init/{method}", prompt, backbone=spec.backbone, algorithm=method)
    for method, result in learned.upstream.items():
        store.progress(job_id, f"upstream/{method}", result.steps, done=True)
        store.add_event(job_id, f"upstream/{method} finished: {result.steps} steps in {result.seconds:.0f} s")
    for method in learned.diverged:  # its event was sent when it stopped (UnitRouter)
        store.progress(job_id, f"upstream/{method}", 0, done=True)
        store.drop_units(job_id, f"downstream/{method}/")
    if learned.selection is not None:
        store.progress(job_id, "similarity", 0, done=True)
    if learned.clusters is not None:
        import tempfile

        from core.algorithms.metapt import plot_clusters

        c = learned.clusters
        with tempfile.TemporaryDirectory() as tmp:
            path = plot_clusters(c.examples, c.ids, Path(tmp) / "clusters.png", method=spec.upstream.clustering.plot,
                                 title=f"MetaPT meta-tasks: {spec.upstream.clustering.method}")
            store.save_artifact(job_id, "clusters.png", "image/png", path.read_bytes())
    from dataclasses import asdict

    store.save_checkpoint(job_id, "upstream/summary", {
        "selection": json.dumps(asdict(learned.selection)) if learned.selection else "",
        "clusters": json.dumps(learned.clusters.summary) if learned.clusters else "",
        "pseudo": json.dumps(learned.clusters.pseudo) if learned.clusters else "",
        "diverged": json.dumps(learned.diverged)})
    store.set_phase(job_id, "downstream")
    return [c for c in cells(spec) if c.method not in learned.diverged]


def _upload(store, owner: str, task: str) -> str | None:
    """An uploaded task's id (an upload never changes), None for a task pack."""
    row = store.get_task(owner, task) if task not in packs.PACKS else None
    return row.id if row else None


def _served(spec: JobSpec, fields: dict) -> str:
    """A digest of `fields` (core.experiment.depends_on's) with the backbone as this service
    serves that name."""
    from core.experiment import digest

    fields["backbone"] = settings().backbone_allowlist().get(spec.backbone, spec.backbone)
    return digest(fields)


def cell_inputs(store, owner: str, spec: JobSpec, cell: Cell, start: str | None = None) -> str:
    """A digest of what a downstream cell computes from: the spec fields core.experiment.inputs
    names for its task (but the grid: the cell is one seed and one lr), the backbone as served, an
    uploaded task by its id and, for a meta-learned method, its start (`start`: the sha256 of
    the stored init/<method> prompt)."""
    from core.experiment import depends_on

    fields = depends_on(spec, f"downstream/{cell.method}/{cell.task}")
    fields["downstream"] = {k: v for k, v in fields["downstream"].items() if k not in ("seeds", "lrs", "ft_lrs")}
    fields["upload"] = _upload(store, owner, cell.task)
    if start is not None:
        fields["start"] = start
    return _served(spec, fields)


def upstream_inputs(store, owner: str, spec: JobSpec, method: str) -> str | None:
    """A digest of what an upstream method's meta-training computes from: the spec fields
    core.experiment.inputs names for it, the backbone as served and each uploaded source by its
    id; None for a method that also depends on the targets (chosen sources, MetaPT's pooled data)."""
    from core.experiment import POOLED, depends_on

    if method in POOLED or isinstance(spec.upstream.sources, SourceSelection):
        return None
    fields = depends_on(spec, f"upstream/{method}")
    fields["uploads"] = [_upload(store, owner, ref.name) for ref in spec.upstream.source_refs]
    return _served(spec, fields)


def reuse_starts(store, job, stamps: dict[str, str | None]) -> None:
    """upstream.reuse_starts: each method's finished meta-training that one of the owner's earlier
    jobs did from the same inputs (`stamps`: upstream_inputs per method) becomes this job's, so
    learn_inits takes it untrained."""
    for method, stamp in stamps.items():
        key = f"upstream/{method}"
        if stamp is None or store.load_checkpoint(job.id, key) is not None:  # not reusable, or begun here
            continue
        if (earlier := store.find_checkpoint(job.owner, key, stamp)) is None:
            continue
        origin = earlier[1].get("reused_from") or earlier[0]
        store.save_checkpoint(job.id, key, {**earlier[1], "reused_from": origin})
        store.add_event(job.id, f"{key} reused from {origin}, whose meta-training had the same inputs")


def run_cell(store, job_id: str, cell: Cell) -> None:
    """One downstream run; nothing to do if its score is stored already (a redelivery). A run
    the owner made before from the same inputs is taken as it is if the spec asks for it: a PT
    or FT run with downstream.reuse_baselines, a meta-learned method's run (from a start with
    the same bytes, as a reused start has) with upstream.reuse_starts."""
    from core.experiment import run_cell as train_cell
    from core.prompts import prompt_bytes

    job = store.get_job(job_id)
    if job is None or job.status in ("failed", "cancelled"):
        raise Cancelled(job_id)
    stored = store.get_score(job_id, cell.method, cell.task, cell.seed, cell.lr)
    if stored is not None:
        store.progress(job_id, cell.unit, stored.steps, done=True)  # its worker may have died before saying so
        return
    spec = parse_spec(job.spec)
    start = None if cell.method == "ft" else store.job_prompt(job_id, f"init/{cell.method}")
    learned = cell.method not in BASELINES
    stamp = cell_inputs(store, job.owner, spec, cell, start.sha256 if learned else None)
    reuse = spec.upstream.reuse_starts if learned else spec.downstream.reuse_baselines
    earlier = store.find_score(job.owner, stamp, cell.method, cell.task, cell.seed, cell.lr) if reuse else None
    if earlier is not None:  # before the backbone is loaded: a reused run costs no model at all
        store.save_score(job_id=job_id, **{c: getattr(earlier, c) for c in (
            "method", "task", "seed", "lr", "metric", "dev", "test", "best_step", "steps", "seconds", "curve",
            "prompt", "inputs")}, reused_from=earlier.reused_from or earlier.job_id)
        store.add_event(job_id, f"{cell.unit} reused from {earlier.reused_from or earlier.job_id}, whose run had "
                                "the same inputs")
        store.progress(job_id, cell.unit, earlier.steps, done=True)
        return
    prep = prepared(store, job)
    init = None if start is None else store.prompt_tensor(start)
    run = train_cell(prep, cell.method, cell.task, cell.seed, cell.lr, init, Reporter(store, job_id, cell.unit))
    store.save_score(job_id=job_id, method=cell.method, task=cell.task, seed=cell.seed, lr=cell.lr,
                     metric=prep.targets[cell.task].info.metric, dev=run.best_dev, test=run.test,
                     best_step=run.best_step, steps=run.steps, seconds=run.seconds, curve=run.curve,
                     prompt=prompt_bytes(run.prompt) if run.prompt is not None else None, inputs=stamp)
    store.progress(job_id, cell.unit, run.steps, done=True)


def aggregate(store, job_id: str) -> None:
    """Pick each seed's best-dev lr, score methods against PT, store results, prompts and report."""
    import tempfile

    from core.algorithms.pt import RunResult
    from core.algorithms.upstream import UpstreamResult
    from core.experiment import Clusters, Results, task_result
    from core.prompts import prompt_from_bytes
    from core.report import percent, write
    from core.similarity import Selection
    from core.tasks import load_task

    job = store.get_job(job_id)
    if job is None or job.status in ("succeeded", "failed", "cancelled"):
        return
    store.set_phase(job_id, "aggregate")
    spec = parse_spec(job.spec)
    local = materialize(store, job.owner, spec, backbone=False)  # the scores are in: a backbone dropped since is no matter
    d = spec.downstream
    summary = store.load_checkpoint(job_id, "upstream/summary") or {}
    diverged = json.loads(summary.get("diverged") or "{}")
    runs: dict[tuple[str, str], list[RunResult]] = {}
    for row in store.scores(job_id):
        runs.setdefault((row.task, row.method), []).append(RunResult(
            row.seed, row.lr, row.dev, row.best_step, row.test, row.steps, row.seconds, row.curve,
            prompt_from_bytes(row.prompt) if row.prompt is not None else None))
    tasks = {}
    for ref in local.targets:
        task = load_task(ref, d.shots)
        tasks[ref.name] = {m: task_result(task, d.seeds, d.ft_lrs if m == "ft" else d.lrs, runs[(ref.name, m)])
                           for m in spec.methods if m not in diverged}
    upstream = {}
    for m in (spec.upstream.methods if spec.upstream else []):
        if m not in diverged:
            state = store.load_checkpoint(job_id, f"upstream/{m}")
            upstream[m] = UpstreamResult(m, state["prompt"], state["step"], state["seconds"], state["curve"])
    selection = Selection(**json.loads(summary["selection"])) if summary.get("selection") else None
    clusters = (Clusters([], [], {}, json.loads(summary["clusters"]), json.loads(summary.get("pseudo") or "null"))
                if summary.get("clusters") else None)
    results = Results(spec, tasks, upstream, {}, 0.0, selection, clusters, diverged)
    if job.started_at is not None:
        from core.store.models import now

        started = job.started_at if job.started_at.tzinfo else job.started_at.replace(tzinfo=now().tzinfo)
        results.seconds = (now() - started).total_seconds()

    gains = results.gains()
    rows = [{"method": m, "task": t, "metric": r.metric, "mean": r.mean, "std": r.std,
             "relative_gain": gains[m][t] if m in gains else None}
            for t, per in tasks.items() for m, r in per.items()]
    store.save_results(job_id, rows, results.arg(), diverged)
    for t, per in tasks.items():
        for m, r in per.items():
            for run in r.best:
                if run.prompt is not None:
                    store.save_prompt(job, f"{t}/{m}/seed{run.seed}", run.prompt, backbone=spec.backbone,
                                      algorithm=m, task=t, seed=run.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for path in write(results, Path(tmp)):
            if path.parent == Path(tmp):
                kind = {".png": "image/png", ".json": "application/json", ".md": "text/markdown"}[path.suffix]
                store.save_artifact(job_id, path.name, kind, path.read_bytes())
    if diverged:
        store.add_event(job_id, f"left out: {', '.join(diverged)} (meta-training diverged; no initial prompt)")
    if left := results.left_out():
        store.add_event(job_id, f"left out of ARG: {', '.join(left)} (PT scored 0, so no relative gain is defined)")
    store.add_event(job_id, "results: " + ", ".join(f"ARG {m} {percent(v, 1, unit='%')}" for m, v in results.arg().items()))
    store.set_status(job_id, "succeeded", phase="done")


# --- sending steps, and sending them again -----------------------------------------------------
START = ("start", "primer.start")  # a job's first step, and the task that runs it


def send(store, transport, job_id: str, step: str, task: str, args: list, resend=None) -> bool:
    """Record the step in the store, then hand its message to the broker (`transport(task,
    args, message_id)`); False if it needed no message (sent before, or done). A step recorded
    but not in the broker (a send that failed, a broker restarted empty) is sent again by
    `reconcile`."""
    message_id = store.dispatch(job_id, step, task, args, resend)
    if message_id is None:
        return False
    transport(task, args, message_id)
    return True


def send_cell(store, transport, job_id: str, cell: Cell) -> bool:
    from dataclasses import asdict

    return send(store, transport, job_id, f"cell:{cell.unit}", "primer.cell", [job_id, asdict(cell)])


def send_aggregate_if_done(store, transport, job_id: str) -> bool:
    """After a downstream run: the job's aggregation, once its last run is done (sent once)."""
    if store.downstream_left(job_id):
        return False
    return send(store, transport, job_id, "aggregate", "primer.aggregate", [job_id])


def reconcile(store, transport, pending: set[str] | None, lease: float | None = None, grace: float | None = None,
              max_attempts: int | None = None) -> list[str]:
    """One round of the reconciler; what it did, one line each.

    - A step whose worker has not beaten for `lease` seconds is sent again, or, once it has been
      taken `max_attempts` times, its job fails with the reason.
    - A step sent more than `grace` seconds ago, taken by no worker, whose message the broker no
      longer holds (`pending`: the ids it holds; None if unknown) is sent again.
    - A queued job with no step ever recorded as sent is sent; a job whose downstream runs
      are all done but whose aggregation was never sent gets it.
    """
    from core.store.models import now

    cfg = settings()
    lease = cfg.lease_seconds if lease is None else lease
    grace = cfg.reconcile_seconds if grace is None else grace
    max_attempts = cfg.max_attempts if max_attempts is None else max_attempts
    did, t = [], now()

    def age(at):
        return (t - (at if at.tzinfo else at.replace(tzinfo=t.tzinfo))).total_seconds()

    for job in store.unsent_jobs(grace):
        if send(store, transport, job.id, *START, [job.id]):
            did.append(f"{job.id}: stored but never sent; sent")
    for d in store.open_dispatches():
        lost = d.worker is not None and age(d.heartbeat_at) > lease
        missing = (d.worker is None and pending is not None and d.message_id not in pending
                   and age(d.sent_at) > grace)
        if lost and d.attempts >= max_attempts:
            message = (f"{d.step} lost its worker {d.attempts} times (no heartbeat for {lease:g} s); "
                       f"given up after {max_attempts} attempts")
            if store.set_status(d.job_id, "failed", phase="failed", error_code="worker_lost", error_message=message):
                store.add_event(d.job_id, f"failed: {message}")
            store.release(d.job_id, d.step)
            did.append(f"{d.job_id}: {message}")
        elif (lost or missing) and send(store, transport, d.job_id, d.step, d.task, d.args, resend=d):
            why = (f"its worker {d.worker} stopped beating {age(d.heartbeat_at):.0f} s ago" if lost
                   else "its message is no longer in the broker")
            store.add_event(d.job_id, f"{d.step} sent again: {why}")
            did.append(f"{d.job_id} {d.step}: {why}; sent again")
    for job_id in store.awaiting_aggregate():
        if send(store, transport, job_id, "aggregate", "primer.aggregate", [job_id]):
            did.append(f"{job_id}: every downstream run done, aggregation never sent; sent")
    return did
