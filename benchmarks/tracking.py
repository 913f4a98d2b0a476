"""Benchmark: lesion tracking and ADC dynamics against the phantom's ground truth.

Simulates ``--subjects`` phantom subjects (preset ``mixed``: seed case, MS-like, control,
cycled), then evaluates the same metrics twice:

* **truth masks** (analytics alone): ``core.tracking`` + ``core.dynamics`` on the truth-space
  truth masks and true rADC (read from ``derivatives/truth``), against the truth tables and
  the MS-like *designed* events;
* **whole chain**: the ``lesionlapse`` CLI (subprocess) on the simulated BIDS data; its
  subject-space lesion ids and rADC are mapped into the truth space through the pipeline's
  ``from-FLAIR_to-subject`` and the phantom's ``from-truth_to-FLAIR`` transforms and matched to
  the truth lesions by overlap.

Metrics: event classification (accuracy, confusion matrix, per designed lesion), rADC error
per session in the lesion masks, pseudonormalized-fraction error, pseudonormalization-day
error, lesion volume error. Prints the tables and writes ``benchmarks/results/tracking.md``.

Usage::

    python benchmarks/tracking.py                     # 20 subjects, small grid
    python benchmarks/tracking.py --subjects 3 --workdir /tmp/trk
    python benchmarks/tracking.py --skip-pipeline     # truth-mask part only
    python benchmarks/tracking.py --pipeline-subjects 2 --pipeline-out OUT  # existing outputs
    python benchmarks/tracking.py --time-budget-min 30  # whole chain on as many as fit
    python benchmarks/tracking.py --pipeline-out OUT --only 01,02 --dump D1  # a chunk ...
    python benchmarks/tracking.py --pool D1 D2 D3  # ... and the chunks' report, pooled

The CLI runs once per subject (in subject order), so a subject that fails or a time budget
that runs out leaves the subjects already finished to be evaluated. To measure a committed
state on a checkout with other work in progress, run it from an export, e.g.
``git archive HEAD | tar -x -C SRC; cd SRC; PYTHONPATH=SRC python benchmarks/tracking.py
--source-commit $(git -C REPO rev-parse --short HEAD) --out REPO/benchmarks/results/tracking.md``.

A work directory is reused: the phantom is not rewritten when it exists with the same preset,
seed, grid and subject count, and the pipeline reuses its Nipype cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common as C
from pipeline.config import Config, load_config
from pipeline.core import dynamics
from pipeline.core.registration import invert_transform
from pipeline.simulate.acquisition import GRIDS
from pipeline.simulate.anatomy import TRUTH_SPACING_MM

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "event accuracy (truth events)": ">= 95 %",
    "event accuracy (designed, MS-like)": ">= 95 % (100 % from truth masks)",
    "mean abs rADC error in lesion": "<= 0.03",
    "mean abs pseudonormalized-fraction error": "<= 5 pp",
    "mean abs pseudonormalization-day error": "<= 2 days",
    "mean abs lesion volume error": "<= 10 %",
}
RADC_COLUMNS = ("radc_mean_restricted", "radc_mean_flair", "radc_mean_ever_restricted")
VOLUME_COLUMNS = ("flair_volume_ml", "restricted_volume_ml")


@dataclass
class Result:
    """Tables and truth-space lesion ids of one subject, from truth masks or the pipeline."""

    sessions: pd.DataFrame
    events: pd.DataFrame
    lesions: pd.DataFrame
    summary: pd.DataFrame
    dseg: dict[str, list[np.ndarray]]
    radc_in_truth_restricted: list[float] | None = None
    adc_in_truth_restricted: list[float] | None = None
    radc_maps: list[np.ndarray] | None = None  # the pipeline's rADC in the truth space
    adc_maps: list[np.ndarray] | None = None  # the pipeline's ADC (um^2/s) in the truth space


# --------------------------------------------------------------------------------------------
# data


def _cli() -> list[str]:
    """The installed console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("lesionlapse")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())"]


def simulate(bids: Path, n: int, seed: int, grid: str, preset: str) -> None:
    name = f"lesionlapse phantom ({preset}, grid {grid}, seed {seed})"
    desc = bids / "dataset_description.json"
    if desc.exists():
        have = json.loads(desc.read_text()).get("Name")
        if have == name and len(C.subjects(bids)) == n:
            print(f"reusing phantom {bids} ({n} subjects)")
            return
        raise SystemExit(f"{bids} holds another dataset ({have}); choose another --workdir")
    t0 = time.perf_counter()
    subprocess.run([*_cli(), "simulate", str(bids), "--preset", preset, "--subjects", str(n),
                    "--seed", str(seed), "--grid", grid], check=True)
    print(f"simulated {n} subjects in {time.perf_counter() - t0:.0f} s")


