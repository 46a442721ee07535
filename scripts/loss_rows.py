"""Does a training loss pay for running the last layer's MLP at its answer-predicting positions
alone (`lean.rows_read`, which `SoftPromptModel._packed_hidden` sets)? Seconds for one
meta-batch's gradient with it and with the MLP over every row (`lean.rows_read` made a no-op),
in one process, taking turns, median of 6 after 1 warm-up: no machine drift between the two.
The bench's model and source tasks (bench.__main__.setup: SmolLM2-135M, fp32 unless asked,
prompt 20, input cap 64), the paper's per-algorithm defaults and primer's (a CPU: MAML's and
FoMAML's meta-batch of 2 in one forward), episodes from the k-shot splits (seed 100) of bench's
four source tasks. The two gradients are checked equal first.

  .venv/bin/python scripts/loss_rows.py [bench options, e.g. --dtype bf16]
"""
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import fixed_allocator  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402
from core.backbones import lean  # noqa: E402

fixed_allocator()
s = setup(parse(["--parts", "meta", *sys.argv[1:]]))
model = s.model
episodes = TaskEpisodes(s.sources, seed=0)
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
