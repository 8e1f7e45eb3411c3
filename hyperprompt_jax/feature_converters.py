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

Packing (`pack=True`, t5x's default for training) puts several examples, possibly of
different tasks, into one row, as seqio does (segment ids and positions), and gives
every position its example's task id instead of one per row:
  encoder_task_ids [inputs_length], decoder_task_ids [targets_length] (0 on padding).
For a model with an input prompt of length P (`prompt_length`: prompt tuning, SPoT,
SMoP), every example's inputs start with P prompt slots (`packing.PROMPT_SLOT_ID`) that
the model fills with that example's prompt; the slots count in `L_in`, so a row holds
the examples and their prompts. `packing` explains why this keeps every example exactly
as it is unpacked.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from hyperprompt_jax import packing
from hyperprompt_jax.errors import UserError

TASK_ID_FEATURE = "task_id"
TASK_IDS_MODEL_FEATURE = "task_ids"
_TASK_IDS_SUFFIX = "_task_ids"  # inputs_task_ids / targets_task_ids, packed with the tokens


class EncDecTaskIdFeatureConverter(seqio.EncDecFeatureConverter):
    """`seqio.EncDecFeatureConverter` that also outputs `task_ids` `[batch]` (int32).

    Args:
      pack: pack several examples per row (per-position task ids, prompt slots).
      prompt_length: with `pack`, the prompt slots in front of each example's inputs:
        the model's input prompt length (0: no input prompt, e.g. model tuning and
        HyperPrompt). Unpacked rows ignore it (the model prepends the prompt).
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
        prompt_length: int = 0,
        **kwargs,
    ):
        if default_task_id is not None and (
            not isinstance(default_task_id, int) or default_task_id < 0
        ):
            raise UserError(
                f"default_task_id must be a non-negative int or None, got {default_task_id!r}."
            )
        if not isinstance(prompt_length, int) or isinstance(prompt_length, bool) or prompt_length < 0:
            raise UserError(f"prompt_length must be an int >= 0, got {prompt_length!r}.")
        if num_tasks is not None and num_tasks < 1:
            raise UserError(f"num_tasks must be >= 1, got {num_tasks}.")
        if num_tasks is not None and default_task_id is not None and default_task_id >= num_tasks:
            raise UserError(f"default_task_id {default_task_id} is not < num_tasks {num_tasks}.")
        super().__init__(pack=pack, **kwargs)
        self._default_task_id = default_task_id
        self._num_tasks = num_tasks
        self.prompt_length = prompt_length
        # An instance attribute: unpacked rows get task_ids [batch], packed rows one
        # task id per position.
        self.MODEL_FEATURES = dict(seqio.EncDecFeatureConverter.MODEL_FEATURES)
        spec = seqio.FeatureConverter.FeatureSpec
        if pack:
            for name in (packing.ENCODER_TASK_IDS, packing.DECODER_TASK_IDS):
                self.MODEL_FEATURES[name] = spec(dtype=tf.int32)
        else:
            self.MODEL_FEATURES[TASK_IDS_MODEL_FEATURE] = spec(dtype=tf.int32, rank=0)

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
        if not self.pack:
            return super()._convert_features(ds, task_feature_lengths)
        if self.prompt_length >= task_feature_lengths["inputs"]:
            raise UserError(
                f"A prompt of length {self.prompt_length} leaves no room for the inputs in "
                f"packed rows of {task_feature_lengths['inputs']} positions; raise "
                "TASK_FEATURE_LENGTHS['inputs']."
            )
        # Per-token task ids (and prompt slots) are packed like the tokens they go with.
        ds = ds.map(self._per_token_task_ids, num_parallel_calls=tf.data.AUTOTUNE)
        lengths = dict(task_feature_lengths)
        lengths.update(
            {f"{name}{_TASK_IDS_SUFFIX}": lengths[name] for name in ("inputs", "targets")}
        )
        return super()._convert_features(ds, lengths)

    def _per_token_task_ids(self, ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Prompt slots before the inputs; `inputs_task_ids` / `targets_task_ids`."""
        # Only what is packed (seqio warns about, then drops, anything else).
        ex = {name: ex[name] for name in ("inputs", "targets", TASK_ID_FEATURE)}
        if self.prompt_length:
            slots = tf.fill([self.prompt_length], tf.constant(packing.PROMPT_SLOT_ID, tf.int32))
            ex["inputs"] = tf.concat([slots, tf.cast(ex["inputs"], tf.int32)], axis=0)
        # Stored + 1: seqio's packing reads zeros as padding and would drop task 0.
        for name in ("inputs", "targets"):
            ex[f"{name}{_TASK_IDS_SUFFIX}"] = tf.fill(tf.shape(ex[name]), ex[TASK_ID_FEATURE] + 1)
        del ex[TASK_ID_FEATURE]
        return ex

    def _convert_example(self, features: Mapping[str, tf.Tensor]) -> Mapping[str, tf.Tensor]:
        converted = dict(super()._convert_example(features))
        if self.pack:
            for model_name, name in (
                (packing.ENCODER_TASK_IDS, "inputs"),
                (packing.DECODER_TASK_IDS, "targets"),
            ):
                converted[model_name] = tf.maximum(features[f"{name}{_TASK_IDS_SUFFIX}"] - 1, 0)
        else:
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
        if self.pack:
            lengths[packing.ENCODER_TASK_IDS] = lengths["encoder_input_tokens"]
            lengths[packing.DECODER_TASK_IDS] = lengths["decoder_target_tokens"]
        else:
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
