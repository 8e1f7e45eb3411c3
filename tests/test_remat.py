"""`T5Config.remat_policy`: rematerialised layers change memory, never numbers.

Reference: the same network without rematerialisation. With dropout on (the masks must
be regenerated identically in the recomputation) and HyperPrompt prefixes flowing
through every layer, loss and gradients of 'minimal' and 'full' must equal 'none';
the parameter tree must be unchanged (t5x checkpoints still load); the traced step
must really contain rematerialisation (so this test fails if the option is ignored);
and incremental decoding, which is never rematerialised, must equal the full pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import config, hyperprompt, network
from tests.helpers import decode_incrementally

CFG = config.T5Config(
    vocab_size=40,
    emb_dim=16,
    num_heads=2,
    head_dim=6,
    mlp_dim=24,
    num_encoder_layers=2,
    num_decoder_layers=2,
    mlp_activations=("gelu", "linear"),
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.2,
)
ENC = np.array([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13], [15, 16, 0, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4], [0, 5, 6], [0, 7, 8]], np.int32)
TGT = np.array([[3, 4, 1], [5, 6, 1], [7, 8, 1]], np.int32)
IDS = np.array([1, 0, 1], np.int32)
KEY = jax.random.PRNGKey(0)


def _module(policy: str) -> network.Transformer:
    hook = hyperprompt.HyperPrompt(
        num_tasks=2,
        prompt_length=2,
        bottleneck_dim=4,
        hypernetworks=hyperprompt.PerLayer(per_task=True),
    )
    return network.Transformer(CFG.replace(remat_policy=policy), hyperprompt=hook)


@functools.cache
def _params():
    variables = _module("none").init(
        {"params": KEY, "dropout": KEY}, ENC, DEC, TGT, task_ids=IDS, enable_dropout=False
    )
    return variables["params"]


def _loss_fn(policy: str):
    module = _module(policy)

    def loss(params):
        logits = module.apply(
            {"params": params},
            ENC,
            DEC,
            TGT,
            task_ids=IDS,
            enable_dropout=True,
            rngs={"dropout": jax.random.PRNGKey(7)},
        )
        log_probs = jax.nn.log_softmax(logits) * jax.nn.one_hot(TGT, CFG.vocab_size)
        return -jnp.sum(log_probs)

    return loss


@functools.cache
def _loss_and_grads(policy: str):
    return jax.jit(jax.value_and_grad(_loss_fn(policy)))(_params())


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_keeps_loss_gradients_and_tree(policy):
    params = _params()
    init = _module(policy).init(
        {"params": KEY, "dropout": KEY}, ENC, DEC, TGT, task_ids=IDS, enable_dropout=False
    )["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)

    loss, grads = _loss_and_grads(policy)
    ref_loss, ref_grads = _loss_and_grads("none")
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat)
    for g, r in zip(flat, ref_flat, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-6)
    # Dropout is really on (otherwise the recomputed masks would not be tested).
    deterministic = _module("none").apply(
        {"params": params}, ENC, DEC, TGT, task_ids=IDS, enable_dropout=False
    )
    log_probs = jax.nn.log_softmax(deterministic) * jax.nn.one_hot(TGT, CFG.vocab_size)
    assert abs(float(-jnp.sum(log_probs)) - float(ref_loss)) > 1e-3


@pytest.mark.parametrize("policy", ["minimal", "full"])
def test_remat_is_in_the_traced_step(policy):
    jaxpr = str(jax.make_jaxpr(jax.grad(_loss_fn(policy)))(_params()))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    plain = str(jax.make_jaxpr(jax.grad(_loss_fn("none")))(_params()))
    assert "remat" not in plain and "checkpoint" not in plain


def test_incremental_decoding_with_a_remat_config():
    module, params = _module("full"), _params()
    full = module.apply({"params": params}, ENC, DEC, TGT, task_ids=IDS, enable_dropout=False)
    stepped, _ = decode_incrementally(module, params, ENC, DEC, task_ids=IDS)
    np.testing.assert_allclose(stepped, np.asarray(full), atol=2e-5)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="remat_policy"):
        CFG.replace(remat_policy="everything")
