"""Would ranking pay to run attention over each input's own row instead of over the whole pack?
In rank classification's packs (SoftPromptModel._packed_option_logliks) an input and its options
see the prompt's KV cache and each other only, yet the block mask makes the kernel compute the
whole (S, C + S) square. Here, for the length of the script only, transformers' sdpa attention
takes each group of segments that see one another (an input and its options) as one row of its
own: its queries, the cache's keys and its own, gathered from the pack, under the pack's mask
gathered the same way (so sliding windows and the cache each segment sees stay as they were).
Forward only. On the bench's model and data: the scores both ways, then the seconds to rank the
bench's 128 test examples in batches of 32, the two ways taking turns.

  .venv/bin/python scripts/rank_rows.py [fp32|bf16]
"""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package
from bench.__main__ import parse, setup  # noqa: E402
from core.backbones.soft_prompt import SoftPromptModel  # noqa: E402

sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
ROWS = {"on": False}


def by_rows(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    at = kw.pop("primer_rows", None)
    if at is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
    qi, ki, pack, qp, kp, real, back = at
    packs, H, S, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    R, N = qi.shape
    q = query.transpose(1, 2).reshape(packs * S, H, D)[qi.flatten()].view(R, N, H, D).transpose(1, 2)
    k, v = (x.transpose(1, 2).reshape(packs * K, Hkv, D)[ki.flatten()].view(R, -1, Hkv, D).transpose(1, 2)
            for x in (key, value))
    m = attention_mask[pack[:, None, None], 0, qp[:, :, None], kp[:, None, :]]
    m = m.masked_fill(~real[:, None, :], torch.finfo(m.dtype).min)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scaling, enable_gqa=H != Hkv)
    return out.transpose(1, 2).reshape(R * N, H, D)[back].view(packs, S, H, D), None


ALL_ATTENTION_FUNCTIONS["sdpa"] = by_rows


def layout(packs, S: int, C: int, dev):
    """Each pack's groups of segments that see one another, as padded rows of query positions
    and key positions (the cache's C, then the group's), and where each pack position's output is."""
    rows = []  # (pack, the group's positions in it)
    for k, pack in enumerate(packs):
        group = list(range(len(pack)))
        for j, s in enumerate(pack):
            for i in s.sees:
                group[j] = group[i]
        members, n = {}, 0
        for j, s in enumerate(pack):
            members.setdefault(group[j], []).extend(range(n, n + len(s.tokens)))
            n += len(s.tokens)
        rows += [(k, positions) for positions in members.values()]
    N = max(len(g) for _, g in rows)
    qp = torch.tensor([g + [g[0]] * (N - len(g)) for _, g in rows])
    kp = torch.tensor([list(range(C)) + [C + t for t in g] + [0] * (N - len(g)) for _, g in rows])
    real = torch.tensor([[True] * (C + len(g)) + [False] * (N - len(g)) for _, g in rows])
    pack = torch.tensor([k for k, _ in rows])
    back = torch.zeros(len(packs) * S, dtype=torch.long)  # padding positions read row 0: never used
    for r, (k, g) in enumerate(rows):
        back[[k * S + t for t in g]] = torch.arange(r * N, r * N + len(g))
    at = (pack[:, None] * S + qp, pack[:, None] * (C + S) + kp, pack, qp, kp, real, back)
    return tuple(x.to(dev) for x in at)


run_packs = SoftPromptModel._run_packs


def rows_run_packs(self, packs, prompts, cached=None):
    """_run_packs, its forward over the packs given their row layout (ranking: no prompt segments)."""
    if not ROWS["on"] or prompts is not None:
        return run_packs(self, packs, prompts, cached)
    base = self.backbone.model.base_model
    forward, S = base.forward, max(sum(len(s.tokens) for s in pack) for pack in packs)

    def with_rows(*a, **kw):
        x = kw["inputs_embeds"]
        if x.shape[:2] == (len(packs), S):  # the packs' forward, not the prompt cache's
            kw["primer_rows"] = layout(packs, S, 0 if cached is None else cached.shape[0], x.device)
        return forward(*a, **kw)

    base.forward = with_rows
    try:
        return run_packs(self, packs, prompts, cached)
    finally:
        del base.forward


SoftPromptModel._run_packs = rows_run_packs

dtype = sys.argv[1] if len(sys.argv) > 1 else "bf16"
s = setup(parse(["--parts", "eval", "--dtype", dtype]))
examples, options = s.test[:128], [s.options] * 128
with torch.no_grad():
    scores = []
    for on in (False, True):
        ROWS["on"] = on
        scores.append(torch.stack(s.model.option_logliks([e.input for e in examples[:32]], options[:32])))
    print(f"{dtype}: scores of 32 inputs, largest difference {(scores[0] - scores[1]).abs().max().item():.2e} "
          f"(largest score {scores[0].abs().max().item():.1f})")
    print("| round | block mask (s) | rows (s) |\n|---|---|---|")
    for r in range(3):
        took = {}
        for on in (False, True) if r % 2 == 0 else (True, False):
            ROWS["on"] = on
            t = time.perf_counter()
            s.model.rank(examples, options, 32)
            took[on] = time.perf_counter() - t
        print(f"| {r + 1} | {took[False]:.3f} | {took[True]:.3f} |", flush=True)
