"""Tracking and ADC analytics on the phantom's truth masks reproduce the phantom's design.

The truth masks, the true rADC and the simulation JSON are read from files, as a user would;
``core.tracking`` and ``core.dynamics`` then run on them exactly as the pipeline calls them
(``benchmarks.common.analyse``). Two subjects: the seed case of ``sample_data`` (restricted
diffusion and pseudonormalization) and one freshly simulated MS-like subject on the small grid
(the designed new / enlarging / shrinking / resolving / merging / splitting lesions).

The true rADC is stored as int16 with ``scl_slope`` 0.001, so rADC means can differ from the
truth tables by at most half a quantum, and the pseudonormalized fraction by at most the voxels
stored exactly at the cut-off (they may lie on either side of it); everything else is exact.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks import common
from pipeline.config import load_config
from pipeline.simulate import simulate_dataset

CONFIG = load_config()
HALF_QUANTUM = 0.0005 + 1e-6  # rADC stored to 1e-3 (plus float32 rounding)
RADC_COLUMNS = ["radc_mean_restricted", "radc_mean_flair", "radc_mean_ever_restricted",
                "radc_median_restricted", "radc_median_flair"]
VOLUME_COLUMNS = ["flair_volume_ml", "restricted_volume_ml", "ever_restricted_volume_ml"]


@pytest.fixture(scope="module")
def seed_case(repo):
    truth = common.load_truth(repo / "sample_data", "01")
    assert truth.preset == "seed-case"
    return truth, common.analyse_truth(truth, CONFIG)


@pytest.fixture(scope="module")
def ms_like(tmp_path_factory):
    bids = tmp_path_factory.mktemp("ms") / "bids"
    simulate_dataset(bids, preset="ms-like", n_subjects=1, seed=3, grid="small")
    truth = common.load_truth(bids, "01")
    return truth, common.analyse_truth(truth, CONFIG)


def _ambiguous_fraction(truth, k: int) -> float:
    """Share of ever-restricted voxels whose stored rADC equals the cut-off (either side)."""
    ever = np.logical_or.reduce(truth.masks["restricted"][: k + 1])
    cut = CONFIG.dynamics.restricted_below
    return float(np.count_nonzero(np.abs(truth.radc[k][ever] - cut) < 1e-6)) / max(ever.sum(), 1)


def test_session_table_reproduces_truth(seed_case):
    truth, got = seed_case
    want = truth.tables["sessions_timeseries"]
    assert got.sessions["session"].tolist() == want["session"].tolist()
    for col in VOLUME_COLUMNS:  # exact up to the TSV's 6 significant digits
        np.testing.assert_allclose(got.sessions[col], want[col], rtol=1e-5, atol=0, err_msg=col)
    for col in RADC_COLUMNS:
        np.testing.assert_allclose(got.sessions[col], want[col], rtol=0, atol=HALF_QUANTUM,
                                   err_msg=col)
    assert want["restricted_volume_ml"].iloc[0] > 0  # the seed case restricts from day 0
    fraction = got.sessions["pseudonormalized_fraction"].to_numpy()
    for k, (mine, true) in enumerate(zip(fraction, want["pseudonormalized_fraction"])):
        assert abs(mine - true) <= _ambiguous_fraction(truth, k) + 1e-6, (k, mine, true)
    assert fraction[-1] > 0.5 > fraction[0]  # the story: almost complete pseudonormalization


def test_pseudonormalized_fraction_is_the_definition(seed_case):
    """Independent of the tables: restricted-ever voxels outside the restricted mask now and at
    or above the cut-off now."""
    truth, got = seed_case
    cut = CONFIG.dynamics.restricted_below
    ever = np.zeros(truth.radc[0].shape, bool)
    for k in range(len(truth.sessions)):
        now = truth.masks["restricted"][k]
        ever |= now
        expected = np.count_nonzero(truth.radc[k][ever & ~now] >= cut) / ever.sum()
        assert got.sessions["pseudonormalized_fraction"].iloc[k] == pytest.approx(expected,
                                                                                  abs=1e-12)


def test_lesion_tables_reproduce_truth(seed_case):
    truth, got = seed_case
    key = ["kind", "lesion_id", "session"]
    want = truth.tables["lesions_timeseries"]
    merged = got.lesions.merge(want, on=key, suffixes=("", "_truth"), how="outer",
                               indicator=True)
    assert (merged["_merge"] == "both").all(), merged[merged["_merge"] != "both"][key]
    for col in ("volume_ml", "restricted_volume_ml", "ever_restricted_volume_ml"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_truth"], rtol=1e-5, err_msg=col)
    for col in ("radc_mean", "radc_mean_initial"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_truth"], atol=HALF_QUANTUM,
                                   err_msg=col)
    summary = got.summary.merge(truth.tables["lesions_summary"], on=["kind", "lesion_id"],
                                suffixes=("", "_truth"))
    assert len(summary) == len(truth.tables["lesions_summary"]) == len(got.summary)
    assert (summary["censored"] == summary["censored_truth"].astype(bool)).all()
    restricted = summary[summary["kind"] == "restricted"]
    assert restricted["pseudonormalization_day"].notna().any()
    # the day is interpolated on radc_mean_initial: its error is that rADC error over the slope
    for r in summary.itertuples():
        mine, true = r.pseudonormalization_day, r.pseudonormalization_day_truth
        if np.isnan(true) or r.censored:
            assert np.isnan(mine) == np.isnan(true) and mine == pytest.approx(true, nan_ok=True)
            continue
        course = merged[(merged["kind"] == r.kind) & (merged["lesion_id"] == r.lesion_id)]
        course = course.sort_values("day")
        d, v = course["day"].to_numpy(), course["radc_mean_initial_truth"].to_numpy()
        i = int(np.searchsorted(d, true)) - 1
        slope = (v[i + 1] - v[i]) / (d[i + 1] - d[i])
        drift = np.abs(course["radc_mean_initial"] - course["radc_mean_initial_truth"]).max()
        assert slope > 0 and drift <= HALF_QUANTUM
        assert abs(mine - true) <= 1.01 * drift / slope + 1e-4 * true, (r.lesion_id, mine, true)


@pytest.mark.parametrize("name", ["seed_case", "ms_like"])
def test_events_reproduce_truth_events(name, request):
    truth, got = request.getfixturevalue(name)
    want = truth.tables["events"]
    key = ["kind", "lesion_id", "from_session"]
    merged = got.events.merge(want, on=key, suffixes=("", "_truth"), how="outer", indicator=True)
    assert (merged["_merge"] == "both").all()
    assert (merged["event"] == merged["event_truth"]).all()
    for col in ("predecessor_ids", "successor_ids"):
        assert (merged[col] == merged[f"{col}_truth"]).all(), col


def test_event_confusion_names_rows_ids_and_volumes(ms_like):
    """event_confusion lists per truth row its lesion id, interval, the matched id and both
    sides' volumes (the benchmark lists the wrong rows with them); a lesion erased from the
    other side's ids is ``missed`` with no matched id."""
    truth, got = ms_like
    pairs = common.event_confusion(truth.tables["events"], got.events, truth.dseg, got.dseg,
                                   truth.sessions)
    rows = pairs[pairs["truth"] != common.SPURIOUS]
    want = truth.tables["events"]
    assert len(rows) == len(want) and (rows["truth"] == rows["pipeline"]).all()
    assert rows["lesion_id"].tolist() == want["lesion_id"].tolist()
    assert rows["from_session"].tolist() == want["from_session"].tolist()
    assert (rows["other_id"] == rows["lesion_id"]).all()  # same tracking -> same ids
    for side in ("from", "to"):
        assert np.allclose(rows[f"other_{side}_ml"], rows[f"truth_{side}_ml"])
    stable = rows[(rows["kind"] == "flair") & (rows["truth"] == "stable")].iloc[0]
    lesion = int(stable["lesion_id"])
    erased = {k: [np.where(d == lesion, 0, d) if k == "flair" else d for d in v]
              for k, v in got.dseg.items()}
    again = common.event_confusion(truth.tables["events"], got.events, truth.dseg, erased,
                                   truth.sessions)
    row = again[(again["kind"] == "flair") & (again["lesion_id"] == lesion)
                & (again["from_session"] == stable["from_session"])].iloc[0]
    assert row["pipeline"] == common.MISSED and np.isnan(row["other_id"])
    assert np.isnan(row["other_from_ml"]) and row["truth_from_ml"] == stable["truth_from_ml"]


