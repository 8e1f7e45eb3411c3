"""Running the methods inside t5x itself (`python -m t5x.train|eval|infer`).

Import this module only where t5x is importable (the gin files under `gin/t5x/` do,
through gin's dynamic registration); nothing else in the package imports it, so the
library keeps working without t5x. It connects three things t5x fixes and the
methods need:

* Task ids. t5x's `EncoderDecoderModel` calls the network with a fixed argument list
  and seqio's `EncDecFeatureConverter` drops the `task_id` feature. `EncoderDecoderModel`
  below is t5x's class with `task_ids [batch]` forwarded to every call of the network
  (training and eval logits, scoring, parameter init, the decoding cache and every
  decoding step), and `EncDecTaskIdFeatureConverter` as its feature converter.
* Packing (t5x's run files pack training and train_eval data). Packed rows carry
  per-position `encoder_task_ids` / `decoder_task_ids` (forwarded by the loss path;
  decoding never packs), and for a model with an input prompt every packed example
  needs prompt slots: the model's `FEATURE_CONVERTER_CLS` is the converter with
  `prompt_length` bound to the network's input prompt length (`packing`).
* Optimizer state. t5x's Adafactor needs a factorization rule for every logical axis
  name of a parameter of rank 3 or more; `standard_logical_factor_rules()` is t5x's
  table plus `METHOD_FACTOR_RULES`. `trainable_optimizer` freezes everything outside
  `TRAINABLE_PATTERNS` the way google-research/prompt-tuning does under t5x: a
  `MultiOptimizer` over a parameter traversal (frozen parameters get no optimizer state
  and are never updated).
* Sharding. `method_logical_axis_rules()` gives t5x's partitioner the methods' axes
  (`partitioning.METHOD_AXIS_RULES`, all replicated).

* Evaluation. `seqio.Evaluator` (t5x's `inference_evaluator_cls`) measures the length
  of every declared output feature of a task and fails on rank-0 ones such as the
  multi-task mixtures' `task_id`; importing this module makes its measurement skip
  them (`_measure_without_scalar_features`), so `t5x.eval` and t5x's in-training
  inference evaluation work on task-id data with t5x's own run files.

`config_from_t5x` maps t5x's `network.T5Config` (bound by t5x's size files) to this
package's `T5Config`, so `t5x/examples/t5/t5_1_1/*.gin` keep choosing the size.
`ProjectModelAdapter` makes this package's own `models.EncoderDecoderModel` usable as
t5x's `model` (t5x's trainer merges clu metrics; the package's model returns arrays).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import clu.metrics as clu_metrics
import jax
import jax.numpy as jnp
import seqio.evaluation
import tensorflow as tf
from flax import traverse_util
from t5x import adafactor as t5x_adafactor
from t5x import metrics as t5x_metrics
from t5x import models as t5x_models
from t5x import optimizers as t5x_optimizers

import gin
from hyperprompt_jax import config as hp_config
from hyperprompt_jax import feature_converters, packing, partitioning, trainable
from hyperprompt_jax.errors import UserError

Array = jax.Array
PyTree = Any
FactorDim = t5x_adafactor.FactorDim

# ----------------------------------------------------------------------------------------
# Task ids through t5x's model
# ----------------------------------------------------------------------------------------


def _rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """Leading (batch) size of the first array argument of a network call."""
    for value in (*args, kwargs.get("encoded"), kwargs.get("encoder_input_tokens")):
        if hasattr(value, "shape") and len(value.shape) >= 1:
            return int(value.shape[0])
    return None


def converter_with_prompt_slots(
    converter_cls: Callable[..., Any], prompt_length: int
) -> Callable[..., Any]:
    """`converter_cls` with `prompt_length` bound when the model has an input prompt.

    t5x builds converters as `FEATURE_CONVERTER_CLS(pack=..., use_custom_packing_ops=...)`
    (training data) and `FEATURE_CONVERTER_CLS(pack=False)` (evaluation, inference);
    packed rows then get `prompt_length` slots per example, unpacked rows ignore it.
    """
    if not prompt_length:
        return converter_cls
    return functools.partial(converter_cls, prompt_length=prompt_length)


def _init_task_ids(input_shapes: Mapping[str, Sequence[int]]) -> dict[str, Array]:
    """Zero task ids for parameter init: `task_ids [batch]` for unpacked shapes, per
    position (`encoder_task_ids [batch, L_in]`, `decoder_task_ids [batch, L_out]`) for
    packed ones (with `encoder_segment_ids`). Their values do not matter for init."""
    if "encoder_segment_ids" in input_shapes:
        return {
            packing.ENCODER_TASK_IDS: jnp.zeros(input_shapes["encoder_input_tokens"], jnp.int32),
            packing.DECODER_TASK_IDS: jnp.zeros(input_shapes["decoder_input_tokens"], jnp.int32),
        }
    return {"task_ids": jnp.zeros((input_shapes["encoder_input_tokens"][0],), jnp.int32)}


class _TaskIdModule:
    """Stands in for the network: forwards everything, adds task ids to `init`/`apply`.

    Unpacked rows: `task_ids [batch]`. t5x calls the network with the batch's rows
    (`[batch, ...]`) or, while decoding, with `num_decodes` copies of each row laid out
    batch-major (`[e0, e0, e1, e1, ...]`, `decoding.flat_batch_beam_expand`); the task
    ids are repeated to match. Packed rows (training and eval losses only):
    `encoder_task_ids [batch, L_in]` and `decoder_task_ids [batch, L_out]`, passed as
    they are.
    """

    def __init__(self, module: Any, task_ids: Mapping[str, Array]):
        self._module = module
        self._task_ids = dict(task_ids)

    def __getattr__(self, name: str) -> Any:  # encode, decode, config, scan_layers, ...
        return getattr(self._module, name)

    def _with_task_ids(self, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        if "task_ids" not in self._task_ids:  # packed: one task id per position
            return {**kwargs, **self._task_ids}
        task_ids = self._task_ids["task_ids"]
        rows = _rows(args, kwargs)
        batch = task_ids.shape[0]
        if rows is None or rows % batch:
            raise ValueError(f"Cannot match {batch} task ids to a network call with {rows} rows.")
        return {**kwargs, "task_ids": jnp.repeat(task_ids, rows // batch, axis=0)}

    def apply(self, variables: PyTree, *args: Any, **kwargs: Any) -> Any:
        return self._module.apply(variables, *args, **self._with_task_ids(args, kwargs))

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        return self._module.init(rngs, *args, **self._with_task_ids(args, kwargs))


class EncoderDecoderModel(t5x_models.EncoderDecoderModel):
    """t5x's `EncoderDecoderModel` that passes task ids to the network.

    Same constructor and behaviour as t5x's class (losses, metrics, `decode_fn`,
    scoring); the feature converter defaults to `EncDecTaskIdFeatureConverter`, so
    batches carry `task_ids [batch]` (0 for data without a `task_id` feature), or,
    packed, `encoder_task_ids [batch, L_in]` and `decoder_task_ids [batch, L_out]`.
    Every method t5x uses to reach the network is routed through a copy of this model
    whose `module` adds the batch's task ids: `_compute_logits` (loss, eval,
    `score_batch`; packed or not), `get_initial_variables` (zeros `[batch]`, or per
    position for packed shapes) and `predict_batch_with_aux` (encoder, cache
    initialisation, every decoding step; never packed).
    `FEATURE_CONVERTER_CLS` binds the network's input prompt length
    (`converter_with_prompt_slots`), so packed rows get each example's prompt slots.
    Without task ids in the batch it is exactly t5x's model.
    """

    _feature_converter_cls: Callable[..., Any] = feature_converters.EncDecTaskIdFeatureConverter

    @property
    def FEATURE_CONVERTER_CLS(self) -> Callable[..., Any]:  # noqa: N802 (t5x's name)
        return converter_with_prompt_slots(
            self._feature_converter_cls, packing.input_prompt_length(self.module)
        )

    @FEATURE_CONVERTER_CLS.setter
    def FEATURE_CONVERTER_CLS(self, converter_cls: Callable[..., Any]) -> None:  # noqa: N802
        # t5x's constructor assigns its `feature_converter_cls` argument here.
        self._feature_converter_cls = converter_cls

    @property
    def input_prompt_length(self) -> int:
        """The network's input prompt length (prompt slots per packed example)."""
        return packing.input_prompt_length(self.module)

    def _bound(self, task_ids: Mapping[str, Array]) -> EncoderDecoderModel:
        if not task_ids:
            return self
        bound = copy.copy(self)  # shares everything; only `module` differs
        ids = {name: jnp.asarray(value, jnp.int32) for name, value in task_ids.items()}
        bound.module = _TaskIdModule(self.module, ids)
        return bound

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        # Initialisation needs task ids for a task-conditioned method, and their values
        # do not matter; callers do not always pass their shapes (t5x's evaluator
        # leaves out per-example scalars), so use zeros of the right layout either way.
        shapes = {k: v for k, v in input_shapes.items() if k not in packing.TASK_ID_FEATURES}
        return super(
            EncoderDecoderModel, self._bound(_init_task_ids(shapes))
        ).get_initial_variables(rng, shapes, input_types)

    def _compute_logits(self, params, batch, dropout_rng=None, mutable=False, other_variables=None):
        task_ids = {name: batch[name] for name in packing.TASK_ID_FEATURES if name in batch}
        return super(EncoderDecoderModel, self._bound(task_ids))._compute_logits(
            params, batch, dropout_rng, mutable=mutable, other_variables=other_variables
        )

    def predict_batch_with_aux(self, params, batch, rng=None, **kwargs):
        task_ids = {"task_ids": batch["task_ids"]} if "task_ids" in batch else {}
        bound = self._bound(task_ids)
        return super(EncoderDecoderModel, bound).predict_batch_with_aux(
            params, batch, rng=rng, **kwargs
        )


