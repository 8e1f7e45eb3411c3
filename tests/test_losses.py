"""Tests for `hyperprompt_jax.losses` against NumPy references and hand-computed values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import losses

VOCAB = 7


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_logsumexp(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[..., None]).sum(axis=-1))


def np_smoothed_targets(targets: np.ndarray, vocab: int, smoothing: float) -> np.ndarray:
    soft = np.full(targets.shape + (vocab,), smoothing / (vocab - 1))
    np.put_along_axis(soft, targets[..., None], 1.0 - smoothing, axis=-1)
    return soft


def np_token_loss(logits, targets, smoothing, z_loss):
    """Per-token t5x loss: CE to the smoothed target + z-loss - entropy of the target."""
    soft = np_smoothed_targets(targets, logits.shape[-1], smoothing)
    entropy = -np.sum(np.where(soft > 0, soft * np.log(np.where(soft > 0, soft, 1.0)), 0.0), -1)
    log_z = np_logsumexp(logits)
    z_term = z_loss * log_z**2
    return -np.sum(soft * np_log_softmax(logits), -1) + z_term - entropy, z_term


def naive_cross_entropy(logits, targets, z_loss):
    """Plain autodiff version, the gradient reference for the custom VJP."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    z_term = z_loss * log_z**2
    return -jnp.sum(targets * (logits - log_z[..., None]), axis=-1) + z_term, z_term


@pytest.fixture(scope="module")
def data():
    rng = np.random.RandomState(0)
    logits = (rng.normal(size=(2, 5, VOCAB)) * 3.0).astype(np.float32)
    targets = rng.randint(1, VOCAB, size=(2, 5)).astype(np.int32)
    weights = rng.uniform(size=(2, 5)).astype(np.float32)
    return logits, targets, weights


@pytest.mark.parametrize("z_loss", [0.0, 1e-4, 0.3])
def test_cross_entropy_with_logits_matches_numpy(data, z_loss):
    logits, targets, _ = data
    for smoothing in (0.0, 0.2):
        soft = np_smoothed_targets(targets, VOCAB, smoothing)
        loss, z_term = losses.cross_entropy_with_logits(
            jnp.asarray(logits), jnp.asarray(soft, jnp.float32), z_loss
        )
        log_z = np_logsumexp(logits)
        expected = -np.sum(soft * np_log_softmax(logits), -1) + z_loss * log_z**2
        np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z_term, z_loss * log_z**2, rtol=1e-5, atol=1e-7)


def test_custom_vjp_equals_autodiff_of_naive(data):
    logits, targets, _ = data
    soft = jnp.asarray(np_smoothed_targets(targets, VOCAB, 0.1), jnp.float32)
    cotangent = jnp.asarray(np.random.RandomState(1).normal(size=targets.shape), jnp.float32)

    def objective(fn, lg, tg):
        return jnp.sum(fn(lg, tg, 0.05)[0] * cotangent)

    custom = jax.grad(lambda lg, tg: objective(losses.cross_entropy_with_logits, lg, tg), (0, 1))
    naive = jax.grad(lambda lg, tg: objective(naive_cross_entropy, lg, tg), (0, 1))
    got = jax.jit(custom)(jnp.asarray(logits), soft)
    want = naive(jnp.asarray(logits), soft)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-6)
    # The z-loss output is for logging: it carries no gradient (t5x).
    g_z = jax.grad(lambda lg: jnp.sum(losses.cross_entropy_with_logits(lg, soft, 0.05)[1]))(
        jnp.asarray(logits)
    )
    np.testing.assert_array_equal(g_z, 0.0)


def test_custom_vjp_is_stable_for_huge_logits():
    logits = jnp.array([[1e4, -1e4, 0.0, 5e3]], jnp.float32)
    targets = jax.nn.one_hot(jnp.array([3]), 4)
    loss, _ = losses.cross_entropy_with_logits(logits, targets, 1e-4)
    grad = jax.grad(lambda lg: losses.cross_entropy_with_logits(lg, targets, 1e-4)[0].sum())(logits)
    assert np.isfinite(loss).all() and np.isfinite(grad).all()
    np.testing.assert_allclose(loss, [5e3 + 1e-4 * 1e8], rtol=1e-5)
    # d/dlogits = (1 + 2 z log Z) softmax - target, softmax = one-hot(0) here.
    np.testing.assert_allclose(grad, [[1 + 2e-4 * 1e4, 0.0, 0.0, -1.0]], rtol=1e-5)


