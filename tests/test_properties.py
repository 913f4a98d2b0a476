"""Property-based tests (hypothesis): functions taking arrays and headers do not crash on random
shapes, dtypes, spacings and orientations, other than with their documented errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.bids import tracking_days
from pipeline.core import dwi as core_dwi
from pipeline.core import tracking
from pipeline.io import head_mask, nib_to_sitk, sitk_affine
from pipeline.validate import fov_overlap

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

shapes3 = st.tuples(*[st.integers(2, 7)] * 3)
spacings = st.tuples(*[st.floats(0.2, 6.0)] * 3)
dtypes = st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64])


@st.composite
def affines(draw):
    """Random orthonormal direction (rotation and flips), spacing and origin."""
    q = np.array(draw(st.tuples(*[st.floats(-1, 1)] * 4)))
    if np.linalg.norm(q) < 1e-3:
        q = np.array([1.0, 0, 0, 0])
    w, x, y, z = q / np.linalg.norm(q)
    rot = np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])
    flips = np.diag([draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)])
    affine = np.eye(4)
    affine[:3, :3] = rot @ flips @ np.diag(draw(spacings))
    affine[:3, 3] = draw(st.tuples(*[st.floats(-300, 300)] * 3))
    return affine


@SETTINGS
@given(shape=shapes3, dtype=dtypes, affine=affines(), data=st.data())
def test_nib_sitk_round_trip(shape, dtype, affine, data):
    arr = data.draw(hnp.arrays(dtype, shape, elements=st.integers(0, 100)))
    img = nib_to_sitk(arr, affine)
    np.testing.assert_allclose(sitk_affine(img), affine, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).T, arr)
    # voxel (i, j, k) lands at the world point the affine gives (RAS -> LPS)
    idx = tuple(int(s) - 1 for s in shape)
    ras = affine @ np.array([*idx, 1.0])
    lps = img.TransformIndexToPhysicalPoint(idx)
    np.testing.assert_allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-6)


@SETTINGS
@given(shape=shapes3, n=st.integers(1, 4), affine=affines())
def test_nib_sitk_4d_vector(shape, n, affine):
    arr = np.random.default_rng(0).random(shape + (n,)).astype(np.float32)
    img = nib_to_sitk(arr, affine)
    assert img.GetNumberOfComponentsPerPixel() == n and img.GetSize() == shape


@SETTINGS
@given(affine=affines(), axis=st.integers(0, 2))
def test_nib_to_sitk_refuses_zero_voxel_size(affine, axis):
    affine[:3, axis] = 0
    with pytest.raises(ValueError, match="zero or non-finite voxel size"):
        nib_to_sitk(np.zeros((2, 2, 2)), affine)


finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=32)


@SETTINGS
@given(s0=hnp.arrays(np.float32, shapes3, elements=finite_or_not), data=st.data(),
       b=st.floats(1, 5000))
def test_adc_from_signals_any_values(s0, data, b):
    sb = data.draw(hnp.arrays(np.float32, s0.shape, elements=finite_or_not))
    with np.errstate(all="ignore"):
        adc = core_dwi.adc_from_signals(s0, sb, b, adc_max_um2_s=5000.0)
    assert adc.shape == s0.shape and adc.dtype == np.float32
    ok = np.isfinite(adc)
    assert np.all((adc[ok] >= 0) & (adc[ok] <= 5000))
    valid = np.isfinite(s0) & np.isfinite(sb) & (s0 > 0) & (sb > 0)
    assert not np.any(ok & ~valid)  # undefined where a signal is not positive and finite


@SETTINGS
@given(b=st.floats(-10, 0))
def test_adc_from_signals_refuses_bad_b(b):
    with pytest.raises(ValueError, match="b-value must be positive"):
        core_dwi.adc_from_signals(np.ones(3), np.ones(3), b, adc_max_um2_s=5000.0)


@SETTINGS
@given(values=hnp.arrays(np.float64, st.integers(0, 200), elements=finite_or_not))
def test_detect_adc_unit_any_values(values):
    try:
        unit, factor, why = core_dwi.detect_adc_unit(values, 150.0, 3500.0)
    except core_dwi.AdcUnitError as exc:
        assert "inputs.adc_unit" in str(exc)
    else:
        assert core_dwi.ADC_UNIT_FACTORS[unit] == factor and unit in why


@SETTINGS
@given(median_um2=st.floats(300, 2500), unit=st.sampled_from(sorted(core_dwi.ADC_UNIT_FACTORS)),
       n=st.integers(5, 100))
def test_detect_adc_unit_recovers_scaling(median_um2, unit, n):
    rng = np.random.default_rng(n)
    tissue_um2 = median_um2 * rng.uniform(0.8, 1.2, n)
    values = tissue_um2 / core_dwi.ADC_UNIT_FACTORS[unit]
    assert core_dwi.detect_adc_unit(values, 150.0, 3500.0)[0] == unit


@SETTINGS
@given(adc=hnp.arrays(np.float64, shapes3, elements=finite_or_not),
       unit=st.sampled_from(sorted(core_dwi.ADC_UNIT_FACTORS)))
def test_convert_adc_any_values(adc, unit):
    with np.errstate(all="ignore"):
        out, n_neg = core_dwi.convert_adc(adc, unit)
    assert out.dtype == np.float32 and out.shape == adc.shape
    assert not np.any(out < 0) and n_neg == int(np.sum(np.isfinite(adc) & (adc < 0)))
    assert np.all(np.isnan(out[~np.isfinite(adc)]))


@SETTINGS
@given(data=hnp.arrays(np.float32, shapes3, elements=finite_or_not))
def test_head_mask_any_values(data):
    with np.errstate(all="ignore"):
        mask = head_mask(data)
    assert mask.shape == data.shape and mask.dtype == bool


@SETTINGS
@given(a=affines(), b=affines(), sa=shapes3, sb=shapes3)
def test_fov_overlap_bounds(a, b, sa, sb):
    value = fov_overlap(a, sa, b, sb)
    assert 0.0 <= value <= 1.0 + 1e-9
    assert fov_overlap(a, sa, a, sa) == pytest.approx(1.0)
    assert value == pytest.approx(fov_overlap(b, sb, a, sa))


@SETTINGS
@given(days=st.lists(st.floats(0, 400), min_size=1, max_size=8))
def test_tracking_days_strictly_increasing(days):
    out = tracking_days(sorted(days))
    assert len(out) == len(days)
    assert all(b > a for a, b in zip(out, out[1:]))


masks = hnp.arrays(bool, st.just((6, 6, 4)))


@SETTINGS
@given(sessions=st.lists(masks, min_size=1, max_size=4),
       connectivity=st.sampled_from([6, 18, 26]), tol=st.integers(0, 2),
       min_overlap=st.integers(1, 5))
def test_track_lesions_random_masks(sessions, connectivity, tol, min_overlap):
    days = list(range(0, 3 * len(sessions), 3))
    result = tracking.track_lesions(
        sessions, days, connectivity=connectivity, min_overlap_voxels=min_overlap,
        shift_tolerance_voxels=tol, enlarging_relative=0.25, enlarging_absolute_ml=0.0,
        voxel_volume_ml=0.001)
    assert len(result.dseg) == len(sessions)
    for mask, dseg in zip(sessions, result.dseg):
        assert dseg.shape == mask.shape
        np.testing.assert_array_equal(dseg > 0, mask)  # every lesion voxel has an id


@SETTINGS
@given(a=masks, b=masks, tol=st.integers(0, 2))
def test_overlap_links_random(a, b, tol):
    la, lb = tracking.label_components(a), tracking.label_components(b)
    links = tracking.overlap_links(la, lb, min_overlap_voxels=1, shift_tolerance_voxels=tol)
    for col in links.columns[:2]:
        assert links[col].isin(np.unique(la if col == links.columns[0] else lb)).all()


def test_track_lesions_refuses_equal_days():
    m = np.zeros((4, 4, 4), bool)
    with pytest.raises(ValueError, match="strictly increasing"):
        tracking.track_lesions([m, m], [0.0, 0.0], connectivity=26, min_overlap_voxels=1,
                               shift_tolerance_voxels=0, enlarging_relative=0.25,
                               enlarging_absolute_ml=0.0, voxel_volume_ml=0.001)
    # the workflow's day offset makes the same input valid
    tracking.track_lesions([m, m], tracking_days([0.0, 0.0]), connectivity=26,
                           min_overlap_voxels=1, shift_tolerance_voxels=0,
                           enlarging_relative=0.25, enlarging_absolute_ml=0.0,
                           voxel_volume_ml=0.001)
