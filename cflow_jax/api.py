"""The functional API: create, fit, score, evaluate, load. The command line and the tests use these.

    import cflow_jax as cf
    config = cf.Config(backbone="vgg16_hed", image_size=128, meta_epochs=1, sub_epochs=2)
    detector = cf.fit(config, cf.data.load("demo", "train", "brick"))
    result = cf.evaluate(detector, cf.data.load("demo", "test", "brick"))
    result.metrics["image_auroc"], result.maps.shape   # (N, 128, 128)
"""

import dataclasses
import time
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from cflow_jax import checkpoint, data, metrics, model as model_lib, runtime, train, weights
from cflow_jax.anomaly_map import Normalization, compiled_maps
from cflow_jax.config import Config
from cflow_jax.errors import UserError


@dataclasses.dataclass
class Detector:
  """A trained CFLOW: the static model, the frozen encoder's variables, the decoders, the normalisation."""
  model: model_lib.Model
  encoder_variables: dict
  params: tuple
  permutations: tuple
  normalization: Normalization
  history: dict = dataclasses.field(default_factory=dict)

  @property
  def config(self) -> Config:
    return self.model.config


class Scores(NamedTuple):
  scores: np.ndarray  # (N,) image scores: the max of each anomaly map
  maps: np.ndarray  # (N, S, S) anomaly maps at input resolution, float32


class Evaluation(NamedTuple):
  metrics: dict
  scores: np.ndarray
  maps: np.ndarray
  labels: np.ndarray
  masks: np.ndarray | None
  filenames: list


def create(config: Config, encoder_variables=None) -> tuple[model_lib.Model, dict]:
  """The model and its frozen encoder variables, loaded from `config.weights` unless given."""
  model = model_lib.build(config)
  if encoder_variables is None:
    encoder_variables = weights.load_encoder_variables(config.backbone, config.weights)
  return model, encoder_variables


def _identity(config: Config, encoder_variables, train_set=None) -> dict:
  identity = {"backbone": config.backbone, "weights": config.weights or "default",
              "encoder_fingerprint": checkpoint.fingerprint(encoder_variables)}
  if train_set is not None:
    identity["dataset"] = f"{getattr(train_set, 'name', '?')}/{getattr(train_set, 'category', '?')}"
    identity["train_images"] = len(train_set)
  return identity


