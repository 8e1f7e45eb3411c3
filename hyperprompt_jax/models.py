"""The model wrapper: loss, prediction and scoring around `network.Transformer` (t5x).

`EncoderDecoderModel` has the semantics of t5x's `t5x/models.py` class of the same
name, so trainers, evaluators and gin files written for t5x read the same:

* `loss_fn`: cross-entropy with z-loss and label smoothing (`losses.py`), per-token
  `decoder_loss_weights` and a loss normalizing factor; returns the loss and a dict of
  metrics (plain scalars; the launcher turns them into logs).
* `predict_batch` / `predict_batch_with_aux`: encode once, build an empty decoder cache,
  repeat the encoder outputs `num_decodes` times (batch-major, `[e0, e0, e1, e1, ...]`),
  and run `decode_fn` (beam search by default, or `decoding.temperature_sample`) with a
  one-token `tokens_to_logits` step on `Transformer.decode(..., decode=True)`.
* `score_batch`: the log-likelihood of `decoder_target_tokens` under the model.

Every call forwards `task_ids` (`[batch]`), or for packed rows `encoder_task_ids` /
`decoder_task_ids` (one per position, `packing`), so task-conditioned methods
(HyperPrompt, SMoP, multi-task prompts) work unchanged, and the plain network simply
ignores them. With a prompt hook the encoded sequence is longer than the tokens; the
network builds the masks, so nothing here depends on the prompt length.

Randomness: dropout and any training-only noise of a method (e.g. SMoP's router noise)
draw from the `dropout` RNG stream, which is present exactly when `loss_fn` gets a
`dropout_rng`; with `dropout_rng=None` the model is deterministic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import core as flax_core
from flax import linen as nn

from hyperprompt_jax import decoding, losses, packing
from hyperprompt_jax.errors import UserError

Array = jax.Array
PyTree = Any
Batch = Mapping[str, Array]
DecodeFn = Callable[..., tuple[Array, Array]]

_OPTIONAL_INPUTS = (
    "encoder_segment_ids",
    "decoder_segment_ids",
    "encoder_positions",
    "decoder_positions",
)


def _require(batch: Batch, keys: tuple[str, ...], method: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise UserError(
            f"EncoderDecoderModel.{method}: the batch lacks {missing}; it has {sorted(batch)}. "
            "Use seqio.EncDecFeatureConverter (t5x's feature names)."
        )


def compute_base_metrics(
    logits: Array,
    targets: Array,
    weights: Array | None,
    loss: Array,
    z_loss: Array,
    weight_sum: Array,
    segment_ids: Array | None = None,
) -> dict[str, Array]:
    """t5x's per-batch training metrics, as plain scalars.

    Args:
      logits: `[batch, length, vocab]` float32.
      targets: `[batch, length]` int target tokens (0 = padding).
      weights: `[batch, length]` loss weights, or None (every token counts).
      loss: the (normalised) total loss, z-loss included.
      z_loss: the z-loss part of `loss`.
      weight_sum: sum of `weights`.
      segment_ids: `[batch, length]` decoder segment ids of packed rows (examples are
        numbered 1, 2, ... in each row), or None (one example per row).

    Returns:
      `loss`, `z_loss`, `cross_ent_loss` (= loss - z_loss), `accuracy` (weighted
      fraction of argmax hits), `weight_sum`, `num_examples` (rows with a real target
      token; packed rows: their examples), `num_tokens` (non-padding targets),
      `loss_per_nonpadding_target_token` and `loss_per_all_target_tokens`.
    """
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    nonpadding = (targets > 0).astype(jnp.float32)
    num_tokens = jnp.sum(nonpadding)
    weight_total = jnp.sum(weights)
    if segment_ids is None:
        num_examples = jnp.sum(jnp.any(targets > 0, axis=-1).astype(jnp.float32))
    else:
        num_examples = jnp.sum(jnp.max(segment_ids, axis=-1).astype(jnp.float32))
    return {
        "loss": loss,
        "z_loss": z_loss,
        "cross_ent_loss": loss - z_loss,
        "accuracy": jnp.sum(correct * weights) / jnp.maximum(weight_total, 1e-8),
        "weight_sum": jnp.asarray(weight_sum, jnp.float32),
        "num_examples": num_examples,
        "num_tokens": num_tokens,
        "loss_per_nonpadding_target_token": loss / jnp.maximum(num_tokens, 1.0),
        "loss_per_all_target_tokens": loss / targets.size,
    }


class EncoderDecoderModel:
    """Loss, decoding and scoring for `network.Transformer` (t5x's EncoderDecoderModel).

    Attributes:
      module: the Flax network (`network.Transformer`, with or without method hooks).
      input_vocabulary / output_vocabulary: seqio vocabularies; decoding stops at
        `output_vocabulary.eos_id`.
      decode_fn: `decoding.beam_search` (default) or `decoding.temperature_sample`, or
        any function with their signature; bind options (temperature, topk, alpha)
        with `functools.partial` or gin, or pass them per call in `decoder_params`.
    """

    def __init__(
        self,
        module: nn.Module,
        input_vocabulary: Any,
        output_vocabulary: Any,
        decode_fn: DecodeFn = decoding.beam_search,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        loss_normalizing_factor: float | int | str | losses.LossNormalizingFactor | None = None,
        feature_converter_cls: Callable[..., Any] | None = None,
        consistency_weight: float = 0.0,
    ):
        """Builds the wrapper.

        Args:
          module: the network.
          input_vocabulary: vocabulary of the inputs (kept for the data pipeline).
          output_vocabulary: vocabulary of the targets (its `eos_id` ends decoding).
          decode_fn: decoding function (see class docstring).
          label_smoothing: in [0, 1).
          z_loss: coefficient of t5x's z-loss (1e-4 in the prompt-tuning recipe).
          loss_normalizing_factor: None, a number, a `losses.LossNormalizingFactor` or
            its name (e.g. 'NUM_REAL_TARGET_TOKENS').
          feature_converter_cls: override of `FEATURE_CONVERTER_CLS`.
          consistency_weight: if > 0, training runs two forward passes with different
            dropout / routing randomness and minimises both losses plus this weight
            times `losses.symmetric_kl` between them (the SMoP authors' consistency
            loss for random routing, weight 0.1; `gin/methods/smop_random.gin`).

        Raises:
          ValueError: for a bad label smoothing, z-loss, consistency weight or
            normalizing factor name.
        """
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}.")
        if float(z_loss) < 0.0:
            raise UserError(f"z_loss must be >= 0, got {z_loss!r}.")
        if float(consistency_weight) < 0.0:
            raise UserError(f"consistency_weight must be >= 0, got {consistency_weight!r}.")
        if isinstance(loss_normalizing_factor, str):
            loss_normalizing_factor = losses.convert_loss_normalizing_factor(
                loss_normalizing_factor
            )
        if not callable(decode_fn):
            raise UserError(f"decode_fn must be callable, got {decode_fn!r}.")
        self.module = module
        self.input_vocabulary = input_vocabulary
        self.output_vocabulary = output_vocabulary
        self.decode_fn = decode_fn
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.loss_normalizing_factor = loss_normalizing_factor
        self._feature_converter_cls = feature_converter_cls
        self.consistency_weight = float(consistency_weight)

    @property
    def input_prompt_length(self) -> int:
        """Prompt positions the input hook puts in front of every example (0: none):
        the prompt slots packed rows reserve (`packing`)."""
        return packing.input_prompt_length(self.module)

    @property
    def FEATURE_CONVERTER_CLS(self) -> Callable[..., Any]:  # noqa: N802 (t5x's name)
        """`seqio.EncDecFeatureConverter` unless overridden (seqio imported lazily)."""
        if self._feature_converter_cls is not None:
            return self._feature_converter_cls
        import seqio

        return seqio.EncDecFeatureConverter

    # ----------------------------------------------------------------------------------
    # Initialisation and the forward pass
    # ----------------------------------------------------------------------------------

    def get_initial_variables(
        self,
        rng: Array,
        input_shapes: Mapping[str, tuple[int, ...]],
        input_types: Mapping[str, Any] | None = None,
    ) -> dict[str, PyTree]:
        """Initial `{'params': ..., 'params_axes': ...}` from input shapes (t5x).

        Args:
          rng: PRNG key of the parameter initialisers.
          input_shapes: `encoder_input_tokens` and `decoder_input_tokens` shapes
            `[batch, length]`; optionally `task_ids` `[batch]`, segment ids, positions.
          input_types: optional dtypes per input (default int32).

        Raises:
          ValueError: if a required shape is missing.
        """
        _require(
            input_shapes, ("encoder_input_tokens", "decoder_input_tokens"), "get_initial_variables"
        )
        input_types = {} if input_types is None else input_types

        def ones(name: str) -> Array | None:
            if name not in input_shapes:
                return None
            return jnp.ones(input_shapes[name], input_types.get(name, jnp.int32))

        decoder_tokens = ones("decoder_input_tokens")
        task_ids = {
            name: jnp.zeros(input_shapes[name], input_types.get(name, jnp.int32))
            for name in packing.TASK_ID_FEATURES
            if name in input_shapes
        }
        encoder_tokens = ones("encoder_input_tokens")
        positions = {name: ones(name) for name in _OPTIONAL_INPUTS}
        if positions["encoder_positions"] is not None:
            # Packed rows: position 0.. so that prompt slots exist where a prompt goes.
            positions["encoder_positions"] = jnp.zeros_like(positions["encoder_positions"])
            encoder_tokens = jnp.full_like(encoder_tokens, packing.PROMPT_SLOT_ID)
        variables = self.module.init(
            {"params": rng},
            encoder_tokens,
            decoder_tokens,
            decoder_tokens,
            **positions,
            **task_ids,
            decode=False,
            enable_dropout=False,
        )
        return flax_core.unfreeze(variables)

    def _compute_logits(
        self,
        params: PyTree,
        batch: Batch,
        dropout_rng: Array | None = None,
        mutable: Any = False,
        other_variables: Mapping[str, PyTree] | None = None,
    ) -> Array | tuple[Array, PyTree]:
        """Teacher-forced forward pass: `[batch, length, vocab]` float32 logits."""
        _require(
            batch,
            ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens"),
            "_compute_logits",
        )
        rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
        return self.module.apply(
            {"params": params, **(other_variables or {})},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            **{name: batch.get(name) for name in _OPTIONAL_INPUTS},
            **{name: batch[name] for name in packing.TASK_ID_FEATURES if name in batch},
            decode=False,
            enable_dropout=rngs is not None,
            rngs=rngs,
            mutable=mutable,
        )

    # ----------------------------------------------------------------------------------
    # Training and evaluation losses
    # ----------------------------------------------------------------------------------

    def loss_fn(
        self,
        params: PyTree,
        batch: Batch,
        dropout_rng: Array | None,
        *,
        return_intermediates: bool = False,
    ) -> tuple[Array, dict[str, Array]] | tuple[Array, tuple[dict[str, Array], PyTree]]:
        """t5x's training loss and metrics.

        Usable with `jax.value_and_grad(..., has_aux=True)` either way.

        Args:
          params: the `params` collection.
          batch: `encoder_input_tokens`, `decoder_input_tokens`, `decoder_target_tokens`
            `[batch, length]`; optionally `decoder_loss_weights` (default:
            `decoder_target_tokens > 0`), segment ids, positions, `task_ids [batch]`.
          dropout_rng: key of the `dropout` stream; None turns dropout off.
          return_intermediates: also return the Flax `intermediates` collection (values
            the modules `sow`, e.g. SMoP router probabilities and choices).

        Values modules sow into the `aux_losses` collection (per-token-mean scale, e.g.
        SMoP's optional load-balancing loss) are added to the loss, multiplied by the
        number of real target tokens over the loss normalising factor, and reported
        (unscaled) as `aux_loss`.

        Returns:
          `(loss, metrics)`, or `(loss, (metrics, intermediates))` with
          `return_intermediates=True`. `metrics` is `compute_base_metrics`'s dict (of
          the first pass; with `consistency_weight` > 0 and dropout on, the returned
          loss is both passes' plus the weighted consistency term, whose unweighted
          value is reported as `consistency_loss`).
        """
        # Modules may sow auxiliary training losses (e.g. SMoP's optional load balancing)
        # into `aux_losses`; they are added below.
        mutable = ["aux_losses", *(["intermediates"] if return_intermediates else [])]
        logits, state = self._compute_logits(params, batch, dropout_rng, mutable=mutable)
        intermediates = None
        if return_intermediates:
            intermediates = flax_core.unfreeze(state.get("intermediates", {}))
        aux_losses = jax.tree.leaves(flax_core.unfreeze(state.get("aux_losses", {})))
        factor, weights = losses.get_loss_normalizing_factor_and_weights(
            self.loss_normalizing_factor, batch
        )
        targets = batch["decoder_target_tokens"]
        if weights is None:
            # seqio's feature converter always provides `decoder_loss_weights`; without
            # them, count the non-padding targets rather than t5x's "every position".
            weights = jnp.asarray(targets > 0, jnp.float32)
        loss, z_loss, weight_sum = losses.compute_weighted_cross_entropy(
            logits,
            targets=targets,
            weights=weights,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            loss_normalizing_factor=factor,
        )
        metrics = compute_base_metrics(
            logits, targets, weights, loss, z_loss, weight_sum, batch.get("decoder_segment_ids")
        )
        if aux_losses:
            # Auxiliary losses are defined against a per-token mean cross-entropy (as in
            # the codebases they come from); scale them to this loss's normalisation.
            aux = sum(jnp.sum(a) for a in aux_losses)
            scale = weight_sum if factor is None else weight_sum / factor
            loss = loss + aux * scale
            metrics = {**metrics, "aux_loss": aux}
        if self.consistency_weight > 0.0 and dropout_rng is not None:
            loss, metrics = self._add_consistency(
                params, batch, dropout_rng, logits, loss, weights, factor, metrics
            )
        if return_intermediates:
            return loss, (metrics, intermediates)
        return loss, metrics

    def _add_consistency(self, params, batch, dropout_rng, logits, loss, weights, factor, metrics):
        """A second pass with fresh randomness: `loss + loss_2 + w * symmetric KL`.

        (The authors' code falls back to the first loss alone when both passes' losses
        are exactly equal; we always use both.)
        """
        second_rng = jax.random.fold_in(dropout_rng, 1)
        logits_2 = self._compute_logits(params, batch, second_rng)
        loss_2, _, _ = losses.compute_weighted_cross_entropy(
            logits_2,
            targets=batch["decoder_target_tokens"],
            weights=weights,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            loss_normalizing_factor=factor,
        )
        consistency = losses.symmetric_kl(logits, logits_2, weights, factor)
        total = loss + loss_2 + self.consistency_weight * consistency
        return total, {**metrics, "consistency_loss": consistency}

    def eval_fn(self, params: PyTree, batch: Batch) -> tuple[Array, dict[str, Array]]:
        """`loss_fn` without dropout."""
        return self.loss_fn(params, batch, dropout_rng=None)

    def score_batch(
        self, params: PyTree, batch: Batch, return_intermediates: bool = False
    ) -> Array | tuple[Array, PyTree]:
        """Log-likelihood of each target sequence (t5x).

        `sum_t w_t log p(target_t | ...)` with `w = decoder_loss_weights` (or
        `decoder_target_tokens > 0` when absent); no z-loss or label smoothing, since
        those are training devices, not part of the model's probability.

        Returns:
          `[batch]` float32 scores (and the `intermediates` collection if asked).
        """
        _require(batch, ("decoder_target_tokens",), "score_batch")
        targets = batch["decoder_target_tokens"]
        weights = batch.get("decoder_loss_weights")
        if weights is None:
            weights = targets > 0
        if return_intermediates:
            logits, state = self._compute_logits(params, batch, mutable=["intermediates"])
            intermediates = flax_core.unfreeze(state.get("intermediates", {}))
        else:
            logits = self._compute_logits(params, batch)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        token_scores = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        scores = jnp.sum(token_scores * jnp.asarray(weights, jnp.float32), axis=-1)
        if return_intermediates:
            return scores, intermediates
        return scores

    # ----------------------------------------------------------------------------------
    # Decoding
    # ----------------------------------------------------------------------------------

    def _tokens_to_logits(
        self,
        state: decoding.DecodingState,
        params: PyTree,
        encoded: Array,
        encoder_tokens: Array,
        task_ids: Array | None,
        max_decode_length: int,
    ) -> tuple[Array, PyTree]:
        """One decoding step: `[rows, 1]` tokens -> `[rows, vocab]` logits, new cache."""
        logits, new_vars = self.module.apply(
            {"params": params, "cache": state.cache},
            encoded,
            encoder_tokens,  # only for the encoder padding mask
            state.cur_token,
            state.cur_token,
            enable_dropout=False,
            decode=True,
            max_decode_length=max_decode_length,
            task_ids=task_ids,
            mutable=["cache"],
            method=self.module.decode,
        )
        return jnp.squeeze(logits, axis=1), new_vars["cache"]

    def predict_batch_with_aux(
        self,
        params: PyTree,
        batch: Batch,
        rng: Array | None = None,
        decoder_params: MutableMapping[str, Any] | None = None,
        return_all_decodes: bool = False,
        num_decodes: int = 1,
        prompt_with_targets: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        """Decodes a batch with `decode_fn` (t5x semantics).

        Args:
          params: the `params` collection.
          batch: `encoder_input_tokens [batch, in_len]`, `decoder_input_tokens
            [batch, out_len]` (its length is the maximum decode length), optional
            `task_ids [batch]`.
          rng: key for sampling decoders (`decode_rng`).
          decoder_params: extra keyword arguments of `decode_fn` (e.g. `temperature`,
            `topk`, `alpha`, `max_decode_steps`).
          return_all_decodes: return every decode, not just the best.
          num_decodes: beams (beam search) or samples (temperature sampling).
          prompt_with_targets: teacher-force the non-zero `decoder_input_tokens` as a
            prompt instead of decoding from scratch.

        Returns:
          `(tokens, {'scores': scores})`: tokens `[batch, out_len]` and scores
          `[batch]` for the best decode, or `[batch, num_decodes, out_len]` and
          `[batch, num_decodes]` (ascending, best last) with `return_all_decodes`.
          Scores are log-probabilities (beam search: length-normalised).

        Raises:
          ValueError: missing batch features or a vocabulary without `eos_id`.
        """
        _require(batch, ("encoder_input_tokens", "decoder_input_tokens"), "predict_batch")
        if not isinstance(num_decodes, int) or num_decodes < 1:
            raise UserError(f"num_decodes must be a positive int, got {num_decodes!r}.")
        decoder_params = dict(decoder_params or {})
        eos_id = decoder_params.pop("eos_id", getattr(self.output_vocabulary, "eos_id", None))
        if eos_id is None:
            raise UserError(
                "The output vocabulary has no eos_id; pass decoder_params={'eos_id': ...}."
            )
        encoder_tokens = batch["encoder_input_tokens"]
        decoder_tokens = batch["decoder_input_tokens"]
        task_ids = batch.get("task_ids")
        max_decode_length = decoder_tokens.shape[1]

        # [batch, in_len', emb_dim] (in_len' includes any prompt).
        encoded = self.module.apply(
            {"params": params},
            encoder_tokens,
            enable_dropout=False,
            task_ids=task_ids,
            method=self.module.encode,
        )
        # An empty cache for `batch` rows: the decoders expand it to `batch * num_decodes`
        # themselves. Running `decode` once with `decode=True` only creates the cache
        # variables (all zeros); under jit the unused computation is dropped.
        _, initial_vars = self.module.apply(
            {"params": params},
            encoded,
            encoder_tokens,
            jnp.ones_like(decoder_tokens),
            jnp.ones_like(decoder_tokens),
            enable_dropout=False,
            decode=True,
            task_ids=task_ids,
            mutable=["cache"],
            method=self.module.decode,
        )
        # Rows are laid out batch-major, [e0, e0, e1, e1, ...], like the decoders' beams.
        expand = functools.partial(decoding.flat_batch_beam_expand, beam_size=num_decodes)
        tokens_to_logits = functools.partial(
            self._tokens_to_logits,
            params=params,
            encoded=expand(encoded),
            encoder_tokens=expand(encoder_tokens),
            task_ids=None if task_ids is None else expand(task_ids),
            max_decode_length=max_decode_length,
        )
        if rng is not None:
            if decoder_params.get("decode_rng") is not None:
                raise UserError("Pass the decoding RNG either as `rng` or in decoder_params.")
            decoder_params["decode_rng"] = rng
        prompt = decoder_tokens if prompt_with_targets else jnp.zeros_like(decoder_tokens)
        sequences, scores = self.decode_fn(
            inputs=prompt,
            cache=initial_vars["cache"],
            tokens_to_logits=tokens_to_logits,
            eos_id=eos_id,
            num_decodes=num_decodes,
            **decoder_params,
        )
        if return_all_decodes:
            return sequences, {"scores": scores}
        return sequences[:, -1, :], {"scores": scores[:, -1]}

    def predict_batch(
        self,
        params: PyTree,
        batch: Batch,
        rng: Array | None = None,
        *,
        num_decodes: int = 1,
        return_all_decodes: bool = False,
        decoder_params: MutableMapping[str, Any] | None = None,
    ) -> Array:
        """Decoded tokens only (see `predict_batch_with_aux`)."""
        return self.predict_batch_with_aux(
            params,
            batch,
            rng=rng,
            decoder_params=decoder_params,
            return_all_decodes=return_all_decodes,
            num_decodes=num_decodes,
        )[0]
