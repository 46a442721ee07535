"""Readers turn CrossFit TSV directories, BIG-bench task.json files and CSV/JSONL tables into Tasks."""
from __future__ import annotations

import json

import pytest

from core.tasks.base import Example, TaskError, TaskInfo
from core.tasks.kshot import kshot
from core.tasks.readers import READERS, ReaderWarning, read_bigbench, read_crossfit_dir, read_table, render_choices

SQUAD = TaskInfo(name="squad-no_context", type="qa", metric="QA-F1")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def crossfit_dir(tmp_path, name="squad-no_context", seeds=(100, 13), k=32):
    for seed in seeds:
        write(tmp_path / f"{name}_{k}_{seed}_train.tsv", f"question: who built it? {seed}\tthe Romans\tRomans\n")
        write(tmp_path / f"{name}_{k}_{seed}_dev.tsv", "question: when? [SEP] extra\t1850\n")
        write(tmp_path / f"{name}_{k}_{seed}_test.tsv", "question: where?\tParis\nquestion: who?\tCurie\n")
    return tmp_path


def test_registry_names_every_reader():
    assert READERS == {"crossfit": read_crossfit_dir, "bigbench": read_bigbench, "table": read_table}


# --- CrossFit TSV -------------------------------------------------------------------------------
def test_crossfit_dir_gives_one_split_per_seed_with_tab_separated_answers(tmp_path):
    crossfit_dir(tmp_path)
    write(tmp_path / "squad-no_context_32_100_train-BartTokenized.json", "[]")  # CrossFit's cache
    write(tmp_path / "other_task_16_100_train.tsv", "x\ty\n")

    task = read_crossfit_dir(tmp_path, SQUAD)

    assert task.info == SQUAD and task.examples == []
    assert list(task.splits) == [100, 13]  # CrossFit's seed order
    split = task.splits[100]
    assert (split.seed, split.k) == (100, 32)
    assert split.train == [Example("question: who built it? 100", ("the Romans", "Romans"))]
    assert split.dev == [Example("question: when? [SEP] extra", ("1850",))]  # [SEP] stays in the text
    assert [ex.output for ex in split.test] == ["Paris", "Curie"]


def test_crossfit_malformed_line_names_file_and_line(tmp_path):
    crossfit_dir(tmp_path, seeds=(100,))
    write(tmp_path / "squad-no_context_32_100_test.tsv", "q1\ta1\nq2 without an answer\nq3\ta3\n")

    with pytest.raises(TaskError, match=r"squad-no_context_32_100_test\.tsv, line 2: no tab"):
        read_crossfit_dir(tmp_path, SQUAD)


def test_crossfit_windows_line_ends_and_blank_lines_are_fine(tmp_path):
    crossfit_dir(tmp_path, seeds=(100,))
    write(tmp_path / "squad-no_context_32_100_test.tsv", "q1\ta1\r\n\r\nq2\ta2\tb2\r\n")

    test = read_crossfit_dir(tmp_path, SQUAD).splits[100].test

    assert test == [Example("q1", ("a1",)), Example("q2", ("a2", "b2"))]


def test_crossfit_empty_input_is_an_error(tmp_path):
    crossfit_dir(tmp_path, seeds=(100,))
    write(tmp_path / "squad-no_context_32_100_dev.tsv", "q1\ta1\n\ta2\n")

    with pytest.raises(TaskError, match=r"_dev\.tsv, line 2: empty input"):
        read_crossfit_dir(tmp_path, SQUAD)


def test_crossfit_empty_file_and_missing_files_are_errors(tmp_path):
    crossfit_dir(tmp_path, seeds=(100,))
    write(tmp_path / "squad-no_context_32_100_train.tsv", "")
    with pytest.raises(TaskError, match=r"squad-no_context_32_100_train\.tsv is empty"):
        read_crossfit_dir(tmp_path, SQUAD)

    (tmp_path / "squad-no_context_32_100_train.tsv").unlink()
    with pytest.raises(TaskError, match=r"seed 100 lacks squad-no_context_32_100_train\.tsv"):
        read_crossfit_dir(tmp_path, SQUAD)


