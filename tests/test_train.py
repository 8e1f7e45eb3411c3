"""Optimiser semantics (t5x) and the train step's frozen-parameter invariants.

* `optim.adafactor` equals a NumPy transcription of t5x's `Adafactor.apply_param_gradient`
  over three steps (factored and unfactored parameters, with and without parameter
  scaling, weight decay, momentum).
* `optim.create_learning_rate_scheduler` equals t5x's factor formulas.
* After train steps of prompt tuning only `prompt/...` changes, bit for bit, and the
  optimizer state holds exactly the trainable parameters; a step whose update is not
  finite is rejected (the state stays as it was).
"""

from __future__ import annotations

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hyperprompt_jax import config as config_lib
from hyperprompt_jax import models, network, optim, partitioning, prompts
from hyperprompt_jax import trainer as trainer_lib

# ---------------------------------------------------------------------------------------
# Adafactor against t5x's update rule
# ---------------------------------------------------------------------------------------


def _t5x_adafactor_reference(
    params, grads_per_step, lr, decay_rate, scale_by_param, clip, wd, beta1
):
    """t5x `Adafactor.apply_param_gradient` (heuristic factoring), in NumPy, per leaf."""
    eps1, eps2, min_dim = 1e-30, 1e-3, 128
    params = {k: np.array(v, np.float64) for k, v in params.items()}
    state = {}
    for k, p in params.items():
        dims = np.argsort(p.shape) if p.ndim >= 2 else None
        factored = dims is not None and p.shape[dims[-2]] >= min_dim
        d1, d0 = (int(dims[-2]), int(dims[-1])) if factored else (None, None)
        state[k] = dict(
            factored=factored,
            d=(d1, d0),
            v_row=np.zeros(np.delete(p.shape, d0)) if factored else None,
            v_col=np.zeros(np.delete(p.shape, d1)) if factored else None,
            v=None if factored else np.zeros(p.shape),
            m=np.zeros(p.shape),
        )
    for step, grads in enumerate(grads_per_step):
        decay = 1.0 - (step + 1.0) ** (-decay_rate)
        for k, p in params.items():
            g = np.asarray(grads[k], np.float64)
            s = state[k]
            scale = lr
            if scale_by_param:
                scale *= max(np.sqrt(np.mean(p * p)), eps2)
            g2 = g * g + eps1
            if s["factored"]:
                d1, d0 = s["d"]
                s["v_row"] = decay * s["v_row"] + (1 - decay) * g2.mean(axis=d0)
                s["v_col"] = decay * s["v_col"] + (1 - decay) * g2.mean(axis=d1)
                reduced_d1 = d1 - 1 if d1 > d0 else d1
                row = s["v_row"] / s["v_row"].mean(axis=reduced_d1, keepdims=True)
                y = g * np.expand_dims(row**-0.5, d0) * np.expand_dims(s["v_col"] ** -0.5, d1)
            else:
                s["v"] = decay * s["v"] + (1 - decay) * g2
                y = g * s["v"] ** -0.5
            if clip is not None:
                y = y / max(1.0, np.sqrt(np.mean(y * y)) / clip)
            sub = scale * y
            if beta1 is not None:
                s["m"] = beta1 * s["m"] + (1 - beta1) * sub
                sub = s["m"]
            params[k] = ((1 - wd) * p if wd is not None else p) - sub
    return params


