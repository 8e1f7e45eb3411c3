"""Soft prompts on disk: validation, `.npy` files with `.json` metadata, PEFT adapters.

One place checks and reads prompt files for everything that takes one: the prompt
initialisers (`prompts.FromFile`, `prompts.WeightedFiles`) and SPoT (library entries,
`rank` / `init` targets). Two formats are read wherever a prompt file is accepted:

* `<name>.npy`: a float array `[L, E]` (the layout of google-research/prompt-tuning's
  released prompts), with optional metadata in `<name>.json` beside it. Local paths or
  any `tf.io.gfile` URL (gs://...).
* A Hugging Face PEFT prompt-tuning adapter directory (`adapter_config.json` with
  `peft_type` PROMPT_TUNING, `adapter_model.safetensors` holding `prompt_embeddings`).
  PEFT stores `[num_transformer_submodules * num_virtual_tokens, token_dim]`; for an
  encoder-decoder, PEFT's prompt tuning prepends only the first `num_virtual_tokens`
  rows to the encoder inputs (the decoder half is unused), so those rows are the
  prompt. Its metadata is the adapter config (under `peft`) plus, when this package
  wrote the adapter, the `.json` metadata saved beside it (`hyperprompt_jax.json`).

`write_peft_adapter` writes the PEFT format (with `num_transformer_submodules` 1, so the
file holds exactly the prompt); `PeftModel.from_pretrained(T5ForConditionalGeneration
...)` then computes what this package's `SoftPrompt` does (tests/test_peft.py).

Errors in what a user gave (a missing file, a wrong shape, NaN values) raise
`errors.UserError` naming the file and what was expected.

Shapes: L prompt length, E emb_dim.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from hyperprompt_jax.errors import UserError

METADATA_SUFFIX = ".json"
PROMPT_SUFFIX = ".npy"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_WEIGHTS_KEY = "prompt_embeddings"
# Our metadata inside an adapter directory we wrote (PEFT ignores unknown files).
PEFT_METADATA_FILE = "hyperprompt_jax.json"


def check_prompt(
    array: Any,
    name: str,
    *,
    length: int | None = None,
    emb_dim: int | None = None,
) -> np.ndarray:
    """Validates one prompt and returns it as float32 `[L, E]`.

    Args:
      array: the prompt.
      name: how error messages refer to it (a file name, a library entry).
      length: required prompt length L (None = any).
      emb_dim: required model width E (None = any).

    Raises:
      UserError: not a 2-D float array, an empty dimension, NaN / inf values, or a
        length / width different from the required one.
    """
    array = np.asarray(array)
    if array.ndim != 2:
        hint = ""
        if array.ndim == 3 and array.shape[0] == 1:
            hint = " (a leading axis of size 1: squeeze it)"
        elif array.ndim == 3:
            hint = (
                " (several prompts, e.g. a multi-task prompt or an SMoP checkpoint: export "
                "one with --prompt_index)"
            )
        raise UserError(
            f"Prompt {name} has shape {array.shape}; expected a 2-D [length, emb_dim] array{hint}."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"Prompt {name} holds {array.dtype}; expected a float array.")
    if 0 in array.shape:
        raise UserError(f"Prompt {name} is empty: shape {array.shape}.")
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        kinds = sorted({"NaN" if np.isnan(array[tuple(i)]) else "inf" for i in bad[:1000]})
        raise UserError(
            f"Prompt {name} contains {len(bad)} non-finite value(s) ({', '.join(kinds)}), "
            f"first at token {bad[0][0]}, dimension {bad[0][1]}: a diverged training run?"
        )
    if emb_dim is not None and array.shape[1] != emb_dim:
        raise UserError(
            f"Prompt {name} has width {array.shape[1]} but the model's emb_dim is {emb_dim}: "
            "it was trained on a different model size."
        )
    if length is not None and array.shape[0] != length:
        raise UserError(
            f"Prompt {name} has length {array.shape[0]} but the prompt length is {length} "
            "(PROMPT_LENGTH): set it to match, or use prompts of that length."
        )
    return array.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------
# PEFT prompt-tuning adapters
# ----------------------------------------------------------------------------------------


def is_peft_adapter(path: str) -> bool:
    """True if `path` is a directory holding a PEFT `adapter_config.json`."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, PEFT_CONFIG_FILE))


def read_peft_config(path: str) -> dict[str, Any]:
    """The adapter config of a PEFT prompt-tuning directory.

    Raises:
      UserError: unreadable JSON, or an adapter of another PEFT type.
    """
    config_path = os.path.join(path, PEFT_CONFIG_FILE)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"PEFT adapter config {config_path!r} is not readable JSON: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "PROMPT_TUNING":
        kind = config.get("peft_type") if isinstance(config, dict) else config
        raise UserError(
            f"{path!r} is a PEFT adapter of type {kind!r}; only PROMPT_TUNING adapters hold "
            "a soft prompt."
        )
    return config


