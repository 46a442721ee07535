"""Where one meta-gradient's operators come from: every operator dispatched for the bench's first
episode (SmolLM2-135M fp32, prompt 20, input cap 64), counted by the function of primer or
transformers that dispatched it (for the backward passes autograd runs, the algorithm's function
that called autograd.grad), with the time each operator itself took (the dispatch mode's
own Python is not in it); then the time by operator. After one untimed episode, so no first-call costs are in it,
and five timed without the mode: their median less the operators' time is what the episode spends
outside them (Python, the dispatcher, autograd's bookkeeping). With a second argument n, the
bench's first n episodes in one forward (upstream.batch_episodes) instead of its first episode.

  .venv/bin/python scripts/op_sources.py [algorithm] [episodes in one forward, default 1] [bench options, e.g. --dtype bf16]
"""
import collections
import sys
import time
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

ROOT = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, ROOT)  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402

algorithm = sys.argv[1] if len(sys.argv) > 1 else "maml"
s = setup(parse(["--parts", "meta", *sys.argv[3:]]))
init = s.model.prompt.detach().clone()
cfg = UpstreamConfig(algorithm=algorithm, inner_lr=s.inner_lr).resolved()
together = int(sys.argv[2]) if len(sys.argv) > 2 else 1
drawn = [TaskEpisodes(s.sources, cfg.seed).episode(j, *cfg.episode_sizes()) for j in range(together)]
calls, spent = collections.Counter(), collections.Counter()  # per (source, operator): calls, seconds


def source() -> str:
    """The innermost frame of primer's code or transformers' that is not torch's own: for the
    backward passes that autograd runs, the algorithm's function that called autograd.grad, or
    the backward of one of primer's autograd Functions (core/backbones/lean.py)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "/torch/" not in name and (name.startswith(ROOT) or "transformers" in name):
            return f"{Path(name).name}:{frame.f_code.co_qualname}"
        frame = frame.f_back
    return "?"


class Sources(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key, start = (source(), func.overloadpacket.__name__), time.perf_counter()
        out = func(*args, **(kwargs or {}))
        spent[key] += time.perf_counter() - start
        calls[key] += 1
        return out


def run():
    ALGORITHMS[algorithm].grad(s.model, init, drawn, cfg.inner_lr, cfg.inner_steps)


run()
alone = []
for _ in range(5):  # the episode's own time, without the mode
    start = time.perf_counter()
    run()
    alone.append(time.perf_counter() - start)
with Sources():
    run()


def by(part: int) -> tuple[collections.Counter, collections.Counter]:
    """Calls and seconds summed by source (part 0) or by operator (1)."""
    n, t = collections.Counter(), collections.Counter()
    for key, k in calls.items():
        n[key[part]] += k
        t[key[part]] += spent[key]
    return n, t


(count, seconds), (by_op, op_seconds) = by(0), by(1)
total, total_s = sum(count.values()), sum(seconds.values())
episode_s = sorted(alone)[len(alone) // 2]
print(f"{algorithm}: {total:,} operators, {total_s * 1000:.0f} ms in them; the episode takes {episode_s * 1000:.0f} ms "
      f"without the mode (median of {len(alone)}), {max(0.0, episode_s - total_s) * 1000:.0f} ms outside its operators\n")
print("| dispatched from | operators | ms | share of the time | most frequent |\n|---|---|---|---|---|")
for where, n in count.most_common():
    top = [f"{op} {k}" for (w, op), k in calls.most_common() if w == where][:4]
    print(f"| {where} | {n:,} | {seconds[where] * 1000:.1f} | {seconds[where] / total_s:.0%} | {', '.join(top)} |")

print("\n| operator | calls | ms | share of the time |\n|---|---|---|---|")
for op, seconds_in in op_seconds.most_common(12):
    print(f"| {op} | {by_op[op]:,} | {seconds_in * 1000:.1f} | {seconds_in / total_s:.0%} |")
