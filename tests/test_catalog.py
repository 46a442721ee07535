"""The task catalog and MPT's partitions, used the way the rest of primer uses them."""
import pytest

from core.metrics import METRICS
from core.tasks import catalog as cat
from core.tasks.base import TASK_TYPES, TaskError, TaskInfo
from core.tasks.catalog import partition, partitions, register, task_info


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(cat, "_registered", {})


def test_the_catalog_holds_the_160_tasks_of_the_crossfit_gym():
    tasks = cat.builtin()  # catalog() adds the registered (pack, uploaded) tasks to these
    assert len(tasks) == 160
    assert all(name == info.name for name, info in tasks.items())


def test_every_task_has_a_scorable_type_and_metric():
    for info in cat.catalog().values():
        assert info.type in TASK_TYPES, info
        assert info.metric in METRICS, info
        if info.options is not None:
            assert len(set(info.options)) == len(info.options) >= 2, info


def test_classification_tasks_carry_their_label_set():
    # kilt_fever is the one classification task whose CrossFit script writes no label set.
    missing = [i.name for i in cat.catalog().values() if i.type == "classification" and i.options is None]
    assert missing == ["kilt_fever"]
    assert task_info("tweet_eval-sentiment").options == ("negative", "neutral", "positive")
    assert len(task_info("discovery").options) == 174
    assert len(task_info("trec-finegrained").options) == 47


@pytest.mark.parametrize("name, kind, metric", [
    ("glue-cola", "classification", "MCC"),  # CrossFit: 'Matthew-Correlation'
    ("sick", "classification", "Classification-F1"),
    ("superglue-cb", "classification", "ACC"),
    ("superglue-record", "qa", "QA-F1"),
    ("squad-with_context", "qa", "QA-F1"),
    ("squad-no_context", "qa", "EM"),
    ("commonsense_qa", "multiple_choice", "ACC"),
    ("codah", "multiple_choice", "Classification-F1"),  # CrossFit's own choice of metric
    ("yelp_review_full", "regression", "Pearson"),  # CrossFit: 'Pearson-Correlation'
    ("xsum", "generation", "Rouge-L"),
    ("break-QDMR", "generation", "EM"),
])
def test_spot_checks_against_crossfit(name, kind, metric):
    info = task_info(name)
    assert (info.type, info.metric) == (kind, metric)


def test_ranked_tasks_are_the_classification_and_multiple_choice_ones():
    assert task_info("glue-cola").options == ("unacceptable", "acceptable")
    assert task_info("glue-cola").ranked
    assert task_info("ai2_arc").ranked and task_info("ai2_arc").options is None  # choices differ per example
    assert not task_info("samsum").ranked


def test_an_unknown_task_is_named_and_close_names_are_suggested():
    with pytest.raises(TaskError) as err:
        task_info("glue_cola")
    assert "'glue_cola'" in str(err.value)
    assert "'glue-cola'" in str(err.value)

    with pytest.raises(TaskError, match="did you mean 'glue-sst2'"):
        task_info("sst2")


@pytest.mark.parametrize("name", sorted(partitions()))
def test_every_partition_task_is_in_the_catalog(name):
    p = partition(name)
    unknown = [t for t in (*p.train, *p.dev, *p.test) if t not in cat.catalog()]
    assert unknown == []
    assert p.description


@pytest.mark.parametrize("name", sorted(partitions()))
def test_sources_never_include_a_target_or_a_held_out_task(name):
    p = partition(name)
    assert not set(p.train) & set(p.test)
    assert not set(p.train) & set(p.dev)
    assert len(set(p.train)) == len(p.train) and len(set(p.test)) == len(p.test)
    assert p.train and p.test


