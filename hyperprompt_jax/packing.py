"""Packed rows: several examples per row, each keeping its own task and its own prompt.

seqio's packing (t5x fine-tunes with it by default) concatenates examples into rows of
the feature length and marks them: segment ids `[B, L]` (1, 2, ... per example, 0 on
padding) and positions `[B, L]` (0, 1, ... within each example). With task
conditioning, `feature_converters.EncDecTaskIdFeatureConverter(pack=True)` adds:

* each position's task id, `encoder_task_ids [B, L_in]` and `decoder_task_ids
  [B, L_out]` (0 on padding), in place of the unpacked `task_ids [B]`;
* for a model with an input prompt of length P (prompt tuning, SPoT, SMoP), P *prompt
  slots* in front of every example's inputs (token `PROMPT_SLOT_ID`, counted in the
  inputs length: a packed row of `TASK_FEATURE_LENGTHS['inputs']` holds the examples
  and their prompts).

The network then keeps every example as it is unpacked:

* an input hook writes each example's own prompt (its task's, or the one SMoP routes
  it to from the mean embedding of that example alone) into the example's slots, so
  the prompt sits right before the example's tokens at the same relative distances as
  a prompt prepended to an unpacked row: T5's relative position biases are those of
  the unpacked example;
* HyperPrompt shows each query the key/value prefixes of its own position's task only
  (`layers.PrefixKV.bias`);
* attention never crosses segments (the segment-id masks of `network.Transformer`).

So a packed batch gives every example the loss and gradients it has unpacked, method by
method (`tests/test_packing.py`). Decoding never packs.

Shapes: B rows, L row length, E emb_dim, N = B * L (an upper bound on the examples of
a batch: every example has at least one position; row `b * L + id - 1` holds example
`id` of row `b`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

# The token of a prompt slot. Any id > 0 works (0 is padding: the encoder's mask is
# `tokens > 0`); the input hook replaces the slot's embedding. 2 is the unknown-token id
# of T5's SentencePiece vocabulary and of seqio's ByteVocabulary.
PROMPT_SLOT_ID = 2

# Model features of packed rows (next to seqio's segment ids and positions).
ENCODER_TASK_IDS = "encoder_task_ids"
DECODER_TASK_IDS = "decoder_task_ids"
# Every task-id model feature: `task_ids [batch]` unpacked, one per position packed.
TASK_ID_FEATURES = ("task_ids", ENCODER_TASK_IDS, DECODER_TASK_IDS)


def input_prompt_length(module: object) -> int:
    """Prompt positions a network's input hook puts in front of every example (0: no
    hook): the prompt slots a packed example needs."""
    return int(getattr(getattr(module, "prompt", None), "length", 0) or 0)


class Segments(NamedTuple):
    """Where the examples of packed rows lie.

    Attributes:
      ids: `[B, L]` int, 1, 2, ... per example of a row, 0 on padding.
      positions: `[B, L]` int, the position within the example.
    """

    ids: Array
    positions: Array

    def prompt_slots(self, prompt_length: int) -> Array:
        """`[B, L]` bool: the first `prompt_length` positions of every example."""
        return (self.ids > 0) & (self.positions < prompt_length)

    def example_mean(self, values_BLE: Array, mask_BL: Array) -> tuple[Array, Array]:
        """Per-example mean of `values` over the positions where `mask` holds.

        Each row is reduced on its own (`segment_sum` under `vmap`), so the work and
        its result stay split along the batch like the rows (no array of the whole
        batch's examples on every device).

        Returns:
          means `[N, E]` float32, row `b * L + id - 1` for example `id` of row `b` (0
          for an example with no such position), and the number of positions of each
          example `[N]` (0 for rows that hold no example: use `count > 0` as the
          example mask).
        """
        batch, length = self.ids.shape

        def per_row(values_LE, weights_L, ids_L):
            index = jnp.where(ids_L > 0, ids_L - 1, length)  # padding: dropped
            total = jax.ops.segment_sum(values_LE * weights_L[:, None], index, length, mode="drop")
            count = jax.ops.segment_sum(weights_L, index, length, mode="drop")
            size = jax.ops.segment_sum(jnp.ones_like(weights_L), index, length, mode="drop")
            return total / jnp.maximum(count, 1.0)[:, None], size

        means, sizes = jax.vmap(per_row)(
            values_BLE.astype(jnp.float32), mask_BL.astype(jnp.float32), self.ids
        )
        return means.reshape(batch * length, -1), sizes.reshape(batch * length)

    def per_position(self, values_N: Array) -> Array:
        """`[N, ...]` per-example values (rows as `example_mean`'s) -> `[B, L, ...]`,
        each position its example's (padding: its row's first example's)."""
        batch, length = self.ids.shape
        rows = values_N.reshape((batch, length) + values_N.shape[1:])
        index = jnp.clip(self.ids - 1, 0, length - 1)
        return jax.vmap(lambda row, i: jnp.take(row, i, axis=0))(rows, index)
