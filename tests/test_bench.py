"""The benchmark harness at tiny size (issue 6): every figure's code path runs once, the
reference implementations are checked equal to primer's on the way, nothing is timed."""
import json

import pytest

from bench.__main__ import main, parse


def test_the_smoke_run_checks_every_pair_and_times_nothing(tiny_dir, capsys):
    assert main(["--smoke", "--backbone", str(tiny_dir["causal"]), "--parts", "meta,pt,eval,api"]) == 0
    out, err = capsys.readouterr()
    lines = {(d["figure"], d["impl"]) + ((d["mode"],) if "mode" in d else ()): d for d in map(json.loads, out.splitlines())}
    for algorithm in ("maml", "fomaml", "reptile"):
        for impl in ("primer", "paper-loop+higher"):
            line = lines[(f"meta/{algorithm}", impl)]
            assert line["episodes_per_s"] is None and line["peak_mb"] is None
            assert line["grad_relative_diff"] < 1e-3  # the same meta-gradient from both
    assert lines[("pt", "primer")]["loss_relative_diff"] < 1e-4 and lines[("pt", "peft")]["steps_per_s"] is None
    for impl in ("primer", "peft+generate"):
        assert 0 <= lines[("eval", impl)]["accuracy"] <= 1 and lines[("eval", impl)]["examples_per_s"] is None
    # rank classification does not depend on what else is in the batch
    assert lines[("eval", "primer")]["accuracy_one_by_one"] == lines[("eval", "primer")]["accuracy"]
    for figure, mode in [(f, m) for f in ("api POST /jobs", "api GET /jobs/{id}") for m in ("closed loop", "paced 2/s")]:
        line = lines[(figure, "primer", mode)]
        assert line["requests"] > 0 and line["errors"] == 0, line
        assert line["p99_ms"] is None and line["requests_per_s"] is None
    delay = lines[("queueing delay", "primer")]
    assert delay["jobs"] == 1 and delay["to_first_step_s"] is None and delay["first_job_to_first_step_s"] is None
    assert delay["prepare_s"] is None
    preloaded = lines[("queueing delay, preloaded worker", "primer")]  # its worker loaded the backbone first
    assert preloaded["jobs"] == 1 and preloaded["preload_s"] is None and preloaded["first_job_to_first_step_s"] is None
    assert "| meta/maml | paper-loop+higher (fp32) |" in err  # the table


