"""Autoregressive decoding with t5x's semantics: temperature sampling and beam search.

Both decoders drive a model through one callable,

    tokens_to_logits(DecodingState) -> (logits [batch * beams, vocab] float32, new_cache)

where the state carries the current token `[batch * beams, 1]` and the flax `cache`
collection of the decoder. The cache is any pytree (dict or FrozenDict) whose arrays all
have the (flattened) batch as their leading dimension, except scalars such as
`cache_index` (shape `()`), which are shared by every row and never expanded. The keys
and values of a t5x decoder are stored `[batch, heads, head_dim, length]`; only the
leading batch axis matters here.

Conventions shared with t5x (so results are comparable):
* `inputs` are decoder *input* tokens `[batch, length]`: position 0 is the BOS token (0),
  non-zero entries after it are a prompt prefix that is teacher-forced, and zeros are the
  positions to generate. The returned sequences are the outputs, i.e. the inputs shifted
  left by one: `out[:, j]` is the token produced while the decoder saw `sequences[:, j]`.
* Once a row emits `eos_id` its later positions are padding (0) and its log-probability
  stops accumulating.
* Several decodes per example are laid out batch-major: row `b * num_decodes + k` is
  decode `k` of example `b` (see `flat_batch_beam_expand`).
* Results are sorted ascending by score: the best decode is the *last* one.

Everything is pure JAX and jit-compatible when `num_decodes`, `topk`, `eos_id`,
`max_decode_len` and `tokens_to_logits` are static.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any

# "Effective negative infinity" used to mask logits and dead beams. A finite value (as
# t5x) keeps `x + NEG_INF` and `NEG_INF / penalty` free of NaNs.
NEG_INF = -1.0e7

# Temperatures at or below this are treated as 0 (greedy): dividing logits by a tiny
# temperature would overflow.
MIN_TEMPERATURE = 1e-4

# Cache leaves that are shared by all rows even when they are not scalars, so beam
# expansion and gathering must leave them alone (t5x excludes the same names).
_SHARED_CACHE_LEAVES = frozenset({"cached_bias", "position_embedder_index"})


@flax.struct.dataclass
class DecodingState:
    """What `tokens_to_logits` sees at one decoding step.

    Attributes:
      cur_index: `[batch * beams]` int32 position of the current token in `sequences`.
      sequences: `[batch * beams, length]` int32 decoder inputs so far (position 0 is
        BOS), so `sequences[r, cur_index[r]] == cur_token[r, 0]`.
      cur_token: `[batch * beams, 1]` int32 token to feed to the decoder now.
      cache: the decoder's `cache` collection, batch-leading arrays `[batch * beams, ...]`.
    """

    cur_index: jax.Array
    sequences: jax.Array
    cur_token: jax.Array
    cache: PyTree


TokensToLogits = Callable[[DecodingState], tuple[jax.Array, PyTree]]


# ----------------------------------------------------------------------------------------
# Beam / decode bookkeeping helpers
# ----------------------------------------------------------------------------------------


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    if not path:
        return None
    entry = path[-1]
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def cache_map(fn: Callable[[jax.Array], jax.Array], cache: PyTree) -> PyTree:
    """Applies `fn` to every per-row array of a decoder cache.

    Scalars (e.g. `cache_index`, shape `()`) and leaves named like t5x's shared entries
    (`cached_bias`, `position_embedder_index`) are returned unchanged, because every row
    shares them. A non-scalar `cache_index` (`[batch]`, used with a prefilled cache and
    `initial_index`) is per-row and therefore mapped. The container type (dict or
    FrozenDict) is preserved.

    Args:
      fn: function of one array `[batch, ...] -> [new_batch, ...]`.
      cache: pytree of arrays.

    Returns:
      The cache with `fn` applied to its per-row arrays.
    """

    def apply(path: tuple[Any, ...], x: Any) -> Any:
        if jnp.ndim(x) == 0 or _leaf_name(path) in _SHARED_CACHE_LEAVES:
            return x
        return fn(x)

    return jax.tree_util.tree_map_with_path(apply, cache)


def add_beam_dim(x: jax.Array, beam_size: int) -> jax.Array:
    """Tiles a new beam axis: `[batch, ...] -> [batch, beam_size, ...]`."""
    x = jnp.expand_dims(x, axis=1)
    return jnp.broadcast_to(x, (x.shape[0], beam_size) + x.shape[2:])


def flatten_beam_dim(x: jax.Array) -> jax.Array:
    """Merges batch and beam axes: `[batch, beam, ...] -> [batch * beam, ...]`."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unflatten_beam_dim(x: jax.Array, batch_size: int, beam_size: int) -> jax.Array:
    """Splits the flat axis: `[batch * beam, ...] -> [batch, beam, ...]`.

    Raises:
      ValueError: if the leading axis is not `batch_size * beam_size`.
    """
    if x.shape[0] != batch_size * beam_size:
        raise ValueError(
            f"unflatten_beam_dim: leading axis {x.shape[0]} != batch_size {batch_size} "
            f"* beam_size {beam_size}."
        )
    return x.reshape((batch_size, beam_size) + x.shape[1:])


