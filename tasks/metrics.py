"""Metrics of the GLUE / SuperGLUE / SQuAD tasks and the leaderboard averages.

Each metric takes `(targets, predictions)` (already postprocessed) and returns a dict
of named scores in percent, with the names and semantics of `t5.evaluation.metrics`
(so TensorBoard tags and papers' numbers line up): `accuracy`, `matthews_corrcoef`,
`f1` (binary, invalid predictions counted wrong), `pearson_corrcoef`,
`spearman_corrcoef`, `mean_<k>class_f1`, MultiRC `f1` over all answers and per-question
`exact_match`, SQuAD / ReCoRD `em` and `f1`. Written with NumPy / SciPy only.

`glue_average` / `super_glue_average` turn per-task metrics into the benchmark score:
the mean over tasks, where a task with two metrics (MRPC, QQP, STS-B, CB, MultiRC,
ReCoRD, and MNLI matched / mismatched) is first averaged over them, as in the t5
library's `eval_utils.compute_avg_glue`.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

MetricFn = Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]


def _arrays(targets: Sequence[Any], predictions: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    targets, predictions = np.asarray(targets), np.asarray(predictions)
    if targets.shape != predictions.shape:
        raise ValueError(
            f"Got {targets.shape[0] if targets.ndim else 0} targets but "
            f"{predictions.shape[0] if predictions.ndim else 0} predictions; expected equal counts."
        )
    return targets, predictions


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Percentage of predictions equal to their target."""
    targets, predictions = _arrays(targets, predictions)
    return {"accuracy": 100.0 * float(np.mean(targets == predictions))}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Matthews correlation x 100 (CoLA), multi-class form; 0 when undefined.

    MCC = (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), with c
    correct predictions, s examples, t_k / p_k true / predicted counts of class k
    (an invalid prediction, -1, is a class of its own).
    """
    targets, predictions = _arrays(targets, predictions)
    classes = np.union1d(targets, predictions)
    t_counts = np.array([np.sum(targets == k) for k in classes], dtype=np.float64)
    p_counts = np.array([np.sum(predictions == k) for k in classes], dtype=np.float64)
    s = float(len(targets))
    c = float(np.sum(targets == predictions))
    cov_tp = c * s - t_counts @ p_counts
    cov_pp = s * s - p_counts @ p_counts
    cov_tt = s * s - t_counts @ t_counts
    mcc = 0.0 if cov_pp * cov_tt == 0 else cov_tp / np.sqrt(cov_tt * cov_pp)
    return {"matthews_corrcoef": 100.0 * float(mcc)}


def _f1(tp: float, fp: float, fn: float) -> float:
    # 2PR / (P + R) simplifies to 2tp / (2tp + fp + fn); 0 when there is no positive.
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Binary F1 x 100 of class 1; a prediction other than 0/1 counts as wrong."""
    targets, predictions = _arrays(targets, predictions)
    predictions = predictions.copy()
    invalid = (predictions != 0) & (predictions != 1)
    predictions[invalid] = 1 - targets[invalid]
    tp = np.sum((predictions == 1) & (targets == 1))
    fp = np.sum((predictions == 1) & (targets == 0))
    fn = np.sum((predictions == 0) & (targets == 1))
    return {"f1": 100.0 * _f1(tp, fp, fn)}


def mean_multiclass_f1(num_classes: int) -> MetricFn:
    """Returns the macro F1 over classes `0..num_classes-1` (CB: `mean_3class_f1`)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")

    def metric(targets: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
        targets, predictions = _arrays(targets, predictions)
        scores = [
            _f1(
                np.sum((predictions == k) & (targets == k)),
                np.sum((predictions == k) & (targets != k)),
                np.sum((predictions != k) & (targets == k)),
            )
            for k in range(num_classes)
        ]
        return {f"mean_{num_classes}class_f1": 100.0 * float(np.mean(scores))}

    return metric


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """Pearson correlation x 100 (STS-B)."""
    targets, predictions = _arrays(targets, predictions)
    return {"pearson_corrcoef": 100.0 * float(scipy.stats.pearsonr(targets, predictions)[0])}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation x 100 (STS-B)."""
    targets, predictions = _arrays(targets, predictions)
    return {"spearman_corrcoef": 100.0 * float(scipy.stats.spearmanr(targets, predictions)[0])}


