"""Prompts out of training runs: library entries (`.npy` + `.json`) and PEFT adapters.

* `export_prompt`: a run's prompt -> a library entry: the transfer prompt (`--step`,
  e.g. `best`) as `<name>.npy`, optionally the task embedding taken early
  (`--embedding_step`, the paper: 10K steps) as `<name>.embedding.npy`, and the
  metadata saying which is which (`prompts`), the task, step and validation score.
* `export_peft`: a run's soft prompt -> a Hugging Face PEFT prompt-tuning adapter
  directory, next to the Hugging Face export of the run's backbone (or pointing at a
  given base model). What each method exports to:

  | method                          | library `.npy` | PEFT adapter              |
  |---------------------------------|----------------|---------------------------|
  | prompt tuning, SPoT             | yes            | yes                       |
  | multi-task prompt `[T, L, E]`   | one task (`prompt_index`) | one task (`prompt_index`) |
  | SMoP `[K, L, E]` + router       | one prompt (`prompt_index`) | no (routing has no PEFT form) |
  | HyperPrompt                     | no             | no (per-layer hypernetworks) |
  | model tuning                    | no             | no (export the model: `checkpoints.save_hf_t5`) |

* `load_target_prompt`: the target's embedding from a `.npy`, a PEFT adapter, or a run.

Shapes: L prompt length, E emb_dim, T tasks, K prompts.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from hyperprompt_jax import prompt_files
from hyperprompt_jax.errors import UserError
from hyperprompt_jax.prompt_files import check_prompt
from hyperprompt_jax.spot import core, discovery

# Top-level parameter names of the methods (DESIGN.md: one regex selects them).
METHOD_PARAMS = ("prompt", "router", "hyperprompt")
NO_PEFT_EQUIVALENT = {
    "smop": (
        "SMoP has no PEFT equivalent: PEFT's prompt tuning prepends one fixed prompt, "
        "while SMoP routes each example to one of several prompts. Export one of its "
        "prompts for SPoT with `export --prompt_index=I` (a .npy library entry) instead."
    ),
    "hyperprompt": (
        "HyperPrompt has no PEFT equivalent: its key/value prompts are generated in every "
        "layer by hypernetworks, which no PEFT adapter type represents; export the "
        "whole checkpoint instead (`hyperprompt_jax.checkpoints.save_t5x_checkpoint`)."
    ),
}


def export_prompt(
    checkpoint: str,
    output: str,
    *,
    step: int | str | None = None,
    embedding_step: int | str | None = None,
    task: str | None = None,
    model: str | None = None,
    score: float | None = None,
    metric: str | None = None,
    prompt_index: int | None = None,
    param_path: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Exports a run's prompt to `output` `.npy` `[L, E]` plus a `.json` beside it.

    Metadata: `task` (given, else the run's `MIXTURE_OR_TASK_NAME`), `model`, `step`,
    `score` (given, else the run's validation score at the exported step, else its best
    score; `score_step` and `score_metric` say which), `length`, `emb_dim`, `checkpoint`,
    `param_path`, `prompts` (`{'transfer': {file, step}, 'embedding': {file, step}}`)
    and `extra`.

    Args:
      checkpoint: a model directory or a `checkpoint_<step>` directory.
      output: the library entry's `.npy` path (the transfer prompt).
      step: the transfer prompt's step (int, 'latest' = default, 'best').
      embedding_step: if set, the task embedding's step, written to
        `<name>.embedding.npy`; None = the transfer prompt is also the embedding.
      task, model, score, metric, prompt_index, param_path: see above and
        `discovery.read_checkpoint_prompt`.
      extra: more metadata.

    Returns:
      (the `.npy` path, the metadata).

    Raises:
      UserError: see `discovery.read_checkpoint_prompt`, `discovery.best_eval_score`.
    """
    model_dir = (
        checkpoint
        if discovery.checkpoint_steps(checkpoint)
        else os.path.dirname(os.path.normpath(checkpoint))
    )
    task = task or discovery.task_from_config(model_dir)
    found = discovery.read_checkpoint_prompt(
        checkpoint, step=step, prompt_index=prompt_index, param_path=param_path,
        task=task, metric=metric,
    )  # fmt: skip
    embedding = None
    if embedding_step is not None:
        embedding = discovery.read_checkpoint_prompt(
            checkpoint, step=embedding_step, prompt_index=prompt_index, param_path=param_path,
            task=task, metric=metric,
        )  # fmt: skip
    path = output if output.endswith(prompt_files.PROMPT_SUFFIX) else output + ".npy"
    stem = os.path.basename(path)[: -len(prompt_files.PROMPT_SUFFIX)]
    embedding_file = stem + core.EMBEDDING_SUFFIX
    meta: dict[str, Any] = {
        "task": task,
        "model": model,
        "step": found.step,
        "checkpoint": os.path.abspath(found.checkpoint),
        "param_path": found.param_path,
        "prompts": {
            "transfer": {"file": stem + prompt_files.PROMPT_SUFFIX, "step": found.step},
            "embedding": (
                {"file": embedding_file, "step": embedding.step}
                if embedding is not None
                else {"file": stem + prompt_files.PROMPT_SUFFIX, "step": found.step}
            ),
        },
    }
    if prompt_index is not None:
        meta["prompt_index"] = prompt_index
    if score is not None:
        meta.update(score=float(score), score_metric=metric or "given")
    else:
        evals = discovery.best_eval_score(model_dir, task=task, metric=metric)
        if evals is not None:
            at = found.step if found.step in evals.by_step else evals.step
            meta.update(score=evals.by_step[at], score_step=at, score_metric=evals.metric)
        else:
            meta["score"] = None
    meta.update(extra or {})
    path = prompt_files.save_prompt(path, found.prompt, meta)
    stale = os.path.join(os.path.dirname(path), embedding_file)
    if embedding is not None:
        np.save(stale, check_prompt(embedding.prompt, "the task embedding"))
    elif os.path.exists(stale):  # A re-export without an embedding step: one prompt.
        os.remove(stale)
    return path, prompt_files.read_metadata(path)


