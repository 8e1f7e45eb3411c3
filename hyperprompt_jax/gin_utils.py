"""gin plumbing shared by the entry points: search paths, parsing, clear errors.

gin files are looked up by relative name (`quickstart.gin`, `models/t5_1_1_base.gin`)
first in the current directory, then in directories from `--gin_search_paths`, then
in the installed `hyperprompt_jax/gin` package, so the same command works from any
directory after `pip install`. Files use `from __gin__ import dynamic_registration`
(t5x's convention), so any importable callable is configurable.
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import tokenize
from typing import Any, Iterable, Optional, Sequence

import gin
from hyperprompt_jax.errors import UserError


def _package_gin_dir() -> str:
    """The folder of the shipped gin files.

    `gin/` has no `__init__.py` on purpose: a regular package named `gin` at the
    repository root would shadow the gin-config package for any command run from
    there. A wheel installs the files as `hyperprompt_jax/gin/`; an editable install
    (and a plain checkout) keeps them in the top-level `gin/` beside the package.
    """
    package_dir = os.path.dirname(os.path.abspath(__import__("hyperprompt_jax").__file__))
    for candidate in (
        os.path.join(package_dir, "gin"),
        os.path.join(os.path.dirname(package_dir), "gin"),
    ):
        if os.path.isdir(os.path.join(candidate, "models")):
            return candidate
    raise RuntimeError(f"hyperprompt-jax's gin files are missing next to {package_dir}; reinstall.")


PACKAGE_GIN_DIR = _package_gin_dir()


def search_paths(extra: Iterable[str] = ()) -> list[str]:
    """Directories searched for gin files, in order."""
    paths = [os.getcwd(), *[os.path.abspath(p) for p in extra], PACKAGE_GIN_DIR]
    seen, out = set(), []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _available_gin_files() -> list[str]:
    names = []
    for root, _, files in os.walk(PACKAGE_GIN_DIR):
        for f in files:
            if f.endswith(".gin"):
                names.append(os.path.relpath(os.path.join(root, f), PACKAGE_GIN_DIR))
    return sorted(names)


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str] = (),
    extra_search_paths: Iterable[str] = (),
    finalize: bool = True,
) -> None:
    """Parses gin files (by relative name) and `NAME=VALUE` bindings.

    Raises:
      ValueError: a gin file that is not found (with close names), malformed gin, or
        a binding of an unknown configurable/parameter (the message names it).
    """
    gin.clear_config()
    paths = search_paths(extra_search_paths)
    for p in paths:
        gin.add_config_file_search_path(p)
    check_files_exist(gin_files, extra_search_paths)
    root_logger = logging.getLogger()
    root_logger.addFilter(_quiet_search_misses)
    try:
        gin.parse_config_files_and_bindings(
            list(gin_files), list(gin_bindings), finalize_config=finalize
        )
    except tokenize.TokenError as e:  # e.g. an unclosed bracket; gin gives no location
        raise UserError(f"Invalid gin configuration: {_unparsable(gin_bindings, e)}") from None
    except (ValueError, SyntaxError, KeyError, ImportError, TypeError) as e:
        raise UserError(f"Invalid gin configuration: {e}") from e
    finally:
        root_logger.removeFilter(_quiet_search_misses)


def check_files_exist(gin_files: Sequence[str], extra_search_paths: Iterable[str] = ()) -> None:
    """Raises `UserError` for a gin file found in no search path (close names suggested)."""
    paths = search_paths(extra_search_paths)
    for f in gin_files:
        if not os.path.isabs(f) and not any(os.path.exists(os.path.join(p, f)) for p in paths):
            close = difflib.get_close_matches(f, _available_gin_files(), n=5, cutoff=0.4)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UserError(f"gin file {f!r} not found in {paths}.{hint}")
        if os.path.isabs(f) and not os.path.exists(f):
            raise UserError(f"gin file {f!r} does not exist.")


def _unparsable(bindings: Sequence[str], error: Exception) -> str:
    """Names the binding that Python's tokenizer rejects."""
    for binding in bindings:
        try:
            list(tokenize.generate_tokens(io.StringIO(binding).readline))
        except tokenize.TokenError as e:
            return f"{e.args[0]} in --gin.{binding}"
    return str(error)


