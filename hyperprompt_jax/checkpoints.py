"""Import and export T5 weights: native t5x checkpoints and Hugging Face T5 directories.

Everything here works on plain parameter trees: nested dicts of float32 NumPy arrays
with t5x's names (`token_embedder/embedding`, `encoder/layers_0/attention/query/kernel`,
`decoder/logits_dense/kernel`, ...), i.e. the `params` collection of
`network.Transformer`. Training-state checkpoints (optimizer state, resume) are the
trainer's business; this module only moves weights in and out.

* t5x format (`load_t5x_checkpoint`, `save_t5x_checkpoint`): a `checkpoint_<step>/`
  directory whose `checkpoint` file is a `flax.serialization` msgpack of
  `{'version': 3, 'optimizer': {'target': params, 'state': optimizer state}}`. Each leaf
  of `target` is either the array itself (msgpack extension type 1: `(shape, dtype
  name, raw bytes)`) or a TensorStore spec dict `{'driver': 'zarr', 'kvstore':
  {'driver': 'file' | 'gfile' | 'gcs', 'path': 'target.encoder.layers_0...'},
  'metadata': {...}}` whose path is relative to the checkpoint directory; the zarr
  array (gzip chunks) lives in that sibling directory. Paths may be local or `gs://`
  (read through TensorStore's `file` / `gcs` key-value stores, no TensorFlow needed).
* Hugging Face format (`load_hf_t5`, `save_hf_t5`): a `save_pretrained` directory of a
  `T5ForConditionalGeneration` (`config.json` plus `model.safetensors`, sharded
  safetensors, or `pytorch_model.bin`). HF's `nn.Linear` weights are `[out, in]`
  (t5x kernels are `[in, out]`), the relative attention bias table is `[buckets,
  heads]` and lives in block 0 of each stack (t5x: `relpos_bias/rel_embedding`,
  `[heads, buckets]`). Neither library scales the query by 1/sqrt(d), so q kernels
  map as they are. HF decides the output layer with two flags: whether `lm_head` is
  tied to `shared`, and whether the decoder output is multiplied by d_model**-0.5
  (`scale_decoder_outputs` in transformers>=5, `tie_word_embeddings` before); tied +
  scaled is t5x's `logits_via_embedding`, every other combination becomes an explicit
  `logits_dense` kernel.

All readers validate at the boundary and raise `ValueError` naming the path or the
parameter and what was expected (a missing or truncated array file, a config this
network cannot express, weights whose shapes do not fit the config).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from typing import Any, Dict, Iterable, List, Mapping, Sequence, Tuple

import jax
import ml_dtypes
import numpy as np

from hyperprompt_jax import network
from hyperprompt_jax.config import T5Config

Params = Dict[str, Any]

# t5x's checkpoint format version. Version 3 writes bfloat16 natively in TensorStore;
# version 2 stored bfloat16 arrays as uint16 bit patterns.
T5X_CHECKPOINT_VERSION = 3
_MSGPACK_FILE = "checkpoint"
_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
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


# ---------------------------------------------------------------------------------------
# Parameter trees
# ---------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> Dict[str, Any]:
    """`{'a': {'b': x}}` -> `{'a/b': x}` (leaves are anything that is not a mapping)."""
    flat: Dict[str, Any] = {}

    def walk(node: Any, prefix: Tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                walk(value, prefix + (str(key),))
        else:
            flat[sep.join(prefix)] = node

    walk(tree, ())
    return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> Params:
    """Inverse of `flatten_params`: `{'a/b': x}` -> `{'a': {'b': x}}`."""
    tree: Params = {}
    for name, value in flat.items():
        *parents, leaf = name.split(sep)
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def t5_param_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
    """Flat `{name: shape}` of the plain T5 network for `config` (nothing is allocated).

    Names are '/'-joined t5x paths, e.g. `encoder/layers_0/attention/query/kernel`.
    """
    model = network.Transformer(config)
    abstract = jax.eval_shape(
        lambda rng: network.init_params(model, rng, encoder_length=2, decoder_length=2),
        jax.random.PRNGKey(0),
    )
    return {name: tuple(leaf.shape) for name, leaf in flatten_params(abstract["params"]).items()}


def _shape_of(x: Any) -> Tuple[int, ...]:
    if isinstance(x, tuple) and all(isinstance(d, (int, np.integer)) for d in x):
        return tuple(int(d) for d in x)
    if isinstance(x, list):
        return tuple(int(d) for d in x)
    return tuple(np.shape(x))


def check_params_match(
    params: Mapping[str, Any],
    expected: Mapping[str, Any],
    *,
    source: str = "parameters",
    allow_unexpected: bool = False,
    max_listed: int = 20,
) -> None:
    """Checks that `params` has exactly the names and shapes of `expected`.

    Use it to reject an initial checkpoint that does not fit the model before training
    starts (e.g. T5-base weights for a T5-large config).

    Args:
      params: nested dict of arrays (or a flat `{'a/b': array}` dict).
      expected: nested or flat dict whose leaves are shapes (tuples) or anything with a
        `.shape` (arrays, `jax.ShapeDtypeStruct`), e.g. `jax.eval_shape` of the init.
      source: what `params` is, for the message (e.g. the checkpoint path).
      allow_unexpected: accept names in `params` that `expected` lacks.
      max_listed: at most this many entries of each kind are listed.

    Raises:
      ValueError: naming every mismatching parameter (expected vs found shape) and the
        missing / unexpected names.
    """
    flat_params = flatten_params(params)
    # Shape tuples are leaves of `expected`: `flatten_params` only descends mappings.
    flat_expected = {name: _shape_of(leaf) for name, leaf in flatten_params(expected).items()}
    missing = sorted(set(flat_expected) - set(flat_params))
    unexpected = [] if allow_unexpected else sorted(set(flat_params) - set(flat_expected))
    mismatched = [
        f"  {name}: expected {flat_expected[name]}, found {_shape_of(flat_params[name])}"
        for name in sorted(set(flat_expected) & set(flat_params))
        if _shape_of(flat_params[name]) != flat_expected[name]
    ]
    if not (missing or unexpected or mismatched):
        return

    def listing(items: List[str]) -> str:
        shown = items[:max_listed]
        more = f"\n  ... and {len(items) - max_listed} more" if len(items) > max_listed else ""
        return "\n".join(shown) + more

    parts = [f"The {source} do not fit the model:"]
    if mismatched:
        parts.append(f"{len(mismatched)} parameter(s) with the wrong shape:\n{listing(mismatched)}")
    if missing:
        parts.append(
            f"{len(missing)} parameter(s) the model needs are missing:\n"
            + listing([f"  {n} (expected shape {flat_expected[n]})" for n in missing])
        )
    if unexpected:
        parts.append(
            f"{len(unexpected)} parameter(s) the model does not have:\n"
            + listing([f"  {n} (shape {_shape_of(flat_params[n])})" for n in unexpected])
        )
    raise ValueError("\n".join(parts))


# ---------------------------------------------------------------------------------------
# Local and gs:// paths
# ---------------------------------------------------------------------------------------


def _is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def _split_gcs(path: str) -> Tuple[str, str]:
    match = re.fullmatch(r"gs://([^/]+)/?(.*)", path, re.DOTALL)
    if match is None:
        raise ValueError(f"Malformed GCS path {path!r}; expected gs://bucket/path.")
    return match.group(1), match.group(2).strip("/")


def _join(base: str, *parts: str) -> str:
    if _is_gcs(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def _kvstore_spec(path: str) -> Dict[str, Any]:
    """TensorStore key-value store spec of a local or gs:// directory (trailing '/')."""
    if _is_gcs(path):
        bucket, key = _split_gcs(path)
        return {"driver": "gcs", "bucket": bucket, "path": key + "/" if key else ""}
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def _ts():
    # Imported lazily: only checkpoint I/O needs TensorStore.
    import tensorstore

    return tensorstore