def all_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """100 if every prediction equals its target, else 0."""
    targets, predictions = _arrays(targets, predictions)
    return {"exact_match": 100.0 * float(np.array_equal(targets, predictions))}


def mean_group_metric(
    metric_fn: MetricFn, group_key: str = "group", value_key: str = "value"
) -> MetricFn:
    """Returns `metric_fn` computed per group (targets' `group`) and averaged over groups."""

    def metric(targets: Sequence[Mapping], predictions: Sequence[Mapping]) -> dict[str, float]:
        grouped: dict[Hashable, tuple[list, list]] = collections.defaultdict(lambda: ([], []))
        for target, prediction in zip(targets, predictions, strict=True):
            group = grouped[target[group_key]]
            group[0].append(target[value_key])
            group[1].append(prediction[value_key])
        scores = collections.defaultdict(list)
        for group_targets, group_predictions in grouped.values():
            for name, value in metric_fn(group_targets, group_predictions).items():
                scores[name].append(value)
        return {name: float(np.mean(values)) for name, values in scores.items()}

    return metric


def deduplicate_metric(
    metric_fn: MetricFn, group_key: str = "group", value_key: str = "value"
) -> MetricFn:
    """Returns `metric_fn` on the first example of each group (ReCoRD: one per query)."""

    def metric(targets: Sequence[Mapping], predictions: Sequence[Mapping]) -> dict[str, float]:
        seen = set()
        kept_targets, kept_predictions = [], []
        for target, prediction in zip(targets, predictions, strict=True):
            if target[group_key] in seen:
                continue
            seen.add(target[group_key])
            kept_targets.append(target[value_key])
            kept_predictions.append(prediction[value_key])
        return metric_fn(kept_targets, kept_predictions)

    return metric


def multirc_f1_over_all_answers(
    targets: Sequence[Mapping], predictions: Sequence[Mapping]
) -> dict[str, float]:
    """MultiRC F1 over every (question, answer) pair."""
    return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


# ----------------------------------------------------------------------------- QA


def normalize_squad(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower case, no punctuation / articles."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(target: str, prediction: str) -> float:
    prediction_tokens, target_tokens = prediction.split(), target.split()
    common = collections.Counter(prediction_tokens) & collections.Counter(target_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def squad(targets: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, float]:
    """SQuAD exact match and token F1 x 100, each maximised over the reference answers."""
    if len(targets) != len(predictions):
        raise ValueError(
            f"Got {len(targets)} targets but {len(predictions)} predictions; expected equal counts."
        )
    ems, f1s = [], []
    for references, prediction in zip(targets, predictions, strict=True):
        prediction = normalize_squad(prediction)
        references = [normalize_squad(r) for r in references]
        ems.append(max(float(r == prediction) for r in references))
        f1s.append(max(_token_f1(r, prediction) for r in references))
    return {"em": 100.0 * float(np.mean(ems)), "f1": 100.0 * float(np.mean(f1s))}


# ------------------------------------------------------------- leaderboard averages

# (task score name, [(t5 task name, metric name), ...]): a task with several metrics
# is averaged over them before the benchmark average (t5's `compute_avg_glue` groups).
GLUE_SCORE_GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("cola", (("glue_cola_v002", "matthews_corrcoef"),)),
    ("sst2", (("glue_sst2_v002", "accuracy"),)),
    ("mrpc", (("glue_mrpc_v002", "f1"), ("glue_mrpc_v002", "accuracy"))),
    ("stsb", (("glue_stsb_v002", "pearson_corrcoef"), ("glue_stsb_v002", "spearman_corrcoef"))),
    ("qqp", (("glue_qqp_v002", "f1"), ("glue_qqp_v002", "accuracy"))),
    (
        "mnli",
        (("glue_mnli_matched_v002", "accuracy"), ("glue_mnli_mismatched_v002", "accuracy")),
    ),
    ("qnli", (("glue_qnli_v002", "accuracy"),)),
    ("rte", (("glue_rte_v002", "accuracy"),)),
)
WNLI_SCORE_GROUP = ("wnli", (("glue_wnli_v002", "accuracy"),))
SUPER_GLUE_SCORE_GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("boolq", (("super_glue_boolq_v102", "accuracy"),)),
    ("cb", (("super_glue_cb_v102", "mean_3class_f1"), ("super_glue_cb_v102", "accuracy"))),
    ("copa", (("super_glue_copa_v102", "accuracy"),)),
    ("multirc", (("super_glue_multirc_v102", "f1"), ("super_glue_multirc_v102", "exact_match"))),
    ("record", (("super_glue_record_v102", "f1"), ("super_glue_record_v102", "em"))),
    ("rte", (("super_glue_rte_v102", "accuracy"),)),
    ("wic", (("super_glue_wic_v102", "accuracy"),)),
    ("wsc", (("super_glue_wsc_v102_simple_eval", "accuracy"),)),
)


