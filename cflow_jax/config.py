"""One frozen configuration: our defaults (docs/design.md sections 2-7; where they differ from the original
code "O" and anomalib "A", chosen by measurement: docs/results.md), and the references' recipes (`RECIPES`).

Flags and callers override fields with `dataclasses.replace`; nothing else in the library has defaults
of its own for these choices. Each field carries its command-line help and, for a choice, its allowed
values (`field`): the scripts' flags are made from them (cflow_jax/cli/config_flags.py), so that a new field is
one edit here. A value the Config refuses raises a `ConfigError`, whose message is the one line the
command line prints.
"""

import dataclasses
import json
import math

from cflow_jax.errors import ConfigError

BACKBONES = ("wide_resnet50_2", "resnet18", "resnet34", "vgg16_hed")
RESAMPLE = ("lanczos", "bilinear")
IMAGE_DTYPES = ("uint8", "float32")
DTYPES = ("float32", "bfloat16")
MATMUL_DTYPES = ("auto", "float32", "bfloat16")
LIKELIHOODS = ("floored_log", "exp")  # anomaly_map.py


def field(default, help: str, choices: tuple[str, ...] | None = None):
  """A Config field with its flag's help (what it does, and each choice's source) and allowed values."""
  return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass(frozen=True)
class Config:
  # --- Encoder (frozen, never trained) ---
  backbone: str = field("wide_resnet50_2", "Frozen encoder.", BACKBONES)
  # A named pretrained set ("torchvision", "timm", "hed") or a path to a weight file; None = the backbone's
  # default set (torchvision for ResNets, as O; hed for vgg16_hed).
  weights: str | None = field(None, "Encoder weights: a named set (torchvision, timm, hed) or a file (.pth, "
                              ".safetensors, HED's .h5).")
  # "zeros" is what torchvision/timm checkpoints were trained with; "reflect" is O's ResNet copy.
  padding: str = field("zeros", "Encoder convolution padding: zeros (what torchvision and timm weights were "
                       "trained with) or reflect (the original's ResNet copy).", ("zeros", "reflect"))
  # "bfloat16" runs the encoder convolutions in bf16 with f32 accumulation (the flows: `score_dtype`).
  encoder_dtype: str = field("float32", "Encoder compute type (the flows: --train_dtype, --score_dtype).",
                             DTYPES)
  image_size: int = field(256, "Square input size in pixels, a multiple of 32.")
  # The filter that resizes images to image_size: "lanczos" is O's (PIL's ANTIALIAS); "bilinear" is
  # anomalib's (torchvision's antialiased Resize), smoother where small images are enlarged.
  resample: str = field("lanczos", "Filter that resizes the images: lanczos (the original) or bilinear "
                        "(anomalib, antialiased).", RESAMPLE)
  # "uint8" rounds resized images to whole levels, as O's PIL pipeline does (a quarter of the memory);
  # "float32" keeps them unrounded, as anomalib's torchvision pipeline does.
  image_dtype: str = field("uint8", "Resized images rounded to uint8 (the original) or kept in float32 "
                           "(anomalib's torchvision resize).", IMAGE_DTYPES)

  # --- Decoder: one conditional flow per tapped layer (docs/design.md section 4) ---
  condition_dim: int = field(128, "Length P of the positional code that conditions the flows, a multiple "
                             "of 4.")
  coupling_blocks: int = field(8, "Coupling blocks per flow.")
  clamp: float = field(1.9, "Soft clamp alpha of the coupling blocks' log-scales: j = alpha * tanh(s).")
  permutation: str = field("hard", "Channel permutation in each coupling block: hard (anomalib) or soft (the "
                           "original's random rotation; slower).", ("hard", "soft"))

  # --- Training (docs/design.md section 6) ---
  # N fibers per optimiser step (O: 256, A: 64). 32 gives eight times O's steps per epoch, which is what
  # a run of a few epochs needs: with lr 4e-4 it led N = 64 at 2e-4 by 0.7-1.3 pixel AUROC points at 1, 2
  # and 4 epochs (docs/results.md, the budget study).
  fiber_batch: int = field(32, "Fibers per optimiser step (N).")
  drop_remainder: bool = field(True, "Drop each layer's last partial chunk of fibers (the original) rather "
                               "than let the last step take it (anomalib).")
  batch_size: int = field(32, "Images per encoder pass.")
  # True drops an epoch's last partial image batch (O); False trains on it too (A: every image, every
  # epoch), padded to the full batch's compiled shape.
  drop_last_batch: bool = field(False, "Drop each epoch's last partial batch of images (the original) rather "
                                "than train on it too (anomalib).")
  # The cosine's peak: twice O's 2e-4 (A: 1e-4 constant), measured with N = 32 (see fiber_batch).
  lr: float = field(4e-4, "Adam learning rate (the cosine schedule's peak).")
  # The flows' subnet matmuls in training, forward and backward: "bfloat16" rounds their inputs (and the
  # cotangents) and sums in float32; the weights, their gradients and Adam stay float32. "auto": bfloat16
  # where the hardware multiplies it natively (`precision`), as `score_dtype`: on the AMX CPU the same
  # accuracy as float32 at 1, 2 and 4 epochs on the demo and Magnetic Tile, and faster (docs/results.md).
  train_dtype: str = field("auto", "Input type of the flows' matmuls in training, forward and backward "
                           "(float32 sums, weights and Adam either way); auto: bfloat16 on GPU, TPU and AMX "
                           "CPUs.", MATMUL_DTYPES)
  # "cosine": a linear warm-up from lr / 10, then cosine decay to lr * 1e-3, over the run's progress (O's
  # curve, per meta-epoch there); "constant": lr throughout (A). See `train.learning_rate`.
  schedule: str = field("cosine", "Learning-rate schedule: cosine (a warm-up, then cosine decay to lr / 1000 "
                        "over the whole run: the original's curve) or constant (anomalib).",
                        ("cosine", "constant"))
  meta_epochs: int = field(25, "Meta-epochs (the original's outer loop; the run trains meta_epochs x "
                           "sub_epochs passes).")
  sub_epochs: int = field(8, "Passes over the training images per meta-epoch.")
  # O: 2 of 25 meta-epochs.
  warmup: float = field(0.08, "Fraction of the run over which the cosine schedule warms up from lr / 10.")
  # Train-time random rotation in degrees (O: 5). Its black corners put fibers at the border positions
  # that no test image has: 7 points of pixel AUROC at one demo epoch (docs/results.md); 0 also allows
  # feature caching.
  rotation: float = field(0.0, "Train-time random rotation in degrees, 0 disables.")
  # Costs images * sum(h * w * C) * 4 bytes of host memory, e.g. 1.7 MB per image for vgg16_hed at 128 px.
  cache_features: bool = field(False, "Encode the training images once and keep their features in memory for "
                               "every epoch (needs --rotation=0).")
  seed: int = field(42, "Seed of initialisation, shuffling and augmentation.")

  # --- Scoring (docs/design.md section 7) ---
  # "train": per-layer maxima fixed from training data (default; an image's score never depends on others);
  # "test_set": maxima over all scored images (O); "batch": maxima over each batch (A).
  normalization: str = field("train", "Where the maxima that normalise anomaly maps come from: train (fixed "
                             "from the training images, so that a score never depends on other images), "
                             "test_set (the original) or batch (anomalib).", ("train", "test_set", "batch"))
  # With "train": the training images that fix the maxima, at most this many, evenly spaced (0: all): one
  # default batch, a few percent of a one-epoch run. 32 of 48 demo images moved pixel AUROC by 0.02
  # points, 32 of 64 Magnetic Tile images by 0.00 (experiments/studies/normalization_subset.py).
  normalization_images: int = field(32, "With --normalization=train: at most this many training images, "
                                    "evenly spaced, fix the maxima (0: all).")
  # How each layer's log p / C enters the map (anomaly_map.py): "exp", exp(log p - max) as both references,
  # saturates every fiber far below the maximum; "floored_log", log p floored at the `floor_quantile` of
  # the training fibers, is as bounded (no rare fiber of a good image rules a map) but linear above the
  # floor. Measured at 1, 2 and 4 epochs on Magnetic Tile and the demo: docs/results.md, "The layers'
  # combination". Only with normalization="train": the references' rules use "exp".
  likelihood: str = field("floored_log", "How each layer's log-likelihood enters the map: floored_log (log p "
                          "floored at a low quantile of the training fibers') or exp (exp(log p - max), both "
                          "references); with --normalization=train.", LIKELIHOODS)
  floor_quantile: float = field(0.01, "With --likelihood=floored_log: the quantile of the training fibers' "
                                "log p that floors each layer's.")
  # Gaussian blur of each anomaly map, sigma in input pixels (0: none, as both references). 4 is what
  # anomalib's PaDiM and PatchCore use at 256 px; on Magnetic Tile it lifted image AUROC by 1.6-4.0
  # points over three seeds (README).
  blur_sigma: float = field(4.0, "Gaussian blur of the anomaly maps, sigma in input pixels; 0 for none (both "
                            "references).")
  # The flows' subnet matmuls when scoring (training: `train_dtype`): "bfloat16" rounds their inputs and
  # sums in float32, faster where the hardware multiplies bfloat16, AUROC within 0.01 points of float32
  # (docs/results.md); "auto" picks it only where the hardware has bfloat16 units (GPU, TPU, AMX), else
  # float32 (`precision`).
  score_dtype: str = field("auto", "Input type of the flows' matmuls when scoring (float32 sums either way); "
                           "auto: bfloat16 on GPU, TPU and AMX CPUs.", MATMUL_DTYPES)

  def __post_init__(self):
    for each in dataclasses.fields(self):
      if each.metadata["choices"] is not None:
        _check_choice(each.name, getattr(self, each.name), each.metadata["choices"])
    _check_floats(self)
    for name in ("image_size", "condition_dim", "coupling_blocks", "fiber_batch", "batch_size",
                 "meta_epochs", "sub_epochs"):
      if getattr(self, name) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if self.normalization_images < 0:
      raise ConfigError(f"normalization_images must be 0 (all) or positive, got {self.normalization_images}")
    if self.condition_dim % 4:
      raise ConfigError(f"condition_dim must be a multiple of 4, got {self.condition_dim}")
    if self.image_size % 32:
      raise ConfigError(f"image_size must be a multiple of 32 (the deepest tap's stride), got {self.image_size}")
    if self.cache_features and self.rotation:
      raise ConfigError("cache_features needs rotation=0: rotated images give new features every epoch")

  @property
  def epochs(self) -> int:
    """Total passes over the training images."""
    return self.meta_epochs * self.sub_epochs

  @classmethod
  def recipe(cls, name: str, **fields) -> "Config":
    """The config of a reference's recipe ("original" or "anomalib", `RECIPES`), with `fields` on top."""
    _check_choice("recipe", name, tuple(RECIPES))
    return cls(**{**RECIPES[name], **fields})

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "Config":
    return cls(**json.loads(text))


