"""Evaluation with `seqio.Evaluator`: decode, postprocess, metrics; also an entry point.

`SeqioEvaluation` is what the training loop calls every `EVAL_PERIOD` steps: for every
task of the mixture that has metrics and the split, it decodes the examples with the
jitted `Trainer.predict_step` (and scores them with `score_step` for score-based
metrics), and seqio postprocesses and computes the task's metrics.

Shapes stay static: examples are padded to `TASK_FEATURE_LENGTHS` and batches to
`batch_size` (padded rows are dropped from the outputs), so every task reuses one
compiled decoder. Each process walks the whole evaluation set and feeds the rows its
devices hold (`jax.make_array_from_callback`); outputs are replicated.

Command line:
  python -m hyperprompt_jax.eval --gin_file=models/... --gin_file=methods/... \\
    --gin_file=runs/eval.gin --gin.CHECKPOINT_PATH="'/model_dir'" \\
    --gin.MIXTURE_OR_TASK_NAME="'...'" --gin.EVAL_OUTPUT_DIR="'/out'"
`CHECKPOINT_PATH` is a model directory (its latest checkpoint), a `checkpoint_<step>`
directory of this library, a t5x checkpoint or a Hugging Face T5 directory.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import seqio

from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import summaries, utils
from hyperprompt_jax import trainer as trainer_lib

logger = logging.getLogger("hyperprompt_jax")


def _scalar(value: Any) -> float | None:
    """A metric value as a float (seqio / clu wrap them), or None for non-scalars."""
    value = getattr(value, "value", value)
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return float(array) if array.ndim == 0 else None


_VIEW_SUFFIX = "__eval_view"


def _eval_view(name: str, split: str) -> str:
    """Registers (once) and returns the name of `name`'s tasks as seqio.Evaluator takes them.

    seqio.Evaluator measures the length of every declared output feature and fails on
    rank-0 ones such as `task_id`. The view re-declares each task without its rank-0
    features under `<task>__eval_view`; a task's examples keep undeclared features, so
    `task_id` still reaches the feature converter (a mixture, by contrast, drops
    them, which is why the registered tasks declare it). Results are reported under
    the original task names.
    """
    view_name = name + _VIEW_SUFFIX
    if view_name in seqio.MixtureRegistry.names():
        return view_name
    provider = utils.get_mixture_or_task(name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    views = []
    for task in tasks:
        if split not in task.splits or not task.metric_objs:
            continue
        task_view = task.name + _VIEW_SUFFIX
        if task_view not in seqio.TaskRegistry.names():
            seqio.TaskRegistry.add(
                task_view,
                source=task.source,
                output_features={k: v for k, v in task.output_features.items() if v.rank != 0},
                preprocessors=task.preprocessors,
                postprocess_fn=task.postprocessor,
                metric_objs=task.metric_objs,
                shuffle_buffer_size=task.shuffle_buffer_size,
            )
        views.append(task_view)
    if not views:
        return name
    seqio.MixtureRegistry.add(view_name, [(t, 1.0) for t in views])
    return view_name


class SeqioEvaluation:
    """Evaluates a model on the tasks of a mixture with seqio's metrics.

    Args:
      dataset_cfg: which mixture / task, split, feature lengths and batch size.
      feature_converter: task features -> model features (no packing).
      trainer: provides the jitted predict / score steps and the shardings.
      num_examples: evaluate only the first N examples of each task (None: all).
      decoder_params: extra arguments of the model's decode function.
    """

    def __init__(
        self,
        dataset_cfg: utils.DatasetConfig,
        feature_converter: seqio.FeatureConverter,
        trainer: trainer_lib.Trainer,
        num_examples: int | None = None,
        decoder_params: Mapping[str, Any] | None = None,
    ):
        utils.check_data(dataset_cfg.mixture_or_task_name, dataset_cfg.split)
        trainer.partitioner.check_batch_size(dataset_cfg.batch_size)
        self.cfg = dataset_cfg
        self.trainer = trainer
        self.decoder_params = dict(decoder_params or {})
        self.evaluator = seqio.Evaluator(
            mixture_or_task_name=_eval_view(dataset_cfg.mixture_or_task_name, dataset_cfg.split),
            feature_converter=feature_converter,
            eval_split=dataset_cfg.split,
            use_cached=dataset_cfg.use_cached,
            seed=dataset_cfg.seed,
            sequence_length=dict(dataset_cfg.task_feature_lengths),
            num_examples=num_examples,
            shuffle=False,
            logger_cls=(),
            use_memory_cache=True,
        )
        self.task_names = [t.name.removesuffix(_VIEW_SUFFIX) for t in self.evaluator.eval_tasks]
        if not self.task_names:
            logger.warning(
                "No task of %r has metrics and a %r split; evaluation is skipped.",
                dataset_cfg.mixture_or_task_name,
                dataset_cfg.split,
            )

    def _batches(self, ds) -> Any:
        """Yields `(indices, valid_rows, global_batch)` of `batch_size` rows."""
        batch_size = self.cfg.batch_size
        partitioner = self.trainer.partitioner
        for indices, features in ds.batch(batch_size).as_numpy_iterator():
            n = len(indices)
            padded = {}
            for k, v in features.items():
                v = np.asarray(v)
                if n < batch_size:  # Repeat the last row; its outputs are dropped.
                    v = np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)])
                padded[k] = jax.make_array_from_callback(
                    v.shape, partitioner.batch_sharding(v.ndim), lambda idx, v=v: v[idx]
                )
            yield indices, n, padded

    def evaluate(self, params: Any, step: int) -> dict[str, dict[str, float]]:
        """Runs every evaluation task; returns `{task: {metric: value}}` (scalars only)."""
        if not self.task_names:
            return {}

        def predict_fn(ds):
            out = []
            for indices, n, batch in self._batches(ds):
                tokens = np.asarray(self.trainer.predict_step(params, batch, self.decoder_params))
                out.extend((int(i), t.tolist()) for i, t in zip(indices, tokens[:n], strict=True))
            return out

        def score_fn(ds):
            out = []
            for indices, n, batch in self._batches(ds):
                scores = np.asarray(self.trainer.score_step(params, batch))
                out.extend((int(i), float(s)) for i, s in zip(indices, scores[:n], strict=True))
            return out

        future, _ = self.evaluator.evaluate(
            compute_metrics=True, step=step, predict_fn=predict_fn, score_fn=score_fn
        )
        results = {}
        for task, metrics in (future.result() or {}).items():
            scalars = {k: _scalar(v) for k, v in metrics.items()}
            results[task.removesuffix(_VIEW_SUFFIX)] = {
                k: v for k, v in scalars.items() if v is not None
            }
        return results


def evaluate(
    *,
    model: Any,
    dataset_cfg: utils.DatasetConfig,
    checkpoint_path: str,
    output_dir: str,
    partitioner: partitioning_lib.Partitioner | None = None,
    num_examples: int | None = None,
    decoder_params: Mapping[str, Any] | None = None,
    feature_converter: seqio.FeatureConverter | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluates one checkpoint (gin entry point `evaluate`).

    Args:
      model: the model (gin `%MODEL`, with the method's hooks).
      dataset_cfg: mixture / task, split, lengths, batch size.
      checkpoint_path: model dir, `checkpoint_<step>` dir, t5x checkpoint or HF dir.
      output_dir: where `eval_metrics.jsonl` is appended.
      partitioner: mesh and rules (default: data parallel on all devices).
      num_examples: evaluate only the first N examples per task.
      decoder_params: extra decode arguments (e.g. `{'alpha': 0.6}`).
      feature_converter: default `EncDecTaskIdFeatureConverter`.

    Returns:
      `{task: {metric: value}}`.
    """
    utils.ensure_writable_dir(output_dir, "EVAL_OUTPUT_DIR")
    utils.check_data(dataset_cfg.mixture_or_task_name, dataset_cfg.split)
    converter = feature_converter or utils.default_feature_converter()
    trainer, step, params = load_for_inference(
        model, model_input_shapes(converter, dataset_cfg), checkpoint_path, partitioner
    )
    evaluation = SeqioEvaluation(dataset_cfg, converter, trainer, num_examples, decoder_params)
    results = evaluation.evaluate(params, step)
    writer = summaries.MetricsWriter(
        output_dir, total_steps=step, batch_size=dataset_cfg.batch_size
    )
    writer.write_eval(step, results)
    writer.close()
    if jax.process_index() == 0:
        print(
            summaries.score_table(results, {}, title=f"Scores of {checkpoint_path} (step {step})")
        )
    return results