def test_the_reference_implementations_equal_primer_on_a_gemma_backbone(tiny_dir, capsys):
    # another family: sliding-window layers (the tiny one's window is 4 tokens), a GELU MLP and
    # 1 + weight norms, which run as primer's lean modules on its side and as transformers' on
    # the references'
    assert main(["--smoke", "--backbone", str(tiny_dir["gemma"]), "--parts", "meta,pt,eval", "--one-process"]) == 0
    lines = {(d["figure"], d["impl"]): d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    for algorithm in ("maml", "fomaml", "reptile"):
        assert lines[(f"meta/{algorithm}", "primer")]["grad_relative_diff"] < 1e-3
    assert lines[("pt", "primer")]["loss_relative_diff"] < 1e-4
    assert lines[("eval", "primer")]["accuracy_one_by_one"] == lines[("eval", "primer")]["accuracy"]


def test_the_smoke_run_in_bf16_puts_both_sides_in_bf16_and_checks_them_within_its_rounding(tiny_dir, capsys):
    from bench.figures import TOLERANCE

    assert main(["--smoke", "--backbone", str(tiny_dir["causal"]), "--parts", "meta,pt,eval", "--dtype", "bf16",
                 "--one-process"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["figure"] == "machine" and lines[0]["dtype"] == "bf16"
    grads = [d["grad_relative_diff"] for d in lines if d["figure"].startswith("meta/")]
    assert len(grads) == 6 and all(0 < g < TOLERANCE["bf16"]["grad"] for g in grads)  # rounded, not identical
    assert [d["impl"] for d in lines if d["figure"] == "eval"] == ["primer", "peft+generate"]
    assert {d["dtype"] for d in lines[1:]} == {"bf16"}
    # each side against the paper's loop on a float32 copy of the same weights: rounding, not zero
    for d in (d for d in lines if d["figure"].startswith("meta/") and d["impl"] == "primer"):
        assert 0 < d["grad_error_vs_fp32"] < max(TOLERANCE["bf16"]["grad"], 1.5 * d["reference_error_vs_fp32"])
        assert d["reference_error_vs_fp32"] > 0


def test_in_bf16_a_meta_gradient_further_from_float32_than_the_loops_is_refused(tiny_dir, monkeypatch):
    from bench import figures
    from bench.__main__ import setup

    s = setup(parse(["--smoke", "--backbone", str(tiny_dir["causal"]), "--dtype", "bf16"]))
    right = figures.meta_grad
    monkeypatch.setattr(figures, "meta_grad", lambda *a, **k: (right(*a, **k)[0] * 1.3, []))
    with pytest.raises(AssertionError, match="fomaml: primer's bf16 meta-gradient is .* from float32's"):
        figures.meta(s, "fomaml", lambda line: None)


def test_peft_generate_gets_its_head_input_contiguous_and_the_hook_goes_after(tiny_dir):
    # torch's CPU linear on the strided last positions generate asks the head for copies its
    # weight per row (scripts/bf16_head.py); the bench times PEFT, not that
    from bench import reference
    from bench.__main__ import setup

    s = setup(parse(["--smoke", "--backbone", str(tiny_dir["causal"])]))
    peft = reference.Peft(s.model, s.model.prompt.detach(), s.static_length)
    head, seen = s.model.backbone.model.get_output_embeddings(), []
    watch = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    labels = peft.generate_labels(s.test[:4], s.options, max_new_tokens=2, batch_size=4)
    watch.remove()
    assert len(labels) == 4 and seen and all(seen)
    assert not head._forward_pre_hooks  # removed once generate is done


def test_the_reference_implementations_can_run_in_another_precision(tiny_dir, capsys):
    assert main(["--smoke", "--backbone", str(tiny_dir["causal"]), "--parts", "meta,pt", "--algorithms", "fomaml",
                 "--dtype", "bf16", "--reference-dtype", "fp32", "--one-process"]) == 0
    out, err = capsys.readouterr()
    lines = {(d["figure"], d["impl"]): d for d in map(json.loads, out.splitlines())}
    assert lines[("machine", "-")]["reference_dtype"] == "fp32"
    assert lines[("meta/fomaml", "primer")]["dtype"] == "bf16" and lines[("meta/fomaml", "paper-loop+higher")]["dtype"] == "fp32"
    assert lines[("pt", "primer")]["dtype"] == "bf16" and lines[("pt", "peft")]["dtype"] == "fp32"
    assert 0 < lines[("meta/fomaml", "primer")]["grad_relative_diff"] < 0.1  # bf16 against fp32: rounding only
    assert "| pt | peft (fp32) |" in err and "| pt | primer (bf16) |" in err


def test_batched_episodes_are_checked_against_the_paper_loop_one_episode_at_a_time(tiny_dir, capsys):
    assert main(["--smoke", "--backbone", str(tiny_dir["causal"]), "--parts", "meta", "--batch-episodes",
                 "--one-process"]) == 0
    lines = {(d["figure"], d["impl"]): d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines[("machine", "-")]["batch_episodes"] is True
    for algorithm in ("maml", "fomaml", "reptile"):
        ours = lines[(f"meta/{algorithm}", "primer")]
        assert ours["episodes"] == "2 in one forward" and ours["grad_relative_diff"] < 1e-3


@pytest.mark.parametrize("flag,setting,threaded", [([], None, set()),  # primer's default: 2 in one forward
                                                   (["--parallel-episodes"], True, {"maml", "fomaml", "reptile"}),
                                                   (["--parallel-episodes", "off"], False, set())])
def test_episodes_in_parallel_threads_are_checked_against_the_paper_loop(tiny_dir, capsys, flag, setting, threaded):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one episode per thread, whatever the machine
    try:
        assert main(["--smoke", "--backbone", str(tiny_dir["causal"]), "--parts", "meta", *flag, "--one-process"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = {(d["figure"], d["impl"]): d for d in map(json.loads, capsys.readouterr().out.splitlines())}
    assert lines[("machine", "-")]["parallel_episodes"] is setting
    for algorithm in ("maml", "fomaml", "reptile"):
        ours = lines[(f"meta/{algorithm}", "primer")]
        assert ours["episodes"] == ("2 in parallel threads" if algorithm in threaded else "2 in one forward")
        assert ours["grad_relative_diff"] < 1e-3


def test_an_unknown_part_is_named_with_the_accepted_ones(capsys):
    with pytest.raises(SystemExit):
        parse(["--parts", "meta,speed"])
    assert "unknown part(s) speed; accepted: meta, pt, eval, api" in capsys.readouterr().err


def test_an_unknown_algorithm_is_named_with_the_accepted_ones(capsys):
    with pytest.raises(SystemExit):
        parse(["--algorithms", "maml,anil"])
    assert "unknown algorithm(s) anil; accepted: maml, fomaml, reptile" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "no-such-model"], "unknown backbone 'no-such-model'; expected a registered backbone (gemma3-270m, smollm2-135m)"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'cpu', 'cuda')"),
    (["--prompt-length", "0"], "argument --prompt-length: 0 is too small: expected at least 1"),
    (["--prompt-length", "513"], "argument --prompt-length: 513 is too large: expected at most 512"),
    (["--repeats", "0"], "argument --repeats: 0 is too small: expected at least 1"),
    (["--eval-examples", "-1"], "argument --eval-examples: -1 is too small: expected at least 1"),
    (["--max-input-tokens", "4"], "argument --max-input-tokens: 4 is too small: expected at least 8"),
    (["--inner-lr", "fast"], "argument --inner-lr: 'fast' is not a finite number"),
    (["--api-seconds", "inf"], "argument --api-seconds: 'inf' is not a finite number"),
    (["--api-rate", "0"], "argument --api-rate: 0 is too small: expected above 0"),
    (["--warmup", "1.5"], "argument --warmup: '1.5' is not a whole number"),
])
def test_a_bad_option_is_refused_before_any_figure_runs_naming_what_is_accepted(argv, message, capsys, monkeypatch):
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("a figure's process was started"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--sources", "no_such_task,sms_spam"), ("--target", "no_such_task")])
def test_an_unknown_task_is_refused_naming_the_option_and_the_task(option, value, tiny_dir, capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--backbone", str(tiny_dir["causal"]), "--parts", "meta,pt", option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{option} no_such_task: unknown task 'no_such_task'" in err


def test_cuda_asked_for_where_there_is_none_is_refused(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        parse(["--device", "cuda"])
    assert "--device cuda: torch" in (err := capsys.readouterr().err) and "sees no CUDA device on this machine" in err


def test_a_figure_that_fails_is_named_and_the_others_still_run(tmp_path, capfd):
    # each figure runs in its own process; a backbone that cannot load (a directory whose files
    # are broken: a name that is no backbone at all is refused before any figure runs) fails
    # every one of them, and each failure is reported, in the JSON lines, the table and the exit status
    broken = tmp_path / "no-such-backbone"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    assert main(["--smoke", "--backbone", str(broken), "--parts", "meta,pt", "--algorithms", "fomaml"]) == 1
    out, err = capfd.readouterr()  # the figures' processes write to the same descriptors
    failed = [d["figure"] for d in map(json.loads, out.splitlines()) if d["impl"] == "FAILED"]
    assert failed == ["meta/fomaml", "pt"]
    assert "| pt | FAILED | — | — | exit_status 1 |" in err
    assert err.count("BackboneError: could not load backbone") == 2 and "no-such-backbone" in err  # each one's traceback


def test_the_two_sides_of_a_figure_take_turns_so_that_a_drifting_machine_weighs_on_both():
    import torch

    from bench.measure import measure

    calls = []
    works = [lambda: calls.append("primer") or 6, lambda: calls.append("reference") or 6]
    ours, theirs = measure(works, torch.device("cpu"), warmup=1, repeats=3)
    # the warm-ups, then rounds in turn, the order reversed every other round, then one memory run each
    assert calls == ["primer", "reference", "primer", "reference", "reference", "primer", "primer", "reference",
                     "primer", "reference"]
    assert len(ours.seconds) == len(theirs.seconds) == 3 and ours.items == theirs.items == 6


def test_a_cpu_peak_counts_the_live_tensors_whatever_the_heap_holds_from_before():
    import ctypes

    import torch

    from bench.measure import PeakMemory, fixed_allocator

    def work():
        a, b = torch.ones(2**20), torch.ones(2**21)  # 4 + 8 MiB live
        del a
        c = torch.ones(2**20)  # 12 MiB again
        del b, c
        return torch.ones(2**19)  # 2 MiB, still live at the end

    def peak(resident=False):
        with PeakMemory(torch.device("cpu"), resident) as mem:
            kept = work()
        del kept
        return mem

    fresh = peak()
    assert fresh.of == "tensors" and fresh.peak == 12 * 2**20
    # as the timed runs leave it: blocks under 32 MiB kept in glibc's heap when freed, then their pages
    # released (the bench's resident-set peak reused them and counted them again)
    fixed_allocator()
    churn = [torch.ones(2**22) for _ in range(8)]
    del churn
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    assert peak().peak == fresh.peak
    resident = peak(resident=True)  # the resident set, for work in threads the profiler does not see
    assert resident.of == "resident set" and resident.peak > 0


def test_a_timed_run_gives_each_side_its_own_rates_and_peak(tiny_dir, capsys):
    # not a measurement (the tiny model's timings mean nothing): the timed path's wiring
    assert main(["--backbone", str(tiny_dir["causal"]), "--parts", "pt", "--one-process", "--warmup", "0",
                 "--repeats", "2", "--pt-steps", "2"]) == 0
    out, err = capsys.readouterr()
    lines = {(d["figure"], d["impl"]): d for d in map(json.loads, out.splitlines())}
    for impl in ("primer", "peft"):
        line = lines[("pt", impl)]
        assert line["steps_per_s"] > 0 and line["peak_mb"] > 0 and len(line["seconds"]) == 2
        assert line["peak_of"] == "tensors"
    # progress, as each run ends: a figure's runs take minutes on a real backbone
    progress = [line.split(" in ")[0] for line in err.splitlines() if line.startswith("pt ")]
    assert progress == ["pt primer: repeat 1/2: 2 items", "pt peft: repeat 1/2: 2 items",
                        "pt peft: repeat 2/2: 2 items", "pt primer: repeat 2/2: 2 items",
                        "pt primer: the run for peak memory (tensors)",
                        "pt peft: the run for peak memory (tensors)"]


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_every_api_client_sends_a_request_even_when_its_window_has_passed_before_the_load_starts(monkeypatch, rate):
    """CI's smoke run once got no request at all: the window was set before a garbage collection
    that took longer than it on a loaded machine, and the percentiles of nothing raised."""
    import asyncio
    import gc

    import httpx

    from bench import api

    monkeypatch.setattr(gc, "collect", lambda: __import__("time").sleep(0.2))
    sent = []

    async def request(http, i):
        sent.append(i)
        return httpx.Response(200)

    figure = asyncio.run(api.load("http://127.0.0.1:9", "s", clients=3, seconds=0.1, request=request, rate=rate))
    assert figure["requests"] == len(sent) and {i // 1_000_000 for i in sent} == {0, 1, 2}
    assert figure["errors"] == 0 and figure["p99_ms"] is not None
