"""`TaskSpec`: one table row -> one registered seqio task (and its task-id variant).

Benchmarks are declared as lists of specs and registered in a loop, so the pipeline
shared by every task (text preprocessing -> tokenize -> cache point -> token
preprocessing -> EOS) is written once. A spec can register a second copy of its task
that also emits `task_id` (`register(task_id=...)`), which is how multi-task mixtures
give every example its task's index.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import seqio
from hyperprompt_jax.tasks import preprocessors as hp_preprocessors
from hyperprompt_jax.tasks.sources import PreparedTfdsSource
from hyperprompt_jax.tasks.vocab import get_output_features

TASK_ID_SUFFIX = "_task_id"

# Every spec registered so far, by task name; mixtures build task-id variants from it.
_SPECS: dict[str, TaskSpec] = {}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything that distinguishes one text-to-text task.

    Attributes:
      name: registered name (`hp_` + the t5 library's name where one exists).
      tfds_name: `"dataset/config:version"`.
      text_preprocessors: string-level steps producing `inputs` / `targets`.
      token_preprocessors: steps after tokenization (e.g. C4's prefix LM).
      splits: restrict / rename TFDS splits (None: all prepared splits).
      metric_fns: seqio metric functions `(targets, predictions) -> dict`.
      postprocess_fn: decoded text (or target example) -> metric input.
    """

    name: str
    tfds_name: str
    text_preprocessors: Sequence[Callable[..., Any]]
    token_preprocessors: Sequence[Callable[..., Any]] = ()
    splits: Sequence[str] | Mapping[str, str] | None = None
    metric_fns: Sequence[Callable[..., Any]] = ()
    postprocess_fn: Callable[..., Any] | None = None

    def register(self, task_id: int | None = None) -> seqio.Task:
        """Registers the task (again, replacing an old registration).

        Args:
          task_id: if given, register `<name>_task_id`, whose examples also carry
            `task_id` (int32 scalar) with this value.

        Returns:
          The registered `seqio.Task`.
        """
        name = self.name if task_id is None else self.name + TASK_ID_SUFFIX
        steps = [
            *self.text_preprocessors,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            *self.token_preprocessors,
            seqio.preprocessors.append_eos_after_trim,
        ]
        if task_id is not None:
            if not isinstance(task_id, int) or task_id < 0:
                raise ValueError(f"task_id must be a non-negative int, got {task_id!r}.")
            steps.append(functools.partial(hp_preprocessors.add_task_id, task_id=task_id))
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
        task = seqio.TaskRegistry.add(
            name,
            source=PreparedTfdsSource(self.tfds_name, splits=self.splits),
            preprocessors=steps,
            output_features=get_output_features(with_task_id=task_id is not None),
            metric_fns=list(self.metric_fns),
            postprocess_fn=self.postprocess_fn,
        )
        _SPECS[self.name] = self
        return task


def get_spec(name: str) -> TaskSpec:
    """The spec a task was registered from (`ValueError` naming the known specs)."""
    if name not in _SPECS:
        raise ValueError(
            f"No task spec named {name!r}; registered specs: {', '.join(sorted(_SPECS))}."
        )
    return _SPECS[name]


def register_mixture(name: str, tasks: Sequence[Any], default_rate: Any = None) -> seqio.Mixture:
    """`seqio.MixtureRegistry.add`, replacing an earlier registration of `name`."""
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks, default_rate=default_rate)
