"""tfds builders for the four datasets, TensorFlow-free.

What makes them work without TensorFlow (tensorflow-datasets 4.9): examples carry images as encoded bytes
(tfds encodes numpy images with `tf.image`, but stores bytes as they are), the files are `array_record`
(random access, read back with `as_data_source`, decoded by PIL), and downloads and archives are handled by
`download.py` (tfds's extractor needs TensorFlow).

Each builder is constructed with `source`, the folder its raw files are in, or None to look in tfds's manual
folder (`<tfds_dir>/downloads/manual/`) and else download. tfds prepares into a temporary folder and renames
it when complete, so an interrupted preparation never reads as a finished dataset.
"""

import hashlib
from pathlib import Path

import tensorflow_datasets as tfds

from cflow_jax.data import demo, download, files
from cflow_jax.errors import UserError

FEATURES = tfds.features.FeaturesDict({
    # Encoded bytes as `files.read_image` gives them; grey files stay grey and become RGB when read.
    "image": tfds.features.Image(shape=(None, None, 3)),
    "mask": tfds.features.Image(shape=(None, None, 1)),  # 0/1
    "label": tfds.features.ClassLabel(names=["good", "anomalous"]),
    "defect": tfds.features.Text(),  # "good" or the defect type
    "filename": tfds.features.Text(),  # path below the dataset's root
})
SPLITS = ("train", "test")

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
                    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
MVTEC_URL = ("https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
             "420938113-1629952094/mvtec_anomaly_detection.tar.xz")
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_PAGE = "https://www.mvtec.com/company/research/datasets/mvtec-ad"
MAGNETIC_TILE_REPO = "https://github.com/abin24/Magnetic-tile-defect-datasets."
MAGNETIC_TILE_URL = MAGNETIC_TILE_REPO + "/archive/refs/heads/master.zip"


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the four builders share: features, splits, file order, a `source` folder."""

  VERSION = tfds.core.Version("1.0.0")
  HOMEPAGE = None
  CITATION = None

  def __init__(self, *, source: Path | None = None, **kwargs):
    self._source = source
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds finds a builder's code (to read a checksums.tsv beside it) through `importlib_resources`, which
    # this project does not install; our downloads are checked in download.py instead.
    return None

  def _info(self):
    # disable_shuffling keeps the generation (file) order, so "file order" means what it says.
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, features=FEATURES, homepage=self.HOMEPAGE,
        citation=self.CITATION, disable_shuffling=True,
        metadata=tfds.core.MetadataDict(has_masks=self._has_masks()))

  def _has_masks(self) -> bool:
    return True

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager)
    return {split: self._generate_examples(root, split) for split in SPLITS}

  def _root(self, dl_manager) -> Path | None:
    """The folder of raw files to read, fetched if need be."""
    return self._source


class MvtecAd(_Builder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per category. CC BY-NC-SA 4.0, MVTec Software GmbH.

  Source: the extracted archive's root, the folder holding the 15 category folders; else
  `<manual>/mvtec_anomaly_detection/` or `<manual>/mvtec_anomaly_detection.tar.xz`; else the official
  archive is downloaded (4.9 GB, checked against its SHA-256) and unpacked once for all categories.
  """

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in MVTEC_CATEGORIES]
  HOMEPAGE = MVTEC_PAGE
  CITATION = ("Bergmann, Fauser, Sattlegger, Steger. MVTec AD - A Comprehensive Real-World Dataset for "
              "Unsupervised Anomaly Detection. CVPR 2019.")
  HOW_TO_GET = (f"Get MVTec AD from {MVTEC_PAGE} (mvtec_anomaly_detection.tar.xz), extract it and pass "
                f"its root (the folder holding bottle/, cable/, ...) as data_dir; or pass no data_dir to "
                f"download it.")

  def _root(self, dl_manager):
    if self._source is not None:
      return self._source
    manual = _manual_dir(dl_manager)
    if (manual / "mvtec_anomaly_detection").is_dir():
      return manual / "mvtec_anomaly_detection"
    archive = manual / "mvtec_anomaly_detection.tar.xz"
    if not archive.is_file():
      archive = download.fetch(MVTEC_URL, Path(dl_manager.download_dir) / archive.name, MVTEC_SHA256,
                               manual=self.HOW_TO_GET)
    extracted = Path(dl_manager.download_dir) / "extracted" / "mvtec_anomaly_detection"
    download.extract(archive, extracted)
    root = download.find_root(extracted, self.builder_config.name)
    if root is None:
      raise UserError(f"{archive} unpacked to {extracted}, which holds no {self.builder_config.name}/ "
                      f"folder. {self.HOW_TO_GET}")
    return root

  def _generate_examples(self, root, split):
    name = self.builder_config.name
    # A data_dir pointing at the category's own folder is accepted too.
    category = root if root.name == name and (root / "train").is_dir() else root / name
    files.check_mvtec_layout(category, self.HOW_TO_GET)
    yield from files.mvtec_examples(category, split)


