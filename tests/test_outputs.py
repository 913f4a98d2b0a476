"""The diffusion voxel-class image (``desc-diffusionclass_dseg``): core rule, interface, and the
derivative the participant level writes (sidecar, look-up table, values on the written rADC)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from pipeline.config import load_config
from pipeline.core import dynamics
from pipeline.interfaces.tracking import TrackLesions

CFG = load_config().to_dict()
CUT = dict(restricted_below=0.75, elevated_above=1.15)


def test_voxel_classes_follow_radc_inside_tissue_only():
    radc = np.array([[[0.5, 0.9, 1.3, np.nan, 0.5, 0.9]]], np.float32)
    tissue = np.array([[[1, 1, 1, 1, 0, 1]]], bool)
    shine = np.array([[[0, 0, 0, 0, 0, 1]]], bool)
    classes = dynamics.voxel_class_image(radc, tissue, shine, **CUT)
    assert classes.dtype == np.uint8
    assert classes.ravel().tolist() == [1, 2, 3, 0, 0, 4]


def test_voxel_classes_give_the_pseudonormalized_fraction():
    """Within the ever-restricted tissue, classes 2, 3 and 4 are the pseudonormalized voxels."""
    rng = np.random.default_rng(0)
    radc = rng.uniform(0.4, 1.4, (8, 9, 10)).astype(np.float32)
    ever = rng.random(radc.shape) < 0.4
    shine = (rng.random(radc.shape) < 0.2) & (radc >= CUT["restricted_below"])
    classes = dynamics.voxel_class_image(radc, ever, shine, **CUT)
    fraction = dynamics.pseudonormalized_fraction(ever, radc, CUT["restricted_below"])
    assert np.isin(classes[ever], (2, 3, 4)).mean() == pytest.approx(fraction)
    assert (classes[~ever & ~shine] == 0).all()


def _image(tmp_path, name, arr):
    img = sitk.GetImageFromArray(np.asarray(arr, np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    path = str(tmp_path / f"{name}.nii.gz")
    sitk.WriteImage(img, path)
    return path


def test_track_lesions_writes_voxel_classes_of_lesion_tissue(tmp_path):
    """Day 0: a restricted cube inside a FLAIR lesion; day 8: the cube has pseudonormalized
    (still lesion tissue: ever restricted), part of it DWI bright (shine-through)."""
    shape = (12, 12, 12)
    flair = np.zeros(shape, bool)
    flair[2:8, 2:8, 2:8] = True
    restricted0 = np.zeros(shape, bool)
    restricted0[3:6, 3:6, 3:6] = True
    radc0 = np.where(restricted0, 0.5, np.where(flair, 1.3, 1.0))
    radc1 = np.where(restricted0, 0.9, 1.0)
    radc1[10, 10, 10] = 0.5  # low outside any lesion tissue: not classified
    shine1 = np.zeros(shape, bool)
    shine1[3, 3:6, 3:6] = True
    refs = []
    for i in range(2):
        refs.append(str(tmp_path / f"ref{i}.json"))
        (tmp_path / f"ref{i}.json").write_text(
            '{"median_um2_s": 800.0, "iqr_um2_s": 50.0, "n_voxels": 100}')
    out = TrackLesions(
        flair_lesion=[_image(tmp_path, "f0", flair), _image(tmp_path, "f1", np.zeros(shape))],
        restricted=[_image(tmp_path, "r0", restricted0), _image(tmp_path, "r1", np.zeros(shape))],
        shine_through=[_image(tmp_path, "s0", np.zeros(shape)), _image(tmp_path, "s1", shine1)],
        adc=[_image(tmp_path, "a0", radc0 * 800), _image(tmp_path, "a1", radc1 * 800)],
        radc=[_image(tmp_path, "q0", radc0), _image(tmp_path, "q1", radc1)], references=refs,
        labels=["day0", "day8"], days=[0.0, 8.0], tracking=CFG["tracking"],
        dynamics=CFG["dynamics"],
    ).run(cwd=str(tmp_path)).outputs
    day0, day8 = (sitk.GetArrayFromImage(sitk.ReadImage(f)) for f in out.diffusion_dseg)
    assert (day0[restricted0] == 1).all() and (day0[flair & ~restricted0] == 3).all()
    assert (day0[~flair] == 0).all()
    assert (day8[shine1] == 4).all() and (day8[restricted0 & ~shine1] == 2).all()
    assert int(np.count_nonzero(day8)) == int(restricted0.sum())  # FLAIR lesion gone at day 8
    sessions = pd.read_csv(out.sessions_table, sep="\t")
    assert sessions.pseudonormalized_fraction.tolist() == pytest.approx(
        [np.isin(d[restricted0], (2, 3, 4)).mean() for d in (day0, day8)])


@pytest.mark.slow
def test_written_voxel_classes_match_the_written_maps(sample_run):
    """Every session of the sample run: the written class image equals the core rule on the
    written rADC, FLAIR lesion, restricted and shine-through masks; sidecar and dseg.tsv
    list the four labels."""
    assert sample_run["status"] == 0
    out = sample_run["out"]
    load = lambda p: np.asarray(nib.load(p).dataobj)  # noqa: E731
    checked = 0
    for sub_dir in sorted(out.glob("sub-*/")):
        ever = None
        for ses_dir in sorted(sub_dir.glob("ses-*")):
            prefix = f"{sub_dir.name}_{ses_dir.name}_space-subject"
            anat, dwi = ses_dir / "anat", ses_dir / "dwi"
            radc = load(dwi / f"{prefix}_desc-relative_ADC.nii.gz").astype(np.float32)
            flair = load(anat / f"{prefix}_label-lesion_desc-flair_mask.nii.gz") > 0
            restricted = load(dwi / f"{prefix}_label-lesion_desc-restricted_mask.nii.gz") > 0
            shine = load(dwi / f"{prefix}_label-shinethrough_desc-dwi_mask.nii.gz") > 0
            ever = restricted if ever is None else ever | restricted
            image = dwi / f"{prefix}_desc-diffusionclass_dseg.nii.gz"
            got = load(image)
            want = dynamics.voxel_class_image(radc, flair | ever, shine, restricted=restricted,
                                              **{k: CFG["dynamics"][k] for k in CUT})
            np.testing.assert_array_equal(got, want)
            assert (got[restricted] == 1).all()
            meta = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
            names = [name for name, _ in dynamics.VOXEL_CLASS_LABELS.values()]
            assert [v.split(":")[0] for v in meta["Labels"].values()] == names
            assert meta["SpatialReference"].endswith("_space-subject_desc-brain_mask.nii.gz")
            lut = pd.read_csv(image.with_name(image.name.replace(".nii.gz", ".tsv")), sep="\t")
            assert lut["index"].tolist() == [1, 2, 3, 4] and lut["name"].tolist() == names
            checked += 1
    assert checked >= 4


def _nifti(tmp_path, data, name):
    """An uncompressed NIfTI work-dir file holding ``data``."""
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("kind", ["mask", "float", "float_nan"])
def test_derivative_gzip_gives_back_the_work_file(tmp_path, kind):
    """The derivative .nii.gz (ISA-L deflate) is an ordinary gzip file: Python's gzip, zlib
    and nibabel all decompress it to the work-dir file's bytes."""
    import gzip
    import zlib

    from pipeline.interfaces import outputs

    rng = np.random.default_rng(0)
    data = {"mask": (rng.random((40, 30, 20)) > 0.9).astype(np.uint8),
            "float": rng.normal(size=(40, 30, 20)).astype(np.float32),
            "float_nan": np.where(rng.random((40, 30, 20)) > 0.5, np.nan, 1.0).astype(np.float32)}[kind]
    src = _nifti(tmp_path, data, f"{kind}.nii")
    dst = tmp_path / "out" / f"{kind}.nii.gz"
    outputs.copy_to_derivative(str(src), dst)
    raw = dst.read_bytes()
    assert raw[:3] == b"\x1f\x8b\x08" and raw[4:8] == bytes(4)  # gzip, deflate, mtime 0
    assert gzip.decompress(raw) == src.read_bytes()
    assert zlib.decompress(raw, 31) == src.read_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(dst).dataobj), data)
    assert len(raw) < len(src.read_bytes()) / (2 if kind != "float" else 1)