def read_peft_prompt(path: str) -> np.ndarray:
    """The prompt `[num_virtual_tokens, token_dim]` of a PEFT prompt-tuning adapter.

    Raises:
      UserError: see `read_peft_config`; missing weights, or weights that do not match
        the config.
    """
    config = read_peft_config(path)
    weights = os.path.join(path, PEFT_WEIGHTS_FILE)
    if os.path.isfile(weights):
        import safetensors.numpy

        tensors = safetensors.numpy.load_file(weights)
    elif os.path.isfile(os.path.join(path, "adapter_model.bin")):
        import torch  # Old PEFT versions pickled the weights.

        state = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu")
        tensors = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise UserError(f"PEFT adapter {path!r} has no {PEFT_WEIGHTS_FILE}.")
    if PEFT_WEIGHTS_KEY not in tensors:
        raise UserError(
            f"PEFT adapter {path!r} has no {PEFT_WEIGHTS_KEY!r} tensor (found {sorted(tensors)})."
        )
    table = np.asarray(tensors[PEFT_WEIGHTS_KEY])
    tokens = config.get("num_virtual_tokens")
    if table.ndim != 2 or not isinstance(tokens, int) or table.shape[0] < tokens:
        raise UserError(
            f"PEFT adapter {path!r}: {PEFT_WEIGHTS_KEY} {table.shape} does not hold "
            f"num_virtual_tokens={tokens!r} rows."
        )
    # Encoder-decoder prompt tuning prepends rows [0, num_virtual_tokens) to the encoder.
    return check_prompt(table[:tokens], repr(path))


def write_peft_adapter(
    path: str,
    prompt: np.ndarray,
    *,
    base_model: str | None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Writes `prompt` `[L, E]` as a PEFT prompt-tuning adapter directory for T5.

    `adapter_config.json` (task type SEQ_2_SEQ_LM, `num_virtual_tokens` L, `token_dim`
    E, `num_transformer_submodules` 1, `base_model_name_or_path`), and
    `adapter_model.safetensors` with `prompt_embeddings` `[L, E]` float32; `metadata`
    (if given) goes to `hyperprompt_jax.json` beside them.

    Returns:
      `path`.
    """
    import safetensors.numpy

    prompt = check_prompt(prompt, "to export")
    os.makedirs(path, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model,
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        # One submodule: PEFT's seq2seq prompt tuning uses only the encoder's rows.
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",
        "inference_mode": True,
        "revision": None,
    }
    with open(os.path.join(path, PEFT_CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    safetensors.numpy.save_file(
        {PEFT_WEIGHTS_KEY: np.ascontiguousarray(prompt)}, os.path.join(path, PEFT_WEIGHTS_FILE)
    )
    if metadata is not None:
        with open(os.path.join(path, PEFT_METADATA_FILE), "w") as f:
            json.dump(jsonable(metadata), f, indent=2, sort_keys=True)
            f.write("\n")
    return path


# ----------------------------------------------------------------------------------------
# Any prompt file
# ----------------------------------------------------------------------------------------


def _read_npy(path: str) -> np.ndarray:
    if "://" in path:
        import tensorflow as tf  # Only needed for remote paths.

        if not tf.io.gfile.exists(path):
            raise UserError(f"Prompt file {path!r} does not exist.")
        with tf.io.gfile.GFile(path, "rb") as f:
            return np.load(f, allow_pickle=False)
    if not os.path.exists(path):
        raise UserError(f"Prompt file {path!r} does not exist.")
    if os.path.isdir(path):
        raise UserError(
            f"Prompt path {path!r} is a directory but not a PEFT prompt-tuning adapter "
            f"(no {PEFT_CONFIG_FILE}); expected a .npy file or an adapter directory."
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"Prompt file {path!r} is not a readable .npy array: {e}") from e


def load_prompt_file(
    path: str, *, length: int | None = None, emb_dim: int | None = None
) -> np.ndarray:
    """Reads and validates a prompt: a `.npy` file or a PEFT adapter directory.

    Returns:
      float32 `[L, E]` (see `check_prompt`).

    Raises:
      UserError: a missing or unreadable file, or an invalid prompt.
    """
    if is_peft_adapter(path):
        prompt = read_peft_prompt(path)
    else:
        prompt = _read_npy(path)
    return check_prompt(prompt, repr(path), length=length, emb_dim=emb_dim)


def read_metadata(prompt_path: str) -> dict[str, Any]:
    """A prompt's metadata ({} if there is none).

    For `<name>.npy`: the `<name>.json` beside it. For a PEFT adapter: our
    `hyperprompt_jax.json` if present, with the adapter config under `peft` and
    `format: 'peft'`.

    Raises:
      UserError: a metadata file that is not a JSON object.
    """
    if is_peft_adapter(prompt_path):
        metadata = _read_json_object(os.path.join(prompt_path, PEFT_METADATA_FILE))
        return {**metadata, "format": "peft", "peft": read_peft_config(prompt_path)}
    return _read_json_object(os.path.splitext(prompt_path)[0] + METADATA_SUFFIX)


def _read_json_object(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            metadata = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"Metadata file {path!r} is not valid JSON: {e}") from e
    if not isinstance(metadata, dict):
        raise UserError(f"Metadata file {path!r} must hold a JSON object, got {metadata!r}.")
    return metadata


def save_prompt(path: str, prompt: np.ndarray, metadata: Mapping[str, Any] | None = None) -> str:
    """Writes `prompt` `[L, E]` to `path` (`.npy` appended if missing) and, if given,
    `metadata` (plus `length`, `emb_dim`) to the `.json` beside it. Returns the path.

    Raises:
      UserError: an invalid prompt (see `check_prompt`).
    """
    prompt = check_prompt(prompt, "to save")
    if not path.endswith(PROMPT_SUFFIX):
        path += PROMPT_SUFFIX
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.save(path, prompt)
    if metadata is not None:
        meta = {"length": int(prompt.shape[0]), "emb_dim": int(prompt.shape[1]), **metadata}
        with open(os.path.splitext(path)[0] + METADATA_SUFFIX, "w") as f:
            json.dump(jsonable(meta), f, indent=2, sort_keys=True)
            f.write("\n")
    return path


def jsonable(value: Any) -> Any:
    """`value` with NumPy scalars as Python numbers and tuples as lists (for json)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
