"""Does the bench's CPU peak of a figure depend on what ran before it in the process? Ranking's
peak (the bench's 128 test examples, batches of 32), measured as the bench measures it (the
largest rise of the resident set, allocations over 64 KiB mmapped), on a fresh process after one
warm-up; then again after the 30 steps of prompt tuning that the bench's evaluation figure runs
first, with glibc's allocator as the bench leaves it for timed work (`plain`: 32 MiB mmap
threshold) or with every allocation over 64 KiB mmapped during the tuning too (`mmap`).

  .venv/bin/python scripts/eval_peak.py [plain|mmap] [fp32|bf16]
"""
import contextlib
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench import figures  # noqa: E402
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import PeakMemory, fixed_allocator, live_resident_set, rss  # noqa: E402

mode = sys.argv[1] if len(sys.argv) > 1 else "plain"
dtype = sys.argv[2] if len(sys.argv) > 2 else "bf16"
fixed_allocator()
s = setup(parse(["--parts", "eval", "--dtype", dtype]))
examples = s.test[:128]


def rank():
    s.model.rank(examples, [s.options] * len(examples), batch_size=32)


def peak(when: str) -> None:
    with live_resident_set(), PeakMemory(torch.device("cpu")) as mem:
        rank()
    print(f"{dtype}, {when}: peak {mem.peak / 2**20:.1f} MB (resident set {rss() / 2**20:.0f} MB)", flush=True)


rank()
for _ in range(2):
    peak("fresh")
with live_resident_set() if mode == "mmap" else contextlib.nullcontext():
    figures._tuned(s, 30)
gc.collect()
for _ in range(2):
    peak(f"after the tuning ({mode})")
