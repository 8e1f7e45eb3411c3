"""`python -m hyperprompt_jax.plan`: will a gin-configured training run fit a device mesh?

    python -m hyperprompt_jax.plan --gin_file=models/t5_1_1_xxl.gin \\
        --gin_file=methods/hyperprompt_global.gin --gin.NUM_TASKS=8 \\
        --gin_file=partitioning/t5_1_1_xxl_v3_256.gin --tpu=v3-256 \\
        --task_feature_lengths=inputs:512,targets:8 [--batch_size=256] [--verify]

It takes the same gin files as `train` (model, method, run and partitioning files) plus
a mesh, and reports per device, in bytes:

* **parameters**: every parameter's shard under the gin's logical axis rules (the
  `Trainer`'s own layout, built on an abstract mesh: nothing is allocated, so T5-XXL
  on 256 devices is planned on a laptop);
* **optimizer state**: the optax state of the *trainable* parameters only, sharded
  as the `Trainer` shards it (Adafactor's factored row / column statistics are
  replicated, an unfactored second moment follows its parameter);
* **gradients and update**: one gradient and one update buffer per trainable
  parameter shard (XLA keeps both alive while Adafactor runs). Under 2-D parameter
  partitioning (`embed` split over `data`) a weight gradient is formed whole along
  `data` and only then reduce-scattered, and XLA keeps them all until the update
  (measured: T5-XXL on 256 fake devices, the compiled temporaries equal those of 1-D
  partitioning), so they are counted unsharded along `data`;
* **activations**: what the backward pass keeps from the forward pass, from the
  analytic count in `activation_bytes` (see its docstring for every term);

and whether their sum fits `device_memory * (1 - headroom)`. The last line is
`FITS` or `DOES NOT FIT`.

`--verify` compiles the real sharded train step for the same mesh on fake CPU
devices (a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=N`) and
prints XLA's per-device memory analysis next to the plan. The parameter and optimizer
figures must match XLA's argument sizes exactly; the activation estimate is checked
against XLA's temporary buffers. XLA:CPU fuses less than XLA:TPU and computes some
bfloat16 work in float32, so its temporaries are an upper bound for a TPU's.

Mesh flags: `--mesh=data:16,model:16`, or `--num_devices=N` (the `model` size is the
gin's `NUM_PARTITIONS`), or `--tpu=v3-256` (devices and per-device HBM of a Cloud TPU
slice; `--device_memory_gb` overrides the memory).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("plan")

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AbstractMesh

from hyperprompt_jax import compilation_cache, errors, gin_utils
from hyperprompt_jax import partitioning as partitioning_lib
from hyperprompt_jax import trainer as trainer_lib
from hyperprompt_jax.errors import UserError

PyTree = Any
GIB = 2**30

# Cloud TPU slices: name -> (TensorCores per JAX device, HBM GiB per JAX device). A
# slice `vX-N` names N TensorCores; v2 / v3 expose one device per core (8 / 16 GiB
# each), v4 / v5p fuse a chip's two cores into one megacore device (32 / 95 GiB), and
# v5e / v6e chips have one core (16 / 32 GiB).
TPU_DEVICES = {
    "v2": (1, 8.0),
    "v3": (1, 16.0),
    "v4": (2, 32.0),
    "v5p": (2, 95.0),
    "v5litepod": (1, 16.0),
    "v6e": (1, 32.0),
}

# JAX devices per TPU VM host: v2 / v3 hosts drive 4 chips of 2 cores (8 devices),
# v4 / v5p / v5e / v6e hosts 4 devices.
TPU_DEVICES_PER_HOST = {"v2": 8, "v3": 8, "v4": 4, "v5p": 4, "v5litepod": 4, "v6e": 4}
# The largest zarr chunk `save_t5x_checkpoint` (and t5x) writes: TensorStore decodes
# whole chunks, so a slice read holds at most one such chunk besides the slice.
ZARR_CHUNK_BYTES = 64 * 2**20

_FROM_GIN = "from gin"


def tpu_slice(name: str) -> tuple[int, float]:
    """`'v3-256'` -> `(jax_devices, hbm_gib_per_device)`.

    Raises:
      ValueError: for an unknown generation or a malformed name.
    """
    generation, _, cores = name.lower().rpartition("-")
    if generation not in TPU_DEVICES or not cores.isdigit() or int(cores) <= 0:
        raise UserError(
            f"Unknown TPU slice {name!r}; expected <generation>-<cores> with generation in "
            f"{sorted(TPU_DEVICES)}, e.g. v3-256 or v4-128."
        )
    cores_per_device, memory = TPU_DEVICES[generation]
    if int(cores) % cores_per_device:
        raise UserError(f"{name}: a {generation} slice has an even number of cores.")
    return int(cores) // cores_per_device, memory


def parse_mesh(spec: str) -> tuple[int, int]:
    """`'data:16,model:16'` -> `(16, 16)`.

    Raises:
      ValueError: unless the spec names exactly the axes `data` and `model` with
        positive sizes.
    """
    sizes = {}
    for part in spec.split(","):
        name, _, size = part.partition(":")
        if name.strip() not in ("data", "model") or not size.strip().isdigit():
            raise UserError(f"Bad --mesh {spec!r}; expected e.g. data:16,model:16.")
        sizes[name.strip()] = int(size)
    if set(sizes) != {"data", "model"} or min(sizes.values()) <= 0:
        raise UserError(f"Bad --mesh {spec!r}; give positive sizes for both data and model.")
    return sizes["data"], sizes["model"]


class AbstractPartitioner(partitioning_lib.Partitioner):
    """A `Partitioner` on an `AbstractMesh`: shardings for planning, no devices needed.

    Everything the `Trainer` needs to lay out its state (`logical_to_sharding`,
    `replicated`, `batch_sharding`) works; jitting and running need a real mesh.
    """

    def __init__(self, data: int, model: int, logical_axis_rules=None):  # noqa: D107
        axis_types = (jax.sharding.AxisType.Auto,) * 2
        self.mesh = AbstractMesh(
            (data, model),
            (partitioning_lib.DATA_AXIS, partitioning_lib.MODEL_AXIS),
            axis_types=axis_types,
        )
        self.rules = list(
            partitioning_lib.default_logical_axis_rules()
            if logical_axis_rules is None
            else logical_axis_rules
        )


# ----------------------------------------------------------------------------------------
# Reading the run from gin
# ----------------------------------------------------------------------------------------


def _quiet_gin_search_paths() -> None:
    # gin logs "Path not found" at ERROR for each search directory it tries; that is
    # expected (files are found in the package directory) and only hides real output.
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "Path not found" not in record.getMessage()

    for handler in logging.getLogger().handlers or [logging.lastResort]:
        if handler is not None:
            handler.addFilter(_Drop())
    logging.getLogger().addFilter(_Drop())


def parse_run_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
    import_tasks: bool = True,
) -> None:
    """Parses `train`'s gin files without requiring run-only macros (e.g. MODEL_DIR).

    Args:
      gin_files: relative names or paths, as `train` takes them.
      gin_bindings: `NAME=VALUE` bindings.
      search_paths: extra directories for gin files.
      import_tasks: import the task modules first (run files may configure them);
        model and method files alone need neither them nor seqio / TensorFlow.

    Raises:
      ValueError: bad gin (see `gin_utils.parse_gin`).
    """
    _quiet_gin_search_paths()
    if import_tasks:
        from hyperprompt_jax import data

        data.import_task_modules()
    gin_utils.parse_gin(gin_files, gin_bindings, search_paths, finalize=False)
    import gin

    # Memory does not depend on the learning-rate schedule, but a schedule that follows
    # the run's length (SMoP's warm-up fraction) needs a length to be built at all;
    # runs/finetune.gin binds it to TRAIN_STEPS, a model + method file alone does not.
    try:
        gin.query_parameter("optim.create_learning_rate_scheduler.total_steps")
    except ValueError:
        gin.bind_parameter("optim.create_learning_rate_scheduler.total_steps", 1000)


def gin_partitioning() -> tuple[Optional[int], list]:
    """`(NUM_PARTITIONS or None, logical axis rules)` as the parsed gin sets them."""
    import gin

    try:
        num_partitions = gin_utils.instantiate(
            gin.query_parameter("partitioning.Partitioner.num_partitions")
        )
    except ValueError:
        num_partitions = gin_utils.query_macro("NUM_PARTITIONS", None)
    try:
        rules = gin_utils.instantiate(
            gin.query_parameter("partitioning.Partitioner.logical_axis_rules")
        )
    except ValueError:
        rules = None
    if rules is None:
        rules = partitioning_lib.default_logical_axis_rules()
    return num_partitions, list(rules)


def _gin_lengths() -> Optional[dict]:
    value = gin_utils.query_macro("TASK_FEATURE_LENGTHS", None)
    return dict(value) if isinstance(value, Mapping) else None


def _gin_batch_size() -> Optional[int]:
    value = gin_utils.query_macro("BATCH_SIZE", None)
    return value if isinstance(value, int) else None


def input_shapes(
    batch_size: int, task_feature_lengths: Mapping[str, int], pack: bool = False
) -> dict[str, tuple[int, ...]]:
    """The model features of encoder-decoder batches and their shapes.

    What `data.default_feature_converter(pack)` produces (seqio's
    `EncDecFeatureConverter` plus `task_ids [batch]`, or, packed, segment ids,
    positions and per-position task ids), written out so that callers that only need
    shapes do not import seqio and TensorFlow.
    """
    inputs, targets = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    shapes = {
        "encoder_input_tokens": (batch_size, inputs),
        "decoder_input_tokens": (batch_size, targets),
        "decoder_target_tokens": (batch_size, targets),
        "decoder_loss_weights": (batch_size, targets),
    }
    if not pack:
        return {**shapes, "task_ids": (batch_size,)}
    for stack, length in (("encoder", inputs), ("decoder", targets)):
        for name in ("segment_ids", "positions", "task_ids"):
            shapes[f"{stack}_{name}"] = (batch_size, length)
    return shapes


def trainer_from_gin(
    partitioner: partitioning_lib.Partitioner,
    batch_size: int,
    task_feature_lengths: Mapping[str, int],
    trainable_patterns: Any = _FROM_GIN,
    pack: bool | None = None,
    use_feature_converter: bool = True,
) -> trainer_lib.Trainer:
    """A `Trainer` for the parsed gin's `MODEL`, method and optimiser (no weights made).

    Args:
      partitioner: a real `Partitioner` (to compile) or an `AbstractPartitioner`.
      batch_size: global batch size.
      task_feature_lengths: e.g. `{'inputs': 512, 'targets': 8}`.
      trainable_patterns: default: the gin macro `TRAINABLE_PATTERNS` (unset = all).
      pack: the batches' layout (packed rows: `packing`); None: the gin macro `PACK`
        (runs/finetune.gin), unpacked if unset.
      use_feature_converter: take the input shapes from the feature converter `train`
        uses (imports seqio); False: `input_shapes` (the same shapes).

    Raises:
      ValueError: a configuration error of the model, the method or the batch size.
    """
    if pack is None:
        pack = bool(gin_utils.query_macro("PACK", False))
    if use_feature_converter:
        from hyperprompt_jax import data

        # The shapes the launcher's converter gives (prompt slots change no shape).
        converter = data.default_feature_converter(pack=pack)
        shapes = converter.model_input_shapes(dict(task_feature_lengths), batch_size)
    else:
        shapes = input_shapes(batch_size, task_feature_lengths, pack)
    # The launchers' one factory: MODEL, the method's optimiser and schedule from gin.
    return trainer_lib.from_gin(
        shapes,
        partitioner=partitioner,
        trainable_patterns=trainer_lib.FROM_GIN
        if trainable_patterns == _FROM_GIN
        else trainable_patterns,
    )


# ----------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------


def per_device_bytes(tree: PyTree, unsharded_axes: Sequence[str] = ()) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s.

    Args:
      tree: `ShapeDtypeStruct`s with (or without) a `NamedSharding`.
      unsharded_axes: mesh axes to count as not splitting anything (e.g. `data`, for
        buffers that exist whole along it before a reduce-scatter).
    """
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            shape = tuple(leaf.shape)
        elif not unsharded_axes:
            shape = sharding.shard_shape(tuple(leaf.shape))
        else:
            mesh = dict(sharding.mesh.shape)
            spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
            shape = []
            for dim, entry in zip(leaf.shape, spec, strict=True):
                axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
                split = math.prod(mesh[a] for a in axes if a not in unsharded_axes)
                shape.append(math.ceil(dim / split))
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return int(total)


