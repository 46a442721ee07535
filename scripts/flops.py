"""How many floating-point operations do the meta-gradients take, primer against the MPT
paper's loop (bench/reference.py)? torch.utils.flop_counter's formulas count every matrix
multiply and attention call (attention through the math kernel), forward and backward (second
order included), on the bench's first meta-batches (3 outer steps of 2 episodes, SmolLM2-135M
or the backbone given, fp32, prompt 20 or as given, input cap 64). This is the work each side must do: at equal speed
per operation, its ratio is the most either could gain. It also counts the operators each side
dispatches (each one at least a kernel launch on a GPU, where a 135M model's small batches
leave the time to launches and Python rather than arithmetic), one episode at a time and, for
primer, a meta-batch of 2 episodes in one forward (--batch-episodes). Then the same for the
bench's evaluation: primer's rank classification of 128 test examples against PEFT's greedy
`generate` on them (batches of 32; the vocabulary-initialised prompt, where the bench tunes it
for 30 steps first, which changes only how many tokens `generate` may stop early at).

  .venv/bin/python scripts/flops.py [prompt length] [meta,eval] [backbone] [bench options]
  .venv/bin/python scripts/flops.py 20 meta,eval smollm2-135m --max-input-tokens 256 --sources bbc_news_topic --target bbc_news_topic
"""
import sys
from pathlib import Path

from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench import reference  # noqa: E402
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import Dispatched  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402

length = sys.argv[1] if len(sys.argv) > 1 else "20"
parts = (sys.argv[2] if len(sys.argv) > 2 else "meta,eval").split(",")
backbone = sys.argv[3] if len(sys.argv) > 3 else "smollm2-135m"
s = setup(parse(["--parts", "meta", "--prompt-length", length, "--backbone", backbone, *sys.argv[4:]]))
init = s.model.prompt.detach().clone()
loss = reference.PaperLoss(s.ref, s.static_length)


def count(work) -> Dispatched:
    # the math attention kernel: torch has no FLOP formula for the CPU flash kernel
    with sdpa_kernel([SDPBackend.MATH]), Dispatched() as counter:
        work()
    return counter


print(f"{backbone}, prompt {length}, static length {s.static_length}\n")
if "meta" in parts:
    print("| algorithm | episodes | primer GFLOP | paper-loop+higher GFLOP | ratio | operators per episode: primer, "
          "primer 2 in one forward, paper-loop+higher |\n|---|---|---|---|---|---|")
for algorithm in ("maml", "fomaml", "reptile") if "meta" in parts else ():
    cfg = UpstreamConfig(algorithm=algorithm, inner_lr=s.inner_lr).resolved()
    episodes = [TaskEpisodes(s.sources, cfg.seed).episode(i, *cfg.episode_sizes()) for i in range(6)]
    grad = lambda group: ALGORITHMS[algorithm].grad(s.model, init, group, cfg.inner_lr, cfg.inner_steps)  # noqa: E731
    ours = count(lambda: [grad([e]) for e in episodes])
    batched = count(lambda: [grad(episodes[i:i + 2]) for i in range(0, 6, 2)])
    theirs = count(lambda: [reference.episode_grad(loss, init, e, cfg) for e in episodes])
    print(f"| {algorithm} | 6 | {ours.flops / 1e9:.0f} | {theirs.flops / 1e9:.0f} | {theirs.flops / ours.flops:.2f}× | "
          f"{ours.ops / 6:,.0f}, {batched.ops / 6:,.0f}, {theirs.ops / 6:,.0f} |", flush=True)

if "eval" in parts:
    import torch

    examples, longest = s.test[:128], max(len(s.model._tokens(o, True)) for o in s.options)
    ours = count(lambda: torch.no_grad()(s.model.rank)(examples, [s.options] * len(examples), batch_size=32))
    peft = reference.Peft(s.ref, init, s.static_length)
    theirs = count(lambda: peft.generate_labels(examples, s.options, max_new_tokens=longest, batch_size=32))
    print(f"\n| evaluation | examples | primer GFLOP | peft+generate GFLOP | ratio | operators per example: primer, "
          f"peft+generate |\n|---|---|---|---|---|---|\n| rank vs generate | {len(examples)} | {ours.flops / 1e9:.0f} | "
          f"{theirs.flops / 1e9:.0f} | {theirs.flops / ours.flops:.2f}× | {ours.ops / len(examples):,.0f}, "
          f"{theirs.ops / len(examples):,.0f} |")
