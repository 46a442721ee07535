"""Peak memory and seconds of ranking the bench's 128 test examples in batches of 32 (primer
alone, after one warm-up), measured as the bench measures a CPU figure's peak: the largest rise
of the resident set, every allocation over 64 KiB mmapped so that freeing it shows.

  .venv/bin/python scripts/rank_peak.py [backbone] [fp32|bf16]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import PeakMemory, fixed_allocator, live_resident_set  # noqa: E402

backbone = sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m"
dtype = sys.argv[2] if len(sys.argv) > 2 else "fp32"
s = setup(parse(["--parts", "eval", "--backbone", backbone, "--dtype", dtype]))
examples, options = s.test[:128], [s.options] * 128
fixed_allocator()
with torch.no_grad():
    s.model.rank(examples, options, 32)
    for r in range(2):
        t = time.perf_counter()
        with live_resident_set(), PeakMemory(torch.device("cpu")) as mem:
            s.model.rank(examples, options, 32)
        print(f"{backbone} {dtype}: peak {mem.peak / 2**20:.1f} MB, {time.perf_counter() - t:.2f} s", flush=True)
