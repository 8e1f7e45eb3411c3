"""`models.EncoderDecoderModel`: loss, scoring and decoding on a tiny random T5.

References: a float64 NumPy cross-entropy + z-loss + label smoothing on the network's
own logits; NumPy log-likelihoods for `score_batch`; and, for decoding, the
teacher-forced forward pass (greedy tokens must be the argmax of the full-sequence
logits of their own prefix; beam scores must be the sequence log-likelihood divided by
t5x's brevity penalty). A toy task-conditioned soft prompt exercises the input hook
(encoded longer than the tokens), `task_ids` expansion for several decodes, and sown
intermediates.
"""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import config, decoding, models, network

CFG = config.T5Config(
    vocab_size=40,
    emb_dim=16,
    num_heads=2,
    head_dim=6,
    mlp_dim=24,
    num_encoder_layers=1,
    num_decoder_layers=2,
    mlp_activations=("gelu", "linear"),
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.1,
)
VOCAB = types.SimpleNamespace(eos_id=1)


class ToyPrompt(nn.Module):
    """A per-task soft prompt of `length` vectors prepended to the inputs; sows its norm."""

    length: int = 3
    num_tasks: int = 2

    @nn.compact
    def __call__(self, embedded_inputs, input_mask, *, task_ids, deterministic, embedding_table):
        emb = embedded_inputs.shape[-1]
        table = self.param(
            "prompts", nn.initializers.normal(1.0), (self.num_tasks, self.length, emb)
        )
        if task_ids is None:
            task_ids = jnp.zeros((embedded_inputs.shape[0],), jnp.int32)
        prompt = table[task_ids].astype(embedded_inputs.dtype)
        self.sow("intermediates", "prompt_norm", jnp.sqrt(jnp.sum(prompt**2)))
        return jnp.concatenate([prompt, embedded_inputs], axis=1), self.extend_mask(input_mask)

    def extend_mask(self, input_mask):
        ones = jnp.ones((input_mask.shape[0], self.length), input_mask.dtype)
        return jnp.concatenate([ones, input_mask], axis=1)


def _batch(seed=0, with_task_ids=False):
    rng = np.random.RandomState(seed)
    enc = rng.randint(2, CFG.vocab_size, size=(3, 7))
    enc[1, 4:] = 0
    tgt = rng.randint(2, CFG.vocab_size, size=(3, 6))
    tgt[0, 5] = 1
    tgt[2, 3:] = 0
    tgt[2, 2] = 1
    dec_in = np.concatenate([np.zeros((3, 1), np.int64), tgt[:, :-1]], axis=1)
    batch = {
        "encoder_input_tokens": jnp.asarray(enc, jnp.int32),
        "decoder_input_tokens": jnp.asarray(dec_in, jnp.int32),
        "decoder_target_tokens": jnp.asarray(tgt, jnp.int32),
    }
    if with_task_ids:
        batch["task_ids"] = jnp.asarray([1, 0, 1], jnp.int32)
    return batch


def _make_setup(kind):
    prompt = ToyPrompt() if kind == "prompt" else None
    module = network.Transformer(CFG, prompt=prompt)
    model = models.EncoderDecoderModel(module, VOCAB, VOCAB)
    shapes = {"encoder_input_tokens": (2, 7), "decoder_input_tokens": (2, 6)}
    if prompt is not None:
        shapes["task_ids"] = (2,)
    variables = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(jax.random.PRNGKey(0))
    greedy = models.EncoderDecoderModel(module, VOCAB, VOCAB, decode_fn=decoding.temperature_sample)
    # Compiled once per module and shared by the tests (the machine is small).
    return types.SimpleNamespace(
        kind=kind,
        module=module,
        model=model,
        greedy=greedy,
        params=variables["params"],
        variables=variables,
        logits=jax.jit(
            lambda params, batch: module.apply(
                {"params": params},
                batch["encoder_input_tokens"],
                batch["decoder_input_tokens"],
                batch["decoder_target_tokens"],
                task_ids=batch.get("task_ids"),
                enable_dropout=False,
            )
        ),
        score=jax.jit(model.score_batch),
        predict_greedy=jax.jit(greedy.predict_batch_with_aux),
    )


