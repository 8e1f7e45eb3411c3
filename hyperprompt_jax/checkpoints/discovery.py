"""The one rule for finding checkpoints: `checkpoint_<step>/` directories, their kind,
whether they are complete and intact, and the newest intact one.

Every reader and writer of the package names a checkpoint `<model dir>/checkpoint_<step>/`
(t5x's spelling, which orbax writes with `step_prefix='checkpoint'`). Three kinds live
in such a directory:

* `t5x`: t5x's legacy tensorstore format, a `checkpoint` msgpack file (plus zarr arrays);
  the format of the public pretrained T5 checkpoints.
* `t5x-orbax`: what current `t5x.train` writes: orbax's `commit_success.txt`,
  `_CHECKPOINT_METADATA`, and a `state/` PyTree item (`{'target': params, 'state':
  optimizer state}`), optionally `dataset/`.
* `train`: this package's train-state checkpoints (`Checkpointer`): orbax's commit marker
  and `_CHECKPOINT_METADATA`, and a `default/` PyTree item.

An orbax checkpoint is complete only with orbax's commit marker `commit_success.txt`
(orbax writes it last, on local disks as on GCS). `damage(step_dir)` checks a
checkpoint's structure cheaply (marker, parseable metadata, data files present);
damage found only by reading the arrays (a truncated data file) is reported by the
reader, and `newest_intact` moves on to the next older checkpoint either way. Damaged
checkpoints are never deleted.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Callable, List, Optional, Tuple

from hyperprompt_jax.checkpoints import paths

logger = logging.getLogger("hyperprompt_jax")

STEP_PREFIX = "checkpoint"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
COMMIT_MARKER = "commit_success.txt"
T5X_MSGPACK = "checkpoint"
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
ORBAX_TREE_METADATA = "_METADATA"
TRAIN_ITEM = "default"
T5X_ORBAX_ITEM = "state"

T5X = "t5x"
T5X_ORBAX = "t5x-orbax"
TRAIN = "train"
HF = "hf"


def step_dir_name(step: int) -> str:
    """`checkpoint_<step>`."""
    return f"{STEP_PREFIX}_{int(step)}"


def parse_step(path: str) -> Optional[int]:
    """The step of a `.../checkpoint_<step>` path, else None."""
    name = path.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def step_dirs(model_dir: str) -> List[Tuple[int, str]]:
    """`(step, path)` of every `checkpoint_<step>/` in `model_dir`, ascending by step."""
    found = []
    for name in paths.listdir(model_dir):
        step = parse_step(name)
        path = paths.join(model_dir, name)
        if step is not None and paths.isdir(path):
            found.append((step, path))
    return sorted(found)


def kind(step_dir: str) -> Optional[str]:
    """`'t5x'`, `'t5x-orbax'`, `'train'` or `'hf'` for a checkpoint directory, else None.

    Decided by the files present only (a damaged checkpoint still has a kind when its
    directory layout says what it was meant to be).
    """
    if paths.is_file(paths.join(step_dir, "config.json")):
        return HF
    if paths.is_file(paths.join(step_dir, T5X_MSGPACK)):
        return T5X
    if paths.isdir(paths.join(step_dir, T5X_ORBAX_ITEM)):
        return T5X_ORBAX
    if paths.isdir(paths.join(step_dir, TRAIN_ITEM)):
        return TRAIN
    return None


def _read_json(path: str) -> Optional[str]:
    """None if `path` holds valid JSON, else why not."""
    try:
        json.loads(paths.read_bytes(path))
    except (OSError, ValueError) as e:
        return f"{path.rsplit('/', 1)[-1]} is missing or not valid JSON ({type(e).__name__})"
    return None


def damage(step_dir: str) -> Optional[str]:
    """Why `step_dir` is not a complete, intact checkpoint, or None if it looks intact.

    Structural checks only (cheap: no array is read): the kind is recognisable; orbax
    checkpoints have the commit marker, parseable `_CHECKPOINT_METADATA` and item
    `_METADATA`, and their data files; t5x checkpoints have a parseable msgpack.
    """
    found = kind(step_dir)
    if found is None:
        if not paths.listdir(step_dir):
            return "the directory is empty"
        return (
            "no t5x 'checkpoint' msgpack, no orbax 'state/' or 'default/' item: not a "
            "complete checkpoint"
        )
    if found == HF:
        return None
    if found == T5X:
        from hyperprompt_jax.checkpoints import t5x_legacy

        try:
            t5x_legacy.read_msgpack(step_dir)
        except ValueError as e:
            return str(e)
        return None
    if not paths.is_file(paths.join(step_dir, COMMIT_MARKER)):
        return f"no {COMMIT_MARKER} (orbax's commit marker): the save did not finish"
    if paths.is_file(paths.join(step_dir, ORBAX_STEP_METADATA)):
        bad = _read_json(paths.join(step_dir, ORBAX_STEP_METADATA))
        if bad:
            return bad
    item = paths.join(step_dir, T5X_ORBAX_ITEM if found == T5X_ORBAX else TRAIN_ITEM)
    bad = _read_json(paths.join(item, ORBAX_TREE_METADATA))
    if bad:
        return f"{item.rsplit('/', 1)[-1]}/{bad}"
    entries = paths.listdir(item)
    if "manifest.ocdbt" in entries or any(e.startswith("ocdbt.process_") for e in entries):
        data_dirs = [e for e in entries if e.startswith("ocdbt.process_")] or ["."]
        for data in data_dirs:
            where = paths.join(item, data) if data != "." else item
            if not paths.is_file(paths.join(where, "manifest.ocdbt")):
                return f"{data}/manifest.ocdbt is missing (array data removed)"
            if not paths.listdir(paths.join(where, "d")):
                return f"{data}/d/ holds no data files (array data removed)"
    elif len(entries) <= 2:  # only _METADATA (+ marker): the arrays are gone
        return "the array data is missing"
    return None


def newest_intact(
    model_dir: str,
    *,
    kinds: Tuple[str, ...] = (T5X, T5X_ORBAX, TRAIN),
    verify: Optional[Callable[[str], Optional[str]]] = None,
) -> Tuple[Optional[int], Optional[str], List[Tuple[str, str]]]:
    """The newest checkpoint in `model_dir` that is complete and intact.

    Args:
      model_dir: a directory holding `checkpoint_<step>/` subdirectories.
      kinds: accepted kinds; directories of other kinds are skipped as damaged.
      verify: extra check of a candidate (e.g. trying to read it): returns a reason it
        is damaged, or None.

    Returns:
      `(step, step_dir, skipped)`; `(None, None, skipped)` if none is intact. `skipped`
      lists `(step_dir, reason)` of the newer checkpoints passed over (never deleted).
    """
    skipped: List[Tuple[str, str]] = []
    for step, path in reversed(step_dirs(model_dir)):
        reason = damage(path)
        if reason is None and kind(path) not in kinds:
            reason = f"a {kind(path)} checkpoint where {' / '.join(kinds)} was expected"
        if reason is None and verify is not None:
            reason = verify(path)
        if reason is None:
            return step, path, skipped
        skipped.append((path, reason))
    return None, None, skipped


def warn_skipped(skipped: List[Tuple[str, str]], chosen: Optional[str]) -> None:
    """One warning naming each skipped checkpoint, its problem, and what is used instead."""
    if not skipped:
        return
    listing = "; ".join(f"{path}: {reason}" for path, reason in skipped)
    instead = f"using {chosen}" if chosen else "no intact checkpoint is left"
    logger.warning(
        "Skipped %d damaged or incomplete checkpoint(s) (kept on disk, not deleted): %s. "
        "Instead %s.",
        len(skipped),
        listing,
        instead,
    )


def resolve(path: str, *, what: str = "checkpoint", noun: str = "checkpoint") -> Tuple[str, str]:
    """`(kind, directory)` for a checkpoint path as users give it.

    Args:
      path: a Hugging Face directory (`config.json`), a `checkpoint_<step>/` directory of
        any kind, the t5x `checkpoint` msgpack file in one, or a model directory (its
        newest intact checkpoint; damaged newer ones are skipped with a warning).
      what: how to name the path in errors (e.g. 'INITIAL_CHECKPOINT_PATH').
      noun: what was expected, for errors (e.g. 't5x checkpoint').

    Raises:
      UserError: a missing path, a damaged checkpoint given directly, or a directory
        with no (intact) checkpoint.
    """
    from hyperprompt_jax.errors import UserError

    if not isinstance(path, str) or not path:
        raise UserError(f"{what} must be a path, got {path!r}.")
    path = path.rstrip("/") if len(path) > 1 else path
    if path.rsplit("/", 1)[-1] == T5X_MSGPACK and paths.is_file(path):
        path = path.rsplit("/", 1)[0] if "/" in path else "."
    if not paths.exists(path):
        raise UserError(f"{what} {path!r} does not exist.")
    found = kind(path)
    if found is not None or parse_step(path) is not None:
        reason = damage(path)
        if reason is not None:
            raise UserError(f"{what} {path!r} is damaged or incomplete: {reason}.")
        return found, path
    step, chosen, skipped = newest_intact(path)
    warn_skipped(skipped, chosen)
    if chosen is None:
        detail = f" ({len(skipped)} damaged ones skipped)" if skipped else ""
        raise UserError(
            f"{what} {path!r} is not a {noun} and holds no intact one{detail}: expected a Hugging Face "
            "T5 directory (config.json), a t5x checkpoint_<step>/ (legacy 'checkpoint' "
            "msgpack or orbax 'state/'), a train checkpoint of this package, or a model "
            "directory holding checkpoint_<step>/ subdirectories."
        )
    return kind(chosen), chosen
