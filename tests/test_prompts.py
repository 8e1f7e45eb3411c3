"""Soft prompts: mask semantics, initialisers, SPoT files, multi-task prompts, bad input.

Numerics against Hugging Face live in `test_methods_hf.py`; here are the invariants:
padding stays masked and every real token sees the prompt; the initialisers do what
the paper says (range, first 5,000 rows, class-label means, exact files, weighted
averages); a mixed-task batch equals the same examples run task by task; bad task ids,
bad files and prompts that leave no room for the inputs raise clear errors.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import layers, network, prompts
from tests.helpers import tiny_t5_config

CONFIG = tiny_t5_config()
LENGTH = 3
ENC = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14], [15, 16, 0, 0, 0, 0]], np.int32)
DEC = np.array([[0, 3, 4], [0, 5, 6], [0, 7, 8]], np.int32)
TGT = np.array([[3, 4, 2], [5, 6, 2], [7, 8, 2]], np.int32)
KEY = jax.random.PRNGKey(0)


def _init(module, task_ids=None):
    return module.init(
        {"params": KEY, "dropout": KEY}, ENC, DEC, TGT, task_ids=task_ids, enable_dropout=False
    )["params"]


@pytest.fixture(scope="module")
def soft_prompt_model():
    module = network.Transformer(CONFIG, prompt=prompts.SoftPrompt(length=LENGTH))
    return module, _init(module)


@functools.cache
def _encode_fn(module):
    return jax.jit(
        lambda params, enc, task_ids=None: module.apply(
            {"params": params}, enc, enable_dropout=False, task_ids=task_ids, method=module.encode
        )
    )


# ----------------------------------------------------------------------------------------
# Mask and combination
# ----------------------------------------------------------------------------------------


def test_prompt_is_prepended_and_mask_extended():
    module = prompts.SoftPrompt(length=LENGTH)
    embedded = jax.random.normal(KEY, (3, 6, 16))
    mask = ENC > 0
    variables = module.init(KEY, embedded, mask)
    prompt = variables["params"]["prompt"]
    assert prompt.shape == (LENGTH, 16)
    out, out_mask = module.apply(variables, embedded, mask)
    assert out.shape == (3, LENGTH + 6, 16)
    np.testing.assert_array_equal(out[:, :LENGTH], np.broadcast_to(prompt, (3, LENGTH, 16)))
    np.testing.assert_array_equal(out[:, LENGTH:], embedded)
    expected = np.concatenate([np.ones((3, LENGTH), bool), mask], axis=1)
    np.testing.assert_array_equal(out_mask, expected)
    np.testing.assert_array_equal(
        module.apply(variables, mask, method=module.extend_mask), expected
    )
    # The logical axes keep the prompt replicated.
    axes = variables["params_axes"]["prompt_axes"].names
    assert axes == ("prompt", "prompt_embed")


def test_encoder_attention_mask_lets_real_tokens_see_the_prompt():
    mask = prompts.Prefix().extend_mask(jnp.asarray(ENC > 0), LENGTH)
    attention = np.asarray(layers.make_attention_mask(mask, mask))[:, 0]  # [B, Q, K]
    for b in range(ENC.shape[0]):
        real = np.flatnonzero(ENC[b] > 0) + LENGTH
        pad = np.flatnonzero(ENC[b] == 0) + LENGTH
        assert attention[b][np.ix_(real, np.arange(LENGTH))].all()  # real -> prompt
        assert attention[b][np.ix_(np.arange(LENGTH), real)].all()  # prompt -> real
        assert not attention[b][:, pad].any()  # nobody attends to padding
        assert not attention[b][pad].any()


def test_every_real_token_depends_on_the_prompt_and_padding_is_ignored(soft_prompt_model):
    module, params = soft_prompt_model
    encode = _encode_fn(module)
    base = np.asarray(encode(params, ENC))
    real = np.concatenate([np.zeros((3, LENGTH), bool), ENC > 0], axis=1)

    # Changing the prompt changes the encoding of every real token.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["prompt"]["prompt"] = params["prompt"]["prompt"] + 0.5
    moved = np.abs(np.asarray(encode(bumped, ENC)) - base).max(-1)
    assert (moved[real] > 1e-4).all()

    # Changing the padding embedding (row 0) leaves every real token unchanged.
    padded = jax.tree.map(lambda x: x, params)
    padded["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[0].add(3.0)
    np.testing.assert_allclose(np.asarray(encode(padded, ENC))[real], base[real], atol=1e-6)


def test_prompt_length_that_leaves_no_room_raises():
    with pytest.raises(ValueError, match="leaves no room"):
        prompts.SoftPrompt(length=8, max_length=8)
    with pytest.raises(ValueError, match="positive int"):
        prompts.SoftPrompt(length=0)
    module = prompts.SoftPrompt(length=4, max_length=8)
    with pytest.raises(ValueError, match="at most 4"):
        module.init(KEY, jnp.zeros((2, 6, 16)), jnp.ones((2, 6), bool))
    module.init(KEY, jnp.zeros((2, 4, 16)), jnp.ones((2, 4), bool))  # fits exactly


# ----------------------------------------------------------------------------------------
# Initialisers
# ----------------------------------------------------------------------------------------


def test_uniform_init_range():
    x = np.asarray(prompts.Uniform(0.5)(KEY, (100, 64)))
    assert x.min() >= -0.5 and x.max() <= 0.5
    assert x.min() < -0.45 and x.max() > 0.45  # the whole interval, not [0, 0.5)


def test_sampled_vocab_uses_first_5000_rows_without_replacement():
    table = jnp.arange(6000 * 4, dtype=jnp.float32).reshape(6000, 4)
    x = np.asarray(prompts.SampledVocab(5000)(KEY, (100, 4), embedding_table=table))
    rows = (x[:, 0] / 4).astype(int)
    np.testing.assert_array_equal(x, np.asarray(table)[rows])
    assert rows.max() < 5000 and len(set(rows)) == 100
    # Longer than the population: with replacement, still inside the population.
    y = np.asarray(prompts.SampledVocab(3)(KEY, (10, 4), embedding_table=table))
    assert set((y[:, 0] / 4).astype(int)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="emb_dim"):
        prompts.SampledVocab()(KEY, (5, 3), embedding_table=table)


def test_class_label_init_averages_label_pieces():
    table = jax.random.normal(KEY, (50, 8))
    init = prompts.ClassLabels(token_ids=[[3], [4, 7]], fallback=prompts.Uniform(0.5))
    x = np.asarray(init(KEY, (5, 8), embedding_table=table))
    np.testing.assert_allclose(x[0], table[3], atol=1e-6)
    np.testing.assert_allclose(x[1], (table[4] + table[7]) / 2, atol=1e-6)
    assert np.abs(x[2:]).max() <= 0.5  # the rest from the fallback

    class Vocab:  # anything with encode()
        def encode(self, text):
            return {"yes": [5], "no": [6, 2]}[text]

    by_text = prompts.ClassLabels(labels=("yes", "no"), vocabulary=Vocab())
    y = np.asarray(by_text(KEY, (4, 8), embedding_table=table))
    np.testing.assert_allclose(y[1], (table[6] + table[2]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="do not fit"):
        init(KEY, (1, 8), embedding_table=table)
    with pytest.raises(ValueError, match="vocabulary"):
        prompts.ClassLabels(labels=("yes",))


def _fixture_prompts(fixtures: pathlib.Path) -> list[pathlib.Path]:
    folder = fixtures / "pretrained_prompts" / "t5_1_1_lm100k_base"
    files = [folder / f"{n}.npy" for n in ("sst2", "mrpc", "rte")]
    for f in files:
        if not f.exists():
            pytest.fail(f"The fixtures folder exists but lacks {f}.")
    return files


def test_from_file_loads_a_real_spot_prompt(fixtures):
    path = _fixture_prompts(fixtures)[0]
    expected = np.load(path)
    assert expected.shape == (100, 768)
    x = prompts.FromFile(str(path))(KEY, (100, 768))
    np.testing.assert_array_equal(np.asarray(x), expected)
    with pytest.raises(ValueError, match=r"shape \(100, 768\).*\(20, 768\)"):
        prompts.FromFile(str(path))(KEY, (20, 768))
    with pytest.raises(ValueError, match="does not exist"):
        prompts.FromFile(str(path) + ".missing")(KEY, (100, 768))


def test_weighted_average_of_files(fixtures, tmp_path):
    files = _fixture_prompts(fixtures)
    weights = [3.0, 1.0, 0.0]
    x = prompts.WeightedFiles([str(f) for f in files], weights)(KEY, (100, 768))
    arrays = [np.load(f).astype(np.float64) for f in files]
    expected = (3 * arrays[0] + arrays[1]) / 4
    np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-6, atol=1e-5)
    uniform = prompts.WeightedFiles([str(f) for f in files])(KEY, (100, 768))
    np.testing.assert_allclose(np.asarray(uniform), sum(arrays) / 3, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="2 weights for 3 files"):
        prompts.WeightedFiles([str(f) for f in files], [1.0, 2.0])
    bad = tmp_path / "short.npy"
    np.save(bad, np.zeros((10, 768), np.float32))
    with pytest.raises(ValueError, match="short.npy"):
        prompts.WeightedFiles([str(files[0]), str(bad)])(KEY, (100, 768))


def test_spot_init_through_the_network(tmp_path):
    source = np.random.RandomState(0).normal(size=(LENGTH, 16)).astype(np.float32)
    np.save(tmp_path / "source.npy", source)
    module = network.Transformer(
        CONFIG,
        prompt=prompts.SoftPrompt(
            length=LENGTH, prompt_init=prompts.FromFile(str(tmp_path / "source.npy"))
        ),
    )
    np.testing.assert_array_equal(np.asarray(_init(module)["prompt"]["prompt"]), source)
    wrong = network.Transformer(
        CONFIG,
        prompt=prompts.SoftPrompt(
            length=5, prompt_init=prompts.FromFile(str(tmp_path / "source.npy"))
        ),
    )
    with pytest.raises(ValueError, match="source.npy"):
        _init(wrong)


def test_sampled_vocab_init_sees_the_embedding_table():
    module = network.Transformer(
        CONFIG, prompt=prompts.SoftPrompt(length=LENGTH, prompt_init=prompts.SampledVocab(20))
    )
    params = _init(module)
    table = np.asarray(params["token_embedder"]["embedding"])[:20]
    for row in np.asarray(params["prompt"]["prompt"]):
        assert np.isclose(table, row).all(-1).any()


# ----------------------------------------------------------------------------------------
# Multi-task prompts and task ids
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_task_model():
    module = network.Transformer(CONFIG, prompt=prompts.SoftPrompt(length=LENGTH, num_tasks=3))
    return module, _init(module, task_ids=np.zeros(3, np.int32))


def test_mixed_task_batch_equals_task_by_task(multi_task_model):
    module, params = multi_task_model
    assert params["prompt"]["prompt"].shape == (3, LENGTH, 16)
    forward = jax.jit(
        lambda p, e, d, t, ids: module.apply(
            {"params": p}, e, d, t, task_ids=ids, enable_dropout=False
        )
    )
    ids = np.array([2, 0, 2], np.int32)
    mixed = np.asarray(forward(params, ENC, DEC, TGT, ids))
    for task in (0, 2):
        # The whole batch run as task `task` (same shapes: one compilation).
        alone = np.asarray(forward(params, ENC, DEC, TGT, np.full_like(ids, task)))
        rows = ids == task
        np.testing.assert_allclose(mixed[rows], alone[rows], atol=1e-5)
    # Different tasks give different outputs for the same example.
    other = np.asarray(forward(params, ENC, DEC, TGT, np.array([1, 1, 1], np.int32)))
    assert np.abs(other - mixed).max() > 1e-3


def test_bad_task_ids_raise_or_poison(multi_task_model):
    module, params = multi_task_model
    apply = functools.partial(module.apply, {"params": params}, ENC, DEC, TGT, enable_dropout=False)
    with pytest.raises(ValueError, match=r"\[3\].*NUM_TASKS=3"):
        apply(task_ids=np.array([0, 3, 1], np.int32))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        apply(task_ids=np.array([0, -1, 1], np.int32))
    with pytest.raises(ValueError, match="needs task_ids"):
        apply(task_ids=None)
    with pytest.raises(ValueError, match="3 examples"):
        apply(task_ids=np.array([0, 1], np.int32))
    # Under jit the ids are traced: an out-of-range id makes its example NaN, the others
    # stay exactly as with valid ids.
    encode = _encode_fn(module)
    bad = np.asarray(encode(params, ENC, jnp.array([0, 7, -2], jnp.int32)))
    good = np.asarray(encode(params, ENC, jnp.array([0, 1, 1], jnp.int32)))
    assert np.isnan(bad[1]).all() and np.isnan(bad[2]).all()
    np.testing.assert_array_equal(bad[0], good[0])
