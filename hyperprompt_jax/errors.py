"""The error type for mistakes in what a user gave us (flags, gin, files, data, ids).

Launchers (`launch.run` and the other command-line entry points) print a `UserError`
as one `error: ...` line and exit 1. Anything else is a bug (ours, or inside JAX / Flax /
TensorFlow) and keeps its traceback. `UserError` subclasses `ValueError` so callers that
catch `ValueError` keep working.
"""

from __future__ import annotations

import re


class UserError(ValueError):
    """Bad input from the user: the message names the bad value and what was expected."""


# gin re-raises an error from inside a configurable with the call appended, e.g.
# "\n  In call to configurable 'train' (<function train at 0x7f...>)": noise for a user
# whose mistake the message already names.
_GIN_CALL_SUFFIX = re.compile(r"\n\s*In call to configurable '[^']*' \([^\n]*\)")


def message(error: BaseException) -> str:
    """`error`'s message without gin's call-site suffixes."""
    return _GIN_CALL_SUFFIX.sub("", str(error)).strip()


class Preempted(Exception):
    """The run stopped early on SIGTERM after saving its state (not a failure).

    Launchers print the message (which names the saved step) and exit with 128 + 15,
    the shell's code for "terminated by SIGTERM", so schedulers see a preempted job.
    """

    exit_code = 143