@pytest.mark.parametrize(
    "scale_by_param, clip, wd, beta1",
    [(True, 1.0, None, None), (False, 1.0, 1e-5, None), (True, None, 1e-2, 0.9)],
)
def test_adafactor_matches_t5x_update_rule(scale_by_param, clip, wd, beta1):
    rng = np.random.RandomState(0)
    params = {
        "factored": rng.randn(128, 192).astype(np.float32),  # both dims >= 128
        "wide_but_thin": rng.randn(8, 256).astype(np.float32),  # not factored
        "vector": rng.randn(16).astype(np.float32),
        "stack": rng.randn(3, 130, 140).astype(np.float32),  # factored over (130, 140)
    }
    grads = [
        {
            k: (rng.randn(*v.shape) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
            for k, v in params.items()
        }
        for _ in range(3)
    ]
    tx = optim.adafactor(
        learning_rate=0.1,
        decay_rate=0.8,
        multiply_by_parameter_scale=scale_by_param,
        clipping_threshold=clip,
        weight_decay_rate=wd,
        beta1=beta1,
    )
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    expected = _t5x_adafactor_reference(params, grads, 0.1, 0.8, scale_by_param, clip, wd, beta1)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # Factored parameters keep only row / column statistics, not a full second moment.
    factored_state = state[0]
    assert factored_state.v["factored"].shape == (1,)
    assert factored_state.v_row["factored"].shape == (128,)
    assert factored_state.v_col["factored"].shape == (192,)
    assert factored_state.v["wide_but_thin"].shape == (8, 256)


def test_adafactor_rejects_bad_settings():
    with pytest.raises(ValueError, match="decay_rate"):
        optim.adafactor(0.1, decay_rate=0.0)
    with pytest.raises(ValueError, match="weight_decay_rate"):
        optim.adafactor(0.1, weight_decay_rate=1.5)


def test_learning_rate_schedules_follow_t5x():
    rsqrt = optim.create_learning_rate_scheduler(
        "constant * linear_warmup * rsqrt_decay", base_learning_rate=0.5, warmup_steps=1000
    )
    for step, expected in [(0, 1e-8), (500, 0.5 * 0.5 / math.sqrt(1000)), (4000, 0.5 / 63.2455532)]:
        np.testing.assert_allclose(float(rsqrt(step)), expected, rtol=1e-5)
    # SMoP's recipe: linear warmup to 0.5 over 234 steps, then linear decay.
    linear = optim.create_learning_rate_scheduler(
        "linear_decay", base_learning_rate=0.5, warmup_steps=234, decay_factor=2.73e-4
    )
    np.testing.assert_allclose(float(linear(117)), 0.25, rtol=1e-5)
    np.testing.assert_allclose(float(linear(1234)), 0.5 * (1 + 2.73e-4 * (234 - 1234)), rtol=1e-5)
    cosine = optim.create_learning_rate_scheduler(
        "constant * cosine_decay", base_learning_rate=1.0, warmup_steps=10, steps_per_cycle=100
    )
    np.testing.assert_allclose(float(cosine(60)), 0.5, rtol=1e-5)
    every = optim.create_learning_rate_scheduler(
        "constant * decay_every", base_learning_rate=1.0, decay_factor=0.5, steps_per_decay=10
    )
    np.testing.assert_allclose(float(every(25)), 0.25, rtol=1e-6)
    with pytest.raises(ValueError, match="rsqrt_decya"):
        optim.create_learning_rate_scheduler("constant * rsqrt_decya")


# ---------------------------------------------------------------------------------------
# The train step: frozen parameters, optimizer state, rejected steps
# ---------------------------------------------------------------------------------------

BATCH, IN_LEN, OUT_LEN = 4, 12, 4
SHAPES = {
    "encoder_input_tokens": (BATCH, IN_LEN),
    "decoder_input_tokens": (BATCH, OUT_LEN),
    "decoder_target_tokens": (BATCH, OUT_LEN),
    "decoder_loss_weights": (BATCH, OUT_LEN),
    "task_ids": (BATCH,),
}
BAD_STEP = 2  # the schedule below turns the learning rate to inf at this step


class _Vocab:
    eos_id = 1


def tiny_model(prompt=None) -> models.EncoderDecoderModel:
    cfg = config_lib.T5Config(
        vocab_size=128,
        emb_dim=32,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        head_dim=16,
        mlp_dim=64,
        mlp_activations=("gelu", "linear"),
        dropout_rate=0.1,
    )
    return models.EncoderDecoderModel(
        network.Transformer(cfg, prompt=prompt), _Vocab(), _Vocab(), z_loss=1e-4
    )


def make_batch(seed: int) -> dict:
    rng = np.random.RandomState(seed)
    targets = rng.randint(2, 128, size=(BATCH, OUT_LEN)).astype(np.int32)
    return {
        "encoder_input_tokens": rng.randint(2, 128, size=(BATCH, IN_LEN)).astype(np.int32),
        "decoder_input_tokens": np.concatenate(
            [np.zeros((BATCH, 1), np.int32), targets[:, :-1]], 1
        ),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": np.ones((BATCH, OUT_LEN), np.int32),
        "task_ids": np.zeros((BATCH,), np.int32),
    }


def _flat(tree) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.fixture(scope="module")
def prompt_tuning_run():
    """Prompt tuning on a tiny T5: the initial state and the states after each step."""
    lr = lambda step: jnp.where(step >= BAD_STEP, jnp.inf, 0.3)  # noqa: E731
    trainer = trainer_lib.Trainer(
        tiny_model(prompts.SoftPrompt(length=3)),
        lambda schedule: optim.adafactor(
            schedule, multiply_by_parameter_scale=False, weight_decay_rate=1e-5
        ),
        lr,
        partitioning.Partitioner(),
        SHAPES,
        trainable_patterns=["prompt/.*"],
    )
    state = trainer.init_state()
    snapshots = [jax.device_get(state)]
    metrics = []
    for i in range(BAD_STEP + 1):
        state, m = trainer.train_step(state, make_batch(i))
        snapshots.append(jax.device_get(state))
        metrics.append(jax.device_get(m))
    return trainer, snapshots, metrics


def test_only_trainable_parameters_change(prompt_tuning_run):
    _, snapshots, metrics = prompt_tuning_run
    before, after = snapshots[0], snapshots[BAD_STEP]
    assert all(bool(m["finite"]) for m in metrics[:BAD_STEP])
    assert set(_flat(before.trainable)) == {"prompt/prompt"}
    assert not np.array_equal(
        before.trainable["prompt"]["prompt"], after.trainable["prompt"]["prompt"]
    )
    frozen_before, frozen_after = _flat(before.frozen), _flat(after.frozen)
    assert "token_embedder/embedding" in frozen_before
    for name, value in frozen_before.items():
        np.testing.assert_array_equal(value, frozen_after[name], err_msg=name)
    assert int(after.step) == BAD_STEP


def test_optimizer_state_holds_only_trainable_parameters(prompt_tuning_run):
    trainer, snapshots, _ = prompt_tuning_run
    opt_state = snapshots[-1].opt_state
    # Every parameter-shaped subtree of the optimizer state has exactly the trainable
    # paths; frozen parameters have no entry at all.
    seen = []
    optax.tree_map_params(
        trainer.optimizer,
        lambda leaf, name: seen.append(name),
        opt_state,
        jax.tree_util.tree_map_with_path(
            lambda p, _: jax.tree_util.keystr(p), snapshots[0].trainable
        ),
    )
    assert seen and set(seen) == {"['prompt']['prompt']"}
    prompt_bytes = 3 * 32 * 4
    assert trainer_lib.tree_bytes(opt_state) < 2 * prompt_bytes + 64


def test_non_finite_update_is_rejected(prompt_tuning_run):
    _, snapshots, metrics = prompt_tuning_run
    assert not bool(metrics[BAD_STEP]["finite"])
    good, after = snapshots[BAD_STEP], snapshots[BAD_STEP + 1]
    assert int(after.step) == BAD_STEP
    for name, value in _flat(good.trainable).items():
        np.testing.assert_array_equal(value, _flat(after.trainable)[name], err_msg=name)
        assert np.all(np.isfinite(_flat(after.trainable)[name]))


def test_model_tuning_state_is_larger_and_all_trainable():
    trainer = trainer_lib.Trainer(
        tiny_model(),
        optim.adafactor,
        optim.create_learning_rate_scheduler("constant", 1e-3),
        partitioning.Partitioner(),
        SHAPES,
        trainable_patterns=None,
    )
    abstract = trainer.layout.abstract
    assert jax.tree.leaves(abstract.frozen) == []
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.trainable))
    # Unfactored Adafactor (every dim < 128 here) keeps one second moment per weight.
    assert trainer_lib.tree_bytes(abstract.opt_state) >= 4 * n_params


def test_initial_checkpoint_must_fit_the_model():
    trainer = trainer_lib.Trainer(
        tiny_model(prompts.SoftPrompt(length=3)),
        optim.adafactor,
        optim.create_learning_rate_scheduler("constant", 1e-3),
        partitioning.Partitioner(),
        SHAPES,
        trainable_patterns=["prompt/.*"],
    )
    params = jax.device_get(trainer.init_state().params)
    backbone = {k: v for k, v in params.items() if k != "prompt"}
    # The backbone alone is enough: the prompt starts fresh.
    state = trainer.init_state_from_params(backbone, source="test")
    np.testing.assert_array_equal(
        np.asarray(state.frozen["token_embedder"]["embedding"]),
        backbone["token_embedder"]["embedding"],
    )
    wrong = jax.tree.map(lambda x: x, backbone)
    wrong["token_embedder"]["embedding"] = np.zeros((64, 32), np.float32)
    with pytest.raises(
        ValueError, match=r"token_embedder/embedding: expected \(128, 32\), found \(64, 32\)"
    ):
        trainer.init_state_from_params(wrong, source="test")
