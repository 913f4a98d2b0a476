"""SegmentSessions works on the box around the brains: the same outputs as on the whole grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.config import load_config
from pipeline.interfaces import segmentation as iseg
from pipeline.io import read_image


def test_analysis_box_reach_and_clipping():
    brain = np.zeros((20, 30, 40), bool)
    brain[5:10, 0:12, 20:25] = True
    box = iseg.analysis_box([brain, np.roll(brain, 3, axis=0)], (2.0, 1.0, 1.0), 1.0)
    # reach: 4 sigma + 0.5, truncated, plus 2 voxels: 4 along z (2 mm), 6 in-plane (1 mm)
    assert box == (slice(1, 17), slice(0, 18), slice(14, 31))
    assert iseg.analysis_box([np.zeros((4, 5, 6), bool)], (1.0,) * 3, 1.0) == (
        slice(0, 4), slice(0, 5), slice(0, 6))


def _write_session(arrays, tmp_path, t, files):
    """Write session ``t``'s arrays (1 x 1 x 2 mm) as ``<key><t>.nii.gz``; append to ``files``."""
    for key, arr in arrays.items():
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing((1.0, 1.0, 2.0))
        path = str(tmp_path / f"{key}{t}.nii.gz")
        sitk.WriteImage(img, path)
        files[key].append(path)


def _subject(tmp_path, rng):
    shape = (40, 70, 64)
    zz, yy, xx = np.indices(shape)
    brain = (((zz - 18) / 12.0) ** 2 + ((yy - 30) / 20.0) ** 2 + ((xx - 40) / 18.0) ** 2) < 1.0
    files = {key: [] for key in ("flair", "brain_mask", "trace", "adc")}
    for t, radius in enumerate((3.0, 4.0, 4.0)):
        lesion = (zz - 18) ** 2 + (yy - 30) ** 2 + (xx - 46) ** 2 < radius ** 2
        arrays = {
            "flair": np.where(brain, 100.0 + np.where(lesion, 70.0, 0.0), 5.0)
            + rng.normal(0.0, 3.0, shape),
            "brain_mask": brain.astype(float),
            "adc": np.where(brain, np.where(lesion, 400.0, 780.0), 0.0)
            + rng.normal(0.0, 20.0, shape) * brain,
        }
        arrays["trace"] = np.where(brain, 100.0 * np.exp(-1e-3 * arrays["adc"]), 0.0)
        _write_session(arrays, tmp_path, t, files)
    return files


def test_segment_sessions_same_on_the_box_as_on_the_whole_grid(tmp_path, monkeypatch):
    files = _subject(tmp_path, np.random.default_rng(5))
    cfg = load_config().to_dict()

    def run(cwd):
        cwd.mkdir()
        return iseg.SegmentSessions(**files, labels=["a", "b", "c"], n_workers=2,
                                    dwi_inplane_mm=[2.0] * 3, segmentation=cfg["segmentation"],
                                    dynamics=cfg["dynamics"]).run(cwd=str(cwd)).outputs

    boxed = run(tmp_path / "box")
    shape = sitk.GetArrayFromImage(read_image(files["flair"][0])).shape
    box = iseg.analysis_box([sitk.GetArrayFromImage(read_image(f)) > 0
                             for f in files["brain_mask"]], (2.0, 1.0, 1.0),
                            cfg["segmentation"]["flair_change_smooth_mm"])
    assert np.prod([s.stop - s.start for s in box]) < 0.6 * np.prod(shape)
    monkeypatch.setattr(iseg, "analysis_box", lambda brains, *a: (slice(None),) * 3)
    whole = run(tmp_path / "whole")
    assert any(sitk.GetArrayFromImage(read_image(f)).any() for f in boxed.flair_lesion)
    assert any(sitk.GetArrayFromImage(read_image(f)).any() for f in boxed.restricted)
    for key in ("flair_lesion", "restricted", "shine_through", "radc", "nawm"):
        for a, b in zip(getattr(boxed, key), getattr(whole, key)):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(a)),
                                          sitk.GetArrayFromImage(read_image(b)), err_msg=key)
    for a, b in zip(boxed.references, whole.references):
        assert Path(a).read_text() == Path(b).read_text()


