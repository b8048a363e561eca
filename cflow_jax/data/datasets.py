"""`load`: one split of a dataset, prepared with tfds on first use, as a random-access `ImageSet`.

Two folders are involved, and `load` keeps them apart:
  data_dir  where the raw files are (yours, never written to):
              mvtec_ad       the extracted archive's root, holding bottle/, cable/, ... (or a category's own)
              magnetic_tile  the folder holding MT_Free/, MT_Blowhole/, ...
              folder         your folder in MVTec's layout (`files.MVTEC_LAYOUT`), or its parent + `category`
              demo           unused: the demo is drawn on the spot
            None (mvtec_ad, magnetic_tile): look in `<tfds_dir>/downloads/manual/`, else download.
  tfds_dir  where tfds keeps prepared datasets and downloads: the argument, else $TFDS_DATA_DIR, else
            ~/tensorflow_datasets. A dataset prepared there once is reused, whatever data_dir says later.
"""

import collections.abc
import concurrent.futures
import io
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cflow_jax.data import builders, demo, files, input_pipeline
from cflow_jax.errors import UserError

DATASETS = ("mvtec_ad", "magnetic_tile", "folder", "demo")
# "folder" has no fixed categories: its category is the folder's name.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec_ad": builders.MVTEC_CATEGORIES,
    "magnetic_tile": ("magnetic_tile",),
    "folder": (),
    "demo": tuple(demo.TEXTURES),
}


class ImageSet(collections.abc.Sequence):
  """One split of a prepared dataset; `images[i]` is example i, decoded from disk on each access.

  An example is a dict: image (H, W, 3) uint8 RGB at the file's own size (grey repeated to 3 channels),
  mask (H, W) uint8 0/1, label int (0 good, 1 anomalous), defect str ("good" or the type), filename str.
  Attributes: name (the dataset), category, split, has_masks (False: only image-level labels, every
  mask is zero, and pixel-level metrics mean nothing).
  """

  def __init__(self, examples: collections.abc.Sequence, *, name: str, category: str, split: str,
               has_masks: bool, image_size: int | None = None, resample: str | None = None,
               dtype: str | None = None):
    self._examples = examples
    self.name, self.category, self.split, self.has_masks = name, category, split, has_masks
    # Set when every example is already held resized to this size, with this filter, in this dtype.
    self.image_size, self.resample, self.dtype = image_size, resample, dtype

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} images")
    return self._examples[index % len(self)]

  def subset(self, indices) -> "ImageSet":
    """The images at `indices`, in that order (read on access, as held here)."""
    return ImageSet(_Picked(self._examples, indices), name=self.name, category=self.category,
                    split=self.split, has_masks=self.has_masks, image_size=self.image_size,
                    resample=self.resample, dtype=self.dtype)

  def resized(self, image_size: int, workers: int | None = None, resample: str = "lanczos",
              dtype: str = "uint8") -> "ImageSet":
    """This set decoded and resized to (image_size, image_size) once, held in memory.

    Costs len * image_size^2 * 4 bytes (a 256 px MVTec class: under 100 MB; 13 bytes in float32); then
    `batches` only shuffles, rotates and stacks, which pays off from the second epoch on.
    """
    if (self.image_size, self.resample, self.dtype) == (image_size, resample, dtype):
      return self
    with concurrent.futures.ThreadPoolExecutor(workers or input_pipeline.DEFAULT_WORKERS) as pool:
      examples = list(pool.map(lambda i: input_pipeline.preprocess(self[i], image_size, 0.0, resample, dtype),
                                 range(len(self))))
    return ImageSet(examples, name=self.name, category=self.category, split=self.split,
                    has_masks=self.has_masks, image_size=image_size, resample=resample, dtype=dtype)

  def __repr__(self) -> str:
    return (f"ImageSet({self.name}/{self.category}, {self.split}, {len(self)} images, "
            f"has_masks={self.has_masks})")


class _Picked(collections.abc.Sequence):
  """Some items of a sequence, by index, read on access."""

  def __init__(self, items, indices):
    self._items, self._indices = items, [int(i) for i in indices]

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    return self._items[self._indices[index]]


class _Decoded(collections.abc.Sequence):
  """Examples decoded on access from a tfds data source (thread-safe random access, images left encoded)."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[index]
    return dict(image=_decode(example["image"], "RGB"), mask=_decode(example["mask"], "L"),
                label=int(example["label"]), defect=example["defect"].decode(),
                filename=example["filename"].decode())


def load(dataset: str, split: str, category: str | None = None, data_dir: str | None = None, *,
         tfds_dir: str | None = None) -> ImageSet:
  """One split ("train": good images only, or "test") of a dataset, preparing it first if need be.

  See the module docstring for `data_dir` and `tfds_dir`. `category` may be None for datasets with a
  single category (magnetic_tile) and for folder (then data_dir is the dataset's own folder).
  """
  if dataset not in DATASETS:
    raise UserError(f"Unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}.")
  if split not in builders.SPLITS:
    raise UserError(f"Unknown split {split!r}; choose one of {', '.join(builders.SPLITS)}.")
  tfds_dir = Path(tfds_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()
  source = Path(data_dir).expanduser() if data_dir is not None else None
  if dataset == "folder":
    root = _folder_root(source, category)
    category = root.name
    builder = builders.AnomalyFolder(source=root, data_dir=str(tfds_dir))
  else:
    category = _check_category(dataset, category)
    config = None if dataset == "magnetic_tile" else category
    builder = builders.BUILDERS[dataset](source=source, config=config, data_dir=str(tfds_dir))
  if not builder.is_prepared():
    builder.download_and_prepare(file_format="array_record")
  # Decoded here rather than by tfds, which would look for OpenCV first and warn when it is missing.
  encoded = {"image": tfds.decode.SkipDecoding(), "mask": tfds.decode.SkipDecoding()}
  return ImageSet(_Decoded(builder.as_data_source(split, decoders=encoded)), name=dataset, category=category,
                  split=split, has_masks=bool(builder.info.metadata["has_masks"]))


def _decode(data: bytes, mode: str) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert(mode))


def _check_category(dataset: str, category: str | None) -> str:
  valid = CATEGORIES[dataset]
  if category is None and len(valid) == 1:
    return valid[0]
  if category not in valid:
    raise UserError(f"Unknown {dataset} category {category!r}; choose one of {', '.join(valid)}.")
  return category


def _folder_root(source: Path | None, category: str | None) -> Path:
  if source is None:
    raise UserError("The folder dataset needs data_dir: a folder in MVTec AD's layout (ground_truth is "
                    f"optional):\n{files.MVTEC_LAYOUT}")
  root = source / category if category else source
  files.check_mvtec_layout(root, "Point data_dir (and category) at a folder in MVTec AD's layout.")
  return root
