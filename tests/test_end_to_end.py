"""End to end on sample_data: the CLI, the numbers against the truth, BIDS validity, the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.cli import main

pytestmark = pytest.mark.slow


def _table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", na_values="n/a", dtype={"session": str})


@pytest.fixture(scope="module")
def run(sample_run):
    """The shared run over sample_data (tests/conftest.py)."""
    return sample_run


def test_participant_succeeds(run):
    assert run["status"] == 0
    summary = _table(run["out"] / "logs" / "run_summary.tsv")
    assert set(summary.status) == {"ok"}


def _subjects(bids: Path) -> dict[str, str]:
    """subject label -> preset, from the truth."""
    table = _table(bids / "participants.tsv")
    return dict(zip(table.participant_id.str[4:], table.group))


def _check_volumes_against_truth(run, col):
    presets = _subjects(run["bids"])
    (sub,) = [s for s, p in presets.items() if p == "seed-case"]
    ours = _table(run["out"] / f"sub-{sub}" / f"sub-{sub}_desc-sessions_timeseries.tsv")
    truth = _table(run["bids"] / "derivatives" / "truth" / f"sub-{sub}" /
                   f"sub-{sub}_desc-sessions_timeseries.tsv")
    assert ours.session.tolist() == truth.session.tolist()
    for session, mine, true in zip(ours.session, ours[col], truth[col]):
        if true > 0.5:
            assert abs(mine - true) <= 0.2 * true, f"{col} ses-{session}: {mine:.2f} vs {true:.2f}"
        else:
            assert mine <= 0.5 + true, f"{col} ses-{session}: {mine:.2f} vs {true:.2f}"


def test_seed_case_restricted_volumes_match_truth(run):
    _check_volumes_against_truth(run, "restricted_volume_ml")


def test_seed_case_flair_volumes_match_truth(run):
    _check_volumes_against_truth(run, "flair_volume_ml")


def test_seed_case_story(run):
    """The case report in numbers: restriction rises to day 8, FLAIR through day 45."""
    presets = _subjects(run["bids"])
    (sub,) = [s for s, p in presets.items() if p == "seed-case"]
    t = _table(run["out"] / f"sub-{sub}" / f"sub-{sub}_desc-sessions_timeseries.tsv")
    r, f = t.restricted_volume_ml.tolist(), t.flair_volume_ml.tolist()
    assert r[0] < r[1] < r[2] and 0 < r[3] < r[2]
    assert f[0] < f[1] < f[2] < f[3]


def test_control_has_no_lesion(run):
    presets = _subjects(run["bids"])
    for sub in (s for s, p in presets.items() if p == "control"):
        t = _table(run["out"] / f"sub-{sub}" / f"sub-{sub}_desc-sessions_timeseries.tsv")
        assert (t.flair_volume_ml < 0.5).all() and (t.restricted_volume_ml < 0.5).all()


def test_outputs_complete_and_described(run):
    out = run["out"]
    for sub_dir in sorted(out.glob("sub-*/")):
        sub = sub_dir.name
        for name in ("desc-sessions_timeseries", "desc-lesions_timeseries", "desc-events",
                     "desc-lineage", "desc-lesions_summary"):
            table = _table(sub_dir / f"{sub}_{name}.tsv")
            meta = json.loads((sub_dir / f"{sub}_{name}.json").read_text())
            assert list(meta) == list(table.columns)
            assert all(m["Description"] != "(undocumented column)" for m in meta.values()), name
        for ses_dir in sub_dir.glob("ses-*"):
            names = {p.name for p in ses_dir.rglob("*.nii.gz")}
            prefix = f"{sub}_{ses_dir.name}"
            assert f"{prefix}_label-lesion_desc-flair_mask.nii.gz" in names  # native FLAIR grid
            assert f"{prefix}_label-lesion_desc-restricted_mask.nii.gz" in names  # native DWI grid
            assert f"{prefix}_space-subject_desc-flair_dseg.nii.gz" in names
        assert (out / f"{sub}.html").exists()
    assert not (out / ".lesionlapse-staging").exists()


def test_native_masks_on_native_grids(run):
    import nibabel as nib

    out, bids = run["out"], run["bids"]
    masks = [m for m in out.glob("sub-*/ses-*/anat/*_label-lesion_desc-flair_mask.nii.gz")
             if "_space-" not in m.name]
    assert masks
    for mask in masks:
        sub, ses = mask.name.split("_")[:2]
        (flair,) = (bids / sub / ses / "anat").glob("*_FLAIR.nii.gz")
        a, b = nib.load(mask), nib.load(flair)
        assert a.shape == b.shape and abs(a.affine - b.affine).max() < 1e-3


def test_derivatives_pass_bids_validator(run):
    exe = shutil.which("bids-validator-deno") or str(Path(__import__("sys").executable).with_name(
        "bids-validator-deno"))
    proc = subprocess.run([exe, "--format", "json", str(run["out"])], capture_output=True, text=True)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert not errors, errors[:10]


def test_group_level(run):
    assert main([str(run["bids"]), str(run["out"]), "group"]) == 0
    group = _table(run["out"] / "group" / "group_desc-sessions_timeseries.tsv")
    assert group.subject.nunique() == len(list(run["out"].glob("sub-*/")))


def test_report_node_draws_the_report_of_the_published_derivatives(run):
    # the subject_report node draws the report from the work-dir images and tables while the
    # derivatives are still being written; drawn again from the published derivatives, the
    # page is the same but for its date (and the published report is the node's)
    import re

    from pipeline.reports.data import load_subject
    from pipeline.reports.subject import render_subject_report

    date = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC")
    subjects = sorted(p.name[4:] for p in run["out"].glob("sub-*/"))
    assert subjects
    for label in subjects:
        node = run["work"] / f"sub_{label}_wf" / "subject_report" / "report" / f"sub-{label}.html"
        drawn = render_subject_report(load_subject(run["out"], label))
        assert date.search(drawn)
        assert date.sub("", node.read_text(encoding="utf-8")) == date.sub("", drawn), label


def test_rerun_reuses_cache_and_gives_identical_tables(run):
    out, work = run["out"], run["work"]
    tables = {p: p.read_bytes() for p in out.glob("sub-*/*.tsv")}
    results = sorted(work.glob("sub_*_wf/subject_space/result_subject_space.pklz"))
    assert results
    stamps = {p: p.stat().st_mtime_ns for p in results}
    status = main([str(run["bids"]), str(out), "participant", "-w", str(work), "--nprocs", "2"])
    assert status == 0
    assert {p: p.stat().st_mtime_ns for p in results} == stamps, "registration ran again"
    assert {p: p.read_bytes() for p in out.glob("sub-*/*.tsv")} == tables