def test_crossfit_dir_without_the_task_names_path_and_pattern(tmp_path):
    write(tmp_path / "glue-sst2_16_100_train.tsv", "x\ty\n")

    with pytest.raises(TaskError) as err:
        read_crossfit_dir(tmp_path, SQUAD)
    message = str(err.value)
    assert str(tmp_path) in message
    assert "squad-no_context_{k}_{seed}_{train,dev,test}.tsv" in message
    assert "glue-sst2" in message


def test_crossfit_dir_with_several_k_needs_k(tmp_path):
    crossfit_dir(tmp_path, seeds=(100,), k=32)
    crossfit_dir(tmp_path, seeds=(100,), k=64)

    with pytest.raises(TaskError, match=r"several k \[32, 64\]"):
        read_crossfit_dir(tmp_path, SQUAD)
    assert read_crossfit_dir(tmp_path, SQUAD, k=64).splits[100].k == 64


# --- BIG-bench JSON -------------------------------------------------------------------------------
def bigbench_task(tmp_path, examples, name="toy_task", **fields):
    data = {"name": name, "description": "toy", "keywords": ["toy"], "examples": examples, **fields}
    return write(tmp_path / name / "task.json", json.dumps(data))


def test_bigbench_multiple_choice_renders_options_like_crossfit(tmp_path):
    path = bigbench_task(
        tmp_path,
        [
            {"input": "Where do fish live? ", "target_scores": {"trees": 0, "water": 1, "sand": 0}},
            {"input": "Pick a colour.", "target_scores": {"red": 1, "blue": 1, "loud": 0}},
        ],
        name="fish_quiz",
        preferred_score="multiple_choice_grade",
        task_prefix="Answer the question.\n",
    )

    task = read_bigbench(path)

    assert task.info == TaskInfo(name="fish_quiz", type="multiple_choice", metric="ACC")
    first, second = task.examples
    assert first == Example(
        input="Answer the question. Where do fish live? (A) trees (B) water (C) sand",
        outputs=("water",),
        options=("trees", "water", "sand"),
    )
    assert second.outputs == ("red", "blue")  # every top-scoring option is acceptable
    assert task.options_for(first) == ("trees", "water", "sand")


def test_bigbench_choices_stay_out_of_the_input_when_the_task_says_so(tmp_path):
    examples = [{"input": "Jamal Murray beat the buzzer", "target_scores": {"plausible": 1, "implausible": 0}}]
    path = bigbench_task(tmp_path, examples, append_choices_to_input=False)

    assert read_bigbench(path).examples[0].input == "Jamal Murray beat the buzzer"
    assert read_bigbench(path, append_choices=True).examples[0].input.endswith("(A) plausible (B) implausible")


def test_bigbench_generation_uses_the_task_metric_and_keeps_all_targets(tmp_path):
    examples = [
        {"input": "4 + 9 =", "target": "13"},
        {"input": "The genre of Weird Al is", "target": ["comedy", "parody"]},
        {"input": "4 + 9 =", "target": "13"},  # exact duplicate: dropped, as BIG-bench does
    ]
    em = read_bigbench(bigbench_task(tmp_path, examples, name="sums", preferred_score="exact_str_match"))
    rouge = read_bigbench(bigbench_task(tmp_path, examples, name="facts", preferred_score="rougeLsum"))

    assert (em.info.type, em.info.metric, rouge.info.metric) == ("generation", "EM", "Rouge-L")
    assert em.examples == [Example("4 + 9 =", ("13",)), Example("The genre of Weird Al is", ("comedy", "parody"))]


def test_bigbench_directory_and_subtask_naming(tmp_path):
    write(tmp_path / "arithmetic" / "task.json", json.dumps({"name": "arithmetic", "description": "container"}))
    sub = bigbench_task(tmp_path / "arithmetic", [{"input": "1 + 1 =", "target": "2"}], name="1_digit_addition")

    assert read_bigbench(sub.parent).info.name == "arithmetic-1_digit_addition"
    with pytest.raises(TaskError, match=r"no 'examples' list; read one of its subtasks instead: .*1_digit_add"):
        read_bigbench(tmp_path / "arithmetic")


def test_bigbench_info_decides_the_type(tmp_path):
    examples = [
        {"input": f"statement {i}", "target_scores": {"plausible": i % 2, "implausible": 1 - i % 2}} for i in range(4)
    ]
    info = TaskInfo("sports", "classification", "ACC", options=("plausible", "implausible"))

    task = read_bigbench(bigbench_task(tmp_path, examples), info)

    assert task.info is info
    assert [ex.output for ex in task.examples] == ["implausible", "plausible"] * 2


