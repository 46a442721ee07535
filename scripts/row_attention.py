"""A training block's attention two ways, forward and backward, taking turns in one process: the
whole block under its mask in one SDPA call (core/backbones/blocked.py's way: an episode's
prompt, its task's template and its rows, each row seeing the prompt, the template and its own
earlier tokens), against each row as a row of a padded batch over the prefix's keys and its own
(gathered there and scattered back, the gathers' backward included; the prefix's own attention
one small causal call). Random inputs of SmolLM2-135M's attention (9 heads of 64, the grouped key
heads repeated, as transformers' sdpa function does), fp32, a 20-token prompt and a 10-token
template, 4 rows (an episode's support or query batch of FoMAML) of a given length, the 30
layers' calls of one forward and backward. Prints the median seconds of 7 turns each way, their
ratio, the share of the block's square the rows see, and how far the two ways' outputs and
gradients are apart. Sizes the lever named in docs/performance.md ("Longer inputs").

  .venv/bin/python scripts/row_attention.py [row lengths, default 40,70,100,130]
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.measure import fixed_allocator  # noqa: E402

fixed_allocator()
torch.manual_seed(0)
H, D, PROMPT, TEMPLATE, ROWS, LAYERS = 9, 64, 20, 10, 4, 30
lengths = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "40,70,100,130").split(",")]


def layout(T: int):
    P = PROMPT + TEMPLATE
    sizes = [T - 6, T - 2, T + 2, T + 6][:ROWS]  # rows of a batch differ a little
    starts = [P + sum(sizes[:i]) for i in range(ROWS)]
    S = P + sum(sizes)
    allowed = torch.zeros(S, S, dtype=torch.bool)
    allowed[:P, :P] = torch.ones(P, P).tril().bool()
    for a, n in zip(starts, sizes):
        allowed[a:a + n, :P] = True
        allowed[a:a + n, a:a + n] = torch.ones(n, n).tril().bool()
    return P, sizes, starts, S, allowed


def whole(q, k, v, allowed):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def by_rows(q, k, v, P, sizes, starts, S):
    L = max(sizes)
    at = torch.arange(L)
    qidx = torch.stack([a + at.clamp(max=n - 1) for a, n in zip(starts, sizes)])  # (R, L), padding repeats the last
    kidx = torch.cat([torch.arange(P).expand(len(sizes), P), qidx], 1)  # (R, P + L)
    real = at[None, :] < torch.tensor(sizes)[:, None]
    mask = torch.cat([torch.ones(len(sizes), L, P, dtype=torch.bool),
                      torch.ones(L, L).tril().bool()[None] & real[:, None, :]], 2)[:, None]
    rows = lambda x, idx: x[0][:, idx].transpose(0, 1)  # noqa: E731  (1, H, S, D) -> (R, H, len(idx[0]), D)
    out_rows = F.scaled_dot_product_attention(rows(q, qidx), rows(k, kidx), rows(v, kidx), attn_mask=mask)
    head = F.scaled_dot_product_attention(q[:, :, :P], k[:, :, :P], v[:, :, :P], is_causal=True)
    where = qidx[real]  # each real row position of the block, in order
    out = torch.empty_like(q[0]).index_put((torch.arange(H)[:, None], where[None]),
                                           out_rows.transpose(0, 1)[:, real])
    return torch.cat([head[0], out[:, P:]], 1)[None]


def step(fn, inputs, grad):
    for _ in range(LAYERS):
        q, k, v = (x.detach().requires_grad_() for x in inputs)
        out = fn(q, k, v)
        torch.autograd.backward(out, grad)
    return out, (q.grad, k.grad, v.grad)


print("| row tokens | block tokens | share of the square seen | whole block (s) | by rows (s) | speed-up | "
      "largest difference: output, gradients |\n|---|---|---|---|---|---|---|")
for T in lengths:
    P, sizes, starts, S, allowed = layout(T)
    inputs = [torch.randn(1, H, S, D) for _ in range(3)]
    grad = torch.randn(1, H, S, D)
    ways = {"whole": lambda q, k, v: whole(q, k, v, allowed),
            "rows": lambda q, k, v: by_rows(q, k, v, P, sizes, starts, S)}
    (o1, g1), (o2, g2) = (step(f, inputs, grad) for f in ways.values())
    diff = (o1 - o2).abs().max().item(), max((a - b).abs().max().item() for a, b in zip(g1, g2))
    for f in ways.values():  # warm-ups
        step(f, inputs, grad)
    times = {name: [] for name in ways}
    for turn in range(7):
        for name in (list(ways) if turn % 2 == 0 else list(ways)[::-1]):
            start = time.perf_counter()
            step(ways[name], inputs, grad)
            times[name].append(time.perf_counter() - start)
    a, b = statistics.median(times["whole"]), statistics.median(times["rows"])
    print(f"| {T} | {S} | {allowed.float().mean().item():.0%} | {a:.3f} | {b:.3f} | {a / b:.2f}× | "
          f"{diff[0]:.1e}, {diff[1]:.1e} |", flush=True)