def flat_batch_beam_expand(x: jax.Array, beam_size: int) -> jax.Array:
    """Repeats every row `beam_size` times: `[batch, ...] -> [batch * beam_size, ...]`.

    Row `b * beam_size + k` is copy `k` of row `b` (batch-major), which is the layout
    `unflatten_beam_dim` undoes. Apply it to a whole cache with
    `cache_map(lambda x: flat_batch_beam_expand(x, beams), cache)`.
    """
    return flatten_beam_dim(add_beam_dim(x, beam_size))


def gather_beams(nested: PyTree, beam_indices: jax.Array) -> PyTree:
    """Selects beams per example: `[batch, old_beam, ...] -> [batch, new_beam, ...]`.

    Args:
      nested: pytree of arrays `[batch, old_beam, ...]` (scalars are left alone).
      beam_indices: `[batch, new_beam]` int indices into `old_beam`.

    Returns:
      The pytree with `out[b, j] = x[b, beam_indices[b, j]]`.
    """
    batch_indices = jnp.arange(beam_indices.shape[0])[:, None]

    def gather(x: jax.Array) -> jax.Array:
        if jnp.ndim(x) == 0:
            return x
        return x[batch_indices, beam_indices]

    return jax.tree.map(gather, nested)


def cache_gather_beams(cache: PyTree, beam_indices: jax.Array, old_beam_size: int) -> PyTree:
    """Selects beams of a *flat* cache: `[batch * old_beam, ...] -> [batch * new_beam, ...]`.

    The cache stays flat between steps (the layout `tokens_to_logits` wants), so the beam
    choice `[batch, new_beam]` is turned into flat row indices `b * old_beam + beam`.
    Scalars such as `cache_index` are untouched (see `cache_map`).
    """
    batch_size = beam_indices.shape[0]
    flat_rows = (jnp.arange(batch_size)[:, None] * old_beam_size + beam_indices).reshape(-1)
    return cache_map(lambda x: jnp.take(x, flat_rows, axis=0), cache)


def _like_container(reference: PyTree, new: PyTree) -> PyTree:
    """Makes `new` the same dict/FrozenDict flavour as `reference` (lax loops need it)."""
    if isinstance(reference, flax.core.FrozenDict) and not isinstance(new, flax.core.FrozenDict):
        return flax.core.freeze(new)
    if isinstance(reference, dict) and isinstance(new, flax.core.FrozenDict):
        return flax.core.unfreeze(new)
    return new


def _batch_axis_first(
    cache: PyTree, tokens_to_logits: TokensToLogits, cache_offset: int
) -> tuple[PyTree, TokensToLogits]:
    """Handles t5x's `cache_offset`: the cache's batch axis is `cache_offset` (1 for
    scanned layers, whose cache arrays are `[layers, batch, ...]`), not 0.

    The decoders work on a batch-first cache, so the per-row arrays (rank above
    `cache_offset`; see `cache_map`) are moved to batch-first here, and the returned
    `tokens_to_logits` moves them back around every model call. Offset 0 returns both
    unchanged.

    Raises:
      ValueError: for a negative or non-int offset.
    """
    if not isinstance(cache_offset, (int, np.integer)) or cache_offset < 0:
        raise ValueError(f"cache_offset must be a static int >= 0; got {cache_offset!r}.")
    if cache_offset == 0:
        return cache, tokens_to_logits

    def move(x: jax.Array, source: int, destination: int) -> jax.Array:
        return jnp.moveaxis(x, source, destination) if jnp.ndim(x) > cache_offset else x

    def to_front(c: PyTree) -> PyTree:
        return cache_map(lambda x: move(x, cache_offset, 0), c)

    def to_model(c: PyTree) -> PyTree:
        return cache_map(lambda x: move(x, 0, cache_offset), c)

    def step(state: DecodingState) -> tuple[jax.Array, PyTree]:
        logits, new_cache = tokens_to_logits(state.replace(cache=to_model(state.cache)))
        return logits, to_front(new_cache)

    return to_front(cache), step


