"""Packing keeps every example as it is alone, for every method.

The same examples, packed by the real feature converter (`pack=True`: several examples
per row, per-position task ids, prompt slots) and unpacked (one example per row), must
give every example the same loss, and the batch the same gradients, to float
tolerance: model tuning, prompt tuning (one prompt and one per task), SMoP (routing on
each example's own tokens, load balancing over the examples) and the three HyperPrompt
variants (each query sees its own task's prefixes only). Equality is what rules out
leakage across packed examples: a query that saw another example's tokens, prompt or
task prefix would change that example's loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from hyperprompt_jax import feature_converters, hyperprompt, models, network, packing, prompts, smop
from hyperprompt_jax.errors import UserError
from tests.helpers import tiny_t5_config

CONFIG = tiny_t5_config(
    vocab_size=64, relative_attention_num_buckets=8, relative_attention_max_distance=12
)
NUM_TASKS = 3
PACKED_LENGTHS = {"inputs": 40, "targets": 10}
UNPACKED_LENGTHS = {"inputs": 14, "targets": 5}


def _examples(num=9, seed=0):
    """Examples of several tasks and lengths (inputs and targets end with EOS = 1)."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(num):
        inputs = rng.randint(3, CONFIG.vocab_size, rng.randint(2, UNPACKED_LENGTHS["inputs"]))
        targets = rng.randint(3, CONFIG.vocab_size, rng.randint(1, UNPACKED_LENGTHS["targets"]))
        out.append(
            {
                "inputs": np.append(inputs, 1).astype(np.int32),
                "targets": np.append(targets, 1).astype(np.int32),
                "task_id": np.int32(rng.randint(NUM_TASKS)),
            }
        )
    return out


def _batch(examples, pack: bool, prompt_length: int = 0):
    """All rows the real feature converter makes of `examples`, stacked."""
    spec = {
        "inputs": tf.TensorSpec([None], tf.int32),
        "targets": tf.TensorSpec([None], tf.int32),
        "task_id": tf.TensorSpec([], tf.int32),
    }
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)
    converter = feature_converters.EncDecTaskIdFeatureConverter(
        pack=pack, num_tasks=NUM_TASKS, prompt_length=prompt_length
    )
    rows = list(converter(ds, PACKED_LENGTHS if pack else UNPACKED_LENGTHS).as_numpy_iterator())
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _per_example_losses(logits, batch):
    """Cross-entropy summed over each example's targets, in example order."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch["decoder_target_tokens"]
    token = -np.asarray(jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0])
    token = token * np.asarray(batch["decoder_loss_weights"])
    if "decoder_segment_ids" not in batch:
        return token.sum(-1)
    segments = np.asarray(batch["decoder_segment_ids"])
    return np.array(
        [
            token[r][segments[r] == s].sum()
            for r in range(len(token))
            for s in range(1, segments[r].max() + 1)
        ]
    )


METHODS = {
    "model_tuning": lambda: network.Transformer(CONFIG),
    "prompt_tuning": lambda: network.Transformer(
        CONFIG, prompt=prompts.SoftPrompt(length=3, prompt_init=prompts.Normal())
    ),
    "multitask_prompt": lambda: network.Transformer(
        CONFIG,
        prompt=prompts.SoftPrompt(length=3, num_tasks=NUM_TASKS, prompt_init=prompts.Normal()),
    ),
    "smop": lambda: network.Transformer(
        CONFIG,
        prompt=smop.SMoP(
            num_prompts=3,
            length=2,
            routing=smop.TopK(noise=None),
            prompt_init=prompts.Normal(),
            load_balancing_weight=0.01,
        ),
    ),
    **{
        f"hyperprompt_{name}": (
            lambda variant=variant: network.Transformer(
                CONFIG,
                hyperprompt=hyperprompt.HyperPrompt(
                    num_tasks=NUM_TASKS, prompt_length=2, bottleneck_dim=4, hypernetworks=variant
                ),
            )
        )
        for name, variant in hyperprompt.VARIANTS.items()
    },
}


@pytest.fixture(scope="module")
def examples():
    return _examples()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_packed_rows_give_every_example_its_unpacked_loss_and_gradients(method, examples):
    module = METHODS[method]()
    model = models.EncoderDecoderModel(module, None, None, z_loss=1e-4, label_smoothing=0.1)
    unpacked = _batch(examples, pack=False)
    packed = _batch(examples, pack=True, prompt_length=model.input_prompt_length)
    assert len(packed["encoder_input_tokens"]) < len(examples)  # really packed
    shapes = {k: v.shape for k, v in unpacked.items()}
    params = jax.jit(lambda rng: model.get_initial_variables(rng, shapes)["params"])(
        jax.random.PRNGKey(1)
    )

    rng = jax.random.PRNGKey(3)

    @jax.jit
    def run(batch):
        logits = model._compute_logits(params, batch)
        # Training mode (dropout is 0, SMoP's routing noise-free): its load-balancing
        # loss is computed over the examples in both layouts.
        (loss, metrics), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(params, batch, rng)
        return logits, loss, metrics, grads

    logits_p, loss_p, metrics_p, grads_p = run(packed)
    logits_u, loss_u, metrics_u, grads_u = run(unpacked)
    np.testing.assert_allclose(
        _per_example_losses(logits_p, packed),
        _per_example_losses(logits_u, unpacked),
        rtol=2e-5,
        atol=2e-5,
    )
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=2e-5)
    assert float(metrics_p["num_examples"]) == float(metrics_u["num_examples"]) == len(examples)
    if method == "smop":
        np.testing.assert_allclose(metrics_p["aux_loss"], metrics_u["aux_loss"], rtol=1e-5)
    flat_p = jax.tree_util.tree_leaves_with_path(grads_p)
    flat_u = dict(jax.tree_util.tree_leaves_with_path(grads_u))
    for path, grad in flat_p:
        scale = float(np.abs(flat_u[path]).max())
        np.testing.assert_allclose(
            grad, flat_u[path], rtol=2e-4, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_packed_converter_layout():
    """seqio's packing plus a task id per position and prompt slots before each input."""
    examples = [
        {
            "inputs": np.array([7, 8, 1], np.int32),
            "targets": np.array([3, 1], np.int32),
            "task_id": np.int32(2),
        },
        {
            "inputs": np.array([9, 1], np.int32),
            "targets": np.array([4, 5, 1], np.int32),
            "task_id": np.int32(1),
        },
    ]
    row = {k: np.asarray(v[0]) for k, v in _batch(examples, pack=True, prompt_length=2).items()}
    slot = packing.PROMPT_SLOT_ID
    np.testing.assert_array_equal(
        row["encoder_input_tokens"][:9], [slot, slot, 7, 8, 1, slot, slot, 9, 1]
    )
    np.testing.assert_array_equal(row["encoder_segment_ids"][:9], [1] * 5 + [2] * 4)
    np.testing.assert_array_equal(row["encoder_positions"][:9], [0, 1, 2, 3, 4, 0, 1, 2, 3])
    np.testing.assert_array_equal(row["encoder_task_ids"][:9], [2] * 5 + [1] * 4)
    np.testing.assert_array_equal(row["decoder_task_ids"][:5], [2, 2, 1, 1, 1])
    assert not row["encoder_input_tokens"][9:].any()


