"""The model-side figures: meta-training, prompt tuning and evaluation, primer against the
reference implementations of bench/reference.py on the same backbone, data and lengths. Each
pair is checked to compute the same thing before it is timed."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch

from bench import reference
from bench.measure import Timing, measure
from core.algorithms.episodes import TaskEpisodes
from core.algorithms.pt import make_optimizer
from core.algorithms.upstream import (ALGORITHMS, UpstreamConfig, episode_threads, episodes_per_forward, meta_grad,
                                      meta_train)
from core.backbones.soft_prompt import SoftPromptModel
from core.tasks.base import Example, Split


# How far the two sides of a pair may differ: float32 rounding, or bfloat16's 8-bit mantissa
# (2^-8 = 0.4 % per value, compounded over 30 layers and summed differently on each side).
TOLERANCE = {"fp32": {"grad": 1e-3, "loss": 1e-4}, "bf16": {"grad": 0.1, "loss": 0.02}}


@dataclass
class Setup:
    model: SoftPromptModel
    sources: dict[str, list[Split]]  # meta-training
    train: list[Example]  # prompt tuning
    test: list[Example]  # evaluation
    options: tuple[str, ...]
    static_length: int  # the reference's fixed padded length (input + the longest answer)
    warmup: int
    repeats: int
    meta_steps: int  # outer steps per repeat
    pt_steps: int
    batch_size: int
    inner_lr: float
    eval_examples: int
    smoke: bool  # run everything once, time nothing
    profile: bool = False  # after timing, run each implementation once more under torch.profiler
    other: SoftPromptModel | None = None  # the reference implementations' backbone, if in another precision
    dtypes: tuple[str, str] = ("fp32", "fp32")  # primer's, the reference implementations'
    batch_episodes: bool | None = None  # primer's meta-batch's episodes in one forward (None: primer's default)
    parallel_episodes: bool | None = None  # primer's episodes in parallel threads (None: primer's default)

    @property
    def ref(self) -> SoftPromptModel:
        return self.other or self.model

    def tol(self, what: str) -> float:
        """How far the pair may differ ("grad", "loss"): bf16's rounding if either side is bf16."""
        return TOLERANCE["bf16" if "bf16" in self.dtypes else "fp32"][what]


Emit = Callable[[dict], None]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _timed(s: Setup, works: dict[str, Callable[[], int]], resident: bool = False) -> list[Timing | None]:
    """Both sides of a figure (profile name -> work), timed taking turns (bench.measure); the peak
    by the resident set if `resident` (primer's episodes in threads of their own)."""
    if s.smoke:
        for work in works.values():
            work()
        return [None] * len(works)
    timings = measure(list(works.values()), s.model.backbone.device, s.warmup, s.repeats, names=list(works),
                      resident=resident)
    for name, work in works.items() if s.profile else ():
        profile(work, s.model.backbone.device, name)
    return timings


def profile(work: Callable[[], int], device: torch.device, name: str, rows: int = 12) -> None:
    """Where the time of one run of `work` goes, by operator (self time), to stderr."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        work()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n### profile: {name}\n" + prof.key_averages().table(sort_by=key, row_limit=rows), file=sys.stderr)


def _line(s: Setup, figure: str, impl: str, t: Timing | None, unit: str, **extra) -> dict:
    timing = {unit: round(t.per_second, 3), "peak_mb": round(t.peak_mb, 1), "peak_of": t.peak_of, "items": t.items,
              "seconds": [round(x, 3) for x in t.seconds]} if t else {unit: None, "peak_mb": None}
    dtype = s.dtypes[0 if impl == "primer" else 1]
    return {"figure": figure, "impl": impl, **timing, "dtype": dtype, **extra}


def meta(s: Setup, algorithm: str, emit: Emit) -> None:
    """Episodes per second of `algorithm` over `meta_steps` outer steps, primer's meta_train
    against the paper's loop on the same episodes, after checking one meta-gradient."""
    algo = ALGORITHMS[algorithm]
    cfg = _meta_config(s, algorithm)
    support, query = cfg.episode_sizes()
    episodes = TaskEpisodes(s.sources, cfg.seed)
    loss = reference.PaperLoss(s.ref, s.static_length)
    init = s.model.prompt.detach().clone()

    drawn = _first_meta_batch(s, cfg)
    ours = meta_grad(s.model, init, drawn, cfg)[0]
    theirs = sum(reference.episode_grad(loss, init, ep, cfg)[0] for ep in drawn)
    diff = _relative(ours, theirs)
    check = {"grad_relative_diff": float(f"{diff:.3g}")}
    if s.dtypes == ("bf16", "bf16"):
        check |= _against_fp32(s, algorithm, ours, theirs, init, drawn, cfg)
    elif not diff < s.tol("grad"):
        raise AssertionError(f"{algorithm}: primer's meta-gradient differs from the reference's by {diff:.2e} (relative)")

    def reference_run() -> int:
        prompt = torch.nn.Parameter(init.clone())
        opt = make_optimizer("adafactor", [prompt], 0.5, 1e-5)
        for step in range(1, cfg.steps + 1):
            grad = torch.zeros_like(prompt)
            for j in range(cfg.meta_batch):
                episode = episodes.episode((step - 1) * cfg.meta_batch + j, support, query)
                grad += reference.episode_grad(loss, prompt.detach(), episode, cfg)[0]
            prompt.grad = grad / cfg.meta_batch if algo.average else grad
            opt.step()
            opt.zero_grad(set_to_none=True)
        return cfg.steps * cfg.meta_batch

    per, threads = episodes_per_forward(s.model, cfg), episode_threads(s.model, cfg)
    how = f"{per} in one forward" if per > 1 else f"{threads} in parallel threads" if threads > 1 else "one at a time"
    ours_t, theirs_t = _timed(s, {f"meta/{algorithm} primer": _primer_work(s, algorithm, init),
                                  f"meta/{algorithm} reference": reference_run}, resident=threads > 1)
    emit(_line(s, f"meta/{algorithm}", "primer", ours_t, "episodes_per_s", **check, episodes=how))
    emit(_line(s, f"meta/{algorithm}", "paper-loop+higher", theirs_t, "episodes_per_s", **check))


