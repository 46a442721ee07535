"""A whole experiment on a tiny backbone: upstream methods, the downstream grid, ARG, resume."""
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from core.algorithms.upstream import UpstreamConfig, meta_train
from core.backbones.soft_prompt import SoftPromptModel
from core.cli import app
from core.experiment import DirCheckpoints, run
from core.prompts import init_prompt
from core.spec import parse_spec
from core.tasks.base import Example, Split
from core.tasks.kshot import write_split

runner = CliRunner()
LABELS = {"sent": ("positive", "negative"), "topic": ("movie", "message"), "yesno": ("yes", "no"),
          "color": ("blue", "red"), "greet": ("hello", "friend")}
WORDS = "the a movie film good bad great awful spam free win call now see you lunch sky blue".split()


def tiny_task(directory, name, labels, seeds=(100, 13)):
    """A two-label task in CrossFit layout; inputs are deterministic word strings."""
    examples = [Example(" ".join(WORDS[(i * 7 + j * 3 + len(name)) % len(WORDS)] for j in range(4)),
                        (labels[i % 2],)) for i in range(12)]
    for seed in seeds:
        write_split(Split(train=examples[:4], dev=examples[4:8], test=examples[8:], seed=seed, k=2),
                    name, directory / name)
    return {"name": name, "path": str(directory / name), "type": "classification", "options": list(labels)}


@pytest.fixture
def spec_fields(tmp_path, tiny_dir):
    refs = {name: tiny_task(tmp_path / "tasks", name, labels) for name, labels in LABELS.items()}
    return {
        "name": "tiny-cls2cls", "backbone": str(tiny_dir["causal"]), "prompt": {"length": 3},
        "targets": [refs["color"], refs["greet"]],
        "upstream": {"sources": [refs["sent"], refs["topic"], refs["yesno"]],
                     "methods": ["maml", "fomaml", "reptile", "mtl"], "seeds": [100, 13], "steps": 4,
                     "inner_lr": 0.1, "outer_lr": 0.05, "optimizer": "adamw", "inner_steps": 2,
                     "checkpoint_every": 2},
        "downstream": {"seeds": [100, 13], "lrs": [0.05], "max_steps": 4, "eval_every": 2,
                       "optimizer": "adamw", "batch_size": 2},
    }


