"""Alias kept for old scripts: `python -m hyperprompt_jax.spot_cli` = `python -m hyperprompt_jax.spot`.

The command line lives in `hyperprompt_jax/spot/cli.py`.
"""

import sys

from hyperprompt_jax.spot.cli import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
