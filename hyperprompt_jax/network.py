"""The T5 encoder-decoder with t5x's parameter tree, plus two method hooks.

With no method attached, `Transformer` is t5x's `t5x/examples/t5/network.py`
network: the same parameter names, shapes, logical axes, call signature
(`__call__`, `encode`, `decode`) and numerics. Methods plug in through two hooks,
each a Flax module given as an attribute (so its parameters live under the
attribute's name and one regex selects them):

* `prompt` (input hook): called on the embedded encoder inputs and their mask,
  returns longer embeddings and the extended mask (prompt tuning, SPoT, SMoP).
  Protocol `InputConditioner` below.
* `hyperprompt` (attention hook): returns per-layer key/value prefixes for every
  encoder and decoder self-attention (HyperPrompt). Protocol `PrefixGenerator`.

Both receive `task_ids [batch]` so one batch may mix tasks. Packed rows (segment ids
given; `packing` explains the layout) carry one task id per position instead,
`encoder_task_ids [batch, enc_length]` and `decoder_task_ids [batch, dec_length]`, and
the hooks keep every packed example as it is alone: its own prompt in its own prompt
slots, its own task's prefixes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from hyperprompt_jax import layers, packing
from hyperprompt_jax.config import T5Config
from hyperprompt_jax.errors import UserError

Array = jax.Array
PrefixKV = layers.PrefixKV
# {'encoder': [(key, value)] * num_encoder_layers, 'decoder': [...] * num_decoder_layers},
# each `[batch, prefix, heads, head_dim]`.
LayerPrefixes = Dict[str, Sequence[PrefixKV]]


class InputConditioner(Protocol):
    """Input hook: conditions the encoder input embeddings (a Flax module).

    `length` is the number of prompt positions it adds per example (the prompt slots a
    packed row reserves in front of every example)."""

    length: int

    def __call__(
        self,
        embedded_inputs: Array,
        input_mask: Array,
        *,
        task_ids: Optional[Array],
        deterministic: bool,
        embedding_table: Array,
        segments: Optional[packing.Segments] = None,
    ) -> Tuple[Array, Array]:
        """`[batch, length, emb_dim]`, `[batch, length]` -> `[batch, length', emb_dim]`,
        `[batch, length']` (1 = real position). Packed rows (`segments`; `task_ids`
        `[batch, length]`): the same shapes, each example's prompt in its slots.

        `embedding_table` is the float32 token embedding `[vocab, emb_dim]`, for
        initialisers that start from vocabulary embeddings (sampled, class labels):
        initialising with `apply(..., mutable=['params'])` over a loaded backbone
        lets them see the pretrained table."""

    def extend_mask(self, input_mask: Array) -> Array:
        """`[batch, length]` -> `[batch, length']`: the mask `__call__` returns,
        computed without embeddings (needed by `Transformer.decode`)."""


class PrefixGenerator(Protocol):
    """Attention hook: per-layer self-attention key/value prefixes (a Flax module)."""

    def __call__(
        self,
        task_ids: Optional[Array],
        *,
        config: T5Config,
        stack: str,
        batch_size: int,
        deterministic: bool,
        length: Optional[int] = None,
    ) -> Sequence[PrefixKV]:
        """Returns one `layers.PrefixKV` (key, value `[batch, prefix, heads, head_dim]`)
        per layer of `stack` ('encoder' or 'decoder') of the network described by
        `config`. With `length` (packed rows), `task_ids` is `[batch, length]`, one per
        query position, and each prefix's `bias` says which query sees which column."""


def _dropout(cfg: T5Config, x: Array, deterministic: bool, broadcast: bool = True) -> Array:
    dims = (-2,) if broadcast else ()
    return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=dims)(x, deterministic=deterministic)


def _attention(cfg: T5Config, name: str) -> layers.MultiHeadDotProductAttention:
    return layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        dtype=cfg.dtype,
        dropout_rate=cfg.dropout_rate,
        float32_logits=cfg.float32_attention_logits,
        name=name,
    )


def _mlp(cfg: T5Config) -> layers.MlpBlock:
    return layers.MlpBlock(
        intermediate_dim=cfg.mlp_dim,
        activations=cfg.mlp_activations,
        intermediate_dropout_rate=cfg.dropout_rate,
        dtype=cfg.dtype,
        name="mlp",
    )


_REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _layer_class(cls: type, cfg: T5Config, static_argnums: Tuple[int, ...], decode: bool = False):
    """`cls`, or `cls` rematerialised under `cfg.remat_policy` (training passes only).

    `nn.remat` keeps the module's name, so the parameter tree is unchanged. Its static
    arguments (`deterministic`, ...) count `self` as 0 and must be passed positionally.
    Incremental decoding (`decode=True`) has no backward pass and is never wrapped.
    """
    if cfg.remat_policy == "none" or decode:
        return cls
    return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy], static_argnums=static_argnums)


def _relpos(cfg: T5Config) -> layers.RelativePositionBiases:
    return layers.RelativePositionBiases(
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance,
        num_heads=cfg.num_heads,
        dtype=cfg.dtype,
        embedding_init=nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
        name="relpos_bias",
    )


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + MLP block of the encoder."""

    config: T5Config
    relative_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        encoder_mask: Optional[Array] = None,
        deterministic: bool = False,
        prefix_kv: Optional[PrefixKV] = None,
    ) -> Array:
        """`[batch, length, emb_dim]` -> `[batch, length, emb_dim]`."""
        cfg = self.config
        length = inputs.shape[-2]
        bias = self.relative_embedding(length, length, True)
        x = layers.LayerNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(inputs)
        x = _attention(cfg, "attention")(
            x, x, encoder_mask, bias, prefix_kv=prefix_kv, deterministic=deterministic
        )
        x = _dropout(cfg, x, deterministic) + inputs
        y = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
        y = _mlp(cfg)(y, deterministic=deterministic)
        return _dropout(cfg, y, deterministic) + x


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention and MLP block of the decoder."""

    config: T5Config
    relative_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        encoded: Array,
        decoder_mask: Optional[Array] = None,
        encoder_decoder_mask: Optional[Array] = None,
        deterministic: bool = False,
        decode: bool = False,
        max_decode_length: Optional[int] = None,
        prefix_kv: Optional[PrefixKV] = None,
    ) -> Array:
        """`[batch, length, emb_dim]` (+ encoded `[batch, enc_length, emb_dim]`)
        -> `[batch, length, emb_dim]`."""
        cfg = self.config
        length = max_decode_length if decode and max_decode_length else inputs.shape[-2]
        bias = self.relative_embedding(length, length, False)
        x = layers.LayerNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(inputs)
        x = _attention(cfg, "self_attention")(
            x,
            x,
            decoder_mask,
            bias,
            prefix_kv=prefix_kv,
            deterministic=deterministic,
            decode=decode,
        )
        x = _dropout(cfg, x, deterministic) + inputs
        y = layers.LayerNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
        y = _attention(cfg, "encoder_decoder_attention")(
            y, encoded, encoder_decoder_mask, deterministic=deterministic
        )
        y = _dropout(cfg, y, deterministic) + x
        z = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(y)
        z = _mlp(cfg)(z, deterministic=deterministic)
        return _dropout(cfg, z, deterministic) + y


def _check_prefixes(prefixes: Optional[Sequence[PrefixKV]], num_layers: int, stack: str):
    if prefixes is not None and len(prefixes) != num_layers:
        raise ValueError(
            f"The prefix generator returned {len(prefixes)} {stack} prefixes; "
            f"expected one per layer ({num_layers})."
        )