def test_cls_to_cls_experiment_reports_gains_and_arg_for_every_method(spec_fields, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_fields))
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    methods = ["maml", "fomaml", "reptile", "mtl"]
    assert results["methods"] == ["pt"] + methods
    for task in ("color", "greet"):
        pt = results["tasks"][task]["pt"]["mean"]
        for m in methods:
            mean = results["tasks"][task][m]["mean"]
            assert results["relative_gain"][m][task] == pytest.approx((mean - pt) / pt)
    for m in methods:
        gains = results["relative_gain"][m].values()
        assert results["arg"][m] == pytest.approx(100 * sum(gains) / 2)
        assert [c["step"] for c in results["upstream"][m]["curve"]] == [1, 2, 3, 4]
    for m in ("maml", "fomaml", "reptile"):  # each against MTL on the same sources, paired
        vs = results["vs_mtl"][m]
        assert vs["difference"] == pytest.approx(results["arg"][m] - results["arg"]["mtl"])
        assert vs["ci95"][0] <= vs["ci95"][1]
    assert "mtl" not in results["vs_mtl"]
    # what computed it: this checkout's commit where there is one (CI's clean clone), else none
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    code = results["code"]
    assert code["version"] == importlib.metadata.version("primer")
    assert code["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(code["modified"], bool) == (code["commit"] is not None)
    report = (out / "results.md").read_text()
    assert "## ARG over plain prompt tuning" in report and "| maml |" in report
    assert "## Against multi-task learning on the same sources" in report
    assert (out / "relative_gain.png").stat().st_size > 0 and (out / "upstream_loss.png").stat().st_size > 0
    for m in methods:  # the learned initializations themselves, as safetensors
        assert (out / "prompts" / f"init.{m}.safetensors").exists()


def test_the_code_version_is_read_as_the_module_loads():
    """A long run records the checkout its code was loaded from: git is asked at import, and
    not again when a result is written (a checkout moved meanwhile would be recorded instead)."""
    probe = ("import subprocess, core.experiment as e\n"
             "def gone(*a, **k): raise OSError('git asked after import')\n"
             "subprocess.run = gone\n"
             "print(e.code_version.cache_info().currsize, e.code_version()['version'] is not None)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, check=True)
    assert out.stdout.split() == ["1", "True"]


def test_every_method_learns_a_different_initialization(spec_fields):
    results = run(parse_spec(spec_fields))
    inits = {m: results.prompts[f"init/{m}"] for m in ("maml", "fomaml", "reptile", "mtl")}
    for a in inits:
        for b in inits:
            if a < b:
                assert not torch.equal(inits[a], inits[b]), f"{a} and {b} learned the same prompt"


class Crash(Exception):
    pass


@pytest.mark.parametrize("method", ["maml", "reptile", "mtl"])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_prompt(tiny_backbone, spec_fields, tmp_path, method):
    from core.tasks import get_split, load_task

    spec = parse_spec(spec_fields)
    sources = {r.name: [get_split(load_task(r), s) for s in (100, 13)] for r in spec.upstream.sources}
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3))
    init = model.prompt.detach().clone()
    cfg = UpstreamConfig(algorithm=method, steps=6, inner_lr=0.1, outer_lr=0.05, inner_steps=2,
                         checkpoint_every=2)  # Adafactor: its factored state must survive too
    uninterrupted = meta_train(model, sources, init, cfg)

    saved = []

    def crash_at_5(event):
        if event["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        meta_train(model, sources, init, cfg, crash_at_5, checkpoint=saved.append)
    assert [s["step"] for s in saved] == [2, 4]
    store = DirCheckpoints(tmp_path)  # through the file format, as a restarted process would read it
    store.save("s", saved[-1])
    resumed = meta_train(model, sources, init, cfg, resume=store.load("s"))
    assert torch.equal(resumed.prompt, uninterrupted.prompt)
    assert resumed.curve == uninterrupted.curve


def test_meta_training_that_diverges_stops_at_once_and_names_the_learning_rates(tiny_backbone, spec_fields,
                                                                               monkeypatch):
    import core.algorithms.upstream as upstream
    from core.errors import UserError
    from core.tasks import get_split, load_task

    spec = parse_spec(spec_fields)
    sources = {r.name: [get_split(load_task(r), s) for s in (100, 13)] for r in spec.upstream.sources}
    model = SoftPromptModel(tiny_backbone, init_prompt(tiny_backbone, 3))
    steps, meta_grad = [], upstream.meta_grad

    def diverging(*a):  # the second outer step's episodes blow up, as too large an lr makes them
        grad, losses = meta_grad(*a)
        steps.append(1)
        return (grad * float("nan"), [float("nan")] * len(losses)) if len(steps) == 2 else (grad, losses)

    monkeypatch.setattr(upstream, "meta_grad", diverging)
    cfg = UpstreamConfig(algorithm="maml", steps=6, inner_lr=0.1, outer_lr=0.05, inner_steps=1, checkpoint_every=1)
    saved = []
    with pytest.raises(UserError, match=r"upstream maml diverged at outer step 2: the episodes' mean loss is nan and the "
                                        r"meta-gradient is not finite; lower its outer_lr \(0.05\) or inner_lr \(0.1\)"):
        meta_train(model, sources, model.prompt.detach().clone(), cfg, checkpoint=saved.append)
    assert len(steps) == 2 and [s["step"] for s in saved] == [1]  # nothing NaN was checkpointed


def diverging_at(monkeypatch, methods: set[str], step: int = 2) -> list[str]:
    """Make the named methods' meta-training blow up at outer `step`; the algorithms it ran, once per step."""
    import core.algorithms.upstream as upstream

    ran, meta_grad = [], upstream.meta_grad

    def patched(model, prompt, drawn, cfg):
        grad, losses = meta_grad(model, prompt, drawn, cfg)
        ran.append(cfg.algorithm)
        if cfg.algorithm in methods and ran.count(cfg.algorithm) == step:
            return grad * float("nan"), [float("nan")] * len(losses)
        return grad, losses

    monkeypatch.setattr(upstream, "meta_grad", patched)
    return ran


def test_a_method_whose_meta_training_diverges_is_left_out_and_the_others_run_in_full(spec_fields, tmp_path,
                                                                                      monkeypatch):
    """Hours of the other methods' meta-training are not thrown away for one method's learning rate."""
    spec_fields["upstream"]["methods"] = ["maml", "fomaml"]
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    ran = diverging_at(monkeypatch, {"maml"})
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    why = ("upstream maml diverged at outer step 2: the episodes' mean loss is nan and the meta-gradient is not "
           "finite; lower its outer_lr (0.05) or inner_lr (0.1)")
    assert f"{why}" in result.output and "maml is left out, the other methods go on" in result.output
    assert ran == ["maml", "maml"] + ["fomaml"] * 4  # stopped at once; fomaml's 4 steps all ran

    results = json.loads((out / "results.json").read_text())
    assert results["methods"] == ["pt", "fomaml"] and list(results["diverged"]) == ["maml"]
    assert results["diverged"]["maml"].startswith(why)
    assert set(results["arg"]) == {"fomaml"} and set(results["upstream"]) == {"fomaml"}
    assert all(set(per) == {"pt", "fomaml"} for per in results["tasks"].values())
    md = (out / "results.md").read_text()
    assert "| maml | diverged | — | — | — |" in md and f"Left out: {why}" in md
    assert "| fomaml | " in md and "| color | maml |" not in md
    assert (out / "prompts" / "init.fomaml.safetensors").exists()
    assert not [p.name for p in (out / "prompts").iterdir() if "maml" in p.name.split(".")]

    ran.clear()  # run again on the same output: resumed, maml is not trained again only to diverge again
    again = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert again.exit_code == 0, again.output
    assert ran == [] and json.loads((out / "results.json").read_text())["diverged"] == results["diverged"]


def test_a_job_whose_every_method_diverges_fails_naming_each(spec_fields, tmp_path, monkeypatch):
    spec_fields["upstream"]["methods"] = ["maml", "reptile"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_fields))
    diverging_at(monkeypatch, {"maml", "reptile"}, step=1)
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "every upstream method diverged, so there is nothing to compare with prompt tuning" in result.output
    assert "upstream maml diverged at outer step 1" in result.output
    assert "upstream reptile diverged at outer step 1" in result.output


