"""How many floating-point operations does one meta-gradient take, primer against the MPT
paper's loop (bench/reference.py)? torch.utils.flop_counter counts every matrix multiply and
attention call (attention through the math kernel), forward and backward (second order included), on the bench's first meta-batches
(MAML: 3 outer steps of 2 episodes, SmolLM2-135M fp32, prompt 20 or as given, input cap 64). This is
the work each side must do: its ratio is the most a perfect implementation of either could gain.

  .venv/bin/python scripts/flops.py [prompt length]
"""
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench import reference  # noqa: E402
from bench.__main__ import parse, setup  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402

length = sys.argv[1] if len(sys.argv) > 1 else "20"
s = setup(parse(["--parts", "meta", "--prompt-length", length]))
init = s.model.prompt.detach().clone()
loss = reference.PaperLoss(s.ref, s.static_length)


def count(work) -> float:
    # the math attention kernel: torch's counter has no formula for the CPU flash kernel
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        work()
    return counter.get_total_flops()


print(f"prompt {length}, static length {s.static_length}\n\n"
      "| algorithm | episodes | primer GFLOP | paper-loop+higher GFLOP | ratio |\n|---|---|---|---|---|")
# MAML only: the counter's module hooks fail on the reference's first-order call
# (autograd.grad on higher's leaf parameters: "A leaf node was passed to _will_engine_execute_node").
for algorithm in ("maml",):
    cfg = UpstreamConfig(algorithm=algorithm, inner_lr=s.inner_lr).resolved()
    episodes = [TaskEpisodes(s.sources, cfg.seed).episode(i, *cfg.episode_sizes()) for i in range(6)]
    ours = count(lambda: [ALGORITHMS[algorithm].grad(s.model, init, [e], cfg.inner_lr, cfg.inner_steps) for e in episodes])
    if algorithm == "reptile":
        ref = lambda e: reference.reptile_grad(loss, init, e.support, cfg.inner_lr, cfg.inner_steps, cfg.inner_batch_size)  # noqa: E731
    else:
        ref = lambda e: reference.maml_grad(loss, init, e.support, e.query, cfg.inner_lr, cfg.inner_steps,  # noqa: E731
                                            first_order=algorithm == "fomaml")
    theirs = count(lambda: [ref(e) for e in episodes])
    print(f"| {algorithm} | 6 | {ours / 1e9:.0f} | {theirs / 1e9:.0f} | {theirs / ours:.2f}× |", flush=True)
