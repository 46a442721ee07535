"""Would fused RMSNorm kernels pay on a GPU, where MAML's time goes to launching ~23,000 small
operators per episode (docs/performance.md, "On a GPU")? One MAML meta-gradient per episode
of the bench's first 6 episodes, the backbone's RMSNorm modules as transformers writes them
(pow, mean, add, rsqrt, mul, mul: each its own kernel, and more in each backward) against
torch.nn.functional.rms_norm (one fused kernel where the device has one): operators
dispatched per episode, seconds per episode (median of 3 rounds after 1 warm-up), and the
meta-gradient's relative difference. On a CPU rms_norm decomposes into the same operators.

  .venv/bin/python scripts/fused_norm.py [bench options: --device cuda --dtype bf16 --backbone DIR]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import Dispatched  # noqa: E402
from core.algorithms.episodes import TaskEpisodes  # noqa: E402
from core.algorithms.maml import maml_grad  # noqa: E402
from core.algorithms.upstream import UpstreamConfig  # noqa: E402

s = setup(parse(["--parts", "meta", *sys.argv[1:]]))
model, init = s.model, s.model.prompt.detach().clone()
cfg = UpstreamConfig(algorithm="maml", inner_lr=s.inner_lr).resolved()
episodes = [TaskEpisodes(s.sources, cfg.seed).episode(i, *cfg.episode_sizes()) for i in range(6)]
norms = [m for m in model.backbone.model.modules() if type(m).__name__.endswith("RMSNorm")]
plain = [m.forward for m in norms]


def fused(m):
    return lambda x: F.rms_norm(x, (x.shape[-1],), m.weight, m.variance_epsilon)


def run() -> torch.Tensor:
    return sum(maml_grad(model, init, [e], cfg.inner_lr, cfg.inner_steps)[0] for e in episodes)


def sync():
    if init.device.type == "cuda":
        torch.cuda.synchronize()


results = {}
for name in ("transformers", "fused"):
    for m, f in zip(norms, plain):
        m.forward = f if name == "transformers" else fused(m)
    with Dispatched() as ops:
        grad = run()
    seconds = []
    for _ in range(4):
        sync()
        start = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
    results[name] = (ops.ops / len(episodes), statistics.median(seconds[1:]) / len(episodes), grad)
diff = float((results["fused"][2] - results["transformers"][2]).norm() / results["transformers"][2].norm())
print(f"{len(norms)} RMSNorm modules, {init.device}, {s.dtypes[0]}\n\n"
      "| RMSNorm | operators per episode | s per episode |\n|---|---|---|")
for name, (ops, sec, _) in results.items():
    print(f"| {name} | {ops:,.0f} | {sec:.3f} |")
print(f"\nmeta-gradient relative difference: {diff:.2e}")