def fit(config: Config, train_set, *, encoder_variables=None, workdir=None, progress=True,
        log=print) -> Detector:
  """Trains the decoders on `train_set` (good images only) and fixes the normalisation from it.

  `train_set` is a `cflow_jax.data` image set. With a `workdir`, every epoch is checkpointed and an
  interrupted run resumes where it stopped, with the same result as an uninterrupted one.
  """
  if len(train_set) == 0:
    raise UserError("the training set is empty: it needs defect-free images in train/good")
  if workdir is not None:
    checkpoint.check_writable(workdir)  # now, not after the first epoch's training
  model, encoder_variables = create(config, encoder_variables)
  if config.epochs > 1 and hasattr(train_set, "resized"):
    # Decode and resize once, not every epoch.
    train_set = resized(config, train_set)
  batch_size = min(config.batch_size, len(train_set))
  batches_per_epoch = (len(train_set) // batch_size if config.drop_last_batch
                       else -(-len(train_set) // batch_size))

  if config.cache_features:
    train_batches = _cached_feature_batches(model, encoder_variables, train_set, batch_size)
  else:
    def train_batches(epoch):
      for batch in input_batches(config, train_set, batch_size, seed=config.seed, epoch=epoch,
                                rotation=config.rotation, drop_remainder=config.drop_last_batch):
        yield batch["image"]

  identity = _identity(config, encoder_variables, train_set)
  state, history = train.fit(model, encoder_variables, train_batches, batches_per_epoch, workdir=workdir,
                             meta=identity, progress=progress, log=log)
  began = time.perf_counter()
  normalization = fixed_normalization(model, encoder_variables, state.params, state.permutations, train_set,
                                      progress)
  history["normalization_seconds"] = time.perf_counter() - began
  state = state._replace(normalization=normalization)
  if workdir is not None:
    train.save_final(workdir, state, config, identity, history)
  return Detector(model, encoder_variables, state.params, state.permutations, normalization, history)


def fixed_normalization(model, encoder_variables, params, permutations, train_set, progress=False):
  """The normalisation a trained detector keeps: with `normalization="train"`, the maxima over
  `normalization_subset` of its training images; otherwise none (`train.unset_normalization`)."""
  config = model.config
  if config.normalization != "train":
    return train.unset_normalization(len(model.channels))
  subset = normalization_subset(config, train_set)
  batches = input_batches(config, subset, config.batch_size)
  return train.fit_normalization(
      model, encoder_variables, params, permutations,
      (b["image"] for b in _bar(batches, subset, config.batch_size, "normalisation", progress)),
      batch_size=config.batch_size)  # scoring's batch: the pass runs the program scoring runs next


def normalization_subset(config: Config, train_set):
  """The training images that fix the normalisation: all of them, or `config.normalization_images` evenly
  spaced over the set, so that the pass costs a bounded share of training (docs/design.md section 7.2)."""
  n, k = len(train_set), config.normalization_images
  if not k or k >= n:
    return train_set
  return train_set.subset(np.linspace(0, n - 1, k).round())


def _cached_feature_batches(model, encoder_variables, train_set, batch_size):
  """Encodes every training image once; each epoch then batches the stored features in the order the
  input pipeline would have used for that epoch."""
  config = model.config
  parts = [jax.device_get(model_lib.encode(model, encoder_variables, b["image"]))
           for b in input_batches(config, train_set, batch_size)]
  features = tuple(np.concatenate(layer) for layer in zip(*parts))  # per layer (N, h, w, C), file order

  def batches(epoch):
    order, _ = data.input_pipeline.epoch_plan(len(train_set), config.seed, epoch, 0.0)
    last = len(order) - batch_size + 1 if config.drop_last_batch else len(order)
    for start in range(0, last, batch_size):
      idx = order[start:start + batch_size]
      yield tuple(f[idx] for f in features)

  return batches


def load(workdir, encoder_variables=None) -> Detector:
  """A trained detector from a workdir's latest checkpoint (which must hold a finished run)."""
  meta = checkpoint.read_meta(workdir)
  if not meta.get("normalized"):
    raise UserError(f"the run in {workdir} did not finish (stopped after epoch {meta.get('epoch')}): "
                    "run train.py again with the same --workdir to resume it")
  config = checkpoint.config_from_meta(meta)
  model, encoder_variables = create(config, encoder_variables)
  checkpoint.check_same_run(meta, identity={"encoder_fingerprint": checkpoint.fingerprint(encoder_variables)},
                            workdir=workdir)
  like = train.init_state(model, jax.random.key(0))
  fields, meta = checkpoint.restore_fields(workdir, {"params": like.params, "permutations": like.permutations,
                                                     "normalization": like.normalization})
  return Detector(model, encoder_variables, fields["params"], fields["permutations"],
                  Normalization(*fields["normalization"]), meta.get("history", {}))


def input_batches(config: Config, images, batch_size: int, **kwargs) -> Iterator[dict]:
  """The input pipeline's batches at the config's image size, resizing filter and image dtype."""
  return data.batches(images, batch_size, config.image_size, resample=config.resample,
                      dtype=config.image_dtype, **kwargs)


def resized(config: Config, images):
  """An image set decoded and resized once, as the config's input pipeline resizes."""
  return images.resized(config.image_size, resample=config.resample, dtype=config.image_dtype)


def _as_batches(images, batch_size: int, config: Config) -> Iterator[dict]:
  if isinstance(images, (np.ndarray, jax.Array, list, tuple)) and not _is_examples(images):
    images = image_array(images, config.image_size)
    for i in range(0, len(images), batch_size):
      yield {"image": images[i:i + batch_size]}
  elif not len(images):
    raise UserError("there are no images to score: the image set is empty")
  else:
    yield from input_batches(config, images, batch_size)


def _is_examples(images) -> bool:
  """A list of example dicts (what an image set holds), rather than of image arrays."""
  return isinstance(images, (list, tuple)) and len(images) > 0 and isinstance(images[0], dict)


def image_array(images, image_size: int) -> np.ndarray:
  """`images` as the scoring contract allows them, or a UserError that says what was found: (N, S, S, 3)
  RGB at S = image_size, either uint8 (0..255) or floating point in [0, 1] (as float32), every pixel
  finite. A list of such images is stacked. Anything else is refused rather than guessed at: float pixels
  of 0..255 would all saturate to one score, and a NaN pixel would silently pass as normal."""
  expected = f"uint8 0..255 or float in [0, 1], shape (N, {image_size}, {image_size}, 3)"
  if isinstance(images, (list, tuple)):
    shapes = {np.shape(image) for image in images}
    if len(shapes) > 1:
      raise UserError(f"images must all have one shape ({expected}); the list holds {sorted(shapes)}")
  images = np.asarray(images)
  found = f"got {images.dtype} of shape {images.shape}"
  if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (image_size, image_size):
    raise UserError(f"images must be {expected}; {found}")
  if not len(images):
    raise UserError(f"images must hold at least one image ({expected}); {found}")
  if images.dtype == np.uint8:
    return images
  if not np.issubdtype(images.dtype, np.floating):
    raise UserError(f"images must be {expected}; {found} (convert with .astype(np.uint8) if they hold "
                    "0..255)")
  bad = ~np.isfinite(images)
  if bad.any():
    which = np.flatnonzero(bad.any(axis=(1, 2, 3)))
    raise UserError(f"images must have finite pixels; {found} has {int(bad.sum())} NaN or infinite "
                    f"values, in images {which[:5].tolist()}{' ...' if len(which) > 5 else ''}")
  low, high = float(images.min()), float(images.max())
  if low < 0 or high > 1:
    raise UserError(f"float images must be in [0, 1] ({expected}); {found} ranging over [{low:g}, "
                    f"{high:g}] (divide 0..255 values by 255, or pass uint8)")
  return images.astype(np.float32, copy=False)


def _bar(batches, images, batch_size: int, desc: str, enabled: bool):
  """`batches` of `images` behind a progress bar (on stderr), or as they are when not `enabled`."""
  if not enabled:
    return batches
  return tqdm(batches, total=-(-len(images) // batch_size), desc=desc, unit="batch", dynamic_ncols=True)


def score_batches(detector: Detector, images, batch_size: int | None = None,
                  normalization: str | None = None,
                  progress: bool = False) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
  """Streams (batch, scores (B,), maps (B, S, S)) so that a large set never sits in memory at full
  resolution. `normalization` ("train", "batch"; default: the config's) picks where the maxima come from;
  "test_set" needs every image first: use `score`. `progress` shows a progress bar."""
  config = detector.config
  mode = normalization or config.normalization
  if mode == "test_set":
    raise UserError("test_set normalisation needs all images at once: use score(), not score_batches()")
  batch_size = batch_size or config.batch_size
  mesh = runtime.data_mesh()
  replicated = _replicated(detector, mesh)
  if mode == "train" and np.isnan(np.asarray(detector.normalization.map_max)):
    raise UserError(f"this detector fixed no maxima from training images (it was trained with "
                    f"normalization={config.normalization!r}): score with normalization='batch' or 'test_set'")
  fixed = runtime.beside_log_probs(detector.normalization, mesh) if mode == "train" else None
  for batch in _bar(_as_batches(images, batch_size, config), images, batch_size, "scoring", progress):
    x, n = batch["image"], len(batch["image"])
    if fixed is not None and n < batch_size:
      # Pad a short last batch to the compiled shape; with fixed constants each image is scored alone.
      x = runtime.pad_batch(x, batch_size)
    log_probs = runtime.batch_log_probs(detector.model, replicated, x, mesh)
    maps, scores = compiled_maps(log_probs, config.image_size, fixed, config.blur_sigma, config.likelihood)
    yield batch, np.asarray(scores)[:n], np.asarray(maps)[:n]


def _replicated(detector: Detector, mesh):
  """(encoder variables, decoders, permutations) on every device of the mesh, for `batch_log_probs`."""
  return runtime.replicate((detector.encoder_variables, detector.params, detector.permutations), mesh)


def score(detector: Detector, images, batch_size: int | None = None,
          normalization: str | None = None, progress: bool = False) -> Scores:
  """Image scores and anomaly maps for a set of images: an image set, or an array (N, S, S, 3) at the
  config's image size, uint8 0..255 or float in [0, 1] (`image_array`)."""
  mode = normalization or detector.config.normalization
  if mode != "test_set":
    parts = [(s, m) for _, s, m in score_batches(detector, images, batch_size, mode, progress)]
    return Scores(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  # The original's whole-set maxima: two passes over the small per-layer log-likelihoods.
  config, mesh = detector.config, runtime.data_mesh()
  replicated = _replicated(detector, mesh)
  batch_size = batch_size or config.batch_size
  batches = _bar(_as_batches(images, batch_size, config), images, batch_size, "scoring", progress)
  log_probs = [runtime.batch_log_probs(detector.model, replicated, b["image"], mesh) for b in batches]
  stacked = tuple(jnp.concatenate(layer) for layer in zip(*log_probs))
  maps, scores = compiled_maps(stacked, config.image_size, None, config.blur_sigma)
  return Scores(np.asarray(scores), np.asarray(maps))


def evaluate(detector: Detector, test_set, batch_size: int | None = None,
             normalization: str | None = None, progress: bool = False) -> Evaluation:
  """Scores a labelled test set and computes every metric (image and, where masks exist, pixel level).
  `progress` shows a progress bar over the scoring."""
  labels, masks, names, parts = [], [], [], []
  mode = normalization or detector.config.normalization
  began = time.perf_counter()
  if mode == "test_set":
    result = score(detector, test_set, batch_size, mode, progress)
    for batch in input_batches(detector.config, test_set, batch_size or detector.config.batch_size):
      labels.append(batch["label"]), masks.append(batch["mask"]), names.extend(batch["filename"])
    scores, maps = result
  else:
    for batch, s, m in score_batches(detector, test_set, batch_size, mode, progress):
      labels.append(batch["label"]), masks.append(batch["mask"]), names.extend(batch["filename"])
      parts.append((s, m))
    scores, maps = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  seconds = time.perf_counter() - began
  labels = np.concatenate(labels)
  masks = np.concatenate(masks) if getattr(test_set, "has_masks", True) else None
  results = metrics.evaluate(scores, labels, maps, masks)
  results["score_seconds"] = seconds
  results["score_images_per_s"] = len(scores) / max(seconds, 1e-9)
  return Evaluation(results, scores, maps, labels, masks, names)
