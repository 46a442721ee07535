"""Ranking with its attention over one pack per batch, an input and its options a row of a padded
batch (core/backbones/blocked.py; until 2026-12-07 by blocks of BLOCK_QUERIES queries, set by a
third argument), against packs of PACK_TOKENS over the whole square (BLOCKED = False),
on the bench's model and data: the scores both ways, the seconds to rank the bench's 128 test
examples in batches of 32 with the two ways taking turns, then each way's operator time under
torch.profiler (self time: all, the attention kernel's, the matrix multiplies').

  .venv/bin/python scripts/rank_blocks.py [fp32|bf16] [backbone]
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from core.backbones.soft_prompt import SoftPromptModel  # noqa: E402

dtype = sys.argv[1] if len(sys.argv) > 1 else "fp32"
backbone = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
s = setup(parse(["--parts", "eval", "--dtype", dtype, "--backbone", backbone]))
examples, options = s.test[:128], [s.options] * 128
WAYS = {True: "by units, one pack", False: "whole square, packs of 256"}


def rank():
    s.model.rank(examples, options, 32)


with torch.no_grad():
    scores = {}
    for way in WAYS:
        SoftPromptModel.BLOCKED = way
        scores[way] = torch.stack(s.model.option_logliks([e.input for e in examples[:32]], options[:32]))
    print(f"{dtype}, {backbone}: scores of 32 inputs, largest difference "
          f"{(scores[True] - scores[False]).abs().max().item():.2e} (largest score {scores[False].abs().max().item():.1f})")
    print(f"| round | {WAYS[True]} (s) | {WAYS[False]} (s) |\n|---|---|---|")
    for r in range(4):
        took = {}
        for way in (True, False) if r % 2 == 0 else (False, True):
            SoftPromptModel.BLOCKED = way
            t = time.perf_counter()
            rank()
            took[way] = time.perf_counter() - t
        print(f"| {r + 1} | {took[True]:.3f} | {took[False]:.3f} |", flush=True)
    print("\n| way | operators (s) | attention kernel (s) | mm (s) |\n|---|---|---|---|")
    for way in (True, False, True, False):
        SoftPromptModel.BLOCKED = way
        with profile() as p:
            rank()
        self_s = {e.key: e.self_cpu_time_total / 1e6 for e in p.key_averages()}
        attention = sum(v for k, v in self_s.items() if "scaled_dot_product" in k)
        print(f"| {WAYS[way]} | {sum(self_s.values()):.2f} | {attention:.2f} | {self_s.get('aten::mm', 0):.2f} |", flush=True)
