"""T5Config validation and the published sizes (DESIGN.md "Facts to match")."""

import jax.numpy as jnp
import pytest

from hyperprompt_jax import config

# (emb_dim, num_heads, mlp_dim, layers) of the T5.1.1 release, head_dim 64, vocab 32128.
T5_1_1 = {
    "small": (512, 6, 1024, 8),
    "base": (768, 12, 2048, 12),
    "large": (1024, 16, 2816, 24),
    "xl": (2048, 32, 5120, 24),
    "xxl": (4096, 64, 10240, 24),
}


@pytest.mark.parametrize("size", sorted(T5_1_1))
def test_t5_1_1_sizes(size):
    cfg = config.t5_1_1(size)
    emb, heads, mlp, layers = T5_1_1[size]
    assert (cfg.emb_dim, cfg.num_heads, cfg.mlp_dim) == (emb, heads, mlp)
    assert cfg.num_encoder_layers == cfg.num_decoder_layers == layers
    assert cfg.head_dim == 64 and cfg.vocab_size == 32128
    assert cfg.mlp_activations == ("gelu", "linear")
    assert not cfg.logits_via_embedding


def test_sizes_read_from_gin_equal_what_gin_binds():
    """`config.t5_1_1` reads gin/models/*.gin with gin's parser; parsing the same file
    for real and calling the configured T5Config gives the same architecture."""
    import gin
    from hyperprompt_jax import gin_utils

    try:
        gin_utils.parse_gin(["models/t5_1_1_large.gin"], finalize=False)
        bound = gin.get_configurable(config.T5Config)()
    finally:
        gin.clear_config()
    ours = config.t5_1_1("large", dtype=bound.dtype)
    assert ours == bound.replace(dropout_rate=0.0, remat_policy="none")


def test_t5_1_0_3b_has_wide_heads():
    cfg = config.t5_1_0("3b")
    assert (cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (1024, 32, 128, 16384)


def test_t5_1_0_is_relu_and_tied():
    cfg = config.t5_1_0("base")
    assert cfg.mlp_activations == ("relu",) and cfg.logits_via_embedding
    assert (cfg.emb_dim, cfg.mlp_dim, cfg.num_encoder_layers) == (768, 3072, 12)


def test_dtype_names_and_overrides():
    cfg = config.t5_1_1("small", dtype="bfloat16", dropout_rate=0.1)
    assert cfg.dtype == jnp.bfloat16 and cfg.dropout_rate == 0.1
    assert cfg.replace(dtype="float32").dtype == jnp.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(emb_dim=0), "emb_dim"),
        (dict(num_heads=-2), "num_heads"),
        (dict(dropout_rate=1.5), "dropout_rate"),
        (dict(dtype="int8"), "int8"),
        (dict(mlp_activations=()), "mlp_activations"),
        (dict(num_encoder_layers=-1), "num_encoder_layers"),
        (dict(relative_attention_num_buckets=1), "relative_attention_num_buckets"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        config.T5Config(vocab_size=100, **kwargs)


def test_unknown_size_lists_known_ones():
    with pytest.raises(ValueError, match="base"):
        config.t5_1_1("huge")
