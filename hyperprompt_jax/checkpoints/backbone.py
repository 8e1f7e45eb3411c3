"""Weights from any accepted path, read straight into a model's shardings: `load_backbone`.

Accepted wherever a checkpoint path is (`INITIAL_CHECKPOINT_PATH`, `CHECKPOINT_PATH`,
export): a t5x checkpoint (legacy tensorstore or Orbax format), a Hugging Face T5
directory, or a train checkpoint of this package (parameters only, any step; a
trainable-only one brings its backbone from the reference it records), each as a
`checkpoint_<step>/` directory or a model directory (its newest intact checkpoint).

A backbone reference (`BackboneRef`) records where a run's frozen parameters came from
and a fingerprint that detects a different backbone: a hash of the names, shapes and
dtypes, and a cheap content check (sum and sum of squares of the small tensors: norm
scales and relative-position tables).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np

from hyperprompt_jax.checkpoints import discovery, paths
from hyperprompt_jax.checkpoints.sources import MergedSource, WeightSource
from hyperprompt_jax.errors import UserError

# Tensors with at most this many elements enter the content check (all of them are
# read: norm scales and relative-position tables, a few MB for T5-XXL).
_CONTENT_MAX_ELEMENTS = 1 << 16
_CONTENT_MAX_TENSORS = 64


@dataclasses.dataclass(frozen=True)
class BackboneRef:
    """Where a trainable-only checkpoint's frozen parameters come from.

    Attributes:
      path: the backbone's path (None: initialised from `seed`, no checkpoint).
      seed: the parameter-initialisation seed (for `path=None`).
      names_hash: sha256 of the sorted `name shape dtype` lines of the frozen tensors.
      content: `{name: [sum, sum of squares]}` (float64) of the small frozen tensors.
    """

    path: Optional[str]
    seed: int
    names_hash: str
    content: Mapping[str, Tuple[float, float]]

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BackboneRef:
        return cls(
            path=data.get("path"),
            seed=int(data.get("seed", 0)),
            names_hash=str(data["names_hash"]),
            content={k: tuple(v) for k, v in dict(data.get("content", {})).items()},
        )


def names_hash(shapes: Mapping[str, Tuple[Tuple[int, ...], Any]]) -> str:
    """sha256 over `name shape dtype` lines (sorted) of `{name: (shape, dtype)}`."""
    lines = [f"{n} {tuple(s)} {np.dtype(d).name}" for n, (s, d) in sorted(shapes.items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def content_names(shapes: Mapping[str, Tuple[Tuple[int, ...], Any]]) -> list:
    """The (small) tensors the content check reads, by name."""
    small = [n for n, (s, _) in sorted(shapes.items()) if int(np.prod(s)) <= _CONTENT_MAX_ELEMENTS]
    return small[:_CONTENT_MAX_TENSORS]


def content_of(arrays: Mapping[str, Any]) -> Dict[str, Tuple[float, float]]:
    """`{name: (sum, sum of squares)}` in float64 of float32-cast host arrays."""
    out = {}
    for name, value in arrays.items():
        x = np.asarray(value, np.float32).astype(np.float64)
        out[name] = (float(x.sum()), float((x * x).sum()))
    return out


def fingerprint_source(
    source: WeightSource, names: list, dtypes: Mapping[str, Any]
) -> Tuple[str, Dict[str, Tuple[float, float]]]:
    """`(names_hash, content)` of `names` of `source` as the model stores them (`dtypes`).

    Only the small tensors are read (onto the host CPU).
    """
    shapes = {n: (source.tensors[n].shape, dtypes[n]) for n in names}
    small = content_names(shapes)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    loaded = source.load({n: (cpu, dtypes[n]) for n in small})
    return names_hash(shapes), content_of({n: np.asarray(v) for n, v in loaded.items()})


def _describe_mismatch(ref: BackboneRef, found_hash: str, found_content: Mapping) -> str:
    if ref.names_hash != found_hash:
        return "its parameter names, shapes or dtypes differ"
    changed = sorted(
        n for n in ref.content if tuple(found_content.get(n, ())) != tuple(ref.content[n])
    )
    return f"its values differ (e.g. {', '.join(changed[:3])})"


def check_backbone(ref: BackboneRef, source: WeightSource, names: list, dtypes, where: str) -> None:
    """Raises UserError (one line) if `source`'s `names` do not match `ref`'s fingerprint."""
    found_hash, found_content = fingerprint_source(source, names, dtypes)
    if found_hash != ref.names_hash or {k: tuple(v) for k, v in found_content.items()} != {
        k: tuple(v) for k, v in ref.content.items()
    }:
        raise UserError(
            f"{where} was trained on the backbone {ref.path}, which has changed since "
            f"({_describe_mismatch(ref, found_hash, found_content)}); restore the original "
            "backbone files, or start a new MODEL_DIR."
        )


# ---------------------------------------------------------------------------------------
# Opening any accepted path
# ---------------------------------------------------------------------------------------


def read_step_metadata(step_dir: str) -> Dict[str, Any]:
    """orbax's `_CHECKPOINT_METADATA` custom metadata of a checkpoint ({} if none)."""
    try:
        data = json.loads(paths.read_bytes(paths.join(step_dir, discovery.ORBAX_STEP_METADATA)))
    except (OSError, ValueError):
        return {}
    return dict(data.get("custom_metadata") or {})