def test_derivative_gzip_streams_the_file_in_chunks(tmp_path, monkeypatch):
    """The work file is read chunk by chunk into one buffer: a file of many chunks (and a last
    partial one) gives the bytes of compressing its chunks one after the other, and gunzips
    to the file."""
    import gzip

    from pipeline.interfaces import outputs

    monkeypatch.setattr(outputs, "_GZIP_CHUNK", 4096)
    rng = np.random.default_rng(2)
    src = _nifti(tmp_path, rng.normal(size=(41, 30, 20)).astype(np.float32), "big.nii")
    data = src.read_bytes()
    assert len(data) % 4096 and len(data) > 20 * 4096
    dst = tmp_path / "big.nii.gz"
    outputs.copy_to_derivative(str(src), dst)
    ref = outputs.isal_zlib.compressobj(outputs.ISAL_LEVEL, outputs.isal_zlib.DEFLATED, 31)
    expected = b"".join(ref.compress(data[i:i + 4096]) for i in range(0, len(data), 4096))
    assert dst.read_bytes() == expected + ref.flush()
    assert gzip.decompress(dst.read_bytes()) == data


def test_derivative_gzip_refuses_a_truncated_work_file(tmp_path):
    from pipeline.interfaces import outputs

    src = _nifti(tmp_path, np.zeros((20, 20, 20), np.float32), "short.nii")
    src.write_bytes(src.read_bytes()[:1000])
    with pytest.raises(ValueError, match="short.nii"):
        outputs.copy_to_derivative(str(src), tmp_path / "short.nii.gz")


