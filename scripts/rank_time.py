"""Seconds to rank the bench's 128 test examples (rotten_tomatoes_sentiment, batches of 32,
SmolLM2-135M or the backbone given, prompt 20, under the bench's allocator): 2 warm-ups, then
7 timed runs, their median and each, and within them the seconds spent computing the prompt's
(and template's) keys and values, in the attention function and in the head (the logits and
their log-softmax at the predicting positions). Run it in two checkouts, taking turns, for a
before and after.

  .venv/bin/python scripts/rank_time.py [fp32|bf16] [backbone]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import fixed_allocator  # noqa: E402
from core.backbones import blocked  # noqa: E402

fixed_allocator()
dtype = sys.argv[1] if len(sys.argv) > 1 else "fp32"
backbone = sys.argv[2] if len(sys.argv) > 2 else "smollm2-135m"
s = setup(parse(["--parts", "eval", "--dtype", dtype, "--backbone", backbone]))
examples, options = s.test[:128], [s.options] * 128
spent = {"prompt states": 0.0, "attention": 0.0, "head": 0.0}


def timed(fn, part):
    def run(*a, **k):
        start = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[part] += time.perf_counter() - start
    return run


# the prompt's keys and values: _prompt_states since 2026-12-07, _prompt_cache before
name = "_prompt_states" if hasattr(s.model, "_prompt_states") else "_prompt_cache"
setattr(s.model, name, timed(getattr(s.model, name), "prompt states"))
# the head: _head_logprobs since 2026-12-07's sixth session, _head and then _token_logprobs before
for name in ("_head_logprobs",) if hasattr(s.model, "_head_logprobs") else ("_head", "_token_logprobs"):
    setattr(s.model, name, timed(getattr(s.model, name), "head"))
blocked.install()
from transformers import AttentionInterface  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

attention = timed(ALL_ATTENTION_FUNCTIONS["sdpa"], "attention")
attention.primer_blocked = True
AttentionInterface.register("sdpa", attention)

runs = []
with torch.no_grad():
    for i in range(9):
        for part in spent:
            spent[part] = 0.0
        start = time.perf_counter()
        s.model.rank(examples, options, 32)
        if i >= 2:
            runs.append((time.perf_counter() - start, *spent.values()))
med = lambda j: statistics.median(r[j] for r in runs)  # noqa: E731
print(f"{dtype}, {backbone}: rank {med(0):.3f} s (runs {', '.join(f'{r[0]:.3f}' for r in runs)}); "
      f"prompt states {med(1):.3f} s, attention {med(2):.3f} s, head {med(3):.3f} s")