@pytest.mark.parametrize("smoothing,z_loss,factor", [(0.0, 0.0, None), (0.1, 1e-4, 7.0)])
def test_weighted_cross_entropy_matches_numpy(data, smoothing, z_loss, factor):
    logits, targets, weights = data
    total, total_z, weight_sum = losses.compute_weighted_cross_entropy(
        jnp.asarray(logits),
        jnp.asarray(targets),
        jnp.asarray(weights),
        label_smoothing=smoothing,
        z_loss=z_loss,
        loss_normalizing_factor=factor,
    )
    token_loss, token_z = np_token_loss(logits, targets, smoothing, z_loss)
    norm = 1.0 if factor is None else factor
    np.testing.assert_allclose(total, np.sum(token_loss * weights) / norm, rtol=1e-5)
    np.testing.assert_allclose(total_z, np.sum(token_z * weights) / norm, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(weight_sum, weights.sum(), rtol=1e-6)
    # Without weights every token counts and weight_sum is the token count.
    total, _, weight_sum = losses.compute_weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), label_smoothing=smoothing, z_loss=z_loss
    )
    np.testing.assert_allclose(total, np.sum(token_loss), rtol=1e-5)
    assert int(weight_sum) == targets.size


def test_perfect_smoothed_prediction_has_zero_loss(data):
    _, targets, _ = data
    smoothing = 0.3
    # logits = log(smoothed target): log Z = 0 so the z-loss vanishes, and the
    # cross-entropy equals the target entropy, which t5x subtracts.
    logits = np.log(np_smoothed_targets(targets, VOCAB, smoothing)).astype(np.float32)
    total, total_z, _ = losses.compute_weighted_cross_entropy(
        jnp.asarray(logits), jnp.asarray(targets), label_smoothing=smoothing, z_loss=1e-2
    )
    np.testing.assert_allclose(total, 0.0, atol=1e-5)
    np.testing.assert_allclose(total_z, 0.0, atol=1e-9)


def test_weighted_cross_entropy_gradient_equals_naive(data):
    logits, targets, weights = data

    def naive(lg):
        soft = jnp.asarray(np_smoothed_targets(targets, VOCAB, 0.1), jnp.float32)
        per_token = naive_cross_entropy(lg, soft, 1e-3)[0]
        return jnp.sum(per_token * weights) / 3.0

    def ours(lg):
        return losses.compute_weighted_cross_entropy(
            lg, jnp.asarray(targets), jnp.asarray(weights), 0.1, 1e-3, 3.0
        )[0]

    np.testing.assert_allclose(
        jax.grad(ours)(jnp.asarray(logits)),
        jax.grad(naive)(jnp.asarray(logits)),
        rtol=1e-5,
        atol=1e-7,
    )


def test_weighted_cross_entropy_validation(data):
    logits, targets, weights = data
    with pytest.raises(ValueError, match="Incorrect shapes"):
        losses.compute_weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets[0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.compute_weighted_cross_entropy(
            jnp.asarray(logits), jnp.asarray(targets), label_smoothing=1.0
        )
    with pytest.raises(ValueError, match="weights shape"):
        losses.compute_weighted_cross_entropy(
            jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights[:, :2])
        )
    with pytest.raises(ValueError, match="same shape"):
        losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(logits[..., :2]), 0.0)


# ----------------------------------------------------------------------------------------
# Loss normalising factors
# ----------------------------------------------------------------------------------------

UNPACKED = {"decoder_target_tokens": np.array([[3, 4, 5, 0, 0], [6, 2, 0, 0, 0]], np.int32)}
PACKED = {
    "decoder_target_tokens": np.array([[3, 4, 5, 6, 7, 0], [8, 9, 0, 0, 0, 0]], np.int32),
    "decoder_segment_ids": np.array([[1, 1, 1, 2, 2, 0], [1, 1, 0, 0, 0, 0]], np.int32),
}


def _lnf(factor, batch):
    return losses.get_loss_normalizing_factor_and_weights(factor, batch)