def activation_bytes(
    *,
    emb_dim: int,
    num_heads: int,
    head_dim: int,
    mlp_dim: int,
    num_mlp_inputs: int,
    vocab_size: int,
    num_encoder_layers: int,
    num_decoder_layers: int,
    batch_per_device: int,
    encoder_length: int,
    decoder_length: int,
    prefix_length: int = 0,
    model_parallel: int = 1,
    embed_parallel: int = 1,
    dtype_bytes: int = 2,
    backbone_trained: bool = True,
    remat_policy: str = "none",
) -> dict[str, int]:
    """Bytes of forward tensors the backward pass of one train step keeps, per device.

    Counted per example and layer (s = encoder length including an input prompt,
    t = decoder length, p = HyperPrompt prefix length, a = activation bytes; heads h,
    MLP width f and vocabulary V are divided by the `model` axis, the residual width
    d by `embed_parallel` (`model` under 2-D activation partitioning, else 1)):

    * self-attention: the layer-norm input (the residual stream, s*d), q, k, v
      (3*s*h*head_dim) plus the prefix keys and values (2*p*h*head_dim), and the
      softmax output (h*s*(s+p)), which its own gradient and dV need;
    * MLP (GeGLU): both input projections and the activation (3*s*f);
    * when the backbone is trained, also the inputs of every weight matmul (layer-norm
      outputs 2*s*d, attention context s*h*head_dim, MLP product s*f), which only weight
      gradients need: a frozen backbone (prompt tuning, SMoP) does not keep them;
    * decoder layers: the same over t, plus cross-attention: q (t*h*head_dim), k and
      v of the encoder output (2*s*h*head_dim) and its softmax (h*t*s);
    * the float32 logits and their softmax (2 * t * V * 4) and the encoder output.

    Rematerialised layers (`T5Config.remat_policy`) keep less per layer, and add the
    working set of the one layer being recomputed (its count above). This is what a
    memory-aware scheduler (XLA:TPU's) achieves; XLA:CPU schedules recomputation early
    and saves less or nothing (docs/benchmarks.md), so `--verify` cannot confirm it:

    * 'full': only the layer's input (n*d) and its prefix keys / values (2*p*h*head_dim);
    * 'minimal': the outputs of weight matmuls besides: q, k, v (3*n*h*head_dim), the
      attention and MLP output projections (2*n*d) and the MLP input projections
      (num_mlp_inputs*n*f); in decoder layers also the cross-attention q, k, v and
      output. Scores, softmax, activations and layer norms are recomputed.

    Scalars such as layer-norm statistics and masks are ignored. Float32 logits and
    layer-norm internals aside, everything is in the activation dtype.

    Returns:
      `{'encoder': ..., 'decoder': ..., 'logits': ..., ['recomputed layer': ...,]
      'total': ...}` in bytes.
    """
    a = dtype_bytes
    d = math.ceil(emb_dim / embed_parallel)
    h = math.ceil(num_heads / model_parallel)
    f = math.ceil(mlp_dim / model_parallel)
    v = math.ceil(vocab_size / model_parallel)
    s, t, p, k = encoder_length, decoder_length, prefix_length, head_dim

    def self_attention(n: int) -> int:
        kept = n * d + 3 * n * h * k + 2 * p * h * k + h * n * (n + p)
        if backbone_trained:
            kept += n * d + n * h * k  # layer-norm output, attention context
        return kept

    def mlp(n: int) -> int:
        kept = n * d + (num_mlp_inputs + 1) * n * f
        if backbone_trained:
            kept += n * d + n * f  # layer-norm output, wo input
        return kept

    def cross_attention() -> int:
        kept = t * d + t * h * k + 2 * s * h * k + h * t * s
        if backbone_trained:
            kept += t * d + t * h * k
        return kept

    encoder_layer = self_attention(s) + mlp(s)
    decoder_layer = self_attention(t) + cross_attention() + mlp(t)
    if remat_policy != "none":
        # One layer at a time is recomputed during the backward pass.
        recompute = max(
            encoder_layer if num_encoder_layers else 0, decoder_layer if num_decoder_layers else 0
        )
        if remat_policy == "full":
            encoder_layer = s * d + 2 * p * h * k
            decoder_layer = t * d + 2 * p * h * k
        elif remat_policy == "minimal":

            def saved(n: int) -> int:
                return n * d + 3 * n * h * k + 2 * p * h * k + 2 * n * d + num_mlp_inputs * n * f

            encoder_layer = saved(s)
            decoder_layer = saved(t) + t * h * k + 2 * s * h * k + t * d
        else:
            raise UserError(f"Unknown remat_policy {remat_policy!r}.")
    else:
        recompute = 0
    encoder = num_encoder_layers * encoder_layer * a
    decoder = num_decoder_layers * decoder_layer * a
    logits = 2 * t * v * 4 + s * d * a
    out = {
        "encoder": batch_per_device * encoder,
        "decoder": batch_per_device * decoder,
        "logits": batch_per_device * logits,
    }
    if recompute:
        out["recomputed layer"] = batch_per_device * recompute * a
    out["total"] = sum(out.values())
    return out


