"""Tests for `hyperprompt_jax.decoding` against NumPy / brute-force references.

The model is a toy second-order Markov chain whose state lives in a t5x-shaped decoder
cache: a scalar `cache_index`, a `cached_key` `[batch, heads, head_dim, length]` that the
toy writes the current token into (and reads the previous token back from), and a
per-example `encoded_bias` `[batch, vocab]` standing in for the encoder output. Wrong
beam expansion or gathering of the cache would therefore change the logits, so matching
the references proves the cache plumbing, not only the search logic.
"""

from __future__ import annotations

import functools
import itertools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import decoding

EOS = 1
HEADS, HEAD_DIM = 2, 3


# ----------------------------------------------------------------------------------------
# Toy model and NumPy references
# ----------------------------------------------------------------------------------------


class ToyChain:
    """logits(history) = t1[current token] + t2[previous token] + bias[example]."""

    def __init__(self, vocab: int, seed: int, scale: float = 1.5):
        rng = np.random.RandomState(seed)
        self.vocab = vocab
        self.t1 = (rng.normal(size=(vocab, vocab)) * scale).astype(np.float32)
        self.t2 = rng.normal(size=(vocab, vocab)).astype(np.float32)
        self.calls: list[int] = []

    # --- JAX side -------------------------------------------------------------------
    def init_cache(self, bias: np.ndarray, length: int, prefix=None, index=None) -> dict:
        """Cache for `bias.shape[0]` rows; optionally prefilled with `prefix` tokens."""
        keys = np.zeros((bias.shape[0], HEADS, HEAD_DIM, length), np.float32)
        if prefix is not None:
            for row, tokens in enumerate(prefix):
                keys[row, :, :, : len(tokens)] = np.asarray(tokens, np.float32)
        cache_index = np.int32(0) if index is None else np.asarray(index, np.int32)
        return {
            "decoder": {
                "encoded_bias": jnp.asarray(bias),
                "layers_0": {
                    "self_attention": {
                        "cached_key": jnp.asarray(keys),
                        "cache_index": jnp.asarray(cache_index),
                    }
                },
            }
        }

    def tokens_to_logits(self, state: decoding.DecodingState):
        attention = state.cache["decoder"]["layers_0"]["self_attention"]
        index, keys = attention["cache_index"], attention["cached_key"]
        bias = state.cache["decoder"]["encoded_bias"]
        rows, _, _, length = keys.shape
        index_rows = jnp.broadcast_to(index, (rows,))
        previous = jnp.take_along_axis(
            keys[:, 0, 0, :], jnp.maximum(index_rows - 1, 0)[:, None], axis=1
        )[:, 0]
        previous = jnp.where(index_rows > 0, previous, 0.0).astype(jnp.int32)
        token = state.cur_token[:, 0]
        logits = jnp.asarray(self.t1)[token] + jnp.asarray(self.t2)[previous] + bias
        write = (jnp.arange(length)[None, :] == index_rows[:, None])[:, None, None, :]
        keys = jnp.where(write, token.astype(keys.dtype)[:, None, None, None], keys)
        new_cache = {
            "decoder": {
                "encoded_bias": bias,
                "layers_0": {"self_attention": {"cached_key": keys, "cache_index": index + 1}},
            }
        }
        return logits, new_cache

    def counted_tokens_to_logits(self, state: decoding.DecodingState):
        jax.debug.callback(lambda i: self.calls.append(1), state.cur_index)
        return self.tokens_to_logits(state)

    # --- NumPy side -----------------------------------------------------------------
    def np_logits(self, bias: np.ndarray, history: list[int]) -> np.ndarray:
        previous = history[-2] if len(history) >= 2 else 0
        return (self.t1[history[-1]] + self.t2[previous] + bias).astype(np.float64)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def np_filtered_log_probs(logits, temperature=1.0, topk=0, topp=0.0) -> np.ndarray:
    """Log of the distribution t5x samples from (-inf outside the kept set)."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones_like(x, bool)
    if topk:
        keep &= x >= np.sort(x)[-topk]
    if topp:
        probs = np.exp(np_log_softmax(x))
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        num_kept = min(int(np.sum(cumulative < topp)) + 1, len(x))
        keep &= probs >= probs[order[num_kept - 1]]
    masked = np.where(keep, x, -np.inf)
    return masked - np.log(np.exp(masked - masked.max()).sum()) - masked.max()


def np_greedy(model: ToyChain, bias, inputs_row, steps=None):
    """Step-by-step argmax with teacher-forced prompt and EOS padding (t5x semantics)."""
    length = len(inputs_row)
    limit = length if steps is None else min(length, int(np.sum(inputs_row != 0)) + steps)
    history, out, log_prob, ended = [0], [], 0.0, False
    for j in range(length):
        logits = model.np_logits(bias, history)
        forced = int(inputs_row[j + 1]) if j + 1 < length else 0
        if ended or j >= limit:
            token = 0
        elif forced:
            token = forced
        else:
            token = int(np.argmax(logits))
            log_prob += np_log_softmax(logits)[token]
            ended = token == EOS
        out.append(token)
        history.append(token)
    return np.array(out), log_prob


def np_sequence_log_prob(model, bias, inputs_row, out_row, **filtering) -> float:
    """Log-probability of a sampled output under the filtered distributions."""
    history, total = [0], 0.0
    for j, token in enumerate(out_row):
        forced = int(inputs_row[j + 1]) if j + 1 < len(inputs_row) else 0
        if not forced:
            logits = model.np_logits(bias, history)
            total += np_filtered_log_probs(logits, **filtering)[token]
            if token == EOS:
                assert np.all(out_row[j + 1 :] == 0), "no padding after EOS"
                break
        history.append(int(token))
    return total


def brevity(alpha: float, length: int) -> float:
    return ((5.0 + length) / 6.0) ** alpha


def np_beam_search(model, bias, inputs_row, beams, max_len, alpha):
    """Reference beam search over real hypotheses only (no padded dead beams)."""
    live = [([0], 0.0)]
    finished = []  # (score, history)
    for cur in range(max_len):
        forced = int(inputs_row[cur + 1]) if cur + 1 < len(inputs_row) else 0
        if forced:
            best = max(live, key=lambda item: item[1])
            live = [(best[0] + [forced], 0.0)]
            continue
        candidates = []
        for history, log_prob in live:
            step = np_log_softmax(model.np_logits(bias, history))
            candidates += [(log_prob + step[t], history + [t]) for t in range(model.vocab)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beams]
        finished += [(lp / brevity(alpha, cur + 1), h) for lp, h in candidates if h[-1] == EOS]
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        live = [(h, lp) for lp, h in candidates if h[-1] != EOS][:beams]
    chosen = finished if finished else [(lp, h) for h, lp in live]
    chosen = sorted(chosen, key=lambda f: f[0])  # ascending, best last
    seqs = np.zeros((len(chosen), max_len), np.int64)
    for k, (_, history) in enumerate(chosen):
        seqs[k, : len(history) - 1] = history[1:]
    return seqs, np.array([score for score, _ in chosen]), bool(finished)


# ----------------------------------------------------------------------------------------
# Shared fixtures: one toy, one set of inputs, jitted decoders reused across tests
# ----------------------------------------------------------------------------------------

VOCAB, LENGTH = 12, 8


@pytest.fixture(scope="module")
def chain():
    return ToyChain(VOCAB, seed=5)


@pytest.fixture(scope="module")
def batch(chain):
    bias = np.random.RandomState(105).normal(size=(3, VOCAB)).astype(np.float32)
    inputs = np.zeros((3, LENGTH), np.int32)
    inputs[1, 1:3] = [5, 6]  # a teacher-forced prompt prefix
    refs = [np_greedy(chain, bias[i], inputs[i]) for i in range(3)]
    ends = [EOS in ref for ref, _ in refs]
    # The data must exercise both an EOS stop and a row that runs to the end.
    assert any(ends) and not all(ends), refs
    return bias, inputs, refs


def _sampler(chain, **kwargs):
    return jax.jit(
        functools.partial(
            decoding.temperature_sample,
            tokens_to_logits=chain.tokens_to_logits,
            eos_id=EOS,
            **kwargs,
        )
    )


# ----------------------------------------------------------------------------------------
# Temperature sampling
# ----------------------------------------------------------------------------------------


def test_greedy_matches_numpy_argmax_reference(chain, batch):
    bias, inputs, refs = batch
    sample = _sampler(chain, temperature=0.0, rescale_log_probs=False)
    seqs, log_probs = sample(inputs, chain.init_cache(bias, LENGTH))
    assert seqs.shape == (3, 1, LENGTH) and log_probs.shape == (3, 1)
    for i, (ref, ref_log_prob) in enumerate(refs):
        np.testing.assert_array_equal(seqs[i, 0], ref)
        np.testing.assert_allclose(log_probs[i, 0], ref_log_prob, rtol=1e-5, atol=1e-5)
    # The prompt prefix is kept verbatim.
    np.testing.assert_array_equal(seqs[1, 0, :2], [5, 6])


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=1.0, topk=1),  # top-1 sampling is greedy
        dict(temperature=0.7, topk=0, topp=1e-6),  # a tiny nucleus is the argmax
        dict(temperature=0.0, topk=0),  # temperature 0 ignores topk / topp
    ],
)
def test_degenerate_sampling_is_greedy(chain, batch, options):
    bias, inputs, refs = batch
    seqs, log_probs = _sampler(chain, num_decodes=2, **options)(
        inputs, chain.init_cache(bias, LENGTH), decode_rng=jax.random.PRNGKey(3)
    )
    for i, (ref, _) in enumerate(refs):
        for k in range(2):  # every decode of example i follows example i's cache/bias
            np.testing.assert_array_equal(seqs[i, k], ref)
    # Rescaled log-probs of a deterministic choice are 0.
    np.testing.assert_allclose(log_probs, 0.0, atol=1e-6)


@pytest.mark.parametrize(
    "filtering",
    [dict(temperature=0.8), dict(temperature=0.8, topk=4), dict(temperature=1.3, topp=0.7)],
)
def test_sampling_distribution_and_log_probs(chain, batch, filtering):
    bias, inputs, _ = batch
    bias, inputs = bias[:2], inputs[:2, :4]
    num_decodes = 2000
    seqs, log_probs = _sampler(
        chain,
        num_decodes=num_decodes,
        temperature=filtering["temperature"],
        topk=filtering.get("topk", 0),
        topp=filtering.get("topp", 0.0),
    )(inputs, chain.init_cache(bias, 4), decode_rng=jax.random.PRNGKey(0))
    seqs, log_probs = np.asarray(seqs), np.asarray(log_probs)
    assert np.all(np.diff(log_probs, axis=1) >= 0), "decodes sorted by log-prob, best last"
    for i in range(2):
        # Exact: every sample's reported log-prob is its probability under the filtered
        # distributions (a token outside the kept set would give -inf here).
        expected = [
            np_sequence_log_prob(chain, bias[i], inputs[i], seqs[i, k], **filtering)
            for k in range(num_decodes)
        ]
        np.testing.assert_allclose(log_probs[i], expected, rtol=1e-4, atol=1e-4)
        # Statistical: the first generated token follows the filtered distribution.
        position = int(np.sum(inputs[i] != 0))  # outputs before it are the prompt
        history = [0] + [int(t) for t in inputs[i, 1 : position + 1]]
        probs = np.exp(np_filtered_log_probs(chain.np_logits(bias[i], history), **filtering))
        freq = np.bincount(seqs[i, :, position], minlength=VOCAB) / num_decodes
        assert np.all(freq[probs == 0] == 0)
        np.testing.assert_allclose(freq, probs, atol=0.04)
    if "topk" in filtering or "topp" in filtering:
        assert np.sum(probs > 0) < VOCAB, "the filter must actually remove tokens"


def test_masks_match_numpy():
    rng = np.random.RandomState(0)
    logits = rng.normal(size=(6, VOCAB)).astype(np.float32)
    logits[0, [2, 5, 7]] = 3.0  # a tie at the top
    for k in (1, 3, VOCAB):
        masked = np.asarray(decoding.topk_mask(jnp.asarray(logits), k))
        for row in range(6):
            keep = logits[row] >= np.sort(logits[row])[-k]
            np.testing.assert_array_equal(masked[row] > decoding.NEG_INF, keep)
            np.testing.assert_array_equal(masked[row][keep], logits[row][keep])
    # Ties at the k-th value are all kept (t5x's semantics).
    assert np.sum(np.asarray(decoding.topk_mask(jnp.asarray(logits[:1]), 1)) > -1e6) == 3
    for p in (0.05, 0.5, 0.9, 1.0):
        masked = np.asarray(decoding.topp_mask(jnp.asarray(logits), p))
        for row in range(6):
            keep = np.isfinite(np_filtered_log_probs(logits[row], topp=p))
            np.testing.assert_array_equal(masked[row] > decoding.NEG_INF, keep)
            kept_mass = np.exp(np_log_softmax(logits[row].astype(np.float64)))[keep].sum()
            assert kept_mass >= p - 1e-6


def test_initial_index_with_prefilled_cache(chain, batch):
    bias = batch[0][:2]
    inputs = np.zeros((2, LENGTH), np.int32)
    inputs[0, 1:3] = [5, 6]
    inputs[1, 1] = 7
    initial_index = np.array([2, 1], np.int32)
    # Cache filled for positions < initial_index, as a prefix-encoding step would leave it;
    # the cache index is then per row.
    cache = chain.init_cache(bias, LENGTH, prefix=[[0, 5], [0]], index=initial_index)
    sample = _sampler(chain, temperature=0.0, num_decodes=2)
    seqs, _ = sample(inputs, cache, initial_index=initial_index)
    for i in range(2):
        ref, _ = np_greedy(chain, bias[i], inputs[i])
        np.testing.assert_array_equal(seqs[i, 0], ref)
        np.testing.assert_array_equal(seqs[i, 1], ref)


def test_max_decode_steps(chain, batch):
    bias, inputs, _ = batch
    sample = _sampler(chain, temperature=0.0, max_decode_steps=2, rescale_log_probs=False)
    seqs, log_probs = sample(inputs, chain.init_cache(bias, LENGTH))
    for i in range(3):
        ref, ref_log_prob = np_greedy(chain, bias[i], inputs[i], steps=2)
        np.testing.assert_array_equal(seqs[i, 0], ref)
        np.testing.assert_allclose(log_probs[i, 0], ref_log_prob, rtol=1e-5)
    assert np.all(np.asarray(seqs)[:, 0, 4:] == 0)


def test_loop_stops_when_every_row_ended():
    chain = ToyChain(VOCAB, seed=5)
    bias = np.zeros((2, VOCAB), np.float32)
    bias[:, EOS] = 3.0  # make EOS likely so both rows end early
    inputs = np.zeros((2, LENGTH), np.int32)
    refs = [np_greedy(chain, bias[i], inputs[i])[0] for i in range(2)]
    expected_calls = max(int(np.argmax(ref == EOS)) + 1 for ref in refs)
    assert all(EOS in ref for ref in refs) and expected_calls < LENGTH, refs
    sample = jax.jit(
        functools.partial(
            decoding.temperature_sample,
            tokens_to_logits=chain.counted_tokens_to_logits,
            eos_id=EOS,
            temperature=0.0,
        )
    )
    seqs, _ = sample(inputs, chain.init_cache(bias, LENGTH))
    jax.effects_barrier()
    np.testing.assert_array_equal(np.asarray(seqs)[:, 0], np.stack(refs))
    assert len(chain.calls) == expected_calls


def test_per_example_temperature(chain, batch):
    bias, inputs, refs = batch
    sample = _sampler(chain, num_decodes=4, topk=0)
    temperature = jnp.array([0.0, 5.0, 0.0])
    seqs, _ = sample(inputs, chain.init_cache(bias, LENGTH), temperature=temperature)
    seqs = np.asarray(seqs)
    for i in (0, 2):
        assert np.all(seqs[i] == refs[i][0])
    # A hot row does not collapse to a single sample.
    assert len({tuple(s) for s in seqs[1]}) > 1


def test_sampling_validation_errors(chain, batch):
    bias, inputs, _ = batch
    cache = chain.init_cache(bias, LENGTH)
    sample = functools.partial(
        decoding.temperature_sample, tokens_to_logits=chain.tokens_to_logits, eos_id=EOS
    )
    with pytest.raises(ValueError, match="At most one of topk"):
        sample(inputs, cache, topk=3, topp=0.5)
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        sample(inputs[0], cache)
    with pytest.raises(ValueError, match="num_decodes"):
        sample(inputs, cache, num_decodes=0)
    with pytest.raises(ValueError, match="max_decode_steps"):
        sample(inputs, cache, max_decode_steps=LENGTH + 1)
    with pytest.raises(ValueError, match="temperature"):
        sample(inputs, cache, temperature=jnp.ones(5))
    with pytest.raises(ValueError, match="tokens_to_logits must return"):
        decoding.temperature_sample(
            inputs, cache, lambda s: (jnp.zeros((1, VOCAB)), s.cache), eos_id=EOS
        )


# ----------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------


def test_beam_search_equals_exhaustive_search():
    vocab, max_len, alpha = 4, 3, 0.6
    chain = ToyChain(vocab, seed=11, scale=1.0)
    bias = np.random.RandomState(7).normal(size=(2, vocab)).astype(np.float32)
    inputs = np.zeros((2, max_len), np.int32)
    # 18 beams keep every hypothesis alive: 2*18 >= 9 live prefixes x 4 tokens, and the
    # 1 + 3 + 9 = 13 possible finished sequences all fit in the finished set.
    beams = 18
    search = jax.jit(
        functools.partial(
            decoding.beam_search,
            tokens_to_logits=chain.tokens_to_logits,
            eos_id=EOS,
            num_decodes=beams,
            alpha=alpha,
        )
    )
    cache = flax.core.freeze(chain.init_cache(bias, max_len))  # FrozenDict caches work too
    seqs, scores = search(inputs, cache)
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    assert seqs.shape == (2, beams, max_len) and scores.shape == (2, beams)
    for i in range(2):
        brute = {}
        for tokens in itertools.product(range(vocab), repeat=max_len):
            if EOS not in tokens:
                continue
            n = tokens.index(EOS) + 1
            history, log_prob = [0], 0.0
            for t in tokens[:n]:
                log_prob += np_log_softmax(chain.np_logits(bias[i], history))[t]
                history.append(t)
            brute[tokens[:n] + (0,) * (max_len - n)] = log_prob / brevity(alpha, n)
        ranked = sorted(brute.items(), key=lambda item: item[1])
        assert len(ranked) == 13
        real = scores[i] > -1e5
        assert real.sum() == 13 and np.all(real[-13:])
        np.testing.assert_array_equal(seqs[i, -13:], np.array([s for s, _ in ranked]))
        np.testing.assert_allclose(scores[i, -13:], [v for _, v in ranked], rtol=1e-5)


def test_beam_search_matches_reference_with_pruning_prompt_and_fallback(chain):
    beams, max_len, alpha = 3, 6, 0.6
    bias = np.random.RandomState(3).normal(size=(3, VOCAB)).astype(np.float32)
    bias[2, EOS] = -1e4  # example 2 can never finish: live beams are returned
    inputs = np.zeros((3, max_len), np.int32)
    inputs[1, 1] = 5  # teacher-forced prompt token
    search = jax.jit(
        functools.partial(
            decoding.beam_search,
            tokens_to_logits=chain.tokens_to_logits,
            eos_id=EOS,
            num_decodes=beams,
            alpha=alpha,
        )
    )
    seqs, scores = search(inputs, chain.init_cache(bias, max_len))
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    any_finished = []
    for i in range(3):
        ref_seqs, ref_scores, finished = np_beam_search(
            chain, bias[i], inputs[i], beams, max_len, alpha
        )
        any_finished.append(finished)
        n = len(ref_scores)
        np.testing.assert_array_equal(seqs[i, beams - n :], ref_seqs)
        np.testing.assert_allclose(scores[i, beams - n :], ref_scores, rtol=1e-5)
        assert np.all(scores[i, : beams - n] < -1e6)  # unfilled finished slots
    assert any_finished[0] and any_finished[1] and not any_finished[2]
    assert np.all(seqs[1, :, 0] == 5)


def test_beam_search_stops_early_without_changing_results():
    beams, max_len, alpha = 2, 8, 0.6
    chain = ToyChain(VOCAB, seed=2)
    bias = np.random.RandomState(4).normal(size=(2, VOCAB)).astype(np.float32)
    bias[:, EOS] = 6.0  # EOS is very likely, so the finished set fills at once
    inputs = np.zeros((2, max_len), np.int32)
    search = jax.jit(
        functools.partial(
            decoding.beam_search,
            tokens_to_logits=chain.counted_tokens_to_logits,
            eos_id=EOS,
            num_decodes=beams,
            alpha=alpha,
        )
    )
    seqs, scores = search(inputs, chain.init_cache(bias, max_len))
    jax.effects_barrier()
    assert 0 < len(chain.calls) < max_len
    for i in range(2):
        ref_seqs, ref_scores, _ = np_beam_search(chain, bias[i], inputs[i], beams, max_len, alpha)
        np.testing.assert_array_equal(np.asarray(seqs)[i], ref_seqs)
        np.testing.assert_allclose(np.asarray(scores)[i], ref_scores, rtol=1e-5)


def test_beam_helpers():
    x = jnp.arange(6).reshape(2, 3)
    expanded = decoding.flat_batch_beam_expand(x, 2)
    np.testing.assert_array_equal(expanded, [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    np.testing.assert_array_equal(decoding.unflatten_beam_dim(expanded, 2, 2)[1, 1], [3, 4, 5])
    with pytest.raises(ValueError, match="batch_size"):
        decoding.unflatten_beam_dim(expanded, 3, 2)

    beams = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)  # [batch, beam, length]
    picked = decoding.gather_beams(beams, jnp.array([[2, 0], [1, 1]]))
    np.testing.assert_array_equal(picked, np.asarray(beams)[[[0, 0], [1, 1]], [[2, 0], [1, 1]]])

    cache = {
        "layer": {
            "cache_index": jnp.array(3, jnp.int32),
            "cached_key": jnp.arange(2 * 5).reshape(2, 5),
            "cached_bias": jnp.ones((1, 4)),
        }
    }
    expanded_cache = decoding.cache_map(lambda a: decoding.flat_batch_beam_expand(a, 3), cache)
    assert expanded_cache["layer"]["cache_index"].shape == ()
    assert expanded_cache["layer"]["cached_bias"].shape == (1, 4)
    assert expanded_cache["layer"]["cached_key"].shape == (6, 5)
    gathered = decoding.cache_gather_beams(
        expanded_cache, jnp.array([[2, 2, 0], [1, 0, 0]]), old_beam_size=3
    )
    np.testing.assert_array_equal(gathered["layer"]["cached_key"][:, 0], [0, 0, 0, 5, 5, 5])
    assert int(gathered["layer"]["cache_index"]) == 3
    np.testing.assert_allclose(decoding.brevity_penalty(0.6, 7), 2.0**0.6, rtol=1e-6)


def test_beam_search_validation_errors(chain):
    inputs = np.zeros((1, 4), np.int32)
    cache = chain.init_cache(np.zeros((1, VOCAB), np.float32), 4)
    with pytest.raises(ValueError, match="beam size"):
        decoding.beam_search(inputs, cache, chain.tokens_to_logits, EOS, num_decodes=0)
    with pytest.raises(ValueError, match="max_decode_len"):
        decoding.beam_search(inputs, cache, chain.tokens_to_logits, EOS, max_decode_len=0)
    with pytest.raises(ValueError, match="integer tokens"):
        decoding.beam_search(inputs.astype(np.float32), cache, chain.tokens_to_logits, EOS)


# ----------------------------------------------------------------------------------------
# t5x's decode_fn arguments (t5x's EncoderDecoderModel passes them to its decode_fn)
# ----------------------------------------------------------------------------------------


def _batch_axis_one(chain):
    """The toy with t5x's scanned-layer cache layout: per-row arrays `[1, batch, ...]`
    (batch on axis 1, t5x's `cache_offset=1`)."""

    def tokens_to_logits(state):
        inner = state.replace(cache=decoding.cache_map(lambda x: x[0], state.cache))
        logits, cache = chain.tokens_to_logits(inner)
        return logits, decoding.cache_map(lambda x: x[None], cache)

    def init_cache(bias, length):
        cache = chain.init_cache(bias, length)
        return decoding.cache_map(lambda x: x[None], cache)  # [1, batch, ...]

    return tokens_to_logits, init_cache


@pytest.mark.parametrize("decoder", ["beam_search", "temperature_sample"])
def test_cache_offset_gives_the_batch_first_results(chain, batch, decoder):
    bias, inputs, _ = batch
    stacked_step, stacked_cache = _batch_axis_one(chain)
    kwargs = {"eos_id": EOS, "num_decodes": 2}
    if decoder == "temperature_sample":
        kwargs.update(temperature=0.7, topk=0, decode_rng=jax.random.PRNGKey(3))
    fn = getattr(decoding, decoder)
    expected = fn(inputs, chain.init_cache(bias, LENGTH), chain.tokens_to_logits, **kwargs)
    got = fn(inputs, stacked_cache(bias, LENGTH), stacked_step, cache_offset=1, **kwargs)
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-6)