def run_pipeline(bids: Path, out: Path, work: Path, nprocs: int, subs: list[str],
                 budget_s: float | None = None) -> dict[str, float]:
    """The CLI once per subject, in order, until ``budget_s`` is spent (a started subject is
    finished). Returns the wall time of every subject run; the log is ``pipeline.log``."""
    log = work.parent / "pipeline.log"
    log.write_text("")
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    for sub in subs:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            print(f"time budget spent: whole chain on {len(seconds)} subjects", flush=True)
            break
        cmd = [*_cli(), str(bids), str(out), "participant", "-w", str(work), "--nprocs",
               str(nprocs), "--participant-label", sub]
        print("running:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds[sub] = time.perf_counter() - t0
        with log.open("a") as f:
            f.write(f"### sub-{sub}: exit {proc.returncode}, {seconds[sub]:.0f} s\n")
            f.write(proc.stdout + proc.stderr)
        print(f"sub-{sub}: exit {proc.returncode} in {seconds[sub]:.0f} s", flush=True)
    return seconds


def from_truth(truth: C.Truth, config: Config) -> Result:
    a = C.analyse_truth(truth, config)
    return Result(a.sessions, a.events, a.lesions, a.summary,
                  {k: list(v) for k, v in a.dseg.items()})


def from_pipeline(out: Path, truth: C.Truth) -> Result:
    """The pipeline's tables, and its lesion ids and rADC resampled into the truth space."""
    sub = truth.sub
    base = out / f"sub-{sub}"
    tables = {name: C.read_tsv(base / f"sub-{sub}_desc-{name}.tsv")
              for name in ("sessions_timeseries", "events", "lesions_timeseries",
                           "lesions_summary")}
    dseg: dict[str, list] = {k: [] for k in C.KINDS}
    radc_means, adc_means, radc_maps, adc_maps = [], [], [], []
    for k, ses in enumerate(truth.sessions):
        transform = C.truth_to_subject(out, truth, ses)
        reference = sitk.ReadImage(str(truth.image(ses)))
        for kind in C.KINDS:
            img = sitk.ReadImage(str(C.pipeline_file(
                out, sub, ses, f"*_space-subject_desc-{kind}_dseg.nii.gz")))
            dseg[kind].append(C.to_truth_space(img, reference, transform,
                                               interpolator=sitk.sitkNearestNeighbor)
                              .astype(np.int32))
        radc = sitk.Cast(sitk.ReadImage(str(C.pipeline_file(
            out, sub, ses, "*_space-subject_desc-relative_ADC.nii.gz"))), sitk.sitkFloat32)
        mapped = C.to_truth_space(radc, reference, transform, interpolator=sitk.sitkLinear)
        radc_means.append(dynamics.masked_mean(mapped, truth.masks["restricted"][k]))
        radc_maps.append(mapped)
        adc = sitk.Cast(sitk.ReadImage(str(C.pipeline_file(
            out, sub, ses, "*_space-subject_ADC.nii.gz"))), sitk.sitkFloat32)
        mapped = C.to_truth_space(adc, reference, transform, interpolator=sitk.sitkLinear)
        adc_means.append(dynamics.masked_mean(mapped, truth.masks["restricted"][k]))
        adc_maps.append(mapped)
    return Result(tables["sessions_timeseries"], tables["events"], tables["lesions_timeseries"],
                  tables["lesions_summary"], dseg, radc_means, adc_means, radc_maps, adc_maps)


def native_dwi_inplane(bids: Path, sub: str, ses: str) -> float:
    """The in-plane voxel (mm) of the session's BIDS DWI (header only), as the pipeline's
    resample node reads it from the native trace
    (:func:`pipeline.core.restricted.dwi_inplane_mm`)."""
    from pipeline.core.restricted import dwi_inplane_mm
    from pipeline.io import read_spacing

    path = bids / f"sub-{sub}" / f"ses-{ses}" / "dwi" / f"sub-{sub}_ses-{ses}_dwi.nii.gz"
    if not path.exists():
        raise SystemExit(f"--resegment: {path} not found (the native DWI sets the restricted "
                         "edge step's reach); pass the phantom's --workdir")
    return dwi_inplane_mm(read_spacing(path))


def resegment(src: Path, dst: Path, sub: str, config: Config, nprocs: int,
              bids: Path) -> None:
    """Re-run segmentation, tracking and dynamics of ``sub`` on the subject-space images of the
    derivatives in ``src`` (FLAIR, brain mask, trace DWI, ADC; the registration is kept) with
    this source tree, into a mirror ``dst`` that links every other file of ``src``. Measures a
    change of the segment/track steps on a finished run without re-registering. ``bids``: the
    dataset of that run (each session's native DWI grid, :func:`native_dwi_inplane`)."""
    from pipeline.interfaces.outputs import copy_to_derivative
    from pipeline.interfaces.segmentation import SegmentSessions
    from pipeline.interfaces.tracking import TrackLesions

    cfg = config.to_dict()
    base = src / f"sub-{sub}"
    sessions = pd.read_csv(base / f"sub-{sub}_desc-sessions_timeseries.tsv", sep="\t",
                           dtype={"session": str})
    labels, days = list(sessions["session"]), [float(d) for d in sessions["day"]]
    out = dst / f"sub-{sub}"
    if out.exists():
        shutil.rmtree(out)
    # "_label-lesion_desc-": the subject-space masks are written again below; the native-space
    # masks would need the native_masks node and are left out rather than linked stale
    regenerated = ("_space-subject_desc-flair_dseg.", "_space-subject_desc-restricted_dseg.",
                   "_space-subject_desc-relative_ADC.", "_label-lesion_desc-",
                   "_desc-sessions_timeseries.", "_desc-events.", "_desc-lesions_timeseries.",
                   "_desc-lesions_summary.", "_desc-lineage.")
    for f in base.rglob("*"):
        if f.is_file() and not any(r in f.name for r in regenerated):
            (out / f.relative_to(base)).parent.mkdir(parents=True, exist_ok=True)
            (out / f.relative_to(base)).symlink_to(f)

    def files(pattern: str) -> list[str]:
        return [str(C.pipeline_file(src, sub, ses, pattern)) for ses in labels]

    with tempfile.TemporaryDirectory(prefix=f"reseg-{sub}-") as tmp:
        cwd = Path.cwd()
        try:
            os.chdir(tmp)
            seg = SegmentSessions(
                flair=files("*_space-subject_desc-preproc_FLAIR.nii.gz"),
                brain_mask=files("*_space-subject_desc-brain_mask.nii.gz"),
                trace=files("*_space-subject_desc-trace_dwi.nii.gz"),
                adc=files("*_space-subject_ADC.nii.gz"), labels=labels,
                dwi_inplane_mm=[native_dwi_inplane(bids, sub, ses) for ses in labels],
                segmentation=cfg["segmentation"], dynamics=cfg["dynamics"],
                n_workers=nprocs).run().outputs
            trk = TrackLesions(
                flair_lesion=seg.flair_lesion, restricted=seg.restricted,
                shine_through=seg.shine_through, adc=files("*_space-subject_ADC.nii.gz"),
                radc=seg.radc, references=seg.references, labels=labels, days=days,
                tracking=cfg["tracking"], dynamics=cfg["dynamics"]).run().outputs
        finally:
            os.chdir(cwd)
        # the nodes write plain .nii; written as the pipeline writes its .nii.gz derivatives
        for i, ses in enumerate(labels):
            for kind, folder in (("flair", "anat"), ("restricted", "dwi")):
                copy_to_derivative(getattr(trk, f"{kind}_dseg")[i], out / f"ses-{ses}" / folder /
                                   f"sub-{sub}_ses-{ses}_space-subject_desc-{kind}_dseg.nii.gz")
                mask = seg.flair_lesion[i] if kind == "flair" else seg.restricted[i]
                copy_to_derivative(mask, out / f"ses-{ses}" / folder / f"sub-{sub}_ses-{ses}"
                                   f"_space-subject_label-lesion_desc-{kind}_mask.nii.gz")
            copy_to_derivative(seg.radc[i], out / f"ses-{ses}" / "dwi" /
                               f"sub-{sub}_ses-{ses}_space-subject_desc-relative_ADC.nii.gz")
        for name, table in (("sessions_timeseries", trk.sessions_table),
                            ("events", trk.events_table),
                            ("lesions_timeseries", trk.lesions_table),
                            ("lesions_summary", trk.summary_table),
                            ("lineage", trk.lineage_table)):
            shutil.copy(table, out / f"sub-{sub}_desc-{name}.tsv")


def from_truth_in_subject_space(out: Path, truth: C.Truth, config: Config) -> Result:
    """Tracking + dynamics on the truth masks and true rADC carried into the pipeline's subject
    space through the pipeline's own registration (nearest neighbour, so that a voxel's mask
    and rADC come from the same truth voxel), then mapped back like the pipeline's ids. Everything of the whole chain except the
    segmentation: registration, the 1 mm subject grid and the tracking/dynamics rules."""
    sub = truth.sub
    subject = sitk.ReadImage(str(C.pipeline_file(
        out, sub, None, f"sub-{sub}_space-subject_desc-brain_mask.nii.gz")))
    masks: dict[str, list] = {k: [] for k in C.KINDS}
    radc, transforms = [], []
    for ses in truth.sessions:
        to_subject = C.truth_to_subject(out, truth, ses)
        transforms.append(to_subject)
        to_truth = invert_transform(to_subject)  # point map subject -> truth

        def carry(path: Path) -> np.ndarray:
            img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)
            return sitk.GetArrayFromImage(sitk.Resample(
                img, subject, to_truth, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32))

        for kind in C.KINDS:
            masks[kind].append(carry(truth.image(ses, kind)) >= 0.5)
        r = carry(truth.root / f"ses-{ses}" / "dwi" /
                  f"sub-{sub}_ses-{ses}_space-truth_desc-true_rADC.nii.gz")
        radc.append(np.where(r > 0, r, np.nan).astype(np.float32))  # 0 = outside the brain
    refs = [float(s["reference_adc_um2_s"]) for s in truth.sim["sessions"]]
    voxel_ml = float(np.prod(subject.GetSpacing())) / 1000.0
    a = C.analyse(masks, radc, days=truth.days, sessions=truth.sessions, voxel_ml=voxel_ml,
                  spacing_mm=tuple(reversed(subject.GetSpacing())), config=config,
                  reference_um2_s=refs)
    reference = sitk.ReadImage(str(truth.image(truth.sessions[0])))
    dseg: dict[str, list] = {k: [] for k in C.KINDS}
    for kind in C.KINDS:
        for d, transform in zip(a.dseg[kind], transforms):
            img = sitk.GetImageFromArray(np.asarray(d, np.int32))
            img.CopyInformation(subject)
            dseg[kind].append(C.to_truth_space(img, reference, transform,
                                               interpolator=sitk.sitkNearestNeighbor))
    return Result(a.sessions, a.events, a.lesions, a.summary, dseg)


