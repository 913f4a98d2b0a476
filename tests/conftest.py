"""Shared fixtures: repository paths, the real-data folder, small phantom datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("NIPYPE_NO_ET", "1")

#: Session fixtures that run the pipeline. Under pytest-xdist (``make test`` runs
#: ``-n 2 --dist loadgroup``) the tests using each one share an xdist group, so that it is
#: built on one worker only (see pytest_collection_modifyitems below).
XDIST_SHARED_FIXTURES = ("sample_run", "cohort_bids")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Give one ``xdist_group`` to all tests that share an expensive fixture.

    A session fixture is built once per xdist worker that uses it, and a module-scoped one
    once per worker that runs a test of that module using it: without groups, ``--dist
    loadgroup`` would spread the tests of sample_run, of the phantom cohort or of kill -9 over
    both workers and each would build the fixture again. The keys are the fixtures of
    XDIST_SHARED_FIXTURES (and everything built on them: sample_output, cohort_run, ...) and
    every module-scoped fixture (per module); tests linked by any shared key, directly or
    through another test, get one group (union-find), named after its first key. Runs before
    xdist's own hook (tryfirst), which turns the marks into the scheduling scope; without
    ``--dist loadgroup`` the marks do nothing.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    keyed = []
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        keys = []
        for name in info.names_closure:
            defs = info.name2fixturedefs.get(name)
            if name in XDIST_SHARED_FIXTURES:
                keys.append(name)
            elif defs and defs[-1].scope == "module":
                keys.append(f"{item.nodeid.split('::')[0]}::{name}")
        if keys:
            keyed.append((item, keys[0]))
            for key in keys:
                parent[find(key)] = find(keys[0])
    names: dict[str, str] = {}
    for key in sorted(parent):
        names.setdefault(find(key), key)
    for item, key in keyed:
        item.add_marker(pytest.mark.xdist_group(names[find(key)]))


def pytest_collection_finish(session):
    """Stop an xdist run whose ``--dist loadgroup`` ignores the groups given above.

    xdist passes a test's group to its scheduler as a ``@group`` suffix of the node id; where
    that suffix does not take (pytest 9.2: pytest-dev/pytest-xdist#1386) the groups silently
    do nothing and each worker builds the shared fixtures again.
    """
    if not session.config.getoption("loadgroup", False):
        return
    for item in session.items:
        mark = item.get_closest_marker("xdist_group")
        if mark and not item.nodeid.endswith(f"@{mark.args[0]}"):
            raise pytest.UsageError(
                f"pytest-xdist --dist loadgroup ignores the xdist_group of {item.nodeid} "
                f"(pytest {pytest.__version__}; see pytest-dev/pytest-xdist#1386): install the "
                "test extra's pytest (pyproject.toml) or run without -n")


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


def colour_count(image) -> int:
    """How many distinct RGB colours an image (H x W x 3 or 4 array) holds.

    The same number as ``len(np.unique(image[..., :3].reshape(-1, 3), axis=0))``, which sorts
    the pixels as rows (~20 s for a 1400 x 3000 report screenshot on a loaded 2-core machine):
    here each channel's values are ranked on their own and the ranks are folded into one dense
    code per pixel (0 .. colours - 1), re-ranked after each channel so that it stays below the
    pixel count.
    """
    import numpy as np

    rgb = np.asarray(image)[..., :3].reshape(-1, 3)
    if not len(rgb):
        return 0
    code = None
    for channel in rgb.T:
        values, index = np.unique(channel, return_inverse=True)
        index = index.reshape(-1)
        code = index if code is None else np.unique(code * len(values) + index,
                                                    return_inverse=True)[1].reshape(-1)
    return int(code.max()) + 1


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


# --- the phantom cohort shared by tests/test_cohort.py and tests/test_slurm.py -----------------

#: The cohort's subject whose first FLAIR is truncated (fails validation) and the good ones: the
#: issue's 4-subject check (3 succeed); the Slurm test runs the last of them.
COHORT_BROKEN = "02"
COHORT_GOOD = ("01", "03", "04")


@pytest.fixture(scope="session")
def cohort_bids(tmp_path_factory) -> Path:
    """4 phantom subjects (small grid, days 0 and 3); sub-02's first FLAIR cut to half its size.

    Session-scoped and defined here (not in a test module) so that it is built once per test
    session, however many modules use it.
    """
    from pipeline.cli import main

    bids = tmp_path_factory.mktemp("cohort") / "bids"
    assert main(["simulate", str(bids), "--preset", "mixed", "--subjects", "4", "--seed", "3",
                 "--grid", "small", "--days", "0", "3"]) == 0
    (flair, *_) = sorted((bids / f"sub-{COHORT_BROKEN}").glob("ses-*/anat/*_FLAIR.nii.gz"))
    data = flair.read_bytes()
    flair.write_bytes(data[: len(data) // 2])
    return bids


def summary_table(out: Path):
    """OUTPUT_DIR/logs/run_summary.tsv as a DataFrame of strings."""
    import pandas as pd

    return pd.read_csv(out / "logs" / "run_summary.tsv", sep="\t", dtype=str,
                       keep_default_na=False)


def tables(out: Path, subjects=None) -> dict[str, bytes]:
    """Every subject table of a derivatives folder (name -> bytes), optionally of some subjects."""
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("sub-*/sub-*.tsv"))
            if subjects is None or p.name.split("_")[0][4:] in subjects}



@pytest.fixture(scope="session")
def cohort_run(cohort_bids) -> dict:
    """The participant level (MultiProc, 2 processes) over the cohort, then the group level.

    Run once per test session; the reference for the resume and Slurm tests. ``tables`` maps
    every subject table's name to its bytes right after the run.
    """
    from pipeline.cli import main

    root = cohort_bids.parent
    out, work = root / "out", root / "work"
    cmd = [str(cohort_bids), str(out), "participant", "-w", str(work), "--nprocs", "2"]
    status = main(cmd)
    group_status = main([str(cohort_bids), str(out), "group"])
    return {"bids": cohort_bids, "out": out, "work": work, "status": status, "cmd": cmd,
            "group_status": group_status, "summary": summary_table(out), "tables": tables(out)}