def _designed(ms_like):
    truth, got = ms_like
    expected = common.designed_events(truth.sim, CONFIG)
    regions = common.design_regions(truth.sim, truth.affine, truth.radc[0].shape)
    flair = got.events[got.events["kind"] == "flair"]
    obs = common.observed_design_events(expected, regions, got.dseg["flair"], flair,
                                        truth.sessions)
    return obs.assign(collides=obs["design_id"].isin(common.design_collisions(truth.sim, regions)))


def test_designed_events_are_all_found(ms_like):
    obs = _designed(ms_like)
    assert set(obs["design"]) == {"stable", "new", "enlarging", "shrinking", "resolving",
                                  "merging", "splitting"}
    ok = obs[~obs["collides"]]
    assert {"new", "enlarging", "shrinking", "resolved", "merged", "split"} <= set(ok["expected"])
    wrong = ok[ok["expected"] != ok["observed"]]
    assert wrong.empty, wrong.to_string()


def test_designed_lesions_do_not_touch(ms_like):
    obs = _designed(ms_like)
    assert not obs["collides"].any(), sorted(set(obs.loc[obs["collides"], "design_id"]))
    assert (obs["expected"] == obs["observed"]).all()


def test_designed_events_fail_on_wrong_tracking(ms_like):
    """The check can fail: without 26-connectivity the merge bridge is lost or events change."""
    truth, _good = ms_like
    masks = {k: [m.copy() for m in v] for k, v in truth.masks.items()}
    # erase the designed new lesion at its first session: the comparison must notice
    regions = common.design_regions(truth.sim, truth.affine, truth.radc[0].shape)
    masks["flair"][2] &= ~regions[4][2]
    bad = common.analyse(masks, truth.radc, days=truth.days, sessions=truth.sessions,
                         voxel_ml=truth.voxel_ml, spacing_mm=truth.spacing_mm, config=CONFIG)
    obs = _designed((truth, bad))
    row = obs[(obs["design_id"] == 4) & (obs["interval"] == 1)].iloc[0]
    assert row["observed"] != row["expected"] == "new"


