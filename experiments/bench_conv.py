"""Convolution speed on this machine: XLA's convolution against im2col + matmul, float32 against bfloat16
(float32 accumulation), on three 3x3 layers shaped like VGG16's at 256 px input.

    python experiments/bench_conv.py

It answers whether the encoder could run faster in another form or precision: GFLOP/s of each variant
(best of 3) and its largest error relative to the float32 convolution.
"""

import time

import jax
import jax.numpy as jnp
from jax import lax

LAYERS = ((4, 256, 64, 64), (8, 64, 256, 256), (8, 32, 512, 512))  # batch, size, in, out channels
NHWC = ("NHWC", "HWIO", "NHWC")


def conv(x, kernel, dtype):
  return lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=NHWC, preferred_element_type=jnp.float32)


def patches_matmul(x, kernel, dtype):
  """im2col with XLA's patch extraction (features ordered channel-major), then one matmul."""
  kh, kw, c, o = kernel.shape
  patches = lax.conv_general_dilated_patches(x.astype(dtype), (kh, kw), (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=NHWC)
  weights = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(c * kh * kw, o).astype(dtype)
  return jnp.dot(patches, weights, preferred_element_type=jnp.float32)


def shifted_matmul(x, kernel, dtype):
  """im2col as nine shifted slices concatenated along channels, then one matmul."""
  kh, kw, c, o = kernel.shape
  padded = jnp.pad(x.astype(dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(kh) for j in range(kw)], axis=-1)
  return jnp.dot(patches, kernel.reshape(kh * kw * c, o).astype(dtype), preferred_element_type=jnp.float32)


def best_seconds(fn, *args, repeats=3):
  fn(*args).block_until_ready()
  times = []
  for _ in range(repeats):
    began = time.perf_counter()
    fn(*args).block_until_ready()
    times.append(time.perf_counter() - began)
  return min(times)


def main():
  key_x, key_k = jax.random.split(jax.random.key(0))
  for b, s, c, o in LAYERS:
    x = jax.random.normal(key_x, (b, s, s, c))
    kernel = jax.random.normal(key_k, (3, 3, c, o)) / (3 * c ** 0.5)
    flops = 2 * b * s * s * c * o * 9
    reference = conv(x, kernel, jnp.float32)
    for name, fn in (("conv", conv), ("im2col", patches_matmul), ("slices", shifted_matmul)):
      for dtype in (jnp.float32, jnp.bfloat16):
        jitted = jax.jit(fn, static_argnums=2)
        error = float(jnp.max(jnp.abs(jitted(x, kernel, dtype) - reference)) / jnp.max(jnp.abs(reference)))
        seconds = best_seconds(jitted, x, kernel, dtype)
        print(f"{b}x{s}x{s}x{c}->{o}  {name:7s} {jnp.dtype(dtype).name:9s} {flops / seconds / 1e9:7.1f} GFLOP/s"
              f"  max rel. error {error:.1e}", flush=True)


if __name__ == "__main__":
  main()