@dataclasses.dataclass
class MemoryPlan:
    """Per-device memory of one train step on a `data x model` mesh (bytes)."""

    data: int
    model: int
    batch_size: int
    task_feature_lengths: dict
    encoder_length: int
    trainable_params: int
    total_params: int
    param_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int
    activation_parts: dict
    remat_policy: str = "none"
    device_memory_bytes: Optional[int] = None
    headroom: float = 0.1
    compiled: Optional[dict] = None
    startup: Optional[dict] = None
    host_memory_bytes: Optional[int] = None

    @property
    def total_bytes(self) -> int:
        """Parameters + optimizer state + gradients/update + activations."""
        return self.param_bytes + self.optimizer_bytes + self.gradient_bytes + self.activation_bytes

    @property
    def peak_device_bytes(self) -> int:
        """The larger of the step's total and the start-up peak per device."""
        startup = self.startup or {}
        return max([self.total_bytes] + [v for k, v in startup.items() if k.endswith("device")])

    @property
    def peak_host_bytes(self) -> int:
        """The start-up peak per host (the step itself holds no weights on the host)."""
        startup = self.startup or {}
        return max([0] + [v for k, v in startup.items() if k.endswith("host")])

    @property
    def fits(self) -> Optional[bool]:
        """Whether the step and start-up leave `headroom` of the device memory free (and
        start-up fits the host memory, when given); None: device memory unknown."""
        if self.device_memory_bytes is None:
            return None
        fits = self.peak_device_bytes <= (1.0 - self.headroom) * self.device_memory_bytes
        if self.host_memory_bytes is not None:
            fits = fits and self.peak_host_bytes <= (1.0 - self.headroom) * self.host_memory_bytes
        return fits

    def format(self) -> str:
        """The printed report (its last line is FITS / DOES NOT FIT when memory is known)."""
        gib = lambda n: f"{n / GIB:9.3f} GiB"  # noqa: E731
        lengths = ", ".join(f"{k} {v}" for k, v in self.task_feature_lengths.items())
        lines = [
            f"mesh data={self.data} x model={self.model} ({self.data * self.model} devices); "
            f"global batch {self.batch_size} ({self.batch_size // self.data} per data shard); "
            f"lengths {lengths}; encoder sequence {self.encoder_length}; "
            f"remat {self.remat_policy}",
            f"parameters: {self.trainable_params:,} trainable of {self.total_params:,}",
            "per device:",
            f"  parameters          {gib(self.param_bytes)}",
            f"  optimizer state     {gib(self.optimizer_bytes)}",
            f"  gradients + update  {gib(self.gradient_bytes)}",
            f"  activations (est.)  {gib(self.activation_bytes)}   "
            + ", ".join(
                f"{k} {v / GIB:.3f}" for k, v in self.activation_parts.items() if k != "total"
            ),
            f"  total               {gib(self.total_bytes)}",
        ]
        if self.startup:
            st = self.startup
            lines += [
                f"start-up (loading; {st['devices_per_host']} devices per host):",
                f"  from INITIAL_CHECKPOINT_PATH  per device {gib(st['initial_device'])}"
                f"   per host {gib(st['initial_host'])}",
                f"  resume from a train checkpoint per device {gib(st['resume_device'])}"
                f"   per host {gib(st['resume_host'])}"
                + (
                    "   (trainable-only: the backbone reloads as above)"
                    if st["trainable_only"]
                    else ""
                ),
                f"  peak per device (step or start-up) {gib(self.peak_device_bytes)}",
            ]
        if self.compiled:
            c = self.compiled
            how = (
                "extrapolated from {}- and {}-layer analogs".format(*c["extrapolated_from_layers"])
                if "extrapolated_from_layers" in c
                else "full depth"
            )
            took = (
                "read from the compilation cache"
                if c.get("from_cache")
                else f"{c['compile_seconds']:.0f} s"
            )
            lines += [
                f"compiled on {c['devices']} fake CPU devices ({how}, {took}), "
                "XLA:CPU per-device memory analysis:",
                f"  arguments (parameters + optimizer + batch) {gib(c['argument_bytes'])}"
                f"   plan: {gib(self.param_bytes + self.optimizer_bytes)} + batch",
                f"  temporaries (gradients, update, activations) {gib(c['temp_bytes'])}"
                f"   plan: {gib(self.gradient_bytes + self.activation_bytes)}",
                f"  peak (arguments + outputs - aliased + temporaries) {gib(c['peak_bytes'])}",
            ]
        if self.device_memory_bytes is not None:
            usable = (1.0 - self.headroom) * self.device_memory_bytes
            lines.append(
                f"device memory {gib(self.device_memory_bytes)}; usable with "
                f"{self.headroom:.0%} headroom {gib(usable)}; plan uses "
                f"{self.peak_device_bytes / self.device_memory_bytes:.0%}"
            )
            if self.host_memory_bytes is not None:
                lines.append(
                    f"host memory {gib(self.host_memory_bytes)}; start-up uses "
                    f"{self.peak_host_bytes / self.host_memory_bytes:.0%}"
                )
            lines.append("FITS" if self.fits else "DOES NOT FIT")
        return "\n".join(lines)


