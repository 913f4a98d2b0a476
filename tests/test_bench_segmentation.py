"""The restricted-diffusion resolution ceiling of ``benchmarks/segmentation.py``
(:func:`dwi_grid_ceiling`): the truth as a coarse DWI grid can hold it; and the ``real-dwi``
case's masks of a DWI series alone (:func:`healthy_dwi_masks`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
pytest.importorskip("nibabel")
from benchmarks.segmentation import dwi_grid_ceiling  # noqa: E402


def _affine(spacing, origin=(0.0, 0.0, 0.0)):
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def test_block_on_the_dwi_grid_is_kept_exactly():
    # truth 1 mm; DWI 3 x 3 x 3 mm voxels whose edges coincide with the block's faces
    truth = np.zeros((30, 30, 30), bool)
    truth[6:15, 9:21, 3:12] = True
    dwi = _affine((3.0, 3.0, 3.0), origin=(1.0, 1.0, 1.0))  # voxel 0 covers truth 0..2
    out = dwi_grid_ceiling(truth, _affine((1.0, 1.0, 1.0)), dwi, (10, 10, 10))
    np.testing.assert_array_equal(out, truth)


def test_half_volume_rule_and_thin_shell_loss():
    truth_aff = _affine((1.0, 1.0, 1.0))
    dwi = _affine((4.0, 4.0, 4.0), origin=(1.5, 1.5, 1.5))  # voxel 0 covers truth 0..3
    truth = np.zeros((40, 40, 40), bool)
    truth[8:11, 8:12, 8:12] = True  # 3/4 of one DWI voxel: kept, grows to the whole voxel
    truth[24:25, 24:28, 24:28] = True  # 1/4 of one DWI voxel: lost
    out = dwi_grid_ceiling(truth, truth_aff, dwi, (10, 10, 10))
    assert out[8:12, 8:12, 8:12].all() and out.sum() == 64
    assert not out[20:32, 20:32, 20:32].any()


def _synthetic_dwi(blob: bool, seed: int = 0):
    """A 2 mm 'head' (ellipsoid, S0 1000, ADC 800 um^2/s) with 6 b = 1000 directions and a
    b0, 1 % Gaussian noise; with ``blob`` a 3-voxel-radius ball of ADC 400 (rADC 0.5)."""
    shape = (48, 48, 24)
    idx = np.indices(shape).astype(float)
    centre = [(n - 1) / 2 for n in shape]
    head = (((idx[0] - centre[0]) / 18) ** 2 + ((idx[1] - centre[1]) / 18) ** 2
            + ((idx[2] - centre[2]) / 9) ** 2) <= 1
    adc = np.where(head, 800.0, 0.0)
    ball = ((idx[0] - centre[0] - 6) ** 2 + (idx[1] - centre[1]) ** 2
            + (idx[2] - centre[2]) ** 2) <= 9
    if blob:
        adc[ball] = 400.0
    s0 = np.where(head, 1000.0, 0.0)
    bvals = np.array([0.0] + [1000.0] * 6)
    rng = np.random.default_rng(seed)
    vols = [s0 * np.exp(-b * adc * 1e-6) for b in bvals]
    dwi = np.stack(vols, axis=-1) + rng.normal(0, 10.0, shape + (len(bvals),))
    return np.clip(dwi, 1.0, None).astype(np.float32), bvals, ball


def test_healthy_dwi_masks_find_a_restricted_ball_and_nothing_in_noise():
    """``real-dwi``'s measure: the project's restricted mask on a DWI series alone holds a
    restricted ball (about its volume) and nothing when the tissue is uniform."""
    from benchmarks.segmentation import healthy_dwi_masks
    from pipeline.config import load_config

    config = load_config(None)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for blob in (True, False):
        dwi, bvals, ball = _synthetic_dwi(blob)
        res = healthy_dwi_masks(dwi, bvals, affine, config)
        restricted = res["project"].restricted
        assert res["spacing"] == (2.0, 2.0, 2.0)
        assert abs(res["project"].reference_adc.median_um2_s - 800) < 20
        if blob:
            ball_zyx = ball.T  # the masks are in (z, y, x) array order
            assert restricted[ball_zyx].mean() > 0.9
            assert 0.7 < restricted.sum() / ball.sum() < 2.0
        else:
            assert not restricted.any()
            assert not res["baseline"].any()


def test_summary_of_control_subjects_only_reports_their_false_positives():
    """``--only`` with control subjects alone: no lesion row to pool, the summary still reports
    the controls' false positives (it raised KeyError 'dice_pooled' before)."""
    from benchmarks.segmentation import summary

    rows = [{"subject": "03", "session": ses, "preset": "control", "kind": kind,
             "method": method, "t_vox": 0, "tp_vox": 0, "p_vox": p, "dice": np.nan,
             "f1": np.nan, "avd_pct": np.nan, "hd95_mm": np.nan, "fp_ml": p * 0.001,
             "pred_ml": p * 0.001}
            for ses in ("01", "02") for kind in ("flair", "restricted")
            for method, p in (("project", 0), ("baseline", 300))]
    table = summary(pd.DataFrame(rows), None, None)
    assert list(table.index) == ["phantom control false positives per session"]
    assert table.loc[table.index[0], "project"].startswith("max 0 mL")
    assert table.loc[table.index[0], "baseline"].startswith("max 0.6 mL")
