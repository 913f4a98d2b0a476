"""ADC dynamics: relative ADC, voxel classes and pseudonormalization.

Every ADC formula of the project lives here. ADC values are in the canonical unit um^2/s
(1e-6 mm^2/s); rADC is the ratio to the reference ADC of normal-appearing white matter (NAWM).
The phantom's truth tables and the pipeline's measured tables are both computed by these
functions, so that they compare directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESTRICTED, PSEUDONORMAL, ELEVATED = 1, 2, 3


@dataclass(frozen=True)
class ReferenceADC:
    """Robust summary of NAWM ADC (um^2/s)."""

    median_um2_s: float
    iqr_um2_s: float
    n_voxels: int


def reference_adc(adc_um2_s: np.ndarray, nawm_mask: np.ndarray) -> ReferenceADC:
    """Median and interquartile range of ADC over the NAWM mask.

    Raises
    ------
    ValueError
        If the mask holds no voxel with a finite, positive ADC.
    """
    values = adc_um2_s[np.asarray(nawm_mask, bool)]
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        raise ValueError("no normal-appearing white-matter voxel with a valid ADC")
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return ReferenceADC(float(q50), float(q75 - q25), int(values.size))


def relative_adc(adc_um2_s: np.ndarray, reference_um2_s: float) -> np.ndarray:
    """rADC = ADC / reference ADC of NAWM (float32)."""
    if not reference_um2_s > 0:
        raise ValueError(f"reference ADC must be positive, got {reference_um2_s}")
    return (np.asarray(adc_um2_s, np.float32) / np.float32(reference_um2_s)).astype(np.float32)


def classify_radc(radc: np.ndarray, restricted_below: float, elevated_above: float) -> np.ndarray:
    """Voxel classes: 1 restricted (rADC < restricted_below), 2 pseudonormal, 3 elevated
    (rADC > elevated_above); 0 where rADC is not finite."""
    out = np.full(radc.shape, PSEUDONORMAL, np.uint8)
    out[radc < restricted_below] = RESTRICTED
    out[radc > elevated_above] = ELEVATED
    out[~np.isfinite(radc)] = 0
    return out


def restricted_mask(radc: np.ndarray, restricted_below: float) -> np.ndarray:
    """Voxels whose rADC is below the restriction cut-off."""
    return np.isfinite(radc) & (radc < restricted_below)


def diffusion_classes(
    dwi_ratio: np.ndarray,
    radc: np.ndarray,
    restricted_below: float,
    dwi_hyperintense_ratio: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Restricted diffusion and T2 shine-through masks.

    ``dwi_ratio`` is the trace DWI divided by the NAWM median trace DWI. Restricted: DWI
    hyperintense AND rADC below the cut-off. Shine-through: DWI hyperintense with rADC at or
    above the cut-off (bright on DWI from T2 prolongation, not from restriction).
    """
    bright = np.isfinite(dwi_ratio) & (dwi_ratio > dwi_hyperintense_ratio)
    low = restricted_mask(radc, restricted_below)
    return bright & low, bright & np.isfinite(radc) & ~low


def pseudonormalized_fraction(
    ever_restricted: np.ndarray, radc_now: np.ndarray, restricted_below: float
) -> float:
    """Fraction of ever-restricted voxels whose rADC is no longer below the cut-off now.

    ``ever_restricted`` is the union of the restricted masks of this and all earlier sessions.
    Returns NaN when no voxel was ever restricted.
    """
    ever = np.asarray(ever_restricted, bool)
    n = int(ever.sum())
    if n == 0:
        return float("nan")
    values = radc_now[ever]
    return float(np.count_nonzero(np.isfinite(values) & (values >= restricted_below)) / n)


def masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    """Mean of finite values in mask; NaN for an empty mask."""
    v = values[np.asarray(mask, bool)]
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def masked_median(values: np.ndarray, mask: np.ndarray) -> float:
    """Median of finite values in mask; NaN for an empty mask."""
    v = values[np.asarray(mask, bool)]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else float("nan")


def pseudonormalization_day(
    days: np.ndarray, radc: np.ndarray, cutoff: float
) -> tuple[float, bool]:
    """Day on which a restricted lesion's mean rADC first climbs back to ``cutoff``.

    Linear interpolation between the last session below the cut-off (after the nadir) and the
    next session at or above it. Returns ``(day, censored)``: when the cut-off is not reached by
    the last session, the last session's day and ``censored=True``; NaN when the lesion was never
    below the cut-off.
    """
    days = np.asarray(days, float)
    radc = np.asarray(radc, float)
    ok = np.isfinite(radc)
    days, radc = days[ok], radc[ok]
    below = np.flatnonzero(radc < cutoff)
    if below.size == 0:
        return float("nan"), False
    for i in range(below[0], len(radc) - 1):
        if radc[i] < cutoff <= radc[i + 1]:
            t = (cutoff - radc[i]) / (radc[i + 1] - radc[i])
            return float(days[i] + t * (days[i + 1] - days[i])), False
    return float(days[-1]), True


def session_summary(
    *,
    flair_lesion: np.ndarray,
    restricted: np.ndarray,
    shine_through: np.ndarray,
    ever_restricted: np.ndarray,
    adc_um2_s: np.ndarray,
    radc: np.ndarray,
    reference: ReferenceADC,
    voxel_volume_ml: float,
    restricted_below: float,
) -> dict[str, float]:
    """One row of the per-session table (columns described in :mod:`pipeline.core.columns`).

    All masks are boolean arrays on the same grid as ``adc_um2_s``/``radc``;
    ``ever_restricted`` is the union of the restricted masks up to and including this session.
    """
    flair_lesion, restricted = np.asarray(flair_lesion, bool), np.asarray(restricted, bool)
    ever = np.asarray(ever_restricted, bool)
    return {
        "flair_volume_ml": float(flair_lesion.sum() * voxel_volume_ml),
        "restricted_volume_ml": float(restricted.sum() * voxel_volume_ml),
        "shine_through_volume_ml": float(np.count_nonzero(shine_through) * voxel_volume_ml),
        "ever_restricted_volume_ml": float(ever.sum() * voxel_volume_ml),
        "adc_nawm_um2_s": reference.median_um2_s,
        "adc_nawm_iqr_um2_s": reference.iqr_um2_s,
        "adc_mean_restricted_um2_s": masked_mean(adc_um2_s, restricted),
        "radc_mean_restricted": masked_mean(radc, restricted),
        "radc_mean_flair": masked_mean(radc, flair_lesion),
        "radc_mean_ever_restricted": masked_mean(radc, ever),
        "pseudonormalized_fraction": pseudonormalized_fraction(ever, radc, restricted_below),
    }