def test_packed_rows_without_prompt_slots_become_nan_not_wrong():
    """Rows packed without slots (a converter built for another prompt length) would
    lose each example's first tokens to the prompt: the model makes them NaN, and the
    launcher refuses the mismatch before compiling (`test_train_refuses_a_converter_...`)."""
    module = METHODS["prompt_tuning"]()
    model = models.EncoderDecoderModel(module, None, None)
    batch = _batch(_examples(4), pack=True, prompt_length=0)
    params = model.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
    )["params"]
    assert np.isnan(np.asarray(model._compute_logits(params, batch))).all()


def test_packed_rows_need_per_position_task_ids():
    module = METHODS["hyperprompt_share"]()
    model = models.EncoderDecoderModel(module, None, None)
    batch = _batch(_examples(4), pack=True)
    params = model.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
    )["params"]
    per_row = {k: v for k, v in batch.items() if not k.endswith("task_ids")}
    per_row["task_ids"] = jnp.zeros(len(batch["encoder_input_tokens"]), jnp.int32)
    with pytest.raises(UserError, match="Per-position task ids"):
        model._compute_logits(params, per_row)
    unpacked = {k: v for k, v in _batch(_examples(4), pack=False).items()}
    unpacked["encoder_task_ids"] = jnp.zeros_like(unpacked["encoder_input_tokens"])
    with pytest.raises(UserError, match="for packed rows"):
        model._compute_logits(params, unpacked)


def test_out_of_range_task_id_of_a_packed_position_is_nan_under_jit():
    """On the device a bad id must not silently pick another task's prefix."""
    module = METHODS["hyperprompt_sep"]()
    model = models.EncoderDecoderModel(module, None, None)
    batch = dict(_batch(_examples(4), pack=True))
    params = model.get_initial_variables(
        jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()}
    )["params"]
    batch["encoder_task_ids"] = batch["encoder_task_ids"].at[0, 0].set(NUM_TASKS)
    logits = jax.jit(model._compute_logits)(params, batch)
    first = np.asarray(batch["decoder_segment_ids"][0]) == 1
    assert np.isnan(np.asarray(logits)[0][first]).all()


def test_train_refuses_a_converter_with_other_prompt_slots():
    """The launcher checks the packed converter against the model before compiling."""
    from hyperprompt_jax import train

    model = models.EncoderDecoderModel(METHODS["smop"](), None, None)
    assert model.input_prompt_length == 2
    wrong = feature_converters.EncDecTaskIdFeatureConverter(pack=True, prompt_length=3)
    with pytest.raises(UserError, match="2 positions; build it with prompt_length=2"):
        train._check_prompt_slots(wrong, model)
    train._check_prompt_slots(
        feature_converters.EncDecTaskIdFeatureConverter(pack=True, prompt_length=2), model
    )
    # Unpacked rows have no slots: the model prepends its prompt.
    train._check_prompt_slots(feature_converters.EncDecTaskIdFeatureConverter(), model)


def test_plans_shapes_without_seqio_are_the_converters():
    """`plan.input_shapes` (no seqio import, for benchmarks) matches the converter."""
    from hyperprompt_jax import plan

    lengths = {"inputs": 12, "targets": 4}
    for pack in (False, True):
        converter = feature_converters.EncDecTaskIdFeatureConverter(pack=pack)
        assert plan.input_shapes(3, lengths, pack) == converter.model_input_shapes(lengths, 3)
