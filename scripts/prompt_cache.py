"""When does sharing the prompt's KV cache pay? Seconds for a prompt-tuning loss and its
backward, and for a MAML meta-gradient, at several batch sizes, with the prompt's cache shared
by the batch against the prompt concatenated in front of every row (interleaved, median of 3
after 1 warm-up). SmolLM2-135M (fp32, or bf16 if asked), prompt 20, sms_spam's k-shot split (seed 100).

  .venv/bin/python scripts/prompt_cache.py
  .venv/bin/python scripts/prompt_cache.py bf16
"""
import statistics
import sys
import time

import torch

from core import backbones
from core.algorithms.episodes import Episode
from core.algorithms.maml import maml_grad
from core.backbones.soft_prompt import SoftPromptModel
from core.prompts import init_prompt
from core.spec import TaskRef
from core.tasks import get_split, load_task

torch.manual_seed(0)
dtype = backbones.DTYPES[sys.argv[1] if len(sys.argv) > 1 else "fp32"]
backbone = backbones.freeze(backbones.load("smollm2-135m", dtype=dtype))
model = SoftPromptModel(backbone, init_prompt(backbone, 20, "vocab", seed=0), max_input_tokens=64)
model.PACK = False  # rows padded, as before packing: this compares the two padded layouts
split = get_split(load_task(TaskRef(name="sms_spam")), 100)


def pt(rows: int):
    prompt = torch.nn.Parameter(model.prompt.detach().clone())
    return lambda: model.loss(split.train[:rows], prompt).backward()


def maml(rows: int):
    episode = Episode("sms_spam", 100, split.train[:rows], split.dev[:rows])
    return lambda: maml_grad(model, model.prompt.detach(), [episode], 3e-5, 1)


print("| work | rows | prompt concatenated (s) | prompt cache shared (s) | speed-up |\n|---|---|---|---|---|")
for label, make, rows in [("PT loss + backward", pt, 2), ("PT loss + backward", pt, 4), ("PT loss + backward", pt, 8),
                          ("MAML meta-gradient", maml, 2), ("MAML meta-gradient", maml, 4)]:
    work, seconds = make(rows), {1: [], 10**9: []}
    for _ in range(4):
        for threshold in seconds:
            model.PROMPT_CACHE_ROWS = model.PROMPT_CACHE_ROWS_BF16 = threshold
            start = time.perf_counter()
            work()
            seconds[threshold].append(time.perf_counter() - start)
    shared, concatenated = (statistics.median(seconds[t][1:]) for t in (1, 10**9))
    print(f"| {label} | {rows} | {concatenated:.3f} | {shared:.3f} | {concatenated / shared:.2f}× |", flush=True)