def test_segment_sessions_without_brain_voxels_says_so(tmp_path):
    """Empty brain masks: the per-session maps' clear error, not a failure of the boxes."""
    import pytest

    files = _subject(tmp_path, np.random.default_rng(2))
    empty = sitk.GetImageFromArray(np.zeros((40, 70, 64), np.float32))
    empty.SetSpacing((1.0, 1.0, 2.0))
    for path in files["brain_mask"]:
        sitk.WriteImage(empty, path)
    cfg = load_config().to_dict()
    with pytest.raises(ValueError, match="fewer than 100 voxels"):
        iseg.SegmentSessions(**files, labels=["a", "b", "c"], n_workers=2,
                             dwi_inplane_mm=[2.0] * 3, segmentation=cfg["segmentation"],
                             dynamics=cfg["dynamics"]).run(cwd=str(tmp_path))


def test_fov_edge_from_resample_session_to_the_segment_node(tmp_path):
    """ResampleSession writes the distance to the FLAIR slab's inferior edge (the test grid's
    2 mm axial slices, index running upwards) and SegmentSessions seeds only beyond
    flair_fov_edge_no_seed_mm of it: the lesion (29-45 mm from the edge) stays at 15 mm and goes
    at 60 mm; without the input the masks are those of 15 mm."""
    from pipeline.interfaces.registration import ResampleSession

    files = _subject(tmp_path, np.random.default_rng(5))
    cfg = load_config().to_dict()
    fov = []
    for t, (flair, mask) in enumerate(zip(files["flair"], files["brain_mask"])):
        (tmp_path / f"rs{t}").mkdir()
        out = ResampleSession(reference=flair, flair=flair, flair_mask=mask,
                              fov_min_slice_mm=2.0).run(cwd=str(tmp_path / f"rs{t}")).outputs
        fov.append(out.flair_fov_edge)
    d = sitk.GetArrayFromImage(read_image(fov[0]))
    np.testing.assert_allclose(d[:, 30, 40], (np.arange(40) + 0.5) * 2.0)
    (tmp_path / "rs_off").mkdir()
    off = ResampleSession(reference=files["flair"][0], flair=files["flair"][0],
                          flair_mask=files["brain_mask"][0]).run(cwd=str(tmp_path / "rs_off"))
    assert str(off.outputs.flair_fov_edge) == "<undefined>"

    def lesions(name, no_seed_mm, **fov_input):
        (tmp_path / name).mkdir()
        seg = {**cfg["segmentation"], "flair_fov_edge_no_seed_mm": no_seed_mm}
        out = iseg.SegmentSessions(**files, **fov_input, labels=["a", "b", "c"],
                                   dwi_inplane_mm=[2.0] * 3, segmentation=seg,
                                   dynamics=cfg["dynamics"]
                                   ).run(cwd=str(tmp_path / name)).outputs
        return [sitk.GetArrayFromImage(read_image(f)) for f in out.flair_lesion]

    without = lesions("without", 15.0)
    kept = lesions("kept", 15.0, flair_fov_edge=fov)
    gone = lesions("gone", 60.0, flair_fov_edge=fov)
    assert all(m.any() for m in without)
    for a, b in zip(without, kept):
        np.testing.assert_array_equal(a, b)
    assert not any(m.any() for m in gone)
    import pytest

    with pytest.raises(ValueError, match="flair_fov_edge: 2 entries for 3 sessions"):
        lesions("short", 15.0, flair_fov_edge=fov[:2])


