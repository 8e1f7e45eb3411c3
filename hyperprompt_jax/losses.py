"""Training losses with t5x's semantics: cross-entropy with z-loss and label smoothing.

* `cross_entropy_with_logits`: per-token soft-target cross-entropy plus the z-loss
  `z_loss * log(Z)^2` (Z = softmax normaliser), with a hand-written, numerically stable
  VJP as in t5x.
* `compute_weighted_cross_entropy`: the sum over tokens of the label-smoothed loss
  (minus the smoothed distribution's entropy, so a perfect model scores 0), optionally
  weighted and divided by a loss normalising factor.
* `LossNormalizingFactor` and `get_loss_normalizing_factor_and_weights`: how the summed
  loss is normalised (t5x's `SpecialLossNormalizingFactor`, plus NUMBER_OF_EXAMPLES).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def _cross_entropy_core(
    logits: jax.Array, targets: jax.Array, z_loss: jax.Array
) -> tuple[jax.Array, jax.Array]:
    log_z = jax.nn.logsumexp(logits, axis=-1)
    loss = -jnp.sum(targets * (logits - log_z[..., None]), axis=-1)
    total_z_loss = z_loss * jnp.square(log_z)
    return loss + total_z_loss, total_z_loss


def _cross_entropy_fwd(logits: jax.Array, targets: jax.Array, z_loss: jax.Array):
    # Shift by the max so exp never overflows; keep the pieces the backward pass needs.
    max_logit = jnp.max(logits, axis=-1, keepdims=True)
    exp_shifted = jnp.exp(logits - max_logit)
    sum_exp = jnp.sum(exp_shifted, axis=-1, keepdims=True)
    log_softmax = logits - max_logit - jnp.log(sum_exp)
    log_z = jnp.squeeze(jnp.log(sum_exp) + max_logit, axis=-1)
    total_z_loss = z_loss * jnp.square(log_z)
    loss = -jnp.sum(targets * log_softmax, axis=-1) + total_z_loss
    residuals = (targets, z_loss, exp_shifted / sum_exp, log_softmax, log_z)
    return (loss, total_z_loss), residuals


def _cross_entropy_bwd(residuals, cotangents):
    targets, z_loss, softmax, log_softmax, log_z = residuals
    # The second output (z-loss alone) is for logging only; like t5x, no gradient
    # flows through it.
    g = cotangents[0][..., None]
    # d/dlogits [-sum t log_softmax + z log(Z)^2] = softmax * sum(t) - t + 2 z log(Z) softmax.
    # With normalised targets (sum t = 1), as t5x assumes, this is:
    d_logits = (1.0 + 2.0 * z_loss * log_z)[..., None] * softmax - targets
    return (
        (g * d_logits).astype(softmax.dtype),
        (-g * log_softmax).astype(targets.dtype),
        jnp.zeros_like(z_loss),  # the z-loss coefficient is a hyperparameter
    )


_cross_entropy_core.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def cross_entropy_with_logits(
    logits: jax.Array, targets: jax.Array, z_loss: float | jax.Array = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Soft-target cross-entropy with z-loss and t5x's stable custom gradient.

    Computes `-sum(targets * log_softmax(logits), -1) + z_loss * log(Z)^2` where
    `log(Z) = logsumexp(logits, -1)`. The z-loss keeps the normaliser near 1 (logits
    near normalised log-probabilities), which avoids bfloat16 round-off. The custom
    gradient assumes each row of `targets` sums to 1 (one-hot or label-smoothed).

    Args:
      logits: `[..., vocab]` float array (e.g. `[batch, length, vocab]`).
      targets: `[..., vocab]` soft targets (each row sums to 1).
      z_loss: coefficient of the z-loss term.

    Returns:
      `(loss, z_loss)`, both `[...]`; `loss` already includes the z-loss term.

    Raises:
      ValueError: if the shapes differ.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"cross_entropy_with_logits: logits {tuple(logits.shape)} and soft targets "
            f"{tuple(targets.shape)} must have the same shape [..., vocab]."
        )
    z_loss = jnp.asarray(z_loss, dtype=logits.dtype)
    return _cross_entropy_core(logits, targets.astype(logits.dtype), z_loss)


def compute_weighted_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    loss_normalizing_factor: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Summed, optionally weighted and normalised, label-smoothed cross-entropy (t5x).

    The smoothed target puts `confidence = 1 - label_smoothing` on the true token and
    `label_smoothing / (vocab - 1)` on every other one. The entropy of that distribution
    (t5x's "normalizing constant") is subtracted from each token's loss, so the minimum
    is 0 whatever the smoothing.

    Args:
      logits: `[batch, length, vocab]` float array.
      targets: `[batch, length]` int target tokens.
      weights: optional `[batch, length]` per-token weights (e.g. 0 on padding).
      label_smoothing: in `[0, 1)`.
      z_loss: z-loss coefficient (t5x's prompt-tuning recipe uses 1e-4).
      loss_normalizing_factor: optional constant the loss and z-loss are divided by.

    Returns:
      `(total_loss, total_z_loss, weight_sum)` scalars; `weight_sum` is `sum(weights)`,
      or the number of target tokens when `weights` is None.

    Raises:
      ValueError: on inconsistent shapes or a label smoothing outside `[0, 1)`.
    """
    if logits.ndim != targets.ndim + 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"Incorrect shapes: logits {tuple(logits.shape)} must be targets "
            f"{tuple(targets.shape)} plus a vocabulary axis."
        )
    if weights is not None and jnp.shape(weights) != targets.shape:
        raise ValueError(
            f"weights shape {tuple(jnp.shape(weights))} must equal targets shape "
            f"{tuple(targets.shape)}."
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1); got {label_smoothing}.")
    vocab_size = logits.shape[-1]
    if vocab_size < 2:
        raise ValueError(f"Cross-entropy needs a vocabulary of at least 2; got {vocab_size}.")

    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    # Entropy of the smoothed target (the 1e-20 makes 0 * log 0 = 0 when unsmoothed).
    normalizing_constant = -(
        confidence * np.log(confidence)
        + (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20)
    )
    soft_targets = jnp.where(
        jax.nn.one_hot(targets, vocab_size, dtype=jnp.bool_), confidence, low_confidence
    ).astype(logits.dtype)
    total_loss, total_z_loss = cross_entropy_with_logits(logits, soft_targets, z_loss)
    total_loss = total_loss - normalizing_constant

    weight_sum = np.prod(targets.shape)
    if weights is not None:
        total_loss = total_loss * weights
        total_z_loss = total_z_loss * weights
        weight_sum = jnp.sum(weights)

    # Unnormalised by default, as t5x: Adafactor is nearly scale invariant, and every
    # token then counts the same regardless of the length of its sequence.
    if loss_normalizing_factor is not None:
        total_loss = total_loss / loss_normalizing_factor
        total_z_loss = total_z_loss / loss_normalizing_factor
    return jnp.sum(total_loss), jnp.sum(total_z_loss), weight_sum


