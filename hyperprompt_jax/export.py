"""`python -m hyperprompt_jax.export`: a run's weights as a plain t5x checkpoint and a
Hugging Face directory, for serving and sharing.

    python -m hyperprompt_jax.export --checkpoint=/runs/prompt_tuning \
        --t5x_dir=/exports/t5x --hf_dir=/exports/hf

`--checkpoint` is anything a checkpoint path accepts: a run's `MODEL_DIR` (its newest
intact checkpoint) or one `checkpoint_<step>/`, a t5x checkpoint (either format), or a
Hugging Face directory. A trainable-only train checkpoint is merged with the backbone
it references (verified against its fingerprint first).

* `--t5x_dir`: every parameter (method parameters such as `prompt/...` included, the
  way t5x's prompt tuning stores them) as `<t5x_dir>/checkpoint_<step>/` in t5x's
  legacy tensorstore format, which both `t5x` and this package restore.
* `--hf_dir`: the T5 backbone as a `T5ForConditionalGeneration` directory; Hugging Face
  has no place for method parameters, so they go to `method_params.npz` next to it
  (listed on the console).

The architecture is read off the parameter shapes; the MLP activation cannot be, so
pass `--mlp_activations=relu` for T5 1.0 (the default for two `wi` kernels is T5.1.1's
`gelu,linear`). Export reads whole arrays on this host.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hyperprompt_jax.export",
        description=(
            "Merge a run's trained parameters with its backbone into a plain t5x checkpoint "
            "and/or a Hugging Face T5 directory."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, help="MODEL_DIR, checkpoint_<step>/, t5x or HF path"
    )
    parser.add_argument("--t5x_dir", help="write <t5x_dir>/checkpoint_<step>/ (t5x format)")
    parser.add_argument("--hf_dir", help="write a Hugging Face T5 directory here")
    parser.add_argument(
        "--mlp_activations",
        help="comma-separated MLP activations (default: gelu,linear for gated MLPs, relu otherwise)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="t5x storage dtype"
    )
    return parser


def export(
    checkpoint: str,
    t5x_dir: str | None = None,
    hf_dir: str | None = None,
    mlp_activations: Sequence[str] | None = None,
    dtype: str = "float32",
) -> dict:
    """Exports `checkpoint`; returns `{'t5x': path, 'hf': path, 'method_params': [...]}`.

    Raises:
      UserError: a bad path, nothing to write, or parameters HF cannot express.
    """
    import jax.numpy as jnp

    from hyperprompt_jax import checkpoints
    from hyperprompt_jax.errors import UserError

    if not (t5x_dir or hf_dir):
        raise UserError("Nothing to write: pass --t5x_dir and/or --hf_dir.")
    found, directory, source = checkpoints.open_weights(checkpoint, what="--checkpoint")
    flat = checkpoints.gathered(source)
    step = checkpoints.parse_step(directory) or 0
    method = sorted(n for n in flat if n.split("/", 1)[0] in ("prompt", "hyperprompt"))
    out: dict = {"source": f"{found} {directory}", "method_params": method}
    if t5x_dir:
        out["t5x"] = checkpoints.save_t5x_checkpoint(
            checkpoints.unflatten_params(flat),
            t5x_dir,
            step,
            dtype=jnp.bfloat16 if dtype == "bfloat16" else np.float32,
        )
    if hf_dir:
        backbone = {n: v for n, v in flat.items() if n not in method}
        config = checkpoints.trees.config_from_shapes(
            {n: v.shape for n, v in backbone.items()},
            tuple(mlp_activations) if mlp_activations else None,
        )
        out["hf"] = checkpoints.save_hf_t5(config, checkpoints.unflatten_params(backbone), hf_dir)
        if method:
            np.savez(os.path.join(hf_dir, "method_params.npz"), **{n: flat[n] for n in method})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line; a user mistake prints one `error:` line and exits 1."""
    from hyperprompt_jax.errors import UserError

    args = _parser().parse_args(argv)
    activations = args.mlp_activations.split(",") if args.mlp_activations else None
    try:
        out = export(args.checkpoint, args.t5x_dir, args.hf_dir, activations, args.dtype)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"read {out['source']}")
    if "t5x" in out:
        print(f"t5x checkpoint: {out['t5x']}")
    if "hf" in out:
        print(f"Hugging Face directory: {out['hf']}")
        if out["method_params"]:
            print(
                f"method parameters (no Hugging Face place): {len(out['method_params'])} arrays "
                f"in {os.path.join(out['hf'], 'method_params.npz')}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