def _encoder_length(trainer: trainer_lib.Trainer) -> int:
    """Length of the encoded sequence (inputs plus any input prompt), from shapes only."""
    model = trainer.model
    enc = trainer.input_shapes["encoder_input_tokens"]
    task_ids = trainer.input_shapes.get("task_ids")

    def encode(params):
        return model.module.apply(
            {"params": params},
            jax.numpy.ones(enc, jax.numpy.int32),
            enable_dropout=False,
            task_ids=None if task_ids is None else jax.numpy.zeros(task_ids, jax.numpy.int32),
            method=model.module.encode,
        )

    # Logical rules only: an abstract mesh cannot be made current, and shapes need none.
    with nn.logical_axis_rules(trainer.partitioner.rules):
        params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainer.param_shapes
        )
        return int(jax.eval_shape(encode, params).shape[1])


def _distinct_shards(leaf) -> int:
    """Number of distinct slices a sharded leaf is split into."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return 1
    mesh = dict(sharding.mesh.shape)
    count = 1
    for entry in tuple(sharding.spec):
        axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
        count *= math.prod(mesh[a] for a in axes)
    return count


def startup_bytes(trainer: trainer_lib.Trainer, devices_per_host: int) -> dict:
    """Peak bytes per device and per host while the state is loaded (see `checkpoints`).

    * Per device: loading places each parameter's slices once, straight into their
      final buffers (`jax.make_array_from_callback`), initialises only the missing
      method parameters and then the optimizer state (jitted, `out_shardings`): the
      peak is the state itself (parameters + optimizer state).
    * Per host, from a t5x / HF checkpoint: one parameter at a time, its distinct
      slices for this host's devices in float32 (as stored) plus their cast copy, plus
      one decoded zarr chunk. Formats that force whole-array reads (PyTorch `.bin`, the
      msgpack's inline arrays) cost more; see docs/checkpoints.md.
    * Per host, resume: orbax restores all saved arrays' local slices together: the
      host slices of the saved state (trainable-only: trainable + optimizer state, the
      backbone then reloads one parameter at a time as above).
    """
    abstract = trainer.layout.abstract

    def host_slice(leaf, itemsize=None) -> int:
        per_device = per_device_bytes(leaf)
        if itemsize is not None:
            per_device = per_device // np.dtype(leaf.dtype).itemsize * itemsize
        return per_device * min(devices_per_host, _distinct_shards(leaf))

    params = jax.tree.leaves(trainer.param_shapes)
    largest = max(host_slice(p, 4) + host_slice(p) for p in params)
    initial_host = min(largest, sum(host_slice(p, 4) + host_slice(p) for p in params))
    initial_host += ZARR_CHUNK_BYTES
    state_device = per_device_bytes(abstract.trainable) + per_device_bytes(abstract.frozen)
    state_device += per_device_bytes(abstract.opt_state)
    trainable_only = bool(jax.tree.leaves(abstract.frozen))
    saved = [abstract.trainable, abstract.opt_state]
    if not trainable_only:
        saved.append(abstract.frozen)
    resume_host = sum(host_slice(x) for x in jax.tree.leaves(saved))
    if trainable_only:
        resume_host += initial_host
    return {
        "devices_per_host": devices_per_host,
        "initial_device": state_device,
        "initial_host": initial_host,
        "resume_device": state_device,
        "resume_host": resume_host,
        "trainable_only": trainable_only,
    }


def plan_memory(
    trainer: trainer_lib.Trainer,
    device_memory_bytes: Optional[int] = None,
    headroom: float = 0.1,
    task_feature_lengths: Optional[Mapping[str, int]] = None,
    devices_per_host: Optional[int] = None,
    host_memory_bytes: Optional[int] = None,
) -> MemoryPlan:
    """The per-device memory plan of `trainer`'s train step on its (abstract) mesh.

    Args:
      trainer: built on an `AbstractPartitioner` or a real one.
      device_memory_bytes: memory of one device, for the FITS verdict.
      headroom: fraction of the device memory kept free (runtime, fragmentation,
        the error of the activation estimate).
      task_feature_lengths: only for the report.
      devices_per_host: for the start-up rows (default: min(8, devices)).
      host_memory_bytes: memory of one host, for the verdict (None: not checked).
    """
    from hyperprompt_jax import trainable as trainable_lib

    abstract = trainer.layout.abstract
    cfg = trainer.model.module.config
    data, model = trainer.partitioner.data_size, trainer.partitioner.model_size
    rules = dict()
    for name, axis in trainer.partitioner.rules:
        rules.setdefault(name, []).append(axis)
    embed_parallel = model if partitioning_lib.MODEL_AXIS in rules.get("embed", []) else 1
    trainable_params, total_params = trainable_lib.count(
        trainer.param_shapes, trainer.trainable_patterns
    )
    backbone_trained = any(
        k.startswith(("encoder/", "decoder/"))
        for k, v in trainable_lib.param_paths(trainer.layout.mask).items()
        if v
    )
    hyperprompt = getattr(trainer.model.module, "hyperprompt", None)
    batch = trainer.input_shapes["encoder_input_tokens"][0]
    encoder_length = _encoder_length(trainer)
    parts = activation_bytes(
        emb_dim=cfg.emb_dim,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        mlp_dim=cfg.mlp_dim,
        num_mlp_inputs=len(cfg.mlp_activations),
        vocab_size=cfg.vocab_size,
        num_encoder_layers=cfg.num_encoder_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        batch_per_device=math.ceil(batch / data),
        encoder_length=encoder_length,
        decoder_length=trainer.input_shapes["decoder_input_tokens"][1],
        prefix_length=int(getattr(hyperprompt, "prompt_length", 0) or 0),
        model_parallel=model,
        embed_parallel=embed_parallel,
        dtype_bytes=np.dtype(cfg.dtype).itemsize,
        backbone_trained=backbone_trained,
        remat_policy=cfg.remat_policy,
    )
    trainable_bytes = per_device_bytes(abstract.trainable)
    lengths = dict(task_feature_lengths or {})
    if not lengths:
        lengths = {
            "inputs": trainer.input_shapes["encoder_input_tokens"][1],
            "targets": trainer.input_shapes["decoder_input_tokens"][1],
        }
    return MemoryPlan(
        data=data,
        model=model,
        batch_size=batch,
        task_feature_lengths=lengths,
        encoder_length=encoder_length,
        trainable_params=trainable_params,
        total_params=total_params,
        param_bytes=trainable_bytes + per_device_bytes(abstract.frozen),
        optimizer_bytes=per_device_bytes(abstract.opt_state),
        gradient_bytes=2
        * (
            per_device_bytes(abstract.trainable, (partitioning_lib.DATA_AXIS,))
            if partitioning_lib.DATA_AXIS in rules.get("embed", [])
            else trainable_bytes
        ),
        activation_bytes=parts["total"],
        activation_parts=parts,
        remat_policy=cfg.remat_policy,
        device_memory_bytes=device_memory_bytes,
        headroom=headroom,
        startup=startup_bytes(trainer, devices_per_host or min(8, data * model)),
        host_memory_bytes=host_memory_bytes,
    )


def compiled_memory(trainer: trainer_lib.Trainer) -> dict:
    """XLA's per-device memory analysis of `trainer`'s compiled train step (real mesh).

    `from_cache` says whether the executable was read from the persistent compilation
    cache (`compile_seconds` is then the time to trace the step and read it back).
    """
    import time

    import jax.monitoring

    hits = []

    def count_hit(event: str, **kwargs) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    jax.monitoring.register_event_listener(count_hit)
    try:
        start = time.perf_counter()
        compiled = trainer.compiled_train_step()
        seconds = time.perf_counter() - start
    finally:
        jax.monitoring.unregister_event_listener(count_hit)
    m = compiled.memory_analysis()
    out = {
        "devices": trainer.partitioner.data_size * trainer.partitioner.model_size,
        "compile_seconds": seconds,
        "from_cache": bool(hits),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    return out


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

_PLAN_FLAGS = (
    "devices_per_host",
    "host_memory_gb",
    "mesh",
    "num_devices",
    "tpu",
    "device_memory_gb",
    "batch_size",
    "task_feature_lengths",
    "headroom",
    "verify",
    "compiled_json",
    "layers",
)

# Depths of the reduced-depth analogs compiled by `--verify=depth`.
ANALOG_LAYERS = (2, 4)


def _split_flags(argv: Sequence[str]) -> tuple[dict, list[str]]:
    ours, rest = {}, []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith("--") and name[2:] in _PLAN_FLAGS:
            ours[name[2:]] = value if eq else "true"
        else:
            rest.append(arg)
    return ours, rest


def _parse_lengths(spec: str) -> dict:
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition(":")
        if not name.strip() or not value.strip().isdigit():
            raise UserError(
                f"Bad --task_feature_lengths {spec!r}; expected e.g. inputs:512,targets:8."
            )
        out[name.strip()] = int(value)
    return out


def _flag_number(flags: Mapping[str, str], name: str, kind: type = int, default: Any = None):
    """`--name`'s value as `kind` (`default` if absent); a UserError if it is not one."""
    if name not in flags:
        return default
    try:
        return kind(flags[name])
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"--{name} must be {what}, got {flags[name]!r}.") from None


