"""Metrics, postprocessors and leaderboard averages against hand-computed values."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hyperprompt_jax.tasks import metrics, postprocessors


def test_accuracy():
    assert metrics.accuracy([0, 1, 1, 2], [0, 1, 0, 2]) == {"accuracy": 75.0}
    assert metrics.accuracy(["a", "b"], ["a", "c"]) == {"accuracy": 50.0}


def test_matthews_corrcoef_hand_computed():
    # TP=2, TN=2, FP=1, FN=1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    result = metrics.matthews_corrcoef([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1])
    assert result["matthews_corrcoef"] == pytest.approx(100 / 3)
    # All predictions one class: undefined correlation is reported as 0.
    assert metrics.matthews_corrcoef([0, 1, 1], [1, 1, 1])["matthews_corrcoef"] == 0.0


def test_matthews_equals_pearson_of_binary_vectors():
    # For two classes MCC is the Pearson correlation of the 0/1 vectors (independent
    # reference: NumPy's corrcoef).
    rng = np.random.default_rng(0)
    targets, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    expected = 100 * np.corrcoef(targets, predictions)[0, 1]
    assert metrics.matthews_corrcoef(targets, predictions)["matthews_corrcoef"] == pytest.approx(
        expected
    )


def test_f1_counts_invalid_predictions_as_wrong():
    # The -1 (unparsable) prediction for a positive target becomes a false negative:
    # predictions [1, 1, 0, 0] vs [1, 0, 1, 1]: TP=1, FP=1, FN=2 -> F1 = 2/(2+1+2).
    assert metrics.f1_score_with_invalid([1, 0, 1, 1], [1, 1, -1, 0])["f1"] == pytest.approx(40.0)
    # An invalid prediction for a negative target becomes a false positive.
    assert metrics.f1_score_with_invalid([1, 0], [1, 7])["f1"] == pytest.approx(100 * 2 / 3)


def test_pearson_and_spearman_hand_computed():
    targets, predictions = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0]
    # Centred: t=[-1.5,-.5,.5,1.5], p=[-1.75,.25,-.75,2.25]; r = 5.5 / sqrt(5 * 8.75).
    assert metrics.pearson_corrcoef(targets, predictions)["pearson_corrcoef"] == pytest.approx(
        100 * 5.5 / np.sqrt(5 * 8.75)
    )
    # Ranks [1,2,3,4] vs [1,3,2,4]: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert metrics.spearman_corrcoef(targets, predictions)["spearman_corrcoef"] == pytest.approx(
        80.0
    )


def test_mean_multiclass_f1_hand_computed():
    cb_f1 = metrics.mean_multiclass_f1(num_classes=3)
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 1, fp 1 -> 2/3; class 2: fn 1 -> 0.
    result = cb_f1([0, 1, 2, 0], [0, 1, 1, -1])
    assert result == {"mean_3class_f1": pytest.approx(100 * 4 / 9)}
    with pytest.raises(ValueError, match="num_classes"):
        metrics.mean_multiclass_f1(num_classes=1)


def test_multirc_f1_over_answers_and_exact_match_per_question():
    targets = [
        {"value": 1, "group": 5}, {"value": 0, "group": 5},
        {"value": 1, "group": 6}, {"value": 1, "group": 6},
    ]  # fmt: skip
    predictions = [{"value": 1}, {"value": 0}, {"value": 1}, {"value": 0}]
    # Over all answers: TP=2, FN=1 -> F1 = 4/5.
    assert metrics.multirc_f1_over_all_answers(targets, predictions) == {"f1": pytest.approx(80.0)}
    # Question 5 fully right, question 6 not: mean exact match 50.
    em = metrics.mean_group_metric(metrics.all_match)(targets, predictions)
    assert em == {"exact_match": 50.0}


def test_record_em_f1_one_copy_per_query():
    record = metrics.deduplicate_metric(metrics.squad)
    targets = [
        {"value": ["Alice", "Alice Smith"], "group": (1, 1)},
        {"value": ["Alice", "Alice Smith"], "group": (1, 1)},  # second answer's copy
        {"value": ["Bob"], "group": (1, 2)},
    ]
    predictions = [{"value": "the alice smith!"}, {"value": "wrong"}, {"value": "Bob Jones"}]
    # Query 1: normalised "alice smith" matches -> EM 1, F1 1 (the duplicate is ignored).
    # Query 2: EM 0; F1: overlap {bob}, P=1/2, R=1 -> 2/3.
    result = record(targets, predictions)
    assert result["em"] == pytest.approx(50.0)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_squad_normalisation_and_max_over_answers():
    assert metrics.normalize_squad("The  Eiffel-Tower!") == "eiffeltower"
    result = metrics.squad([["Paris", "Paris , France"], ["blue"]], ["paris, France", "red"])
    assert result == {"em": pytest.approx(50.0), "f1": pytest.approx(50.0)}


def test_postprocessors():
    assert postprocessors.string_to_float("3.4") == 3.4
    assert postprocessors.string_to_float(b"3.4") == 3.4
    assert postprocessors.string_to_float("three") == -1.0
    labels = ("not_entailment", "entailment")
    assert postprocessors.string_label_to_class_id("entailment", label_classes=labels) == 1
    assert postprocessors.string_label_to_class_id("maybe", label_classes=labels) == -1
    example = {"idx/question": 5, "idx/passage": 1, "idx/query": 2, "answers": [b"A", b"B"]}
    assert postprocessors.multirc("True", example=example, is_target=True) == {
        "value": 1,
        "group": 5,
    }
    assert postprocessors.multirc("Nope", example=example) == {"value": -1}
    assert postprocessors.record("x", example=example, is_target=True) == {
        "value": ["A", "B"],
        "group": (1, 2),
    }
    assert postprocessors.qa("x", example=example, is_target=True) == ["A", "B"]


@pytest.mark.parametrize(
    "prediction,referent,expected",
    [
        ("Tom", "Tom", 1),
        ("the suitcase", "suitcase", 1),  # determiners are ignored
        ("fuzzy bunny", "bunny", 1),  # one word set contains the other
        ("Bob", "Bob's hat", 0),  # possessive mismatch
        ("Alice", "Tom", 0),
    ],
)
def test_wsc_simple_postprocessor(prediction, referent, expected):
    example = {"targets_pretokenized": referent.encode(), "label": 1}
    assert postprocessors.wsc_simple(prediction, example=example) == expected
    assert postprocessors.wsc_simple(prediction, example=example, is_target=True) == 1


GLUE_SCORES = {
    "hp_glue_cola_v002": {"matthews_corrcoef": 50.0},
    "hp_glue_sst2_v002": {"accuracy": 90.0},
    "hp_glue_mrpc_v002": {"f1": 80.0, "accuracy": 70.0},
    "hp_glue_stsb_v002": {"pearson_corrcoef": 88.0, "spearman_corrcoef": 86.0},
    "hp_glue_qqp_v002": {"f1": 60.0, "accuracy": 80.0},
    "hp_glue_mnli_matched_v002": {"accuracy": 84.0},
    "hp_glue_mnli_mismatched_v002_task_id": {"accuracy": 82.0},
    "glue_qnli_v002": {"accuracy": 91.0},
    "hp_glue_rte_v002": {"accuracy": 75.0},
}


def test_glue_average_averages_two_metric_tasks_first():
    average, per_task = metrics.glue_average(GLUE_SCORES)
    assert per_task == {
        "cola": 50.0, "sst2": 90.0, "mrpc": 75.0, "stsb": 87.0, "qqp": 70.0,
        "mnli": 83.0, "qnli": 91.0, "rte": 75.0,
    }  # fmt: skip
    assert average == pytest.approx((50 + 90 + 75 + 87 + 70 + 83 + 91 + 75) / 8)
    with_wnli, _ = metrics.glue_average(
        {**GLUE_SCORES, "hp_glue_wnli_v002": {"accuracy": 65.1}}, include_wnli=True
    )
    assert with_wnli == pytest.approx((50 + 90 + 75 + 87 + 70 + 83 + 91 + 75 + 65.1) / 9)


def test_super_glue_average_from_tensorboard_style_tags():
    tags = {
        "super_glue_boolq_v102/accuracy": 80.0,
        "super_glue_cb_v102/mean_3class_f1": 90.0,
        "super_glue_cb_v102/accuracy": 94.0,
        "super_glue_copa_v102/accuracy": 70.0,
        "super_glue_multirc_v102/f1": 76.0,
        "super_glue_multirc_v102/exact_match": 40.0,
        "super_glue_record_v102/f1": 82.0,
        "super_glue_record_v102/em": 80.0,
        "super_glue_rte_v102/accuracy": 85.0,
        "super_glue_wic_v102/accuracy": 70.0,
        "super_glue_wsc_v102_simple_eval/accuracy": 80.0,
    }
    average, per_task = metrics.super_glue_average(tags)
    assert per_task["cb"] == 92.0 and per_task["multirc"] == 58.0 and per_task["record"] == 81.0
    assert average == pytest.approx((80 + 92 + 70 + 58 + 81 + 85 + 70 + 80) / 8)


def test_leaderboard_average_names_missing_metrics():
    partial = {k: v for k, v in GLUE_SCORES.items() if "qqp" not in k}
    with pytest.raises(ValueError, match="glue_qqp_v002/f1, glue_qqp_v002/accuracy"):
        metrics.glue_average(partial)
    with pytest.raises(ValueError, match="task/metric"):
        metrics.super_glue_average({"no_metric_name": 1.0})


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="3 targets but 2 predictions"):
        metrics.accuracy([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="expected equal counts"):
        metrics.squad([["a"]], [])


def test_metric_functions_are_deterministic_and_pure():
    # f1_score_with_invalid must not modify the caller's predictions.
    predictions = np.array([1, -1, 0])
    functools.partial(metrics.f1_score_with_invalid, [1, 1, 0])(predictions)
    np.testing.assert_array_equal(predictions, [1, -1, 0])
