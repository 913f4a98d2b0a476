"""Geometry helpers: numpy (nibabel order, RAS affine) <-> SimpleITK (LPS), rigid poses.

World coordinates follow ITK (LPS). A nibabel array ``a[i, j, k]`` with RAS affine ``A`` is the
SimpleITK image ``GetImageFromArray(a.transpose(2, 1, 0))`` with direction/origin
``diag(-1, -1, 1) @ A``.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

_LPS = np.diag([-1.0, -1.0, 1.0])


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS) of a 3D nibabel-order array with a RAS affine."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0)))
    set_geometry(img, affine)
    return img


def set_geometry(img: sitk.Image, affine: np.ndarray) -> None:
    """Give ``img`` the spacing, origin and direction of a RAS affine."""
    m = _LPS @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (m / spacing).ravel()))
    img.SetOrigin(tuple(float(v) for v in _LPS @ np.asarray(affine, float)[:3, 3]))


def from_sitk(img: sitk.Image) -> np.ndarray:
    """nibabel-order array of a 3D SimpleITK image."""
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def ras_affine(img: sitk.Image) -> np.ndarray:
    """RAS voxel-to-world affine of a SimpleITK image."""
    d = np.asarray(img.GetDirection(), float).reshape(3, 3) * np.asarray(img.GetSpacing())
    out = np.eye(4)
    out[:3, :3] = _LPS @ d
    out[:3, 3] = _LPS @ np.asarray(img.GetOrigin(), float)
    return out


def reference_grid(
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    center_lps: np.ndarray,
    direction: np.ndarray | None = None,
) -> sitk.Image:
    """An empty float32 image of the given size and spacing centred on ``center_lps``."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(direction.ravel()))
    half = direction @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    img.SetOrigin(tuple(float(v) for v in np.asarray(center_lps, float) - half))
    return img


def rotation_matrix(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """Rotation matrix about a unit axis (Rodrigues)."""
    axis = np.asarray(axis, float)
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def random_rigid(
    rng: np.random.Generator, max_deg: float, max_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """A rotation (uniform random axis, angle up to ``max_deg``) and a translation (random
    direction, length up to ``max_mm``)."""
    axis = rng.standard_normal(3)
    angle = np.deg2rad(rng.uniform(0.0, max_deg))
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    return rotation_matrix(axis, angle), direction * rng.uniform(0.0, max_mm)


def euler_transform(rotation: np.ndarray, translation: np.ndarray, center: np.ndarray):
    """ITK Euler3DTransform p -> R (p - c) + c + t (points in LPS mm)."""
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(v) for v in center))
    tx.SetMatrix(tuple(float(v) for v in np.asarray(rotation, float).ravel()), 1e-6)
    tx.SetTranslation(tuple(float(v) for v in translation))
    return tx