def _call_model(
    tokens_to_logits: TokensToLogits, state: DecodingState, num_rows: int
) -> tuple[jax.Array, PyTree]:
    logits, new_cache = tokens_to_logits(state)
    if logits.ndim != 2 or logits.shape[0] != num_rows:
        raise ValueError(
            f"tokens_to_logits must return logits [batch * beams, vocab] = [{num_rows}, V]; "
            f"got shape {tuple(logits.shape)}."
        )
    return logits.astype(jnp.float32), _like_container(state.cache, new_cache)


def _validate_inputs(inputs: jax.Array, name: str) -> jax.Array:
    inputs = jnp.asarray(inputs)
    if inputs.ndim != 2:
        raise ValueError(
            f"{name}: inputs must be [batch, length] decoder input tokens; "
            f"got shape {tuple(inputs.shape)}."
        )
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(f"{name}: inputs must be integer tokens; got dtype {inputs.dtype}.")
    return inputs.astype(jnp.int32)


def _is_static(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


# ----------------------------------------------------------------------------------------
# Logit filtering
# ----------------------------------------------------------------------------------------


def topk_mask(logits: jax.Array, k: int, replace_val: float = NEG_INF) -> jax.Array:
    """Keeps the `k` largest logits per row and sets the rest to `replace_val`.

    As in t5x, every value equal to the k-th largest is kept, so ties can keep more than
    `k` entries.

    Args:
      logits: `[..., vocab]` float array.
      k: static number of entries to keep, `1 <= k <= vocab`.
      replace_val: value written at the masked positions.

    Returns:
      `[..., vocab]` masked logits.
    """
    kth_largest = lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth_largest, logits, replace_val)


def topp_mask(logits: jax.Array, p: float | jax.Array, replace_val: float = NEG_INF) -> jax.Array:
    """Nucleus filtering: keeps the smallest set of top tokens whose mass is at least `p`.

    Probabilities are `softmax(logits)`. With the probabilities sorted in decreasing
    order, the kept set is the prefix whose cumulative sum first reaches `p`; every token
    whose probability equals the last kept one is kept too (t5x's threshold semantics).
    If rounding keeps the total below `p` (e.g. `p = 1`), everything is kept.

    Args:
      logits: `[..., vocab]` float array.
      p: probability mass in `(0, 1]` (may be traced).
      replace_val: value written at the masked positions.

    Returns:
      `[..., vocab]` masked logits.
    """
    vocab = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    cumulative = jnp.cumsum(sorted_probs, axis=-1)
    # Tokens before the one that reaches p, plus that one.
    num_kept = jnp.minimum(jnp.sum(cumulative < p, axis=-1, keepdims=True) + 1, vocab)
    threshold = jnp.take_along_axis(sorted_probs, num_kept - 1, axis=-1)
    return jnp.where(probs >= threshold, logits, replace_val)


def _sample_next(
    logits: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    topk: int,
    topp: float | jax.Array,
    rescale_log_probs: bool,
) -> tuple[jax.Array, jax.Array]:
    """One sampling step: `[rows, vocab]` logits -> (`[rows]` tokens, `[rows]` log-probs)."""
    # temperature is a scalar or one value per row.
    temp = temperature if temperature.ndim == 0 else temperature[:, None]
    greedy_rows = temperature <= MIN_TEMPERATURE
    scaled = logits / jnp.maximum(temp, MIN_TEMPERATURE)
    if topk:
        scaled = topk_mask(scaled, topk)
    if not _is_static(topp):
        # A traced topp is always applied; topp == 0 means "no filtering", as t5x documents.
        scaled = jnp.where(topp > 0, topp_mask(scaled, topp), scaled)
    elif topp:
        scaled = topp_mask(scaled, topp)
    sampled = jax.random.categorical(rng, scaled, axis=-1)
    # Temperature 0 is greedy on the raw logits whatever topk/topp say (t5x).
    token = jnp.where(greedy_rows, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)

    def log_prob_of(x: jax.Array) -> jax.Array:
        return jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), token[:, None], axis=-1)[:, 0]

    if rescale_log_probs:
        # Log-prob under the distribution actually sampled from; a greedy pick has
        # probability 1.
        log_prob = jnp.where(greedy_rows, 0.0, log_prob_of(scaled))
    else:
        log_prob = log_prob_of(logits)
    return token, log_prob