def symmetric_kl(
    logits_a: jax.Array,
    logits_b: jax.Array,
    weights: jax.Array | None = None,
    loss_normalizing_factor: float | jax.Array | None = None,
) -> jax.Array:
    """Summed symmetric KL divergence between two passes' output distributions.

    Per target token, `0.5 * (KL(sg(p_b) || p_a) + KL(sg(p_a) || p_b))` with
    `p = softmax(logits)` and `sg` a stop-gradient: each pass is pulled towards the
    other, held fixed (the SMoP authors' `symmetric_KL_loss`, R-Drop's consistency).
    Token values are weighted, summed and divided by `loss_normalizing_factor` like
    `compute_weighted_cross_entropy`, so a weight on this term is relative to the
    cross-entropy of one token.

    Args:
      logits_a, logits_b: `[batch, length, vocab]` logits of two forward passes.
      weights: optional `[batch, length]` per-token weights (e.g. 0 on padding).
      loss_normalizing_factor: optional constant the sum is divided by.

    Returns:
      A float32 scalar, >= 0 (0 when the passes agree).
    """
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"Logit shapes differ: {logits_a.shape} vs {logits_b.shape}.")
    log_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    log_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    fixed_a, fixed_b = jax.lax.stop_gradient(log_a), jax.lax.stop_gradient(log_b)
    kl_b_a = jnp.sum(jnp.exp(fixed_b) * (fixed_b - log_a), axis=-1)  # KL(p_b || p_a)
    kl_a_b = jnp.sum(jnp.exp(fixed_a) * (fixed_a - log_b), axis=-1)  # KL(p_a || p_b)
    per_token = 0.5 * (kl_b_a + kl_a_b)
    if weights is not None:
        per_token = per_token * weights
    if loss_normalizing_factor is not None:
        per_token = per_token / loss_normalizing_factor
    return jnp.sum(per_token)


@enum.unique
class LossNormalizingFactor(enum.Enum):
    """Loss normalisations computed from the batch (t5x's `SpecialLossNormalizingFactor`).

    Attributes:
      NUM_REAL_TARGET_TOKENS: divide by the number of real target tokens: the sum of
        `decoder_loss_weights`, or the count of non-zero `decoder_target_tokens`.
      NUM_TOTAL_TARGET_TOKENS: divide by `batch * target_length` (padding included).
      AVERAGE_PER_SEQUENCE: average each sequence's loss over its real tokens, then
        sum over sequences and divide by the number of sequences with a real token
        (weights become `w / sum_of_w_in_its_sequence`). Every example then counts the
        same whatever its length, which helps multi-task fine-tuning.
      NUMBER_OF_EXAMPLES: divide the summed token loss by the number of examples (rows,
        or packed segments when `decoder_segment_ids` is given): a per-example sum,
        averaged over examples. Not in t5x; weights are as for NUM_REAL_TARGET_TOKENS.
    """

    NUM_REAL_TARGET_TOKENS = 1
    NUM_TOTAL_TARGET_TOKENS = 2
    AVERAGE_PER_SEQUENCE = 3
    NUMBER_OF_EXAMPLES = 4


