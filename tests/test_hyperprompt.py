"""HyperPrompt: per-layer hyper-prompts, per-example tasks, parameter counts, bad input.

Invariants: each stack gets one `(key, value)` pair `[batch, l, heads, head_dim]` per
self-attention layer; a mixed-task batch equals the same examples run task by task
(every variant); every HyperPrompt parameter receives gradient; the backbone's tree is
exactly the base model's (checkpoints load unchanged); the closed-form parameter count
matches the module; bad task ids raise (eagerly) or poison only their own example with
NaN (under jit). Numerics against NumPy / Hugging Face: `test_methods_hf.py`.

Note on "zero prompts equal the base model": for key/value prefixes that cannot hold.
A zero key prefix still receives softmax weight `exp(q . 0) = 1` per position, so zero
hyper-prompts shrink every self-attention output by `Z / (Z + l)` rather than vanish
(a prefix can only vanish with keys whose logits are -inf for every query). We check
instead that zeroed up-projections generate exactly-zero prefixes and that these still
change the network's output (the attention math with prefixes is checked against
NumPy and Hugging Face in `test_methods_hf.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperprompt_jax import hyperprompt, network, trainable
from tests.helpers import tiny_t5_config

CONFIG = tiny_t5_config(head_dim=6, num_decoder_layers=3)
T, P, B_DIM = 3, 2, 4
# Small, distinct Global widths so a mix-up of t', the projector's width and t shows.
PIECES = {
    "share": hyperprompt.PerLayer(),
    "sep": hyperprompt.PerLayer(per_task=True),
    "global": hyperprompt.Global(task_embed_dim=5, projector_hidden_dim=6, layer_task_embed_dim=7),
}
KEY = jax.random.PRNGKey(0)
ENC = np.array(
    [[5, 6, 7, 8, 0], [9, 10, 11, 12, 13], [15, 16, 0, 0, 0], [17, 18, 19, 0, 0]], np.int32
)
DEC = np.array([[0, 3, 4], [0, 5, 6], [0, 7, 8], [0, 9, 10]], np.int32)
TGT = np.array([[3, 4, 2], [5, 6, 2], [7, 8, 2], [9, 10, 2]], np.int32)
IDS = np.array([2, 0, 1, 2], np.int32)


def _hook(variant: str) -> hyperprompt.HyperPrompt:
    return hyperprompt.HyperPrompt(
        num_tasks=T, prompt_length=P, bottleneck_dim=B_DIM, hypernetworks=PIECES[variant]
    )


@functools.cache
def _model(variant: str):
    """(module, variables, run): `run(params, task_ids) -> (logits, gradients)` on the
    fixed batch, jitted once per variant (every test below reuses that compilation)."""
    module = network.Transformer(CONFIG, hyperprompt=_hook(variant))
    variables = module.init(
        {"params": KEY, "dropout": KEY}, ENC, DEC, TGT, task_ids=IDS, enable_dropout=False
    )

    def loss(params, ids):
        logits = module.apply({"params": params}, ENC, DEC, TGT, task_ids=ids, enable_dropout=False)
        log_probs = jax.nn.log_softmax(logits) * jax.nn.one_hot(TGT, CONFIG.vocab_size)
        return jnp.sum(log_probs), logits

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    return module, variables, lambda params, ids: grad_fn(params, ids)[::-1]


def _forward(variant, params, ids):
    return np.asarray(_model(variant)[2](params, ids)[0])


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_prefix_shapes_per_layer(variant):
    hook = _hook(variant)
    params = _model(variant)[1]["params"]["hyperprompt"]
    for stack, layers in (("encoder", 2), ("decoder", 3)):
        prefixes = hook.apply({"params": params}, IDS, config=CONFIG, stack=stack, batch_size=4)
        assert len(prefixes) == layers
        for key, value, bias in prefixes:
            assert key.shape == value.shape == (4, P, CONFIG.num_heads, CONFIG.head_dim)
            assert bias is None  # unpacked rows: every query sees its row's prefix
            assert np.abs(np.asarray(key) - np.asarray(value)).max() > 0  # separate nets


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_mixed_task_batch_equals_task_by_task(variant):
    params = _model(variant)[1]["params"]
    mixed = _forward(variant, params, IDS)
    for task in range(T):
        # The whole batch run as task `task` (same shapes: one compilation).
        alone = _forward(variant, params, np.full_like(IDS, task))
        rows = IDS == task
        np.testing.assert_allclose(mixed[rows], alone[rows], atol=1e-5)
        assert np.abs(mixed[~rows] - alone[~rows]).max() > 1e-4  # the task matters


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_every_hyperprompt_parameter_gets_gradient(variant):
    _, variables, run = _model(variant)
    _, grads = run(variables["params"], IDS)
    for path, g in trainable.param_paths(grads["hyperprompt"]).items():
        g = np.asarray(g)
        if variant == "sep" and g.ndim == 4:
            # Per-task HyperNetworks: every task present in the batch gets gradient.
            assert all(np.abs(g[t]).max() > 0 for t in set(IDS.tolist())), path
        else:
            assert np.abs(g).max() > 0, path


@pytest.mark.parametrize("variant", hyperprompt.VARIANTS)
def test_backbone_tree_is_the_base_models_and_count_matches_formula(variant):
    _, variables, _ = _model(variant)
    params = variables["params"]
    base = jax.eval_shape(
        lambda: network.Transformer(CONFIG).init(
            {"params": KEY, "dropout": KEY}, ENC, DEC, TGT, enable_dropout=False
        )["params"]
    )
    backbone = {k: v for k, v in params.items() if k != "hyperprompt"}
    assert jax.tree.map(np.shape, backbone) == jax.tree.map(np.shape, dict(base))
    added = sum(np.size(x) for x in jax.tree.leaves(params["hyperprompt"]))
    expected = hyperprompt.added_parameters(CONFIG, PIECES[variant], T, P, B_DIM)
    assert added == expected
    # Tuning only HyperPrompt's own parameters selects exactly those.
    assert trainable.count(params, ["hyperprompt/.*"])[0] == added
    # Every HyperPrompt parameter has logical axes (all replicated by partitioning.py).
    axes = trainable.param_paths(variables["params_axes"]["hyperprompt"])
    assert len(axes) == len(trainable.param_paths(params["hyperprompt"]))


def test_zero_up_projection_gives_zero_prefixes():
    module, variables, _ = _model("share")
    params = jax.tree.map(lambda x: x, variables["params"])
    for stack in ("encoder", "decoder"):
        for kind in ("key", "value"):
            name = f"{kind}_up"
            params["hyperprompt"][stack][name] = jnp.zeros_like(params["hyperprompt"][stack][name])
    hook = _hook("share")
    for stack in ("encoder", "decoder"):
        prefixes = hook.apply(
            {"params": params["hyperprompt"]}, IDS, config=CONFIG, stack=stack, batch_size=4
        )
        for key, value, _ in prefixes:
            np.testing.assert_array_equal(key, 0.0)
            np.testing.assert_array_equal(value, 0.0)
    # ... which do not vanish: the network differs from the base model.
    base = network.Transformer(CONFIG)
    backbone = {k: v for k, v in params.items() if k != "hyperprompt"}
    ours = _forward("share", params, IDS)
    theirs = np.asarray(base.apply({"params": backbone}, ENC, DEC, TGT, enable_dropout=False))
    assert np.abs(ours - theirs).max() > 1e-4


# ----------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------


def test_bad_task_ids_raise():
    module, variables, _ = _model("sep")
    apply = functools.partial(module.apply, variables, ENC, DEC, TGT, enable_dropout=False)
    with pytest.raises(ValueError, match=r"\[3\].*NUM_TASKS=3"):
        apply(task_ids=np.array([0, 3, 1, 2], np.int32))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        apply(task_ids=np.array([0, -1, 1, 2], np.int32))
    with pytest.raises(ValueError, match="needs task_ids"):
        apply(task_ids=None)
    with pytest.raises(ValueError, match="integers"):
        apply(task_ids=np.array([0.0, 1.0, 1.0, 2.0], np.float32))


@pytest.mark.parametrize("variant", ["share", "global"])
def test_out_of_range_ids_under_jit_poison_only_their_example(variant):
    _, variables, _ = _model(variant)
    params = variables["params"]
    good = _forward(variant, params, IDS)
    bad_ids = IDS.copy()
    bad_ids[1], bad_ids[3] = T, -1
    bad = _forward(variant, params, bad_ids)
    assert np.isnan(bad[1]).all() and np.isnan(bad[3]).all()
    np.testing.assert_array_equal(bad[[0, 2]], good[[0, 2]])


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="hypernetworks"):
        hyperprompt.HyperPrompt(num_tasks=2, hypernetworks="shared")
    with pytest.raises(ValueError, match="task_embed_dim"):
        hyperprompt.Global(task_embed_dim=0)
    with pytest.raises(ValueError, match="bottleneck_dim"):
        hyperprompt.HyperPrompt(num_tasks=2, bottleneck_dim=0)
    with pytest.raises(ValueError, match="num_tasks"):
        hyperprompt.HyperPrompt(num_tasks=0)
    hook = _hook("share")
    with pytest.raises(ValueError, match="stack"):
        hook.init(KEY, IDS, config=CONFIG, stack="middle", batch_size=4)


# ---------------------------------------------------------------------------------------
# Recipes held to the paper's numbers (He et al., 2022)
# ---------------------------------------------------------------------------------------


def _t5_1_1_total(cfg) -> int:
    """Closed-form size of a T5.1.1 network (untied logits, GeGLU): independent arithmetic."""
    e, kv, f = cfg.emb_dim, cfg.num_heads * cfg.head_dim, cfg.mlp_dim
    relpos = cfg.num_heads * cfg.relative_attention_num_buckets
    encoder = cfg.num_encoder_layers * (4 * e * kv + 3 * e * f + 2 * e) + e + relpos
    decoder = cfg.num_decoder_layers * (8 * e * kv + 3 * e * f + 3 * e) + e + relpos
    return 2 * cfg.vocab_size * e + encoder + decoder


def _recipe(variant: str, bindings=()):
    """The gin recipe's HyperPrompt hook and the macros it was built from."""
    import gin
    from hyperprompt_jax import gin_utils

    try:
        gin_utils.parse_gin(
            ["models/t5_1_1_base.gin", f"methods/hyperprompt_{variant}.gin"],
            ["NUM_TASKS=8", *bindings],
        )
        return gin.get_configurable(hyperprompt.HyperPrompt)()
    finally:
        gin.clear_config()


