"""`python -m hyperprompt_jax.train --gin_file=... --gin.NAME=VALUE`: fine-tune from gin.

The method (model tuning, prompt tuning, SPoT, SMoP, HyperPrompt) is chosen by the gin
files; this module only runs the loop that is the same for all of them:

    restore or initialise -> [train step -> log -> checkpoint -> evaluate]* -> table

`train(...)` is gin-configured by `gin/runs/finetune.gin` (t5x's run-gin macros:
`MODEL_DIR`, `MIXTURE_OR_TASK_NAME`, `TASK_FEATURE_LENGTHS`, `TRAIN_STEPS`,
`BATCH_SIZE`, `INITIAL_CHECKPOINT_PATH`, `EVAL_PERIOD`, `SAVE_PERIOD`, `KEEP`, ...).

Re-running the same command resumes from the newest checkpoint in `MODEL_DIR`: the
parameters, optimizer state and step are restored, the data stream skips the batches
already used, and dropout keys depend on the step only, so the losses continue exactly
as if the run had never stopped. Records written after that checkpoint are dropped, so
`train_metrics.jsonl` and `eval_metrics.jsonl` read as one run; re-running a finished
run does nothing.

Nothing is lost: SIGTERM (preemption) saves a checkpoint at the step reached, on every
host together, and stops with a line that says so (`preemption.py`); one run at a
time holds `MODEL_DIR` (`model_dir.RunLock`); a full disk ends with one line and
leaves no partial checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("train")

import dataclasses
import errno
import logging
import os
import signal
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

import gin
from hyperprompt_jax import checkpoints, data, errors, gin_utils, optim, preemption, summaries
from hyperprompt_jax import evaluation as evaluation_lib
from hyperprompt_jax import model_dir as model_dir_lib
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import trainer as trainer_lib
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

_FROM_GIN_MACRO = "TRAINABLE_PATTERNS from gin"


@dataclasses.dataclass
class TrainResult:
    """What `train` returns.

    Attributes:
      step: the final step.
      last_eval: `{task: {metric: value}}` of the last evaluation (empty if none).
      best: `{task: {'step', 'metric', 'value'}}`: each task's best checkpoint.
      train_metrics: the records written to `train_metrics.jsonl` by this process.
      stopped_early: early stopping ended the run before `TRAIN_STEPS`.
    """

    step: int
    last_eval: dict
    best: dict
    train_metrics: list
    stopped_early: bool = False


def _check_prompt_slots(converter: seqio.FeatureConverter, model: Any) -> None:
    """Packed rows must reserve exactly the model's prompt positions per example
    (`packing`): too few would overwrite real tokens, too many would feed the model
    slot tokens as text."""
    if not getattr(converter, "pack", False):
        return
    slots = getattr(converter, "prompt_length", 0)
    wanted = getattr(model, "input_prompt_length", 0)
    if slots != wanted:
        raise UserError(
            f"The feature converter packs {slots} prompt slots per example but the model's "
            f"input prompt has {wanted} positions; build it with prompt_length={wanted}."
        )


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{name} must be a positive int, got {value!r}.")


def _first_non_finite(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for record in records:
        if not bool(record["finite"]):
            return record
    return None


def train(
    *,
    model: Any,
    train_dataset_cfg: data.DatasetConfig,
    model_dir: str,
    total_steps: int,
    partitioner: partitioning_lib.Partitioner | None = None,
    optimizer_def: Callable[..., Any] = optim.adafactor,
    learning_rate_fn: Callable[[Any], Any] | None = None,
    eval_dataset_cfg: data.DatasetConfig | None = None,
    eval_period: int | None = None,
    eval_num_examples: int | None = None,
    save_period: int = 1000,
    keep: int | None = 3,
    log_period: int = 100,
    initial_checkpoint_path: str | None = None,
    trainable_patterns: Any = _FROM_GIN_MACRO,
    random_seed: int = 0,
    decoder_params: Mapping[str, Any] | None = None,
    feature_converter: seqio.FeatureConverter | None = None,
    early_stopping_patience: int | None = None,
    self_contained_checkpoints: bool = False,
) -> TrainResult:
    """Trains (or resumes) a model; the gin-configured core of the train entry point.

    Args:
      model: `models.EncoderDecoderModel` (gin `%MODEL`, hooks set by the method gin).
      train_dataset_cfg: training mixture / task, lengths, batch size, seed.
      model_dir: checkpoints, metrics, TensorBoard events and `config.gin` go here;
        one run at a time (`model_dir.RunLock`).
      total_steps: train until this step (counted from 0 for a fresh run).
      partitioner: the device mesh and logical rules (default: data parallel).
      optimizer_def: `learning_rate_fn -> optax.GradientTransformation`.
      learning_rate_fn: schedule (default `optim.create_learning_rate_scheduler()`
        with its gin bindings).
      eval_dataset_cfg: evaluation data (seqio metrics); None disables evaluation.
      eval_period: evaluate every this many steps (and at the end); None: at the end.
      eval_num_examples: evaluate only the first N examples of each task.
      save_period: checkpoint every this many steps (and at the end).
      keep: number of recent checkpoints kept (None: all); each task's best
        checkpoint is kept as well.
      log_period: a progress line and a `train_metrics.jsonl` record every N steps.
      initial_checkpoint_path: t5x checkpoint or Hugging Face T5 directory for the
        backbone of a fresh run (method parameters start fresh); ignored on resume.
      trainable_patterns: regexes of the trained parameters; default: gin macro
        `TRAINABLE_PATTERNS` (unset = all).
      random_seed: parameter initialisation and dropout.
      decoder_params: extra arguments of the decode function during evaluation.
      feature_converter: default `EncDecTaskIdFeatureConverter` (adds `task_ids`,
        checks them against the gin macro `NUM_TASKS` if set).
      early_stopping_patience: stop after this many evaluations in a row without a
        new best `evaluation.best_score` of any task (None: never). The count
        survives restarts (it is read back from `eval_metrics.jsonl`).
      self_contained_checkpoints: with frozen parameters, write them into every train
        checkpoint too (default: trainable-only checkpoints that reference the backbone;
        see `hyperprompt_jax.checkpoints.train_state`).

    Returns:
      A `TrainResult`.

    Raises:
      UserError: bad settings, an unknown task, task ids out of range, a `model_dir`
        that cannot be written or is in use, an initial checkpoint that does not fit
        the model (all before training starts), a full disk, or a non-finite loss or
        update (the last good checkpoint stays).
      errors.Preempted: SIGTERM; the state was saved at the step reached.
    """
    # ---- Validate everything cheap before anything expensive. ----------------------
    _check_positive("TRAIN_STEPS", total_steps)
    _check_positive("SAVE_PERIOD", save_period)
    _check_positive("LOG_PERIOD", log_period)
    _check_positive("EVAL_PERIOD", eval_period, allow_none=True)
    _check_positive("EARLY_STOPPING_PATIENCE", early_stopping_patience, allow_none=True)
    train_dataset_cfg.check_batch_size("BATCH_SIZE")
    if eval_dataset_cfg is not None:
        eval_dataset_cfg.check_batch_size("EVAL_BATCH_SIZE")
    if early_stopping_patience is not None and eval_dataset_cfg is None:
        raise UserError("EARLY_STOPPING_PATIENCE needs evaluation (an eval dataset).")
    model_dir_lib.ensure_writable_dir(model_dir, "MODEL_DIR")
    num_tasks = gin_utils.query_macro("NUM_TASKS", None)
    name, split = train_dataset_cfg.mixture_or_task_name, train_dataset_cfg.split
    data.check_data(name, split)
    data.check_num_tasks(name, split, num_tasks)
    if trainable_patterns == _FROM_GIN_MACRO:
        trainable_patterns = gin_utils.query_macro("TRAINABLE_PATTERNS", None)
    converter = feature_converter or data.default_feature_converter(
        train_dataset_cfg.pack, num_tasks=num_tasks, prompt_length=model.input_prompt_length
    )
    _check_prompt_slots(converter, model)
    partitioner = partitioner or partitioning_lib.Partitioner()
    for cfg, macro in ((train_dataset_cfg, "BATCH_SIZE"), (eval_dataset_cfg, "EVAL_BATCH_SIZE")):
        if cfg is not None:
            try:
                partitioner.check_batch_size(cfg.batch_size)
            except ValueError as e:
                raise UserError(str(e).replace("BATCH_SIZE", macro, 1)) from None
    with model_dir_lib.RunLock(model_dir, "train"):
        trainer = trainer_lib.from_gin(
            evaluation_lib.model_input_shapes(converter, train_dataset_cfg),
            model=model,
            partitioner=partitioner,
            optimizer_def=optimizer_def,
            learning_rate_fn=learning_rate_fn,
            trainable_patterns=trainable_patterns,
            seed=random_seed,
        )
        checkpointer = checkpoints.Checkpointer(model_dir, keep)
        latest = checkpointer.latest_step()
        if latest is not None and latest > total_steps:
            checkpointer.close()
            raise UserError(
                f"MODEL_DIR {model_dir} holds checkpoint_{latest}, beyond TRAIN_STEPS="
                f"{total_steps}; pass --gin.TRAIN_STEPS={latest} or more to continue that "
                "run, or use a new MODEL_DIR."
            )
        loop = _TrainLoop(
            trainer=trainer,
            checkpointer=checkpointer,
            converter=converter,
            train_dataset_cfg=train_dataset_cfg,
            model_dir=model_dir,
            total_steps=total_steps,
            eval_dataset_cfg=eval_dataset_cfg,
            eval_num_examples=eval_num_examples,
            decoder_params=decoder_params,
            num_tasks=num_tasks,
            early_stopping_patience=early_stopping_patience,
            self_contained=self_contained_checkpoints,
        )
        failed = True
        try:
            result = loop.run(
                initial_checkpoint_path,
                eval_period=eval_period,
                save_period=save_period,
                log_period=log_period,
            )
            failed = False
            return result
        except Exception as error:
            if _disk_full(error):
                # Let orbax finish (or fail) the saves in flight before removing what
                # they leave; removing a directory being written breaks its thread.
                _quietly(checkpointer.wait)
                _remove_partial_checkpoints(model_dir)
                latest = _quietly(checkpointer.latest_step)
                raise UserError(
                    f"No space left on device while writing to {model_dir}. Free space, keep "
                    "fewer checkpoints (KEEP), or use a MODEL_DIR on a larger disk; the newest "
                    f"complete checkpoint is checkpoint_{latest} and a re-run resumes from it."
                ) from None
            raise
        finally:
            if failed:  # Do not let a second error hide the first.
                _quietly(checkpointer.close)
            else:
                checkpointer.close()


def _quietly(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:  # noqa: BLE001 (already failing with a better error)
        return None


def _disk_full(error: BaseException | None) -> bool:
    """True if `error` or one it was raised from is "No space left on device"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _remove_partial_checkpoints(model_dir: str) -> None:
    """Deletes orbax's temporary (unfinished) checkpoint directories (process 0)."""
    if jax.process_index() != 0 or not tf.io.gfile.isdir(model_dir):
        return
    for name in tf.io.gfile.listdir(model_dir):
        if ".orbax-checkpoint-tmp" in name:
            _quietly(lambda n=name: tf.io.gfile.rmtree(os.path.join(model_dir, n)))


