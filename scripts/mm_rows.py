"""How fast do a CPU's fp32 matrix multiplies run at the row counts of a MAML episode's packs?
GFLOP/s of x @ W.T for SmolLM2-135M's MLP shape (576 -> 1536), x of 32 to 472 rows: over 60
different weight matrices in turn (as a forward meets 30 layers' weights, from memory rather
than cache), and with one weight matrix reused (hot). Median-free: the mean of 5 passes after 2.

  .venv/bin/python scripts/mm_rows.py [threads, default 2]
"""
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
LAYERS = 60
weights = [torch.randn(1536, 576) for _ in range(LAYERS)]
print(f"| rows | GFLOP/s, {LAYERS} weights in turn | GFLOP/s, one weight reused |\n|---|---|---|")
for rows in (32, 59, 118, 236, 472):
    x = torch.randn(rows, 576)
    flop = 2 * rows * 576 * 1536

    def rate(ws):
        for _ in range(2):
            for w in ws:
                x @ w.t()
        start = time.perf_counter()
        for _ in range(5):
            for w in ws:
                x @ w.t()
        return flop * 5 * len(ws) / (time.perf_counter() - start) / 1e9

    print(f"| {rows} | {rate(weights):.0f} | {rate([weights[0]] * LAYERS):.0f} |")
