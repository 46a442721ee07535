"""MAML (second order) and first-order MAML on the prompt alone.

The inner loop runs SGD directly on the prompt tensor through torch.autograd: the frozen
backbone is only ever called with a prompt argument, so it never needs functionalizing (which
`higher` cannot do for transformers-5 Llama models). Second order keeps the graph of the inner
update (create_graph=True) and differentiates the query loss through it.

Each function takes a list of episodes and adapts one copy of the prompt per episode. With one
episode that is the paper's loop; with several, every episode's support (then query) batch goes
through the backbone in one forward, each row under its own episode's prompt copy. The losses
are summed across episodes, so each copy's gradient is exactly its own episode's.
"""
from __future__ import annotations

import contextlib

import torch

from core.algorithms.episodes import Episode
from core.backbones.soft_prompt import SoftPromptModel


@contextlib.contextmanager
def double_backward_attention():
    # CPU flash SDPA has no double backward; the math kernel is plain differentiable ops.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def copies(prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n independent copies of the prompt, (n, P, d), as one leaf that requires grad."""
    return prompt.detach().unsqueeze(0).repeat(n, 1, 1).requires_grad_(True)


def adapt(model: SoftPromptModel, prompts: torch.Tensor, supports: list, inner_lr: float, steps: int,
          first_order: bool) -> torch.Tensor:
    """`steps` SGD steps of each prompt copy (E, P, d) on its own support batch."""
    fast = prompts
    for _ in range(steps):
        (g,) = torch.autograd.grad(model.group_losses(supports, fast).sum(), fast, create_graph=not first_order)
        fast = fast - inner_lr * g
        if first_order:
            fast = fast.detach().requires_grad_(True)
    return fast


def maml_grad(model: SoftPromptModel, prompt: torch.Tensor, episodes: list[Episode], inner_lr: float,
              inner_steps: int) -> tuple[torch.Tensor, list[float]]:
    """Sum over episodes of d query_loss(adapted(prompt)) / d prompt, through the inner update."""
    p = copies(prompt, len(episodes))
    with double_backward_attention():  # the support pass's backward is differentiated again ...
        fast = adapt(model, p, [e.support for e in episodes], inner_lr, inner_steps, first_order=False)
    losses = model.group_losses([e.query for e in episodes], fast)  # ... the query pass's is not
    (g,) = torch.autograd.grad(losses.sum(), p)
    return g.sum(0), losses.tolist()


def fomaml_grad(model: SoftPromptModel, prompt: torch.Tensor, episodes: list[Episode], inner_lr: float,
                inner_steps: int) -> tuple[torch.Tensor, list[float]]:
    """Sum over episodes of the query loss's gradient at the adapted prompt, applied to the initial one."""
    p = copies(prompt, len(episodes))
    fast = adapt(model, p, [e.support for e in episodes], inner_lr, inner_steps, first_order=True)
    losses = model.group_losses([e.query for e in episodes], fast)
    (g,) = torch.autograd.grad(losses.sum(), fast)
    return g.sum(0), losses.tolist()