def _against_fp32(s: Setup, algorithm: str, ours: torch.Tensor, theirs: torch.Tensor, init: torch.Tensor,
                  drawn: list, cfg: UpstreamConfig) -> dict:
    """Both sides in bf16: each rounds its own way, and on Gemma-3-270M each meta-gradient is
    ~9 % from the float32 one, so the two are ~12 % apart and a tolerance between them says
    little. The paper's loop on a float32 copy of the same (bf16-valued) weights is what both
    approximate: primer must come as close to it as the loop in bf16 does (or within the bf16
    tolerance)."""
    wide = copy.deepcopy(s.model.backbone.model).float()
    exact = SoftPromptModel(replace(s.model.backbone, model=wide), init, max_input_tokens=s.model.max_input_tokens)
    truth = sum(reference.episode_grad(reference.PaperLoss(exact, s.static_length), init, ep, cfg)[0] for ep in drawn)
    del exact, wide
    mine, loop = _relative(ours, truth), _relative(theirs, truth)
    if not mine < max(s.tol("grad"), 1.5 * loop):
        raise AssertionError(f"{algorithm}: primer's bf16 meta-gradient is {mine:.2e} from float32's (relative), "
                             f"the paper's loop's in bf16 {loop:.2e}")
    return {"grad_error_vs_fp32": float(f"{mine:.3g}"), "reference_error_vs_fp32": float(f"{loop:.3g}")}


def _batches(s: Setup) -> list[list[Example]]:
    g = torch.Generator().manual_seed(0)
    order = torch.randint(len(s.train), (s.pt_steps * s.batch_size,), generator=g).tolist()
    return [[s.train[i] for i in order[k * s.batch_size:(k + 1) * s.batch_size]] for k in range(s.pt_steps)]


def pt(s: Setup, peft: reference.Peft, emit: Emit) -> None:
    """Prompt-tuning steps per second (forward, backward, AdamW step) on the same batches."""
    batches = _batches(s)
    init = s.model.prompt.detach().clone()
    with torch.no_grad():
        peft.prompt.copy_(init)
    ours, theirs = s.model.loss(batches[0]).item(), peft.loss(peft.batch(batches[0])).item()
    diff = abs(ours - theirs) / abs(theirs)
    if not diff < s.tol("loss"):
        raise AssertionError(f"prompt tuning: primer's loss {ours} differs from PEFT's {theirs}")

    peft_batches = {id(b): peft.batch(b) for b in batches}  # tokenized up front, as a DataLoader would
    check = {"loss_relative_diff": float(f"{diff:.3g}")}
    ours_t, theirs_t = _timed(s, {"pt primer": lambda: _tune(s.model.prompt, s.model.loss, batches, init),
                                  "pt peft": lambda: _tune(peft.prompt, lambda b: peft.loss(peft_batches[id(b)]),
                                                           batches, init)})
    emit(_line(s, "pt", "primer", ours_t, "steps_per_s", **check))
    emit(_line(s, "pt", "peft", theirs_t, "steps_per_s", **check))
    with torch.no_grad():
        s.model.prompt.copy_(init)


def _meta_config(s: Setup, algorithm: str) -> UpstreamConfig:
    return UpstreamConfig(algorithm=algorithm, steps=s.meta_steps, inner_lr=s.inner_lr, outer_lr=0.5,
                          optimizer="adafactor", batch_episodes=s.batch_episodes,
                          parallel_episodes=s.parallel_episodes).resolved()


def _first_meta_batch(s: Setup, cfg: UpstreamConfig) -> list:
    """The first meta-batch's episodes, as primer's loop draws them."""
    episodes = TaskEpisodes(s.sources, cfg.seed)
    return [episodes.episode(j, *cfg.episode_sizes()) for j in range(cfg.meta_batch)]