# ----------------------------------------------------------------------------------------
# Temperature sampling
# ----------------------------------------------------------------------------------------


@flax.struct.dataclass
class _SamplingState:
    cur_index: jax.Array  # [rows] int32
    sequences: jax.Array  # [rows, length + 2] int32
    cache: PyTree
    cur_token: jax.Array  # [rows, 1] int32
    ended: jax.Array  # [rows] bool
    rng: jax.Array
    log_prob: jax.Array  # [rows] float32


def temperature_sample(
    inputs: jax.Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    decode_rng: jax.Array | None = None,
    num_decodes: int = 1,
    temperature: float | jax.Array = 1.0,
    topk: int = 1,
    topp: float | jax.Array = 0.0,
    cache_offset: int = 0,
    initial_index: jax.Array | None = None,
    max_decode_steps: int | jax.Array | None = None,
    max_decode_steps_hard_limit: int | None = None,
    rescale_log_probs: bool = True,
    state_callback_fn: Callable[[Any], Any] | None = None,
    logit_callback_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Samples `num_decodes` continuations per example (t5x's `temperature_sample`).

    Decoding runs in a `lax.while_loop` that stops as soon as every row has ended (emitted
    `eos_id` or filled its length). Prompt tokens (non-zero `inputs` after position 0)
    are teacher-forced and do not count towards the log-probability.

    Note that t5x's default `topk=1` makes sampling greedy; pass `topk=0` for plain
    temperature sampling or to use `topp`.

    Args:
      inputs: `[batch, length]` int decoder input tokens (BOS 0 first, then an optional
        prompt prefix, zeros to generate).
      cache: decoder cache for `batch` rows (see module docstring).
      tokens_to_logits: the model step, see `DecodingState`.
      eos_id: end-of-sequence token.
      decode_rng: PRNG key (default `PRNGKey(0)`).
      num_decodes: static number of samples per example.
      temperature: scalar or `[batch]`; `<= 1e-4` means greedy.
      topk: static; if > 0 sample only among the `topk` largest logits.
      topp: if > 0 sample only from the nucleus of mass `topp` (`topk` must then be 0).
      initial_index: optional `[batch]` int32 position to start at, for a cache already
        filled up to (excluding) that position; `cur_token` is then
        `inputs[b, initial_index[b]]` and the cache's `cache_index` should be `[batch]`.
      max_decode_steps: optional number of tokens to generate after the prompt (its
        non-zero tokens), at most `length`.
      max_decode_steps_hard_limit: optional static cap on `max_decode_steps` (t5x's
        argument; used only when `max_decode_steps` is given and the cap is > 0).
      rescale_log_probs: if True the returned log-probs are under the temperature / top-k
        / top-p distribution actually sampled from (greedy steps add 0); if False, under
        the model's raw logits.
      cache_offset: the cache's batch axis (t5x's argument: 1 for scanned layers).
      state_callback_fn: optional `state -> state` applied to the loop state at the start
        of every step and to the final state (t5x's hook). The state has t5x's
        `SamplingLoopState` fields except `step`: `cur_index [rows]`, `sequences
        [rows, length + 2]`, `cache`, `cur_token [rows, 1]`, `ended [rows]`, `rng`,
        `log_prob [rows]` (rows = batch * num_decodes).
      logit_callback_fn: optional `(logits [rows, vocab], state) -> logits` applied to
        every step's logits before sampling (t5x's hook).

    Returns:
      `(sequences [batch, num_decodes, length] int32, log_probs [batch, num_decodes]
      float32)`, sorted by increasing log-probability (best last).

    Raises:
      ValueError: on malformed inputs or inconsistent options.
    """
    inputs = _validate_inputs(inputs, "temperature_sample")
    batch_size, length = inputs.shape
    if not isinstance(num_decodes, (int, np.integer)) or num_decodes < 1:
        raise ValueError(f"num_decodes must be a positive int; got {num_decodes!r}.")
    if not isinstance(topk, (int, np.integer)) or topk < 0:
        raise ValueError(f"topk must be a static int >= 0 (0 = no top-k); got {topk!r}.")
    if _is_static(topp):
        if not 0.0 <= float(topp) <= 1.0:
            raise ValueError(f"topp must be in [0, 1] (0 = no nucleus filtering); got {topp}.")
        if topp and topk:
            raise ValueError(
                f"At most one of topk ({topk}) and topp ({topp}) may be non-zero; "
                "pass topk=0 to use nucleus sampling."
            )
    if max_decode_steps is not None and _is_static(max_decode_steps):
        if int(max_decode_steps) > length or int(max_decode_steps) < 1:
            raise ValueError(
                f"max_decode_steps must be in [1, inputs length {length}]; got {max_decode_steps}."
            )
    temperature = jnp.asarray(temperature, jnp.float32)
    if temperature.ndim == 1:
        if temperature.shape[0] != batch_size:
            raise ValueError(
                f"A per-example temperature must have shape [batch] = [{batch_size}]; "
                f"got {tuple(temperature.shape)}."
            )
        temperature = jnp.repeat(temperature, num_decodes)
    elif temperature.ndim > 1:
        raise ValueError(f"temperature must be a scalar or [batch]; got {temperature.shape}.")
    if initial_index is not None:
        initial_index = jnp.asarray(initial_index, jnp.int32)
        if initial_index.shape != (batch_size,):
            raise ValueError(
                f"initial_index must have shape [batch] = [{batch_size}]; "
                f"got {tuple(initial_index.shape)}."
            )
    if decode_rng is None:
        decode_rng = jax.random.PRNGKey(0)
    if max_decode_steps is not None and max_decode_steps_hard_limit:
        max_decode_steps = jnp.minimum(max_decode_steps, max_decode_steps_hard_limit)
    cache, tokens_to_logits = _batch_axis_first(cache, tokens_to_logits, cache_offset)

    if num_decodes > 1:
        inputs = flat_batch_beam_expand(inputs, num_decodes)
        cache = cache_map(lambda x: flat_batch_beam_expand(x, num_decodes), cache)
        if initial_index is not None:
            initial_index = flat_batch_beam_expand(initial_index, num_decodes)

    sequences, log_prob = _sample_loop(
        inputs,
        cache,
        tokens_to_logits,
        eos_id,
        decode_rng,
        temperature,
        topk,
        topp,
        initial_index,
        max_decode_steps,
        rescale_log_probs,
        state_callback_fn,
        logit_callback_fn,
    )
    sequences = unflatten_beam_dim(sequences, batch_size, num_decodes)
    log_prob = unflatten_beam_dim(log_prob, batch_size, num_decodes)
    order = jnp.argsort(log_prob, axis=-1)
    return (
        jnp.take_along_axis(sequences, order[:, :, None], axis=1),
        jnp.take_along_axis(log_prob, order, axis=1),
    )


def _sample_loop(
    inputs: jax.Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    rng: jax.Array,
    temperature: jax.Array,
    topk: int,
    topp: float | jax.Array,
    initial_index: jax.Array | None,
    max_decode_steps: int | jax.Array | None,
    rescale_log_probs: bool,
    state_callback_fn: Callable[[Any], Any] | None = None,
    logit_callback_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sampling over flat rows: `[rows, length]` -> (`[rows, length]`, `[rows]`)."""
    num_rows, length = inputs.shape
    # [rows, length + 2]: slot 0 is BOS, slots 1..length receive the outputs, and the
    # last slot is scratch: with `initial_index`, rows that reach their end before the
    # others keep overwriting it until every row is done (t5x's trick).
    sequences0 = jnp.concatenate([inputs, jnp.zeros((num_rows, 2), jnp.int32)], axis=1)

    # Per-row number of output positions; the last write of row r is at slot limit[r].
    if max_decode_steps is None:
        limit = jnp.full((num_rows,), length, jnp.int32)
    else:
        num_prompt = jnp.sum(inputs != 0, axis=1)
        limit = jnp.minimum(length, num_prompt + max_decode_steps).astype(jnp.int32)

    if initial_index is None:
        index0 = jnp.zeros((num_rows,), jnp.int32)
    else:
        index0 = initial_index
    token0 = jnp.take_along_axis(sequences0, index0[:, None], axis=1)

    state0 = _SamplingState(
        cur_index=index0,
        sequences=sequences0,
        cache=cache,
        cur_token=token0,
        ended=jnp.zeros((num_rows,), jnp.bool_),
        rng=rng,
        log_prob=jnp.zeros((num_rows,), jnp.float32),
    )

    def cond_fn(state: _SamplingState) -> jax.Array:
        return ~jnp.all(state.ended)

    def body_fn(state: _SamplingState) -> _SamplingState:
        if state_callback_fn is not None:
            state = state_callback_fn(state)
        rng, step_rng = jax.random.split(state.rng)
        logits, new_cache = _call_model(
            tokens_to_logits,
            DecodingState(
                cur_index=state.cur_index,
                sequences=state.sequences[:, :length],
                cur_token=state.cur_token,
                cache=state.cache,
            ),
            num_rows,
        )
        if logit_callback_fn is not None:
            logits = logit_callback_fn(logits, state)
        token, token_log_prob = _sample_next(
            logits, step_rng, temperature, topk, topp, rescale_log_probs
        )
        # Rows past their limit write to the scratch slot (they have ended already).
        index = jnp.minimum(state.cur_index, limit)
        forced = jnp.take_along_axis(state.sequences, (index + 1)[:, None], axis=1)[:, 0]
        generating = forced == 0
        token = jnp.where(generating, token, forced)
        alive = ~state.ended
        log_prob = state.log_prob + jnp.where(generating & alive, token_log_prob, 0.0)
        token = jnp.where(alive, token, 0)
        sequences = state.sequences.at[jnp.arange(num_rows), index + 1].set(token)
        # EOS ends a row only when generated: an EOS inside the prompt is just input.
        ended = state.ended | (generating & (token == eos_id)) | (index >= limit - 1)
        return _SamplingState(
            cur_index=index + 1,
            sequences=sequences,
            cache=new_cache,
            cur_token=token[:, None],
            ended=ended,
            rng=rng,
            log_prob=log_prob,
        )

    final = lax.while_loop(cond_fn, body_fn, state0)
    if state_callback_fn is not None:
        final = state_callback_fn(final)
    return final.sequences[:, 1:-1], final.log_prob


# ----------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------


def brevity_penalty(alpha: float, length: int | jax.Array) -> jax.Array:
    """GNMT length normalisation `((5 + length) / 6) ** alpha` (t5x's brevity penalty)."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


@flax.struct.dataclass
class _BeamState:
    cur_index: jax.Array  # () int32, position of the current token in the sequences
    live_logprobs: jax.Array  # [batch, beams] float32, ascending
    finished_scores: jax.Array  # [batch, beams] float32, ascending
    live_seqs: jax.Array  # [batch, beams, max_decode_len + 1] int32 (slot 0 = BOS)
    finished_seqs: jax.Array  # [batch, beams, max_decode_len + 1] int32
    finished_flags: jax.Array  # [batch, beams] bool, False for filler slots
    cache: PyTree  # flat [batch * beams, ...]


def beam_search(
    inputs: jax.Array,
    cache: PyTree,
    tokens_to_logits: TokensToLogits,
    eos_id: int,
    num_decodes: int = 4,
    alpha: float = 0.6,
    max_decode_len: int | None = None,
    max_decode_step: int = -1,
    min_log_prob: float = NEG_INF,
    decode_rng: jax.Array | None = None,
    cache_offset: int = 0,
    initial_index: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with t5x's bookkeeping and brevity penalty.

    Keeps `num_decodes` live beams and `num_decodes` finished hypotheses per example. At
    each step the best `2 * beams` extensions are taken (so that even if `beams` of them
    end with EOS there are enough to continue); those ending in EOS compete for the
    finished set with score `log_prob / brevity_penalty(alpha, length)` (length counts
    the tokens including EOS and any prompt), the others for the live set by raw
    log-probability. The loop stops at `max_decode_len` or once, for every example, all
    finished slots are filled and no live beam divided by the largest possible penalty
    can beat the worst finished score. Prompt tokens in `inputs` are forced with
    log-probability 0; unlike t5x, a forced EOS does not finish a beam (the sampler
    treats prompt EOS the same way).

    Args:
      inputs: `[batch, length]` int decoder input tokens (BOS 0, optional prompt, zeros).
      cache: decoder cache for `batch` rows; its per-row arrays are expanded to
        `[batch * beams, ...]` and re-gathered after every step, scalars stay shared.
      tokens_to_logits: the model step, see `DecodingState`.
      eos_id: end-of-sequence token.
      num_decodes: static beam size (= number of returned hypotheses).
      alpha: brevity-penalty exponent.
      max_decode_len: static number of output positions (default `length`).
      max_decode_step: if > 0, stop after this many steps (t5x's hard limit on steps).
      min_log_prob: stop once no example has a live beam whose raw log-probability
        beats `min_log_prob / brevity_penalty(alpha, max_decode_len + 1)` (t5x's early
        exit; the default `NEG_INF` never triggers it).
      decode_rng: unused (beam search is deterministic); accepted for API parity.
      cache_offset: the cache's batch axis (t5x's argument: 1 for scanned layers).
      initial_index: must be None. t5x passes a prompt start index only to decoders
        of networks that prefill the cache (`decode(..., prefill=True)`), which this
        network does not; beam search here teacher-forces prompts token by token.

    Returns:
      `(sequences [batch, num_decodes, max_decode_len] int32, scores [batch, num_decodes]
      float32)` sorted ascending (best last). If an example finished no hypothesis, its
      live beams and their raw log-probabilities are returned instead (as t5x).

    Raises:
      ValueError: on malformed inputs or options.
    """
    del decode_rng
    if initial_index is not None:
        raise ValueError(
            "beam_search: initial_index (a prefilled cache) is not supported; pass None and "
            "keep prompts in `inputs` (they are teacher-forced)."
        )
    cache, tokens_to_logits = _batch_axis_first(cache, tokens_to_logits, cache_offset)
    inputs = _validate_inputs(inputs, "beam_search")
    batch_size, length = inputs.shape
    beams = num_decodes
    if not isinstance(beams, (int, np.integer)) or beams < 1:
        raise ValueError(f"num_decodes (the beam size) must be a positive int; got {beams!r}.")
    if max_decode_len is None:
        max_decode_len = length
    if not isinstance(max_decode_len, (int, np.integer)) or max_decode_len < 1:
        raise ValueError(f"max_decode_len must be a positive static int; got {max_decode_len!r}.")
    seq_len = max_decode_len + 1  # slot 0 holds the BOS token
    num_rows = batch_size * beams

    # forced[:, p] is the prompt token for sequence slot p (0 = generate).
    forced = jnp.zeros((batch_size, seq_len), jnp.int32)
    copy = min(length, seq_len)
    forced = forced.at[:, :copy].set(inputs[:, :copy])

    state0 = _BeamState(
        cur_index=jnp.array(0, jnp.int32),
        # Only beam 0 is alive at first; the others are dead copies that can never win.
        live_logprobs=jnp.tile(
            jnp.array([0.0] + [NEG_INF] * (beams - 1), jnp.float32), (batch_size, 1)
        ),
        finished_scores=jnp.full((batch_size, beams), NEG_INF, jnp.float32),
        live_seqs=jnp.zeros((batch_size, beams, seq_len), jnp.int32),
        finished_seqs=jnp.zeros((batch_size, beams, seq_len), jnp.int32),
        finished_flags=jnp.zeros((batch_size, beams), jnp.bool_),
        cache=cache_map(lambda x: flat_batch_beam_expand(x, beams), cache),
    )

    def cond_fn(state: _BeamState) -> jax.Array:
        not_at_end = state.cur_index < max_decode_len
        # Log-probs only decrease, and the penalty only grows with length, so this is an
        # upper bound on any score a live beam can still reach (t5x uses seq_len too).
        best_live = state.live_logprobs[:, -1:] / brevity_penalty(alpha, seq_len)
        worst_finished = jnp.min(state.finished_scores, axis=1, keepdims=True)
        # Empty finished slots never count as "beats the live beams".
        worst_finished = jnp.where(state.finished_flags, worst_finished, NEG_INF)
        search_over = jnp.all(worst_finished > best_live)
        if max_decode_step > 0:
            search_over = search_over | (state.cur_index >= max_decode_step)
        if min_log_prob > NEG_INF:
            # Raw live log-probs (no penalty) against the threshold, as t5x.
            none_pass = jnp.all(best_live < min_log_prob / brevity_penalty(alpha, seq_len))
            search_over = search_over | (none_pass & (state.cur_index > 0))
        return not_at_end & ~search_over

    def body_fn(state: _BeamState) -> _BeamState:
        cur = state.cur_index
        flat_seqs = flatten_beam_dim(state.live_seqs)  # [rows, seq_len]
        logits, new_cache = _call_model(
            tokens_to_logits,
            DecodingState(
                cur_index=jnp.full((num_rows,), cur, jnp.int32),
                sequences=flat_seqs[:, :max_decode_len],
                cur_token=lax.dynamic_slice_in_dim(flat_seqs, cur, 1, axis=1),
                cache=state.cache,
            ),
            num_rows,
        )
        vocab = logits.shape[-1]
        if beams * vocab < 2 * beams:
            raise ValueError(f"beam_search needs a vocabulary of at least 2; got {vocab}.")
        # [batch, beams, vocab]
        log_probs = jax.nn.log_softmax(unflatten_beam_dim(logits, batch_size, beams))
        log_probs = log_probs + state.live_logprobs[:, :, None]
        # Best 2*beams extensions over all beams: [batch, 2 * beams]
        cand_log_probs, cand_flat = lax.top_k(
            log_probs.reshape(batch_size, beams * vocab), 2 * beams
        )
        cand_beam = cand_flat // vocab
        cand_token = cand_flat % vocab

        # Teacher-force the prompt: one candidate carries the forced token with log-prob
        # 0 (from the best beam), the others are dead.
        forced_token = lax.dynamic_index_in_dim(forced, cur + 1, axis=1, keepdims=True)
        in_prompt = forced_token != 0  # [batch, 1]
        prompt_log_probs = jnp.concatenate(
            [
                jnp.zeros((batch_size, 1), jnp.float32),
                jnp.full((batch_size, 2 * beams - 1), NEG_INF, jnp.float32),
            ],
            axis=1,
        )
        cand_log_probs = jnp.where(in_prompt, prompt_log_probs, cand_log_probs)
        cand_token = jnp.where(in_prompt, forced_token, cand_token)

        # [batch, 2 * beams, seq_len]
        cand_seqs = gather_beams(state.live_seqs, cand_beam)
        cand_seqs = lax.dynamic_update_slice(cand_seqs, cand_token[:, :, None], (0, 0, cur + 1))
        just_finished = (cand_token == eos_id) & ~in_prompt

        # Live set: best `beams` candidates that did not just end (ascending order).
        live_candidates = cand_log_probs + jnp.where(just_finished, NEG_INF, 0.0)
        keep = jnp.flip(lax.top_k(live_candidates, beams)[1], axis=1)
        live_seqs, live_logprobs, source_beam = gather_beams(
            (cand_seqs, live_candidates, cand_beam), keep
        )
        cache = cache_gather_beams(new_cache, source_beam, beams)

        # Finished set: merge the old finished hypotheses with the new ones by score.
        new_scores = cand_log_probs / brevity_penalty(alpha, cur + 1)
        new_scores = new_scores + jnp.where(just_finished, 0.0, NEG_INF)
        all_seqs = jnp.concatenate([state.finished_seqs, cand_seqs], axis=1)
        all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
        all_flags = jnp.concatenate([state.finished_flags, just_finished], axis=1)
        best = jnp.flip(lax.top_k(all_scores, beams)[1], axis=1)
        finished_seqs, finished_scores, finished_flags = gather_beams(
            (all_seqs, all_scores, all_flags), best
        )
        return _BeamState(
            cur_index=cur + 1,
            live_logprobs=live_logprobs,
            finished_scores=finished_scores,
            live_seqs=live_seqs,
            finished_seqs=finished_seqs,
            finished_flags=finished_flags,
            cache=cache,
        )

    final = lax.while_loop(cond_fn, body_fn, state0)

    any_finished = jnp.any(final.finished_flags, axis=1)
    sequences = jnp.where(any_finished[:, None, None], final.finished_seqs, final.live_seqs)
    scores = jnp.where(any_finished[:, None], final.finished_scores, final.live_logprobs)
    return sequences[:, :, 1:], scores
