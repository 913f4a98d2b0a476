"""The phantom: BIDS validity, truth files, the seed-case story, determinism, sample_data."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.simulate import PRESETS, simulate_dataset

REPO = Path(__file__).resolve().parents[1]
VALIDATOR = shutil.which("bids-validator-deno") or str(
    Path(__import__("sys").executable).parent / "bids-validator-deno"
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "ds"
    labels = simulate_dataset(out, preset="mixed", n_subjects=4, seed=7, grid="small")
    assert labels == ["01", "02", "03", "04"]
    return out


def test_presets_listed():
    assert {"seed-case", "control", "ms-like", "mixed", "sample"} <= set(PRESETS)


def test_bids_validator_reports_no_error(mixed):
    if not Path(VALIDATOR).exists():
        pytest.skip("bids-validator-deno is not installed")
    proc = subprocess.run(
        [VALIDATOR, str(mixed), "--format", "json"], capture_output=True, text=True, timeout=300
    )
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], errors[:5]
    assert proc.returncode == 0


def test_truth_files_exist(mixed):
    truth = mixed / "derivatives" / "truth"
    assert json.loads((truth / "dataset_description.json").read_text())["DatasetType"] == (
        "derivative"
    )
    sub = truth / "sub-01"
    for name in ("sessions_timeseries.tsv", "sessions_timeseries.json", "lesions_timeseries.tsv",
                 "lesions_summary.tsv", "events.tsv", "simulation.json"):
        assert (sub / f"sub-01_desc-{name}").is_file(), name
    for ses in ("01", "02", "03", "04"):
        p = f"sub-01_ses-{ses}"
        anat, dwi = sub / f"ses-{ses}" / "anat", sub / f"ses-{ses}" / "dwi"
        for f in (anat / f"{p}_label-lesion_desc-flair_mask.nii.gz",
                  anat / f"{p}_space-truth_label-lesion_desc-flair_mask.nii.gz",
                  anat / f"{p}_desc-flairlesions_dseg.nii.gz",
                  anat / f"{p}_from-truth_to-FLAIR_mode-image_xfm.txt",
                  dwi / f"{p}_label-lesion_desc-restricted_mask.nii.gz",
                  dwi / f"{p}_space-truth_label-lesion_desc-restricted_mask.nii.gz",
                  dwi / f"{p}_space-truth_desc-true_rADC.nii.gz",
                  dwi / f"{p}_from-truth_to-DWI_mode-image_xfm.txt",
                  mixed / "sub-01" / f"ses-{ses}" / "dwi" / f"{p}_ADC.nii.gz",
                  mixed / "sub-01" / f"ses-{ses}" / "dwi" / f"{p}_dwi.bvec"):
            assert f.is_file(), f
    sessions = pd.read_csv(mixed / "sub-01" / "sub-01_sessions.tsv", sep="\t")
    assert list(sessions.columns) == ["session_id", "acq_time"]
    t = pd.to_datetime(sessions["acq_time"])
    assert list((t - t.iloc[0]).dt.days) == [0, 3, 8, 45]
    units = {json.loads((truth / f"sub-{s}" / f"sub-{s}_desc-simulation.json").read_text())[
        "adc_unit"] for s in ("01", "02", "03")}
    assert units == {"mm2_s", "um2_s", "1e-3mm2_s"}


def test_seed_case_story(mixed):
    truth = mixed / "derivatives" / "truth" / "sub-01"
    table = pd.read_csv(truth / "sub-01_desc-sessions_timeseries.tsv", sep="\t")
    from pipeline.core.columns import SESSION_COLUMNS

    assert list(table.columns) == list(SESSION_COLUMNS)
    r, f = table["restricted_volume_ml"].to_numpy(), table["flair_volume_ml"].to_numpy()
    assert r[0] < r[1] < r[2]
    assert 0 < r[3] < r[2]
    assert np.all(np.diff(f) > 0) and f[0] > 0
    lesions = pd.read_csv(truth / "sub-01_desc-lesions_timeseries.tsv", sep="\t")
    restricted = lesions[lesions["kind"] == "restricted"]
    big_at_day0 = restricted.loc[(restricted["day"] == 0) & (restricted["volume_ml"] > 1.0),
                                 "lesion_id"]
    day0 = restricted[restricted["lesion_id"].isin(big_at_day0)]
    assert len(day0)
    first = day0[day0["day"] == 0]["radc_mean_initial"]
    last = day0[day0["day"] == 45]["radc_mean_initial"]
    assert (first < 0.7).all() and (last > 0.85).all()
    summary = pd.read_csv(truth / "sub-01_desc-lesions_summary.tsv", sep="\t")
    pn = summary.loc[(summary["kind"] == "restricted") & (summary["first_day"] == 0),
                     "pseudonormalization_day"]
    assert ((pn > 3) & (pn < 45)).all()


def test_ms_like_designed_events(mixed):
    events = pd.read_csv(mixed / "derivatives" / "truth" / "sub-02" / "sub-02_desc-events.tsv",
                         sep="\t")
    seen = set(events.loc[events["kind"] == "flair", "event"])
    assert {"new", "enlarging", "stable", "shrinking", "resolved", "merged", "split"} <= seen


def test_control_has_no_lesion(mixed):
    table = pd.read_csv(mixed / "derivatives" / "truth" / "sub-03" /
                        "sub-03_desc-sessions_timeseries.tsv", sep="\t")
    assert (table["flair_volume_ml"] == 0).all() and (table["restricted_volume_ml"] == 0).all()


def test_refuses_non_empty_dir(tmp_path):
    (tmp_path / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        simulate_dataset(tmp_path, grid="small")


def test_sample_data_regenerates_identically(tmp_path):
    """Also the determinism test: same seed -> byte-identical files."""
    sample = REPO / "sample_data"
    if not sample.is_dir():
        pytest.skip("sample_data/ is absent")
    out = tmp_path / "sample"
    simulate_dataset(out, preset="sample", n_subjects=2, seed=0, grid="small")
    made = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    kept = sorted(p.relative_to(sample) for p in sample.rglob("*")
                  if p.is_file() and p.name != "README.md")
    assert made == kept
    _, mismatch, errors = filecmp.cmpfiles(out, sample, [str(p) for p in made], shallow=False)
    assert errors == []
    # Images and tables are byte-identical. The text files holding transform parameters
    # (*_xfm.txt, *_desc-simulation.json) may differ in the last float64 digit between CPUs
    # (numpy's SIMD-dispatched trigonometry); their numbers must agree to 1e-12.
    for name in mismatch:
        assert name.endswith(("_xfm.txt", "_desc-simulation.json")), name
        assert _same_up_to_last_digits((out / name).read_text(), (sample / name).read_text()), name


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _same_up_to_last_digits(a: str, b: str) -> bool:
    """Same text apart from numbers, and numbers equal to a relative 1e-12."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    x = np.array([float(v) for v in _NUMBER.findall(a)])
    y = np.array([float(v) for v in _NUMBER.findall(b)])
    return x.shape == y.shape and bool(np.allclose(x, y, rtol=1e-12, atol=1e-12))


