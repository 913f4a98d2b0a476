"""Rigid/affine registration, the unbiased within-subject space and resampling.

Pure functions on SimpleITK images; every tunable number is a keyword argument (the interface
layer passes the ``[registration]`` section of the configuration).

Conventions
-----------
World coordinates are ITK's (LPS, mm). A transform named "from-A_to-B mode-image" (fMRIPrep /
ITK / ANTs convention) is the ITK transform that resamples an image of space A onto a grid of
space B: as a point mapping it maps points of B to points of A. Consequently:

* ``register_rigid(fixed, moving).transform`` maps *fixed* points to *moving* points; it is
  the "from-moving_to-fixed" transform and ``sitk.Resample(moving, fixed, transform)`` aligns
  the moving image to the fixed one.
* ``build_subject_space`` returns, per session, the transform mapping *subject-space* points to
  *session* points ("from-session_to-subject").
* Lists of transforms are in ITK composite order (like ``sitk.CompositeTransform`` and
  ``antsApplyTransforms -t``): ``[t0, t1, t2]`` maps a point ``x`` to ``t0(t1(t2(x)))`` — the
  *last* transform is applied first. To resample a DWI image into subject space in one step,
  pass ``[from-dwi_to-flair, from-flair_to-subject]``: a subject point goes first to the
  session's FLAIR space, then to the DWI space where the image is sampled.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

Metric = Literal["mattes", "correlation"]
TransformType = Literal["rigid", "affine"]
Interpolator = Literal["linear", "nearest", "bspline", "label"]
Initialisation = Literal["moments", "geometry", "identity"]
Optimizer = Literal["regular_step", "conjugate_gradient"]
SamplingStrategy = Literal["regular", "random"]


def _voxels(image: sitk.Image) -> np.ndarray:
    """The voxels of ``image`` as a new array (z, y, x), read without touching ``image``.

    ``sitk.GetArrayViewFromImage`` and ``GetArrayFromImage`` call ``image.MakeUnique()``, which
    replaces the object's buffer when another holder shares it (a registration method's mask,
    a cached pyramid level). That is not thread-safe: build_subject_space's parallel
    registrations share the fixed image, the template, their masks and pyramids, and two
    threads calling it on one object crashed the interpreter (SIGSEGV, or "Image_MakeUnique ...
    cannot cast DataObject to ImageBase"). A private shallow copy takes the call instead.
    """
    return sitk.GetArrayFromImage(sitk.Image(image))


class RegistrationQCError(ValueError):
    """A registration result fails a plausibility check (e.g. an absurd rotation)."""


@dataclass(frozen=True)
class RegistrationResult:
    """Outcome of one registration.

    Attributes
    ----------
    transform
        ITK transform mapping *fixed* points to *moving* points (Euler3DTransform for rigid,
        AffineTransform for affine).
    final_metric
        Optimizer metric at the end of the finest level (lower is better; negative MI or
        negative correlation).
    similarity_after
        Normalized cross-correlation (0..1 for positively related images) of the fixed image
        and the aligned moving image, within the fixed mask, on the finest pyramid level
        (working grid; evaluating it on sub-millimetre native grids cost ~25 % of the run).
    rotation_deg, translation_mm
        Size of the transform: rotation angle and displacement of the fixed brain centroid.
    n_iterations
        Optimizer iterations summed over levels (including the multi-start probes).
    stop_condition
        Optimizer stop condition of the finest level.
    start_index
        Which multi-start rotation won (0 = the initial transform itself).
    elapsed_s
        Wall-clock time of the registration (s).
    """

    transform: sitk.Transform
    final_metric: float
    similarity_after: float
    rotation_deg: float
    translation_mm: float
    n_iterations: int
    stop_condition: str = ""
    start_index: int = 0
    elapsed_s: float = 0.0


# --------------------------------------------------------------------------------------------
# transform algebra


def affine_parameters(transform: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """Matrix ``A`` (3x3) and offset ``b`` with ``transform(x) == A @ x + b``.

    Exact for any linear transform (including composites of linear transforms).

    Raises
    ------
    ValueError
        If the transform is not linear.
    """
    if not transform.IsLinear():
        raise ValueError(f"{transform.GetName()} is not linear")
    pts = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], float)
    out = np.array([transform.TransformPoint(tuple(p)) for p in pts])
    b = out[0]
    a = (out[1:] - b).T / 100.0
    return a, b


def affine_transform(matrix: np.ndarray, offset: np.ndarray, center=None) -> sitk.Transform:
    """Euler3DTransform when ``matrix`` is a rotation, else AffineTransform, for ``A x + b``.

    ``center`` (mm) sets the transform's centre of rotation (the mapping is unchanged).
    """
    a = np.asarray(matrix, float)
    b = np.asarray(offset, float)
    c = np.zeros(3) if center is None else np.asarray(center, float)
    translation = a @ c + b - c
    if np.allclose(a.T @ a, np.eye(3), atol=1e-6) and np.linalg.det(a) > 0:
        u, _, vt = np.linalg.svd(a)
        t = sitk.Euler3DTransform()
        t.SetCenter(tuple(c))
        t.SetMatrix(tuple((u @ vt).ravel()), 1e-5)
    else:
        t = sitk.AffineTransform(3)
        t.SetCenter(tuple(c))
        t.SetMatrix(tuple(a.ravel()))
    t.SetTranslation(tuple(translation))
    return t


def compose_transforms(*transforms: sitk.Transform, flatten: bool = True) -> sitk.Transform:
    """Composite in ITK order: ``compose_transforms(a, b)(x) == a(b(x))`` (``b`` first).

    With ``flatten`` and only linear transforms, returns one Euler3D/Affine transform with
    the same mapping; otherwise a :class:`sitk.CompositeTransform`.
    """
    if not transforms:
        raise ValueError("compose_transforms needs at least one transform")
    if flatten and all(t.IsLinear() for t in transforms):
        a, b = np.eye(3), np.zeros(3)
        for t in reversed(transforms):  # applied last-to-first
            ta, tb = affine_parameters(t)
            a, b = ta @ a, ta @ b + tb
        return affine_transform(a, b, _center_of(transforms[-1]))
    comp = sitk.CompositeTransform(3)
    for t in transforms:
        comp.AddTransform(t)
    return comp


def invert_transform(transform: sitk.Transform) -> sitk.Transform:
    """Inverse of a linear transform (same class where possible)."""
    a, b = affine_parameters(transform)
    ai = np.linalg.inv(a)
    return affine_transform(ai, -ai @ b, transform.TransformPoint(_center_of(transform)))


def _center_of(transform: sitk.Transform) -> tuple[float, float, float]:
    try:
        fixed = transform.GetFixedParameters()
    except Exception:  # pragma: no cover - every sitk transform has them
        fixed = ()
    if transform.GetName() in ("Euler3DTransform", "AffineTransform", "VersorRigid3DTransform",
                               "Similarity3DTransform", "ScaleVersor3DTransform"):
        return tuple(float(v) for v in fixed[:3])
    return (0.0, 0.0, 0.0)


def _rotation_part(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return r


def _mask_points(mask: sitk.Image, max_points: int = 5000) -> np.ndarray:
    """Physical points (n x 3, mm) of nonzero mask voxels, deterministically subsampled."""
    arr = _voxels(mask)
    idx = np.argwhere(arr > 0)[:, ::-1].astype(float)  # (i, j, k) = x, y, z index order
    if idx.size == 0:
        raise ValueError("mask is empty")
    if len(idx) > max_points:
        step = len(idx) / max_points
        idx = idx[(np.arange(max_points) * step).astype(int)]
    return _index_to_physical(mask, idx)


def _index_to_physical(image: sitk.Image, idx: np.ndarray) -> np.ndarray:
    d = np.array(image.GetDirection()).reshape(3, 3)
    s = np.array(image.GetSpacing())
    o = np.array(image.GetOrigin())
    return (idx * s) @ d.T + o


def _points(where: sitk.Image | np.ndarray | Sequence, max_points: int = 5000) -> np.ndarray:
    if isinstance(where, sitk.Image):
        return _mask_points(where, max_points)
    pts = np.asarray(where, float).reshape(-1, 3)
    if len(pts) == 0:
        raise ValueError("no points given")
    return pts


def _apply(transform: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    if transform.IsLinear():
        a, b = affine_parameters(transform)
        return pts @ a.T + b
    return np.array([transform.TransformPoint(tuple(p)) for p in pts])


def transform_size(
    transform: sitk.Transform,
    center: sitk.Image | Sequence[float] | None = None,
) -> tuple[float, float]:
    """Rotation angle (degrees) and translation (mm) of a linear transform.

    The rotation is the angle of the rotation part of the matrix (polar decomposition, so it
    is defined for affine transforms too). The translation is ``|T(c) - c|`` at the centre
    ``c``: a point (mm), the centroid of a mask image, or — when ``None`` — the transform's
    own centre (Euler/affine) or the origin.
    """
    a, b = affine_parameters(transform)
    if center is None:
        c = np.array(_center_of(transform))
    elif isinstance(center, sitk.Image):
        c = _mask_points(center, 20000).mean(axis=0)
    else:
        c = np.asarray(center, float)
    r = _rotation_part(a)
    angle = math.degrees(math.acos(float(np.clip((np.trace(r) - 1) / 2, -1.0, 1.0))))
    shift = float(np.linalg.norm(a @ c + b - c))
    return angle, shift


def qc_check(
    result: RegistrationResult | sitk.Transform,
    *,
    max_rotation_deg: float,
    max_translation_mm: float,
    what: str = "registration",
    center: sitk.Image | Sequence[float] | None = None,
) -> None:
    """Raise :class:`RegistrationQCError` if a transform is implausibly large.

    Parameters
    ----------
    result
        A :class:`RegistrationResult` (its stored sizes are used) or a transform (sized with
        :func:`transform_size` at ``center``).
    max_rotation_deg, max_translation_mm
        Largest plausible rotation (degrees) and translation (mm).
    what
        Name used in the message, e.g. ``"sub-01 ses-2 -> subject space"``.
    """
    if isinstance(result, RegistrationResult):
        rot, shift = result.rotation_deg, result.translation_mm
    else:
        rot, shift = transform_size(result, center)
    problems = []
    if not (np.isfinite(rot) and np.isfinite(shift)):
        problems.append("the transform is not finite")
    if rot > max_rotation_deg:
        problems.append(f"rotation {rot:.1f} deg exceeds the maximum {max_rotation_deg:g} deg")
    if shift > max_translation_mm:
        problems.append(
            f"translation {shift:.1f} mm exceeds the maximum {max_translation_mm:g} mm"
        )
    if problems:
        raise RegistrationQCError(
            f"{what} failed QC: {'; '.join(problems)}. Check the inputs (wrong subject or "
            "session, failed brain mask, heavy artefact) or raise registration.max_rotation_deg"
            " / registration.max_translation_mm if such motion is real."
        )


def tre(
    transform_a: sitk.Transform,
    transform_b: sitk.Transform,
    where: sitk.Image | np.ndarray | Sequence,
    *,
    max_points: int = 5000,
) -> tuple[float, float]:
    """Mean and max distance (mm) between ``transform_a(x)`` and ``transform_b(x)``.

    ``where`` is a mask image (its nonzero voxels, subsampled to ``max_points``) or an
    ``(n, 3)`` array of physical points, in the space the transforms map *from*.
    """
    pts = _points(where, max_points)
    d = np.linalg.norm(_apply(transform_a, pts) - _apply(transform_b, pts), axis=1)
    return float(d.mean()), float(d.max())


def inverse_consistency(
    t_ab: sitk.Transform,
    t_ba: sitk.Transform,
    where: sitk.Image | np.ndarray | Sequence,
    *,
    max_points: int = 5000,
) -> tuple[float, float]:
    """Mean and max of ``|t_ba(t_ab(x)) - x|`` (mm) over points ``x`` of space A.

    ``t_ab`` maps A points to B points (e.g. ``register_rigid(fixed=A, moving=B)``), ``t_ba``
    maps B points to A points (``register_rigid(fixed=B, moving=A)``); ``where`` is a mask or
    points of A.
    """
    pts = _points(where, max_points)
    d = np.linalg.norm(_apply(t_ba, _apply(t_ab, pts)) - pts, axis=1)
    return float(d.mean()), float(d.max())


def write_transform(transform: sitk.Transform, path: str | Path) -> Path:
    """Write an ITK transform file (``.txt``/``.tfm``/``.h5``/``.mat``)."""
    path = Path(path)
    sitk.WriteTransform(transform, str(path))
    return path


def read_transform(path: str | Path) -> sitk.Transform:
    """Read an ITK transform file; a composite holding one transform is unwrapped."""
    t = sitk.ReadTransform(str(path))
    if t.GetName() == "CompositeTransform":
        comp = sitk.CompositeTransform(t)
        if comp.GetNumberOfTransforms() == 1:
            return comp.GetNthTransform(0).Downcast()
    return t.Downcast()


# --------------------------------------------------------------------------------------------
# resampling

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
    "label": sitk.sitkLabelGaussian,
}


def resample_to_reference(
    image: sitk.Image,
    reference: sitk.Image,
    transforms: Sequence[sitk.Transform] | sitk.Transform | None = None,
    *,
    interpolator: Interpolator = "linear",
    default_value: float = 0.0,
    pixel_type: int | None = None,
) -> sitk.Image:
    """Resample ``image`` once onto the grid of ``reference`` through composed transforms.

    Parameters
    ----------
    image
        Image in its native grid (e.g. a DWI-space ADC map).
    reference
        Target grid (e.g. the subject space); only its geometry is used.
    transforms
        Transforms in ITK composite order: ``[t0, ..., tn]`` maps a reference point ``x`` to
        ``t0(...tn(x))`` in the space of ``image`` (last applied first). For a DWI-space image
        into subject space: ``[from-dwi_to-flair, from-flair_to-subject]``. ``None``/empty
        means identity.
    interpolator
        ``"linear"``, ``"nearest"`` (masks), ``"bspline"`` (3rd order) or ``"label"``
        (label-Gaussian, for label maps with several labels).
    default_value
        Value outside the image's field of view.
    pixel_type
        Output pixel type; default float32 for intensity interpolators, the input type for
        ``"nearest"``/``"label"``.
    """
    if transforms is None:
        transforms = []
    elif isinstance(transforms, sitk.Transform):
        transforms = [transforms]
    tx = compose_transforms(*transforms) if transforms else sitk.Transform(3, sitk.sitkIdentity)
    if pixel_type is None:
        pixel_type = image.GetPixelID() if interpolator in ("nearest", "label") else (
            sitk.sitkFloat32
        )
    src = image if interpolator in ("nearest", "label") else sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(
        src, reference, tx, _INTERPOLATORS[interpolator], float(default_value), pixel_type
    )


def slice_axis(image: sitk.Image, min_slice_mm: float) -> int | None:
    """The through-plane (slice) axis of a 2D multi-slice grid, in SimpleITK index order (0, 1,
    2 = i, j, k), or None.

    It is the axis of the largest voxel spacing when that spacing is unique (strictly larger
    than both others) and at least ``min_slice_mm``. Grids whose largest spacing is shared
    (isotropic, or two thick axes) or thinner than ``min_slice_mm`` (3D acquisitions, images
    resampled to ~1 mm) have no slice axis: their slab or grid edge is not told apart from the
    in-plane edges, and the field-of-view rules leave them alone. Oblique slices need nothing
    more: the axis is the grid's own (its direction cosines are followed by
    :func:`fov_edge_distance`).
    """
    spacing = np.asarray(image.GetSpacing(), float)
    if spacing.size != 3:
        raise ValueError(f"slice_axis needs a 3D image, got {spacing.size}D")
    k = int(np.argmax(spacing))
    others = np.delete(spacing, k)
    if spacing[k] < min_slice_mm or not np.all(spacing[k] > others):
        return None
    return k


def fov_edge_distance(
    native: sitk.Image,
    reference: sitk.Image,
    transforms: Sequence[sitk.Transform] | sitk.Transform | None = None,
    *,
    min_slice_mm: float,
    ends: Literal["inferior", "both"],
) -> sitk.Image:
    """Through-plane distance (mm) from each voxel of ``reference`` to the edge of the slab of
    ``native`` (its field of view along its slice axis), on the grid of ``reference``.

    The slab spans continuous slice indices -0.5 .. n - 0.5 (the outer faces of the end
    slices); a voxel whose point maps to continuous slice index ``c`` is ``c + 0.5`` slices
    from the low-index face and ``n - 0.5 - c`` from the other (an end slice's centre: half a
    slice), times the slice spacing; 0 beyond the slab. The in-plane extent is not looked at.
    ``ends``: ``"both"``, the nearer face; ``"inferior"``, the face at the feet's end, for an
    axial slab only (its slice axis points mostly along the world S-I axis, LPS z); any other
    slab has no inferior end and gets ``+inf``. The point mapping is the one
    :func:`resample_to_reference` uses (``transforms`` in ITK composite order, a reference point
    to a point of ``native``); exact for linear transforms, otherwise through their displacement
    field.

    Returns float32; ``+inf`` everywhere when ``native`` has no slice axis
    (:func:`slice_axis` with ``min_slice_mm``) or, with ``"inferior"``, is not axial: the edge is
    not known, so nothing is near it.
    """
    if ends not in ("inferior", "both"):
        raise ValueError(f"ends must be 'inferior' or 'both', got {ends!r}")
    axis = slice_axis(native, min_slice_mm)
    size = reference.GetSize()
    nd = np.array(native.GetDirection(), float).reshape(3, 3)
    # world direction of increasing slice index (LPS; index 2 = superior)
    up = nd[:, axis] if axis is not None else None
    if axis is None or ends == "inferior" and int(np.argmax(np.abs(up))) != 2:
        out = sitk.GetImageFromArray(np.full(size[::-1], np.inf, np.float32))
        out.CopyInformation(reference)
        return out
    if transforms is None:
        transforms = []
    elif isinstance(transforms, sitk.Transform):
        transforms = [transforms]
    tx = compose_transforms(*transforms) if transforms else sitk.Transform(3, sitk.sitkIdentity)
    # continuous index of `native` along `axis` as a function of a native point q:
    # c = w . (q - origin), w = row `axis` of inv(direction @ diag(spacing))
    w = np.linalg.inv(nd @ np.diag(native.GetSpacing()))[axis]
    w0 = -float(w @ np.array(native.GetOrigin(), float))
    # reference index (i, j, k) -> reference point p = rd @ (idx * spacing) + origin
    rd = np.array(reference.GetDirection(), float).reshape(3, 3) @ np.diag(reference.GetSpacing())
    ro = np.array(reference.GetOrigin(), float)
    if tx.IsLinear():
        # c is affine in the reference index: three 1D ramps broadcast over (z, y, x)
        a, b = affine_parameters(tx)
        g = w @ a @ rd  # d c / d (i, j, k)
        c0 = float(w @ (a @ ro + b)) + w0
        i, j, k = (np.arange(n, dtype=np.float64) for n in size)
        c = (c0 + g[0] * i[None, None, :] + g[1] * j[None, :, None] + g[2] * k[:, None, None])
    else:
        field = sitk.TransformToDisplacementField(
            tx, sitk.sitkVectorFloat64, size, reference.GetOrigin(), reference.GetSpacing(),
            reference.GetDirection())
        disp = sitk.GetArrayFromImage(field)  # (z, y, x, 3)
        idx = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float64) for n in size[::-1]),
                                   indexing="ij")[::-1], axis=-1)  # (z, y, x, 3) = (i, j, k)
        q = idx @ rd.T + ro + disp
        c = q @ w + w0
    n = native.GetSize()[axis]
    low, high = c + 0.5, n - 0.5 - c  # slices from the low-index face, from the other
    if ends == "both":
        slices = np.minimum(low, high)
    else:  # the inferior face: the low-index one when the index runs upwards
        slices = np.where(high >= 0, low, -1.0) if up[2] > 0 else np.where(low >= 0, high, -1.0)
    dist = np.clip(slices, 0.0, None) * native.GetSpacing()[axis]
    out = sitk.GetImageFromArray(np.broadcast_to(dist, size[::-1]).astype(np.float32))
    out.CopyInformation(reference)
    return out


# --------------------------------------------------------------------------------------------
# registration


def _masked(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    if mask is None:
        return image
    m = sitk.Cast(mask > 0, image.GetPixelID())
    return sitk.Multiply(image, m)


def _ncc(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    fixed_mask: sitk.Image | None,
    n_threads: int | None,
) -> float:
    """Normalized cross-correlation of fixed and transformed moving within the fixed mask,
    evaluated on a regular sample of the fixed grid."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricUseMovingImageGradientFilter(False)  # no gradient image of the whole moving
    reg.SetMetricUseFixedImageGradientFilter(False)
    n = float(np.prod(fixed.GetSize()))
    reg.SetMetricSamplingPercentage(float(min(1.0, 100000.0 / n)))
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInitialTransform(transform, inPlace=False)
    if n_threads:
        reg.SetNumberOfThreads(int(n_threads))
    try:
        return float(-reg.MetricEvaluate(fixed, moving))
    except RuntimeError:
        return float("nan")


