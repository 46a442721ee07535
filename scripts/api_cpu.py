"""CPU time the API process spends per request: the bench's service (real uvicorn, Postgres,
Redis; no worker), then 400 sequential requests of each kind, reading the uvicorn process's
user + system time from /proc before and after. One client, one request at a time: no queueing,
only the work. Extra uvicorn options after the script's name (e.g. `--http h11 --loop asyncio`).

  .venv/bin/python scripts/api_cpu.py [uvicorn options]
"""
import os
import sys
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
import bench.api as B  # noqa: E402

N = 400


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


svc = B.Service("smollm2-135m", sys.argv[1:])
try:
    _, secret = svc.store.create_key("bench")
    pid = svc.procs[0].pid
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {secret}"}) as http:
        for i in range(50):  # warm-up, and a job to read
            job_id = http.post("/jobs", json=B.spec(svc.backbone, i)).raise_for_status().json()["id"]
        print("| request | API CPU ms per request |\n|---|---|")
        for name, send in (("POST /jobs", lambda i: http.post("/jobs", json=B.spec(svc.backbone, 1000 + i))),
                           ("GET /jobs/{id}", lambda i: http.get(f"/jobs/{job_id}")),
                           ("GET /healthz (no key, no store)", lambda i: http.get("/healthz"))):
            before = cpu_seconds(pid)
            for i in range(N):
                send(i).raise_for_status()
            print(f"| {name} | {1000 * (cpu_seconds(pid) - before) / N:.2f} |", flush=True)
finally:
    svc.close()
