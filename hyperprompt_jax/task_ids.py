"""Validation and gathering of per-example task ids, shared by every task-conditioned module.

A batch carries `task_ids`, an int32 `[batch]` array (seqio mixtures give every example
its `task_id`), so one batch may mix tasks in training and in decoding. Every module that
conditions on the task selects each example's own row of a per-task table through
`gather_tasks`, after `validate_task_ids` has checked the ids where they enter the module.

Why two mechanisms: JAX clamps (or, for negative indices, wraps) out-of-range gathers
silently, so a bad id would quietly train or evaluate another task.

* Concrete arrays (eager `init` / `apply`, data-pipeline checks): `validate_task_ids`
  raises a ValueError naming the bad values and `num_tasks`.
* Traced arrays (under `jax.jit`, where values are unknown at trace time):
  `gather_tasks` maps every id outside `[0, num_tasks)` to an out-of-bounds index and
  gathers with `mode='fill', fill_value=NaN`, so the example's output (and the loss)
  becomes NaN instead of silently using another task's parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hyperprompt_jax.errors import UserError

Array = jax.Array


def is_concrete(x: object) -> bool:
    """True when `x` holds values known now (not a tracer inside jit / eval_shape)."""
    return not isinstance(x, jax.core.Tracer)


def validate_task_ids(
    task_ids: Array | None,
    num_tasks: int,
    *,
    batch_size: int | None = None,
    module: str = "This module",
    length: int | None = None,
) -> Array:
    """Checks `task_ids` where they enter a task-conditioned module.

    Args:
      task_ids: `[batch]` integer task index per example (or None); with `length`,
        `[batch, length]`, one per position of packed rows (`packing`).
      num_tasks: number of tasks the module has parameters for (gin macro NUM_TASKS).
      batch_size: expected batch size, if known.
      module: name used in error messages.
      length: the row length of per-position ids (packed rows); None: one per row.

    Returns:
      `task_ids` as int32 `[batch]` (or `[batch, length]`).

    Raises:
      ValueError: missing ids, a wrong shape or dtype, or (for concrete arrays) an id
        that is negative or not below `num_tasks`.
    """
    if task_ids is None:
        raise UserError(
            f"{module} is task-conditioned (NUM_TASKS={num_tasks}) and needs task_ids, an "
            "int32 [batch] array with each example's task index; got None. Pass "
            "`task_ids=` to the model (seqio mixtures provide a `task_id` feature)."
        )
    if not hasattr(task_ids, "dtype"):
        task_ids = np.asarray(task_ids)
    if not jnp.issubdtype(task_ids.dtype, jnp.integer):
        raise UserError(f"task_ids must be integers, got dtype {task_ids.dtype}.")
    if length is None and task_ids.ndim != 1:
        raise UserError(f"task_ids must be [batch], got shape {tuple(task_ids.shape)}.")
    if length is not None and tuple(task_ids.shape[1:]) != (length,):
        raise UserError(
            f"Per-position task ids of packed rows must be [batch, {length}], got shape "
            f"{tuple(task_ids.shape)}."
        )
    if batch_size is not None and task_ids.shape[0] != batch_size:
        raise UserError(
            f"task_ids has {task_ids.shape[0]} entries but the batch has {batch_size} examples."
        )
    if is_concrete(task_ids):
        values = np.asarray(task_ids)
        bad = values[(values < 0) | (values >= num_tasks)]
        if bad.size:
            raise UserError(
                f"{module}: task id(s) {sorted(set(bad.tolist()))} out of range; "
                f"expected 0 <= task_id < NUM_TASKS={num_tasks}."
            )
    return jnp.asarray(task_ids, jnp.int32)


def gather_tasks(table: Array, task_ids: Array, num_tasks: int, axis: int = 0) -> Array:
    """Selects each example's task row of `table` with an out-of-range guard.

    Args:
      table: float array with `num_tasks` entries along `axis` (e.g. `[tasks, ...]`).
      task_ids: int `[batch]`.
      num_tasks: size of the task axis.
      axis: the task axis of `table`.

    Returns:
      `table` with `axis` replaced by the batch axis; rows of ids outside
      `[0, num_tasks)` are NaN (only reachable under jit, see the module docstring).
    """
    if table.shape[axis] != num_tasks:
        raise UserError(
            f"Task table has {table.shape[axis]} entries on axis {axis}, expected {num_tasks}."
        )
    valid = (task_ids >= 0) & (task_ids < num_tasks)
    # Negative ids would wrap around in `take`; send every invalid id past the end so
    # mode='fill' replaces its row with NaN.
    safe_ids = jnp.where(valid, task_ids, num_tasks)
    return jnp.take(table, safe_ids, axis=axis, mode="fill", fill_value=jnp.nan)


def gather_task_positions(
    table_TPE: Array, task_ids_BL: Array, positions_BL: Array, num_tasks: int
) -> Array:
    """`table[task_ids, positions]`: each position's row of its task's table.

    Args:
      table_TPE: `[tasks, P, E]` (e.g. one prompt per task).
      task_ids_BL: int `[B, L]` task of every position.
      positions_BL: int `[B, L]`, clipped to `[0, P)`.
      num_tasks: size of the task axis.

    Returns:
      `[B, L, E]`; NaN where the task id is outside `[0, num_tasks)` (as `gather_tasks`).
    """
    if table_TPE.shape[0] != num_tasks:
        raise UserError(f"Task table has {table_TPE.shape[0]} entries, expected {num_tasks}.")
    length = table_TPE.shape[1]
    valid = (task_ids_BL >= 0) & (task_ids_BL < num_tasks)
    flat = task_ids_BL * length + jnp.clip(positions_BL, 0, length - 1)
    flat = jnp.where(valid, flat, num_tasks * length)
    table = table_TPE.reshape((num_tasks * length,) + table_TPE.shape[2:])
    return jnp.take(table, flat, axis=0, mode="fill", fill_value=jnp.nan)
