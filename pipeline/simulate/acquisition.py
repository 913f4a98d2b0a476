"""Signal model and acquisition: noise-free truth-space images -> native scanner images.

Tissue values (3 T, adult):

* ADC (um^2/s): white matter 680, grey matter 800, CSF 3000 (WM about 700-800 and GM 800-900 in
  e.g. Helenius et al., AJNR 2002; CSF ~3000 at 37 C, free water). The white-matter ADC
  measured by :mod:`pipeline.core.imagestats` (half-sample mode of parenchyma) on the clinical
  grid is within 15 % of the real Philips DWI in ``shared/data`` (747 vs 663 um^2/s, +12.7 %; with
  WM 700 it is +15.1 %, as 4 mm slices mix in grey matter).
* FLAIR (arbitrary units, WM = 1): GM 1.3 (GM brighter than WM), CSF 0.08 (suppressed),
  scalp fat 1.4, skull 0.05; lesion signal 1 + 0.55 x lesion fraction (tuned to the lesion /
  brain median contrast of the real MS FLAIR, 1.32).
* b0 (T2-weighted EPI, WM = 1): GM 1.25, CSF 2.8 (bright), fat-suppressed scalp 0.3, skull
  0.05; lesion T2 rise 1 + 0.5 x lesion fraction. DWI = b0 * exp(-b * ADC), so T2
  shine-through arises by itself.

Acquisition: every contrast is sampled on its own axis-aligned scanner grid from the truth
space through the session's head pose; partial volume by anti-alias Gaussian smoothing (FWHM =
native voxel size) before linear resampling; a smooth multiplicative bias (+-20 %, shared by
the b0 and DWI of a session); Rician noise; optionally an EPI-like smooth shift of the DWI
along its phase-encode axis with the matching intensity pile-up (:func:`epi_shift`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from pipeline.simulate.anatomy import Anatomy
from pipeline.simulate.geometry import from_sitk, reference_grid, to_sitk
from pipeline.simulate.lesions import LesionState

ADC_UM2_S = {"wm": 680.0, "gm": 800.0, "csf": 3000.0, "scalp": 50.0, "skull": 300.0}
FLAIR = {"wm": 1.0, "gm": 1.3, "csf": 0.08, "scalp": 1.4, "skull": 0.05}
B0 = {"wm": 1.0, "gm": 1.25, "csf": 2.8, "scalp": 0.3, "skull": 0.05}
FLAIR_LESION_GAIN = 0.55
B0_LESION_GAIN = 0.5
B_VALUE = 1000.0
#: Scanner intensity of white matter (int16 images).
FLAIR_SCALE = 400.0
B0_SCALE = 1200.0
#: SNR of white matter on FLAIR and on a single b=1000 DWI volume.
FLAIR_SNR = 25.0
DWI_B1000_SNR = 17.5
BIAS_AMPLITUDE = 0.2

#: Native grids: size (voxels) and spacing (mm) per grid name.
GRIDS = {
    "clinical": {
        "flair": ((256, 256, 36), (0.9, 0.9, 4.5)),
        "dwi": ((128, 128, 35), (2.0, 2.0, 4.0)),
        "n_directions": 6,
    },
    "small": {
        "flair": ((88, 88, 32), (2.4, 2.4, 5.0)),
        "dwi": ((64, 64, 28), (3.4, 3.4, 5.5)),
        "n_directions": 3,
    },
}

#: Diffusion directions (unit vectors): 3 orthogonal, or the 6 of Jones-style sampling.
DIRECTIONS = {
    3: np.eye(3),
    6: np.array(
        [[1, 0, 1], [-1, 0, 1], [0, 1, 1], [0, 1, -1], [1, 1, 0], [-1, 1, 0]], float
    ) / np.sqrt(2.0),
}


@dataclass(frozen=True)
class TruthImages:
    """Noise-free truth-space images of one session (nibabel order, float32)."""

    flair: np.ndarray
    b0: np.ndarray
    dwi: np.ndarray
    adc_um2_s: np.ndarray


def _mix(anatomy: Anatomy, values: dict[str, float], wm_factor: np.ndarray) -> np.ndarray:
    out = anatomy.wm * wm_factor * np.float32(values["wm"])
    for tissue in ("gm", "csf", "scalp", "skull"):
        out = out + getattr(anatomy, tissue) * np.float32(values[tissue])
    return out.astype(np.float32)


def truth_images(anatomy: Anatomy, lesion: LesionState, wm_adc_texture: np.ndarray) -> TruthImages:
    """Noise-free FLAIR, b0, b=1000 trace DWI and ADC on the truth grid."""
    flair = _mix(anatomy, FLAIR, 1.0 + np.float32(FLAIR_LESION_GAIN) * lesion.t2)
    t2_wm = 1.0 + np.float32(B0_LESION_GAIN) * lesion.t2
    b0 = _mix(anatomy, B0, t2_wm)
    b = np.float32(B_VALUE * 1e-6)
    wm_adc = np.float32(ADC_UM2_S["wm"]) * wm_adc_texture * lesion.radc
    dwi = anatomy.wm * t2_wm * np.float32(B0["wm"]) * np.exp(-b * wm_adc)
    for tissue in ("gm", "csf", "scalp", "skull"):
        dwi = dwi + getattr(anatomy, tissue) * np.float32(
            B0[tissue] * np.exp(-B_VALUE * 1e-6 * ADC_UM2_S[tissue])
        )
    dwi = dwi.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(b0 / dwi) / b
    adc = np.where(anatomy.brain & (dwi > 0), adc, np.nan).astype(np.float32)
    return TruthImages(flair=flair, b0=b0, dwi=dwi, adc_um2_s=adc)


@dataclass(frozen=True)
class Pose:
    """A rigid point map from a native (scanner) grid to truth space and that grid, optionally
    preceded by an EPI-like shift along the grid's phase-encode (second) axis."""

    transform: sitk.Transform  # native LPS point -> truth LPS point (rigid)
    grid: sitk.Image  # empty reference image of the native grid
    shift_mm: np.ndarray | None = None  # EPI shift along the second axis (mm, nibabel order)

    def sampling_transform(self) -> sitk.Transform:
        """Native point -> truth point, including the EPI shift when there is one."""
        if self.shift_mm is None:
            return self.transform
        axis = np.asarray(self.grid.GetDirection(), float).reshape(3, 3)[:, 1]
        vectors = self.shift_mm.transpose(2, 1, 0)[..., None] * axis  # sitk (z, y, x) order
        field = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
        field.CopyInformation(self.grid)
        # CompositeTransform applies the last transform first: shift, then the rigid pose
        return sitk.CompositeTransform([self.transform, sitk.DisplacementFieldTransform(field)])

    def jacobian(self) -> np.ndarray | float:
        """Intensity factor of the EPI shift (signal piles up where the shift compresses)."""
        if self.shift_mm is None:
            return 1.0
        spacing = self.grid.GetSpacing()[1]
        return np.clip(1.0 + np.gradient(self.shift_mm, spacing, axis=1), 0.2, None).astype(
            np.float32)


