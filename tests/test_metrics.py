"""CrossFit's metrics on hand-worked examples, including the edge cases where they surprise.

Expected values are worked out by hand in the comments (and agree with CrossFit's own
evaluate() on sklearn / scipy / rouge 1.0.0).
"""
import math

import pytest

from core.metrics import METRICS, arg, arg_interval, matthews_corr, normalize_answer, relative_gain, score


def test_registry_holds_the_seven_crossfit_metrics():
    assert set(METRICS) == {"ACC", "EM", "QA-F1", "Classification-F1", "MCC", "Pearson", "Rouge-L"}


# --- normalisation, EM, ACC, QA-F1 ---------------------------------------------------------------


def test_normalize_lowercases_strips_punctuation_and_articles_and_squashes_spaces():
    assert normalize_answer("  The Cat,  sat on A mat! ") == "cat sat on mat"
    assert normalize_answer("theme") == "theme"  # articles are whole words only


def test_em_forgives_case_punctuation_and_articles():
    assert score("EM", ["The Eiffel Tower!"], [["eiffel tower"]]) == 1.0
    assert score("EM", ["Eiffel"], [["eiffel tower"]]) == 0.0


def test_em_takes_the_best_of_several_answers_and_averages_over_examples():
    predictions = ["Paris", "Rome"]
    references = [["London", "paris."], ["Milan"]]  # 1st matches its 2nd answer, 2nd misses
    assert score("EM", predictions, references) == 0.5


def test_em_of_an_empty_prediction():
    assert score("EM", [""], [["Paris"]]) == 0.0
    # An answer that is only an article normalises to "", so the empty prediction matches it.
    assert score("EM", [""], [["the"]]) == 1.0


def test_an_example_without_answers_scores_zero():
    assert score("EM", ["Paris", "Paris"], [[], ["Paris"]]) == 0.5


def test_acc_ignores_case_only():
    assert score("ACC", ["Yes"], [["yes"]]) == 1.0
    # Unlike EM, ACC keeps punctuation, articles and surrounding spaces.
    assert score("ACC", ["yes."], [["yes"]]) == 0.0
    assert score("ACC", [" yes"], [["yes"]]) == 0.0
    assert score("ACC", ["the answer"], [["answer"]]) == 0.0
    assert score("ACC", ["no", "No"], [["yes", "no"], ["yes"]]) == 0.5


def test_qa_f1_is_token_overlap_after_normalisation():
    # "the cat sat on the mat" -> cat sat on mat (4 tokens); "a cat on the mat" -> cat on mat (3)
    # overlap 3: P = 3/4, R = 3/3, F1 = 2 * 3/4 / (7/4) = 6/7
    assert score("QA-F1", ["the cat sat on the mat"], [["a cat on the mat"]]) == pytest.approx(6 / 7)


def test_qa_f1_takes_the_best_answer():
    # Against "cat sat": P = 2/4, R = 1, F1 = 2/3; against "a cat on the mat": 6/7, the max.
    got = score("QA-F1", ["the cat sat on the mat"], [["cat sat", "a cat on the mat"]])
    assert got == pytest.approx(6 / 7)


def test_qa_f1_counts_repeated_tokens_once_per_match():
    # "cat cat" vs "cat": one shared token, P = 1/2, R = 1, F1 = 2/3
    assert score("QA-F1", ["cat cat"], [["cat"]]) == pytest.approx(2 / 3)


def test_qa_f1_of_an_empty_prediction_is_zero_even_where_em_is_one():
    assert score("QA-F1", [""], [["Paris"]]) == 0.0
    assert score("QA-F1", ["a"], [["the"]]) == 0.0  # both normalise to nothing: no shared token
    assert score("EM", ["a"], [["the"]]) == 1.0


# --- label metrics --------------------------------------------------------------------------------


def test_classification_f1_is_macro_f1_against_the_first_answer():
    gold = ["pos", "pos", "neg", "neg", "neu", "neu"]
    predictions = ["pos", "neg", "neg", "neg", "pos", "neu"]
    # pos: TP 1 (#0), FP 1 (#4), FN 1 (#1) -> 2*1 / (2+1+1) = 1/2
    # neg: TP 2 (#2,#3), FP 1 (#1), FN 0   -> 4/5
    # neu: TP 1 (#5), FP 0, FN 1 (#4)      -> 2/3
    # macro = (1/2 + 4/5 + 2/3) / 3 = 59/90
    # Second answers that would agree with each prediction must not count.
    references = [[g, p] for g, p in zip(gold, predictions)]
    assert score("Classification-F1", predictions, references) == pytest.approx(59 / 90)


def test_classification_f1_counts_an_out_of_set_prediction_as_a_class():
    # Classes a, b and x: a F1 1, b F1 0 (missed), x F1 0 (never gold) -> 1/3, not 1/2.
    assert score("Classification-F1", ["a", "x"], [["a"], ["b"]]) == pytest.approx(1 / 3)