def test_designed_expectations_are_consistent():
    """designed_events on a hand-made design: a 3 -> 6 mm lesion enlarges, 6 -> 0 resolves."""
    sim = {"days": [0, 3, 8], "designed_lesions": [
        {"id": 5, "design": "enlarging", "radii_mm": [3.0, 6.0, 6.0], "center_ras_mm": [0, 0, 0]},
        {"id": 7, "design": "resolving", "radii_mm": [6.0, 6.0, 0.0], "center_ras_mm": [40, 0, 0]},
    ]}
    got = common.designed_events(sim, CONFIG)
    assert got["expected"].tolist() == ["enlarging", "stable", "stable", "resolved"]
    assert isinstance(got, pd.DataFrame)


def test_merge_with_an_invisible_lesion_is_not_observable():
    """benchmarks/tracking.observable_rows: a merge or split is observable only if every lesion
    of its group fills acquisition voxels; a lesion merging with a speck that no acquisition
    voxel holds is, on the images, a lesion that grows."""
    from benchmarks.tracking import observable_rows

    def native(ids_per_session):  # one kind, acquisition voxels of 1 mL, ids -> voxel counts
        out = []
        for counts in ids_per_session:
            labels = np.concatenate([np.full(n, i, np.int32) for i, n in counts.items()] or
                                    [np.zeros(0, np.int32)])
            out.append((np.concatenate([labels, np.zeros(3, np.int32)]).reshape(-1, 1, 1), 1.0))
        return {"flair": out}

    def events(rows):
        return pd.DataFrame(rows, columns=["lesion_id", "kind", "from_session", "event",
                                           "volume_from_ml", "volume_to_ml", "predecessor_ids",
                                           "successor_ids"])

    # session 1: lesions 1 (big), 2 (merging partner), 3 (stable elsewhere); session 2: 1 and 2
    # merged into 4, 3 unchanged
    table = events([
        (1, "flair", "01", "merged", 5.0, 0.0, "", "4"),
        (2, "flair", "01", "merged", 2.0, 0.0, "", "4"),
        (3, "flair", "01", "stable", 3.0, 3.0, "", ""),
        (4, "flair", "01", "merged", 0.0, 8.0, "1;2", ""),
    ])
    sessions = ["01", "02"]
    visible = native([{1: 5, 2: 2, 3: 3}, {4: 8, 3: 3}])
    assert observable_rows(table, visible, sessions, 1.0).tolist() == [True] * 4
    # lesion 2 fills no acquisition voxel: no row of the merge is observable, the stable
    # lesion elsewhere still is
    hidden = native([{1: 5, 3: 3}, {4: 8, 3: 3}])
    assert observable_rows(table, hidden, sessions, 1.0).tolist() == [False, False, True, False]


