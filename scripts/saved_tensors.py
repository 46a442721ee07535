"""What one MAML episode's autograd graphs keep, by shape: every tensor saved for a backward
(the support pass's, its differentiated backward's and the query pass's), each storage counted
once, the backbone's own weights left out; then the resident set's peak over the episode (the
bench's measure, bench/measure.py) and the operators it dispatches (each a kernel launch on a
GPU). With `stock`, transformers' own MLP and RMSNorm operators instead of primer's
written-out derivatives (core/backbones/lean.py). The bench's first episode, fp32, prompt 20, on
SmolLM2-135M or the backbone named.

  .venv/bin/python scripts/saved_tensors.py [stock] [backbone]
"""
import collections
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import Dispatched, PeakMemory  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import UpstreamConfig, meta_grad  # noqa: E402
from core.backbones.lean import stock_ops  # noqa: E402

stock = "stock" in sys.argv[1:]
backbone = [a for a in sys.argv[1:] if a != "stock"]
s = setup(parse(["--parts", "meta", *(["--backbone", *backbone] if backbone else [])]))
init = s.model.prompt.detach().clone()
cfg = UpstreamConfig(algorithm="maml", inner_lr=s.inner_lr).resolved()
episode = TaskEpisodes(s.sources, cfg.seed).episode(0, *cfg.episode_sizes())
weights = {p.untyped_storage().data_ptr() for p in s.model.backbone.model.parameters()}
mode = stock_ops if stock else contextlib.nullcontext

kept: dict[int, tuple] = {}


def pack(t: torch.Tensor) -> torch.Tensor:
    ptr = t.untyped_storage().data_ptr()
    if ptr not in weights and ptr not in kept:
        kept[ptr] = (tuple(t.shape), t.untyped_storage().nbytes())
    return t


with mode():
    meta_grad(s.model, init, [episode], cfg)  # warm-up
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta_grad(s.model, init, [episode], cfg)
    with PeakMemory(torch.device("cpu"), resident=True) as mem:
        meta_grad(s.model, init, [episode], cfg)
    with Dispatched() as ops:
        meta_grad(s.model, init, [episode], cfg)

size, count = collections.Counter(), collections.Counter()
for shape, nbytes in kept.values():
    size[shape] += nbytes
    count[shape] += 1
print(f"MLP and RMSNorm: {'transformers (stock)' if stock else 'primer (lean)'}; "
      f"support {len(episode.support)} rows, query {len(episode.query)} rows\n")
print("| shape | tensors | MB |\n|---|---|---|")
for shape, nbytes in size.most_common():
    if nbytes >= 2**20:
        print(f"| {shape} | {count[shape]} | {nbytes / 2**20:.1f} |")
rest = sum(n for sh, n in size.items() if n < 2**20)
print(f"| smaller ones | {sum(c for sh, c in count.items() if size[sh] < 2**20)} | {rest / 2**20:.1f} |")
print(f"| **all kept** | {len(kept)} | {sum(size.values()) / 2**20:.1f} |")
print(f"\nresident set's peak over the episode: {mem.peak / 2**20:.1f} MB; operators dispatched: {ops.ops}; "
      f"GFLOP: {ops.flops / 1e9:.2f}")
