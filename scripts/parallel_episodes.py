"""How should a meta-batch's episodes run on a CPU? Seconds for one meta-batch's gradient (2
episodes, the bench's first) four ways, in one process, the order rotated every round so that
none always runs after another: the paper's loop (bench/reference.py), primer one episode at a
time on all the cores, primer with the episodes in parallel threads, each with its share of the
cores (upstream.parallel_episodes), and primer with both in one forward (batch_episodes; MAML's
default on a CPU since 2026-12-07). Median of the rounds after the first. SmolLM2-135M fp32,
prompt 20 or as given, input cap 64.

  .venv/bin/python scripts/parallel_episodes.py [maml,fomaml,reptile] [rounds] [prompt length]
"""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench import reference  # noqa: E402
from bench.__main__ import parse, setup  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import UpstreamConfig, meta_grad  # noqa: E402

algorithms = (sys.argv[1] if len(sys.argv) > 1 else "maml,fomaml,reptile").split(",")
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
s = setup(parse(["--parts", "meta", "--prompt-length", sys.argv[3] if len(sys.argv) > 3 else "20"]))
init = s.model.prompt.detach().clone()
loss = reference.PaperLoss(s.ref, s.static_length)

print("| algorithm | paper-loop+higher (s) | primer, one at a time (s) | primer, parallel threads (s) | "
      "primer, one forward (s) | parallel ÷ one at a time | one forward ÷ one at a time | "
      "primer parallel ÷ paper-loop | primer one forward ÷ paper-loop |\n|---|---|---|---|---|---|---|---|---|")
for algorithm in algorithms:
    cfg = {how: UpstreamConfig(algorithm=algorithm, inner_lr=s.inner_lr, **kw).resolved()
           for how, kw in [("alone", dict(batch_episodes=False)), ("parallel", dict(parallel_episodes=True)),
                           ("forward", dict(batch_episodes=True))]}
    c = cfg["alone"]
    drawn = [TaskEpisodes(s.sources, c.seed).episode(j, *c.episode_sizes()) for j in range(c.meta_batch)]

    work = {"paper": lambda: [reference.episode_grad(loss, init, e, c) for e in drawn],
            **{how: (lambda one: lambda: meta_grad(s.model, init, drawn, one))(one) for how, one in cfg.items()}}
    seconds = {k: [] for k in work}
    order = list(work)
    for r in range(rounds):
        for k in order[r % 4:] + order[:r % 4]:
            start = time.perf_counter()
            work[k]()
            seconds[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in seconds.items()}
    print(f"| {algorithm} | {med['paper']:.3f} | {med['alone']:.3f} | {med['parallel']:.3f} | {med['forward']:.3f} | "
          f"{med['alone'] / med['parallel']:.2f}× | {med['alone'] / med['forward']:.2f}× | "
          f"{med['paper'] / med['parallel']:.2f}× | {med['paper'] / med['forward']:.2f}× |", flush=True)
