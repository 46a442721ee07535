"""Does packing a batch's rows end to end pay, and up to how many tokens per pack? Seconds for
MAML's and FoMAML's meta-gradients on the bench's first episodes (2 and 4 rows), and for a
prompt-tuning loss and its backward at 8 and 32 rows, and for rank classification of the
bench's 128 evaluation examples (batches of 32, 2 options each), with the rows packed
(PACK_TOKENS as given) against padded rows (the prompt concatenated in front of each, or its KV
cache shared from PROMPT_CACHE_ROWS rows on; for ranking, each input's KV cache copied per
option). With `prefix` for the pack sizes: packed as primer packs, each row running the
tokens it shares with the others (a task's template) itself (SHARE_PREFIX = False) against
them run once per pack, or once per batch in the prompt's KV cache for ranking, with the tokens
each feeds through the backbone (less the KV cache's). Interleaved, median of 3 after 1
warm-up. SmolLM2-135M, the bench's source tasks and target (k-shot splits, seed 100).

  .venv/bin/python scripts/packing.py [fp32|bf16] [pack sizes: 128,256,512 | prefix] [work: meta,pt,rank] [prompt length: 20]
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
layouts = sys.argv[2] if len(sys.argv) > 2 else "128,256,512"
works = (sys.argv[3] if len(sys.argv) > 3 else "meta,pt,rank").split(",")
prompt_length = sys.argv[4] if len(sys.argv) > 4 else "20"
s = setup(parse(["--parts", "meta", "--dtype", dtype, "--prompt-length", prompt_length]))  # the bench's model and data
model, init = s.model, s.model.prompt.detach().clone()
fed, run_packs = [0], model._run_packs


def counted(packs, *args, **kwargs):  # tokens through the backbone, less the KV cache's
    fed[0] += sum(len(seg.tokens) for pack in packs for seg in pack)
    return run_packs(packs, *args, **kwargs)


model._run_packs = counted


def meta(grad, rows: int):
    episodes = [TaskEpisodes(s.sources, 0).episode(i, rows, rows) for i in range(4)]
    return lambda: [grad(model, init, [e], 3e-5, 1) for e in episodes]


def pt(rows: int):
    prompt = torch.nn.Parameter(init.clone())
    return lambda: model.loss(s.train[:rows], prompt).backward()


def rank(n: int):
    examples = s.test[:n]
    return lambda: torch.no_grad()(model.rank)(examples, [s.options] * n, batch_size=32)


prefix = layouts == "prefix"
variants = ({"own prefix": dict(SHARE_PREFIX=False), "shared prefix": dict(SHARE_PREFIX=True)} if prefix else
            {"padded": dict(PACK=False), **{f"packed {n}": dict(PACK=True, PACK_TOKENS=int(n)) for n in layouts.split(",")}})
extra = ["speed-up", *(f"tokens fed, {v.split()[0]}" for v in variants)] if prefix else []
columns = [f"{v} (s)" for v in variants] + extra
print(f"| work | rows | {' | '.join(columns)} |\n|---|---|{'---|' * len(columns)}")
rows_of = {"meta": [("MAML meta-gradient, 4 episodes", 2, lambda: meta(maml_grad, 2)),
                    ("FoMAML meta-gradient, 4 episodes", 4, lambda: meta(fomaml_grad, 4))],
           "pt": [("PT loss + backward", 8, lambda: pt(8)), ("PT loss + backward", 32, lambda: pt(32))],
           "rank": [("rank classification, 128 examples", 32, lambda: rank(128))]}
for label, rows, make in [row for w in works for row in rows_of[w]]:
    work = make()
    seconds, tokens = {v: [] for v in variants}, {}
    for _ in range(4):
        for name, settings in variants.items():
            for attribute, value in settings.items():
                setattr(model, attribute, value)
            fed[0], start = 0, time.perf_counter()
            work()
            seconds[name].append(time.perf_counter() - start)
            tokens[name] = fed[0]
    cells = [f"{statistics.median(t[1:]):.3f}" for t in seconds.values()]
    if prefix:
        cells += [f"{float(cells[0]) / float(cells[1]):.2f}x", *map(str, tokens.values())]
    print(f"| {label} | {rows} | {' | '.join(cells)} |", flush=True)
