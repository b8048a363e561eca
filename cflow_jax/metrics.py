"""Evaluation as pure functions from scores, labels, maps and masks to numbers (docs/design.md section 8).

Everything is exact: a curve has one point per distinct score, ties included, so AUROC equals
scikit-learn's and AUPRO equals a per-threshold loop over every score. Nothing is binned.

All curves come from one tally (`_tally`): for every distinct score t, from the highest to the lowest, how
many samples, how many negatives and how much positive weight score >= t. ROC, precision-recall and F1
count each positive pixel once; PRO weights a pixel of region r by 1 / (R * |r|), so the summed weight is
the mean per-region overlap. Labelling a pixel anomalous when its score >= t is the convention throughout.
"""

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from cflow_jax.errors import UserError

# 8-connectivity inside an image, and no connection across the image axis of an (N, H, W) stack.
_REGION_STRUCTURE = np.zeros((3, 3, 3), bool)
_REGION_STRUCTURE[1] = True


class _Tally(NamedTuple):
  thresholds: np.ndarray  # the distinct scores, decreasing
  above: np.ndarray  # samples scoring >= threshold (int64)
  negatives: np.ndarray  # negative samples scoring >= threshold (int64)
  weight: np.ndarray  # summed weight of positive samples scoring >= threshold (float64)


def _tally(scores, positive, weight=None) -> _Tally:
  """Counts above every distinct score of the flat arrays `scores` and `positive` (bool).

  `weight` gives each positive sample's weight, in the order of `scores[positive]`; None weighs each 1.
  Instead of one argsort over all samples this sorts the negatives by value alone (a plain sort is cheaper
  than an argsort) and argsorts only the positives, which are few among pixels, then merges
  the two sorted lists by binary search.
  """
  pos_scores = scores[positive]
  pos_order = np.argsort(pos_scores, kind="stable")
  pos_sorted = pos_scores[pos_order]
  neg_sorted = np.sort(scores[~positive])
  # Ascending merge of both lists; a positive goes before negatives equal to it, which is harmless since
  # only the ends of runs of equal scores are read.
  slots = np.arange(pos_sorted.size) + np.searchsorted(neg_sorted, pos_sorted, side="left")
  is_negative = np.ones(scores.size, bool)
  is_negative[slots] = False
  merged = np.empty(scores.size, scores.dtype)
  merged[slots] = pos_sorted
  merged[is_negative] = neg_sorted
  pos_weight = np.zeros(scores.size)
  pos_weight[slots] = 1.0 if weight is None else np.asarray(weight, np.float64)[pos_order]

  # From the highest score down; the last index of each run of equal scores closes that threshold.
  merged, is_negative, pos_weight = merged[::-1], is_negative[::-1], pos_weight[::-1]
  ends = np.append(np.flatnonzero(merged[1:] != merged[:-1]), scores.size - 1)
  return _Tally(
      thresholds=merged[ends],
      above=ends + 1,
      negatives=np.cumsum(is_negative, dtype=np.int64)[ends],
      weight=np.cumsum(pos_weight)[ends],
  )


def _check_scores(scores, name):
  scores = np.asarray(scores)
  if scores.size == 0:
    raise UserError(f"{name} is empty: there is nothing to evaluate")
  if not (np.issubdtype(scores.dtype, np.integer) or np.issubdtype(scores.dtype, np.floating)):
    raise UserError(f"{name} must be real numbers, got dtype {scores.dtype}")
  finite = np.isfinite(scores)
  if not finite.all():
    bad = np.unravel_index(np.flatnonzero(~finite)[0], scores.shape)
    raise UserError(
        f"{name} has {int((~finite).sum())} NaN or infinite values "
        f"(the first at index {tuple(map(int, bad))}); "
        "a diverged model or an empty image upstream is the usual cause")
  return scores


def _check_labels(labels, shape, name, scores_name):
  labels = np.asarray(labels)
  if labels.shape != shape:
    raise UserError(f"{scores_name} has shape {shape} but {name} has shape {labels.shape}; they must match")
  if labels.dtype != bool:
    if not ((labels == 0) | (labels == 1)).all():
      found = np.unique(labels)
      raise UserError(f"{name} must be boolean or 0/1, found values {found[:5].tolist()}"
                      f"{'...' if found.size > 5 else ''}; binarise 0/255 masks with mask > 0")
    labels = labels != 0
  return labels


