"""Ranking's attention in bf16 two ways, taking turns in one process: in plain operators
(blocked._plain, primer's default where no gradient is wanted and a block's scores take at most
blocked.PLAIN_BYTES) against SDPA's flash kernel (PLAIN_BYTES = 0). The bench's 128 test
examples (with `task NAME`, a pack task's first 128 test examples at max_input_tokens 256
instead), batches of 32, prompt 20, under the bench's allocator: 2 warm-ups each way, then 7
turns; the median seconds each way, their ratio, and how far apart the two ways' scores and
accuracies are. With `shapes`, first the attention calls' shapes and each one's time both ways;
with `lengths`, first random inputs of the backbone's heads at more lengths, in bf16 and
float32: 32 units over a cache of 31 keys, and one causal block without a cache (a training
forward's); with `sizes`, first random bf16 inputs of the backbone's heads, 1 to 32 units of 128
to 512 rows over a cache of 31 keys, by the scores' size, which is where PLAIN_BYTES comes from;
with `float32`, last, how far each way's scores are from the backbone's in float32 (mean and
largest difference over the 128 inputs' options).

  .venv/bin/python scripts/plain_attention.py [backbone] [shapes] [lengths] [sizes] [task NAME] [float32]
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
task = sys.argv[sys.argv.index("task") + 1] if "task" in sys.argv[2:] else None
s = setup(parse(["--parts", "eval", "--dtype", "bf16", "--backbone", backbone]
                + (["--max-input-tokens", "256"] if task else [])))
if task:
    from core.tasks import get_split, load_task
    from core.spec import TaskRef

    pack = load_task(TaskRef(name=task))
    examples, options = get_split(pack, 100).test[:128], [tuple(pack.info.options)] * 128
else:
    examples, options = s.test[:128], [s.options] * 128
default = blocked.PLAIN_BYTES


def rank(limit: int):
    blocked.PLAIN_BYTES = limit
    start = time.perf_counter()
    best = s.model.rank(examples, options, 32)
    return time.perf_counter() - start, best


def scores(limit: int) -> torch.Tensor:
    blocked.PLAIN_BYTES = limit
    return torch.cat(s.model.option_logliks([e.input for e in examples], options, relative=True, batch_size=32))


config = s.model.backbone.model.config
H, KH = config.num_attention_heads, config.num_key_value_heads
D = getattr(config, "head_dim", None) or config.hidden_size // H
g = torch.Generator().manual_seed(0)


def random_both(U: int, L: int, C: int, dtype: torch.dtype) -> tuple[float, float]:
    """Seconds of the flash kernel and of _plain on random inputs of the backbone's heads: U units
    of L causal rows over a cache of C keys."""
    q = torch.randn(U, H, L, D, generator=g).to(dtype)
    k, v = (torch.randn(U, KH, C + L, D, generator=g).to(dtype) for _ in range(2))
    mask = torch.zeros(U, 1, L, C + L, dtype=dtype)
    mask[..., C:].masked_fill_(torch.ones(L, L, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    return (seconds(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
            seconds(lambda: blocked._plain(q, k, v, mask, None)))


print(f"{backbone}, bf16, {torch.get_num_threads()} threads" + (f", {task}'s test examples" if task else ""))
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
        print("\n| dtype | queries (units, heads, rows, dim) | keys | flash kernel ms | plain ms | flash ÷ plain |\n|---|---|---|---|---|---|")
        for dtype in (torch.bfloat16, torch.float32):
            for U, L, C in [(32, L, 31) for L in (22, 66, 96, 128, 192, 256)] + [(1, L, 0) for L in (64, 128, 256)]:
                flash, plain = random_both(U, L, C, dtype)
                print(f"| {str(dtype)[6:]} | {(U, H, L, D)} | {C + L} | {flash * 1e3:.2f} | {plain * 1e3:.2f} | {flash / plain:.2f}× |",
                      flush=True)
    if "sizes" in sys.argv[2:]:
        print("\n| queries (units, heads, rows, dim) | keys | scores MiB | flash kernel ms | plain ms | flash ÷ plain |\n|---|---|---|---|---|---|")
        for U in (1, 4, 8, 16, 32):
            for L in (128, 192, 256, 384, 512):
                flash, plain = random_both(U, L, 31, torch.bfloat16)
                print(f"| {(U, H, L, D)} | {31 + L} | {U * H * L * (31 + L) * 2 / 2**20:.1f} | {flash * 1e3:.2f} | "
                      f"{plain * 1e3:.2f} | {flash / plain:.2f}× |", flush=True)
    for _ in range(2):
        rank(default), rank(0)
    turns = [(rank(default)[0], rank(0)[0]) for _ in range(7)]
    (_, plain), (_, flash) = rank(default), rank(0)
    apart = (scores(default) - scores(0)).abs().max().item()
    blocked.PLAIN_BYTES = default
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
        for name, limit in (("plain", default), ("flash kernel", 0)):
            off = (scores(limit) - exact).abs()
            print(f"{name}: from float32's scores {off.mean().item():.4f} on average, at most {off.max().item():.3f} "
                  f"(float32's: {exact.abs().mean().item():.2f} on average)")
        blocked.PLAIN_BYTES = default
