"""t5x-compatible T5 building blocks; attention accepts per-example prefix keys/values.

Parameter names, shapes, dtypes (float32) and logical axis names (`params_axes`
collection, via `param_with_axes`) are exactly those of t5x's
`t5x/examples/t5/layers.py`, so t5x checkpoints load unchanged. Two additions:

* `MultiHeadDotProductAttention(..., prefix_kv=(key, value))` prepends per-example
  key/value vectors `[batch, prefix, heads, head_dim]` to the projected keys/values
  (HyperPrompt's hook, Eq. 3 of the paper). The prefix gets no relative-position bias
  and no mask, and it is never written to the decode cache, so incremental decoding
  keeps the cache of the plain model.
* `Embed(one_hot=False)` embeds with an exact gather (t5x's one-hot matmul is a TPU
  habit that costs ~40% of a small model's FLOPs on CPU/GPU).

Shape letters in names: B batch, L/Q/K lengths, H heads, D head_dim, E emb_dim.
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax.linen import partitioning as nn_partitioning
from jax import lax

param_with_axes = nn_partitioning.param_with_axes
with_logical_constraint = nn.with_logical_constraint

Array = jax.Array
DType = Any
PRNGKey = jax.Array
Shape = Iterable[int]
Initializer = Callable[[PRNGKey, Shape, DType], Array]


class PrefixKV(NamedTuple):
    """Key/value vectors an attention prepends to its own keys/values (HyperPrompt).

    Attributes:
      key: `[batch, prefix, heads, head_dim]` (batch may be 1: shared by every row).
      value: like `key`.
      bias: optional additive bias `[batch, 1, q_length, prefix]` saying which query
        sees which prefix position (0 visible, `MASK_VALUE` hidden; packed rows see
        only their own task's prefix); None: every query sees every prefix position.
    """

    key: Array
    value: Array
    bias: Optional[Array] = None


default_embed_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)

# t5x masks with -1e10 rather than -inf so fully masked rows stay finite.
MASK_VALUE = -1e10


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Optional[Array] = None,
    dropout_rng: Optional[PRNGKey] = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: DType = jnp.float32,
    float32_logits: bool = False,
) -> Array:
    """Softmax(q.k + bias) v without 1/sqrt(d) (T5 folds it into the query init).

    Args:
      query: `[batch, q_length, heads, head_dim]`.
      key: `[batch, kv_length, heads, head_dim]`.
      value: `[batch, kv_length, heads, head_dim]`.
      bias: broadcastable to `[batch, heads, q_length, kv_length]` (mask and
        relative-position bias already combined).
      dropout_rng: key for attention dropout.
      dropout_rate: probability of dropping an attention weight; as in t5x the
        dropout mask is shared along the query axis.
      deterministic: disables dropout.
      dtype: dtype of the weights after softmax.
      float32_logits: compute q.k and softmax in float32.

    Returns:
      `[batch, q_length, heads, head_dim]`.
    """
    if float32_logits:
        query = query.astype(jnp.float32)
        key = key.astype(jnp.float32)
    logits_BHQK = jnp.einsum("bqhd,bkhd->bhqk", query, key)
    if bias is not None:
        logits_BHQK = logits_BHQK + bias.astype(logits_BHQK.dtype)
    weights_BHQK = jax.nn.softmax(logits_BHQK).astype(dtype)
    if not deterministic and dropout_rate > 0.0:
        keep_prob = 1.0 - dropout_rate
        dropout_shape = list(weights_BHQK.shape)
        dropout_shape[-2] = 1
        keep = jax.random.bernoulli(dropout_rng, keep_prob, dropout_shape)
        keep = jnp.broadcast_to(keep, weights_BHQK.shape)
        weights_BHQK = weights_BHQK * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype))
    return jnp.einsum("bhqk,bkhd->bqhd", weights_BHQK, value)


def _canonicalize_tuple(x: Union[int, Iterable[int]]) -> Tuple[int, ...]:
    return tuple(x) if isinstance(x, Iterable) else (x,)


def _normalize_axes(axes: Iterable[int], ndim: int) -> Tuple[int, ...]:
    return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class DenseGeneral(nn.Module):
    """Bias-free linear map over `axis` whose kernel is stored 2-D like t5x.

    The kernel parameter is `[prod(in dims), prod(features)]` float32 (t5x's layout,
    e.g. attention query `[emb_dim, heads * head_dim]`, axes `('embed', 'joined_kv')`)
    and is reshaped to `in dims + features` for the contraction.
    """

    features: Union[Iterable[int], int]
    axis: Union[Iterable[int], int] = -1
    dtype: DType = jnp.float32
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    kernel_axes: Tuple[str, ...] = ()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        features = _canonicalize_tuple(self.features)
        axis = _canonicalize_tuple(self.axis)
        inputs = jnp.asarray(inputs, self.dtype)
        axis = _normalize_axes(axis, inputs.ndim)
        kernel_shape = tuple(inputs.shape[ax] for ax in axis) + features
        kernel_param_shape = (
            int(np.prod([inputs.shape[ax] for ax in axis])),
            int(np.prod(features)),
        )
        kernel = param_with_axes(
            "kernel", self.kernel_init, kernel_param_shape, jnp.float32, axes=self.kernel_axes
        )
        kernel = jnp.asarray(kernel, self.dtype)
        if axis == tuple(range(inputs.ndim - len(axis), inputs.ndim)):
            # Contracting the trailing axes: one 2-D matmul on `[rows, prod(in dims)]`.
            # Equal to the dot_general below, but its gradients are 2-D too: XLA:CPU
            # transposes a 3-D `[batch, length, mlp]` activation for the kernel's
            # gradient with a strided copy about 20x slower than a 2-D transpose
            # (benchmarks/step_profile.py; docs/benchmarks.md).
            rows = inputs.shape[: inputs.ndim - len(axis)]
            out = lax.dot(inputs.reshape(-1, kernel_param_shape[0]), kernel)
            return out.reshape(rows + features)
        kernel = jnp.reshape(kernel, kernel_shape)
        contract = tuple(range(len(axis)))
        return lax.dot_general(inputs, kernel, ((axis, contract), ((), ())))


class MultiHeadDotProductAttention(nn.Module):
    """t5x multi-head attention with an optional per-example key/value prefix.

    Attributes:
      num_heads: attention heads H.
      head_dim: width of one head D.
      dtype: activation dtype.
      dropout_rate: attention-weight dropout.
      kernel_init: initializer of the q/k/v/out kernels (the query's is divided by
        sqrt(D), t5x's way of folding the 1/sqrt(d) scaling into the weights).
      float32_logits: compute attention logits in float32.
    """

    num_heads: int
    head_dim: int
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    float32_logits: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        mask: Optional[Array] = None,
        bias: Optional[Array] = None,
        *,
        prefix_kv: Optional[PrefixKV] = None,
        decode: bool = False,
        deterministic: bool = False,
    ) -> Array:
        """Attends `inputs_q` to `inputs_kv` (and to `prefix_kv` when given).

        Args:
          inputs_q: `[batch, q_length, emb_dim]`.
          inputs_kv: `[batch, kv_length, emb_dim]`.
          mask: `[batch, 1, q_length, kv_length]`, 1 = may attend.
          bias: `[1, heads, q_length, kv_length]` relative-position bias (during
            cached decoding: over the full `max_decode_length`).
          prefix_kv: optional `(key, value)`, each `[batch, prefix, heads, head_dim]`,
            prepended to the keys/values; every query sees every prefix position.
          decode: use and update the autoregressive cache (`cache` collection).
          deterministic: disables dropout.

        Returns:
          `[batch, q_length, emb_dim]`.
        """
        projection = functools.partial(
            DenseGeneral,
            axis=-1,
            features=(self.num_heads, self.head_dim),
            kernel_axes=("embed", "joined_kv"),
            dtype=self.dtype,
        )
        depth_scaling = jnp.sqrt(self.head_dim).astype(self.dtype)

        def query_init(*args):
            return self.kernel_init(*args) / depth_scaling

        query_BQHD = projection(kernel_init=query_init, name="query")(inputs_q)
        key_BKHD = projection(kernel_init=self.kernel_init, name="key")(inputs_kv)
        value_BKHD = projection(kernel_init=self.kernel_init, name="value")(inputs_kv)
        axes = ("batch", "length", "heads", "kv")
        query_BQHD = with_logical_constraint(query_BQHD, axes)
        key_BKHD = with_logical_constraint(key_BKHD, axes)
        value_BKHD = with_logical_constraint(value_BKHD, axes)

        if decode:
            key_BKHD, value_BKHD, mask, bias = self._update_cache(
                query_BQHD, key_BKHD, value_BKHD, mask, bias
            )

        attention_bias = None
        if mask is not None:
            attention_bias = lax.select(
                mask > 0,
                jnp.full(mask.shape, 0.0).astype(self.dtype),
                jnp.full(mask.shape, MASK_VALUE).astype(self.dtype),
            )
        if bias is not None:
            attention_bias = bias if attention_bias is None else attention_bias + bias

        if prefix_kv is not None:
            key_BKHD, value_BKHD, attention_bias = _prepend_prefix(
                prefix_kv, key_BKHD, value_BKHD, attention_bias, self.dtype
            )

        dropout_rng = None
        if not deterministic and self.dropout_rate > 0.0:
            dropout_rng = self.make_rng("dropout")
        x_BQHD = dot_product_attention(
            query_BQHD,
            key_BKHD,
            value_BKHD,
            bias=attention_bias,
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate,
            deterministic=deterministic,
            dtype=self.dtype,
            float32_logits=self.float32_logits,
        )
        return DenseGeneral(
            features=inputs_q.shape[-1],
            axis=(-2, -1),
            kernel_init=self.kernel_init,
            kernel_axes=("joined_kv", "embed"),
            dtype=self.dtype,
            name="out",
        )(x_BQHD)

    def _update_cache(self, query_BQHD, key_BKHD, value_BKHD, mask, bias):
        """t5x's cache: keys/values stored `[batch, heads, head_dim, length]`.

        The first call (no `cached_key` yet) only creates zero caches of the full
        length; later calls write one position and return the whole cache.
        """
        is_initialized = self.has_variable("cache", "cached_key")

        def swap_dims(shape):
            return shape[:-3] + tuple(shape[i] for i in (-2, -1, -3))

        cached_key = self.variable(
            "cache", "cached_key", jnp.zeros, swap_dims(key_BKHD.shape), key_BKHD.dtype
        )
        cached_value = self.variable(
            "cache", "cached_value", jnp.zeros, swap_dims(value_BKHD.shape), value_BKHD.dtype
        )
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not is_initialized:
            return key_BKHD, value_BKHD, mask, bias

        batch, num_heads, head_dim, length = cached_key.value.shape
        expected = (batch, 1, num_heads, head_dim)
        if query_BQHD.shape != expected:
            raise ValueError(
                f"Autoregressive cache shape error: expected query shape {expected}, "
                f"got {query_BQHD.shape} (decode one position at a time)."
            )
        cur_index = cache_index.value
        # One-hot scatter into the cache (t5x: faster than a dynamic update on TPU
        # and exact everywhere).
        one_hot = jax.nn.one_hot(cur_index, length, dtype=key_BKHD.dtype)
        key_BHDL = cached_key.value + jnp.moveaxis(key_BKHD, -3, -1) * one_hot
        value_BHDL = cached_value.value + jnp.moveaxis(value_BKHD, -3, -1) * one_hot
        cached_key.value = key_BHDL
        cached_value.value = value_BHDL
        cache_index.value = cur_index + 1
        causal = jnp.broadcast_to(jnp.arange(length) <= cur_index, (batch, 1, 1, length))
        mask = combine_masks(mask, causal)
        if bias is not None:
            # The bias covers all max_decode_length queries: keep the current row.
            bias = lax.dynamic_slice_in_dim(bias, cur_index, 1, axis=-2)
        return jnp.moveaxis(key_BHDL, -1, -3), jnp.moveaxis(value_BHDL, -1, -3), mask, bias


def _prepend_prefix(
    prefix_kv: PrefixKV | Tuple[Array, Array],
    key_BKHD: Array,
    value_BKHD: Array,
    attention_bias: Optional[Array],
    dtype: DType,
) -> Tuple[Array, Array, Optional[Array]]:
    """Prepends prefix keys/values; the prefix columns get the prefix's own bias (zero,
    always visible, when it has none)."""
    prefix = PrefixKV(*prefix_kv)
    prefix_key, prefix_value = prefix.key, prefix.value
    if prefix_key.shape != prefix_value.shape:
        raise ValueError(
            f"Prefix key {prefix_key.shape} and value {prefix_value.shape} shapes differ."
        )
    if prefix_key.ndim != 4 or prefix_key.shape[2:] != key_BKHD.shape[2:]:
        raise ValueError(
            "Prefix keys/values must be [batch, prefix, heads, head_dim] with heads x "
            f"head_dim = {key_BKHD.shape[2:]}, got {prefix_key.shape}."
        )
    batch = key_BKHD.shape[0]
    if prefix_key.shape[0] not in (1, batch):
        raise ValueError(f"Prefix batch {prefix_key.shape[0]} differs from the key batch {batch}.")
    num_prefix = prefix_key.shape[1]
    shape = (batch,) + prefix_key.shape[1:]
    key_BKHD = jnp.concatenate(
        [jnp.broadcast_to(prefix_key.astype(key_BKHD.dtype), shape), key_BKHD], axis=1
    )
    value_BKHD = jnp.concatenate(
        [jnp.broadcast_to(prefix_value.astype(value_BKHD.dtype), shape), value_BKHD], axis=1
    )
    prefix_bias = prefix.bias
    if prefix_bias is None and attention_bias is None:
        return key_BKHD, value_BKHD, None
    if attention_bias is None:
        q_length = prefix_bias.shape[-2]
        attention_bias = jnp.zeros((batch, 1, q_length, key_BKHD.shape[1] - num_prefix), dtype)
    if prefix_bias is None:
        prefix_bias = jnp.zeros(attention_bias.shape[:-1] + (num_prefix,), attention_bias.dtype)
    lead = jnp.broadcast_shapes(attention_bias.shape[:-1], prefix_bias.shape[:-1])
    attention_bias = jnp.concatenate(
        [
            jnp.broadcast_to(prefix_bias.astype(attention_bias.dtype), lead + (num_prefix,)),
            jnp.broadcast_to(attention_bias, lead + attention_bias.shape[-1:]),
        ],
        axis=-1,
    )
    return key_BKHD, value_BKHD, attention_bias


def _activation(fn_or_string: Union[str, Callable]) -> Callable:
    if fn_or_string == "linear":
        return lambda x: x
    if isinstance(fn_or_string, str):
        fn = getattr(nn, fn_or_string, None)
        if fn is None:
            raise ValueError(f"Unknown MLP activation {fn_or_string!r} (not in flax.linen).")
        return fn
    if callable(fn_or_string):
        return fn_or_string
    raise ValueError(f"Cannot convert {fn_or_string!r} to an activation function.")


class MlpBlock(nn.Module):
    """T5 feed-forward block: `wi` (or gated `wi_0`, `wi_1`), dropout, `wo`.

    ('gelu', 'linear') is T5.1.1's GeGLU; flax's gelu is the tanh approximation,
    as in t5x and Hugging Face's `gelu_new`.
    """

    intermediate_dim: int = 2048
    activations: Sequence[Union[str, Callable]] = ("relu",)
    kernel_init: Initializer = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    intermediate_dropout_rate: float = 0.1
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, decode: bool = False, deterministic: bool = False) -> Array:
        """`[batch, length, emb_dim]` -> `[batch, length, emb_dim]`."""
        hidden = []
        for idx, act_fn in enumerate(self.activations):
            name = "wi" if len(self.activations) == 1 else f"wi_{idx}"
            x = DenseGeneral(
                self.intermediate_dim,
                dtype=self.dtype,
                kernel_init=self.kernel_init,
                kernel_axes=("embed", "mlp"),
                name=name,
            )(inputs)
            hidden.append(_activation(act_fn)(x))
        x = functools.reduce(operator.mul, hidden)
        x = nn.Dropout(rate=self.intermediate_dropout_rate, broadcast_dims=(-2,))(
            x, deterministic=deterministic
        )
        x = with_logical_constraint(x, ("batch", "length", "mlp"))
        return DenseGeneral(
            inputs.shape[-1],
            dtype=self.dtype,
            kernel_init=self.kernel_init,
            kernel_axes=("mlp", "embed"),
            name="wo",
        )(x)


class Embed(nn.Module):
    """Token embedding `[vocab, emb_dim]` (axes `('vocab', 'embed')`), t5x layout."""

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    attend_dtype: Optional[DType] = None
    embedding_init: Initializer = default_embed_init
    one_hot: bool = False

    def setup(self):
        self.embedding = param_with_axes(
            "embedding",
            self.embedding_init,
            (self.num_embeddings, self.features),
            jnp.float32,
            axes=("vocab", "embed"),
        )

    def __call__(self, inputs: Array) -> Array:
        """Integer ids `[...]` -> `[..., features]`."""
        if not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(f"Token ids must be integers, got dtype {inputs.dtype}.")
        table = jnp.asarray(self.embedding, self.dtype)
        if self.one_hot:
            iota = lax.iota(jnp.int32, self.num_embeddings)
            one_hot = jnp.array(inputs[..., jnp.newaxis] == iota, dtype=self.dtype)
            return jnp.dot(one_hot, table)
        output = jnp.take(table, inputs, axis=0)
        return with_logical_constraint(output, ("batch", "length", "embed"))

    def attend(self, query: Array) -> Array:
        """`[..., features]` -> logits `[..., num_embeddings]` against the table."""
        dtype = self.attend_dtype if self.attend_dtype is not None else self.dtype
        return jnp.dot(query, jnp.asarray(self.embedding, dtype).T)


def relative_position_bucket(
    relative_position: np.ndarray,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> np.ndarray:
    """T5's bucketing of `memory_position - query_position` (NumPy, static).

    Half of the buckets (per direction) are exact small distances; the rest are
    log-spaced up to `max_distance`, beyond which all distances share the last bucket.
    """
    ret = 0
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret += (n < 0).astype(np.int32) * num_buckets
        n = np.abs(n)
    else:
        n = np.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    val_if_large = max_exact + (
        np.log(n.astype(np.float32) / max_exact + np.finfo(np.float32).eps)
        / np.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).astype(np.int32)
    val_if_large = np.minimum(val_if_large, num_buckets - 1)
    return ret + np.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """Per-head relative-position bias, one table `[heads, buckets]` per stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: DType
    embedding_init: Initializer = default_embed_init

    @nn.compact
    def __call__(self, qlen: int, klen: int, bidirectional: bool = True) -> Array:
        """Returns the bias `[1, heads, qlen, klen]`."""
        context = np.arange(qlen, dtype=np.int32)[:, None]
        memory = np.arange(klen, dtype=np.int32)[None, :]
        rp_bucket = relative_position_bucket(
            memory - context,
            bidirectional=bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table_HN = param_with_axes(
            "rel_embedding",
            self.embedding_init,
            (self.num_heads, self.num_buckets),
            jnp.float32,
            axes=("heads", "relpos_buckets"),
        )
        table_HN = jnp.asarray(table_HN, self.dtype)
        # A static gather: the bucket ids are compile-time constants.
        values_HQK = jnp.take(table_HN, jnp.asarray(rp_bucket), axis=1)
        return values_HQK[jnp.newaxis]


class LayerNorm(nn.Module):
    """T5's RMS norm: no mean subtraction, no bias, float32 statistics, eps 1e-6."""

    epsilon: float = 1e-6
    dtype: DType = jnp.float32
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = jnp.asarray(x, jnp.float32)
        mean2 = jnp.mean(lax.square(x), axis=-1, keepdims=True)
        y = jnp.asarray(x * lax.rsqrt(mean2 + self.epsilon), self.dtype)
        scale = param_with_axes(
            "scale", self.scale_init, (x.shape[-1],), jnp.float32, axes=("embed",)
        )
        return y * jnp.asarray(scale, self.dtype)


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable = jnp.multiply,
    extra_batch_dims: int = 0,
    dtype: DType = jnp.float32,
) -> Array:
    """`[batch, len_q]`, `[batch, len_kv]` -> mask `[batch, 1, len_q, len_kv]`."""
    mask = pairwise_fn(jnp.expand_dims(query_input, axis=-1), jnp.expand_dims(key_input, axis=-2))
    mask = jnp.expand_dims(mask, axis=-3)
    mask = jnp.expand_dims(mask, axis=tuple(range(extra_batch_dims)))
    return mask.astype(dtype)


def make_causal_mask(x: Array, extra_batch_dims: int = 0, dtype: DType = jnp.float32) -> Array:
    """`[batch, len]` -> causal mask `[batch, 1, len, len]` (values of x unused)."""
    idxs = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape)
    return make_attention_mask(
        idxs, idxs, jnp.greater_equal, extra_batch_dims=extra_batch_dims, dtype=dtype
    )


