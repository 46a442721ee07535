"""Fine-tuning baseline: every backbone weight trains on the target task, no prompt, with the
same protocol as PT (lr grid per split seed, best dev checkpoint scored on test).

It works on its own copy of the backbone, so the frozen backbone that every prompt method
shares is never touched.
"""
from __future__ import annotations

import copy

import torch

from core.algorithms.pt import Progress, TaskResult, TrainConfig, evaluate, fit, grid
from core.backbones.load import Backbone
from core.backbones.soft_prompt import SoftPromptModel
from core.tasks.base import Split, Task


def finetune(backbone: Backbone, task: Task, lrs: list[float], splits: list[Split], cfg: TrainConfig,
             progress: Progress | None = None, **model_options) -> TaskResult:
    # eval mode stays: no dropout, as for the prompt methods. The copy trains in float32 whatever
    # the backbone's precision: in bfloat16, AdamW's updates at 1e-5 would round away.
    weights = copy.deepcopy(backbone.model).float()
    weights.requires_grad_(True)
    own = Backbone(backbone.name, weights, backbone.tokenizer, backbone.kind)
    model = SoftPromptModel(own, torch.empty(0, backbone.dim), allow_empty=True, **model_options)
    params = list(weights.parameters())
    initial = copy.deepcopy(weights.state_dict())
    snapshot = lambda: {k: v.detach().clone() for k, v in weights.state_dict().items()}

    def train(split: Split, lr: float):
        weights.load_state_dict(initial)
        return fit(model, split, task.info, lr, cfg, params, snapshot, "ft", progress)

    def test(run, split: Split) -> float:
        weights.load_state_dict(run.prompt)
        return evaluate(model, split.test, task.info, cfg.eval_batch_size)

    result = grid(task, lrs, splits, train, test)
    for run in result.runs:
        run.prompt = None  # full weight copies: too big to keep or ship; FT's product is its score
    return result
