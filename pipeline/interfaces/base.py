"""Shared helpers of the Nipype interfaces: output paths in the node's cwd and JSON files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io import read_image, write_array, write_image


def out_path(runtime, name: str) -> str:
    """Absolute path of an output file in the node's working directory."""
    return str(Path(runtime.cwd) / name)


def save(img: sitk.Image, runtime, name: str, dtype=np.float32) -> str:
    """Write a SimpleITK image into the node's working directory, uncompressed.

    ``name`` may end in ``.nii.gz``; the file written is plain ``.nii`` all the same. Work-dir
    images are written once and read by two to four later nodes, and gzip costs about 0.5 s of
    CPU per clinical float volume to write and 0.2 s to read (benchmarks/end_to_end.py);
    :class:`pipeline.interfaces.outputs.WriteDerivatives` compresses each derivative once.
    """
    if name.endswith(".nii.gz"):
        name = name[: -len(".gz")]
    return str(write_image(img, Path(out_path(runtime, name)), dtype=dtype))


def save_array(arr: np.ndarray, reference: sitk.Image, runtime, name: str,
               dtype=np.float32) -> str:
    """:func:`save` of a (z, y, x) array on the grid of ``reference``: the same file, without
    copying the array into SimpleITK (:func:`pipeline.io.write_array`)."""
    if name.endswith(".nii.gz"):
        name = name[: -len(".gz")]
    return str(write_array(arr, reference, Path(out_path(runtime, name)), dtype))


def session_flags(value, n: int, name: str) -> list[bool]:
    """A per-session flag input (``has_flair``, ``has_dwi``): all True when not given."""
    flags = list(value) if value else [True] * n  # undefined traits are falsy
    if len(flags) != n:
        raise ValueError(f"{name}: {len(flags)} entries for {n} sessions")
    return flags


def save_json(data, runtime, name: str) -> str:
    path = out_path(runtime, name)
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable))
    return path


def load_json(path: str):
    return json.loads(Path(path).read_text())


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read(path: str) -> sitk.Image:
    """Read an image written by this pipeline, keeping NaN voxels (see io.read_image)."""
    return read_image(path)


def array(img: sitk.Image) -> np.ndarray:
    """Voxel array of a SimpleITK image (z, y, x order), a copy."""
    return sitk.GetArrayFromImage(img)


def like(arr: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """SimpleITK image from a (z, y, x) array with the geometry of ``reference``."""
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(reference)
    return img


def spacing_zyx(img: sitk.Image) -> tuple[float, float, float]:
    """Voxel spacing in the axis order of :func:`array` (mm)."""
    return tuple(float(s) for s in reversed(img.GetSpacing()))