class Encoder(nn.Module):
    """The encoder stack, applied to already embedded (and conditioned) inputs."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        embedded_inputs: Array,
        encoder_mask: Optional[Array] = None,
        deterministic: bool = False,
        prefixes: Optional[Sequence[PrefixKV]] = None,
    ) -> Array:
        """`[batch, length, emb_dim]` -> `[batch, length, emb_dim]`.

        Args:
          embedded_inputs: token (and prompt) embeddings.
          encoder_mask: `[batch, 1, length, length]`.
          deterministic: disables dropout.
          prefixes: optional per-layer self-attention key/value prefixes.
        """
        cfg = self.config
        _check_prefixes(prefixes, cfg.num_encoder_layers, "encoder")
        rel_emb = _relpos(cfg)
        x = _dropout(cfg, embedded_inputs, deterministic).astype(cfg.dtype)
        layer = _layer_class(EncoderLayer, cfg, static_argnums=(3,))
        for lyr in range(cfg.num_encoder_layers):
            x = layer(config=cfg, relative_embedding=rel_emb, name=f"layers_{lyr}")(
                x, encoder_mask, deterministic, None if prefixes is None else prefixes[lyr]
            )
        x = layers.LayerNorm(dtype=cfg.dtype, name="encoder_norm")(x)
        return _dropout(cfg, x, deterministic, broadcast=False)


class Decoder(nn.Module):
    """The decoder stack and the output layer."""

    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        decoder_input_tokens: Array,
        decoder_positions: Optional[Array] = None,
        decoder_mask: Optional[Array] = None,
        encoder_decoder_mask: Optional[Array] = None,
        deterministic: bool = False,
        decode: bool = False,
        max_decode_length: Optional[int] = None,
        prefixes: Optional[Sequence[PrefixKV]] = None,
    ) -> Array:
        """Returns float32 logits `[batch, length, vocab]` (or `[batch, 1, vocab]` when
        decoding one position)."""
        cfg = self.config
        _check_prefixes(prefixes, cfg.num_decoder_layers, "decoder")
        rel_emb = _relpos(cfg)
        y = self.shared_embedding(decoder_input_tokens.astype("int32"))
        y = _dropout(cfg, y, deterministic).astype(cfg.dtype)
        layer = _layer_class(DecoderLayer, cfg, static_argnums=(5, 6, 7), decode=decode)
        for lyr in range(cfg.num_decoder_layers):
            y = layer(config=cfg, relative_embedding=rel_emb, name=f"layers_{lyr}")(
                y,
                encoded,
                decoder_mask,
                encoder_decoder_mask,
                deterministic,
                decode,
                max_decode_length,
                None if prefixes is None else prefixes[lyr],
            )
        y = layers.LayerNorm(dtype=cfg.dtype, name="decoder_norm")(y)
        y = _dropout(cfg, y, deterministic)
        if cfg.logits_via_embedding:
            # T5 v1.0 ties the output layer to the embedding and rescales by 1/sqrt(d).
            logits = self.shared_embedding.attend(y) / jnp.sqrt(y.shape[-1])
        else:
            logits = layers.DenseGeneral(
                cfg.vocab_size,
                dtype=jnp.float32,
                kernel_axes=("embed", "vocab"),
                name="logits_dense",
            )(y)
        return logits.astype(jnp.float32)


class Transformer(nn.Module):
    """t5x's T5 encoder-decoder with optional `prompt` and `hyperprompt` hooks.

    Attributes:
      config: the T5Config.
      prompt: optional input conditioner (soft prompt, SMoP); params under `prompt/`.
      hyperprompt: optional prefix generator (HyperPrompt); params under `hyperprompt/`.
    """

    config: T5Config
    prompt: Optional[nn.Module] = None
    hyperprompt: Optional[nn.Module] = None

    def setup(self):
        cfg = self.config
        self.shared_embedding = layers.Embed(
            num_embeddings=cfg.vocab_size,
            features=cfg.emb_dim,
            dtype=cfg.dtype,
            attend_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(stddev=1.0),
            one_hot=cfg.one_hot_embedding,
            name="token_embedder",
        )
        self.encoder = Encoder(config=cfg)
        self.decoder = Decoder(config=cfg, shared_embedding=self.shared_embedding)

    def _prefixes(
        self,
        task_ids: Optional[Array],
        stack: str,
        batch_size: int,
        deterministic: bool,
        length: Optional[int] = None,
    ) -> Optional[Sequence[PrefixKV]]:
        """The hyperprompt hook's prefixes; `length`: per-position task ids (packed)."""
        if self.hyperprompt is None:
            return None
        kwargs = {} if length is None else {"length": length}
        return self.hyperprompt(
            task_ids,
            config=self.config,
            stack=stack,
            batch_size=batch_size,
            deterministic=deterministic,
            **kwargs,
        )

    def _encoder_input_mask(self, encoder_input_tokens: Array, packed: bool = False) -> Array:
        """`[batch, length]` -> mask of the encoded sequence `[batch, length']` (packed
        rows hold their prompts in their slots: `length' = length`)."""
        mask = encoder_input_tokens > 0
        if self.prompt is not None and not packed:
            mask = self.prompt.extend_mask(mask)
        return mask

    def _condition_inputs(
        self,
        encoder_input_tokens: Array,
        embedded: Array,
        input_mask: Array,
        encoder_segment_ids: Optional[Array],
        encoder_positions: Optional[Array],
        task_ids: Optional[Array],
        deterministic: bool,
    ) -> Tuple[Array, Array]:
        """The input hook on unpacked rows (prompt prepended) or packed rows (prompt
        written into every example's slots; a row whose slots do not hold
        `packing.PROMPT_SLOT_ID` becomes NaN rather than lose real tokens)."""
        kwargs = dict(
            task_ids=task_ids,
            deterministic=deterministic,
            embedding_table=self.shared_embedding.embedding,
        )
        if encoder_segment_ids is None:
            return self.prompt(embedded, input_mask, **kwargs)
        if encoder_positions is None:
            raise UserError(
                "Packed inputs with a prompt need encoder_positions (seqio's packing gives "
                "them) to find every example's prompt slots."
            )
        segments = packing.Segments(encoder_segment_ids, encoder_positions)
        slots = segments.prompt_slots(self.prompt.length)
        slots_hold_prompts = jnp.all(
            ~slots | (encoder_input_tokens == packing.PROMPT_SLOT_ID), axis=1
        )
        embedded = jnp.where(slots_hold_prompts[:, None, None], embedded, jnp.nan)
        return self.prompt(embedded, input_mask, segments=segments, **kwargs)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Optional[Array] = None,
        enable_dropout: bool = True,
        *,
        task_ids: Optional[Array] = None,
        encoder_positions: Optional[Array] = None,
    ) -> Array:
        """Encodes `[batch, length]` tokens -> `[batch, length', emb_dim]`.

        `length'` is `length` plus the prompt length when an input hook is attached to
        unpacked rows. Packed rows (`encoder_segment_ids`, `encoder_positions`) keep
        their length and take `task_ids [batch, length]` (one per position).
        """
        cfg = self.config
        if encoder_input_tokens.ndim != 2:
            raise ValueError(
                f"encoder_input_tokens must be [batch, length], got {encoder_input_tokens.shape}."
            )
        deterministic = not enable_dropout
        embedded = self.shared_embedding(encoder_input_tokens.astype("int32"))
        input_mask = encoder_input_tokens > 0
        if self.prompt is not None:
            embedded, input_mask = self._condition_inputs(
                encoder_input_tokens,
                embedded,
                input_mask,
                encoder_segment_ids,
                encoder_positions,
                task_ids,
                deterministic,
            )
        encoder_mask = layers.make_attention_mask(input_mask, input_mask, dtype=cfg.dtype)
        if encoder_segment_ids is not None:
            encoder_mask = layers.combine_masks(
                encoder_mask,
                layers.make_attention_mask(
                    encoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=cfg.dtype
                ),
            )
        length = None if encoder_segment_ids is None else embedded.shape[1]
        prefixes = self._prefixes(task_ids, "encoder", embedded.shape[0], deterministic, length)
        return self.encoder(embedded, encoder_mask, deterministic=deterministic, prefixes=prefixes)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Optional[Array] = None,
        decoder_segment_ids: Optional[Array] = None,
        decoder_positions: Optional[Array] = None,
        enable_dropout: bool = True,
        decode: bool = False,
        max_decode_length: Optional[int] = None,
        *,
        task_ids: Optional[Array] = None,
    ) -> Array:
        """Decodes given the encoder output; returns float32 logits `[batch, length, vocab]`.

        Packed rows (`decoder_segment_ids`) take `task_ids [batch, length]`, one per
        decoder position."""
        cfg = self.config
        encoder_valid = self._encoder_input_mask(
            encoder_input_tokens, packed=encoder_segment_ids is not None
        )
        if encoder_valid.shape[1] != encoded.shape[1]:
            raise ValueError(
                f"encoded has length {encoded.shape[1]} but the encoder inputs (with any "
                f"prompt) have length {encoder_valid.shape[1]}."
            )
        if decode:
            decoder_mask = None
            encoder_decoder_mask = layers.make_attention_mask(
                jnp.ones_like(decoder_target_tokens), encoder_valid, dtype=cfg.dtype
            )
        else:
            decoder_mask = layers.make_decoder_mask(
                decoder_target_tokens=decoder_target_tokens,
                dtype=cfg.dtype,
                decoder_segment_ids=decoder_segment_ids,
            )
            encoder_decoder_mask = layers.make_attention_mask(
                decoder_target_tokens > 0, encoder_valid, dtype=cfg.dtype
            )
        if encoder_segment_ids is not None:
            if decode:
                raise ValueError(
                    "During decoding, packing should not be used but `encoder_segment_ids` "
                    "was passed to `Transformer.decode`."
                )
            encoder_decoder_mask = layers.combine_masks(
                encoder_decoder_mask,
                layers.make_attention_mask(
                    decoder_segment_ids, encoder_segment_ids, jnp.equal, dtype=cfg.dtype
                ),
            )
        deterministic = not enable_dropout
        packed_length = None if decoder_segment_ids is None else decoder_input_tokens.shape[1]
        prefixes = self._prefixes(
            task_ids, "decoder", decoder_input_tokens.shape[0], deterministic, packed_length
        )
        return self.decoder(
            encoded,
            decoder_input_tokens=decoder_input_tokens,
            decoder_positions=decoder_positions,
            decoder_mask=decoder_mask,
            encoder_decoder_mask=encoder_decoder_mask,
            deterministic=deterministic,
            decode=decode,
            max_decode_length=max_decode_length,
            prefixes=prefixes,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Optional[Array] = None,
        decoder_segment_ids: Optional[Array] = None,
        encoder_positions: Optional[Array] = None,
        decoder_positions: Optional[Array] = None,
        *,
        task_ids: Optional[Array] = None,
        encoder_task_ids: Optional[Array] = None,
        decoder_task_ids: Optional[Array] = None,
        enable_dropout: bool = True,
        decode: bool = False,
    ) -> Array:
        """Runs the encoder-decoder (t5x signature); returns float32 logits.

        Args:
          encoder_input_tokens: `[batch, enc_length]` int, 0 = padding.
          decoder_input_tokens: `[batch, dec_length]` (targets shifted right).
          decoder_target_tokens: `[batch, dec_length]`, 0 = padding.
          encoder_segment_ids / decoder_segment_ids: packing ids `[batch, length]`.
          encoder_positions / decoder_positions: packing positions (T5 attends with
            relative positions; `encoder_positions` locate the prompt slots of packed
            rows).
          task_ids: `[batch]` int32 task index per example (task-conditioned methods).
          encoder_task_ids / decoder_task_ids: packed rows' task ids, one per position
            `[batch, length]` (`packing`); they replace `task_ids`.
          enable_dropout: dropout (and SMoP router noise) on.
          decode: prepare / use the autoregressive cache.

        Returns:
          `[batch, dec_length, vocab_size]` float32 logits.
        """
        if encoder_task_ids is not None or decoder_task_ids is not None:
            if encoder_segment_ids is None:
                raise UserError(
                    "encoder_task_ids / decoder_task_ids are for packed rows (with "
                    "encoder_segment_ids); unpacked rows take task_ids [batch]."
                )
            if task_ids is not None:
                raise UserError(
                    "Packed rows take per-position encoder_task_ids / decoder_task_ids, "
                    "not task_ids [batch]; pass one or the other."
                )
        else:
            encoder_task_ids = decoder_task_ids = task_ids
        encoded = self.encode(
            encoder_input_tokens,
            encoder_segment_ids=encoder_segment_ids,
            enable_dropout=enable_dropout,
            task_ids=encoder_task_ids,
            encoder_positions=encoder_positions,
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
            decoder_positions=decoder_positions,
            enable_dropout=enable_dropout,
            decode=decode,
            task_ids=decoder_task_ids,
        )


def init_params(
    model: Transformer,
    rng: jax.Array,
    batch_size: int = 1,
    encoder_length: int = 8,
    decoder_length: int = 8,
    with_task_ids: bool = False,
) -> Dict[str, Any]:
    """Initializes `{'params': ..., 'params_axes': ...}` from dummy int32 inputs."""
    enc = jnp.ones((batch_size, encoder_length), jnp.int32)
    dec = jnp.ones((batch_size, decoder_length), jnp.int32)
    task_ids = jnp.zeros((batch_size,), jnp.int32) if with_task_ids else None
    return model.init(
        {"params": rng, "dropout": rng}, enc, dec, dec, task_ids=task_ids, enable_dropout=False
    )
