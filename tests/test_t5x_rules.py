"""The t5x bridge's pure tables cover every method (runs without t5x).

`hyperprompt_jax.t5x_bridge` gives t5x's Adafactor a factorization rule and t5x's
partitioner a sharding rule for each logical axis name the methods introduce
(`partitioning.METHOD_FACTOR_RULES` / `METHOD_AXIS_RULES`); t5x fails with a KeyError
on any axis name of a method parameter that neither t5x's tables nor these name. This
test initialises every method on a tiny network and checks the method parameters' axis
names against the tables (the backbone's own names, and `layers`, are t5x's).
tests/test_t5x_bridge.py checks the same against t5x's real tables when t5x is present.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from hyperprompt_jax import hyperprompt, network, partitioning, prompts, smop
from hyperprompt_jax.config import T5Config

CONFIG = T5Config(
    vocab_size=32, emb_dim=8, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
    head_dim=4, mlp_dim=16, mlp_activations=("gelu", "linear"), dropout_rate=0.0,
)  # fmt: skip
HOOKS = {
    "prompt_tuning": {"prompt": prompts.SoftPrompt(length=2)},
    "multi_task_prompt": {"prompt": prompts.SoftPrompt(length=2, num_tasks=3)},
    "smop": {"prompt": smop.SMoP(num_prompts=2, length=2)},
    **{
        f"hyperprompt_{name}": {
            "hyperprompt": hyperprompt.HyperPrompt(
                num_tasks=3, prompt_length=2, bottleneck_dim=4, hypernetworks=hypernetworks
            )
        }
        for name, hypernetworks in hyperprompt.VARIANTS.items()
    },
}
# t5x's scanned-layer axis, which t5x's standard tables already name (BATCH / replicated).
T5X_NAMED = {"layers"}


def _axes(module) -> dict[str, tuple[str, ...]]:
    tokens = jnp.ones((2, 4), jnp.int32)
    variables = jax.eval_shape(
        lambda: module.init(
            jax.random.PRNGKey(0), tokens, tokens, tokens,
            task_ids=jnp.zeros((2,), jnp.int32), enable_dropout=False,
        )
    )  # fmt: skip
    flat = traverse_util.flatten_dict(dict(variables["params_axes"]))
    return {"/".join(k).removesuffix("_axes"): v.names for k, v in flat.items()}


BACKBONE_AXES = {name for names in _axes(network.Transformer(CONFIG)).values() for name in names}


@pytest.mark.parametrize("method", list(HOOKS))
def test_every_method_axis_has_a_factor_rule_and_a_sharding_rule(method):
    axes = _axes(network.Transformer(CONFIG, **HOOKS[method]))
    method_axes = {
        name
        for path, names in axes.items()
        if path.split("/", 1)[0] in ("prompt", "hyperprompt")
        for name in names
    }
    assert method_axes, f"{method} has no parameters with logical axes"
    factor_rules = dict(partitioning.METHOD_FACTOR_RULES)
    axis_rules = dict(partitioning.METHOD_AXIS_RULES)
    uncovered = method_axes - BACKBONE_AXES - T5X_NAMED
    assert uncovered <= set(factor_rules), uncovered - set(factor_rules)
    assert uncovered <= set(axis_rules), uncovered - set(axis_rules)
    assert set(factor_rules.values()) <= {"row", "col", "column", "batch", "none"}


def test_factor_rules_name_only_method_axes():
    # A method rule for a backbone axis would change how t5x factors the backbone.
    assert not set(dict(partitioning.METHOD_FACTOR_RULES)) & (BACKBONE_AXES | T5X_NAMED)
