"""Ranking's attention in bf16 two ways, taking turns in one process: in plain operators
(blocked._plain, primer's default where no gradient is wanted and a unit has at most
blocked.PLAIN_ROWS rows) against SDPA's flash kernel (PLAIN_ROWS = 0). The bench's 128 test
examples, batches of 32, prompt 20, under the bench's allocator: 2 warm-ups each way, then 7
turns; the median seconds each way, their ratio, and how far apart the two ways' scores and
accuracies are. With `shapes`, first the attention calls' shapes and each one's time both ways;
with `lengths`, first random inputs of the backbone's heads at more lengths, in bf16 and
float32: 32 units over a cache of 31 keys, and one causal block without a cache (a training
forward's), which is where PLAIN_ROWS comes from; with `float32`, last, how far each way's scores
are from the backbone's in float32 (mean and largest difference over the 128 inputs' options).

  .venv/bin/python scripts/plain_attention.py [backbone] [shapes] [lengths] [float32]
"""
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from bench.measure import fixed_allocator, median_seconds as seconds  # noqa: E402
from core.backbones import blocked  # noqa: E402

fixed_allocator()
backbone = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
s = setup(parse(["--parts", "eval", "--dtype", "bf16", "--backbone", backbone]))
examples, options = s.test[:128], [s.options] * 128
default = blocked.PLAIN_ROWS


def rank(rows: int):
    blocked.PLAIN_ROWS = rows
    start = time.perf_counter()
    best = s.model.rank(examples, options, 32)
    return time.perf_counter() - start, best


def scores(rows: int) -> torch.Tensor:
    blocked.PLAIN_ROWS = rows
    return torch.cat(s.model.option_logliks([e.input for e in examples], options, relative=True, batch_size=32))


print(f"{backbone}, bf16, {torch.get_num_threads()} threads")
with torch.no_grad():
    if "shapes" in sys.argv[2:]:
        calls, first, attend = collections.Counter(), {}, blocked.attend

        def spy(q, k, v, mask, *rest):
            calls[tuple(q.shape), tuple(k.shape)] += 1
            first.setdefault((tuple(q.shape), tuple(k.shape)), (q, k, v, mask))
            return attend(q, k, v, mask, *rest)
        blocked.attend = spy
        rank(default)
        blocked.attend = attend
        print("\n| queries (units, heads, rows, dim) | keys | calls | flash kernel ms | plain ms | flash ÷ plain |\n|---|---|---|---|---|---|")
        for (qs, ks), n in calls.items():
            q, k, v, mask = first[qs, ks]
            flash = seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
            plain = seconds(lambda: blocked._plain(q, k, v, mask, None))
            print(f"| {qs} | {ks} | {n} | {flash * 1e3:.2f} | {plain * 1e3:.2f} | {flash / plain:.2f}× |")
    if "lengths" in sys.argv[2:]:
        config = s.model.backbone.model.config
        H, KH = config.num_attention_heads, config.num_key_value_heads
        D = getattr(config, "head_dim", None) or config.hidden_size // H
        g = torch.Generator().manual_seed(0)
        print("\n| dtype | queries (units, heads, rows, dim) | keys | flash kernel ms | plain ms | flash ÷ plain |\n|---|---|---|---|---|---|")
        for dtype in (torch.bfloat16, torch.float32):
            for U, L, C in [(32, L, 31) for L in (22, 66, 96, 128, 192, 256)] + [(1, L, 0) for L in (64, 128, 256)]:
                q = torch.randn(U, H, L, D, generator=g).to(dtype)
                k, v = (torch.randn(U, KH, C + L, D, generator=g).to(dtype) for _ in range(2))
                mask = torch.zeros(U, 1, L, C + L, dtype=dtype)
                mask[..., C:].masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
                flash = seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
                plain = seconds(lambda: blocked._plain(q, k, v, mask, None))
                print(f"| {str(dtype)[6:]} | {tuple(q.shape)} | {C + L} | {flash * 1e3:.2f} | {plain * 1e3:.2f} | {flash / plain:.2f}× |",
                      flush=True)
    for _ in range(2):
        rank(default), rank(0)
    turns = [(rank(default)[0], rank(0)[0]) for _ in range(7)]
    (_, plain), (_, flash) = rank(default), rank(0)
    apart = (scores(default) - scores(0)).abs().max().item()
    blocked.PLAIN_ROWS = default
plain_s, flash_s = (statistics.median(t[i] for t in turns) for i in (0, 1))
accuracy = lambda best: sum(b == e.output for b, e in zip(best, examples)) / len(examples)  # noqa: E731
print(f"\nrank: plain {plain_s:.3f} s, flash kernel {flash_s:.3f} s, flash ÷ plain {flash_s / plain_s:.3f}× "
      f"(turns: {', '.join(f'{a:.2f}/{b:.2f}' for a, b in turns)})")
print(f"scores at most {apart:.3g} apart (summed log-likelihoods); {sum(a != b for a, b in zip(plain, flash))} of "
      f"{len(examples)} answers differ; accuracy plain {accuracy(plain):.3f}, flash kernel {accuracy(flash):.3f}")
if "float32" in sys.argv[2:]:
    fp32 = setup(parse(["--parts", "eval", "--backbone", backbone]))
    with torch.no_grad():
        exact = torch.cat(fp32.model.option_logliks([e.input for e in examples], options, relative=True, batch_size=32))
        for name, rows in (("plain", default), ("flash kernel", 0)):
            off = (scores(rows) - exact).abs()
            print(f"{name}: from float32's scores {off.mean().item():.4f} on average, at most {off.max().item():.3f} "
                  f"(float32's: {exact.abs().mean().item():.2f} on average)")
        blocked.PLAIN_ROWS = default
