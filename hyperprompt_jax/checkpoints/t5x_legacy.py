"""t5x's legacy tensorstore checkpoint format (the public pretrained T5 checkpoints).

A `checkpoint_<step>/` directory whose `checkpoint` file is a `flax.serialization`
msgpack of `{'version': 3, 'optimizer': {'target': params, 'state': optimizer state}}`.
Each leaf of `target` is either the array itself (msgpack extension type 1: `(shape,
dtype name, raw bytes)`) or a TensorStore spec dict `{'driver': 'zarr', 'kvstore':
{'driver': 'file' | 'gfile' | 'gcs', 'path': 'target.encoder.layers_0...'},
'metadata': {...}}` whose path is relative to the checkpoint directory; the zarr array
(gzip chunks) lives in that sibling directory. Paths may be local or `gs://` (read
through TensorStore's `file` / `gcs` key-value stores, no TensorFlow needed).

`open_t5x` reads the msgpack only and returns a lazy `WeightSource`: zarr arrays are
read slice by slice (only the chunks a device's slice touches); inline arrays are in
the msgpack already (small: norm scales, relative-position tables).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import ml_dtypes
import numpy as np

from hyperprompt_jax.checkpoints import discovery, paths
from hyperprompt_jax.checkpoints.sources import Tensor, WeightSource, gathered
from hyperprompt_jax.checkpoints.trees import (
    Params,
    check_params_match,
    flatten_params,
    t5_param_shapes,
    unflatten_params,
)
from hyperprompt_jax.config import T5Config
from hyperprompt_jax.errors import UserError

# t5x's checkpoint format version. Version 3 writes bfloat16 natively in TensorStore;
# version 2 stored bfloat16 arrays as uint16 bit patterns.
T5X_CHECKPOINT_VERSION = 3
# Chunks of about 64 MiB: big enough for efficient object-store reads, small enough for
# partial (sharded) reads by several hosts.
_TARGET_CHUNK_BYTES = 64 * 1024 * 1024
# Non-matrix arrays up to this size stay inline in the msgpack (t5x's layout keeps the
# norm scales and relative-position tables inline); anything larger goes to zarr so the
# msgpack stays small (msgpack `bin` objects are limited to 4 GiB anyway).
_INLINE_MAX_BYTES = 1024 * 1024
# Leaves always written as zarr arrays: the weight matrices, which are nearly all of a
# model's bytes.
_ZARR_LEAF_NAMES = ("kernel", "embedding")
# t5x writes GCS specs with this placeholder bucket and substitutes the real one on read,
# so checkpoints stay valid when copied between buckets.
_DUMMY_BUCKET = "t5x-dummy-bucket"

_MSGPACK_FILE = discovery.T5X_MSGPACK


def find_t5x_checkpoint_dir(path: str) -> str:
    """Resolves a checkpoint directory, its `checkpoint` file, or a model directory.

    Args:
      path: `.../checkpoint_<step>` (local or gs://, legacy or orbax t5x format), the
        `checkpoint` msgpack file in one, or a model directory holding
        `checkpoint_<step>/` subdirectories (the newest intact step is chosen; damaged
        newer ones are skipped with a warning).

    Returns:
      The `checkpoint_<step>` directory.

    Raises:
      UserError: if `path` does not exist or holds no intact t5x checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"Checkpoint path must be a string, got {path!r}.")
    found, directory = discovery.resolve(
        os.fspath(path), what="t5x checkpoint path", noun="t5x checkpoint"
    )
    if found not in (discovery.T5X, discovery.T5X_ORBAX):
        raise UserError(
            f"{path!r} is not a t5x checkpoint but a {found} checkpoint: expected a "
            f"'checkpoint_<step>' directory containing a '{_MSGPACK_FILE}' msgpack file "
            "(legacy format) or a 'state/' orbax item (t5x's Orbax format)."
        )
    return directory


# ---------------------------------------------------------------------------------------
# Reading t5x checkpoints
# ---------------------------------------------------------------------------------------