def test_compressed_ahead_gives_the_same_derivative_bytes(tmp_path):
    # CompressImages (a worker, beside tracking) writes the bytes WriteDerivatives' own gzip
    # would; it refuses anything but an uncompressed work-dir image
    from pipeline.interfaces import outputs

    rng = np.random.default_rng(1)
    srcs = [_nifti(tmp_path, (rng.random((30, 20, 10)) > 0.8).astype(np.uint8), "mask.nii"),
            _nifti(tmp_path, np.where(rng.random((30, 20, 10)) > 0.5, np.nan, 2.0)
                   .astype(np.float32), "radc.nii")]
    (tmp_path / "node").mkdir()
    res = outputs.CompressImages(in_files=[str(s) for s in srcs]).run(cwd=str(tmp_path / "node"))
    mapping = json.loads(open(res.outputs.compressed).read())
    assert sorted(mapping) == sorted(str(s.resolve()) for s in srcs)
    for src in srcs:
        direct = tmp_path / "direct" / f"{src.stem}.nii.gz"
        outputs.copy_to_derivative(str(src), direct)
        assert open(mapping[str(src.resolve())], "rb").read() == direct.read_bytes()
    halves = [json.loads(open(outputs.CompressImages(
        in_files=[str(s) for s in srcs], part=k, parts=2).run(cwd=str(tmp_path / "node"))
        .outputs.compressed).read()) for k in (0, 1)]
    assert [list(h) for h in halves] == [[str(srcs[0].resolve())], [str(srcs[1].resolve())]]
    gz = tmp_path / "direct" / "mask.nii.gz"
    with pytest.raises(ValueError, match="mask.nii.gz"):
        outputs.CompressImages(in_files=[str(gz)]).run(cwd=str(tmp_path / "node"))


