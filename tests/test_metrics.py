"""Metrics: AUROC and F1 equal scikit-learn's, AUPRO a naive per-threshold loop; bad input fails loudly."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from cflow_jax import metrics
from cflow_jax.errors import UserError


def _score_sets():
  rng = np.random.default_rng(0)
  labels = rng.random(500) < 0.3
  yield "random", rng.normal(size=500) + labels, labels
  yield "ties", np.round(rng.normal(size=500) + labels, 1), labels
  yield "integers", rng.integers(0, 4, 500) + labels, labels.astype(int)
  yield "float32", (rng.random(500) + 0.2 * labels).astype(np.float32), labels.astype(np.float32)
  yield "perfect", labels * 2.0, labels
  yield "reversed", labels * -2.0, labels
  yield "one_positive", rng.random(50), np.arange(50) == 7


SCORE_SETS = list(_score_sets())
IDS = [name for name, _, _ in SCORE_SETS]


@pytest.mark.parametrize("name,scores,labels", SCORE_SETS, ids=IDS)
def test_auroc_equals_sklearn(name, scores, labels):
  assert abs(metrics.auroc(scores, labels) - skm.roc_auc_score(labels, scores)) < 1e-9


@pytest.mark.parametrize("name,scores,labels", SCORE_SETS, ids=IDS)
def test_roc_curve_equals_sklearn_without_dropped_points(name, scores, labels):
  fpr, tpr, thresholds = metrics.roc_curve(scores, labels)
  ref_fpr, ref_tpr, ref_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
  np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-12)
  np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-12)
  assert thresholds[0] == np.inf
  np.testing.assert_array_equal(thresholds[1:], ref_thresholds[1:])


@pytest.mark.parametrize("name,scores,labels", SCORE_SETS, ids=IDS)
def test_precision_recall_curve_equals_sklearn(name, scores, labels):
  precision, recall, thresholds = metrics.precision_recall_curve(scores, labels)
  ref_p, ref_r, ref_t = skm.precision_recall_curve(labels, scores)
  # sklearn's run from the lowest threshold up and end with an extra (1, 0) point.
  np.testing.assert_allclose(precision, ref_p[:-1][::-1], rtol=0, atol=1e-12)
  np.testing.assert_allclose(recall, ref_r[:-1][::-1], rtol=0, atol=1e-12)
  np.testing.assert_array_equal(thresholds, ref_t[::-1])


@pytest.mark.parametrize("name,scores,labels", SCORE_SETS, ids=IDS)
def test_best_f1_is_sklearn_max_f1_at_the_highest_best_threshold(name, scores, labels):
  f1, threshold = metrics.best_f1(scores, labels)
  p, r, t = skm.precision_recall_curve(labels, scores)
  ref = np.divide(2 * p * r, p + r, out=np.zeros_like(p), where=(p + r) > 0)[:-1]
  assert abs(f1 - ref.max()) < 1e-12
  assert threshold == t[np.abs(ref - ref.max()) < 1e-12].max()
  # "Anomalous when score >= threshold" reproduces that F1.
  assert abs(skm.f1_score(labels, scores >= threshold) - f1) < 1e-12


def _naive_aupro(maps, masks, fpr_limit):
  """Per-threshold loop over every distinct score; regions labelled image by image (8-connectivity)."""
  regions = []
  for i, mask in enumerate(masks):
    labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
    regions += [(i, labelled == k) for k in range(1, count + 1)]
  normal = ~masks
  points = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:
    hits = maps >= t
    points.append((hits[normal].mean(), np.mean([hits[i][region].mean() for i, region in regions])))
  area = 0.0
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 >= fpr_limit:
      break
    if x1 > fpr_limit:  # cut the segment at the limit
      y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
      x1 = fpr_limit
    area += (x1 - x0) * (y0 + y1) / 2
  return area / fpr_limit, np.array(points)


def _blob_masks(rng, n, size):
  """Masks with several rectangles in some images and none in others."""
  masks = np.zeros((n, size, size), bool)
  for i in range(0, n, 2):
    for _ in range(rng.integers(1, 4)):
      r, c = rng.integers(0, size - 3, 2)
      h, w = rng.integers(1, 4, 2)
      masks[i, r:r + h, c:c + w] = True
  return masks


def _map_sets():
  rng = np.random.default_rng(1)
  masks = _blob_masks(rng, 5, 12)
  yield "continuous", rng.random(masks.shape) + 0.5 * masks, masks
  yield "ties", np.round(rng.random(masks.shape) + 0.5 * masks, 1), masks
  yield "integers", rng.integers(0, 5, masks.shape) + masks, masks.astype(np.uint8)
  masks = _blob_masks(rng, 3, 16)
  yield "weak", rng.random(masks.shape) + 0.1 * masks, masks


MAP_SETS = list(_map_sets())
MAP_IDS = [name for name, _, _ in MAP_SETS]


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("name,maps,masks", MAP_SETS, ids=MAP_IDS)
def test_aupro_equals_naive_per_threshold_loop(name, maps, masks, fpr_limit):
  expected, _ = _naive_aupro(maps, masks.astype(bool), fpr_limit)
  assert abs(metrics.aupro(maps, masks, fpr_limit) - expected) < 1e-6


@pytest.mark.parametrize("name,maps,masks", MAP_SETS, ids=MAP_IDS)
def test_pro_curve_points_equal_naive_ones(name, maps, masks):
  _, points = _naive_aupro(maps, masks.astype(bool), 0.3)
  fpr, pro, thresholds = metrics.pro_curve(maps, masks)
  np.testing.assert_allclose(fpr, points[:, 0], rtol=0, atol=1e-12)
  np.testing.assert_allclose(pro, points[:, 1], rtol=0, atol=1e-12)
  np.testing.assert_array_equal(thresholds[1:], np.unique(maps)[::-1])


def test_diagonal_touch_is_one_region():
  masks = np.zeros((1, 6, 6), bool)
  masks[0, 1, 1] = masks[0, 2, 2] = True  # one region, touching at a corner
  masks[0, 4, 4] = True  # a second region
  maps = np.zeros(masks.shape)
  maps[0, 1, 1] = 1.0  # finds half of the diagonal region, none of the other
  regions, count = metrics.label_regions(masks)
  assert count == 2 and regions[0, 1, 1] == regions[0, 2, 2]
  np.testing.assert_allclose(metrics.region_overlaps(maps, masks, 1.0), [0.5, 0.0])
  fpr, pro, thresholds = metrics.pro_curve(maps, masks)
  assert thresholds[1] == 1.0 and fpr[1] == 0.0 and pro[1] == pytest.approx(0.25)  # 4-connectivity: 1/3


def test_regions_do_not_connect_across_images():
  masks = np.ones((2, 3, 3), bool)
  _, count = metrics.label_regions(masks)
  assert count == 2


def test_aupro_is_one_for_a_perfect_map_and_small_for_a_reversed_one():
  masks = _blob_masks(np.random.default_rng(2), 4, 10)
  assert metrics.aupro(masks.astype(float), masks) == pytest.approx(1.0)
  assert metrics.aupro(masks * -1.0, masks) == pytest.approx(0.0)


def test_evaluate_with_maps_matches_the_single_metrics():
  _, maps, masks = MAP_SETS[0]
  scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
  result = metrics.evaluate(scores, labels, maps, masks)
  assert set(result) == {"image_auroc", "image_f1", "image_threshold", "pixel_auroc", "pixel_f1",
                         "pixel_threshold", "aupro"}
  assert all(type(v) is float for v in result.values())
  assert result["image_auroc"] == pytest.approx(metrics.auroc(scores, labels), abs=1e-12)
  assert (result["image_f1"], result["image_threshold"]) == metrics.best_f1(scores, labels)
  assert result["pixel_auroc"] == pytest.approx(skm.roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
  assert (result["pixel_f1"], result["pixel_threshold"]) == metrics.best_f1(maps, masks)
  assert result["aupro"] == pytest.approx(metrics.aupro(maps, masks), abs=1e-12)


def test_evaluate_skips_pixel_metrics_with_a_reason():
  scores, labels = np.array([0.1, 0.9, 0.4]), np.array([0, 1, 0])
  maps = np.random.default_rng(3).random((3, 4, 4))
  for masks in (None, np.zeros((3, 4, 4))):
    result = metrics.evaluate(scores, labels, maps, masks)
    assert set(result) == {"image_auroc", "image_f1", "image_threshold", "pixel_metrics_skipped"}
    assert "mask" in result["pixel_metrics_skipped"]


def test_evaluate_rejects_maps_for_other_images():
  with pytest.raises(UserError, match="2 anomaly maps for 3 image scores"):
    metrics.evaluate([0.1, 0.9, 0.4], [0, 1, 0], np.zeros((2, 4, 4)), np.ones((2, 4, 4)))


@pytest.mark.parametrize("call,message", [
    (lambda: metrics.auroc([0.1, 0.2], [0, 0]), "all normal"),
    (lambda: metrics.best_f1([0.1, 0.2], [1, 1]), "all anomalous"),
    (lambda: metrics.auroc([0.1, np.nan, 0.3], [0, 1, 0]),
     r"1 NaN or infinite values \(the first at index \(1,\)\)"),
    (lambda: metrics.auroc([0.1, 0.2, 0.3], [0, 1]), r"shape \(3,\) but labels has shape \(2,\)"),
    (lambda: metrics.auroc([0.1, 0.2], [0, 255]), "boolean or 0/1"),
    (lambda: metrics.auroc([], []), "empty"),
    (lambda: metrics.auroc(["a", "b"], [0, 1]), "real numbers"),
    (lambda: metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))), "masks are all normal"),
    (lambda: metrics.aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), "maps has shape"),
    (lambda: metrics.aupro(np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4))), r"\(N, H, W\)"),
    (lambda: metrics.aupro(np.zeros((4, 4)), np.eye(4), fpr_limit=0), "fpr_limit"),
])
def test_degenerate_inputs_raise_clear_user_errors(call, message):
  with pytest.raises(UserError, match=message):
    call()
