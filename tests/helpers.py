"""Small helpers shared by test files (not fixtures: plain functions to import)."""

from __future__ import annotations

import json
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def decode_incrementally(
    module: Any,
    params: Any,
    enc: np.ndarray,
    dec_in: np.ndarray,
    task_ids: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Any]:
    """Runs `Transformer.decode` one position at a time through the autoregressive cache.

    Args:
      module: a `network.Transformer`.
      params: its parameters.
      enc: encoder tokens `[batch, enc_length]`.
      dec_in: decoder input tokens `[batch, dec_length]` (teacher forced).
      task_ids: optional `[batch]` task ids.

    Returns:
      (logits `[batch, dec_length, vocab]` float32 NumPy, the final cache).
    """
    max_len = dec_in.shape[1]

    @jax.jit
    def prepare(params):
        encoded = module.apply(
            {"params": params}, enc, enable_dropout=False, task_ids=task_ids, method=module.encode
        )
        _, variables = module.apply(
            {"params": params},
            encoded,
            enc,
            jnp.ones_like(dec_in),
            jnp.ones_like(dec_in),
            enable_dropout=False,
            decode=True,
            task_ids=task_ids,
            mutable=["cache"],
            method=module.decode,
        )
        return encoded, variables["cache"]

    @jax.jit
    def step(encoded, cache, token):
        logits, new_vars = module.apply(
            {"params": params, "cache": cache},
            encoded,
            enc,
            token,
            token,
            enable_dropout=False,
            decode=True,
            max_decode_length=max_len,
            task_ids=task_ids,
            mutable=["cache"],
            method=module.decode,
        )
        return logits[:, 0], new_vars["cache"]

    encoded, cache = prepare(params)
    steps = []
    for t in range(max_len):
        logits, cache = step(encoded, cache, jnp.asarray(dec_in[:, t : t + 1], jnp.int32))
        steps.append(np.asarray(logits))
    return np.stack(steps, axis=1), cache


def write_prompt_library(directory, prompts, metadata=None) -> str:
    """A SPoT prompt library: `<name>.npy` per prompt, `<name>.json` for given metadata."""
    os.makedirs(directory, exist_ok=True)
    for name, p in prompts.items():
        np.save(os.path.join(directory, f"{name}.npy"), p)
        if metadata and name in metadata:
            with open(os.path.join(directory, f"{name}.json"), "w") as f:
                json.dump(metadata[name], f)
    return str(directory)


def tiny_t5_config(**overrides: Any):
    """A tiny T5.1.1-shaped `T5Config` (2 + 2 layers, width 16, GeGLU, no dropout) for
    module tests; `overrides` change single fields."""
    from hyperprompt_jax.config import T5Config

    fields = dict(
        vocab_size=48,
        emb_dim=16,
        num_heads=2,
        head_dim=8,
        mlp_dim=24,
        num_encoder_layers=2,
        num_decoder_layers=2,
        mlp_activations=("gelu", "linear"),
        dropout_rate=0.0,
    )
    fields.update(overrides)
    return T5Config(**fields)
