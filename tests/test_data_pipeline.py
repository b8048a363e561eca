"""The input pipeline: batch contents, reproducible order and rotation, resizing, the background thread."""

import threading

import numpy as np
import pytest

from cflow_jax import data
from cflow_jax.data import input_pipeline


def _examples(count: int, size=(60, 80)) -> list[dict]:
  """In-memory stand-ins for an ImageSet: a bright square on black, the square as the mask."""
  examples = []
  for i in range(count):
    image = np.zeros((*size, 3), np.uint8)
    mask = np.zeros(size, np.uint8)
    image[15:45, 25:55] = 255
    mask[15:45, 25:55] = 1
    examples.append(dict(image=image, mask=mask, label=i % 2, defect="good" if i % 2 == 0 else "dent",
                         filename=f"{i:02d}.png"))
  return examples


def test_batch_contents_and_file_order():
  batches = list(data.batches(_examples(10), 4, 32))
  assert [len(b["label"]) for b in batches] == [4, 4, 2]
  first = batches[0]
  assert first["image"].shape == (4, 32, 32, 3) and first["image"].dtype == np.uint8
  assert first["mask"].shape == (4, 32, 32) and set(np.unique(first["mask"])) == {0, 1}
  assert first["label"].dtype == np.int32 and first["label"].tolist() == [0, 1, 0, 1]
  assert first["defect"] == ["good", "dent", "good", "dent"]
  assert sum((b["filename"] for b in batches), []) == [f"{i:02d}.png" for i in range(10)]
  assert [len(b["label"]) for b in data.batches(_examples(10), 4, 32, drop_remainder=True)] == [4, 4]


def test_shuffle_and_rotation_depend_on_seed_and_epoch_only():
  examples = _examples(12)

  def epoch(seed, number, prefetch=2):
    return list(data.batches(examples, 5, 48, seed=seed, epoch=number, rotation=10.0, prefetch=prefetch))

  again, synchronous, other_epoch = epoch(3, 1), epoch(3, 1, prefetch=0), epoch(3, 2)
  for a, b in zip(epoch(3, 1), again):
    assert a["filename"] == b["filename"] and np.array_equal(a["image"], b["image"])
  for a, b in zip(again, synchronous):
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
  order = [b["filename"] for b in again]
  assert order != [b["filename"] for b in other_epoch]
  assert sorted(sum(order, [])) == [f"{i:02d}.png" for i in range(12)]
  unrotated = list(data.batches(examples, 5, 48, seed=3, epoch=1))
  assert [b["filename"] for b in unrotated] == order, "the order does not depend on the rotation"
  assert not np.array_equal(unrotated[0]["mask"], again[0]["mask"])
  with pytest.raises(ValueError, match="seed"):
    next(data.batches(examples, 5, 48, rotation=5.0))


def test_rotation_turns_image_and_mask_together():
  (batch,) = data.batches(_examples(8), 8, 64, seed=0, rotation=30.0)
  for image, mask in zip(batch["image"][..., 0], batch["mask"]):
    inside, outside = image[mask == 1], image[mask == 0]
    assert inside.mean() > 230 and outside.mean() < 20