def load_target_prompt(
    target: str,
    *,
    step: int | str | None = None,
    prompt_index: int | None = None,
    emb_dim: int | None = None,
) -> np.ndarray:
    """The target's task embedding `[L, E]`: a `.npy` file, a PEFT prompt-tuning
    adapter, or a (short) training run's model / checkpoint directory (its prompt at
    `step`, default latest).

    Raises:
      UserError: see `prompt_files.load_prompt_file` / `discovery.read_checkpoint_prompt`.
    """
    if os.path.isdir(target) and not prompt_files.is_peft_adapter(target):
        prompt = discovery.read_checkpoint_prompt(
            target, step=step, prompt_index=prompt_index
        ).prompt
        return check_prompt(prompt, f"of {target!r}", emb_dim=emb_dim)
    return prompt_files.load_prompt_file(target, emb_dim=emb_dim)


# ----------------------------------------------------------------------------------------
# PEFT adapters
# ----------------------------------------------------------------------------------------


def checkpoint_method(step_dir: str) -> str | None:
    """Which method's parameters a checkpoint holds: 'prompt' (a soft prompt), 'smop',
    'hyperprompt', or None (a backbone / model-tuning checkpoint)."""
    tree = _read_tree(step_dir, metadata_only=True)
    paths = ["/".join(p) for p, _ in discovery._leaf_paths(tree)]
    found = discovery.find_prompt_paths(tree)
    if found["soft"]:
        return "prompt"
    if found["smop"] or any("/router/" in p for p in paths):
        return "smop"
    if any("hyperprompt" in p.split("/") for p in paths):
        return "hyperprompt"
    return None


def _read_tree(step_dir: str, *, metadata_only: bool) -> Any:
    """The first orbax PyTree item of a checkpoint directory: its metadata, or restored."""
    import orbax.checkpoint as ocp  # Heavy; only export needs it.

    items = discovery._pytree_dirs(step_dir)
    if not items:
        raise UserError(f"{step_dir!r} holds no orbax PyTree checkpoint (no _METADATA file).")
    checkpointer = ocp.PyTreeCheckpointer()
    item = os.path.abspath(items[0])
    if metadata_only:
        try:
            return checkpointer.metadata(item).item_metadata.tree
        except Exception:  # noqa: BLE001 - old layouts without metadata: restore fully.
            pass
    return checkpointer.restore(item)


def read_backbone_params(step_dir: str) -> dict[str, Any]:
    """The backbone parameters (method parameters dropped) of a checkpoint.

    Accepts this package's train state (`trainable` + `frozen`), or a tree with the
    parameters under `params` (flax) or `target` (t5x).

    Raises:
      UserError: no parameter tree found.
    """
    tree = _read_tree(step_dir, metadata_only=False)
    if "state" in tree and isinstance(tree["state"], Mapping):
        tree = tree["state"]
    if "trainable" in tree or "frozen" in tree:
        flat: dict[tuple[str, ...], Any] = {}
        for root in ("frozen", "trainable"):
            flat.update(dict(discovery._leaf_paths(tree.get(root) or {})))
    elif "params" in tree or "target" in tree:
        flat = dict(discovery._leaf_paths(tree.get("params", tree.get("target"))))
    else:
        raise UserError(
            f"No parameters (trainable/frozen, params or target) in {step_dir!r}; found "
            f"{sorted(tree)}."
        )
    params: dict[str, Any] = {}
    for path, value in flat.items():
        if path[0] in METHOD_PARAMS:
            continue
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = np.asarray(value)
    return params