def test_classification_f1_compares_raw_strings():
    # No normalisation: "Pos" is not "pos". Classes pos and Pos both get F1 0.
    assert score("Classification-F1", ["Pos"], [["pos"]]) == 0.0


def test_mcc_treats_acceptable_as_positive_and_everything_else_as_negative():
    gold = ["acceptable", "acceptable", "unacceptable", "unacceptable", "acceptable"]
    predictions = ["acceptable", " acceptable ", "acceptable", "unacceptable", "garbage"]
    # predictions are stripped -> positive, positive, positive, negative, negative
    # TP 2, FP 1, TN 1, FN 1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert score("MCC", predictions, [[g] for g in gold]) == pytest.approx(1 / 6)


def test_mcc_of_constant_predictions_is_zero():
    gold = [["acceptable"], ["unacceptable"], ["acceptable"]]
    assert score("MCC", ["acceptable"] * 3, gold) == 0.0
    assert score("MCC", ["acceptable", "unacceptable", "acceptable"], gold) == pytest.approx(1.0)


def test_pearson_parses_numbers():
    # x = pred 1, 2.5, 3 ; y = gold 1, 2, 4
    # hand: x - mean = (-7/6, 1/3, 5/6), y - mean = (-4/3, -1/3, 5/3)
    # r = (14/9 - 1/9 + 25/18) / sqrt((49 + 4 + 25)/36 * (16 + 1 + 25)/9) = (51/18) / sqrt(13/6 * 42/9)
    expected = (51 / 18) / math.sqrt((13 / 6) * (42 / 9))
    got = score("Pearson", ["1", " 2.5 ", "3"], [["1"], ["2"], ["4"]])
    assert got == pytest.approx(expected)
    assert got == pytest.approx(0.89104, abs=1e-5)


def test_pearson_is_nan_when_any_prediction_is_not_a_number():
    # CrossFit turns "two" into NaN and scipy's pearsonr then returns NaN for the whole task.
    assert math.isnan(score("Pearson", ["1", "two", "3"], [["1"], ["2"], ["4"]]))


def test_pearson_of_constant_predictions_is_nan():
    assert math.isnan(score("Pearson", ["3", "3", "3"], [["1"], ["2"], ["4"]]))


def test_crossfit_long_names_are_accepted():
    assert score("Pearson-Correlation", ["1", "2", "4"], [["1"], ["2"], ["4"]]) == pytest.approx(1.0)
    assert score("Matthew-Correlation", ["acceptable", "no"], [["acceptable"], ["no"]]) == 1.0


# --- Rouge-L (the `rouge` 1.0.0 package's variant) ------------------------------------------------


def test_rouge_l_counts_distinct_words():
    # hyp "the cat sat on the mat": distinct words {the, cat, sat, on, mat} -> 5
    # ref "the cat lay on a mat": 6 distinct words; LCS "the cat on mat" -> 4 words
    # P = 4/5, R = 4/6, F = 2PR/(P+R) = 8/11 (textbook Rouge-L would give 4/6 with 6 hyp words)
    got = score("Rouge-L", ["the cat sat on the mat"], [["the cat lay on a mat"]])
    assert got == pytest.approx(8 / 11)


def test_rouge_l_is_case_sensitive_and_does_not_normalise():
    # "The" != "the": LCS "cat", P = R = 1/2, F = 1/2
    assert score("Rouge-L", ["The cat"], [["the cat"]]) == pytest.approx(0.5)


def test_rouge_l_unions_lcs_over_sentences_split_on_dots():
    # Sentences swapped: per-sentence LCSs cover all 4 words, so F = 1 (one flat LCS would give 1/2).
    assert score("Rouge-L", ["cat sat. dog ran"], [["dog ran. cat sat"]]) == pytest.approx(1.0)


def test_rouge_l_depends_on_which_lcs_rouge_picks():
    # ref "a b a", pred "a a b": both "a b" and "a a" are LCSs of length 2. rouge walks back from
    # the ends: a != b, and dropping the ref's last word ("a b" vs "a a b": 2) is not strictly
    # better than dropping the pred's ("a b a" vs "a a": 2), so it drops the pred's "b" and ends
    # on "a a": one distinct word of two on each side, P = R = 1/2. Swapped, it finds "a b": F = 1.
    assert score("Rouge-L", ["a a b"], [["a b a"]]) == pytest.approx(0.5)
    assert score("Rouge-L", ["a b a"], [["a a b"]]) == pytest.approx(1.0)


def test_rouge_l_takes_the_best_answer():
    references = [["dog ran", "the cat lay on a mat"]]
    assert score("Rouge-L", ["the cat sat on the mat"], references) == pytest.approx(8 / 11)


def test_rouge_l_of_an_empty_or_punctuation_only_prediction_is_zero():
    assert score("Rouge-L", ["", "...", "cat"], [["cat"], ["cat"], ["cat"]]) == pytest.approx(1 / 3)