def _read_bytes(path: str) -> bytes:
    if not _is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    bucket, key = _split_gcs(path)
    store = _ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    result = store.read(key).result()
    if result.state != "value":
        raise ValueError(f"{path} does not exist.")
    return bytes(result.value)


def _write_bytes(path: str, data: bytes) -> None:
    if not _is_gcs(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    bucket, key = _split_gcs(path)
    store = _ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    store.write(key, data).result()


def _list_keys(directory: str) -> List[str]:
    """All keys (relative paths, recursively) under a local or gs:// directory."""
    store = _ts().KvStore.open(_kvstore_spec(directory)).result()
    return [key.decode() for key in store.list().result()]


def _is_file(path: str) -> bool:
    if not _is_gcs(path):
        return os.path.isfile(path)
    bucket, key = _split_gcs(path)
    store = _ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    return store.read(key).result().state == "value"


def _checkpoint_steps(model_dir: str) -> List[int]:
    """Steps `N` with a complete `model_dir/checkpoint_N/checkpoint` file, ascending."""
    steps = []
    if _is_gcs(model_dir):
        for key in _list_keys(model_dir):
            parts = key.split("/")
            if len(parts) == 2 and parts[1] == _MSGPACK_FILE and _STEP_DIR.match(parts[0]):
                steps.append(int(_STEP_DIR.match(parts[0]).group(1)))
        return sorted(steps)
    if not os.path.isdir(model_dir):
        return []
    for entry in os.listdir(model_dir):
        match = _STEP_DIR.match(entry)
        if match and os.path.isfile(os.path.join(model_dir, entry, _MSGPACK_FILE)):
            steps.append(int(match.group(1)))
    return sorted(steps)


def find_t5x_checkpoint_dir(path: str) -> str:
    """Resolves a checkpoint directory, its `checkpoint` file, or a model directory.

    Args:
      path: `.../checkpoint_<step>` (local or gs://), the `checkpoint` msgpack file in
        it, or a model directory holding `checkpoint_<step>/` subdirectories (the
        latest step is chosen).

    Returns:
      The `checkpoint_<step>` directory.

    Raises:
      ValueError: if `path` does not exist or holds no t5x checkpoint.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"Checkpoint path must be a string, got {path!r}.")
    path = os.fspath(path)
    path = path.rstrip("/") if len(path) > 1 else path
    if os.path.basename(path) == _MSGPACK_FILE and _is_file(path):
        return os.path.dirname(path) if not _is_gcs(path) else path.rsplit("/", 1)[0]
    if _is_file(_join(path, _MSGPACK_FILE)):
        return path
    steps = _checkpoint_steps(path)
    if steps:
        return _join(path, f"checkpoint_{steps[-1]}")
    if not _is_gcs(path) and not os.path.exists(path):
        raise ValueError(f"t5x checkpoint path {path!r} does not exist.")
    raise ValueError(
        f"{path!r} is not a t5x checkpoint: expected a 'checkpoint_<step>' directory "
        f"containing a '{_MSGPACK_FILE}' msgpack file, or a model directory with "
        "'checkpoint_<step>/' subdirectories."
    )


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
        raise ValueError(
            f"Parameter {name!r}: malformed TensorStore spec in the checkpoint msgpack "
            f"(no kvstore path): {spec}."
        )
    if driver not in ("file", "gfile", "gcs"):
        raise ValueError(
            f"Parameter {name!r}: unsupported TensorStore kvstore driver {driver!r}; "
            "expected 'file', 'gfile' or 'gcs'."
        )
    # As in t5x, the stored driver only says where the checkpoint was written; the
    # directory we read from decides between the local and the GCS store.
    spec["kvstore"] = _kvstore_spec(_join(ckpt_dir, relative))
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


def _read_zarr_arrays(specs: Dict[str, Dict[str, Any]], version: int) -> Dict[str, np.ndarray]:
    """Reads {name: absolute spec} concurrently, checking every chunk file exists.

    A zarr array treats a missing chunk file as fill value, which would silently give
    zeros for a partially copied checkpoint; so the chunk keys are listed first.
    """
    ts = _ts()
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
            raise ValueError(
                f"Cannot open the zarr array of parameter {name!r} at {_where(where)}: {e}. "
                "Expected a zarr directory (with a '.zarray' file) next to the checkpoint "
                "msgpack; the checkpoint is incomplete or damaged."
            ) from None
    list_futures = {
        name: ts.KvStore.open(specs[name]["kvstore"], context=context).result().list()
        for name in specs
    }
    for name, future in list_futures.items():
        present = {key.decode() for key in future.result()}
        metadata = opened[name].spec().to_json()["metadata"]
        missing = [k for k in _expected_chunk_keys(metadata) if k not in present]
        if missing:
            raise ValueError(
                f"Parameter {name!r}: chunk file(s) {missing[:5]} missing from "
                f"{_where(specs[name]['kvstore'])} (shape {metadata['shape']} in chunks of "
                f"{metadata['chunks']}); the checkpoint is incomplete."
            )
    read_futures = {name: store.read() for name, store in opened.items()}
    arrays = {}
    for name, future in read_futures.items():
        try:
            array = np.asarray(future.result())
        except Exception as e:
            raise ValueError(
                f"Cannot read parameter {name!r} from {_where(specs[name]['kvstore'])}: {e}. "
                "An array file is damaged or truncated."
            ) from None
        if version < 3 and array.dtype == np.uint16:
            # Version-2 checkpoints stored bfloat16 as its raw 16-bit pattern.
            array = array.view(ml_dtypes.bfloat16)
        arrays[name] = array
    return arrays


def _where(kvstore: Mapping[str, Any]) -> str:
    if kvstore.get("driver") == "gcs":
        return f"gs://{kvstore['bucket']}/{kvstore['path']}"
    return str(kvstore.get("path"))


def _read_msgpack(ckpt_dir: str) -> Dict[str, Any]:
    from flax import serialization

    msgpack_path = _join(ckpt_dir, _MSGPACK_FILE)
    raw = _read_bytes(msgpack_path)
    if raw.startswith(b"model_checkpoint_path"):
        raise ValueError(
            f"{msgpack_path} is a TensorFlow checkpoint index, not a native t5x (msgpack) "
            "checkpoint; convert it with t5x first."
        )
    try:
        contents = serialization.msgpack_restore(raw)
    except Exception as e:
        raise ValueError(
            f"{msgpack_path} is not a valid t5x msgpack checkpoint (truncated or corrupt?): {e}"
        ) from None
    if (
        not isinstance(contents, Mapping)
        or not isinstance(contents.get("optimizer"), Mapping)
        or not isinstance(contents["optimizer"].get("target"), Mapping)
    ):
        keys = sorted(contents) if isinstance(contents, Mapping) else type(contents).__name__
        raise ValueError(
            f"{msgpack_path}: expected a t5x checkpoint {{'version', 'optimizer': "
            f"{{'target', 'state'}}}}, found top-level keys {keys}."
        )
    return contents


def load_t5x_checkpoint(
    path: str,
    *,
    config: T5Config | None = None,
    dtype: Any = np.float32,
) -> Params:
    """Loads the parameters (`optimizer.target`) of a native t5x checkpoint.

    The optimizer state is not read: methods initialise their own.

    Args:
      path: a `checkpoint_<step>` directory, its `checkpoint` file, or a model directory
        (the latest `checkpoint_<step>` is used); local or `gs://`.
      config: if given, the parameters must be exactly those of `Transformer(config)`
        (names and shapes), otherwise a ValueError lists the differences.
      dtype: dtype of the returned arrays (float32 by default, whatever was stored).

    Returns:
      Nested dict of NumPy arrays with t5x's tree (`token_embedder/embedding`, ...).

    Raises:
      ValueError: missing directory, missing/damaged msgpack or array files, or
        parameters that do not fit `config`.
    """
    ckpt_dir = find_t5x_checkpoint_dir(path)
    contents = _read_msgpack(ckpt_dir)
    version = int(np.asarray(contents.get("version", 0)))
    inline: Dict[str, np.ndarray] = {}
    specs: Dict[str, Dict[str, Any]] = {}
    for name, leaf in _walk_leaves(contents["optimizer"]["target"]):
        if _is_ts_spec(leaf):
            specs[name] = _absolute_spec(leaf, ckpt_dir, name)
        elif isinstance(leaf, (np.ndarray, np.generic, int, float)):
            inline[name] = np.asarray(leaf)
        else:
            raise ValueError(
                f"Parameter {name!r} in {ckpt_dir}: expected an array or a TensorStore "
                f"spec, found {type(leaf).__name__}."
            )
    arrays = {**inline, **_read_zarr_arrays(specs, version)}
    params = {name: np.asarray(a, dtype=dtype) for name, a in arrays.items()}
    if config is not None:
        check_params_match(params, t5_param_shapes(config), source=f"t5x checkpoint {ckpt_dir}")
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
    gcs = _is_gcs(directory)
    final_dir = _join(directory, f"checkpoint_{int(step)}")
    if (gcs and _is_file(_join(final_dir, _MSGPACK_FILE))) or (
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

    ts = _ts()
    context = ts.Context({"file_io_concurrency": {"limit": 128}})
    pending = []

    def store(prefix: str, name: str, array: np.ndarray, matrix_leaf: bool) -> Any:
        if not (matrix_leaf or array.nbytes > _INLINE_MAX_BYTES) or array.ndim == 0:
            return array
        relative = ".".join([prefix, *name.split("/")])
        spec = _zarr_spec(relative, array, gcs)
        absolute = dict(spec, kvstore=_kvstore_spec(_join(work_dir, relative)))
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
    _write_bytes(_join(work_dir, _MSGPACK_FILE), data)
    if not gcs:
        os.rename(work_dir, final_dir)
    return final_dir


# ---------------------------------------------------------------------------------------
# Hugging Face T5
# ---------------------------------------------------------------------------------------

# HF `feed_forward_proj` -> t5x `mlp_activations`. HF's "gated-gelu" uses `gelu_new`, the
# tanh approximation, which is flax's `nn.gelu` default (exact erf "gelu" is not).
_HF_TO_T5X_ACTIVATIONS = {
    "relu": ("relu",),
    "gated-relu": ("relu", "linear"),
    "gated-gelu": ("gelu", "linear"),
    "gated-gelu_new": ("gelu", "linear"),
    "gelu_new": ("gelu",),
    "silu": ("silu",),
    "gated-silu": ("silu", "linear"),
}
_T5X_TO_HF_ACTIVATIONS = {
    ("relu",): "relu",
    ("relu", "linear"): "gated-relu",
    ("gelu", "linear"): "gated-gelu",
    ("gelu",): "gelu_new",
    ("silu",): "silu",
    ("silu", "linear"): "gated-silu",
}
_HF_MODEL_TYPES = ("t5", "mt5")
_HF_EMBEDDING_NAMES = (
    "shared.weight",
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
)
# Present in some HF files but carrying nothing t5x needs: the per-stack copies of the
# shared embedding and a cross-attention bias table HF never uses.
_HF_IGNORED = frozenset(
    {
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
    }
)
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _hf_int(hf: Mapping[str, Any], key: str, where: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{where}: '{key}' must be an integer, got {value!r}.")
    return value


def hf_config_to_t5(hf: Mapping[str, Any], where: str = "config.json") -> Tuple[T5Config, bool]:
    """Converts a Hugging Face T5 `config.json` dict.

    Returns:
      `(config, scale_decoder_outputs)`: the T5Config (float32 activations; the output
      layer is `logits_via_embedding` only if HF ties and scales it, decided by the
      caller with the weights) and whether HF multiplies the decoder output by
      d_model**-0.5 before `lm_head`.

    Raises:
      ValueError: for a non-T5 model type or an architecture this network cannot
        express (activation, layer-norm epsilon, decoder-only).
    """
    model_type = hf.get("model_type")
    if model_type not in _HF_MODEL_TYPES:
        extra = (
            " umT5 has a relative attention bias in every layer, which t5x's T5 does not."
            if model_type == "umt5"
            else ""
        )
        raise ValueError(
            f"{where}: model_type {model_type!r} is not supported; expected one of "
            f"{list(_HF_MODEL_TYPES)} (a T5 encoder-decoder).{extra}"
        )
    if hf.get("is_encoder_decoder", True) is False or hf.get("is_decoder", False) is True:
        raise ValueError(f"{where}: expected a T5 encoder-decoder (is_encoder_decoder=true).")
    proj = hf.get("feed_forward_proj", "relu")
    if proj not in _HF_TO_T5X_ACTIVATIONS:
        raise ValueError(
            f"{where}: feed_forward_proj {proj!r} is not supported; expected one of "
            f"{sorted(_HF_TO_T5X_ACTIVATIONS)} (t5x's gelu is the tanh approximation, HF's "
            "'gelu_new'; exact-erf 'gelu' has no t5x equivalent)."
        )
    if "is_gated_act" in hf and bool(hf["is_gated_act"]) != proj.startswith("gated-"):
        raise ValueError(
            f"{where}: is_gated_act={hf['is_gated_act']} contradicts feed_forward_proj {proj!r}."
        )
    epsilon = hf.get("layer_norm_epsilon", 1e-6)
    if not isinstance(epsilon, (int, float)) or abs(float(epsilon) - 1e-6) > 1e-12:
        raise ValueError(
            f"{where}: layer_norm_epsilon {epsilon!r} is not supported; t5x's T5 layer norm "
            "uses 1e-6."
        )
    num_layers = _hf_int(hf, "num_layers", where)
    num_decoder_layers = num_layers
    if hf.get("num_decoder_layers") is not None:
        num_decoder_layers = _hf_int(hf, "num_decoder_layers", where)
    dropout = hf.get("dropout_rate", 0.1)
    if "scale_decoder_outputs" in hf:  # transformers >= 5
        scale = bool(hf["scale_decoder_outputs"])
    else:  # transformers < 5 scaled exactly when the embeddings were tied.
        scale = hf.get("tie_word_embeddings", True) is not False
    try:
        config = T5Config(
            vocab_size=_hf_int(hf, "vocab_size", where),
            dtype="float32",
            emb_dim=_hf_int(hf, "d_model", where),
            num_heads=_hf_int(hf, "num_heads", where),
            num_encoder_layers=num_layers,
            num_decoder_layers=num_decoder_layers,
            head_dim=_hf_int(hf, "d_kv", where),
            mlp_dim=_hf_int(hf, "d_ff", where),
            mlp_activations=_HF_TO_T5X_ACTIVATIONS[proj],
            dropout_rate=float(dropout),
            logits_via_embedding=scale,
            relative_attention_num_buckets=_hf_int(hf, "relative_attention_num_buckets", where, 32),
            relative_attention_max_distance=_hf_int(
                hf, "relative_attention_max_distance", where, 128
            ),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return config, scale


def _hf_name_map(config: T5Config) -> List[Tuple[str, str, bool]]:
    """`(t5x name, HF name, transpose)` for every weight except the output layer."""
    entries: List[Tuple[str, str, bool]] = [("token_embedder/embedding", "shared.weight", False)]
    if len(config.mlp_activations) == 1:
        mlp = ["wi"]
    else:
        mlp = [f"wi_{k}" for k in range(len(config.mlp_activations))]
    mlp.append("wo")
    qkvo = (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))

    def attention(ours: str, theirs: str) -> None:
        for t5x_name, hf_name in qkvo:
            entries.append((f"{ours}/{t5x_name}/kernel", f"{theirs}.{hf_name}.weight", True))

    def mlp_block(ours: str, theirs: str) -> None:
        for name in mlp:
            entries.append(
                (f"{ours}/mlp/{name}/kernel", f"{theirs}.DenseReluDense.{name}.weight", True)
            )

    for i in range(config.num_encoder_layers):
        ours, theirs = f"encoder/layers_{i}", f"encoder.block.{i}.layer"
        attention(f"{ours}/attention", f"{theirs}.0.SelfAttention")
        entries.append(
            (f"{ours}/pre_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", False)
        )
        mlp_block(ours, f"{theirs}.1")
        entries.append((f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.1.layer_norm.weight", False))
    for i in range(config.num_decoder_layers):
        ours, theirs = f"decoder/layers_{i}", f"decoder.block.{i}.layer"
        attention(f"{ours}/self_attention", f"{theirs}.0.SelfAttention")
        entries.append(
            (f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.0.layer_norm.weight", False)
        )
        attention(f"{ours}/encoder_decoder_attention", f"{theirs}.1.EncDecAttention")
        entries.append(
            (f"{ours}/pre_cross_attention_layer_norm/scale", f"{theirs}.1.layer_norm.weight", False)
        )
        mlp_block(ours, f"{theirs}.2")
        entries.append((f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.2.layer_norm.weight", False))
    for stack, layers, norm in (
        ("encoder", config.num_encoder_layers, "encoder_norm"),
        ("decoder", config.num_decoder_layers, "decoder_norm"),
    ):
        if layers:
            # HF keeps the one shared bias table of a stack in its first block, [buckets, heads].
            entries.append(
                (
                    f"{stack}/relpos_bias/rel_embedding",
                    f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    True,
                )
            )
        entries.append((f"{stack}/{norm}/scale", f"{stack}.final_layer_norm.weight", False))
    return entries


def _read_safetensors(path: str) -> Dict[str, np.ndarray]:
    """Reads a safetensors file into NumPy (including bfloat16, which the safetensors
    NumPy backend cannot represent): 8-byte header size, JSON header, raw data."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is truncated (no safetensors header).")
        header_size = int.from_bytes(head, "little")
        if header_size > size - 8:
            raise ValueError(f"{path} is truncated or not a safetensors file.")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as e:
            raise ValueError(f"{path}: unreadable safetensors header: {e}") from None
        data_start = 8 + header_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info.get("dtype") not in _SAFETENSORS_DTYPES:
                raise ValueError(
                    f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}."
                )
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(info["shape"])
            if data_start + end > size:
                raise ValueError(
                    f"{path} is truncated: tensor {name!r} needs bytes up to "
                    f"{data_start + end}, the file has {size}."
                )
            if (end - begin) != math.prod(shape) * dtype.itemsize:
                raise ValueError(
                    f"{path}: tensor {name!r} byte range does not match its shape {shape}."
                )
            f.seek(data_start + begin)
            tensors[name] = np.frombuffer(f.read(end - begin), dtype=dtype).reshape(shape)
    return tensors


