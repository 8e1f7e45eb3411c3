"""Evaluation and inference batches: longest inputs first, cut to their longest input.

`data.decoding_batches` groups rows of similar length and cuts each batch's encoder
inputs to its longest input (rounded up to a bucket): decoding and scoring must give
exactly what the full-width batch gives, for a method whose input hook reads the
whole input (SMoP's mean embedding) and one that conditions every attention
(HyperPrompt).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import data, decoding, hyperprompt, models, network, prompts, smop
from hyperprompt_jax.errors import UserError
from tests.helpers import tiny_t5_config

CONFIG = tiny_t5_config(vocab_size=40)
FULL = 24  # the feature length


def _rows(lengths, seed=0):
    rng = np.random.RandomState(seed)
    rows = []
    for i, length in enumerate(lengths):
        tokens = np.zeros(FULL, np.int32)
        tokens[:length] = rng.randint(3, CONFIG.vocab_size, length)
        tokens[length - 1] = 1
        rows.append(
            {
                "encoder_input_tokens": tokens,
                "decoder_input_tokens": np.zeros(5, np.int32),
                "decoder_target_tokens": np.r_[rng.randint(3, 40, 4), 1].astype(np.int32),
                "task_ids": np.int32(i % 2),
            }
        )
    return rows


def test_longest_first_cut_to_the_bucket_and_every_row_once():
    rows = _rows([3, 20, 7, 12, 5])
    batches = list(data.decoding_batches(rows, batch_size=2, bucket=8))
    assert [positions for positions, _ in batches] == [[1, 3], [2, 4], [0]]
    widths = [b["encoder_input_tokens"].shape for _, b in batches]
    assert widths == [(2, FULL), (2, 8), (2, 8)]  # 20 -> 24 (capped), 7 -> 8, 3 -> 8
    np.testing.assert_array_equal(
        batches[0][1]["encoder_input_tokens"][1], rows[3]["encoder_input_tokens"]
    )
    last = batches[-1][1]
    np.testing.assert_array_equal(last["encoder_input_tokens"][0], last["encoder_input_tokens"][1])
    (_, whole), *_ = data.decoding_batches(rows, batch_size=8, bucket=None)
    assert whole["encoder_input_tokens"].shape == (8, FULL)
    with pytest.raises(UserError, match="bucket"):
        next(data.decoding_batches(rows, 2, bucket=0))


@pytest.mark.parametrize("method", ["smop", "hyperprompt"])
def test_cut_batches_decode_and_score_as_the_full_width(method):
    if method == "smop":
        hook = {"prompt": smop.SMoP(num_prompts=3, length=2, prompt_init=prompts.Normal())}
    else:
        hook = {
            "hyperprompt": hyperprompt.HyperPrompt(num_tasks=2, prompt_length=2, bottleneck_dim=4)
        }
    model = models.EncoderDecoderModel(
        network.Transformer(CONFIG, **hook),
        None,
        type("Vocab", (), {"eos_id": 1})(),
        decode_fn=decoding.temperature_sample,
    )
    rows = _rows([3, 9, 6, 2])
    (order_full, full), *_ = data.decoding_batches(rows, batch_size=4, bucket=None)
    (order_cut, cut), *_ = data.decoding_batches(rows, batch_size=4, bucket=4)
    assert order_cut == order_full and cut["encoder_input_tokens"].shape[1] == 12 < FULL
    shapes = {k: v.shape for k, v in full.items()}
    params = model.get_initial_variables(jax.random.PRNGKey(0), shapes)["params"]
    greedy = {"temperature": 0.0}

    def run(batch):
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        tokens = model.predict_batch(params, batch, decoder_params=dict(greedy))
        return np.asarray(tokens), np.asarray(model.score_batch(params, batch))

    tokens_full, scores_full = run(full)
    tokens_cut, scores_cut = run(cut)
    np.testing.assert_array_equal(tokens_cut, tokens_full)
    np.testing.assert_allclose(scores_cut, scores_full, rtol=1e-5, atol=1e-5)
