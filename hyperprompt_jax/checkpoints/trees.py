"""Parameter trees: flatten / unflatten, the plain T5 tree's shapes, and fit checks.

A parameter tree is a nested dict with t5x's names (`token_embedder/embedding`,
`encoder/layers_0/attention/query/kernel`, ...), i.e. the `params` collection of
`network.Transformer`; flat trees use '/'-joined names.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import jax
import numpy as np

from hyperprompt_jax import network
from hyperprompt_jax.config import T5Config
from hyperprompt_jax.errors import UserError

Params = Dict[str, Any]


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
    """`{'a': {'b': x}}` -> `{'a/b': x}` (leaves are anything that is not a mapping)."""
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: Tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, prefix + (str(key),))
        else:
            flat[sep.join(prefix)] = node

    walk(tree, ())
    return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> Params:
    """Inverse of `flatten_params`: `{'a/b': x}` -> `{'a': {'b': x}}`."""
    tree: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def t5_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
    """Flat `{name: shape}` of the plain T5 network for `config` (nothing is allocated).

    Names are '/'-joined t5x paths, e.g. `encoder/layers_0/attention/query/kernel`.
    """
    model = network.Transformer(config)
    abstract = jax.eval_shape(
        lambda rng: network.init_params(model, rng, encoder_length=2, decoder_length=2),
        jax.random.PRNGKey(0),
    )
    return {name: tuple(leaf.shape) for name, leaf in flatten_params(abstract["params"]).items()}


def _shape_of(x: Any) -> Tuple[int, ...]:
    if isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x):
        return tuple(int(d) for d in x)
    if isinstance(x, list):
        return tuple(int(d) for d in x)
    return tuple(np.shape(x))


def check_params_match(
    params: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str = "parameters",
    allow_unexpected: bool = False,
    max_listed: int = 20,
) -> None:
    """Checks that `params` has exactly the names and shapes of `expected`.

    Use it to reject an initial checkpoint that does not fit the model before training
    starts (e.g. T5-base weights for a T5-large config).

    Args:
      params: nested dict of arrays (or a flat `{'a/b': array}` dict).
      expected: nested or flat dict whose leaves are shapes (tuples) or anything with a
        `.shape` (arrays, `jax.ShapeDtypeStruct`), e.g. `jax.eval_shape` of the init.
      source: what `params` is, for the message (e.g. the checkpoint path).
      allow_unexpected: accept names in `params` that `expected` lacks.
      max_listed: at most this many entries of each kind are listed.

    Raises:
      UserError: naming every mismatching parameter (expected vs found shape) and the
        missing / unexpected names.
    """
    flat_params = flatten_params(params)
    # Shape tuples are leaves of `expected`: `flatten_params` only descends mappings.
    flat_expected = {name: _shape_of(leaf) for name, leaf in flatten_params(expected).items()}
    missing = sorted(set(flat_expected) - set(flat_params))
    unexpected = [] if allow_unexpected else sorted(set(flat_params) - set(flat_expected))
    mismatched = [
        f"  {name}: expected {flat_expected[name]}, found {_shape_of(flat_params[name])}"
        for name in sorted(set(flat_expected) & set(flat_params))
        if _shape_of(flat_params[name]) != flat_expected[name]
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(items: List[str]) -> str:
        shown = items[:max_listed]
        more = f"\n  ... and {len(items) - max_listed} more" if len(items) > max_listed else ""
        return "\n".join(shown) + more

    parts = [f"The {source} do not fit the model:"]
    if mismatched:
        parts.append(f"{len(mismatched)} parameter(s) with the wrong shape:\n{listing(mismatched)}")
    if missing:
        parts.append(
            f"{len(missing)} parameter(s) the model needs are missing:\n"
            + listing([f"  {n} (expected shape {flat_expected[n]})" for n in missing])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} parameter(s) the model does not have:\n"
            + listing([f"  {n} (shape {_shape_of(flat_params[n])})" for n in unexpected])
        )
    raise UserError("\n".join(parts))


def config_from_shapes(
    shapes: Mapping[str, Tuple[int, ...]],
    mlp_activations: Tuple[str, ...] | None = None,
    relative_attention_max_distance: int = 128,
) -> T5Config:
    """The T5Config of a plain T5 parameter tree, read off its shapes (flat names).

    Heads come from the relative-position table `[heads, buckets]`; the MLP activations
    cannot be seen in shapes: two `wi_*` kernels default to T5.1.1's `('gelu', 'linear')`,
    one `wi` to T5 1.0's `('relu',)`.

    Raises:
      UserError: if the tree is not a T5 encoder-decoder.
    """
    try:
        vocab, emb = shapes["token_embedder/embedding"]
        heads, buckets = shapes["encoder/relpos_bias/rel_embedding"]
        inner = shapes["encoder/layers_0/attention/query/kernel"][1]
    except KeyError as e:
        raise UserError(f"Not a T5 parameter tree: {e.args[0]!r} is missing.") from None

    def layers(stack: str) -> int:
        return len({n.split("/")[1] for n in shapes if n.startswith(f"{stack}/layers_")})

    wi = sorted(n for n in shapes if n.startswith("encoder/layers_0/mlp/wi"))
    mlp_dim = shapes[wi[0]][1]
    if mlp_activations is None:
        mlp_activations = ("gelu", "linear") if len(wi) == 2 else ("relu",) * len(wi)
    return T5Config(
        vocab_size=int(vocab), dtype="float32", emb_dim=int(emb), num_heads=int(heads),
        num_encoder_layers=layers("encoder"), num_decoder_layers=layers("decoder"),
        head_dim=int(inner) // int(heads), mlp_dim=int(mlp_dim),
        mlp_activations=tuple(mlp_activations),
        logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
        relative_attention_num_buckets=int(buckets),
        relative_attention_max_distance=relative_attention_max_distance,
    )  # fmt: skip
