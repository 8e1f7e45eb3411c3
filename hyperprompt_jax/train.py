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
as if the run had never stopped.
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("train")

import dataclasses
import logging
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

import gin
from hyperprompt_jax import eval as eval_lib
from hyperprompt_jax import gin_utils, optim, summaries, utils
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import trainer as trainer_lib

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
    """

    step: int
    last_eval: dict
    best: dict
    train_metrics: list


def _check_positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _first_non_finite(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    for record in records:
        if not bool(record["finite"]):
            return record
    return None


def train(
    *,
    model: Any,
    train_dataset_cfg: utils.DatasetConfig,
    model_dir: str,
    total_steps: int,
    partitioner: partitioning_lib.Partitioner | None = None,
    optimizer_def: Callable[..., Any] = optim.adafactor,
    learning_rate_fn: Callable[[Any], Any] | None = None,
    eval_dataset_cfg: utils.DatasetConfig | None = None,
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
) -> TrainResult:
    """Trains (or resumes) a model; the gin-configured core of the train entry point.

    Args:
      model: `models.EncoderDecoderModel` (gin `%MODEL`, hooks set by the method gin).
      train_dataset_cfg: training mixture / task, lengths, batch size, seed.
      model_dir: checkpoints, metrics, TensorBoard events and `config.gin` go here.
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
      feature_converter: default `EncDecTaskIdFeatureConverter` (adds `task_ids`).

    Returns:
      A `TrainResult`.

    Raises:
      ValueError: bad settings, an unknown task, an unwritable `model_dir`, or an
        initial checkpoint that does not fit the model (all before training starts).
      FloatingPointError: a non-finite loss or update (the last good checkpoint stays).
    """
    # ---- Validate everything cheap before anything expensive. ----------------------
    _check_positive("TRAIN_STEPS", total_steps)
    _check_positive("SAVE_PERIOD", save_period)
    _check_positive("LOG_PERIOD", log_period)
    _check_positive("EVAL_PERIOD", eval_period, allow_none=True)
    utils.ensure_writable_dir(model_dir, "MODEL_DIR")
    utils.check_data(train_dataset_cfg.mixture_or_task_name, train_dataset_cfg.split)
    if trainable_patterns == _FROM_GIN_MACRO:
        trainable_patterns = gin_utils.query_macro("TRAINABLE_PATTERNS", None)
    learning_rate_fn = learning_rate_fn or optim.create_learning_rate_scheduler()
    partitioner = partitioner or partitioning_lib.Partitioner()
    converter = feature_converter or utils.default_feature_converter(train_dataset_cfg.pack)

    trainer = trainer_lib.Trainer(
        model,
        optimizer_def,
        learning_rate_fn,
        partitioner,
        eval_lib.model_input_shapes(converter, train_dataset_cfg),
        trainable_patterns=trainable_patterns,
        seed=random_seed,
    )
    checkpointer = utils.Checkpointer(model_dir, keep)
    try:
        return _train_loop(
            trainer=trainer,
            checkpointer=checkpointer,
            converter=converter,
            train_dataset_cfg=train_dataset_cfg,
            model_dir=model_dir,
            total_steps=total_steps,
            eval_dataset_cfg=eval_dataset_cfg,
            eval_period=eval_period,
            eval_num_examples=eval_num_examples,
            save_period=save_period,
            log_period=log_period,
            initial_checkpoint_path=initial_checkpoint_path,
            decoder_params=decoder_params,
        )
    finally:
        checkpointer.close()


def _initial_state(trainer, checkpointer, initial_checkpoint_path):
    latest = checkpointer.latest_step()
    if latest is not None:
        logger.info("Resuming from %s/checkpoint_%d.", checkpointer.model_dir, latest)
        try:
            return checkpointer.restore(latest, trainer.layout.abstract)
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"MODEL_DIR {checkpointer.model_dir} holds checkpoint_{latest} of another "
                "model, method or TRAINABLE_PATTERNS; use a new MODEL_DIR (or the gin files "
                f"of that run). Restoring failed with: {error}"
            ) from error
    if initial_checkpoint_path:
        from hyperprompt_jax import checkpoints

        logger.info("Initialising the backbone from %s.", initial_checkpoint_path)
        if tf.io.gfile.exists(os.path.join(initial_checkpoint_path, "config.json")):
            _, weights = checkpoints.load_hf_t5(initial_checkpoint_path)
        else:
            weights = checkpoints.load_t5x_checkpoint(initial_checkpoint_path)
        return trainer.init_state_from_params(weights, source=initial_checkpoint_path)
    return trainer.init_state()


def _train_loop(
    *,
    trainer: trainer_lib.Trainer,
    checkpointer: utils.Checkpointer,
    converter: seqio.FeatureConverter,
    train_dataset_cfg: utils.DatasetConfig,
    model_dir: str,
    total_steps: int,
    eval_dataset_cfg: utils.DatasetConfig | None,
    eval_period: int | None,
    eval_num_examples: int | None,
    save_period: int,
    log_period: int,
    initial_checkpoint_path: str | None,
    decoder_params: Mapping[str, Any] | None,
) -> TrainResult:
    chief = jax.process_index() == 0
    evaluation = None
    if eval_dataset_cfg is not None:  # Built first: bad eval data fails before training.
        evaluation = eval_lib.SeqioEvaluation(
            eval_dataset_cfg, converter, trainer, eval_num_examples, decoder_params
        )
    state = _initial_state(trainer, checkpointer, initial_checkpoint_path)
    step = int(jax.device_get(state.step))
    trainable, total = _param_counts(trainer)
    logger.info(
        "Mesh %s | %d of %d parameters trainable | optimizer state %.1f MB",
        dict(trainer.partitioner.mesh.shape),
        trainable,
        total,
        trainer_lib.tree_bytes(trainer.layout.abstract.opt_state) / 1e6,
    )
    writer = summaries.MetricsWriter(model_dir, total_steps, train_dataset_cfg.batch_size)
    writer.start(step)
    records: list = []
    last_eval: dict = {}
    pending: list = []  # (step, device metrics) not yet checked / logged

    def flush() -> None:
        """Fetches pending metrics, stops on a non-finite step, writes the log line."""
        if not pending:
            return
        fetched = [(s, jax.device_get(m)) for s, m in pending]
        pending.clear()
        bad = _first_non_finite([dict(m, step=s) for s, m in fetched])
        if bad is not None:
            latest = checkpointer.latest_step()
            where = f"checkpoint_{latest}" if latest is not None else "no checkpoint yet"
            raise FloatingPointError(
                f"Non-finite loss ({bad['loss']}) or update at step {bad['step']}; training "
                f"stopped and the step was not applied. The last good checkpoint in "
                f"{model_dir} is {where}. Lower the learning rate or check the data."
            )
        keys = [k for k in fetched[-1][1] if k != "finite"]
        mean = {k: float(np.mean([np.asarray(m[k], np.float64) for _, m in fetched])) for k in keys}
        records.append(writer.write_train(fetched[-1][0], mean, len(fetched)))

    def run_eval(at_step: int) -> None:
        nonlocal last_eval
        if evaluation is None or not evaluation.task_names:
            return
        flush()
        last_eval = evaluation.evaluate(state.params, at_step)
        writer.write_eval(at_step, last_eval)
        improved = []
        for task, metrics in last_eval.items():
            score = summaries.mean_scalar(metrics)
            best = checkpointer.best.get(task)
            if np.isfinite(score) and (best is None or score > best["value"]):
                improved.append((task, score))
        if improved:
            checkpointer.save(at_step, state, force=True)
            for task, score in improved:
                names = sorted(last_eval[task])
                metric = names[0] if len(names) == 1 else f"mean({', '.join(names)})"
                checkpointer.record_best(task, at_step, metric, score)

    if step >= total_steps:
        logger.info("Already at step %d >= TRAIN_STEPS=%d; nothing to train.", step, total_steps)
    else:
        ds = utils.get_dataset(
            train_dataset_cfg, converter, skip_batches=step, partitioner=trainer.partitioner
        )
        batches = utils.iterate_batches(ds, trainer.partitioner)
        wrote_config = False
        while step < total_steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"The training data of {train_dataset_cfg.mixture_or_task_name!r} ran out "
                    f"at step {step}; it should repeat forever."
                ) from None
            state, metrics = trainer.train_step(state, batch)
            step += 1
            pending.append((step, metrics))
            if not wrote_config:
                _write_config(model_dir, trainer)
                wrote_config = True
            if step % log_period == 0 or step == total_steps:
                flush()
            if step % save_period == 0 or step == total_steps:
                flush()  # Never save a state after a rejected (non-finite) step.
                checkpointer.save(step, state)
            if eval_period and step % eval_period == 0 and step != total_steps:
                run_eval(step)
    flush()
    run_eval(step)
    checkpointer.save(step, state, force=True)
    checkpointer.wait()
    _write_config(model_dir, trainer)
    writer.close()
    if chief and (last_eval or checkpointer.best):
        print(
            summaries.score_table(
                last_eval, checkpointer.best, title=f"Per-task scores at step {step}"
            )
        )
        sys.stdout.flush()
    return TrainResult(step, last_eval, dict(checkpointer.best), records)


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
        utils.write_text(os.path.join(model_dir, "config.gin"), text)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.train --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="train", module_name="hyperprompt_jax.train")


if __name__ == "__main__":
    sys.exit(main())
