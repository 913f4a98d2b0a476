"""Bad and unusual inputs (issue 9): each refused before any work with a message naming the file,
what is wrong and what to do, or handled and reported. Tiny synthetic NIfTIs, no registration.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_skeleton

from pipeline import cli
from pipeline.bids import (
    BIDSError,
    SessionInputs,
    SubjectInputs,
    clean_label,
    discover,
    tracking_days,
)
from pipeline.config import ConfigError, load_config
from pipeline.interfaces.session import LoadSession
from pipeline.io import InputError, load_volume, sitk_affine
from pipeline.validate import validate_session, validate_subject
from pipeline.workflows.base import init_subject_wf

CONFIG = load_config()
PARAMS = CONFIG.to_dict()["inputs"]
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
AFFINE[:3, 3] = [-20, -20, -10]
SHAPE = (20, 20, 10)


def _brain(shape=SHAPE):
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return ii**2 + jj**2 + kk**2 < 0.7


def _save(path: Path, data, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


def _flair(path, affine=AFFINE):
    rng = np.random.default_rng(0)
    return _save(path, np.where(_brain(), 100.0, 0.0) + rng.normal(0, 1, SHAPE), affine)


def _adc_um2(shape=SHAPE):
    return np.where(_brain(shape), 800.0, 0.0)


def _dwi(folder: Path, name="sub-01_ses-1_dwi", bvals=(0, 1000, 1000, 1000), affine=AFFINE):
    adc = _adc_um2()
    s0 = np.where(_brain(), 1000.0, 0.0)
    vols = np.stack([s0 * np.exp(-b * adc * 1e-6) for b in bvals], axis=-1)
    dwi = _save(folder / f"{name}.nii.gz", vols, affine)
    (folder / f"{name}.bval").write_text(" ".join(str(b) for b in bvals) + "\n")
    vec = np.zeros((3, len(bvals)))
    vec[0, 1:] = 1
    (folder / f"{name}.bvec").write_text("\n".join(" ".join(map(str, r)) for r in vec) + "\n")
    return dwi, folder / f"{name}.bval", folder / f"{name}.bvec"


def _session(**files) -> SessionInputs:
    return SessionInputs(subject="01", session="1", day=0.0, **files)


def _check(ses, match, **kw):
    with pytest.raises(InputError, match=match) as err:
        validate_session(ses, PARAMS, **kw)
    return str(err.value)


# --------------------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path):
    msg = _check(_session(flair=tmp_path / "nope_FLAIR.nii.gz"), "file not found")
    assert "nope_FLAIR.nii.gz" in msg and "Check the path" in msg


def test_empty_file(tmp_path):
    path = tmp_path / "x_FLAIR.nii.gz"
    path.write_bytes(b"")
    assert "Copy or export it again" in _check(_session(flair=path), "empty")


def test_truncated_gzip(tmp_path):
    path = _flair(tmp_path / "x_FLAIR.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert str(path) in _check(_session(flair=path), "truncated or corrupt")


def test_gzip_checked_once_while_unchanged(tmp_path, monkeypatch):
    # validation and loading open an input several times: its gzip stream is decompressed to
    # check it only once while the file is unchanged, and again once it was replaced
    import pipeline.io as io

    path = _flair(tmp_path / "x_FLAIR.nii.gz")
    opened = []
    real_open = io.gzip.open
    monkeypatch.setattr(io.gzip, "open",
                        lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    validate_session(_session(flair=path), PARAMS)
    validate_session(_session(flair=path), PARAMS)
    assert opened == [path]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert str(path) in _check(_session(flair=path), "truncated or corrupt")


def test_truncated_uncompressed_nifti(tmp_path):
    path = _flair(tmp_path / "x_FLAIR.nii")
    path.write_bytes(path.read_bytes()[:2000])
    _check(_session(flair=path), "truncated|cannot be read|not a readable")


def test_corrupt_gzip(tmp_path):
    path = _flair(tmp_path / "x_FLAIR.nii.gz")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
    _check(_session(flair=path), "truncated or corrupt")


@pytest.mark.parametrize("content", [b"hello, not an image\n" * 40, bytes(range(256)) * 4])
def test_not_a_nifti(tmp_path, content):
    path = tmp_path / "x_FLAIR.nii.gz"
    path.write_bytes(gzip.compress(content))
    assert "Convert it to NIfTI" in _check(_session(flair=path), "not a (readable )?NIfTI")


def test_2d_image(tmp_path):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.ones((20, 20)), np.eye(4))
    assert "single slice" in _check(_session(flair=path), "expected a 3D volume")


def test_single_slice_3d(tmp_path):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.ones((20, 20, 1)), np.eye(4))
    _check(_session(flair=path), "at least 2 voxels")


def test_4d_flair(tmp_path):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.ones(SHAPE + (3,)))
    assert "split the 4D file" in _check(_session(flair=path), "FLAIR image has shape")


def test_4d_flair_with_one_volume_is_accepted(tmp_path):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.where(_brain(), 100.0, 0)[..., None])
    assert validate_session(_session(flair=path), PARAMS) == []


def test_3d_dwi_refused(tmp_path):
    dwi = _save(tmp_path / "x_dwi.nii.gz", _adc_um2())
    (tmp_path / "x_dwi.bval").write_text("0\n")
    (tmp_path / "x_dwi.bvec").write_text("0\n0\n0\n")
    _check(_session(dwi=dwi, bval=tmp_path / "x_dwi.bval", bvec=tmp_path / "x_dwi.bvec"),
           "must be 4D")


# --------------------------------------------------------------------------- DWI and b-values


def test_dwi_without_bval_bvec_found_by_discovery(tmp_path):
    root = tmp_path / "bids"
    (root / "sub-01/ses-day0/dwi").mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    _dwi(root / "sub-01/ses-day0/dwi", "sub-01_ses-day0_dwi")
    (root / "sub-01/ses-day0/dwi/sub-01_ses-day0_dwi.bvec").unlink()
    (subject,) = discover(root)
    with pytest.raises(InputError, match=r"no \.bvec file beside it") as err:
        validate_subject(subject)
    assert "sub-01_ses-day0_dwi.nii.gz" in str(err.value) and "dcm2niix" in str(err.value)


def test_bval_count_mismatch(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    bval.write_text("0 1000 1000\n")
    msg = _check(_session(dwi=dwi, bval=bval, bvec=bvec), "4 volumes but 3 b-values")
    assert "written with this exact image" in msg


def test_bvec_count_mismatch(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    bvec.write_text("1 0\n0 1\n0 0\n")
    _check(_session(dwi=dwi, bval=bval, bvec=bvec), "2 b-vectors")


def test_unreadable_bval(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    bval.write_text("zero thousand\n")
    _check(_session(dwi=dwi, bval=bval, bvec=bvec), "cannot read numbers")


def test_dwi_without_b0(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path, bvals=(1000, 1000, 1000))
    msg = _check(_session(dwi=dwi, bval=bval, bvec=bvec), "no b0 volume")
    assert "b0_threshold_s_mm2" in msg


def test_dwi_without_diffusion_weighting(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path, bvals=(0, 0, 5))
    _check(_session(dwi=dwi, bval=bval, bvec=bvec), "no diffusion-weighted volume")


# --------------------------------------------------------------------------- voxel values


def test_nan_in_background_zeroed_and_reported(tmp_path):
    data = np.where(_brain(), 100.0, 0.0)
    data[0, 0, :] = np.nan
    data[-1, :, 0] = np.inf
    path = _save(tmp_path / "x_FLAIR.nii.gz", data)
    warnings = validate_session(_session(flair=path), PARAMS)
    assert any("NaN/Inf voxels in the background set to 0" in w for w in warnings)
    img = load_volume(path, kind="FLAIR")
    assert np.isfinite(sitk.GetArrayViewFromImage(img.image)).all()


def test_nan_in_brain_refused(tmp_path):
    data = np.where(_brain(), 100.0, 0.0)
    data[9:12, 9:12, 4:6] = np.nan
    path = _save(tmp_path / "x_FLAIR.nii.gz", data)
    msg = _check(_session(flair=path), "NaN/Inf voxels inside the head")
    assert "18" in msg and "export the series again" in msg


def test_nan_in_brain_of_dwi_volume_refused(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    img = nib.load(str(dwi))
    data = np.asarray(img.dataobj).copy()
    data[10, 10, 5, 2] = np.nan
    _save(dwi, data)
    _check(_session(dwi=dwi, bval=bval, bvec=bvec), "inside the head")


@pytest.mark.parametrize("value", [0.0, np.nan])
def test_all_zero_image(tmp_path, value):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.full(SHAPE, value))
    _check(_session(flair=path), "all zeros")


# --------------------------------------------------------------------------- ADC maps


def _trace_adc(folder: Path, adc_values) -> dict:
    adc = _save(folder / "x_ADC.nii.gz", adc_values)
    trace = _save(folder / "x_trace.nii.gz", np.where(_brain(), 450.0, 0.0))
    return {"adc": adc, "trace": trace}


@pytest.mark.parametrize("unit,factor", [("mm2_s", 1e-6), ("1e-3mm2_s", 1e-3), ("um2_s", 1.0)])
def test_adc_units_detected(tmp_path, unit, factor):
    files = _trace_adc(tmp_path, _adc_um2() * factor)
    validate_session(_session(**files), PARAMS)
    res = LoadSession(params=PARAMS, **{k: str(v) for k, v in files.items()}).run(
        cwd=str(tmp_path))
    report = json.loads(Path(res.outputs.report).read_text())
    assert report["adc_unit"] == unit and "detected" in report["adc_unit_detection"]
    adc = sitk.GetArrayFromImage(sitk.ReadImage(res.outputs.adc))
    assert np.nanmax(adc) == pytest.approx(800.0, rel=1e-4)


def test_adc_ambiguous_unit_names_the_override(tmp_path):
    files = _trace_adc(tmp_path, _adc_um2() * 0.05)  # median 40: no unit is plausible
    msg = _check(_session(**files), "cannot detect the ADC unit")
    assert "inputs.adc_unit" in msg and "x_ADC.nii.gz" in msg
    # with the override set, the same file is accepted
    params = CONFIG.replace("inputs", adc_unit="um2_s").to_dict()["inputs"]
    validate_session(_session(**files), params)


def test_adc_few_negative_values_clipped_and_reported(tmp_path):
    values = _adc_um2()
    values[_brain() & (np.arange(SHAPE[0])[:, None, None] == 10)] = -5.0
    files = _trace_adc(tmp_path, values)
    warnings = validate_session(_session(**files), PARAMS)
    assert any("negative ADC voxels will be set to 0" in w for w in warnings)


def test_adc_mostly_negative_refused(tmp_path):
    files = _trace_adc(tmp_path, -_adc_um2())
    msg = _check(_session(**files), "non-zero ADC values are negative")
    assert "scl_slope" in msg


def test_adc_grid_differs_from_dwi(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    adc = _save(tmp_path / "x_ADC.nii.gz", _adc_um2((10, 10, 10)))
    _check(_session(dwi=dwi, bval=bval, bvec=bvec, adc=adc), "grid .* differs from the DWI grid")


def test_adc_without_trace_refused(tmp_path):
    adc = _save(tmp_path / "x_ADC.nii.gz", _adc_um2())
    msg = _check(_session(adc=adc, flair=_flair(tmp_path / "x_FLAIR.nii.gz")),
                 "ADC map without a trace")
    assert "FLAIR-only" in msg


def test_trace_without_adc_refused(tmp_path):
    trace = _save(tmp_path / "x_trace.nii.gz", np.where(_brain(), 450.0, 0.0))
    _check(_session(trace=trace), "trace image without its ADC")


def test_session_without_images_refused():
    with pytest.raises(InputError, match="no FLAIR .* DWI"):
        validate_session(_session(), PARAMS)


# --------------------------------------------------------------------------- geometry


def test_qform_sform_disagree_uses_sform(tmp_path):
    data = np.where(_brain(), 100.0, 0.0).astype(np.float32)
    img = nib.Nifti1Image(data, AFFINE)
    q = AFFINE.copy()
    q[:3, 3] += [7, 0, 0]
    img.set_qform(q, code=1)
    img.set_sform(AFFINE, code=2)
    path = tmp_path / "x_FLAIR.nii.gz"
    nib.save(img, str(path))
    warnings = validate_session(_session(flair=path), PARAMS)
    assert any("qform and sform disagree" in w and "the sform is used" in w for w in warnings)
    loaded = load_volume(path, kind="FLAIR")
    assert loaded.affine_source == "sform"
    np.testing.assert_allclose(sitk_affine(loaded.image), AFFINE, atol=1e-5)


def test_no_transform_in_header_reported(tmp_path):
    img = nib.Nifti1Image(np.where(_brain(), 100.0, 0.0).astype(np.float32), None)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = tmp_path / "x_FLAIR.nii.gz"
    nib.save(img, str(path))
    warnings = validate_session(_session(flair=path), PARAMS)
    assert any("neither sform nor qform" in w for w in warnings)


def _rotation(deg_x, deg_z):
    ax, az = np.radians(deg_x), np.radians(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def test_oblique_affine_kept(tmp_path):
    affine = AFFINE.copy()
    affine[:3, :3] = _rotation(17, -11) @ AFFINE[:3, :3]
    path = _flair(tmp_path / "x_FLAIR.nii.gz", affine)
    assert validate_session(_session(flair=path), PARAMS) == []
    loaded = load_volume(path, kind="FLAIR")
    np.testing.assert_allclose(sitk_affine(loaded.image), affine, atol=1e-5)


def _reorient(data, affine, flips):
    """The same image stored with other axis directions (e.g. RAS -> LAS, LPS)."""
    data, affine = data.copy(), affine.copy()
    for ax in flips:
        n = data.shape[ax]
        data = np.flip(data, axis=ax)
        flip = np.eye(4)
        flip[ax, ax], flip[ax, 3] = -1, n - 1
        affine = affine @ flip
    return data, affine


@pytest.mark.parametrize("flips,code", [((0,), "LAS"), ((0, 1), "LPS"), ((2,), "RAI")])
def test_orientations_give_same_volumes(tmp_path, flips, code):
    rng = np.random.default_rng(3)
    data = np.where(_brain(), 100.0, 0.0) + rng.normal(0, 1, SHAPE)
    data[3:7, 5:9, 2:4] += 50  # an asymmetric "lesion" so flips would show
    ras = load_volume(_save(tmp_path / "ras_FLAIR.nii.gz", data), kind="FLAIR").image
    other_data, other_aff = _reorient(data, AFFINE, flips)
    assert "".join(nib.aff2axcodes(other_aff)) == code
    other = load_volume(_save(tmp_path / "o_FLAIR.nii.gz", other_data, other_aff),
                        kind="FLAIR").image
    resampled = sitk.Resample(other, ras, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(ras))
    voxel_ml = np.prod(ras.GetSpacing()) / 1000
    vol = lambda img: (sitk.GetArrayViewFromImage(img) > 120).sum() * voxel_ml
    assert vol(other) == vol(ras) > 0


def test_flair_and_dwi_do_not_overlap(tmp_path):
    far = AFFINE.copy()
    far[:3, 3] += [400, 0, 0]
    flair = _flair(tmp_path / "x_FLAIR.nii.gz")
    dwi, bval, bvec = _dwi(tmp_path, affine=far)
    msg = _check(_session(flair=flair, dwi=dwi, bval=bval, bvec=bvec), "do not overlap in space")
    assert "x_FLAIR.nii.gz" in msg and "re-export" in msg


def test_flair_and_dwi_partly_overlapping_accepted(tmp_path):
    shifted = AFFINE.copy()
    shifted[:3, 3] += [10, 0, 0]
    dwi, bval, bvec = _dwi(tmp_path, affine=shifted)
    validate_session(_session(flair=_flair(tmp_path / "x_FLAIR.nii.gz"), dwi=dwi, bval=bval,
                              bvec=bvec), PARAMS)


def test_skull_stripped_flair_with_nan_background(tmp_path):
    data = np.where(_brain(), 100.0, np.nan)
    path = _save(tmp_path / "x_FLAIR.nii.gz", data)
    warnings = validate_session(_session(flair=path), PARAMS)
    assert any("background set to 0" in w for w in warnings)


def test_skull_stripped_flair_with_zero_background(tmp_path):
    path = _save(tmp_path / "x_FLAIR.nii.gz", np.where(_brain(), 100.0, 0.0))
    assert validate_session(_session(flair=path), PARAMS) == []


# --------------------------------------------------------------------------- partial sessions


def test_flair_only_session_loads_with_placeholders(tmp_path):
    flair = _flair(tmp_path / "x_FLAIR.nii.gz")
    validate_session(_session(flair=flair), PARAMS)
    res = LoadSession(params=PARAMS, flair=str(flair)).run(cwd=str(tmp_path))
    out = res.outputs
    assert out.has_flair and not out.has_dwi
    assert json.loads(Path(out.report).read_text())["missing"] == ["DWI"]
    for name in ("b0", "trace", "adc"):
        # read with nibabel: ITK's NIfTI reader turns NaN into 0
        img = nib.load(getattr(out, name))
        assert np.isnan(np.asarray(img.dataobj)).all()
        assert img.shape == nib.load(out.flair).shape
    assert sitk.ReadTransform(out.identity_xfm).GetParameters() == (0.0,) * 6


def test_dwi_only_session_loads_with_placeholders(tmp_path):
    dwi, bval, bvec = _dwi(tmp_path)
    res = LoadSession(params=PARAMS, dwi=str(dwi), bval=str(bval), bvec=str(bvec)).run(
        cwd=str(tmp_path))
    out = res.outputs
    assert out.has_dwi and not out.has_flair
    assert json.loads(Path(out.report).read_text())["missing"] == ["FLAIR"]
    assert np.isnan(np.asarray(nib.load(out.flair).dataobj)).all()
    adc = sitk.GetArrayFromImage(sitk.ReadImage(out.adc))
    assert np.nanmedian(adc[_brain().T]) == pytest.approx(800, rel=1e-3)


def test_trace_and_adc_without_4d_dwi(tmp_path):
    files = _trace_adc(tmp_path, _adc_um2())
    validate_session(_session(**files), PARAMS)
    res = LoadSession(params=PARAMS, **{k: str(v) for k, v in files.items()}).run(
        cwd=str(tmp_path))
    report = json.loads(Path(res.outputs.report).read_text())
    assert report["b0_source"] == "reconstructed from trace and ADC"
    assert report["missing"] == ["FLAIR"] and report["adc_source"] == "scanner"


def _graph_names(wf):
    return {node.fullname.split(".", 1)[1] for node in wf._create_flat_graph().nodes}


@pytest.mark.parametrize("files,absent,present", [
    (("anat/{p}_FLAIR.nii.gz",), "prep_dwi", "prep_flair"),
    (("dwi/{p}_dwi.nii.gz", "dwi/{p}_dwi.bval", "dwi/{p}_dwi.bvec"), "prep_flair", "prep_dwi"),
])
def test_partial_sessions_build_a_complete_workflow(tmp_path, files, absent, present):
    root = make_skeleton(tmp_path / "bids", sessions=["day0", "day3"])
    # the second session keeps only some of its files
    for path in (root / "sub-01" / "ses-day3").rglob("*"):
        rel = str(path.relative_to(root / "sub-01" / "ses-day3")).replace(
            "sub-01_ses-day3", "{p}")
        if path.is_file() and rel not in files:
            path.unlink()
    (subject,) = discover(root)
    wf = init_subject_wf(subject=subject, config=CONFIG, staging_dir=tmp_path / "stage")
    names = _graph_names(wf)
    assert f"ses_day3_wf.{absent}" not in names and f"ses_day3_wf.{present}" in names
    assert "ses_day3_wf.dwi_to_flair" not in names and "ses_day0_wf.dwi_to_flair" in names
    seg = wf.get_node("segment")
    assert type(seg.interface).__name__ == "SegmentSessions"
    assert seg.inputs.has_flair == [True, absent != "prep_flair"]
    assert seg.inputs.has_dwi == [True, absent != "prep_dwi"]


def test_single_session_subject_builds(tmp_path):
    (subject,) = discover(make_skeleton(tmp_path / "bids", sessions=["day0"]))
    wf = init_subject_wf(subject=subject, config=CONFIG, staging_dir=tmp_path / "stage")
    assert wf.get_node("track").inputs.days == [0.0]
    assert type(wf.get_node("segment").interface).__name__ == "SegmentSessions"


# --------------------------------------------------------------------------- days and labels


def test_two_sessions_on_the_same_day(tmp_path):
    root = make_skeleton(tmp_path / "bids", sessions=["am", "pm"],
                         acq_times=["2024-03-01T09:00:00", "2024-03-01T09:00:00"])
    (subject,) = discover(root)
    assert [s.day for s in subject.sessions] == [0.0, 0.0]
    wf = init_subject_wf(subject=subject, config=CONFIG, staging_dir=tmp_path / "stage")
    assert wf.get_node("track").inputs.days == [0.0, 0.001]
    assert wf.get_node("write_derivatives").inputs.days == [0.0, 0.001]
    assert tracking_days([0, 0, 0, 5]) == [0.0, 0.001, 0.002, 5.0]
    assert tracking_days([0, 3, 8]) == [0.0, 3.0, 8.0]


def test_same_day_sessions_warned_in_validation(tmp_path):
    flair = _flair(tmp_path / "x_FLAIR.nii.gz")
    sessions = tuple(SessionInputs("01", lab, 0.0, flair=flair) for lab in ("a", "b"))
    warnings = validate_subject(SubjectInputs("01", sessions))
    assert any("same day" in w and "0.001 day" in w for w in warnings)


def test_session_labels_sorting_differently_from_dates(tmp_path):
    root = make_skeleton(tmp_path / "bids", sessions=["b", "a", "c"],
                         acq_times=["2024-01-01T10:00:00", "2024-01-09T10:00:00",
                                    "2024-01-04T10:00:00"])
    (subject,) = discover(root)
    assert [s.session for s in subject.sessions] == ["b", "c", "a"]
    assert [s.day for s in subject.sessions] == [0.0, 3.0, 8.0]
    wf = init_subject_wf(subject=subject, config=CONFIG, staging_dir=tmp_path / "stage")
    assert wf.get_node("track").inputs.labels == ["b", "c", "a"]


# --------------------------------------------------------------------------- CLI-level refusals


@pytest.mark.parametrize("label", ["../x", "sub-01/..", "01/../../etc", "sub-"])
def test_unsafe_participant_label(tmp_path, label, capsys):
    root = make_skeleton(tmp_path / "bids")
    out = tmp_path / "deep" / "out"
    before = sorted(p for p in tmp_path.rglob("*"))
    status = cli.main([str(root), str(out), "participant", "--participant-label", label])
    assert status != 0
    assert "invalid sub label" in capsys.readouterr().err
    # only OUTPUT_DIR itself (and its parent folders) may have been created
    created = set(tmp_path.rglob("*")) - set(before)
    assert created <= {out, out.parent}
    with pytest.raises(BIDSError):
        clean_label(label, "sub")


def test_output_inside_bids_refused(tmp_path, capsys):
    root = make_skeleton(tmp_path / "bids")
    assert cli.main([str(root), str(root / "out"), "participant"]) == 2
    assert "inside the input dataset" in capsys.readouterr().err
    assert not (root / "out").exists()


def test_output_under_derivatives_allowed(tmp_path):
    root = make_skeleton(tmp_path / "bids")
    cli._check_paths(root, root / "derivatives" / "lesionlapse")
    assert (root / "derivatives" / "lesionlapse").is_dir()


def test_unwritable_output_dir(tmp_path, capsys):
    root = make_skeleton(tmp_path / "bids")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main([str(root), str(blocker / "out"), "participant"]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_config_with_unknown_key(tmp_path, capsys):
    root = make_skeleton(tmp_path / "bids")
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[inputs]\nadc_units = 'auto'\n")
    with pytest.raises(ConfigError, match="adc_units"):
        load_config(cfg)
    assert cli.main([str(root), str(tmp_path / "out"), "participant", "--config", str(cfg)]) == 2
    assert "adc_units" in capsys.readouterr().err


# --------------------------------------------------------------------------- whole CLI, no work


def _tiny_bids(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    for ses in ("day0", "day3"):
        _flair(root / f"sub-01/ses-{ses}/anat/sub-01_ses-{ses}_FLAIR.nii.gz")
        _dwi(root / f"sub-01/ses-{ses}/dwi", f"sub-01_ses-{ses}_dwi")
    return root


def _digest(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage,message", [
    ("truncate", "truncated or corrupt"),
    ("nan_brain", "NaN/Inf voxels inside the head"),
    ("bval", "4 volumes but 2 b-values"),
])
def test_cli_refuses_bad_subject_without_outputs(tmp_path, damage, message, capsys):
    root = _tiny_bids(tmp_path / "bids")
    flair = root / "sub-01/ses-day3/anat/sub-01_ses-day3_FLAIR.nii.gz"
    if damage == "truncate":
        flair.write_bytes(flair.read_bytes()[:300])
    elif damage == "nan_brain":
        data = np.asarray(nib.load(str(flair)).dataobj).copy()
        data[9:11, 9:11, 4:6] = np.nan
        _save(flair, data)
    else:
        (root / "sub-01/ses-day3/dwi/sub-01_ses-day3_dwi.bval").write_text("0 1000\n")
    before = _digest(root)
    out = tmp_path / "out"
    status = cli.main([str(root), str(out), "participant", "-w", str(tmp_path / "work")])
    assert status == 1
    rows = (out / "logs" / "run_summary.tsv").read_text().splitlines()
    assert rows[1].split("\t")[1] == "failed" and message in rows[1]
    assert "sub-01_ses-day3" in rows[1]  # the file is named
    assert not (out / "sub-01").exists()
    assert not any(p.name.startswith(".lesionlapse-staging") for p in out.iterdir())
    assert _digest(root) == before  # inputs untouched
    assert message in capsys.readouterr().err


def test_read_image_keeps_nan_where_sitk_reader_does_not(tmp_path):
    from pipeline.io import read_image

    data = np.where(_brain(), 800.0, np.nan).astype(np.float32)
    path = _save(tmp_path / "adc.nii.gz", data)
    ours = sitk.GetArrayFromImage(read_image(path))
    assert np.isnan(ours).sum() == np.isnan(data).sum()
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(sitk_affine(read_image(path)), sitk_affine(itk), atol=1e-5)
    # documents the ITK behaviour that read_image works around (fails once ITK keeps NaN)
    assert not np.isnan(sitk.GetArrayFromImage(itk)).any()
    mask = _save(tmp_path / "mask.nii.gz", _brain().astype(np.uint8))
    nib.load(str(mask)).set_data_dtype(np.uint8)
    assert read_image(mask).GetSize() == SHAPE


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory):
    """Seed-case phantom with day 0 complete, day 3 DWI-only, day 8 FLAIR-only, run once."""
    import shutil
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("partial")
    exe = str(Path(sys.executable).parent / "lesionlapse")
    bids, out = tmp / "bids", tmp / "out"
    subprocess.run([exe, "simulate", str(bids), "--preset", "seed-case", "--grid", "small",
                    "--days", "0", "3", "8"], check=True, capture_output=True, timeout=300)
    sessions = sorted(p for p in (bids / "sub-01").glob("ses-*"))
    shutil.rmtree(sessions[1] / "anat")
    shutil.rmtree(sessions[2] / "dwi")
    proc = subprocess.run([exe, str(bids), str(out), "participant", "-w", str(tmp / "w"),
                           "--nprocs", "2"], capture_output=True, text=True, timeout=1500,
                          check=False)
    return proc, out


def _partial_table(out):
    import pandas as pd

    return pd.read_csv(out / "sub-01" / "sub-01_desc-sessions_timeseries.tsv", sep="\t",
                       na_values="n/a")


@pytest.mark.slow
def test_partial_sessions_end_to_end(partial_run):
    """A partial subject runs and is quantified; a missing contrast is n/a, never 0."""
    proc, out = partial_run
    assert proc.returncode == 0, (out / "logs" / "run_summary.tsv").read_text()
    table = _partial_table(out)
    assert len(table) == 3
    assert np.isnan(table["adc_nawm_um2_s"].iloc[2])  # FLAIR-only: no ADC reference
    assert np.isnan(table["restricted_volume_ml"].iloc[2])
    assert np.isnan(table["flair_volume_ml"].iloc[1])  # DWI-only: FLAIR not observed (n/a, not 0)
    # shine-through is looked for inside the FLAIR lesions: not observed without a FLAIR
    assert np.isnan(table["shine_through_volume_ml"].iloc[1])
    assert np.isfinite(table["shine_through_volume_ml"].iloc[0])
    assert table["restricted_volume_ml"].iloc[[0, 1]].gt(5).all()  # truth ~30 and ~55 mL
    assert np.isfinite(table["adc_nawm_um2_s"].iloc[[0, 1]]).all()


# Without its day-45 session the seed case's FLAIR lesions of days 0-8 peak at z ~ 5.0 (4.96
# and 5.07 measured in two registrations 0.01 mm apart): at flair_z_seed 5 this was a known
# gap (non-strict xfail); at 4.0 (session 7) they are found with a margin of about 1.
@pytest.mark.slow
def test_partial_sessions_find_flair_lesions(partial_run):
    proc, out = partial_run
    assert proc.returncode == 0
    assert _partial_table(out)["flair_volume_ml"].iloc[[0, 2]].gt(0).all()


def test_segment_sessions_with_missing_contrasts(tmp_path):
    """SegmentSessions on [complete, FLAIR-only, DWI-only] sessions: the FLAIR lesion is found
    where there is a FLAIR, restricted tissue where there is diffusion, and each missing
    contrast gives empty masks, an all-NaN rADC and a NaN reference."""
    from pipeline.interfaces.segmentation import SegmentSessions

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :48, :48]
    r = np.sqrt(((zz - 20) / 18.0) ** 2 + ((yy - 24) / 22.0) ** 2 + ((xx - 24) / 22.0) ** 2)
    brain = r < 1.0
    lesion = (zz - 20) ** 2 + (yy - 24) ** 2 + (xx - 30) ** 2 < 16
    flair = np.where(brain, 100.0, 0.0) + np.where(lesion, 80.0, 0.0)
    adc = np.where(brain, np.where(lesion, 350.0, 750.0), 0.0)
    b0 = np.where(brain, 100.0, 0.0)
    trace = b0 * np.exp(-1000e-6 * adc)
    nan = np.full(brain.shape, np.nan)

    def image(arr, name, noise=1.0):
        arr = arr + rng.normal(0.0, noise, arr.shape) * brain if noise else arr
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing((2.0, 2.0, 2.0))
        path = str(tmp_path / f"{name}.nii.gz")
        sitk.WriteImage(img, path)
        return path

    files = {key: [] for key in ("flair", "brain_mask", "b0", "trace", "adc")}
    has_flair, has_dwi = [True, True, False], [True, False, True]
    for i in range(3):
        files["flair"].append(image(flair if has_flair[i] else nan, f"flair{i}", has_flair[i]))
        files["brain_mask"].append(image(brain.astype(float), f"mask{i}", 0))
        for key, arr in (("b0", b0), ("trace", trace), ("adc", adc)):
            files[key].append(image(arr if has_dwi[i] else nan, f"{key}{i}", has_dwi[i]))
    cfg = CONFIG.to_dict()
    res = SegmentSessions(**files, has_flair=has_flair, has_dwi=has_dwi, labels=["a", "b", "c"],
                          dwi_inplane_mm=[2.0] * 3,
                          segmentation=cfg["segmentation"], dynamics=cfg["dynamics"]).run(
        cwd=str(tmp_path))
    out = res.outputs

    def arr(path):
        from pipeline.io import read_image  # keeps NaN, unlike ITK's reader

        return sitk.GetArrayFromImage(read_image(path))

    flair_found = [arr(p) > 0 for p in out.flair_lesion]
    restricted = [arr(p) > 0 for p in out.restricted]
    for i in (0, 1):  # FLAIR sessions find the lesion, jointly
        assert (flair_found[i] & lesion).sum() > 0.5 * lesion.sum()
    assert not flair_found[2].any()
    for i in (0, 2):  # diffusion sessions find the restriction with a finite reference
        assert (restricted[i] & lesion).sum() > 0.5 * lesion.sum()
        assert np.isfinite(json.loads(Path(out.references[i]).read_text())["median_um2_s"])
    assert not restricted[1].any() and np.isnan(arr(out.radc[1])).all()
    assert np.isnan(json.loads(Path(out.references[1]).read_text())["median_um2_s"])