def test_the_cli_resumes_a_killed_run_from_its_checkpoints(spec_fields, tmp_path):
    """The whole job: killed in the middle of MAML, restarted with the same spec and output."""
    import core.experiment as experiment

    spec_fields["upstream"]["methods"] = ["maml"]
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    clean = run(parse_spec(spec_fields))

    original = experiment.meta_train

    def killed(*args, **kwargs):
        def die(event):
            if event["step"] == 3:
                raise KeyboardInterrupt  # what a Ctrl-C or a dying worker looks like
        return original(*args[:4], die, *args[5:], **kwargs)

    experiment.meta_train = killed
    try:
        runner.invoke(app, ["run", str(path), "--out", str(out)])
    finally:
        experiment.meta_train = original
    assert (out / "checkpoints" / "upstream__maml.pt").exists()
    assert not (out / "results.json").exists()

    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    resumed = load_file(str(out / "prompts" / "init.maml.safetensors"))["prompt"]
    assert torch.equal(resumed, clean.prompts["init/maml"])


@pytest.mark.parametrize("change, message", [
    (lambda s: s["upstream"].update(methods=["maml", "protonet"]), "upstream.methods: unknown method 'protonet'; accepted: maml, fomaml, reptile, mtl"),
    (lambda s: s["upstream"].update(sources=[]), "upstream.sources: the source set is empty"),
    (lambda s: s["upstream"]["sources"].append(s["targets"][0]), "target tasks must be unseen upstream, but color is also a source task"),
    (lambda s: s["upstream"].update(inner_steps=0), "upstream.inner_steps: Input should be greater than or equal to 1"),
])
def test_bad_specs_fail_before_any_training(spec_fields, tmp_path, change, message):
    change(spec_fields)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def changed(fields: dict, path: str, value) -> dict:
    """A deep copy of the spec fields with the dotted `path` set to `value`."""
    import copy

    out = copy.deepcopy(fields)
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return out


KEYS = ["upstream/maml", "upstream/fomaml", "downstream/pt/color", "downstream/maml/color",
        "downstream/fomaml/color", "downstream/ft/color", "similarity/sent"]


@pytest.mark.parametrize("path, value, stale", [
    ("name", "renamed", []),
    ("upstream.parallel_episodes", True, []),  # how episodes run, not what they compute
    ("upstream.batch_episodes", True, []),
    ("upstream.checkpoint_every", 1, []),
    ("upstream.per_method", {"maml": {"inner_lr": 0.2}}, ["upstream/maml", "downstream/maml/color"]),
    ("upstream.methods", ["maml", "fomaml", "reptile"], []),  # one more method: nothing done is undone
    ("upstream.steps", 5, ["upstream/maml", "upstream/fomaml", "downstream/maml/color", "downstream/fomaml/color"]),
    ("upstream.clustering.k", 3, []),  # MetaPT's, not MAML's or FoMAML's
    ("targets", "+", []),  # one more target task: the others' runs and the starts hold
    ("downstream.lrs", [0.1], ["downstream/pt/color", "downstream/maml/color", "downstream/fomaml/color"]),
    ("downstream.ft_lrs", [1e-3], ["downstream/ft/color"]),
    ("max_input_tokens", 64, KEYS[:-1]),
    ("truncation", "left", KEYS[:-1]),
    ("prompt.length", 4, KEYS[:-1]),
])
def test_a_checkpoint_goes_stale_exactly_when_what_it_depends_on_changes(spec_fields, tmp_path, path, value, stale):
    from core.experiment import inputs

    spec_fields["upstream"]["methods"] = ["maml", "fomaml"]
    spec_fields["downstream"].update(finetune=True, ft_lrs=[1e-4])
    if path == "targets":
        value = spec_fields["targets"] + [tiny_task(tmp_path / "tasks", "extra", ("up", "down"))]
    before, after = parse_spec(spec_fields), parse_spec(changed(spec_fields, path, value))
    # similarity prompts depend on the whole spec: any change but the name and how episodes run
    whole = path not in ("name", "upstream.parallel_episodes", "upstream.batch_episodes", "upstream.checkpoint_every")
    assert [k for k in KEYS if inputs(before, k) != inputs(after, k)] == stale + (["similarity/sent"] if whole else [])


