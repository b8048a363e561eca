"""From per-layer log-likelihoods to anomaly maps and image scores (docs/design.md section 7).

Per layer a likelihood term, upsampled bilinearly (align_corners=True, as the original code) to the input
size; the layers are summed and the map is `map_max - sum`, so likely pixels score low. The image score is
the map's maximum. The term (`likelihood`, with fixed constants c_l) is
  "exp"          exp(log p - c_l), c_l the layer's maximum (both references): in [0, 1], and every fiber
                 far below the maximum scores the same;
  "floored_log"  max(log p, c_l), c_l a low quantile of the training fibers' log p (ours, the default): as
                 bounded, so that no single fiber rules a map, but linear above the floor.
The references' rules below ("test_set", "batch") always use "exp". Optionally (`blur_sigma` > 0; neither
reference does it) the map is smoothed with a Gaussian, as anomalib does for PaDiM and PatchCore: the blur
is linear and separable, so it is folded into the upsampling matrices and costs nothing.

Where the two maxima come from is the `normalization`:
  "train"    - constants fixed from the training images (`Normalization` below): an image's map and score
               do not depend on the other images scored with it. The default.
  "test_set" - maxima over every image scored together (the original code).
  "batch"    - maxima over each batch (anomalib): a map depends on its batch.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Normalization(NamedTuple):
  """Per-layer constants c_l of log p / C, (L,), and the max of the summed likelihood map. `layer_max`
  keeps its name (checkpoints store it by name): it is the layer's maximum under the "exp" likelihood and
  its floor under "floored_log"."""
  layer_max: jnp.ndarray
  map_max: jnp.ndarray


def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) weights of 1-D linear interpolation with align_corners=True: output i samples the input at
  i * (in - 1) / (out - 1)."""
  if in_size == 1 or out_size == 1:
    return np.ones((out_size, in_size), np.float32) / in_size
  position = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  low = np.clip(np.floor(position).astype(int), 0, in_size - 2)
  frac = position - low
  weights = np.zeros((out_size, in_size), np.float64)
  weights[np.arange(out_size), low] = 1.0 - frac
  weights[np.arange(out_size), low + 1] += frac
  return weights.astype(np.float32)


def _blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
  """(size, size) weights of a 1-D Gaussian blur with reflected borders (d c b a | a b c d | d c b a, as
  scipy.ndimage's "reflect"), the kernel cut at `truncate` sigmas: every row sums to one. Reflected once:
  a kernel wider than the map (radius >= size) is clipped at the far border where scipy reflects again."""
  radius = int(truncate * sigma + 0.5)
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel /= kernel.sum()
  weights = np.zeros((size, size), np.float64)
  for i in range(size):
    j = i + offsets
    j = np.where(j < 0, -j - 1, j)
    j = np.where(j >= size, 2 * size - j - 1, j)
    np.add.at(weights[i], np.clip(j, 0, size - 1), kernel)
  return weights


@functools.lru_cache(maxsize=16)
def _resize_matrix(out_size: int, in_size: int, blur_sigma: float) -> np.ndarray:
  """Interpolation to out_size, then (if blur_sigma > 0) the blur along the same axis, as one matrix."""
  weights = _interpolation_matrix(out_size, in_size)
  if blur_sigma > 0:
    weights = (_blur_matrix(out_size, blur_sigma) @ weights).astype(np.float32)
  return weights


def upsample(maps, size: int, blur_sigma: float = 0.0):
  """Bilinear, align_corners=True: (B, h, w) -> (B, size, size), as two small matmuls; blurred with a
  Gaussian of `blur_sigma` output pixels when it is positive."""
  _, h, w = maps.shape
  rows = jnp.asarray(_resize_matrix(size, h, blur_sigma))
  cols = jnp.asarray(_resize_matrix(size, w, blur_sigma))
  return jnp.einsum("sh,bhw,tw->bst", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)


def likelihood_map(layer_log_probs, layer_constants, image_size: int, blur_sigma: float = 0.0,
                   likelihood: str = "exp"):
  """Sum over layers of the upsampled likelihood terms (module docstring): (B, S, S); high where the image
  is normal."""
  total = 0.0
  for log_p, c in zip(layer_log_probs, layer_constants):
    term = jnp.exp(log_p - c) if likelihood == "exp" else jnp.maximum(log_p, c)
    total = total + upsample(term, image_size, blur_sigma)
  return total


def layer_constant(log_p, likelihood: str, floor_quantile: float) -> float:
  """A layer's fixed constant c_l from its training fibers' log p / C (any shape, on the host): their
  maximum for "exp", their `floor_quantile`-quantile for "floored_log"."""
  log_p = np.asarray(log_p)
  return float(log_p.max() if likelihood == "exp" else np.quantile(log_p, floor_quantile))


def batch_layer_max(layer_log_probs):
  """Per-layer maxima over everything given, (L,)."""
  return jnp.stack([jnp.max(log_p) for log_p in layer_log_probs])


def anomaly_maps(layer_log_probs, image_size: int, normalization: Normalization | None = None,
                 blur_sigma: float = 0.0, likelihood: str = "exp"):
  """Anomaly maps (B, S, S) and image scores (B,).

  With `normalization=None` the maxima come from the given layers themselves (anomalib's per-batch
  behaviour, or the original's whole-test-set behaviour when every image is passed at once), and the
  likelihood is the references' "exp"; with fixed constants, `likelihood` says what they are.
  """
  if normalization is None:
    layer_max = batch_layer_max(layer_log_probs)
    summed = likelihood_map(layer_log_probs, layer_max, image_size, blur_sigma)
    map_max = jnp.max(summed)
  else:
    constants, map_max = normalization
    summed = likelihood_map(layer_log_probs, constants, image_size, blur_sigma, likelihood)
  maps = map_max - summed
  return maps, jnp.max(maps, axis=(1, 2))


# The one compiled map program per (shapes, size, blur, likelihood): scoring (`api`) and the normalisation
# pass (`train.fit_normalization`) share it, so that the pass compiles no map program of its own.
compiled_maps = jax.jit(anomaly_maps, static_argnums=(1, 3, 4))
