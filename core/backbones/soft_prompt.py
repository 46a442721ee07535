"""SoftPromptModel: trainable prompt vectors in front of a frozen language model.

Every computation takes the prompt as an argument (default: the model's own parameter), so a
meta-learner can run the same forward with an adapted prompt, or with one prompt per example
of a batch, without functionalizing the backbone.

Layout of one causal sequence (right-padded):  [P prompt vectors][input tokens][answer tokens][pad]
Hidden state t predicts token t+1, so the answer is read off the positions just before it, and
the LM head runs only there: a 49k-word head over every input position would dominate the cost.
Losses pack the rows of a batch end to end instead of padding them (`_packed_hidden`), and
run the tokens their rows begin with (a task's template) once per pack (SHARE_PREFIX).
Seq2seq models take [P][input] in the encoder and the answer in the decoder.
"""
from __future__ import annotations

import itertools
import os
import threading
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.names import MAX_PROMPT_TOKENS

from core.backbones import blocked, lean
from core.backbones.load import Backbone
from core.tasks.base import Example, TaskError, TaskInfo

CAUSAL_ANSWER_CUE = "\nAnswer:"  # a causal LM needs to be told where the answer starts


@dataclass
class Batch:
    """Token ids of one padded batch, with where the answer tokens are."""

    ids: torch.Tensor  # (B, T) input (+ answer for causal) token ids, right-padded
    mask: torch.Tensor  # (B, T)
    answer: torch.Tensor  # (B, A) answer ids, padded with -100
    answer_rows: torch.Tensor  # (N,) which sequence each answer token belongs to
    answer_pos: torch.Tensor  # (N,) causal: token position (before the prompt) predicting it
    answer_ids: torch.Tensor  # (N,) the answer token ids, flattened


@dataclass
class PromptStates:
    """A prefix's keys and values in every layer, (1, key heads, length, head dim) each, as it
    runs alone at positions 0..length-1 (`SoftPromptModel._prompt_states`): computed once, then
    copied into the KV cache of every forward that runs after that prefix."""

    length: int
    layers: list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Segment:
    """A stretch of one pack (`SoftPromptModel._run_packs`): tokens, or a prompt's vectors."""

    tokens: list[int]
    prompt: int = -1  # >= 0: this segment is prompt number `prompt`, its P vectors, and has no tokens
    start: int = 0  # the position of its first token, as if it ran alone
    sees: tuple[int, ...] = ()  # the earlier segments of its pack it attends to, besides itself
    cache: int | None = None  # how many leading positions of the packs' shared KV cache it sees (None: all)


def _full_cache():
    """A KV cache that keeps every position in every layer. The one a sliding-window model
    makes for itself keeps only the last `window` positions in those layers, which a custom
    mask over the whole cache (`SoftPromptModel._masks`) could not be laid over."""
    from transformers import DynamicCache

    return DynamicCache()


