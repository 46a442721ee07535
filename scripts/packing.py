"""Does packing a batch's rows end to end pay, and up to how many tokens per pack? Seconds for
MAML's and FoMAML's meta-gradients on the bench's first episodes (2 and 4 rows), and for a
prompt-tuning loss and its backward at 8 and 32 rows, with the rows packed (PACK_TOKENS as
given) against padded rows (the prompt concatenated in front of each, or its KV cache shared
from PROMPT_CACHE_ROWS rows on). Interleaved, median of 3 after 1 warm-up. SmolLM2-135M,
prompt 20, the bench's source tasks and target (k-shot splits, seed 100).

  .venv/bin/python scripts/packing.py [fp32|bf16] [pack sizes, comma-separated: 128,256,512]
"""
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.maml import fomaml_grad, maml_grad  # noqa: E402

dtype = sys.argv[1] if len(sys.argv) > 1 else "fp32"
sizes = [int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "128,256,512").split(",")]
s = setup(parse(["--parts", "meta", "--dtype", dtype]))  # the bench's model, sources and target
model, init = s.model, s.model.prompt.detach().clone()


def meta(grad, rows: int):
    episodes = [TaskEpisodes(s.sources, 0).episode(i, rows, rows) for i in range(4)]
    return lambda: [grad(model, init, [e], 3e-5, 1) for e in episodes]


def pt(rows: int):
    prompt = torch.nn.Parameter(init.clone())
    return lambda: model.loss(s.train[:rows], prompt).backward()


variants = {"padded": None, **{f"packed {n}": n for n in sizes}}
print(f"| work | rows | {' | '.join(f'{v} (s)' for v in variants)} |\n|---|---|{'---|' * len(variants)}")
for label, rows, work in [("MAML meta-gradient, 4 episodes", 2, meta(maml_grad, 2)),
                          ("FoMAML meta-gradient, 4 episodes", 4, meta(fomaml_grad, 4)),
                          ("PT loss + backward", 8, pt(8)), ("PT loss + backward", 32, pt(32))]:
    seconds = {v: [] for v in variants}
    for _ in range(4):
        for name, n in variants.items():
            model.PACK = n is not None
            if n:
                model.PACK_TOKENS = n
            start = time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - start)
    medians = [statistics.median(t[1:]) for t in seconds.values()]
    print(f"| {label} | {rows} | {' | '.join(f'{m:.3f}' for m in medians)} |", flush=True)
