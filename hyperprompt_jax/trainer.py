"""Train state and the jitted, sharded train / eval / predict steps.

Speed and memory come from three choices:

* **Frozen parameters cost nothing but their storage.** The parameter tree is split
  by the method's `TRAINABLE_PATTERNS` (`trainable.trainable_mask`) into a trainable
  and a frozen tree. `jax.value_and_grad` differentiates w.r.t. the trainable tree
  only (XLA never forms a weight gradient for a frozen parameter), and the optimizer
  state covers only the trainable tree. Prompt tuning of T5-XXL keeps Adafactor state
  for 102,400 floats instead of 11 billion.
* **One compiled step.** Shapes are static (fixed batch size and feature lengths); the
  step is jitted once with explicit input / output shardings over the `data` x `model`
  mesh (`partitioning.Partitioner`), and the train state is donated so its buffers are
  updated in place.
* **A bad step never lands.** If the loss or an updated parameter is not finite, the
  step returns the previous state unchanged (a select fused into the update), and the
  loop stops with a message; the last checkpoint stays the last good one.

The dropout key of step `s` is `fold_in(key(seed), s)`, a function of the step only,
so a resumed run draws the same randomness as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from hyperprompt_jax import checkpoints as checkpoints_lib
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import trainable as trainable_lib

PyTree = Any
Batch = Mapping[str, jax.Array]
Schedule = Callable[[jax.Array], jax.Array]
OptimizerDef = Callable[[Schedule], optax.GradientTransformation]

# Top-level parameter names of the method hooks (`network.Transformer.prompt` /
# `.hyperprompt`). An initial checkpoint supplies everything else (the backbone).
METHOD_PARAM_ROOTS = ("prompt", "hyperprompt")


def is_method_param(name: str) -> bool:
    """True for a '/'-joined parameter name under a method hook."""
    return name.split("/", 1)[0] in METHOD_PARAM_ROOTS


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: the step, the parameters, the optimizer.

    Attributes:
      step: int32 scalar, number of applied updates.
      trainable: parameters that are updated (nested dict, a subset of the paths).
      frozen: the remaining parameters (never differentiated, no optimizer state).
      opt_state: the optax state of `trainable`.
    """

    step: jax.Array
    trainable: PyTree
    frozen: PyTree
    opt_state: PyTree

    @property
    def params(self) -> PyTree:
        """The full `params` collection (no copy: the leaves are shared)."""
        return merge_params(self.trainable, self.frozen)


def split_params(params: PyTree, mask: PyTree) -> Tuple[PyTree, PyTree]:
    """Splits `params` by a bool tree into `(trainable, frozen)` nested dicts."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    flat_mask = traverse_util.flatten_dict(flax.core.unfreeze(mask))
    trainable = {k: v for k, v in flat.items() if flat_mask[k]}
    frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `split_params`."""
    flat = dict(traverse_util.flatten_dict(flax.core.unfreeze(frozen)))
    flat.update(traverse_util.flatten_dict(flax.core.unfreeze(trainable)))
    return traverse_util.unflatten_dict(flat)