def native_truth(truth: C.Truth) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Per kind, per session: the phantom's truth lesion ids on the acquisition grid (FLAIR grid
    for FLAIR lesions, DWI grid for restricted ones; truth partial-volume fraction >= 0.5, as
    the phantom writes them) and that grid's voxel volume (mL). What a perfect segmentation of
    the acquired images could at best show."""
    out: dict[str, list] = {k: [] for k in C.KINDS}
    for ses in truth.sessions:
        for kind, folder in (("flair", "anat"), ("restricted", "dwi")):
            img = nib.load(str(truth.root / f"ses-{ses}" / folder /
                               f"sub-{truth.sub}_ses-{ses}_desc-{kind}lesions_dseg.nii.gz"))
            out[kind].append((np.asarray(img.dataobj).astype(np.int32),
                              float(abs(np.linalg.det(img.affine[:3, :3]))) / 1000.0))
    return out


def observable_rows(events: pd.DataFrame, native: dict[str, list], sessions: list[str],
                    min_ml: float) -> np.ndarray:
    """Per truth event row: whether the lesion is visible on the acquisition grid (at least
    ``min_ml`` of native-grid truth voxels) at every end of the interval where the truth has it.
    A lesion of a few truth voxels (2 mm on the small grid) that fills no acquisition voxel
    (small grid: FLAIR 2.4 x 2.4 x 5 mm, DWI 3.4 x 3.4 x 5.5 mm) to half cannot be found
    from the images. A ``merged`` or ``split`` row also needs every other lesion of its merge /
    split group in that interval (``predecessor_ids`` / ``successor_ids``, followed through the
    group) to be visible: a lesion merging with an invisible speck is, on the images, a lesion
    that grows. ``events`` is one kind's truth events table."""
    volumes = {(kind, k): _lesion_volumes(*grid) for kind, per_session in native.items()
               for k, grid in enumerate(per_session)}

    def seen(r) -> bool:
        k = sessions.index(r.from_session)
        ok = True
        for end, vol in ((k, r.volume_from_ml), (k + 1, r.volume_to_ml)):
            if vol > 0:
                ok &= volumes[(r.kind, end)].get(int(r.lesion_id), 0.0) >= min_ml
        return ok

    rows = list(events.itertuples())
    visible = {(r.from_session, int(r.lesion_id)): seen(r) for r in rows}
    ok = []
    for r in rows:
        good = visible[(r.from_session, int(r.lesion_id))]
        if good and r.event in ("merged", "split"):
            good = all(visible.get((r.from_session, j), True) for j in _event_group(events, r))
        ok.append(good)
    return np.asarray(ok, bool)


def _lesion_volumes(labels: np.ndarray, voxel_ml: float) -> dict[int, float]:
    """Truth lesion id -> its volume (mL) on one session's acquisition grid
    (:func:`native_truth`)."""
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return {int(i): float(c) * voxel_ml for i, c in zip(ids, counts)}


def _event_group(events: pd.DataFrame, row) -> set[int]:
    """The truth lesion ids of ``row``'s merge/split group in its interval (``predecessor_ids``
    / ``successor_ids`` followed through the group); just its own id for any other event."""
    def others(r) -> set[int]:
        return {int(v) for col in ("predecessor_ids", "successor_ids")
                for v in str(getattr(r, col, "") or "").split(";") if v.strip()}

    group = {int(row.lesion_id)}
    if row.event not in ("merged", "split"):
        return group
    links = {int(r.lesion_id): others(r)
             for r in events[events["from_session"] == row.from_session].itertuples()}
    todo = [int(row.lesion_id)]
    while todo:
        for j in links.get(todo.pop(), ()):
            if j not in group:
                group.add(j)
                todo.append(j)
    return group


GRID_ABSENT = "absent"  # native_events: no lesion of the row fills the acquisition grid


def native_events(events: pd.DataFrame, native: dict[str, list], sessions: list[str],
                  min_ml: float, tracking_config) -> list[str]:
    """Per truth event row: the event that the phantom's native-grid truth itself shows, i.e.
    what a perfect segmentation of the acquired images would give (the acquisition grid is
    re-posed every session, so the rows are judged per session, by truth lesion id).

    On each end of the interval the row's lesions (its merge/split group, else its own id) are
    those holding at least ``min_ml`` of acquisition-grid voxels (as :func:`observable_rows`).
    Their voxels are split into connected components (``tracking_config.connectivity``, on the
    acquisition grid); components below ``tracking_config.fragment_ratio`` of the largest are
    fragments, as in the tracker. None at either end: ``absent``; none at the from-session:
    ``new``; none at the to-session: ``resolved``; more components before than after:
    ``merged``; fewer: ``split``; one each, and the row's lesion a fragment apart from the
    others (components of its own, all fragments) that the truth ends at the from-session /
    starts at the to-session: ``merged`` / ``split`` (absorbed / shed, as the tracker calls
    it); else the lesions' total acquisition-grid volume classified with the tracking
    thresholds (``pipeline.core.tracking.classify_change``: enlarging / stable / shrinking).
    ``events`` is one kind's truth events table."""
    from pipeline.core.tracking import classify_change, label_components, majors

    trk = tracking_config
    cache: dict[tuple[str, int], tuple[np.ndarray, dict[int, float]]] = {}

    def grid(kind: str, k: int):
        if (kind, k) not in cache:
            labels, voxel_ml = native[kind][k]
            cache[(kind, k)] = (labels, _lesion_volumes(labels, voxel_ml))
        return cache[(kind, k)]

    def side(kind: str, k: int, group: set[int], own: int) -> tuple[int, float, bool]:
        """Components (not fragments) and total volume (mL) of the group's visible lesions;
        whether ``own`` is a fragment apart: only in components of its own, all fragments,
        beside another visible lesion of the group."""
        labels, volumes = grid(kind, k)
        seen = [j for j in group if volumes.get(j, 0.0) >= min_ml]
        if not seen:
            return 0, 0.0, False
        mask = np.isin(labels, seen)
        box = ndimage.find_objects(mask.astype(np.int8))[0]
        comps = label_components(mask[box], trk.connectivity)
        sizes = np.bincount(comps.ravel())[1:].astype(float)
        # the tracker's own fragment rule (pipeline.core.tracking.majors)
        major = set(majors(np.arange(1, sizes.size + 1), sizes, trk.fragment_ratio).tolist())
        fragment = False
        if own in seen and len(seen) > 1:
            mine = set(np.unique(comps[labels[box] == own]).tolist())
            theirs = set(np.unique(comps[mask[box] & (labels[box] != own)]).tolist())
            fragment = not (mine & theirs) and not (mine & major)
        return len(major), sum(volumes[j] for j in seen), fragment

    out = []
    for r in events.itertuples():
        k, own = sessions.index(r.from_session), int(r.lesion_id)
        group = _event_group(events, r)
        (n0, v0, apart0), (n1, v1, apart1) = (side(r.kind, j, group, own) for j in (k, k + 1))
        if n0 == 0 and n1 == 0:
            out.append(GRID_ABSENT)
        elif n0 == 0:
            out.append("new")
        elif n1 == 0:
            out.append("resolved")
        elif n0 > n1:
            out.append("merged")
        elif n0 < n1:
            out.append("split")
        elif n0 == 1 and apart0 and not r.volume_to_ml > 0:  # a fragment absorbed
            out.append("merged")
        elif n0 == 1 and apart1 and not r.volume_from_ml > 0:  # a fragment shed
            out.append("split")
        else:
            out.append(classify_change(v0, v1, enlarging_relative=trk.enlarging_relative,
                                       enlarging_absolute_ml=trk.enlarging_absolute_ml))
    return out


# --------------------------------------------------------------------------------------------
# evaluation of one subject