def _quiet_search_misses(record: logging.LogRecord) -> bool:
    """Drops gin's "Path not found" lines: it logs one for every search path it tries
    before the one that holds the file, which reads like an error but is not."""
    return not str(record.getMessage()).startswith("Path not found:")


def query_macro(name: str, default: Any = gin.REQUIRED) -> Any:
    """Returns the value of gin macro `name` (e.g. 'MODEL_DIR').

    A macro bound to `@fn()` is returned as a `gin.config.ConfigurableReference`;
    use `instantiate` to call it.
    """
    try:
        return gin.query_parameter(f"%{name}")
    except ValueError:
        if default is gin.REQUIRED:
            raise UserError(f"gin macro {name} is not set; add --gin.{name}=...") from None
        return default


def instantiate(value: Any) -> Any:
    """Calls a `@configurable()` reference (as found in a macro) and returns the result."""
    if isinstance(value, gin.config.ConfigurableReference):
        return value.scoped_configurable_fn()
    return value


def configured(name: str, default: Optional[Any] = gin.REQUIRED) -> Any:
    """`instantiate(query_macro(name))`: the object a macro like `MODEL` describes."""
    return instantiate(query_macro(name, default))


def flags_to_gin(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Splits t5x-style flags: `--gin_file=F` (repeatable), `--gin.NAME=VALUE`,
    `--gin_search_paths=a,b`. Returns (files, bindings, search paths).

    Raises:
      ValueError: for any other flag (named in the message).
    """
    files, bindings, paths = [], [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--gin_file="):
            files.append(arg.split("=", 1)[1])
        elif arg == "--gin_file":
            files.append(next(it))
        elif arg.startswith("--gin_search_paths="):
            paths.extend(p for p in arg.split("=", 1)[1].split(",") if p)
        elif arg.startswith("--gin."):
            binding = arg[len("--gin.") :]
            if "=" not in binding:
                raise UserError(f"Malformed binding {arg!r}; expected --gin.NAME=VALUE.")
            bindings.append(binding)
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        else:
            raise UserError(
                f"Unknown flag {arg!r}; expected --gin_file=F, --gin.NAME=VALUE or "
                "--gin_search_paths=DIRS."
            )
    return files, bindings, paths


# Macros read by code (`gin_utils.query_macro`) rather than by a gin binding.
CODE_MACROS = ("TRAINABLE_PATTERNS", "COMPILATION_CACHE_DIR")


def _macro_references(value, out: set) -> None:
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector == "gin.macro":
            out.add(value.scoped_selector.split("/", 1)[0])
    elif isinstance(value, (list, tuple, set)):
        for v in value:
            _macro_references(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _macro_references(v, out)


def check_macro_bindings(bindings: Sequence[str]) -> None:
    """Rejects `--gin.NAME=VALUE` for a macro NAME that no binding uses (a typo).

    gin accepts any new macro silently, so `--gin.TRAIN_STEPZ=10` would otherwise be
    ignored. Bindings of configurable parameters (`a.b.c=...`) are checked by gin.

    Raises:
      UserError: naming the macro and the closest used ones.
    """
    config = gin.config._CONFIG  # noqa: SLF001 (gin has no public listing API)
    defined = {scope for scope, selector in config if selector == "gin.macro"}
    used = set(CODE_MACROS)
    for params in config.values():
        _macro_references(params, used)
    for binding in bindings:
        name = binding.split("=", 1)[0].strip()
        if "." in name or "/" in name or name not in defined or name in used:
            continue
        close = difflib.get_close_matches(name, sorted(used), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"--gin.{name}: no gin binding uses the macro {name}, so it would have no effect.{hint}"
        )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m hyperprompt_jax.gin_utils --dir` prints the installed gin directory.

    That directory goes on t5x's `--gin_search_paths` so `t5x/<method>.gin` (and the
    package's `methods/*.gin` they include) resolve; see docs/t5x.md.
    """
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hyperprompt_jax.gin_utils",
        description="Locations of hyperprompt-jax's gin files.",
    )
    parser.add_argument(
        "--dir", action="store_true", help="print the installed gin directory and exit"
    )
    args = parser.parse_args(argv)
    if not args.dir:
        parser.error("nothing to do; pass --dir")
    print(PACKAGE_GIN_DIR)


if __name__ == "__main__":
    main()
