"""python -m bench: primer against the MPT paper's training loop and PEFT, side by side in one
run on one backbone, batch, prompt length and sequence lengths. One JSON line per figure on
stdout, then a table (docs/performance.md holds the measured figures and how they were taken).
Each meta algorithm, prompt tuning and evaluation run in a fresh process of their own; peak
memory is the live tensors' (bench/measure.py), on a CPU as on a GPU.

  python -m bench                         # SmolLM2-135M, real task data, every model-side figure
  python -m bench --parts meta --repeats 5
  python -m bench --dtype bf16            # both sides in bfloat16 (fast on CPUs with AVX512-BF16/AMX)
  python -m bench --dtype bf16 --reference-dtype fp32   # primer in bf16, the others as their authors run them
  python -m bench --parts meta --batch-episodes   # primer's meta-batch in one forward pass
  python -m bench --own-prefix            # primer as before it ran a task's template once per pack
  python -m bench --max-input-tokens 256 --sources bbc_news_topic --target bbc_news_topic   # longer inputs
  python -m bench --parts api             # the service: requests/s and latency, queueing delay
  python -m bench --smoke --backbone DIR  # CI: every code path once at tiny size, nothing timed
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys

PARTS = ("meta", "pt", "eval", "api")
ALGORITHMS = ("maml", "fomaml", "reptile")  # those bench/reference.py writes the paper's loop for
SOURCES = ("sms_spam", "disaster_tweets", "sarcasm_headlines", "trec_coarse")
TARGET = "rotten_tomatoes_sentiment"
SETTING = {"auto": None, "on": True, "off": False}  # --batch-episodes, --parallel-episodes: upstream's


def at_least(low: float, kind: type = int, most: float | None = None):
    """An argparse type: a number of `kind` no smaller than `low` (above it for a float), and no
    larger than `most`."""
    def number(text: str):
        try:
            value = kind(text)
            if not math.isfinite(value):
                raise ValueError(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a finite number'}")
        if value < low or (kind is float and value == low):
            raise argparse.ArgumentTypeError(f"{text} is too small: expected {'at least' if kind is int else 'above'} {low}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text} is too large: expected at most {most}")
        return value
    return number


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from core.names import MAX_PROMPT_TOKENS

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="smollm2-135m", help="a registered backbone or a model directory")
    p.add_argument("--parts", default="meta,pt,eval", help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--algorithms", default="maml,fomaml,reptile")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="the backbone's weights and activations, on both sides of every pair")
    p.add_argument("--reference-dtype", choices=("fp32", "bf16"),
                   help="the reference implementations' precision, if not --dtype (primer in bf16 against "
                        "the paper's loop and PEFT as their authors run them, in fp32)")
    p.add_argument("--prompt-length", type=at_least(1, most=MAX_PROMPT_TOKENS), default=20)
    p.add_argument("--max-input-tokens", type=at_least(8), default=64,
                   help="both sides' cap on an input's tokens (cut in the middle, primer's default); the "
                        "paper's loop pads every row to the longest capped input plus the longest answer")
    p.add_argument("--sources", default=",".join(SOURCES),
                   help="comma-separated built pack tasks the meta-training episodes are drawn from")
    p.add_argument("--target", default=TARGET, help="a built classification pack task: prompt tuning's "
                                                    "and evaluation's data")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="prompt tuning's batch")
    p.add_argument("--inner-lr", type=at_least(0, float), default=3e-5)
    p.add_argument("--batch-episodes", nargs="?", const="on", default="auto", choices=list(SETTING),
                   help="primer runs each meta-batch's episodes in one forward (upstream.batch_episodes): auto "
                        "(primer's default: on a CPU, MAML's 2 at a time), on (alone: on; the whole meta-batch) or off")
    p.add_argument("--parallel-episodes", nargs="?", const="on", default="auto", choices=list(SETTING),
                   help="primer runs each meta-batch's episodes in parallel threads on a CPU (upstream.parallel_episodes): "
                        "auto (primer's default: off), on (alone: on) or off")
    p.add_argument("--own-prefix", action="store_true",
                   help="primer runs the tokens a batch's rows begin with (a task's template) in every row, "
                        "not once (SoftPromptModel.SHARE_PREFIX off): primer as it was before it shared them")
    p.add_argument("--meta-steps", type=at_least(1), default=3, help="outer steps per repeat")
    p.add_argument("--pt-steps", type=at_least(1), default=10, help="prompt-tuning steps per repeat")
    p.add_argument("--eval-examples", type=at_least(1), default=128)
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--repeats", type=at_least(1), default=3)
    p.add_argument("--api-clients", type=at_least(1), default=50)
    p.add_argument("--api-seconds", type=at_least(0, float), default=10.0)
    p.add_argument("--api-rate", type=at_least(0, float), default=1.0, help="requests/s per client in the paced API run")
    p.add_argument("--profile", action="store_true", help="also print where each implementation's time goes "
                                                           "(torch.profiler, by operator) to stderr")
    p.add_argument("--smoke", action="store_true", help="run every path once on synthetic data; time nothing")
    p.add_argument("--one-process", action="store_true",
                   help="measure every model-side figure in this process (by default each meta algorithm, "
                        "pt and eval runs in a fresh process, so that no figure's peak memory depends on "
                        "what ran before it)")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # a child of the default run
    args = p.parse_args(argv)
    unknown = sorted(set(args.parts.split(",")) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; accepted: {', '.join(PARTS)}")
    unknown = sorted(set(args.algorithms.split(",")) - set(ALGORITHMS))
    if unknown:
        p.error(f"unknown algorithm(s) {', '.join(unknown)}; accepted: {', '.join(ALGORITHMS)}")
    if {"meta", "pt", "eval"} & set(args.parts.split(",")):  # before any figure's process starts
        from core.backbones.load import BackboneError, locate

        try:
            locate(args.backbone, build=False)
        except BackboneError as e:
            p.error(str(e))
        import torch

        if args.device == "cuda" and not torch.cuda.is_available():
            p.error(f"--device cuda: torch {torch.__version__} sees no CUDA device on this machine")
    if {"meta", "pt", "eval"} & set(args.parts.split(",")) and not args.smoke:  # the data, before any figure starts
        from core.fetch import FetchError
        from core.tasks import TaskError, load_task

        for option, names in (("--sources", args.sources.split(",")), ("--target", [args.target])):
            for name in names:
                try:
                    task = load_task(_ref(name))
                except (TaskError, FetchError) as e:
                    p.error(f"{option} {name}: {e}")
                if option == "--target" and not task.info.options:
                    p.error(f"--target {name}: {task.info.type} has no answer options to rank; "
                            "accepted: a classification task")
    return args


def synthetic(n: int, seed: int):
    """Word strings with two labels, for the smoke run (the tiny test backbone's vocabulary)."""
    from core.tasks.base import Example

    words = "the a movie film good bad great awful spam free win call now see you lunch sky blue".split()
    return [Example(" ".join(words[(i * 7 + j * 3 + seed) % len(words)] for j in range(5 + i % 4)),
                    ("positive" if i % 2 else "negative",)) for i in range(n)]


def setup(args):
    import torch

    from bench.figures import Setup
    from core import backbones
    from core.backbones.soft_prompt import SoftPromptModel
    from core.prompts import init_prompt
    from core.tasks import get_split, load_task
    from core.tasks.base import Split

    torch.manual_seed(0)
    backbone = backbones.freeze(backbones.load(args.backbone, device=args.device, dtype=backbones.DTYPES[args.dtype]))
    model = SoftPromptModel(backbone, init_prompt(backbone, args.prompt_length, "vocab", seed=0),
                            max_input_tokens=args.max_input_tokens)
    model.SHARE_PREFIX = not args.own_prefix
    theirs = args.reference_dtype or args.dtype
    other = None
    if theirs != args.dtype:  # a second copy of the backbone, the same prompt
        other = SoftPromptModel(backbones.freeze(backbones.load(args.backbone, device=args.device, dtype=backbones.DTYPES[theirs])),
                                model.prompt.detach(), max_input_tokens=args.max_input_tokens)
    if args.smoke:
        sources = {f"synthetic{i}": [Split(synthetic(16, i), synthetic(16, i + 10), [], 100, 8)] for i in range(3)}
        target = Split(synthetic(32, 7), [], synthetic(16, 8), 100, 16)
        options = ("negative", "positive")
    else:
        sources = {n: [get_split(load_task(_ref(n)), 100)] for n in args.sources.split(",")}
        task = load_task(_ref(args.target))
        target, options = get_split(task, 100), tuple(task.info.options)
    examples = [e for splits in sources.values() for s in splits for e in s.train + s.dev] + target.train + target.test
    answer = max(len(model._tokens(e.output, True)) for e in examples)
    longest = max(len(model._tokens(e.input, False)) for e in examples)
    one = 1 if args.smoke else None
    return Setup(model, sources, target.train, target.test, options, static_length=longest + answer,
                 warmup=0 if args.smoke else args.warmup, repeats=one or args.repeats,
                 meta_steps=one or args.meta_steps, pt_steps=2 if args.smoke else args.pt_steps,
                 batch_size=args.batch_size, inner_lr=args.inner_lr, eval_examples=args.eval_examples,
                 smoke=args.smoke, profile=args.profile, other=other, dtypes=(args.dtype, theirs),
                 batch_episodes=SETTING[args.batch_episodes],
                 parallel_episodes=SETTING[args.parallel_episodes])


def _ref(name: str):
    from core.spec import TaskRef

    return TaskRef(name=name)


def machine(args) -> dict:
    import torch

    info = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "device": args.device, "backbone": args.backbone, "dtype": args.dtype,
            "reference_dtype": args.reference_dtype or args.dtype, "batch_episodes": SETTING[args.batch_episodes],
            "parallel_episodes": SETTING[args.parallel_episodes], "share_prefix": not args.own_prefix,
            "prompt_length": args.prompt_length, "max_input_tokens": args.max_input_tokens}
    if not args.smoke:
        info.update(sources=args.sources.split(","), target=args.target)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(lines: list[dict]) -> str:
    """Markdown: one row per figure and implementation, primer's ratio to the other."""
    rows = ["| figure | implementation | rate | peak MB (of) | check | primer ÷ other |", "|---|---|---|---|---|---|"]
    rate_keys = ("episodes_per_s", "steps_per_s", "examples_per_s", "requests_per_s")
    by_figure: dict[str, dict[str, dict]] = {}
    for line in lines:
        name = line["figure"] + (f" ({line['mode']})" if "mode" in line else "")
        by_figure.setdefault(name, {})[line["impl"]] = line
    for figure, impls in by_figure.items():
        primer = impls.get("primer", {})
        for impl, line in impls.items():
            key = next((k for k in rate_keys if k in line), None)
            rate = line.get(key) if key else None
            check = ", ".join(f"{k} {line[k]}" for k in ("grad_relative_diff", "loss_relative_diff", "accuracy", "accuracy_one_by_one",
                                                         "p50_ms", "p99_ms", "errors", "to_running_s",
                                                         "to_first_step_s", "first_job_to_first_step_s", "step_s", "preload_s", "prepare_s",
                                                         "exit_status")
                              if k in line)
            ratio = ""
            if impl != "primer" and rate and primer.get(key):
                ratio = f"{primer[key] / rate:.2f}×"
            unit = key.replace("_per_s", "/s") if key else ""
            impl = f"{impl} ({line['dtype']})" if "dtype" in line else impl
            rate_text = f"{rate if rate is not None else '—'} {unit}".strip()
            peak = f"{line['peak_mb']} ({line['peak_of']})" if line.get("peak_mb") is not None else "—"
            rows.append(f"| {figure} | {impl} | {rate_text} | {peak} | {check} | {ratio} |")
    return "\n".join(rows)


