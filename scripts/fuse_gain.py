"""Would the lean MLP's and RMSNorm's derivatives (core/backbones/lean.py: `_silu_mul_grads`,
`_silu_mul_second` or, on Gemma, `_gelu_mul_grads`, `_gelu_mul_second`; `_rms_grad`, `_rms_second`)
pay as compiled kernels? torch.compile (dynamic
shapes, one graph each; C++ on a CPU, Triton on a GPU) writes each as one kernel: one pass over
memory instead of one per operator. On the bench's data, backbone and lengths, the two ways
taking turns in one process:

0. each function alone, on random inputs of the first MAML support pack's size (73 rows);
1. each function's calls and time within MAML meta-gradients of the bench's first 4 episodes
   (two rounds of each way, after one untimed round that compiles);
2. primer's own meta-training and prompt tuning (bench.measure: warm-up, then the median of the
   repeats; peak memory from a run of its own), after checking that the gradient is the same.

  .venv/bin/python scripts/fuse_gain.py [maml,fomaml,reptile,pt] [bench options: --prompt-length 100 --device cuda --dtype bf16 ...]
"""
import collections
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.figures import two_ways  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.upstream import ALGORITHMS, UpstreamConfig  # noqa: E402
from core.backbones import lean  # noqa: E402

args = sys.argv[1:]
which = args.pop(0).split(",") if args and not args[0].startswith("-") else ["maml", "fomaml", "reptile", "pt"]
s = setup(parse(["--parts", "meta", *args]))
gate = "gelu" if {m.act for m in s.model.backbone.model.modules() if isinstance(m, lean.GatedMLP)} == {"gelu_tanh"} else "silu"
NAMES = (f"_{gate}_mul_grads", f"_{gate}_mul_second", "_rms_grad", "_rms_second")
init = s.model.prompt.detach().clone()
device = s.model.backbone.device
torch._inductor.config.compile_threads = 1
spent, calls = collections.Counter(), collections.Counter()


def compiled(f):
    kernel = torch.compile(f, dynamic=True, fullgraph=True)

    def run(*a):
        # rows of the last dimension, no autograd flags: one compiled variant for every batch
        out = kernel(*(t.detach().reshape(-1, t.shape[-1]) if t.dim() > 1 else t.detach() for t in a))
        shape = a[0].shape  # every output's
        return out.view(shape) if isinstance(out, torch.Tensor) else tuple(o.view(shape) for o in out)
    return run


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(name, f):
    def run(*a):
        sync()
        start = time.perf_counter()
        out = f(*a)
        sync()
        spent[name] += time.perf_counter() - start
        calls[name] += 1
        return out
    return run


ways = {"operators": {n: getattr(lean, n) for n in NAMES}}
ways["compiled"] = {n: compiled(f) for n, f in ways["operators"].items()}


def way(name: str, work, timing: bool = False):
    def run():
        for n, f in ways[name].items():
            setattr(lean, n, timed(n, f) if timing else f)
        try:
            return work()
        finally:
            for n, f in ways["operators"].items():
                setattr(lean, n, f)
    return run


cfg = UpstreamConfig(algorithm="maml", inner_lr=s.inner_lr).resolved()
episodes = [TaskEpisodes(s.sources, cfg.seed).episode(i, *cfg.episode_sizes()) for i in range(4)]


def episodes_run():
    for e in episodes:
        ALGORITHMS["maml"].grad(s.model, init, [e], cfg.inner_lr, cfg.inner_steps)


def alone(f, inputs, n: int = 200) -> float:
    """µs per call, the median of 5 rounds of n calls."""
    rounds = []
    for _ in range(6):
        sync()
        start = time.perf_counter()
        for _ in range(n):
            f(*inputs)
        sync()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return sorted(rounds[1:])[2]


config = s.model.backbone.model.config
g = torch.Generator(device).manual_seed(0)
rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=config.torch_dtype)  # noqa: E731
d, m, rows = config.hidden_size, config.intermediate_size, 73
norm = [rand(1, rows, d), rand(1, rows, d), rand(d), rand(1, rows, 1).float().abs() + 0.5]
inputs = {NAMES[0]: [rand(1, rows, m) for _ in range(3)], NAMES[1]: [rand(1, rows, m) for _ in range(5)],
          "_rms_grad": norm, "_rms_second": [*norm, rand(1, rows, d)]}
print(f"{device}, {s.dtypes[0]}, prompt {init.shape[0]}, {torch.get_num_threads()} threads\n\n"
      f"Each function alone, {rows} rows: µs per call\n\n| function | operators | compiled |\n|---|---|---|")
for n in NAMES:
    print(f"| {n} | {alone(ways['operators'][n], inputs[n]):.0f} | {alone(ways['compiled'][n], inputs[n]):.0f} |", flush=True)
print("\nMAML, per episode: calls, ms in the function (operators | compiled), two rounds each\n\n"
      "| function | calls | operators: ms | compiled: ms |\n|---|---|---|---|", flush=True)
for name in ways:
    way(name, episodes_run)()  # compiles
per = {}
for name in ("compiled", "operators", "operators", "compiled"):
    spent.clear()
    calls.clear()
    way(name, episodes_run, timing=True)()
    for n in NAMES:
        per.setdefault((name, n), []).append(spent[n] / len(episodes) * 1e3)
counts = {n: calls[n] // len(episodes) for n in NAMES}
for n in (*NAMES, "all four"):
    ms = {w: [sum(x) for x in zip(*(per[w, m] for m in NAMES))] if n == "all four" else per[w, n] for w in ways}
    print(f"| {n} | {sum(counts.values()) if n == 'all four' else counts[n]} | "
          + " | ".join(", ".join(f"{v:.1f}" for v in ms[w]) for w in ways) + " |", flush=True)


two_ways(s, which, {"compiled": lambda work: way("compiled", work), "operators": lambda work: way("operators", work)})
