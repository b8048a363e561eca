"""From per-layer log-likelihoods to anomaly maps and image scores (SPEC section 5).

Per layer: exp(log p - max), upsampled bilinearly (align_corners=True, as the original code) to the input
size; the layers are summed and the map is `map_max - sum`, so likely pixels score low. The image score is
the map's maximum.

Where the two maxima come from is the `normalization`:
  "train"    - constants fixed from the training images (`Normalization` below): an image's map and score
               do not depend on the other images scored with it. The default.
  "test_set" - maxima over every image scored together (the original code).
  "batch"    - maxima over each batch (anomalib): a map depends on its batch.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Normalization(NamedTuple):
  """Per-layer max of log p / C, (L,), and the max of the summed likelihood map."""
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


def upsample(maps, size: int):
  """Bilinear, align_corners=True: (B, h, w) -> (B, size, size), as two small matmuls."""
  _, h, w = maps.shape
  rows = jnp.asarray(_interpolation_matrix(size, h))
  cols = jnp.asarray(_interpolation_matrix(size, w))
  return jnp.einsum("sh,bhw,tw->bst", rows, maps, cols, precision=jax.lax.Precision.HIGHEST)


def likelihood_map(layer_log_probs, layer_max, image_size: int):
  """Sum over layers of the upsampled exp(log p - layer max): (B, S, S); high where the image is normal."""
  total = 0.0
  for log_p, top in zip(layer_log_probs, layer_max):
    total = total + upsample(jnp.exp(log_p - top), image_size)
  return total


def batch_layer_max(layer_log_probs):
  """Per-layer maxima over everything given, (L,)."""
  return jnp.stack([jnp.max(log_p) for log_p in layer_log_probs])


def anomaly_maps(layer_log_probs, image_size: int, normalization: Normalization | None = None):
  """Anomaly maps (B, S, S) and image scores (B,).

  With `normalization=None` the maxima come from the given layers themselves (anomalib's per-batch
  behaviour, or the original's whole-test-set behaviour when every image is passed at once).
  """
  if normalization is None:
    layer_max = batch_layer_max(layer_log_probs)
    likelihood = likelihood_map(layer_log_probs, layer_max, image_size)
    map_max = jnp.max(likelihood)
  else:
    layer_max, map_max = normalization
    likelihood = likelihood_map(layer_log_probs, layer_max, image_size)
  maps = map_max - likelihood
  return maps, jnp.max(maps, axis=(1, 2))
