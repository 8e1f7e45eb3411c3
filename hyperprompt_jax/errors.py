"""The error type for mistakes in what a user gave us (flags, gin, files, data, ids).

Launchers (`launch.run` and the other command-line entry points) print a `UserError`
as one `error: ...` line and exit 1. Anything else is a bug (ours, or inside JAX / Flax /
TensorFlow) and keeps its traceback. `UserError` subclasses `ValueError` so callers that
catch `ValueError` keep working.
"""


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and what was expected."""