def test_constant_and_none_pass_through():
    explicit = dict(UNPACKED, decoder_loss_weights=np.ones((2, 5), np.float32))
    assert _lnf(None, UNPACKED) == (None, None)
    factor, weights = _lnf(2.5, explicit)
    assert factor == 2.5 and weights is explicit["decoder_loss_weights"]


def test_num_real_and_total_target_tokens():
    factor, weights = _lnf(losses.LossNormalizingFactor.NUM_REAL_TARGET_TOKENS, UNPACKED)
    assert float(factor) == 5.0
    np.testing.assert_array_equal(weights, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    # Explicit loss weights take precedence over "non-zero target".
    explicit = dict(UNPACKED, decoder_loss_weights=np.array([[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]]))
    factor, weights = _lnf("num_real_target_tokens", explicit)
    assert float(factor) == 3.0
    np.testing.assert_array_equal(weights, explicit["decoder_loss_weights"])
    factor, _ = _lnf("NUM_TOTAL_TARGET_TOKENS", UNPACKED)
    assert float(factor) == 10.0


def test_average_per_sequence_unpacked_and_packed():
    factor, weights = _lnf(losses.LossNormalizingFactor.AVERAGE_PER_SEQUENCE, UNPACKED)
    np.testing.assert_allclose(weights, [[1 / 3] * 3 + [0, 0], [0.5, 0.5, 0, 0, 0]], rtol=1e-6)
    assert float(factor) == pytest.approx(2.0)

    factor, weights = _lnf("average_per_sequence", PACKED)
    np.testing.assert_allclose(
        weights, [[1 / 3] * 3 + [0.5, 0.5, 0], [0.5, 0.5, 0, 0, 0, 0]], rtol=1e-6
    )
    assert float(factor) == pytest.approx(3.0)

    # Explicit weights on padding (segment 0) are dropped, as t5x's normaliser is 0 there.
    padded = dict(PACKED, decoder_loss_weights=np.ones((2, 6), np.float32))
    factor, weights = _lnf("average_per_sequence", padded)
    np.testing.assert_allclose(
        weights, [[1 / 3] * 3 + [0.5, 0.5, 0], [0.5, 0.5, 0, 0, 0, 0]], rtol=1e-6
    )
    assert float(factor) == pytest.approx(3.0)

    # A sequence whose weights are all zero gets weight 0, not NaN.
    zero_row = dict(UNPACKED, decoder_loss_weights=np.array([[1, 1, 0, 0, 0], [0] * 5], np.float32))
    factor, weights = _lnf("AVERAGE_PER_SEQUENCE", zero_row)
    np.testing.assert_allclose(weights, [[0.5, 0.5, 0, 0, 0], [0] * 5])
    assert float(factor) == pytest.approx(1.0)


def test_average_per_sequence_loss_is_mean_of_sequence_means(data):
    logits = data[0][:, :5]
    batch = UNPACKED
    factor, weights = _lnf("AVERAGE_PER_SEQUENCE", batch)
    total, _, _ = losses.compute_weighted_cross_entropy(
        jnp.asarray(logits),
        jnp.asarray(batch["decoder_target_tokens"]),
        weights,
        loss_normalizing_factor=factor,
    )
    token_loss, _ = np_token_loss(logits, batch["decoder_target_tokens"], 0.0, 0.0)
    per_sequence = [token_loss[0, :3].mean(), token_loss[1, :2].mean()]
    np.testing.assert_allclose(total, np.mean(per_sequence), rtol=1e-5)


def test_number_of_examples():
    factor, weights = _lnf(losses.LossNormalizingFactor.NUMBER_OF_EXAMPLES, UNPACKED)
    assert float(factor) == 2.0
    np.testing.assert_array_equal(weights, UNPACKED["decoder_target_tokens"] > 0)
    factor, _ = _lnf("number_of_examples", PACKED)
    assert float(factor) == 3.0  # two packed segments in row 0, one in row 1


def test_unknown_factor_names_are_rejected():
    with pytest.raises(ValueError, match="NUM_REAL_TARGET_TOKENS"):
        _lnf("per_token", UNPACKED)
    with pytest.raises(ValueError, match="decoder_target_tokens"):
        _lnf("NUM_REAL_TARGET_TOKENS", {"targets": UNPACKED["decoder_target_tokens"]})
    # t5x's class name is an alias, so t5x gin bindings keep working.
    assert losses.SpecialLossNormalizingFactor is losses.LossNormalizingFactor
