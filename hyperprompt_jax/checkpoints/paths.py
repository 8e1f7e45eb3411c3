"""Local and `gs://` paths for checkpoint I/O, through TensorStore's key-value stores.

No TensorFlow is needed: local paths use the OS, `gs://` paths TensorStore's `gcs`
driver.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Tuple


def is_gcs(path: str) -> bool:
    return path.startswith("gs://")


def split_gcs(path: str) -> Tuple[str, str]:
    match = re.fullmatch(r"gs://([^/]+)/?(.*)", path, re.DOTALL)
    if match is None:
        raise ValueError(f"Malformed GCS path {path!r}; expected gs://bucket/path.")
    return match.group(1), match.group(2).strip("/")


def join(base: str, *parts: str) -> str:
    if is_gcs(base):
        return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
    return os.path.join(base, *parts)


def kvstore_spec(path: str) -> Dict[str, Any]:
    """TensorStore key-value store spec of a local or gs:// directory (trailing '/')."""
    if is_gcs(path):
        bucket, key = split_gcs(path)
        return {"driver": "gcs", "bucket": bucket, "path": key + "/" if key else ""}
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


def ts():
    # Imported lazily: only checkpoint I/O needs TensorStore.
    import tensorstore

    return tensorstore


def read_bytes(path: str) -> bytes:
    if not is_gcs(path):
        with open(path, "rb") as f:
            return f.read()
    bucket, key = split_gcs(path)
    store = ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    result = store.read(key).result()
    if result.state != "value":
        raise ValueError(f"{path} does not exist.")
    return bytes(result.value)


def write_bytes(path: str, data: bytes) -> None:
    if not is_gcs(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    bucket, key = split_gcs(path)
    store = ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    store.write(key, data).result()


def list_keys(directory: str) -> List[str]:
    """All keys (relative paths, recursively) under a local or gs:// directory."""
    store = ts().KvStore.open(kvstore_spec(directory)).result()
    return [key.decode() for key in store.list().result()]


def is_file(path: str) -> bool:
    if not is_gcs(path):
        return os.path.isfile(path)
    bucket, key = split_gcs(path)
    store = ts().KvStore.open({"driver": "gcs", "bucket": bucket}).result()
    return store.read(key).result().state == "value"


def isdir(path: str) -> bool:
    """True for an existing local directory or a `gs://` prefix with keys under it."""
    if not is_gcs(path):
        return os.path.isdir(path)
    return bool(list_keys(path))


def listdir(path: str) -> List[str]:
    """Names of the entries directly inside a local directory or `gs://` prefix."""
    if not is_gcs(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    return sorted({key.split("/", 1)[0] for key in list_keys(path)})


def exists(path: str) -> bool:
    """True for an existing file or directory (local or `gs://`)."""
    if not is_gcs(path):
        return os.path.exists(path)
    return is_file(path) or isdir(path)