def test_where_a_start_depends_on_the_targets_every_target_change_makes_it_stale(spec_fields, tmp_path):
    """Source selection tunes prompts on the targets, and MetaPT's pseudo-labelling reads
    downstream settings: there the start, and each method's runs, depend on the whole spec."""
    from core.experiment import inputs

    more = [tiny_task(tmp_path / "tasks", "extra", ("up", "down"))]
    selected = changed(spec_fields, "upstream.sources", {"select": "top_k_similar", "k": 2,
                                                          "candidates": spec_fields["upstream"]["sources"]})
    for fields, method in ((selected, "maml"), (changed(spec_fields, "upstream.methods", ["metapt"]), "metapt")):
        before = parse_spec(fields)
        after = parse_spec(changed(fields, "targets", fields["targets"] + more))
        assert inputs(before, f"upstream/{method}") != inputs(after, f"upstream/{method}")
        assert inputs(before, f"downstream/{method}/color") != inputs(after, f"downstream/{method}/color")
        assert inputs(before, "downstream/pt/color") == inputs(after, "downstream/pt/color")


def test_a_rerun_with_a_changed_spec_redoes_only_what_the_change_touches(spec_fields, tmp_path, monkeypatch):
    """After one method's learning rate is changed (it diverged, say), a rerun on the same output
    meta-trains and prompt-tunes that method alone, and ends where a clean run of the new spec does."""
    import core.experiment as experiment

    spec_fields["upstream"]["methods"] = ["maml", "fomaml"]
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    assert runner.invoke(app, ["run", str(path), "--out", str(out)]).exit_code == 0

    new = changed(spec_fields, "upstream.per_method", {"fomaml": {"outer_lr": 0.1}})
    clean = run(parse_spec(new))
    trained, tuned = [], []
    meta_train, prompt_tune = experiment.meta_train, experiment.prompt_tune
    monkeypatch.setattr(experiment, "meta_train", lambda m, s, i, cfg, *a, **k: trained.append(cfg.algorithm)
                        or meta_train(m, s, i, cfg, *a, **k))
    monkeypatch.setattr(experiment, "prompt_tune", lambda m, task, *a, **k: tuned.append(task.info.name)
                        or prompt_tune(m, task, *a, **k))
    path.write_text(yaml.safe_dump(new))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert trained == ["fomaml"] and tuned == ["color", "greet"]  # fomaml's start, then its runs on each target
    said = re.findall(r"((?:up|down)stream/[\w/]+): its checkpoint was made from other inputs",
                      result.output)  # a line may begin with tqdm's cursor-up escape, "\x1b[A"
    assert said == ["upstream/fomaml", "downstream/fomaml/color", "downstream/fomaml/greet"]
    scores = lambda tasks: {t: {m: [(r["seed"], r["lr"], r["best_dev"], r["best_step"], r["test"], r["curve"])  # noqa: E731
                                     for r in res["runs"]] for m, res in per.items()} for t, per in tasks.items()}
    rerun = json.loads((out / "results.json").read_text())
    assert scores(rerun["tasks"]) == scores(json.loads(json.dumps(clean.to_dict()["tasks"])))  # all but the seconds
    assert rerun["arg"] == pytest.approx(clean.arg())