def combine_masks(*masks: Optional[Array], dtype: DType = jnp.float32) -> Optional[Array]:
    """Logical AND of the given masks (None entries ignored)."""
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    mask, *others = masks
    for other in others:
        mask = jnp.logical_and(mask, other)
    return mask.astype(dtype)


def make_decoder_mask(
    decoder_target_tokens: Array,
    dtype: DType,
    decoder_causal_attention: Optional[Array] = None,
    decoder_segment_ids: Optional[Array] = None,
) -> Array:
    """Causal + padding (+ packing, + prefix-LM bidirectional) decoder mask.

    Args:
      decoder_target_tokens: `[batch, length]`, 0 = padding.
      dtype: mask dtype.
      decoder_causal_attention: `[batch, length]`, 1 on "inputs" positions of a
        prefix-LM example, which see each other bidirectionally.
      decoder_segment_ids: `[batch, length]` packing ids.

    Returns:
      `[batch, 1, length, length]`.
    """
    masks = []
    causal = make_causal_mask(decoder_target_tokens, dtype=dtype)
    if decoder_causal_attention is not None:
        inputs_mask = make_attention_mask(
            decoder_causal_attention, decoder_causal_attention, jnp.logical_and, dtype=dtype
        )
        masks.append(jnp.logical_or(causal, inputs_mask).astype(dtype))
    else:
        masks.append(causal)
    masks.append(
        make_attention_mask(decoder_target_tokens > 0, decoder_target_tokens > 0, dtype=dtype)
    )
    if decoder_segment_ids is not None:
        masks.append(
            make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal, dtype=dtype)
        )
    return combine_masks(*masks, dtype=dtype)
