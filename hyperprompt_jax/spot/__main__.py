"""`python -m hyperprompt_jax.spot <subcommand>`: SPoT's command line (`cli.py`)."""

import sys

from hyperprompt_jax.spot import cli

sys.exit(cli.main())
