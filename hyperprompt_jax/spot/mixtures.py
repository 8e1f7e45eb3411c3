"""SPoT's top-k multi-task mixture: the target task plus its k most similar sources.

The paper's multi-task transfer prompt-tunes on a mixture of the target and the
retrieved source tasks (examples-proportional, T5's multi-task default) and then
transfers the final prompt to the target (`transfer.mixture_transfer` runs both).
This module only names and registers the seqio mixture; seqio is imported on use.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Mapping, Sequence

from hyperprompt_jax.errors import UserError
from hyperprompt_jax.spot.core import RankedSource, check_k


def source_tasks(
    ranked: Sequence[RankedSource], k: int, task_map: Mapping[str, str] | None = None
) -> list[str]:
    """The seqio task names of the first k ranked sources (metadata `task`, or
    `task_map[name]`), duplicates dropped in rank order.

    Raises:
      UserError: k out of range, or sources whose task is unknown (named).
    """
    check_k(k, len(ranked))
    task_map = dict(task_map or {})
    tasks, missing = [], []
    for r in ranked[:k]:
        task = task_map.get(r.name, r.task)
        if not task:
            missing.append(r.name)
        elif task not in tasks:
            tasks.append(task)
    if missing:
        raise UserError(
            f'The task of library prompt(s) {missing} is unknown: add {{"task": ...}} to '
            "their .json metadata or pass --task_map NAME=TASK."
        )
    return tasks


MIXTURE_RATES = ("examples", "equal")


def mixture_name(target_task: str, k: int) -> str:
    """`spot_<target>_top<k>_mixture`."""
    return f"spot_{target_task}_top{k}_mixture"


def register_topk_mixture(
    target_task: str,
    sources: Sequence[str],
    *,
    name: str | None = None,
    rate: str = "examples",
    maximum: int | None = None,
    temperature: float = 1.0,
) -> Any:
    """Registers (replacing any namesake) a seqio Mixture of the target plus `sources`.

    Args:
      target_task: the target's registered task.
      sources: registered source tasks / mixtures (the top k).
      name: mixture name; default `spot_<target>_top<k>_mixture`.
      rate: 'examples' (examples-proportional, T5's multi-task default, capped by
        `maximum`, with `temperature`) or 'equal'.
      maximum: the examples-proportional cap K (None = uncapped).
      temperature: examples-proportional temperature (1 = proportional).

    Returns:
      The registered `seqio.Mixture`.

    Raises:
      UserError: a task not registered (with close names), an unknown rate.
    """
    import seqio

    if rate not in MIXTURE_RATES:
        raise UserError(f"Unknown mixing rate {rate!r}; expected one of {MIXTURE_RATES}.")
    members = [target_task] + [s for s in sources if s != target_task]
    registered = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    unknown = [m for m in members if m not in registered]
    if unknown:
        lines = []
        for m in unknown:
            close = difflib.get_close_matches(m, sorted(registered), n=3, cutoff=0.5)
            lines.append(f"{m!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise UserError(
            f"Not registered in seqio: {'; '.join(lines)}. Import the module that registers "
            "them with --module, or fix the prompts' metadata `task`."
        )
    name = name or mixture_name(target_task, len(sources))
    if rate == "examples":
        default_rate = functools.partial(
            seqio.mixing_rate_num_examples, maximum=maximum, temperature=temperature
        )
    else:
        default_rate = 1.0
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, members, default_rate=default_rate)


def topk_mixture(
    target_task: str,
    sources: Sequence[str],
    *,
    name: str | None = None,
    rate: str = "examples",
    maximum: int | None = None,
    temperature: float = 1.0,
    modules: Sequence[str] = (),
) -> str:
    """Registers the mixture (see `register_topk_mixture`) and returns its name.

    For gin: `MIXTURE_OR_TASK_NAME = @mixtures.topk_mixture()` registers the mixture
    in the training process itself when the run reads its task name (the file
    `transfer.mixture_transfer` writes). `modules` are imported first (task modules
    that register the members).

    Raises:
      UserError: a module that cannot be imported; see `register_topk_mixture`.
    """
    import_modules(modules)
    return register_topk_mixture(
        target_task, sources, name=name, rate=rate, maximum=maximum, temperature=temperature
    ).name


def import_modules(modules: Sequence[str]) -> None:
    """Imports task modules (which register seqio tasks on import).

    Raises:
      UserError: a module that cannot be imported.
    """
    import importlib

    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise UserError(f"Cannot import task module {m!r}: {e}") from e


def mixture_gin(
    target_task: str,
    sources: Sequence[str],
    *,
    name: str,
    rate: str,
    maximum: int | None,
    temperature: float,
    modules: Sequence[str] = (),
) -> str:
    """The text of a gin file that sets MIXTURE_OR_TASK_NAME to the registered mixture."""
    return (
        "# SPoT top-k mixture: the target plus its most similar source tasks.\n"
        "# Written by `python -m hyperprompt_jax.spot mixture_transfer`; include it after\n"
        "# the run file to train on the mixture (it registers it in the training process).\n"
        "from __gin__ import dynamic_registration\n\n"
        "from hyperprompt_jax.spot import mixtures\n\n"
        "MIXTURE_OR_TASK_NAME = @mixtures.topk_mixture()\n"
        "mixtures.topk_mixture:\n"
        f"  target_task = {target_task!r}\n"
        f"  sources = {list(sources)!r}\n"
        f"  name = {name!r}\n"
        f"  rate = {rate!r}\n"
        f"  maximum = {maximum!r}\n"
        f"  temperature = {float(temperature)!r}\n"
        f"  modules = {list(modules)!r}\n"
    )