def test_epi_shift_moves_dwi_along_phase_encode_axis():
    """A uniform one-voxel EPI shift samples the truth one voxel further along the second
    (phase-encode) axis of the native grid, and leaves the other axes alone."""
    import SimpleITK as sitk

    from pipeline.simulate import acquisition as acq
    from pipeline.simulate.geometry import reference_grid

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    image = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    grid = reference_grid((10, 10, 10), (2.0, 2.0, 2.0), np.array([19.0, 19.0, 19.0]))
    plain = acq.Pose(sitk.Euler3DTransform(), grid)
    shifted = acq.Pose(sitk.Euler3DTransform(), grid, np.full((10, 10, 10), 2.0, np.float32))
    a = acq.resample_to_native(image, affine, plain, antialias=False)
    b = acq.resample_to_native(image, affine, shifted, antialias=False)
    np.testing.assert_allclose(b[:, :-1, :], a[:, 1:, :], atol=1e-5)
    assert shifted.jacobian().min() == shifted.jacobian().max() == 1.0


def test_simulate_with_epi_distortion(tmp_path):
    """--epi-distortion shifts only the DWI, writes the shift to the truth, keeps the FLAIR."""
    import nibabel as nib

    plain, epi = tmp_path / "plain", tmp_path / "epi"
    simulate_dataset(plain, preset="control", seed=1, grid="small", days=(0.0,))
    simulate_dataset(epi, preset="control", seed=1, grid="small", days=(0.0,),
                     epi_distortion_mm=2.5)
    rel = Path("sub-01/ses-01")
    assert filecmp.cmp(plain / rel / "anat/sub-01_ses-01_FLAIR.nii.gz",
                       epi / rel / "anat/sub-01_ses-01_FLAIR.nii.gz", shallow=False)
    assert not filecmp.cmp(plain / rel / "dwi/sub-01_ses-01_dwi.nii.gz",
                           epi / rel / "dwi/sub-01_ses-01_dwi.nii.gz", shallow=False)
    shift = nib.load(epi / "derivatives/truth" / rel /
                     "dwi/sub-01_ses-01_desc-epishift_dwimap.nii.gz").get_fdata()
    assert np.abs(shift).max() == pytest.approx(2.5, abs=1e-3)
    with pytest.raises(ValueError, match="epi_distortion_mm"):
        simulate_dataset(tmp_path / "bad", epi_distortion_mm=-1.0)
