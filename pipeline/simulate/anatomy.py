"""Phantom anatomy: tissue fractions from the MNI152 2009a maps shipped with nilearn.

The nilearn wheel ships the MNI152 2009a T1, grey-matter and white-matter probability maps and
a brain mask at 1 mm (``resolution=1``; no download). From them we derive CSF (brain mask minus
GM and WM, plus a thin subarachnoid band), the ventricles (deep CSF), a skull shell (dark on
every contrast) and a scalp shell (fat: bright on FLAIR, dim on fat-suppressed EPI). Every
subject gets its own anatomy by a smooth random deformation and a +-5 % scaling per axis.

Arrays are in nibabel voxel order (i, j, k) with a RAS affine (the MNI template's axes); the
phantom's *truth space* is that grid, 1 mm (grid ``clinical``) or 2 mm (grid ``small``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pipeline.simulate.geometry import from_sitk, to_sitk

#: Truth-grid spacing per grid name (mm, isotropic).
TRUTH_SPACING_MM = {"clinical": 1.0, "small": 2.0}

#: Shells outside the brain mask (mm from the mask surface): subarachnoid CSF, skull, scalp.
CSF_BAND_MM = 1.5
SKULL_BAND_MM = (1.5, 6.5)
SCALP_BAND_MM = (6.5, 11.5)
#: CSF farther than this from the brain surface is labelled ventricle (mm).
VENTRICLE_DEPTH_MM = 12.0
#: Per-subject variation: amplitude of the smooth deformation (mm) and of the scaling (fraction).
DEFORMATION_MM = 2.5
SCALING = 0.05

CHANNELS = ("gm", "wm", "csf", "skull", "scalp")


@dataclass(frozen=True)
class Anatomy:
    """Tissue volume fractions of one subject in its truth space.

    Attributes
    ----------
    gm, wm, csf, skull, scalp : ndarray (float32)
        Volume fractions in [0, 1] per truth voxel.
    ventricles : ndarray (bool)
        Ventricular CSF.
    affine : ndarray
        4x4 RAS voxel-to-world affine of the truth grid (mm).
    """

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    skull: np.ndarray
    scalp: np.ndarray
    ventricles: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape

    @property
    def spacing(self) -> float:
        return float(abs(self.affine[0, 0]))

    @property
    def brain(self) -> np.ndarray:
        """Brain (parenchyma and CSF inside the skull): tissue fractions summing to >= 0.5."""
        return (self.gm + self.wm + self.csf) >= 0.5

    def world_coordinates(self) -> np.ndarray:
        """RAS world coordinates (mm) of every voxel, shape (3, *shape), float32."""
        idx = np.indices(self.shape, dtype=np.float32)
        a = self.affine.astype(np.float32)
        return np.einsum("ij,j...->i...", a[:3, :3], idx) + a[:3, 3, None, None, None]


@lru_cache(maxsize=1)
def _mni_1mm() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Tissue channels and ventricles at 1 mm on the nilearn MNI152 2009a grid (cached)."""
    from nilearn import datasets

    gm_img = datasets.load_mni152_gm_template(resolution=1)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, np.float32)
    gm = np.asarray(gm_img.dataobj, np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    # the T1 map confirms the mask is the intracranial volume (used for the CSF derivation)
    t1 = np.asarray(datasets.load_mni152_template(resolution=1).dataobj, np.float32)
    mask &= ndimage.binary_fill_holes(mask | (t1 > 0.05))
    gm, wm = gm * mask, wm * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    outside = ndimage.distance_transform_edt(~mask).astype(np.float32)
    inside = ndimage.distance_transform_edt(mask).astype(np.float32)
    csf = np.where(mask, 1.0 - gm - wm, 0.0).astype(np.float32)
    csf += ((outside > 0) & (outside <= CSF_BAND_MM)).astype(np.float32)
    skull = ((outside > SKULL_BAND_MM[0]) & (outside <= SKULL_BAND_MM[1])).astype(np.float32)
    scalp = ((outside > SCALP_BAND_MM[0]) & (outside <= SCALP_BAND_MM[1])).astype(np.float32)
    # soften the shell edges a little (they are 1 mm steps otherwise)
    skull = ndimage.gaussian_filter(skull, 0.6)
    scalp = ndimage.gaussian_filter(scalp, 0.6)
    ventricles = (csf > 0.5) & (inside > VENTRICLE_DEPTH_MM)
    ventricles = ndimage.binary_opening(ventricles, iterations=1)
    channels = {"gm": gm, "wm": wm, "csf": np.clip(csf, 0, 1), "skull": skull, "scalp": scalp}
    channels["ventricles"] = ventricles.astype(np.float32)
    return channels, np.asarray(gm_img.affine, float)


def _block_mean(a: np.ndarray, factor: int) -> np.ndarray:
    pad = [(0, (-n) % factor) for n in a.shape]
    a = np.pad(a, pad)
    s = a.shape
    return a.reshape(
        s[0] // factor, factor, s[1] // factor, factor, s[2] // factor, factor
    ).mean(axis=(1, 3, 5), dtype=np.float32)


@lru_cache(maxsize=2)
def template(grid: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Template channels on the truth grid of ``grid`` (block-averaged from 1 mm) and affine."""
    if grid not in TRUTH_SPACING_MM:
        raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(TRUTH_SPACING_MM)}")
    channels, affine = _mni_1mm()
    factor = int(round(TRUTH_SPACING_MM[grid]))
    if factor == 1:
        return channels, affine
    out = {name: _block_mean(a, factor) for name, a in channels.items()}
    aff = affine.copy()
    aff[:3, :3] *= factor
    aff[:3, 3] += 0.5 * (factor - 1) * np.diag(affine)[:3]
    return out, aff


def _random_displacement(ref: sitk.Image, rng: np.random.Generator) -> sitk.Transform:
    """Smooth random displacement (about DEFORMATION_MM SD per axis) on a coarse 8 mm grid."""
    size = np.asarray(ref.GetSize())
    spacing = np.asarray(ref.GetSpacing())
    coarse_spacing = 8.0
    n = np.ceil(size * spacing / coarse_spacing).astype(int) + 3
    field = rng.standard_normal((*n[::-1], 3))
    field = ndimage.gaussian_filter(field, sigma=(2.5, 2.5, 2.5, 0))
    field *= DEFORMATION_MM / field.reshape(-1, 3).std(axis=0)
    img = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    img.SetSpacing((coarse_spacing,) * 3)
    img.SetDirection(ref.GetDirection())
    img.SetOrigin(ref.TransformContinuousIndexToPhysicalPoint((-1.0, -1.0, -1.0)))
    out = sitk.DisplacementFieldTransform(img)
    out.SetInterpolator(sitk.sitkLinear)
    return out


def subject_anatomy(grid: str, rng: np.random.Generator, *, vary: bool = True) -> Anatomy:
    """A subject's anatomy: the template deformed smoothly and scaled by up to +-5 % per axis.

    Parameters
    ----------
    grid : {"clinical", "small"}
        Truth grid (1 mm or 2 mm isotropic).
    rng : numpy Generator
        Source of the subject's deformation.
    vary : bool
        False returns the template itself (no deformation).
    """
    channels, affine = template(grid)
    if not vary:
        return Anatomy(
            **{k: channels[k] for k in CHANNELS},
            ventricles=channels["ventricles"] > 0.5,
            affine=affine,
        )
    scale = 1.0 + rng.uniform(-SCALING, SCALING, 3)
    ref = to_sitk(channels["wm"], affine)
    center = np.asarray(
        ref.TransformContinuousIndexToPhysicalPoint(
            [float(c) for c in np.asarray(channels["wm"].nonzero(), float).mean(axis=1)]
        )
    )
    # output point p samples the template at c + (p - c) / scale + smooth displacement
    scaling = sitk.AffineTransform(3)
    scaling.SetCenter(tuple(float(v) for v in center))
    scaling.SetMatrix(tuple(float(v) for v in np.diag(1.0 / scale).ravel()))
    transform = sitk.CompositeTransform([scaling, _random_displacement(ref, rng)])
    warped = {}
    for name in (*CHANNELS, "ventricles"):
        img = to_sitk(channels[name], affine)
        out = sitk.Resample(img, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        warped[name] = from_sitk(out)
    return Anatomy(
        **{k: warped[k] for k in CHANNELS},
        ventricles=warped["ventricles"] > 0.5,
        affine=affine,
    )