def _read_torch_bin(path: str) -> Dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"Reading {path} needs PyTorch (pip install torch), or save the model with "
            "safetensors (save_pretrained(..., safe_serialization=True))."
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"Cannot read PyTorch weights {path} (truncated or corrupt?): {e}"
        ) from None
    return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


def _read_hf_weights(directory: str) -> Dict[str, np.ndarray]:
    single = {"model.safetensors": _read_safetensors, "pytorch_model.bin": _read_torch_bin}
    for filename, reader in single.items():
        index_path = os.path.join(directory, filename + ".index.json")
        path = os.path.join(directory, filename)
        if os.path.isfile(path):
            return reader(path)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, Mapping):
                raise ValueError(f"{index_path} has no 'weight_map'.")
            tensors: Dict[str, np.ndarray] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = os.path.join(directory, shard)
                if not os.path.isfile(shard_path):
                    raise ValueError(f"Shard {shard_path} listed in {index_path} is missing.")
                tensors.update(reader(shard_path))
            absent = sorted(set(weight_map) - set(tensors))
            if absent:
                raise ValueError(
                    f"{index_path} lists tensors absent from its shards: {absent[:10]}."
                )
            return tensors
    raise ValueError(
        f"No weights in {directory}: expected model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json."
    )


def load_hf_t5(path: str) -> Tuple[T5Config, Params]:
    """Loads a Hugging Face T5 (`save_pretrained` directory) as a T5Config and t5x params.

    Supports T5 v1.0 (`relu`, tied and scaled output layer), T5.1.1 / LM-adapted / mT5
    (`gated-gelu`, untied `lm_head`), and the other `feed_forward_proj` values t5x's
    MLP can express.

    Args:
      path: directory with `config.json` and the weights (safetensors or PyTorch,
        optionally sharded with an index file).

    Returns:
      `(config, params)`: float32 activations and the network's parameter tree.

    Raises:
      ValueError: missing directory or files, an unsupported config, missing or
        unexpected weights, or weights whose shapes do not fit `config.json`.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"Hugging Face model directory {path!r} does not exist.")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{path!r} has no config.json; expected a save_pretrained directory.")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    config, scale = hf_config_to_t5(hf_config, where=config_path)
    tensors = _read_hf_weights(path)

    shared = next((n for n in _HF_EMBEDDING_NAMES if n in tensors), None)
    if shared is None:
        raise ValueError(
            f"{path}: no token embedding (expected one of {list(_HF_EMBEDDING_NAMES)})."
        )
    tensors = dict(tensors)
    tensors["shared.weight"] = tensors[shared]

    expected = t5_param_shapes(config.replace(logits_via_embedding=False))
    arch = (
        f"d_model={config.emb_dim}, num_heads={config.num_heads}, d_kv={config.head_dim}, "
        f"d_ff={config.mlp_dim}, vocab_size={config.vocab_size}, "
        f"relative_attention_num_buckets={config.relative_attention_num_buckets}"
    )
    params: Dict[str, np.ndarray] = {}
    missing, wrong = [], []
    used = {"shared.weight", shared}
    for ours, theirs, transpose in _hf_name_map(config):
        if theirs not in tensors:
            missing.append(theirs)
            continue
        used.add(theirs)
        array = np.asarray(tensors[theirs], np.float32)
        want = expected[ours][::-1] if transpose else expected[ours]
        if array.shape != tuple(want):
            wrong.append(f"  {theirs}: found {array.shape}, expected {tuple(want)} (-> {ours})")
            continue
        params[ours] = np.ascontiguousarray(array.T) if transpose else array

    # The output layer: tied means lm_head is absent or equal to the embedding.
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None:
        used.add("lm_head.weight")
        if lm_head.shape != (config.vocab_size, config.emb_dim):
            wrong.append(
                f"  lm_head.weight: found {lm_head.shape}, expected "
                f"{(config.vocab_size, config.emb_dim)}"
            )
    tied = lm_head is None or (
        lm_head.shape == tensors["shared.weight"].shape
        and np.array_equal(lm_head, tensors["shared.weight"])
    )
    if missing or wrong:
        lines = [f"{path}: the weights do not fit config.json ({arch})."]
        if wrong:
            lines.append("Wrong shapes:\n" + "\n".join(wrong[:20]))
        if missing:
            lines.append(f"Missing weights ({len(missing)}): {missing[:20]}")
        raise ValueError("\n".join(lines))
    unexpected = sorted(set(tensors) - used - _HF_IGNORED)
    if unexpected:
        raise ValueError(
            f"{path}: unexpected weights for a T5ForConditionalGeneration with this "
            f"config ({arch}): {unexpected[:20]}"
        )
    if tied and scale:
        config = config.replace(logits_via_embedding=True)
    else:
        # Untied, or tied without scaling (transformers>=5 ties by default): an explicit
        # kernel reproduces HF exactly, with any output scaling folded in.
        head = np.asarray(tensors["shared.weight"] if lm_head is None else lm_head, np.float32)
        factor = config.emb_dim**-0.5 if scale else 1.0
        params["decoder/logits_dense/kernel"] = np.ascontiguousarray(head.T * np.float32(factor))
        config = config.replace(logits_via_embedding=False)
    return config, unflatten_params(params)


def save_hf_t5(config: T5Config, params: Mapping[str, Any], path: str) -> str:
    """Writes `params` as a Hugging Face `T5ForConditionalGeneration` directory.

    `config.json` (both the transformers<5 `tie_word_embeddings` and the >=5
    `scale_decoder_outputs` conventions), `generation_config.json` (start token 0,
    eos 1, pad 0) and `model.safetensors` (float32).

    Args:
      config: the network's T5Config.
      params: its parameter tree (backbone only: method parameters have no HF place).
      path: output directory (created).

    Returns:
      `path`.

    Raises:
      ValueError: if `params` do not fit `config`, or the activations have no HF name.
    """
    import safetensors.numpy

    activations = tuple(config.mlp_activations)
    if activations not in _T5X_TO_HF_ACTIVATIONS:
        raise ValueError(
            f"mlp_activations {activations} have no Hugging Face feed_forward_proj; "
            f"supported: {sorted(_T5X_TO_HF_ACTIVATIONS)}."
        )
    check_params_match(params, t5_param_shapes(config), source="parameters to export")
    flat = {name: np.asarray(value, np.float32) for name, value in flatten_params(params).items()}
    tensors = {}
    for ours, theirs, transpose in _hf_name_map(config):
        tensors[theirs] = np.ascontiguousarray(flat[ours].T if transpose else flat[ours])
    if not config.logits_via_embedding:
        tensors["lm_head.weight"] = np.ascontiguousarray(flat["decoder/logits_dense/kernel"].T)
    hf_config = {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": _T5X_TO_HF_ACTIVATIONS[activations],
        "dropout_rate": float(config.dropout_rate),
        "layer_norm_epsilon": 1e-6,
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "use_cache": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "scale_decoder_outputs": bool(config.logits_via_embedding),
        "torch_dtype": "float32",
    }
    generation_config = {"decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump(generation_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(
        tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"}
    )
    return path
