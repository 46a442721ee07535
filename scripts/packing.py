"""Does packing a batch's rows end to end pay, and up to how many tokens per pack? Seconds for
MAML's and FoMAML's meta-gradients on the bench's first episodes (2 and 4 rows), and for a
prompt-tuning loss and its backward at 8 and 32 rows, and for rank classification of the
bench's 128 evaluation examples (batches of 32, 2 options each), with the rows packed
(PACK_TOKENS as given) against padded rows (the prompt concatenated in front of each, or its KV
cache shared from PROMPT_CACHE_ROWS rows on; for ranking, each input's KV cache copied per
option). Interleaved, median of 3 after 1 warm-up. SmolLM2-135M, the bench's source tasks and
target (k-shot splits, seed 100).

  .venv/bin/python scripts/packing.py [fp32|bf16] [pack sizes: 128,256,512] [work: meta,pt,rank] [prompt length: 20]
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
works = (sys.argv[3] if len(sys.argv) > 3 else "meta,pt,rank").split(",")
prompt_length = sys.argv[4] if len(sys.argv) > 4 else "20"
s = setup(parse(["--parts", "meta", "--dtype", dtype, "--prompt-length", prompt_length]))  # the bench's model and data
model, init = s.model, s.model.prompt.detach().clone()


def meta(grad, rows: int):
    episodes = [TaskEpisodes(s.sources, 0).episode(i, rows, rows) for i in range(4)]
    return lambda: [grad(model, init, [e], 3e-5, 1) for e in episodes]


def pt(rows: int):
    prompt = torch.nn.Parameter(init.clone())
    return lambda: model.loss(s.train[:rows], prompt).backward()


def rank(n: int):
    examples = s.test[:n]
    return lambda: torch.no_grad()(model.rank)(examples, [s.options] * n, batch_size=32)


variants = {"padded": None, **{f"packed {n}": n for n in sizes}}
print(f"| work | rows | {' | '.join(f'{v} (s)' for v in variants)} |\n|---|---|{'---|' * len(variants)}")
rows_of = {"meta": [("MAML meta-gradient, 4 episodes", 2, lambda: meta(maml_grad, 2)),
                    ("FoMAML meta-gradient, 4 episodes", 4, lambda: meta(fomaml_grad, 4))],
           "pt": [("PT loss + backward", 8, lambda: pt(8)), ("PT loss + backward", 32, lambda: pt(32))],
           "rank": [("rank classification, 128 examples", 32, lambda: rank(128))]}
for label, rows, make in [row for w in works for row in rows_of[w]]:
    work = make()
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
