"""Where SPoT finds prompts and scores in training runs (orbax checkpoints, eval logs).

Reads a run's `checkpoint_<step>/` directories without knowing the train-state layout
(the PyTree metadata is searched for a leaf ending in `prompt/prompt`, SMoP's
`prompt/prompts`; only that array is restored), picks a step (`latest`, an int, or
`best` by validation score), and reads `eval_metrics.jsonl` (`best_eval_score`).

Checkpoints are found by the package's one rule (`hyperprompt_jax.checkpoints`:
`checkpoint_<step>/`, damaged or incomplete ones skipped with a warning, never
deleted); a step's score is the package's one best-checkpoint rule
(`hyperprompt_jax.selection.best_score`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from hyperprompt_jax import selection
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.prompt_files import check_prompt
from hyperprompt_jax.spot.core import unknown_name

EVAL_METRICS_FILE = "eval_metrics.jsonl"
BEST_CHECKPOINTS_FILE = "best_checkpoints.json"
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "_sharding")
# Components under which parameters live in a train state (flax `params`, t5x `target`,
# this package's `TrainState.trainable` / `.frozen`); a `prompt/prompt` elsewhere
# (optimizer moments mirror the parameter tree: `opt_state/.../v_row/prompt/prompt`) is
# not the prompt.
_PARAM_ROOTS = ("params", "target", "trainable", "frozen")
_OPTIMIZER_KEYS = ("opt_state", "optimizer", "param_states", "state_dict")


def checkpoint_steps(model_dir: str) -> list[int]:
    """Steps of the intact `checkpoint_<step>/` directories in `model_dir`, ascending.

    Damaged or incomplete ones (see `checkpoints.discovery.damage`) are left out with
    a warning naming them; nothing is deleted. A step directory that is an orbax PyTree
    of another layout (not this package's or t5x's) is kept: SPoT reads any layout.
    """
    from hyperprompt_jax.checkpoints import discovery as ckpt

    if not os.path.isdir(model_dir):
        return []
    steps, skipped = [], []
    for step, path in ckpt.step_dirs(model_dir):
        reason = ckpt.damage(path)
        if reason is None or (ckpt.kind(path) is None and _pytree_dirs(path)):
            steps.append(step)
        else:
            skipped.append((path, reason))
    ckpt.warn_skipped(skipped, _step_path(model_dir, steps[-1]) if steps else None)
    return steps


def _step_path(model_dir: str, step: int) -> str:
    from hyperprompt_jax.checkpoints import discovery as ckpt

    return os.path.join(model_dir, ckpt.step_dir_name(step))


def _is_pytree_dir(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, m)) for m in _ORBAX_MARKERS
    )


def _pytree_dirs(step_dir: str) -> list[str]:
    """The orbax PyTree directories of one checkpoint: itself, or its item subdirectories
    (`default/` from `StandardSave` through a CheckpointManager, `state/`, ...)."""
    if _is_pytree_dir(step_dir):
        return [step_dir]
    return sorted(
        os.path.join(step_dir, d)
        for d in os.listdir(step_dir)
        if _is_pytree_dir(os.path.join(step_dir, d))
    )


def resolve_checkpoint(
    path: str,
    step: int | str | None = None,
    *,
    task: str | None = None,
    metric: str | None = None,
) -> tuple[str, int | None]:
    """`(checkpoint_<step> directory, step)` for a model directory or a step directory.

    Args:
      path: a model directory (holding `checkpoint_<step>/`) or one checkpoint directory.
      step: for a model directory: an int, 'latest' / None (default), or 'best' (the
        step with the best validation score in `eval_metrics.jsonl` that has a
        checkpoint).
      task, metric: which validation score 'best' maximises (see `best_eval_score`).

    Raises:
      UserError: a missing path, no checkpoints, or an unknown step (with the
        available ones).
    """
    if not os.path.isdir(path):
        raise UserError(f"Checkpoint path {path!r} is not a directory.")
    steps = checkpoint_steps(path)
    if not steps:
        from hyperprompt_jax.checkpoints import discovery as ckpt

        own = ckpt.parse_step(os.path.normpath(path))
        if step not in (None, "latest") and str(step) != str(own):
            raise UserError(
                f"{path!r} is a single checkpoint (no {ckpt.STEP_PREFIX}_<step>/ "
                f"inside); --step={step} needs the model directory."
            )
        return path, own
    if step in (None, "latest"):
        chosen = steps[-1]
    elif step == "best":
        best = best_eval_score(path, task=task, metric=metric)
        if best is None:
            raise UserError(
                f"--step=best needs validation scores in {os.path.join(path, EVAL_METRICS_FILE)}."
            )
        evaluated = [s for s in best.ranking if s in steps]
        if not evaluated:
            raise UserError(
                f"No evaluated step of {path!r} has a checkpoint (checkpoints: {steps})."
            )
        chosen = evaluated[0]
    else:
        try:
            chosen = int(step)
        except (TypeError, ValueError):
            raise UserError(f"--step must be an int, 'latest' or 'best', got {step!r}.") from None
        if chosen not in steps:
            raise UserError(f"No checkpoint at step {chosen} in {path!r}; available: {steps}.")
    return _step_path(path, chosen), chosen


def _leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaf_paths(v, (*prefix, str(k)))
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        for i, v in enumerate(tree):
            yield from _leaf_paths(v, (*prefix, str(i)))
    else:
        yield prefix, tree


def find_prompt_paths(tree: Any) -> dict[str, list[tuple[str, ...]]]:
    """Paths of prompt parameters in a (metadata) tree: 'soft' (`.../prompt/prompt`,
    a soft prompt `[L, E]` or a multi-task one `[T, L, E]`) and 'smop'
    (`.../prompt/prompts`, SMoP's `[K, L, E]`), those under a parameter root first."""
    found: dict[str, list[tuple[str, ...]]] = {"soft": [], "smop": []}
    for path, _ in _leaf_paths(tree):
        if path[-2:] == ("prompt", "prompt"):
            found["soft"].append(path)
        elif path[-2:] == ("prompt", "prompts"):
            found["smop"].append(path)
    for kind, paths in found.items():
        # Optimizer states mirror the parameter tree: when there is a choice, the
        # parameter is the path right under a parameter root, or else outside any
        # optimizer state.
        under_params = [p for p in paths if len(p) >= 3 and p[-3] in _PARAM_ROOTS]
        outside_optimizer = [p for p in paths if not set(p) & set(_OPTIMIZER_KEYS)]
        found[kind] = under_params or outside_optimizer or paths
    return found


def _get(tree: Any, path: Sequence[str]) -> Any:
    for k in path:
        tree = tree[int(k)] if isinstance(tree, (list, tuple)) else tree[k]
    return tree


def _select_prompt(
    array: np.ndarray, where: str, kind: str, prompt_index: int | None
) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 2:
        if prompt_index not in (None, 0):
            raise UserError(f"{where} is a single prompt {array.shape}; drop --prompt_index.")
        return array
    if array.ndim != 3:
        raise UserError(f"{where} has shape {array.shape}; expected [length, emb_dim].")
    what = "an SMoP checkpoint" if kind == "smop" else "a multi-task prompt"
    if prompt_index is None:
        raise UserError(
            f"{where} is {what} with {array.shape[0]} prompts {array.shape}; choose one "
            f"with --prompt_index in [0, {array.shape[0]})."
        )
    if not 0 <= prompt_index < array.shape[0]:
        raise UserError(
            f"--prompt_index={prompt_index} is out of range for {array.shape[0]} prompts in {where}."
        )
    return array[prompt_index]


@dataclasses.dataclass(frozen=True)
class CheckpointPrompt:
    """A prompt read from a checkpoint: `prompt [L, E]`, where it came from."""

    prompt: np.ndarray
    checkpoint: str
    step: int | None
    param_path: str


def read_checkpoint_prompt(
    path: str,
    *,
    step: int | str | None = None,
    prompt_index: int | None = None,
    param_path: str | None = None,
    task: str | None = None,
    metric: str | None = None,
) -> CheckpointPrompt:
    """Reads the soft prompt of an orbax checkpoint without knowing the state layout.

    The PyTree is searched through its metadata for a leaf at a path ending in
    `prompt/prompt`; only that array is restored (a T5-XXL checkpoint is not loaded).

    Args:
      path: a model directory or a `checkpoint_<step>` directory.
      step: see `resolve_checkpoint`.
      prompt_index: which prompt of a multi-task prompt `[T, L, E]` or SMoP's `[K, L, E]`.
      param_path: an explicit '/'-joined path to the prompt (when the search is ambiguous).
      task, metric: the validation score that `step='best'` maximises.

    Raises:
      UserError: no checkpoint, no prompt (the method parameters found are named),
        an ambiguous prompt, an SMoP / multi-task prompt without `prompt_index`.
    """
    import orbax.checkpoint as ocp  # Heavy; only export needs it.

    step_dir, step_number = resolve_checkpoint(path, step, task=task, metric=metric)
    item_dirs = _pytree_dirs(step_dir)
    if not item_dirs:
        raise UserError(
            f"{step_dir!r} holds no orbax PyTree checkpoint (no _METADATA file in it or its "
            "subdirectories). A native t5x checkpoint? Load it with "
            "hyperprompt_jax.checkpoints.load_t5x_checkpoint and save its prompt with np.save."
        )
    checkpointer = ocp.PyTreeCheckpointer()
    seen_method_params: list[str] = []
    for item_dir in item_dirs:
        item_dir = os.path.abspath(item_dir)
        try:
            tree = checkpointer.metadata(item_dir).item_metadata.tree
        except Exception:  # noqa: BLE001 - old layouts without metadata: restore fully.
            tree = checkpointer.restore(item_dir)
        if param_path:
            wanted = tuple(param_path.strip("/").split("/"))
            leaves = dict(_leaf_paths(tree))
            if wanted not in leaves:
                close = difflib.get_close_matches(
                    "/".join(wanted), ["/".join(p) for p in leaves], n=3
                )
                raise UserError(
                    f"No parameter {param_path!r} in {item_dir!r}."
                    + (f" Did you mean {close}?" if close else "")
                )
            kind = "smop" if wanted[-1] == "prompts" else "soft"
            candidates = [wanted]
        else:
            found = find_prompt_paths(tree)
            kind = "soft" if found["soft"] else "smop"
            candidates = found[kind]
            seen_method_params += [
                "/".join(p) for p, _ in _leaf_paths(tree)
                if any(c in ("prompt", "router", "hyperprompt") for c in p)
            ]  # fmt: skip
        if not candidates:
            continue
        if len(candidates) > 1:
            listing = ", ".join("/".join(c) for c in candidates)
            raise UserError(
                f"Several prompt parameters in {item_dir!r}: {listing}; choose one with "
                "--param_path."
            )
        prompt_path = candidates[0]
        array = _restore_leaf(checkpointer, item_dir, tree, prompt_path)
        where = f"{'/'.join(prompt_path)} in {step_dir!r}"
        prompt = check_prompt(_select_prompt(array, where, kind, prompt_index), where)
        return CheckpointPrompt(prompt, step_dir, step_number, "/".join(prompt_path))
    hint = (
        f" Method parameters found: {seen_method_params[:6]}"
        + (
            " (HyperPrompt has no input prompt to export)."
            if any("hyperprompt" in p for p in seen_method_params)
            else "."
        )
        if seen_method_params
        else " It holds no method parameters: a model-tuning or backbone checkpoint?"
    )
    raise UserError(
        f"No soft prompt (a parameter path ending in prompt/prompt) in {step_dir!r}.{hint}"
    )


def _restore_leaf(checkpointer: Any, item_dir: str, tree: Any, path: Sequence[str]) -> np.ndarray:
    """Restores only the leaf at `path` as a NumPy array (partial restore)."""
    import orbax.checkpoint as ocp

    leaf = _get(tree, path)
    if isinstance(leaf, np.ndarray):  # `tree` is already restored data.
        return leaf
    if any(k.isdigit() for k in path):
        # Partial restore templates are dicts; a path through a list restores fully.
        return np.asarray(_get(checkpointer.restore(item_dir), path))
    item: dict = {}
    restore_args: dict = {}
    node, args = item, restore_args
    for k in path[:-1]:
        node = node.setdefault(k, {})
        args = args.setdefault(k, {})
    node[path[-1]] = leaf
    args[path[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
    restored = checkpointer.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
    )
    return np.asarray(_get(restored, path))


# -- Validation scores ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalScore:
    """A run's validation scores: the best, and the evaluated steps best-first.

    `by_step` maps a step to its score; `metric` says how the score is made (one
    metric, or the mean of several, as GLUE averages MRPC's F1 and accuracy).
    """

    score: float
    step: int
    metric: str
    by_step: Mapping[int, float]

    @property
    def ranking(self) -> list[int]:
        """Evaluated steps, best first (ties: earlier step first)."""
        return sorted(self.by_step, key=lambda s: (-self.by_step[s], s))


def read_eval_metrics(model_dir: str) -> list[dict[str, Any]]:
    """The rows of `model_dir/eval_metrics.jsonl` ([] if absent).

    Raises:
      UserError: a line that is not a JSON object with a `step` (file and line named).
    """
    path = os.path.join(model_dir, EVAL_METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i} is not valid JSON: {e}") from e
            if not isinstance(row, dict) or "step" not in row:
                raise UserError(f"{path}:{i} must be a JSON object with a 'step'; got {line!r}.")
            rows.append(row)
    return rows


def best_eval_score(
    model_dir: str, *, task: str | None = None, metric: str | None = None
) -> EvalScore | None:
    """The best validation score of a run from its `eval_metrics.jsonl`.

    Args:
      model_dir: the run's directory.
      task: score this task's rows. If it is not in the file (e.g. the run trained on
        a mixture, whose sub-tasks are evaluated) or None, a step's score is the mean
        over every task evaluated at that step, as GLUE averages its tasks.
      metric: the metric to maximise; None = the mean of every numeric metric whose
        name is not loss-like (one metric: that metric).

    Returns:
      None when there is no file or no usable row; else an `EvalScore`.

    Raises:
      UserError: an unknown `metric` (with the logged ones).
    """
    rows = read_eval_metrics(model_dir)
    if not rows:
        return None
    tasks = sorted({str(r.get("task")) for r in rows if r.get("task") is not None})
    if task is not None and task in tasks:
        rows = [r for r in rows if r.get("task") == task]
        tasks = [task]
    per_step: dict[int, dict[str, float]] = {}  # step -> {task: score}
    used: set[str] = set()
    for r in rows:
        numeric = {
            k: float(v) for k, v in r.items()
            if k not in ("step", "task") and isinstance(v, (int, float)) and not isinstance(v, bool)
        }  # fmt: skip
        if metric is not None:
            values = {metric: numeric[metric]} if metric in numeric else {}
        else:
            values = {k: v for k, v in numeric.items() if selection.is_score_metric(k)}
        values = {k: v for k, v in values.items() if math.isfinite(v)}
        if values:
            used.update(values)
            per_step.setdefault(int(r["step"]), {})[str(r.get("task"))] = float(
                np.mean(list(values.values()))
            )
    if not per_step:
        if metric is not None:
            known = sorted({k for r in rows for k in r if k not in ("step", "task")})
            raise UserError(unknown_name(metric, known, "eval metric"))
        return None
    # Steps where only some tasks were evaluated are not comparable with full ones.
    most = max(len(v) for v in per_step.values())
    by_step = {s: float(np.mean(list(v.values()))) for s, v in per_step.items() if len(v) == most}
    name = next(iter(used)) if len(used) == 1 else f"mean({','.join(sorted(used))})"
    if len(tasks) > 1:
        name = f"mean over {len(tasks)} tasks of {name}"
    best_step = min(by_step, key=lambda s: (-by_step[s], s))
    return EvalScore(by_step[best_step], best_step, name, by_step)


_TASK_MACRO = re.compile(r"^\s*MIXTURE_OR_TASK_NAME\s*=\s*['\"]([^'\"]+)['\"]", re.MULTILINE)


def task_from_config(model_dir: str) -> str | None:
    """`MIXTURE_OR_TASK_NAME` from the run's operative `config.gin`, if recorded."""
    path = os.path.join(model_dir, "config.gin")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        m = _TASK_MACRO.search(f.read())
    return m.group(1) if m else None