def test_native_events_show_what_the_acquisition_grid_resolves():
    """benchmarks/tracking.native_events: the event of each truth row as the phantom's
    native-grid truth shows it (per session components and volumes, tracking thresholds), the
    rule behind the benchmark's *resolvable* rows."""
    from benchmarks.tracking import native_events, observable_rows

    voxel_ml, shape = 0.01, (4, 30, 12)
    first, second = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    # 1: stable in the truth, but the grid holds 18 -> 12 voxels of it (-33 %, -0.06 mL)
    first[0:2, 0:3, 0:3] = 1
    second[0:2, 0:3, 0:2] = 1
    # 2 + 3 merge into 4, but the grid already joins them at the first session
    first[0:2, 5:7, 0:3], first[0:2, 7:9, 0:3] = 2, 3
    second[0:2, 5:9, 0:3] = 4
    # 5 + 6 merge into 7, one empty voxel row apart at the first session
    first[0:2, 11:13, 0:3], first[0:2, 14:16, 0:3] = 5, 6
    second[0:2, 11:16, 0:3] = 7
    # 8 is new at the second session
    second[0:2, 18:21, 0:3] = 8
    # 9 is stable; at the second session a one-voxel piece of it lies apart (a fragment)
    first[0:2, 23:26, 0:3] = 9
    second[0:2, 23:26, 0:3] = 9
    second[3, 28, 10] = 9
    second[0, 23, 0] = 0  # 18 -> 18 voxels
    # 11, a one-voxel speck apart from 10, is absorbed by it (a fragment: the tracker says merged)
    first[0:2, 0:4, 6:9], first[3, 0, 11] = 10, 11
    second[0:2, 0:4, 6:9], second[0, 0, 9] = 10, 10
    native = {"flair": [(first, voxel_ml), (second, voxel_ml)]}
    table = pd.DataFrame([
        (1, "flair", "01", "stable", 0.18, 0.18, "", ""),
        (2, "flair", "01", "merged", 0.12, 0.0, "", "4"),
        (3, "flair", "01", "merged", 0.12, 0.0, "", "4"),
        (4, "flair", "01", "merged", 0.0, 0.24, "2;3", ""),
        (5, "flair", "01", "merged", 0.12, 0.0, "", "7"),
        (6, "flair", "01", "merged", 0.12, 0.0, "", "7"),
        (7, "flair", "01", "merged", 0.0, 0.30, "5;6", ""),
        (8, "flair", "01", "new", 0.0, 0.18, "", ""),
        (9, "flair", "01", "stable", 0.18, 0.18, "", ""),
        (10, "flair", "01", "stable", 0.24, 0.25, "11", ""),
        (11, "flair", "01", "merged", 0.01, 0.0, "", "10"),
    ], columns=["lesion_id", "kind", "from_session", "event", "volume_from_ml", "volume_to_ml",
                "predecessor_ids", "successor_ids"])
    sessions = ["01", "02"]
    grid = native_events(table, native, sessions, voxel_ml, CONFIG.tracking)
    assert grid == ["shrinking", "stable", "stable", "stable", "merged", "merged", "merged",
                    "new", "stable", "stable", "merged"]
    # every row is observable (all its lesions fill grid voxels), but the truth's stable
    # lesion 1 and the merge of 2 + 3 are not resolved by the grid
    observable = observable_rows(table, native, sessions, voxel_ml)
    assert observable.all()
    resolvable = observable & (np.asarray(grid) == table["event"].to_numpy())
    assert resolvable.tolist() == [False, False, False, False] + [True] * 7
    # the fragment counts once it is a fifth of the lesion: then the grid shows a split
    second[3, 27:29, 9:11] = 9
    assert native_events(table, native, sessions, voxel_ml, CONFIG.tracking)[8] == "split"
    # a speck touching the lesion it joins is no fragment apart: the grid shows no merge
    first[2, 0, 9] = 11
    first[3, 0, 11] = 0
    assert native_events(table, native, sessions, voxel_ml, CONFIG.tracking)[10] == "stable"
    # a lesion no grid voxel holds at either end is absent
    gone = {"flair": [(np.zeros(shape, np.int32), voxel_ml)] * 2}
    assert set(native_events(table, gone, sessions, voxel_ml, CONFIG.tracking)) == {"absent"}


