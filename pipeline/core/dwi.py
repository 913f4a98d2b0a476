"""DWI and ADC handling: shells, mean b0, trace DWI, ADC and ADC unit detection.

Pure functions on numpy arrays. A 4D DWI array holds its volumes on the LAST axis (the
nibabel / NIfTI convention), matching ``bvals`` one-to-one. ADC values returned by this module
are in the pipeline's canonical unit, um^2/s (1e-6 mm^2/s); b-values are in s/mm^2.

Conventions for undefined values
--------------------------------
* :func:`trace_dwi` returns 0 where any highest-shell volume is <= 0 or not finite (the
  geometric mean of a non-positive signal is undefined; 0 reads as background in viewers).
* :func:`adc_from_signals` returns NaN where S0 or Sb is <= 0 or not finite: an ADC of 0 would
  read as "maximally restricted" downstream, whereas NaN is ignored by
  :mod:`pipeline.core.dynamics` (classes 0, excluded from references and means). Defined values
  are clipped to ``[0, adc_max_um2_s]``: Sb > S0 (noise) gives ADC 0, a vanishing Sb (noise
  floor in CSF) gives at most ``adc_max_um2_s``.
* :func:`convert_adc` keeps NaN for non-finite input, clips negative values to 0 and reports
  how many it clipped.
"""

from __future__ import annotations

import numpy as np

#: ADC units accepted for scanner ADC maps and their factor to um^2/s.
ADC_UNIT_FACTORS: dict[str, float] = {"mm2_s": 1e6, "1e-3mm2_s": 1e3, "um2_s": 1.0}


class AdcUnitError(ValueError):
    """The unit of an ADC map cannot be determined from its values."""


def _as_bvals(bvals: np.ndarray | list[float]) -> np.ndarray:
    b = np.asarray(bvals, dtype=np.float64).ravel()
    if b.size == 0:
        raise ValueError("bvals is empty: the DWI needs one b-value per volume (a .bval file)")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"bvals contain non-finite values: {b.tolist()}")
    if np.any(b < 0):
        raise ValueError(f"bvals contain negative values: {b.tolist()}")
    return b


def highest_shell(
    bvals: np.ndarray | list[float], b0_threshold_s_mm2: float, *, shell_tolerance: float
) -> tuple[np.ndarray, float]:
    """Indices and b-value of the highest diffusion-weighted shell.

    Parameters
    ----------
    bvals
        One b-value per volume (s/mm^2).
    b0_threshold_s_mm2
        Volumes with b at or below this are b0 volumes (s/mm^2).
    shell_tolerance
        A volume belongs to the highest shell when its b-value is at least
        ``(1 - shell_tolerance) * max(b)`` (fraction, e.g. 0.1).

    Returns
    -------
    indices, b_value
        Volume indices of the highest shell and the mean b-value of those volumes (s/mm^2).

    Raises
    ------
    ValueError
        If no volume has b above ``b0_threshold_s_mm2``.
    """
    b = _as_bvals(bvals)
    dw = b > b0_threshold_s_mm2
    if not dw.any():
        raise ValueError(
            f"no diffusion-weighted volume: all b-values {sorted(set(b.tolist()))} are <= "
            f"b0 threshold {b0_threshold_s_mm2} s/mm^2; check the .bval file or lower "
            "inputs.b0_threshold_s_mm2"
        )
    bmax = b[dw].max()
    idx = np.flatnonzero(dw & (b >= (1.0 - shell_tolerance) * bmax))
    return idx, float(b[idx].mean())


