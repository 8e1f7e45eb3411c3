"""Plumbing shared by the entry points: task lookup, per-host datasets, global batches,
and the model directory (checkpoints: `hyperprompt_jax.checkpoints`).

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
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf


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
