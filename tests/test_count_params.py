"""`count_params` on the real gin files (shapes only, via jax.eval_shape) and `trainable`.

The acceptance numbers: T5-large + prompt tuning (PROMPT_LENGTH=20): 20,480; T5-large +
SMoP (4 x 5): 24,576; T5-base + prompt tuning (100): 76,800; T5-base + SMoP: 18,432.
Totals are checked against the closed-form size of a T5.1.1 network, and T5-XXL is
counted too (44 GB of float32 if it were allocated).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze

from hyperprompt_jax import config, count_params, hyperprompt, trainable

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def t5_1_1_total(cfg: config.T5Config) -> int:
    """Closed-form parameter count of a T5.1.1 network (untied logits, GeGLU)."""
    e, kv, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    relpos = cfg.num_heads * cfg.relative_attention_num_buckets
    encoder = cfg.num_encoder_layers * (4 * e * kv + 3 * e * f + 2 * e) + e + relpos
    decoder = cfg.num_decoder_layers * (8 * e * kv + 3 * e * f + 3 * e) + e + relpos
    return 2 * cfg.vocab_size * e + encoder + decoder


CASES = [
    ("large", "prompt_tuning", ["PROMPT_LENGTH=20"], 20_480),
    ("large", "smop", [], 24_576),
    ("base", "prompt_tuning", [], 76_800),
    ("base", "smop", [], 18_432),
    ("xxl", "prompt_tuning", [], 409_600),
]


@pytest.mark.parametrize(
    "size,method,bindings,expected", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_trainable_counts_on_real_gin_files(size, method, bindings, expected):
    train, total, rows = count_params.count_params(
        [f"models/t5_1_1_{size}.gin", f"methods/{method}.gin"], bindings
    )
    assert train == expected
    assert total == t5_1_1_total(config.t5_1_1(size)) + expected
    # The table: only the prompt module is trainable, the backbone rows are frozen.
    assert sum(t for t, _ in rows.values()) == train
    assert all(t == 0 for name, (t, _) in rows.items() if not name.startswith("prompt/"))
    assert rows["encoder/layers_*"][1] > 0


def test_model_tuning_trains_everything():
    train, total, _ = count_params.count_params(
        ["models/t5_1_1_small.gin", "methods/model_tuning.gin"]
    )
    assert train == total == t5_1_1_total(config.t5_1_1("small"))


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_hyperprompt_counts_match_the_closed_form(variant):
    files = ["models/t5_1_1_base.gin", f"methods/hyperprompt_{variant}.gin"]
    added = hyperprompt.added_parameters(config.t5_1_1("base"), variant, num_tasks=8)
    backbone = t5_1_1_total(config.t5_1_1("base"))
    own, total, _ = count_params.count_params(
        files, ["NUM_TASKS=8", "TRAINABLE_PATTERNS=['hyperprompt/.*']"]
    )
    assert (own, total) == (added, backbone + added)
    if variant == "share":  # the default recipe tunes the whole model
        train, total, _ = count_params.count_params(files, ["NUM_TASKS=8"])
        assert train == total == backbone + added


def test_hyperprompt_setting_for_the_papers_014_percent():
    """One of docs/methods.md's settings for the paper's "as few as 0.14%"
    (HyperPrompt-Share on T5.1.1-base, 8 tasks, l = 8, b = 4), counted on the real gin
    files (the XXL settings use the closed form, checked against count_params above)."""
    own, total, _ = count_params.count_params(
        ["models/t5_1_1_base.gin", "methods/hyperprompt_share.gin"],
        [
            "NUM_TASKS=8",
            "PROMPT_LENGTH=8",
            "BOTTLENECK_DIM=4",
            "TRAINABLE_PATTERNS=['hyperprompt/.*']",
        ],
    )
    backbone = t5_1_1_total(config.t5_1_1("base"))
    assert total == backbone + own
    assert 0.135 < 100 * own / backbone < 0.145


def test_hyperprompt_requires_num_tasks():
    with pytest.raises(Exception, match="num_tasks|NUM_TASKS"):
        count_params.count_params(["models/t5_1_1_tiny.gin", "methods/hyperprompt_sep.gin"])


def test_command_line_prints_the_table_and_last_line(tmp_path):
    # Run from an unrelated directory: gin files resolve from the installed package.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    args = [
        sys.executable,
        "-m",
        "hyperprompt_jax.count_params",
        "--gin_file=models/t5_1_1_tiny.gin",
        "--gin_file=methods/smop.gin",
        "--gin.NUM_PROMPTS=3",
    ]
    result = subprocess.run(
        args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    emb = 64  # models/t5_1_1_tiny.gin
    trained = 3 * 5 * emb + emb * 3  # k * l * d + d * k
    cfg = config.T5Config(
        vocab_size=32128,
        emb_dim=64,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        head_dim=16,
        mlp_dim=128,
        mlp_activations=("gelu", "linear"),
    )
    assert lines[-1] == f"trainable_params={trained} total_params={t5_1_1_total(cfg) + trained}"
    assert any(line.startswith("prompt/router") for line in lines)
    assert lines[0].split() == ["module", "trainable", "total"]


def test_unmatched_trainable_pattern_is_an_error():
    with pytest.raises(ValueError, match="match no parameter"):
        count_params.count_params(
            ["models/t5_1_1_tiny.gin", "methods/prompt_tuning.gin"],
            ["TRAINABLE_PATTERNS=['promt/.*']"],
        )


# ----------------------------------------------------------------------------------------
# trainable.py
# ----------------------------------------------------------------------------------------

PARAMS = {
    "prompt": {"prompt": jnp.zeros((2, 3))},
    "encoder": {"layers_0": {"mlp": {"wo": {"kernel": jnp.zeros((4, 3))}}}},
    "hyperprompt": {"task_prompts": jnp.zeros((5,))},
}


def test_is_trainable_uses_fullmatch():
    assert trainable.is_trainable("prompt/prompt", ["prompt/.*"])
    assert not trainable.is_trainable("hyperprompt/task_prompts", ["prompt/.*"])  # fullmatch
    assert trainable.is_trainable("anything", None)
    assert not trainable.is_trainable("prompt/prompt", [])


def test_trainable_mask_and_count():
    mask = trainable.trainable_mask(PARAMS, ["prompt/.*", "hyperprompt/.*"])
    assert mask["prompt"]["prompt"] and mask["hyperprompt"]["task_prompts"]
    assert not mask["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]
    assert trainable.count(PARAMS, ["prompt/.*"]) == (6, 23)
    assert trainable.count(PARAMS) == (23, 23)
    frozen = trainable.trainable_mask(freeze(PARAMS), None)
    assert type(frozen).__name__ == "FrozenDict"
    assert all(np.array(list(trainable.param_paths(frozen).values())))


def test_bad_patterns_raise():
    with pytest.raises(ValueError, match="match no parameter"):
        trainable.trainable_mask(PARAMS, ["promt/.*"])
    with pytest.raises(ValueError, match="list of regexes"):
        trainable.trainable_mask(PARAMS, "prompt/.*")
    with pytest.raises(ValueError, match="Invalid regex"):
        trainable.trainable_mask(PARAMS, ["prompt/(("])
    assert trainable.trainable_mask(PARAMS, ["promt/.*"], strict=False)["prompt"]["prompt"] is False


def test_repository_gin_files_exist():
    root = REPO_ROOT / "gin" / "methods"
    for name in (
        "model_tuning",
        "prompt_tuning",
        "spot",
        "smop",
        "hyperprompt_share",
        "hyperprompt_sep",
        "hyperprompt_global",
    ):
        assert (root / f"{name}.gin").is_file(), name
