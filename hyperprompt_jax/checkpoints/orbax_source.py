"""Parameters inside an orbax PyTree item, read lazily and straight into shardings.

Used for t5x's Orbax format (`checkpoint_<step>/state/`, parameters under `target`)
and for this package's train checkpoints (`checkpoint_<step>/default/`, parameters
under `trainable` and `frozen`). The item's `_METADATA` gives names, shapes and dtypes
without reading any array; `OrbaxSource.load` restores only the requested leaves
(`partial_restore`) with orbax `ArrayRestoreArgs(sharding, dtype)`: every process reads
the slices its devices hold, cast on the fly.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Sequence, Tuple

import jax
import numpy as np

from hyperprompt_jax.checkpoints import paths
from hyperprompt_jax.checkpoints.sources import Tensor, WeightSource
from hyperprompt_jax.errors import UserError


def _metadata_tree(item_dir: str) -> Mapping[str, Any]:
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        # The item's handler directly: no step-level metadata lookup (and no warning
        # about its absence inside an item directory).
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged metadata
        raise UserError(
            f"Cannot read the orbax metadata of {item_dir}: {type(e).__name__}: {e}. The "
            "checkpoint is damaged or incomplete."
        ) from None
    return getattr(metadata, "tree", metadata)


def _flatten(tree: Any, prefix: Tuple[str, ...] = ()) -> Dict[Tuple[str, ...], Any]:
    """`{path: leaf}`; mappings by key, lists and tuples (optax states) by position."""
    if isinstance(tree, Mapping):
        items = [(str(k), v) for k, v in tree.items()]
    elif isinstance(tree, (list, tuple)) and not hasattr(tree, "shape"):
        items = [(str(i), v) for i, v in enumerate(tree)]
    else:
        return {prefix: tree}
    out = {}
    for key, value in items:
        out.update(_flatten(value, prefix + (key,)))
    return out


def _unflatten(flat: Mapping[Tuple[str, ...], Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return tree


def item_tree_shapes(item_dir: str) -> Dict[Tuple[str, ...], Tuple[Tuple[int, ...], np.dtype]]:
    """`{path tuple: (shape, dtype)}` of every array leaf of an orbax PyTree item."""
    out = {}
    for path, meta in _flatten(_metadata_tree(item_dir)).items():
        shape = getattr(meta, "shape", None)
        if shape is None:
            continue
        out[path] = (tuple(int(d) for d in shape), np.dtype(meta.dtype))
    return out


class OrbaxSource(WeightSource):
    """Parameters stored under `roots` of an orbax PyTree item (a `WeightSource`).

    Args:
      item_dir: the PyTree item directory (`.../checkpoint_<step>/state` or `/default`).
      roots: top-level keys whose subtrees hold parameters (merged; names are the paths
        below the root, '/'-joined).
      description: for messages.
    """

    def __init__(self, item_dir: str, roots: Sequence[str], description: str):
        self.item_dir = item_dir if paths.is_gcs(item_dir) else os.path.abspath(item_dir)
        self._where: Dict[str, Tuple[str, ...]] = {}
        tensors = {}
        for path, (shape, dtype) in item_tree_shapes(self.item_dir).items():
            if path[0] not in roots:
                continue
            name = "/".join(path[1:])
            self._where[name] = path
            tensors[name] = Tensor(shape, dtype, self._read_slice(name))
        super().__init__(description, tensors)

    def _read_slice(self, name: str):
        # Only for callers that want one slice; `load` restores many leaves at once.
        def read(index):
            cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            array = self.load({name: (cpu, self.tensors[name].dtype)})[name]
            return np.asarray(array)[index]

        return read

    def load(
        self, targets: Mapping[str, Tuple[jax.sharding.Sharding, Any]]
    ) -> Dict[str, jax.Array]:
        """Restores `{name: (sharding, dtype)}` with orbax: each process reads its shards."""
        import orbax.checkpoint as ocp

        if not targets:
            return {}
        item, restore_args = {}, {}
        for name, (sharding, dtype) in targets.items():
            path = self._where[name]
            shape = self.tensors[name].shape
            item[path] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)
            restore_args[path] = ocp.ArrayRestoreArgs(
                sharding=sharding, dtype=np.dtype(dtype), global_shape=shape
            )
            self._count(_local_bytes(shape, sharding, self.tensors[name].dtype))
        try:
            restored = ocp.PyTreeCheckpointer().restore(
                self.item_dir,
                args=ocp.args.PyTreeRestore(
                    _unflatten(item), restore_args=_unflatten(restore_args), partial_restore=True
                ),
            )
        except Exception as e:  # noqa: BLE001 - tensorstore / orbax errors on damaged data
            raise UserError(
                f"Cannot read the arrays of {self.description}: {type(e).__name__}: "
                f"{str(e)[:300]}. An array file is damaged, truncated or missing."
            ) from None
        flat = _flatten(restored)
        return {name: flat[self._where[name]] for name in targets}


def _local_bytes(shape, sharding, dtype) -> int:
    """Bytes of the distinct slices this process's devices hold (what orbax reads)."""
    try:
        indices = sharding.addressable_devices_indices_map(tuple(shape)).values()
    except Exception:  # noqa: BLE001
        return int(np.prod(shape)) * np.dtype(dtype).itemsize
    seen = set()
    total = 0
    for index in indices:
        index = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape, strict=True))
        key = tuple((s.start, s.stop) for s in index)
        if key in seen:
            continue
        seen.add(key)
        total += int(np.prod([s.stop - s.start for s in index])) * np.dtype(dtype).itemsize
    return total
