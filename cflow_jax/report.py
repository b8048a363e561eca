"""What a person reads after a run: a metrics JSON, markdown tables like the paper's, and PNG pictures.

Nothing here computes a metric; inputs are `metrics.evaluate` dicts, curves and maps. matplotlib is imported
inside the picture functions, so importing this module stays cheap, and figures are built without pyplot
(no global figure state; saving a Figure to PNG uses the Agg renderer).
"""

import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np

from cflow_jax.errors import UserError

# (key of an evaluate() dict, title), in the column order of the published tables (docs/design.md section 9).
TABLE_METRICS = (
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("image_f1", "Image F1"),
)
_CURVE_POINTS = 2000  # enough for a smooth line; a pixel curve has millions of points


def _write_atomically(path, write, binary=False):
  """Writes through a temporary file in the same folder, so a reader never sees a half-written file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb" if binary else "w") as f:
      write(f)
    os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide results from other users
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise


def _to_json(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, pathlib.PurePath):
    return str(value)
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_metrics(path, metrics: dict, **extra) -> None:
  """Writes {**metrics, **extra} as indented JSON (numpy values, paths and dataclasses allowed): the metric
  keys at the top level, where scripts and benchmarks read them."""
  document = {**metrics, **extra}
  text = json.dumps(document, indent=2, default=_to_json) + "\n"
  _write_atomically(path, lambda f: f.write(text))


def read_metrics(path) -> dict:
  """The document `write_metrics` wrote."""
  with open(path) as f:
    return json.load(f)


def _percent(value) -> str:
  return "-" if value is None else f"{100 * value:.2f}"


def _mean(results, key):
  """Mean over categories that have `key`, marked "(n/m)" when some lack it; "-" when none has it."""
  values = [r[key] for r in results.values() if r.get(key) is not None]
  if not values:
    return "-"
  mean = _percent(float(np.mean(values)))
  return mean if len(values) == len(results) else f"{mean} ({len(values)}/{len(results)})"


def table_row(category: str, metrics: dict) -> str:
  """One markdown row: the category, then each of TABLE_METRICS in percent, "-" where missing."""
  return "| " + " | ".join([category] + [_percent(metrics.get(key)) for key, _ in TABLE_METRICS]) + " |"


def results_tables(results: dict[str, dict]) -> str:
  """A markdown table with a row per category and, when several ran, a "mean" row.

  The mean of a metric some categories lack is taken over the others and says over how many, e.g.
  "97.10 (3/5)".
  """
  lines = [
      "| category | " + " | ".join(title for _, title in TABLE_METRICS) + " |",
      "|---" + "|---:" * len(TABLE_METRICS) + "|",
  ]
  lines += [table_row(category, metrics) for category, metrics in results.items()]
  if len(results) > 1:
    lines.append("| **mean** | " + " | ".join(_mean(results, key) for key, _ in TABLE_METRICS) + " |")
  return "\n".join(lines) + "\n"


def metric_tables(results: dict[str, dict]) -> str:
  """The paper's layout: one table per metric, categories as columns, then "mean" when several ran.

  Metrics no category has are left out.
  """
  categories = list(results)
  several = len(categories) > 1
  blocks = []
  for key, title in TABLE_METRICS:
    if all(r.get(key) is None for r in results.values()):
      continue
    cells = [_percent(results[c].get(key)) for c in categories] + ([_mean(results, key)] if several else [])
    header = categories + (["mean"] if several else [])
    blocks.append("\n".join([
        f"**{title}, %**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---:|" * len(header),
        "| " + " | ".join(cells) + " |",
    ]))
  return "\n\n".join(blocks) + "\n"


def _figure(**kwargs):
  from matplotlib.figure import Figure  # lazily: matplotlib takes a while to import
  return Figure(layout="constrained", **kwargs)


def _save(fig, path, dpi=100):
  _write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=dpi), binary=True)


def _displayable(image):
  """(H, W, 3) or (H, W) floats in [0, 1]: uint8 scaled by 255, other ranges (normalised inputs) min-max."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.dtype == np.uint8:
    return image / 255.0
  image = image.astype(np.float64)
  low, high = image.min(), image.max()
  if low < 0 or high > 1:
    image = (image - low) / max(high - low, 1e-12)
  return image


def _outline(ax, region, color, style):
  """Draws the boundary of a boolean region; nothing when it is empty or everything."""
  if region.any() and not region.all():
    ax.contour(region.astype(float), levels=[0.5], colors=[color], linewidths=1.5, linestyles=style)