def _level_spacing(
    image: sitk.Image, shrink: float, base_mm: float
) -> tuple[float, ...]:
    """Per-axis spacing of a pyramid level: ``shrink * base_mm``, never finer than native
    (thick slices are not shrunk further while the in-plane voxels catch up)."""
    return tuple(max(float(s), float(shrink) * base_mm) for s in image.GetSpacing())


def _level_image(
    image: sitk.Image,
    spacing: Sequence[float],
    sigma_mm: float,
    interpolator: int = sitk.sitkLinear,
) -> sitk.Image:
    """``image`` smoothed (level sigma plus per-axis anti-aliasing) and resampled onto a grid
    of the same extent and direction with ``spacing``."""
    native = np.array(image.GetSpacing(), float)
    target = np.asarray(spacing, float)
    out = image
    if interpolator == sitk.sitkLinear:
        aa = 0.5 * np.sqrt(np.maximum(target**2 - native**2, 0.0))
        sig = np.sqrt(aa**2 + float(sigma_mm) ** 2)
        sig_vox = np.where(sig > 0.25 * native, sig / native, 0.0)  # x, y, z order
        if sig_vox.any():
            # scipy's FIR Gaussian (float32, 3 sigma) instead of ITK's per-axis recursive
            # Gaussian: 0.07 vs 0.38 s of CPU on a 1 mm 182x218x182 image, same real-motion TRE
            arr = ndimage.gaussian_filter(_voxels(out), sig_vox[::-1],
                                          truncate=3.0)
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(image)
    if np.allclose(target, native):
        return out
    size = np.array(image.GetSize(), float)
    new_size = np.maximum(np.round(size * native / target), 1).astype(int)
    d = np.array(image.GetDirection()).reshape(3, 3)
    # keep the field of view: the first new voxel centre sits half a new voxel inside the edge
    shift = (target - native) / 2.0
    origin = np.array(image.GetOrigin()) + d @ shift
    ref = sitk.Image([int(v) for v in new_size], sitk.sitkUInt8)
    ref.SetSpacing(tuple(float(v) for v in target))
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetDirection(image.GetDirection())
    return sitk.Resample(out, ref, sitk.Transform(), interpolator, 0.0, out.GetPixelID())


