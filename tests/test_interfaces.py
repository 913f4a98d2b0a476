"""Each interface on tiny images: what it writes and what it reports."""

from __future__ import annotations

import functools
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import load_config
from pipeline.core import tracking
from pipeline.interfaces.session import LoadSession
from pipeline.interfaces.tracking import TrackLesions
from pipeline.io import InputError

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
CFG = load_config().to_dict()


def _save(path, data, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return str(path)


def _head(shape=(24, 24, 12)):
    """A bright ellipsoid 'brain' with an ADC of 800 um^2/s and a restricted spot of 400."""
    ii, jj, kk = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    brain = ii**2 + jj**2 + kk**2 < 0.8
    adc = np.where(brain, 800.0, 0.0)
    adc[10:13, 10:13, 5:7] = 400.0
    return brain, adc


@pytest.fixture()
def dwi_session(tmp_path):
    brain, adc = _head()
    s0 = np.where(brain, 1000.0, 0.0)
    b = np.array([0, 1000, 1000, 1000])
    vols = [s0 * np.exp(-bv * adc * 1e-6) for bv in b]
    dwi = _save(tmp_path / "dwi.nii.gz", np.stack(vols, -1).astype(np.float32))
    (tmp_path / "dwi.bval").write_text(" ".join(map(str, b)))
    (tmp_path / "dwi.bvec").write_text("0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    return tmp_path, dwi, brain, adc


def _run(interface, tmp_path):
    result = interface.run(cwd=str(tmp_path))
    return result.outputs


def test_load_session_computes_adc(dwi_session):
    tmp_path, dwi, brain, adc = dwi_session
    out = _run(LoadSession(dwi=dwi, bval=str(tmp_path / "dwi.bval"), bvec=str(tmp_path / "dwi.bvec"),
                           params=CFG["inputs"]), tmp_path)
    computed = sitk.GetArrayFromImage(sitk.ReadImage(out.adc)).T
    np.testing.assert_allclose(computed[brain], adc[brain], rtol=1e-4)
    report = json.loads(open(out.report).read())
    assert report["adc_source"] == "computed" and report["dwi_b_value_s_mm2"] == 1000


@pytest.mark.parametrize(("scale", "unit"), [(1e-6, "mm2_s"), (1e-3, "1e-3mm2_s"), (1.0, "um2_s")])
def test_load_session_scanner_adc_units(dwi_session, scale, unit):
    tmp_path, dwi, brain, adc = dwi_session
    dtype = np.int16 if unit == "um2_s" else np.float32
    scanner = _save(tmp_path / f"adc_{unit}.nii.gz", (adc * scale).astype(dtype))
    out = _run(LoadSession(dwi=dwi, bval=str(tmp_path / "dwi.bval"), bvec=str(tmp_path / "dwi.bvec"),
                           adc=scanner, params=CFG["inputs"]), tmp_path)
    report = json.loads(open(out.report).read())
    assert report["adc_unit"] == unit and report["adc_source"] == "scanner"
    assert abs(report["computed_vs_scanner_adc"]["median_ratio_computed_to_scanner"] - 1) < 1e-3
    loaded = sitk.GetArrayFromImage(sitk.ReadImage(out.adc)).T
    np.testing.assert_allclose(loaded[brain], adc[brain], rtol=1e-4)


def test_load_session_ambiguous_unit_names_override(tmp_path):
    brain, adc = _head()
    weird = _save(tmp_path / "adc.nii.gz", (adc * 1e-2).astype(np.float32))  # 8: no unit fits
    with pytest.raises(ValueError, match="inputs.adc_unit"):
        _run(LoadSession(adc=weird, params=CFG["inputs"]), tmp_path)


def test_load_session_trace_and_adc_reconstructs_b0(tmp_path):
    brain, adc = _head()
    trace = np.where(brain, 1000.0 * np.exp(-1000 * adc * 1e-6), 0).astype(np.float32)
    tr = _save(tmp_path / "trace.nii.gz", trace)
    (tmp_path / "trace.json").write_text('{"DiffusionBValue": 1000}')
    ad = _save(tmp_path / "adc.nii.gz", adc.astype(np.float32))
    out = _run(LoadSession(trace=tr, trace_sidecar=str(tmp_path / "trace.json"), adc=ad,
                           params=CFG["inputs"]), tmp_path)
    b0 = sitk.GetArrayFromImage(sitk.ReadImage(out.b0)).T
    np.testing.assert_allclose(b0[brain], 1000.0, rtol=1e-4)
    assert json.loads(open(out.report).read())["trace_b_value_source"] == "sidecar"


def test_load_session_dwi_without_bval(tmp_path, dwi_session):
    tmp_path, dwi, *_ = dwi_session
    with pytest.raises(InputError, match="bval"):
        _run(LoadSession(dwi=dwi, params=CFG["inputs"]), tmp_path)


def _write_image(folder, name, arr):
    """``arr`` (z, y, x) as a float32 NIfTI with 1 mm voxels at the origin; its path."""
    path = str(folder / f"{name}.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.float32)), path)
    return path


def test_track_lesions_on_the_lesion_box_gives_the_whole_grid_ids(tmp_path):
    """TrackLesions works on the box around the lesions and pads its images back: the dseg
    equals tracking on the whole grid (lesions off the grid's origin, one tying on volume and
    coordinate sum, one touching the grid's edge)."""
    shape = (24, 20, 18)
    put = functools.partial(_write_image, tmp_path)

    masks = [np.zeros(shape, bool) for _ in range(3)]
    for m in masks:
        m[9, 12, 12] = m[9, 9, 15] = True  # tie on volume (1) and coordinate sum (33)
    masks[0][14:17, 5:8, 10:13] = True
    masks[1][14:18, 5:9, 10:14] = True
    masks[2][20:24, 3:6, 15:18] = True  # at the grid's edge
    ref = tmp_path / "ref.json"
    ref.write_text('{"median_um2_s": 800.0, "iqr_um2_s": 50.0, "n_voxels": 100}')
    zeros = np.zeros(shape)
    out = _run(TrackLesions(
        flair_lesion=[put(f"f{i}", m) for i, m in enumerate(masks)],
        restricted=[put(f"r{i}", zeros) for i in range(3)],
        shine_through=[put(f"s{i}", zeros) for i in range(3)],
        adc=[put(f"a{i}", zeros + 800) for i in range(3)],
        radc=[put(f"q{i}", zeros + 1) for i in range(3)], references=[str(ref)] * 3,
        labels=["a", "b", "c"], days=[0.0, 3.0, 8.0], tracking=CFG["tracking"],
        dynamics=CFG["dynamics"],
    ), tmp_path)
    t = CFG["tracking"]
    whole = tracking.track_lesions(
        masks, [0.0, 3.0, 8.0], connectivity=t["connectivity"],
        min_overlap_voxels=t["min_overlap_voxels"],
        shift_tolerance_voxels=t["shift_tolerance_voxels"],
        enlarging_relative=t["enlarging_relative"],
        enlarging_absolute_ml=t["enlarging_absolute_ml"], fragment_ratio=t["fragment_ratio"],
        voxel_volume_ml=0.001)
    for path, expected in zip(out.flair_dseg, whole.dseg):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(path)), expected)


def test_track_lesions_tables(tmp_path):
    """Two sessions: a lesion that grows, a restricted spot that pseudonormalizes."""
    shape = (20, 20, 20)
    put = functools.partial(_write_image, tmp_path)

    flair0 = np.zeros(shape, bool)
    flair0[5:10, 5:10, 5:10] = True
    flair1 = np.zeros(shape, bool)
    flair1[5:12, 5:12, 5:12] = True
    restricted0 = flair0.copy()
    restricted1 = np.zeros(shape, bool)
    radc0 = np.where(restricted0, 0.5, 1.0)
    radc1 = np.ones(shape)
    refs = []
    for i in range(2):
        path = tmp_path / f"ref{i}.json"
        path.write_text('{"median_um2_s": 800.0, "iqr_um2_s": 50.0, "n_voxels": 100}')
        refs.append(str(path))
    out = _run(TrackLesions(
        flair_lesion=[put("f0", flair0), put("f1", flair1)],
        restricted=[put("r0", restricted0), put("r1", restricted1)],
        shine_through=[put("s0", np.zeros(shape)), put("s1", np.zeros(shape))],
        adc=[put("a0", radc0 * 800), put("a1", radc1 * 800)],
        radc=[put("q0", radc0), put("q1", radc1)], references=refs,
        labels=["day0", "day8"], days=[0.0, 8.0], tracking=CFG["tracking"], dynamics=CFG["dynamics"],
    ), tmp_path)
    import pandas as pd

    sessions = pd.read_csv(out.sessions_table, sep="\t")
    assert sessions.flair_volume_ml.tolist() == pytest.approx([0.125, 0.343])
    assert sessions.restricted_volume_ml.tolist() == pytest.approx([0.125, 0.0])
    assert sessions.pseudonormalized_fraction.tolist() == pytest.approx([0.0, 1.0])
    assert sessions.radc_mean_ever_restricted.tolist() == pytest.approx([0.5, 1.0])
    events = pd.read_csv(out.events_table, sep="\t")
    flair_events = events[events.kind == "flair"].event.tolist()
    assert flair_events == ["enlarging"]
    assert "resolved" in events[events.kind == "restricted"].event.tolist()
    summary = pd.read_csv(out.summary_table, sep="\t")
    row = summary[summary.kind == "restricted"].iloc[0]
    # rADC 0.5 at day 0 -> 1.0 at day 8 crosses 0.75 half way: day 4
    assert row.pseudonormalization_day == pytest.approx(4.0)


def test_prepare_image_writes_the_pyramid_of_the_files_it_writes(tmp_path):
    # with the [registration] section, PrepareImage also writes the registration pyramid of
    # its image and mask as the registrations read them (from its files, header geometry):
    # exactly what register_rigid would build of them
    from pipeline.core import registration as core_reg
    from pipeline.interfaces.base import read
    from pipeline.interfaces.preprocess import PrepareImage

    brain, _ = _head((40, 36, 14))
    rng = np.random.default_rng(0)
    # an oblique, off-grid header: float64 geometry would differ from the file's float32
    affine = np.array([[1.9, 0.3, 0.0, -37.123456789], [-0.3, 1.9, 0.1, -41.98765],
                       [0.0, -0.1, 3.1, -20.5555555], [0, 0, 0, 1]])
    flair = _save(tmp_path / "flair.nii.gz",
                  (np.where(brain, 300.0, 20.0) + rng.normal(0, 5, brain.shape)).astype(np.float32),
                  affine)
    params = {**CFG["preprocessing"], "n4_iterations": [5], "brain_mask_erosion_mm": 2.0}
    (tmp_path / "plain").mkdir(), (tmp_path / "with").mkdir()
    without = _run(PrepareImage(in_file=flair, params=params), tmp_path / "plain")
    assert not without.pyramid  # undefined without [registration]
    out = _run(PrepareImage(in_file=flair, params=params, registration=CFG["registration"]),
               tmp_path / "with")
    keys = {k: v for k, v in CFG["registration"].items() if k in core_reg.PYRAMID_PARAMETERS}
    expected = core_reg.registration_pyramid(read(out.out_file), read(out.mask), **keys)
    written = core_reg.load_pyramid(out.pyramid)
    assert written.key == expected.key
    for level, want in zip(written.levels, expected.levels):
        for img, ref in zip(level, want):
            assert img.GetPixelID() == ref.GetPixelID()
            assert (img.GetOrigin(), img.GetSpacing(), img.GetDirection()) == (
                ref.GetOrigin(), ref.GetSpacing(), ref.GetDirection())
            assert np.array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))