def _is_ts_spec(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and isinstance(node.get("driver"), str)
        and ("kvstore" in node or "path" in node)
    )


def _walk_leaves(tree: Any, prefix: Tuple[str, ...] = ()) -> Iterable[Tuple[str, Any]]:
    """Yields ('a/b', leaf) where a leaf is an array or a TensorStore spec dict."""
    if _is_ts_spec(tree) or not isinstance(tree, Mapping):
        yield "/".join(prefix), tree
        return
    for key, value in tree.items():
        yield from _walk_leaves(value, prefix + (str(key),))


def _absolute_spec(spec: Mapping[str, Any], ckpt_dir: str, name: str) -> Dict[str, Any]:
    """Rewrites a spec's checkpoint-relative path to an absolute `file` / `gcs` kvstore."""
    spec = json.loads(json.dumps(spec))  # deep copy of plain JSON data
    kvstore = spec.pop("kvstore", None)
    if isinstance(kvstore, Mapping) and "path" in kvstore:
        relative, driver = kvstore["path"], kvstore.get("driver", "file")
    elif "path" in spec:  # TensorStore < 0.1.14 put the path at the top level.
        relative, driver = spec.pop("path"), "file"
    else:
        raise UserError(
            f"Parameter {name!r}: malformed TensorStore spec in the checkpoint msgpack "
            f"(no kvstore path): {spec}."
        )
    if driver not in ("file", "gfile", "gcs"):
        raise UserError(
            f"Parameter {name!r}: unsupported TensorStore kvstore driver {driver!r}; "
            "expected 'file', 'gfile' or 'gcs'."
        )
    # As in t5x, the stored driver only says where the checkpoint was written; the
    # directory we read from decides between the local and the GCS store.
    spec["kvstore"] = paths.kvstore_spec(paths.join(ckpt_dir, relative))
    return spec


def _expected_chunk_keys(metadata: Mapping[str, Any]) -> List[str]:
    shape = list(metadata["shape"])
    chunks = list(metadata["chunks"])
    separator = metadata.get("dimension_separator") or "."
    if not shape:
        return ["0"]
    grids = [
        range(max(1, math.ceil(s / c))) if s else range(0)
        for s, c in zip(shape, chunks, strict=True)
    ]
    keys = [""]
    for axis, grid in enumerate(grids):
        keys = [k + (separator if axis else "") + str(i) for k in keys for i in grid]
    return keys


def _open_zarr_tensors(specs: Dict[str, Dict[str, Any]], version: int) -> Dict[str, Tensor]:
    """Opens {name: absolute spec} concurrently (metadata only), checking every chunk file.

    A zarr array treats a missing chunk file as fill value, which would silently give
    zeros for a partially copied checkpoint; so the chunk keys are listed first. The
    returned tensors read slices: only the chunks a slice touches are read.
    """
    ts = paths.ts()
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    opened = {}
    open_futures = {
        name: ts.open(spec, open=True, read=True, context=context) for name, spec in specs.items()
    }
    for name, future in open_futures.items():
        where = specs[name]["kvstore"]
        try:
            opened[name] = future.result()
        except Exception as e:  # TensorStore raises ValueError subclasses on I/O errors.
            raise UserError(
                f"Cannot open the zarr array of parameter {name!r} at {_where(where)}: {e}. "
                "Expected a zarr directory (with a '.zarray' file) next to the checkpoint "
                "msgpack; the checkpoint is incomplete or damaged."
            ) from None
    list_futures = {
        name: ts.KvStore.open(specs[name]["kvstore"], context=context).result().list()
        for name in specs
    }
    tensors = {}
    for name, future in list_futures.items():
        present = {key.decode() for key in future.result()}
        metadata = opened[name].spec().to_json()["metadata"]
        missing = [k for k in _expected_chunk_keys(metadata) if k not in present]
        if missing:
            raise UserError(
                f"Parameter {name!r}: chunk file(s) {missing[:5]} missing from "
                f"{_where(specs[name]['kvstore'])} (shape {metadata['shape']} in chunks of "
                f"{metadata['chunks']}); the checkpoint is incomplete."
            )
        store = opened[name]
        dtype = np.dtype(store.dtype.numpy_dtype)
        if version < 3 and dtype == np.uint16:
            dtype = np.dtype(ml_dtypes.bfloat16)

        def read(index, store=store, name=name):
            try:
                array = np.asarray(store[index].read().result())
            except Exception as e:
                raise UserError(
                    f"Cannot read parameter {name!r} from {_where(specs[name]['kvstore'])}: "
                    f"{e}. An array file is damaged or truncated."
                ) from None
            if version < 3 and array.dtype == np.uint16:
                # Version-2 checkpoints stored bfloat16 as its raw 16-bit pattern.
                array = array.view(ml_dtypes.bfloat16)
            return array

        tensors[name] = Tensor(tuple(int(d) for d in store.shape), dtype, read)
    return tensors