def test_shine_through_lies_in_the_flair_lesions_and_is_empty_without_flair(tmp_path):
    """T2 shine-through is looked for inside the session's FLAIR lesions
    (``[dynamics] shine_through_in_flair_lesion``): a DWI-bright, ADC-normal region that is
    not FLAIR-bright (grey matter-like) is not shine-through, and a session without FLAIR has
    none; with the key off both are counted as before."""
    rng = np.random.default_rng(7)
    shape = (40, 70, 64)
    zz, yy, xx = np.indices(shape)
    brain = (((zz - 18) / 12.0) ** 2 + ((yy - 30) / 20.0) ** 2 + ((xx - 40) / 18.0) ** 2) < 1.0
    lesion = (zz - 18) ** 2 + (yy - 30) ** 2 + (xx - 48) ** 2 < 5.0 ** 2
    gm_like = (zz - 18) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 < 5.0 ** 2
    s0 = np.where(brain, 100.0, 0.0) * np.where(lesion, 1.6, 1.0) * np.where(gm_like, 1.5, 1.0)
    adc = np.where(brain, np.where(lesion, 1000.0, np.where(gm_like, 850.0, 780.0)), 0.0)
    files = {key: [] for key in ("flair", "brain_mask", "trace", "adc", "b0")}
    for t, with_flair in enumerate((True, False)):
        arrays = {
            "flair": (np.where(brain, 100.0 + np.where(lesion, 70.0, 0.0), 5.0)
                      + rng.normal(0.0, 3.0, shape)) if with_flair else np.full(shape, np.nan),
            "brain_mask": brain.astype(float),
            "adc": adc + rng.normal(0.0, 20.0, shape) * brain,
            "b0": s0 + rng.normal(0.0, 2.0, shape) * brain,
        }
        arrays["trace"] = arrays["b0"] * np.exp(-1e-3 * arrays["adc"])
        _write_session(arrays, tmp_path, t, files)
    cfg = load_config().to_dict()

    def run(gate):
        cwd = tmp_path / f"gate{gate}"
        cwd.mkdir()
        out = iseg.SegmentSessions(**files, labels=["a", "b"], has_flair=[True, False],
                                   dwi_inplane_mm=[2.0] * 2,
                                   segmentation=cfg["segmentation"],
                                   dynamics={**cfg["dynamics"],
                                             "shine_through_in_flair_lesion": gate},
                                   ).run(cwd=str(cwd)).outputs
        return ([sitk.GetArrayFromImage(read_image(f)) > 0 for f in out.shine_through],
                [sitk.GetArrayFromImage(read_image(f)) > 0 for f in out.flair_lesion])

    (shine_a, shine_b), (flair_a, _) = run(True)
    assert (flair_a & lesion).sum() > 0.8 * lesion.sum()
    assert (shine_a & lesion).sum() > 0.8 * lesion.sum()
    assert not (shine_a & ~flair_a).any() and not (shine_a & gm_like).any()
    assert not shine_b.any()
    (open_a, open_b), _ = run(False)
    assert (open_a & gm_like).sum() > 0.8 * gm_like.sum()
    assert (open_b & gm_like).sum() > 0.8 * gm_like.sum()


def test_native_dwi_voxel_from_resample_session_to_the_segment_node(tmp_path):
    """ResampleSession reads the native trace's in-plane voxel (its finest spacing; the test
    grid's 1 x 1 x 2 mm) and SegmentSessions' restricted edge step reaches
    restricted_edge_dwi_voxels of each session's value: a blurred restricted lesion grows
    farther with a larger native voxel; a list of the wrong length is refused."""
    import pytest
    from scipy import ndimage

    from pipeline.interfaces.registration import ResampleSession

    files = _subject(tmp_path, np.random.default_rng(5))
    (tmp_path / "rs").mkdir()
    out = ResampleSession(reference=files["flair"][0], trace=files["trace"][0]).run(
        cwd=str(tmp_path / "rs")).outputs
    assert out.dwi_inplane_mm == 1.0
    # the ADC of every session blurred like a coarse DWI voxel (the trace follows it)
    for a, t in zip(files["adc"], files["trace"]):
        img = read_image(a)
        arr = ndimage.gaussian_filter(sitk.GetArrayFromImage(img), (0.75, 1.5, 1.5))
        brain = sitk.GetArrayFromImage(img) > 0
        arr = np.where(brain, arr, 0.0).astype(np.float32)
        for path, values in ((a, arr), (t, np.where(brain, 100.0 * np.exp(-1e-3 * arr), 0.0))):
            new = sitk.GetImageFromArray(values.astype(np.float32))
            new.CopyInformation(img)
            sitk.WriteImage(new, path)
    cfg = load_config().to_dict()

    def restricted(name, inplane):
        (tmp_path / name).mkdir()
        out = iseg.SegmentSessions(**files, labels=["a", "b", "c"], dwi_inplane_mm=inplane,
                                   segmentation=cfg["segmentation"], dynamics=cfg["dynamics"]
                                   ).run(cwd=str(tmp_path / name)).outputs
        return [int((sitk.GetArrayFromImage(read_image(f)) > 0).sum()) for f in out.restricted]

    near, far = restricted("near", [1.0] * 3), restricted("far", [2.0, 6.0, 2.0])
    assert all(v > 0 for v in near)
    assert far[1] > near[1] and far[0] >= near[0]
    with pytest.raises(ValueError, match="dwi_inplane_mm: 2 entries for 3 sessions"):
        restricted("short", [1.0] * 2)
