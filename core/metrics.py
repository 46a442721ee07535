"""CrossFit's task metrics, and the relative gain / ARG that MPT reports over plain PT.

Scores match CrossFit (Ye et al. 2021, INK-USC/CrossFit `dataloader/metrics.py`) with the
library versions its README pins (scikit-learn 0.24.1, scipy 1.4.1, rouge 1.0.0), but need
only numpy. Every metric takes the predictions (one string per example) and the references
(a list of acceptable answers per example, the first being the gold label) and returns a
float in CrossFit's scale (fractions, not percent).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from core.errors import UserError

Predictions = Sequence[str]
References = Sequence[Sequence[str]]  # a bare string is taken as its only answer, as CrossFit does

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation, in its order: lowercase, drop punctuation, drop a/an/the, squash spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


# --- one prediction against one answer ---------------------------------------------------------


def accuracy(prediction: str, answer: str) -> float:
    # CrossFit's ACC only ignores case: no stripping, no punctuation or article removal (unlike EM).
    return float(prediction.lower() == answer.lower())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(answer))


def qa_f1(prediction: str, answer: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:  # also covers an empty prediction, even against an answer that normalises to ""
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, answer: str) -> float:
    """Rouge-L F as the `rouge` 1.0.0 package computes it, which is what CrossFit's numbers are.

    That package is not textbook Rouge-L: text is split into sentences on ".", scored at summary
    level (union of per-sentence-pair LCSs), and every count is of DISTINCT words: the LCS
    union, the prediction length and the answer length are all sizes of word sets. Words are
    split on spaces with case and punctuation (other than ".") kept.
    """
    # CrossFit scores a prediction with nothing but punctuation as 0 before calling rouge.
    if all(ch in _PUNCTUATION for ch in prediction):
        return 0.0
    hyp = [sentence.split(" ") for sentence in _rouge_sentences(prediction)]
    ref = [sentence.split(" ") for sentence in _rouge_sentences(answer)]
    if not ref:  # an answer of only dots; rouge raises here, one bad reference should not kill a job
        return 0.0
    common: set[str] = set()
    for ref_words in ref:
        for hyp_words in hyp:
            common |= _lcs_words(ref_words, hyp_words)
    precision = len(common) / len({w for words in hyp for w in words})
    recall = len(common) / len({w for words in ref for w in words})
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))  # rouge's own smoothing


def _rouge_sentences(text: str) -> list[str]:
    return [" ".join(piece.split()) for piece in text.split(".") if piece]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """The words of one longest common subsequence, the one rouge's backtrack picks.

    Which LCS is picked matters because only its distinct words count, so the walk back copies
    rouge's tie-break: take a match, else step back in `ref` only if that keeps a strictly longer
    LCS, else step back in `hyp`.
    """
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        for j, h in enumerate(hyp, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if r == h else max(table[i - 1][j], table[i][j - 1])
    words, i, j = set(), len(ref), len(hyp)
    while i and j:  # iterative: rouge recurses and would overflow the stack on long texts
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


# --- whole prediction lists --------------------------------------------------------------------


def _answers(references: Sequence[str] | str) -> list[str]:
    return [references] if isinstance(references, str) else list(references)


def _checked(metric: str, predictions: Predictions, references: References) -> list[list[str]]:
    if len(predictions) != len(references):
        raise UserError(
            f"{metric}: got {len(predictions)} predictions but {len(references)} references; "
            "there must be one list of acceptable answers per prediction"
        )
    if not predictions:
        raise UserError(f"{metric}: no predictions to score")
    return [_answers(r) for r in references]


def _best_over_answers(metric: str, per_answer: Callable[[str, str], float]):
    # EM, ACC, QA-F1 and Rouge-L credit a prediction with its best answer; an example with no
    # answers scores 0, as in CrossFit.
    def corpus_score(predictions: Predictions, references: References) -> float:
        answers = _checked(metric, predictions, references)
        return float(np.mean([max((per_answer(p, a) for a in ans), default=0.0)
                              for p, ans in zip(predictions, answers)]))

    corpus_score.__name__ = per_answer.__name__
    return corpus_score


def _gold(metric: str, predictions: Predictions, references: References) -> list[str]:
    # Label metrics compare against the FIRST answer only; the others are ignored.
    answers = _checked(metric, predictions, references)
    for i, ans in enumerate(answers):
        if not ans:
            raise UserError(f"{metric}: example {i} has no reference answer")
    return [ans[0] for ans in answers]


def classification_f1(predictions: Predictions, references: References) -> float:
    """Macro F1 (sklearn's f1_score(gold, pred, average="macro")) over the raw label strings.

    The classes are every label seen in the gold OR the predictions, so a prediction outside
    the label set is a class of its own with F1 0 and pulls the average down.
    """
    gold = _gold("Classification-F1", predictions, references)
    f1s = []
    for label in set(gold) | set(predictions):
        tp = sum(p == label and g == label for p, g in zip(predictions, gold))
        fp = sum(p == label and g != label for p, g in zip(predictions, gold))
        fn = sum(p != label and g == label for p, g in zip(predictions, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn))  # = 2PR/(P+R), and 0 where sklearn's P or R is 0/0
    return float(np.mean(f1s))


def matthews_corr(predictions: Predictions, references: References) -> float:
    """Binary MCC with "acceptable" as the positive class: CrossFit only uses MCC for glue-cola.

    Any prediction other than "acceptable" (after strip) counts as negative, garbage included;
    the gold is compared unstripped. No variance on either side gives 0, as in sklearn.
    """
    gold = [g == "acceptable" for g in _gold("MCC", predictions, references)]
    pred = [p.strip() == "acceptable" for p in predictions]
    tp = sum(p and g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    denominator = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return (tp * tn - fp * fn) / math.sqrt(denominator) if denominator else 0.0


def pearson(predictions: Predictions, references: References) -> float:
    """scipy's pearsonr of float(prediction) against float(first answer).

    As in CrossFit, an unparsable prediction becomes NaN and so does the whole score; constant
    predictions (or gold) also give NaN, as scipy does. NaN propagates into the relative gain
    on purpose: a score that CrossFit would not have produced should not look like a number.
    """
    try:
        gold = np.array([float(g) for g in _gold("Pearson", predictions, references)])
    except ValueError as err:  # CrossFit would crash too: the gold of a Pearson task must be numbers
        raise UserError(f"Pearson: a reference answer is not a number ({err})") from None
    pred = np.array([_to_float(p) for p in predictions])
    if len(pred) < 2:
        raise UserError("Pearson: needs at least 2 examples")
    if (pred == pred[0]).all() or (gold == gold[0]).all():
        return float("nan")
    if len(pred) == 2:  # scipy's special case: the sign of the one slope
        return float(np.sign(pred[1] - pred[0]) * np.sign(gold[1] - gold[0]))
    pm, gm = pred - pred.mean(), gold - gold.mean()
    r = float(np.dot(pm / np.linalg.norm(pm), gm / np.linalg.norm(gm)))
    return r if math.isnan(r) else max(min(r, 1.0), -1.0)


def _to_float(prediction: str) -> float:
    try:
        return float(prediction.strip())
    except ValueError:
        return float("nan")


METRICS: dict[str, Callable[[Predictions, References], float]] = {
    "ACC": _best_over_answers("ACC", accuracy),
    "EM": _best_over_answers("EM", exact_match),
    "QA-F1": _best_over_answers("QA-F1", qa_f1),
    "Classification-F1": classification_f1,
    "MCC": matthews_corr,
    "Pearson": pearson,
    "Rouge-L": _best_over_answers("Rouge-L", rouge_l),
}

# CrossFit's own task table spells two of them out; accept those so it can be copied as it is.
ALIASES = {"Matthew-Correlation": "MCC", "Pearson-Correlation": "Pearson"}


def score(metric: str, predictions: Predictions, references: References) -> float:
    name = ALIASES.get(metric, metric)
    if name not in METRICS:
        raise UserError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return METRICS[name](predictions, references)


# --- comparing methods ---------------------------------------------------------------------------


def relative_gain(score_method: float, score_pt: float) -> float | None:
    """(method - PT) / PT, the per-task gain that ARG averages; None where PT scored exactly 0
    (a classifier that always answers one label has an MCC of 0): there it is undefined, and
    `arg` leaves the task out.

    The plain formula, as CrossFit and MPT use it, even for MCC/Pearson baselines below 0: there
    a better method gives a NEGATIVE gain (and a tiny baseline a huge one). We keep it so ARG is
    comparable with the papers; read such tasks' gains with care.
    """
    return None if score_pt == 0 else (score_method - score_pt) / score_pt


def arg(gains: Mapping[str, float | None] | Iterable[float | None]) -> float | None:
    """Average relative gain over target tasks, in percent as MPT reports it (0.05 -> 5.0).
    Undefined gains (None) are left out; None if no task has one."""
    values = list(gains.values() if isinstance(gains, Mapping) else gains)
    if not values:
        raise UserError("ARG needs the relative gain of at least one task")
    defined = [v for v in values if v is not None]
    return 100.0 * float(np.mean(defined)) if defined else None


Scores = Mapping[str, Mapping[int, float]]  # task -> split seed -> test score


def _bootstrap_args(methods: list[Scores], pt: Scores, samples: int, seed: int) -> np.ndarray:
    """ARG (percent) of each method on `samples` bootstrap resamples, shape (methods, samples).

    Each resample draws the target tasks with replacement, then, within each drawn task, its
    seeds with replacement; every method and PT see the same draws (they share the splits).
    """
    rng = np.random.default_rng(seed)
    tasks = list(methods[0])
    gains = np.empty((len(methods), len(tasks), samples))  # per task, the gain on every resample of its seeds
    for i, t in enumerate(tasks):
        seeds = sorted(methods[0][t])
        drawn = rng.integers(0, len(seeds), (samples, len(seeds)))
        p = np.array([pt[t][s] for s in seeds])[drawn].mean(1)
        for k, method in enumerate(methods):
            with np.errstate(divide="ignore", invalid="ignore"):
                gains[k, i] = (np.array([method[t][s] for s in seeds])[drawn].mean(1) - p) / p
    picked = rng.integers(0, len(tasks), (samples, len(tasks)))  # the tasks of each resample
    return 100.0 * gains[:, picked, np.arange(samples)[:, None]].mean(2)


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):  # every resample drew a PT mean of 0 or a NaN score: no interval
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def arg_interval(method: Scores, pt: Scores, samples: int = 10_000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval for ARG over tasks and split seeds (in percent): the percentile
    interval of ARG recomputed on resamples of the tasks and, within each, of its seeds."""
    return _percentiles(_bootstrap_args([method], pt, samples, seed)[0], level)


def arg_difference_interval(a: Scores, b: Scores, pt: Scores, samples: int = 10_000, level: float = 0.95,
                            seed: int = 0) -> tuple[float, float]:
    """A paired bootstrap interval for ARG(a) − ARG(b) in percentage points: both ARGs are
    recomputed on the same resamples of tasks and seeds, so what the draws share cancels."""
    args = _bootstrap_args([a, b], pt, samples, seed)
    return _percentiles(args[0] - args[1], level)
