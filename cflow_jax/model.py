"""CFLOW as pure functions: a frozen encoder's tapped features, one conditional flow per tap.

The model is three pytrees and a static description:
  `encoder_variables` (frozen, never trained), `params` (one decoder's trainable parameters per tap),
  `permutations` (fixed per tap), and a `Model` holding the config, the Flax encoder module and its spec.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from cflow_jax import encoders, flow, precision
from cflow_jax.config import Config
from cflow_jax.platforms import cpu_or_accelerator
from cflow_jax.positional import positional_encoding


@dataclasses.dataclass(frozen=True)
class Model:
  """What is fixed by the config: the encoder module and its spec.

  Equal and hashed by config (the rest follows from it), so that compiled functions taking a model as a
  static argument are reused by every model built from the same config.
  """
  config: Config
  encoder: object = dataclasses.field(compare=False)  # flax.linen.Module
  spec: encoders.EncoderSpec = dataclasses.field(compare=False)

  @property
  def channels(self) -> tuple[int, ...]:
    return self.spec.channels

  def feature_sizes(self, image_size=None) -> tuple[int, ...]:
    size = image_size or self.config.image_size
    return tuple(size // s for s in self.spec.strides)


def build(config: Config) -> Model:
  dtype = jnp.bfloat16 if config.encoder_dtype == "bfloat16" else jnp.float32
  module, spec = encoders.create_encoder(config.backbone, padding=config.padding, dtype=dtype)
  return Model(config, module, spec)


def init_decoders(model: Model, key):
  """(params, permutations): tuples with one decoder per tapped layer."""
  c = model.config
  keys = jax.random.split(key, len(model.channels))
  decoders = [flow.init_decoder(k, ch, c.condition_dim, c.coupling_blocks, c.permutation)
              for k, ch in zip(keys, model.channels)]
  return tuple(d[0] for d in decoders), tuple(d[1] for d in decoders)


# On the CPU, each device runs the encoder image by image and the flows about this many fibers at a time
# (whole positions of its batch): the working set then stays in cache, which scores faster than whole
# batches do (experiments/bench_speed.py; figures in docs/results.md). Accelerators want whole batches. Which
# path a program takes is chosen when it is lowered (`platforms`), so that a program exported for a GPU or
# TPU carries theirs.
_CPU_FIBER_BLOCK = 1024


def _in_blocks(fn, x, c, block: int):
  """fn(x, c) for a fn of rows (x (n, ...) and c (n, P) -> (n, ...)), computed `block` rows at a time
  (a loop), the remainder in one last call."""
  n = x.shape[0]
  full = n - n % block
  if full <= block:
    return fn(x, c)
  blocks = jax.lax.map(lambda xc: fn(*xc), (x[:full].reshape((-1, block) + x.shape[1:]),
                                             c[:full].reshape(-1, block, c.shape[1])))
  blocks = blocks.reshape((full,) + blocks.shape[2:])
  return blocks if full == n else jnp.concatenate([blocks, fn(x[full:], c[full:])])


def encode_images(model: Model, encoder_variables, images):
  """uint8 RGB images (B, S, S, 3) -> tuple of feature maps (B, h, w, C), one per tap, on one device."""
  extract = functools.partial(encoders.extract, model.encoder, model.spec)
  if images.shape[0] == 1:
    return extract(encoder_variables, images)
  per_image = lambda v, x: jax.lax.map(lambda image: tuple(f[0] for f in extract(v, image[None])), x)
  return cpu_or_accelerator(per_image, extract, encoder_variables, images)


@functools.partial(jax.jit, static_argnums=0)
def encode(model: Model, encoder_variables, images):
  """`encode_images` compiled once per batch shape (`runtime.encode` splits the batch over devices)."""
  return encode_images(model, encoder_variables, images)


def fibers_and_condition(features, condition_dim):
  """Flattens one layer's features (B, h, w, C) to fibers (B*h*w, C) in (batch, row, column) order,
  with the positional code of each fiber's position, (B*h*w, P)."""
  b, h, w, c = features.shape
  condition = positional_encoding(h, w, condition_dim).reshape(1, h * w, condition_dim)
  condition = jnp.broadcast_to(condition, (b, h * w, condition_dim)).reshape(b * h * w, condition_dim)
  return features.reshape(b * h * w, c), condition


def layer_log_probs(model: Model, params, permutations, features, block_images: int | None = None):
  """Per-fiber log p(x | c) / C for each tapped layer: a tuple of (B, h, w) arrays.

  Dividing by C puts layers of different widths on one scale, as both references do before scoring.
  The flows see the fibers position by position, (h*w, B, C): the B fibers at one position share its
  condition, whose part of the work is then done once per position, not once per image (up to 20% of the
  flows' FLOPs with vgg16_hed). On the CPU they run in blocks of positions sized for `block_images` images
  (default: the batch's own size; a symbolic batch, as in an export, needs it given).
  """
  out = []
  condition_dim = model.config.condition_dim
  for layer_params, layer_perms, f in zip(params, permutations, features):
    b, h, w, c = f.shape
    fibers = jnp.transpose(f.astype(jnp.float32).reshape(b, h * w, c), (1, 0, 2))
    condition = positional_encoding(h, w, condition_dim).reshape(h * w, condition_dim)

    def log_p_of(x, cond, layer_params=layer_params, layer_perms=layer_perms):
      return precision.with_matmul_dtype(
          lambda dtype, x, cond: flow.log_prob(layer_params, layer_perms, x, cond, model.config.clamp, dtype),
          model.config.score_dtype, x, cond)

    block = max(_CPU_FIBER_BLOCK // (block_images or b), 1)
    blocked = lambda x, cond: _in_blocks(log_p_of, x, cond, block)
    log_p = cpu_or_accelerator(blocked, log_p_of, fibers, condition)
    out.append((log_p.T / c).reshape(b, h, w))
  return tuple(out)


def local_log_probs(model: Model, encoder_variables, params, permutations, images,
                    block_images: int | None = None):
  """uint8 images -> per-layer log p / C maps on one device: the encoder, then the flows."""
  features = encode_images(model, encoder_variables, images)
  return layer_log_probs(model, params, permutations, features, block_images)


@functools.partial(jax.jit, static_argnums=0)
def image_log_probs(model: Model, encoder_variables, params, permutations, images):
  """uint8 images -> per-layer log p / C maps: the whole scoring forward pass, compiled once per batch shape
  (`runtime.image_log_probs` splits the batch over devices)."""
  return local_log_probs(model, encoder_variables, params, permutations, images)