# ----------------------------------------------------------------------------------------
# t5x's size files -> this package's T5Config
# ----------------------------------------------------------------------------------------


def config_from_t5x(config: Any, **overrides: Any) -> hp_config.T5Config:
    """This package's `T5Config` from t5x's `network.T5Config` (same field names).

    Args:
      config: a t5x `t5x.examples.t5.network.T5Config` (what t5x's size gin files bind).
      **overrides: fields only this package has (`one_hot_embedding`, `remat_policy`,
        relative-position settings).

    Raises:
      UserError: if `config` has a field this package's `T5Config` does not know.
    """
    ours = {f.name for f in dataclasses.fields(hp_config.T5Config)}
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    unknown = sorted(set(values) - ours)
    if unknown:
        raise UserError(
            f"t5x's T5Config has fields {unknown} that hyperprompt_jax.config.T5Config "
            f"does not support; supported: {sorted(ours)}."
        )
    return hp_config.T5Config(**{**values, **overrides})


# ----------------------------------------------------------------------------------------
# Adafactor factorization rules and partitioning rules for the methods' axes
# ----------------------------------------------------------------------------------------

# `partitioning.METHOD_FACTOR_RULES` as t5x's FactorDims. The backbone's `layers` axis
# (HyperPrompt's per-layer stacks) keeps t5x's BATCH rule: t5x then clips and scales
# those stacks layer by layer, where `optim.adafactor` treats a stack as one tensor
# (docs/t5x.md).
METHOD_FACTOR_RULES: Mapping[str, FactorDim] = {
    name: t5x_adafactor.factor_name_to_factordim(rule)
    for name, rule in partitioning.METHOD_FACTOR_RULES
}


