"""Examples from image files on disk, in MVTec AD's layout or Magnetic Tile's, ready for a tfds builder.

An example is what the builders store (see `builders.FEATURES`):
  image:    encoded bytes of the original file (PNG or JPEG, 8-bit grey or RGB, at its own size); any other
            format or mode (16-bit, palette, alpha, BMP, TIFF) is re-encoded once as an 8-bit PNG.
  mask:     a 0/1 PNG of the image's size, binarised here once (`binarize`); all zero for good images.
  label:    0 good, 1 anomalous.  defect: "good" or the defect type.  filename: path below the root.

Every image is decoded in full while preparing, so that a broken file fails then, with its name, and not
in the middle of training.
"""

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cflow_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_LAYOUT = """  <folder>/train/good/*.png                    defect-free training images
  <folder>/test/good/*.png                     defect-free test images
  <folder>/test/<defect>/*.png                 anomalous test images, one folder per defect type
  <folder>/ground_truth/<defect>/<stem>_mask.png  their masks (0/255), same size as the image"""
MAGNETIC_TILE_CLASSES = ("MT_Free", "MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")


def read_image(path: Path) -> tuple[bytes, tuple[int, int]]:
  """The image's encoded bytes (see the module docstring) and its (height, width)."""
  data = _read_bytes(path)
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.format in ("PNG", "JPEG") and image.mode in ("L", "RGB"):
        return data, (image.height, image.width)
      if image.mode.startswith("I"):  # 16-bit grey: PIL's convert("L") would clip, not rescale
        array = np.clip(np.asarray(image) / 257.0, 0, 255).round().astype(np.uint8)
      else:
        array = np.asarray(image.convert("L" if image.mode in ("1", "F") else "RGB"))
  except (OSError, SyntaxError, ValueError) as error:
    raise UserError(f"Cannot read image {path} ({_reason(error)}); replace or delete the file.") from error
  return png(array), array.shape[:2]


def read_mask(path: Path, size: tuple[int, int]) -> bytes:
  """A binarised 0/1 PNG of the mask file, which must have the image's (height, width)."""
  data = _read_bytes(path)
  try:
    with Image.open(io.BytesIO(data)) as mask:
      mask = np.asarray(mask.convert("L"))
  except (OSError, SyntaxError, ValueError) as error:
    raise UserError(f"Cannot read mask {path} ({_reason(error)}); replace or delete the file.") from error
  if mask.shape != size:
    raise UserError(f"Mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels but its image is "
                    f"{size[1]}x{size[0]}; a mask must have its image's size.")
  return png(binarize(mask))


def _reason(error: Exception) -> str:
  """PIL's reason, without the in-memory buffer it names instead of the file ("<_io.BytesIO object at
  0x...>"): the message names the file itself."""
  if isinstance(error, UnidentifiedImageError):
    return f"not an image in a format PIL reads ({', '.join(IMAGE_EXTENSIONS)})"
  return str(error)


def binarize(mask: np.ndarray) -> np.ndarray:
  """0/1 uint8 from a 0/255 mask (>= 128: Magnetic Tile's masks have anti-aliased edges) or a 0/1 mask."""
  threshold = 128 if mask.max(initial=0) > 1 else 1
  return (mask >= threshold).astype(np.uint8)


@functools.lru_cache(maxsize=16)
def empty_mask(size: tuple[int, int]) -> bytes:
  """An all-zero 0/1 PNG mask; cached since every good image of one size shares it."""
  return png(np.zeros(size, np.uint8))


def png(array: np.ndarray) -> bytes:
  """PNG bytes of an 8-bit grey (H, W) or RGB (H, W, 3) array."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def example(root: Path, image_path: Path, defect: str, mask_path: Path | None) -> tuple[str, dict]:
  """(key, example) for one image; the key is the file's path below `root`, unique in the dataset."""
  image, size = read_image(image_path)
  mask = read_mask(mask_path, size) if mask_path is not None else empty_mask(size)
  filename = image_path.relative_to(root).as_posix()
  return filename, dict(image=image, mask=mask, label=int(defect != "good"), defect=defect,
                        filename=filename)


