"""Timing and peak memory: warm-up, then the median of several timed repeats, the two sides of a
figure taking turns; then peak memory, over one more run of the same work, as the largest rise
of the bytes held by live tensors: the CUDA allocator's count on a GPU, and on a CPU the running
total of every allocation and free by torch's CPU allocator, as torch.profiler records them
(profile_memory). That run is slower (the profiler records every operator), so it is never the
timed one.

Not the process's resident set: glibc keeps freed blocks in its heap, and a run that reuses the
free chunks an earlier run left (their pages released by malloc_trim) raises the resident set
when it touches them and does not lower it when it frees them, so that peak counted what ran
before (ranking's bf16 peak: 79 MB fresh, 174-210 MB after the evaluation figure's prompt
tuning; scripts/rank_peak.py). The profiler sees only the threads it was started in (and the
intra-op threads they launch), so work that runs Python threads of its own (primer's
upstream.parallel_episodes) is measured by the resident set still (`resident=True`): every block
over 64 KiB mmapped (mallopt M_MMAP_THRESHOLD) so that freeing it shows, sampled every
millisecond.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

PAGE = os.sysconf("SC_PAGE_SIZE")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def fixed_allocator() -> None:
    """The ceilings glibc's own dynamic thresholds grow to (32 MiB mmap, 64 MiB trim), fixed
    from the start: every timed run, whichever implementation and whatever ran before it, gets
    the same allocator (left dynamic, the first run would start from glibc's 128 KiB)."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)


@contextlib.contextmanager
def live_resident_set():
    """Inside: every allocation over 64 KiB is mmapped, so freeing it lowers the resident set.
    After: back to fixed_allocator's thresholds."""
    libc = _glibc()
    if libc is None:  # the resident set is read as it is
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.malloc_trim(0)
    try:
        yield
    finally:
        fixed_allocator()


class PeakMemory:
    """Bytes above the starting level at the highest point inside the `with` block (`peak`), and
    what counted them (`of`): the CUDA allocator's live tensors on a GPU; on a CPU the live
    tensors by torch.profiler's allocation records, or with `resident` the resident set (inside
    live_resident_set)."""

    def __init__(self, device: torch.device, resident: bool = False):
        self.device, self.peak = device, 0
        self.of = "cuda tensors" if device.type == "cuda" else "resident set" if resident else "tensors"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        elif self.of == "tensors":
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.__enter__()
        else:
            self.heap = live_resident_set()
            self.heap.__enter__()
            self.start, self.top, self.running = rss(), rss(), True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.top = max(self.top, rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.start
        elif self.of == "tensors":
            self.profiler.__exit__(*exc)
            self.peak = tensor_peak(self.profiler.profiler.kineto_results.events())
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.top, rss()) - self.start
            self.heap.__exit__(*exc)


def tensor_peak(events) -> int:
    """The highest running total of the profiler's allocation records (`[memory]` events: + bytes
    allocated, - bytes freed), in time order. A tensor made before the profiler started and freed
    inside has no record (torch warns once), so such a free does not lower the total: if
    anything, the peak is overstated by it."""
    total = top = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        total += e.nbytes()
        top = max(top, total)
    return top


@dataclass
class Timing:
    per_second: float  # items per second, median over repeats
    seconds: list[float]  # each repeat
    items: int  # per repeat
    peak_mb: float  # the peak above the level before the work
    peak_of: str  # what counted it (PeakMemory.of)


def median_seconds(fn: Callable, *args, runs: int = 7) -> float:
    """The median seconds of `runs` calls of fn(*args), after one untimed: a single operation's
    time, for the scripts that compare two ways of one (not a figure: see `measure`)."""
    fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(works: list[Callable[[], int]], device: torch.device, warmup: int, repeats: int,
            names: list[str] | None = None, resident: bool = False) -> list[Timing]:
    """The implementations of one figure, timed in turn: each `work()` does a fixed amount of work
    and returns how many items it did. After every one's warm-up, each round runs them all, in
    the order given and in reverse on alternate rounds (A B, B A, A B, ...), so that a machine
    whose speed drifts during the run (by 10-30 % on these shared machines) slows or speeds both
    alike instead of whichever ran last. Then each one's peak memory, in a run of its own (on a CPU
    by the resident set if `resident`: see PeakMemory). With `names`, a line to stderr as each
    run ends: a figure's runs can take minutes."""
    def said(i: int, what: str, start: float) -> None:
        if names:
            print(f"{names[i]}: {what} in {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)

    for i, work in enumerate(works):
        for w in range(warmup):
            start = time.perf_counter()
            work()
            said(i, f"warm-up {w + 1}/{warmup}", start)
    seconds: list[list[float]] = [[] for _ in works]
    items = [0] * len(works)
    for r in range(repeats):
        order = list(range(len(works)))
        for i in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            items[i] = works[i]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[i].append(time.perf_counter() - start)
            said(i, f"repeat {r + 1}/{repeats}: {items[i]} items", start)
    timings = []
    for i, work in enumerate(works):
        start = time.perf_counter()
        with PeakMemory(device, resident) as mem:
            work()
        said(i, f"the run for peak memory ({mem.of})", start)
        timings.append(Timing(items[i] / statistics.median(seconds[i]), seconds[i], items[i], mem.peak / 2**20,
                              mem.of))
    return timings


class Dispatched(TorchDispatchMode):
    """Inside: every operator dispatched is counted (`ops`: each at least a kernel launch on a
    GPU), and its floating-point work by torch's own formulas (`flops`,
    torch.utils.flop_counter). Not FlopCounterMode itself: its per-module hooks fail on the
    reference's first-order call (autograd.grad on higher's leaf parameters)."""

    def __init__(self):
        super().__init__()
        self.flops = self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **(kwargs or {}), out_val=out)
        return out
