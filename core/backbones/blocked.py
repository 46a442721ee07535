"""Attention over a long pack of short segments, each part over the keys it can see.

A pack of many short segments (rank classification's inputs and their options) has a block
mask: each token sees a shared KV cache (the prompt) and a few dozen tokens before it. Given that
mask, the SDPA kernel computes the whole (S, C + S) square of scores all the same. Here each
input with its options (a unit: `units`) becomes a row of one padded batch, over the cache's C
keys and its own, all in one SDPA call: the work grows with S times a unit's length rather than
S squared, and a batch's inputs need not be split into packs to keep the square small. A pack of
several groups' rows, each group under its own prompt (a meta-batch's episodes in one forward),
goes a block per group (`plan`): no group sees another's tokens, so each takes its own keys, and
the square of the pack becomes the groups' smaller squares. Both run torch's SDPA under the
pack's own mask (what transformers' sdpa function runs, but for its copy of the grouped key
heads), so the scores are those of the whole square (`tests/test_soft_prompt.py`).

In bf16 on a CPU, where a gradient is wanted, each block (or the whole square, as one block:
`whole`) runs SDPA's flash kernel forward and its backward in plain operators
(`_MathBackward`): the flash kernel's forward and its own bf16 backward on a CPU take 1.6-2.8
times as long (docs/performance.md, "bf16 attention: the flash kernel forward, the backward in
plain operators"). Where none is wanted (ranking's units) and a block's scores are small
(`PLAIN_BYTES`), the whole attention runs in plain operators (`_plain`): there the flash
kernel's bf16 forward takes 1.3-3.5 times as long ("Ranking's attention in bf16 in plain
operators").

It is transformers' "sdpa" attention function, wrapped (`install`): a forward that passes
`primer_blocks` gets the blocks; any other call goes to the function as it was.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Blocks:
    """Blocks of query rows q0..q1 of a (packs, S) forward with no KV cache, each seeing its own
    rows' keys only (a pack of groups: a meta-batch's episodes, each under its own prompt)."""

    spans: tuple[tuple[int, int], ...]


def plan(allowed: torch.Tensor, starts: list[int]) -> Blocks:
    """The blocks of a boolean mask `allowed` (packs, S, S) from each of `starts` (query rows, 0
    first, ascending) to the next, leaving out every start that a later row of any pack sees
    across (packs of groups that start at different rows)."""
    own, S = allowed.any(0), allowed.shape[1]
    starts = [q for q in starts if not own[q:, :q].any()]
    return Blocks(tuple(zip(starts, starts[1:] + [S])))


@dataclass(frozen=True)
class Units:
    """Rows of a (packs, S) forward in units, each seeing the cache's first C keys and its own
    rows only (rank classification: an input and its options): their attention goes in one
    call, a unit a row of a batch padded to the longest. `rows` (U, L): the units' rows in the
    packs flattened, a unit's padding repeating its last row; `real` (U, L): not padding;
    `back` (packs * S,): where each row of the packs is in the (U * L) padded rows."""

    cached: int
    rows: torch.Tensor
    real: torch.Tensor
    back: torch.Tensor
    masks: dict = field(default_factory=dict, compare=False)  # a layer's mask (by identity) -> the units' mask


def units(allowed: torch.Tensor, cached: int, spans: list[tuple[int, int, int]]) -> Units:
    """The units (pack, first row, end row) of a boolean mask `allowed` (packs, S, cached + S);
    a row that sees a key of its pack outside its own unit is an error."""
    B, S = allowed.shape[:2]
    unit = torch.full((B, S), -1, dtype=torch.long)
    for u, (k, r0, r1) in enumerate(spans):
        unit[k, r0:r1] = u
    unit = unit.to(allowed.device)
    if (allowed[:, :, cached:] & (unit[:, :, None] != unit[:, None, :]) & (unit[:, :, None] >= 0)).any():
        raise ValueError("a row sees keys outside its unit")
    L = max(r1 - r0 for _, r0, r1 in spans)
    at = torch.arange(L)
    first = torch.tensor([k * S + r0 for k, r0, _ in spans])[:, None]
    length = torch.tensor([r1 - r0 for _, r0, r1 in spans])[:, None]
    real = at < length
    rows = first + torch.minimum(at, length - 1)
    back = torch.zeros(B * S, dtype=torch.long)
    back[rows[real]] = (torch.arange(len(spans))[:, None] * L + at).expand(-1, L)[real]
    dev = allowed.device
    return Units(cached, rows.to(dev), real.to(dev), back.to(dev))


def _by_units(u: Units, query, key, value, mask, dropout: float, scale: float | None, gqa: bool) -> torch.Tensor:
    """The attention of every unit in one SDPA call: (packs, S, heads, head dim), as transformers'."""
    B, H, S, D = query.shape
    C, (U, L) = u.cached, u.rows.shape
    rows = u.rows.view(-1)
    # whole rows of (packs * S, heads * D) copied: transformers' queries are laid out so already
    q = query.transpose(1, 2).reshape(B * S, H * D).index_select(0, rows).view(U, L, H, D).transpose(1, 2)
    k, v = (torch.cat([x[:1, :, :C].expand(U, -1, -1, -1), x[:, :, C:].transpose(0, 1).reshape(x.shape[1], B * S, D)
                       .index_select(1, rows).view(-1, U, L, D).transpose(0, 1)], 2) for x in (key, value))
    if mask not in u.masks:
        pack, r = u.rows // S, u.rows % S
        cols = torch.cat([torch.arange(C, device=r.device).expand(U, L, C), C + r[:, None, :].expand(U, L, L)], 2)
        m = mask[pack[:, :, None], 0, r[:, :, None], cols]  # (U, L, C + L)
        hidden = F.pad(~u.real, (C, 0))[:, None, :]  # the padding's keys
        u.masks[mask] = m.masked_fill(hidden, False if m.dtype == torch.bool else torch.finfo(m.dtype).min)[:, None]
    out = attend(q, k, v, u.masks[mask], dropout, scale, gqa)  # (U, H, L, D)
    return out.transpose(1, 2).reshape(U * L, H * D).index_select(0, u.back).view(B, S, H, D)


