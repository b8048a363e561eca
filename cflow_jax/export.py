"""A trained detector as one portable file: its whole scoring function serialised with `jax.export`.

    cf.export(detector, "detector.jaxexport")           # or: experiments/export.py --workdir=RUN
    scorer = cf.load_exported("detector.jaxexport")     # jax and numpy only: no Flax module, no Config
    scores, maps = scorer.score(images)                 # uint8 (N, S, S, 3) at the trained size

The file is a zip archive, stored uncompressed, of
  header.json          format and version, image size and type, resizing filter, batch size, platforms,
                       the image threshold if known, and the run's config (for information only);
  scoring.jaxexport    `Exported.serialize()`: StableHLO of (weights, images) -> (scores, maps), the
                       encoder, the flows, the fixed normalisation, the upsampling and the blur, with a
                       symbolic batch dimension, lowered for every platform of the header at once;
  weights/NNNNN.npy    the program's weights, in the order it takes them.
The weights sit beside the program rather than inside it as constants: the StableHLO stays a few MB however
large the encoder (WRN-50-2's are 270 MB), numpy reads them without JAX, and they go to the device once,
when the file is loaded.

Where the CPU and accelerators take different paths (Winograd convolutions, image-by-image encoding, blocks
of fibers, `score_dtype="auto"`), the program holds both and each platform compiles its own
(`cflow_jax.platforms`); "auto" on the CPU is the exporting CPU's choice.
"""

import json
import os
import pathlib
import zipfile

import jax
import numpy as np

from cflow_jax.anomaly_map import Normalization, anomaly_maps
from cflow_jax.errors import UserError

FORMAT = "cflow_jax.exported_detector"
FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda", "tpu")
_HEADER, _PROGRAM, _WEIGHTS = "header.json", "scoring.jaxexport", "weights/"
_EXPORT_NAMES = {"gpu": ("cuda", "rocm")}  # JAX's backend name -> jax.export's platform names
_IMAGE_DTYPES = {"uint8": np.uint8, "float32": np.float32}  # config.image_dtype -> what the program takes


def scoring_program(model, weights, platforms=PLATFORMS) -> jax.export.Exported:
  """`jax.export` of images (B, S, S, 3) -> (scores (B,), maps (B, S, S)) for `model`'s config, B symbolic.

  `weights` = (encoder_variables, params, permutations, Normalization): arrays, or only their shapes
  (`jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`), for lowering without any trained weights. The
  program takes them as a flat list, in `jax.tree.leaves` order, then the images.
  """
  config = model.config
  leaves, treedef = jax.tree.flatten(weights)
  from cflow_jax import model as model_lib  # here: loading a file needs none of the model code

  def score(weight_leaves, images):
    encoder_variables, params, permutations, normalization = jax.tree.unflatten(treedef, weight_leaves)
    # A symbolic batch: the CPU's fiber blocks are sized for the run's batch, as `cf.score` runs it.
    log_probs = model_lib.local_log_probs(model, encoder_variables, params, permutations, images,
                                          block_images=config.batch_size)
    maps, scores = anomaly_maps(log_probs, config.image_size, Normalization(*normalization),
                                config.blur_sigma, config.likelihood)
    return scores, maps

  batch, = jax.export.symbolic_shape("b")
  size = config.image_size
  images = jax.ShapeDtypeStruct((batch, size, size, 3), _IMAGE_DTYPES[config.image_dtype])
  specs = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
  return jax.export.export(jax.jit(score), platforms=tuple(platforms))(specs, images)