def open_train_checkpoint(step_dir: str) -> WeightSource:
    """The parameters of a train checkpoint of this package (no optimizer state).

    A trainable-only checkpoint brings its frozen parameters from the backbone it
    references (opened lazily as well; its fingerprint is checked by the caller).
    """
    from hyperprompt_jax.checkpoints.orbax_source import OrbaxSource

    item = paths.join(step_dir, discovery.TRAIN_ITEM)
    own = OrbaxSource(
        item, roots=("trainable", "frozen"), description=f"train checkpoint {step_dir}"
    )
    meta = read_step_metadata(step_dir)
    backbone = meta.get("backbone")
    if not backbone:
        return own
    ref = BackboneRef.from_json(backbone)
    if ref.path is None:
        raise UserError(
            f"Train checkpoint {step_dir} holds only the trained parameters and its frozen "
            f"backbone was initialised randomly (seed {ref.seed}), not loaded from a file; "
            "load it with the run's gin files (eval/infer rebuild that backbone) instead."
        )
    _, _, frozen_source = open_weights(ref.path, what=f"the backbone of {step_dir}")
    frozen = {n: t for n, t in frozen_source.tensors.items() if n not in own.tensors}
    frozen_source.tensors = frozen
    return MergedSource(f"train checkpoint {step_dir} + backbone {ref.path}", [own, frozen_source])


def open_weights(path: str, *, what: str = "checkpoint path") -> Tuple[str, str, WeightSource]:
    """`(kind, directory, lazy source)` of any accepted checkpoint path.

    Raises:
      UserError: a missing path, nothing intact found, or unreadable metadata.
    """
    found, directory = discovery.resolve(path, what=what, noun="checkpoint")
    if found == discovery.HF:
        from hyperprompt_jax.checkpoints.hf import open_hf_t5

        return found, directory, open_hf_t5(directory)[1]
    if found == discovery.T5X:
        from hyperprompt_jax.checkpoints.t5x_legacy import open_t5x

        return found, directory, open_t5x(directory)
    if found == discovery.T5X_ORBAX:
        from hyperprompt_jax.checkpoints.t5x_orbax import open_t5x_orbax

        return found, directory, open_t5x_orbax(directory)
    return found, directory, open_train_checkpoint(directory)


def load_backbone(
    path: str,
    abstract: Mapping[str, jax.ShapeDtypeStruct],
    *,
    what: str = "INITIAL_CHECKPOINT_PATH",
    optional: Optional[callable] = None,
) -> Tuple[Dict[str, jax.Array], WeightSource]:
    """Reads a checkpoint's parameters straight into a model's shardings.

    Args:
      path: any accepted checkpoint path (see the module docstring).
      abstract: flat `{name: ShapeDtypeStruct(shape, dtype, sharding)}` of the model.
      what: how to name `path` in errors.
      optional: `name -> bool`: model parameters the checkpoint may lack (they are then
        left out of the result, for the caller to initialise); names it has are loaded
        when the model has them with the same shape.

    Returns:
      `(flat {name: jax.Array} of the loaded parameters, the source)`.

    Raises:
      UserError: `path` problems, or parameters that do not fit (all listed).
    """
    from hyperprompt_jax.checkpoints.trees import check_params_match

    _, directory, source = open_weights(path, what=what)
    optional = optional or (lambda name: False)
    stored = source.shapes()
    expected = {n: a.shape for n, a in abstract.items() if not optional(n)}
    expected.update({n: abstract[n].shape for n in stored if optional(n) and n in abstract})
    check_params_match(stored, expected, source=f"{what} {directory}")
    targets = {n: (abstract[n].sharding, abstract[n].dtype) for n in stored}
    return source.load(targets), source