def _pyramid(
    image: sitk.Image,
    mask: sitk.Image | None,
    shrink_factors: Sequence[int],
    smoothing_sigmas_mm: Sequence[float],
    base_mm: float,
    fine_image_smoothing_mm: float = 0.0,
    finest_mm: float | None = None,
) -> list[tuple[sitk.Image, sitk.Image | None]]:
    """Registration pyramid of one image and its mask: per level (in the order of
    ``shrink_factors``), the float32 image smoothed and resampled (:func:`_level_image`) and
    the uint8 mask resampled by nearest neighbour onto the same grid (``None`` without mask).
    ``finest_mm``: voxel size of the finest level instead of ``shrink * base_mm`` (the coarser
    levels keep ``shrink * base_mm``)."""
    src = (sitk.Cast(image, sitk.sitkFloat32),
           sitk.Cast(mask > 0, sitk.sitkUInt8) if mask is not None else None)
    # built fine -> coarse, each level from the next finer one: the full-resolution image is
    # smoothed once (smoothing it per level dominated the run time)
    prev_sigma = 0.0
    built = {}
    finest_first = sorted(range(len(shrink_factors)), key=lambda k: shrink_factors[k])
    for k in finest_first:
        shrink, sigma = shrink_factors[k], float(smoothing_sigmas_mm[k])
        level_mm = shrink * base_mm
        if k == finest_first[0] and finest_mm:
            shrink, level_mm = 1.0, float(finest_mm)
        if k == finest_first[0] and min(image.GetSpacing()) < level_mm:
            # an image finer than the working grid: extra smoothing of its finest level
            sigma = math.hypot(sigma, float(fine_image_smoothing_mm))
        spacing = _level_spacing(image, shrink, level_mm / shrink)
        # Gaussian sigmas add in quadrature: smooth the finer level by the difference only
        extra = math.sqrt(max(sigma**2 - prev_sigma**2, 0.0))
        src = (_level_image(src[0], spacing, extra),
               _level_image(src[1], spacing, 0.0, sitk.sitkNearestNeighbor)
               if src[1] is not None else None)
        built[k] = src
        prev_sigma = max(sigma, prev_sigma)
    return [built[k] for k in range(len(shrink_factors))]