def split_shells(
    bvals: np.ndarray | list[float], b0_threshold_s_mm2: float, *, shell_tolerance: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Split volumes into b0 and diffusion-weighted volumes.

    Parameters
    ----------
    bvals
        One b-value per volume (s/mm^2).
    b0_threshold_s_mm2
        Volumes with b at or below this count as b0 (s/mm^2).
    shell_tolerance
        Relative width of the highest shell (fraction), see :func:`highest_shell`.

    Returns
    -------
    b0_indices, dw_indices, b_high
        Indices of the b0 volumes, of all diffusion-weighted volumes, and the mean b-value of
        the highest shell (s/mm^2).

    Raises
    ------
    ValueError
        If there is no b0 volume or no diffusion-weighted volume; the message says what to do.
    """
    b = _as_bvals(bvals)
    b0 = np.flatnonzero(b <= b0_threshold_s_mm2)
    if b0.size == 0:
        raise ValueError(
            f"no b0 volume: the smallest b-value is {b.min():g} s/mm^2, above the b0 threshold "
            f"{b0_threshold_s_mm2} s/mm^2; raise inputs.b0_threshold_s_mm2 or provide the "
            "scanner ADC map instead of computing it"
        )
    _, b_high = highest_shell(b, b0_threshold_s_mm2, shell_tolerance=shell_tolerance)
    return b0, np.flatnonzero(b > b0_threshold_s_mm2), b_high


def _check_4d(dwi4d: np.ndarray, b: np.ndarray) -> np.ndarray:
    dwi4d = np.asarray(dwi4d)
    if dwi4d.ndim != 4:
        raise ValueError(f"expected a 4D DWI array (x, y, z, volume), got shape {dwi4d.shape}")
    if dwi4d.shape[-1] != b.size:
        raise ValueError(
            f"DWI has {dwi4d.shape[-1]} volumes but there are {b.size} b-values; the .bval "
            "file does not belong to this DWI"
        )
    return dwi4d


def mean_b0(
    dwi4d: np.ndarray, bvals: np.ndarray | list[float], b0_threshold_s_mm2: float
) -> np.ndarray:
    """Arithmetic mean of the b0 volumes (float32, 3D).

    Raises
    ------
    ValueError
        On a non-4D array, a volume/b-value count mismatch or when there is no b0 volume.
    """
    b = _as_bvals(bvals)
    dwi4d = _check_4d(dwi4d, b)
    idx = np.flatnonzero(b <= b0_threshold_s_mm2)
    if idx.size == 0:
        raise ValueError(
            f"no b0 volume (all b > {b0_threshold_s_mm2} s/mm^2); raise "
            "inputs.b0_threshold_s_mm2 or provide the scanner ADC map"
        )
    with np.errstate(over="ignore"):  # float32 overflow becomes inf, as documented
        return dwi4d[..., idx].astype(np.float64).mean(axis=-1).astype(np.float32)


def trace_dwi(
    dwi4d: np.ndarray,
    bvals: np.ndarray | list[float],
    b0_threshold_s_mm2: float,
    *,
    shell_tolerance: float,
) -> tuple[np.ndarray, float]:
    """Trace-weighted DWI: geometric mean of the highest-shell volumes.

    The geometric mean over diffusion directions cancels the directional dependence of the
    signal (for a set of directions that samples the sphere evenly): it equals
    ``S0 * exp(-b * MD)``.

    Parameters
    ----------
    dwi4d
        DWI array with the volumes on the last axis.
    bvals
        One b-value per volume (s/mm^2).
    b0_threshold_s_mm2
        Volumes at or below this b are b0 (s/mm^2).
    shell_tolerance
        Relative width of the highest shell (fraction), see :func:`highest_shell`.

    Returns
    -------
    trace, b_value
        float32 3D trace image (0 where any shell volume is <= 0 or not finite) and the mean
        b-value of the shell (s/mm^2).
    """
    b = _as_bvals(bvals)
    dwi4d = _check_4d(dwi4d, b)
    idx, b_high = highest_shell(b, b0_threshold_s_mm2, shell_tolerance=shell_tolerance)
    vols = dwi4d[..., idx].astype(np.float64)
    valid = np.all(np.isfinite(vols) & (vols > 0), axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.where(vols > 0, vols, 1.0))
    trace = np.exp(logs.mean(axis=-1))
    trace[~valid] = 0.0
    with np.errstate(over="ignore"):
        return trace.astype(np.float32), b_high


def adc_from_signals(
    s0: np.ndarray, sb: np.ndarray, b_s_mm2: float, *, adc_max_um2_s: float
) -> np.ndarray:
    """Monoexponential ADC, ``ADC = ln(S0 / Sb) / b``, in um^2/s (float32).

    Parameters
    ----------
    s0
        b0 signal (e.g. :func:`mean_b0`).
    sb
        Diffusion-weighted signal at ``b_s_mm2`` (e.g. :func:`trace_dwi`).
    b_s_mm2
        b-value of ``sb`` (s/mm^2), must be positive.
    adc_max_um2_s
        Upper clip of the result (um^2/s); free water at 37 C is about 3000 um^2/s.

    Returns
    -------
    numpy.ndarray
        ADC in um^2/s, NaN where S0 or Sb is <= 0 or not finite, otherwise clipped to
        ``[0, adc_max_um2_s]`` (Sb > S0 from noise gives 0).
    """
    if not (np.isfinite(b_s_mm2) and b_s_mm2 > 0):
        raise ValueError(f"b-value must be positive, got {b_s_mm2}")
    s0 = np.asarray(s0, np.float64)
    sb = np.asarray(sb, np.float64)
    if s0.shape != sb.shape:
        raise ValueError(f"S0 shape {s0.shape} differs from Sb shape {sb.shape}")
    valid = np.isfinite(s0) & np.isfinite(sb) & (s0 > 0) & (sb > 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        adc_mm2_s = np.log(np.where(valid, s0, 1.0) / np.where(valid, sb, 1.0)) / b_s_mm2
    adc = np.clip(adc_mm2_s * 1e6, 0.0, adc_max_um2_s)
    adc[~valid] = np.nan
    return adc.astype(np.float32)


def detect_adc_unit(
    adc_values_in_brain: np.ndarray,
    plausible_min_um2_s: float,
    plausible_max_um2_s: float,
) -> tuple[str, float, str]:
    """Detect the unit of a scanner ADC map from the median of its brain values.

    Brain tissue median ADC is about 700-1100 um^2/s (CSF about 3000). The median of the
    finite, positive values is interpreted in each candidate unit (mm^2/s, 1e-3 mm^2/s,
    um^2/s); exactly one interpretation must fall in ``[plausible_min_um2_s,
    plausible_max_um2_s]``.

    Parameters
    ----------
    adc_values_in_brain
        ADC values inside the brain (any shape; non-finite and non-positive values ignored).
    plausible_min_um2_s, plausible_max_um2_s
        Plausible range of the brain median ADC (um^2/s).

    Returns
    -------
    unit, factor, explanation
        Unit name (a key of :data:`ADC_UNIT_FACTORS`), factor to um^2/s, and a sentence for the
        report.

    Raises
    ------
    AdcUnitError
        If no value is usable, or zero or several units put the median in the plausible range;
        the message gives the measured median and names the override ``inputs.adc_unit``.
    """
    v = np.asarray(adc_values_in_brain, dtype=np.float64).ravel()
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        raise AdcUnitError(
            "cannot detect the ADC unit: no finite, positive ADC value inside the brain mask; "
            "check the ADC map and brain mask, or set inputs.adc_unit explicitly"
        )
    med = float(np.median(v))
    as_um2 = {u: med * f for u, f in ADC_UNIT_FACTORS.items()}
    hits = [u for u, x in as_um2.items() if plausible_min_um2_s <= x <= plausible_max_um2_s]
    readings = ", ".join(f"{u}: {x:.4g} um^2/s" for u, x in as_um2.items())
    if len(hits) != 1:
        what = "no unit" if not hits else f"several units ({', '.join(hits)})"
        raise AdcUnitError(
            f"cannot detect the ADC unit: the median brain ADC value is {med:.6g} "
            f"(n={v.size}); read as {readings}; {what} give a median within the plausible "
            f"range [{plausible_min_um2_s:g}, {plausible_max_um2_s:g}] um^2/s. Set the config "
            'override inputs.adc_unit to "mm2_s", "1e-3mm2_s" or "um2_s"'
        )
    unit = hits[0]
    explanation = (
        f"ADC unit detected as {unit}: median brain value {med:.6g} (n={v.size}) is "
        f"{as_um2[unit]:.4g} um^2/s in that unit, within the plausible range "
        f"[{plausible_min_um2_s:g}, {plausible_max_um2_s:g}] um^2/s (other readings: {readings})"
    )
    return unit, ADC_UNIT_FACTORS[unit], explanation


def convert_adc(adc: np.ndarray, unit: str) -> tuple[np.ndarray, int]:
    """Convert an ADC map to um^2/s (float32).

    Parameters
    ----------
    adc
        ADC map in ``unit``.
    unit
        One of ``"mm2_s"``, ``"1e-3mm2_s"``, ``"um2_s"`` (use :func:`detect_adc_unit` for
        ``"auto"``).

    Returns
    -------
    adc_um2_s, n_negative
        The converted map (NaN where the input is not finite; negative values clipped to 0) and
        the number of negative input values clipped, for the report.
    """
    if unit not in ADC_UNIT_FACTORS:
        raise ValueError(
            f"unknown ADC unit {unit!r}; expected one of {sorted(ADC_UNIT_FACTORS)} "
            "(resolve 'auto' with detect_adc_unit first)"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        a = np.asarray(adc, dtype=np.float64) * ADC_UNIT_FACTORS[unit]
    finite = np.isfinite(a)
    neg = finite & (a < 0)
    a[neg] = 0.0
    a[~finite] = np.nan
    with np.errstate(over="ignore"):  # beyond float32 range becomes inf
        return a.astype(np.float32), int(np.count_nonzero(neg))
