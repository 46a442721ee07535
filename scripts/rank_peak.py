"""Peak memory and seconds of ranking the bench's 128 test examples in batches of 32 (primer
alone, after one warm-up), two ways: the largest rise of the live tensors' bytes (the bench's
CPU peak since 2026-12-07) and of the resident set, every allocation over 64 KiB mmapped so
that freeing it shows (the bench's CPU peak before).

With a third argument, again after the 30 steps of prompt tuning that the bench's evaluation
figure runs first: does the peak depend on what ran before it in the process? `plain`: the
tuning under glibc's allocator as the bench leaves it for timed work (32 MiB mmap threshold);
`mmap`: every allocation over 64 KiB mmapped during the tuning too.

  .venv/bin/python scripts/rank_peak.py [backbone] [fp32|bf16] [plain|mmap]
"""
import contextlib
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench import figures  # noqa: E402
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import PeakMemory, fixed_allocator, live_resident_set, rss  # noqa: E402

backbone = sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m"
dtype = sys.argv[2] if len(sys.argv) > 2 else "fp32"
after = sys.argv[3] if len(sys.argv) > 3 else None
s = setup(parse(["--parts", "eval", "--backbone", backbone, "--dtype", dtype]))
examples, options = s.test[:128], [s.options] * 128
fixed_allocator()


def peaks(when: str) -> None:
    for resident in (False, False, True, True):
        t = time.perf_counter()
        with torch.no_grad(), PeakMemory(torch.device("cpu"), resident) as mem:
            s.model.rank(examples, options, 32)
        print(f"{backbone} {dtype}, {when}: peak of the {mem.of} {mem.peak / 2**20:.1f} MB, "
              f"{time.perf_counter() - t:.2f} s (resident set {rss() / 2**20:.0f} MB)", flush=True)


with torch.no_grad():
    s.model.rank(examples, options, 32)
peaks("fresh")
if after:
    with live_resident_set() if after == "mmap" else contextlib.nullcontext():
        figures._tuned(s, 30)
    gc.collect()
    peaks(f"after the tuning ({after})")