def resolve_settings(flags: Mapping[str, str]) -> dict:
    """Mesh, memory, batch and lengths from the flags and the parsed gin.

    Raises:
      ValueError: a missing or inconsistent setting (named in the message).
    """
    num_partitions, rules = gin_partitioning()
    memory = None
    flags = dict(flags)
    if not {"tpu", "mesh", "num_devices"} & set(flags):
        # Pod-slice partitioning files name their slice (gin macro TPU_SLICE).
        tpu = gin_utils.query_macro("TPU_SLICE", None)
        if isinstance(tpu, str):
            flags["tpu"] = tpu
    if "tpu" in flags:
        num_devices, memory = tpu_slice(flags["tpu"])
    if "mesh" in flags:
        data, model = parse_mesh(flags["mesh"])
        if num_partitions is not None and model != num_partitions:
            logging.getLogger("hyperprompt_jax").warning(
                "--mesh model=%d overrides the gin's NUM_PARTITIONS=%d.", model, num_partitions
            )
        if "tpu" in flags and data * model != num_devices:
            raise UserError(
                f"--mesh has {data * model} devices but {flags['tpu']} has {num_devices}."
            )
    else:
        if "num_devices" in flags:
            num_devices = _flag_number(flags, "num_devices")
        elif "tpu" not in flags:
            raise UserError(
                "Give the mesh: --mesh=data:D,model:M, --num_devices=N or --tpu=v3-256."
            )
        model = int(num_partitions or 1)
        if num_devices % model:
            raise UserError(
                f"NUM_PARTITIONS={model} does not divide the number of devices ({num_devices})."
            )
        data = num_devices // model
    if "device_memory_gb" in flags:
        memory = _flag_number(flags, "device_memory_gb", float)
    per_host = None
    if "tpu" in flags:
        per_host = TPU_DEVICES_PER_HOST.get(flags["tpu"].split("-")[0])
    if "devices_per_host" in flags:
        per_host = _flag_number(flags, "devices_per_host", int)
    host_memory = _flag_number(flags, "host_memory_gb", float, None)
    batch = _flag_number(flags, "batch_size", int, _gin_batch_size())
    if batch is None:
        raise UserError("Set the global batch: --batch_size=N or --gin.BATCH_SIZE=N.")
    if batch % data:
        raise UserError(f"The batch ({batch}) must divide over data={data}.")
    lengths = (
        _parse_lengths(flags["task_feature_lengths"])
        if "task_feature_lengths" in flags
        else _gin_lengths()
    )
    if not lengths:
        raise UserError(
            "Set the feature lengths: --task_feature_lengths=inputs:512,targets:8 or "
            "--gin.TASK_FEATURE_LENGTHS=\"{'inputs': 512, 'targets': 8}\"."
        )
    headroom = _flag_number(flags, "headroom", float, 0.1)
    if not 0.0 <= headroom < 1.0:
        raise UserError(f"--headroom must be in [0, 1), got {headroom}.")
    return dict(
        data=data,
        model=model,
        rules=rules,
        memory_bytes=None if memory is None else int(memory * GIB),
        devices_per_host=per_host,
        host_memory_bytes=None if host_memory is None else int(host_memory * GIB),
        batch_size=batch,
        lengths=lengths,
        headroom=headroom,
    )


