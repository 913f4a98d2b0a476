"""Reading and writing images: validated NIfTI loading, nibabel <-> SimpleITK, atomic writes.

Images are read with nibabel, which uses the sform when its code is set and the qform
otherwise (the choice is reported), then handed to SimpleITK with LPS world coordinates.
Errors name the file, what is wrong and what to do.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """An input file is unusable; the message names the file and the fix."""


@dataclass
class LoadedImage:
    """A validated image: float32 SimpleITK image plus what was noticed while reading."""

    image: sitk.Image
    path: Path
    affine_source: str
    warnings: list[str]


def nib_to_sitk(data: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image (LPS) from a 3D or 4D array indexed (i, j, k[, t]) and a RAS affine.

    A 4D array becomes a vector image with one component per volume.
    """
    affine = np.asarray(affine, float)
    m = affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise ValueError("affine has a zero or non-finite voxel size")
    direction = _RAS_TO_LPS @ m / spacing
    origin = _RAS_TO_LPS @ affine[:3, 3]
    if data.ndim == 4:
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0, 3))),
                                     isVector=True)
    else:
        img = sitk.GetImageFromArray(np.ascontiguousarray(data.T))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    img.SetDirection(tuple(float(d) for d in direction.ravel()))
    return img


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS voxel-to-world affine of a SimpleITK image."""
    direction = np.array(img.GetDirection(), float).reshape(3, 3)
    spacing = np.array(img.GetSpacing(), float)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ (direction * spacing)
    affine[:3, 3] = _RAS_TO_LPS @ np.array(img.GetOrigin(), float)
    return affine


def sitk_to_nib(img: sitk.Image) -> nib.Nifti1Image:
    """nibabel image (qform = sform, code 1) from a 3D SimpleITK image."""
    return _nifti(sitk.GetArrayFromImage(img).T, sitk_affine(img))


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """nibabel image of an (i, j, k) array and a RAS affine: qform = sform, code 1, mm."""
    out = nib.Nifti1Image(data, affine)
    out.set_qform(out.affine, code=1)
    out.set_sform(out.affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    return out


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; derivatives get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_image(img: sitk.Image, path: Path, dtype: np.dtype | type | None = None) -> Path:
    """Write a 3D SimpleITK image as NIfTI (atomically), optionally cast to ``dtype``."""
    # a view of the image's buffer: the image is alive until the file is written
    return write_array(sitk.GetArrayViewFromImage(img), img, path, dtype)


def write_array(data: np.ndarray, reference: sitk.Image, path: Path,
                dtype: np.dtype | type | None = None) -> Path:
    """Write a (z, y, x) voxel array on the grid of ``reference`` as NIfTI (atomically),
    optionally cast to ``dtype``: the file ``write_image`` writes for that image, without
    copying the array into SimpleITK and back."""
    if data.shape != tuple(reversed(reference.GetSize())):
        raise ValueError(f"{path}: array of shape {data.shape} on a grid of size "
                         f"{reference.GetSize()} (x, y, z)")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    nimg = _nifti(data.T, sitk_affine(reference))
    with atomic_path(Path(path)) as tmp:
        nib.save(nimg, str(tmp))
    return Path(path)


#: gzip files this process found complete: (resolved path, size, mtime_ns). Validation and
#: loading open each input several times; a file unchanged since its check is not decompressed
#: again to check it (MultiProc workers are forked after validation and inherit the set).
_VERIFIED_GZIP: set[tuple[str, int, int]] = set()


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found. Check the path or the BIDS layout.")
    stat = path.stat()
    if stat.st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes). Copy or export it again.")
    if path.name.endswith(".gz"):
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _VERIFIED_GZIP:
            return
        try:
            with gzip.open(path, "rb") as fh:
                while fh.read(1 << 24):
                    pass
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(
                f"{path}: the gzip stream is truncated or corrupt ({exc}). The download or copy "
                "was probably interrupted: copy the file again."
            ) from None
        _VERIFIED_GZIP.add(key)


def load_nifti(path: Path, *, kind: str, ndim: int | tuple[int, ...] = 3) -> tuple[nib.Nifti1Image, str, list[str]]:
    """Open a NIfTI file and check it is what ``kind`` needs.

    Returns the nibabel image (data not yet cast), which header transform is used and warnings.
    """
    path = Path(path)
    _check_readable(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        raise InputError(f"{path}: not a readable NIfTI image ({exc}). Convert it to NIfTI "
                         "(e.g. with `lesionlapse import-dicom` or dcm2niix).") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__}). Convert it to NIfTI.")
    shape = img.shape
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    eff = len(shape)
    if eff == 4 and shape[3] == 1 and 3 in allowed:
        eff = 3
    if eff not in allowed or any(s < 2 for s in shape[:3]):
        want = " or ".join(f"{n}D" for n in allowed)
        raise InputError(
            f"{path}: the {kind} image has shape {shape}, expected a {want} volume with at least "
            f"2 voxels per spatial axis. {_shape_hint(kind, eff)}"
        )
    warnings: list[str] = []
    qcode, scode = int(img.header["qform_code"]), int(img.header["sform_code"])
    source = "sform" if scode > 0 else ("qform" if qcode > 0 else "none")
    if source == "none":
        warnings.append(f"{path.name}: neither sform nor qform is set (codes 0); the image is "
                        "placed with voxel sizes from pixdim only, so it cannot be aligned with "
                        "other files by its header. Re-export it with dcm2niix")
    elif qcode > 0 and scode > 0:
        q, s = img.get_qform(), img.get_sform()
        if not np.allclose(q, s, atol=1e-3):
            shift = float(np.abs(q[:3, 3] - s[:3, 3]).max())
            warnings.append(
                f"{path.name}: qform and sform disagree (origin differs by up to {shift:.3g} mm); "
                "the sform is used (NIfTI rule: sform_code > 0 takes precedence). If the qform "
                "is the right one, set sform_code to 0 in the header")
    try:
        _ = img.header.get_data_dtype()
    except Exception as exc:  # pragma: no cover
        raise InputError(f"{path}: unreadable data type ({exc})") from None
    return img, source, warnings


def _shape_hint(kind: str, ndim: int) -> str:
    if kind == "FLAIR" and ndim == 4:
        return "A FLAIR must be a single 3D volume: split the 4D file and keep one volume."
    if ndim == 2:
        return "A single slice cannot be registered: export the whole volume."
    if kind == "DWI":
        return "A DWI series must be 4D (one volume per b-value/direction)."
    return "Check that the right file was exported."


def _read_data(img, path: Path, kind: str) -> np.ndarray:
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return np.asarray(img.dataobj, dtype=np.float32)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(
            f"{path}: the {kind} voxel data cannot be read ({exc}); the file is probably "
            "truncated. Copy or export it again."
        ) from None


def head_mask(data: np.ndarray) -> np.ndarray:
    """Rough head/brain support of a 3D image: finite voxels above 10% of the robust maximum,
    closed and hole-filled (non-finite voxels enclosed by tissue count as inside).

    Used only to tell NaN/Inf voxels in the background (harmless) from those in the head.
    """
    from scipy import ndimage

    finite = np.isfinite(data)
    values = np.abs(data[finite])
    if values.size == 0:
        return np.zeros(data.shape, bool)
    high = float(np.percentile(values, 99.5))
    fg = finite & (np.abs(data) > 0.1 * high) if high > 0 else np.zeros(data.shape, bool)
    if not fg.any():
        return fg
    fg = ndimage.binary_closing(fg, iterations=2, border_value=0)
    return ndimage.binary_fill_holes(fg)


def _handle_nonfinite(data: np.ndarray, path: Path, kind: str, warnings: list[str]) -> np.ndarray:
    """Zero NaN/Inf voxels in the background (reported); refuse them inside the head."""
    bad = ~np.isfinite(data)
    if not bad.any():
        return data
    bad3 = bad.any(axis=-1) if data.ndim == 4 else bad
    ref = np.where(bad, 0, data).mean(axis=-1) if data.ndim == 4 else data
    inside = head_mask(np.where(bad3, np.nan, ref)) & bad3
    n_inside = int(np.count_nonzero(inside))
    if n_inside:
        raise InputError(
            f"{path}: the {kind} image has {n_inside} NaN/Inf voxels inside the head (of "
            f"{int(bad.sum())} in total). Such voxels cannot be measured; export the series "
            "again, or fix the reconstruction that produced them."
        )
    warnings.append(f"{Path(path).name}: {int(bad.sum())} NaN/Inf voxels in the background set to 0")
    return np.where(bad, 0, data).astype(np.float32)


def load_volume(
    path: Path, *, kind: str, brain_hint: np.ndarray | None = None
) -> LoadedImage:
    """Load a 3D image as float32 SimpleITK with checks for NaN/Inf and all-zero content.

    Non-finite voxels in the background are set to zero and reported; inside the head (see
    :func:`head_mask`) they are refused.
    """
    img, source, warnings = load_nifti(path, kind=kind, ndim=3)
    data = _read_data(img, Path(path), kind)
    if data.ndim == 4:
        data = data[..., 0]
    if not np.any(np.isfinite(data) & (data != 0)):
        raise InputError(f"{path}: the {kind} image is all zeros (or all NaN). Export the "
                         "series again.")
    data = _handle_nonfinite(data, Path(path), kind, warnings)
    return LoadedImage(nib_to_sitk(data, img.affine), Path(path), source, warnings)


def load_series(path: Path, *, kind: str) -> tuple[np.ndarray, np.ndarray, str, list[str]]:
    """Load a 4D series as float32 array (i, j, k, t) with its affine (NaN/Inf as in
    :func:`load_volume`)."""
    img, source, warnings = load_nifti(path, kind=kind, ndim=4)
    data = _read_data(img, Path(path), kind)
    if not np.any(np.isfinite(data) & (data != 0)):
        raise InputError(f"{path}: the {kind} series is all zeros (or all NaN). Export the "
                         "series again.")
    data = _handle_nonfinite(data, Path(path), kind, warnings)
    return data, img.affine, source, warnings


def read_bvals_bvecs(bval: Path | None, bvec: Path | None, n_volumes: int, dwi: Path):
    """b-values (n,) and b-vectors (3, n) with checks against the number of DWI volumes."""
    if bval is None or bvec is None:
        missing = ".bval" if bval is None else ".bvec"
        raise InputError(
            f"{dwi}: the 4D DWI has no {missing} file beside it. Put the b-values/b-vectors from "
            "the conversion (dcm2niix writes them) next to the image with the same name."
        )
    bval, bvec = Path(bval), Path(bvec)
    try:
        bvals = np.loadtxt(bval, ndmin=1, dtype=float).ravel()
        bvecs = np.loadtxt(bvec, ndmin=2, dtype=float)
    except (ValueError, OSError) as exc:
        raise InputError(f"{bval} / {bvec}: cannot read numbers ({exc}). The .bval file must "
                         "hold one row of b-values and the .bvec three rows of directions, as "
                         "dcm2niix writes them.") from None
    if bvecs.shape[0] != 3 and bvecs.shape[-1] == 3:
        bvecs = bvecs.T
    if bvals.size != n_volumes or bvecs.shape != (3, n_volumes):
        raise InputError(
            f"{dwi}: {n_volumes} volumes but {bvals.size} b-values in {bval.name} and "
            f"{bvecs.shape[1] if bvecs.ndim == 2 else '?'} b-vectors in {bvec.name}. Use the "
            ".bval/.bvec written with this exact image."
        )
    return bvals, bvecs


def read_image(path: Path) -> sitk.Image:
    """Read a 3D NIfTI written by this pipeline as SimpleITK, keeping NaN voxels.

    ``sitk.ReadImage`` (ITK 5.4 NIfTI reader) turns NaN into 0, which would make an undefined
    ADC or rADC read as 0 ("maximally restricted"); this reader goes through nibabel instead.
    The geometry is the same as ``sitk.ReadImage`` gives (sform, else qform).
    """
    data, affine = _read_3d(path)
    return nib_to_sitk(data, affine)


def read_spacing(path: Path) -> tuple[float, ...]:
    """Voxel spacing (mm, ITK axis order) of an image file, from its header only."""
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    return info.GetSpacing()


def read_array(path: Path) -> np.ndarray:
    """Voxel array (z, y, x) of a 3D NIfTI written by this pipeline, NaN kept: the array
    ``sitk.GetArrayFromImage(read_image(path))`` gives, without the two copies through
    SimpleITK (an uncompressed file is memory-mapped: read as it is used)."""
    return _read_3d(path)[0].T


def _read_3d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: read_image reads 3D images, got shape {data.shape}")
    return data, img.affine