def _where(kvstore: Mapping[str, Any]) -> str:
    if kvstore.get("driver") == "gcs":
        return f"gs://{kvstore['bucket']}/{kvstore['path']}"
    return str(kvstore.get("path"))


def read_msgpack(ckpt_dir: str) -> Dict[str, Any]:
    from flax import serialization

    msgpack_path = paths.join(ckpt_dir, _MSGPACK_FILE)
    raw = paths.read_bytes(msgpack_path)
    if raw.startswith(b"model_checkpoint_path"):
        raise UserError(
            f"{msgpack_path} is a TensorFlow checkpoint index, not a native t5x (msgpack) "
            "checkpoint; convert it with t5x first."
        )
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:
        raise UserError(
            f"{msgpack_path} is not a valid t5x msgpack checkpoint (truncated or corrupt?): {e}"
        ) from None
    if (
        not isinstance(contents, Mapping)
        or not isinstance(contents.get("optimizer"), Mapping)
        or not isinstance(contents["optimizer"].get("target"), Mapping)
    ):
        keys = sorted(contents) if isinstance(contents, Mapping) else type(contents).__name__
        raise UserError(
            f"{msgpack_path}: expected a t5x checkpoint {{'version', 'optimizer': "
            f"{{'target', 'state'}}}}, found top-level keys {keys}."
        )
    return contents


def open_t5x(ckpt_dir: str) -> WeightSource:
    """The parameters (`optimizer.target`) of a legacy t5x checkpoint, read lazily.

    Only the msgpack is read here (with the inline arrays); zarr arrays are opened
    (metadata, chunk listing) and read later, slice by slice.

    Raises:
      UserError: a missing or damaged msgpack, missing array directories or chunks.
    """
    contents = read_msgpack(ckpt_dir)
    version = int(np.asarray(contents.get("version", 0)))
    tensors: Dict[str, Tensor] = {}
    specs: Dict[str, Dict[str, Any]] = {}
    for name, leaf in _walk_leaves(contents["optimizer"]["target"]):
        if _is_ts_spec(leaf):
            specs[name] = _absolute_spec(leaf, ckpt_dir, name)
        elif isinstance(leaf, (np.ndarray, np.generic, int, float)):
            array = np.asarray(leaf)
            tensors[name] = Tensor(
                array.shape, array.dtype, lambda index, a=array: a[index], whole_read=True
            )
        else:
            raise UserError(
                f"Parameter {name!r} in {ckpt_dir}: expected an array or a TensorStore "
                f"spec, found {type(leaf).__name__}."
            )
    tensors.update(_open_zarr_tensors(specs, version))
    return WeightSource(f"t5x checkpoint {ckpt_dir}", tensors)