def test_logit_callback_and_t5x_only_arguments(chain, batch):
    bias, inputs, _ = batch
    sample = functools.partial(
        decoding.temperature_sample,
        inputs,
        chain.init_cache(bias, LENGTH),
        chain.tokens_to_logits,
        EOS,
        temperature=0.0,
    )
    plain = sample()
    # Identity hooks and t5x's defaults change nothing.
    same = sample(
        logit_callback_fn=lambda logits, state: logits,
        state_callback_fn=lambda state: state,
        cache_offset=0,
        max_decode_steps_hard_limit=None,
    )
    np.testing.assert_array_equal(same[0], plain[0])
    # A callback that forbids the greedy first token changes it (prompt rows excepted).
    first = np.asarray(plain[0])[:, 0, 0]
    banned = int(first[0])
    forbid = lambda logits, state: logits.at[:, banned].set(-1e9)  # noqa: E731
    changed = np.asarray(sample(logit_callback_fn=forbid)[0])
    assert banned not in changed[0, 0]
    with pytest.raises(ValueError, match="initial_index"):
        decoding.beam_search(
            inputs, chain.init_cache(bias, LENGTH), chain.tokens_to_logits, EOS,
            initial_index=jnp.zeros((3,), jnp.int32),
        )  # fmt: skip
    with pytest.raises(ValueError, match="cache_offset"):
        decoding.beam_search(
            inputs, chain.init_cache(bias, LENGTH), chain.tokens_to_logits, EOS, cache_offset=-1
        )