def mvtec_examples(root: Path, split: str, has_masks: bool = True):
  """Yields (key, example) for one split of an MVTec-layout folder (see MVTEC_LAYOUT), in file order.

  With `has_masks` False the ground_truth folder is ignored and every mask is empty.
  """
  if split == "train":
    for path in _images(root / "train" / "good", "training images", required=True):
      yield example(root, path, "good", None)
    return
  defect_dirs = sorted(p for p in (root / "test").iterdir() if p.is_dir())
  for defect_dir in defect_dirs:
    defect = defect_dir.name
    for path in _images(defect_dir, "test images", required=False):
      mask_path = None
      if defect != "good" and has_masks:
        mask_path = root / "ground_truth" / defect / f"{path.stem}_mask.png"
        if not mask_path.is_file():
          raise UserError(f"Missing mask {mask_path} for the anomalous image {path}. Add it, or remove "
                          f"the ground_truth folder to use image-level labels only.")
      yield example(root, path, defect, mask_path)


def check_mvtec_layout(root: Path, how_to_get: str) -> None:
  """Raises a UserError that says what is missing and `how_to_get` the data, unless root looks right."""
  _check_not_file(root)
  if not root.is_dir():
    raise UserError(f"Dataset folder {root} does not exist. {how_to_get}\n"
                    f"Expected layout of {root}:\n{MVTEC_LAYOUT}")
  for sub in ("train/good", "test"):
    if not (root / sub).is_dir():
      raise UserError(f"{root} has no {sub} folder. {how_to_get}\nExpected layout of {root}:\n{MVTEC_LAYOUT}")
  if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in (root / "train" / "good").iterdir()):
    raise UserError(f"The training folder {root / 'train' / 'good'} is empty: put the defect-free "
                    f"images to learn from there ({', '.join(IMAGE_EXTENSIONS)}).")


def magnetic_tile_examples(root: Path, split: str):
  """Yields (key, example) for one split of Magnetic Tile, as its README in shared/data defines it.

  Sort MT_Free's stems by name: every fifth (0-based position a multiple of 5) is test/good, the rest
  train/good; every image of the five defect classes is a test image. Masks are the same-stem PNGs.
  """
  free = sorted(p.stem for p in (root / "MT_Free" / "Imgs").glob("*.jpg"))
  if split == "train":
    stems = [(stem, "MT_Free") for i, stem in enumerate(free) if i % 5]
  else:
    stems = [(stem, "MT_Free") for i, stem in enumerate(free) if not i % 5]
    for name in MAGNETIC_TILE_CLASSES[1:]:
      stems += [(p.stem, name) for p in sorted((root / name / "Imgs").glob("*.jpg"))]
  for stem, name in stems:
    folder = root / name / "Imgs"
    defect = "good" if name == "MT_Free" else name.removeprefix("MT_").lower()
    # MT_Free's masks are all empty; reading them would only cost time.
    yield example(root, folder / f"{stem}.jpg", defect, None if defect == "good" else folder / f"{stem}.png")


def check_magnetic_tile_layout(root: Path, how_to_get: str) -> None:
  _check_not_file(root)
  if not root.is_dir():
    raise UserError(f"Dataset folder {root} does not exist. {how_to_get}")
  missing = [name for name in MAGNETIC_TILE_CLASSES if not (root / name / "Imgs").is_dir()]
  if missing:
    raise UserError(f"{root} lacks {', '.join(f'{m}/Imgs' for m in missing)}: it is not the Magnetic Tile "
                    f"dataset's folder (MT_<class>/Imgs/<stem>.jpg with <stem>.png masks). {how_to_get}")
  if not any((root / "MT_Free" / "Imgs").glob("*.jpg")):
    raise UserError(f"The training folder {root / 'MT_Free' / 'Imgs'} has no .jpg images. {how_to_get}")


def _check_not_file(root: Path) -> None:
  """A path into a file (data_dir naming one, perhaps with a category below it) is said to be one, not
  to be missing."""
  existing = next(p for p in (root, *root.parents) if p.exists())
  if not existing.is_dir():
    raise UserError(f"{existing} is a file, not a folder: give the dataset's folder.")


def _images(folder: Path, what: str, required: bool) -> list[Path]:
  paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  if required and not paths:
    raise UserError(f"No {what} in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}).")
  return paths


def _read_bytes(path: Path) -> bytes:
  try:
    return path.read_bytes()
  except OSError as error:
    raise UserError(f"Cannot read {path} ({error.strerror}).") from error
