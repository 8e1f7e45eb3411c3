"""The network's parameter tree is exactly t5x's, for every public size.

`expected_tree` below rebuilds t5x's tree from its naming rules (t5x
`examples/t5/network.py` and `layers.py`), independently of our modules: names,
shapes, float32, and the `params_axes` logical axis names (`<param>_axes` entries
holding `AxisMetadata(names=...)`). `jax.eval_shape` of the initialisation allocates
nothing, so even T5-XXL is checked on a laptop. The real t5x fixture checkpoint must
have exactly the tree of its (tiny) config.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from hyperprompt_jax import checkpoints, config, network


def expected_tree(cfg: config.T5Config) -> tuple[dict, dict]:
    """`({name: shape}, {name: logical axes})` of t5x's T5 for `cfg` ('/' names)."""
    e, h, d, m, v = cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size
    shapes, axes = {}, {}

    def add(name, shape, names):
        shapes[name] = shape
        axes[name] = names

    def attention(prefix):
        for proj in ("query", "key", "value"):
            add(f"{prefix}/{proj}/kernel", (e, h * d), ("embed", "joined_kv"))
        add(f"{prefix}/out/kernel", (h * d, e), ("joined_kv", "embed"))

    def mlp(prefix):
        acts = cfg.mlp_activations
        names = ["wi"] if len(acts) == 1 else [f"wi_{i}" for i in range(len(acts))]
        for name in names:
            add(f"{prefix}/mlp/{name}/kernel", (e, m), ("embed", "mlp"))
        add(f"{prefix}/mlp/wo/kernel", (m, e), ("mlp", "embed"))

    def norm(name):
        add(f"{name}/scale", (e,), ("embed",))

    add("token_embedder/embedding", (v, e), ("vocab", "embed"))
    for stack, depth in (("encoder", cfg.num_encoder_layers), ("decoder", cfg.num_decoder_layers)):
        add(
            f"{stack}/relpos_bias/rel_embedding",
            (h, cfg.relative_attention_num_buckets),
            ("heads", "relpos_buckets"),
        )
        for i in range(depth):
            layer = f"{stack}/layers_{i}"
            if stack == "encoder":
                norm(f"{layer}/pre_attention_layer_norm")
                attention(f"{layer}/attention")
            else:
                norm(f"{layer}/pre_self_attention_layer_norm")
                attention(f"{layer}/self_attention")
                norm(f"{layer}/pre_cross_attention_layer_norm")
                attention(f"{layer}/encoder_decoder_attention")
            norm(f"{layer}/pre_mlp_layer_norm")
            mlp(layer)
        norm(f"{stack}/{stack}_norm")
    if not cfg.logits_via_embedding:
        add("decoder/logits_dense/kernel", (e, v), ("embed", "vocab"))
    return shapes, axes


# The gin quickstart's tiny T5.1.1 (gin/models/t5_1_1_tiny.gin) and the fixture's.
TINY = config.t5_1_1(
    "base",
    emb_dim=64,
    num_heads=4,
    head_dim=16,
    mlp_dim=128,
    num_encoder_layers=2,
    num_decoder_layers=2,
)
FIXTURE_TINY = config.t5_1_1(
    "base",
    emb_dim=4,
    num_heads=2,
    head_dim=2,
    mlp_dim=8,
    num_encoder_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=4,
)
CONFIGS = {
    "tiny": TINY,
    "fixture_tiny": FIXTURE_TINY,
    **{f"t5_1_1_{size}": config.t5_1_1(size) for size in config.T5_1_1_SIZES},
    "t5_1_0_small": config.t5_1_0("small"),
    "t5_1_0_3b": config.t5_1_0("3b"),  # head_dim 128: heads x head_dim != emb_dim
    "unequal_depth": config.t5_1_1("small", num_encoder_layers=3, num_decoder_layers=1),
}


def _abstract_variables(cfg):
    model = network.Transformer(cfg)
    return jax.eval_shape(lambda rng: network.init_params(model, rng), jax.random.PRNGKey(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tree_is_t5x(name):
    cfg = CONFIGS[name]
    variables = _abstract_variables(cfg)
    assert set(variables) == {"params", "params_axes"}
    shapes, axes = expected_tree(cfg)

    params = checkpoints.flatten_params(variables["params"])
    assert {k: tuple(x.shape) for k, x in params.items()} == shapes
    assert all(x.dtype == jnp.float32 for x in params.values())

    # t5x stores the axes of parameter `p` as `p_axes` in the `params_axes` collection.
    found_axes = checkpoints.flatten_params(variables["params_axes"])
    assert {k[: -len("_axes")]: tuple(meta.names) for k, meta in found_axes.items()} == axes
    assert all(k.endswith("_axes") for k in found_axes)


def test_sizes_have_public_dimensions():
    # (emb_dim, heads, mlp_dim, layers) of the T5.1.1 release, head_dim 64, vocab 32128.
    public = {
        "small": (512, 6, 1024, 8),
        "base": (768, 12, 2048, 12),
        "large": (1024, 16, 2816, 24),
        "xl": (2048, 32, 5120, 24),
        "xxl": (4096, 64, 10240, 24),
    }
    for size, (e, h, m, layers) in public.items():
        cfg = CONFIGS[f"t5_1_1_{size}"]
        assert (cfg.emb_dim, cfg.num_heads, cfg.mlp_dim) == (e, h, m)
        assert cfg.num_encoder_layers == cfg.num_decoder_layers == layers
        assert (cfg.head_dim, cfg.vocab_size) == (64, 32128)
    # Parameter counts of the public T5.1.1 checkpoints (t5x trees), e.g. base 247.6M.
    counts = {
        size: sum(
            int(jnp.prod(jnp.array(s)))
            for s in expected_tree(CONFIGS[f"t5_1_1_{size}"])[0].values()
        )
        for size in ("small", "base")
    }
    assert counts == {"small": 76_961_152, "base": 247_577_856}


def test_fixture_checkpoint_names_match_tiny_tree(tiny_t5x_checkpoint):
    params = checkpoints.load_t5x_checkpoint(str(tiny_t5x_checkpoint))
    flat = checkpoints.flatten_params(params)
    shapes, _ = expected_tree(FIXTURE_TINY)
    assert {k: tuple(x.shape) for k, x in flat.items()} == shapes