def test_pool_concatenates_dumped_chunks(tmp_path):
    """benchmarks/tracking.load_dumps (``--pool``): the --dump tables of several chunks pooled
    in folder order, labels kept as strings, each chunk's command collected."""
    from benchmarks.tracking import load_dumps

    for i, (sub, event) in enumerate((("01", "stable"), ("02", "new"))):
        d = tmp_path / f"chunk{i}"
        d.mkdir()
        pd.DataFrame({"subject": [sub], "from_session": ["01"], "truth": [event],
                      "observable": [True]}).to_csv(d / "whole_chain-events.csv", index=False)
        pd.DataFrame({"subject": [sub], "session": ["02"]}).to_csv(
            d / "whole_chain-sessions.csv", index=False)
        (d / "command.txt").write_text(f"python benchmarks/tracking.py --only {sub}\n")
    runs, commands = load_dumps([tmp_path / "chunk0", tmp_path / "chunk1"])
    assert list(runs) == ["whole chain"]
    events = runs["whole chain"]["events"]
    assert events["subject"].tolist() == ["01", "02"]
    assert events["from_session"].tolist() == ["01", "01"]
    assert events["truth"].tolist() == ["stable", "new"]
    assert runs["whole chain"]["sessions"]["session"].tolist() == ["02", "02"]
    assert commands == [f"python benchmarks/tracking.py --only {s}" for s in ("01", "02")]
    with pytest.raises(SystemExit, match="no dumped tables"):
        load_dumps([tmp_path])


def test_resegment_rewrites_the_lesion_masks_it_changes(sample_run, tmp_path):
    """benchmarks.tracking.resegment re-runs segment + track on a finished run's subject-space
    images: the subject-space lesion masks it writes are its own (benchmarks/segmentation.py
    scores them), here equal to the pipeline's (same code, same images) and to its dseg > 0; the
    native-space masks, which it does not recompute, are not linked in stale."""
    import nibabel as nib

    from benchmarks.tracking import resegment

    assert sample_run["status"] == 0
    src, sub = sample_run["out"], "01"
    resegment(src, tmp_path, sub, CONFIG, 1, sample_run["bids"])
    masks = sorted((tmp_path / f"sub-{sub}").rglob("*_label-lesion_desc-*_mask.nii.gz"))
    assert masks and all("_space-subject_" in m.name for m in masks)
    assert len(masks) == len(list((src / f"sub-{sub}").rglob(
        "*_space-subject_label-lesion_desc-*_mask.nii.gz")))
    for m in masks:
        assert not m.is_symlink()
        dseg = Path(str(m).replace("_label-lesion_desc-", "_desc-").replace("_mask.", "_dseg."))
        new = np.asarray(nib.load(m).dataobj) > 0
        assert np.array_equal(new, np.asarray(nib.load(dseg).dataobj) > 0)
        assert np.array_equal(new, np.asarray(nib.load(src / m.relative_to(tmp_path)).dataobj) > 0)
