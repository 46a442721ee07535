"""Multi-task learning: the prompt trained on all source data mixed (train and dev), one batch per step."""
from __future__ import annotations

import torch

from core.algorithms.episodes import Episode
from core.backbones.soft_prompt import SoftPromptModel


def mtl_grad(model: SoftPromptModel, prompt: torch.Tensor, episodes: list[Episode], inner_lr: float,
             inner_steps: int) -> tuple[torch.Tensor, list[float]]:
    p = prompt.detach().requires_grad_(True)
    losses = [model.loss(e.support, p) for e in episodes]
    (g,) = torch.autograd.grad(sum(losses), p)
    return g, [loss.item() for loss in losses]
