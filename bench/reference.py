"""The implementations primer is measured against, written as their authors' code does it.

The MPT paper's loop (its code's run_maml_ddp_prompt.py / run_maml_ddp_prompt_fo.py):
`higher.innerloop_ctx` with SGD on the prompt, one task of the
meta-batch at a time, each batch padded to a fixed length, the loss taken from the model's own
`labels=` path, which computes logits over the whole vocabulary at every position. `higher`
cannot functionalize a transformers-5 Llama, so it wraps the prompt (as in
tests/test_meta_gradients.py) and the backbone is called with the prompt as input embeddings:
the same computation the paper's wrapper module makes.

PEFT's prompt tuning: `PromptTuningConfig` + `get_peft_model`, the standard training step of
its examples (a tokenized batch padded to max_length, `model(**batch).loss`), and evaluation by
`generate` and a string match against the label words.

Both run on primer's backbone object, but with transformers' own MLP and RMSNorm operators
(`stock_ops`), not primer's written-out derivatives (core/backbones/lean.py).
"""
from __future__ import annotations

import contextlib

import higher
import torch

from core.algorithms.maml import double_backward_attention
from core.backbones.lean import stock_ops
from core.backbones.soft_prompt import SoftPromptModel
from core.tasks.base import Example


class PromptHolder(torch.nn.Module):
    def __init__(self, prompt: torch.Tensor):
        super().__init__()
        self.prompt = torch.nn.Parameter(prompt.detach().clone())

    def forward(self) -> torch.Tensor:
        return self.prompt


class PaperLoss:
    """The paper's loss on a batch: [prompt; input; answer] padded to `length` tokens, the
    model's `labels=` cross-entropy (full-vocabulary logits at every position)."""

    def __init__(self, model: SoftPromptModel, length: int):
        self.model, self.length = model, length
        self.cache: dict[tuple, tuple] = {}

    def tensors(self, examples: list[Example]):
        key = tuple(examples)
        if key not in self.cache:  # tokenizing is not what is measured; primer caches nothing either way
            b = self.model.encode([e.input for e in examples], [e.output for e in examples])
            B, T = b.ids.shape
            if T > self.length:
                raise ValueError(f"a batch needs {T} tokens but the static length is {self.length}")
            pad, dev = self.model.backbone.tokenizer.pad_token_id, b.ids.device
            ids = torch.full((B, self.length), pad, dtype=torch.long, device=dev)
            mask = torch.zeros((B, self.length), dtype=torch.long, device=dev)
            ids[:, :T], mask[:, :T] = b.ids, b.mask
            labels = torch.full((B, self.length), -100, dtype=torch.long, device=dev)
            labels[b.answer_rows, b.answer_pos + 1] = b.answer_ids  # HF shifts labels by one itself
            self.cache[key] = (ids, mask, labels)
        return self.cache[key]

    def __call__(self, examples: list[Example], prompt: torch.Tensor) -> torch.Tensor:
        ids, mask, labels = self.tensors(examples)
        B, P = ids.shape[0], prompt.shape[0]
        tokens = self.model.backbone.embed(ids)  # a bf16 model takes its prompt in bf16, as the paper's wrapper would
        embeds = torch.cat([prompt.to(tokens.dtype).unsqueeze(0).expand(B, -1, -1), tokens], dim=1)
        full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
        full_labels = torch.cat([labels.new_full((B, P), -100), labels], dim=1)
        with stock_ops():
            return self.model.backbone.model(inputs_embeds=embeds, attention_mask=full_mask, labels=full_labels,
                                             use_cache=False).loss


def maml_grad(loss: PaperLoss, prompt: torch.Tensor, support, query, inner_lr: float, inner_steps: int,
              first_order: bool) -> tuple[torch.Tensor, float]:
    """One task's meta-gradient as the paper's code computes it."""
    holder = PromptHolder(prompt)
    inner_opt = torch.optim.SGD(holder.parameters(), lr=inner_lr)
    with double_backward_attention(), higher.innerloop_ctx(
            holder, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order) as (fnet, diffopt):
        for _ in range(inner_steps):
            diffopt.step(loss(support, fnet()))
        q = loss(query, fnet())
        if first_order:
            (grad,) = torch.autograd.grad(q, list(fnet.parameters()))
            return grad, q.item()
        q.backward()
    return holder.prompt.grad, q.item()


