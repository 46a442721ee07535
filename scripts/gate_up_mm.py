"""Would one matrix multiply for a gated MLP's gate and up projections (their weights
concatenated, 576 -> 3072) run faster than two (576 -> 1536 each)? SmolLM2-135M's shapes, at the
row counts of MAML's packs (one episode ~60 rows, two ~200) and more: the forward x @ W.T, and
the backward's input gradient g @ W (two products summed against one), over 30 layers' weights in
turn, in milliseconds (the mean of 5 passes after 2), the ways taking turns. The outputs are
checked equal to the bit.

  .venv/bin/python scripts/gate_up_mm.py [threads, default 2]
"""
import sys
import time

import torch

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
LAYERS, D, I = 30, 576, 1536
pairs = [(torch.randn(I, D), torch.randn(I, D)) for _ in range(LAYERS)]
joined = [torch.cat(p) for p in pairs]


def ms(fn) -> float:
    for _ in range(2):
        fn()
    start = time.perf_counter()
    for _ in range(5):
        fn()
    return (time.perf_counter() - start) / 5 * 1000


print("| rows | forward: two, one (ms) | two ÷ one | backward: two, one (ms) | two ÷ one |\n|---|---|---|---|---|")
for rows in (60, 200, 400):
    x, g = torch.randn(rows, D), torch.randn(rows, 2 * I)
    gg, gu = g[:, :I].contiguous(), g[:, I:].contiguous()
    assert torch.equal(torch.cat([x @ pairs[0][0].t(), x @ pairs[0][1].t()], 1), x @ joined[0].t())
    ways = {"two": lambda: [(x @ a.t(), x @ b.t()) for a, b in pairs], "one": lambda: [x @ w.t() for w in joined],
            "two back": lambda: [gg @ a + gu @ b for a, b in pairs], "one back": lambda: [g @ w for w in joined]}
    t = {k: [] for k in ways}
    for r in range(3):
        for k in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            t[k].append(ms(ways[k]))
    m = {k: sorted(v)[1] for k, v in t.items()}
    print(f"| {rows} | {m['two']:.1f}, {m['one']:.1f} | {m['two'] / m['one']:.2f}× | "
          f"{m['two back']:.1f}, {m['one back']:.1f} | {m['two back'] / m['one back']:.2f}× |")
