"""The upstream loop shared by every algorithm: episodes -> per-episode prompt gradients ->
one outer optimizer step per meta-batch, with progress and resumable checkpoints.

Each algorithm is one function (model, prompt, episodes, inner_lr, inner_steps) -> (gradient
summed over the episodes, their losses) plus the paper's defaults for it (the MPT code's run
scripts). The loop gives it one episode at a time, as the paper; several in one forward, one
prompt copy each (`batch_episodes`: on a CPU two at a time by default; or the whole
meta-batch); or, on a CPU, the episodes one each to as many threads at once, sharing the cores
(`parallel_episodes`). All three give the same meta-gradient up to float rounding.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from core.algorithms.episodes import MixedBatches, TaskEpisodes
from core.algorithms.maml import double_backward_attention, fomaml_grad, maml_grad
from core.algorithms.mtl import mtl_grad
from core.algorithms.pt import make_optimizer
from core.algorithms.reptile import reptile_grad
from core.backbones.soft_prompt import SoftPromptModel
from core.errors import UserError
from core.tasks.base import Split


@dataclass(frozen=True)
class Algorithm:
    grad: Callable
    episodes: type
    inner_batch_size: int
    inner_steps: int
    meta_batch: int
    uses_query: bool
    # Reptile averages its pseudo-gradients over the meta-batch; MAML and FoMAML sum the query
    # gradients of the episodes (the MPT code accumulates them unscaled).
    average: bool = False
    # Reptile takes a fresh support batch for each inner step; MAML reuses one.
    support_per_inner_step: bool = False
    # Differentiates through its inner update (with the math attention kernel, chosen process-wide).
    second_order: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    "maml": Algorithm(maml_grad, TaskEpisodes, inner_batch_size=2, inner_steps=1, meta_batch=2, uses_query=True,
                      second_order=True),
    "fomaml": Algorithm(fomaml_grad, TaskEpisodes, inner_batch_size=4, inner_steps=1, meta_batch=2, uses_query=True),
    "reptile": Algorithm(reptile_grad, TaskEpisodes, inner_batch_size=4, inner_steps=10, meta_batch=2,
                         uses_query=False, average=True, support_per_inner_step=True),
    "mtl": Algorithm(mtl_grad, MixedBatches, inner_batch_size=4, inner_steps=1, meta_batch=1, uses_query=False),
    # MetaPT: MAML whose "tasks" are clusters of the pooled source data (core/algorithms/metapt.py).
    "metapt": Algorithm(maml_grad, TaskEpisodes, inner_batch_size=2, inner_steps=1, meta_batch=2, uses_query=True,
                        second_order=True),
    # PPT (Gu et al. 2022), MetaPT's baseline: plain training of the prompt on the same pooled data.
    "ppt": Algorithm(mtl_grad, MixedBatches, inner_batch_size=4, inner_steps=1, meta_batch=1, uses_query=False),
}


@dataclass
class UpstreamConfig:
    algorithm: str
    steps: int = 5000  # outer steps
    inner_batch_size: int | None = None  # None: the algorithm's paper default
    inner_steps: int | None = None
    meta_batch: int | None = None  # episodes per outer step (the paper's gradient accumulation)
    inner_lr: float = 3e-5
    outer_lr: float = 0.5
    optimizer: str = "adafactor"
    weight_decay: float = 1e-5
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 0  # outer steps; 0: never
    # the meta-batch's episodes in one forward, one prompt copy per episode (the same gradient):
    # True: all of them; None: on a CPU, DEFAULT_EPISODES_PER_FORWARD at a time, unless
    # parallel_episodes; False: one at a time
    batch_episodes: bool | None = None
    # on a CPU, the episodes in parallel threads sharing the cores, up to one per thread (the
    # same gradient, with one episode's memory per thread); None or False: off
    parallel_episodes: bool | None = None

    def resolved(self) -> "UpstreamConfig":
        a = ALGORITHMS[self.algorithm]
        return UpstreamConfig(**{**self.__dict__,
                                 "inner_batch_size": self.inner_batch_size or a.inner_batch_size,
                                 "inner_steps": self.inner_steps or a.inner_steps,
                                 "meta_batch": self.meta_batch or a.meta_batch})

    def episode_sizes(self) -> tuple[int, int]:
        """Support and query examples per episode, of a resolved config."""
        a = ALGORITHMS[self.algorithm]
        return (self.inner_batch_size * (self.inner_steps if a.support_per_inner_step else 1),
                self.inner_batch_size if a.uses_query else 0)


@dataclass
class UpstreamResult:
    algorithm: str
    prompt: torch.Tensor
    steps: int
    seconds: float
    curve: list[dict] = field(default_factory=list)  # {step, loss} per outer step


Checkpoint = Callable[[dict], None]


class Diverged(UserError):
    """Meta-training's loss or meta-gradient turned non-finite: every later step would be NaN too."""

    def __init__(self, algorithm: str, step: int, message: str):
        super().__init__(message)
        self.algorithm, self.step = algorithm, step


# By default a meta-batch on a CPU runs this many episodes in one forward: their
# matrix multiplies get twice the rows for the same weights read, while the memory stays at most
# twice one episode's, however long the meta-batch (docs/performance.md).
DEFAULT_EPISODES_PER_FORWARD = 2


