"""DICOM import: one session's DICOM series into a BIDS dataset, with dcm2niix.

``lesionlapse import-dicom DICOM_DIR BIDS_DIR --participant-label L --session-label S``
converts every series in DICOM_DIR with dcm2niix (the PyPI package ships the binary) into a
temporary folder, sorts the results and moves them into ``BIDS_DIR/sub-L/ses-S/``:

* a FLAIR series (``FLAIR`` in the series description / protocol / sequence name) to
  ``anat/sub-L_ses-S_FLAIR.nii.gz``;
* a 4D DWI with its ``.bval``/``.bvec`` to ``dwi/sub-L_ses-S_dwi.*``;
* a scanner ADC map (``ADC`` in the DICOM ImageType or dcm2niix's ``_ADC`` name) to
  ``dwi/sub-L_ses-S_ADC.nii.gz`` and a trace-weighted image (``TRACEW``/``TRACE``) to
  ``dwi/sub-L_ses-S_trace.nii.gz``.

Sidecars are written by dcm2niix in anonymised mode (``-ba y``) and stripped again of every
field that can identify the patient, the site or the date (:data:`IDENTIFYING_FIELDS`).
Existing files are never overwritten; series that fit none of the kinds are listed in the
error only when nothing could be imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.bids import clean_label, strip_ext

#: Sidecar fields removed on import (patient, site, operator, dates/times, unique ids).
IDENTIFYING_FIELDS = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
    "PatientSize", "PatientComments", "AcquisitionDateTime", "AcquisitionDate", "AcquisitionTime",
    "SeriesDate", "SeriesTime", "StudyDate", "StudyTime", "ContentDate", "ContentTime",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "StationName",
    "DeviceSerialNumber", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "StudyID", "StudyDescription",
    "ProcedureStepDescription", "ImageComments", "FrameOfReferenceUID",
})

DATASET_DESCRIPTION = {
    "Name": "lesionlapse DICOM import",
    "BIDSVersion": "1.10.0",
    "DatasetType": "raw",
    "GeneratedBy": [{"Name": "lesionlapse import-dicom", "Description": "dcm2niix conversion"}],
}


def dcm2niix_binary() -> str:
    """Path of the dcm2niix executable (the ``dcm2niix`` PyPI package, else the PATH)."""
    try:
        import dcm2niix

        path = Path(dcm2niix.bin)
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found is None:
        raise OSError("dcm2niix is not installed: pip install dcm2niix (or install it from "
                      "https://github.com/rordenlab/dcm2niix)")
    return found


def _run_dcm2niix(dicom_dir: Path, out_dir: Path) -> str:
    cmd = [dcm2niix_binary(), "-z", "y", "-b", "y", "-ba", "y", "-f", "%s_%p", "-o",
           str(out_dir), str(dicom_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 8):  # 8: some files were not DICOM, the rest converted
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ValueError(f"dcm2niix failed on {dicom_dir} (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _kind(nii: Path, meta: dict) -> str | None:
    """'FLAIR', 'dwi', 'ADC', 'trace' or None (not a series lesionlapse uses)."""
    stem = strip_ext(nii)
    image_type = [str(t).upper() for t in meta.get("ImageType", [])]
    text = " ".join(str(meta.get(k, "")) for k in ("SeriesDescription", "ProtocolName",
                                                    "SequenceName")).upper()
    if "ADC" in image_type or stem.endswith("_ADC") or " ADC" in f" {text}":
        return "ADC"
    if any(t.startswith("TRACE") for t in image_type) or stem.endswith(("_TRACEW", "_trace")):
        return "trace"
    bval = nii.with_name(stem + ".bval")
    if bval.exists() and nii.with_name(stem + ".bvec").exists():
        return "dwi"
    if "FLAIR" in text or "DARK_FLUID" in text or "DARKFLUID" in text:
        return "FLAIR"
    return None


def scrub_sidecar(meta: dict) -> dict:
    """The sidecar without identifying fields (see :data:`IDENTIFYING_FIELDS`)."""
    return {k: v for k, v in meta.items() if k not in IDENTIFYING_FIELDS}


def import_dicom(dicom_dir: Path, bids_dir: Path, *, subject: str, session: str) -> list[Path]:
    """Convert one session's DICOM folder into ``bids_dir/sub-<subject>/ses-<session>``.

    Parameters
    ----------
    dicom_dir
        Folder (searched recursively by dcm2niix) with the session's DICOM files, uncompressed.
    bids_dir
        BIDS dataset; created with a ``dataset_description.json`` when new.
    subject, session
        Labels, with or without ``sub-``/``ses-`` (letters and digits only).

    Returns
    -------
    list of Path
        Every file written.

    Raises
    ------
    ValueError
        Bad labels, nothing importable, two series of one kind, or dcm2niix failing.
    OSError
        DICOM_DIR missing, or a target file already exists.
    """
    sub, ses = clean_label(subject, "sub"), clean_label(session, "ses")
    dicom_dir, bids_dir = Path(dicom_dir), Path(bids_dir)
    if not dicom_dir.is_dir():
        raise OSError(f"DICOM folder {dicom_dir} not found")
    if bids_dir.exists() and not bids_dir.is_dir():
        raise OSError(f"{bids_dir} exists and is not a folder")
    prefix = f"sub-{sub}_ses-{ses}"
    ses_dir = bids_dir / f"sub-{sub}" / f"ses-{ses}"
    with tempfile.TemporaryDirectory(prefix="lesionlapse-dcm2niix-") as tmp:
        log = _run_dcm2niix(dicom_dir, Path(tmp))
        found: dict[str, Path] = {}
        skipped: list[str] = []
        for nii in sorted(Path(tmp).glob("*.nii*")):
            meta_path = nii.with_name(strip_ext(nii) + ".json")
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
            kind = _kind(nii, meta)
            if kind is None:
                skipped.append(nii.name)
                continue
            if kind in found:
                raise ValueError(
                    f"{dicom_dir} holds more than one {kind} series ({found[kind].name}, "
                    f"{nii.name}); put one session's series of each kind in the folder"
                )
            found[kind] = nii
        if not found:
            converted = ", ".join(skipped) or "nothing"
            raise ValueError(
                f"no FLAIR, DWI, ADC or trace series found in {dicom_dir} (dcm2niix converted: "
                f"{converted}). FLAIR is recognised by 'FLAIR' in the series description, DWI "
                f"by its b-values, ADC/trace by the DICOM ImageType.\n{log[-500:]}"
            )
        plan: list[tuple[Path, Path]] = []
        for kind, nii in found.items():
            datatype = "anat" if kind == "FLAIR" else "dwi"
            stem = ses_dir / datatype / f"{prefix}_{kind}"
            plan.append((nii, stem.with_name(stem.name + ".nii.gz")))
            exts = [".json"] + ([".bval", ".bvec"] if kind == "dwi" else [])
            for ext in exts:
                src = nii.with_name(strip_ext(nii) + ext)
                if src.exists():
                    plan.append((src, stem.with_name(stem.name + ext)))
        existing = [str(dst) for _, dst in plan if dst.exists()]
        if existing:
            raise OSError(f"refusing to overwrite existing files: {', '.join(existing)}; "
                          "choose another session label or remove them first")
        written: list[Path] = []
        description = bids_dir / "dataset_description.json"
        if not description.exists():
            bids_dir.mkdir(parents=True, exist_ok=True)
            description.write_text(json.dumps(DATASET_DESCRIPTION, indent=2) + "\n")
            written.append(description)
        for src, dst in plan:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix == ".json":
                meta = scrub_sidecar(json.loads(src.read_text()))
                dst.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(src, dst)
            written.append(dst)
    return written