def load_for_inference(
    model: Any,
    input_shapes: Mapping[str, Sequence[int]],
    checkpoint_path: str,
    partitioner: partitioning_lib.Partitioner | None = None,
) -> tuple[trainer_lib.Trainer, int, Any]:
    """Builds a trainer for the batch shapes and loads parameters from a checkpoint.

    Returns:
      `(trainer, step, params)`; step is the checkpoint's step (0 for imported weights).
    """
    from hyperprompt_jax import gin_utils, optim

    trainer = trainer_lib.Trainer(
        model,
        optim.adafactor,
        optim.create_learning_rate_scheduler("constant", 0.0),
        partitioner or partitioning_lib.Partitioner(),
        input_shapes,
        # Only lays out the state; restore_params reads any trainable / frozen split.
        trainable_patterns=gin_utils.query_macro("TRAINABLE_PATTERNS", None),
    )
    step, params = load_params(trainer, checkpoint_path)
    return trainer, step, params


def load_params(trainer: trainer_lib.Trainer, path: str) -> tuple[int, Any]:
    """Parameters only (no optimizer state), read straight into the trainer's shardings.

    `path`: a model directory (its newest intact checkpoint), a train checkpoint of
    this package (full or trainable-only: its backbone is reloaded and verified), a t5x
    checkpoint (legacy or Orbax format), or a Hugging Face T5 directory.

    Returns:
      `(step, params)`; step is 0 for imported weights.

    Raises:
      UserError: for a path that holds none of them, or weights that do not fit.
    """
    from hyperprompt_jax import checkpoints
    from hyperprompt_jax.errors import UserError

    if not path:
        raise UserError("CHECKPOINT_PATH is not set.")
    found, directory = checkpoints.resolve(path, what="CHECKPOINT_PATH")
    if found != checkpoints.discovery.TRAIN:
        _, _, source = checkpoints.open_weights(directory, what="CHECKPOINT_PATH")
        return 0, trainer.params_from_source(source, path)
    step = checkpoints.parse_step(directory) or 0
    meta = checkpoints.backbone.read_step_metadata(directory)
    ref = meta.get("backbone")
    if ref is None:
        return step, checkpoints.restore_params(directory, trainer.layout.param_shardings)
    # Trainable-only: the trained parameters from the checkpoint (whatever this run's
    # TRAINABLE_PATTERNS), every other one from the backbone it references (verified).
    own = checkpoints.orbax_source.OrbaxSource(
        os.path.join(directory, checkpoints.discovery.TRAIN_ITEM),
        roots=("trainable",),
        description=f"train checkpoint {directory}",
    )
    abstract = trainer.abstract_params()
    wrong = sorted(
        n for n in own.tensors if n not in abstract or own.tensors[n].shape != abstract[n].shape
    )
    if wrong:
        raise UserError(
            f"Checkpoint {directory} does not fit the model (parameters {wrong[:3]} differ); "
            "use the model and method gin files of the run that wrote it."
        )
    flat = own.load({n: (abstract[n].sharding, abstract[n].dtype) for n in own.tensors})
    frozen = checkpoints.train_state.frozen_from_ref(
        trainer,
        checkpoints.BackboneRef.from_json(ref),
        os.path.dirname(directory),
        names=sorted(set(abstract) - set(flat)),
    )
    flat.update(checkpoints.flatten_params(frozen))
    return step, checkpoints.unflatten_params(flat)


def latest_train_checkpoint(path: str) -> str | None:
    """`path` if it is a train checkpoint, else the newest intact one inside it, else None."""
    from hyperprompt_jax import checkpoints

    if checkpoints.is_train_checkpoint(path):
        return path
    _, chosen, skipped = checkpoints.newest_intact(path, kinds=(checkpoints.discovery.TRAIN,))
    checkpoints.discovery.warn_skipped(skipped, chosen)
    return chosen


def model_input_shapes(
    converter: seqio.FeatureConverter, cfg: utils.DatasetConfig
) -> dict[str, tuple[int, ...]]:
    """Batched model-feature shapes for `cfg` (`task_ids` is `[batch]`)."""
    if hasattr(converter, "model_input_shapes"):
        return dict(converter.model_input_shapes(cfg.task_feature_lengths, cfg.batch_size))
    lengths = converter.get_model_feature_lengths(cfg.task_feature_lengths)
    return {k: (cfg.batch_size, v) for k, v in lengths.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m hyperprompt_jax.eval --gin_file=... --gin.NAME=VALUE`."""
    from hyperprompt_jax import launch

    return launch.run(argv, entry="evaluate", module_name="hyperprompt_jax.eval")


if __name__ == "__main__":
    sys.exit(main())