def test_bigbench_errors_name_the_example(tmp_path):
    with pytest.raises(TaskError, match=r"'examples' is empty"):
        read_bigbench(bigbench_task(tmp_path, [], name="empty"))
    with pytest.raises(TaskError, match=r"example 1: no 'target_scores'"):
        read_bigbench(
            bigbench_task(
                tmp_path,
                [{"input": "a", "target_scores": {"x": 1, "y": 0}}, {"input": "b", "target": "x"}],
                name="mixed",
                preferred_score="multiple_choice_grade",
            )
        )
    with pytest.raises(TaskError, match=r"example 0: no option scores higher"):
        read_bigbench(bigbench_task(tmp_path, [{"input": "a", "target_scores": {"x": 0, "y": 0}}], name="tie"))
    with pytest.raises(TaskError, match=r"does not exist"):
        read_bigbench(tmp_path / "nowhere" / "task.json")
    for score in (["exact_str_match"], 3, {"a": 1}):
        with pytest.raises(TaskError, match=r"'preferred_score' must be the name of a BIG-bench metric"):
            read_bigbench(bigbench_task(tmp_path, [{"input": "a", "target": "b"}], name="odd", preferred_score=score))


def test_bigbench_drops_unusable_answers_with_a_warning(tmp_path):
    examples = [
        {"input": "a", "target": ""},
        {"input": "b", "target": "B"},
        {"input": "c", "target_scores": {"right": 1, "": 0}},
    ]
    path = bigbench_task(tmp_path, examples[:2], name="gen")
    with pytest.warns(ReaderWarning, match=r"skipped 1 example.*\[0\]"):
        assert read_bigbench(path).examples == [Example("b", ("B",))]
    # an empty option would win a likelihood ranking for free, so it is left out
    mc = read_bigbench(bigbench_task(tmp_path, examples[2:], name="mc"))
    assert mc.examples[0].options == ("right",)


def test_bigbench_task_feeds_kshot(tmp_path):
    examples = [{"input": f"{i} + 1 =", "target": str(i + 1)} for i in range(100)]
    task = read_bigbench(bigbench_task(tmp_path, examples, name="plus_one"))

    split = kshot(task, 100)

    assert (len(split.train), len(split.dev), len(split.test)) == (32, 32, 20)


def test_render_choices_goes_past_z():
    text = render_choices("Pick.", [f"o{i}" for i in range(28)])
    assert text.startswith("Pick. (A) o0 (B) o1") and text.endswith("(Z) o25 (AA) o26 (AB) o27")
    assert render_choices("", ["x", "y"]) == "(A) x (B) y"


# --- CSV / JSONL ----------------------------------------------------------------------------------
SENTIMENT = TaskInfo(name="tweets", type="classification", metric="ACC")


def test_csv_with_label_map_fills_the_option_set(tmp_path):
    path = write(tmp_path / "tweets.csv", 'id,text,label\n1,"great, really",1\n2,awful,0\n3,fine I guess,1\n')

    task = read_table(path, SENTIMENT, "text", "label", label_map={0: "negative", 1: "positive"})

    assert task.info.options == ("negative", "positive")
    assert task.examples == [
        Example("great, really", ("positive",)),
        Example("awful", ("negative",)),
        Example("fine I guess", ("positive",)),
    ]
    assert task.test is None


def test_csv_several_input_columns_are_joined_crossfit_style(tmp_path):
    path = write(tmp_path / "pairs.tsv", "q1\tq2\tsame\nHow old?\tWhat age?\tyes\n")
    info = TaskInfo("pairs", "classification", "ACC", options=("no", "yes"))

    task = read_table(path, info, ["q1", "q2"], "same")

    assert task.examples == [Example("q1: How old? [SEP] q2: What age?", ("yes",))]