def _cached_pyramid(cache: dict | None, image, mask, shrink_factors, smoothing_sigmas_mm,
                    base_mm: float, fine_image_smoothing_mm: float = 0.0,
                    finest_mm: float | None = None):
    """:func:`_pyramid`, looked up in ``cache`` (keyed by the image and mask objects, which the
    cache keeps alive so that their ids cannot be reused) when one is given."""
    if cache is None:
        return _pyramid(image, mask, shrink_factors, smoothing_sigmas_mm, base_mm,
                        fine_image_smoothing_mm, finest_mm)
    key = (id(image), id(mask), tuple(shrink_factors), tuple(map(float, smoothing_sigmas_mm)),
           float(base_mm), float(fine_image_smoothing_mm), float(finest_mm or 0.0))
    # one lock per key (dict.setdefault is atomic): registrations running in parallel threads
    # (build_subject_space's n_workers) build a shared pyramid once
    with cache.setdefault(("lock", *key), threading.Lock()):
        if key not in cache:
            cache[key] = (image, mask,
                          _pyramid(image, mask, shrink_factors, smoothing_sigmas_mm, base_mm,
                                   fine_image_smoothing_mm, finest_mm))
    return cache[key][2]


def _pyramid_key(shrink_factors: Sequence[int], smoothing_sigmas_mm: Sequence[float],
                 base_mm: float, fine_image_smoothing_mm: float, finest_mm: float | None,
                 has_mask: bool) -> tuple:
    """What a registration pyramid of a given image and mask depends on (:func:`_pyramid`)."""
    return (tuple(int(k) for k in shrink_factors), tuple(float(s) for s in smoothing_sigmas_mm),
            float(base_mm), float(fine_image_smoothing_mm), float(finest_mm or 0.0),
            bool(has_mask))


def _base_mm(image: sitk.Image, working_spacing_mm: float | None) -> float:
    """Voxel size of the pyramid's unit level: ``working_spacing_mm``, else the finest native
    spacing of ``image`` (:func:`register_rigid`: of the fixed image)."""
    if working_spacing_mm and working_spacing_mm > 0:
        return float(working_spacing_mm)
    return float(min(image.GetSpacing()))


#: the keywords of :func:`register_rigid` that :func:`registration_pyramid` takes
PYRAMID_PARAMETERS = ("shrink_factors", "smoothing_sigmas_mm", "working_spacing_mm",
                      "finest_spacing_mm", "fine_image_smoothing_mm")


@dataclass(frozen=True)
class Pyramid:
    """The registration pyramid of one image and its mask, built once (e.g. where the image is
    made) and handed to every :func:`register_rigid` call that registers that image
    (``fixed_pyramid`` / ``moving_pyramid``) instead of each call building it again.

    ``key`` (:func:`_pyramid_key`) names the parameters it was built with: a registration uses
    it only when they are the ones it would build its own with."""

    key: tuple
    levels: list  # per level: (float32 image, uint8 mask or None), as from _pyramid


def registration_pyramid(
    image: sitk.Image,
    mask: sitk.Image | None = None,
    *,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (2.0, 1.0, 0.0),
    working_spacing_mm: float | None = 2.0,
    finest_spacing_mm: float | None = None,
    fine_image_smoothing_mm: float = 0.0,
) -> Pyramid:
    """The pyramid :func:`register_rigid` (same keywords) builds of ``image`` and ``mask``
    when ``image`` is its fixed image, or its moving image beside a fixed image of the same
    base spacing (always, with a ``working_spacing_mm``). Bit-identical to the one it builds."""
    base = _base_mm(image, working_spacing_mm)
    finest_mm = float(finest_spacing_mm) if finest_spacing_mm and finest_spacing_mm > 0 else None
    key = _pyramid_key(shrink_factors, smoothing_sigmas_mm, base, fine_image_smoothing_mm,
                       finest_mm, mask is not None)
    return Pyramid(key, _pyramid(image, mask, shrink_factors, smoothing_sigmas_mm, base,
                                 fine_image_smoothing_mm, finest_mm))


def save_pyramid(pyramid: Pyramid, path: str | Path) -> Path:
    """Write a :class:`Pyramid` (voxels and geometry exactly: float32/uint8 arrays, float64
    origin, spacing and direction) to an uncompressed ``.npz``."""
    arrays = {"key": np.array(repr(pyramid.key))}
    for k, level in enumerate(pyramid.levels):
        for part, img in zip(("image", "mask"), level):
            if img is None:
                continue
            arrays[f"{part}{k}"] = sitk.GetArrayFromImage(sitk.Image(img))
            arrays[f"{part}{k}_geometry"] = np.array(
                [*img.GetOrigin(), *img.GetSpacing(), *img.GetDirection()], dtype=np.float64)
    path = Path(path)
    with open(path, "wb") as fh:  # np.savez would append .npz to another suffix
        np.savez(fh, **arrays)
    return path


def load_pyramid(path: str | Path) -> Pyramid:
    """A :class:`Pyramid` written by :func:`save_pyramid`, identical to the one saved."""
    import ast

    def image(arrays, name):
        if name not in arrays:
            return None
        img = sitk.GetImageFromArray(arrays[name])
        geometry = arrays[f"{name}_geometry"]
        img.SetOrigin(tuple(float(v) for v in geometry[:3]))
        img.SetSpacing(tuple(float(v) for v in geometry[3:6]))
        img.SetDirection(tuple(float(v) for v in geometry[6:]))
        return img

    with np.load(path, allow_pickle=False) as arrays:
        key = ast.literal_eval(str(arrays["key"]))
        levels = [(image(arrays, f"image{k}"), image(arrays, f"mask{k}"))
                  for k in range(len(key[0]))]
    return Pyramid(key, levels)


def _n_samples(mask: sitk.Image | None, image: sitk.Image, fraction: float,
               max_samples: int | None, min_samples: int) -> float:
    """Sampling percentage: ``fraction`` of the mask voxels, capped, floored, at most all."""
    inside = (
        float(np.count_nonzero(_voxels(mask)))
        if mask is not None
        else float(np.prod(image.GetSize()))
    )
    inside = max(inside, 1.0)
    wanted = fraction * inside
    if max_samples:
        wanted = min(wanted, float(max_samples))
    wanted = max(wanted, float(min_samples))
    return float(min(max(wanted / inside, 1e-4), 1.0))


