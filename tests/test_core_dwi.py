"""Unit tests of pipeline.core.dwi (hand-computed values and property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.core import dwi

TOL = 0.1


def test_split_shells_hand_values():
    b0, dw, bhigh = dwi.split_shells([0, 5, 1000, 995, 1005, 500], 50, shell_tolerance=TOL)
    assert b0.tolist() == [0, 1]
    assert dw.tolist() == [2, 3, 4, 5]
    assert bhigh == pytest.approx(1000.0)


def test_split_shells_errors_say_what_to_do():
    with pytest.raises(ValueError, match="b0_threshold"):
        dwi.split_shells([1000, 1000], 50, shell_tolerance=TOL)
    with pytest.raises(ValueError, match="no diffusion-weighted"):
        dwi.split_shells([0, 0, 5], 50, shell_tolerance=TOL)
    with pytest.raises(ValueError, match="negative"):
        dwi.split_shells([0, -1000], 50, shell_tolerance=TOL)


def _synthetic_dwi(adc_um2_s=800.0, s0=1000.0, bvals=(0, 1000, 1000, 1000, 0, 500)):
    bvals = np.array(bvals, float)
    vols = [np.full((3, 4, 5), s0 * np.exp(-b * adc_um2_s * 1e-6), np.float32) for b in bvals]
    return np.stack(vols, axis=-1), bvals


def test_mean_b0_and_trace_pick_the_right_volumes():
    d, b = _synthetic_dwi()
    d[..., 1] *= 1.21  # directional variation in the shell: trace is the geometric mean
    d[..., 2] /= 1.1
    d[..., 3] /= 1.1
    assert np.allclose(dwi.mean_b0(d, b, 50), 1000.0)
    trace, bval = dwi.trace_dwi(d, b, 50, shell_tolerance=TOL)
    assert bval == 1000.0
    assert trace.dtype == np.float32
    assert np.allclose(trace, 1000 * np.exp(-0.8), rtol=1e-5)


def test_trace_zero_where_any_volume_nonpositive():
    d, b = _synthetic_dwi()
    d[0, 0, 0, 2] = 0.0
    trace, _ = dwi.trace_dwi(d, b, 50, shell_tolerance=TOL)
    assert trace[0, 0, 0] == 0.0 and trace[1, 1, 1] > 0


def test_volume_count_mismatch():
    d, b = _synthetic_dwi()
    with pytest.raises(ValueError, match="does not belong"):
        dwi.mean_b0(d, b[:-1], 50)


def test_adc_from_two_b_values_hand_value():
    s0 = np.array([1000.0])
    sb = np.array([1000.0 * np.exp(-1000 * 0.0008)])
    adc = dwi.adc_from_signals(s0, sb, 1000.0, adc_max_um2_s=5000.0)
    assert adc.dtype == np.float32
    assert adc[0] == pytest.approx(800.0, rel=1e-5)


def test_adc_end_to_end_from_4d():
    d, b = _synthetic_dwi(adc_um2_s=1234.0)
    trace, bval = dwi.trace_dwi(d, b, 50, shell_tolerance=TOL)
    adc = dwi.adc_from_signals(dwi.mean_b0(d, b, 50), trace, bval, adc_max_um2_s=5000.0)
    assert np.allclose(adc, 1234.0, rtol=1e-4)


def test_adc_invalid_is_nan_and_clipped():
    s0 = np.array([1000.0, 0.0, 1000.0, 1000.0, 1000.0])
    sb = np.array([100.0, 10.0, -1.0, 1100.0, 1e-6])
    adc = dwi.adc_from_signals(s0, sb, 1000.0, adc_max_um2_s=5000.0)
    assert adc[0] == pytest.approx(np.log(10) / 1000 * 1e6, rel=1e-5)
    assert np.isnan(adc[1]) and np.isnan(adc[2])
    assert adc[3] == 0.0  # Sb > S0: noise, clipped to 0
    assert adc[4] == 5000.0  # noise floor: clipped to the maximum
    with pytest.raises(ValueError):
        dwi.adc_from_signals(s0, sb, 0.0, adc_max_um2_s=5000.0)


def _brain_adc_um2_s(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(800, 80, int(n * 0.85)), rng.normal(3000, 200, n // 7)])


@pytest.mark.parametrize(
    ("unit", "scale"), [("mm2_s", 1e-6), ("1e-3mm2_s", 1e-3), ("um2_s", 1.0)]
)
def test_detect_each_unit(unit, scale):
    values = _brain_adc_um2_s() * scale
    found, factor, text = dwi.detect_adc_unit(values, 150.0, 3500.0)
    assert found == unit
    assert factor == pytest.approx(1.0 / scale)
    assert unit in text
    converted, n_neg = dwi.convert_adc(values, found)
    assert n_neg == 0
    assert np.median(converted) == pytest.approx(np.median(_brain_adc_um2_s()), rel=1e-4)


def test_detect_ignores_background_zeros():
    values = np.concatenate([np.zeros(5000), _brain_adc_um2_s() * 1e-3])
    assert dwi.detect_adc_unit(values, 150.0, 3500.0)[0] == "1e-3mm2_s"


def test_detect_ambiguous_and_implausible():
    values = np.full(100, 2.0)  # 2 um^2/s or 2000 um^2/s with a very wide plausible range
    with pytest.raises(dwi.AdcUnitError, match="inputs.adc_unit") as err:
        dwi.detect_adc_unit(values, 1.0, 5000.0)
    assert "several units" in str(err.value) and "2" in str(err.value)
    with pytest.raises(dwi.AdcUnitError, match="median brain ADC value is 50"):
        dwi.detect_adc_unit(np.full(100, 50.0), 150.0, 3500.0)
    with pytest.raises(dwi.AdcUnitError, match="no finite"):
        dwi.detect_adc_unit(np.zeros(10), 150.0, 3500.0)
    assert issubclass(dwi.AdcUnitError, ValueError)


def test_convert_adc_negative_and_nan():
    out, n_neg = dwi.convert_adc(np.array([-0.1, 0.8, np.nan, np.inf]), "1e-3mm2_s")
    assert out.dtype == np.float32
    assert n_neg == 1
    assert out[0] == 0.0 and out[1] == pytest.approx(800.0)
    assert np.isnan(out[2]) and np.isnan(out[3])
    with pytest.raises(ValueError, match="unknown ADC unit"):
        dwi.convert_adc(np.ones(3), "auto")


# --------------------------------------------------------------------------- properties

_dtypes = st.sampled_from([np.uint8, np.int16, np.int32, np.float32, np.float64])
_shapes = hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=4)
_bvals = st.lists(st.sampled_from([0.0, 5.0, 500.0, 950.0, 1000.0, 2000.0]), min_size=1,
                  max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), dtype=_dtypes, bvals=_bvals)
def test_dwi_functions_never_crash_unexpectedly(data, dtype, bvals):
    shape = data.draw(_shapes)
    shape = shape[:3] + (len(bvals),)
    arr = data.draw(hnp.arrays(dtype, shape))
    has_b0 = any(b <= 50 for b in bvals)
    has_dw = any(b > 50 for b in bvals)
    try:
        b0 = dwi.mean_b0(arr, bvals, 50)
    except ValueError:
        assert not has_b0
    else:
        assert b0.shape == shape[:3] and b0.dtype == np.float32
    try:
        trace, bval = dwi.trace_dwi(arr, bvals, 50, shell_tolerance=TOL)
    except ValueError:
        assert not has_dw
    else:
        assert trace.shape == shape[:3] and trace.dtype == np.float32
        assert bval > 50
        if has_b0:
            with np.errstate(all="ignore"):
                adc = dwi.adc_from_signals(b0, trace, bval, adc_max_um2_s=5000.0)
            ok = adc[np.isfinite(adc)]
            assert np.all((ok >= 0) & (ok <= 5000.0))


@settings(max_examples=60, deadline=None)
@given(arr=hnp.arrays(st.sampled_from([np.float32, np.float64, np.int16]),
                      hnp.array_shapes(min_dims=1, max_dims=3, max_side=6)))
def test_unit_detection_and_conversion_properties(arr):
    try:
        unit, factor, _ = dwi.detect_adc_unit(arr, 150.0, 3500.0)
    except dwi.AdcUnitError:
        return
    out, n_neg = dwi.convert_adc(arr, unit)
    assert out.shape == np.shape(arr) and out.dtype == np.float32
    finite = out[np.isfinite(out)]
    assert np.all(finite >= 0) and n_neg >= 0
