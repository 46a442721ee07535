"""How long does one Postgres commit take on this machine? 600 single-row inserts into a
scratch table of the local `test` database, each committed, 10 ms apart; p50, p99 and the
longest in ms. A POST /jobs commits twice: this is the disk's share of its latency.

  .venv/bin/python scripts/commit_latency.py
"""
import time

import psycopg

with psycopg.connect("host=127.0.0.1 user=postgres dbname=test", autocommit=True) as conn:
    conn.execute("DROP TABLE IF EXISTS commit_probe")
    conn.execute("CREATE TABLE commit_probe (x int)")  # not TEMP: temporary tables skip the WAL
    conn.autocommit = False
    ms = []
    for i in range(600):
        start = time.perf_counter()
        conn.execute("INSERT INTO commit_probe VALUES (%s)", (i,))
        conn.commit()
        ms.append((time.perf_counter() - start) * 1000)
        time.sleep(0.01)
    conn.autocommit = True
    conn.execute("DROP TABLE commit_probe")
ms.sort()
print(f"commit p50 {ms[len(ms) // 2]:.2f} ms, p99 {ms[int(len(ms) * 0.99) - 1]:.2f} ms, max {ms[-1]:.2f} ms")
