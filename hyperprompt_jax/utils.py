"""Plumbing shared by the entry points: task lookup, per-host datasets, global batches,
the model directory, and resumable orbax checkpoints.

* Data: a global batch of B rows is `num_shards` consecutive parts of B / num_shards
  rows, part i read from seqio shard `ShardInfo(i, num_shards)` (seed `seed + i`, so
  the shards are shuffled and sampled independently). Every process reads only the
  parts of the rows its devices hold (`input_shards`); `global_batch` assembles the
  global, `data`-sharded array with `jax.make_array_from_process_local_data`, so the
  same code runs on one CPU and on a TPU pod. By default `num_shards` is the number of
  distinct row blocks (one per process with pure data parallelism, t5x's layout);
  fixing it (`DATA_SHARDS`) makes the data independent of the number of processes.
* Resume: the training stream is a deterministic function of the seed (seqio shuffles
  and samples mixtures with it), so a restarted run skips the batches it has already
  consumed and sees exactly the data an uninterrupted run would.
* Checkpoints: orbax `CheckpointManager` writing `checkpoint_<step>/` into the model
  directory. orbax writes into a temporary directory and renames it when complete, and
  ignores (and cleans up) unfinished ones, so a crash never leaves a half checkpoint
  that a restart would pick. Besides the latest `keep`, the checkpoints that hold a
  task's best evaluation score are preserved (recorded in `best_checkpoints.json`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
import seqio
import tensorflow as tf

PyTree = Any
CHECKPOINT_PREFIX = "checkpoint"
BEST_CHECKPOINTS_FILE = "best_checkpoints.json"


# -------------------------------------------------------------------------------------
# Tasks and datasets
# -------------------------------------------------------------------------------------


def import_task_modules() -> None:
    """Registers the package's seqio tasks and mixtures (GLUE, SuperGLUE, synthetic)."""
    import hyperprompt_jax.tasks  # noqa: F401  (registers on import)
    from hyperprompt_jax.tasks import synthetic  # noqa: F401


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`.

    Raises:
      ValueError: for an unknown name, suggesting the closest registered names.
    """
    import_task_modules()
    from hyperprompt_jax import task_registry

    return task_registry.get_mixture_or_task(name)


def check_data(name: str, split: str) -> None:
    """Raises before any compilation if `name`'s data for `split` is not prepared."""
    from hyperprompt_jax import task_registry

    get_mixture_or_task(name)
    task_registry.check_prepared(name, split)


def default_feature_converter(pack: bool = False) -> seqio.FeatureConverter:
    """Encoder-decoder features plus `task_ids` `[batch]` (int32; 0 if a task has none)."""
    from hyperprompt_jax import feature_converters

    return feature_converters.EncDecTaskIdFeatureConverter(pack=pack)


@dataclasses.dataclass
class DatasetConfig:
    """Which data a loop reads (t5x's `DatasetConfig` fields).

    Attributes:
      mixture_or_task_name: a registered seqio task or mixture.
      task_feature_lengths: e.g. `{'inputs': 512, 'targets': 8}`.
      split: dataset split.
      batch_size: global batch size (all processes together).
      shuffle: shuffle examples (training).
      seed: seed of shuffling and mixture sampling; fixed so restarts see the same data.
      use_cached: read seqio's offline cache.
      pack: pack several examples per row (not with prompts).
      num_shards: input shards per global batch (`DATA_SHARDS`, training only); None:
        one per block of rows held by a process (see `input_shards`).
    """

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str
    batch_size: int
    shuffle: bool = True
    seed: int | None = 0
    use_cached: bool = False
    pack: bool = False
    num_shards: int | None = None

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ValueError(f"BATCH_SIZE must be a positive int, got {self.batch_size!r}.")
        if self.num_shards is not None and (
            not isinstance(self.num_shards, int)
            or self.num_shards <= 0
            or self.batch_size % self.num_shards
        ):
            raise ValueError(
                f"DATA_SHARDS must be a positive int dividing BATCH_SIZE={self.batch_size}, "
                f"got {self.num_shards!r}."
            )
        lengths = dict(self.task_feature_lengths or {})
        if not lengths or any(not isinstance(v, int) or v <= 0 for v in lengths.values()):
            raise ValueError(
                "TASK_FEATURE_LENGTHS must map features to positive ints, e.g. "
                f"{{'inputs': 512, 'targets': 8}}; got {self.task_feature_lengths!r}."
            )


def per_host_batch_size(global_batch_size: int) -> int:
    """Examples each process loads per step."""
    if global_batch_size % jax.process_count():
        raise ValueError(
            f"Batch size {global_batch_size} is not divisible by the number of processes "
            f"({jax.process_count()})."
        )
    return global_batch_size // jax.process_count()


def input_shards(cfg: DatasetConfig, partitioner: Any | None = None) -> tuple[int, list[int]]:
    """`(num_shards, the shards this process reads, in row order)` for `cfg`'s batches.

    Global row r of every batch comes from shard `r // (batch_size / num_shards)`,
    whatever the number of processes. A process reads the parts covering the rows its
    devices hold (`make_array_from_process_local_data` takes them in ascending order),
    so processes that hold the same rows (model parallelism across hosts) read the same
    data, and others read disjoint shards.

    Args:
      cfg: the dataset config (`batch_size`, `num_shards`).
      partitioner: its batch sharding says which rows this process holds; None: pure
        data parallelism, process p holds the p-th of `process_count` equal blocks.

    Raises:
      ValueError: if the held rows are not whole parts (`num_shards` too small).
    """
    batch = cfg.batch_size
    if partitioner is None:
        p, n = jax.process_index(), jax.process_count()
        blocks = {(p * batch // n, (p + 1) * batch // n)}
    else:
        index_map = partitioner.batch_sharding(1).addressable_devices_indices_map((batch,))
        blocks = {
            (i[0].start or 0, batch if i[0].stop is None else i[0].stop) for i in index_map.values()
        }
    held = sorted({row for start, stop in blocks for row in range(start, stop)})
    num_shards = cfg.num_shards or batch // len(held)
    part = batch // num_shards
    shards = sorted({row // part for row in held})
    if len(shards) * part != len(held):
        raise ValueError(
            f"DATA_SHARDS={num_shards} splits BATCH_SIZE={batch} into parts of {part} rows, "
            f"but process {jax.process_index()} holds {len(held)} rows; use a multiple of "
            f"{batch // len(held)}."
        )
    return num_shards, shards


def _concat_rows(*parts: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    return {k: tf.concat([part[k] for part in parts], axis=0) for k in parts[0]}


def get_dataset(
    cfg: DatasetConfig,
    feature_converter: seqio.FeatureConverter,
    num_epochs: int | None = None,
    skip_batches: int = 0,
    partitioner: Any | None = None,
) -> tf.data.Dataset:
    """This process's rows of every global batch of model features.

    Args:
      cfg: the dataset config.
      feature_converter: task features -> model features.
      num_epochs: None repeats forever (training); 1 for one pass.
      skip_batches: batches already consumed (resume).
      partitioner: where the batch rows live (see `input_shards`).

    Returns:
      A `tf.data.Dataset` of dicts of `[rows held by this process, ...]` arrays.
    """
    get_mixture_or_task(cfg.mixture_or_task_name)  # Helpful error for unknown names.
    num_shards, shards = input_shards(cfg, partitioner)
    parts = []
    for index in shards:
        part = seqio.get_dataset(
            cfg.mixture_or_task_name,
            task_feature_lengths=dict(cfg.task_feature_lengths),
            feature_converter=feature_converter,
            dataset_split=cfg.split,
            use_cached=cfg.use_cached,
            shuffle=cfg.shuffle,
            num_epochs=num_epochs,
            shard_info=seqio.ShardInfo(index=index, num_shards=num_shards),
            verbose=False,
            # seqio would shuffle and sample every shard with the same seed: all
            # shards would then pick the same tasks in the same order.
            seed=None if cfg.seed is None else cfg.seed + index,
        )
        parts.append(part.batch(cfg.batch_size // num_shards, drop_remainder=True))
    ds = parts[0] if len(parts) == 1 else tf.data.Dataset.zip(tuple(parts)).map(_concat_rows)
    options = tf.data.Options()
    options.deterministic = True  # Same order on every (re)start.
    ds = ds.with_options(options)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(tf.data.AUTOTUNE)


def global_batch(local_batch: Mapping[str, np.ndarray], partitioner: Any) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays sharded over mesh axis `data`.

    The global shape is inferred from the sharding: processes that hold the same rows
    (model parallelism across hosts) pass the same rows once, not once each.
    """
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        out[name] = jax.make_array_from_process_local_data(
            partitioner.batch_sharding(value.ndim), value
        )
    return out


