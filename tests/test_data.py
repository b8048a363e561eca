"""Datasets: preparation through tfds without TensorFlow, each dataset's contents, the errors users see."""

import functools
import http.server
import shutil
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cflow_jax import data
from cflow_jax.data import builders, demo, files
from cflow_jax.errors import UserError

SHARED_MAGNETIC_TILE = Path(__file__).parents[2] / "shared" / "data" / "magnetic_tile"


def _save(path: Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _make_mvtec_layout(root: Path, masks: bool = True) -> None:
  """3 RGB training images, 1 good and 2 greyscale "crack" test images, 40x48 px, masks with soft edges."""
  rng = np.random.default_rng(0)
  for i in range(3):
    _save(root / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (40, 48, 3), np.uint8))
  _save(root / "test" / "good" / "000.png", rng.integers(0, 256, (40, 48, 3), np.uint8))
  for i in range(2):
    _save(root / "test" / "crack" / f"{i:03d}.png", rng.integers(0, 256, (40, 48), np.uint8))
    if masks:
      mask = np.zeros((40, 48), np.uint8)
      mask[10:20, 10:20] = 255
      mask[20, 10:20] = 200  # anti-aliased edge: >= 128 is in
      mask[21, 10:20] = 100  # ... < 128 is out
      _save(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)


def _prepared(tfds_dir: Path) -> list[Path]:
  return list(tfds_dir.rglob("dataset_info.json"))


# --- The demo ---


def test_demo_is_deterministic_with_exact_masks():
  first = list(demo.examples("grass", "test"))
  second = list(demo.examples("grass", "test"))
  assert len(first) == demo.TEST_GOOD + len(demo.DEFECTS) * demo.TEST_PER_DEFECT
  for (d1, image1, mask1), (d2, image2, mask2) in zip(first, second):
    assert d1 == d2 and np.array_equal(image1, image2) and np.array_equal(mask1, mask2)
  rng = np.random.default_rng(0)
  clean = rng.integers(60, 200, (demo.CROP, demo.CROP), np.uint8)
  for defect in demo.DEFECTS:
    image, mask = demo.add_defect(clean, defect, rng, "grass")
    assert set(np.unique(mask)) == {0, 1}, defect
    assert np.array_equal(image[mask == 0], clean[mask == 0]), f"{defect} changed pixels outside its mask"
    assert np.mean(image[mask == 1] != clean[mask == 1]) > 0.9, f"{defect} left its mask's pixels unchanged"


def test_demo_loads_through_tfds_without_tensorflow(tmp_path):
  train = data.load("demo", "train", "brick", tfds_dir=tmp_path)
  test = data.load("demo", "test", "brick", tfds_dir=tmp_path)
  assert (len(train), len(test)) == (demo.TRAIN_IMAGES, 36)
  assert (test.name, test.category, test.has_masks) == ("demo", "brick", True)
  example = test[-1]
  assert example["image"].shape == (demo.CROP, demo.CROP, 3) and example["image"].dtype == np.uint8
  assert example["mask"].shape == (demo.CROP, demo.CROP) and example["mask"].max() == 1
  assert (example["label"], example["defect"]) == (1, "patch")
  assert all(train[i]["label"] == 0 and train[i]["mask"].max() == 0 for i in range(len(train)))
  assert "tensorflow" not in sys.modules


# --- Users' folders and MVTec AD's layout ---


