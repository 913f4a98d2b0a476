"""Unit tests of pipeline.core.metrics on tiny hand-computed arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core import metrics


def _box(shape, sl):
    m = np.zeros(shape, bool)
    m[sl] = True
    return m


def test_dice_hand_values():
    t = _box((4, 4, 4), np.s_[0:2, 0:2, 0:2])  # 8 voxels
    p = _box((4, 4, 4), np.s_[0:2, 0:2, 0:1])  # 4 voxels inside t
    assert metrics.dice(t, p) == pytest.approx(2 * 4 / 12)
    assert metrics.dice(t, t) == 1.0
    assert metrics.dice(t, ~t) == 0.0
    empty = np.zeros((4, 4, 4), bool)
    assert metrics.dice(empty, empty) == 1.0
    assert metrics.dice(t, empty) == 0.0
    with pytest.raises(ValueError, match="shape"):
        metrics.dice(t, empty[:3])


def test_hausdorff95_single_voxels_with_spacing():
    t = np.zeros((1, 1, 10), bool)
    p = np.zeros((1, 1, 10), bool)
    t[0, 0, 1] = True
    p[0, 0, 4] = True
    assert metrics.hausdorff95(t, p, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert metrics.hausdorff95(t, t, (1.0, 1.0, 1.0)) == 0.0
    assert math.isnan(metrics.hausdorff95(t, np.zeros_like(t), (1.0, 1.0, 1.0)))


def test_hausdorff95_is_robust_to_one_outlier_voxel():
    t = _box((30, 30, 30), np.s_[5:15, 5:15, 5:15])
    p = t.copy()
    p[28, 28, 28] = True  # one far false-positive voxel
    hd = metrics.hausdorff95(t, p, (1.0, 1.0, 1.0))
    assert hd == 0.0  # one outlier among ~490 surface distances is beyond the 95th percentile
    shifted = np.roll(t, 2, axis=0)
    assert metrics.hausdorff95(t, shifted, (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def test_absolute_volume_difference():
    t = _box((4, 4, 4), np.s_[0:2, 0:2, 0:2])
    p = _box((4, 4, 4), np.s_[0:2, 0:2, 0:3])  # 12 voxels vs 8
    assert metrics.absolute_volume_difference_percent(t, p) == pytest.approx(50.0)
    empty = np.zeros_like(t)
    assert metrics.absolute_volume_difference_percent(empty, empty) == 0.0
    assert math.isnan(metrics.absolute_volume_difference_percent(empty, p))


def test_lesion_wise_detection_counts():
    t = np.zeros((10, 10, 10), bool)
    t[1, 1, 1] = t[5, 5, 5] = t[8, 8, 8] = True  # 3 truth lesions
    p = np.zeros_like(t)
    p[1, 1, 1] = True  # hits lesion 1
    p[5, 5, 5:7] = True  # hits lesion 2 (overlap of 1 voxel is enough)
    p[2, 8, 2] = True  # false positive
    d = metrics.lesion_wise_detection(t, p)
    assert (d.n_truth, d.n_pred, d.truth_detected, d.pred_correct) == (3, 3, 2, 2)
    assert d.recall == pytest.approx(2 / 3) and d.precision == pytest.approx(2 / 3)
    assert d.f1 == pytest.approx(2 / 3)


def test_lesion_wise_connectivity():
    t = np.zeros((5, 5, 5), bool)
    t[1, 1, 1] = t[2, 2, 2] = True  # corner neighbours: one lesion at 26, two at 6
    assert metrics.lesion_wise_detection(t, t, 26).n_truth == 1
    assert metrics.lesion_wise_detection(t, t, 6).n_truth == 2
    with pytest.raises(ValueError, match="connectivity"):
        metrics.lesion_wise_detection(t, t, 8)


def test_lesion_wise_empty_cases():
    e = np.zeros((3, 3, 3), bool)
    one = e.copy()
    one[1, 1, 1] = True
    both = metrics.lesion_wise_detection(e, e)
    assert (both.recall, both.precision, both.f1) == (1.0, 1.0, 1.0)
    fp = metrics.lesion_wise_detection(e, one)
    assert math.isnan(fp.recall) and fp.precision == 0.0 and fp.f1 == 0.0
    fn = metrics.lesion_wise_detection(one, e)
    assert fn.recall == 0.0 and math.isnan(fn.precision) and fn.f1 == 0.0


def test_change_detection():
    t = np.zeros((6, 6, 6), bool)
    t[0:2, 0:2, 0:2] = True  # 8 change voxels
    p = np.zeros_like(t)
    p[0:2, 0:2, 0] = True  # 4 of them
    p[5, 5, 5] = True  # 1 false-positive voxel
    c = metrics.change_detection(t, p, voxel_volume_mm3=2.0)
    assert c.voxel_recall == pytest.approx(0.5)
    assert c.false_positive_volume_mm3 == pytest.approx(2.0)
    assert c.lesion_recall == 1.0 and c.lesion_precision == 0.5
    assert math.isnan(metrics.change_voxel_recall(np.zeros_like(t), p))