def _canonical_task_name(name: str) -> str:
    """`hp_glue_rte_v002_task_id` -> `glue_rte_v002` (the t5 library's name)."""
    name = name.removeprefix("hp_")
    return name.removesuffix("_task_id")


def _flatten_scores(metrics_by_task: Mapping[str, Any]) -> dict[tuple[str, str], float]:
    flat = {}
    for key, value in metrics_by_task.items():
        if isinstance(value, Mapping):
            for metric, score in value.items():
                flat[(_canonical_task_name(key), metric)] = float(score)
        elif "/" in key:  # "task/metric" (TensorBoard tag style)
            task, metric = key.rsplit("/", 1)
            flat[(_canonical_task_name(task), metric)] = float(value)
        else:
            raise ValueError(
                f"Cannot read score {key!r}: expected {{task: {{metric: value}}}} or "
                "{'task/metric': value}."
            )
    return flat


def _benchmark_average(
    metrics_by_task: Mapping[str, Any], groups, benchmark: str
) -> tuple[float, dict[str, float]]:
    flat = _flatten_scores(metrics_by_task)
    missing = [f"{t}/{m}" for _, members in groups for t, m in members if (t, m) not in flat]
    if missing:
        raise ValueError(
            f"The {benchmark} average needs {', '.join(missing)}; got "
            f"{sorted(f'{t}/{m}' for t, m in flat)}."
        )
    per_task = {name: float(np.mean([flat[m] for m in members])) for name, members in groups}
    return float(np.mean(list(per_task.values()))), per_task


def glue_average(
    metrics_by_task: Mapping[str, Any], include_wnli: bool = False
) -> tuple[float, dict[str, float]]:
    """The GLUE score: mean of the task scores (two-metric tasks averaged first).

    Args:
      metrics_by_task: `{task_name: {metric: value}}` (seqio / eval_metrics.jsonl
        style; names with or without `hp_` / `_task_id`) or `{"task/metric": value}`.
      include_wnli: add WNLI as a ninth task (the GLUE leaderboard scores it; the t5
        library's average and HyperPrompt's 8-task GLUE do not).

    Returns:
      `(average, {task: task_score})`.

    Raises:
      ValueError: naming each missing `task/metric`.
    """
    groups = GLUE_SCORE_GROUPS + ((WNLI_SCORE_GROUP,) if include_wnli else ())
    return _benchmark_average(metrics_by_task, groups, "GLUE")


def super_glue_average(metrics_by_task: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
    """The SuperGLUE score over its 8 tasks (CB, MultiRC, ReCoRD averaged over 2 metrics)."""
    return _benchmark_average(metrics_by_task, SUPER_GLUE_SCORE_GROUPS, "SuperGLUE")