def standard_logical_factor_rules(
    additional_rules: Mapping[str, Any] | None = None,
) -> Mapping[str, Any]:
    """t5x's `adafactor.standard_logical_factor_rules()` plus `METHOD_FACTOR_RULES`.

    Bind it as `adafactor.Adafactor.logical_factor_rules`. A method axis that t5x
    already names with a different rule is an error (t5x would silently lose one).

    Args:
      additional_rules: more `{axis: FactorDim or 'row'/'col'/'batch'/'none'}` rules.
    """
    rules = dict(t5x_adafactor.standard_logical_factor_rules())
    for name, rule in {**METHOD_FACTOR_RULES, **(additional_rules or {})}.items():
        rule = t5x_adafactor.factor_name_to_factordim(rule)
        if name in rules and rules[name] != rule:
            raise UserError(
                f"Factor rule for logical axis {name!r}: t5x has {rules[name]}, got {rule}."
            )
        rules[name] = rule
    return rules


def method_logical_axis_rules() -> list[tuple[str, str | None]]:
    """The methods' logical axes for t5x's partitioner (all replicated).

    Bind it as `partitioning.standard_logical_axis_rules.additional_rules` (t5x appends
    additional rules after its own). See `partitioning.METHOD_AXIS_RULES` for why the
    method tensors are replicated.
    """
    return list(partitioning.METHOD_AXIS_RULES)