def whole(allowed: torch.Tensor) -> Blocks:
    """One block: every query of a (packs, S, S) mask over every key (no KV cache)."""
    return Blocks(((0, allowed.shape[1]),))


def _weights(qs, k, mask, S: int) -> torch.Tensor:
    """The attention weights (B, KH, H / KH, S, K) of scaled queries `qs` (B, KH, H / KH * S, D):
    a key head's query heads stacked as rows, so no copy of the keys per head."""
    B, KH = qs.shape[:2]
    return ((qs @ k.transpose(-1, -2)).view(B, KH, -1, S, k.shape[2]) + mask[:, :, None]).softmax(-1)


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
        qs = (q * ctx.scale).reshape(B, KH, -1, D)
        g = grad.reshape(B, KH, -1, D)
        p = _weights(qs, k, mask, S)
        ds = torch.ops.aten._softmax_backward_data((g @ v.transpose(-1, -2)).view(p.shape), p, -1, p.dtype)
        p, ds = p.view(B, KH, -1, K), ds.view(B, KH, -1, K)
        return (ds @ k).mul_(ctx.scale).view(B, H, S, D), ds.transpose(-1, -2) @ qs, p.transpose(-1, -2) @ g, None, None


def _plain(q, k, v, mask, scale: float | None) -> torch.Tensor:
    """SDPA under an additive mask in plain operators, for no gradient: the weights as
    _MathBackward's backward recomputes them (`_weights`), then the values. The scores and their
    softmax in q's precision (the flash kernel keeps the softmax in float32: in bf16 an output's
    error is about twice the flash kernel's, the option scores ranking compares 1.03 times as
    far from float32's)."""
    B, H, S, D = q.shape
    KH, K = k.shape[1], k.shape[2]
    qs = (q * (scale if scale is not None else D ** -0.5)).reshape(B, KH, -1, D)
    return (_weights(qs, k, mask, S).view(B, KH, -1, K) @ v).view(B, H, S, D)


# The precisions whose CPU attention runs in plain operators: with a gradient wanted, the
# backward (_MathBackward); without one, where a block's scores (units x heads x queries x keys)
# take at most PLAIN_BYTES, all of it (_plain). bf16, whose flash kernel is slow both ways on a
# CPU; () for SDPA alone (for comparison).
PLAIN_ATTENTION = (torch.bfloat16,)
# With SmolLM2-135M's heads and Gemma-3-270M's, 1 to 32 units of 128 to 512 rows, the plain
# forward led the flash kernel 1.26-2.28x up to 16 MiB of scores, and from 34 MiB on mostly
# trailed (0.65-0.85x, once 1.31x); between, where it turns (1.07x at 19.5 MiB), it moved with
# the heads (scripts/plain_attention.py [backbone] sizes; an EPYC, 2 cores).
PLAIN_BYTES = 16 * 2**20


def attend(q, k, v, mask, dropout: float, scale: float | None, gqa: bool) -> torch.Tensor:
    """SDPA on one block: in bf16 (PLAIN_ATTENTION) on a CPU through _MathBackward where a gradient
    is wanted, through _plain where none is and the block's scores take at most PLAIN_BYTES."""
    if q.dtype in PLAIN_ATTENTION and q.device.type == "cpu" and not dropout:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _MathBackward.apply(q, k, v, mask, scale)
        if q.shape[:3].numel() * k.shape[2] * q.element_size() <= PLAIN_BYTES:
            return _plain(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


def blocked(sdpa):
    """transformers' sdpa attention function `sdpa`, by units or blocks where a call says so."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, *,
                  primer_blocks: Blocks | Units | None = None, **kw):
        if (primer_blocks is None or attention_mask is None
                or kw.get("softcap") is not None or kw.get("position_bias") is not None):
            return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)
        gqa = query.shape[1] != key.shape[1]
        if isinstance(primer_blocks, Units):
            return _by_units(primer_blocks, query, key, value, attention_mask, dropout, scaling, gqa), None
        # Queries, keys and values split by block, so that their gradients are put together by
        # one concatenation, not summed from a zero-filled copy per block.
        spans = primer_blocks.spans
        outs = [attend(q, k, v, attention_mask[:, :, q0:q1, q0:q1], dropout, scaling, gqa)
                for (q0, q1), q, k, v in zip(spans, *(x.split([q1 - q0 for q0, q1 in spans], 2) for x in (query, key, value)))]
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