@pytest.fixture(scope="module")
def plain():
    return _make_setup("plain")


@pytest.fixture(scope="module")
def prompted():
    """The network with the toy task-conditioned prompt (input hook)."""
    return _make_setup("prompt")


@pytest.fixture(params=["plain", "prompted"])
def setup(request):
    return request.getfixturevalue(request.param)


def _logits(setup, batch):
    return np.asarray(setup.logits(setup.params, batch), np.float64)


def _numpy_loss(logits, targets, weights, label_smoothing, z_loss, factor):
    vocab = logits.shape[-1]
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    log_probs = logits - log_z[..., None]
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    soft = np.full(logits.shape, low)
    np.put_along_axis(soft, targets[..., None], confidence, axis=-1)
    # t5x subtracts the entropy of the smoothed target so a perfect model scores 0.
    entropy = -(confidence * np.log(confidence) + (vocab - 1) * low * np.log(low + 1e-20))
    per_token = -(soft * log_probs).sum(-1) - entropy + z_loss * log_z**2
    return (per_token * weights).sum() / factor, (z_loss * log_z**2 * weights).sum() / factor


def test_initial_variables(setup):
    assert set(setup.variables) == {"params", "params_axes"}
    assert ("prompt" in setup.params) == (setup.kind == "prompt")
    if setup.kind == "prompt":
        assert setup.params["prompt"]["prompts"].shape == (2, 3, CFG.emb_dim)
    with pytest.raises(ValueError, match="lacks \\['decoder_input_tokens'\\]"):
        setup.model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 2)})


@pytest.mark.parametrize(
    "label_smoothing, z_loss, normalizing, explicit_weights",
    [
        (0.0, 0.0, None, False),
        (0.1, 1e-4, None, True),
        (0.0, 1e-2, "NUM_REAL_TARGET_TOKENS", False),
        (0.2, 1e-4, 7.0, True),
    ],
)
def test_loss_fn_equals_numpy(prompted, label_smoothing, z_loss, normalizing, explicit_weights):
    setup = prompted
    batch = _batch(seed=1, with_task_ids=setup.kind == "prompt")
    targets = np.asarray(batch["decoder_target_tokens"])
    weights = (targets > 0).astype(np.float64)
    if explicit_weights:
        weights = weights * np.array([1.0, 0.5, 2.0])[:, None]
        batch["decoder_loss_weights"] = jnp.asarray(weights, jnp.float32)
    model = models.EncoderDecoderModel(
        setup.module,
        VOCAB,
        VOCAB,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        loss_normalizing_factor=normalizing,
    )
    loss, metrics = jax.jit(model.loss_fn)(setup.params, batch, None)

    factor = {None: 1.0, "NUM_REAL_TARGET_TOKENS": weights.sum(), 7.0: 7.0}[normalizing]
    logits = _logits(setup, batch)
    expected, expected_z = _numpy_loss(logits, targets, weights, label_smoothing, z_loss, factor)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["z_loss"]), expected_z, rtol=2e-4, atol=1e-9)
    np.testing.assert_allclose(float(metrics["cross_ent_loss"]), expected - expected_z, rtol=2e-5)
    accuracy = ((logits.argmax(-1) == targets) * weights).sum() / weights.sum()
    np.testing.assert_allclose(float(metrics["accuracy"]), accuracy, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["weight_sum"]), weights.sum(), rtol=1e-6)
    assert float(metrics["num_tokens"]) == (targets > 0).sum()
    assert float(metrics["num_examples"]) == 3


def test_dropout_only_with_an_rng(plain):
    setup = plain
    batch = _batch(seed=2)
    loss_fn = jax.jit(setup.model.loss_fn)
    deterministic, evaluated = jax.jit(
        lambda p, b: (setup.model.loss_fn(p, b, None)[0], setup.model.eval_fn(p, b)[0])
    )(setup.params, batch)
    np.testing.assert_allclose(float(evaluated), float(deterministic), rtol=1e-6)
    a, _ = loss_fn(setup.params, batch, jax.random.PRNGKey(1))
    b, _ = loss_fn(setup.params, batch, jax.random.PRNGKey(1))
    c, _ = loss_fn(setup.params, batch, jax.random.PRNGKey(2))
    assert float(a) == float(b)
    assert float(a) != float(deterministic) and float(a) != float(c)


