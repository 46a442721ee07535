"""`primer` end to end on a tiny backbone and a CrossFit task directory, and its user errors."""
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from core.cli import app
from core.tasks.base import Example, Split
from core.tasks.kshot import write_split

runner = CliRunner()


@pytest.fixture
def crossfit_dir(tmp_path):
    """A two-label CrossFit task directory, split seeds 100 and 13."""
    pos = [Example(f"the movie was {w}", ("positive",)) for w in ("good", "great", "good !", "great .")]
    neg = [Example(f"the film was {w}", ("negative",)) for w in ("bad", "awful", "bad !", "awful .")]
    for seed in (100, 13):
        write_split(Split(train=pos[:2] + neg[:2], dev=pos[2:] + neg[2:], test=pos + neg, seed=seed, k=2),
                    "tiny_sentiment", tmp_path / "tiny_sentiment")
    return tmp_path / "tiny_sentiment"


def write_spec(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return path


def test_run_writes_results_table_and_prompts(tiny_dir, crossfit_dir, tmp_path):
    spec = write_spec(
        tmp_path / "spec.yaml", name="tiny", backbone=str(tiny_dir["causal"]),
        prompt={"length": 4},
        targets=[{"name": "tiny_sentiment", "path": str(crossfit_dir), "type": "classification",
                  "options": ["positive", "negative"]}],
        downstream={"seeds": [100, 13], "lrs": [0.1, 0.05], "max_steps": 6, "eval_every": 3,
                    "optimizer": "adamw", "batch_size": 2})
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(spec), "--out", str(out)])
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    pt = results["tasks"]["tiny_sentiment"]["pt"]
    assert pt["metric"] == "ACC"  # the default metric of a classification task the catalog lacks
    assert [b["seed"] for b in pt["best"]] == [100, 13]
    assert len(pt["runs"]) == 4  # 2 seeds x 2 learning rates, each trained
    for b in pt["best"]:  # the chosen lr of a seed has the best dev score of that seed
        same_seed = [r for r in pt["runs"] if r["seed"] == b["seed"]]
        assert b["best_dev"] == max(r["best_dev"] for r in same_seed) and 0 <= b["test"] <= 1
    assert "| tiny_sentiment | pt | ACC |" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "prompts").iterdir()) == [
        "tiny_sentiment.pt.seed100.safetensors", "tiny_sentiment.pt.seed13.safetensors"]


@pytest.mark.parametrize("fields, message", [
    ({"targets": ["sms_spamm"]}, "unknown task 'sms_spamm'; did you mean 'sms_spam'"),
    ({"targets": ["sms_spam"], "backbone": "gpt5"}, "unknown backbone 'gpt5'"),
    ({"targets": ["sms_spam"], "prompt": {"length": 0}}, "prompt.length: Input should be greater than or equal to 1"),
    ({"targets": ["sms_spam"], "prompt": {"length": 513}}, "prompt.length: Input should be less than or equal to 512"),
    ({"targets": ["sms_spam"], "prompt": {"init": "zeros"}}, "prompt.init: unknown prompt init 'zeros'"),
    ({"targets": []}, "targets: List should have at least 1 item"),
    ({"targets": ["sms_spam"], "downstream": {"optimiser": "adamw"}}, "downstream.optimiser: Extra inputs are not permitted"),
    ({"targets": ["glue-cola"]}, "task 'glue-cola' is in the catalog but its data was not found"),
    *[({"targets": ["sms_spam"], "upstream": {"sources": ["trec_coarse"], "methods": ["metapt"],
                                              "clustering": {"pseudo_label": pl}}}, message) for pl, message in [
        ({}, "name exactly one classifier: train (a labelled task"),
        ({"train": "vader_tweets", "prompt": "p.safetensors"}, "name exactly one classifier"),
        ({"prompt": "p.safetensors"}, "a prompt classifier needs the options it ranks"),
        ({"prompt": "p.safetensors", "options": ["a", "b"], "min_confidence": 0.8},
         "min_confidence needs the train classifier's probabilities"),
        ({"train": "vader_tweets", "options": ["a", "b"]}, "options come from the train task's labels"),
        ({"train": "vader_tweets", "template": "no slot"}, "the template must hold {text} exactly once"),
        ({"train": "vader_tweets", "min_confidence": 1.0}, "min_confidence: Input should be less than 1"),
    ]],
])
def test_bad_specs_fail_with_one_clear_message(tmp_path, fields, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(write_spec(tmp_path / "bad.yaml", **fields)), "--out", str(out)])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()  # a rejected spec writes nothing


