"""Batches of numpy arrays from an `ImageSet`: resized, maybe rotated, in a reproducible order, prefetched.

Images stay uint8 RGB all the way to the device (a quarter of float32's transfer) unless asked to stay
unrounded after resizing (`dtype="float32"`, values in [0, 1]); the model subtracts its encoder's mean and
divides by its std there. Decoding and resizing run on a small thread pool (PIL releases the GIL for both)
and whole batches are assembled in a background thread, `prefetch` batches ahead.
"""

import concurrent.futures
import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
from PIL import Image

from cflow_jax.config import IMAGE_DTYPES

# Resizing filters by config name: O resizes with PIL's ANTIALIAS, which is Lanczos; anomalib with
# torchvision's antialiased bilinear, which PIL's bilinear matches (PIL filters widen when shrinking).
IMAGE_RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR}
# Bilinear keeps a rotated image smooth; a mask must stay 0/1, so it takes the nearest pixel.
ROTATE_RESAMPLE = Image.Resampling.BILINEAR
# Decoding and resizing threads; PIL releases the GIL, so they scale with the cores.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def batches(images, batch_size: int, image_size: int, *, seed: int | None = None, epoch: int = 0,
            rotation: float = 0.0, drop_remainder: bool = False, prefetch: int = 2,
            workers: int | None = None, resample: str = "lanczos", dtype: str = "uint8") -> Iterator[dict]:
  """Yields dicts of one batch each:
    image (B, S, S, 3) RGB, uint8 or float32 in [0, 1] as `dtype` says, mask (B, S, S) uint8 0/1,
    label (B,) int32, defect and filename: lists of B str.

  seed None: file order, no augmentation. seed given: shuffled, and each image turned by an angle uniform in
  +-`rotation` degrees (corners filled black), both drawn from (seed, epoch) alone, so that a resumed run
  regenerates any epoch exactly. The last batch is smaller unless `drop_remainder`. `workers` threads decode
  and resize (default: DEFAULT_WORKERS), with the filter `resample` names; prefetch 0 makes everything
  synchronous. For many epochs over the same images, pass `images.resized(image_size)` to decode and
  resize only once.
  """
  if rotation and seed is None:
    raise ValueError("Random rotation needs a seed; pass seed= (and epoch=) to batches().")
  order, angles = epoch_plan(len(images), seed, epoch, rotation)
  stop = len(order) - batch_size + 1 if drop_remainder else len(order)
  pool = concurrent.futures.ThreadPoolExecutor(workers or DEFAULT_WORKERS)

  def batch(start):
    indices = order[start:start + batch_size]
    examples = list(pool.map(lambda i: preprocess(images[i], image_size, angles[i], resample, dtype),
                             indices))
    return dict(image=np.stack([e["image"] for e in examples]),
                mask=np.stack([e["mask"] for e in examples]),
                label=np.array([e["label"] for e in examples], np.int32),
                defect=[e["defect"] for e in examples],
                filename=[e["filename"] for e in examples])

  try:
    yield from _prefetched((batch(start) for start in range(0, max(stop, 0), batch_size)), prefetch)
  finally:
    pool.shutdown(cancel_futures=True)


def epoch_plan(count: int, seed: int | None, epoch: int, rotation: float) -> tuple[np.ndarray, np.ndarray]:
  """(order of the examples, rotation angle of each example in degrees) for one epoch."""
  if seed is None:
    return np.arange(count), np.zeros(count)
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(count)  # drawn first, so the order does not depend on `rotation`
  angles = rng.uniform(-rotation, rotation, count) if rotation else np.zeros(count)
  return order, angles


def preprocess(example: dict, image_size: int, angle: float = 0.0, resample: str = "lanczos",
               dtype: str = "uint8") -> dict:
  """The example with image (S, S, 3) and mask (S, S) resized to S = image_size, then turned by `angle`;
  the image as `dtype` (see IMAGE_DTYPES)."""
  image, mask = _as_dtype(example["image"], dtype), example["mask"]
  if image.shape[:2] != (image_size, image_size):
    image = _pil(image, lambda im: im.resize((image_size, image_size), IMAGE_RESAMPLE[resample]))
    mask = np.asarray(Image.fromarray(mask).resize((image_size, image_size), Image.Resampling.NEAREST))
  if angle:
    image = _pil(image, lambda im: im.rotate(angle, ROTATE_RESAMPLE))
    mask = np.asarray(Image.fromarray(mask).rotate(angle, Image.Resampling.NEAREST))
  return dict(example, image=image, mask=mask)


def _as_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
  """uint8 rounds a resized image to whole levels, as PIL returns it (O's input); float32 keeps it
  unrounded in [0, 1], as torchvision resizes float tensors (anomalib's input). Rounding an enlarged smooth
  gradient leaves steps that edge-like features (HED's) respond to."""
  if dtype not in IMAGE_DTYPES:
    raise ValueError(f"dtype must be one of {IMAGE_DTYPES}, got {dtype!r}")
  if dtype == "float32":
    return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
  return image if image.dtype == np.uint8 else np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _pil(image: np.ndarray, op) -> np.ndarray:
  """A PIL operation on an RGB image: uint8 as one RGB image, float32 channel by channel in PIL's 32-bit
  float mode (same filters, no rounding)."""
  if image.dtype == np.uint8:
    return np.asarray(op(Image.fromarray(image)))
  return np.stack([np.asarray(op(Image.fromarray(image[..., c], mode="F"))) for c in range(image.shape[-1])],
                  axis=-1)


class _Failure:
  def __init__(self, error):
    self.error = error


_DONE = object()


def _prefetched(items: Iterator, size: int) -> Iterator:
  """Yields from `items`, which a background thread advances up to `size` items ahead.

  An exception in the thread is re-raised here; closing this generator stops the thread.
  """
  if size <= 0:
    yield from items
    return
  ready = queue.Queue(maxsize=size)
  stopped = threading.Event()

  def put(item):
    while not stopped.is_set():
      try:
        ready.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(item):
          return
    except BaseException as error:  # handed to the consumer, which re-raises it
      put(_Failure(error))
      return
    put(_DONE)

  thread = threading.Thread(target=produce, name="cflow_jax-prefetch", daemon=True)
  thread.start()
  try:
    while (item := ready.get()) is not _DONE:
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stopped.set()
    thread.join()