def _run(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    metric: Metric,
    histogram_bins: int,
    sampling: float,
    sampling_strategy: SamplingStrategy,
    iterations: int,
    learning_rate: float,
    min_step: float,
    optimizer: Optimizer,
    n_threads: int | None,
    seed: int,
) -> tuple[sitk.Transform, float, int, str]:
    """One pyramid level (images already smoothed and resampled)."""
    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(histogram_bins))
    elif metric == "correlation":
        reg.SetMetricAsCorrelation()
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'mattes' or 'correlation'")
    if sampling < 1.0:
        # REGULAR = a grid with a random (seeded) offset per point: stratified, so the metric
        # of a given sample count varies less than with RANDOM points (real-motion TRE)
        reg.SetMetricSamplingStrategy(reg.REGULAR if sampling_strategy == "regular"
                                      else reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling), int(seed))
    # Image gradients by central differences at the sample points: the default pre-computed
    # (recursive-Gaussian) gradient image of the moving image biased the metric derivative by
    # ~0.02/mm on thick-slice b0 images (finite differences disagreed in sign), so the
    # optimizer settled 5-10 mm off the optimum; it is also slower on large images.
    reg.SetMetricUseMovingImageGradientFilter(False)
    reg.SetMetricUseFixedImageGradientFilter(False)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    if optimizer == "regular_step":
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=float(learning_rate),
            minStep=float(min_step),
            numberOfIterations=int(iterations),
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
    elif optimizer == "conjugate_gradient":
        reg.SetOptimizerAsConjugateGradientLineSearch(
            learningRate=float(learning_rate),
            numberOfIterations=int(iterations),
            convergenceMinimumValue=1e-6,
            convergenceWindowSize=10,
            lineSearchMaximumIterations=20,
            estimateLearningRate=reg.EachIteration,
            maximumStepSizeInPhysicalUnits=float(learning_rate),
        )
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(transform, inPlace=False)
    if n_threads:
        reg.SetNumberOfThreads(int(n_threads))
    count = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))
    out = reg.Execute(fixed, moving)
    if out.GetName() == "CompositeTransform":
        out = sitk.CompositeTransform(out).GetNthTransform(0)
    stop = reg.GetOptimizerStopConditionDescription()
    return out.Downcast(), float(reg.GetMetricValue()), count[0], stop


def _rotations(multistart_deg: float) -> list[tuple[float, float, float]]:
    starts = [(0.0, 0.0, 0.0)]
    if multistart_deg > 0:
        r = math.radians(multistart_deg)
        for axis in range(3):
            for sign in (1.0, -1.0):
                ang = [0.0, 0.0, 0.0]
                ang[axis] = sign * r
                starts.append(tuple(ang))
    return starts


@contextmanager
def _itk_threads(n_threads: int | None):
    """SimpleITK's global default thread count set to ``n_threads`` for the duration."""
    if not n_threads:
        yield
        return
    old = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n_threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old)


def _with_itk_threads(func):
    # ImageRegistrationMethod.SetNumberOfThreads alone is not enough: with n_threads=1 but a
    # global default of 2, repeated runs differed in the 6th digit; with the global default
    # also 1 they are bit-identical (issue #9)
    @functools.wraps(func)
    def wrapper(*args, n_threads: int | None = None, **kwargs):
        with _itk_threads(n_threads):
            return func(*args, n_threads=n_threads, **kwargs)

    return wrapper