def test_runner_publishes_the_report_node_html(tmp_path):
    # the subject_report node's page (pipeline.reports.node) is copied beside the derivatives (readable by all); the
    # node folders are found under the workflow's base_dir (Node.output_dir() of the
    # workflow's own node objects answers a new temporary folder), and without the node's
    # page the runner says so (it then draws the report itself)
    from types import SimpleNamespace

    from pipeline.runner import _derivative_sources, _publish_report

    workflow = SimpleNamespace(base_dir=str(tmp_path / "work"), name="sub_01_wf")
    dst = tmp_path / "out" / "sub-01.html"
    assert not _publish_report(workflow, dst) and not dst.exists()
    page = tmp_path / "work" / "sub_01_wf" / "subject_report" / "report" / "sub-01.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html>report</html>")
    assert _publish_report(workflow, dst)
    assert dst.read_text() == "<html>report</html>"
    assert dst.stat().st_mode & 0o444 == 0o444
    sources = tmp_path / "work" / "sub_01_wf" / "write_derivatives" / "derivative_sources.json"
    sources.parent.mkdir(parents=True)
    sources.write_text(json.dumps({"a.nii.gz": "/w/a.nii"}))
    assert _derivative_sources(workflow) == {"a.nii.gz": "/w/a.nii"}


@pytest.mark.parametrize("dtype", [None, np.uint8, np.int32, np.float32])
def test_array_io_is_the_simpleitk_round_trip_without_copies(tmp_path, dtype):
    """write_array writes the bytes write_image writes for the same image (header included,
    oblique direction, NaN kept), and read_array gives GetArrayFromImage(read_image(...))."""
    import SimpleITK as sitk

    from pipeline.io import read_array, read_image, write_array, write_image

    rng = np.random.default_rng(2)
    data = (rng.normal(size=(6, 7, 9)) * 40).astype(np.float32)
    if dtype in (None, np.float32):
        data[0, 0, :3] = np.nan
    img = sitk.GetImageFromArray(data)
    img.SetSpacing((0.9, 1.1, 4.5))
    img.SetOrigin((3.0, -2.0, 7.5))
    img.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    ref = write_image(img, tmp_path / "ref.nii", dtype=dtype)
    ours = write_array(data, img, tmp_path / "ours.nii", dtype=dtype)
    assert ours.read_bytes() == ref.read_bytes()
    back = read_array(ours)
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(read_image(ref)))
    assert back.dtype == (np.dtype(dtype) if dtype else np.float32)
    with pytest.raises(ValueError, match="bad.nii"):
        write_array(data[:, :, :8], img, tmp_path / "bad.nii")


def test_native_masks_on_the_subject_grid_with_identity_transforms_give_the_masks(tmp_path):
    """NativeMasks with identity transforms onto the subject grid itself writes each mask
    back unchanged (uint8), on that grid."""
    from pipeline.interfaces.outputs import NativeMasks
    from pipeline.io import read_array, write_array

    rng = np.random.default_rng(4)
    grid = sitk.Image(12, 10, 8, sitk.sitkFloat32)
    grid.SetSpacing((1.0, 1.0, 2.0))
    grid.SetOrigin((-5.0, 3.0, 1.0))
    grid_file = str(write_array(np.zeros((8, 10, 12), np.float32), grid, tmp_path / "grid.nii"))
    identity = str(tmp_path / "identity.txt")
    sitk.WriteTransform(sitk.Euler3DTransform(), identity)
    masks = [(rng.random((8, 10, 12)) > 0.7).astype(np.uint8) for _ in range(4)]
    files = [str(write_array(m, grid, tmp_path / f"mask{i}.nii", np.uint8))
             for i, m in enumerate(masks)]
    two = lambda value: [value, value]  # noqa: E731 - two sessions
    res = NativeMasks(flair_lesion=files[:2], restricted=files[2:], subject_xfms=two(identity),
                      dwi_to_flair=two(identity), native_flair=two(grid_file),
                      native_dwi=two(grid_file)).run(cwd=str(tmp_path))
    for out, mask in zip(list(res.outputs.flair_lesion) + list(res.outputs.restricted), masks):
        back = read_array(out)
        assert back.dtype == np.uint8
        np.testing.assert_array_equal(back, mask)