def evaluate(truth: C.Truth, res: Result, config: Config) -> dict[str, pd.DataFrame]:
    sub, preset = truth.sub, truth.preset
    tag = {"subject": sub, "preset": preset}
    out: dict[str, pd.DataFrame] = {}

    # events against the truth tracking, spatially matched
    pairs = C.event_confusion(truth.tables["events"], res.events, truth.dseg, res.dseg,
                              truth.sessions)
    min_ml = config.segmentation.min_lesion_volume_mm3 / 1000
    pairs["detectable"] = pairs["volume_ml"] >= min_ml
    native = native_truth(truth)
    # event_confusion lists, per kind, the truth rows in table order and then the spurious ones
    pairs["observable"] = False
    pairs["grid"] = ""  # the event the native-grid truth shows (native_events)
    for kind in C.KINDS:
        rows = pairs.index[(pairs["kind"] == kind) & (pairs["truth"] != C.SPURIOUS)]
        tev = truth.tables["events"][truth.tables["events"]["kind"] == kind]
        pairs.loc[rows, "observable"] = observable_rows(tev, native, truth.sessions, min_ml)
        pairs.loc[rows, "grid"] = native_events(tev, native, truth.sessions, min_ml,
                                                config.tracking)
    pairs["resolvable"] = pairs["observable"] & (pairs["grid"] == pairs["truth"])
    out["events"] = pairs.assign(**tag)

    # designed events (MS-like)
    if truth.sim.get("designed_lesions"):
        expected = C.designed_events(truth.sim, config)
        regions = C.design_regions(truth.sim, truth.affine, truth.radc[0].shape)
        flair = res.events[res.events["kind"] == "flair"]
        obs = C.observed_design_events(expected, regions, res.dseg["flair"], flair,
                                       truth.sessions)
        touching = C.design_collisions(truth.sim, regions)
        # the truth row of the truth lesion holding most of the designed ovoid, as
        # observed_design_events finds the pipeline's: what the acquisition grid shows of it
        truth_rows = pairs[(pairs["kind"] == "flair") & (pairs["truth"] != C.SPURIOUS)]
        truth_rows = truth_rows.set_index(["lesion_id", "from_session"])
        grid, seen = [], []
        for row in obs.itertuples():
            k = row.interval
            ids = [C._majority_id(truth.dseg["flair"][j], regions[row.design_id][j])
                   if regions[row.design_id][j].any() else 0 for j in (k, k + 1)]
            key = (ids[0] or ids[1], truth.sessions[k])
            hit = truth_rows.loc[key] if key[0] and key in truth_rows.index else None
            grid.append(str(hit["grid"]) if hit is not None else GRID_ABSENT)
            seen.append(bool(hit["observable"]) if hit is not None else False)
        obs = obs.assign(grid=grid)
        obs["resolvable"] = np.asarray(seen) & (obs["grid"] == obs["expected"])
        out["designed"] = obs.assign(collides=obs["design_id"].isin(touching), **tag)

    # per session: rADC, pseudonormalized fraction, volumes
    want = truth.tables["sessions_timeseries"].set_index("session")
    got = res.sessions.set_index("session").reindex(want.index)
    rows = []
    deep_wm = None
    if res.adc_maps is not None:  # pure white matter 4 mm (2 truth voxels) from anything else
        wm = np.asarray(nib.load(str(truth.root / "anat" /
                                     f"sub-{sub}_space-truth_label-WM_probseg.nii.gz")).dataobj)
        deep_wm = ndimage.binary_erosion(wm >= 0.9, iterations=_voxels(4.0, truth))
    truth_spacing = truth.spacing_mm
    for ses in want.index:
        row = {**tag, "session": ses, "day": float(want.loc[ses, "day"])}
        for col in RADC_COLUMNS + ("pseudonormalized_fraction",) + VOLUME_COLUMNS:
            row[f"{col}_truth"] = float(want.loc[ses, col])
            row[f"{col}_got"] = float(got.loc[ses, col])
        k = truth.sessions.index(ses)
        # the rADC of the restricted lesions' core (dynamics.lesion_core), same definition on
        # both sides: the truth's from its truth-space masks and noise-free rADC, computed here (the
        # phantom's stored tables may predate the column)
        core = dynamics.lesion_core(truth.masks["restricted"][k], spacing_mm=truth_spacing,
                                    depth_mm=config.dynamics.radc_core_depth_mm)
        row["radc_mean_restricted_core_truth"] = dynamics.masked_mean(truth.radc[k], core)
        row["radc_mean_restricted_core_got"] = (
            float(got.loc[ses, "radc_mean_restricted_core"])
            if "radc_mean_restricted_core" in got.columns else np.nan)
        if res.radc_maps is not None:
            row["radc_map_in_truth_restricted_core"] = dynamics.masked_mean(res.radc_maps[k], core)
        ref = float(truth.sim["sessions"][k]["reference_adc_um2_s"])
        row["adc_nawm_truth"] = ref
        for kind in C.KINDS:  # the truth masks on the acquisition grid (partial volume >= 0.5)
            labels, voxel_ml = native[kind][k]
            row[f"{kind}_volume_ml_native_truth"] = float(np.count_nonzero(labels)) * voxel_ml
        row["adc_nawm_got"] = float(got.loc[ses, "adc_nawm_um2_s"])
        if res.radc_in_truth_restricted is not None:
            row["radc_map_in_truth_restricted"] = res.radc_in_truth_restricted[k]
            row["adc_map_in_truth_restricted"] = res.adc_in_truth_restricted[k]
            row["adc_in_truth_restricted_truth"] = ref * float(want.loc[ses, "radc_mean_restricted"])
        if res.radc_maps is not None:
            row["radc_map_in_truth_flair"] = dynamics.masked_mean(res.radc_maps[k],
                                                                  truth.masks["flair"][k])
            # the same 6 mm inside the restricted mask: away from the rim that the DWI voxel
            # (small grid 3.4 x 3.4 x 5.5 mm, clinical 2 x 2 x 4 mm) mixes with surrounding tissue
            core = ndimage.binary_erosion(truth.masks["restricted"][k],
                                          iterations=_voxels(6.0, truth))
            row["adc_map_in_truth_restricted_core"] = dynamics.masked_mean(res.adc_maps[k], core)
            row["adc_in_truth_restricted_core_truth"] = ref * dynamics.masked_mean(
                truth.radc[k], core)
            lesions = truth.masks["flair"][k] | (truth.radc[k] < 0.98) & (truth.radc[k] > 0)
            far = ndimage.distance_transform_edt(~lesions, sampling=truth_spacing) >= 6.0
            v = res.adc_maps[k][deep_wm & far]
            v = v[np.isfinite(v) & (v > 0)]
            row["adc_map_in_deep_wm"] = float(np.median(v)) if v.size else np.nan
        rows.append(row)
    out["sessions"] = pd.DataFrame(rows)

    # per lesion: pseudonormalization day and volume, matched by overlap
    summary = truth.tables["lesions_summary"]
    got_summary = res.summary.set_index(["kind", "lesion_id"])
    got_lesions = res.lesions.set_index(["kind", "lesion_id", "session"])
    lrows, vrows = [], []
    for kind in C.KINDS:
        matches = [C.best_match(t, o)[0] for t, o in zip(truth.dseg[kind], res.dseg[kind])]
        tl = truth.tables["lesions_timeseries"]
        tl = tl[(tl["kind"] == kind) & tl["present"].astype(bool)]
        for r in tl.itertuples():
            k = truth.sessions.index(r.session)
            other = matches[k].get(int(r.lesion_id))
            vol = (float(got_lesions.loc[(kind, other, r.session), "volume_ml"])
                   if other is not None and (kind, other, r.session) in got_lesions.index
                   else 0.0)
            vrows.append({**tag, "kind": kind, "lesion_id": r.lesion_id, "session": r.session,
                          "volume_truth": r.volume_ml, "volume_got": vol})
        for r in summary[summary["kind"] == kind].itertuples():
            if not np.isfinite(r.pseudonormalization_day):
                continue
            first = truth.sessions[[float(d) for d in truth.days].index(float(r.first_day))]
            k0 = truth.sessions.index(first)
            other = matches[k0].get(int(r.lesion_id))
            g = got_summary.loc[(kind, other)] if other is not None and (
                kind, other) in got_summary.index else None
            row = {
                **tag, "kind": kind, "lesion_id": r.lesion_id, "max_volume_ml": r.max_volume_ml,
                "day_truth": r.pseudonormalization_day, "censored_truth": bool(r.censored),
                "day_got": float(g["pseudonormalization_day"]) if g is not None else np.nan,
                "censored_got": bool(g["censored"]) if g is not None else None,
                "matched": g is not None,
            }
            if res.radc_maps is not None:
                row.update(_pn_day_decomposition(truth, res, kind, int(r.lesion_id), k0, config))
            lrows.append(row)
    out["pn_day"] = pd.DataFrame(lrows)
    out["volumes"] = pd.DataFrame(vrows)
    return out


def _voxels(mm: float, truth: C.Truth) -> int:
    """``mm`` in voxels of the (isotropic) truth grid: 2 mm on the small grid, 1 mm clinical."""
    spacing = truth.spacing_mm
    if max(spacing) - min(spacing) > 1e-6:
        raise ValueError(f"sub-{truth.sub}: truth grid not isotropic {spacing}")
    return max(1, int(round(mm / spacing[0])))


