"""Counts a gin-configured model's trainable and total parameters without allocating them.

    python -m hyperprompt_jax.count_params --gin_file=models/t5_1_1_large.gin \\
        --gin_file=methods/prompt_tuning.gin --gin.PROMPT_LENGTH=20

prints a table of parameters by module (layer indices folded into `layers_*`) and, as
its last line, `trainable_params=N total_params=M`. Shapes come from `jax.eval_shape`
over the model's `init`, so even T5-XXL is counted without allocating a byte of it.
Trainable parameters are those selected by the gin macro `TRAINABLE_PATTERNS` with the
rule the optimiser mask uses (`trainable.py`; unset = everything trainable).
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("count_params")

import collections
import re
import sys
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp

from hyperprompt_jax import gin_utils, trainable

PyTree = Any

_LAYER = re.compile(r"layers_\d+")


def param_shapes(
    module: Any, batch_size: int = 1, encoder_length: int = 1, decoder_length: int = 1
) -> PyTree:
    """The `params` collection of `module.init` as `jax.ShapeDtypeStruct`s (no allocation).

    Dummy int32 inputs of ones are used; `task_ids` (zeros) are always passed, modules
    that are not task-conditioned ignore them.
    """
    enc = jnp.ones((batch_size, encoder_length), jnp.int32)
    dec = jnp.ones((batch_size, decoder_length), jnp.int32)
    task_ids = jnp.zeros((batch_size,), jnp.int32)

    def init(rng):
        return module.init(
            {"params": rng, "dropout": rng}, enc, dec, dec, task_ids=task_ids, enable_dropout=False
        )["params"]

    return jax.eval_shape(init, jax.random.PRNGKey(0))


def group_name(path: str, depth: int = 2) -> str:
    """'encoder/layers_3/mlp/wo/kernel' -> 'encoder/layers_*' (depth 2)."""
    return "/".join(_LAYER.sub("layers_*", path).split("/")[:depth])


def count_by_module(
    params: PyTree, patterns: Sequence[str] | None, depth: int = 2
) -> Dict[str, Tuple[int, int]]:
    """`{module: (trainable, total)}` grouped by the first `depth` path components."""
    mask = trainable.param_paths(trainable.trainable_mask(params, patterns))
    rows: Dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for path, leaf in trainable.param_paths(params).items():
        n = trainable._size(leaf)
        row = rows[group_name(path, depth)]
        row[1] += n
        if mask[path]:
            row[0] += n
    return {k: (v[0], v[1]) for k, v in rows.items()}


def count_params(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> Tuple[int, int, Dict[str, Tuple[int, int]]]:
    """Parses gin, builds `MODEL.module` and returns `(trainable, total, by_module)`.

    Raises:
      ValueError: bad gin (see `gin_utils.parse_gin`), a `TRAINABLE_PATTERNS` regex that
        selects nothing, or any configuration error the model raises at init.
    """
    gin_utils.parse_gin(gin_files, gin_bindings, search_paths)
    module = gin_utils.configured("MODEL").module
    patterns = gin_utils.query_macro("TRAINABLE_PATTERNS", None)
    params = param_shapes(module)
    rows = count_by_module(params, patterns)
    train, total = trainable.count(params, patterns)
    return train, total, rows


def format_table(rows: Dict[str, Tuple[int, int]], train: int, total: int) -> str:
    """The printed table; its last line is `trainable_params=N total_params=M`."""
    width = max([len("module")] + [len(k) for k in rows]) + 2
    lines = [f"{'module':<{width}}{'trainable':>16}{'total':>16}"]
    for name in sorted(rows):
        t, n = rows[name]
        lines.append(f"{name:<{width}}{t:>16,}{n:>16,}")
    lines.append("-" * (width + 32))
    lines.append(f"{'all':<{width}}{train:>16,}{total:>16,}")
    lines.append(f"trainable fraction: {100.0 * train / max(total, 1):.4f}%")
    lines.append(f"trainable_params={train} total_params={total}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Prints the table; a user mistake prints one `error:` line and returns 1."""
    from hyperprompt_jax import cli

    try:
        files, bindings, paths = gin_utils.flags_to_gin(argv)
        if not files:
            raise ValueError(
                "no --gin_file given; e.g. --gin_file=models/t5_1_1_base.gin "
                "--gin_file=methods/prompt_tuning.gin (see --help)"
            )
        train, total, rows = count_params(files, bindings, paths)
    except ValueError as error:
        print(cli.error_line(error), file=sys.stderr)
        return 1
    print(format_table(rows, train, total))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
