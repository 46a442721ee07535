"""Downstream prompt tuning with the MPT paper's protocol.

Per (task, split seed, learning rate): train the prompt on the k-shot train split, score dev
every `eval_every` steps (and once before training), stop after `patience` evaluations without
a better dev score, and score the best-dev prompt on test. Per split seed the learning rate with
the best dev score is kept; the task's result is the mean and std of those test scores.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from core.backbones.soft_prompt import SoftPromptModel
from core.errors import UserError
from core.metrics import score
from core.names import OPTIMIZERS
from core.tasks.base import Example, Split, Task, TaskInfo

Progress = Callable[[dict], None]


@dataclass
class TrainConfig:
    batch_size: int = 8
    max_steps: int = 1000
    eval_every: int = 50
    patience: int | None = None  # evaluations without a better dev score before stopping
    optimizer: str = "adafactor"
    weight_decay: float = 1e-5
    # The paper clips Adafactor's update (its clip_threshold, 1.0 by default), not the gradient
    # norm; a norm clip is here for AdamW users and off by default.
    grad_clip: float | None = None
    eval_batch_size: int = 32
    seed: int = 0  # batch order; the split seed is mixed in so seeds see different orders


@dataclass
class RunResult:
    seed: int
    lr: float
    best_dev: float
    best_step: int
    test: float | None
    steps: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # {step, loss} and {step, dev} points
    prompt: torch.Tensor | None = field(default=None, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("prompt")
        return d


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # As in PPT/MPT: a fixed lr, no relative step or parameter scaling.
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown optimizer {name!r}; accepted: {', '.join(OPTIMIZERS)}")


def evaluate(model: SoftPromptModel, examples: list[Example], info: TaskInfo, batch_size: int = 32,
             prompt: torch.Tensor | None = None) -> float:
    predictions = model.predict(examples, info, batch_size, prompt)
    return score(info.metric, predictions, [list(e.outputs) for e in examples])


def batches(examples: list[Example], batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs, the last batch of an epoch possibly short (no drop_last)."""
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for s in range(0, len(order), batch_size):
            yield [examples[i] for i in order[s : s + batch_size]]


def beats(score: float, best: float) -> bool:
    """Whether a dev score beats the best so far. A NaN score (CrossFit's Pearson of constant
    predictions) beats nothing and anything beats it: CrossFit's best starts below every score,
    so a NaN dev at step 0 must not keep a run from recording the scores it reaches later."""
    return not math.isnan(score) and (math.isnan(best) or score > best)


def best_of(runs: list[RunResult]) -> RunResult:
    """The run with the best dev score, NaN counting as the worst; ties: the first."""
    return max(runs, key=lambda r: -math.inf if math.isnan(r.best_dev) else r.best_dev)


def fit(model: SoftPromptModel, split: Split, info: TaskInfo, lr: float, cfg: TrainConfig,
        params: list[torch.nn.Parameter], snapshot: Callable[[], object], phase: str = "pt",
        progress: Progress | None = None) -> RunResult:
    """Train `params` from where they are now on the split's train set, scoring dev before
    training and every `eval_every` steps; RunResult.prompt holds `snapshot()` of the best dev."""
    start = time.perf_counter()
    opt = make_optimizer(cfg.optimizer, params, lr, cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + split.seed)
    dev = lambda: evaluate(model, split.dev, info, cfg.eval_batch_size)
    best_dev, best_step, best = dev(), 0, snapshot()
    curve, stale, step = [{"step": 0, "dev": best_dev}], 0, 0
    for step, batch in zip(range(1, cfg.max_steps + 1), batches(split.train, cfg.batch_size, g)):
        loss = model.loss(batch)
        event = {"phase": phase, "step": step, "total": cfg.max_steps, "lr": lr, "seed": split.seed,
                 "loss": loss.item()}
        curve.append({"step": step, "loss": event["loss"]})
        if not math.isfinite(event["loss"]):  # diverged: its gradient would make every later step NaN
            if progress:
                progress(event | {"best_dev": best_dev, "diverged": True})
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            event["dev"] = d = dev()
            curve.append({"step": step, "dev": d})
            if beats(d, best_dev):
                best_dev, best_step, best, stale = d, step, snapshot(), 0
            else:
                stale += 1
        if progress:
            progress(event | {"best_dev": best_dev})
        if cfg.patience is not None and stale >= cfg.patience:
            break
    return RunResult(split.seed, lr, best_dev, best_step, None, step, time.perf_counter() - start, curve, best)


def train_prompt(model: SoftPromptModel, split: Split, info: TaskInfo, init: torch.Tensor, lr: float,
                 cfg: TrainConfig, progress: Progress | None = None, test: bool = True) -> RunResult:
    """One prompt-tuning run from `init`; returns the best-dev prompt and (if asked) its test score."""
    with torch.no_grad():
        model.prompt.copy_(init)
    run = fit(model, split, info, lr, cfg, [model.prompt], lambda: model.prompt.detach().clone(), "pt", progress)
    if test and split.test:
        run.test = evaluate(model, split.test, info, cfg.eval_batch_size, run.prompt)
    return run


def grid(task: Task, lrs: list[float], splits: list[Split], train: Callable[[Split, float], RunResult],
         test: Callable[[RunResult, Split], float]) -> TaskResult:
    """The paper's protocol: per split seed, every lr; the lr with the best dev score is chosen
    (ties: the first of the grid) and only its best-dev checkpoint meets the test set."""
    runs, best = [], []
    for split in splits:
        per_lr = [train(split, lr) for lr in lrs]
        chosen = best_of(per_lr)
        chosen.test = test(chosen, split)
        runs += per_lr
        best.append(chosen)
    return TaskResult(task.name, task.info.metric, runs, best)


@dataclass
class TaskResult:
    task: str
    metric: str
    runs: list[RunResult]  # every (seed, lr)
    best: list[RunResult]  # the best-dev lr of each seed

    @property
    def mean(self) -> float:
        return statistics.fmean(r.test for r in self.best)

    @property
    def std(self) -> float:
        return statistics.stdev([r.test for r in self.best]) if len(self.best) > 1 else 0.0

    def summary(self) -> dict:
        return {"task": self.task, "metric": self.metric, "mean": self.mean, "std": self.std,
                "best": [r.summary() for r in self.best], "runs": [r.summary() for r in self.runs]}


def prompt_tune(model: SoftPromptModel, task: Task, init: torch.Tensor, lrs: list[float],
                splits: list[Split], cfg: TrainConfig, progress: Progress | None = None) -> TaskResult:
    """Downstream PT from `init` over split seeds and the learning-rate grid."""
    return grid(task, lrs, splits,
                lambda split, lr: train_prompt(model, split, task.info, init, lr, cfg, progress, test=False),
                lambda run, split: evaluate(model, split.test, task.info, cfg.eval_batch_size, run.prompt))