def _pn_day_decomposition(truth: C.Truth, res: Result, kind: str, lesion: int, k0: int,
                          config: Config) -> dict[str, float]:
    """The pseudonormalization day of one truth lesion recomputed on the truth lesion's own
    first-session region (as the truth does, ``radc_mean_initial``) from (a) the pipeline's
    rADC map: segmentation taken out, the ADC measurement left in; (b) the pipeline's ADC map
    divided by the true NAWM reference: also the reference's error taken out. The day from the
    true rADC on the same region (``day_truth_region``) must equal the truth table's day."""
    region = truth.dseg[kind][k0] == lesion
    days = np.asarray(truth.days[k0:], float)
    refs = [float(s["reference_adc_um2_s"]) for s in truth.sim["sessions"]]
    cut = config.dynamics.restricted_below

    def day(series: list[float]) -> float:
        d, censored = dynamics.pseudonormalization_day(days, np.asarray(series, float), cut)
        return np.nan if censored else d

    k = range(k0, len(truth.sessions))
    return {
        "day_truth_region": day([dynamics.masked_mean(truth.radc[i], region) for i in k]),
        "day_map_truth_region": day([dynamics.masked_mean(res.radc_maps[i], region) for i in k]),
        "day_adc_true_ref": day([dynamics.masked_mean(res.adc_maps[i], region) / refs[i]
                                 for i in k]),
    }


