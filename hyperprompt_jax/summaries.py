"""What a person watches during a run: progress lines, JSON-lines metrics, TensorBoard.

Only process 0 writes. Files in the model directory (DESIGN.md, public contract):

* `train_metrics.jsonl`: one JSON object per logged step: `step`, `loss`,
  `learning_rate`, `examples_per_second` and `target_tokens_per_second` (real
  examples and non-padding targets, packed or not), plus the model's metrics (`accuracy`,
  `z_loss`, `grad_norm`, ...) and sown statistics (SMoP: `prompt/router_probs/...`,
  `prompt/prompt_fraction/<i>`, `prompt/mean_max_prob`), averaged over the steps since
  the previous line.
* `eval_metrics.jsonl`: one object per evaluated task: `step`, `task`, metric values.
* TensorBoard events (clu `metric_writers`): `train/<metric>` and `eval/<task>/<metric>`.

The progress line (`step 120/1000 | loss 2.3451 | lr 1.00e-03 | 812 ex/s | 0:00:42
elapsed | 0:05:10 left`) goes to the `hyperprompt_jax` logger.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf
from clu import metric_writers

logger = logging.getLogger("hyperprompt_jax")

TRAIN_METRICS_FILE = "train_metrics.jsonl"
EVAL_METRICS_FILE = "eval_metrics.jsonl"


def _jsonable(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)  # JSON has no NaN / inf.
        return value
    return value.tolist()


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MetricsWriter:
    """Writes train / eval metrics to JSON lines, TensorBoard and the progress log.

    Args:
      model_dir: the run's directory.
      total_steps: the step the run ends at (for the time estimate).
      batch_size: global rows per step (examples per step when the metrics have no
        `num_examples`, the model's count, which packed rows need).
    """

    def __init__(self, model_dir: str, total_steps: int, batch_size: int):
        self.model_dir = model_dir
        self.total_steps = total_steps
        self.batch_size = batch_size
        self.chief = jax.process_index() == 0
        self._tb = metric_writers.SummaryWriter(model_dir) if self.chief else None
        self._start_time = time.time()
        self._window_time = time.time()
        self._eta_origin: tuple[float, int] | None = None  # (time, step) estimates start from

    def start(self, step: int) -> None:
        """Marks the step training starts (or resumes) from, for rates and estimates."""
        self._start_time = self._window_time = time.time()
        self._eta_origin = None

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        if not self.chief:
            return
        path = os.path.join(self.model_dir, name)
        line = json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n"
        if "://" in path:  # Object stores cannot append: rewrite the (small) file.
            old = tf.io.gfile.GFile(path).read() if tf.io.gfile.exists(path) else ""
            with tf.io.gfile.GFile(path, "w") as f:
                f.write(old + line)
        else:
            with open(path, "a") as f:
                f.write(line)

    def write_train(self, step: int, metrics: Mapping[str, float], num_steps: int) -> dict:
        """Logs the metrics averaged over the last `num_steps` steps, ending at `step`.

        Returns the record written to `train_metrics.jsonl`.
        """
        now = time.time()
        elapsed = max(now - self._window_time, 1e-9)
        # The model counts examples (several per packed row); rows otherwise.
        examples = metrics.get("num_examples", self.batch_size)
        examples_per_second = num_steps * float(examples) / elapsed
        self._window_time = now
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        record["examples_per_second"] = examples_per_second
        if "num_tokens" in metrics:
            record["target_tokens_per_second"] = num_steps * float(metrics["num_tokens"]) / elapsed
        self._append(TRAIN_METRICS_FILE, record)
        if self._tb is not None:
            self._tb.write_scalars(
                step, {f"train/{k}": v for k, v in record.items() if k != "step"}
            )
            self._tb.flush()
        total_elapsed = now - self._start_time
        # The first window includes compilation: estimate the time left from the steps
        # after it (so the first line has no estimate, rather than a wild one).
        if self._eta_origin is None or step <= self._eta_origin[1]:
            self._eta_origin = (now, step)
            left = "time left after the next line"
        else:
            t0, s0 = self._eta_origin
            left = f"{_duration((now - t0) / (step - s0) * (self.total_steps - step))} left"
        if self.chief:
            logger.info(
                "step %d/%d | loss %.4f | lr %.2e | %.0f ex/s | %s elapsed | %s",
                step,
                self.total_steps,
                record.get("loss", float("nan")),
                record.get("learning_rate", float("nan")),
                examples_per_second,
                _duration(total_elapsed),
                left,
            )
        return record

    def write_eval(self, step: int, task_metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Logs `{task: {metric: value}}` of an evaluation at `step`."""
        for task, metrics in sorted(task_metrics.items()):
            self._append(EVAL_METRICS_FILE, {"step": int(step), "task": task, **metrics})
            if self._tb is not None:
                self._tb.write_scalars(step, {f"eval/{task}/{k}": v for k, v in metrics.items()})
            if self.chief:
                shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()))
                logger.info("eval step %d | %s | %s", step, task, shown)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self._tb is not None:
            self._tb.close()


def config_record(
    operative: str, placeholder: str, patterns: Sequence[str] | None, trainable: int, total: int
) -> str:
    """The `config.gin` text: gin's operative config with the trained parameters spelled out.

    Args:
      operative: `gin.operative_config_str()`.
      placeholder: the default of `train(trainable_patterns=...)` that means "read the
        TRAINABLE_PATTERNS macro"; it is replaced by the patterns the run used.
      patterns: the trainable-parameter regexes used (None: every parameter).
      trainable / total: parameter counts.
    """
    text = operative.replace(repr(placeholder), repr(None if patterns is None else list(patterns)))
    shown = "every parameter" if patterns is None else ", ".join(repr(p) for p in patterns)
    return (
        f"{text.rstrip()}\n\n"
        f"# Trained parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.4f}%)\n"
        f"# selected by TRAINABLE_PATTERNS: {shown}\n"
    )


def score_table(
    last: Mapping[str, Mapping[str, float]],
    best: Mapping[str, Mapping[str, Any]],
    title: str = "Per-task scores",
) -> str:
    """A plain-text table: task, its metrics at the last evaluation, its best score.

    Args:
      last: `{task: {metric: value}}` of the last evaluation.
      best: `{task: {'step', 'metric', 'value'}}` (Checkpointer.best).
      title: first line.
    """
    rows = []
    for task in sorted(set(last) | set(best)):
        metrics = ", ".join(f"{k} {v:.2f}" for k, v in sorted(last.get(task, {}).items()))
        b = best.get(task)
        best_text = f"{b['value']:.2f} @ step {b['step']}" if b else "-"
        rows.append((task, metrics or "-", best_text))
    header = ("task", "last evaluation", "best score (checkpoint)")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([title, line(header), sep, *[line(r) for r in rows]])
