"""Does a training loss pay for running the last layer's MLP at its answer-predicting positions
alone (`lean.rows_read`, which `SoftPromptModel._packed_hidden` sets)? Seconds for one
meta-batch's gradient with it and with the MLP over every row (`lean.rows_read` made a no-op),
in one process, taking turns, median of 6 after 1 warm-up: no machine drift between the two.
SmolLM2-135M (fp32, or bf16 if asked), prompt 20, input cap 64, the paper's per-algorithm
defaults and primer's (a CPU: MAML's and FoMAML's meta-batch of 2 in one forward), episodes from
the k-shot splits (seed 100) of bench's four source tasks. The two gradients are checked equal
first.

  .venv/bin/python scripts/loss_rows.py
  .venv/bin/python scripts/loss_rows.py bf16
"""
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import SOURCES
from bench.measure import fixed_allocator
from core import backbones
from core.algorithms.episodes import TaskEpisodes
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig
from core.backbones import lean
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.spec import TaskRef
from core.tasks import get_split, load_task

fixed_allocator()
torch.manual_seed(0)
dtype = backbones.DTYPES[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
backbone = backbones.freeze(backbones.load("smollm2-135m", dtype=dtype))
model = SoftPromptModel(backbone, init_prompt(backbone, 20, "vocab", seed=0), max_input_tokens=64)
episodes = TaskEpisodes({n: [get_split(load_task(TaskRef(name=n)), 100)] for n in SOURCES}, seed=0)
prompt = model.prompt.detach()
read_rows = lean.rows_read
every_row = lambda mlp, rows: contextlib.nullcontext()  # noqa: E731

print("| algorithm | meta-batch | every row (s) | answer rows (s) | speed-up | gradients' relative difference |\n"
      "|---|---|---|---|---|---|")
for algorithm in ("maml", "fomaml"):
    cfg = UpstreamConfig(algorithm=algorithm).resolved()
    groups = [[episodes.episode(j + k, *cfg.episode_sizes()) for k in range(2)] for j in range(0, 6, 2)]
    grad = lambda group: ALGORITHMS[algorithm].grad(model, prompt, group, cfg.inner_lr, cfg.inner_steps)  # noqa: E731
    lean.rows_read = every_row
    whole = grad(groups[0])[0]
    lean.rows_read = read_rows
    ours = grad(groups[0])[0]
    diff = ((ours - whole).norm() / whole.norm()).item()
    seconds = {"every": [], "read": []}
    for _ in range(7):
        for how, rows_read in (("every", every_row), ("read", read_rows)):
            lean.rows_read = rows_read
            start = time.perf_counter()
            for group in groups:
                grad(group)
            seconds[how].append(time.perf_counter() - start)
    lean.rows_read = read_rows
    every, read = (statistics.median(seconds[h][1:]) for h in ("every", "read"))
    print(f"| {algorithm} | 2 in one forward, 3 meta-batches | {every:.3f} | {read:.3f} | {every / read:.3f}× | {diff:.1e} |",
          flush=True)
