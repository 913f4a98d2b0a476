"""Shared fixtures: repository paths, the real-data folder, small phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("NIPYPE_NO_ET", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository; tests needing it skip with a clear reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (CI puts ../shared beside the repo)")
    return SHARED_DATA


def make_skeleton(root, sessions=("day0", "day3"), acq_times=None, subject="01", files=None):
    """An empty-file BIDS tree (enough for discovery and workflow construction)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.10.0"}')
    sub = root / f"sub-{subject}"
    files = files or ("anat/{p}_FLAIR.nii.gz", "dwi/{p}_dwi.nii.gz", "dwi/{p}_dwi.bval",
                      "dwi/{p}_dwi.bvec", "dwi/{p}_ADC.nii.gz")
    for ses in sessions:
        prefix = f"sub-{subject}_ses-{ses}"
        for pattern in files:
            path = sub / f"ses-{ses}" / pattern.format(p=prefix)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
    if acq_times:
        rows = "".join(f"ses-{s}\t{t}\n" for s, t in zip(sessions, acq_times))
        (sub / f"sub-{subject}_sessions.tsv").write_text("session_id\tacq_time\n" + rows)
    return root


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory):
    """lesionlapse run once over a copy of sample_data (participant level, MultiProc 2).

    Session-scoped so that every test reading real derivatives (end-to-end checks, reports,
    notebooks) shares one run. Returns paths and the exit status; the group level is not run.
    """
    import shutil

    from pipeline.cli import main

    root = tmp_path_factory.mktemp("sample_run")
    bids = root / "bids"
    shutil.copytree(REPO / "sample_data", bids)
    out, work = root / "out", root / "work"
    status = main([str(bids), str(out), "participant", "-w", str(work), "--nprocs", "2"])
    return {"bids": bids, "out": out, "work": work, "status": status, "repo": REPO}


@pytest.fixture(scope="session")
def sample_output(sample_run):
    """The shared sample_data run with its group level (reports, notebooks).

    LESIONLAPSE_TEST_DERIVATIVES=DIR points the report and notebook tests at an existing run.
    """
    if os.environ.get("LESIONLAPSE_TEST_DERIVATIVES"):
        return Path(os.environ["LESIONLAPSE_TEST_DERIVATIVES"])
    from pipeline.cli import main

    out = sample_run["out"]
    if not (out / "group" / "group_desc-sessions_timeseries.tsv").exists():
        main([str(sample_run["bids"]), str(out), "group"])
    return out
