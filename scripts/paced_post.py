"""Is POST /jobs's paced p99 spiky on its own? The bench's service (real uvicorn, Postgres,
Redis; no worker), then the bench's paced POST load (50 clients at 1 request/s each, 10 s) four
times in a row, with no closed-loop load before: requests, p50, p99 and the slowest, in ms.
Extra uvicorn options after the script's name (e.g. `--workers 2`).

  .venv/bin/python scripts/paced_post.py [uvicorn options]
"""
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.api import Service, load, spec  # noqa: E402

svc = Service("smollm2-135m", sys.argv[1:])
try:
    _, secret = svc.store.create_key("bench")
    print("| run | requests | p50 ms | p99 ms | max ms |\n|---|---|---|---|---|")
    for run in range(4):
        async def post(http, i, run=run):
            return await http.post("/jobs", json=spec(svc.backbone, run * 100_000 + i))
        f = asyncio.run(load(svc.url, secret, 50, 10.0, post, 1.0))
        print(f"| {run + 1} | {f['requests']} | {f['p50_ms']} | {f['p99_ms']} | {f['max_ms']} |", flush=True)
finally:
    svc.close()