def write_peft_export(
    output_dir: str,
    prompt: np.ndarray,
    *,
    base_model: str | None = None,
    config: Any = None,
    backbone: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Writes `output_dir/adapter/` (PEFT prompt tuning) and, given a config and its
    backbone parameters, `output_dir/backbone/` (a Hugging Face T5 directory) that the
    adapter's `base_model_name_or_path` points to.

    Args:
      output_dir: the export directory.
      prompt: the soft prompt `[L, E]`.
      base_model: an existing base model (HF directory or hub id) instead of a
        backbone export.
      config: the backbone's `T5Config` (with `backbone`).
      backbone: the backbone's parameter tree.
      metadata: saved beside the adapter (read back as the library entry's metadata).

    Returns:
      {'adapter': path, 'backbone': path or the given base model}.

    Raises:
      UserError: neither or both of `base_model` and `config` + `backbone`, a prompt
        whose width is not the backbone's.
    """
    if (base_model is None) == (config is None or backbone is None):
        raise UserError(
            "A PEFT export needs its base model: pass --base_model (an HF directory or hub "
            "id) or the backbone's gin files (--gin_file=models/...) to export it, not both."
        )
    prompt = check_prompt(prompt, "to export", emb_dim=None if config is None else config.emb_dim)
    out = {}
    if base_model is None:
        from hyperprompt_jax import checkpoints

        base_model = os.path.abspath(os.path.join(output_dir, "backbone"))
        checkpoints.save_hf_t5(config, backbone, base_model)
    out["backbone"] = base_model
    out["adapter"] = prompt_files.write_peft_adapter(
        os.path.join(output_dir, "adapter"), prompt, base_model=base_model, metadata=metadata
    )
    return out


def export_peft(
    checkpoint: str,
    output_dir: str,
    *,
    step: int | str | None = None,
    prompt_index: int | None = None,
    param_path: str | None = None,
    base_model: str | None = None,
    config: Any = None,
    task: str | None = None,
    metric: str | None = None,
) -> dict[str, str]:
    """A run's soft prompt (prompt tuning, SPoT, one task of a multi-task prompt) as a
    PEFT adapter, with its backbone exported beside it (given `config`) or pointing at
    `base_model`. See `write_peft_export`.

    Raises:
      UserError: an SMoP or HyperPrompt checkpoint (no PEFT equivalent), a checkpoint
        without a soft prompt, see `discovery.read_checkpoint_prompt`.
    """
    step_dir, _ = discovery.resolve_checkpoint(checkpoint, step, task=task, metric=metric)
    method = checkpoint_method(step_dir)
    if method in NO_PEFT_EQUIVALENT:
        raise UserError(NO_PEFT_EQUIVALENT[method])
    found = discovery.read_checkpoint_prompt(
        step_dir, prompt_index=prompt_index, param_path=param_path
    )
    model_dir = os.path.dirname(os.path.normpath(found.checkpoint))
    metadata = {
        "task": task or discovery.task_from_config(model_dir),
        "step": found.step,
        "checkpoint": os.path.abspath(found.checkpoint),
        "param_path": found.param_path,
    }
    if prompt_index is not None:
        metadata["prompt_index"] = prompt_index
    backbone = read_backbone_params(step_dir) if base_model is None else None
    return write_peft_export(
        output_dir, found.prompt, base_model=base_model, config=config, backbone=backbone,
        metadata=metadata,
    )  # fmt: skip


def import_peft(adapter: str, output: str, *, task: str | None = None) -> tuple[str, dict]:
    """A PEFT prompt-tuning adapter -> a library entry `output` `.npy` + `.json`.

    The prompt is copied exactly; the metadata is the adapter's (its config under
    `peft`, `format: 'peft'`, our `hyperprompt_jax.json` if present) plus `model` (the
    adapter's base model), `source` (the adapter directory) and `task` (given, else
    the adapter's). An adapter directory is also usable as an entry as it is; this
    makes a self-contained copy.

    Returns:
      (the `.npy` path, the metadata).

    Raises:
      UserError: not a PEFT prompt-tuning adapter (see `prompt_files`).
    """
    if not prompt_files.is_peft_adapter(adapter):
        raise UserError(
            f"{adapter!r} is not a PEFT adapter directory (no {prompt_files.PEFT_CONFIG_FILE})."
        )
    prompt = prompt_files.read_peft_prompt(adapter)
    meta = prompt_files.read_metadata(adapter)
    meta["model"] = meta.get("model") or meta["peft"].get("base_model_name_or_path")
    meta["source"] = os.path.abspath(adapter)
    if task is not None:
        meta["task"] = task
    path = prompt_files.save_prompt(output, prompt, meta)
    return path, prompt_files.read_metadata(path)
