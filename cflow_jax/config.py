"""One frozen configuration: our defaults (docs/design.md sections 2-7; where they differ from the original
code "O" and anomalib "A", chosen by measurement: docs/results.md), and the references' recipes (`RECIPES`).

Flags and callers override fields with `dataclasses.replace`; nothing else in the library has defaults
of its own for these choices.
"""

import dataclasses
import json
import math

BACKBONES = ("wide_resnet50_2", "resnet18", "resnet34", "vgg16_hed")
RESAMPLE = ("lanczos", "bilinear")
IMAGE_DTYPES = ("uint8", "float32")


@dataclasses.dataclass(frozen=True)
class Config:
  # --- Encoder (frozen, never trained) ---
  backbone: str = "wide_resnet50_2"
  # A named pretrained set ("torchvision", "timm", "hed") or a path to a weight file; None = the backbone's
  # default set (torchvision for ResNets, as O; hed for vgg16_hed).
  weights: str | None = None
  # "zeros" is what torchvision/timm checkpoints were trained with; "reflect" is O's ResNet copy.
  padding: str = "zeros"
  # "bfloat16" runs the encoder convolutions in bf16 with f32 accumulation (the flows: `score_dtype`).
  encoder_dtype: str = "float32"
  image_size: int = 256
  # The filter that resizes images to image_size: "lanczos" is O's (PIL's ANTIALIAS); "bilinear" is
  # anomalib's (torchvision's antialiased Resize), smoother where small images are enlarged.
  resample: str = "lanczos"
  # "uint8" rounds resized images to whole levels, as O's PIL pipeline does (a quarter of the memory);
  # "float32" keeps them unrounded, as anomalib's torchvision pipeline does.
  image_dtype: str = "uint8"

  # --- Decoder: one conditional flow per tapped layer (docs/design.md section 4) ---
  condition_dim: int = 128  # P, the positional code's length
  coupling_blocks: int = 8
  clamp: float = 1.9  # alpha in j = alpha * tanh(s)
  permutation: str = "hard"  # "hard" (A) or "soft" (O: a random rotation; slower)

  # --- Training (docs/design.md section 6) ---
  # N fibers per optimiser step (O: 256, A: 64). 64 gives four times O's steps per epoch, which is what
  # a run of a few epochs needs (docs/results.md, the budget study).
  fiber_batch: int = 64
  drop_remainder: bool = True  # O drops the last partial chunk; False lets it absorb into the last step (A)
  batch_size: int = 32  # images per encoder pass
  # True drops an epoch's last partial image batch (O); False trains on it too (A: every image, every
  # epoch), padded to the full batch's compiled shape.
  drop_last_batch: bool = False
  lr: float = 2e-4
  # The flows' subnet matmuls in training, forward and backward: "bfloat16" rounds their inputs (and the
  # cotangents) and sums in float32; the weights, their gradients and Adam stay float32. "auto": bfloat16
  # where the hardware multiplies it natively (`precision`), as `score_dtype`.
  train_dtype: str = "float32"
  # "cosine": a linear warm-up from lr / 10, then cosine decay to lr * 1e-3, over the run's progress (O's
  # curve, per meta-epoch there); "constant": lr throughout (A). See `train.learning_rate`.
  schedule: str = "cosine"
  meta_epochs: int = 25
  sub_epochs: int = 8
  warmup: float = 0.08  # the fraction of the run that warms up (O: 2 of 25 meta-epochs)
  # Train-time random rotation in degrees (O: 5). Its black corners put fibers at the border positions
  # that no test image has: 7 points of pixel AUROC at one demo epoch (docs/results.md); 0 also allows
  # feature caching.
  rotation: float = 0.0
  # Encode the training images once and keep their features in host memory for every epoch (needs
  # rotation 0; costs images * sum(h * w * C) * 4 bytes, e.g. 1.7 MB per image for vgg16_hed at 128 px).
  cache_features: bool = False
  seed: int = 42

  # --- Scoring (docs/design.md section 7) ---
  # "train": per-layer maxima fixed from training data (default; an image's score never depends on others);
  # "test_set": maxima over all scored images (O); "batch": maxima over each batch (A).
  normalization: str = "train"
  # With "train": the training images that fix the maxima, at most this many, evenly spaced (0: all): one
  # default batch, a few percent of a one-epoch run. 32 of 48 demo images moved pixel AUROC by 0.02
  # points, 32 of 64 Magnetic Tile images by 0.00 (experiments/studies/normalization_subset.py).
  normalization_images: int = 32
  # Gaussian blur of each anomaly map, sigma in input pixels (0: none, as both references). 4 is what
  # anomalib's PaDiM and PatchCore use at 256 px; on Magnetic Tile it lifted image AUROC by 1.6-4.0
  # points over three seeds (README).
  blur_sigma: float = 4.0
  # The flows' subnet matmuls when scoring (training: `train_dtype`): "bfloat16" rounds their inputs and
  # sums in float32, faster where the hardware multiplies bfloat16, AUROC within 0.01 points of float32
  # (docs/results.md); "auto" picks it only where the hardware has bfloat16 units (GPU, TPU, AMX), else
  # float32 (`precision`).
  score_dtype: str = "auto"

  def __post_init__(self):
    _check_choice("backbone", self.backbone, BACKBONES)
    _check_choice("padding", self.padding, ("zeros", "reflect"))
    _check_choice("resample", self.resample, RESAMPLE)
    _check_choice("image_dtype", self.image_dtype, IMAGE_DTYPES)
    _check_choice("encoder_dtype", self.encoder_dtype, ("float32", "bfloat16"))
    _check_choice("score_dtype", self.score_dtype, ("auto", "float32", "bfloat16"))
    _check_choice("train_dtype", self.train_dtype, ("auto", "float32", "bfloat16"))
    _check_choice("permutation", self.permutation, ("hard", "soft"))
    _check_choice("schedule", self.schedule, ("cosine", "constant"))
    _check_choice("normalization", self.normalization, ("train", "test_set", "batch"))
    _check_floats(self)
    for name in ("image_size", "condition_dim", "coupling_blocks", "fiber_batch", "batch_size",
                 "meta_epochs", "sub_epochs"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
    if self.normalization_images < 0:
      raise ValueError(f"normalization_images must be 0 (all) or positive, got {self.normalization_images}")
    if self.condition_dim % 4:
      raise ValueError(f"condition_dim must be a multiple of 4, got {self.condition_dim}")
    if self.image_size % 32:
      raise ValueError(f"image_size must be a multiple of 32 (the deepest tap's stride), got {self.image_size}")
    if self.cache_features and self.rotation:
      raise ValueError("cache_features needs rotation=0: rotated images give new features every epoch")

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
                     image_dtype="uint8", normalization="test_set", blur_sigma=0.0, score_dtype="float32",
                     train_dtype="float32"),
    # anomalib's Cflow: N = 64 and every fiber and image used, Adam at a constant 1e-4 for up to 50 epochs,
    # no augmentation, torchvision's antialiased bilinear resize kept in float, maps normalised per batch.
    "anomalib": dict(fiber_batch=64, drop_remainder=False, drop_last_batch=False, lr=1e-4, schedule="constant",
                     meta_epochs=50, sub_epochs=1, rotation=0.0, resample="bilinear", image_dtype="float32",
                     normalization="batch", blur_sigma=0.0, score_dtype="float32", train_dtype="float32"),
}


# Each float field's allowed range (low, high, whether low itself is allowed); a field not named here
# only needs to be finite.
_FLOAT_RANGES = {
    "lr": (0.0, math.inf, False),
    "clamp": (0.0, math.inf, False),
    "rotation": (0.0, 180.0, True),  # a turn drawn from [-rotation, rotation] degrees
    "blur_sigma": (0.0, math.inf, True),  # 0: no blur
    "warmup": (0.0, 0.5, True),  # a fraction of the run; the cosine needs the rest to decay
}


def _check_floats(config: Config):
  """Every float field finite and in range: a NaN would otherwise pass every comparison unnoticed (a NaN
  blur is no blur; a NaN learning rate shows only as a NaN loss)."""
  for field in dataclasses.fields(config):
    if field.type not in (float, "float"):
      continue
    value = getattr(config, field.name)
    low, high, low_allowed = _FLOAT_RANGES.get(field.name, (-math.inf, math.inf, True))
    if not math.isfinite(value):
      raise ValueError(f"{field.name} must be a finite number, got {value}")
    if not (low <= value if low_allowed else low < value) or value > high:
      bounds = f"{'[' if low_allowed else '('}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
      raise ValueError(f"{field.name} must be in {bounds}, got {value}")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