def _verify(argv: Sequence[str], devices: int, layers: Optional[int] = None) -> dict:
    """Runs this module with `--compiled_json` on `devices` fake CPU devices.

    With `layers`, the encoder and decoder depths are set to `layers` (a reduced-depth
    analog of the planned model: same widths, mesh, batch and lengths).
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    extra = [] if layers is None else [f"--layers={layers}"]
    result = subprocess.run(
        [sys.executable, "-m", "hyperprompt_jax.plan", *argv, *extra, "--compiled_json"],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"Compiling on {devices} fake CPU devices failed:\n{result.stderr[-3000:]}")


def verify_by_depth(argv: Sequence[str], devices: int, num_layers: int) -> dict:
    """Compiles 2- and 4-layer analogs and extrapolates XLA's figures to `num_layers`.

    Every layer of a stack has the same shapes and shardings, so parameters, optimizer
    state and the per-layer activations grow linearly with depth; two reduced-depth
    compiles give the slope and intercept. This makes a T5-XXL check take minutes
    instead of the better part of an hour (the full 24 + 24-layer compile on 256 fake
    devices took 32 minutes here, and the extrapolation matched it; see docs/benchmarks.md).
    """
    lo, hi = ANALOG_LAYERS
    small, large = _verify(argv, devices, lo), _verify(argv, devices, hi)
    out = {
        "devices": devices,
        "compile_seconds": small["compile_seconds"] + large["compile_seconds"],
        "from_cache": small.get("from_cache", False) and large.get("from_cache", False),
    }
    for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
        slope = (large[key] - small[key]) / (hi - lo)
        out[key] = int(round(small[key] + slope * (num_layers - lo)))
    out["peak_bytes"] = (
        out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    )
    out["extrapolated_from_layers"] = [lo, hi]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints the plan; returns 0 (fits or no memory given), 2 (does not fit), 1 (error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        flags, rest = _split_flags(argv)
        files, bindings, paths = gin_utils.flags_to_gin(rest)
        if not files:
            raise UserError(
                "usage: python -m hyperprompt_jax.plan --gin_file=models/... "
                "--gin_file=methods/... [--gin_file=partitioning/...] --tpu=v3-256 | "
                "--mesh=data:D,model:M [--device_memory_gb=G] [--batch_size=B] "
                "[--task_feature_lengths=inputs:512,targets:8] [--verify]"
            )
        if "layers" in flags:
            bindings = [
                *bindings,
                f"config.T5Config.num_encoder_layers={_flag_number(flags, 'layers')}",
                f"config.T5Config.num_decoder_layers={_flag_number(flags, 'layers')}",
            ]
        parse_run_gin(files, bindings, paths)
        s = resolve_settings(flags)
        if "compiled_json" in flags:
            compilation_cache.enable(compilation_cache.gin_setting())
            devices = jax.devices()
            if len(devices) < s["data"] * s["model"]:
                raise UserError(f"Only {len(devices)} devices for the mesh.")
            partitioner = partitioning_lib.Partitioner(
                s["model"], s["rules"], devices=devices[: s["data"] * s["model"]]
            )
            trainer = trainer_from_gin(partitioner, s["batch_size"], s["lengths"])
            print(json.dumps(compiled_memory(trainer)))
            return 0
        partitioner = AbstractPartitioner(s["data"], s["model"], s["rules"])
        trainer = trainer_from_gin(partitioner, s["batch_size"], s["lengths"])
        plan = plan_memory(
            trainer,
            s["memory_bytes"],
            s["headroom"],
            s["lengths"],
            devices_per_host=s["devices_per_host"],
            host_memory_bytes=s["host_memory_bytes"],
        )
        if "verify" in flags:
            child = [a for a in argv if not a.startswith("--verify")]
            devices = s["data"] * s["model"]
            if flags["verify"] == "depth":
                cfg = trainer.model.module.config
                if cfg.num_encoder_layers != cfg.num_decoder_layers:
                    raise UserError("--verify=depth needs equal encoder and decoder depths.")
                plan.compiled = verify_by_depth(child, devices, cfg.num_encoder_layers)
            elif flags["verify"] == "true":
                plan.compiled = _verify(child, devices)
            else:
                raise UserError(f"--verify takes no value or 'depth', got {flags['verify']!r}.")
        print(plan.format())
    except UserError as error:  # Bugs (any other exception) keep their traceback.
        print(f"error: {errors.message(error)}", file=sys.stderr)
        return 1
    return 2 if plan.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
