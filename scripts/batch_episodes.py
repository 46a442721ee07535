"""Does running a meta-batch's episodes in one forward pay? Seconds for one meta-batch's
gradient with the episodes one at a time (the paper's loop) against all in one forward, one
prompt copy each (upstream.batch_episodes), interleaved, median of 3 after 1 warm-up.
SmolLM2-135M (fp32, or bf16 if asked), prompt 20, input cap 64, the paper's per-algorithm
defaults, episodes from the k-shot splits (seed 100) of bench's four source tasks.

  .venv/bin/python scripts/batch_episodes.py
  .venv/bin/python scripts/batch_episodes.py bf16
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import SOURCES
from core import backbones
from core.algorithms.episodes import TaskEpisodes
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.spec import TaskRef
from core.tasks import get_split, load_task

torch.manual_seed(0)
dtype = backbones.DTYPES[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
backbone = backbones.freeze(backbones.load("smollm2-135m", dtype=dtype))
model = SoftPromptModel(backbone, init_prompt(backbone, 20, "vocab", seed=0), max_input_tokens=64)
episodes = TaskEpisodes({n: [get_split(load_task(TaskRef(name=n)), 100)] for n in SOURCES}, seed=0)
prompt = model.prompt.detach()

print("| algorithm | episodes | rows per forward, one at a time | one at a time (s) | batched (s) | speed-up |\n"
      "|---|---|---|---|---|---|")
for algorithm, meta_batch in [("maml", 2), ("maml", 4), ("fomaml", 2), ("fomaml", 4), ("reptile", 2)]:
    algo = ALGORITHMS[algorithm]
    cfg = UpstreamConfig(algorithm=algorithm, meta_batch=meta_batch).resolved()
    drawn = [episodes.episode(j, *cfg.episode_sizes()) for j in range(meta_batch)]
    seconds = {"alone": [], "batched": []}
    for _ in range(4):
        for how, groups in (("alone", [[e] for e in drawn]), ("batched", [drawn])):
            start = time.perf_counter()
            for group in groups:
                algo.grad(model, prompt, group, cfg.inner_lr, cfg.inner_steps)
            seconds[how].append(time.perf_counter() - start)
    alone, batched = (statistics.median(seconds[h][1:]) for h in ("alone", "batched"))
    print(f"| {algorithm} | {meta_batch} | {cfg.inner_batch_size} | {alone:.3f} | {batched:.3f} | {alone / batched:.2f}× |",
          flush=True)