def episodes_per_forward(model: SoftPromptModel, cfg: UpstreamConfig) -> int:
    """How many of a resolved config's episodes go through the backbone in one forward."""
    if cfg.batch_episodes:
        return cfg.meta_batch
    auto = cfg.batch_episodes is None and not cfg.parallel_episodes and model.backbone.device.type == "cpu"
    return min(cfg.meta_batch, DEFAULT_EPISODES_PER_FORWARD) if auto else 1


def episode_threads(model: SoftPromptModel, cfg: UpstreamConfig) -> int:
    """How many of a resolved config's episodes run at once in threads: 1, or up to one per CPU thread."""
    if not cfg.parallel_episodes or cfg.batch_episodes or model.backbone.device.type != "cpu":
        return 1
    return max(1, min(cfg.meta_batch, torch.get_num_threads()))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="episode")


def meta_grad(model: SoftPromptModel, prompt: torch.Tensor, drawn: list, cfg: UpstreamConfig
              ) -> tuple[torch.Tensor, list[float]]:
    """The meta-batch's gradient (the algorithm's sum over its episodes) and the episodes' losses,
    one episode at a time, several in one forward (`batch_episodes`) or in parallel threads."""
    algo = ALGORITHMS[cfg.algorithm]
    per, threads = episodes_per_forward(model, cfg), min(episode_threads(model, cfg), len(drawn))
    if threads == 1:
        done = [algo.grad(model, prompt, drawn[i:i + per], cfg.inner_lr, cfg.inner_steps)
                for i in range(0, len(drawn), per)]
    else:
        total = torch.get_num_threads()
        share = max(1, total // threads)

        def one(episode):
            torch.set_num_threads(share)  # this thread's share of the cores
            return algo.grad(model, prompt, [episode], cfg.inner_lr, cfg.inner_steps)

        # The attention kernel is chosen process-wide, and MAML asks for the math kernel for its
        # support pass (its double backward needs it): one thread's exit from that choice must not
        # end it for the other, so it holds for all of them until the last is done.
        torch.set_num_threads(share)
        try:
            with double_backward_attention() if algo.second_order else contextlib.nullcontext():
                done = list(_pool(threads).map(one, drawn))
        finally:
            torch.set_num_threads(total)
    return sum(g for g, _ in done), [loss for _, losses in done for loss in losses]


def meta_train(model: SoftPromptModel, sources: dict[str, list[Split]], init: torch.Tensor,
               cfg: UpstreamConfig, progress: Callable[[dict], None] | None = None,
               checkpoint: Checkpoint | None = None, resume: dict | None = None) -> UpstreamResult:
    """Learn a prompt initialization on the source splits; `resume` is a state `checkpoint` got."""
    cfg = cfg.resolved()
    algo = ALGORITHMS[cfg.algorithm]
    episodes = algo.episodes(sources, cfg.seed)
    support, query = cfg.episode_sizes()

    prompt = torch.nn.Parameter(init.detach().clone().float())
    opt = make_optimizer(cfg.optimizer, [prompt], cfg.outer_lr, cfg.weight_decay)
    first, curve, seconds = 1, [], 0.0
    if resume is not None:
        with torch.no_grad():
            prompt.copy_(resume["prompt"])
        opt.load_state_dict(resume["optimizer"])
        first, curve, seconds = resume["step"] + 1, list(resume["curve"]), resume["seconds"]

    start = time.perf_counter() - seconds
    for step in range(first, cfg.steps + 1):
        drawn = [episodes.episode((step - 1) * cfg.meta_batch + j, support, query) for j in range(cfg.meta_batch)]
        grad, losses = meta_grad(model, prompt, drawn, cfg)
        loss = sum(losses) / len(losses)
        if not (math.isfinite(loss) and torch.isfinite(grad).all()):  # every later step would be NaN too
            raise Diverged(cfg.algorithm, step, (
                f"upstream {cfg.algorithm} diverged at outer step {step}: the episodes' mean loss is "
                f"{loss:g}{'' if torch.isfinite(grad).all() else ' and the meta-gradient is not finite'}; "
                f"lower its outer_lr ({cfg.outer_lr:g}) or inner_lr ({cfg.inner_lr:g}) (upstream.outer_lr "
                f"and inner_lr, or upstream.per_method.{cfg.algorithm}), or set upstream.grad_clip"))
        prompt.grad = grad / cfg.meta_batch if algo.average else grad
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([prompt], cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append({"step": step, "loss": loss})
        if progress:
            progress({"phase": "upstream", "method": cfg.algorithm, "step": step, "total": cfg.steps,
                      "loss": curve[-1]["loss"]})
        if checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            # A deep copy: optimizers update their state tensors in place after this returns.
            checkpoint({"prompt": prompt.detach().clone(), "optimizer": copy.deepcopy(opt.state_dict()), "step": step,
                        "curve": list(curve), "seconds": time.perf_counter() - start})
    return UpstreamResult(cfg.algorithm, prompt.detach().clone(), cfg.steps, time.perf_counter() - start, curve)