def units(args) -> list[tuple[str, str]]:
    """The model-side figures as (part, algorithms), each measured in a process of its own."""
    parts = args.parts.split(",")
    out = [("meta", a) for a in args.algorithms.split(",")] if "meta" in parts else []
    return out + [(p, args.algorithms) for p in ("pt", "eval") if p in parts]


def isolated(argv: list[str], part: str, algorithms: str, emit) -> bool:
    """One figure in a fresh interpreter (the same options; the last --parts wins); its JSON
    lines are relayed, its stderr (progress, profiles, a traceback) passes through. False if it
    failed: the other figures still run, and the table names the failed one."""
    cmd = [sys.executable, "-m", "bench", *argv, "--parts", part, "--algorithms", algorithms, "--one-process", "--quiet"]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            emit(json.loads(line))
    if done.returncode:
        emit({"figure": f"meta/{algorithms}" if part == "meta" else part, "impl": "FAILED", "exit_status": done.returncode})
    return done.returncode == 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    parts = args.parts.split(",")
    lines: list[dict] = []

    def emit(line: dict) -> None:
        lines.append(line)
        print(json.dumps(line), flush=True)

    if not args.quiet:
        emit({"figure": "machine", "impl": "-", **machine(args)})
    failed = False
    if not args.one_process and len(units(args)) > 1:
        for part, algorithms in units(args):
            failed |= not isolated(argv, part, algorithms, emit)
    elif {"meta", "pt", "eval"} & set(parts):
        from bench import figures, reference
        from bench.measure import fixed_allocator

        fixed_allocator()
        s = setup(args)
        if "meta" in parts:
            for algorithm in args.algorithms.split(","):
                figures.meta(s, algorithm, emit)
        if {"pt", "eval"} & set(parts):
            peft = reference.Peft(s.ref, s.model.prompt.detach(), s.static_length)
            if "pt" in parts:
                figures.pt(s, peft, emit)
            if "eval" in parts:
                figures.evaluation(s, peft, emit)
    if "api" in parts:
        from bench import api

        api.run(args, emit)
    if not args.quiet:
        print(table([line for line in lines if line["figure"] != "machine"]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