def test_a_malformed_task_file_names_file_and_line(tmp_path, tiny_dir, crossfit_dir):
    bad = crossfit_dir / "tiny_sentiment_2_13_train.tsv"
    bad.write_text("the movie was good\tpositive\nno tab on this line\n")
    spec = write_spec(tmp_path / "s.yaml", backbone=str(tiny_dir["causal"]),
                      targets=[{"name": "tiny_sentiment", "path": str(crossfit_dir), "type": "classification"}])
    result = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "tiny_sentiment_2_13_train.tsv" in result.output and "line 2" in result.output


def test_a_task_file_that_is_not_utf8_is_named_as_such(tmp_path, tiny_dir, crossfit_dir):
    (crossfit_dir / "tiny_sentiment_2_13_train.tsv").write_bytes(b"the movie was caf\xe9\tpositive\n")
    spec = write_spec(tmp_path / "s.yaml", backbone=str(tiny_dir["causal"]),
                      targets=[{"name": "tiny_sentiment", "path": str(crossfit_dir), "type": "classification"}])
    result = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "tiny_sentiment_2_13_train.tsv is not utf-8 text: byte 0xe9 does not decode" in result.output


def test_primers_own_errors_keep_their_traceback_and_are_not_called_the_users(tmp_path, tiny_dir, crossfit_dir,
                                                                             monkeypatch):
    """A ValueError from primer's own code is a bug, not a bad spec: it is not shown as a user error
    (exit 2, one line), where its traceback would be lost; a UserError still is."""
    from core import experiment
    from core.errors import UserError

    spec = write_spec(tmp_path / "s.yaml", backbone=str(tiny_dir["causal"]),
                      targets=[{"name": "tiny_sentiment", "path": str(crossfit_dir), "type": "classification"}])
    for raised, code in [(ValueError("operands could not be broadcast together"), 1),
                         (UserError("prompt file p.safetensors does not exist"), 2)]:
        def run(*args, error=raised):
            raise error
        monkeypatch.setattr(experiment, "run", run)
        result = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "out"), "--fresh"])
        assert result.exit_code == code, result.output
        if code == 2:
            assert result.output.strip().endswith("error: prompt file p.safetensors does not exist")
        else:
            assert result.exception is raised and "error:" not in result.output


def test_missing_spec_file_and_unknown_task_show(tmp_path):
    result = runner.invoke(app, ["run", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["tasks", "show", "glue_cola"])
    assert result.exit_code == 2 and "did you mean 'glue-cola'" in result.output


def test_catalog_commands():
    shown = runner.invoke(app, ["tasks", "show", "glue-cola"])
    assert shown.exit_code == 0 and "metric:  MCC" in shown.output
    pack = runner.invoke(app, ["tasks", "show", "sports_understanding"])
    assert "pack:    bigbench==1.0.0 bigbench-1.0.0/bigbench/benchmark_tasks/sports_understanding/task.json" in pack.output
    assert "note:    PyPI no longer serves it" in pack.output  # before a build is tried and fails
    assert "note:" not in runner.invoke(app, ["tasks", "show", "sms_spam"]).output
    from core.tasks.catalog import partition

    cls12 = partition("cls12")
    listed = runner.invoke(app, ["tasks", "list", "--partition", "cls12"])
    names = {line.split()[0] for line in listed.output.strip().splitlines()}
    assert listed.exit_code == 0 and names == set(cls12.train) | set(cls12.dev) | set(cls12.test)
    assert len(cls12.train) == 12
    assert "smollm2-135m" in runner.invoke(app, ["backbones", "list"]).output


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parent.parent / "studies").rglob("*.yaml")))
def test_every_committed_study_spec_is_valid_and_names_pack_tasks(path):
    from core.sweep import variants
    from core.spec import load_spec
    from core.tasks import packs

    spec = load_spec(path)
    for variant in ([v for _, v in variants(spec)] if spec.sweep else [spec]):
        names = [r.name for r in variant.targets + (variant.upstream.source_refs if variant.upstream else [])]
        pl = variant.upstream and variant.upstream.clustering.pseudo_label
        names += [pl.train.name] if pl and pl.train else []
        assert set(names) <= set(packs.PACKS), f"{path}: not pack tasks: {set(names) - set(packs.PACKS)}"
        sources = {r.name for r in variant.upstream.source_refs} if variant.upstream else set()
        assert not sources & {r.name for r in variant.targets}, f"{path}: a target is also a source"
        assert not (pl and pl.train and pl.train.name in {r.name for r in variant.targets} | sources)
