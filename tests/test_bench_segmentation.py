"""The restricted-diffusion resolution ceiling of ``benchmarks/segmentation.py``
(:func:`dwi_grid_ceiling`): the truth as a coarse DWI grid can hold it."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
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
