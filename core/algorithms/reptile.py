"""Reptile on the prompt: SGD on consecutive support slices, then the pseudo-gradient
(θ − θ') / inner_lr that the outer optimizer applies (the MPT code's scaling). Several episodes
run their inner steps side by side, one prompt copy each (see maml.py); their pseudo-gradients
are summed."""
from __future__ import annotations

import torch

from core.algorithms.episodes import Episode
from core.algorithms.maml import copies
from core.backbones.soft_prompt import SoftPromptModel


def reptile_grad(model: SoftPromptModel, prompt: torch.Tensor, episodes: list[Episode], inner_lr: float,
                 inner_steps: int) -> tuple[torch.Tensor, list[float]]:
    start = copies(prompt, len(episodes)).detach()
    fast, size = start.clone(), len(episodes[0].support) // inner_steps
    for i in range(inner_steps):
        fast.requires_grad_(True)
        losses = model.group_losses([e.support[i * size : (i + 1) * size] for e in episodes], fast)
        (g,) = torch.autograd.grad(losses.sum(), fast)
        fast = (fast - inner_lr * g).detach()
    return ((start - fast) / inner_lr).sum(0), losses.tolist()
