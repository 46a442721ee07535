"""Why core.backbones.load.warm_vml exists: how far the service test's first MAML step moves when
one episode's first forward runs its rotary cos and sin with a low-accuracy kernel.

MKL 2024.2 picks a VML function's kernel on its first call, and first calls made at once from
two threads can run one of them on the low-accuracy kernel (~1000 ulp; pytorch/pytorch#188792).
Without warm_vml a fresh process's first cos, sin and exp are the two MAML episode threads' own
(gdb, breakpoints on vmsCos/vmsSin/vmsExp). This runs tests/test_service.py's spec (tiny model,
MAML) with its 2 episodes in parallel threads (MAML's default until 2026-12-07) on step 1 three times: as it is, with that first forward's
cos and sin in episode thread 1 off by a relative 1e-4 (random sign), and with 1e-7 (rounding):
the step-1 losses, and the shift of the second episode's.

  .venv/bin/python scripts/vml_first_calls.py
"""
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

from core.algorithms.upstream import ALGORITHMS, meta_grad  # noqa: E402
from core.backbones import load  # noqa: E402
from core.experiment import prepare, upstream_config  # noqa: E402
from core.spec import parse_spec  # noqa: E402
from tests import tiny  # noqa: E402
from tests.test_service import spec  # noqa: E402

with tempfile.TemporaryDirectory() as tmp:
    fields = spec(parallel_episodes=True) | {"backbone": str(tiny.save("causal", Path(tmp) / "tiny"))}
    job = parse_spec(fields)
    prep = prepare(job, lambda e: None, load)
    cfg = upstream_config(job, "maml").resolved()
    episodes = ALGORITHMS["maml"].episodes(prep.sources, cfg.seed)
    drawn = [episodes.episode(j, *cfg.episode_sizes()) for j in range(cfg.meta_batch)]
    prompt = torch.nn.Parameter(prep.init.detach().clone().float())

    rotary, error = modeling_llama.LlamaRotaryEmbedding.forward, {"size": 0.0, "left": 0}

    def perturbed(self, x, position_ids):
        cos, sin = rotary(self, x, position_ids)
        if error["left"] and threading.current_thread().name.endswith("_1"):  # episode thread 1's first forward
            error["left"] -= 1
            g = torch.Generator().manual_seed(0)
            cos = cos * (1 + error["size"] * torch.randn(cos.shape, generator=g).sign())
            sin = sin * (1 + error["size"] * torch.randn(sin.shape, generator=g).sign())
        return cos, sin

    modeling_llama.LlamaRotaryEmbedding.forward = perturbed
    print("| cos/sin error in episode 1's first forward | step-1 losses | shift of episode 1's |\n|---|---|---|")
    base = None
    for size in (0.0, 1e-4, 1e-7):
        error.update(size=size, left=1 if size else 0)
        _, losses = meta_grad(prep.model, prompt, drawn, cfg)
        base = base or losses
        print(f"| {size:g} | {', '.join(f'{x:.6f}' for x in losses)} | {losses[1] - base[1]:+.2e} |")
