"""k-shot splits must be CrossFit's, file for file.

The reference below is a line-by-line transcription of CrossFit's own code (INK-USC/CrossFit,
tasks/fewshot_gym_dataset.py: ``generate_k_shot_data`` of FewshotGymClassificationDataset and
FewshotGymTextToTextDataset, ``write_to_tsv``; and the train-only ``get_train_test_lines`` of
tasks/ethos.py, financial_phrasebank.py, ...), working on CrossFit's plain ``(input, output)``
tuples and numpy's global RNG exactly as CrossFit does. It shares no code with core.tasks.kshot.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from core.tasks.base import SPLIT_SEEDS, Example, Task, TaskError, TaskInfo
from core.tasks.kshot import KShotWarning, full_split, kshot, kshot_all, write_split
from core.tasks.readers import read_crossfit_dir


# --- CrossFit, transcribed --------------------------------------------------------------------
def crossfit_write_to_tsv(lst, out_file):
    with open(out_file, "w", encoding="utf-8") as fout:
        for line in lst:
            fout.write("{}\t{}\n".format(line[0], line[1]))


def crossfit_holdout_test(lines):
    # tasks/ethos.py get_train_test_lines: "only train set, manually split 20% data as test"
    np.random.seed(42)
    np.random.shuffle(lines)
    n = len(lines)
    train_lines = lines[: int(0.8 * n)]
    test_lines = lines[int(0.8 * n) :]
    return train_lines, test_lines


def crossfit_generate_k_shot_data(train_lines, test_lines, k, seed, classification, path, hf_identifier):
    # shuffle the data
    np.random.seed(seed)
    np.random.shuffle(train_lines)

    if classification:
        # Get label list for balanced sampling
        label_list = {}
        for line in train_lines:
            label = line[-1]
            if label not in label_list:
                label_list[label] = [line]
            else:
                label_list[label].append(line)

        # make train, dev, test data
        k_shot_train = []
        for label in label_list:
            for line in label_list[label][:k]:
                k_shot_train.append(line)

        k_shot_dev = []
        for label in label_list:
            for line in label_list[label][k : 2 * k]:
                k_shot_dev.append(line)
    else:
        k_shot_train = []
        for line in train_lines[:k]:
            k_shot_train.append(line)

        k_shot_dev = []
        for line in train_lines[k : 2 * k]:
            k_shot_dev.append(line)

    k_shot_test = test_lines

    # save to path
    os.makedirs(os.path.join(path, hf_identifier), exist_ok=True)
    prefix = os.path.join(path, hf_identifier, "{}_{}_{}".format(hf_identifier, k, seed))
    crossfit_write_to_tsv(k_shot_train, prefix + "_train.tsv")
    crossfit_write_to_tsv(k_shot_dev, prefix + "_dev.tsv")
    crossfit_write_to_tsv(k_shot_test, prefix + "_test.tsv")
    return k_shot_train, k_shot_dev, k_shot_test


# --- data -------------------------------------------------------------------------------------
LABELS = ("negative", "neutral", "positive")


def sentiment_rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    # Uneven label counts in an irregular order, so that grouping and label order matter.
    return [(f"review number {offset + i} of the shop", LABELS[(i * i + i // 3) % 3]) for i in range(n)]


def qa_rows(n: int, offset: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    # Some questions have two acceptable answers, written tab-separated as CrossFit's QA tasks do.
    return [
        (f"question: who wrote book {offset + i}?", (f"author {i}",) if i % 4 else (f"author {i}", f"A. {i}"))
        for i in range(n)
    ]


def sentiment_task(rows, test_rows=None) -> Task:
    info = TaskInfo(name="shop_sentiment", type="classification", metric="ACC", options=LABELS)
    as_examples = lambda rs: [Example(input=i, outputs=(o,)) for i, o in rs]  # noqa: E731
    return Task(info=info, examples=as_examples(rows), test=None if test_rows is None else as_examples(test_rows))


def qa_task(rows, test_rows=None) -> Task:
    info = TaskInfo(name="book_qa", type="qa", metric="EM")
    as_examples = lambda rs: [Example(input=i, outputs=o) for i, o in rs]  # noqa: E731
    return Task(info=info, examples=as_examples(rows), test=None if test_rows is None else as_examples(test_rows))


def read_files(directory, name, k, seed):
    return {
        part: (directory / f"{name}_{k}_{seed}_{part}.tsv").read_text(encoding="utf-8")
        for part in ("train", "dev", "test")
    }


# --- identical to CrossFit ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_classification_split_files_are_crossfits(tmp_path, seed):
    rows, test_rows = sentiment_rows(150), sentiment_rows(40, offset=1000)
    crossfit_generate_k_shot_data(list(rows), list(test_rows), 16, seed, True, tmp_path / "crossfit", "shop_sentiment")

    split = kshot(sentiment_task(rows, test_rows), seed)
    write_split(split, "shop_sentiment", tmp_path / "ours")

    assert split.k == 16 and split.seed == seed
    assert read_files(tmp_path / "ours", "shop_sentiment", 16, seed) == read_files(
        tmp_path / "crossfit" / "shop_sentiment", "shop_sentiment", 16, seed
    )


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_generation_split_files_are_crossfits(tmp_path, seed):
    rows, test_rows = qa_rows(90), qa_rows(25, offset=500)
    lines = [(i, "\t".join(o)) for i, o in rows]  # CrossFit's QA lines: answers joined by tabs
    test_lines = [(i, "\t".join(o)) for i, o in test_rows]
    crossfit_generate_k_shot_data(lines, test_lines, 32, seed, False, tmp_path / "crossfit", "book_qa")

    split = kshot(qa_task(rows, test_rows), seed)
    write_split(split, "book_qa", tmp_path / "ours")

    assert split.k == 32
    assert read_files(tmp_path / "ours", "book_qa", 32, seed) == read_files(
        tmp_path / "crossfit" / "book_qa", "book_qa", 32, seed
    )


@pytest.mark.parametrize("seed", [100, 13])
@pytest.mark.parametrize("classification", [True, False])
def test_task_without_test_split_holds_out_20_percent_like_crossfit(tmp_path, seed, classification):
    if classification:
        rows = sentiment_rows(163)
        lines, task, name, k = list(rows), sentiment_task(rows), "shop_sentiment", 16
    else:
        rows = qa_rows(97)
        lines, task, name, k = [(i, "\t".join(o)) for i, o in rows], qa_task(rows), "book_qa", 32
    train_lines, test_lines = crossfit_holdout_test(lines)
    crossfit_generate_k_shot_data(train_lines, test_lines, k, seed, classification, tmp_path / "crossfit", name)

    split = kshot(task, seed)
    write_split(split, name, tmp_path / "ours")

    assert len(split.test) == len(rows) - int(0.8 * len(rows))
    assert read_files(tmp_path / "ours", name, k, seed) == read_files(tmp_path / "crossfit" / name, name, k, seed)


# --- what a split looks like ----------------------------------------------------------------------
def test_classification_takes_16_per_label_for_train_and_16_more_for_dev():
    task = sentiment_task(sentiment_rows(150), sentiment_rows(40, offset=1000))
    split = kshot(task, 100)

    for part in (split.train, split.dev):
        assert sorted(ex.output for ex in part) == sorted(LABELS * 16)
        # label after label, in the order the labels first appear in the shuffled pool
        labels_in_order = list(dict.fromkeys(ex.output for ex in part))
        assert [ex.output for ex in part] == [label for label in labels_in_order for _ in range(16)]
    assert split.test == task.test  # the given test split, whole and in order


def test_train_dev_test_are_disjoint_and_seeds_differ():
    task = sentiment_task(sentiment_rows(150))  # no given test: 20% hold-out
    splits = kshot_all(task)

    assert list(splits) == [100, 13, 21, 42, 87]
    for split in splits.values():
        train, dev, test = ({ex.input for ex in part} for part in (split.train, split.dev, split.test))
        assert len(train) == len(split.train) == 48 and len(dev) == len(split.dev) == 48
        assert not train & dev and not train & test and not dev & test
    assert splits[100].train != splits[13].train
    # the hold-out does not depend on the split seed, as in CrossFit
    assert all(split.test == splits[100].test for split in splits.values())


def test_generation_takes_32_and_k_can_be_set():
    task = qa_task(qa_rows(90), qa_rows(5, offset=500))
    assert (len(kshot(task, 13).train), len(kshot(task, 13).dev)) == (32, 32)
    split = kshot(task, 13, k=8)
    assert (len(split.train), len(split.dev), split.k) == (8, 8, 8)
    assert split.train == kshot(task, 13, k=16).train[:8]  # same shuffle, shorter slice


def test_all_shots_trains_on_the_whole_pool_but_the_few_shot_dev_set():
    task = sentiment_task(sentiment_rows(150))  # no given test: 20% hold-out
    split, few = full_split(task, 21), kshot(task, 21)
    assert split.dev == few.dev and split.test == few.test  # dev and test as in the 16-shot split
    assert len(split.train) == 120 - 48  # the 80% pool minus the dev set
    train, dev, test = ({ex.input for ex in part} for part in (split.train, split.dev, split.test))
    assert not train & dev and not train & test and set(ex.input for ex in few.train) <= train


def test_kshot_leaves_numpy_global_random_state_alone():
    np.random.seed(7)
    before = np.random.random()
    np.random.seed(7)
    kshot(sentiment_task(sentiment_rows(150)), 100)
    assert np.random.random() == before


# --- too little data ------------------------------------------------------------------------------
def test_short_label_is_sampled_like_crossfit_but_warned():
    rows = sentiment_rows(150)
    rare = [r for r in rows if r[1] == "neutral"][:20]  # 20 < 2k = 32
    rows = [r for r in rows if r[1] != "neutral"] + rare
    task = sentiment_task(rows, sentiment_rows(10, offset=1000))

    with pytest.warns(KShotWarning, match=r"'neutral': 20"):
        split = kshot(task, 100)
    assert [ex.output for ex in split.train].count("neutral") == 16
    assert [ex.output for ex in split.dev].count("neutral") == 4

    with pytest.raises(TaskError, match=r"needs 32 examples per label"):
        kshot(task, 100, strict=True)


def test_label_of_the_option_set_without_examples_is_reported():
    rows = [r for r in sentiment_rows(150) if r[1] != "neutral"]
    with pytest.warns(KShotWarning, match=r"'neutral': 0"):
        kshot(sentiment_task(rows, sentiment_rows(10)), 100)


def test_empty_task_and_too_small_task_are_errors():
    with pytest.raises(TaskError, match=r"'book_qa' has no examples"):
        kshot(qa_task([]), 100)
    with pytest.raises(TaskError, match=r"too small .* train 1, dev 0, test 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", KShotWarning)
        kshot(qa_task(qa_rows(1), qa_rows(1)), 100)
    with pytest.raises(TaskError, match=r"k must be a positive integer"):
        kshot(qa_task(qa_rows(10)), 100, k=0)


# --- files ----------------------------------------------------------------------------------------
def test_write_split_names_files_like_crossfit_and_reads_back(tmp_path):
    task = qa_task(qa_rows(90), qa_rows(25, offset=500))
    split = kshot(task, 21)

    paths = write_split(split, "book_qa", tmp_path)

    assert [p.name for p in paths] == ["book_qa_32_21_train.tsv", "book_qa_32_21_dev.tsv", "book_qa_32_21_test.tsv"]
    first = (tmp_path / "book_qa_32_21_test.tsv").read_text(encoding="utf-8").splitlines()[0]
    assert first == "question: who wrote book 500?\tauthor 0\tA. 0"  # two answers, tab-separated

    back = read_crossfit_dir(tmp_path, task.info)
    assert list(back.splits) == [21]
    assert back.splits[21] == split


def test_write_split_flattens_tabs_and_newlines(tmp_path):
    example = Example(input="line one\nline\ttwo", outputs=("yes\r\n",))
    split = kshot(Task(info=TaskInfo("t", "generation", "EM"), examples=[example] * 2, test=[example]), 100, k=1)

    write_split(split, "t", tmp_path)

    assert (tmp_path / "t_1_100_train.tsv").read_text(encoding="utf-8") == "line one line two\tyes\n"


def test_write_split_refuses_a_name_that_is_a_path(tmp_path):
    split = kshot(qa_task(qa_rows(10), qa_rows(2)), 100, k=2)
    with pytest.raises(TaskError, match="file name"):
        write_split(split, "../elsewhere", tmp_path)