def test_fresh_discards_every_checkpoint_and_unstamped_ones_count_only_for_their_own_spec(spec_fields, tmp_path):
    """Checkpoints written before they carried their inputs' digest: spec.json says whose they
    are, so the same spec (or one that runs episodes another way) resumes from them, another does not."""
    from core.cli import checkpoints_for
    from core.experiment import Stamped

    spec = parse_spec(spec_fields)
    checkpoints_for(tmp_path, spec, fresh=False).save("upstream/maml", {"step": 1})
    for how in ({"parallel_episodes": False}, {"parallel_episodes": True}, {"batch_episodes": True}):
        same = parse_spec(changed(spec_fields, "upstream", {**spec_fields["upstream"], **how}))
        assert Stamped(checkpoints_for(tmp_path, same, fresh=False), same).load("upstream/maml") == {"step": 1}
    other = parse_spec(changed(spec_fields, "upstream.steps", 5))
    assert Stamped(checkpoints_for(tmp_path, other, fresh=False), other).load("upstream/maml") is None
    assert checkpoints_for(tmp_path, spec, fresh=True).load("upstream/maml") is None  # all gone


def test_a_kept_backbone_is_left_as_it_was_found_by_every_method(spec_fields):
    """A worker hands the backbone it loaded for one job to the next (backbones.load_kept):
    no method, fine-tuning included, may change it in memory."""
    from core import backbones
    from tests.test_soft_prompt import fingerprint

    spec_fields["upstream"]["methods"] = ["maml", "reptile", "mtl"]
    spec_fields["downstream"].update(finetune=True, ft_lrs=[1e-3])
    spec = parse_spec(spec_fields)
    kept = backbones.load_kept(spec.backbone)
    before = fingerprint(kept.model)
    run(spec, load=backbones.load_kept)
    assert backbones.load_kept(spec.backbone) is kept
    assert fingerprint(kept.model) == before
    assert not kept.model.training and not any(p.requires_grad for p in kept.model.parameters())


def test_the_finetuning_baseline_trains_its_own_copy_and_is_reported(spec_fields, tmp_path):
    from tests.test_soft_prompt import fingerprint

    spec_fields["upstream"]["methods"] = ["fomaml"]
    spec_fields["downstream"].update(finetune=True, ft_lrs=[1e-3])
    spec = parse_spec(spec_fields)
    from core import backbones

    before = fingerprint(backbones.load(spec.backbone).model)
    results = run(spec)
    assert spec.methods == ["pt", "fomaml", "ft"]
    for task in ("color", "greet"):
        ft = results.tasks[task]["ft"]
        assert [r.lr for r in ft.runs] == [1e-3, 1e-3] and all(r.prompt is None for r in ft.runs)
        losses = [c["loss"] for c in ft.best[0].curve if "loss" in c]
        assert losses[-1] < losses[0]  # the weights really trained
    assert set(results.arg()) == {"fomaml", "ft"}
    assert fingerprint(backbones.load(spec.backbone).model) == before  # the saved backbone untouched


@pytest.mark.parametrize("truncation", ["middle", "left"])
def test_the_specs_token_limits_and_truncation_reach_the_model(spec_fields, truncation):
    from core.experiment import prepare

    spec = parse_spec({**spec_fields, "max_input_tokens": 9, "max_answer_tokens": 3, "truncation": truncation})
    model = prepare(spec, lambda e: None).model
    assert (model.max_input_tokens, model.max_answer_tokens, model.truncation) == (9, 3, truncation)