@_with_itk_threads
def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    moving_mask_in_metric: bool = False,
    metric: Metric = "mattes",
    histogram_bins: int = 32,
    sampling_fraction: float = 0.25,
    sampling_strategy: SamplingStrategy = "random",
    max_samples: int | None = 50000,
    min_samples: int = 5000,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas_mm: Sequence[float] = (2.0, 1.0, 0.0),
    working_spacing_mm: float | None = 2.0,
    finest_spacing_mm: float | None = None,
    fine_image_smoothing_mm: float = 0.0,
    iterations: int = 200,
    learning_rate: float = 1.0,
    min_step: float = 1e-5,
    coarse_min_step: float | None = None,
    optimizer: Optimizer = "regular_step",
    transform_type: TransformType = "rigid",
    initial_transform: sitk.Transform | None = None,
    initialisation: Initialisation = "moments",
    multistart_deg: float = 10.0,
    multistart_iterations: int = 50,
    symmetric: bool = True,
    backward_learning_rate: float | None = None,
    n_threads: int | None = None,
    seed: int = 1,
    pyramid_cache: dict | None = None,
    fixed_pyramid: Pyramid | None = None,
    moving_pyramid: Pyramid | None = None,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (rigid or affine, multi-resolution).

    Without ``initial_transform`` the moving image is first centred on the fixed one
    (``initialisation``: ``"moments"`` = centres of mass of the masked images,
    ``"geometry"`` = image centres, ``"identity"`` = scanner coordinates as they are), then a
    small multi-start probes the identity and rotations of ±``multistart_deg`` about each axis
    at the coarsest pyramid level; the start with the best metric is refined through all
    levels. With ``initial_transform`` (fixed -> moving points) neither is done.

    Parameters
    ----------
    fixed, moving
        Scalar 3D images (any pixel type; cast to float32).
    fixed_mask, moving_mask
        Brain masks (nonzero = inside). The metric samples points of the fixed mask only;
        the moving mask serves the moments initialisation (centre of mass of the brain, not of
        the scalp). Changing lesions are tolerated as a small fraction of the mask.
    moving_mask_in_metric
        Also drop samples that map outside the moving mask. Off by default: samples entering
        and leaving the mask make the metric discontinuous, and on test heads the optimizer
        then stalls 1-8 mm from the optimum.
    metric
        ``"mattes"`` (Mattes mutual information, for any contrast pair) or ``"correlation"``
        (same contrast).
    histogram_bins
        Mattes histogram bins.
    sampling_fraction
        Fraction of fixed-mask voxels sampled per level (seeded).
    sampling_strategy
        ``"regular"``: a regular grid of sample points, each moved at random (seeded) within
        its voxel (ITK's REGULAR); ``"random"``: points drawn at random. The stratified grid
        varies less from sample to sample: on the benchmark's real-motion pairs the mean TRE
        over 4 seeds was 0.018 mm vs 0.022 mm for random points, at the same cost; on phantom
        b0 -> FLAIR pairs and the phantom subject space it was worse (0.248 vs 0.217 mm,
        0.0744 vs 0.0716 mm).
    max_samples
        Cap on the number of sampled points per level (speed); ``None`` = no cap.
    min_samples
        Floor on the number of sampled points per level (coarse levels of small images would
        otherwise starve the histogram; all voxels are used if there are fewer).
    shrink_factors, smoothing_sigmas_mm
        Pyramid, coarse to fine: per level, both images are smoothed (Gaussian sigma in mm,
        plus anti-aliasing) and resampled, per axis, to ``shrink * working_spacing_mm`` or
        their native spacing if coarser (thick slices are never shrunk further).
    working_spacing_mm
        Voxel size (mm) of the finest level; registration never runs on a finer grid
        (sub-millimetre in-plane voxels cost time and add no rigid precision). ``None`` or 0:
        the finest native spacing of the fixed image.
    finest_spacing_mm
        Voxel size (mm) of the finest level only (per axis never finer than native); the
        coarser levels keep ``shrink * working_spacing_mm``. ``None`` or 0 = the finest level
        at ``working_spacing_mm``. A finer last level resolves the sub-voxel optimum of
        sub-millimetre scans better (benchmarks/results/registration.md); its cost is held by
        ``max_samples``.
    fine_image_smoothing_mm
        Extra Gaussian sigma (mm, added in quadrature to the finest level's) for an image whose
        finest native spacing is below the working spacing, i.e. that is downsampled to reach
        it. Its noise and texture otherwise make the finest level's metric rough: on the
        benchmark's real-motion pairs (1 mm FLAIR vs thick-slice copies with Rician noise)
        mean TRE 0.0215 -> 0.0154 mm with 1.5 (4 sampling seeds). But the phantom at clinical
        grids (0.9 x 0.9 x 4.5 mm FLAIR) got worse (FLAIR 0.026 -> 0.034, b0 -> FLAIR
        0.162 -> 0.211 mm), so the configuration leaves it off (0). Images at or coarser than
        the working grid are never smoothed by it. Raising the anisotropic anti-aliasing
        instead made real-motion worse (factor 2: 0.024 mm).
    iterations
        Maximum regular-step gradient-descent iterations per level.
    learning_rate, min_step
        Initial and minimum step of the regular-step optimizer, in its scaled parameter space
        (scales from physical shift). The step halves whenever the gradient turns back, so
        ``log2(learning_rate / min_step)`` bounds the number of halvings; on brain images
        ``min_step = 1e-5`` reaches a precision of about 0.05 mm, 1e-3 stops 1-2 mm short.
        For ``"conjugate_gradient"``, ``learning_rate`` is the largest step (mm).
    coarse_min_step
        Minimum step of the levels before the finest (and of the multi-start probes); ``None``
        or 0 = ``min_step``. A coarse level only has to bring the next one within reach:
        converged to ``min_step`` the coarsest level took ~160-190 iterations, more than the
        finer levels together.
    optimizer
        ``"regular_step"`` (RegularStepGradientDescent) or ``"conjugate_gradient"``
        (ConjugateGradientLineSearch, learning rate estimated at every iteration; more metric
        evaluations per iteration, fewer iterations).
    transform_type
        ``"rigid"`` (Euler3DTransform) or ``"affine"`` (AffineTransform; the rigid start is
        found first).
    initial_transform
        Starting transform mapping fixed points to moving points.
    initialisation
        How to centre without ``initial_transform`` (see above).
    multistart_deg
        Probe rotation (degrees); 0 disables the multi-start.
    multistart_iterations
        Maximum iterations of each multi-start probe (coarsest level only).
    symmetric
        Rigid only: also register the finest level backwards (moving -> fixed) and return the
        rigid mean of the forward transform and the inverted backward one, so that
        registering A->B and B->A gives (nearly) inverse transforms.
    backward_learning_rate
        Initial step of the symmetric backward pass (scaled units, as ``learning_rate``);
        ``None`` or 0 = the finest level's. The backward pass starts from the forward
        optimum, a few hundredths of a millimetre from its own: 0.02 instead of 0.25 gave the
        same real-motion TRE with ~10 % less CPU per pair (fewer step halvings).
    n_threads
        Threads of every ITK filter of the call (SimpleITK's global default is set for its
        duration and restored); ``None`` uses the global default as it is.
    seed
        Seed of the random metric sampling. With ``n_threads=1`` the transform is
        bit-identical from run to run and process to process; with more threads ITK's
        threaded metric sums vary in the last digits (measured ~1e-5 mm, 1e-6 rad).
    pyramid_cache
        A dict kept by a caller that registers the same image objects several times
        (:func:`build_subject_space`): each image's pyramid is built once and reused, with
        identical results (building it was ~12 % of the subject space's time).
    fixed_pyramid, moving_pyramid
        :func:`registration_pyramid` of ``fixed`` (with ``fixed_mask``) and of ``moving``
        (with ``moving_mask``), built beforehand (e.g. by the node that made the image, for
        every registration of it): used instead of building them when their parameters are
        this call's (:class:`Pyramid`), with identical results. The caller vouches that they
        are of these images and masks.

    Returns
    -------
    RegistrationResult
        ``transform`` maps fixed points to moving points ("from-moving_to-fixed").
    """
    t0 = time.perf_counter()
    if len(shrink_factors) != len(smoothing_sigmas_mm):
        raise ValueError("shrink_factors and smoothing_sigmas_mm must have the same length")
    if transform_type not in ("rigid", "affine"):
        raise ValueError(f"unknown transform_type {transform_type!r}")
    if not shrink_factors:
        raise ValueError("at least one pyramid level is needed")
    f = fixed
    fm = sitk.Cast(fixed_mask > 0, sitk.sitkUInt8) if fixed_mask is not None else None
    base = _base_mm(f, working_spacing_mm)
    finest_mm = float(finest_spacing_mm) if finest_spacing_mm and finest_spacing_mm > 0 else None

    def levels_of(image, mask, given: Pyramid | None):
        key = _pyramid_key(shrink_factors, smoothing_sigmas_mm, base, fine_image_smoothing_mm,
                           finest_mm, mask is not None)
        if given is not None and given.key == key:
            return given.levels
        return _cached_pyramid(pyramid_cache, image, mask, shrink_factors, smoothing_sigmas_mm,
                               base, fine_image_smoothing_mm, finest_mm)

    fixed_levels = levels_of(fixed, fixed_mask, fixed_pyramid)
    moving_levels = levels_of(moving, moving_mask, moving_pyramid)
    levels = []
    for k, shrink in enumerate(shrink_factors):
        (fl, fml), (ml, mml) = fixed_levels[k], moving_levels[k]
        samp = _n_samples(fml, fl, sampling_fraction, max_samples, min_samples)
        levels.append((fl, ml, fml, mml, samp, float(shrink)))
    finest = min(range(len(shrink_factors)), key=lambda k: shrink_factors[k])
    common = dict(
        metric=metric,
        histogram_bins=histogram_bins,
        sampling_strategy=sampling_strategy,
        optimizer=optimizer,
        n_threads=n_threads,
        seed=seed,
    )

    def level_lr(k: int) -> float:
        # every level refines the previous one: the first step shrinks with the voxel size
        return float(learning_rate) * min(1.0, levels[k][5] / levels[0][5])

    def level_min_step(k: int) -> float:
        # a coarse level only needs to bring the next one into its capture range: converging
        # it to the final precision cost more iterations than all finer levels together
        if k == finest or not coarse_min_step:
            return float(min_step)
        return max(float(min_step), float(coarse_min_step))

    n_iter = 0
    start_index = 0
    if initial_transform is None:
        fl0, ml0, fml0, mml0 = levels[0][:4]
        if initialisation == "identity":
            init = sitk.Euler3DTransform()
            if fm is not None:
                init.SetCenter(tuple(_mask_points(fm, 20000).mean(axis=0)))
        else:
            how = (
                sitk.CenteredTransformInitializerFilter.MOMENTS
                if initialisation == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY
            )
            init = sitk.CenteredTransformInitializer(
                _masked(fl0, fml0), _masked(ml0, mml0), sitk.Euler3DTransform(), how
            )
            init = sitk.Euler3DTransform(init)
        starts = _rotations(multistart_deg)
        if len(starts) > 1:
            fl0, ml0, fml0, _, samp0, _ = levels[0]
            best = None
            for k, angles in enumerate(starts):
                cand = sitk.Euler3DTransform(init)
                cand.SetRotation(*angles)
                out, value, n, _ = _run(
                    fl0, ml0, cand,
                    fixed_mask=fml0,
                    moving_mask=levels[0][3] if moving_mask_in_metric else None,
                    sampling=samp0,
                    iterations=min(iterations, multistart_iterations),
                    learning_rate=level_lr(0),
                    min_step=level_min_step(0),
                    **common,
                )
                n_iter += n
                if best is None or value < best[1]:
                    best = (out, value, k)
            init, start_index = sitk.Euler3DTransform(best[0]), best[2]
    else:
        init = initial_transform
    if transform_type == "affine" and init.GetName() != "AffineTransform":
        a, b = affine_parameters(init)
        start = sitk.AffineTransform(3)
        start.SetCenter(_center_of(init))
        c = np.array(_center_of(init))
        start.SetMatrix(tuple(a.ravel()))
        start.SetTranslation(tuple(a @ c + b - c))
        init = start
    elif transform_type == "rigid" and init.GetName() != "Euler3DTransform":
        a, b = affine_parameters(init)
        c = np.array(_center_of(init))
        r = _rotation_part(a)
        init = affine_transform(r, a @ c + b - r @ c, c)
    out, value, stop = init, float("nan"), ""
    for k, (fl, ml, fml, mml, samp, _) in enumerate(levels):
        out, value, n, stop = _run(
            fl, ml, out,
            fixed_mask=fml,
            moving_mask=mml if moving_mask_in_metric else None,
            sampling=samp,
            iterations=iterations,
            learning_rate=level_lr(k),
            min_step=level_min_step(k),
            **common,
        )
        n_iter += n
    if symmetric and transform_type == "rigid":
        # inverse consistency: register the finest level backwards (moving -> fixed, from
        # the inverse of the forward result) and keep the rigid mean of the forward result
        # and the inverse of the backward one; the asymmetry of sampling one image and
        # interpolating the other cancels to first order (forward and backward independent
        # registrations disagreed by up to 0.11 mm on the benchmark).
        fl, ml, fml, mml, _, _ = levels[finest]
        back, _, n, _ = _run(
            ml, fl, invert_transform(out),
            fixed_mask=mml,
            moving_mask=fml if moving_mask_in_metric else None,
            sampling=_n_samples(mml, ml, sampling_fraction, max_samples, min_samples),
            iterations=iterations,
            learning_rate=float(backward_learning_rate or level_lr(finest)),
            min_step=level_min_step(finest),
            **common,
        )
        n_iter += n
        pts = _mask_points(fml, 5000) if fml is not None else _points(fl)
        out = mean_rigid([out, invert_transform(back)], pts)
    center = _mask_points(fm, 20000).mean(axis=0) if fm is not None else None
    if center is None:
        size = np.array(f.GetSize(), float)
        center = f.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2))
    rot, shift = transform_size(out, center)
    return RegistrationResult(
        transform=out,
        final_metric=value,
        similarity_after=_ncc(levels[finest][0], levels[finest][1], out, levels[finest][2],
                              n_threads),
        rotation_deg=rot,
        translation_mm=shift,
        n_iterations=n_iter,
        stop_condition=stop,
        start_index=start_index,
        elapsed_s=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------
# unbiased within-subject space


def mean_rigid(transforms: Sequence[sitk.Transform], points: np.ndarray) -> sitk.Transform:
    """Rigid transform closest (least squares over ``points``) to the mean of ``transforms``.

    Minimises ``sum_i sum_x |M(x) - T_i(x)|^2``, i.e. fits (Kabsch) the rigid ``M`` to the
    point-wise average of the mapped points. For two transforms ``I`` and ``R`` this is the
    halfway transform (half the rotation about the points' centroid, half the translation of
    the centroid). Independent of the order of ``transforms``.
    """
    pts = np.asarray(points, float)
    target = np.mean([_apply(t, pts) for t in transforms], axis=0)
    pc, tc = pts.mean(axis=0), target.mean(axis=0)
    h = (pts - pc).T @ (target - tc)
    u, _, vt = np.linalg.svd(h)
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))])
    r = vt.T @ d @ u.T
    return affine_transform(r, tc - r @ pc, pc)


def _bbox_grid(
    boxes: list[np.ndarray], spacing_mm: float, margin_mm: float
) -> sitk.Image:
    pts = np.vstack(boxes)
    lo = pts.min(axis=0) - margin_mm
    hi = pts.max(axis=0) + margin_mm
    size = np.ceil((hi - lo) / spacing_mm).astype(int) + 1
    ref = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    ref.SetSpacing([float(spacing_mm)] * 3)
    ref.SetOrigin(tuple(float(v) for v in lo))
    ref.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))
    return ref


def _brain_corners(image: sitk.Image, mask: sitk.Image | None) -> np.ndarray:
    """Physical corners (8 x 3) of the mask's bounding box (or of the whole image)."""
    if mask is not None:
        inside = _voxels(mask) > 0
        if inside.any():
            # per axis (x, y, z): first and last slice holding a mask voxel (the box of the
            # voxels' indices, from three projections instead of every voxel's index)
            ends = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
                    for axis in (2, 1, 0)]
            lo, hi = np.array([e[0] for e in ends]), np.array([e[-1] for e in ends])
        else:
            lo, hi = np.zeros(3), np.array(image.GetSize()) - 1
        ref = mask
    else:
        lo, hi = np.zeros(3), np.array(image.GetSize()) - 1
        ref = image
    corners = np.array(
        [[(lo, hi)[i][0], (lo, hi)[j][1], (lo, hi)[k][2]] for i in (0, 1) for j in (0, 1)
         for k in (0, 1)],
        float,
    )
    return _index_to_physical(ref, corners)


def _normalised(image: sitk.Image, mask: sitk.Image | None) -> sitk.Image:
    arr = _voxels(image)
    sel = arr[_voxels(mask) > 0] if mask is not None else arr[arr > 0]
    scale = float(np.median(sel)) if sel.size else 1.0
    return sitk.Cast(image, sitk.sitkFloat32) / (scale if scale > 0 else 1.0)


def _subject_space_params(reg_params: dict) -> dict:
    """:func:`register_rigid` keywords of the subject space's registrations: rigid, and no
    caller-given start (each step sets its own)."""
    params = dict(reg_params)
    params["transform_type"] = "rigid"
    params.pop("initial_transform", None)
    return params


def step1_symmetric(symmetric: bool, to_first_symmetric: bool, template_iterations: int) -> bool:
    """``symmetric`` of the subject space's step 1 (:func:`register_to_first`):
    ``to_first_symmetric`` when template iterations follow, else ``symmetric``.

    With ``template_iterations >= 1`` step 1 only gives the template its poses and step 3 its
    start, and step 3 registers every session again with its own symmetric pass; without
    template iterations step 1's transforms are the result and keep ``symmetric``.
    """
    return bool(to_first_symmetric) if int(template_iterations) >= 1 else bool(symmetric)


def register_to_first(
    first: sitk.Image,
    image: sitk.Image,
    first_mask: sitk.Image | None = None,
    mask: sitk.Image | None = None,
    *,
    first_pyramid: Pyramid | None = None,
    pyramid: Pyramid | None = None,
    **reg_params,
) -> RegistrationResult:
    """Step 1 of :func:`build_subject_space` for one session: ``image`` (moving) registered
    rigidly to the first session's ``first`` (fixed). The result's transform maps session-0
    points to this session's points.

    Each session's registration is independent of the others', so it can run as soon as both
    images are ready (e.g. in its own process) and be handed to ``build_subject_space`` as
    ``to_first``. ``reg_params`` as for ``build_subject_space``; ``first_pyramid`` and
    ``pyramid``: the two images' :func:`registration_pyramid`, if built beforehand.
    """
    return register_rigid(first, image, fixed_mask=first_mask, moving_mask=mask,
                          fixed_pyramid=first_pyramid, moving_pyramid=pyramid,
                          **_subject_space_params(reg_params))


def build_subject_space(
    images: Sequence[sitk.Image],
    masks: Sequence[sitk.Image] | None = None,
    *,
    spacing_mm: float,
    template_iterations: int,
    template_spacing_mm: float = 2.0,
    margin_mm: float = 10.0,
    n_workers: int = 1,
    to_first: Sequence[RegistrationResult] | None = None,
    pyramids: Sequence[Pyramid | None] | None = None,
    to_first_symmetric: bool | None = None,
    **reg_params,
) -> tuple[list[sitk.Transform], sitk.Image, list[RegistrationResult]]:
    """Unbiased rigid within-subject space of N sessions.

    1. Every session ``i > 0`` is registered (moving) to session 0 (fixed) by
       :func:`register_to_first`: ``T_i`` maps session-0 points to session-``i`` points;
       ``T_0`` is the identity. Skipped when ``to_first`` gives these results.
    2. Mean-pose normalisation: ``M = mean_rigid(T_i)`` over brain points of session 0, and
       each transform becomes ``T_i o M^-1``, so that the subject space sits at the average
       pose of the sessions (for N = 2 exactly halfway).
    3. ``template_iterations`` times: a template is built in the subject space (mean of the
       sessions' median-normalised images on an isotropic ``template_spacing_mm`` grid,
       mask = majority of the sessions' masks), every session is registered (moving) to it
       starting from its current transform, and the mean pose is re-normalised to identity.
       After one iteration no session is the reference any more.

    Parameters
    ----------
    images
        One image per session (e.g. bias-corrected FLAIR), native grids.
    masks
        Brain masks on the same grids (recommended: they restrict the metric to the brain).
    spacing_mm
        Isotropic voxel size of the returned reference grid (mm).
    template_iterations
        Template iterations (0 = pairwise to the first session plus mean-pose normalisation);
        named so as not to clash with the optimizer's ``iterations`` in ``reg_params``.
    template_spacing_mm
        Voxel size of the working template grid (mm); coarser is faster.
    margin_mm
        Margin around the union of the brains' bounding boxes (mm).
    n_workers
        Registrations run at once (threads; SimpleITK releases the GIL), each on
        ``reg_params["n_threads"]`` ITK threads. The registrations of one step are independent
        and seeded, so the result is the same for any ``n_workers`` (bit-identical with one ITK
        thread each).
    to_first
        The ``N - 1`` results of step 1 computed beforehand (sessions ``1..N-1``, in order),
        e.g. each in its own process beside other work: ``register_to_first(images[0],
        images[i], masks[0], masks[i], **reg_params)``. With the same ``reg_params`` (and one
        ITK thread) the outcome is bit-identical to running step 1 here.
    pyramids
        Per session, the :func:`registration_pyramid` of its image and mask built beforehand
        (e.g. by the node that made the image), or None: every registration of that image
        uses it instead of building its own when its parameters are the registration's
        (:class:`Pyramid`); the results are the same.
    to_first_symmetric
        ``symmetric`` of step 1's registrations when ``template_iterations >= 1``
        (:func:`step1_symmetric`; ``None`` = ``reg_params``'s).
    **reg_params
        Passed to :func:`register_rigid` (metric, shrink_factors, ..., n_threads, seed);
        ``transform_type`` is forced to ``"rigid"``.

    Returns
    -------
    transforms
        Per session, a rigid transform mapping *subject-space* points to *session* points
        ("from-session_to-subject"): ``sitk.Resample(image_i, reference, transforms[i])``.
    reference
        Axis-aligned (identity direction) uint8 grid with isotropic ``spacing_mm`` covering
        the union of the brains plus ``margin_mm``.
    qc
        Per session, the last :class:`RegistrationResult` with ``transform`` replaced by the
        final subject -> session transform and ``rotation_deg``/``translation_mm`` by its size
        (the session's deviation from the mean pose).
    """
    n = len(images)
    if n == 0:
        raise ValueError("build_subject_space needs at least one image")
    if masks is not None and len(masks) != n:
        raise ValueError("images and masks must have the same length")
    if to_first is not None and len(to_first) != n - 1:
        raise ValueError(f"to_first needs one result per session after the first ({n - 1}), "
                         f"got {len(to_first)}")
    if pyramids is not None and len(pyramids) != n:
        raise ValueError(f"pyramids needs one entry per session ({n}), got {len(pyramids)}")
    mask_list = list(masks) if masks is not None else [None] * n
    reg_params = _subject_space_params(reg_params)

    # every session image is registered 1 + template_iterations times: its pyramid is built once
    reg_params["pyramid_cache"] = {}
    to_first_params = dict(reg_params)  # the same cache
    if to_first_symmetric is not None:
        to_first_params["symmetric"] = step1_symmetric(
            reg_params.get("symmetric", True), to_first_symmetric, template_iterations)
    n_threads = reg_params.get("n_threads")
    if n_threads:  # set once here: each registration's own setting then changes nothing, so
        # parallel registrations cannot restore each other's thread count mid-run
        old_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n_threads))
    pool = ThreadPoolExecutor(max(1, min(int(n_workers), n)))
    try:
        return _build_subject_space(images, mask_list, pool, masks is not None,
                                    spacing_mm=spacing_mm, template_iterations=template_iterations,
                                    template_spacing_mm=template_spacing_mm, margin_mm=margin_mm,
                                    reg_params=reg_params, to_first_params=to_first_params,
                                    to_first=to_first,
                                    pyramids=list(pyramids) if pyramids else [None] * n)
    finally:
        pool.shutdown()
        if n_threads:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_threads)


