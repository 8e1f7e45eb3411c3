"""SMoP: routing math, router statistics, noise only in training, the routing variants.

Invariants: SMoP with one prompt (no noise) equals prompt tuning; the prepended prompt
is the top-1 prompt scaled by its probability, chosen from the masked mean of the
input embeddings; router probabilities sum to 1; training noise changes the routing
logits and evaluation never does; each routing variant of the paper's ablation
produces the weights it promises. Numerics against Hugging Face: `test_methods_hf.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import network, prompts, smop
from hyperprompt_jax.config import T5Config

CONFIG = T5Config(
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
K, L, E = 4, 3, 16
KEY = jax.random.PRNGKey(0)
ENC = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [15, 16, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4], [0, 5, 6], [0, 7, 8]], np.int32)
TGT = np.array([[3, 4, 2], [5, 6, 2], [7, 8, 2]], np.int32)


def _inputs(batch=8, length=6, seed=1):
    rng = np.random.RandomState(seed)
    embedded = rng.normal(size=(batch, length, E)).astype(np.float32)
    mask = np.ones((batch, length), bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    return jnp.asarray(embedded), jnp.asarray(mask)


@pytest.fixture(scope="module")
def smop_module():
    module = smop.SMoP(num_prompts=K, length=L, prompt_init=prompts.Normal())
    embedded, mask = _inputs()
    variables = module.init({"params": KEY, "dropout": KEY}, embedded, mask)
    return module, variables


def _apply(module, variables, embedded, mask, *, train=False, seed=0):
    rngs = {"dropout": jax.random.PRNGKey(seed)} if train else {}
    (out, out_mask), state = module.apply(
        variables, embedded, mask, deterministic=not train, rngs=rngs, mutable=["intermediates"]
    )
    return np.asarray(out), np.asarray(out_mask), jax.tree.map(np.asarray, state["intermediates"])


def test_parameters_and_axes(smop_module):
    _, variables = smop_module
    params = variables["params"]
    assert params["prompts"].shape == (K, L, E)
    assert params["router"]["kernel"].shape == (E, K)
    kernel = np.asarray(params["router"]["kernel"])
    np.testing.assert_allclose(kernel.T @ kernel, np.eye(K), atol=1e-5)  # orthogonal init
    assert variables["params_axes"]["prompts_axes"].names == (
        "prompt_experts",
        "prompt",
        "prompt_embed",
    )
    assert variables["params_axes"]["router"]["kernel_axes"].names == (
        "prompt_embed",
        "prompt_experts",
    )


def test_top1_prompt_scaled_by_probability_from_masked_mean(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs()
    out, out_mask, stats = _apply(module, variables, embedded, mask)
    m = np.asarray(mask, np.float32)[..., None]
    sentence = (np.asarray(embedded) * m).sum(1) / m.sum(1)
    logits = sentence @ np.asarray(variables["params"]["router"]["kernel"])
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    choice = probs.argmax(-1)
    expected = np.asarray(variables["params"]["prompts"])[choice] * probs.max(-1)[:, None, None]
    np.testing.assert_allclose(out[:, :L], expected, atol=1e-5)
    np.testing.assert_array_equal(out[:, L:], embedded)
    np.testing.assert_array_equal(out_mask[:, :L], True)
    np.testing.assert_array_equal(out_mask[:, L:], mask)

    (router_probs,) = stats["router_probs"]
    np.testing.assert_allclose(router_probs, probs, atol=1e-5)
    np.testing.assert_allclose(router_probs.sum(-1), 1.0, atol=1e-6)
    (fraction,) = stats["prompt_fraction"]
    np.testing.assert_allclose(fraction, np.bincount(choice, minlength=K) / len(choice))
    (mean_max,) = stats["mean_max_prob"]
    np.testing.assert_allclose(mean_max, probs.max(-1).mean(), atol=1e-6)


def test_padding_does_not_affect_routing(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs()
    noisy_padding = jnp.where(mask[..., None], embedded, 100.0)
    a, _, _ = _apply(module, variables, embedded, mask)
    b, _, _ = _apply(module, variables, noisy_padding, mask)
    np.testing.assert_allclose(a[:, :L], b[:, :L], atol=1e-6)


def test_noise_only_in_training(smop_module):
    module, variables = smop_module
    embedded, mask = _inputs(batch=64, seed=2)
    eval_a, _, stats_a = _apply(module, variables, embedded, mask)
    eval_b, _, _ = _apply(module, variables, embedded, mask, seed=5)
    np.testing.assert_array_equal(eval_a, eval_b)  # deterministic: no rng, no noise
    train_1, _, stats_1 = _apply(module, variables, embedded, mask, train=True, seed=1)
    train_2, _, stats_2 = _apply(module, variables, embedded, mask, train=True, seed=2)
    assert np.abs(stats_1["router_probs"][0] - stats_a["router_probs"][0]).max() > 1e-2
    assert np.abs(stats_1["router_probs"][0] - stats_2["router_probs"][0]).max() > 1e-2
    assert np.abs(train_1[:, :L] - train_2[:, :L]).max() > 1e-3
    for stats in (stats_1, stats_2):
        np.testing.assert_allclose(stats["router_probs"][0].sum(-1), 1.0, atol=1e-6)


def test_gaussian_noise_is_multiplicative_with_detached_scale():
    logits = jnp.array([[1.0, -2.0, 0.0, 4.0]])
    noise = smop.GaussianNoise(1.0)
    out = noise(logits, KEY)
    eps = jax.random.normal(KEY, logits.shape)
    np.testing.assert_allclose(out, logits * (1 + eps), atol=1e-6)
    assert out[0, 2] == 0.0  # zero logits stay zero: the noise scales with the logit
    grad = jax.grad(lambda x: noise(x, KEY).sum())(logits)
    np.testing.assert_allclose(grad, np.ones_like(logits))  # the noise scale is not trained


def test_single_prompt_smop_equals_prompt_tuning():
    sp = network.Transformer(CONFIG, prompt=prompts.SoftPrompt(length=L))
    mp = network.Transformer(
        CONFIG, prompt=smop.SMoP(num_prompts=1, length=L, routing=smop.TopK(1, noise=None))
    )
    sp_params = sp.init({"params": KEY, "dropout": KEY}, ENC, DEC, TGT, enable_dropout=False)[
        "params"
    ]
    mp_params = mp.init({"params": KEY, "dropout": KEY}, ENC, DEC, TGT, enable_dropout=False)[
        "params"
    ]
    mp_params = dict(mp_params)
    mp_params.update({k: v for k, v in sp_params.items() if k != "prompt"})
    mp_params["prompt"] = {
        "prompts": sp_params["prompt"]["prompt"][None],
        "router": mp_params["prompt"]["router"],
    }
    for train in (False, True):  # with one prompt and no noise, training routes the same
        rngs = {"dropout": KEY}
        a = sp.apply({"params": sp_params}, ENC, DEC, TGT, enable_dropout=train, rngs=rngs)
        b = mp.apply({"params": mp_params}, ENC, DEC, TGT, enable_dropout=train, rngs=rngs)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------
# Routing variants
# ----------------------------------------------------------------------------------------

LOGITS = jnp.array([[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 0.2, 0.1]])
PROBS = np.asarray(jax.nn.softmax(LOGITS))


def test_top_k_and_dense_weights():
    w, p = smop.TopK(2, noise=None)(LOGITS, deterministic=True, rng=None)
    expected = np.zeros_like(PROBS)
    for i, row in enumerate(PROBS):
        top = np.argsort(row)[-2:]
        expected[i, top] = row[top]
    np.testing.assert_allclose(w, expected, atol=1e-6)
    np.testing.assert_allclose(p, PROBS, atol=1e-6)
    w, _ = smop.Dense()(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(w, PROBS, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        smop.TopK(5)(LOGITS, deterministic=True, rng=None)


def test_logit_dropout_only_in_training():
    routing = smop.TopK(1, noise=smop.LogitDropout(0.5))
    w_eval, p_eval = routing(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(p_eval, PROBS, atol=1e-6)
    big = jnp.tile(LOGITS, (50, 1))
    _, p_train = routing(big, deterministic=False, rng=KEY)
    assert np.abs(np.asarray(p_train) - np.tile(PROBS, (50, 1))).max() > 1e-2


def test_random_routing():
    w_eval, _ = smop.RandomRouting()(LOGITS, deterministic=True, rng=None)
    np.testing.assert_allclose(w_eval, 0.25)  # evaluation: mean of all prompts
    logits = jnp.zeros((400, 4)).at[:, 0].set(10.0)  # the router strongly prefers prompt 0
    w, _ = smop.RandomRouting()(logits, deterministic=False, rng=KEY)
    w = np.asarray(w)
    assert ((w == 0) | (w == 1)).all() and (w.sum(-1) == 1).all()
    counts = w.sum(0)
    assert (counts > 60).all()  # uniformly random, ignoring the router


def test_gumbel_routing_straight_through():
    routing = smop.Gumbel()
    w_eval, _ = routing(LOGITS, deterministic=True, rng=None)
    np.testing.assert_array_equal(w_eval, np.eye(4)[np.asarray(LOGITS).argmax(-1)])
    w, _ = routing(LOGITS, deterministic=False, rng=KEY)
    np.testing.assert_array_equal(np.sort(np.asarray(w), -1)[:, -1], 1.0)  # forward one-hot
    assert (np.asarray(w).sum(-1) == 1).all()
    grad = jax.grad(
        lambda x: (routing(x, deterministic=False, rng=KEY)[0] * jnp.arange(4.0)).sum()
    )(LOGITS)
    assert np.abs(np.asarray(grad)).max() > 1e-4  # gradients flow through the soft sample


@pytest.mark.parametrize(
    "routing",
    [
        smop.TopK(2),
        smop.Dense(),
        smop.RandomRouting(),
        smop.Gumbel(),
        smop.TopK(1, smop.LogitDropout()),
    ],
    ids=["top2", "dense", "random", "gumbel", "dropout"],
)
def test_variants_run_in_the_module(routing):
    module = smop.SMoP(num_prompts=K, length=L, routing=routing)
    embedded, mask = _inputs()
    variables = module.init({"params": KEY, "dropout": KEY}, embedded, mask)
    for train in (False, True):
        out, out_mask, stats = _apply(module, variables, embedded, mask, train=train)
        assert out.shape == (8, L + 6, E) and np.isfinite(out).all()
        np.testing.assert_allclose(stats["router_probs"][0].sum(-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(stats["prompt_fraction"][0].sum(), 1.0, atol=1e-6)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="num_prompts"):
        smop.SMoP(num_prompts=0)
    with pytest.raises(ValueError, match="leaves no room"):
        smop.SMoP(length=5, max_length=5)
    with pytest.raises(ValueError, match="TopK.k"):
        smop.TopK(0)
