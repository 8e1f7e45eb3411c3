"""Feature converter that carries each example's task id to the model.

`EncDecTaskIdFeatureConverter` is seqio's `EncDecFeatureConverter` plus one model
feature, `task_ids` (int32, `[batch]` once batched), taken from the task feature
`task_id` (int32 scalar per example) that the multi-task mixtures add
(`hyperprompt_jax.tasks.mixtures`). Examples without `task_id` (a plain single task)
get `default_task_id` (0), so one converter serves single- and multi-task runs.

Model features (per example; the batch adds a leading `[batch]`):
  encoder_input_tokens [inputs_length], decoder_input_tokens / decoder_target_tokens /
  decoder_loss_weights [targets_length], task_ids [] (scalar).

Call it with the task lengths only (`{"inputs": L_in, "targets": L_out}`); `task_id`
needs no length.

Packing puts several examples, possibly of different tasks, into one row, and a row
has a single task id, so `pack=True` is refused when the data has `task_id`; without
task ids packing works as in seqio and no `task_ids` feature is produced.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from hyperprompt_jax.errors import UserError

TASK_ID_FEATURE = "task_id"
TASK_IDS_MODEL_FEATURE = "task_ids"


class EncDecTaskIdFeatureConverter(seqio.EncDecFeatureConverter):
    """`seqio.EncDecFeatureConverter` that also outputs `task_ids` `[batch]` (int32).

    Args:
      pack: pack several examples per row (only for data without `task_id`).
      default_task_id: task id of examples that have none; None makes a missing
        `task_id` an error (e.g. to catch evaluating a multi-task model on a plain task).
      num_tasks: if given, every task id must be in `[0, num_tasks)` (checked while
        reading, with an error naming the bad id).
      **kwargs: passed to `seqio.EncDecFeatureConverter` (`bos_id`, ...).
    """

    def __init__(
        self,
        pack: bool = False,
        default_task_id: int | None = 0,
        num_tasks: int | None = None,
        **kwargs,
    ):
        if default_task_id is not None and (
            not isinstance(default_task_id, int) or default_task_id < 0
        ):
            raise UserError(
                f"default_task_id must be a non-negative int or None, got {default_task_id!r}."
            )
        if num_tasks is not None and num_tasks < 1:
            raise UserError(f"num_tasks must be >= 1, got {num_tasks}.")
        if num_tasks is not None and default_task_id is not None and default_task_id >= num_tasks:
            raise UserError(f"default_task_id {default_task_id} is not < num_tasks {num_tasks}.")
        super().__init__(pack=pack, **kwargs)
        self._default_task_id = default_task_id
        self._num_tasks = num_tasks
        # An instance attribute: the task_ids feature exists only without packing.
        self.MODEL_FEATURES = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES)
        if not pack:
            self.MODEL_FEATURES[TASK_IDS_MODEL_FEATURE] = seqio.FeatureConverter.FeatureSpec(
                dtype=tf.int32, rank=0
            )

    def _with_task_id(self, ds: tf.data.Dataset) -> tf.data.Dataset:
        spec = ds.element_spec
        if TASK_ID_FEATURE in spec:
            if spec[TASK_ID_FEATURE].dtype != tf.int32 or spec[TASK_ID_FEATURE].shape.rank != 0:
                raise UserError(
                    f"Feature '{TASK_ID_FEATURE}' must be an int32 scalar per example, got "
                    f"{spec[TASK_ID_FEATURE]}."
                )
            return ds
        if self._default_task_id is None:
            raise UserError(
                f"The dataset has no '{TASK_ID_FEATURE}' feature and default_task_id is None. "
                "Use a multi-task mixture (e.g. hp_glue_v002_multitask) or a '_task_id' task, "
                "or set default_task_id."
            )
        default = tf.constant(self._default_task_id, tf.int32)
        return ds.map(lambda ex: {**ex, TASK_ID_FEATURE: default})

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        if self.pack:
            if TASK_ID_FEATURE in ds.element_spec:
                raise UserError(
                    "EncDecTaskIdFeatureConverter(pack=True) cannot keep task ids: packing "
                    "puts examples of different tasks into one row, which has one task id. "
                    "Use pack=False (the prompt-tuning / HyperPrompt recipe) for data with "
                    f"'{TASK_ID_FEATURE}'."
                )
            return super()._convert_features(ds, task_feature_lengths)
        ds = self._with_task_id(ds)
        if self._num_tasks is not None:
            num_tasks = self._num_tasks

            def check(ex):
                task_id = ex[TASK_ID_FEATURE]
                checks = [
                    tf.debugging.assert_greater_equal(task_id, 0, message="negative task_id"),
                    tf.debugging.assert_less(
                        task_id, num_tasks, message=f"task_id must be < num_tasks={num_tasks}"
                    ),
                ]
                with tf.control_dependencies(checks):
                    return {**ex, TASK_ID_FEATURE: tf.identity(task_id)}

            ds = ds.map(check)
        return super()._convert_features(ds, task_feature_lengths)

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        converted = dict(super()._convert_example(features))
        if not self.pack:
            converted[TASK_IDS_MODEL_FEATURE] = features[TASK_ID_FEATURE]
        return converted

    def get_model_feature_lengths(
        self, task_feature_lengths: Mapping[str, int]
    ) -> Mapping[str, int]:
        """seqio's lengths plus `task_ids: 1`.

        `task_ids` is a scalar per example; seqio requires a length entry for every
        model feature but skips rank-0 features in its length checks. Use
        `model_input_shapes` for shapes.
        """
        lengths = dict(super().get_model_feature_lengths(task_feature_lengths))
        if not self.pack:
            lengths[TASK_IDS_MODEL_FEATURE] = 1
        return lengths

    def model_input_shapes(
        self, task_feature_lengths: Mapping[str, int], batch_size: int
    ) -> dict[str, tuple[int, ...]]:
        """Batched shapes of every model feature (`task_ids`: `(batch_size,)`)."""
        lengths = self.get_model_feature_lengths(task_feature_lengths)
        shapes = {k: (batch_size, v) for k, v in lengths.items()}
        if TASK_IDS_MODEL_FEATURE in shapes:
            shapes[TASK_IDS_MODEL_FEATURE] = (batch_size,)
        return shapes