def test_loss_gradients_and_intermediates(setup):
    batch = _batch(seed=3, with_task_ids=setup.kind == "prompt")
    grad_fn = jax.value_and_grad(
        lambda p, b: setup.model.loss_fn(p, b, None, return_intermediates=True), has_aux=True
    )
    (loss, (metrics, intermediates)), grads = jax.jit(grad_fn)(setup.params, batch)
    logits = _logits(setup, batch)
    expected, _ = _numpy_loss(
        logits,
        np.asarray(batch["decoder_target_tokens"]),
        np.asarray(batch["decoder_target_tokens"]) > 0,
        0.0,
        0.0,
        1.0,
    )
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    assert float(metrics["loss"]) == float(loss)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(setup.params)
    if setup.kind == "prompt":
        (norm,) = intermediates["prompt"]["prompt_norm"]
        prompts = np.asarray(setup.params["prompt"]["prompts"])[np.asarray(batch["task_ids"])]
        np.testing.assert_allclose(float(norm), np.linalg.norm(prompts), rtol=1e-5)
        assert np.abs(np.asarray(grads["prompt"]["prompts"])).sum() > 0
    else:
        assert intermediates == {}


def test_score_batch_equals_numpy(setup):
    batch = _batch(seed=4, with_task_ids=setup.kind == "prompt")
    targets = np.asarray(batch["decoder_target_tokens"])
    logits = _logits(setup, batch)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(
        np.asarray(setup.score(setup.params, batch)),
        (token * (targets > 0)).sum(-1),
        rtol=1e-5,
    )
    weights = np.array([[1, 1, 0, 0, 0, 0]] * 3, np.float32)
    scored = setup.score(setup.params, {**batch, "decoder_loss_weights": weights})
    np.testing.assert_allclose(np.asarray(scored), (token * weights).sum(-1), rtol=1e-5)


def _shift_right(tokens):
    return jnp.concatenate([jnp.zeros_like(tokens[:, :1]), tokens[:, :-1]], axis=1)


def test_greedy_decode_is_argmax_of_the_full_forward_pass(setup):
    batch = _batch(seed=5, with_task_ids=setup.kind == "prompt")
    del batch["decoder_target_tokens"]  # prediction needs only the inputs and a length
    tokens, aux = setup.predict_greedy(setup.params, batch)
    assert tokens.shape == batch["decoder_input_tokens"].shape
    # Teacher-force the decoded sequence: each token must be the argmax at its step.
    full = {
        **batch,
        "decoder_target_tokens": jnp.maximum(tokens, 1),
        "decoder_input_tokens": _shift_right(tokens),
    }
    logits = _logits(setup, full)
    tokens = np.asarray(tokens)
    for row in range(tokens.shape[0]):
        ended = np.flatnonzero(tokens[row] == VOCAB.eos_id)
        stop = ended[0] + 1 if ended.size else tokens.shape[1]
        np.testing.assert_array_equal(tokens[row, :stop], logits[row, :stop].argmax(-1))
        assert (tokens[row, stop:] == 0).all()
    assert aux["scores"].shape == (3,)


def test_beam_scores_equal_sequence_log_likelihood(plain, prompted):
    # One beam on the plain network; three beams on the prompt model, which also
    # expands task_ids and the longer encoded sequence per beam.
    _check_beam_scores(plain, num_decodes=1)
    _check_beam_scores(prompted, num_decodes=3)


