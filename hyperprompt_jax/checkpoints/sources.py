"""Lazy weight sources: names, shapes and dtypes first; arrays read straight into shardings.

A `WeightSource` describes a checkpoint's parameters without reading them (`tensors`:
flat name -> `Tensor(shape, dtype, read)`), so a model can check that they fit and
lay out its shardings before any byte is read. `WeightSource.load` then builds each
requested parameter as a global `jax.Array` with `jax.make_array_from_callback`: the
callback is called for the devices of this process only, and reads only the slice a
device holds (once per distinct slice, cast to the target dtype on the fly). A host
therefore never holds more than one parameter's local slices beyond the final state.

Formats that cannot read a slice (PyTorch `.bin`, arrays inline in a t5x msgpack)
read the whole array, once per process; `Tensor.whole_read` says so.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

Index = Tuple[slice, ...]


@dataclasses.dataclass
class Tensor:
    """One stored parameter.

    Attributes:
      shape: its full (global) shape.
      dtype: its stored dtype.
      read: `index -> np.ndarray` of `array[index]` (a tuple of slices, one per axis).
      whole_read: the format reads the whole array whatever the index.
    """

    shape: Tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Index], np.ndarray]
    whole_read: bool = False


class WeightSource:
    """A checkpoint's parameters, read lazily.

    Attributes:
      description: what and where it is (for messages), e.g. `t5x checkpoint /ckpt`.
      tensors: flat '/'-joined names -> `Tensor`.
      bytes_read: bytes this process has read so far (after casting to the stored
        dtype; for benchmarks and tests).
    """

    def __init__(self, description: str, tensors: Mapping[str, Tensor]):
        self.description = description
        self.tensors = dict(tensors)
        self.bytes_read = 0
        self._lock = threading.Lock()

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Flat `{name: shape}` (nothing is read)."""
        return {name: t.shape for name, t in self.tensors.items()}

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += int(nbytes)

    def load(
        self,
        targets: Mapping[str, Tuple[jax.sharding.Sharding, Any]],
    ) -> Dict[str, jax.Array]:
        """Reads `{name: (sharding, dtype)}` into global arrays with those shardings.

        Each process reads only the slices of its own devices, each distinct slice once.
        """
        out = {}
        for name, (sharding, dtype) in targets.items():
            tensor = self.tensors[name]
            out[name] = self._load_one(name, tensor, sharding, np.dtype(dtype))
        return out

    def _load_one(self, name, tensor: Tensor, sharding, dtype) -> jax.Array:
        cache: Dict[Any, np.ndarray] = {}
        whole: list = []

        def callback(index: Index) -> np.ndarray:
            index = _normalise(index, tensor.shape)
            key = tuple((s.start, s.stop) for s in index)
            if key not in cache:
                if tensor.whole_read:
                    if not whole:
                        array = tensor.read(tuple(slice(0, d) for d in tensor.shape))
                        self._count(array.nbytes)
                        whole.append(array)
                    part = whole[0][index]
                else:
                    part = tensor.read(index)
                    self._count(part.nbytes)
                cache[key] = np.asarray(part, dtype=dtype)
            return cache[key]

        array = jax.make_array_from_callback(tuple(tensor.shape), sharding, callback)
        return array


def _normalise(index: Index, shape: Tuple[int, ...]) -> Index:
    """Explicit `slice(start, stop)` per axis (JAX passes `slice(None)` for whole axes)."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape, strict=True))


def array_source(
    params: Mapping[str, Any], description: str = "parameters in memory"
) -> WeightSource:
    """A `WeightSource` over arrays already in memory (nested or flat dict)."""
    from hyperprompt_jax.checkpoints.trees import flatten_params

    tensors = {}
    for name, value in flatten_params(params).items():
        if not hasattr(value, "shape"):
            value = np.asarray(value)
        tensors[name] = Tensor(
            tuple(value.shape),
            np.dtype(value.dtype),
            lambda index, v=value: np.asarray(v[index]),
        )
    return WeightSource(description, tensors)


def gathered(source: WeightSource, names: Optional[list] = None) -> Dict[str, np.ndarray]:
    """Whole NumPy arrays of `names` (default: all), in their stored dtypes, on the host.

    For small trees, tests and exporters; models load with `WeightSource.load`.
    """
    names = list(source.tensors) if names is None else list(names)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    loaded = source.load({name: (cpu, source.tensors[name].dtype) for name in names})
    return {name: np.asarray(array) for name, array in loaded.items()}


class MergedSource(WeightSource):
    """Several sources as one (names must not overlap); `load` asks each its own names."""

    def __init__(self, description: str, parts: Sequence[WeightSource]):
        self.parts = list(parts)
        tensors: Dict[str, Tensor] = {}
        self._owner: Dict[str, WeightSource] = {}
        for part in self.parts:
            for name, tensor in part.tensors.items():
                tensors[name] = tensor
                self._owner[name] = part
        super().__init__(description, tensors)

    @property
    def bytes_read(self) -> int:  # type: ignore[override]
        return sum(part.bytes_read for part in self.parts)

    @bytes_read.setter
    def bytes_read(self, value: int) -> None:
        del value  # the parts count

    def load(self, targets):
        out = {}
        for part in self.parts:
            mine = {k: v for k, v in targets.items() if self._owner[k] is part}
            if mine:
                out.update(part.load(mine))
        return out
