"""Does running a meta-batch's episodes in one forward pay? Seconds for one meta-batch's
gradient with the episodes one at a time (the paper's loop) against all in one forward, one
prompt copy each (upstream.batch_episodes), interleaved, median of 3 after 1 warm-up, under the
bench's allocator. The bench's model and source tasks (bench.__main__.setup: SmolLM2-135M, fp32
unless asked, prompt 20, input cap 64), the paper's per-algorithm defaults, episodes from the
k-shot splits (seed 100) of bench's four source tasks.

  .venv/bin/python scripts/batch_episodes.py [bf16] [bench options]
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import fixed_allocator  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402

fixed_allocator()
args = sys.argv[1:]
if args[:1] in (["fp32"], ["bf16"]):  # as before it took bench options
    args = ["--dtype", *args]
s = setup(parse(["--parts", "meta", *args]))
model = s.model
episodes = TaskEpisodes(s.sources, seed=0)
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