def trainable_optimizer(optimizer: Any, trainable_patterns: Sequence[str] | None) -> Any:
    """`optimizer` restricted to the parameters matching `trainable_patterns`.

    Args:
      optimizer: a t5x `OptimizerDef` (e.g. `adafactor.Adafactor()`).
      trainable_patterns: regexes `re.fullmatch`ed against '/'-joined parameter paths
        (`prompt/prompt`), the package's `TRAINABLE_PATTERNS`; None trains everything.

    Returns:
      `optimizer` itself for None, else a t5x `MultiOptimizer` with one traversal:
      parameters outside it get no optimizer state and are never updated.
    """
    if trainable_patterns is None:
        return optimizer
    trainable.is_trainable("", trainable_patterns)  # validates the regexes

    def selected(path: str, _: Any) -> bool:
        return trainable.is_trainable(path.strip("/"), trainable_patterns)

    traversal = traverse_util.ModelParamTraversal(selected)
    return t5x_optimizers.MultiOptimizer(((traversal, optimizer),))


def train_steps() -> int:
    """The run's `TRAIN_STEPS` gin macro, read when called (when a training run builds
    its learning-rate schedule). A gin reference `%TRAIN_STEPS` would instead be checked
    when gin is parsed, and t5x's eval and infer run files do not define the macro.

    Raises:
      UserError: if `TRAIN_STEPS` is not set.
    """
    try:
        return gin.query_parameter("%TRAIN_STEPS")
    except ValueError:
        raise UserError("gin macro TRAIN_STEPS is not set; add --gin.TRAIN_STEPS=...") from None


# ----------------------------------------------------------------------------------------
# This package's model as t5x's `model`
# ----------------------------------------------------------------------------------------


def clu_metrics_from_arrays(metrics: Mapping[str, Array], batch: Mapping[str, Array]) -> dict:
    """`models.compute_base_metrics`' arrays as the clu metrics t5x's trainer merges.

    Per-step values (`loss`, `z_loss`, `cross_ent_loss`) average over steps, ratios keep
    their numerator and denominator (so merging batches weights them correctly), counts
    add up; t5x's timing metrics are added from the batch size.
    """
    targets = batch["decoder_target_tokens"]
    all_tokens = jnp.asarray(targets.size, jnp.float32)
    num_tokens = jnp.maximum(metrics["num_tokens"], 1.0)
    weight_sum = metrics["weight_sum"]
    rows = jnp.asarray(targets.shape[0], jnp.float32)
    out = {
        "loss": t5x_metrics.AveragePerStep(total=metrics["loss"]),
        "z_loss": t5x_metrics.AveragePerStep(total=metrics["z_loss"]),
        "cross_ent_loss": t5x_metrics.AveragePerStep(total=metrics["cross_ent_loss"]),
        "accuracy": clu_metrics.Average(total=metrics["accuracy"] * weight_sum, count=weight_sum),
        "loss_per_nonpadding_target_token": clu_metrics.Average(
            total=metrics["loss"], count=num_tokens
        ),
        "loss_per_all_target_tokens": clu_metrics.Average(total=metrics["loss"], count=all_tokens),
        "weight_sum": t5x_metrics.Sum(weight_sum),
        "num_examples": t5x_metrics.Sum(metrics["num_examples"]),
        "num_tokens": t5x_metrics.Sum(metrics["num_tokens"]),
        "timing/seqs": t5x_metrics.Sum(rows),
        "timing/seqs_per_second": t5x_metrics.TimeRate.from_model_output(numerator=rows),
        "timing/steps_per_second": t5x_metrics.StepsPerTime.from_model_output(),
        "timing/seconds": t5x_metrics.Time(),
    }
    return out