def load_t5x_checkpoint(
    path: str,
    *,
    config: T5Config | None = None,
    dtype: Any = np.float32,
) -> Params:
    """Loads the parameters (`optimizer.target`) of a t5x checkpoint as NumPy arrays.

    Both t5x formats: the legacy tensorstore format (a `checkpoint` msgpack plus zarr
    arrays, the public pretrained checkpoints) and the Orbax format current
    `t5x.train` writes (`state/`). The optimizer state is not read: methods initialise
    their own. Whole arrays on the host: for sharded loading into a model use
    `load_backbone`.

    Args:
      path: a `checkpoint_<step>` directory, its `checkpoint` file, or a model directory
        (the newest intact `checkpoint_<step>` is used); local or `gs://`.
      config: if given, the parameters must be exactly those of `Transformer(config)`
        (names and shapes), otherwise a ValueError lists the differences.
      dtype: dtype of the returned arrays (float32 by default, whatever was stored).

    Returns:
      Nested dict of NumPy arrays with t5x's tree (`token_embedder/embedding`, ...).

    Raises:
      UserError: missing directory, missing/damaged msgpack or array files, or
        parameters that do not fit `config`.
    """
    ckpt_dir = find_t5x_checkpoint_dir(path)
    if discovery.kind(ckpt_dir) == discovery.T5X_ORBAX:
        from hyperprompt_jax.checkpoints import t5x_orbax

        source = t5x_orbax.open_t5x_orbax(ckpt_dir)
    else:
        source = open_t5x(ckpt_dir)
    if config is not None:
        check_params_match(
            source.shapes(), t5_param_shapes(config), source=f"t5x checkpoint {ckpt_dir}"
        )
    params = {name: np.asarray(a, dtype=dtype) for name, a in gathered(source).items()}
    return unflatten_params(params)


# ---------------------------------------------------------------------------------------
# Writing t5x checkpoints
# ---------------------------------------------------------------------------------------