def _tune(prompt: torch.nn.Parameter, loss: Callable[[list[Example]], torch.Tensor], batches: list[list[Example]],
          init: torch.Tensor) -> int:
    """Prompt tuning from `init`, one AdamW step per batch; returns the steps."""
    with torch.no_grad():
        prompt.copy_(init)
    opt = torch.optim.AdamW([prompt], lr=0.01, weight_decay=1e-5)
    for batch in batches:
        value = loss(batch)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return len(batches)


def _primer_grad(s: Setup, name: str, init: torch.Tensor) -> torch.Tensor:
    """primer's gradient for `name` (a meta algorithm, or "pt") at `init`: the first meta-batch's
    meta-gradient, or the first prompt-tuning batch's gradient."""
    if name == "pt":
        prompt = torch.nn.Parameter(init.clone())
        s.model.loss(_batches(s)[0], prompt).backward()
        return prompt.grad
    cfg = _meta_config(s, name)
    return meta_grad(s.model, init, _first_meta_batch(s, cfg), cfg)[0]


def _primer_work(s: Setup, name: str, init: torch.Tensor) -> Callable[[], int]:
    """primer's side of the figure for `name` from `init`, as bench.measure takes it: meta_train
    for meta_steps outer steps, or pt_steps of prompt tuning."""
    if name == "pt":
        prompt, batches = torch.nn.Parameter(init.clone()), _batches(s)
        return lambda: _tune(prompt, lambda b: s.model.loss(b, prompt), batches, init)
    cfg = _meta_config(s, name)

    def run() -> int:
        meta_train(s.model, s.sources, init, cfg)
        return cfg.steps * cfg.meta_batch
    return run


def two_ways(s: Setup, names: list[str], ways: dict[str, Callable[[Callable], Callable]]) -> None:
    """primer's own figures (meta algorithms, "pt") run two ways, for scripts that compare them
    (scripts/fuse_gain.py, sdpa_gqa.py): `ways` maps each way's label to a wrapper that runs a
    function that way. Per figure, the gradient each way is compared, then both are timed taking
    turns (bench.measure); a markdown row each, to stdout."""
    (a, first), (b, second) = ways.items()
    init = s.model.prompt.detach().clone()
    print(f"\n| work | {a}: items/s | {b}: items/s | {a} ÷ {b} | peak MB: {a}, {b} | gradient relative diff |\n"
          "|---|---|---|---|---|---|", flush=True)
    for name in names:
        diff = _relative(first(lambda: _primer_grad(s, name, init))(), second(lambda: _primer_grad(s, name, init))())
        ours, theirs = measure([first(_primer_work(s, name, init)), second(_primer_work(s, name, init))],
                               s.model.backbone.device, s.warmup, s.repeats)
        print(f"| {name} | {ours.per_second:.3f} | {theirs.per_second:.3f} | {ours.per_second / theirs.per_second:.3f}× "
              f"| {ours.peak_mb:.0f}, {theirs.peak_mb:.0f} | {diff:.2e} |", flush=True)


def _tuned(s: Setup, steps: int) -> torch.Tensor:
    """The prompt after `steps` of prompt tuning on the target's train split (untimed), so that
    both evaluations score a prompt that has learned the task and its answer words."""
    prompt = torch.nn.Parameter(s.model.prompt.detach().clone())
    opt = torch.optim.AdamW([prompt], lr=0.01, weight_decay=1e-5)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss = s.model.loss([s.train[i] for i in torch.randint(len(s.train), (s.batch_size,), generator=g).tolist()],
                            prompt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return prompt.detach()


def evaluation(s: Setup, peft: reference.Peft, emit: Emit) -> None:
    """Examples per second and accuracy: primer's rank classification against PEFT's greedy
    `generate` and a string match, the same prompt (tuned on the target first) in both."""
    examples = s.test[:s.eval_examples]
    gold = [e.output for e in examples]
    tuned = _tuned(s, 2 if s.smoke else 30)
    with torch.no_grad():
        peft.prompt.copy_(tuned)
    longest = max(len(s.model._tokens(o, True)) for o in s.options)
    found: dict[str, list[str]] = {}

    def ours(batch_size: int = 32) -> int:
        found["primer"] = s.model.rank(examples, [s.options] * len(examples), batch_size=batch_size, prompt=tuned)
        return len(examples)

    def theirs(batch_size: int = 32) -> int:
        found["peft"] = peft.generate_labels(examples, s.options, max_new_tokens=longest, batch_size=batch_size)
        return len(examples)

    accuracy = lambda impl: round(sum(p == g for p, g in zip(found[impl], gold)) / len(gold), 4)  # noqa: E731
    timings = _timed(s, {"eval primer": ours, "eval peft+generate": theirs})
    for impl, work, t in (("primer", ours, timings[0]), ("peft+generate", theirs, timings[1])):
        batched = accuracy(impl.split("+")[0])
        # Untimed, one example at a time: a prediction should not depend on its batch. PEFT puts
        # the left padding of `generate` between the virtual tokens and the input, which moves
        # the input's positions relative to the prompt in every padded row.
        work(1)
        emit(_line(s, "eval", impl, t, "examples_per_s", accuracy=batched, accuracy_one_by_one=accuracy(impl.split("+")[0]),
                   examples=len(examples), prompt_tuning_steps=2 if s.smoke else 30))