# t5x's name, so gin files written for t5x keep working.
SpecialLossNormalizingFactor = LossNormalizingFactor


def convert_loss_normalizing_factor(name: str) -> LossNormalizingFactor:
    """Parses a (case-insensitive) `LossNormalizingFactor` name, e.g. from gin.

    Raises:
      ValueError: naming the accepted values if `name` is not one of them.
    """
    try:
        return LossNormalizingFactor[name.upper()]
    except KeyError:
        valid = ", ".join(member.name for member in LossNormalizingFactor)
        raise ValueError(
            f"Unknown loss_normalizing_factor {name!r}; expected a number, None or one of: {valid}."
        ) from None


def _per_segment_sums(values: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """`[batch, length]` -> each position's total over its packed segment (0 on padding).

    Segment ids are the packer's `1..num_segments` (0 = padding), so there are at most
    `length` of them per row.
    """
    num_segments = values.shape[-1] + 1

    def one_row(v: jax.Array, s: jax.Array) -> jax.Array:
        sums = jax.ops.segment_sum(v, s, num_segments=num_segments)
        return jnp.where(s > 0, sums[s], 0.0)

    return jax.vmap(one_row)(values, segment_ids)


def _number_of_segments(segment_ids: jax.Array) -> jax.Array:
    """Counts packed segments: non-padding positions whose id differs from the previous."""
    previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
    return jnp.sum((segment_ids != 0) & (segment_ids != previous))


def get_loss_normalizing_factor_and_weights(
    loss_normalizing_factor: float | int | str | LossNormalizingFactor | None,
    batch: Mapping[str, jax.Array],
) -> tuple[float | jax.Array | None, jax.Array | None]:
    """Turns a loss normalising option into `(factor, per-token loss weights)` (t5x).

    A number or None is returned unchanged with `batch.get("decoder_loss_weights")`. A
    `LossNormalizingFactor` (or its name) is computed from the batch; the weights then
    default to `decoder_target_tokens > 0` when `decoder_loss_weights` is absent.

    Args:
      loss_normalizing_factor: None, a constant, a `LossNormalizingFactor` or its name.
      batch: has `decoder_target_tokens [batch, length]`, optionally
        `decoder_loss_weights [batch, length]` and `decoder_segment_ids [batch, length]`
        (packed examples).

    Returns:
      `(factor, weights)`: the scalar to divide the summed loss by and the
      `[batch, length]` float32 weights (or None when given none and none are needed).

    Raises:
      ValueError: for an unknown factor name or a batch without `decoder_target_tokens`.
    """
    loss_weights = batch.get("decoder_loss_weights", None)
    if loss_normalizing_factor is None or not isinstance(
        loss_normalizing_factor, (str, LossNormalizingFactor)
    ):
        return loss_normalizing_factor, loss_weights
    if isinstance(loss_normalizing_factor, str):
        loss_normalizing_factor = convert_loss_normalizing_factor(loss_normalizing_factor)
    if "decoder_target_tokens" not in batch:
        raise ValueError(
            f"loss_normalizing_factor {loss_normalizing_factor.name} needs "
            f"'decoder_target_tokens' in the batch; got keys {sorted(batch)}."
        )
    targets = batch["decoder_target_tokens"]
    # Without explicit weights, 0 is padding and every other target token counts.
    if loss_weights is None:
        loss_weights = jnp.asarray(targets > 0, jnp.float32)
    else:
        loss_weights = jnp.asarray(loss_weights, jnp.float32)
    segment_ids = batch.get("decoder_segment_ids", None)

    if loss_normalizing_factor is LossNormalizingFactor.NUM_REAL_TARGET_TOKENS:
        factor = jnp.sum(loss_weights)
    elif loss_normalizing_factor is LossNormalizingFactor.NUM_TOTAL_TARGET_TOKENS:
        factor = np.prod(targets.shape)
    elif loss_normalizing_factor is LossNormalizingFactor.AVERAGE_PER_SEQUENCE:
        if segment_ids is not None:
            per_sequence = _per_segment_sums(loss_weights, segment_ids)
        else:
            per_sequence = jnp.sum(loss_weights, axis=-1, keepdims=True)
        # Sequences without a real token (0 / 0) get weight 0, as in t5x.
        loss_weights = jnp.nan_to_num(loss_weights / per_sequence, nan=0.0, posinf=0.0, neginf=0.0)
        factor = jnp.sum(loss_weights)
    elif loss_normalizing_factor is LossNormalizingFactor.NUMBER_OF_EXAMPLES:
        if segment_ids is not None:
            factor = _number_of_segments(segment_ids).astype(jnp.float32)
        else:
            factor = np.float32(targets.shape[0])
    else:  # pragma: no cover - the enum is exhaustive above
        raise ValueError(f"Unsupported loss_normalizing_factor {loss_normalizing_factor}.")
    return factor, loss_weights