def check_prompt_length(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_PROMPT_TOKENS:
        raise UserError(f"prompt length must be an integer from 1 to {MAX_PROMPT_TOKENS}, got {n!r}")
    return n


def plan_packs(sizes: list[int], owner: list[int], prompt: int | dict[int, int],
               cap: int) -> list[list[tuple[int, list[int]]]]:
    """Which rows go into which pack: row r has sizes[r] tokens and needs the head of group
    owner[r] (its prompt and shared prefix: `prompt` tokens, or prompt[g] for group g) in its
    pack. As few packs as `cap` tokens each allow, filled evenly (the longest rows first, each
    into the pack it leaves shortest, a group's head counted where the pack does not have it
    yet), since every pack is padded to the longest. Returns each pack as [(group, [rows])],
    groups and rows in first-seen order."""
    order = {g: i for i, g in enumerate(dict.fromkeys(owner))}
    head = prompt if isinstance(prompt, dict) else dict.fromkeys(order, prompt)
    total = sum(sizes) + sum(head[g] for g in order)
    n_packs = max(1, min(len(sizes), -(-total // cap)))
    lengths, members = [0] * n_packs, [dict() for _ in range(n_packs)]
    for r in sorted(range(len(sizes)), key=lambda r: -sizes[r]):
        g = owner[r]
        cost = [lengths[k] + sizes[r] + (0 if g in members[k] else head[g]) for k in range(n_packs)]
        k = min(range(n_packs), key=cost.__getitem__)
        lengths[k] = cost[k]
        members[k].setdefault(g, []).append(r)
    return [[(g, sorted(rows)) for g, rows in sorted(m.items(), key=lambda gr: order[gr[0]])] for m in members if m]


def cut(ids: list[int], n: int, truncation: str = "middle") -> list[int]:
    """An input's tokens, at most n. Past n, "middle": its first half and its last, the middle
    dropped. The first hold a task's template, which states the question and its label words ("Is
    this SMS message spam or ham? Message:"); the last, the end of the text and what comes after
    it (a causal LM's answer cue, a seq2seq tokenizer's </s>, CrossFit's options after the text).
    "left": its last n, the start dropped, template and all."""
    if len(ids) <= n:
        return ids
    return ids[: n // 2] + ids[len(ids) - (n - n // 2):] if truncation == "middle" else ids[len(ids) - n:]


class SoftPromptModel(nn.Module):
    def __init__(self, backbone: Backbone, prompt: torch.Tensor, *, max_input_tokens: int = 256,
                 max_answer_tokens: int = 32, truncation: str = "middle", allow_empty: bool = False):
        super().__init__()
        if not (allow_empty and prompt.shape[0] == 0):  # empty: the fine-tuning baseline
            check_prompt_length(prompt.shape[0] if prompt.dim() == 2 else 0)
        if prompt.shape[1] != backbone.dim:
            raise UserError(f"prompt has width {prompt.shape[1]} but backbone {backbone.name!r} "
                            f"embeds tokens in {backbone.dim} dimensions")
        self.backbone = backbone  # a dataclass, not a submodule: its weights stay out of state_dict
        self.prompt = nn.Parameter(prompt.detach().clone().to(backbone.device, torch.float32))
        self.max_input_tokens = max_input_tokens
        self.max_answer_tokens = max_answer_tokens
        self.truncation = truncation  # of an input past max_input_tokens: `cut`
        self._tok_cache: dict[tuple[str, bool], list[int]] = {}
        self._tok_lock = threading.Lock()

    # ---- tokenization -------------------------------------------------------------------

    @property
    def causal(self) -> bool:
        return self.backbone.kind == "causal"

    def _tokens(self, text: str, answer: bool) -> list[int]:
        key = (text, answer)
        if key not in self._tok_cache:
            with self._tok_lock:  # a fast tokenizer refuses a second thread ("Already borrowed")
                self._tok_cache[key] = self._tokenize(text, answer)
        return self._tok_cache[key]

    def _tokenize(self, text: str, answer: bool) -> list[int]:
        tok = self.backbone.tokenizer
        if self.causal:
            s = " " + text if answer else text + CAUSAL_ANSWER_CUE
            ids = tok(s, add_special_tokens=False).input_ids
            return ids[: self.max_answer_tokens] + [tok.eos_token_id] if answer else cut(ids, self.max_input_tokens, self.truncation)
        if answer:  # seq2seq tokenizers add </s> themselves
            return tok(text, truncation=True, max_length=self.max_answer_tokens).input_ids
        return cut(tok(text, verbose=False).input_ids, self.max_input_tokens, self.truncation)

    def encode(self, inputs: list[str], answers: list[str] | None) -> Batch:
        pad = self.backbone.tokenizer.pad_token_id
        xs = [self._tokens(t, False) for t in inputs]
        ys = [self._tokens(t, True) for t in answers] if answers is not None else [[] for _ in xs]
        seqs = [x + y for x, y in zip(xs, ys)] if self.causal else xs
        T, A = max(map(len, seqs)), max(1, max(map(len, ys)))
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        answer = torch.full((len(seqs), A), -100, dtype=torch.long)
        rows, pos, flat = [], [], []
        for i, (s, x, y) in enumerate(zip(seqs, xs, ys)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            answer[i, : len(y)] = torch.tensor(y, dtype=torch.long)
            rows += [i] * len(y)
            pos += range(len(x) - 1, len(x) - 1 + len(y))
            flat += y
        dev = self.backbone.device
        t = lambda v: torch.tensor(v, dtype=torch.long, device=dev)
        return Batch(ids.to(dev), mask.to(dev), answer.to(dev), t(rows), t(pos), t(flat))

    # ---- forward --------------------------------------------------------------------------

    def _with_prompt(self, batch: Batch, prompt: torch.Tensor | None):
        p = self.prompt if prompt is None else prompt
        B = batch.ids.shape[0]
        p = p.unsqueeze(0).expand(B, -1, -1) if p.dim() == 2 else p  # (P,d) shared or (B,P,d) own
        tokens = self.backbone.embed(batch.ids)
        embeds = torch.cat([p.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([batch.mask.new_ones(B, p.shape[1]), batch.mask], dim=1)
        return embeds, mask, p.shape[1]

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._capped(self.backbone.model.get_output_embeddings()(hidden))

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.backbone.model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    # The head's words per matrix multiply when ranking. Gemma-3-270M's 262,144-word head (168M
    # of its 268M parameters, 671 MB in fp32) at 256 predicting positions ran at 94 GFLOP/s whole,
    # at 155 by blocks of 1,024 words, each block's logsumexp taken while it is in cache; in bf16
    # at 388 whole, 591 by blocks of 4,096, where smaller blocks lose to the calls' own cost
    # (scripts/head_blocks.py; an EPYC, 2 cores; docs/performance.md, "Ranking's head by blocks").
    HEAD_WORDS = 1024
    HEAD_WORDS_BF16 = 4096

    def _head_logprobs(self, hidden: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor,
                       normalized: torch.Tensor | None = None) -> torch.Tensor:
        """log_softmax(_head(hidden)) in fp32 at (rows[i], tokens[i]): (M,). Without autograd the
        head runs HEAD_WORDS words at a time, and no (N, V) logits are made. `normalized`: (N,)
        bool, the rows whose log-normalizer (logsumexp over the vocabulary) is subtracted, all by
        default; a row without it gives its tokens' logits, log-probabilities plus a constant of
        that row."""
        if torch.is_grad_enabled():
            logits = self._head(hidden)
            lp = self._token_logprobs(logits, tokens, rows)
            return lp if normalized is None else torch.where(normalized[rows], lp, logits[rows, tokens].float())
        head = self.backbone.model.get_output_embeddings()
        w, b = head.weight, head.bias
        picked = (hidden[rows, None, :] @ w[tokens, :, None])[:, 0, 0]
        picked = self._capped(picked if b is None else picked + b[tokens]).float()
        keep = torch.arange(len(hidden), device=hidden.device) if normalized is None else normalized.nonzero()[:, 0]
        lse = torch.zeros(len(hidden), device=hidden.device)
        if len(keep):
            h, c = hidden[keep], self.HEAD_WORDS_BF16 if w.dtype == torch.bfloat16 else self.HEAD_WORDS
            blocks = [torch.logsumexp(self._capped(F.linear(h, w[v : v + c], None if b is None else b[v : v + c])).float(), -1)
                      for v in range(0, len(w), c)]
            lse[keep] = torch.logsumexp(torch.stack(blocks, -1), -1)
        return picked - lse[rows]

    LOGPROB_ELEMENTS = 2**22  # _token_logprobs' rows at a time, in logits: 16 MB of fp32

    def _token_logprobs(self, logits: torch.Tensor, tokens: torch.Tensor,
                        rows: torch.Tensor | None = None) -> torch.Tensor:
        """log_softmax(logits) in fp32 at (rows[i], tokens[i]), (M,); rows 0..N-1 by default.
        Without autograd no (N, V) log-softmax is made: each row's logsumexp is taken a few rows
        at a time, in fp32, and only the entries wanted are read. So a batch's logits are held
        once, in the backbone's dtype (Gemma-3-270M's 262k words in bf16: 48 MB at a batch of 32
        inputs' predicting positions, to which an fp32 log-softmax added 96 MB: ranking's peak
        146 -> 82 MB, scripts/rank_peak.py gemma3-270m bf16)."""
        if torch.is_grad_enabled():
            logp = torch.log_softmax(logits.float(), -1)
            return logp.gather(1, tokens[:, None]).squeeze(1) if rows is None else logp[rows, tokens]
        rows = torch.arange(len(logits), device=logits.device) if rows is None else rows
        step = max(1, self.LOGPROB_ELEMENTS // logits.shape[-1])
        lse = torch.cat([torch.logsumexp(logits[r : r + step].float(), -1) for r in range(0, len(logits), step)])
        return logits[rows, tokens].float() - lse[rows]

    # Where rows are padded (prediction's KV caches; losses on a backbone that cannot take a
    # packing mask), a shared prompt's KV cache pays off from this many rows on. SmolLM2-135M on
    # 2 CPU cores, prompt 20: a loss and its backward ran 0.93x as fast as with the prompt
    # concatenated at 2 rows, 1.09x at 4, 1.25x at 8; a MAML meta-gradient 0.90x at 2 rows, 1.06x
    # at 4 (scripts/prompt_cache.py; docs/performance.md). In bf16 the matrix multiplies it saves
    # are cheaper and its own pass is not: 0.94x at 4 rows, 1.07x at 8 for the loss, 0.97x at 4
    # for MAML (scripts/prompt_cache.py bf16), so a bf16 backbone shares it from 8 rows on.
    PROMPT_CACHE_ROWS = 4
    PROMPT_CACHE_ROWS_BF16 = 8

    def _after_prompt(self, batch: Batch, prompt: torch.Tensor | None, use_cache: bool):
        """Causal LMs: the backbone over [prompt; tokens] of every row. Returns the output, the
        attention mask over [prompt; tokens], P, and the index of the first text token in the
        output. Positions count real tokens only (rows are right-padded).

        In a causal model the prompt's keys and values do not depend on the text after it, so
        a prompt shared by at least PROMPT_CACHE_ROWS rows goes through the backbone once and
        its KV cache is copied to every row (gradients flow back through the copies): each
        row's forward then runs its own tokens only, P fewer. Otherwise (few rows, one prompt
        per row, or none) the prompt is concatenated in front of the token embeddings."""
        base, B = self.backbone.model.base_model, batch.ids.shape[0]
        p = self.prompt if prompt is None else prompt
        P = p.shape[-2]
        bf16 = self.backbone.model.get_input_embeddings().weight.dtype == torch.bfloat16
        if p.dim() == 3 or P == 0 or B < (self.PROMPT_CACHE_ROWS_BF16 if bf16 else self.PROMPT_CACHE_ROWS):
            embeds, mask, P = self._with_prompt(batch, prompt)
            out = base(inputs_embeds=embeds, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                       cache=_full_cache() if use_cache else None, use_cache=use_cache)
            return out, mask, P, P
        cache = self._prompt_cache(p, B)
        mask = torch.cat([batch.mask.new_ones(B, P), batch.mask], dim=1)
        out = base(inputs_embeds=self.backbone.embed(batch.ids), attention_mask=mask,
                   position_ids=P + (batch.mask.cumsum(1) - 1).clamp(min=0), cache=cache, use_cache=use_cache)
        return out, mask, P, 0

    def _prompt_states(self, p: torch.Tensor) -> PromptStates:
        """The keys and values of a (P, d) prompt run alone at positions 0..P-1, in every layer:
        a causal prompt's do not depend on what follows it."""
        p = p[None].to(self.backbone.model.get_input_embeddings().weight.dtype)
        cache = self.backbone.model.base_model(inputs_embeds=p, position_ids=torch.arange(p.shape[1], device=p.device)[None],
                                               cache=_full_cache(), use_cache=True).cache
        return PromptStates(p.shape[1], [(layer.keys, layer.values) for layer in cache.layers])

    def _prompt_cache(self, p: torch.Tensor | PromptStates, copies: int, keep: bool = True):
        """A fresh KV cache of a (P, d) prompt, or of its states computed before, one copy per
        row of a batch of `copies`. Without `keep` it hands each layer the prompt's keys and
        values followed by the forward's own but keeps only the prompt's, so that a forward
        whose states are not wanted afterwards does not hold every layer's until it ends."""
        states = p if isinstance(p, PromptStates) else self._prompt_states(p)
        cache = _full_cache()
        for i, (k, v) in enumerate(states.layers):
            cache.update(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1), i)
        if not keep:
            layers = cache.layers
            cache.update = lambda k, v, i, *a, **kw: (torch.cat([layers[i].keys, k], -2), torch.cat([layers[i].values, v], -2))
        return cache

    def _window(self) -> int | None:
        """The sliding window of the backbone's local-attention layers (Gemma 3: 512 tokens, in
        5 of every 6 layers; Mistral: all of them), or None."""
        config = self.backbone.model.config
        return getattr(config, "sliding_window", None) if self.causal else None

    def _masks(self, allowed: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor | None, dtype: torch.dtype):
        """The additive attention mask(s) for `allowed` ((B, Q, K), True: query sees key), given
        each query's and key's position (read only where the backbone has a window). A custom
        mask is taken as it is by every layer, so where the backbone has sliding-window layers,
        those get their own, which also hides every key `window` or more positions behind its
        query, as the model's own mask would: a dict by layer type (Gemma 3), or the one mask
        (Mistral, every layer sliding)."""
        def additive(a):
            return torch.zeros(a.shape, dtype=dtype, device=a.device).masked_fill(~a, torch.finfo(dtype).min)[:, None]

        W = self._window()
        if not W:
            return additive(allowed)
        near = allowed & (q_pos[:, :, None] - k_pos[:, None, :] < W)
        types = getattr(self.backbone.model.config, "layer_types", None)
        if not types:
            return additive(near)
        return {t: additive(near if t == "sliding_attention" else allowed) for t in set(types)}

    def _continuation_mask(self, keys: torch.Tensor, k_pos: torch.Tensor, q_pos: torch.Tensor):
        """The attention mask of tokens continuing right-padded rows from a KV cache (option
        scoring, greedy decoding): `keys` (B, K) marks the real keys, at positions `k_pos`;
        the queries are at `q_pos` (B, Q). The 2D mask as it is, unless the backbone has
        sliding-window layers: their own mask counts the window in columns, and a shorter row's
        continuation sits past its padding, so it is built here from positions."""
        attention = getattr(self.backbone.model.config, "_attn_implementation", None)
        if not self._window() or attention not in ("sdpa", "eager"):
            return keys
        allowed = keys.bool()[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])
        return self._masks(allowed, q_pos, k_pos, self.backbone.model.get_input_embeddings().weight.dtype)

    # The longest pack (in tokens) worth forming: a pack's attention, and its elementwise work,
    # grow with the square of its length. SmolLM2-135M on 2 CPU cores (scripts/packing.py;
    # docs/performance.md).
    PACK_TOKENS = 256
    PACK = True  # False: pad the rows instead (for comparison)
    # Rank classification's packs run their attention (core/backbones/blocked.py; sdpa on a CPU)
    # an input and its options a row of one padded batch, in one call, each over the prompt's
    # KV cache and its own keys: its cost grows with a pack's length, not its square, so a
    # batch's inputs go in one pack of up to BLOCKED_PACK_TOKENS tokens. A loss over several
    # groups' rows (a meta-batch's episodes in one forward) runs a block per group, whose rows see
    # no other group's tokens, and its groups too go in one pack of up to BLOCKED_PACK_TOKENS: a
    # group's prompt is not run again in a second pack. BLOCKED = False: packs of PACK_TOKENS,
    # each over the whole square (a GPU runs so: not measured there yet).
    BLOCKED_PACK_TOKENS = 2048
    BLOCKED = True
    # Rows that begin with the same tokens (a task's template, "Is this SMS message spam or ham?
    # Message:") run them once: a loss's rows under one prompt, once per pack, as a segment after
    # the prompt that each of them sees; rank classification's inputs, once per batch, in the
    # prompt's KV cache. False: every row runs its own (for comparison).
    SHARE_PREFIX = True

    def _template(self, seqs: list[list[int]], keep: list[int]) -> tuple[set[int], int]:
        """The rows of `seqs` that share their first tokens, and how many (at most any of their
        `keep`): those that begin with the most common first token, as a task's template makes
        them (an input cut to max_input_tokens keeps its first half: `cut`). (set(), 0) if under two."""
        firsts = Counter(x[0] for x in seqs if x).most_common(1) if self.SHARE_PREFIX else []
        rows = [i for i, x in enumerate(seqs) if firsts and x and x[0] == firsts[0][0]]
        if len(rows) < 2:
            return set(), 0
        n = min(len(os.path.commonprefix([seqs[i] for i in rows])), *(keep[i] for i in rows))
        return (set(rows), n) if n else (set(), 0)

    def _cpu_sdpa(self) -> bool:
        return self.backbone.device.type == "cpu" and getattr(self.backbone.model.config, "_attn_implementation", None) == "sdpa"

    def _blocked(self) -> bool:
        return self.BLOCKED and self._cpu_sdpa()

    def _run_packs(self, packs: list[list[Segment]], prompts: torch.Tensor | None,
                   cached: PromptStates | None = None, blocks: str | None = None,
                   read: list[tuple[int, int, int]] | None = None) -> tuple[torch.Tensor, list[list[int]]]:
        """Causal LMs: one forward over packs of segments laid end to end, each token attending
        (causally) to its own segment and to the segments it `sees`, at the positions the
        segments give. A prompt segment holds prompts[s.prompt]; `cached`, a prefix's states, is
        in front of every pack as a shared KV cache that every token sees. `blocks`: the
        attention runs by units or blocks (core/backbones/blocked.py): each segment that sees no
        other with the segments after it that see it, padded to a batch ("units"), or from each
        prompt segment to the next ("groups"). `read`: the only positions (pack, segment,
        offset) whose last hidden states are read; the last layer's MLP runs there alone (zeros
        elsewhere). Returns the last hidden states (packs, S, d) and the index of each segment's
        first token in its pack."""
        dev = self.backbone.device
        P = 0 if prompts is None else prompts.shape[1]
        ids, pos, seg, src, starts = ([] for _ in range(5))  # per pack, per token (starts: per segment)
        M = max(map(len, packs)) + 1  # segment ids 1..M-1 in a pack; 0: padding
        sees = torch.zeros(len(packs), M, M, dtype=torch.bool)
        sees[:, 0, 0] = True  # a padding query attends to the padding: a row of its softmax is not all masked
        C = 0 if cached is None else cached.length
        seen = torch.full((len(packs), M), C, dtype=torch.long)  # how much of the cache each segment sees
        for k, pack in enumerate(packs):
            for x in (ids, pos, seg, src, starts):
                x.append([])
            for j, s in enumerate(pack):
                n = P if s.prompt >= 0 else len(s.tokens)
                seen[k, j + 1] = C if s.cache is None else s.cache
                starts[k].append(len(ids[k]))
                ids[k] += [0] * n if s.prompt >= 0 else s.tokens
                pos[k] += range(s.start, s.start + n)
                seg[k] += [j + 1] * n
                src[k] += range(s.prompt * P + 1, s.prompt * P + P + 1) if s.prompt >= 0 else [0] * n  # 1 + vector index
                sees[k, j + 1, [j + 1, *(i + 1 for i in s.sees)]] = True
        S, pad = max(map(len, ids)), self.backbone.tokenizer.pad_token_id
        t = lambda rows, fill: torch.tensor([x + [fill] * (S - len(x)) for x in rows], dtype=torch.long, device=dev)
        ids_t, pos_t, seg_t, src_t = t(ids, pad), t(pos, 0), t(seg, 0), t(src, 0)
        q, b = torch.arange(S, device=dev), torch.arange(len(packs), device=dev)[:, None, None]
        allowed = (q[:, None] >= q[None, :]) & sees.to(dev)[b, seg_t[:, :, None], seg_t[:, None, :]]
        tokens = self.backbone.embed(ids_t)
        if P:
            flat = torch.cat([prompts.new_zeros(1, prompts.shape[2]), prompts.reshape(-1, prompts.shape[2])])
            tokens = torch.where((src_t > 0)[..., None], flat.to(tokens.dtype)[src_t], tokens)
        cache = None
        if C:
            cache = self._prompt_cache(cached, len(packs), keep=False)  # one copy per pack, not per row
            sees_cache = torch.arange(C, device=dev) < seen.to(dev)[b[:, :, 0], seg_t][..., None]
            allowed = torch.cat([sees_cache, allowed], dim=2)
        keys = torch.cat([torch.arange(C, device=dev).expand(len(packs), C), pos_t], 1) if self._window() else None
        more = {}
        if blocks and self._blocked():
            blocked.install()
            if blocks == "units":
                spans = []  # (pack, first row, end row)
                for k, pack in enumerate(packs):
                    for j, s in enumerate(pack):
                        if not s.sees:
                            spans.append([k, starts[k][j], 0])
                        spans[-1][2] = starts[k][j] + len(s.tokens)
                more["primer_blocks"] = blocked.units(allowed, C, spans)
            else:
                more["primer_blocks"] = blocked.plan(allowed, sorted(
                    {0, *(starts[k][j] for k, pack in enumerate(packs) for j, s in enumerate(pack) if s.prompt >= 0)}))
        elif tokens.dtype in blocked.PLAIN_ATTENTION and tokens.requires_grad and self._cpu_sdpa():  # blocked.attend
            blocked.install()
            more["primer_blocks"] = blocked.whole(allowed)
        last, rows = None, None  # the last layer's MLP, and the rows it runs where only some are read
        if read:
            last = getattr(getattr(self.backbone.model.base_model, "layers", [None])[-1], "mlp", None)
            rows = torch.tensor([k * S + starts[k][j] + t for k, j, t in read], dtype=torch.long, device=dev)
        with lean.rows_read(last, rows):
            out = self.backbone.model.base_model(inputs_embeds=tokens, attention_mask=self._masks(allowed, pos_t, keys, tokens.dtype),
                                                 position_ids=pos_t, cache=cache, use_cache=False, **more).last_hidden_state
        return out, starts

    def _packed_hidden(self, batch: Batch, prompts: torch.Tensor, owner: list[int]) -> torch.Tensor:
        """Causal LMs: the last hidden state at every answer-predicting position, (N, d), in
        Batch.answer_ids order; row r runs under prompts[owner[r]] ((E, P, d)).

        No padding between rows: a pack is one sequence [prompt of group a][row][row][prompt of
        group b][row]..., each row attending to its group's prompt and to itself only (a block
        mask), its positions counted from its prompt as if it ran alone. So each pack runs its
        group's prompt once however many rows share it, as if its keys and values were cached,
        in the same forward. The tokens a group's rows begin with (its task's template;
        SHARE_PREFIX) run once per pack too, right after the group's prompt, and those rows go
        on from there. Each row's last answer token (EOS) predicts nothing and is not fed. The last
        layer's MLP runs at the answer-predicting positions alone, the only ones read. With
        several groups, on a CPU, the attention runs a block of queries per group, over that
        group's keys only, and the groups share one pack of up to BLOCKED_PACK_TOKENS (BLOCKED)."""
        P = prompts.shape[1]
        answered = set(batch.answer_rows.tolist())
        sizes = [n - (r in answered) for r, n in enumerate(batch.mask.sum(1).tolist())]
        ids = [batch.ids[r, :n].tolist() for r, n in enumerate(sizes)]
        keep = [n - 1 for n in sizes]  # a row keeps its first answer's predictor out of the shared prefix
        for r, at in zip(batch.answer_rows.tolist(), batch.answer_pos.tolist()):
            keep[r] = min(keep[r], at)
        rows_of: dict[int, list[int]] = {}
        for r, g in enumerate(owner):
            rows_of.setdefault(g, []).append(r)
        common, shared = {}, [0] * len(sizes)  # each group's shared prefix; each row's share of it
        for g, rows in rows_of.items():
            sharing, n = self._template([ids[r] for r in rows], [keep[r] for r in rows])
            common[g] = ids[rows[min(sharing)]][:n] if n else []
            for i in sharing:
                shared[rows[i]] = n
        rest = [n - shared[r] for r, n in enumerate(sizes)]
        packs, where = [], [(0, 0)] * len(sizes)  # each row's (pack, segment)
        by_group = P and len(rows_of) > 1 and self._blocked()
        most = self.BLOCKED_PACK_TOKENS if by_group else self.PACK_TOKENS
        for k, plan in enumerate(plan_packs(rest, owner, {g: P + len(c) for g, c in common.items()}, most)):
            packs.append([])
            for g, rows in plan:
                sees = ()
                if P:
                    packs[k].append(Segment([], prompt=g))
                    sees += (len(packs[k]) - 1,)  # the group's prompt
                prefix = ()  # the group's shared prefix, where a row of it here shares it
                if any(shared[r] for r in rows):
                    prefix = (len(packs[k]),)
                    packs[k].append(Segment(common[g], start=P, sees=sees))
                for r in rows:
                    where[r] = (k, len(packs[k]))
                    n = shared[r]
                    packs[k].append(Segment(ids[r][n:], start=P + n, sees=sees + prefix * bool(n)))
        read = [(*where[r], at - shared[r]) for r, at in zip(batch.answer_rows.tolist(), batch.answer_pos.tolist())]
        out, starts = self._run_packs(packs, prompts if P else None, blocks="groups" if by_group else None, read=read)
        t = lambda v: torch.tensor(v, dtype=torch.long, device=out.device)
        pack = t([k for k, _ in where])
        first = t([starts[k][j] - shared[r] for r, (k, j) in enumerate(where)])  # where row r's token 0 would be
        return out[pack[batch.answer_rows], first[batch.answer_rows] + batch.answer_pos]

    def _packable(self) -> bool:
        # A custom 4D mask is what sdpa and eager attention take as it is; flash-attention kernels do not.
        attention = getattr(self.backbone.model.config, "_attn_implementation", None)
        return self.PACK and self.causal and attention in ("sdpa", "eager")

    def answer_logits(self, batch: Batch, prompt: torch.Tensor | None = None,
                      owner: list[int] | None = None) -> torch.Tensor:
        """Logits at the positions that predict answer tokens, in Batch.answer_ids order: (N, V).
        `prompt` is (P, d), shared by the batch, or (E, P, d) with `owner` giving each row's
        prompt (by default E is the batch and row i runs under prompt i)."""
        p = self.prompt if prompt is None else prompt
        if self._packable():
            B = batch.ids.shape[0]
            prompts, owner = (p[None], [0] * B) if p.dim() == 2 else (p, owner or list(range(B)))
            return self._head(self._packed_hidden(batch, prompts, owner))
        if owner is not None:
            p = p[torch.tensor(owner, device=p.device)]
        if self.causal:
            out, _, _, first = self._after_prompt(batch, p, use_cache=False)
            return self._head(out.last_hidden_state[batch.answer_rows, batch.answer_pos + first])
        embeds, mask, _ = self._with_prompt(batch, p)
        out = self.backbone.model(inputs_embeds=embeds, attention_mask=mask, labels=batch.answer, use_cache=False)
        return out.logits[batch.answer != -100]

    def answer_logprobs(self, batch: Batch, prompt: torch.Tensor | None = None,
                        owner: list[int] | None = None) -> torch.Tensor:
        """Log-probability of every answer token, flattened in Batch.answer_ids order: (N,)."""
        logits = self.answer_logits(batch, prompt, owner)
        return self._token_logprobs(logits, batch.answer_ids)

    def loss(self, examples: list[Example], prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy over the answer tokens (the first acceptable answer of each example)."""
        batch = self.encode([e.input for e in examples], [e.output for e in examples])
        return -self.answer_logprobs(batch, prompt).mean()

    def group_losses(self, groups: list[list[Example]], prompts: torch.Tensor) -> torch.Tensor:
        """loss(groups[e], prompts[e]) for every group e, (E,), from one forward: prompts is
        (E, P, d) and every row runs under its own group's prompt."""
        if len(groups) == 1:
            return self.loss(groups[0], prompts[0])[None]
        examples = [e for g in groups for e in g]
        dev = self.backbone.device
        owner = [i for i, g in enumerate(groups) for _ in g]
        batch = self.encode([e.input for e in examples], [e.output for e in examples])
        lp = self.answer_logprobs(batch, prompts, owner)
        token_owner = torch.tensor(owner, dtype=torch.long, device=dev)[batch.answer_rows]
        sums = torch.zeros(len(groups), device=dev, dtype=lp.dtype).index_add(0, token_owner, lp)
        return -sums / torch.bincount(token_owner, minlength=len(groups))

    def sequence_logliks(self, inputs: list[str], answers: list[str],
                         prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Summed log-likelihood of each answer given its input: (B,)."""
        batch = self.encode(inputs, answers)
        lp = self.answer_logprobs(batch, prompt)
        return torch.zeros(len(inputs), device=lp.device, dtype=lp.dtype).index_add(0, batch.answer_rows, lp)

    # ---- prediction -----------------------------------------------------------------------

    def _prefix(self, batch: Batch, prompt: torch.Tensor | None):
        """Causal LMs: the KV cache of [prompt; input] for every row, the hidden state of each
        row's last real token, the attention mask and the lengths."""
        res, mask, P, first = self._after_prompt(batch, prompt, use_cache=True)
        lengths = mask.sum(1)
        last = res.last_hidden_state[torch.arange(len(lengths), device=mask.device), lengths - 1 - P + first]
        return last, res.cache, mask, lengths

    @torch.no_grad()
    def rank(self, examples: list[Example], options: list[tuple[str, ...]], batch_size: int = 32,
             prompt: torch.Tensor | None = None) -> list[str]:
        """Rank classification: the option with the highest summed log-likelihood. The scores
        compared leave out the log-normalizer of an input's last position, which predicts the
        first token of every one of its options: the same for all of them, so the same ranking,
        and the head there needs only the options' first words (option_logliks' `relative`)."""
        # Similar lengths together: less padding in every batch.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input))
        scores = self.option_logliks([examples[i].input for i in order], [options[i] for i in order], prompt,
                                     relative=True, batch_size=batch_size)
        best: list[str] = [""] * len(examples)
        for i, sc in zip(order, scores):
            best[i] = options[i][int(sc.argmax())]
        return best

    def option_logliks(self, inputs: list[str], options: list[tuple[str, ...]], prompt: torch.Tensor | None = None,
                       prefix: tuple[list[int], PromptStates] | None = None, relative: bool = False,
                       batch_size: int | None = None) -> list[torch.Tensor]:
        """Summed log-likelihood of each option of each input: one (n_options,) tensor per input.
        `batch_size` inputs at a time go through the backbone (all at once by default).
        `prefix`: `_option_prefix` of these inputs' (or more inputs') tokens, computed before.
        `relative`: an input's scores may all be off by one constant of that input (packed, its
        last position's log-normalizer is left out), which leaves their order as it is."""
        size = batch_size or max(1, len(inputs))
        if self.causal and self._packable():
            scores = self._packed_option_logliks(inputs, options, prompt, prefix, relative, size)
            return list(scores.split([len(o) for o in options]))
        out = []
        for s in range(0, len(inputs), size):
            ins, opts = inputs[s : s + size], options[s : s + size]
            rows = [i for i, o in enumerate(opts) for _ in o]
            flat = [o for os in opts for o in os]
            scores = (self.sequence_logliks([ins[i] for i in rows], flat, prompt) if not self.causal
                      else self._shared_prefix_logliks(ins, rows, flat, prompt))
            out += scores.split([len(o) for o in opts])
        return out

    def _option_prefix(self, xs: list[list[int]], prompt: torch.Tensor | None) -> tuple[list[int], PromptStates]:
        """The tokens that inputs `xs` begin with (their task's template; SHARE_PREFIX), and the
        states of [prompt; those tokens], which the inputs that begin with them see."""
        p = self.prompt if prompt is None else prompt
        sharing, n = self._template(xs, [len(x) - 1 for x in xs])
        common = xs[min(sharing)][:n] if n else []
        if common:
            embedded = self.backbone.embed(torch.tensor([common], device=self.backbone.device))[0]
            p = torch.cat([p.to(embedded.dtype), embedded])
        return common, self._prompt_states(p) if len(p) else PromptStates(0, [])

    # Predicting positions the head takes at once when ranking: the batches' positions are
    # gathered up to it. Gemma-3-270M's 262,144-word head by blocks at 256 positions ran at 155
    # GFLOP/s, at a batch's 64 at 116 (scripts/head_blocks.py; an EPYC, 2 cores).
    HEAD_ROWS = 256

    def _packed_option_logliks(self, inputs: list[str], options: list[tuple[str, ...]], prompt: torch.Tensor | None,
                               prefix: tuple[list[int], PromptStates] | None, relative: bool, batch_size: int) -> torch.Tensor:
        """Causal LMs: a batch's inputs and all of their options in one forward, packed end to
        end. The prompt runs once, as a KV cache shared by the packs; in a pack each input is
        followed by its options, each option attending to the prompt, its input and itself (a
        block mask) at the positions it would have right after its input. So an input runs once
        however many options it has, and nothing is copied per option. An option's first token
        is predicted by its input's last state, shared by its options; its last (EOS) is not
        fed. The tokens the inputs begin with (their task's template; SHARE_PREFIX) join the
        prompt's KV cache, seen by the inputs that begin with them; `prefix` is that cache's
        states, computed once for all the batches here if not given (`_option_prefix`). On a CPU
        a batch is one pack (up to BLOCKED_PACK_TOKENS), its attention run an input and its
        options a row of one padded batch (BLOCKED). The head runs once per HEAD_ROWS
        predicting positions, over as many batches as make them."""
        xs = [self._tokens(t, False) for t in inputs]
        prefix = prefix or self._option_prefix(xs, prompt)
        ans = [[self._tokens(o, True) for o in opts] for opts in options]
        first = [0, *itertools.accumulate(len(opts) for opts in options)]  # each input's first option's index
        scores = torch.zeros(first[-1], device=self.backbone.device)
        pending = []  # batches not through the head yet: (hidden, target, predictor, option, an input's last)
        for s in range(0, len(inputs), batch_size):
            pending.append(self._option_positions(xs[s : s + batch_size], ans[s : s + batch_size], first[s], prefix, prompt))
            if s + batch_size < len(inputs) and sum(len(h) for h, *_ in pending) < self.HEAD_ROWS:
                continue
            offset = 0
            for h, _, predictor, _, _ in pending:  # a batch's rows come after the batches' before it
                predictor += offset
                offset += len(h)
            hidden, target, predictor, option, last = (torch.cat(v) for v in zip(*pending))
            scores.index_add_(0, option, self._head_logprobs(hidden, target, predictor, ~last if relative else None))
            pending = []
        return scores

    def _option_positions(self, xs: list[list[int]], ans: list[list[list[int]]], first: int,
                          prefix: tuple[list[int], PromptStates], prompt: torch.Tensor | None):
        """One batch of _packed_option_logliks through the backbone: the hidden states at its
        predicting positions (R, d), and per answer token its id, its position's row there and
        its option's index (the batch's first option is `first`), and which rows are an input's
        last (R,) bool."""
        P = len(self.prompt if prompt is None else prompt)
        common, states = prefix
        n = len(common)  # the inputs that begin with it (and go on after it) see it in the cache
        shared = [n if n and len(x) > n and x[:n] == common else 0 for x in xs]
        xs = [x[m:] for x, m in zip(xs, shared)]
        sizes = [len(x) + sum(len(a) - 1 for a in opts) for x, opts in zip(xs, ans)]
        packs, where = [], {}  # (input, -1 or option) -> (pack, segment)
        most = self.BLOCKED_PACK_TOKENS if self._blocked() else self.PACK_TOKENS
        for k, plan in enumerate(plan_packs(sizes, [0] * len(xs), 0, most)):
            packs.append([])
            for i in plan[0][1]:
                mine = len(packs[k])  # the input's segment
                where[i, -1] = (k, mine)
                start, cache = P + shared[i], None if shared[i] else P
                packs[k].append(Segment(xs[i], start=start, cache=cache))
                for o, a in enumerate(ans[i]):
                    if len(a) > 1:
                        where[i, o] = (k, len(packs[k]))
                        packs[k].append(Segment(a[:-1], start=start + len(xs[i]), sees=(mine,), cache=cache))
        # Each predicting position once: the input's last token, then every option's fed tokens.
        read = []  # per predicting position: (pack, segment, offset in the segment)
        predictor, target, option, inputs_last = [], [], [], []  # per answer token; read's inputs' last
        for i, (x, opts) in enumerate(zip(xs, ans)):
            read.append((*where[i, -1], len(x) - 1))
            last = len(read) - 1
            inputs_last.append(last)
            for o, a in enumerate(opts):
                predictor.append(last)
                if len(a) > 1:
                    predictor += range(len(read), len(read) + len(a) - 1)
                    read += [(*where[i, o], t) for t in range(len(a) - 1)]
                target += a
                option += [first] * len(a)
                first += 1
        out, starts = self._run_packs(packs, None, cached=states, blocks="units", read=read)
        pack, index = [k for k, _, _ in read], [starts[k][j] + t for k, j, t in read]
        t = lambda v: torch.tensor(v, dtype=torch.long, device=out.device)
        is_last = torch.zeros(len(read), dtype=torch.bool, device=out.device)
        is_last[t(inputs_last)] = True
        return out[t(pack), t(index)], t(target), t(predictor), t(option), is_last

    def _shared_prefix_logliks(self, inputs: list[str], rows: list[int], answers: list[str],
                               prompt: torch.Tensor | None) -> torch.Tensor:
        """Causal LMs: run [prompt; input] once per input with a KV cache, then all of its
        options as continuations of that cache: the prefix is not recomputed per option."""
        model, pad = self.backbone.model, self.backbone.tokenizer.pad_token_id
        last, cache, mask, lengths = self._prefix(self.encode(inputs, None), prompt)
        dev, idx = mask.device, torch.tensor(rows, device=mask.device)
        last = last[idx]
        cache.reorder_cache(idx)  # one copy of each input's cache per option
        ans = [self._tokens(a, True) for a in answers]
        A = max(map(len, ans))
        ids = torch.full((len(ans), A), pad, dtype=torch.long, device=dev)
        amask = torch.zeros((len(ans), A), dtype=torch.long, device=dev)
        for r, a in enumerate(ans):
            ids[r, : len(a)] = torch.tensor(a)
            amask[r, : len(a)] = 1
        # Answer token t is predicted by the prefix's last state (t = 0) or by answer token t - 1,
        # so the last answer token (EOS) is never fed: the continuation runs A - 1 tokens.
        predictors = last[:, None]
        if A > 1:
            q_pos = lengths[idx, None] + torch.arange(A - 1, device=dev)
            k_pos = torch.cat([torch.arange(mask.shape[1], device=dev).expand(len(ans), -1), q_pos], 1)
            attend = self._continuation_mask(torch.cat([mask[idx], amask[:, :-1]], 1), k_pos, q_pos)
            out = model.base_model(inputs_embeds=self.backbone.embed(ids[:, :-1]), attention_mask=attend,
                                   position_ids=q_pos, cache=cache, use_cache=False).last_hidden_state
            predictors = torch.cat([predictors, out], dim=1)
        predictors = predictors[amask.bool()]
        lp = self._head_logprobs(predictors, ids[amask.bool()], torch.arange(len(predictors), device=dev))
        return torch.zeros(len(ans), device=dev).index_add(0, amask.nonzero()[:, 0], lp)

    @torch.no_grad()
    def generate(self, examples: list[Example], batch_size: int = 32,
                 prompt: torch.Tensor | None = None) -> list[str]:
        out: list[str] = []
        for s in range(0, len(examples), batch_size):
            out += self._generate([e.input for e in examples[s : s + batch_size]], prompt)
        return out

    def _generate(self, inputs: list[str], prompt: torch.Tensor | None) -> list[str]:
        tok = self.backbone.tokenizer
        batch = self.encode(inputs, None)
        model = self.backbone.model
        if not self.causal:
            embeds, mask, _ = self._with_prompt(batch, prompt)
            ids = model.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False,
                                 num_beams=1, max_new_tokens=self.max_answer_tokens)
            return [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
        # Greedy decoding with a KV cache. Sequences are right-padded, so each one's next token
        # goes at its own length; pads stay masked out, and positions count real tokens only.
        last, cache, mask, lengths = self._prefix(batch, prompt)
        last = self._head(last)
        k_pos = torch.arange(mask.shape[1], device=mask.device).expand(len(inputs), -1)  # real keys: column = position
        done = torch.zeros(len(inputs), dtype=torch.bool, device=mask.device)
        generated: list[list[int]] = [[] for _ in inputs]
        for _ in range(self.max_answer_tokens):
            nxt = last.argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t == tok.eos_token_id:
                        done[i] = True
                    else:
                        generated[i].append(t)
            if done.all():
                break
            mask = torch.cat([mask, mask.new_ones(len(inputs), 1)], dim=1)
            k_pos = torch.cat([k_pos, lengths[:, None]], dim=1)
            res = model.base_model(inputs_embeds=self.backbone.embed(nxt[:, None]), position_ids=lengths[:, None],
                                   attention_mask=self._continuation_mask(mask, k_pos, lengths[:, None]),
                                   cache=cache, use_cache=True)
            cache, lengths = res.cache, lengths + 1
            last = self._head(res.last_hidden_state[:, -1])
        return [tok.decode(g, skip_special_tokens=True).strip() for g in generated]

    def predict(self, examples: list[Example], info: TaskInfo, batch_size: int = 32,
                prompt: torch.Tensor | None = None) -> list[str]:
        """Ranked tasks pick among their options; the others generate greedily."""
        if not info.ranked:
            return self.generate(examples, batch_size, prompt)
        options = []
        for e in examples:
            opts = e.options or info.options
            if not opts:
                raise TaskError(f"task {info.name!r} is {info.type} but neither it nor the example "
                                f"{e.input[:60]!r} has an option set to rank")
            options.append(tuple(opts))
        return self.rank(examples, options, batch_size, prompt)
