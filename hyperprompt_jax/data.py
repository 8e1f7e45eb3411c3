"""Data for the train, eval and infer loops: tasks, per-host shards, global batches.

* Tasks: `get_mixture_or_task` (close names suggested for a typo), `check_data` (the
  TFDS data is prepared), `task_id_range` (the task ids a mixture's examples carry, to
  check `NUM_TASKS` against before any compilation).
* Training data: a global batch of B rows is `num_shards` consecutive parts of
  B / num_shards rows, part i read from seqio shard `ShardInfo(i, num_shards)` (seed
  `seed + i`, so the shards are shuffled and sampled independently). Every process
  reads only the parts of the rows its devices hold (`input_shards`). By default
  `num_shards` is the number of distinct row blocks (one per process with pure data
  parallelism, t5x's layout); fixing it (`DATA_SHARDS`) makes the data independent of
  the number of processes. The stream is a deterministic function of the seed, so a
  restarted run skips the batches it has consumed and sees what an uninterrupted run
  would.
* `put_on_mesh`: the one place a host batch becomes global arrays sharded over mesh
  axis `data`, after the host-side checks (task ids in `[0, NUM_TASKS)`: on the device
  a bad id would silently give NaN or another task's parameters). Training passes
  this process's rows; evaluation and inference, where every process walks the whole
  set, pass all rows (`whole=True`). `pad_rows` fills a last, short batch.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from hyperprompt_jax import packing
from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

TASK_IDS_FEATURE = "task_ids"


# -------------------------------------------------------------------------------------
# Tasks
# -------------------------------------------------------------------------------------


def import_task_modules() -> None:
    """Registers the package's seqio tasks and mixtures (GLUE, SuperGLUE, synthetic)."""
    import hyperprompt_jax.tasks  # noqa: F401  (registers on import)
    from hyperprompt_jax.tasks import synthetic  # noqa: F401


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`.

    Raises:
      UserError: for an unknown name, suggesting the closest registered names.
    """
    import_task_modules()
    from hyperprompt_jax import task_registry

    return task_registry.get_mixture_or_task(name)


def tasks_of(name: str) -> list[seqio.Task]:
    """The tasks of a task or mixture."""
    provider = get_mixture_or_task(name)
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def check_data(name: str, split: str) -> None:
    """Raises before any compilation if `name`'s data for `split` is not prepared."""
    from hyperprompt_jax import task_registry

    get_mixture_or_task(name)
    task_registry.check_prepared(name, split)


def task_id_range(name: str, split: str) -> tuple[int, int] | None:
    """`(smallest, largest)` task id of `name`'s examples, or None if they carry none.

    A registered `_task_id` task's id comes from the task registry; other tasks that
    declare a `task_id` feature are asked for their first example.
    """
    ids = []
    for task in tasks_of(name):
        if "task_id" not in task.output_features:
            continue
        try:
            from hyperprompt_jax.tasks import mixtures

            ids.append(mixtures.task_id(task.name))
            continue
        except (ImportError, ValueError):
            pass
        if split not in task.splits:
            continue
        for example in task.get_dataset(None, split=split, shuffle=False).take(1):
            ids.append(int(example["task_id"]))
    return (min(ids), max(ids)) if ids else None


def check_num_tasks(name: str, split: str, num_tasks: int | None) -> None:
    """Checks that `name`'s task ids fit a model with `num_tasks` tasks (None: not
    task-conditioned, nothing to check).

    Raises:
      UserError: `num_tasks` is not a positive int, or a task id is out of range.
    """
    if num_tasks is None:
        return
    if not isinstance(num_tasks, int) or isinstance(num_tasks, bool) or num_tasks < 1:
        raise UserError(f"NUM_TASKS must be a positive int, got {num_tasks!r}.")
    found = task_id_range(name, split)
    if found is not None and (found[0] < 0 or found[1] >= num_tasks):
        raise UserError(
            f"{name!r} gives its examples task ids {found[0]}..{found[1]}, but the model has "
            f"NUM_TASKS={num_tasks} (ids 0..{num_tasks - 1}); set --gin.NUM_TASKS="
            f"{found[1] + 1} or use another mixture."
        )


def check_task_ids(task_ids: Any, num_tasks: int | None, where: str = "the batch") -> None:
    """Host-side check of a `[batch]` array of task ids against `NUM_TASKS`.

    Raises:
      UserError: a non-integer id, or one outside `[0, num_tasks)`, naming it.
    """
    if num_tasks is None:
        return
    values = np.asarray(task_ids)
    if not np.issubdtype(values.dtype, np.integer):
        raise UserError(f"Task ids in {where} must be integers, got {values.dtype}.")
    bad = values[(values < 0) | (values >= num_tasks)]
    if bad.size:
        raise UserError(
            f"Task id(s) {sorted(set(bad.tolist()))} in {where} are out of range: expected "
            f"0 <= task_id < NUM_TASKS={num_tasks}."
        )


def count_over_long(
    task: seqio.Task,
    split: str,
    lengths: Mapping[str, int],
    num_examples: int | None = None,
) -> tuple[dict[str, int], int]:
    """How many of `task`'s examples are longer than `lengths` (and will be cut).

    Reads the split once with no sequence length (so preprocessors that trim, like
    `append_eos_after_trim`, do not), counting per feature the examples with more
    tokens than its length.

    Returns:
      `({feature: number of over-long examples}, number of examples read)`.
    """
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1)
    if num_examples:
        ds = ds.take(num_examples)
    over, total = dict.fromkeys(lengths, 0), 0
    for example in ds.as_numpy_iterator():
        total += 1
        for name, length in lengths.items():
            if name in example and np.asarray(example[name]).shape[0] > length:
                over[name] += 1
    return {k: v for k, v in over.items() if v}, total


def warn_over_long(name: str, over: Mapping[str, int], total: int, lengths) -> None:
    """Logs, once, how many examples of `name` are cut to `TASK_FEATURE_LENGTHS`."""
    for feature, count in sorted(over.items()):
        logger.warning(
            "%s: %d of %d examples have more than TASK_FEATURE_LENGTHS['%s']=%d tokens and "
            "are truncated.",
            name,
            count,
            total,
            feature,
            lengths[feature],
        )


def default_feature_converter(
    pack: bool = False, num_tasks: int | None = None, prompt_length: int = 0
) -> seqio.FeatureConverter:
    """Encoder-decoder features plus `task_ids` `[batch]` (int32; 0 if a task has none),
    or, packed, per-position task ids (`feature_converters`).

    Args:
      pack: pack several examples per row.
      num_tasks: if given (gin `NUM_TASKS`), every example's task id is checked to lie
        in `[0, num_tasks)` as it is read.
      prompt_length: the model's input prompt length (`EncoderDecoderModel.
        input_prompt_length`): the prompt slots of every packed example.
    """
    from hyperprompt_jax import feature_converters

    return feature_converters.EncDecTaskIdFeatureConverter(
        pack=pack, num_tasks=num_tasks, prompt_length=prompt_length if pack else 0
    )


# -------------------------------------------------------------------------------------
# Dataset config and training batches
# -------------------------------------------------------------------------------------


@dataclasses.dataclass
class DatasetConfig:
    """Which data a loop reads (t5x's `DatasetConfig` fields).

    Attributes:
      mixture_or_task_name: a registered seqio task or mixture.
      task_feature_lengths: e.g. `{'inputs': 512, 'targets': 8}`.
      split: dataset split.
      batch_size: global batch size (all processes together); checked by the loop that
        reads it (`check_batch_size`), which knows the macro that set it.
      shuffle: shuffle examples (training).
      seed: seed of shuffling and mixture sampling; fixed so restarts see the same data.
      use_cached: read seqio's offline cache.
      pack: pack several examples per row, each with its own task id and prompt
        (`packing`; training).
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
        lengths = self.task_feature_lengths
        if (
            not isinstance(lengths, Mapping)
            or not {"inputs", "targets"} <= set(lengths)
            or any(not _positive_int(v) for v in lengths.values())
        ):
            raise UserError(
                "TASK_FEATURE_LENGTHS must map 'inputs' and 'targets' to positive ints, e.g. "
                f"{{'inputs': 512, 'targets': 8}}; got {lengths!r}."
            )
        if self.num_shards is not None and (
            not _positive_int(self.num_shards)
            or (_positive_int(self.batch_size) and self.batch_size % self.num_shards)
        ):
            raise UserError(
                f"DATA_SHARDS must be a positive int dividing BATCH_SIZE={self.batch_size}, "
                f"got {self.num_shards!r}."
            )

    def check_batch_size(self, name: str = "BATCH_SIZE") -> None:
        """Raises a UserError naming macro `name` unless the batch size is a positive int."""
        if not _positive_int(self.batch_size):
            raise UserError(f"{name} must be a positive int, got {self.batch_size!r}.")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
      UserError: if the held rows are not whole parts (`num_shards` too small).
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
        raise UserError(
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
    cfg.check_batch_size("batch_size")
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


# -------------------------------------------------------------------------------------
# Host batches -> global arrays
# -------------------------------------------------------------------------------------


def put_on_mesh(
    batch: Mapping[str, np.ndarray],
    partitioner: Any,
    *,
    whole: bool = False,
    num_tasks: int | None = None,
) -> dict[str, jax.Array]:
    """A host batch as global arrays sharded over mesh axis `data` (rows), after checks.

    Args:
      batch: `{feature: [rows, ...]}` numpy arrays.
      partitioner: gives `batch_sharding(ndim)`.
      whole: every process passes all rows of the global batch (evaluation and
        inference walk the whole set on every process); False: this process's rows
        only (training), assembled with `make_array_from_process_local_data`, which
        infers the global shape, so processes holding the same rows (model parallelism
        across hosts) pass them once.
      num_tasks: NUM_TASKS of a task-conditioned model: `task_ids` are checked here, on
        the host (on the device an id out of range gives NaN or another task's rows).

    Raises:
      UserError: a task id out of range.
    """
    for name in packing.TASK_ID_FEATURES:
        if name in batch:
            check_task_ids(batch[name], num_tasks)
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        sharding = partitioner.batch_sharding(value.ndim)
        if whole:
            out[name] = jax.make_array_from_callback(
                value.shape, sharding, lambda index, v=value: v[index]
            )
        else:
            out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


def global_batch(local_batch: Mapping[str, np.ndarray], partitioner: Any) -> dict[str, jax.Array]:
    """This process's rows as global arrays (`put_on_mesh` without checks)."""
    return put_on_mesh(local_batch, partitioner)


def pad_rows(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    """Fills a short batch to `batch_size` rows by repeating its last row (whose outputs
    the caller drops), so one compiled step serves every batch."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if len(value) < batch_size:
            value = np.concatenate([value, np.repeat(value[-1:], batch_size - len(value), 0)])
        out[name] = value
    return out


def iterate_batches(
    ds: tf.data.Dataset, partitioner: Any, num_tasks: int | None = None
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches from a per-host dataset (see `put_on_mesh`).

    Raises:
      UserError: a task id out of range (from the feature converter's check or here).
    """
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            local = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            if "task_id" in str(e):  # The feature converter's range check.
                raise UserError(
                    f"An example's task id is out of range: {e.message.splitlines()[0]} "
                    f"(NUM_TASKS={num_tasks})."
                ) from None
            raise
        yield put_on_mesh(local, partitioner, num_tasks=num_tasks)


INPUT_LENGTH_BUCKET = 64


def input_length(tokens: np.ndarray) -> int:
    """Length of an unpadded token row `[length]`: last non-zero position + 1."""
    nonzero = np.flatnonzero(np.asarray(tokens))
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def decoding_batches(
    rows: Sequence[Mapping[str, np.ndarray]],
    batch_size: int,
    bucket: int | None = INPUT_LENGTH_BUCKET,
) -> Iterator[tuple[list[int], dict[str, np.ndarray]]]:
    """Unpacked rows in batches for decoding and scoring, with little padding.

    Rows are taken longest input first (so a batch holds inputs of similar length),
    and each batch's `encoder_input_tokens` are cut to its longest input rounded up to
    a multiple of `bucket` (never beyond the feature length). Outputs do not change:
    padding is masked everywhere, and the decoder keeps its full length. Each width is
    one compilation of the jitted step (at most feature length / `bucket` of them).

    Args:
      rows: per-example feature dicts (`[length]` arrays, one feature length).
      batch_size: rows per batch; the last batch is filled (`pad_rows`).
      bucket: width granularity; None keeps the feature length (one shape).

    Yields:
      `(positions in rows of the batch's valid rows, padded batch)`.
    """
    if bucket is not None and (not _positive_int(bucket)):
        raise UserError(f"The input length bucket must be a positive int or None, got {bucket!r}.")
    lengths = [input_length(r["encoder_input_tokens"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        stacked = {k: np.stack([np.asarray(rows[i][k]) for i in chunk]) for k in rows[chunk[0]]}
        if bucket is not None:
            full = stacked["encoder_input_tokens"].shape[1]
            longest = max(lengths[i] for i in chunk)
            width = min(full, max(bucket, -(-longest // bucket) * bucket))
            stacked["encoder_input_tokens"] = stacked["encoder_input_tokens"][:, :width]
        yield chunk, pad_rows(stacked, batch_size)