def _check_beam_scores(setup, num_decodes):
    batch = _batch(seed=6, with_task_ids=setup.kind == "prompt")
    del batch["decoder_target_tokens"]
    alpha = 0.6
    # An EOS the model actually emits, so finished hypotheses are compared too.
    first = np.asarray(setup.predict_greedy(setup.params, batch)[0])
    eos_id = int(first[0, 2])
    model = setup.model  # beam search, t5x's default decode_fn
    sequences, aux = jax.jit(
        lambda p, b: model.predict_batch_with_aux(
            p,
            b,
            num_decodes=num_decodes,
            return_all_decodes=True,
            decoder_params={"eos_id": eos_id, "alpha": alpha},
        )
    )(setup.params, batch)
    sequences, scores = np.asarray(sequences), np.asarray(aux["scores"])
    assert sequences.shape == (3, num_decodes, 6) and scores.shape == (3, num_decodes)
    assert (np.diff(scores, axis=1) >= 0).all()  # ascending: best last
    found_finished = False
    for k in range(num_decodes):
        seqs = jnp.asarray(sequences[:, k])
        # EOS shares its id with an ordinary token here, so score with explicit weights.
        scoring = {
            **batch,
            "decoder_target_tokens": seqs,
            "decoder_input_tokens": _shift_right(seqs),
            "decoder_loss_weights": (seqs > 0).astype(jnp.float32),
        }
        log_likelihood = np.asarray(setup.score(setup.params, scoring))
        for row in range(3):
            ended = np.flatnonzero(sequences[row, k] == eos_id)
            if ended.size:
                found_finished = True
                penalty = ((5.0 + ended[0] + 1) / 6.0) ** alpha
                expected = log_likelihood[row] / penalty
            else:
                expected = log_likelihood[row]
            np.testing.assert_allclose(scores[row, k], expected, rtol=1e-4, atol=1e-4)
    assert found_finished


def test_sampling_several_decodes_and_best_decode(prompted):
    setup = prompted
    batch = _batch(seed=7, with_task_ids=True)
    del batch["decoder_target_tokens"]
    model = setup.greedy

    @jax.jit
    def sample(params, batch, rng):
        options = {"temperature": 1.0, "topk": 0}
        every, every_aux = model.predict_batch_with_aux(
            params, batch, rng, num_decodes=4, return_all_decodes=True, decoder_params=options
        )
        best, best_aux = model.predict_batch_with_aux(
            params, batch, rng, num_decodes=4, decoder_params=options
        )
        return every, every_aux["scores"], best, best_aux["scores"]

    every, scores, best, best_scores = map(
        np.asarray, sample(setup.params, batch, jax.random.PRNGKey(0))
    )
    again = np.asarray(sample(setup.params, batch, jax.random.PRNGKey(0))[0])
    other = np.asarray(sample(setup.params, batch, jax.random.PRNGKey(1))[0])
    assert every.shape == (3, 4, 6) and best.shape == (3, 6)
    np.testing.assert_array_equal(every, again)
    assert (every != other).any()
    assert (np.diff(scores, axis=1) >= 0).all()
    np.testing.assert_array_equal(best, every[:, -1])
    np.testing.assert_allclose(best_scores, scores[:, -1], rtol=1e-6)


def test_task_ids_condition_the_prompt_model(prompted):
    setup = prompted
    batch = _batch(seed=8)
    scores = {
        task: np.asarray(setup.score(setup.params, {**batch, "task_ids": jnp.full((3,), task)}))
        for task in (0, 1)
    }
    assert np.abs(scores[0] - scores[1]).min() > 1e-4
    # Without task_ids the toy prompt uses task 0.
    np.testing.assert_allclose(np.asarray(setup.score(setup.params, batch)), scores[0], rtol=1e-6)


def test_errors():
    model = models.EncoderDecoderModel(network.Transformer(CFG), types.SimpleNamespace(), None)
    with pytest.raises(ValueError, match="label_smoothing"):
        models.EncoderDecoderModel(network.Transformer(CFG), VOCAB, VOCAB, label_smoothing=1.0)
    with pytest.raises(ValueError, match="Unknown loss_normalizing_factor 'bogus'"):
        models.EncoderDecoderModel(
            network.Transformer(CFG), VOCAB, VOCAB, loss_normalizing_factor="bogus"
        )
    batch = _batch()
    with pytest.raises(ValueError, match="no eos_id"):
        model.predict_batch({}, batch)
    with pytest.raises(ValueError, match="lacks \\['decoder_target_tokens'\\]"):
        model.score_batch({}, {k: v for k, v in batch.items() if k != "decoder_target_tokens"})
