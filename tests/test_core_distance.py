"""pipeline.core.distance: the Euclidean distance transform every core step uses."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.core.distance import edt_mm


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 3.0), (1.0, 2.0), (4.0,)])
def test_equals_scipy_bit_for_bit_on_integer_spacings(spacing):
    # integer spacings (the 1 mm subject space): every squared distance is an exact integer
    rng = np.random.default_rng(0)
    mask = rng.random((23, 31, 17)[: len(spacing)]) > 0.05
    np.testing.assert_array_equal(edt_mm(mask, spacing),
                                  ndimage.distance_transform_edt(mask, sampling=spacing))


def test_agrees_with_scipy_on_other_spacings():
    rng = np.random.default_rng(1)
    mask = rng.random((20, 30, 12)) > 0.02
    mask[:, :, :2] = True  # far from every background voxel along the thick axis too
    sp = (0.9, 0.9, 4.5)
    got, want = edt_mm(mask, sp), ndimage.distance_transform_edt(mask, sampling=sp)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert (got > 0).sum() == mask.sum()  # 0 exactly on the background


def test_no_background_is_infinitely_far_and_bad_spacing_is_refused():
    assert np.isinf(edt_mm(np.ones((4, 5, 6), bool), (1.0, 1.0, 1.0))).all()
    assert not edt_mm(np.zeros((4, 5), bool), (1.0, 1.0)).any()
    with pytest.raises(ValueError, match="spacing_mm has 2 values for a 3D mask"):
        edt_mm(np.ones((4, 5, 6), bool), (1.0, 1.0))
    with pytest.raises(ValueError, match="1-3D"):
        edt_mm(np.ones((2, 2, 2, 2), bool), (1.0,) * 4)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.9, 0.9, 4.5)])
def test_threads_give_the_same_distances(spacing):
    # the segment node runs each session's transforms on its threads (edt holds the GIL)
    rng = np.random.default_rng(1)
    mask = rng.random((64, 57, 41)) > 0.02
    one = edt_mm(mask, spacing)
    np.testing.assert_array_equal(edt_mm(mask, spacing, threads=2), one)
    np.testing.assert_array_equal(edt_mm(mask, spacing, threads=3), one)
    with pytest.raises(ValueError, match="threads"):
        edt_mm(mask, spacing, threads=0)
