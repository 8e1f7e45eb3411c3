"""Logical axis rules -> shardings over a `jax.sharding.Mesh` with axes `data` and `model`.

Every parameter and activation of the network carries logical axis names (`embed`,
`mlp`, `heads`, `vocab`, ... from `param_with_axes` / `with_logical_constraint`). This
module is the one place that maps them to the two mesh axes:

* `data`: the batch is split over it (data parallelism); parameters are replicated
  along it (unless `parameter_partitioning_dims=2`, which also splits `embed`).
* `model`: the wide dimensions (`mlp`, `heads`/`joined_kv`, `vocab`) are split over it
  (Megatron-style tensor parallelism), exactly t5x's `standard_logical_axis_rules`.

The methods' own parameters are small (at most a few prompts of `[length, emb_dim]`
per task, and bottleneck hypernetworks): `METHOD_AXIS_RULES` replicates their
method-specific axes, so routing and prompt lookups need no communication; their
`embed` dimension follows the backbone's rule.

`Partitioner` builds the mesh, turns the `params_axes` collection into
`NamedSharding`s and jits functions with those shardings, inside the mesh and the
logical-rule contexts so that the activation constraints in the network take effect.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Mapping, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import numpy as np
from flax.linen import partitioning as flax_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from hyperprompt_jax.errors import UserError

PyTree = Any
LogicalRules = Sequence[Tuple[str, str | None]]

DATA_AXIS = "data"
MODEL_AXIS = "model"

# Logical axes introduced by the methods (prompts.py, smop.py, hyperprompt.py). All are
# replicated: the tensors are tiny next to the backbone, and replicating them means the
# per-example prompt gather and the router need no collective.
METHOD_AXIS_RULES: Tuple[Tuple[str, str | None], ...] = (
    ("prompt", None),  # prompt length l (prompts.py, smop.py)
    # Prompts keep their own `embed` name so they stay replicated even when the
    # backbone's `embed` is split (prompt-tuning's choice; one .npy file per prompt).
    ("prompt_embed", None),
    ("prompt_experts", None),  # SMoP: number of prompts k (and the router's outputs)
    ("tasks", None),  # per-task tables (multi-task prompts, HyperPrompt)
    # HyperPrompt: HyperNetwork bottleneck, generated key/value width, task and
    # layer-aware embeddings, and HyperPrompt-Global's task MLP (the per-layer
    # stacks use t5x's `layers` axis, replicated).
    ("bottleneck", None),
    ("prompt_kv", None),
    ("task_embed", None),
    ("task_mlp", None),
)

# Adafactor second-moment factorization of the same axes, in t5x's vocabulary
# ('row' / 'col' / 'batch' / 'none'; `hyperprompt_jax.t5x_bridge` adds them to t5x's
# `standard_logical_factor_rules`, which needs a rule for every axis of a rank-3+
# parameter). Every method tensor is small along all but one axis (prompt length,
# number of prompts or tasks, bottleneck), so none is factored: 'none' keeps the full
# second moment, and t5x then takes the update RMS (clipping, parameter scale) over
# the whole tensor, which is what `optim.adafactor` does for them. Rank-2 method
# parameters (one prompt, the router) fall back to t5x's size heuristic, as here.
METHOD_FACTOR_RULES: Tuple[Tuple[str, str], ...] = tuple(
    (name, "none") for name, _ in METHOD_AXIS_RULES
)


def standard_logical_axis_rules(
    activation_partitioning_dims: int = 1,
    parameter_partitioning_dims: int = 1,
    additional_rules: LogicalRules = (),
) -> list[Tuple[str, str | None]]:
    """t5x's standard logical axis rules for T5 (1-D or 2-D partitioning).

    Args:
      activation_partitioning_dims: 1 splits activations over `data` (batch) only;
        2 also splits their `embed` dimension over `model`.
      parameter_partitioning_dims: 1 replicates parameters along `data`; 2 also
        splits their `embed` dimension over `data` (ZeRO-3 style, for the largest
        models).
      additional_rules: rules appended after the standard ones (first match wins).

    Returns:
      A list of `(logical_axis, mesh_axis_or_None)`.

    Raises:
      ValueError: for partitioning dims other than 1 or 2.
    """
    for name, value in (
        ("activation_partitioning_dims", activation_partitioning_dims),
        ("parameter_partitioning_dims", parameter_partitioning_dims),
    ):
        if value not in (1, 2):
            raise UserError(f"{name} must be 1 or 2, got {value!r}.")
    rules: list[Tuple[str, str | None]] = [
        ("batch", DATA_AXIS),
        ("vocab", MODEL_AXIS),
        ("mlp", MODEL_AXIS),
        ("heads", MODEL_AXIS),
        ("kv", None),
        ("joined_kv", MODEL_AXIS),
    ]
    # `embed` may appear twice: activations' embed on `model`, parameters' embed on
    # `data`. flax uses the first rule whose mesh axis is not already taken.
    if activation_partitioning_dims == 2:
        rules.append(("embed", MODEL_AXIS))
    if parameter_partitioning_dims == 2:
        rules.append(("embed", DATA_AXIS))
    if activation_partitioning_dims == 1 and parameter_partitioning_dims == 1:
        rules.append(("embed", None))
    rules += [
        ("relpos_buckets", None),
        ("abspos_buckets", None),
        ("length", None),
        ("layers", None),
        ("stack", None),
        ("mlp_activations", None),
    ]
    rules += list(additional_rules)
    return rules


def default_logical_axis_rules(
    activation_partitioning_dims: int = 1, parameter_partitioning_dims: int = 1
) -> list[Tuple[str, str | None]]:
    """The standard T5 rules plus the methods' (`METHOD_AXIS_RULES`)."""
    return standard_logical_axis_rules(
        activation_partitioning_dims, parameter_partitioning_dims, METHOD_AXIS_RULES
    )