class ProjectModelAdapter(t5x_models.BaseModel):
    """This package's `models.EncoderDecoderModel` as a t5x model.

    Loss, decoding (`model.decode_fn`: this package's `beam_search` or
    `temperature_sample`), scoring and init are the package model's own; the adapter
    adds what t5x's trainer needs: `optimizer_def`, clu metrics from `loss_fn`, and the
    task-id feature converter. gin: include `t5x/include/project_model.gin` after the
    method file.
    """

    def __init__(self, model: Any, optimizer_def: Any):
        super().__init__(optimizer_def=optimizer_def)
        self.model = model
        self.module = model.module
        converter_cls = (
            getattr(model, "_feature_converter_cls", None)
            or feature_converters.EncDecTaskIdFeatureConverter
        )
        self.FEATURE_CONVERTER_CLS = converter_with_prompt_slots(  # noqa: N815 (t5x's name)
            converter_cls, model.input_prompt_length
        )

    @property
    def input_vocabulary(self):
        return self.model.input_vocabulary

    @property
    def output_vocabulary(self):
        return self.model.output_vocabulary

    def loss_fn(self, params, batch, dropout_rng):
        loss, metrics = self.model.loss_fn(params, batch, dropout_rng)
        return loss, clu_metrics_from_arrays(metrics, batch)

    def predict_batch_with_aux(self, params, batch, rng=None, **kwargs):
        return self.model.predict_batch_with_aux(params, batch, rng=rng, **kwargs)

    def score_batch(self, params, batch, return_intermediates=False):
        return self.model.score_batch(params, batch, return_intermediates=return_intermediates)

    def get_initial_variables(self, rng, input_shapes, input_types=None):
        # Task ids for init, as EncoderDecoderModel above (per position when packed).
        shapes = {k: v for k, v in input_shapes.items() if k not in packing.TASK_ID_FEATURES}
        shapes.update({k: v.shape for k, v in _init_task_ids(shapes).items()})
        return self.model.get_initial_variables(rng, shapes, input_types)


# ----------------------------------------------------------------------------------------
# seqio.Evaluator on data with rank-0 features
# ----------------------------------------------------------------------------------------


def _measure_without_scalar_features(measure):
    """Wraps seqio's `_cache_and_measure_examples` so rank-0 features are not measured.

    seqio reads `example[feature].shape[sequence_dim]` for every declared feature, which
    fails for a scalar (`task_id`). The wrapper gives seqio the scalars as `[1]` vectors
    while measuring and caching, turns them back into scalars in the cached datasets
    (what the feature converter later reads), and drops them from the measured lengths
    (they are not sequences, so they must not become feature lengths).
    """

    def wrapped(tasks, dataset_fn, sequence_dims, *args, **kwargs):
        scalars = {
            name
            for task in tasks
            for name, feature in task.output_features.items()
            if feature.rank == 0
        }
        if not scalars:
            return measure(tasks, dataset_fn, sequence_dims, *args, **kwargs)

        def reshape(ds, shape):
            return ds.map(
                lambda ex: {k: tf.reshape(v, shape) if k in scalars else v for k, v in ex.items()}
            )

        cached, lengths = measure(
            tasks, lambda task: reshape(dataset_fn(task), [1]), sequence_dims, *args, **kwargs
        )
        cached = {name: reshape(ds, []) for name, ds in cached.items()}  # keeps cardinality
        return cached, {k: v for k, v in lengths.items() if k not in scalars}

    wrapped.wraps_scalar_features = True
    return wrapped


if not getattr(seqio.evaluation._cache_and_measure_examples, "wraps_scalar_features", False):
    seqio.evaluation._cache_and_measure_examples = _measure_without_scalar_features(
        seqio.evaluation._cache_and_measure_examples
    )