def _initial_state(trainer, checkpointer, initial_checkpoint_path, self_contained=False):
    """Resume, or the initial checkpoint, or a fresh initialisation (see
    `checkpoints.train_state.initial_state`)."""
    return checkpoints.train_state.initial_state(
        trainer, checkpointer, initial_checkpoint_path, self_contained
    )


class _EvalHistory:
    """Each task's best `best_score` so far and evaluations since any task improved.

    Rebuilt from `eval_metrics.jsonl` on resume, so early stopping's count and the
    "already evaluated" test continue across restarts.
    """

    def __init__(self, records: Sequence[Mapping[str, Any]]):
        self.best: dict[str, float] = {}
        self.since_best = 0
        self.by_step: dict[int, dict[str, dict]] = {}
        for record in records:
            metrics = {k: v for k, v in record.items() if k not in ("step", "task")}
            self.by_step.setdefault(int(record["step"]), {})[record["task"]] = metrics
        for step in sorted(self.by_step):
            self.add(self.by_step[step])

    def add(self, results: Mapping[str, Mapping[str, float]]) -> list[tuple[str, float]]:
        """Records one evaluation; returns the `(task, score)` pairs that improved."""
        improved = []
        for task, metrics in results.items():
            score = evaluation_lib.best_score(
                {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            )
            if np.isfinite(score) and (task not in self.best or score > self.best[task]):
                self.best[task] = score
                improved.append((task, score))
        self.since_best = 0 if improved else self.since_best + 1
        return improved


class _TrainLoop:
    """restore -> [step -> log -> save -> evaluate]* -> final save, evaluation, table."""

    def __init__(
        self,
        *,
        trainer: trainer_lib.Trainer,
        checkpointer: checkpoints.Checkpointer,
        converter: seqio.FeatureConverter,
        train_dataset_cfg: data.DatasetConfig,
        model_dir: str,
        total_steps: int,
        eval_dataset_cfg: data.DatasetConfig | None,
        eval_num_examples: int | None,
        decoder_params: Mapping[str, Any] | None,
        num_tasks: int | None,
        early_stopping_patience: int | None,
        self_contained: bool = False,
    ):
        self.trainer = trainer
        self.checkpointer = checkpointer
        self.cfg = train_dataset_cfg
        self.converter = converter
        self.model_dir = model_dir
        self.total_steps = total_steps
        self.num_tasks = num_tasks
        self.patience = early_stopping_patience
        self.self_contained = self_contained
        self.evaluation = None
        if eval_dataset_cfg is not None:  # Built first: bad eval data fails before training.
            self.evaluation = evaluation_lib.SeqioEvaluation(
                eval_dataset_cfg,
                converter,
                trainer,
                eval_num_examples,
                decoder_params,
                num_tasks=num_tasks,
                batch_size_name="EVAL_BATCH_SIZE",
            )
        self.records: list = []
        self.last_eval: dict = {}
        self.pending: list = []  # (step, device metrics) not yet checked / logged
        self.state = None
        self.writer = None
        self.history = _EvalHistory([])

    # -- pieces ------------------------------------------------------------------------

    def flush(self) -> None:
        """Fetches pending metrics, stops on a non-finite step, writes the log line."""
        if not self.pending:
            return
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        self.pending.clear()
        bad = _first_non_finite([dict(m, step=s) for s, m in fetched])
        if bad is not None:
            latest = self.checkpointer.latest_step()
            where = f"checkpoint_{latest}" if latest is not None else "no checkpoint yet"
            raise UserError(
                f"Non-finite loss ({bad['loss']}) or update at step {bad['step']}; training "
                f"stopped and the step was not applied. The last good checkpoint in "
                f"{self.model_dir} is {where}. Lower the learning rate or check the data."
            )
        keys = [k for k in fetched[-1][1] if k != "finite"]
        mean = {k: float(np.mean([np.asarray(m[k], np.float64) for _, m in fetched])) for k in keys}
        self.records.append(self.writer.write_train(fetched[-1][0], mean, len(fetched)))

    def evaluate(self, at_step: int) -> None:
        """Evaluates, records, keeps each improved task's checkpoint as its best."""
        if self.evaluation is None or not self.evaluation.task_names:
            return
        self.flush()
        self.last_eval = self.evaluation.evaluate(self.state.params, at_step)
        self.writer.write_eval(at_step, self.last_eval)
        improved = self.history.add(self.last_eval)
        if improved:
            self.checkpointer.save(at_step, self.state, force=True)
            for task, score in improved:
                name = evaluation_lib.best_score_name(self.last_eval[task])
                self.checkpointer.record_best(task, at_step, name, score)

    def patience_exhausted(self) -> bool:
        return self.patience is not None and self.history.since_best >= self.patience

    def save_and_stop(self, step: int, signum: int | None) -> None:
        self.flush()
        self.checkpointer.save(step, self.state, force=True)
        self.checkpointer.wait()
        _write_config(self.model_dir, self.trainer)
        self.writer.close()
        name = signal.Signals(signum).name if signum else "a preemption notice"
        raise errors.Preempted(
            f"{name} at step {step}/{self.total_steps}: saved "
            f"{self.model_dir}/checkpoint_{step} and the metrics; re-run the same command "
            "to resume."
        )

    # -- the loop ----------------------------------------------------------------------

    def run(
        self,
        initial_checkpoint_path: str | None,
        *,
        eval_period: int | None,
        save_period: int,
        log_period: int,
    ) -> TrainResult:
        chief = jax.process_index() == 0
        trainer, checkpointer = self.trainer, self.checkpointer
        with preemption.PreemptionNotice() as notice:
            self.state = _initial_state(
                trainer, checkpointer, initial_checkpoint_path, self.self_contained
            )
            step = int(jax.device_get(self.state.step))
            model_dir_lib.truncate_records(self.model_dir, step)
            self.history = _EvalHistory(
                model_dir_lib.read_records(self.model_dir, summaries.EVAL_METRICS_FILE)
            )
            trainable, total = _param_counts(trainer)
            logger.info(
                "Mesh %s | %d of %d parameters trainable | optimizer state %.1f MB",
                dict(trainer.partitioner.mesh.shape),
                trainable,
                total,
                trainer_lib.tree_bytes(trainer.layout.abstract.opt_state) / 1e6,
            )
            evaluated_at_end = self.evaluation is None or step in self.history.by_step
            stopped_early = self.patience_exhausted()
            if (step >= self.total_steps or stopped_early) and evaluated_at_end:
                if stopped_early:
                    logger.info(
                        "Early stopping (before step %d): no new best score in the last %d "
                        "evaluations; nothing to do.", step, self.history.since_best,
                    )  # fmt: skip
                else:
                    logger.info("Already at step %d = TRAIN_STEPS, evaluated; nothing to do.", step)
                self.last_eval = self.history.by_step.get(step, {})
                return self._finish(step, chief, write_config=False, stopped_early=stopped_early)
            self.writer = summaries.MetricsWriter(
                self.model_dir, self.total_steps, self.cfg.batch_size
            )
            self.writer.start(step)
            if step < self.total_steps and not stopped_early:
                ds = data.get_dataset(
                    self.cfg, self.converter, skip_batches=step, partitioner=trainer.partitioner
                )
                batches = data.iterate_batches(ds, trainer.partitioner, self.num_tasks)
                wrote_config = False
                while step < self.total_steps:
                    if notice.reached(step):
                        self.save_and_stop(step, notice.signal_received)
                    try:
                        batch = next(batches)
                    except StopIteration:
                        raise UserError(
                            f"The training data of {self.cfg.mixture_or_task_name!r} ran out "
                            f"at step {step}; it should repeat forever."
                        ) from None
                    self.state, metrics = trainer.train_step(self.state, batch)
                    step += 1
                    self.pending.append((step, metrics))
                    if not wrote_config:
                        _write_config(self.model_dir, self.trainer)
                        wrote_config = True
                    if step % log_period == 0 or step == self.total_steps:
                        self.flush()
                    if step % save_period == 0 or step == self.total_steps:
                        self.flush()  # Never save a state after a rejected (non-finite) step.
                        checkpointer.save(step, self.state)
                    if eval_period and step % eval_period == 0 and step != self.total_steps:
                        self.evaluate(step)
                        if self.patience_exhausted():
                            logger.info(
                                "Early stopping at step %d: no new best score in %d "
                                "evaluations (EARLY_STOPPING_PATIENCE=%d).",
                                step, self.history.since_best, self.patience,
                            )  # fmt: skip
                            stopped_early = True
                            break
            self.flush()
            if step not in self.history.by_step:
                self.evaluate(step)
            checkpointer.save(step, self.state, force=True)
            checkpointer.wait()
            return self._finish(step, chief, write_config=True, stopped_early=stopped_early)

    def _finish(
        self, step: int, chief: bool, write_config: bool, stopped_early: bool = False
    ) -> TrainResult:
        if write_config:
            _write_config(self.model_dir, self.trainer)
        if self.writer is not None:
            self.writer.close()
        best = dict(self.checkpointer.best)
        if chief and (self.last_eval or best):
            print(
                summaries.score_table(self.last_eval, best, title=f"Per-task scores at step {step}")
            )
            sys.stdout.flush()
        return TrainResult(step, self.last_eval, best, self.records, stopped_early)


def _param_counts(trainer: trainer_lib.Trainer) -> tuple[int, int]:
    from hyperprompt_jax import trainable as trainable_lib

    return trainable_lib.count(trainer.param_shapes, trainer.trainable_patterns)


def _write_config(model_dir: str, trainer: trainer_lib.Trainer) -> None:
    """Writes the operative gin config (what this run actually used) to `config.gin`,
    with the trainable patterns actually used and the count of trained parameters."""
    if jax.process_index() == 0:
        text = summaries.config_record(
            gin.operative_config_str(),
            _FROM_GIN_MACRO,
            trainer.trainable_patterns,
            *_param_counts(trainer),
        )
        model_dir_lib.write_text(os.path.join(model_dir, "config.gin"), text)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.train --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="train", module_name="hyperprompt_jax.train")


if __name__ == "__main__":
    sys.exit(main())