def iterate_batches(ds: tf.data.Dataset, partitioner: Any) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches from a per-host dataset."""
    for local in ds.as_numpy_iterator():
        yield global_batch(local, partitioner)


# -------------------------------------------------------------------------------------
# Model directory
# -------------------------------------------------------------------------------------


def ensure_writable_dir(path: str, name: str = "MODEL_DIR") -> str:
    """Creates `path` and checks that a file can be written there (before any work).

    Raises:
      ValueError: naming the directory and the operating-system error.
    """
    if not path:
        raise ValueError(f"{name} is not set; pass --gin.{name}=\"'/path/to/dir'\".")
    probe = os.path.join(path, f".write_test_{jax.process_index()}")
    try:
        tf.io.gfile.makedirs(path)
        with tf.io.gfile.GFile(probe, "w") as f:
            f.write("ok")
        tf.io.gfile.remove(probe)
    except (OSError, tf.errors.OpError) as e:
        raise ValueError(f"{name} {path!r} cannot be written: {e}") from e
    return path


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` (local or GCS), replacing it atomically on local disks."""
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


# -------------------------------------------------------------------------------------
# Checkpoints
# -------------------------------------------------------------------------------------


@dataclasses.dataclass
class _PreserveSteps:
    """orbax preservation policy: keep every checkpoint whose step is in `steps`."""

    steps: set

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        del context
        return [c.step in self.steps for c in checkpoints]