def _flat(tree: Mapping[str, Any]) -> dict[Tuple[str, ...], Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def params_logical_axes(params: PyTree, params_axes: PyTree | None) -> PyTree:
    """The logical axis names of every parameter, as a tree like `params`.

    Args:
      params: the parameter tree (arrays or `jax.ShapeDtypeStruct`s).
      params_axes: the `params_axes` collection written by `param_with_axes`
        (`{..., 'kernel_axes': AxisMetadata(names=(...))}`), or None.

    Returns:
      A tree of `PartitionSpec`s of logical names; parameters without axis metadata
      get `PartitionSpec()` (replicated) and are logged once.
    """
    flat_params = _flat(params)
    names = {}
    if params_axes:
        for path, meta in _flat(params_axes).items():
            leaf = path[-1]
            if leaf.endswith("_axes"):
                names[path[:-1] + (leaf[: -len("_axes")],)] = tuple(meta.names)
    out, missing = {}, []
    for path, value in flat_params.items():
        axes = names.get(path)
        if axes is None:
            missing.append("/".join(path))
            axes = (None,) * len(value.shape)
        elif len(axes) != len(value.shape):
            raise ValueError(
                f"Parameter {'/'.join(path)} has shape {tuple(value.shape)} but logical "
                f"axes {axes}; expected one name per dimension."
            )
        out[path] = PartitionSpec(*axes)
    if missing:
        logging.warning(
            "Parameters without logical axis names are replicated: %s", ", ".join(missing)
        )
    return flax.traverse_util.unflatten_dict(out)


def logical_to_mesh_spec(logical: PartitionSpec, rules: LogicalRules) -> PartitionSpec:
    """Maps one `PartitionSpec` of logical names to mesh axes (first free rule wins).

    Raises:
      ValueError: for a logical name no rule mentions (the fix is one line in the
        rules, and silently replicating a large tensor is an expensive mistake).
    """
    known = {name for name, _ in rules}
    for name in logical:
        if name is not None and name not in known:
            raise UserError(
                f"Logical axis {name!r} (in {logical}) has no partitioning rule; add "
                f"({name!r}, None) to replicate it or ({name!r}, 'model') to split it, via "
                "partitioning.Partitioner.logical_axis_rules. Known axes: "
                f"{sorted(known)}."
            )
    return flax_partitioning.logical_to_mesh_axes(tuple(logical), rules)


class Partitioner:
    """A `data` x `model` device mesh plus logical axis rules.

    Attributes:
      mesh: the `jax.sharding.Mesh` (axes `data`, `model`).
      rules: the logical axis rules.
    """

    def __init__(
        self,
        num_partitions: int = 1,
        logical_axis_rules: LogicalRules | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        """Builds the mesh.

        Args:
          num_partitions: size of the `model` axis (1 = pure data parallelism); the
            `data` axis takes the remaining devices.
          logical_axis_rules: rules; default `default_logical_axis_rules()`.
          devices: devices to use (default: all devices of all processes).

        Raises:
          ValueError: if the device count is not a multiple of `num_partitions`.
        """
        devices = list(jax.devices() if devices is None else devices)
        if num_partitions < 1 or len(devices) % num_partitions:
            raise UserError(
                f"num_partitions={num_partitions} must be >= 1 and divide the number of "
                f"devices ({len(devices)})."
            )
        shape = (len(devices) // num_partitions, num_partitions)
        auto = (jax.sharding.AxisType.Auto,) * 2
        if devices == list(jax.devices()):
            # make_mesh orders devices along the physical topology (ICI rings on TPU).
            self.mesh = jax.make_mesh(shape, (DATA_AXIS, MODEL_AXIS), axis_types=auto)
        else:
            self.mesh = jax.sharding.Mesh(
                np.asarray(devices).reshape(shape), (DATA_AXIS, MODEL_AXIS), axis_types=auto
            )
        self.rules = list(
            default_logical_axis_rules() if logical_axis_rules is None else logical_axis_rules
        )

    @property
    def data_size(self) -> int:
        """Number of devices along the `data` axis."""
        return self.mesh.shape[DATA_AXIS]

    @property
    def model_size(self) -> int:
        """Number of devices along the `model` axis."""
        return self.mesh.shape[MODEL_AXIS]

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        """A `NamedSharding` on this mesh for a mesh-axis `PartitionSpec`."""
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        """Fully replicated placement."""
        return self.sharding(PartitionSpec())

    def logical_to_sharding(self, logical_tree: PyTree) -> PyTree:
        """Maps a tree of logical `PartitionSpec`s to `NamedSharding`s."""
        return jax.tree.map(
            lambda spec: self.sharding(logical_to_mesh_spec(spec, self.rules)),
            logical_tree,
            is_leaf=lambda x: isinstance(x, PartitionSpec),
        )

    def batch_sharding(self, ndim: int) -> NamedSharding:
        """Sharding of a batch feature `[batch, ...]`: batch over `data`."""
        return self.sharding(PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ValueError unless `batch_size` splits evenly over `data` and hosts."""
        if batch_size % self.data_size or batch_size % jax.process_count():
            raise UserError(
                f"BATCH_SIZE={batch_size} must be divisible by the data-parallel size "
                f"({self.data_size}) and the number of processes ({jax.process_count()})."
            )

    @contextlib.contextmanager
    def context(self):
        """Activates the mesh and the logical rules (for tracing, calling, lowering)."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def jit(
        self,
        fn: Callable[..., Any],
        in_shardings: Any,
        out_shardings: Any,
        donate_argnums: Tuple[int, ...] = (),
    ) -> PartitionedFn:
        """`jax.jit` with shardings, called and traced inside `context()`."""
        jitted = jax.jit(
            fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=donate_argnums,
        )
        return PartitionedFn(jitted, self)


class PartitionedFn:
    """A jitted function that always runs inside its partitioner's context."""

    def __init__(self, jitted: Any, partitioner: Partitioner):
        self._jitted = jitted
        self._partitioner = partitioner

    def __call__(self, *args):
        with self._partitioner.context():
            return self._jitted(*args)

    def lower(self, *args):
        """`jax.jit(...).lower` in context (for memory and cost analysis)."""
        with self._partitioner.context():
            return self._jitted.lower(*args)
