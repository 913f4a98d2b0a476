"""Image statistics used to compare the synthetic phantom with real scans.

The same functions measure the phantom and the real data (see ``tests/test_simulate_realism.py``),
so that a realism check compares like with like: tissue ADC from a 4D DWI, the DWI noise level
(signal-to-noise ratio of the b=1000 images) and the FLAIR lesion-to-brain contrast.

All functions take numpy arrays (any voxel grid); ADC values are in um^2/s (1e-6 mm^2/s).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.core.segmentation import half_sample_mode

#: ADC window (um^2/s) that counts as brain parenchyma, excluding CSF and background.
TISSUE_ADC_WINDOW_UM2_S = (100.0, 1200.0)


def split_dwi(
    dwi: np.ndarray, bvals: np.ndarray, b0_threshold: float = 50.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean b0 and geometric-mean (trace) image of the highest shell of a 4D DWI.

    Parameters
    ----------
    dwi
        4D array, volumes along the last axis.
    bvals
        b-value of each volume (s/mm^2).
    b0_threshold
        Volumes with a b-value at or below this are b0 (s/mm^2).

    Returns
    -------
    b0_mean, trace, b_value
        Mean b0 image, trace-weighted image (geometric mean over directions) and its b-value.
    """
    dwi = np.asarray(dwi, np.float32)
    bvals = np.asarray(bvals, float)
    if dwi.ndim != 4 or dwi.shape[-1] != bvals.size:
        raise ValueError(f"DWI shape {dwi.shape} does not match {bvals.size} b-values")
    is_b0 = bvals <= b0_threshold
    if not is_b0.any() or is_b0.all():
        raise ValueError("DWI needs at least one b0 and one diffusion-weighted volume")
    b_high = float(bvals.max())
    shell = np.abs(bvals - b_high) < 0.05 * b_high
    b0 = dwi[..., is_b0].mean(axis=-1)
    trace = np.exp(np.log(np.maximum(dwi[..., shell], 1e-3)).mean(axis=-1))
    return b0.astype(np.float32), trace.astype(np.float32), b_high


def adc_um2_s(b0: np.ndarray, trace: np.ndarray, b_value: float) -> np.ndarray:
    """Mono-exponential ADC = ln(b0 / trace) / b in um^2/s (NaN where undefined)."""
    b0 = np.asarray(b0, np.float64)
    trace = np.asarray(trace, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(b0 / trace) / b_value * 1e6
    adc[~((b0 > 0) & (trace > 0))] = np.nan
    return adc.astype(np.float32)


def head_mask(b0: np.ndarray, fraction: float = 0.2) -> np.ndarray:
    """Largest connected region brighter than ``fraction`` of the 99th percentile, holes filled."""
    b0 = np.asarray(b0, np.float32)
    positive = b0[b0 > 0]
    if positive.size == 0:
        return np.zeros(b0.shape, bool)
    mask = b0 > fraction * np.percentile(positive, 99)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == (int(np.argmax(sizes)) + 1)
    return ndimage.binary_fill_holes(mask)


def tissue_mask(adc: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` whose ADC lies in :data:`TISSUE_ADC_WINDOW_UM2_S` (parenchyma)."""
    lo, hi = TISSUE_ADC_WINDOW_UM2_S
    return np.asarray(mask, bool) & np.isfinite(adc) & (adc > lo) & (adc < hi)


def tissue_adc_median(adc: np.ndarray, mask: np.ndarray) -> float:
    """Median ADC (um^2/s) of parenchyma (CSF and background excluded by the ADC window)."""
    values = adc[tissue_mask(adc, mask)]
    return float(np.median(values)) if values.size else float("nan")


def noise_sigma(image: np.ndarray, mask: np.ndarray) -> float:
    """Gaussian noise SD of a 3D image, estimated slice by slice (Immerkaer 1996).

    The image is convolved in-plane with the difference-of-Laplacians kernel that cancels
    linear structure; the mean absolute response over the (eroded) mask, times
    sqrt(pi/2)/6, estimates the noise SD. Works on a single image, so it applies equally to
    scans with and without repeated volumes.
    """
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    image = np.asarray(image, np.float32)
    inner = ndimage.binary_erosion(np.asarray(mask, bool), structure=np.ones((3, 3, 1)))
    response = ndimage.convolve(image, kernel[:, :, None], mode="nearest")
    values = np.abs(response[inner])
    if values.size == 0:
        return float("nan")
    return float(np.sqrt(np.pi / 2.0) / 6.0 * values.mean())


def dwi_snr(dwi: np.ndarray, bvals: np.ndarray, b0_threshold: float = 50.0) -> dict[str, float]:
    """ADC and noise summary of a 4D DWI.

    Returns a dict with ``tissue_adc_um2_s`` (median parenchymal ADC), ``wm_adc_um2_s`` (half-sample
    mode of parenchymal ADC: white matter is the bulk of the parenchyma, and partial volume with
    grey matter and CSF only adds a high tail, which the mode ignores), ``sigma_b1000`` (median
    noise SD of the single diffusion-weighted volumes), ``snr_b1000`` (median parenchymal signal
    of the single diffusion-weighted volumes over their noise SD) and ``b_value``.
    """
    bvals = np.asarray(bvals, float)
    b0, trace, b_value = split_dwi(dwi, bvals, b0_threshold)
    adc = adc_um2_s(b0, trace, b_value)
    tissue = tissue_mask(adc, head_mask(b0))
    shell = np.flatnonzero(np.abs(bvals - b_value) < 0.05 * b_value)
    sigmas, snrs = [], []
    for k in shell:
        vol = np.asarray(dwi[..., k], np.float32)
        sigma = noise_sigma(vol, tissue)
        sigmas.append(sigma)
        snrs.append(float(np.median(vol[tissue])) / sigma)
    values = adc[tissue]
    return {
        "tissue_adc_um2_s": tissue_adc_median(adc, tissue),
        "wm_adc_um2_s": half_sample_mode(values) if values.size else float("nan"),
        "sigma_b1000": float(np.median(sigmas)),
        "snr_b1000": float(np.median(snrs)),
        "b_value": b_value,
    }


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray) -> float:
    """Median intensity in the lesion mask over the median intensity in the brain mask."""
    lesion = np.asarray(lesion, bool)
    brain = np.asarray(brain, bool)
    if not lesion.any() or not brain.any():
        return float("nan")
    return float(np.median(image[lesion]) / np.median(image[brain]))