# (variant, size, bindings, added parameters as % of T5.1.1) with 8 tasks (GLUE). Our
# defaults l = 16, b = 32, t = 32, and the settings docs/methods.md gives for the
# paper's "as few as 0.14%" (the paper's l, b, t are not published in the sources we
# could read): at XXL, HyperPrompt-Global with t = 28 or HyperPrompt-Share with b = 20.
PERCENTAGES = [
    ("share", "base", (), 0.99),
    ("global", "base", (), 1.31),
    ("share", "xxl", (), 0.23),
    ("global", "xxl", (), 0.155),
    ("global", "xxl", ("TASK_EMBED_DIM=28",), 0.14),
    ("share", "xxl", ("BOTTLENECK_DIM=20",), 0.14),
]


@pytest.mark.parametrize("variant, size, bindings, percent", PERCENTAGES)
def test_recipe_parameter_fractions(variant, size, bindings, percent):
    from hyperprompt_jax import config

    hook = _recipe(variant, bindings)
    cfg = config.t5_1_1(size)
    added = hyperprompt.added_parameters(
        cfg, hook.hypernetworks, hook.num_tasks, hook.prompt_length, hook.bottleneck_dim
    )
    assert 100 * added / _t5_1_1_total(cfg) == pytest.approx(percent, abs=0.01)