# --- errors ----------------------------------------------------------------------------------------


def test_unknown_metric_names_itself_and_the_valid_ones():
    with pytest.raises(ValueError, match="unknown metric 'BLEU'") as err:
        score("BLEU", ["a"], [["a"]])
    assert "Classification-F1" in str(err.value) and "Rouge-L" in str(err.value)


def test_predictions_and_references_must_pair_up():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("EM", ["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        score("ACC", [], [])


def test_label_metrics_need_a_first_answer():
    with pytest.raises(ValueError, match="example 1 has no reference answer"):
        score("Classification-F1", ["a", "b"], [["a"], []])


def test_pearson_needs_numeric_gold_and_two_examples():
    with pytest.raises(ValueError, match="not a number"):
        score("Pearson", ["1", "2"], [["1"], ["two"]])
    with pytest.raises(ValueError, match="at least 2"):
        score("Pearson", ["1"], [["1"]])


# --- relative gain and ARG -------------------------------------------------------------------------


def test_relative_gain_is_relative_to_the_pt_baseline():
    assert relative_gain(0.6, 0.5) == pytest.approx(0.2)
    assert relative_gain(0.4, 0.5) == pytest.approx(-0.2)


def test_relative_gain_keeps_the_plain_formula_for_negative_baselines():
    # MCC -0.1 -> 0.2 is an improvement, yet (0.2 - (-0.1)) / -0.1 = -3, as in the papers.
    assert relative_gain(0.2, -0.1) == pytest.approx(-3.0)


def test_relative_gain_over_a_zero_baseline_is_undefined_and_arg_leaves_that_task_out():
    # PT that always answers one label scores MCC 0: no gain is defined, the other tasks still count
    collapsed = matthews_corr(["unacceptable"] * 4, [["acceptable"], ["unacceptable"]] * 2)
    assert collapsed == 0 and relative_gain(0.3, collapsed) is None
    assert arg({"glue-cola": None, "glue-rte": 0.2, "superglue-cb": -0.1}) == pytest.approx(5.0)
    assert arg({"glue-cola": None}) is None


def test_arg_is_the_mean_gain_in_percent():
    assert arg({"glue-rte": 0.2, "superglue-cb": -0.1}) == pytest.approx(5.0)
    assert arg([0.1, 0.3]) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="at least one task"):
        arg({})


def test_arg_interval_bootstraps_over_tasks_and_seeds():
    pt = {"a": {100: 0.5, 13: 0.6, 21: 0.7}, "b": {100: 0.4, 13: 0.4, 21: 0.4}}
    same = arg_interval(pt, pt)
    assert same == (0.0, 0.0)  # no difference in any resample
    better = {"a": {s: v + 0.1 for s, v in pt["a"].items()}, "b": {100: 0.4, 13: 0.6, 21: 0.5}}
    lo, hi = arg_interval(better, pt)
    point = arg({"a": 0.1 / 0.6, "b": 0.1 / 0.4})
    assert 0 < lo < point < hi  # the interval holds the point estimate and excludes 0
    # the extremes a resample can reach: task b on seed 100 only (+0%) and on seed 13 only (+50%)
    assert 0 <= lo and hi <= 50.0 + 1e-9
    assert arg_interval(better, pt) == (lo, hi)  # seeded: the same interval every time


def test_arg_interval_of_nan_scores_is_nan_not_an_error():
    # CrossFit's Pearson of constant predictions is NaN on every seed: no resample has a number
    lo, hi = arg_interval({"stsb": {100: 0.5, 13: 0.6}}, {"stsb": {100: float("nan"), 13: float("nan")}})
    assert math.isnan(lo) and math.isnan(hi)


def test_arg_difference_interval_is_paired_over_the_same_resamples():
    from core.metrics import arg_difference_interval

    pt = {"a": {100: 0.5, 13: 0.6, 21: 0.7}, "b": {100: 0.4, 13: 0.5, 21: 0.4}}
    up = {t: {s: v * 1.2 for s, v in seeds.items()} for t, seeds in pt.items()}  # +20% on every split
    noisy = {"a": {100: 0.9, 13: 0.5, 21: 0.7}, "b": {100: 0.3, 13: 0.7, 21: 0.5}}
    # a method against itself: 0 on every resample, however wide its own interval is
    assert arg_difference_interval(noisy, noisy, pt) == (0.0, 0.0)
    assert arg_interval(noisy, pt)[1] - arg_interval(noisy, pt)[0] > 10
    # a constant +20% against PT's own scores: exactly 20 points on every resample
    lo, hi = arg_difference_interval(up, pt, pt)
    assert lo == pytest.approx(20.0) and hi == pytest.approx(20.0)
    lo, hi = arg_difference_interval(up, noisy, pt)
    assert lo < arg({t: 0.2 for t in pt}) - arg({t: (sum(noisy[t].values()) - sum(pt[t].values())) / sum(pt[t].values())
                                                for t in pt}) < hi
