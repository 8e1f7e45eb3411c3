"""Multi-task mixtures with task ids: what HyperPrompt trains on.

`hp_glue_v002_multitask` and `hp_super_glue_v102_multitask` contain copies of the
GLUE / SuperGLUE tasks named `<task>_task_id` whose examples carry `task_id`, an
int32 scalar: the task's index in the stable order below.
`EncDecTaskIdFeatureConverter` passes it to the model as `task_ids` `[batch]`.

Documented task-id orders (the t5 library's GLUE / SuperGLUE mixture order):

| id | GLUE (`hp_glue_v002_multitask`) | SuperGLUE (`hp_super_glue_v102_multitask`) |
|---:|---|---|
| 0 | cola | boolq |
| 1 | sst2 | cb |
| 2 | mrpc | copa |
| 3 | qqp | multirc |
| 4 | stsb | record |
| 5 | mnli (+ mnli_matched, mnli_mismatched, ax) | rte (+ axb, axg) |
| 6 | qnli | wic |
| 7 | rte | wsc (wsc_simple_train / _eval, dpr) |

Evaluation-only tasks share the id of the task they are cast as, so a multi-task
model evaluates them with the right task conditioning. Single-task training of a
task-conditioned model: the `_task_id` copy of a task (e.g.
`hp_glue_rte_v002_task_id`) gives its index above, so a prompt trained alone lines up
with the multi-task model; a task without ids (every plain `hp_` task) gets task id 0
from the feature converter.

Sampling: each member gets rate `w ** (1 / T)`, with `w` the t5 library's
example-count weight (so T = 1 is `hp_glue_v002_proportional`'s sampling) and `T`
read when the dataset is built from gin: `hyperprompt_jax.tasks.mixture_temperature.
temperature = 2.0` (T -> infinity approaches equal sampling). Zero-weight
(evaluation-only) members stay at 0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
from hyperprompt_jax.tasks.glue import GLUE_WEIGHTS
from hyperprompt_jax.tasks.specs import TASK_ID_SUFFIX, get_spec, register_mixture
from hyperprompt_jax.tasks.super_glue import SUPER_GLUE_WEIGHTS

import gin

GLUE_TASK_ORDER: tuple[str, ...] = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
SUPER_GLUE_TASK_ORDER: tuple[str, ...] = (
    "boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc",
)  # fmt: skip

# Member task (the t5 library's name) -> task key in the order above.
GLUE_MEMBERS: dict[str, str] = {
    **{f"glue_{key}_v002": key for key in GLUE_TASK_ORDER},
    "glue_mnli_matched_v002": "mnli",
    "glue_mnli_mismatched_v002": "mnli",
    "glue_ax_v002": "mnli",
}
SUPER_GLUE_MEMBERS: dict[str, str] = {
    **{f"super_glue_{key}_v102": key for key in SUPER_GLUE_TASK_ORDER if key != "wsc"},
    "super_glue_axb_v102": "rte",
    "super_glue_axg_v102": "rte",
    "super_glue_wsc_v102_simple_train": "wsc",
    "super_glue_wsc_v102_simple_eval": "wsc",
    "dpr_v001_simple": "wsc",
}


@gin.configurable(module="hyperprompt_jax.tasks")
def mixture_temperature(temperature: float = 1.0) -> float:
    """Sampling temperature T of the multi-task mixtures (rates `w ** (1/T)`)."""
    if not temperature > 0:
        raise ValueError(f"Mixture temperature must be > 0, got {temperature}.")
    return float(temperature)


class TemperatureRate:
    """Mixing rate `weight ** (1 / T)`, T from `mixture_temperature()` at call time."""

    def __init__(self, weight: float):
        if weight < 0:
            raise ValueError(f"Mixing weights must be >= 0, got {weight}.")
        self.weight = float(weight)

    def __call__(self, task: seqio.Task | None = None) -> float:
        del task  # The weight is fixed (the t5 library's counts), not read from data.
        return self.weight ** (1.0 / mixture_temperature()) if self.weight > 0 else 0.0

    def __repr__(self) -> str:
        return f"TemperatureRate(weight={self.weight})"


# Mixture name -> its task order (see `task_order`).
_TASK_ORDERS: dict[str, tuple[str, ...]] = {}
# Task-id task name -> its task id.
_TASK_IDS: dict[str, int] = {}


def register_multitask_mixture(
    name: str,
    members: Mapping[str, str],
    order: Sequence[str],
    weights: Mapping[str, float],
) -> seqio.Mixture:
    """Registers a mixture whose examples carry `task_id` = index of their task key.

    Args:
      name: mixture name.
      members: registered base task name (without `hp_`) -> task key in `order`.
      order: task keys; a key's position is its task id.
      weights: base task name -> example-count weight (0: evaluation only).

    Returns:
      The registered `seqio.Mixture` of `hp_<member>_task_id` tasks.
    """
    order = tuple(order)
    if len(set(order)) != len(order):
        raise ValueError(f"Task order of {name!r} has duplicates: {order}.")
    entries = []
    for member, key in members.items():
        if key not in order:
            raise ValueError(f"Task key {key!r} of {member!r} is not in the order {order}.")
        if member not in weights:
            raise ValueError(f"No mixing weight for {member!r} in mixture {name!r}.")
        task_id = order.index(key)
        task = get_spec(f"hp_{member}").register(task_id=task_id)
        _TASK_IDS[task.name] = task_id
        entries.append((task.name, TemperatureRate(weights[member])))
    _TASK_ORDERS[name] = order
    return register_mixture(name, entries)


def task_order(mixture_name: str) -> tuple[str, ...]:
    """The documented task-id order of a multi-task mixture (`ValueError` if unknown)."""
    if mixture_name not in _TASK_ORDERS:
        raise ValueError(
            f"{mixture_name!r} is not a multi-task mixture with task ids; known: "
            f"{', '.join(sorted(_TASK_ORDERS))}."
        )
    return _TASK_ORDERS[mixture_name]


def task_id(task_name: str) -> int:
    """The task id that a `_task_id` task gives its examples."""
    if task_name not in _TASK_IDS:
        hint = (
            ""
            if task_name.endswith(TASK_ID_SUFFIX)
            else f" (did you mean {task_name}{TASK_ID_SUFFIX}?)"
        )
        raise ValueError(f"Task {task_name!r} carries no task ids{hint}.")
    return _TASK_IDS[task_name]


def register() -> None:
    """Registers the GLUE and SuperGLUE multi-task mixtures."""
    register_multitask_mixture(
        "hp_glue_v002_multitask", GLUE_MEMBERS, GLUE_TASK_ORDER, GLUE_WEIGHTS
    )
    register_multitask_mixture(
        "hp_super_glue_v102_multitask",
        SUPER_GLUE_MEMBERS,
        SUPER_GLUE_TASK_ORDER,
        SUPER_GLUE_WEIGHTS,
    )


register()
