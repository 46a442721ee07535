"""SDPA's forward and backward on a CPU, one call at a time, by kernel: torch's flash kernel
(forward and its own backward), the math kernel, and primer's _MathBackward (the flash kernel's
forward, the backward in plain operators; core/backbones/blocked.py). SmolLM2-135M's attention
shapes (9 query heads over 3 key/value heads, 64 wide), a causal mask with one segment hidden
from a later one, at several lengths; the milliseconds of one forward and backward (median of
20, after 3), and each gradient's distance from float64's.

  .venv/bin/python scripts/bf16_attention.py [bf16|fp32]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.backbones.blocked import _MathBackward  # noqa: E402

dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[1] if len(sys.argv) > 1 else "bf16"]
torch.set_num_threads(2)


def inputs(S: int, dt: torch.dtype):
    g = torch.Generator().manual_seed(0)
    q, grad = (torch.randn(1, 9, S, 64, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(1, 3, S, 64, generator=g, dtype=torch.float64) for _ in range(2))
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    allowed[S // 2:, 5 : S // 2] = False
    mask = torch.zeros(1, 1, S, S, dtype=dt).masked_fill(~allowed, torch.finfo(dt).min)
    return [x.to(dt).requires_grad_() for x in (q, k, v)], mask, grad.to(dt)


def kernel(backend):
    def run(q, k, v, m):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
    return run


WAYS = {"flash kernel": kernel(SDPBackend.FLASH_ATTENTION), "math kernel": kernel(SDPBackend.MATH),
        "_MathBackward": lambda q, k, v, m: _MathBackward.apply(q, k, v, m, None)}


def grads(way, S, dt):
    (q, k, v), m, g = inputs(S, dt)
    way(q, k, v, m).backward(g)
    return [x.grad.double() for x in (q, k, v)]


print(f"{dtype}, 2 threads\n\n| tokens | " + " | ".join(f"{w}: ms" for w in WAYS)
      + " | flash ÷ _MathBackward | " + " | ".join(f"{w}: error" for w in WAYS) + " |")
print("|---" * (2 * len(WAYS) + 2) + "|")
for S in (32, 64, 128, 256, 512):
    exact = grads(WAYS["flash kernel"], S, torch.float64)
    ms, err = {}, {}
    for name, way in WAYS.items():
        err[name] = max(((a - b).norm() / b.norm()).item() for a, b in zip(grads(way, S, dtype), exact))
        (q, k, v), m, g = inputs(S, dtype)
        times = []
        for i in range(23):
            t = time.perf_counter()
            way(q, k, v, m).backward(g)
            times.append(time.perf_counter() - t)
        ms[name] = statistics.median(times[3:]) * 1e3
    print(f"| {S} | " + " | ".join(f"{ms[w]:.2f}" for w in WAYS) + f" | {ms['flash kernel'] / ms['_MathBackward']:.2f}× | "
          + " | ".join(f"{err[w]:.1e}" for w in WAYS) + " |", flush=True)