def save_strip(path, image, mask, anomaly_map, threshold, title=None, vmin=None, vmax=None) -> None:
  """A PNG of four panels: image, ground truth, anomaly map with colorbar, and the map over the image.

  image (H, W, 3) or (H, W), uint8 or float; mask (H, W) or None; anomaly_map (H, W) at the image's size.
  The last panel outlines the predicted region (anomaly_map >= threshold) and the ground truth.
  vmin/vmax fix the heat map's colour range, so strips of one category can share it; by default the
  map's own range.
  """
  from matplotlib.lines import Line2D

  anomaly_map = np.asarray(anomaly_map, np.float64)
  picture = _displayable(image)
  if picture.shape[:2] != anomaly_map.shape or (mask is not None and np.shape(mask) != anomaly_map.shape):
    raise UserError(
        f"image {picture.shape[:2]}, mask {None if mask is None else np.shape(mask)} and anomaly map "
        f"{anomaly_map.shape} must have the same height and width; resize before drawing")
  grey = {"cmap": "gray"} if picture.ndim == 2 else {}
  vmin = anomaly_map.min() if vmin is None else vmin
  vmax = anomaly_map.max() if vmax is None else vmax

  fig = _figure(figsize=(14.5, 3.9))
  image_ax, mask_ax, map_ax, overlay_ax = fig.subplots(1, 4)
  image_ax.imshow(picture, **grey)
  image_ax.set_title("image")
  if mask is None:
    mask_ax.imshow(np.ones_like(anomaly_map), cmap="gray", vmin=0, vmax=1)
    mask_ax.text(0.5, 0.5, "no ground-truth mask", ha="center", va="center", transform=mask_ax.transAxes,
                 color="0.4", fontsize=11)
  else:
    mask_ax.imshow(np.asarray(mask, bool), cmap="gray", vmin=0, vmax=1)
  mask_ax.set_title("ground truth")
  heat = map_ax.imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax)
  map_ax.set_title("anomaly map")
  # An inset in the map's own coordinates keeps the colorbar exactly as tall as the map.
  bar = fig.colorbar(heat, cax=map_ax.inset_axes([1.03, 0.0, 0.05, 1.0]))
  if vmin <= threshold <= vmax:
    bar.ax.axhline(threshold, color="white", linewidth=3)
    bar.ax.axhline(threshold, color="black", linewidth=1.5, linestyle="--")
  overlay_ax.imshow(picture, **grey)
  overlay_ax.imshow(anomaly_map, cmap="jet", vmin=vmin, vmax=vmax, alpha=0.45)
  _outline(overlay_ax, anomaly_map >= threshold, "white", "dashed")
  legend = [Line2D([], [], color="white", linestyle="dashed", label=f"score \u2265 {threshold:.4g}")]
  if mask is not None:
    _outline(overlay_ax, np.asarray(mask, bool), "lime", "solid")
    legend.append(Line2D([], [], color="lime", label="ground truth"))
  overlay_ax.legend(handles=legend, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncols=len(legend),
                    fontsize=8, framealpha=0.8, facecolor="0.3", labelcolor="white", edgecolor="none")
  overlay_ax.set_title("prediction")
  for ax in (image_ax, mask_ax, map_ax, overlay_ax):
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=13)
  _save(fig, path)


def _thin(x, y, points=_CURVE_POINTS):
  """About `points` points evenly spaced along the curve's length, keeping both ends."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size <= points:
    return x, y
  length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))])
  keep = np.unique(np.searchsorted(length, np.linspace(0.0, length[-1], points)))
  keep = np.union1d(keep, [0, x.size - 1])
  return x[keep], y[keep]


def plot_roc(path, curves: dict) -> None:
  """A PNG of ROC curves, {label: (fpr, tpr, auc)}; auc (0-1) goes in the legend, None leaves it out."""
  fig = _figure(figsize=(5.2, 5))
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
  for label, (fpr, tpr, auc) in curves.items():
    x, y = _thin(fpr, tpr)
    ax.plot(x, y, linewidth=1.8, label=label if auc is None else f"{label} (AUROC {100 * auc:.2f}%)")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
  ax.set_aspect("equal")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=9)
  _save(fig, path)


def plot_pro(path, fpr, pro, fpr_limit=0.3, aupro=None) -> None:
  """A PNG of the per-region overlap curve: all of it, and the part up to fpr_limit that AUPRO integrates."""
  x, y = _thin(fpr, pro)
  fig = _figure(figsize=(10, 4.4))
  whole, part = fig.subplots(1, 2)
  for ax in (whole, part):
    ax.plot(x, y, color="tab:blue", linewidth=1.8)
    ax.set(ylim=(0, 1.01), xlabel="false positive rate (normal pixels)", ylabel="per-region overlap")
    ax.grid(alpha=0.3)
  whole.axvline(fpr_limit, color="tab:red", linestyle="--", linewidth=1, label=f"FPR = {fpr_limit:g}")
  whole.set(xlim=(0, 1), title="PRO curve")
  whole.legend(loc="lower right")
  inside = x <= fpr_limit
  part.fill_between(x[inside], y[inside], color="tab:blue", alpha=0.2)
  area = "" if aupro is None else f": AUPRO {100 * aupro:.2f}%"
  part.set(xlim=(0, fpr_limit), title=f"FPR \u2264 {fpr_limit:g}{area}")
  _save(fig, path)