# The two references' recipes, as the fields that differ from ours (`Config.recipe`). The encoder's
# weights are left out: each reference's default set exists only for some backbones (`weights`).
RECIPES = {
    # gudovskiy/cflow-ad: 25 x 8 epochs, N = 256 with remainders dropped, +-5 degree rotations, PIL's
    # Lanczos rounded to uint8, maps normalised over the whole test set, no blur, float32 flows.
    "original": dict(fiber_batch=256, drop_remainder=True, drop_last_batch=True, lr=2e-4, schedule="cosine",
                     warmup=0.08, meta_epochs=25, sub_epochs=8, rotation=5.0, resample="lanczos",
                     image_dtype="uint8", normalization="test_set", likelihood="exp", blur_sigma=0.0,
                     score_dtype="float32", train_dtype="float32"),
    # anomalib's Cflow: N = 64 and every fiber and image used, Adam at a constant 1e-4 for up to 50 epochs,
    # no augmentation, torchvision's antialiased bilinear resize kept in float, maps normalised per batch.
    "anomalib": dict(fiber_batch=64, drop_remainder=False, drop_last_batch=False, lr=1e-4, schedule="constant",
                     meta_epochs=50, sub_epochs=1, rotation=0.0, resample="bilinear", image_dtype="float32",
                     normalization="batch", likelihood="exp", blur_sigma=0.0, score_dtype="float32",
                     train_dtype="float32"),
}


