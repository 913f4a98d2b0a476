"""DICOM import (lesionlapse import-dicom) on the real Philips DWI series of ../shared/data."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA
from pipeline import cli
from pipeline.bids import discover
from pipeline.dicom import IDENTIFYING_FIELDS, import_dicom, scrub_sidecar
from pipeline.validate import validate_subject

PHILIPS = SHARED_DATA / "dwi_philips_real"
REF = PHILIPS / "DTI_Biobank_2mm_MB3S2_EPI_701"

needs_data = pytest.mark.skipif(
    not (PHILIPS / "dicom").is_dir(),
    reason=f"real DICOM series not found at {PHILIPS / 'dicom'} (CI puts ../shared beside the repo)",
)


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory) -> Path:
    """Uncompressed copies of the gzipped DICOM files."""
    out = tmp_path_factory.mktemp("dicom")
    for src in sorted((PHILIPS / "dicom").rglob("IM_*")):
        raw = src.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        (out / src.name.removesuffix(".gz")).write_bytes(raw)
    return out


@pytest.fixture(scope="module")
def imported(dicom_dir, tmp_path_factory):
    bids = tmp_path_factory.mktemp("import") / "bids"
    written = import_dicom(dicom_dir, bids, subject="sub-01", session="day0")
    return bids, written


@needs_data
def test_import_matches_reference_conversion(imported):
    bids, written = imported
    dwi = bids / "sub-01/ses-day0/dwi/sub-01_ses-day0_dwi"
    assert {p.name for p in written} == {
        "dataset_description.json", f"{dwi.name}.nii.gz", f"{dwi.name}.json",
        f"{dwi.name}.bval", f"{dwi.name}.bvec"}
    ours, ref = nib.load(f"{dwi}.nii.gz"), nib.load(f"{REF}.nii.gz")
    assert ours.shape == ref.shape == (112, 112, 32, 17)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_allclose(np.loadtxt(f"{dwi}.bval"), np.loadtxt(f"{REF}.bval"))
    np.testing.assert_allclose(np.loadtxt(f"{dwi}.bvec"), np.loadtxt(f"{REF}.bvec"), atol=1e-5)
    desc = json.loads((bids / "dataset_description.json").read_text())
    assert desc["BIDSVersion"] and desc["DatasetType"] == "raw"


@needs_data
def test_sidecar_has_no_identifying_fields(imported):
    bids, _ = imported
    meta = json.loads((bids / "sub-01/ses-day0/dwi/sub-01_ses-day0_dwi.json").read_text())
    assert not IDENTIFYING_FIELDS & set(meta)
    # the reference sidecar (converted without anonymisation) has some of them
    ref = json.loads(Path(f"{REF}.json").read_text())
    assert IDENTIFYING_FIELDS & set(ref)
    assert meta["RepetitionTime"] == pytest.approx(ref["RepetitionTime"])


@needs_data
def test_imported_session_validates_as_dwi_only(imported):
    bids, _ = imported
    (subject,) = discover(bids)
    (ses,) = subject.sessions
    assert ses.flair is None and ses.dwi is not None and ses.bval is not None
    validate_subject(subject)


@needs_data
def test_refuses_to_overwrite(imported, dicom_dir):
    bids, _ = imported
    dwi = bids / "sub-01/ses-day0/dwi/sub-01_ses-day0_dwi.nii.gz"
    before = dwi.stat().st_mtime_ns
    with pytest.raises(OSError, match="refusing to overwrite"):
        import_dicom(dicom_dir, bids, subject="01", session="day0")
    assert dwi.stat().st_mtime_ns == before


@needs_data
def test_cli_import_dicom(dicom_dir, tmp_path, capsys):
    bids = tmp_path / "bids"
    assert cli.main(["import-dicom", str(dicom_dir), str(bids), "--participant-label", "02",
                     "--session-label", "ses-b"]) == 0
    assert "sub-02_ses-b_dwi.nii.gz" in capsys.readouterr().out
    assert cli.main(["import-dicom", str(dicom_dir), str(bids), "--participant-label", "02",
                     "--session-label", "b"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_bad_labels_and_folders(tmp_path):
    with pytest.raises(ValueError, match="invalid sub label"):
        import_dicom(tmp_path, tmp_path / "bids", subject="../x", session="1")
    with pytest.raises(OSError, match="not found"):
        import_dicom(tmp_path / "nope", tmp_path / "bids", subject="01", session="1")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not dicom")
    with pytest.raises(ValueError, match="no FLAIR, DWI, ADC or trace series|dcm2niix failed"):
        import_dicom(empty, tmp_path / "bids", subject="01", session="1")
    assert not (tmp_path / "bids").exists()


def test_scrub_sidecar():
    meta = {"PatientName": "X", "PatientID": "1", "AcquisitionDateTime": "2020", "EchoTime": 0.1,
            "PatientPosition": "HFS"}
    assert scrub_sidecar(meta) == {"EchoTime": 0.1, "PatientPosition": "HFS"}


@needs_data
@pytest.mark.slow
@pytest.mark.realdata
def test_pipeline_runs_on_imported_dwi_only_session(imported, tmp_path):
    bids, _ = imported
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "lesionlapse"), str(bids), str(out), "participant",
         "-w", str(tmp_path / "work"), "--participant-label", "01"],
        capture_output=True, text=True, timeout=900)
    summary = (out / "logs" / "run_summary.tsv").read_text()
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
    sessions = out / "sub-01" / "sub-01_desc-sessions_timeseries.tsv"
    assert sessions.exists()
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