def _chunk_shape(shape: Sequence[int], itemsize: int) -> List[int]:
    """Largest chunk (each side a divisor of the array side) of <= ~64 MiB.

    Greedily shrinks the currently longest chunk side to its next smaller divisor, so
    chunks tile the array exactly and stay roughly square.
    """
    chunk = [int(s) for s in shape]
    target = max(1, _TARGET_CHUNK_BYTES // itemsize)
    while chunk and math.prod(chunk) > target:
        axis = int(np.argmax(chunk))
        side = shape[axis]
        chunk[axis] = max(d for d in range(1, chunk[axis]) if side % d == 0)
    return [max(1, c) for c in chunk]


def _zarr_spec(relative: str, array: np.ndarray, gcs: bool) -> Dict[str, Any]:
    """The spec stored in the msgpack (checkpoint-relative path, as t5x writes it)."""
    kvstore: Dict[str, Any] = {"driver": "file", "path": relative}
    if gcs:
        kvstore = {"driver": "gcs", "bucket": _DUMMY_BUCKET, "path": relative}
    return {
        "driver": "zarr",
        "dtype": np.dtype(array.dtype).name,
        "kvstore": kvstore,
        "metadata": {
            "compressor": {"id": "gzip", "level": 1},
            "shape": list(array.shape),
            "chunks": _chunk_shape(array.shape, array.dtype.itemsize),
        },
    }


def _zero_adafactor_state(flat_params: Mapping[str, np.ndarray], step: int) -> Dict[str, Any]:
    """t5x's freshly initialised Adafactor state for `flat_params` (all zeros).

    t5x's default Adafactor (factored second moments for matrices whose two largest
    sides are >= 128, no momentum) keeps per parameter `v_row`, `v_col` (factored) or
    `v` (unfactored), and `m`; unused slots are zeros of shape [1]. Writing it lets
    t5x's `Checkpointer` restore this checkpoint into a default t5x train state.
    """
    states = {}
    for name, param in flat_params.items():
        shape = param.shape
        state = {key: np.zeros((1,), np.float32) for key in ("m", "v", "v_col", "v_row")}
        order = np.argsort(shape, kind="stable")
        if len(shape) >= 2 and shape[order[-2]] >= 128:
            row_axis, col_axis = int(order[-2]), int(order[-1])
            state["v_row"] = np.zeros(np.delete(shape, col_axis), np.float32)
            state["v_col"] = np.zeros(np.delete(shape, row_axis), np.float32)
        else:
            state["v"] = np.zeros(shape, np.float32)
        states[name] = state
    return {"step": np.asarray(step, np.int32), "param_states": unflatten_params(states)}


def save_t5x_checkpoint(
    params: Mapping[str, Any],
    directory: str,
    step: int,
    *,
    dtype: Any = np.float32,
    optimizer_state: Mapping[str, Any] | None = None,
) -> str:
    """Writes `params` as the native t5x checkpoint `directory/checkpoint_<step>/`.

    Weight matrices (`kernel`, `embedding`) and any array over 1 MiB are written as
    gzip-compressed zarr arrays through TensorStore (`target.<dotted.path>/`); small
    arrays (norm scales, relative-position tables) stay inline in the msgpack, like
    t5x's own checkpoints. Locally the directory is written under a temporary name and
    renamed when complete; on GCS the msgpack file is written last, so a reader never
    sees a half-written checkpoint as complete.

    Args:
      params: nested dict of arrays (the `params` collection, not `{'params': ...}`).
      directory: model directory, local or `gs://`.
      step: training step (the directory name).
      dtype: storage dtype of `target` (t5x saves float32).
      optimizer_state: the msgpack `state` entry; by default t5x's zero Adafactor state
        for `params`, so t5x can restore the checkpoint into a fresh train state.

    Returns:
      The written `checkpoint_<step>` directory.

    Raises:
      ValueError: for a bad step, a non-dict tree, or an existing checkpoint directory.
    """
    from flax import serialization

    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    if not isinstance(params, Mapping) or not params:
        raise ValueError("params must be a non-empty nested dict of arrays.")
    if set(params) >= {"params"} and isinstance(params.get("params"), Mapping):
        raise ValueError(
            "Pass the parameter tree itself (variables['params']), not the variables dict "
            f"with collections {sorted(params)}."
        )
    directory = os.fspath(directory)
    gcs = paths.is_gcs(directory)
    final_dir = paths.join(directory, f"checkpoint_{int(step)}")
    if (gcs and paths.is_file(paths.join(final_dir, _MSGPACK_FILE))) or (
        not gcs and os.path.exists(final_dir)
    ):
        raise ValueError(f"Checkpoint directory {final_dir} already exists; not overwriting.")
    work_dir = final_dir if gcs else f"{final_dir}.tmp-{int(time.time() * 1e6)}"
    if not gcs:
        os.makedirs(work_dir)

    flat = {}
    for name, leaf in flatten_params(params).items():
        array = np.asarray(leaf)
        if np.issubdtype(array.dtype, np.floating) or array.dtype == ml_dtypes.bfloat16:
            array = array.astype(dtype, copy=False)
        flat[name] = array
    state = optimizer_state
    if state is None:
        state = _zero_adafactor_state(flat, int(step))

    ts = paths.ts()
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    pending = []

    def store(prefix: str, name: str, array: np.ndarray, matrix_leaf: bool) -> Any:
        if not (matrix_leaf or array.nbytes > _INLINE_MAX_BYTES) or array.ndim == 0:
            return array
        relative = ".".join([prefix, *name.split("/")])
        spec = _zarr_spec(relative, array, gcs)
        absolute = dict(spec, kvstore=paths.kvstore_spec(paths.join(work_dir, relative)))
        future = ts.open(absolute, create=True, delete_existing=True, context=context)
        pending.append((future, array))
        return spec

    target = unflatten_params(
        {
            name: store("target", name, array, name.split("/")[-1] in _ZARR_LEAF_NAMES)
            for name, array in flat.items()
        }
    )
    flat_state = {
        name: store("state", name, np.asarray(leaf), False)
        for name, leaf in flatten_params(state).items()
    }
    state_tree = unflatten_params(flat_state)
    writes = [future.result().write(array) for future, array in pending]
    for write in writes:
        write.result()
    data = serialization.msgpack_serialize(
        {"version": T5X_CHECKPOINT_VERSION, "optimizer": {"target": target, "state": state_tree}}
    )
    paths.write_bytes(paths.join(work_dir, _MSGPACK_FILE), data)
    if not gcs:
        os.rename(work_dir, final_dir)
    return final_dir
