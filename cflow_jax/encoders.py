"""The frozen encoders whose intermediate feature maps CFLOW models (docs/design.md section 2).

ResNets follow torchvision's architecture (v1.5: a bottleneck's stride sits on its 3x3 conv) and return the
outputs of layer2, layer3 and layer4; VGG16 returns relu3_3, relu4_3 and relu5_3 for the HED edge weights.
Everything is NHWC and inference only: batch norm always uses the checkpoint's running statistics.

Module and variable names are chosen so that `weights.py` maps every PyTorch tensor by name: `layer1_0` is
torchvision's `layer1.0`, `downsample_conv`/`downsample_bn` its `downsample.0`/`.1`, `block3_conv2` HED's
third block's second convolution.
"""

import dataclasses
import functools
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from cflow_jax import platforms, winograd
from cflow_jax.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# HED was trained in Caffe: BGR pixels in 0..255 minus this mean (in BGR order), no scaling.
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """What the rest of the pipeline needs to know about an encoder."""
  name: str
  taps: tuple[str, ...]  # the tapped layers, shallow to deep
  channels: tuple[int, ...]  # channels of each tap
  strides: tuple[int, ...]  # input pixels per feature-map pixel at each tap
  mean: tuple[float, float, float]  # subtracted after scaling, in the network's channel order
  std: tuple[float, float, float]
  bgr: bool  # channel order the network expects
  scale: float  # a [0, 1] input is multiplied by this before mean/std (1.0 ImageNet; 255.0 for HED/Caffe)


_RESNET_TAPS = ("layer2", "layer3", "layer4")
SPECS = {
    "resnet18": EncoderSpec("resnet18", _RESNET_TAPS, (128, 256, 512), (8, 16, 32), IMAGENET_MEAN,
                            IMAGENET_STD, False, 1.0),
    "resnet34": EncoderSpec("resnet34", _RESNET_TAPS, (128, 256, 512), (8, 16, 32), IMAGENET_MEAN,
                            IMAGENET_STD, False, 1.0),
    "wide_resnet50_2": EncoderSpec("wide_resnet50_2", _RESNET_TAPS, (512, 1024, 2048), (8, 16, 32),
                                   IMAGENET_MEAN, IMAGENET_STD, False, 1.0),
    "vgg16_hed": EncoderSpec("vgg16_hed", ("relu3_3", "relu4_3", "relu5_3"), (256, 512, 512), (4, 8, 16),
                             CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), True, 255.0),
}
PADDINGS = ("zeros", "reflect")
_HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# Where a 3x3 stride-1 convolution runs as Winograd's minimal filtering on the CPU (one image at a time, as
# the CPU path encodes; experiments/bench/conv.py): F(4x4, 3x3) on maps from WINOGRAD_4X4_SIZE pixels a side
# with WINOGRAD_4X4_CHANNELS input channels or more (vgg16_hed's block2_conv2, where the whole encoder gained
# over F(2x2); docs/results.md), F(2x2, 3x3) elsewhere from WINOGRAD_CHANNELS input channels. On smaller
# maps F(4x4)'s 36 transformed kernels outweigh its fewer tiles; on 64-channel maps the layers alone ran
# faster as F(4x4) but the whole encoder slower.
WINOGRAD_CHANNELS = 128
WINOGRAD_4X4_CHANNELS = 128
WINOGRAD_4X4_SIZE = 128
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


