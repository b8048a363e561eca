"""The encoder's convolutions on this machine: XLA's direct convolution against Winograd's F(2x2, 3x3) and
F(4x4, 3x3) (`cflow_jax/winograd.py`), in float32 and in bfloat16 (float32 accumulation); then whole
encoders under each choice of algorithm (`encoders.WINOGRAD_*`), and with encoder_dtype bfloat16.

    python experiments/bench/conv.py [--part=encoders --backbones=vgg16_hed]

Layers shaped like VGG16's at 256 px, one image (the CPU path encodes image by image). Variants alternate
within each repetition and the median is kept, so a busy or noisy machine affects all alike. Prints
GFLOP/s of the direct convolution's FLOPs (Winograd does fewer) and the largest error relative to the
float32 direct convolution; then images/s of each encoder.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax

from cflow_jax import encoders, model as model_lib, winograd
from cflow_jax.config import Config

FLAGS = flags.FLAGS
flags.DEFINE_enum("part", "all", ("all", "layers", "encoders"), "Single layers, whole encoders, or both.")
flags.DEFINE_list("backbones", ["vgg16_hed", "wide_resnet50_2"], "Whole encoders to time.")
LAYERS = ((256, 64, 64), (128, 64, 128), (128, 128, 128), (64, 256, 256), (32, 512, 512),
          (16, 512, 512))  # size, in, out
# Whole-encoder choices: (WINOGRAD_CHANNELS, WINOGRAD_4X4_CHANNELS, WINOGRAD_4X4_SIZE), read while tracing.
NEVER = 10 ** 9
DEFAULT = "4x4 from 128 px and 128 ch, else 2x2 from 128 ch (default)"
POLICIES = {"direct": (NEVER, NEVER, NEVER), "2x2 from 128 ch": (128, NEVER, NEVER), DEFAULT: (128, 128, 128),
            "4x4 from 64 px and 128 ch, else 2x2 from 128 ch": (128, 128, 64),
            "4x4 from 64 px and 64 ch, else 2x2 from 128 ch": (128, 64, 64)}


def direct(x, kernel, dtype=jnp.float32):
  return lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), "VALID",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)


def medians(fns: dict, repeats: int) -> dict:
  """Median seconds of each zero-argument function, the functions alternating in every repetition."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      began = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - began)
  return {name: float(np.median(t)) for name, t in times.items()}


def layers():
  key_x, key_k = jax.random.split(jax.random.key(0))
  for s, c, o in LAYERS:
    x = jax.random.normal(key_x, (1, s + 2, s + 2, c))
    kernel = jax.random.normal(key_k, (3, 3, c, o)) / (3 * c ** 0.5)
    variants = {"direct f32": (jax.jit(direct), ()), "direct bf16": (jax.jit(direct, static_argnums=2), (jnp.bfloat16,)),
                "winograd f32": (jax.jit(winograd.conv3x3_valid), ()),
                "winograd bf16": (jax.jit(winograd.conv3x3_valid, static_argnums=2), (jnp.bfloat16,)),
                "winograd4 f32": (jax.jit(winograd.conv3x3_valid, static_argnums=(2, 3)), (jnp.float32, 4))}
    reference = direct(x, kernel)
    flops = 2 * s * s * c * o * 9
    seconds = medians({n: functools.partial(f, x, kernel, *a) for n, (f, a) in variants.items()}, 9)
    for name, (f, a) in variants.items():
      error = float(jnp.max(jnp.abs(f(x, kernel, *a) - reference)) / jnp.max(jnp.abs(reference)))
      print(f"{s}x{s}x{c}->{o}  {name:14s} {flops / seconds[name] / 1e9:7.1f} GFLOP/s  max rel. error {error:.1e}",
            flush=True)


def whole_encoders(batch=4, backbones=("vgg16_hed", "wide_resnet50_2")):
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8))
  for backbone in backbones:
    model = model_lib.build(Config(backbone=backbone, image_size=256))
    variables = encoders.init_variables(model.encoder, jax.random.key(0), 256)
    compiled = {}
    for name, policy in POLICIES.items():
      encoders.WINOGRAD_CHANNELS, encoders.WINOGRAD_4X4_CHANNELS, encoders.WINOGRAD_4X4_SIZE = policy
      compiled[name] = jax.jit(functools.partial(model_lib.encode_images, model)).lower(variables, images).compile()
    # The encoder_dtype option: F(2x2)'s matmuls and the direct convolutions in bf16 (never F(4x4)).
    encoders.WINOGRAD_CHANNELS, encoders.WINOGRAD_4X4_CHANNELS, encoders.WINOGRAD_4X4_SIZE = POLICIES[DEFAULT]
    half = model_lib.build(Config(backbone=backbone, image_size=256, encoder_dtype="bfloat16"))
    compiled["encoder_dtype bfloat16"] = jax.jit(functools.partial(model_lib.encode_images, half)).lower(
        variables, images).compile()
    seconds = medians({n: functools.partial(f, variables, images) for n, f in compiled.items()}, 7)
    for name, t in seconds.items():
      print(f"{backbone} at 256 px, {name}: {batch / t:.2f} images/s", flush=True)


def main(_):
  if FLAGS.part in ("all", "layers"):
    layers()
  if FLAGS.part in ("all", "encoders"):
    whole_encoders(backbones=FLAGS.backbones)


if __name__ == "__main__":
  app.run(main)
