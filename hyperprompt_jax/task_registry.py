"""Look up tasks / mixtures by name, check their data, and prepare it.

`get_mixture_or_task(name)` is what the launchers call: it registers the package's
tasks, and for an unknown name raises a `ValueError` suggesting close names.
`check_prepared(name, split)` raises one `DatasetNotPreparedError` listing every
missing TFDS dataset with the command that prepares it, before any pipeline is built.

Command line:
  python -m hyperprompt_jax.task_registry list [SUBSTRING]
  python -m hyperprompt_jax.task_registry check NAME [--split=train]
  python -m hyperprompt_jax.task_registry prepare NAME_OR_TFDS_NAME [--data_dir=DIR]
(`prepare` downloads and prepares with TFDS; it is the only place that downloads.)
"""

from __future__ import annotations

if __name__ == "__main__":  # --help and flag checks before TensorFlow / JAX load (cli.py)
    from hyperprompt_jax import cli

    cli.preflight("task_registry")

import argparse
import difflib
import sys
from collections.abc import Sequence

import seqio

from hyperprompt_jax.errors import UserError


def _register() -> None:
    import hyperprompt_jax.tasks  # noqa: F401  (importing registers the tasks)


def registered_names() -> list[str]:
    """All registered task and mixture names, sorted."""
    _register()
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def suggest(name: str, n: int = 5) -> list[str]:
    """Registered names closest to `name` (also tries adding the `hp_` prefix)."""
    names = registered_names()
    matches = difflib.get_close_matches(name, names, n=n, cutoff=0.6)
    if not name.startswith("hp_"):
        matches += [
            m for m in difflib.get_close_matches(f"hp_{name}", names, n=n) if m not in matches
        ]
    return matches[:n]


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """The registered task or mixture `name`.

    Raises:
      ValueError: unknown name; the message lists the closest registered names.
    """
    _register()
    if name in seqio.MixtureRegistry.names():
        return seqio.MixtureRegistry.get(name)
    if name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    close = suggest(name)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UserError(
        f"Unknown task or mixture {name!r}.{hint} List the registered names with "
        "`python -m hyperprompt_jax.task_registry list`."
    )


def _tasks(name: str) -> list[seqio.Task]:
    provider = get_mixture_or_task(name)
    return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def missing_datasets(name: str, split: str | None = None) -> list[tuple[str, object]]:
    """`(tfds_name, builder)` of the unprepared TFDS datasets that `name` reads.

    Args:
      name: task or mixture.
      split: only consider tasks that declare this split (None: all tasks).
    """
    from hyperprompt_jax.tasks.sources import PreparedTfdsSource

    missing, seen = [], set()
    for task in _tasks(name):
        source = task.source
        if not isinstance(source, PreparedTfdsSource) or source.tfds_name in seen:
            continue
        if split is not None and source._splits and split not in source._splits:  # noqa: SLF001
            continue
        seen.add(source.tfds_name)
        if not source.is_prepared():
            missing.append((source.tfds_name, source.tfds_dataset.builder))
    return missing


def check_prepared(name: str, split: str | None = None) -> None:
    """Raises one `DatasetNotPreparedError` naming every missing dataset of `name`."""
    from hyperprompt_jax.tasks.sources import DatasetNotPreparedError, not_prepared_message

    missing = missing_datasets(name, split)
    if missing:
        raise DatasetNotPreparedError(
            f"{name!r} cannot be read: " + not_prepared_message(missing, prepare_target=name)
        )


def prepare(name_or_tfds_name: str, data_dir: str | None = None) -> list[str]:
    """Downloads and prepares the TFDS datasets of a task / mixture (or one TFDS name).

    Returns:
      The TFDS names prepared (already prepared ones are skipped by TFDS).
    """
    import tensorflow_datasets as tfds

    if ":" in name_or_tfds_name or "/" in name_or_tfds_name:
        tfds_names = [name_or_tfds_name]
    else:
        tfds_names = sorted({t.source.tfds_dataset.name for t in _tasks(name_or_tfds_name)})
    for tfds_name in tfds_names:
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        try:
            builder.download_and_prepare()
        except (OSError, tfds.download.DownloadError) as error:
            # Network and file-system failures (requests' errors are OSErrors); what to
            # do is the same for all of them.
            raise UserError(_download_failed_message(tfds_name, builder, error)) from error
    return tfds_names


def _download_failed_message(tfds_name: str, builder, error: BaseException) -> str:
    reason = " ".join(f"{type(error).__name__}: {error}".split())
    if len(reason) > 240:
        reason = reason[:240] + "..."
    return (
        f"downloading {tfds_name!r} failed ({reason}). Run this command on a machine with "
        f"internet access and copy its data directory ({builder.data_dir}) here, then point "
        "TFDS_DATA_DIR (or --data_dir) at the copy; or download the files by hand into "
        f"{builder.data_dir_root}/downloads/manual and run it again."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperprompt_jax.task_registry")
    sub = parser.add_subparsers(dest="command", required=True)
    list_parser = sub.add_parser("list", help="registered task / mixture names")
    list_parser.add_argument("substring", nargs="?", default="")
    check_parser = sub.add_parser("check", help="is the data of a task / mixture prepared?")
    check_parser.add_argument("name")
    check_parser.add_argument("--split", default=None)
    prepare_parser = sub.add_parser("prepare", help="download and prepare TFDS data")
    prepare_parser.add_argument("name")
    prepare_parser.add_argument("--data_dir", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            print("\n".join(n for n in registered_names() if args.substring in n))
        elif args.command == "check":
            check_prepared(args.name, args.split)
            print(f"All TFDS data of {args.name!r} is prepared.")
        else:
            print("Prepared: " + ", ".join(prepare(args.name, args.data_dir)))
    except ValueError as error:  # Unknown names, missing data: one message, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