class MagneticTile(_Builder):
  """Magnetic Tile defects (Huang, Qiu, Yuan, The Visual Computer 2020), with this project's fixed split.

  Source: the folder holding MT_Free/, MT_Blowhole/, ...; else `<manual>/magnetic_tile/`; else the authors'
  GitHub repository archive is downloaded and unpacked. GitHub regenerates branch archives, so their bytes
  have no stable checksum: the zip's own CRCs and the layout check guard that download.
  """

  HOMEPAGE = MAGNETIC_TILE_REPO
  CITATION = "Huang, Qiu, Yuan. Saliency of magnetic tile surface defects. The Visual Computer, 2020."
  HOW_TO_GET = (f"Clone or download {MAGNETIC_TILE_REPO} and pass the folder holding MT_Free/, MT_Blowhole/, "
                f"... as data_dir; or pass no data_dir to download it.")

  def _root(self, dl_manager):
    if self._source is not None:
      return self._source
    manual = _manual_dir(dl_manager) / "magnetic_tile"
    if manual.is_dir():
      return manual
    downloads = Path(dl_manager.download_dir)
    archive = download.fetch(MAGNETIC_TILE_URL, downloads / "magnetic_tile_master.zip", None,
                             manual=self.HOW_TO_GET)
    extracted = download.extract(archive, downloads / "extracted" / "magnetic_tile")
    return download.find_root(extracted, "MT_Free") or extracted

  def _generate_examples(self, root, split):
    files.check_magnetic_tile_layout(root, self.HOW_TO_GET)
    yield from files.magnetic_tile_examples(root, split)


class AnomalyFolder(_Builder):
  """A user's own images in MVTec AD's layout (`files.MVTEC_LAYOUT`); the ground_truth folder is optional.

  One config per folder and content: its name carries a fingerprint of the folder's path and of its files'
  names, sizes and modification times, so changing the folder prepares it anew instead of reading a stale
  copy (old copies stay in the tfds folder until deleted).
  """

  def __init__(self, *, source: Path, **kwargs):
    super().__init__(source=source, config=tfds.core.BuilderConfig(name=_folder_config_name(source)),
                     **kwargs)

  def _has_masks(self) -> bool:
    return (self._source / "ground_truth").is_dir()

  def _generate_examples(self, root, split):
    yield from files.mvtec_examples(root, split, has_masks=self._has_masks())


class CflowDemo(_Builder):
  """Demo: crops of scikit-image's bundled texture photographs with synthetic, exactly masked defects.

  Made on the spot by `demo.py` (deterministic, nothing to download); see there for what it contains.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "Scratches thickened in numpy, not skimage.morphology: edges may move a pixel."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in demo.TEXTURES]

  def _generate_examples(self, root, split):
    del root  # nothing on disk: the images are drawn in demo.py
    for index, (defect, image, mask) in enumerate(demo.examples(self.builder_config.name, split)):
      filename = f"{split}/{defect}/{index:03d}.png"
      yield filename, dict(image=files.png(image), mask=files.png(mask), label=int(defect != "good"),
                           defect=defect, filename=filename)


def _manual_dir(dl_manager) -> Path:
  # tfds's own `dl_manager.manual_dir` raises when the folder is absent; here it is only one option.
  return Path(dl_manager.download_dir) / "manual"


def _folder_config_name(root: Path) -> str:
  digest = hashlib.sha256(str(root.resolve()).encode())
  for path in sorted(root.rglob("*")):
    if path.is_file():
      stat = path.stat()
      digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
  slug = "".join(c if c.isalnum() else "_" for c in root.resolve().name.lower()) or "folder"
  return f"{slug}-{digest.hexdigest()[:12]}"


BUILDERS = {"mvtec_ad": MvtecAd, "magnetic_tile": MagneticTile, "folder": AnomalyFolder, "demo": CflowDemo}