class Conv(nn.Module):
  """A bias-optional square convolution with PyTorch's symmetric padding, zeros or reflect.

  Inputs and kernel are cast to `dtype` (on Winograd's path: the transformed tiles and kernel) and the
  products accumulate in float32, so bfloat16 cuts the convolution cost without drifting through 50
  layers. The kernel is stored in float32, HWIO.
  """
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", _HE_NORMAL, (k, k, x.shape[-1], self.features))
    output_tile = self._winograd_tile(x)
    if output_tile:
      # Winograd's path where the program runs on a CPU, XLA's convolution on a GPU or TPU.
      y = platforms.cpu_or_accelerator(functools.partial(self._winograd, output_tile), self._direct, x, kernel)
    else:
      y = self._direct(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y

  def _pad(self, x, always: bool):
    """x padded by the kernel's half width if reflected, or if `always` (Winograd takes a padded input);
    and the padding left for XLA's convolution to add."""
    pad = (self.kernel_size - 1) // 2
    if pad and (self.padding == "reflect" or always):
      mode = "reflect" if self.padding == "reflect" else "constant"
      return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode), 0
    return x, pad

  def _direct(self, x, kernel):
    x, pad = self._pad(x, always=False)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)

  def _winograd(self, output_tile, x, kernel):
    x, _ = self._pad(x, always=True)
    return winograd.conv3x3_valid(x.astype(jnp.float32), kernel, self.dtype, output_tile)

  def _winograd_tile(self, x) -> int:
    """m of Winograd's F(m x m, 3x3) for this convolution on the CPU, 0 for XLA's direct one: Winograd only
    for 3x3 stride-1 convolutions, and only on the CPU (accelerators' own convolutions already choose their
    algorithm: see `__call__`), and F(4x4) only in float32: its transforms scale the tiles by up to 8, too
    much for bfloat16's 8 bits (errors of 7e-2 of the output's largest value, against 4e-3 for F(2x2))."""
    if self.kernel_size != 3 or self.stride != 1:
      return 0
    channels, size = x.shape[-1], min(x.shape[1:3])
    if self.dtype == jnp.float32 and channels >= WINOGRAD_4X4_CHANNELS and size >= WINOGRAD_4X4_SIZE:
      return 4
    return 2 if channels >= WINOGRAD_CHANNELS else 0


# PyTorch's batch-norm epsilon; the statistics are the checkpoint's, never updated.
_BatchNorm = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)


class BasicBlock(nn.Module):
  """ResNet-18/34 block: two 3x3 convs; the first carries the stride."""
  features: int
  stride: int = 1
  padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, padding=self.padding, dtype=self.dtype)
    y = nn.relu(_BatchNorm(name="bn1")(conv(self.features, 3, self.stride, name="conv1")(x)))
    y = _BatchNorm(name="bn2")(conv(self.features, 3, name="conv2")(y))
    return nn.relu(y + _shortcut(x, self.features, self.stride, self.dtype))


class Bottleneck(nn.Module):
  """ResNet-50 block: 1x1 down to `features * width_factor`, strided 3x3, 1x1 up to `4 * features`."""
  features: int
  stride: int = 1
  width_factor: int = 1  # 2 for Wide ResNet-50-2
  padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(Conv, padding=self.padding, dtype=self.dtype)
    width = self.features * self.width_factor
    y = nn.relu(_BatchNorm(name="bn1")(conv(width, 1, name="conv1")(x)))
    y = nn.relu(_BatchNorm(name="bn2")(conv(width, 3, self.stride, name="conv2")(y)))
    y = _BatchNorm(name="bn3")(conv(4 * self.features, 1, name="conv3")(y))
    return nn.relu(y + _shortcut(x, 4 * self.features, self.stride, self.dtype))


def _shortcut(x, features, stride, dtype):
  """Identity, or a strided 1x1 projection where the block changes resolution or width."""
  if stride == 1 and x.shape[-1] == features:
    return x
  y = Conv(features, 1, stride, dtype=dtype, name="downsample_conv")(x)
  return _BatchNorm(name="downsample_bn")(y)


class ResNet(nn.Module):
  """Stem and four stages; returns the outputs of stages 2, 3 and 4 (strides 8, 16, 32)."""
  block: Callable[..., nn.Module]
  stage_sizes: Sequence[int]
  padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, 3), normalised
    x = Conv(64, 7, 2, padding=self.padding, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(_BatchNorm(name="bn1")(x))
    # Max pooling pads with -inf, as PyTorch does, whatever the convolutions' padding.
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    taps = []
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(64 * 2 ** i, stride, padding=self.padding, dtype=self.dtype, name=f"layer{i + 1}_{j}")(x)
      if i > 0:
        taps.append(x)
    return tuple(taps)


class VGG16(nn.Module):
  """VGG16's convolutions up to relu5_3 (no pooling after block 5); returns relu3_3, relu4_3, relu5_3."""
  padding: str = "zeros"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, 3), Caffe-normalised BGR
    taps = []
    for block, (features, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)), 1):
      if block > 1:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for c in range(1, convs + 1):
        x = nn.relu(Conv(features, 3, use_bias=True, padding=self.padding, dtype=self.dtype,
                         name=f"block{block}_conv{c}")(x))
      if block >= 3:
        taps.append(x)
    return tuple(taps)


