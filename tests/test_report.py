"""Reports: the metrics JSON round-trips, tables show the right numbers, pictures are real PNGs."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from cflow_jax import metrics, report
from cflow_jax.errors import UserError

BOTTLE = {"image_auroc": 1.0, "pixel_auroc": 0.98984, "aupro": 0.9512, "image_f1": 0.99206,
          "image_threshold": 1.5, "pixel_f1": 0.7, "pixel_threshold": 0.4}
CABLE = {"image_auroc": 0.97594, "pixel_auroc": 0.97640, "aupro": 0.9, "image_f1": 0.95}
FOLDER = {"image_auroc": 0.9, "image_f1": 0.8, "pixel_metrics_skipped": "no ground-truth masks"}


@dataclasses.dataclass(frozen=True)
class _Config:
  backbone: str = "resnet18"
  image_size: int = 256


def test_metrics_json_round_trips_numpy_values_and_extras(tmp_path):
  path = tmp_path / "runs" / "bottle" / "metrics.json"
  values = {"image_auroc": np.float64(0.98), "pixel_threshold": np.float32(0.5), "aupro": 0.9}
  report.write_metrics(path, values, category="bottle", config=_Config(), epochs=np.int64(3))
  report.write_metrics(path, values, category="bottle", config=_Config(), epochs=np.int64(3))  # overwrite
  document = report.read_metrics(path)
  assert document == {
      "image_auroc": 0.98, "pixel_threshold": 0.5, "aupro": 0.9,
      "category": "bottle", "config": {"backbone": "resnet18", "image_size": 256}, "epochs": 3,
  }
  assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "metrics.json"
  report.write_metrics(path, {"image_auroc": 0.5})
  with pytest.raises(TypeError, match="cannot write object"):
    report.write_metrics(path, {"image_auroc": object()})
  assert report.read_metrics(path) == {"image_auroc": 0.5}
  assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_table_row_in_percent_with_dashes_for_missing_metrics():
  assert report.table_row("bottle", BOTTLE) == "| bottle | 100.00 | 98.98 | 95.12 | 99.21 |"
  assert report.table_row("folder", FOLDER) == "| folder | 90.00 | - | - | 80.00 |"


def test_results_table_mean_row_averages_categories():
  lines = report.results_tables({"bottle": BOTTLE, "cable": CABLE}).splitlines()
  assert lines[0] == "| category | Image AUROC | Pixel AUROC | AUPRO | Image F1 |"
  assert lines[2:4] == [report.table_row("bottle", BOTTLE), report.table_row("cable", CABLE)]
  # (100 + 97.594) / 2 = 98.797, (98.984 + 97.64) / 2 = 98.312, (95.12 + 90) / 2, (99.206 + 95) / 2
  assert lines[4] == "| **mean** | 98.80 | 98.31 | 92.56 | 97.10 |"


def test_results_table_mean_says_when_categories_lack_a_metric():
  mean = report.results_tables({"bottle": BOTTLE, "folder": FOLDER}).splitlines()[-1]
  assert mean == "| **mean** | 95.00 | 98.98 (1/2) | 95.12 (1/2) | 89.60 |"


def test_results_table_of_one_category_has_no_mean_row():
  assert "mean" not in report.results_tables({"bottle": BOTTLE})


def test_metric_tables_put_categories_in_columns():
  text = report.metric_tables({"bottle": BOTTLE, "cable": CABLE, "folder": FOLDER})
  blocks = text.strip().split("\n\n")
  assert blocks[0] == "**Image AUROC, %**"
  assert blocks[1].splitlines() == [
      "| bottle | cable | folder | mean |", "|---:|---:|---:|---:|", "| 100.00 | 97.59 | 90.00 | 95.86 |"]
  assert "**Pixel AUROC, %**" in text and "| 98.98 | 97.64 | - | 98.31 (2/3) |" in text
  assert "**AUPRO, %**" in text and "**Image F1, %**" in text


def test_metric_tables_leave_out_metrics_no_category_has():
  text = report.metric_tables({"folder": FOLDER})
  assert "Image AUROC" in text and "Pixel AUROC" not in text and "mean" not in text


def _read_png(path):
  import matplotlib.image
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  return matplotlib.image.imread(path)


def _example(size=64):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  mask = np.zeros((size, size), bool)
  mask[10:25, 30:50] = True
  anomaly_map = rng.random((size, size)) + mask
  return image, mask, anomaly_map


@pytest.mark.parametrize("with_mask", [True, False])
def test_strip_is_a_wide_png(tmp_path, with_mask):
  image, mask, anomaly_map = _example()
  path = tmp_path / "strip.png"
  report.save_strip(path, image, mask if with_mask else None, anomaly_map, 1.0, title="bottle 000")
  height, width, channels = _read_png(path).shape
  assert channels in (3, 4) and 300 <= height <= 600 and 1200 <= width <= 1600


def test_strip_takes_greyscale_and_normalised_images(tmp_path):
  image, mask, anomaly_map = _example()
  normalised = (image[..., 0] / 255.0 - 0.45) / 0.23  # an encoder input, outside [0, 1]
  report.save_strip(tmp_path / "grey.png", normalised, mask, anomaly_map, 5.0)  # threshold above the map
  assert _read_png(tmp_path / "grey.png").ndim == 3


def test_strip_rejects_a_map_of_another_size(tmp_path):
  image, mask, _ = _example()
  with pytest.raises(UserError, match="same height and width"):
    report.save_strip(tmp_path / "strip.png", image, mask, np.zeros((32, 32)), 0.5)


def test_roc_and_pro_plots_are_pngs_even_for_million_point_curves(tmp_path):
  rng = np.random.default_rng(0)
  masks = np.zeros((4, 250, 250), bool)
  masks[:, 100:140, 100:150] = True
  maps = rng.random(masks.shape) + 0.3 * masks
  fpr, tpr, _ = metrics.roc_curve(maps, masks)
  report.plot_roc(tmp_path / "roc.png", {"pixel": (fpr, tpr, 0.9), "image": ([0, 0, 1], [0, 1, 1], None)})
  fpr, pro, _ = metrics.pro_curve(maps, masks)
  report.plot_pro(tmp_path / "pro.png", fpr, pro, aupro=metrics.aupro(maps, masks))
  assert fpr.size > 200_000
  assert _read_png(tmp_path / "roc.png").shape[:2] == (500, 520)
  assert _read_png(tmp_path / "pro.png").shape[:2] == (440, 1000)


def test_importing_report_does_not_import_matplotlib():
  code = "import sys, cflow_jax.report; print('matplotlib' in sys.modules)"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert run.stdout == "False\n"
