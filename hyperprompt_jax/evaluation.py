"""The evaluation library: seqio metrics of a model, the best-checkpoint rule, loading.

`SeqioEvaluation` is what the training loop calls every `EVAL_PERIOD` steps (and the
eval entry point once): for every task of the mixture that has metrics and the split,
it decodes the examples with the jitted `Trainer.predict_step` (and scores them with
`score_step` for score-based metrics), and seqio postprocesses and computes the task's
metrics.

Shapes stay static: examples are padded to `TASK_FEATURE_LENGTHS` and batches to
`batch_size` (padded rows are dropped from the outputs), so every task reuses one
compiled decoder. Each process walks the whole evaluation set and puts it on the mesh
with `data.put_on_mesh(whole=True)`; outputs are replicated.

`best_score` is the one rule for a task's "best checkpoint" (training's kept
checkpoints, early stopping, SPoT's source prompts): the mean of its metrics that are
not loss-like, higher is better.

`load_for_inference` builds a Trainer from gin (`trainer.from_gin`) and loads the
parameters of any checkpoint kind (a model directory, a `checkpoint_<step>`, a t5x
checkpoint, a Hugging Face T5 directory).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np
import seqio

from hyperprompt_jax import data, selection
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import trainer as trainer_lib
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

# Metrics where lower is better; `best_score` leaves them out.
# The one best-checkpoint rule (re-exported: training and SPoT use the same).
best_score = selection.best_score
best_score_name = selection.best_score_name


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
    provider = data.get_mixture_or_task(name)
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
      num_tasks: NUM_TASKS of a task-conditioned model: the tasks' ids are checked
        against it first, and every batch's on the host (None: not task-conditioned).
      batch_size_name: the macro that set the batch size, for error messages.
    """

    def __init__(
        self,
        dataset_cfg: data.DatasetConfig,
        feature_converter: seqio.FeatureConverter,
        trainer: trainer_lib.Trainer,
        num_examples: int | None = None,
        decoder_params: Mapping[str, Any] | None = None,
        num_tasks: int | None = None,
        batch_size_name: str = "BATCH_SIZE",
    ):
        dataset_cfg.check_batch_size(batch_size_name)
        data.check_data(dataset_cfg.mixture_or_task_name, dataset_cfg.split)
        data.check_num_tasks(dataset_cfg.mixture_or_task_name, dataset_cfg.split, num_tasks)
        try:
            trainer.partitioner.check_batch_size(dataset_cfg.batch_size)
        except ValueError as e:
            raise UserError(str(e).replace("BATCH_SIZE", batch_size_name)) from None
        self.cfg = dataset_cfg
        self.num_tasks = num_tasks
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
        for task in self.evaluator.eval_tasks:  # Say once what the lengths cut.
            lengths = dict(dataset_cfg.task_feature_lengths)
            over, total = data.count_over_long(task, dataset_cfg.split, lengths, num_examples)
            data.warn_over_long(task.name.removesuffix(_VIEW_SUFFIX), over, total, lengths)
        if not self.task_names:
            logger.warning(
                "No task of %r has metrics and a %r split; evaluation is skipped.",
                dataset_cfg.mixture_or_task_name,
                dataset_cfg.split,
            )

    def _batches(self, ds) -> Any:
        """Yields `(indices, valid_rows, global_batch)` of `batch_size` rows: longest
        inputs first, each batch's inputs cut to its longest (`data.decoding_batches`)."""
        items = list(ds.as_numpy_iterator())  # (index, features) per example
        rows = [features for _, features in items]
        for positions, batch in data.decoding_batches(rows, self.cfg.batch_size):
            yield (
                [items[p][0] for p in positions],
                len(positions),  # Padded rows' outputs are dropped.
                data.put_on_mesh(
                    batch, self.trainer.partitioner, whole=True, num_tasks=self.num_tasks
                ),
            )

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
    # The optimizer only lays out the state; restore_params reads the parameters of
    # any trainable / frozen split.
    trainer = trainer_lib.from_gin(input_shapes, model=model, partitioner=partitioner)
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


def model_input_shapes(
    converter: seqio.FeatureConverter, cfg: data.DatasetConfig
) -> dict[str, tuple[int, ...]]:
    """Batched model-feature shapes for `cfg` (`task_ids` is `[batch]`)."""
    if hasattr(converter, "model_input_shapes"):
        return dict(converter.model_input_shapes(cfg.task_feature_lengths, cfg.batch_size))
    lengths = converter.get_model_feature_lengths(cfg.task_feature_lengths)
    return {k: (cfg.batch_size, v) for k, v in lengths.items()}
