"""Weight files read into {name: numpy array} without torch or TensorFlow.

  - PyTorch `.pth` (the zip format of torch >= 1.6, and the older "legacy" format that torchvision's
    wide_resnet50_2 checkpoint still uses) through a restricted unpickler that builds numpy arrays and
    refuses anything that is not tensors in dicts;
  - `.safetensors`, parsed directly (8-byte header length, JSON header, raw little-endian data);
  - HED's Keras `.h5`, through h5py.
"""

import collections
import dataclasses
import io
import json
import pathlib
import pickle
import struct
import zipfile

import jax.numpy as jnp
import numpy as np

from cflow_jax.errors import UserError


def read_torch(path) -> dict[str, np.ndarray]:
  """The state dict in a PyTorch checkpoint (zip or legacy format), as numpy arrays, without torch."""
  path = pathlib.Path(path)
  try:
    if zipfile.is_zipfile(path):
      tree, storages = _read_torch_zip(path)
    else:
      tree, storages = _read_torch_legacy(path)
    state = _unwrap_state_dict(tree, path)
    return {name: _build_tensor(ref, storages, path, name) for name, ref in state.items()}
  except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, struct.error, ValueError,
          TypeError, IndexError) as e:
    raise UserError(f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {e}). Download "
                    "it again or check the file.") from e


@dataclasses.dataclass(frozen=True)
class _Storage:
  """A pickled storage reference; its bytes sit elsewhere in the file."""
  key: str
  dtype: np.dtype
  numel: int


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """What torch._utils._rebuild_tensor_v2 would build, before the storages are read."""
  storage: _Storage
  offset: int
  shape: tuple
  stride: tuple


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": jnp.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# The legacy format's first pickle, torch.serialization.MAGIC_NUMBER.
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles a PyTorch checkpoint into dicts of `_Tensor`, and nothing else.

  Unpickling may call any global a file names, so only the few a state dict needs are resolved, each to a
  harmless stand-in; any other global is refused.
  """

  def __init__(self, file, source):
    super().__init__(file)
    self._source = source

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return np.dtype(_STORAGE_DTYPES[name])
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return lambda data, *unused: data  # a Parameter is its tensor here
    raise UserError(f"{self._source} refers to {module}.{name}, which a weights file does not need; refusing "
                    "to unpickle it, since unpickling can run arbitrary code. Only tensors in dicts load.")

  def persistent_load(self, pid):
    # ("storage", dtype, key, location, numel), plus view metadata in the legacy format.
    if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage")
            and isinstance(pid[1], np.dtype) and (len(pid) == 5 or pid[5] is None)):
      raise UserError(f"{self._source} holds an unsupported object reference {pid!r}.")
    key = pid[2].decode() if isinstance(pid[2], bytes) else str(pid[2])
    return _Storage(key, pid[1], int(pid[4]))


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  """Stands in for torch._utils._rebuild_tensor_v2 (the rest of its arguments are autograd state)."""
  if not (isinstance(storage, _Storage) and len(shape) == len(stride)
          and all(isinstance(n, int) for n in (offset, *shape, *stride))):
    raise ValueError("malformed tensor record")
  return _Tensor(storage, offset, tuple(shape), tuple(stride))


def _read_torch_zip(path):
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"expected one data.pkl, found {len(pickles)}")
    prefix = pickles[0][:-len("data.pkl")]
    names = set(archive.namelist())
    big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") == b"big"
    tree = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), path).load()
    storages = {}
    for storage in _storages(tree):
      raw = archive.read(f"{prefix}data/{storage.key}")
      storages[storage.key] = _storage_array(raw, storage, big_endian)
  return tree, storages


def _read_torch_legacy(path):
  with open(path, "rb") as f:
    if _TorchUnpickler(f, path).load() != _LEGACY_MAGIC:
      raise ValueError("not a PyTorch checkpoint: no zip archive and no legacy magic number")
    _TorchUnpickler(f, path).load()  # protocol version
    sys_info = _TorchUnpickler(f, path).load()
    if not isinstance(sys_info, dict):
      raise ValueError("malformed legacy header")
    tree = _TorchUnpickler(f, path).load()
    keys = _TorchUnpickler(f, path).load()
    by_key = {s.key: s for s in _storages(tree)}
    storages = {}
    for key in keys:
      storage = by_key[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      if numel != storage.numel:
        raise ValueError(f"storage {key} holds {numel} elements, expected {storage.numel}")
      raw = f.read(numel * storage.dtype.itemsize)
      storages[storage.key] = _storage_array(raw, storage, not sys_info.get("little_endian", True))
  return tree, storages


def _storages(tree):
  if isinstance(tree, dict):
    for value in tree.values():
      yield from _storages(value)
  elif isinstance(tree, _Tensor):
    yield tree.storage


def _storage_array(raw, storage, big_endian):
  dtype = storage.dtype.newbyteorder(">" if big_endian else "<")
  if len(raw) != storage.numel * dtype.itemsize:
    raise ValueError(f"storage {storage.key} has {len(raw)} bytes, expected {storage.numel * dtype.itemsize}")
  return np.frombuffer(raw, dtype).astype(storage.dtype, copy=False)


def _unwrap_state_dict(tree, path):
  """The {name: tensor} dict, also when wrapped as {"state_dict": ...} or {"model": ...}."""
  if isinstance(tree, dict):
    for key in ("state_dict", "model"):
      if isinstance(tree.get(key), dict):
        tree = tree[key]
    if all(isinstance(v, _Tensor) for v in tree.values()):
      return tree
  raise UserError(f"{path} does not hold a state dict of tensors.")


def _build_tensor(tensor, storages, path, name):
  data = storages[tensor.storage.key]
  if any(n == 0 for n in tensor.shape):
    return np.zeros(tensor.shape, data.dtype)
  last = tensor.offset + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride))
  # as_strided reads raw memory: a corrupt file must not point outside its storage.
  if tensor.offset < 0 or min(tensor.stride, default=0) < 0 or last >= data.size:
    raise UserError(f"{path} is corrupt: tensor {name} lies outside its storage.")
  view = np.lib.stride_tricks.as_strided(data[tensor.offset:], tensor.shape,
                                         [s * data.itemsize for s in tensor.stride])
  return np.array(view)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file: u64 header length, JSON header, then raw little-endian data."""
  path = pathlib.Path(path)
  size = path.stat().st_size
  try:
    with open(path, "rb") as f:
      (header_size,) = struct.unpack("<Q", f.read(8))
      if header_size > size - 8:
        raise ValueError(f"header of {header_size} bytes in a {size}-byte file")
      header = json.loads(f.read(header_size))
      start = 8 + header_size
      tensors = {}
      for name, info in header.items():
        if name == "__metadata__":
          continue
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(info["shape"])) * dtype.itemsize or start + end > size:
          raise ValueError(f"tensor {name} does not fit the file")
        f.seek(start + begin)
        raw = f.read(end - begin)
        tensor = np.frombuffer(raw, dtype.newbyteorder("<")).astype(dtype, copy=False)
        tensors[name] = tensor.reshape(info["shape"])
      return tensors
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise UserError(f"{path} is truncated or not a safetensors file ({type(e).__name__}: {e}). Download it "
                    "again or check the file.") from e


def read_h5(path) -> dict[str, np.ndarray]:
  """Every dataset of an HDF5 file, by its full path."""
  import h5py  # pylint: disable=import-outside-toplevel  (only HED needs it)

  datasets = {}
  try:
    with h5py.File(path, "r") as f:
      f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                   else None)
  except OSError as e:
    raise UserError(f"{path} is truncated or not an HDF5 file ({e}).") from e
  return datasets
