"""Reads `torch.save` state dicts (pytorch_model.bin) into numpy without importing torch.

Pickles can run arbitrary code, so the unpickler admits only the few globals a
zip-format state dict of tensors needs (the tensor rebuild function, typed
storage classes and `collections.OrderedDict`); anything else is refused
before it is called.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

_SAFETENSORS_HINT = "convert the checkpoint to safetensors (model.safetensors) instead"

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references something other than tensors and state-dict containers."""


class _StorageType:
  """What `torch.<Type>Storage` unpickles to: just the element dtype."""

  def __init__(self, dtype: Any):
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], requires_grad: bool, backward_hooks: Any,
                    metadata: Any = None) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` for numpy: a bounds-checked strided copy."""
  del requires_grad, backward_hooks, metadata
  offset, size, stride = int(offset), tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in stride):
    raise pickle.UnpicklingError(f"invalid tensor layout: size {size}, stride {stride}")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} reads past its storage of "
                                 f"{storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad: bool, backward_hooks: Any) -> np.ndarray:
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickles tensors from a torch zip archive, refusing every other global."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, big_endian: bool):
    super().__init__(io.BytesIO(data))
    self._archive, self._root, self._big_endian = archive, root, big_endian
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if (module, name) in _ALLOWED_GLOBALS:
      return _ALLOWED_GLOBALS[(module, name)]
    raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: only plain tensor "
                            f"state dicts are read; {_SAFETENSORS_HINT}")

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise UnsafePickleError(f"unsupported persistent id {pid!r}; {_SAFETENSORS_HINT}")
    _, storage_type, key, _, numel = pid
    if key not in self._storages:
      dtype = storage_type.dtype
      if self._big_endian:
        dtype = dtype.newbyteorder(">")
      raw = self._archive.read(f"{self._root}data/{key}")
      if len(raw) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f"storage {key} is truncated")
      self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
    return self._storages[key]


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a zip-format `torch.save` file of a flat `{name: tensor}` dict as numpy arrays.

  Raises:
    UnsafePickleError: the file needs anything beyond tensors and state-dict containers.
    pickle.UnpicklingError: the file is not a readable torch zip archive.
  """
  if not zipfile.is_zipfile(path):
    raise pickle.UnpicklingError(f"not a zip-format torch checkpoint (the legacy torch.save "
                                 f"format is not read); {_SAFETENSORS_HINT}")
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
    if len(pickles) != 1:
      raise pickle.UnpicklingError(f"expected one data.pkl in the archive, found {len(pickles)}")
    root = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    big_endian = (f"{root}byteorder" in names
                  and archive.read(f"{root}byteorder").strip() == b"big")
    state = _RestrictedUnpickler(archive.read(pickles[0]), archive, root, big_endian).load()
  if not isinstance(state, dict) or not all(
      isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
    raise pickle.UnpicklingError("the pickle is not a flat {name: tensor} state dict")
  return dict(state)
