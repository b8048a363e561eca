"""The demo dataset: crops of real texture photographs with synthetic defects whose masks are exact.

The photographs are scikit-image's bundled 512x512 greyscale textures (`skimage.data.brick/grass/gravel`,
shipped inside the wheel, so nothing is downloaded). Training crops come from the top 320 rows of a
texture, test crops from the bottom 192, so no test pixel was seen in training. A defect changes only the
pixels of its mask (so the mask is exact):
  scratch  a thin bright or dark polyline;           hole   a dark ellipse;
  stain    a darkened blob of overlapping ellipses;  patch  a rectangle of another of the textures.
Everything is drawn with numpy generators seeded from the category and split names: the same bytes on
every machine and run.
"""

import functools
import zlib

import numpy as np
import skimage.data
import skimage.draw

TEXTURES = {"brick": skimage.data.brick, "grass": skimage.data.grass, "gravel": skimage.data.gravel}
DEFECTS = ("scratch", "hole", "stain", "patch")
CROP = 128  # pixels, square
TRAIN_IMAGES = 48
TEST_GOOD = 12
TEST_PER_DEFECT = 6
_TRAIN_ROWS = 320  # rows [0, 320) feed training crops, rows [320, 512) test crops


def examples(category: str, split: str):
  """Yields (defect, image (CROP, CROP) uint8, mask (CROP, CROP) uint8 0/1) for one split, in order."""
  texture = _texture(category)
  rng = np.random.default_rng(zlib.crc32(f"{category}/{split}".encode()))
  if split == "train":
    for _ in range(TRAIN_IMAGES):
      yield "good", _crop(texture, rng, 0, _TRAIN_ROWS), np.zeros((CROP, CROP), np.uint8)
    return
  for _ in range(TEST_GOOD):
    yield "good", _crop(texture, rng, _TRAIN_ROWS, texture.shape[0]), np.zeros((CROP, CROP), np.uint8)
  for defect in DEFECTS:
    for _ in range(TEST_PER_DEFECT):
      image = _crop(texture, rng, _TRAIN_ROWS, texture.shape[0])
      yield (defect, *add_defect(image, defect, rng, category))


def add_defect(image: np.ndarray, defect: str, rng: np.random.Generator, category: str):
  """(the (CROP, CROP) uint8 image with one defect drawn, its 0/1 mask); patches come from other textures."""
  if defect == "patch":
    others = [name for name in TEXTURES if name != category]
    other = _texture(others[rng.integers(len(others))])
    mask = _rectangle(rng)
    painted = np.where(mask, _crop(other, rng, 0, other.shape[0]), image)
  else:
    mask = {"scratch": _scratch, "hole": _hole, "stain": _stain}[defect](rng)
    painted = _paint(defect, image.astype(np.float32), mask, rng)
  return np.clip(painted, 0, 255).round().astype(np.uint8), mask.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _texture(name):
  return TEXTURES[name]()


def _crop(texture, rng, row_start, row_stop):
  top = rng.integers(row_start, row_stop - CROP + 1)
  left = rng.integers(0, texture.shape[1] - CROP + 1)
  return texture[top:top + CROP, left:left + CROP]


def _paint(defect, image, mask, rng):
  """The image with the pixels under `mask` replaced; each defect keeps some of the texture beneath."""
  if defect == "scratch":
    value = 245.0 if rng.random() < 0.5 else 15.0
    painted = 0.2 * image + 0.8 * value
  elif defect == "hole":
    painted = 0.15 * image + 10.0
  else:  # stain
    painted = 0.5 * image + 15.0
  return np.where(mask, painted, image)


def _scratch(rng):
  """A polyline of 2-3 segments, 1-3 px wide, crossing a good part of the crop."""
  mask = np.zeros((CROP, CROP), bool)
  point = rng.uniform(0.15, 0.85, 2) * CROP
  angle = rng.uniform(0, 2 * np.pi)
  for _ in range(rng.integers(2, 4)):
    angle += rng.uniform(-0.6, 0.6)
    step = rng.uniform(0.15, 0.3) * CROP * np.array([np.sin(angle), np.cos(angle)])
    end = np.clip(point + step, 0, CROP - 1)
    rows, cols = skimage.draw.line(*point.round().astype(int), *end.round().astype(int))
    mask[rows, cols] = True
    point = end
  thick = mask.copy()
  width = rng.integers(1, 4)
  for down in range(width):  # a width x width square brush, without importing skimage.morphology (slow)
    for right in range(width):
      thick[down:, right:] |= mask[:CROP - down, :CROP - right]
  return thick


def _hole(rng):
  mask = np.zeros((CROP, CROP), bool)
  radii = rng.uniform(4, 10, 2)
  center = rng.uniform(0.2, 0.8, 2) * CROP
  rows, cols = skimage.draw.ellipse(*center, *radii, shape=mask.shape, rotation=rng.uniform(0, np.pi))
  mask[rows, cols] = True
  return mask


def _stain(rng):
  mask = np.zeros((CROP, CROP), bool)
  center = rng.uniform(0.3, 0.7, 2) * CROP
  for _ in range(3):
    offset = rng.uniform(-8, 8, 2)
    rows, cols = skimage.draw.ellipse(*(center + offset), *rng.uniform(6, 16, 2), shape=mask.shape,
                                      rotation=rng.uniform(0, np.pi))
    mask[rows, cols] = True
  return mask


def _rectangle(rng):
  mask = np.zeros((CROP, CROP), bool)
  height, width = rng.integers(16, 40, 2)
  top, left = rng.integers(0, CROP - height), rng.integers(0, CROP - width)
  mask[top:top + height, left:left + width] = True
  return mask