def gather(parts: list[dict[str, pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    keys = {k for p in parts for k in p}
    return {k: pd.concat([p[k] for p in parts if k in p and len(p[k])], ignore_index=True)
            if any(k in p and len(p[k]) for p in parts) else pd.DataFrame() for k in keys}


# --------------------------------------------------------------------------------------------
# metrics


def _pct(x: float) -> str:
    return "n/a" if not np.isfinite(x) else f"{100 * x:.1f} %"


def _signed_pct(rel: pd.Series) -> str:
    rel = rel[np.isfinite(rel)]
    if not len(rel):
        return "n/a"
    return f"mean {100 * rel.mean():+.1f} %, range {100 * rel.min():+.1f} to {100 * rel.max():+.1f} %"


def _abs_stats(err: pd.Series) -> tuple[float, float, int]:
    err = err[np.isfinite(err)]
    return (float(err.abs().mean()) if len(err) else np.nan,
            float(err.abs().max()) if len(err) else np.nan, len(err))


def metrics(r: dict[str, pd.DataFrame]) -> dict[str, str]:
    """The headline numbers of one run (strings for the summary table)."""
    m: dict[str, str] = {}
    ev = r.get("events", pd.DataFrame())
    if len(ev):
        real = ev[ev["truth"] != C.SPURIOUS]
        det = real[real["detectable"]]
        obs = real[real["observable"]]
        res = real[real["resolvable"]] if "resolvable" in real else real.iloc[:0]
        m["event accuracy (truth events)"] = (
            f"{_pct((real['truth'] == real['pipeline']).mean())} of {len(real)}; "
            f"{_pct((det['truth'] == det['pipeline']).mean())} of {len(det)} detectable; "
            f"{_pct((obs['truth'] == obs['pipeline']).mean())} of {len(obs)} observable on the "
            f"acquisition grid (target); {_pct((res['truth'] == res['pipeline']).mean())} of "
            f"{len(res)} resolvable (diagnostic); {int((ev['truth'] == C.SPURIOUS).sum())} "
            "spurious")
    des = r.get("designed", pd.DataFrame())
    if len(des):
        ok = des["expected"] == des["observed"]
        clean = ~des["collides"]
        m["event accuracy (designed, MS-like)"] = (
            f"{_pct(ok.mean())} of {len(des)}; {_pct(ok[clean].mean())} of {int(clean.sum())} "
            "of lesions not touching another designed lesion")
        if "resolvable" in des:
            res = des["resolvable"].astype(bool)
            m["event accuracy (designed, MS-like)"] += (
                f"; {_pct(ok[res].mean())} of {int(res.sum())} resolvable (diagnostic)")
    s = r["sessions"]
    mean, mx, n = _abs_stats(s["radc_mean_restricted_core_got"]
                             - s["radc_mean_restricted_core_truth"])
    parts = [f"restricted core {mean:.2g} (max {mx:.2g}, n={n})"]
    if "radc_map_in_truth_restricted_core" in s:
        mean, mx, n = _abs_stats(s["radc_map_in_truth_restricted_core"]
                                 - s["radc_mean_restricted_core_truth"])
        parts.append(f"map in truth restricted core {mean:.2g} (max {mx:.2g}, n={n})")
    for col in RADC_COLUMNS:
        mean, mx, n = _abs_stats(s[f"{col}_got"] - s[f"{col}_truth"])
        parts.append(f"{col.replace('radc_mean_', '')} {mean:.2g} (max {mx:.2g}, n={n})")
    if "radc_map_in_truth_restricted" in s:
        mean, mx, n = _abs_stats(s["radc_map_in_truth_restricted"] - s["radc_mean_restricted_truth"])
        parts.append(f"map in truth restricted mask {mean:.2g} (max {mx:.2g}, n={n})")
    if "radc_map_in_truth_flair" in s:
        mean, mx, n = _abs_stats(s["radc_map_in_truth_flair"] - s["radc_mean_flair_truth"])
        parts.append(f"map in truth FLAIR mask {mean:.2g} (max {mx:.2g}, n={n})")
    if "adc_map_in_truth_restricted" in s:
        rel = s["adc_map_in_truth_restricted"] / s["adc_in_truth_restricted_truth"] - 1
        parts.append(f"(ADC map in truth restricted mask {_signed_pct(rel)}")
        if "adc_map_in_truth_restricted_core" in s:
            rel = s["adc_map_in_truth_restricted_core"] / s["adc_in_truth_restricted_core_truth"] - 1
            parts.append(f"6 mm inside that mask {_signed_pct(rel)}")
        rel = s["adc_nawm_got"] / s["adc_nawm_truth"] - 1
        parts.append(f"NAWM reference ADC {_signed_pct(rel)}")
        if "adc_map_in_deep_wm" in s:
            rel = s["adc_map_in_deep_wm"] / s["adc_nawm_truth"] - 1
            parts.append(f"median of the ADC map in truth white matter (probability >= 0.9) "
                         f"eroded by 4 mm and 6 mm from lesions {_signed_pct(rel)}")
        parts[-1] += ")"
    m["mean abs rADC error in lesion"] = "; ".join(parts)
    mean, mx, n = _abs_stats(s["pseudonormalized_fraction_got"] - s["pseudonormalized_fraction_truth"])
    missing = int((np.isfinite(s["pseudonormalized_fraction_truth"])
                   & ~np.isfinite(s["pseudonormalized_fraction_got"])).sum())
    m["mean abs pseudonormalized-fraction error"] = (
        f"{100 * mean:.2g} pp (max {100 * mx:.2g} pp, n={n}, {missing} missing)")
    pn = r.get("pn_day", pd.DataFrame())
    if len(pn):
        both = pn[pn["matched"] & ~pn["censored_truth"] & (pn["censored_got"] == False)]
        mean, mx, n = _abs_stats(both["day_got"] - both["day_truth"])
        within = float(((both["day_got"] - both["day_truth"]).abs() <= 2).mean()) if n else np.nan
        cens = pn[pn["matched"]]
        agree = float((cens["censored_got"] == cens["censored_truth"]).mean()) if len(cens) else np.nan
        m["mean abs pseudonormalization-day error"] = (
            f"{mean:.2g} d (max {mx:.2g} d, {_pct(within)} within 2 d, n={n} uncensored pairs); "
            f"{int(pn['matched'].sum())}/{len(pn)} lesions matched, censoring agrees {_pct(agree)}")
        if "day_map_truth_region" in pn:
            parts = []
            for col, what in (("day_map_truth_region", "pipeline rADC map"),
                              ("day_adc_true_ref", "pipeline ADC map / true NAWM reference")):
                sel = pn[~pn["censored_truth"]]
                err = sel[col] - sel["day_truth"]
                mean, mx, n = _abs_stats(err)
                parts.append(f"{what} {mean:.2g} d (max {mx:.2g} d, n={n}, "
                             f"{int(sel[col].isna().sum())} censored)")
            m["mean abs pseudonormalization-day error"] += (
                "; on the truth lesion regions: " + "; ".join(parts))
    parts = []
    for col in VOLUME_COLUMNS:
        t = s[f"{col}_truth"]
        rel = (s[f"{col}_got"] - t) / t.where(t > 0)
        mean, mx, n = _abs_stats(rel)
        parts.append(f"{col.replace('_volume_ml', '')} total {_pct(mean)} (max {_pct(mx)}, n={n})")
    if "flair_volume_ml_native_truth" in s:
        for col in VOLUME_COLUMNS:
            kind = col.replace("_volume_ml", "")
            t, nat = s[f"{col}_truth"], s[f"{kind}_volume_ml_native_truth"]
            mean, mx, n = _abs_stats((s[f"{col}_got"] - nat) / nat.where(nat > 0))
            tmean, tmx, _ = _abs_stats((nat - t) / t.where(t > 0))
            parts.append(f"{kind} total vs truth on the acquisition grid {_pct(mean)} (max "
                         f"{_pct(mx)}, n={n}; that truth vs the truth-space truth {_pct(tmean)}, max "
                         f"{_pct(tmx)})")
    vol = r.get("volumes", pd.DataFrame())
    if len(vol):
        for kind in C.KINDS:
            v = vol[vol["kind"] == kind]
            if len(v):
                rel = (v["volume_got"] - v["volume_truth"]) / v["volume_truth"]
                parts.append(f"{kind} per lesion median {_pct(float(rel.abs().median()))} "
                             f"(n={len(v)}, {int((v['volume_got'] == 0).sum())} unmatched)")
    m["mean abs lesion volume error"] = "; ".join(parts)
    return m


def session_details(r: dict[str, pd.DataFrame]) -> pd.DataFrame:
    s = r["sessions"]
    cols = {"subject": s["subject"], "preset": s["preset"], "session": s["session"],
            "day": s["day"]}
    for col, short in (("radc_mean_restricted_core", "rADC restr core"),
                       ("radc_mean_restricted", "rADC restr"), ("radc_mean_flair", "rADC FLAIR"),
                       ("pseudonormalized_fraction", "PN frac"),
                       ("restricted_volume_ml", "restr mL"), ("flair_volume_ml", "FLAIR mL")):
        cols[f"{short} truth"] = s[f"{col}_truth"]
        cols[f"{short} got"] = s[f"{col}_got"]
    return pd.DataFrame(cols)


# --------------------------------------------------------------------------------------------
# report


TRACKING = dataclasses.asdict(load_config().tracking)


REGISTRATION_RUN = "truth masks, pipeline registration"
VOLUME_EVENTS = ("enlarging", "stable", "shrinking")


def row_causes(runs: dict[str, dict]) -> pd.DataFrame | None:
    """Why each truth event row of the whole chain is wrong, by comparing it with the same row
    from the truth masks carried through the pipeline's registration (same subjects, same row
    order): wrong there too -> registration, grid or tracking rules; right there -> the
    difference is the segmentation (or the lesion is below the acquisition resolution).
    Returns the whole chain's truth event rows with a ``cause`` column."""
    if "whole chain" not in runs or REGISTRATION_RUN not in runs:
        return None
    wc, rg = (runs[n]["events"] for n in ("whole chain", REGISTRATION_RUN))
    wc = wc[wc["truth"] != C.SPURIOUS].reset_index(drop=True)
    rg = rg[rg["truth"] != C.SPURIOUS].reset_index(drop=True)
    if len(wc) != len(rg) or not (wc["truth"] == rg["truth"]).all():
        raise RuntimeError("the two runs' truth event rows differ")
    cause = np.select(
        [wc["pipeline"] == wc["truth"],
         rg["pipeline"] != rg["truth"],
         ~wc["observable"],
         wc["pipeline"] == C.MISSED,
         wc["truth"].isin(VOLUME_EVENTS) & wc["pipeline"].isin(VOLUME_EVENTS)],
        ["correct",
         "wrong from the truth masks too (registration, subject grid or tracking rules)",
         "segmentation: lesion below the acquisition resolution (not observable)",
         "segmentation: observable lesion missed",
         "segmentation: volume change misjudged (stable / enlarging / shrinking)"],
        "segmentation: lesions split or fused differently (new / merged / split / resolved)")
    return wc.assign(cause=cause)


def event_causes(runs: dict[str, dict]) -> pd.DataFrame | None:
    """Counts of :func:`row_causes` per cause and lesion kind."""
    wc = row_causes(runs)
    if wc is None:
        return None
    table = pd.crosstab(wc["cause"], wc["kind"], margins=True, margins_name="total")
    return table.sort_values("total", ascending=False)


def observable_wrong_rows(runs: dict[str, dict]) -> pd.DataFrame | None:
    """The whole chain's wrong truth event rows of lesions observable on the acquisition grid,
    one line each: subject, kind, truth lesion id, interval, truth and pipeline event, the
    truth lesion's and the matched pipeline id's volumes, cause (:func:`row_causes`)."""
    wc = row_causes(runs)
    if wc is None:
        return None
    w = wc[(wc["cause"] != "correct") & wc["observable"]]
    return pd.DataFrame({
        "subject": w["subject"], "preset": w["preset"], "kind": w["kind"],
        "lesion": w["lesion_id"].astype(int), "from session": w["from_session"],
        "truth": w["truth"], "pipeline": w["pipeline"], "grid shows": w["grid"],
        "truth mL": [f"{a:.3f} -> {b:.3f}" for a, b in zip(w["truth_from_ml"], w["truth_to_ml"])],
        "pipeline id": w["other_id"].map(lambda v: "" if pd.isna(v) else str(int(v))),
        "pipeline mL": ["" if pd.isna(a) else f"{a:.3f} -> {b:.3f}"
                        for a, b in zip(w["other_from_ml"], w["other_to_ml"])],
        "cause": w["cause"].str.replace("segmentation: ", "", regex=False),
    }).sort_values(["cause", "subject", "kind", "lesion", "from session"])


def _mm(spacing) -> str:
    return " x ".join(f"{v:g}" for v in spacing) + " mm"


def report(args, info, runs: dict[str, dict], timings: dict[str, float], subs, chain,
           chain_notes: list[str]) -> str:
    tmm = f"{TRUTH_SPACING_MM[args.grid]:g} mm"  # the phantom's truth grid
    flair_mm, dwi_mm = _mm(GRIDS[args.grid]["flair"][1]), _mm(GRIDS[args.grid]["dwi"][1])
    lines = ["# Tracking and ADC dynamics benchmark", "",
             "Generated by `benchmarks/tracking.py`; do not edit by hand.", "",
             "Command:", "", "```", "python " + " ".join(sys.argv), "```", "",
             f"Phantom: preset `{args.preset}`, {sum(subs.values())} subjects "
             f"({', '.join(f'{p}: {n}' for p, n in subs.items())}), seed {args.seed}, grid "
             f"`{args.grid}`, sessions at days 0, 3, 8, 45. Whole chain on "
             + (f"{sum(chain.values())} of them ({', '.join(f'{p}: {n}' for p, n in chain.items())})."
                if chain else "none" + (" (--skip-pipeline)." if args.skip_pipeline else "."))
             + (f" Pipeline derivatives read from `{args.pipeline_out}` (made beforehand by "
                "`lesionlapse BIDS OUT participant` on the same phantom; the phantom is "
                "deterministic per preset, seed, grid and subject index), not run by this "
                "command." if args.pipeline_out and chain else "")
             + (f" Segmentation, tracking and dynamics re-run by this source tree on the "
                f"subject-space images of those derivatives (`--resegment {args.resegment}`): "
                "registration and resampling as in that run." if args.resegment and chain
                else ""), "",
             *chain_notes,
             "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()), "",
             *(["Timings: " + "; ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
               if timings else [])]
    names = list(runs)
    summary = pd.DataFrame(
        {"target": TARGETS, **{n: metrics(runs[n]) for n in names}}).fillna("n/a")
    summary.index.name = "metric"
    lines += ["## Summary", "", C.markdown(summary), "",
              ("* *truth masks*: tracking + dynamics on the truth masks and true rADC (stored to "
              "1e-3, hence the tiny residuals); compared with the truth tables; not run with "
              "`--no-truth-run`."),
              ("* *whole chain*: the pipeline's own masks, lesion ids mapped into the truth space "
              "(nearest neighbour) and matched by largest overlap per session."),
              ("* *truth masks, pipeline registration*: the truth masks and true rADC carried "
              "into the pipeline's 1 mm subject space through the pipeline's own transforms "
              "(nearest neighbour), tracked and measured there, ids mapped back "
              "like the whole chain's, on the same subjects: the whole chain without its "
              "segmentation (registration, subject grid, tracking and dynamics rules); not run "
              "with `--no-registration-run`."),
              ("* Events: every truth event row (lesion id x interval, both kinds) against the "
              "event of the matched id; *detectable* = truth lesion at least "
              "`segmentation.min_lesion_volume_mm3`; *observable* = at every end of the "
              "interval where the truth has the lesion, it holds at least that volume of "
              "acquisition-grid voxels in the phantom's native-grid truth (truth fraction >= 0.5 "
              "on the FLAIR grid for FLAIR lesions, the DWI grid for restricted ones): the truth "
              f"is drawn on a {tmm} grid, the `{args.grid}` grid acquires FLAIR at {flair_mm} "
              f"and DWI at {dwi_mm}, so a lesion filling no acquisition voxel to half cannot be "
              "seen; "
              "*spurious* = event rows of ids overlapping no truth lesion. The target is "
              "judged on the observable rows. *resolvable* (a diagnostic denominator, a subset "
              "of the observable rows) = the event that the native-grid truth itself shows is "
              "the truth's (`native_events`): per session, the row's lesions (its merge/split "
              "group, else its own id) on the acquisition grid, split into connected "
              "components with the tracking connectivity and `fragment_ratio`; none before: "
              "new, none after: resolved, more components before than after: merged, fewer: "
              "split, a fragment apart that the truth ends / starts there: merged / split "
              "(absorbed / shed), else their acquisition-grid volumes classified with the tracking "
              "thresholds (`enlarging_relative`, `enlarging_absolute_ml`). An observable row "
              "that is not resolvable is an event the acquisition does not resolve (e.g. a "
              "0.5 mm radius change of a 4 mm lesion on 5 mm slices): even a perfect "
              "segmentation of the images would call it otherwise (column *grid shows* of the "
              "wrong-row listing)."),
              ("* Designed: the MS-like lesions' designed events (`designed_events`) against the "
              "event of the id holding most of the designed ovoid. The second figure leaves "
              "out every designed lesion whose ovoid touches a designed lesion other than its "
              "own partner (`design_collisions`; the phantom would fuse them, so their designed "
              "events could not be observed even on the truth masks). *resolvable*: the truth "
              "lesion holding most of the designed ovoid has an observable truth row in that "
              "interval whose native-grid event (as above) is the designed event."),
              ("* Tracking parameters: `[tracking]` of configs/default.toml "
              f"({', '.join(f'{k} = {v}' for k, v in TRACKING.items())}); components below "
              "`fragment_ratio` of the largest one of their merge/split group are absorbed or "
              "shed without making a merge or split."),
              ("* rADC, headline: *restricted core* = the session table's "
              "`radc_mean_restricted_core`, the mean rADC over the core of the restricted "
              "lesions (`dynamics.lesion_core`: per lesion the voxels at least "
              f"`dynamics.radc_core_depth_mm` = {load_config(args.config).dynamics.radc_core_depth_mm:g} mm "
              "inside its mask, its deepest voxels when it is thinner; the region a reader "
              "measures), from each run's own restricted mask and rADC map, against the same "
              f"on the truth's {tmm} restricted mask and noise-free rADC (computed by the "
              "benchmark with the same function: phantoms simulated before the column have "
              f"none in their truth tables). Both sides are the lesion's centre; the {tmm} "
              f"truth's outer millimetres are not resolved by the {dwi_mm} DWI voxel, "
              "which mixes them with the surrounding tissue (whole-mask means below). *map in "
              "truth restricted core*: the pipeline's rADC map over the truth's core (its "
              "segmentation taken out)."),
              ("* rADC, whole masks: session-table means in each run's own masks (restricted, FLAIR, "
              "ever-restricted), and the pipeline's rADC map averaged in the truth restricted "
              "and FLAIR masks (isolates ADC from segmentation); in brackets the signed relative error of "
              "the pipeline's ADC map in the truth restricted mask and of its NAWM reference "
              "ADC (truth: noise-free phantom ADC), which split the rADC error into numerator "
              "and denominator; the ADC error also 6 mm inside the truth restricted mask, where "
              "the DWI voxel no longer mixes lesion with surrounding tissue."),
              ("* Pseudonormalization day: per truth lesion with a defined day, against the "
              "matched lesion (largest overlap at the truth lesion's first session). Then the "
              "same day recomputed on the truth lesion's own first-session region from the "
              "pipeline's rADC map (segmentation and tracking taken out; what is left is the ADC "
              "measurement: partial volume, noise, registration, NAWM reference), and from the "
              "pipeline's ADC map over the true NAWM reference (the reference's error taken out "
              "too); days censored there are left out of that mean."),
              (f"* Volume: besides the {tmm} truth, against the truth on the acquisition grid "
              "(the phantom's native-grid truth masks, partial-volume fraction >= 0.5), with "
              f"how far that grid truth is from the {tmm} truth (*truth-space truth*): a half-voxel "
              f"rule on the acquisition grid already misses small lesions' volume, so the {tmm} truth stays "
              "the target."), ""]
    causes = event_causes(runs)
    if causes is not None:
        lines += ["Whole-chain truth event rows by cause (each wrong row of the whole chain set "
                  f"against the same row of *{REGISTRATION_RUN}*):", "", C.markdown(causes), ""]
        wrong = observable_wrong_rows(runs)
        lines += ["Whole-chain wrong rows of lesions observable on the acquisition grid (truth "
                  "lesion id and interval from the truth tables; *pipeline id* = the id "
                  "overlapping the truth lesion most, with its own volumes in that interval; "
                  "*grid shows* = the event of the native-grid truth, `native_events`):",
                  "", C.markdown(wrong, index=False) if len(wrong) else "none", ""]
    for n in names:
        r = runs[n]
        lines += [f"## {n}", ""]
        if len(r.get("events", [])):
            for kind in C.KINDS:
                ev = r["events"][r["events"]["kind"] == kind]
                if len(ev):
                    lines += [f"Event confusion, {kind} lesions (rows truth, columns {n}):", "",
                              C.markdown(C.confusion_table(ev, "truth", "pipeline")), ""]
        if len(r.get("designed", [])):
            d = r["designed"]
            lines += ["Designed events (MS-like), rows expected, columns observed:", "",
                      C.markdown(C.confusion_table(d, "expected", "observed")), ""]
            d = d.assign(ok=d["expected"] == d["observed"],
                         touching=d["subject"].where(d["collides"]))
            per = d.groupby(["design_id", "design"]).agg(
                accuracy=("ok", "mean"), resolvable=("resolvable", "mean"),
                subjects=("subject", "nunique"),
                subjects_touching=("touching", "nunique")).reset_index()
            lines += ["Per designed lesion (*resolvable*: fraction of its rows whose designed "
                      "event the native-grid truth shows):", "", C.markdown(per, index=False), ""]
        if len(r.get("pn_day", [])):
            lines += ["Pseudonormalization day per lesion:", "",
                      C.markdown(r["pn_day"].drop(columns=["preset"]), index=False,
                                 floatfmt=".3g"), ""]
        lines += ["Per session:", "", C.markdown(session_details(r), index=False,
                                                  floatfmt=".3g"), ""]
    return "\n".join(lines) + "\n"


RUN_NAMES = ("truth masks", "whole chain", REGISTRATION_RUN)


def _dump_name(run: str) -> str:
    """File-name prefix of a run's ``--dump`` tables."""
    return run.replace(" ", "_").replace(",", "")


def load_dumps(dirs: list[Path]) -> tuple[dict[str, dict[str, pd.DataFrame]], list[str]]:
    """The runs of several ``--dump`` folders (e.g. ``--only`` chunks of one phantom) pooled:
    every run's tables concatenated in folder order, and the command that wrote each folder
    (its ``command.txt``)."""
    runs: dict[str, dict[str, pd.DataFrame]] = {}
    commands = []
    for d in dirs:
        if not d.is_dir():
            raise SystemExit(f"--pool: no folder {d}")
        if (d / "command.txt").exists():
            commands.append((d / "command.txt").read_text().strip())
        for run in RUN_NAMES:
            for f in sorted(d.glob(f"{_dump_name(run)}-*.csv")):
                key = f.name[len(_dump_name(run)) + 1:-len(".csv")]
                table = pd.read_csv(f, dtype={"subject": str, "session": str,
                                              "from_session": str})
                runs.setdefault(run, {}).setdefault(key, []).append(table)
    if not runs:
        raise SystemExit(f"--pool: no dumped tables in {', '.join(map(str, dirs))}")
    pooled = {run: {key: pd.concat(parts, ignore_index=True) for key, parts in tables.items()}
              for run, tables in runs.items()}
    return {run: pooled[run] for run in RUN_NAMES if run in pooled}, commands


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", type=int, default=20, help="phantom subjects (default 20)")
    p.add_argument("--preset", default="mixed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="small", choices=("small", "clinical"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/lesionlapse-bench-tracking"))
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--pipeline-subjects", type=int, default=None, metavar="N",
                   help="run the whole chain on the first N subjects only (default: all)")
    p.add_argument("--only", default=None, metavar="LABELS",
                   help="evaluate only these phantom subjects, truth masks and whole chain "
                        "(comma-separated labels, e.g. 02,05; parameter studies)")
    p.add_argument("--no-registration-run", action="store_true",
                   help="skip the truth masks carried through the pipeline's registration (it "
                        "does not depend on the segmentation; without it the report has no "
                        "per-cause table and no listing of wrong rows)")
    p.add_argument("--skip-pipeline", action="store_true", help="truth-mask part only")
    p.add_argument("--no-truth-run", action="store_true",
                   help="skip the tracking + dynamics run on the truth masks (the analytics "
                        "alone; it does not depend on the pipeline's derivatives and on the "
                        "clinical grid's 1 mm truth takes longer than the whole chain); the "
                        "whole chain is scored against the phantom's truth tables either way")
    p.add_argument("--pipeline-out", type=Path, default=None, metavar="DIR",
                   help="evaluate existing pipeline derivatives in DIR (made from the same "
                        "phantom: same preset, seed, grid) instead of running the CLI")
    p.add_argument("--resegment", type=Path, default=None, metavar="DIR",
                   help="with --pipeline-out: re-run segmentation, tracking and dynamics with "
                        "this source tree on the subject-space images found there, into DIR "
                        "(a mirror linking the other files), and evaluate DIR")
    p.add_argument("--config", type=Path, default=None, metavar="TOML",
                   help="overlay on configs/default.toml for the analytics and --resegment "
                        "(e.g. to measure a parameter's effect)")
    p.add_argument("--time-budget-min", type=float, default=None, metavar="MIN",
                   help="start no further pipeline subject after MIN minutes (default: none)")
    p.add_argument("--source-commit", default=None, metavar="SHA",
                   help="git commit of this source tree when it is an export, not a checkout")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tracking.md")
    p.add_argument("--dump", type=Path, default=None, metavar="DIR",
                   help="also write every run's per-row tables (events, sessions, ...) as CSV "
                        "into DIR, for analyses beyond the report or --pool")
    p.add_argument("--pool", type=Path, nargs="+", default=None, metavar="DIR",
                   help="evaluate nothing: write the report of the --dump folders of earlier "
                        "runs pooled (e.g. --only chunks of one phantom; give the same --grid, "
                        "--preset, --seed)")
    args = p.parse_args(argv)
    if args.pool:
        runs, commands = load_dumps(args.pool)
        sessions = next(iter(runs.values()))["sessions"]
        presets = sessions.drop_duplicates("subject").set_index("subject")["preset"]
        counts = presets.value_counts().to_dict()
        chain = None
        if "whole chain" in runs:
            chain_subs = runs["whole chain"]["sessions"]["subject"].unique()
            chain = presets[chain_subs].value_counts().to_dict()
        notes = ["Pooled (`--pool`) from the `--dump` folders of the runs:", "", "```",
                 *(commands or ["(no command.txt in the folders)"]), "```", ""]
        text = report(args, C.machine_info(args.source_commit), runs, {}, counts, chain, notes)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")
        return 0
    if args.skip_pipeline and args.no_truth_run:
        p.error("--skip-pipeline with --no-truth-run leaves nothing to evaluate")

    config = load_config(args.config)
    work = args.workdir.resolve()
    bids, deriv = work / "bids", work / "out"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    simulate(bids, args.subjects, args.seed, args.grid, args.preset)
    timings["simulate"] = time.perf_counter() - t0
    subs = C.subjects(bids)
    if args.only:
        wanted = [v.strip().removeprefix("sub-") for v in args.only.split(",") if v.strip()]
        unknown = sorted(set(wanted) - set(subs))
        if unknown:
            raise SystemExit(f"--only: no subject {', '.join(unknown)} in {bids}")
        subs = [s for s in subs if s in wanted]

    # one subject's truth in memory at a time: on the clinical grid (1 mm truth) a subject's
    # masks, ids and rADC take ~0.5 GB, 20 of them would not fit beside the pipeline
    presets: dict[str, str] = {}
    truth_parts = []
    t0 = time.perf_counter()
    for s in subs:
        truth = C.load_truth(bids, s)
        presets[s] = truth.preset
        if not args.no_truth_run:
            truth_parts.append(evaluate(truth, from_truth(truth, config), config))
        del truth
    runs = {"truth masks": gather(truth_parts)} if truth_parts else {}
    if truth_parts:
        timings["truth-mask analytics"] = time.perf_counter() - t0

    chain_subs = subs[: args.pipeline_subjects] if args.pipeline_subjects else subs
    evaluated, notes = [], []
    if not args.skip_pipeline:
        if args.pipeline_out:
            deriv = args.pipeline_out.resolve()
            if args.resegment:
                t0 = time.perf_counter()
                for s in chain_subs:
                    resegment(deriv, args.resegment.resolve(), s, config, args.nprocs, bids)
                timings["re-segmentation"] = time.perf_counter() - t0
                deriv = args.resegment.resolve()
        else:
            budget = args.time_budget_min * 60 if args.time_budget_min is not None else None
            runtimes = run_pipeline(bids, deriv, work / "work", args.nprocs, chain_subs, budget)
            timings["pipeline (CLI)"] = sum(runtimes.values())
            if runtimes:
                notes += [(f"Pipeline wall time per subject (one CLI call each, `--nprocs "
                          f"{args.nprocs}`): median {np.median(list(runtimes.values())):.0f} s, "
                          f"range {min(runtimes.values()):.0f}-{max(runtimes.values()):.0f} s; "
                          f"run on subjects {', '.join(runtimes)}."), ""]
            chain_subs = list(runtimes)
        chain_parts, registration_parts, failed = [], [], []
        t_chain = t_registration = 0.0
        for s in chain_subs:
            t0 = time.perf_counter()
            truth = C.load_truth(bids, s)
            try:
                chain_parts.append(evaluate(truth, from_pipeline(deriv, truth), config))
            except (FileNotFoundError, KeyError) as exc:
                failed.append(f"sub-{s}: {type(exc).__name__} {exc}")
                continue
            finally:
                t_chain += time.perf_counter() - t0
            evaluated.append(s)
            if not args.no_registration_run:
                t0 = time.perf_counter()
                registration_parts.append(evaluate(
                    truth, from_truth_in_subject_space(deriv, truth, config), config))
                t_registration += time.perf_counter() - t0
            del truth
        if failed:
            print("not evaluated:\n  " + "\n  ".join(failed))
            notes += ["Not evaluated (no derivatives): " + "; ".join(failed), ""]
        if chain_parts:
            runs["whole chain"] = gather(chain_parts)
            if registration_parts:
                runs[REGISTRATION_RUN] = gather(registration_parts)
        timings["whole-chain evaluation"] = t_chain
        if registration_parts:
            timings["truth masks through the pipeline's registration"] = t_registration

    counts = pd.Series(list(presets.values())).value_counts().to_dict()
    chain = pd.Series([presets[s] for s in evaluated]).value_counts().to_dict()
    text = report(args, C.machine_info(args.source_commit), runs, timings, counts,
                  None if args.skip_pipeline else chain, notes)
    summary = pd.DataFrame({"target": TARGETS, **{n: metrics(r) for n, r in runs.items()}})
    with pd.option_context("display.max_colwidth", 200, "display.width", 250):
        print(summary.to_string())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for n, r in runs.items():
            for key, table in r.items():
                table.to_csv(args.dump / f"{_dump_name(n)}-{key}.csv", index=False)
        info = C.machine_info(args.source_commit)
        (args.dump / "command.txt").write_text(
            "python " + " ".join(sys.argv) + f"  # {info.get('lesionlapse', '')}, load average "
            f"{info.get('load average', '')}\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
