"""Ranking's attention in bf16 two ways, taking turns in one process: in plain operators
(blocked._plain, primer's default where no gradient is wanted and a unit has at most
blocked.PLAIN_ROWS rows) against SDPA's flash kernel (PLAIN_ROWS = 0). The bench's 128 test
examples, batches of 32, prompt 20, under the bench's allocator: 2 warm-ups each way, then 7
turns; the median seconds each way, their ratio, and how far apart the two ways' scores and
accuracies are. With `shapes`, first the attention calls' shapes and each one's time both ways.

  .venv/bin/python scripts/plain_attention.py [backbone] [shapes]
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
from bench.measure import fixed_allocator  # noqa: E402
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


def seconds(fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
