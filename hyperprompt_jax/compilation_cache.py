"""JAX's persistent compilation cache, which the entry points turn on by default.

XLA compiles the train, evaluation and decoding steps anew in every process (9.5 s for
the quickstart's train step on 2 CPU cores, minutes for a large model on a TPU slice).
With the cache on, the compiled executables are written to a directory and the next
process that compiles the same program (a re-run, a resumed run, `eval` or `infer`
with the training's settings) reads them back instead.

Where (first that applies):

1. `enable(directory)`: the entry points pass the gin macro `COMPILATION_CACHE_DIR`
   (`--gin.COMPILATION_CACHE_DIR="'/path'"`; `None` turns the cache off);
2. `$HYPERPROMPT_COMPILATION_CACHE`;
3. JAX's own setting (`$JAX_COMPILATION_CACHE_DIR`, or `jax_compilation_cache_dir`
   set in the process);
4. `$XDG_CACHE_HOME/hyperprompt_jax/xla`, else `~/.cache/hyperprompt_jax/xla`.

`off` (or an empty value) turns it off. A directory that cannot be created or written
is one warning line, and the run continues without the cache. Deleting the directory
is always safe: the next run compiles and fills it again. JAX's key of an entry covers
the program, jaxlib's version, the backend, the devices, the compile options and
`XLA_FLAGS`, so a changed model, method, batch or mesh is a new entry, never a wrong one.
The key does not name the CPU model: XLA:CPU checks an entry's CPU features when it
loads it, and JAX turns a failed load into a warning and a fresh compilation.

Importing this module changes nothing; only `enable` does (the entry points call it
after gin is parsed and `jax.distributed` started, before the first compilation).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Mapping

from hyperprompt_jax.errors import UserError

logger = logging.getLogger("hyperprompt_jax")

ENV = "HYPERPROMPT_COMPILATION_CACHE"
GIN_MACRO = "COMPILATION_CACHE_DIR"
OFF = "off"
_OFF_VALUES = ("off", "")

# JAX's environment variables for the settings `enable` changes: set by a user, they win.
_JAX_MIN_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
_JAX_ENABLE_ENV = "JAX_ENABLE_COMPILATION_CACHE"


def default_directory(environ: Mapping[str, str] | None = None) -> str:
    """`$XDG_CACHE_HOME/hyperprompt_jax/xla`, or `~/.cache/hyperprompt_jax/xla`."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "hyperprompt_jax", "xla")


def resolve(
    directory: str | None = None,
    environ: Mapping[str, str] | None = None,
    jax_directory: str | None = None,
) -> str | None:
    """The cache directory to use, or None when the cache is off.

    Args:
      directory: an explicit directory (or `off`); None looks further.
      environ: the environment (default `os.environ`).
      jax_directory: JAX's own `jax_compilation_cache_dir` setting
        (`$JAX_COMPILATION_CACHE_DIR`, or set in this process), if any.

    Returns:
      An absolute local path, a remote URL (`gs://...`, which JAX writes through
      etils), or None for `off` / an empty value.
    """
    environ = os.environ if environ is None else environ
    for value in (directory, environ.get(ENV), jax_directory):
        if value is not None:
            break
    else:
        value = default_directory(environ)
    value = value.strip()
    if value.lower() in _OFF_VALUES:
        return None
    if "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def gin_setting() -> str | None:
    """The parsed gin's `COMPILATION_CACHE_DIR`: None when unset, `off` for None / ''.

    Raises:
      UserError: a value that is not a string or None.
    """
    from hyperprompt_jax import gin_utils

    unset = object()
    value = gin_utils.query_macro(GIN_MACRO, unset)
    if value is unset:
        return None
    if value is None or value is False:
        return OFF
    if not isinstance(value, str):
        raise UserError(
            f"{GIN_MACRO} must be a directory string or None (off), got {value!r}; e.g. "
            f"--gin.{GIN_MACRO}=\"'/tmp/xla_cache'\"."
        )
    return value if value.strip() else OFF


def _unwritable(path: str) -> str | None:
    """Why a local `path` cannot hold the cache (None if it can): created and written to."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        return error.strerror or str(error)
    return None


def enable(directory: str | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on (see the module docstring for where).

    Every compilation is cached, however short (JAX's default skips those under 1 s,
    which on a fast machine would leave a tiny model's steps out): reading an entry
    back is cheaper than compiling it even for a one-operation program. An explicit
    `$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` is kept. The entry-size threshold
    stays JAX's (0: no minimum on local disks). Call after `jax.distributed.initialize`
    (the line saying where the cache is comes from process 0 only) and before the first
    compilation that should be cached.

    Args:
      directory: the cache directory, `off`, or None to resolve it from the
        environment.

    Returns:
      The directory in use, or None when the cache is off (asked for, or the
      directory cannot be written: a one-line warning, and the run goes on).
    """
    import jax

    path = resolve(directory, jax_directory=jax.config.jax_compilation_cache_dir)
    if os.environ.get(_JAX_ENABLE_ENV, "").strip().lower() in ("0", "false", "no"):
        path = None
    if path is not None and "://" not in path:
        problem = _unwritable(path)
        if problem is not None:
            logger.warning(
                "XLA compilation cache off: cannot write %s (%s); set %s to a writable "
                "directory, or to 'off'.", path, problem, ENV,
            )  # fmt: skip
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if _JAX_MIN_TIME_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # `jax_persistent_cache_enable_xla_caches` only names GPU caches (autotuning,
    # kernels), kept in subdirectories of `path`; XLA:CPU needs nothing more.
    if jax.process_index() == 0:
        logger.info("XLA compilation cache: %s (%s=off turns it off)", path, ENV)
    return path
