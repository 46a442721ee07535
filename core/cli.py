"""The `primer` command line: the library's commands (run, tasks, data) and the service's
(serve, submit, jobs, keys). Only the service commands touch the api and worker packages, and
only when they run."""
from __future__ import annotations

import sys
from pathlib import Path

import typer

app = typer.Typer(help="primer: learned initializations for soft prompts.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
tasks_app = typer.Typer(help="The task catalog.", no_args_is_help=True)
backbones_app = typer.Typer(help="Registered backbones.", no_args_is_help=True)
data_app = typer.Typer(help="Task packs built from real datasets.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(backbones_app, name="backbones")
app.add_typer(data_app, name="data")
jobs_app = typer.Typer(help="Jobs on a primer service.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys of this machine's store (run where the service's database is).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.add_typer(keys_app, name="keys")


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def user_errors():
    """The errors a user causes (a spec, a name, a file) or a download that failed: one message,
    exit code 2, no traceback. Anything else is primer's own fault and keeps its traceback."""
    from core.errors import UserError
    from core.fetch import FetchError

    return (UserError, FetchError)


def checkpoints_for(out: Path, job, fresh: bool):
    """out/checkpoints: a rerun resumes there, and reuses each checkpoint whose inputs its spec
    left as they were (core.experiment.inputs); `fresh` discards them all first."""
    import json
    import shutil

    from core.experiment import DirCheckpoints, computed

    directory, spec = out / "checkpoints", json.dumps(job.model_dump(), sort_keys=True)
    if fresh and directory.exists():
        shutil.rmtree(directory)
    written = directory / "spec.json"
    trusted = written.exists() and computed(json.loads(written.read_text())) == computed(json.loads(spec))
    return DirCheckpoints(directory, header=spec, trusted=trusted)


@app.command()
def run(spec: Path = typer.Argument(..., help="job spec (YAML)"),
        out: Path = typer.Option(None, help="output directory (default: runs/<spec name>)"),
        fresh: bool = typer.Option(False, help="discard every checkpoint in the output directory first")):
    """Run a job spec end to end: results.json, results.md, plots and prompts. Rerunning with the
    same --out resumes from its checkpoints, and after a change to the spec still reuses those
    whose inputs the change left alone (another method's lr, an added target or method)."""
    from tqdm import tqdm

    from core import experiment, report, sweep
    from core.spec import load_spec

    try:
        job = load_spec(spec)
        if job.sweep:
            sweep.variants(job)  # every variant valid before anything runs
        out = out or Path("runs") / job.name
        checkpoints = checkpoints_for(out, job, fresh)
        bar = tqdm(total=1, unit="step", dynamic_ncols=True, file=sys.stderr)
        shown_unit: list = [None]

        def progress(event: dict) -> None:
            if "phase" not in event:  # a message alone (a checkpoint made from other inputs)
                bar.write(event["message"], file=sys.stderr)
                return
            # a new unit of work (an upstream method, the downstream grid) restarts the bar's clock,
            # so its elapsed time and s/step are that unit's own
            unit = (event["phase"], None if "grand_total" in event else event.get("method"))
            if unit != shown_unit[0]:
                shown_unit[0] = unit
                bar.reset()
            bar.set_description(f"{event['phase']} {event.get('method', '')}".strip(), refresh=False)
            bar.total, bar.n = event.get("grand_total", event["total"]), event.get("done", event["step"])
            shown = {k: event[k] for k in ("task", "seed", "lr") if k in event}
            shown.update({k: f"{event[k]:.3f}" for k in ("loss", "best_dev") if k in event})
            bar.set_postfix(shown, refresh=False)
            bar.refresh()
            if "message" in event:  # e.g. an upstream method that diverged and is left out
                bar.write(event["message"], file=sys.stderr)

        results = (sweep.run_sweep if job.sweep else experiment.run)(job, progress, checkpoints)
        bar.close()
    except user_errors() as e:
        fail(str(e))
    if job.sweep:
        files = report.write_sweep(results, out)
        typer.echo(report.sweep_markdown(results))
    else:
        files = report.write(results, out)
        typer.echo(report.markdown(results))
    typer.echo(f"wrote {len(files)} files to {out}/")


@tasks_app.command("list")
def tasks_list(partition: str = typer.Option(None, help="only the tasks of this partition")):
    """List catalog tasks: name, type, metric."""
    from core.tasks import TaskError, catalog

    try:
        names = None
        if partition:
            p = catalog.partition(partition)
            names = set(p.train) | set(p.dev) | set(p.test)
    except TaskError as e:
        fail(str(e))
    for name, info in sorted(catalog.catalog().items()):
        if names is None or name in names:
            typer.echo(f"{name:40s} {info.type:16s} {info.metric}")


@tasks_app.command("show")
def tasks_show(name: str):
    """Show one task's catalog entry."""
    from core.tasks import TaskError, catalog, packs

    try:
        info = catalog.task_info(name)
    except TaskError as e:
        fail(str(e))
    typer.echo(f"name:    {info.name}\ntype:    {info.type}\nmetric:  {info.metric}")
    if info.options:
        typer.echo(f"options: {', '.join(info.options)}")
    if name in packs.PACKS:
        pack = packs.PACKS[name]
        typer.echo(f"pack:    {pack.dist.name}=={pack.dist.version} {pack.member}")
        if pack.dist.gone:
            typer.echo(f"note:    {pack.dist.gone}")


@tasks_app.command("partitions")
def tasks_partitions():
    """List the MPT paper's partitions (source -> target task sets)."""
    from core.tasks import catalog

    for name, p in sorted(catalog.partitions().items()):
        typer.echo(f"{name:14s} {len(p.train):4d} source  {len(p.test):3d} target  {p.description}")


@backbones_app.command("list")
def backbones_list():
    """List registered backbones (any local directory, .gguf file or hub name works too)."""
    from core.backbones import REGISTRY

    for name, entry in REGISTRY.items():
        typer.echo(f"{name:16s} {entry.description}  [{', '.join(f'{d.name}=={d.version}' for d, _ in entry.pieces())}]")


@backbones_app.command("prepare")
def backbones_prepare(names: list[str] = typer.Argument(None, help="registered backbones (default: those in "
                                                                    "PRIMER_BACKBONES)")):
    """Fetch and convert registered backbones to the fp32 cache now, so that no job waits for it."""
    import time

    from core.backbones import REGISTRY
    from core.backbones.registry import cached_dir
    from core.settings import settings

    names = names or [loc for loc in settings().backbone_allowlist().values() if loc in REGISTRY]
    for name in names:
        if name not in REGISTRY:
            fail(f"{name!r} is not a registered backbone; accepted: {', '.join(REGISTRY)} "
                 "(a directory or .gguf file is used as it is, nothing to prepare)")
    for name in names:
        start = time.monotonic()
        try:
            path = cached_dir(name)
        except user_errors() as e:
            fail(str(e))
        typer.echo(f"{name}: {path} ({time.monotonic() - start:.1f} s)")


@data_app.command("build")
def data_build(names: list[str] = typer.Argument(None, help="pack tasks (default: all)")):
    """Fetch pack datasets (checked by sha256) and write CrossFit-format k-shot splits. A pack
    that cannot be built is reported and the others are built all the same."""
    from core.tasks import packs

    failed = []
    for name in names or sorted(packs.PACKS):
        try:
            typer.echo(f"{name}: {packs.build(name)}")
        except user_errors() as e:
            failed.append(name)
            typer.echo(f"error: {e}", err=True)
    if failed:
        fail(f"not built: {', '.join(failed)} (the reasons are above)")


# --- the service -------------------------------------------------------------------------------
def _store():
    from core.settings import settings
    from core.store import Store

    store = Store(settings().db_url())
    store.upgrade()
    return store


@app.command()
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8000),
          workers: int = typer.Option(1, help="Celery worker processes to start here (0: none)")):
    """Run the API and workers on this machine. With no settings: SQLite store and SQLite broker
    under PRIMER_CACHE_DIR, and an admin key written to PRIMER_CACHE_DIR/api_key for the client."""
    import os
    import signal
    import subprocess

    import uvicorn

    from core.settings import settings

    store = _store()
    key_file = settings().cache_dir / "api_key"
    if not settings().api_key and not key_file.exists():
        _, secret = store.create_key("local admin", admin=True)
        key_file.touch(mode=0o600)
        key_file.write_text(secret + "\n")
        typer.echo(f"admin key written to {key_file}", err=True)
    logs = settings().cache_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Each worker in a session of its own: a signal to serve's process group (a terminal's, a
    # supervisor's) reaches serve only, which stops each worker through its main process; sent to
    # a worker's pool processes too, it can kill the one holding the pool's lock and hang the worker.
    procs = [subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", "upstream,downstream",
                               "--concurrency", "1", "-n", f"primer{i}-{os.getpid()}@%h", "--loglevel", "info"],
                              stdout=open(logs / f"worker{i}.log", "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True, preexec_fn=_stop_with_parent)
             for i in range(workers)]
    typer.echo(f"primer API on http://{host}:{port} (docs: /docs), {workers} worker(s), store {store.engine.url!r}, "
               f"worker logs in {logs}", err=True)
    # uvicorn stops on SIGTERM, then raises it again under the handler it found: this one, so that
    # the workers are stopped below instead of left running when serve dies of the signal.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run("api.app:create_app", factory=True, host=host, port=port, log_level="warning")
    finally:
        for p in procs:
            p.terminate()  # a warm shutdown: the step under way finishes, or is sent again later
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _stop_with_parent() -> None:
    """In a worker serve starts, before it runs: SIGTERM when serve dies, even of SIGKILL (Linux)."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _client(url: str | None, key: str | None):
    from api.client import Client

    return Client(url, key)


def _results_table(results: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in results["tasks"]))
    tasks = list(dict.fromkeys(r["task"] for r in results["tasks"]))
    cell = {(r["task"], r["method"]): r for r in results["tasks"]}
    lines = ["| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for t in tasks:
        shown = []
        for m in methods:
            r = cell[(t, m)]
            gain = "" if r["relative_gain"] is None else f" ({100 * r['relative_gain']:+.1f}%)"
            shown.append(f"{r['mean']:.3f} ± {r['std']:.3f}{gain}")
        lines.append(f"| {t} | " + " | ".join(shown) + " |")
    arg = lambda v: "n/a" if v is None else f"{v:+.1f}%"  # noqa: E731 (None: PT scored 0 on every task)
    lines.append("| **ARG** | " + " | ".join(arg(results["arg"][m]) if m in results["arg"] else "-" for m in methods) + " |")
    lines += [f"left out: {why}" for why in results.get("diverged", {}).values()]  # an API from before has none
    return "\n".join(lines)


@app.command()
def submit(spec: Path = typer.Argument(..., help="job spec (YAML)"),
           wait: bool = typer.Option(False, help="follow the job with a progress bar until it ends"),
           download: Path = typer.Option(None, help="with --wait: save the job's initial prompts here"),
           idempotency_key: str = typer.Option(None, help="resubmitting with the same key returns the same job"),
           url: str = typer.Option(None, help="the API (default: PRIMER_API_URL)"),
           key: str = typer.Option(None, help="API key (default: PRIMER_API_KEY or the local admin key)")):
    """Submit a job spec to a primer service."""
    import time

    import yaml
    from tqdm import tqdm

    from api.client import ClientError

    if not spec.is_file():
        fail(f"spec file {spec} does not exist")
    try:
        body = yaml.safe_load(spec.read_text())
    except yaml.YAMLError as e:
        fail(f"{spec} is not valid YAML: {e}")
    client = _client(url, key)
    try:
        job = client.submit(body, idempotency_key)
        typer.echo(f"job {job['id']}: {job['status']}")
        for w in job.get("warnings", []):
            typer.echo(f"warning: {w}", err=True)
        if not wait:
            return
        bar = tqdm(total=max(job["total"], 1), unit="step", dynamic_ncols=True, file=sys.stderr)
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.job(job["id"])
            bar.total, bar.n = max(job["total"], 1), job["step"]
            bar.set_description(job["phase"], refresh=False)
            bar.refresh()
        bar.close()
        typer.echo(f"job {job['id']}: {job['status']}")
        if job["status"] != "succeeded":
            error = job.get("error") or {}
            fail(f"job {job['id']} {job['status']}: {error.get('message', '')}".rstrip(": "))
        typer.echo(_results_table(client.results(job["id"])))
        typer.echo(f"report: {str(client.http.base_url).rstrip('/')}/jobs/{job['id']}/report (send the API key)")
        if download:
            download.mkdir(parents=True, exist_ok=True)
            for p in client.prompts(job["id"]):
                if p["name"].startswith("init/"):
                    path = download / f"{p['name'].replace('/', '.')}.safetensors"
                    path.write_bytes(client.download(p["id"]))
                    typer.echo(f"prompt {p['id']} ({p['name']}, {p['shape']}) -> {path}")
    except ClientError as e:
        fail(str(e))


@jobs_app.command("list")
def jobs_list(status: str = typer.Option(None), url: str = typer.Option(None), key: str = typer.Option(None)):
    from api.client import ClientError

    try:
        for j in _client(url, key).jobs(status):
            typer.echo(f"{j['id']}  {j['status']:<9}  {j['phase']:<10}  {j['step']}/{j['total']}  {j['name']}")
    except ClientError as e:
        fail(str(e))


@jobs_app.command("show")
def jobs_show(job_id: str, url: str = typer.Option(None), key: str = typer.Option(None)):
    import json

    from api.client import ClientError

    try:
        client = _client(url, key)
        job = client.job(job_id)
        typer.echo(json.dumps({k: v for k, v in job.items() if k != "spec"}, indent=2))
        if job["status"] == "succeeded":
            typer.echo(_results_table(client.results(job_id)))
    except ClientError as e:
        fail(str(e))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: str = typer.Option(None), key: str = typer.Option(None)):
    from api.client import ClientError

    try:
        typer.echo(f"job {job_id}: {_client(url, key).cancel(job_id)['status']}")
    except ClientError as e:
        fail(str(e))


@keys_app.command("create")
def keys_create(name: str, admin: bool = typer.Option(False, help="sees and manages every key's jobs")):
    """Create an API key; its secret is printed once and only its hash is stored."""
    key, secret = _store().create_key(name, admin)
    typer.echo(f"{key.id}  {secret}")


@keys_app.command("list")
def keys_list():
    for k in _store().list_keys():
        state = "revoked" if k.revoked_at else "admin" if k.admin else "user"
        typer.echo(f"{k.id}  {k.prefix}…  {state:<7}  {k.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: str):
    if not _store().revoke_key(key_id):
        fail(f"no active key {key_id!r}; see `primer keys list`")
    typer.echo(f"{key_id} revoked")


if __name__ == "__main__":
    app()