def test_partition_sizes():
    sizes = {name: (len(p.train), len(p.test)) for name, p in partitions().items()}
    assert sizes == {
        "random": (114, 20),
        "cls2cls": (45, 10), "nocls2cls": (45, 10), "both2cls": (45, 10),
        "cls2nocls": (45, 16), "nocls2nocls": (45, 16), "both2nocls": (45, 16),
        "qa2qa": (22, 16), "noqa2qa": (33, 16),
        "nonli2nli": (55, 9), "nopara2para": (60, 4),
        "cls12": (12, 10), "cls24": (24, 10),
    }


def test_the_12_and_24_source_ablations_are_subsets_of_the_45_cls_sources():
    cls45 = partition("cls45")
    assert cls45 == partition("cls2cls")
    cls12, cls24 = partition("cls12"), partition("cls24")
    assert set(cls12.train) < set(cls24.train) < set(cls45.train)
    assert cls12.test == cls24.test == cls45.test


def test_cls_to_cls_is_classification_only_and_qa_targets_are_multiple_choice():
    p = partition("cls2cls")
    assert {task_info(t).type for t in (*p.train, *p.test)} == {"classification"}
    assert {task_info(t).type for t in partition("qa2qa").test} == {"multiple_choice"}
    assert set(partition("qa2qa").test) == set(partition("noqa2qa").test)


def test_an_unknown_partition_lists_the_valid_ones():
    with pytest.raises(TaskError) as err:
        partition("cls99")
    assert "'cls99'" in str(err.value)
    assert "cls2cls" in str(err.value) and "random" in str(err.value)


def test_a_registered_task_is_looked_up_like_a_built_in_one(clean_registry):
    mine = TaskInfo(name="support-tickets", type="classification", metric="ACC", options=("bug", "question"))
    register(mine)
    assert task_info("support-tickets") is mine
    assert "support-tickets" in cat.catalog()
    register(mine)  # a pack loaded twice is fine


def test_register_refuses_to_redefine_a_task_or_an_unscorable_one(clean_registry):
    with pytest.raises(TaskError, match="built-in"):
        register(TaskInfo(name="glue-cola", type="classification", metric="ACC", options=("no", "yes")))
    with pytest.raises(TaskError, match="metric 'BLEU'"):
        register(TaskInfo(name="mt", type="generation", metric="BLEU"))
    with pytest.raises(TaskError, match="type 'tagging'"):
        register(TaskInfo(name="ner", type="tagging", metric="EM"))
    register(TaskInfo(name="x", type="generation", metric="EM"))
    with pytest.raises(TaskError, match="already a registered task"):
        register(TaskInfo(name="x", type="generation", metric="Rouge-L"))


def test_a_spec_can_name_a_partition_for_its_sources_and_targets():
    from core.spec import SpecError, parse_spec

    cls12, cls24 = partition("cls12"), partition("cls24")
    spec = parse_spec({"name": "paper", "backbone": "smollm2-135m", "targets": {"partition": "cls12"},
                       "upstream": {"sources": {"partition": "cls12"}},
                       "sweep": {"field": "upstream.sources", "values": [{"partition": "cls12"}, {"partition": "cls24"}]}})
    assert [t.name for t in spec.targets] == list(cls12.test)
    assert [s.name for s in spec.upstream.sources] == list(cls12.train)
    assert len(cls12.train) == 12 and len(cls24.train) == 24 and cls12.test == cls24.test  # the paper's subsets
    with pytest.raises(SpecError, match="targets: unknown partition 'cls13'; valid partitions: random, cls2cls"):
        parse_spec({"name": "x", "backbone": "smollm2-135m", "targets": {"partition": "cls13"}})


def test_the_names_a_spec_accepts_are_the_registries_that_implement_them():
    from core.algorithms.upstream import ALGORITHMS
    from core.names import ALGORITHM_NAMES, INIT_NAMES
    from core.prompts import INITS

    assert tuple(ALGORITHMS) == ALGORITHM_NAMES and tuple(INITS) == INIT_NAMES


def test_the_api_starts_without_torch():
    import subprocess
    import sys

    code = "import sys, api.app; api.app.create_app; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0