# Each float field's allowed range (low, high, whether low itself is allowed); a field not named here
# only needs to be finite.
_FLOAT_RANGES = {
    "lr": (0.0, math.inf, False),
    "clamp": (0.0, math.inf, False),
    "rotation": (0.0, 180.0, True),  # a turn drawn from [-rotation, rotation] degrees
    "blur_sigma": (0.0, math.inf, True),  # 0: no blur
    "floor_quantile": (0.0, 1.0, True),
    "warmup": (0.0, 0.5, True),  # a fraction of the run; the cosine needs the rest to decay
}


def _check_floats(config: Config):
  """Every float field finite and in range: a NaN would otherwise pass every comparison unnoticed (a NaN
  blur is no blur; a NaN learning rate shows only as a NaN loss)."""
  for each in dataclasses.fields(config):
    if each.type not in (float, "float"):
      continue
    value = getattr(config, each.name)
    low, high, low_allowed = _FLOAT_RANGES.get(each.name, (-math.inf, math.inf, True))
    if not math.isfinite(value):
      raise ConfigError(f"{each.name} must be a finite number, got {value}")
    if not (low <= value if low_allowed else low < value) or value > high:
      bounds = f"{'[' if low_allowed else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
      raise ConfigError(f"{each.name} must be in {bounds}, got {value}")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