class Checkpointer:
    """Saves and restores train states as `MODEL_DIR/checkpoint_<step>/` with orbax.

    Keeps the `keep` most recent checkpoints plus those recorded as a task's best in
    `best_checkpoints.json`.
    """

    def __init__(self, model_dir: str, keep: int | None = None):
        """Args: model_dir: the run's directory; keep: recent checkpoints kept (None=all)."""
        if keep is not None and keep < 1:
            raise ValueError(f"KEEP must be >= 1 or None, got {keep!r}.")
        self.model_dir = model_dir
        self.best = self._read_best()
        self._preserved = _PreserveSteps({v["step"] for v in self.best.values()})
        options = ocp.CheckpointManagerOptions(
            step_prefix=CHECKPOINT_PREFIX,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=True,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [ocp.checkpoint_managers.LatestN(keep), self._preserved]
            ),
        )
        directory = model_dir if "://" in model_dir else os.path.abspath(model_dir)
        self.manager = ocp.CheckpointManager(directory, options=options)
        self._saved = set(self.manager.all_steps())

    def _best_path(self) -> str:
        return os.path.join(self.model_dir, BEST_CHECKPOINTS_FILE)

    def _read_best(self) -> dict:
        path = self._best_path()
        if not tf.io.gfile.exists(path):
            return {}
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    def latest_step(self) -> int | None:
        """The step of the newest complete checkpoint, or None."""
        return self.manager.latest_step()

    def all_steps(self) -> Sequence[int]:
        """Steps of every complete checkpoint."""
        return self.manager.all_steps()

    def save(self, step: int, state: PyTree, force: bool = False) -> bool:
        """Starts writing `state` at `step` (asynchronously); True if a save started."""
        if step in self._saved:
            return False
        self._saved.add(step)
        return self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, step: int, abstract_state: PyTree) -> PyTree:
        """Restores `step` with the shapes, dtypes and shardings of `abstract_state`."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

    def record_best(self, task: str, step: int, metric: str, value: float) -> None:
        """Marks `step` as `task`'s best checkpoint (kept until a better one comes)."""
        self.best[task] = {"step": int(step), "metric": metric, "value": float(value)}
        self._preserved.steps.clear()
        self._preserved.steps.update(v["step"] for v in self.best.values())
        if jax.process_index() == 0:
            write_text(self._best_path(), json.dumps(self.best, indent=2, sort_keys=True))

    def wait(self) -> None:
        """Blocks until pending saves are complete."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def is_train_checkpoint(path: str) -> bool:
    """True for a `checkpoint_<step>/` directory written by `Checkpointer`."""
    return tf.io.gfile.exists(os.path.join(path, "default", "_METADATA"))


def restore_params(checkpoint_dir: str, param_shardings: PyTree) -> PyTree:
    """Reads only the parameters of a train-state checkpoint (no optimizer state).

    Works whatever the trainable / frozen split of the run that wrote it.

    Args:
      checkpoint_dir: a `checkpoint_<step>/` directory.
      param_shardings: `NamedSharding`s of the model's full parameter tree.

    Returns:
      The full `params` tree, placed with `param_shardings`.

    Raises:
      ValueError: if the checkpoint lacks a model parameter or has one the model lacks.
    """
    import flax

    if "://" not in checkpoint_dir:  # orbax reads no metadata through a relative path
        checkpoint_dir = os.path.abspath(checkpoint_dir)
    item_dir = os.path.join(checkpoint_dir, "default")
    metadata = ocp.PyTreeCheckpointer().metadata(item_dir)
    tree = getattr(metadata, "item_metadata", metadata)
    shardings = flax.traverse_util.flatten_dict(param_shardings, sep="/")
    saved = {}
    for part in ("trainable", "frozen"):
        saved.update(
            {
                k: (part, v)
                for k, v in flax.traverse_util.flatten_dict(dict(tree[part]), sep="/").items()
            }
        )
    missing = sorted(set(shardings) - set(saved))
    unexpected = sorted(set(saved) - set(shardings))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {checkpoint_dir} does not fit the model: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}. Was it written with another model or method gin?"
        )
    item = {"trainable": {}, "frozen": {}}
    for name, (part, meta) in saved.items():
        item[part][name] = jax.ShapeDtypeStruct(
            tuple(meta.shape), meta.dtype, sharding=shardings[name]
        )
    item = {k: flax.traverse_util.unflatten_dict(v, sep="/") for k, v in item.items()}
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), item)
    restored = ocp.PyTreeCheckpointer().restore(
        item_dir, args=ocp.args.PyTreeRestore(item, restore_args=restore_args, partial_restore=True)
    )
    flat = flax.traverse_util.flatten_dict(restored["frozen"], sep="/")
    flat.update(flax.traverse_util.flatten_dict(restored["trainable"], sep="/"))
    return flax.traverse_util.unflatten_dict(flat, sep="/")