def _check_both_classes(labels, name):
  positives = int(labels.sum())
  if positives == 0 or positives == labels.size:
    kind = "normal (0)" if positives == 0 else "anomalous (1)"
    raise UserError(f"{name} are all {kind}: this metric needs both normal and anomalous samples")


def _binary(scores, labels, scores_name="scores", labels_name="labels"):
  """Validated flat (scores, labels as bool) with both classes present."""
  scores = _check_scores(scores, scores_name)
  labels = _check_labels(labels, scores.shape, labels_name, scores_name)
  _check_both_classes(labels, labels_name)
  return scores.ravel(), labels.ravel()


def _roc_from(tally):
  positives = tally.above - tally.negatives
  fpr = np.concatenate([[0.0], tally.negatives / tally.negatives[-1]])
  tpr = np.concatenate([[0.0], positives / positives[-1]])
  return fpr, tpr, np.concatenate([[np.inf], tally.thresholds.astype(np.float64)])


def _best_f1_from(tally):
  positives = tally.above - tally.negatives
  # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (predicted positives + actual positives).
  f1 = 2.0 * positives / (tally.above + positives[-1])
  best = int(np.argmax(f1))
  return float(f1[best]), float(tally.thresholds[best])


def roc_curve(scores, labels):
  """(fpr, tpr, thresholds) with one point per distinct score, from the highest threshold down.

  As scikit-learn's with drop_intermediate=False: the first point is (0, 0) at threshold +inf.
  """
  scores, labels = _binary(scores, labels)
  return _roc_from(_tally(scores, labels))


def auroc(scores, labels) -> float:
  """Area under the ROC curve (trapezoids, so ties count one half), as sklearn's roc_auc_score."""
  fpr, tpr, _ = roc_curve(scores, labels)
  return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(scores, labels):
  """(precision, recall, thresholds) at every distinct score, from the highest threshold down.

  Unlike scikit-learn's (increasing thresholds) there is no extra (precision 1, recall 0) end point.
  """
  scores, labels = _binary(scores, labels)
  tally = _tally(scores, labels)
  positives = tally.above - tally.negatives
  return positives / tally.above, positives / positives[-1], tally.thresholds


def best_f1(scores, labels) -> tuple[float, float]:
  """(F1, threshold) at the threshold maximising F1; a sample is anomalous when score >= threshold.

  Among thresholds with equal F1 the highest is returned.
  """
  scores, labels = _binary(scores, labels)
  return _best_f1_from(_tally(scores, labels))


def _check_maps(maps, masks):
  maps = _check_scores(maps, "maps")
  if maps.ndim not in (2, 3):
    raise UserError(f"maps must be (N, H, W) or (H, W), got shape {maps.shape}")
  masks = _check_labels(masks, maps.shape, "masks", "maps")
  return maps.reshape((-1,) + maps.shape[-2:]), masks.reshape((-1,) + maps.shape[-2:])


def label_regions(masks) -> tuple[np.ndarray, int]:
  """(regions, count): connected ground-truth regions of (N, H, W) masks, 8-connected within each image.

  regions is int, 0 on normal pixels and 1..count on defects, numbered across the whole stack.
  """
  masks = np.asarray(masks, bool)
  return ndimage.label(masks.reshape((-1,) + masks.shape[-2:]), structure=_REGION_STRUCTURE)


def _region_weights(regions, count, positive):
  """Per positive pixel (in flat order), 1 / (count * size of its region)."""
  labels = regions.ravel()[positive]
  sizes = np.bincount(labels, minlength=count + 1)
  return (1.0 / (count * sizes[1:]))[labels - 1]


def _pro_from(tally):
  fpr = np.concatenate([[0.0], tally.negatives / tally.negatives[-1]])
  pro = np.concatenate([[0.0], tally.weight])
  return fpr, pro, np.concatenate([[np.inf], tally.thresholds.astype(np.float64)])


def _pro_tally(maps, masks):
  regions, count = label_regions(masks)
  scores, positive = maps.ravel(), masks.ravel()
  return _tally(scores, positive, _region_weights(regions, count, positive))