def _build_subject_space(images, mask_list, pool, have_masks, *, spacing_mm, template_iterations,
                         template_spacing_mm, margin_mm, reg_params, to_first_params,
                         to_first=None, pyramids=None):
    """:func:`build_subject_space` with the registrations of each step mapped over ``pool``."""
    n = len(images)
    pyramids = pyramids if pyramids is not None else [None] * n
    ident = sitk.Euler3DTransform()
    results: list[RegistrationResult | None] = [None] * n

    def pairwise(i: int) -> RegistrationResult:
        return register_to_first(images[0], images[i], mask_list[0], mask_list[i],
                                 first_pyramid=pyramids[0], pyramid=pyramids[i],
                                 **to_first_params)

    transforms: list[sitk.Transform] = [ident]
    done = to_first if to_first is not None else pool.map(pairwise, range(1, n))
    for i, res in enumerate(done, start=1):
        transforms.append(res.transform)
        results[i] = res

    pts0 = (
        _mask_points(mask_list[0], 4000)
        if mask_list[0] is not None
        else _index_to_physical(
            images[0], (np.array(images[0].GetSize()) - 1)[None, :] / 2.0
        )
    )
    if mask_list[0] is None:  # a cloud around the image centre stands for the brain
        grid = np.array(np.meshgrid(*[[-50.0, 50.0]] * 3)).reshape(3, -1).T
        pts0 = np.vstack([pts0, pts0 + grid])

    def normalise(ts: list[sitk.Transform], pts: np.ndarray) -> list[sitk.Transform]:
        m_inv = invert_transform(mean_rigid(ts, pts))
        return [compose_transforms(t, m_inv) for t in ts]

    transforms = normalise(transforms, pts0)
    pts_s = _apply(invert_transform(transforms[0]), pts0)  # brain points in subject space

    corners = [_brain_corners(img, msk) for img, msk in zip(images, mask_list)]  # native

    def grid(spacing: float) -> sitk.Image:
        boxes = [_apply(invert_transform(t), c) for t, c in zip(transforms, corners)]
        return _bbox_grid(boxes, spacing, margin_mm)

    if n > 1:
        for _ in range(int(template_iterations)):
            work = grid(template_spacing_mm)
            acc = sitk.Image(work.GetSize(), sitk.sitkFloat32)
            acc.CopyInformation(work)
            macc = sitk.Image(work.GetSize(), sitk.sitkFloat32)
            macc.CopyInformation(work)

            def on_work_grid(i: int, work=work, start=transforms):
                """Session ``i``'s normalised image and mask resampled onto the template grid."""
                img, msk = images[i], mask_list[i]
                warped = resample_to_reference(_normalised(img, msk), work, [start[i]])
                if msk is None:
                    return warped, None
                return warped, resample_to_reference(sitk.Cast(msk > 0, sitk.sitkFloat32),
                                                     work, [start[i]])

            # resampled in the pool, summed here in session order (the same sums)
            for warped, wmask in pool.map(on_work_grid, range(n)):
                acc += warped
                if wmask is not None:
                    macc += wmask
            template = acc / float(n)
            tmask = sitk.Cast(macc >= 0.5 * n, sitk.sitkUInt8) if have_masks else None

            def to_template(i: int, template=template, tmask=tmask, start=transforms):
                return register_rigid(template, images[i], fixed_mask=tmask,
                                      moving_mask=mask_list[i], initial_transform=start[i],
                                      moving_pyramid=pyramids[i], **reg_params)

            results = list(pool.map(to_template, range(n)))
            transforms = normalise([res.transform for res in results], pts_s)

    reference = grid(spacing_mm)
    qc = []
    for i, t in enumerate(transforms):
        rot, shift = transform_size(t, pts_s.mean(axis=0))
        base = results[i]
        if base is None:
            base = RegistrationResult(t, float("nan"), float("nan"), 0.0, 0.0, 0)
        qc.append(replace(base, transform=t, rotation_deg=rot, translation_mm=shift))
    return transforms, reference, qc