def test_resize_is_antialiased_and_masks_stay_binary():
  stripes = np.zeros((64, 64, 3), np.uint8)
  stripes[:, ::2] = 255
  example = dict(image=stripes, mask=(stripes[..., 0] // 255), label=1, defect="x", filename="s.png")
  out = input_pipeline.preprocess(example, 16)
  assert abs(out["image"].mean() - 127.5) < 3 and out["image"].std() < 8, "nearest would keep 0/255 stripes"
  assert set(np.unique(out["mask"])) <= {0, 1}


def test_resample_picks_the_filter_and_resized_sets_remember_it():
  """lanczos (the original) rings where bilinear (anomalib) stays within its neighbours: enlarge a step."""
  step = np.zeros((8, 8, 3), np.uint8)
  step[:, 4:] = 200
  example = dict(image=step, mask=np.zeros((8, 8), np.uint8), label=0, defect="good", filename="s.png")
  lanczos = input_pipeline.preprocess(example, 32)["image"].astype(int)
  bilinear = input_pipeline.preprocess(example, 32, resample="bilinear")["image"].astype(int)
  assert bilinear.min() == 0 and bilinear.max() == 200 and lanczos.max() > 200, "lanczos overshoots"
  images = data.ImageSet([example], name="t", category="c", split="train", has_masks=False)
  once = images.resized(32, resample="bilinear")
  assert once.resized(32, resample="bilinear") is once
  np.testing.assert_array_equal(once[0]["image"], bilinear)
  np.testing.assert_array_equal(once.resized(32)[0]["image"], once[0]["image"])  # held pixels are kept
  np.testing.assert_array_equal(images.resized(32)[0]["image"], lanczos)


def test_float32_images_are_the_same_resize_unrounded():
  """float32 keeps what uint8 rounds: within half a level of it, yet between levels; rotation and batches
  keep the dtype, and resized sets remember it."""
  ramp = np.tile(np.linspace(0, 90, 7).round().astype(np.uint8)[None, :, None], (7, 1, 3))  # a gradient
  example = dict(image=ramp, mask=np.zeros((7, 7), np.uint8), label=0, defect="good", filename="r.png")
  exact = {}
  for resample in ("lanczos", "bilinear"):
    rounded = input_pipeline.preprocess(example, 32, resample=resample)["image"]
    exact[resample] = input_pipeline.preprocess(example, 32, resample=resample, dtype="float32")["image"]
    levels = exact[resample] * 255
    assert exact[resample].dtype == np.float32 and levels.shape == rounded.shape
    assert np.abs(np.clip(levels, 0, 255) - rounded).max() <= 0.5 + 1e-3  # uint8 also clips lanczos' ringing
    assert np.mean(np.abs(levels - np.round(levels)) > 0.05) > 0.5, "most pixels fall between levels"
  same_size = input_pipeline.preprocess(example, 7, dtype="float32")["image"]
  np.testing.assert_array_equal(same_size, ramp / np.float32(255))
  turned = input_pipeline.preprocess(example, 32, angle=10.0, dtype="float32")["image"]
  assert turned.dtype == np.float32 and np.abs(np.clip(turned * 255, 0, 255) - input_pipeline.preprocess(
      example, 32, angle=10.0)["image"]).max() <= 1.5  # rounded twice (resize, rotation) in uint8
  images = data.ImageSet([example] * 3, name="t", category="c", split="train", has_masks=False)
  held = images.resized(32, dtype="float32")
  assert held.resized(32, dtype="float32") is held and held.resized(32) is not held
  (batch,) = data.batches(held, 3, 32, dtype="float32")
  assert batch["image"].dtype == np.float32
  np.testing.assert_array_equal(batch["image"][0], exact["lanczos"])


class _Failing(list):
  def __getitem__(self, index):
    if index == 6:
      raise OSError("disk gone")
    return super().__getitem__(index)


def test_errors_reach_the_consumer_and_closing_stops_the_thread():
  with pytest.raises(OSError, match="disk gone"):
    list(data.batches(_Failing(_examples(10)), 2, 16))
  iterator = data.batches(_examples(40), 2, 16, prefetch=3)
  next(iterator)
  iterator.close()
  assert not [t for t in threading.enumerate() if t.name == "cflow_jax-prefetch"]


def test_resized_once_gives_the_same_batches():
  images = data.ImageSet(_examples(7), name="test", category="squares", split="train", has_masks=True)
  resized = images.resized(32)
  assert (resized[0]["image"].shape, resized.category, resized.has_masks) == ((32, 32, 3), "squares", True)
  assert resized.resized(32) is resized  # a set already held at that size is not processed again
  assert resized.resized(16)[0]["image"].shape == (16, 16, 3)
  for a, b in zip(data.batches(images, 3, 32, seed=5, rotation=8.0),
                  data.batches(resized, 3, 32, seed=5, rotation=8.0)):
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
