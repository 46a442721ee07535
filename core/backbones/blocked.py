"""Attention over a long pack, one block of queries at a time, each over the keys it can see.

A pack of many short segments (rank classification's inputs and their options) has a block
mask: each token sees a shared KV cache (the prompt) and a few dozen tokens before it. Given that
mask, the SDPA kernel computes the whole (S, C + S) square of scores all the same. Here the
queries go in blocks of a few dozen rows, each against the cache's C keys and the span of the
pack's own keys that any of its rows sees, so the work grows with S times a segment's length
rather than S squared, and a batch's inputs need not be split into packs (and padded) to keep
the square small. A pack of several groups' rows, each group under its own prompt (a
meta-batch's episodes in one forward), goes a block per group: no group sees another's tokens,
so each takes its own keys, and the square of the pack becomes the groups' smaller squares.
Every block runs torch's SDPA on its slices, under the same mask (what
transformers' sdpa function runs, but for its copy of the grouped key heads), so the scores are
those of the whole square (`tests/test_soft_prompt.py`).

In bf16 on a CPU, where a gradient is wanted, each block (or the whole square, as one block:
`whole`) runs SDPA's flash kernel forward and its backward in plain operators
(`_MathBackward`): the flash kernel's forward and its own bf16 backward on a CPU take 1.6-2.8
times as long (docs/performance.md, "bf16 attention: the flash kernel forward, the backward in
plain operators").

It is transformers' "sdpa" attention function, wrapped (`install`): a forward that passes
`primer_blocks` gets the blocks; any other call goes to the function as it was.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Blocks:
    """Where the queries of a (packs, S) forward go: (q0, q1, lo, hi) for each block of query
    rows q0..q1, which see the cache's first C keys and the pack's own keys lo..hi at most."""

    cached: int
    spans: tuple[tuple[int, int, int, int], ...]


def plan(allowed: torch.Tensor, cached: int, size: int | list[int]) -> Blocks:
    """The blocks of a boolean mask `allowed` (packs, S, cached + S): which key columns each
    block of `size` query rows sees, over all packs; or, if `size` lists query rows (0 first,
    ascending), each block from one of them to the next."""
    S = allowed.shape[1]
    starts = list(range(0, S, size)) if isinstance(size, int) else list(size)
    ends = starts[1:] + [S]
    own = allowed[:, :, cached:].any(0)
    seen = torch.stack([own[q0:q1].any(0) for q0, q1 in zip(starts, ends)])  # (n, S): a block's rows see these columns
    cols = torch.arange(S, device=allowed.device)
    lo = torch.where(seen, cols, S).min(1).values.tolist()
    hi = torch.where(seen, cols + 1, 0).max(1).values.tolist()
    spans = tuple((q0, q1, min(l, h), h) for q0, q1, l, h in zip(starts, ends, lo, hi))
    return Blocks(cached, spans)


def whole(allowed: torch.Tensor) -> Blocks:
    """One block: every query of a (packs, S, S) mask over every key (no KV cache)."""
    return Blocks(0, ((0, allowed.shape[1], 0, allowed.shape[1]),))


class _MathBackward(torch.autograd.Function):
    """SDPA under an additive mask, no dropout: the flash kernel's forward, the backward in
    plain operators, the softmax recomputed from the saved inputs (as the flash kernel's own
    backward does). That backward is itself differentiable: MAML's support pass differentiates
    it again."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        ctx.save_for_backward(q, k, v, mask)
        ctx.scale = scale if scale is not None else q.shape[-1] ** -0.5
        # The CPU flash kernel itself, whichever kernels torch's process-wide choice allows (MAML
        # allows only the math kernel while its support pass runs); it takes grouped key heads as they are.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask, scale=scale)[0]

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask = ctx.saved_tensors
        B, H, S, D = q.shape
        KH, K = k.shape[1], k.shape[2]
        # A key head's query heads stacked as rows, (B, KH, H / KH * S, D): no copy of the keys per head.
        qs = (q * ctx.scale).reshape(B, KH, -1, D)
        g = grad.reshape(B, KH, -1, D)
        p = ((qs @ k.transpose(-1, -2)).view(B, KH, -1, S, K) + mask[:, :, None]).softmax(-1)
        ds = torch.ops.aten._softmax_backward_data((g @ v.transpose(-1, -2)).view(p.shape), p, -1, p.dtype)
        p, ds = p.view(B, KH, -1, K), ds.view(B, KH, -1, K)
        return (ds @ k).mul_(ctx.scale).view(B, H, S, D), ds.transpose(-1, -2) @ qs, p.transpose(-1, -2) @ g, None, None


# The precisions whose CPU attention takes _MathBackward where a gradient is wanted: bf16, whose
# flash backward is slow. () for SDPA's own backward everywhere (for comparison).
MATH_BACKWARD = (torch.bfloat16,)


def attend(q, k, v, mask, dropout: float, scale: float | None, gqa: bool) -> torch.Tensor:
    """SDPA on one block: in bf16 (MATH_BACKWARD) on a CPU with a gradient wanted, through _MathBackward."""
    if (q.dtype in MATH_BACKWARD and q.device.type == "cpu" and not dropout
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _MathBackward.apply(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def blocked(sdpa):
    """transformers' sdpa attention function `sdpa`, by blocks of queries where a call says so."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                  primer_blocks: Blocks | None = None, **kw):
        if (primer_blocks is None or attention_mask is None
                or kw.get("softcap") is not None or kw.get("position_bias") is not None):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        C, outs, gqa = primer_blocks.cached, [], query.shape[1] != key.shape[1]
        spans = primer_blocks.spans
        if not C and all(lo == q0 and hi == q1 for q0, q1, lo, hi in spans):
            # Each block takes its own rows' keys only (a pack of groups): queries, keys and values
            # split, so that their gradients are put together by one concatenation, not summed
            # from a zero-filled copy per block.
            sizes = [q1 - q0 for q0, q1, _, _ in spans]
            for (q0, q1, _, _), q, k, v in zip(spans, *(x.split(sizes, 2) for x in (query, key, value))):
                outs.append(attend(q, k, v, attention_mask[:, :, q0:q1, q0:q1], dropout, scaling, gqa))
            spans = ()
        for q0, q1, lo, hi in spans:
            if lo <= C or not C:  # little to skip before the span, or no cache: the keys as one slice, no copy
                cols = slice(lo if not C else 0, C + hi)
                k, v, m = key[:, :, cols], value[:, :, cols], attention_mask[:, :, q0:q1, cols]
            else:
                k, v = (torch.cat([x[:, :, :C], x[:, :, C + lo : C + hi]], 2) for x in (key, value))
                m = attention_mask[:, :, q0:q1]
                m = torch.cat([m[..., :C], m[..., C + lo : C + hi]], 3)
            # The kernel takes the grouped heads as they are (transformers copies them per head).
            outs.append(attend(query[:, :, q0:q1], k, v, m, dropout, scaling, gqa))
        return torch.cat(outs, 2).transpose(1, 2).contiguous(), None

    attention.primer_blocked = True
    return attention


def install() -> None:
    """Wrap transformers' sdpa attention function (once per process)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if not getattr(sdpa, "primer_blocked", False):
        AttentionInterface.register("sdpa", blocked(sdpa))