def reptile_grad(loss: PaperLoss, prompt: torch.Tensor, support, inner_lr: float, inner_steps: int,
                 inner_batch: int) -> tuple[torch.Tensor, float]:
    """Reptile: SGD on consecutive support slices from a copy, pseudo-gradient (θ − θ') / lr."""
    fast = torch.nn.Parameter(prompt.detach().clone())
    opt = torch.optim.SGD([fast], lr=inner_lr)
    for k in range(inner_steps):
        value = loss(support[k * inner_batch:(k + 1) * inner_batch], fast)
        opt.zero_grad()
        value.backward()
        opt.step()
    return (prompt.detach() - fast.detach()) / inner_lr, value.item()


def episode_grad(loss: PaperLoss, prompt: torch.Tensor, episode, cfg) -> tuple[torch.Tensor, float]:
    """One episode's gradient by the paper's loop for a resolved UpstreamConfig's algorithm."""
    if cfg.algorithm == "reptile":
        return reptile_grad(loss, prompt, episode.support, cfg.inner_lr, cfg.inner_steps, cfg.inner_batch_size)
    return maml_grad(loss, prompt, episode.support, episode.query, cfg.inner_lr, cfg.inner_steps,
                     first_order=cfg.algorithm == "fomaml")


@contextlib.contextmanager
def contiguous_head(model: torch.nn.Module):
    """The LM head's input made contiguous. `generate` slices each row's last position off the
    hidden states (logits_to_keep=1), and torch's CPU linear runs such a strided 3-D input
    through a batched multiply that copies the head's weight for every row: on 32 rows, 23.5 s
    instead of 0.028 for Gemma-3-270M's 262k-word head in bf16 (0.74 against 0.13 in float32),
    1.09 against 0.0044 for SmolLM2-135M's in bf16 (`scripts/bf16_head.py`). Without it the
    bench would time that, not PEFT."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


class Peft:
    """PEFT prompt tuning on the same backbone, its prompt set to primer's."""

    def __init__(self, model: SoftPromptModel, prompt: torch.Tensor, length: int):
        from peft import PromptTuningConfig, TaskType, get_peft_model

        self.tokenizer, self.length = model.backbone.tokenizer, length
        self.primer = model
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0])
        self.model = get_peft_model(model.backbone.model, config)
        with torch.no_grad():
            self.model.prompt_encoder["default"].embedding.weight.copy_(prompt)

    @property
    def prompt(self) -> torch.nn.Parameter:
        return self.model.prompt_encoder["default"].embedding.weight

    def batch(self, examples: list[Example]) -> dict:
        """PEFT's examples: input + answer token ids, labels -100 on the input, padded to max_length."""
        ids, mask, labels = PaperLoss(self.primer, self.length).tensors(examples)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, batch: dict) -> torch.Tensor:
        with stock_ops():
            return self.model(**batch).loss

    @torch.no_grad()
    def generate_labels(self, examples: list[Example], options: tuple[str, ...], max_new_tokens: int,
                        batch_size: int) -> list[str]:
        """Greedy `generate` on the same input tokens primer ranks with (left-padded, as generation
        needs), then the longest option the generated text starts with, else ''."""
        pad, dev, out = self.tokenizer.pad_token_id, self.primer.backbone.device, []
        by_length = sorted(options, key=len, reverse=True)
        with contiguous_head(self.primer.backbone.model), stock_ops():
            for s in range(0, len(examples), batch_size):
                rows = [self.primer._tokens(e.input, False) for e in examples[s:s + batch_size]]
                T = max(map(len, rows))
                ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=dev)
                mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=dev)
                gen = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                          do_sample=False, pad_token_id=pad)
                for text in self.tokenizer.batch_decode(gen[:, T:], skip_special_tokens=True):
                    t = text.strip().lower()
                    out.append(next((o for o in by_length if t.startswith(o.lower())), ""))
        return out
