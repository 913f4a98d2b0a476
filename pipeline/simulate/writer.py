"""Deterministic, atomic writers for NIfTI, TSV, JSON and ITK transform files."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk


def _atomic_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def write_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, *, slope: float | None = None
) -> None:
    """Write a .nii.gz byte-identically for identical input (gzip mtime 0, fixed header).

    ``slope``: store ``data`` (already integer-scaled) with this scl_slope.
    """
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, float))
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    if slope is not None:
        hdr.set_slope_inter(slope, 0.0)
    raw = img.to_bytes()
    _atomic_bytes(Path(path), gzip.compress(raw, compresslevel=6, mtime=0))


def write_json(path: Path, obj: dict) -> None:
    _atomic_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_tsv(path: Path, table: pd.DataFrame) -> None:
    """TSV with 'n/a' for missing values and floats to 6 significant digits."""
    text = table.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g",
                        lineterminator="\n")
    _atomic_bytes(Path(path), text.encode())


def write_text(path: Path, text: str) -> None:
    _atomic_bytes(Path(path), text.encode())


def write_transform(path: Path, transform: sitk.Transform) -> None:
    """ITK text transform file (via a temp file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp-" + path.name)
    sitk.WriteTransform(transform, str(tmp))
    os.replace(tmp, path)