def tree_bytes(tree: PyTree) -> int:
    """Total bytes of the array leaves of `tree` (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def summarize_intermediates(intermediates: PyTree | None, max_entries: int = 64) -> dict:
    """Scalar summaries of sown values (e.g. SMoP's router load) for the logs.

    Each sown value is averaged over its calls and over leading (batch) axes until at
    most `max_entries` numbers remain; vectors become one metric per entry:
    `router/prompt_fraction/2`.
    """
    out: dict[str, jax.Array] = {}
    if not intermediates:
        return out
    for path, values in traverse_util.flatten_dict(flax.core.unfreeze(intermediates)).items():
        values = values if isinstance(values, (tuple, list)) else (values,)
        value = jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32) for v in values]), axis=0)
        while value.ndim and value.size > max_entries:
            value = jnp.mean(value, axis=0)
        name = "/".join(str(p) for p in path)
        if value.ndim == 0:
            out[name] = value
        else:
            for i, v in enumerate(value.reshape(-1)):
                out[f"{name}/{i}"] = v
    return out


@dataclasses.dataclass
class StateLayout:
    """Abstract train state (shapes) and its shardings."""

    abstract: TrainState
    shardings: TrainState
    param_shardings: PyTree
    mask: PyTree


class Trainer:
    """Builds, initialises and steps a sharded `TrainState` for a model.

    Args:
      model: `models.EncoderDecoderModel` (or anything with its methods).
      optimizer_def: `schedule -> optax.GradientTransformation` (e.g. `optim.adafactor`).
      learning_rate_fn: the schedule (also logged).
      partitioner: the mesh and logical rules.
      input_shapes: batched model-feature shapes, e.g. `{'encoder_input_tokens':
        (B, L_in), 'decoder_input_tokens': (B, L_out), ..., 'task_ids': (B,)}`.
      trainable_patterns: regexes of trained parameters (None = all).
      seed: seeds parameter initialisation and dropout.
      input_types: dtypes of the inputs (default int32).
    """

    def __init__(
        self,
        model: Any,
        optimizer_def: OptimizerDef,
        learning_rate_fn: Schedule,
        partitioner: partitioning_lib.Partitioner,
        input_shapes: Mapping[str, Sequence[int]],
        trainable_patterns: Sequence[str] | None = None,
        seed: int = 0,
        input_types: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.learning_rate_fn = learning_rate_fn
        self.optimizer = optimizer_def(learning_rate_fn)
        self.partitioner = partitioner
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        self.input_types = dict(input_types or {})
        self.trainable_patterns = trainable_patterns
        self.seed = seed
        self._init_key = jax.random.key(seed)
        self._dropout_key = jax.random.fold_in(jax.random.key(seed), 1)
        partitioner.check_batch_size(next(iter(self.input_shapes.values()))[0])
        self.layout = self._make_layout()
        self._train_step = None
        self._eval_step = None
        self._predict_fns: dict = {}

    # ----------------------------------------------------------------------------------
    # Shapes and shardings
    # ----------------------------------------------------------------------------------

    def _variables(self, rng: jax.Array) -> PyTree:
        return self.model.get_initial_variables(rng, self.input_shapes, self.input_types)

    def _make_layout(self) -> StateLayout:
        variables = jax.eval_shape(self._variables, self._init_key)
        params = flax.core.unfreeze(variables["params"])
        mask = trainable_lib.trainable_mask(params, self.trainable_patterns)
        logical = partitioning_lib.params_logical_axes(params, variables.get("params_axes"))
        param_shardings = self.partitioner.logical_to_sharding(logical)
        trainable, frozen = split_params(params, mask)
        opt_state = jax.eval_shape(self.optimizer.init, trainable)
        trainable_shardings, frozen_shardings = split_params(param_shardings, mask)
        replicated = self.partitioner.replicated

        # Optimizer leaves shaped like their parameter (Adafactor's unfactored `v`) are
        # sharded like it; factored row / column statistics and counters are small and
        # replicated (t5x does the same).
        def like_param(leaf, param, sharding):
            return sharding if tuple(leaf.shape) == tuple(param.shape) else replicated

        opt_shardings = optax.tree_map_params(
            self.optimizer,
            like_param,
            opt_state,
            trainable,
            trainable_shardings,
            transform_non_params=lambda _: replicated,
        )
        abstract = TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=opt_state,
        )
        shardings = TrainState(
            step=replicated,
            trainable=trainable_shardings,
            frozen=frozen_shardings,
            opt_state=opt_shardings,
        )
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
        )
        return StateLayout(abstract, shardings, param_shardings, mask)

    @property
    def param_shapes(self) -> PyTree:
        """`{path: ShapeDtypeStruct}` of the full parameter tree."""
        return merge_params(self.layout.abstract.trainable, self.layout.abstract.frozen)

    def batch_shardings(self, batch_shapes: Mapping[str, Sequence[int]]) -> dict:
        """Shardings of a batch: every feature split over `data` along its first axis."""
        return {k: self.partitioner.batch_sharding(len(v)) for k, v in batch_shapes.items()}

    # ----------------------------------------------------------------------------------
    # Initialisation
    # ----------------------------------------------------------------------------------

    def _state_from_params(self, params: PyTree) -> TrainState:
        trainable, frozen = split_params(params, self.layout.mask)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            frozen=frozen,
            opt_state=self.optimizer.init(trainable),
        )

    def init_state(self) -> TrainState:
        """A fresh, sharded train state (parameters initialised on their devices)."""
        fn = self.partitioner.jit(
            lambda rng: self._state_from_params(flax.core.unfreeze(self._variables(rng)["params"])),
            in_shardings=None,
            out_shardings=self.layout.shardings,
        )
        return fn(self._init_key)

    def abstract_params(self) -> dict:
        """Flat `{name: ShapeDtypeStruct(shape, dtype, sharding)}` of every parameter."""
        return checkpoints_lib.flatten_params(self.param_shapes)

    def fresh_params(self, names: Sequence[str]) -> dict:
        """Flat `{name: jax.Array}` of freshly initialised `names` only.

        One jitted initialisation whose outputs are just `names`, placed by
        `out_shardings`: XLA drops the initialisers of every other parameter, so the
        rest of the model is never materialised.
        """
        names = sorted(names)
        if not names:
            return {}
        abstract = self.abstract_params()

        def init(rng):
            flat = checkpoints_lib.flatten_params(
                flax.core.unfreeze(self._variables(rng)["params"])
            )
            return {name: flat[name] for name in names}

        fn = self.partitioner.jit(
            init, in_shardings=None, out_shardings={n: abstract[n].sharding for n in names}
        )
        return fn(self._init_key)

    def _check_loadable(self, stored: Mapping[str, Sequence[int]], source: str) -> None:
        """UserError unless `stored` is the whole backbone (+ method params the model has)."""
        model_flat = self.abstract_params()
        expected = {k: v for k, v in model_flat.items() if not is_method_param(k)}
        expected.update(
            {k: model_flat[k] for k in stored if is_method_param(k) and k in model_flat}
        )
        checkpoints_lib.check_params_match(stored, expected, source=source)

    def params_from_source(self, loaded: Any, source: str) -> PyTree:
        """The full parameter tree: the backbone (and any method parameters) from
        `loaded`, read straight into the parameter shardings and cast to the model's
        dtypes; the remaining method parameters initialised fresh. No optimizer state.

        Args:
          loaded: a `checkpoints.WeightSource` (lazy) or a nested dict of arrays.
          source: where the weights came from (for error messages).

        Raises:
          UserError: if a backbone parameter is missing or has the wrong shape, or the
            checkpoint has parameters the model lacks (all listed).
        """
        if not isinstance(loaded, checkpoints_lib.WeightSource):
            loaded = checkpoints_lib.array_source(loaded, source)
        self._check_loadable(loaded.shapes(), f"initial checkpoint {source}")
        abstract = self.abstract_params()
        flat = loaded.load({n: (abstract[n].sharding, abstract[n].dtype) for n in loaded.tensors})
        flat.update(self.fresh_params(set(abstract) - set(flat)))
        return checkpoints_lib.unflatten_params(flat)

    def state_from_params(self, params: PyTree, step: int | jax.Array = 0) -> TrainState:
        """A train state around sharded `params`: split by the mask, fresh optimizer
        state (jitted, placed by `out_shardings`)."""
        trainable, frozen = split_params(params, self.layout.mask)
        opt_init = self.partitioner.jit(
            self.optimizer.init,
            in_shardings=(self.layout.shardings.trainable,),
            out_shardings=self.layout.shardings.opt_state,
        )
        step = jax.device_put(jnp.asarray(step, jnp.int32), self.layout.shardings.step)
        return TrainState(
            step=step, trainable=trainable, frozen=frozen, opt_state=opt_init(trainable)
        )

    def init_state_from_params(self, loaded: Any, source: str) -> TrainState:
        """A train state whose backbone comes from `loaded` and method parameters are fresh.

        Nothing is initialised randomly first: checkpoint parameters are read straight
        into their shardings, only the missing (method) parameters are initialised.

        Args:
          loaded: a `checkpoints.WeightSource` or nested dict of arrays (a t5x or
            Hugging Face checkpoint's weights).
          source: where they came from (for error messages).

        Raises:
          UserError: if a backbone parameter is missing or has the wrong shape, or the
            checkpoint has parameters the model lacks (all listed).
        """
        return self.state_from_params(self.params_from_source(loaded, source))

    # ----------------------------------------------------------------------------------
    # Steps
    # ----------------------------------------------------------------------------------

    def _train_step_fn(self, state: TrainState, batch: Batch) -> Tuple[TrainState, dict]:
        dropout_rng = jax.random.fold_in(self._dropout_key, state.step)

        def loss_of(trainable):
            params = merge_params(trainable, state.frozen)
            return self.model.loss_fn(params, batch, dropout_rng, return_intermediates=True)

        (loss, (metrics, intermediates)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.trainable
        )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        ok = jnp.isfinite(loss) & _all_finite(trainable)

        def keep_if_bad(new, old):
            return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)

        new_state = TrainState(
            step=jnp.where(ok, state.step + 1, state.step),
            trainable=keep_if_bad(trainable, state.trainable),
            frozen=state.frozen,
            opt_state=keep_if_bad(opt_state, state.opt_state),
        )
        metrics = dict(metrics)
        metrics.update(summarize_intermediates(intermediates))
        metrics["learning_rate"] = self.learning_rate_fn(state.step)
        metrics["grad_norm"] = optax.global_norm(grads)
        metrics["finite"] = ok
        return new_state, metrics

    def _jitted_train_step(self):
        if self._train_step is None:
            self._train_step = self.partitioner.jit(
                self._train_step_fn,
                in_shardings=(self.layout.shardings, self.batch_shardings(self.input_shapes)),
                out_shardings=(self.layout.shardings, self.partitioner.replicated),
                donate_argnums=(0,),
            )
        return self._train_step

    def train_step(self, state: TrainState, batch: Batch) -> Tuple[TrainState, dict]:
        """One update (jitted on first use; `state` is donated).

        Returns:
          `(new_state, metrics)`; metrics are replicated scalars including `loss`,
          `learning_rate`, `grad_norm`, `finite` (False: the step was rejected).
        """
        return self._jitted_train_step()(state, batch)

    def compiled_train_step(self) -> Any:
        """The lowered and compiled train step (for memory / cost analysis)."""
        batch = {
            k: jax.ShapeDtypeStruct(v, self.input_types.get(k, jnp.int32))
            for k, v in self.input_shapes.items()
        }
        return self._jitted_train_step().lower(self.layout.abstract, batch).compile()

    def eval_step(self, params: PyTree, batch: Batch) -> dict:
        """Teacher-forced loss and metrics without dropout (jitted on first use)."""
        if self._eval_step is None:

            def eval_step(p, b):  # named: cli.COMPILED_STEPS announces its compilation
                return self.model.loss_fn(p, b, None)[1]

            self._eval_step = self.partitioner.jit(
                eval_step,
                in_shardings=(self.layout.param_shardings, self.batch_shardings(self.input_shapes)),
                out_shardings=self.partitioner.replicated,
            )
        return self._eval_step(params, batch)

    def predict_step(
        self, params: PyTree, batch: Batch, decoder_params: Mapping[str, Any] | None = None
    ) -> jax.Array:
        """Decoded tokens `[batch, targets_length]` (jitted once per batch shape and
        decoding options: the options are baked into the compiled function)."""
        decoder_params = dict(decoder_params or {})
        key = (
            tuple(sorted((k, tuple(v.shape)) for k, v in batch.items())),
            tuple(sorted((k, repr(v)) for k, v in decoder_params.items())),
        )
        if key not in self._predict_fns:

            def predict_step(p, b):  # named: cli.COMPILED_STEPS announces its compilation
                return self.model.predict_batch(p, b, decoder_params=dict(decoder_params))

            self._predict_fns[key] = self.partitioner.jit(
                predict_step,
                in_shardings=(
                    self.layout.param_shardings,
                    {k: self.partitioner.batch_sharding(v.ndim) for k, v in batch.items()},
                ),
                out_shardings=self.partitioner.replicated,
            )
        return self._predict_fns[key](params, batch)

    def score_step(self, params: PyTree, batch: Batch) -> jax.Array:
        """Log-likelihood of each target `[batch]` (jitted once per batch shape)."""
        key = ("score",) + tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
        if key not in self._predict_fns:
            self._predict_fns[key] = self.partitioner.jit(
                self.model.score_batch,
                in_shardings=(
                    self.layout.param_shardings,
                    {k: self.partitioner.batch_sharding(v.ndim) for k, v in batch.items()},
                ),
                out_shardings=self.partitioner.replicated,
            )
        return self._predict_fns[key](params, batch)

    # ----------------------------------------------------------------------------------
    # Reporting
    # ----------------------------------------------------------------------------------

    def memory_report(self) -> dict[str, int]:
        """Bytes of parameters, optimizer state, and the compiled step's buffers.

        Returns:
          `trainable_params`, `total_params` (counts), `param_bytes`,
          `optimizer_state_bytes`, XLA's FLOP count of the compiled train step
          `step_flops` (frozen parameters get no weight gradient: fewer FLOPs), and its
          memory analysis `step_argument_bytes`, `step_output_bytes`, `step_temp_bytes`
          (activations and gradients) and `step_alias_bytes` (donated, updated in place).
        """
        abstract = self.layout.abstract
        trainable, total = trainable_lib.count(self.param_shapes, self.trainable_patterns)
        report = {
            "trainable_params": trainable,
            "total_params": total,
            "param_bytes": tree_bytes(self.param_shapes),
            "optimizer_state_bytes": tree_bytes(abstract.opt_state),
        }
        compiled = self.compiled_train_step()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            report["step_flops"] = int(cost["flops"])
        analysis = compiled.memory_analysis()
        if analysis is not None:
            report.update(
                step_argument_bytes=int(analysis.argument_size_in_bytes),
                step_output_bytes=int(analysis.output_size_in_bytes),
                step_temp_bytes=int(analysis.temp_size_in_bytes),
                step_alias_bytes=int(analysis.alias_size_in_bytes),
            )
        return report


# -------------------------------------------------------------------------------------
# The one Trainer factory of the launchers (train, eval, infer, plan, benchmarks)
# -------------------------------------------------------------------------------------

FROM_GIN = "from gin"


def from_gin(
    input_shapes: Mapping[str, Sequence[int]],
    *,
    model: Any = None,
    partitioner: Any = None,
    optimizer_def: OptimizerDef | None = None,
    learning_rate_fn: Schedule | None = None,
    trainable_patterns: Any = FROM_GIN,
    seed: int = 0,
) -> Trainer:
    """A `Trainer` for the parsed gin config; explicit arguments win over gin.

    Args:
      input_shapes: batched model-feature shapes (see `Trainer`).
      model: default: the gin macro `MODEL`.
      partitioner: default: `partitioning.Partitioner()` as gin configures it.
      optimizer_def: default: `optim.adafactor` with its gin bindings.
      learning_rate_fn: default: `optim.create_learning_rate_scheduler()` with its gin
        bindings. Evaluated at step 0 here, so a bad value (`LEARNING_RATE='fast'`)
        fails before anything is compiled.
      trainable_patterns: default: the gin macro `TRAINABLE_PATTERNS` (unset = all).
      seed: parameter initialisation and dropout.

    Raises:
      UserError: a learning-rate schedule that fails or is not finite at step 0.
    """
    import gin
    from hyperprompt_jax import gin_utils, optim
    from hyperprompt_jax.errors import UserError

    def configured(fn):
        try:
            return gin.get_configurable(fn)
        except ValueError:  # Not mentioned by any gin file: its defaults.
            return fn

    if model is None:
        model = gin_utils.configured("MODEL")
    if partitioner is None:
        partitioner = configured(partitioning_lib.Partitioner)()
    optimizer_def = optimizer_def or configured(optim.adafactor)
    learning_rate_fn = learning_rate_fn or configured(optim.create_learning_rate_scheduler)()
    if trainable_patterns == FROM_GIN:
        trainable_patterns = gin_utils.query_macro("TRAINABLE_PATTERNS", None)
    try:
        rate = float(np.asarray(learning_rate_fn(jnp.asarray(0, jnp.int32))))
    except (TypeError, ValueError) as e:
        raise UserError(
            f"The learning-rate schedule fails at step 0 ({e}); check LEARNING_RATE and the "
            "create_learning_rate_scheduler bindings (numbers expected)."
        ) from None
    if not math.isfinite(rate):
        raise UserError(f"The learning rate at step 0 is {rate}; check LEARNING_RATE.")
    return Trainer(
        model,
        optimizer_def,
        learning_rate_fn,
        partitioner,
        input_shapes,
        trainable_patterns=trainable_patterns,
        seed=seed,
    )