def test_jsonl_output_list_and_given_test_split(tmp_path):
    rows = [{"question": "Capital of France?", "answers": ["Paris", "paris"]}, {"question": "2+2?", "answers": 4}]
    path = write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    test = write(tmp_path / "test.jsonl", json.dumps({"question": "Capital of Peru?", "answers": ["Lima"]}) + "\n")
    info = TaskInfo("capitals", "qa", "EM")

    task = read_table(path, info, "question", "answers", test_path=test)

    assert task.examples == [Example("Capital of France?", ("Paris", "paris")), Example("2+2?", ("4",))]
    assert task.test == [Example("Capital of Peru?", ("Lima",))]


def test_jsonl_label_map_matches_typed_values(tmp_path):
    path = write(tmp_path / "s.jsonl", '{"t": "yes!", "y": 1}\n{"t": "no!", "y": 0}\n')
    task = read_table(path, SENTIMENT, "t", "y", label_map={0: "negative", 1: "positive"})
    assert [ex.output for ex in task.examples] == ["positive", "negative"]


def test_missing_column_names_the_column_and_the_columns_present(tmp_path):
    csv_path = write(tmp_path / "t.csv", "\ufeffsentence,label\nhello,1\n")  # with a byte-order mark
    with pytest.raises(TaskError) as err:
        read_table(csv_path, SENTIMENT, "text", "label")
    assert str(err.value) == f"{csv_path}, header: no column 'text'; columns present: ['sentence', 'label']"

    jsonl_path = write(tmp_path / "t.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl, line 2: no column 'label'; columns present: \['text'\]"):
        read_table(jsonl_path, SENTIMENT, "text", "label")


def test_table_errors(tmp_path):
    unmapped = write(tmp_path / "u.csv", "text,label\nhi,1\nho,2\n")
    with pytest.raises(TaskError, match=r"u\.csv, line 3: value '2' of column 'label' is not in label_map"):
        read_table(unmapped, SENTIMENT, "text", "label", label_map={1: "positive"})

    with pytest.raises(TaskError, match=r"has no rows"):
        read_table(write(tmp_path / "empty.csv", "text,label\n"), SENTIMENT, "text", "label")

    with pytest.raises(TaskError, match=r"line 2: column 'text' is empty"):
        read_table(write(tmp_path / "blank.csv", "text,label\n ,1\n"), SENTIMENT, "text", "label")

    with pytest.raises(TaskError, match=r"line 3: fewer cells than the 2 header columns"):
        read_table(write(tmp_path / "short.csv", "text,label\nhi,1\nho\n"), SENTIMENT, "text", "label")

    with pytest.raises(TaskError, match=r"labels \['maybe'\] are not among the options"):
        info = TaskInfo("t", "classification", "ACC", options=("no", "yes"))
        read_table(write(tmp_path / "o.csv", "text,label\nhm,maybe\n"), info, "text", "label")

    with pytest.raises(TaskError, match=r"unknown table format '\.xlsx'"):
        read_table(tmp_path / "t.xlsx", SENTIMENT, "text", "label")

    with pytest.raises(TaskError, match=r"bad\.jsonl, line 1: not valid JSON"):
        read_table(write(tmp_path / "bad.jsonl", "{oops\n"), SENTIMENT, "text", "label")


def test_a_file_that_is_not_in_its_encoding_is_the_files_fault_named_as_such(tmp_path):
    """Latin-1 bytes where UTF-8 is read: a TaskError naming the file and the byte, not a bare
    UnicodeDecodeError (which a caller would take for primer's own fault)."""
    latin1 = "café,positive\n".encode("latin-1")
    (tmp_path / "t.csv").write_bytes(b"text,label\n" + latin1)
    with pytest.raises(TaskError, match=r"t\.csv is not utf-8-sig text: byte 0xe9 does not decode"):
        read_table(tmp_path / "t.csv", SENTIMENT, "text", "label")
    assert read_table(tmp_path / "t.csv", SENTIMENT, "text", "label", encoding="latin-1").examples[0].input == "café"
    (tmp_path / "t.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "positive"}\n')
    with pytest.raises(TaskError, match=r"t\.jsonl is not utf-8-sig text"):
        read_table(tmp_path / "t.jsonl", SENTIMENT, "text", "label")
    (tmp_path / "task.json").write_bytes('{"examples": []}'.encode("utf-16"))
    with pytest.raises(TaskError, match=r"task\.json is not utf-8 text: byte 0xff does not decode"):
        read_bigbench(tmp_path / "task.json")