def create_encoder(name: str, padding: str = "zeros", dtype=jnp.float32) -> tuple[nn.Module, EncoderSpec]:
  """The encoder module and its spec.

  Args:
    name: one of `SPECS`.
    padding: "zeros" (what torchvision/timm checkpoints were trained with) or "reflect" (the original CFLOW
      code's ResNet, applied to the stem and every 3x3 conv).
    dtype: jnp.float32, or jnp.bfloat16 to run the convolutions in bfloat16 (float32 accumulation);
      features come out in float32 either way.
  """
  if name not in SPECS:
    raise UserError(f"Unknown encoder {name!r}; choose one of {', '.join(SPECS)}.")
  if padding not in PADDINGS:
    raise UserError(f"Unknown padding {padding!r}; choose one of {', '.join(PADDINGS)}.")
  if jnp.dtype(dtype) not in _DTYPES:
    raise UserError(f"Unsupported encoder dtype {dtype!r}; use float32 or bfloat16.")
  common = dict(padding=padding, dtype=jnp.dtype(dtype))
  if name == "resnet18":
    module = ResNet(BasicBlock, (2, 2, 2, 2), **common)
  elif name == "resnet34":
    module = ResNet(BasicBlock, (3, 4, 6, 3), **common)
  elif name == "wide_resnet50_2":
    module = ResNet(functools.partial(Bottleneck, width_factor=2), (3, 4, 6, 3), **common)
  else:
    module = VGG16(**common)
  return module, SPECS[name]


def preprocess(images, spec: EncoderSpec) -> jnp.ndarray:
  """(B, H, W, 3) RGB, uint8 or float in [0, 1] -> the normalised float32 input `spec`'s network expects."""
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) / 255.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  x = x * spec.scale
  if spec.bgr:
    x = x[..., ::-1]
  return (x - jnp.asarray(spec.mean, jnp.float32)) / jnp.asarray(spec.std, jnp.float32)


def extract(module, spec, variables, images) -> tuple[jnp.ndarray, ...]:
  """RGB images (B, H, W, 3) -> one float32 feature map (B, H / stride, W / stride, C) per tap.

  Jit it with the module and spec bound: `jax.jit(functools.partial(extract, module, spec))`.
  """
  features = module.apply(variables, preprocess(images, spec))
  return tuple(f.astype(jnp.float32) for f in features)


def init_variables(module, key, image_size=64) -> dict:
  """Random {"params", "batch_stats"}: He-normal kernels, zero biases, identity batch norm.

  All kernels are cut from one normal draw: XLA compiles a random call per call site, and one per kernel
  made initialising a ResNet take many times longer than running it.
  """
  shapes = jax.eval_shape(module.init, key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  return jax.jit(functools.partial(_random_variables, shapes))(key)


def _random_variables(shapes, key):
  flat = traverse_util.flatten_dict(shapes)
  noise = jax.random.normal(key, (sum(leaf.size for path, leaf in flat.items() if path[-1] == "kernel"),))
  variables, start = {}, 0
  for path, leaf in flat.items():
    if path[-1] == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      variables[path] = noise[start:start + leaf.size].reshape(leaf.shape) * math.sqrt(2.0 / fan_in)
      start += leaf.size
    elif path[-1] in ("scale", "var"):
      variables[path] = jnp.ones(leaf.shape, leaf.dtype)
    else:  # biases, running means
      variables[path] = jnp.zeros(leaf.shape, leaf.dtype)
  return traverse_util.unflatten_dict(variables)