def export(detector, path, *, platforms=PLATFORMS, normalization: str | None = None,
           image_threshold: float | None = None) -> pathlib.Path:
  """Writes `detector`'s scoring function and weights to one file at `path` (see the module's docstring).

  Only maxima fixed from the training images make sense in a file that scores any batch: a detector whose
  config normalises otherwise ("test_set", "batch") is refused unless `normalization="train"` is given, which
  exports its training maxima (every trained detector has them). `image_threshold` (e.g. metrics.json's) is
  kept in the header for the scorer's verdicts.
  """
  config = detector.config
  mode = normalization or config.normalization
  if mode != "train":
    raise UserError(f"only normalization 'train' (maxima fixed from the training images) can be exported, "
                    f"this run scores with '{mode}': export with --normalization=train to use its training "
                    f"maxima")
  weights = jax.device_get((detector.encoder_variables, detector.params, detector.permutations,
                            tuple(detector.normalization)))
  program = scoring_program(detector.model, weights, platforms)
  leaves = [np.asarray(x) for x in jax.tree.leaves(weights)]
  header = {
      "format": FORMAT, "format_version": FORMAT_VERSION, "image_size": config.image_size,
      "image_dtype": config.image_dtype, "resample": config.resample, "batch_size": config.batch_size,
      "platforms": list(program.platforms), "weights": len(leaves), "image_threshold": image_threshold,
      "jax_version": jax.__version__, "config": json.loads(config.to_json()),
  }
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")  # never a half-written file under the final name
  with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(_HEADER, json.dumps(header, indent=2))
    archive.writestr(_PROGRAM, bytes(program.serialize()))
    for i, leaf in enumerate(leaves):
      with archive.open(f"{_WEIGHTS}{i:05d}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, leaf, allow_pickle=False)
  os.replace(partial, path)
  return path


class ExportedDetector:
  """A detector loaded from an exported file: `score(images)` and the header's fields."""

  def __init__(self, header: dict, program, weights: list):
    self.header = header
    self._weights = jax.device_put(weights)  # once, not per call
    self._call = jax.jit(program.call)  # compiled once per batch size

  image_size = property(lambda self: self.header["image_size"])
  image_dtype = property(lambda self: self.header["image_dtype"])
  resample = property(lambda self: self.header["resample"])
  image_threshold = property(lambda self: self.header.get("image_threshold"))

  def score(self, images, batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (N,) and anomaly maps (N, S, S) of images (N, S, S, 3) of the header's size and type,
    `batch_size` at a time (default: the run's). A short last batch is padded to the others' size, so that
    it runs the same compiled program (each image is scored alone: the maxima are fixed)."""
    images = np.asarray(images)
    size, dtype = self.image_size, self.image_dtype
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != _IMAGE_DTYPES[dtype]:
      raise UserError(f"this detector scores {dtype} images (N, {size}, {size}, 3); got {images.dtype} "
                      f"{images.shape}")
    batch_size = min(batch_size or self.header["batch_size"], len(images))
    from cflow_jax.runtime import pad_batch  # here, as the model code in `scoring_program`
    scores, maps = [], []
    for start in range(0, len(images), batch_size):
      x = images[start:start + batch_size]
      n = len(x)
      s, m = self._call(self._weights, pad_batch(x, batch_size))
      scores.append(np.asarray(s)[:n]), maps.append(np.asarray(m)[:n])
    return np.concatenate(scores), np.concatenate(maps)


def read_header(path) -> dict:
  """The header of an exported file, checked: a UserError for a file that is not one, or from a newer
  format."""
  try:
    with zipfile.ZipFile(path) as archive:
      header = json.loads(archive.read(_HEADER))
  except (OSError, zipfile.BadZipFile, KeyError, ValueError) as error:
    raise UserError(f"{path} is not an exported cflow_jax detector ({error})") from error
  if header.get("format") != FORMAT:
    raise UserError(f"{path} is not an exported cflow_jax detector (format {header.get('format')!r})")
  if header.get("format_version", 0) > FORMAT_VERSION:
    raise UserError(f"{path} has format version {header['format_version']}, newer than this cflow_jax reads "
                    f"({FORMAT_VERSION}): update cflow_jax")
  return header


def load_exported(path, image_size: int | None = None) -> ExportedDetector:
  """An exported detector, ready to score on this process's default platform. Reads only the file (jax and
  numpy): no Flax module is built and no Config read. With `image_size`, a file for another size is
  refused."""
  header = read_header(path)
  if image_size is not None and header["image_size"] != image_size:
    raise UserError(f"{path} scores {header['image_size']} px images, not {image_size} px")
  platform = jax.default_backend()
  if not set(_EXPORT_NAMES.get(platform, (platform,))) & set(header["platforms"]):
    raise UserError(f"{path} was exported for {', '.join(header['platforms'])}, not for {platform}: "
                    f"export it again with that platform")
  with zipfile.ZipFile(path) as archive:
    try:
      program = jax.export.deserialize(bytearray(archive.read(_PROGRAM)))
    except (ValueError, RuntimeError) as error:  # e.g. a serialisation newer than this JAX reads
      raise UserError(f"{path} was exported with jax {header.get('jax_version')}, whose program jax "
                      f"{jax.__version__} cannot read: {str(error).splitlines()[0]}") from None
    weights = []
    for i in range(header["weights"]):
      with archive.open(f"{_WEIGHTS}{i:05d}.npy") as f:
        weights.append(np.lib.format.read_array(f, allow_pickle=False))
  return ExportedDetector(header, program, weights)
