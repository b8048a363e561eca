"""Winograd's F(2x2, 3x3) and F(4x4, 3x3) equal the direct convolution, alone and inside the encoders."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cflow_jax import encoders, winograd


def _direct_valid(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


# F(4x4)'s transforms scale by up to 8 (its points are 0, +-1, +-2): a larger float32 error than F(2x2)'s.
_TOLERANCE = {2: 1e-5, 4: 5e-5}


@pytest.mark.parametrize("output_tile", winograd.OUTPUT_TILES)
@pytest.mark.parametrize("height,width,channels,features", [(10, 10, 8, 16), (9, 12, 5, 3), (7, 7, 32, 8),
                                                             (3, 3, 4, 4), (13, 18, 16, 8)])
def test_equals_direct_convolution(height, width, channels, features, output_tile):
  """Outputs that fill whole blocks and ones that do not (those are computed on more rows or columns of
  zeros and cropped)."""
  x = jax.random.normal(jax.random.key(0), (2, height, width, channels))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, channels, features))
  ours = jax.jit(winograd.conv3x3_valid, static_argnums=(2, 3))(x, kernel, jnp.float32, output_tile)
  reference = _direct_valid(x, kernel)
  assert ours.shape == reference.shape == (2, height - 2, width - 2, features)
  error = float(jnp.max(jnp.abs(ours - reference)) / jnp.max(jnp.abs(reference)))
  assert error < _TOLERANCE[output_tile]


def test_bfloat16_matmuls_round_the_transformed_tiles_only():
  """dtype bfloat16 (the encoder's bfloat16 option): the transform-domain matmuls take bfloat16 inputs
  and sum in float32, so the result moves by bfloat16 rounding (8-bit mantissa), no more."""
  x = jax.random.normal(jax.random.key(0), (2, 10, 12, 64))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 64, 32))
  reference = _direct_valid(x, kernel)
  half = jax.jit(winograd.conv3x3_valid, static_argnums=2)(x, kernel, jnp.bfloat16)
  assert half.dtype == jnp.float32
  error = float(jnp.max(jnp.abs(half - reference)) / jnp.max(jnp.abs(reference)))
  assert 1e-4 < error < 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_encoder_features_are_the_same_with_and_without_winograd(padding, monkeypatch):
  """ResNet-18 at 64 px: layer3/layer4's 3x3 convolutions (256 and 512 channels) take Winograd's path on
  the CPU; forcing the direct path everywhere changes the taps by float rounding only."""
  module, spec = encoders.create_encoder("resnet18", padding=padding)
  variables = encoders.init_variables(module, jax.random.key(0), 64)
  images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  extract = lambda: jax.jit(lambda v, x: encoders.extract(module, spec, v, x))(variables, images)
  with_winograd = extract()
  calls = []
  monkeypatch.setattr(winograd, "conv3x3_valid",
                      lambda x, k, dtype, tile: calls.append(tile) or _direct_valid(x, k))
  extract()
  assert calls, "no convolution took the Winograd path"
  monkeypatch.setattr(encoders, "WINOGRAD_CHANNELS", 10 ** 9)
  direct = extract()
  for a, b in zip(with_winograd, direct):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=0)


@pytest.mark.parametrize("dtype,expected_tile", [(jnp.float32, 4), (jnp.bfloat16, 2)])
def test_large_maps_take_the_4x4_tiles_in_float32(dtype, expected_tile, monkeypatch):
  """A 128-channel convolution on a 128 x 128 map runs as F(4x4, 3x3) in float32 and stays within
  F(4x4)'s rounding of the direct convolution; in bfloat16 it keeps F(2x2), whose transforms do not
  scale the tiles beyond what bfloat16's 8 bits hold."""
  x = jax.random.normal(jax.random.key(0), (1, 128, 128, 128))
  conv = encoders.Conv(features=8, kernel_size=3, dtype=dtype)
  variables = conv.init(jax.random.key(1), x)
  tiles = []
  real = winograd.conv3x3_valid
  monkeypatch.setattr(winograd, "conv3x3_valid", lambda *a: tiles.append(a[3]) or real(*a))
  ours = conv.apply(variables, x)
  assert tiles == [expected_tile]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  reference = _direct_valid(padded, variables["params"]["kernel"])
  error = float(jnp.max(jnp.abs(ours - reference)) / jnp.max(jnp.abs(reference)))
  assert error < (_TOLERANCE[4] if dtype == jnp.float32 else 2e-2)