def test_a_bf16_backbone_trains_float32_prompts_and_a_float32_finetuning_copy(spec_fields):
    import torch

    from core.experiment import prepare

    spec_fields["upstream"]["methods"] = ["maml", "reptile"]
    spec_fields["downstream"].update(finetune=True, ft_lrs=[1e-3])
    grads, runs = {}, {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        spec = parse_spec({**spec_fields, "precision": precision})
        prep = prepare(spec, lambda e: None)
        assert prep.backbone.model.get_input_embeddings().weight.dtype == dtype
        assert prep.model.prompt.dtype == torch.float32
        batch = next(iter(prep.splits.values()))[0].train[:4]
        prep.model.loss(batch).backward()
        grads[precision] = prep.model.prompt.grad
        runs[precision] = run(spec)
    # the same gradient, rounded to bf16's 8-bit mantissa along the way (about 9 % off in norm on
    # this random tiny model, but pointing the same way)
    assert torch.cosine_similarity(grads["bf16"].flatten(), grads["fp32"].flatten(), dim=0) > 0.99
    half = runs["bf16"]
    for method in ("maml", "reptile"):
        assert half.prompts[f"init/{method}"].dtype == torch.float32
    for task in ("color", "greet"):
        losses = [c["loss"] for c in half.tasks[task]["ft"].best[0].curve if "loss" in c]
        assert losses[-1] < losses[0]  # fine-tuning's float32 copy of the bf16 weights trains
        assert all(0 <= r.test <= 1 for result in half.tasks[task].values() for r in result.runs)


def test_per_method_options_override_the_shared_upstream_settings(spec_fields):
    from core.experiment import upstream_config

    spec_fields["upstream"].update(inner_steps=None, per_method={"reptile": {"inner_steps": 3, "outer_lr": 0.2}})
    spec = parse_spec(spec_fields)
    reptile, maml = upstream_config(spec, "reptile").resolved(), upstream_config(spec, "maml").resolved()
    assert (reptile.inner_steps, reptile.outer_lr) == (3, 0.2)
    assert (maml.inner_steps, maml.outer_lr) == (1, 0.05)  # MAML keeps its paper default and the shared lr
    spec_fields["upstream"]["per_method"] = {"protonet": {"inner_steps": 2}}
    from core.spec import SpecError

    with pytest.raises(SpecError, match="per_method names protonet, which is not among methods"):
        parse_spec(spec_fields)


def test_the_episode_seed_draws_other_episodes_and_changes_nothing_else(spec_fields):
    """upstream.episode_seed: unset it is prompt.seed; another value gives another upstream run
    (other episodes, other mixed batches) from the same start, and leaves PT alone."""
    spec_fields["upstream"].update(methods=["maml", "mtl"], steps=3)
    default = run(parse_spec(spec_fields))
    spec_fields["upstream"]["episode_seed"] = 0  # prompt.seed's default
    same = run(parse_spec(spec_fields))
    spec_fields["upstream"]["episode_seed"] = 7
    other = run(parse_spec(spec_fields))
    for m in ("maml", "mtl"):
        assert torch.equal(default.prompts[f"init/{m}"], same.prompts[f"init/{m}"])
        assert not torch.allclose(default.prompts[f"init/{m}"], other.prompts[f"init/{m}"])
    assert default.upstream["maml"].curve != other.upstream["maml"].curve
    for task in ("color", "greet"):
        assert [r.test for r in default.tasks[task]["pt"].runs] == [r.test for r in other.tasks[task]["pt"].runs]


def test_batched_episodes_learn_the_prompt_that_one_at_a_time_does(spec_fields):
    spec_fields["upstream"].update(methods=["maml", "fomaml", "reptile"], steps=3)
    spec_fields["downstream"]["max_steps"] = 2
    alone = run(parse_spec(spec_fields))
    spec_fields["upstream"]["batch_episodes"] = True
    batched = run(parse_spec(spec_fields))
    from core.experiment import upstream_config

    assert upstream_config(parse_spec(spec_fields), "maml").batch_episodes
    for m in ("maml", "fomaml", "reptile"):
        first, again = alone.upstream[m].curve[0]["loss"], batched.upstream[m].curve[0]["loss"]
        assert again == pytest.approx(first, rel=1e-5)  # the same episodes, the same losses
        a, b = alone.prompts[f"init/{m}"], batched.prompts[f"init/{m}"]
        # float rounding, which AdamW's first steps (about lr x sign(gradient)) enlarge where a
        # gradient is near zero
        assert (a - b).norm() <= 1e-2 * a.norm(), m
    assert not torch.equal(alone.prompts["init/maml"], alone.prompts["init/reptile"])  # they did train


def test_sources_can_be_selected_by_prompt_similarity(spec_fields, tmp_path):
    candidates = spec_fields["upstream"]["sources"]
    spec_fields["upstream"].update(methods=["fomaml"], sources={
        "select": "top_k_similar", "k": 2, "candidates": candidates, "prompt_length": 2, "steps": 6})
    results = run(parse_spec(spec_fields))
    selection = results.selection
    assert set(selection.scores) == {"sent", "topic", "yesno"} and len(selection.chosen) == 2
    assert all(0.0 <= v <= 1.0 for v in selection.scores.values()), selection.scores
    assert min(selection.scores[c] for c in selection.chosen) >= max(
        v for n, v in selection.scores.items() if n not in selection.chosen)
    assert results.to_dict()["source_selection"]["chosen"] == selection.chosen
    from core.report import markdown

    assert "## Source tasks chosen by prompt-subspace similarity" in markdown(results)


def test_a_sweep_over_the_source_set_gives_one_arg_table_and_plot(spec_fields, tmp_path):
    sources = spec_fields["upstream"]["sources"]
    spec_fields["upstream"].update(methods=["fomaml", "mtl"], steps=2)
    spec_fields["sweep"] = {"field": "upstream.sources", "values": [sources[:1], sources]}
    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output

    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["field"] == "upstream.sources" and len(sweep["runs"]) == 2
    for i, run_dict in enumerate(sweep["runs"]):
        assert [s["name"] for s in run_dict["spec"]["upstream"]["sources"]] == [s["name"] for s in sweep["values"][i]]
        for m in ("fomaml", "mtl"):
            assert sweep["arg"][m][i] == pytest.approx(run_dict["arg"][m])
    table = (out / "sweep.md").read_text()
    assert "| upstream.sources | fomaml | mtl |" in table and "| 1 (" in table and "| 3 (" in table
    assert (out / "sweep.png").stat().st_size > 0 and (out / "variant1" / "results.md").exists()
    # PT never sees the sources: it ran once and the second variant took its results as they were.
    saved = sorted(p.name for p in (out / "checkpoints").glob("*downstream__pt__*"))
    assert saved == ["downstream__pt__color.pt", "downstream__pt__greet.pt"]
    assert sweep["runs"][0]["tasks"]["color"]["pt"] == sweep["runs"][1]["tasks"]["color"]["pt"]
    assert any((out / "checkpoints").glob("sweep1__downstream__fomaml__*"))


def test_a_sweep_shows_where_methods_diverged(spec_fields, tmp_path, monkeypatch):
    """Sweeping a learning rate is how one finds where meta-training diverges: that value's cell
    says so, and the other values and methods still get their ARG."""
    spec_fields["upstream"].update(methods=["fomaml", "mtl"], steps=2)
    spec_fields["sweep"] = {"field": "upstream.outer_lr", "values": [0.5, 0.05]}
    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    diverging_at(monkeypatch, {"fomaml", "mtl"})  # at each one's second step overall: the first variant's last
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output  # a job would fail with no method left; a sweep goes on
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["arg"]["fomaml"][0] is None and isinstance(sweep["arg"]["fomaml"][1], float)
    assert sweep["arg"]["mtl"][0] is None and isinstance(sweep["arg"]["mtl"][1], float)
    assert "| 0.5 | diverged | diverged |" in (out / "sweep.md").read_text()
    assert list(sweep["runs"][0]["diverged"]) == ["fomaml", "mtl"] and sweep["runs"][1]["diverged"] == {}
    assert "| fomaml | diverged |" in (out / "variant0" / "results.md").read_text()


def pool_task(directory, name, labels, n=40):
    """A task given as one JSONL file: a pool k-shot splits of any size are drawn from."""
    path = directory / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": f"{WORDS[i % len(WORDS)]} {WORDS[(i * 5) % len(WORDS)]} {i}",
                                        "label": labels[i % 2]}) + "\n" for i in range(n)))
    return {"name": name, "path": str(path), "type": "classification", "options": list(labels),
            "input_column": "text", "output_column": "label"}