def test_folder_in_mvtec_layout(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  train = data.load("folder", "train", data_dir=root, tfds_dir=tmp_path / "tfds")
  test = data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")
  assert (len(train), len(test), test.category, test.has_masks) == (3, 3, "parts", True)
  assert [test[i]["filename"] for i in range(3)] == ["test/crack/000.png", "test/crack/001.png",
                                                     "test/good/000.png"]
  crack = test[0]
  assert crack["image"].shape == (40, 48, 3), "greyscale is repeated to three channels"
  assert np.array_equal(crack["image"][..., 0], crack["image"][..., 2])
  expected = np.zeros((40, 48), np.uint8)
  expected[10:21, 10:20] = 1
  assert np.array_equal(crack["mask"], expected), "masks are binarised at >= 128"
  assert [test[i]["label"] for i in range(3)] == [1, 1, 0]
  original = np.asarray(Image.open(root / "train" / "good" / "001.png"))
  assert np.array_equal(train[1]["image"], original), "images are stored losslessly at their own size"


def test_folder_without_masks_says_so_and_changes_are_picked_up(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root, masks=False)
  test = data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")
  assert not test.has_masks and all(test[i]["mask"].max() == 0 for i in range(len(test)))
  _save(root / "test" / "crack" / "002.png", np.zeros((40, 48), np.uint8))
  assert len(data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")) == 4


def test_mvtec_from_an_extracted_folder(tmp_path):
  _make_mvtec_layout(tmp_path / "mvtec" / "bottle")
  for data_dir in (tmp_path / "mvtec", tmp_path / "mvtec" / "bottle"):  # the root or the category's own
    test = data.load("mvtec_ad", "test", "bottle", data_dir=data_dir, tfds_dir=tmp_path / data_dir.name)
    assert (len(test), test.category, test.has_masks, test[0]["defect"]) == (3, "bottle", True, "crack")


@pytest.fixture
def served(tmp_path, monkeypatch):
  """(folder, base URL) of a loopback HTTP server for the files put in that folder."""
  monkeypatch.setenv("no_proxy", "*")
  folder = tmp_path / "served"
  folder.mkdir()

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield folder, f"http://127.0.0.1:{server.server_port}"
  server.shutdown()
  server.server_close()


def _mvtec_archive(tmp_path: Path, archive: Path) -> bytes:
  _make_mvtec_layout(tmp_path / "archive" / "bottle")
  _make_mvtec_layout(tmp_path / "archive" / "cable")
  (tmp_path / "archive" / "license.txt").write_text("CC BY-NC-SA 4.0")
  with tarfile.open(archive, "w:xz") as tar:
    for path in sorted((tmp_path / "archive").iterdir()):
      tar.add(path, arcname=path.name)
  return archive.read_bytes()


def test_mvtec_download_is_checked_and_unpacked_once(tmp_path, served, monkeypatch):
  folder, url = served
  payload = _mvtec_archive(tmp_path, folder / "mvtec_anomaly_detection.tar.xz")
  monkeypatch.setattr(builders, "MVTEC_URL", f"{url}/mvtec_anomaly_detection.tar.xz")
  monkeypatch.setattr(builders, "MVTEC_SHA256", __import__("hashlib").sha256(payload).hexdigest())
  tfds_dir = tmp_path / "tfds"
  test = data.load("mvtec_ad", "test", "bottle", tfds_dir=tfds_dir)
  assert (len(test), test[2]["defect"]) == (3, "good")
  assert (tfds_dir / "downloads" / "mvtec_anomaly_detection.tar.xz").read_bytes() == payload
  assert (tfds_dir / "downloads" / "extracted" / "mvtec_anomaly_detection" / "bottle" / "train").is_dir()
  (folder / "mvtec_anomaly_detection.tar.xz").unlink()  # so another category must reuse the download
  assert len(data.load("mvtec_ad", "train", "cable", tfds_dir=tfds_dir)) == 3


def test_mvtec_download_with_a_wrong_checksum_is_refused(tmp_path, served, monkeypatch):
  folder, url = served
  _mvtec_archive(tmp_path, folder / "mvtec_anomaly_detection.tar.xz")
  monkeypatch.setattr(builders, "MVTEC_URL", f"{url}/mvtec_anomaly_detection.tar.xz")
  monkeypatch.setattr(builders, "MVTEC_SHA256", "0" * 64)
  with pytest.raises(UserError, match="SHA-256"):
    data.load("mvtec_ad", "train", "bottle", tfds_dir=tmp_path / "tfds")
  assert not list((tmp_path / "tfds" / "downloads").glob("mvtec*")), "a refused download is not kept"
  assert not _prepared(tmp_path / "tfds")


def test_magnetic_tile_download_and_split_rule(tmp_path, served, monkeypatch):
  folder, url = served
  top = tmp_path / "zip" / "Magnetic-tile-defect-datasets.-master"
  for name, count in zip(files.MAGNETIC_TILE_CLASSES, (7, 2, 1, 1, 1, 1)):
    for i in range(count):
      _save(top / name / "Imgs" / f"exp{i}_num_{i}.jpg", np.full((30, 20), 100, np.uint8))
      _save(top / name / "Imgs" / f"exp{i}_num_{i}.png", np.full((30, 20), 255 * (name != "MT_Free"), np.uint8))
  shutil.make_archive(str(folder / "master"), "zip", tmp_path / "zip")
  monkeypatch.setattr(builders, "MAGNETIC_TILE_URL", f"{url}/master.zip")
  train = data.load("magnetic_tile", "train", tfds_dir=tmp_path / "tfds")
  test = data.load("magnetic_tile", "test", tfds_dir=tmp_path / "tfds")
  # Sorted MT_Free stems exp0..exp6: positions 0 and 5 are test/good, the other five train/good.
  assert [train[i]["filename"] for i in range(len(train))] == [
      f"MT_Free/Imgs/exp{i}_num_{i}.jpg" for i in (1, 2, 3, 4, 6)]
  assert [test[i]["defect"] for i in range(len(test))] == ["good"] * 2 + ["blowhole"] * 2 + [
      "break", "crack", "fray", "uneven"]
  assert test[2]["image"].shape == (30, 20, 3) and test[2]["mask"].min() == 1


# --- Errors a user can fix ---


def test_missing_mvtec_root_says_how_to_get_the_data(tmp_path):
  with pytest.raises(UserError) as error:
    data.load("mvtec_ad", "train", "bottle", data_dir=tmp_path / "nowhere", tfds_dir=tmp_path / "tfds")
  message = str(error.value)
  assert builders.MVTEC_PAGE in message and "ground_truth/<defect>/<stem>_mask.png" in message


def test_unknown_names_list_the_valid_ones(tmp_path):
  with pytest.raises(UserError, match="bottle, cable, capsule"):
    data.load("mvtec_ad", "train", "bottel", tfds_dir=tmp_path)
  with pytest.raises(UserError, match="brick, grass, gravel"):
    data.load("demo", "train", None, tfds_dir=tmp_path)
  with pytest.raises(UserError, match="mvtec_ad, magnetic_tile, folder, demo"):
    data.load("mvtec", "train", "bottle", tfds_dir=tmp_path)
  with pytest.raises(UserError, match="train, test"):
    data.load("demo", "validation", "brick", tfds_dir=tmp_path)


def test_unreadable_or_truncated_image_is_named(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  broken = root / "test" / "crack" / "001.png"
  original = broken.read_bytes()
  for content in (original[:200], b"not an image"):
    broken.write_bytes(content)
    with pytest.raises(UserError, match=f"Cannot read image {broken}") as error:
      data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")
    assert "BytesIO" not in str(error.value)  # PIL names its buffer, not the file
  assert not _prepared(tmp_path / "tfds")


def test_a_data_dir_that_is_a_file_is_called_a_file(tmp_path):
  notes = tmp_path / "notes.txt"
  notes.write_text("not a folder")
  for category in (None, "parts"):
    with pytest.raises(UserError, match=f"{notes} is a file, not a folder"):
      data.load("folder", "train", category, data_dir=notes, tfds_dir=tmp_path / "tfds")


def test_mask_of_another_size_is_named(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  mask = root / "ground_truth" / "crack" / "000_mask.png"
  _save(mask, np.zeros((20, 24), np.uint8))
  with pytest.raises(UserError, match=f"Mask {mask} is 24x20 pixels but its image is 48x40"):
    data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")


def test_missing_mask_is_named(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  (root / "ground_truth" / "crack" / "001_mask.png").unlink()
  with pytest.raises(UserError, match="Missing mask .*001_mask.png"):
    data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")


def test_empty_train_folder_is_said_plainly(tmp_path):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  for path in (root / "train" / "good").iterdir():
    path.unlink()
  with pytest.raises(UserError, match=r"training folder .*train/good is empty"):
    data.load("folder", "train", data_dir=root, tfds_dir=tmp_path / "tfds")


def test_interrupted_preparation_leaves_nothing_that_reads_as_complete(tmp_path, monkeypatch):
  root = tmp_path / "parts"
  _make_mvtec_layout(root)
  calls = []
  read_image = files.read_image

  def interrupted(path):
    calls.append(path)
    if len(calls) == 4:  # the first test image, after the whole train split was written
      raise KeyboardInterrupt
    return read_image(path)

  monkeypatch.setattr(files, "read_image", interrupted)
  with pytest.raises(KeyboardInterrupt):
    data.load("folder", "train", data_dir=root, tfds_dir=tmp_path / "tfds")
  assert len(calls) == 4
  assert not _prepared(tmp_path / "tfds")
  assert not [p for p in (tmp_path / "tfds").rglob("*") if "incomplete" in p.name]
  monkeypatch.setattr(files, "read_image", read_image)
  assert len(data.load("folder", "test", data_dir=root, tfds_dir=tmp_path / "tfds")) == 3


# --- The real Magnetic Tile data, when this checkout sits beside shared/ ---


@pytest.mark.skipif(not SHARED_MAGNETIC_TILE.is_dir(), reason="no shared/data/magnetic_tile beside the repo")
def test_magnetic_tile_split(tmp_path):
  train = data.load("magnetic_tile", "train", data_dir=SHARED_MAGNETIC_TILE, tfds_dir=tmp_path)
  test = data.load("magnetic_tile", "test", tfds_dir=tmp_path)
  assert len(train) == 761
  labels = np.array([test[i]["label"] for i in range(len(test))])
  assert (np.sum(labels == 0), np.sum(labels == 1)) == (191, 392)
  assert train[0]["filename"].startswith("MT_Free/Imgs/") and train[0]["image"].shape[2] == 3
  blowhole = test[191]
  assert blowhole["defect"] == "blowhole" and set(np.unique(blowhole["mask"])) == {0, 1}
  assert blowhole["mask"].shape == blowhole["image"].shape[:2]