def pro_curve(maps, masks):
  """(fpr, pro, thresholds): the per-region overlap curve, one point per distinct pixel score.

  pro(t) is the mean over connected defect regions (8-connectivity, per image) of the fraction of the
  region's pixels scoring >= t; fpr(t) is the fraction of normal pixels, over all images, scoring >= t.
  maps (N, H, W) float, masks (N, H, W) bool or 0/1; (H, W) is one image. The first point is (0, 0) at +inf.
  """
  maps, masks = _check_maps(maps, masks)
  _check_both_classes(masks, "masks")
  return _pro_from(_pro_tally(maps, masks))


def region_overlaps(maps, masks, threshold) -> np.ndarray:
  """Overlap with the prediction (score >= threshold) of each region of `label_regions(masks)`, (count,)."""
  maps, masks = _check_maps(maps, masks)
  regions, count = label_regions(masks)
  sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
  hits = np.bincount(regions.ravel(), weights=maps.ravel() >= threshold, minlength=count + 1)[1:]
  return hits / sizes


def _check_fpr_limit(fpr_limit):
  if not 0.0 < fpr_limit <= 1.0:
    raise UserError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def _area_to_limit(fpr, pro, fpr_limit):
  """Trapezoid area under the curve for fpr <= fpr_limit, interpolated at the cut, divided by fpr_limit."""
  keep = int(np.searchsorted(fpr, fpr_limit, side="right"))  # fpr[0] == 0, so keep >= 1
  x, y = fpr[:keep], pro[:keep]
  if x[-1] < fpr_limit:  # fpr ends at 1, so a point past the cut exists
    step = (fpr_limit - fpr[keep - 1]) / (fpr[keep] - fpr[keep - 1])
    x = np.append(x, fpr_limit)
    y = np.append(y, pro[keep - 1] + step * (pro[keep] - pro[keep - 1]))
  return float(np.trapezoid(y, x) / fpr_limit)


def aupro(maps, masks, fpr_limit=0.3) -> float:
  """Area under the PRO curve up to fpr_limit, with the FPR axis rescaled to [0, 1] (so 1 is perfect)."""
  _check_fpr_limit(fpr_limit)
  fpr, pro, _ = pro_curve(maps, masks)
  return _area_to_limit(fpr, pro, fpr_limit)


def evaluate(image_scores, image_labels, maps=None, masks=None, fpr_limit=0.3) -> dict:
  """Every metric the data allows, as python floats.

  Always image_auroc, image_f1, image_threshold. With maps and masks also pixel_auroc, pixel_f1,
  pixel_threshold and aupro, all from one sort of the pixels. When pixel metrics cannot be computed
  (no masks, or masks without a defect or without a normal pixel) they are left out and
  "pixel_metrics_skipped" says why.
  """
  _check_fpr_limit(fpr_limit)
  scores, labels = _binary(image_scores, image_labels, "image_scores", "image_labels")
  image_tally = _tally(scores, labels)
  fpr, tpr, _ = _roc_from(image_tally)
  f1, threshold = _best_f1_from(image_tally)
  result = {"image_auroc": float(np.trapezoid(tpr, fpr)), "image_f1": f1, "image_threshold": threshold}

  reason = _pixel_skip_reason(maps, masks)
  if reason:
    result["pixel_metrics_skipped"] = reason
    return result
  maps, masks = _check_maps(maps, masks)
  if maps.shape[0] != scores.size:
    raise UserError(f"{maps.shape[0]} anomaly maps for {scores.size} image scores; they must match")
  if not masks.any() or masks.all():
    result["pixel_metrics_skipped"] = (
        "the ground-truth masks mark no defect pixel" if not masks.any() else
        "the ground-truth masks mark every pixel as a defect")
    return result
  pixel_tally = _pro_tally(maps, masks)
  fpr, tpr, _ = _roc_from(pixel_tally)
  f1, threshold = _best_f1_from(pixel_tally)
  pro_fpr, pro, _ = _pro_from(pixel_tally)
  result.update(
      pixel_auroc=float(np.trapezoid(tpr, fpr)), pixel_f1=f1, pixel_threshold=threshold,
      aupro=_area_to_limit(pro_fpr, pro, fpr_limit))
  return result


def _pixel_skip_reason(maps, masks):
  if maps is None and masks is None:
    return "no anomaly maps and no ground-truth masks were given"
  if maps is None:
    return "no anomaly maps were given"
  if masks is None:
    return "the dataset has no ground-truth masks"
  return None