def test_a_sweep_over_target_shots_draws_splits_of_each_size(spec_fields, tmp_path):
    from core.experiment import target_splits
    from core.tasks import load_task

    spec_fields["targets"] = [pool_task(tmp_path, "color", LABELS["color"], n=100)]
    spec_fields["upstream"].update(sources=[pool_task(tmp_path, "sent", LABELS["sent"])], methods=["fomaml"],
                                   steps=2, shots=3)
    spec_fields["sweep"] = {"field": "downstream.shots", "values": [2, 4, "all"]}
    path, out = tmp_path / "sweep.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert [r["spec"]["downstream"]["shots"] for r in sweep["runs"]] == [2, 4, "all"]
    assert "| downstream.shots | fomaml |" in (out / "sweep.md").read_text()

    spec = parse_spec({k: v for k, v in spec_fields.items() if k != "sweep"})
    task = load_task(spec.targets[0])
    sizes = []
    for shots in (2, 4, "all"):
        split = target_splits(task, spec.model_copy(update={"downstream": spec.downstream.model_copy(
            update={"shots": shots})}))[0]
        sizes.append((len(split.train), len(split.dev)))
    # 100 examples, 80 after the 20% hold-out; "all" keeps the default 16-per-label dev set
    assert sizes == [(4, 4), (8, 8), (48, 32)]


def test_shots_other_than_the_ready_made_files_fail_before_training(spec_fields, tmp_path):
    spec_fields["downstream"]["shots"] = 8  # the tiny tasks come as 2-shot files only
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "task 'color' comes as ready-made 2-shot files, so shots=8 cannot be drawn" in result.output
    assert not out.exists()


def test_metapt_pool_size_caps_the_pooled_source_data(spec_fields):
    spec_fields["upstream"].update(methods=["metapt"], steps=2,
                                   clustering={"method": "random", "k": 2, "pool_size": 10})
    results = run(parse_spec(spec_fields))
    assert len(results.clusters.examples) == 10 and sum(c["size"] for c in results.clusters.summary) == 10


