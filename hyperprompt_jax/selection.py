"""Which checkpoint is best: the one rule used by training, evaluation and SPoT.

A task's score is the mean of its non-loss metric values (higher is better): one
metric is that metric, several are averaged as GLUE averages MRPC's F1 and accuracy.
Loss-like metrics (names containing loss, perplexity or error) are left out, since
they are lower-is-better and on another scale. NumPy only, so SPoT's light commands
can use it without TensorFlow.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

LOSS_LIKE = re.compile(r"loss|perplexity|error", re.IGNORECASE)


def is_score_metric(name: str) -> bool:
    """True for metrics that count towards `best_score` (not loss-like)."""
    return not LOSS_LIKE.search(name)


def best_score(metrics: Mapping[str, float]) -> float:
    """A task's score for picking its best checkpoint: the mean of its non-loss metrics.

    Args:
      metrics: `{metric name: value}` of one task's evaluation.

    Returns:
      The mean of the non-loss values; NaN if no metric is left.
    """
    values = [float(v) for k, v in metrics.items() if is_score_metric(k)]
    return float(np.mean(values)) if values else float("nan")


def best_score_name(metrics: Mapping[str, float]) -> str:
    """How `best_score` reads for `metrics`, e.g. `accuracy` or `mean(accuracy, f1)`."""
    names = sorted(k for k in metrics if is_score_metric(k))
    return names[0] if len(names) == 1 else f"mean({', '.join(names)})"