def test_recipe_variants_schedule_and_init_statistics():
    """The three gin files select the three pieces; the training recipe is the paper's
    (full-model tuning, t5x Adafactor, constant learning rate 1e-3); initial global
    prompts are Uniform(-0.5, 0.5) and HyperNetwork kernels have variance 1 / fan-in."""
    import gin
    from hyperprompt_jax import gin_utils, optim

    assert _recipe("share").hypernetworks == hyperprompt.PerLayer(per_task=False)
    assert _recipe("sep").hypernetworks == hyperprompt.PerLayer(per_task=True)
    hook = _recipe("global")
    assert hook.hypernetworks == hyperprompt.Global(32, 32, 32)
    assert (hook.prompt_length, hook.bottleneck_dim) == (16, 32)
    try:
        gin_utils.parse_gin(
            ["runs/finetune.gin", "models/t5_1_1_base.gin", "methods/hyperprompt_share.gin"],
            ["NUM_TASKS=8", "TRAIN_STEPS=100"],
            finalize=False,
        )
        schedule = gin.get_configurable(optim.create_learning_rate_scheduler)()
        assert [float(schedule(s)) for s in (0, 50, 10_000)] == pytest.approx([1e-3] * 3)
        assert gin_utils.query_macro("TRAINABLE_PATTERNS") is None
        assert gin.query_parameter("optim.adafactor.multiply_by_parameter_scale") is not False
    finally:
        gin.clear_config()

    cfg = CONFIG.replace(emb_dim=256, num_heads=4, head_dim=64)
    module = hyperprompt.HyperPrompt(num_tasks=4, prompt_length=16, bottleneck_dim=128)
    params = module.init(KEY, jnp.zeros(2, jnp.int32), config=cfg, stack="encoder", batch_size=2)[
        "params"
    ]
    task_prompts = np.asarray(params["task_prompts"])
    assert -0.5 <= task_prompts.min() and task_prompts.max() <= 0.5
    assert task_prompts.std() == pytest.approx(0.5 / np.sqrt(3), rel=0.05)
    down = np.asarray(params["encoder"]["key_down"])  # [M, d, b]: fan-in d
    up = np.asarray(params["encoder"]["value_up"])  # [M, b, K]: fan-in b
    assert down.var() == pytest.approx(1 / 256, rel=0.1)
    assert up.var() == pytest.approx(1 / 128, rel=0.1)