def test_a_bad_sweep_value_fails_before_training(spec_fields, tmp_path):
    spec_fields["sweep"] = {"field": "prompt.length", "values": [2, 0]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "sweep value 0 for prompt.length" in result.output
    assert not (tmp_path / "out").exists()
    spec_fields["sweep"] = {"field": "upstream.stepz", "values": [1, 2]}
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "'upstream.stepz' is not a field of the spec" in result.output


def test_metapt_meta_trains_on_clusters_of_the_pooled_sources_next_to_ppt(spec_fields, tmp_path):
    spec_fields["upstream"].update(methods=["metapt", "mtl"],  # mtl on the same pool is MetaPT's PPT
                                   clustering={"method": "random", "k": 3})
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    clusters = results["clusters"]
    # 3 source tasks x 2 seeds, train+dev of 4 each; the same examples in both seeds count once
    assert [c["cluster"] for c in clusters] == ["cluster-0", "cluster-1", "cluster-2"]
    assert sum(c["size"] for c in clusters) == 3 * 8
    assert set(results["arg"]) == {"metapt", "mtl"}
    assert "## MetaPT meta-tasks" in (out / "results.md").read_text()
    assert (out / "clusters.png").stat().st_size > 0


def test_kmeans_k_larger_than_the_data_fails_before_any_training(spec_fields, tmp_path):
    spec_fields["upstream"].update(methods=["metapt"], clustering={"method": "kmeans", "k": 25})
    path, out = tmp_path / "spec.yaml", tmp_path / "out"
    path.write_text(yaml.safe_dump(spec_fields))
    result = runner.invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 2
    assert "kmeans k=25 is larger than the data: only 24 examples" in result.output
    assert not out.exists()


def test_metapt_can_pseudo_label_the_pool_with_a_prompt_before_clustering(spec_fields, tmp_path, tiny_dir):
    from core import backbones
    from core.prompts import save_prompt

    backbone = backbones.load(spec_fields["backbone"])
    classifier = init_prompt(backbone, 2, "random", seed=9)
    path = save_prompt(classifier, tmp_path / "classifier.safetensors")
    spec_fields["upstream"].update(methods=["metapt"], clustering={
        "method": "label", "pseudo_label": {"prompt": str(path), "options": ["yes", "no"]}})
    results = run(parse_spec(spec_fields))

    pooled = results.clusters.examples
    expected = SoftPromptModel(backbone, classifier).rank(pooled, [("yes", "no")] * len(pooled))
    assert [e.output for e in pooled] == expected  # the classifier's labels replaced the gold ones
    by_cluster = [set(c["labels"]) for c in results.clusters.summary]
    assert all(len(labels) == 1 for labels in by_cluster) and set().union(*by_cluster) <= {"yes", "no"}


def test_metapt_and_ppt_train_on_the_pool_labelled_by_an_embedding_classifier(spec_fields, tmp_path):
    from tests.test_metapt import COOKING, FOOTBALL

    rows = [{"text": t, "label": lab} for texts, lab in ((FOOTBALL, "sport"), (COOKING, "food"))
            for t in texts for _ in range(4)]  # numbered below, so no two inputs are the same
    rows = [dict(r, text=f"{r['text']} ({i})") for i, r in enumerate(rows)]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec_fields["upstream"].update(methods=["metapt", "ppt"], clustering={
        "method": "label", "pseudo_label": {
            "train": {"name": "topics", "path": str(path), "type": "classification", "options": ["sport", "food"],
                      "input_column": "text", "output_column": "label"},
            "min_confidence": 0.5, "balance": True, "template": "Sport or food? {text}"}})
    results = run(parse_spec(spec_fields))

    pseudo, pooled = results.clusters.pseudo, results.clusters.examples
    assert pseudo["train_task"] == "topics" and pseudo["heldout_accuracy"] >= 0.75
    assert pseudo["pooled"] >= pseudo["confident"] >= pseudo["kept"] == len(pooled) > 0
    assert pseudo["labels"]["sport"] == pseudo["labels"]["food"] == len(pooled) // 2
    assert all(e.input.startswith("Sport or food? ") and e.output in ("sport", "food") for e in pooled)
    # Label clustering of the pseudo-labels: one meta-task per label, both methods trained on it.
    assert sorted(map(str, (c["labels"] for c in results.clusters.summary))) == [
        str({"food": len(pooled) // 2}), str({"sport": len(pooled) // 2})]
    assert set(results.upstream) == {"metapt", "ppt"}
    assert not torch.equal(results.prompts["init/metapt"], results.prompts["init/ppt"])
    assert results.to_dict()["pseudo_labels"] == pseudo