def epi_shift(grid: sitk.Image, max_shift_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth susceptibility-like shift (mm) along the phase-encode (second) axis of an EPI
    grid, nibabel order: Gaussian-smoothed noise (sigma 25 mm) scaled to a largest absolute
    shift of ``max_shift_mm``."""
    from scipy import ndimage

    size = grid.GetSize()
    sigma = [25.0 / s for s in grid.GetSpacing()]
    field = ndimage.gaussian_filter(rng.standard_normal(size), sigma, mode="nearest")
    return (field * (max_shift_mm / max(float(np.abs(field).max()), 1e-12))).astype(np.float32)


def native_grid(kind: str, grid: str, center_lps: np.ndarray, rng: np.random.Generator):
    """The native grid of a contrast, centred near the head centre with a random FOV shift."""
    size, spacing = GRIDS[grid][kind]
    offset = rng.uniform(-5.0, 5.0, 3)
    return reference_grid(size, spacing, np.asarray(center_lps) + offset)


def resample_to_native(
    image: np.ndarray,
    affine: np.ndarray,
    pose: Pose,
    *,
    antialias: bool = True,
    interpolator: int = sitk.sitkLinear,
) -> np.ndarray:
    """Partial-volume sampling of a truth-space image onto a native grid.

    The truth image is smoothed by a Gaussian whose FWHM per axis equals the native voxel size
    (minus the truth voxel size, which already averages), then linearly resampled through the
    pose. Returns a nibabel-order float32 array.
    """
    img = to_sitk(image.astype(np.float32), affine)
    if antialias:
        native = np.asarray(pose.grid.GetSpacing())
        fine = np.asarray(img.GetSpacing())
        fwhm = np.sqrt(np.maximum(native**2 - fine**2, 0.0))
        sigma = fwhm / 2.3548
        if np.any(sigma > 0.05):
            img = sitk.SmoothingRecursiveGaussian(img, [float(max(s, 0.05)) for s in sigma])
    out = sitk.Resample(img, pose.grid, pose.sampling_transform(), interpolator, 0.0,
                        sitk.sitkFloat32)
    return from_sitk(out).astype(np.float32)


def bias_field(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field, 1 +- BIAS_AMPLITUDE, from a random quadratic polynomial."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    terms = [x, y, z, x * y, x * z, y * z, x * x, y * y, z * z]
    coef = rng.standard_normal(len(terms)).astype(np.float32)
    p = sum(c * t for c, t in zip(coef, terms))
    p -= p.mean()
    p *= np.float32(BIAS_AMPLITUDE) / max(float(np.abs(p).max()), 1e-6)
    return (1.0 + p).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of SD ``sigma`` per channel."""
    re = signal + rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    im = rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    return np.sqrt(re * re + im * im).astype(np.float32)


def to_int16(image: np.ndarray) -> np.ndarray:
    """Round and clip to the int16 range (scanner-like storage)."""
    return np.clip(np.rint(image), 0, 32767).astype(np.int16)


def acquire_flair(
    truth: TruthImages, affine: np.ndarray, pose: Pose, rng: np.random.Generator
) -> np.ndarray:
    """Native FLAIR (int16): partial volume, bias, Rician noise (WM SNR = FLAIR_SNR)."""
    signal = resample_to_native(truth.flair, affine, pose) * np.float32(FLAIR_SCALE)
    signal *= bias_field(signal.shape, rng)
    return to_int16(rician(signal, FLAIR_SCALE / FLAIR_SNR, rng))


def acquire_dwi(
    truth: TruthImages, affine: np.ndarray, pose: Pose, n_directions: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Native 4D DWI (int16: b0 then ``n_directions`` at b=1000), bvals and bvecs (3 x N).

    Noise SD is set so that a b=1000 volume of white matter has SNR = DWI_B1000_SNR.
    """
    b0 = resample_to_native(truth.b0, affine, pose) * np.float32(B0_SCALE)
    dw = resample_to_native(truth.dwi, affine, pose) * np.float32(B0_SCALE)
    bias = bias_field(b0.shape, rng) * pose.jacobian()
    wm_b1000 = B0_SCALE * B0["wm"] * np.exp(-B_VALUE * 1e-6 * ADC_UM2_S["wm"])
    sigma = wm_b1000 / DWI_B1000_SNR
    vols = [rician(b0 * bias, sigma, rng)]
    vols += [rician(dw * bias, sigma, rng) for _ in range(n_directions)]
    bvals = np.array([0.0] + [B_VALUE] * n_directions)
    bvecs = np.concatenate([np.zeros((3, 1)), DIRECTIONS[n_directions].T], axis=1)
    return to_int16(np.stack(vols, axis=-1)), bvals, bvecs


ADC_UNITS = ("mm2_s", "um2_s", "1e-3mm2_s")


def scanner_adc(dwi: np.ndarray, bvals: np.ndarray, unit: str) -> np.ndarray:
    """Scanner-style ADC map from the noisy native DWI, in the subject's scanner unit.

    ADC = ln(b0 / trace) / b, clipped to [0, 4000] um^2/s, zero outside the head (b0 below 10 %
    of its 99th percentile). ``unit``: "mm2_s" (float32), "1e-3mm2_s" (float32) or "um2_s"
    (int16), as scanners store them.
    """
    dwi = dwi.astype(np.float32)
    b0 = dwi[..., bvals <= 50].mean(axis=-1)
    trace = np.exp(np.log(np.maximum(dwi[..., bvals > 50], 1.0)).mean(axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(np.maximum(b0, 1.0) / trace) / B_VALUE * 1e6
    adc = np.clip(np.nan_to_num(adc, nan=0.0), 0.0, 4000.0)
    adc[b0 < 0.1 * np.percentile(b0, 99)] = 0.0
    if unit == "um2_s":
        return np.rint(adc).astype(np.int16)
    if unit == "1e-3mm2_s":
        return np.round(adc * 1e-3, 4).astype(np.float32)
    if unit == "mm2_s":
        return np.round(adc * 1e-6, 7).astype(np.float32)
    raise ValueError(f"unknown ADC unit {unit!r}; choose one of {ADC_UNITS}")


def native_mask(
    mask: np.ndarray, affine: np.ndarray, pose: Pose, threshold: float = 0.5
) -> np.ndarray:
    """A truth-space mask on a native grid: partial-volume fraction >= ``threshold``."""
    return resample_to_native(mask.astype(np.float32), affine, pose) >= threshold


def native_labels(labels: np.ndarray, mask_native: np.ndarray, affine: np.ndarray, pose: Pose):
    """Label image on a native grid: nearest-neighbour ids inside ``mask_native`` (voxels of the
    mask that fall on background take the nearest id)."""
    from scipy import ndimage

    img = to_sitk(labels.astype(np.int32), affine)
    out = from_sitk(
        sitk.Resample(img, pose.grid, pose.sampling_transform(), sitk.sitkNearestNeighbor, 0,
                      sitk.sitkInt32)
    )
    if mask_native.any() and out.any():
        _, idx = ndimage.distance_transform_edt(out == 0, return_indices=True)
        out = out[tuple(idx)]
    return np.where(mask_native, out, 0).astype(np.int16)
