"""Resumable orbax checkpoints of train states (moving to the `checkpoints` package).

Data helpers moved to `hyperprompt_jax.data`, the model directory's to
`hyperprompt_jax.model_dir`; their old names here stay importable.

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
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp
import tensorflow as tf

from hyperprompt_jax.data import (  # noqa: F401  (old names)
    DatasetConfig,
    check_data,
    default_feature_converter,
    get_dataset,
    get_mixture_or_task,
    global_batch,
    import_task_modules,
    input_shards,
    iterate_batches,
)
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.model_dir import ensure_writable_dir, write_text  # noqa: F401

PyTree = Any
CHECKPOINT_PREFIX = "checkpoint"
BEST_CHECKPOINTS_FILE = "best_checkpoints.json"


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
            raise UserError(f"KEEP must be >= 1 or None, got {keep!r}.")
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
        raise UserError(
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
