"""Which parameters are trained: regexes over '/'-joined parameter paths.

The gin macro `TRAINABLE_PATTERNS` (a list of regexes) selects the trainable
parameters; each is matched with `re.fullmatch` against a parameter's path inside the
`params` collection, e.g. `prompt/prompt` or `encoder/layers_0/attention/query/kernel`.
Unset (None) means every parameter is trained (model tuning, HyperPrompt's default).
The optimiser mask (launcher) and `count_params` both use these helpers, so what is
counted as trainable is exactly what is updated.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Sequence

import jax
from flax import traverse_util
from flax.core import freeze

from hyperprompt_jax.errors import UserError

PyTree = Any


def _compile(patterns: Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise UserError(
            f"TRAINABLE_PATTERNS must be a list of regexes, got the string {patterns!r}; "
            f"write [{patterns!r}]."
        )
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise UserError(f"Invalid regex {p!r} in TRAINABLE_PATTERNS: {e}") from e
    return compiled


def is_trainable(path: str, patterns: Sequence[str] | None) -> bool:
    """True if `path` ('a/b/c') is trained under `patterns` (None = everything)."""
    if patterns is None:
        return True
    return any(p.fullmatch(path) for p in _compile(patterns))


def param_paths(params: PyTree) -> Dict[str, Any]:
    """`{'a/b/c': leaf}` for a (Frozen)dict parameter tree (the `params` collection)."""
    params = params.unfreeze() if hasattr(params, "unfreeze") else params
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}


def trainable_mask(params: PyTree, patterns: Sequence[str] | None, strict: bool = True) -> PyTree:
    """A tree of bools shaped like `params` (True = trained).

    Args:
      params: the `params` collection (dict or FrozenDict; leaves may be arrays or
        `jax.ShapeDtypeStruct`).
      patterns: regexes matched with `re.fullmatch` against '/'-joined paths; None
        means every parameter is trainable.
      strict: raise if a pattern matches no parameter (usually a typo).

    Raises:
      ValueError: an invalid regex, a plain string instead of a list, or (strict) a
        pattern that selects nothing.
    """
    paths = param_paths(params)
    if patterns is None:
        flags = {k: True for k in paths}
    else:
        compiled = _compile(patterns)
        flags = {k: any(p.fullmatch(k) for p in compiled) for k in paths}
        if strict:
            unused = [p.pattern for p in compiled if not any(p.fullmatch(k) for k in paths)]
            if unused:
                some = ", ".join(sorted(paths)[:8])
                raise UserError(
                    f"TRAINABLE_PATTERNS {unused} match no parameter. Paths look like: {some}, ..."
                )
    nested = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flags.items()})
    if hasattr(params, "unfreeze"):
        return freeze(nested)
    return nested


def count(params: PyTree, patterns: Sequence[str] | None = None) -> tuple[int, int]:
    """Returns `(trainable, total)` parameter counts (works on ShapeDtypeStructs)."""
    paths = param_paths(params)
    total = trainable = 0
    compiled = None if patterns is None else _compile(patterns)
    for k, v in paths.items():
        n = int(_size(v))
        total += n
        if compiled is None or any(p.fullmatch(k) for p in compiled):
            trainable += n
    return trainable, total


def _size(leaf: Any) -> int:
    shape = getattr(leaf, "shape", None)
    if shape is None:
        return int(jax.numpy.size(leaf))
    n = 1
    for s in shape:
        n *= int(s)
    return n
