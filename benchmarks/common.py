"""Shared helpers of the benchmarks: phantom truth loading, designed events, lesion matching.

Everything here reads files the way a user would (BIDS + ``derivatives/truth``, the pipeline's
derivatives) and calls the pipeline's own ``core`` functions for the analytics, so the
benchmarks measure the code that ships. Arrays of the truth space are in NIfTI voxel order
(i, j, k) with the truth image's RAS affine, as the phantom writes them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipeline.config import Config
from pipeline.core import dynamics, tracking
from pipeline.core.registration import invert_transform, read_transform

TRUTH = Path("derivatives") / "truth"
EVENT_ORDER = ("new", "enlarging", "stable", "shrinking", "resolved", "merged", "split")
#: Labels of the confusion matrices besides the tracking events.
MISSED, SPURIOUS = "missed", "spurious"
KINDS = ("flair", "restricted")
_STR_COLUMNS = {"session": str, "from_session": str, "to_session": str, "first_session": str,
                "last_session": str, "predecessor_ids": str, "successor_ids": str}


# --------------------------------------------------------------------------------------------
# files


def read_tsv(path: str | Path) -> pd.DataFrame:
    """A BIDS TSV ('n/a' missing), session labels kept as strings ('01', not 1)."""
    head = pd.read_csv(path, sep="\t", nrows=0).columns
    dtypes = {c: t for c, t in _STR_COLUMNS.items() if c in head}
    table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype=dtypes)
    for col in ("predecessor_ids", "successor_ids"):
        if col in table:
            table[col] = table[col].fillna("").replace("n/a", "")
    return table


def subjects(bids: Path) -> list[str]:
    """Subject labels (without 'sub-') of a phantom dataset that has truth."""
    return sorted(p.name[4:] for p in (Path(bids) / TRUTH).glob("sub-*") if p.is_dir())


def machine_info(commit: str | None = None) -> dict[str, str]:
    """nproc, CPU model, Python and library versions, git commit (for the result files).

    ``commit`` names the source when it is not a git checkout (e.g. a ``git archive`` export
    run with ``PYTHONPATH``); by default it is read from the repository holding this file.
    """
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import nipype
    import scipy

    import pipeline

    repo = Path(__file__).resolve().parents[1]
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, check=True).stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--", "pipeline"],
                capture_output=True, text=True, check=True).stdout.strip()
            commit += " (pipeline/ has uncommitted changes)" if dirty else ""
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": sys.version.split()[0],
        "lesionlapse": f"{pipeline.__version__} (git {commit})",
        "numpy": np.__version__, "scipy": scipy.__version__, "pandas": pd.__version__,
        "SimpleITK": sitk.Version_VersionString(), "nibabel": nib.__version__,
        "nipype": nipype.__version__,
    }


# --------------------------------------------------------------------------------------------
# the phantom's truth


@dataclass
class Truth:
    """Ground truth of one phantom subject, in the truth space."""

    sub: str
    root: Path
    sim: dict
    sessions: list[str]
    days: list[float]
    affine: np.ndarray
    voxel_ml: float
    masks: dict[str, list[np.ndarray]]  # kind -> per session bool mask
    dseg: dict[str, list[np.ndarray]]  # kind -> per session truth lesion ids
    radc: list[np.ndarray]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        return self.sim["preset"]

    @property
    def spacing_mm(self) -> tuple[float, ...]:
        """Voxel size in array axis order (nibabel arrays are x, y, z like the affine)."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(0)))

    def image(self, session: str, kind: str = "flair") -> Path:
        """A truth-space image of this session (the resampling reference grid)."""
        folder = "anat" if kind == "flair" else "dwi"
        return (self.root / f"ses-{session}" / folder /
                f"sub-{self.sub}_ses-{session}_space-truth_label-lesion_desc-{kind}_mask.nii.gz")


def _load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def load_truth(bids: str | Path, sub: str) -> Truth:
    """Read masks, dseg, true rADC and tables of ``sub`` from ``bids/derivatives/truth``."""
    root = Path(bids) / TRUTH / f"sub-{sub}"
    sim = json.loads((root / f"sub-{sub}_desc-simulation.json").read_text())
    sessions = [s["session"] for s in sim["sessions"]]
    days = [float(s["day"]) for s in sim["sessions"]]
    masks: dict[str, list] = {k: [] for k in KINDS}
    dseg: dict[str, list] = {k: [] for k in KINDS}
    radc = []
    affine = None
    for ses in sessions:
        p = f"sub-{sub}_ses-{ses}"
        for kind, folder in (("flair", "anat"), ("restricted", "dwi")):
            d = root / f"ses-{ses}" / folder
            img = nib.load(str(d / f"{p}_space-truth_label-lesion_desc-{kind}_mask.nii.gz"))
            affine = img.affine
            masks[kind].append(np.asarray(img.dataobj) > 0)
            dseg[kind].append(_load(d / f"{p}_space-truth_desc-{kind}lesions_dseg.nii.gz")
                              .astype(np.int32))
        # stored as int16 with scl_slope 0.001: scale in float32 like the phantom's arrays
        img = nib.load(str(root / f"ses-{ses}" / "dwi" / f"{p}_space-truth_desc-true_rADC.nii.gz"))
        raw = np.asarray(img.dataobj.get_unscaled(), np.float32)
        slope = float(img.dataobj.slope)
        radc.append(raw * np.float32(slope))
    tables = {
        name: read_tsv(root / f"sub-{sub}_desc-{name}.tsv")
        for name in ("sessions_timeseries", "lesions_timeseries", "lesions_summary", "events")
    }
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    return Truth(sub, root, sim, sessions, days, affine, voxel_ml, masks, dseg, radc, tables)


# --------------------------------------------------------------------------------------------
# analytics: the pipeline's core functions on given masks (truth space or mapped)


@dataclass
class Analysis:
    """Tracking + dynamics of one subject (both kinds), the same tables the pipeline writes."""

    sessions: pd.DataFrame
    events: pd.DataFrame
    lesions: pd.DataFrame
    summary: pd.DataFrame
    dseg: dict[str, tuple[np.ndarray, ...]]


def analyse(
    masks: dict[str, list[np.ndarray]],
    radc: list[np.ndarray],
    *,
    days: list[float],
    sessions: list[str],
    voxel_ml: float,
    spacing_mm: tuple[float, ...],
    config: Config,
    reference_um2_s: list[float] | None = None,
) -> Analysis:
    """Run ``core.tracking.track_lesions`` and ``core.dynamics`` as the pipeline does.

    ``adc`` is rebuilt as rADC x reference (the truth has no ADC map in the truth space), so
    the ADC columns are only as exact as the references; shine-through is not part of the
    truth and is left empty.
    """
    trk, dyn = config.tracking, config.dynamics
    refs = reference_um2_s or [1.0] * len(sessions)
    adc = [r * np.float32(ref) for r, ref in zip(radc, refs)]
    shine = [np.zeros(r.shape, bool) for r in radc]
    rows, ever = [], np.zeros(radc[0].shape, bool)
    for i, (ses, day) in enumerate(zip(sessions, days)):
        ever |= masks["restricted"][i]
        row = {"session": ses, "day": day}
        row.update(dynamics.session_summary(
            flair_lesion=masks["flair"][i], restricted=masks["restricted"][i],
            shine_through=shine[i], ever_restricted=ever,
            adc_um2_s=adc[i], radc=radc[i],
            reference=dynamics.ReferenceADC(float(refs[i]), float("nan"), 0),
            voxel_volume_ml=voxel_ml, restricted_below=dyn.restricted_below,
            elevated_above=dyn.elevated_above, core_depth_mm=dyn.radc_core_depth_mm,
            spacing_mm=spacing_mm))
        rows.append(row)
    events, lesions, dsegs = [], [], {}
    for kind in KINDS:
        result = tracking.track_lesions(
            masks[kind], days, sessions=sessions, voxel_volume_ml=voxel_ml,
            connectivity=trk.connectivity, min_overlap_voxels=trk.min_overlap_voxels,
            shift_tolerance_voxels=trk.shift_tolerance_voxels,
            enlarging_relative=trk.enlarging_relative,
            enlarging_absolute_ml=trk.enlarging_absolute_ml,
            fragment_ratio=trk.fragment_ratio)
        dsegs[kind] = result.dseg
        ev = result.events.copy()
        ev.insert(1, "kind", kind)
        events.append(ev)
        lesions.append(dynamics.lesion_table(
            result.dseg, kind=kind, adc_um2_s=adc, radc=radc, restricted=masks["restricted"],
            shine_through=shine, days=days, sessions=sessions, voxel_volume_ml=voxel_ml,
            restricted_below=dyn.restricted_below, elevated_above=dyn.elevated_above,
            core_depth_mm=dyn.radc_core_depth_mm, spacing_mm=spacing_mm))
    lesion_df = pd.concat(lesions, ignore_index=True)
    return Analysis(
        sessions=pd.DataFrame(rows),
        events=pd.concat(events, ignore_index=True),
        lesions=lesion_df,
        summary=dynamics.lesion_summary(lesion_df, cutoff=dyn.restricted_below),
        dseg=dsegs,
    )


def analyse_truth(truth: Truth, config: Config) -> Analysis:
    """:func:`analyse` on the truth masks and the true rADC."""
    refs = [float(s["reference_adc_um2_s"]) for s in truth.sim["sessions"]]
    return analyse(truth.masks, truth.radc, days=truth.days, sessions=truth.sessions,
                   voxel_ml=truth.voxel_ml, spacing_mm=truth.spacing_mm, config=config,
                   reference_um2_s=refs)


# --------------------------------------------------------------------------------------------
# designed events (ms-like preset)


def _radius(radii: list[float], k: int, n: int) -> float:
    return float(np.interp(k / max(n - 1, 1), np.linspace(0.0, 1.0, len(radii)), radii))


def _ball_ml(radius: float) -> float:
    """Volume of a designed ovoid (1.3x along z) of ``radius`` mm, in mL."""
    return 4.0 / 3.0 * np.pi * radius**3 * 1.3 / 1000.0


def designed_events(sim: dict, config: Config) -> pd.DataFrame:
    """The events the phantom was designed to show, one row per designed lesion and interval.

    From ``designed_lesions`` of the simulation JSON (radii per session, centres) plus the
    pairing of the phantom's ``MS_DESIGN`` (merge partner offset, split bridge radii, which
    the JSON does not carry): ``new`` when the radius leaves 0, ``resolved`` when it returns to
    0, ``merged`` when a merging pair first touches (sum of radii >= centre distance),
    ``split`` when a splitting pair's bridge disappears, else the volume change of the ovoid
    (or of the joined pair) classified with the configured thresholds
    (:func:`pipeline.core.tracking.classify_change`). Columns: ``design_id``, ``design``,
    ``interval`` (index of the from-session), ``expected``.
    """
    from pipeline.simulate.lesions import MS_DESIGN

    spec = {item["id"]: item for item in MS_DESIGN}
    design = {d["id"]: d for d in sim.get("designed_lesions", [])}
    n = len(sim["days"])
    trk = config.tracking
    partner_of: dict[int, int] = {}
    for i, item in spec.items():
        if "partner" in item and i in design:
            partner_of[i], partner_of[item["partner"]] = item["partner"], i

    def joined(i: int, k: int) -> bool:
        if i not in partner_of:
            return False
        a, b = sorted((i, partner_of[i]))
        ra, rb = (_radius(design[x]["radii_mm"], k, n) for x in (a, b))
        if ra <= 0 or rb <= 0:
            return False
        if "bridge" in spec[a]:
            return _radius(spec[a]["bridge"], k, n) > 0
        dist = np.linalg.norm(np.subtract(design[a]["center_ras_mm"], design[b]["center_ras_mm"])
                              / [1.0, 1.0, 1.3])
        return ra + rb >= dist - 1e-6

    def volume(i: int, k: int) -> float:
        members = (i, partner_of[i]) if joined(i, k) else (i,)
        return sum(_ball_ml(_radius(design[m]["radii_mm"], k, n)) for m in members)

    rows = []
    for i, d in sorted(design.items()):
        for k in range(n - 1):
            r0, r1 = (_radius(d["radii_mm"], s, n) for s in (k, k + 1))
            if r0 <= 0 and r1 <= 0:
                continue
            if r0 <= 0:
                expected = "new"
            elif r1 <= 0:
                expected = "resolved"
            elif not joined(i, k) and joined(i, k + 1):
                expected = "merged"
            elif joined(i, k) and not joined(i, k + 1):
                expected = "split"
            else:
                expected = tracking.classify_change(
                    volume(i, k), volume(i, k + 1), enlarging_relative=trk.enlarging_relative,
                    enlarging_absolute_ml=trk.enlarging_absolute_ml)
            rows.append({"design_id": i, "design": d["design"], "interval": k,
                         "expected": expected})
    return pd.DataFrame(rows, columns=["design_id", "design", "interval", "expected"])


def design_regions(sim: dict, affine: np.ndarray, shape: tuple[int, ...]) -> dict[int, list]:
    """Per designed lesion, per session: the voxels of its designed ovoid (bool array)."""
    n = len(sim["days"])
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape((3, *shape))
    out = {}
    for d in sim.get("designed_lesions", []):
        c = np.asarray(d["center_ras_mm"], np.float32)
        dist = np.sqrt((xyz[0] - c[0]) ** 2 + (xyz[1] - c[1]) ** 2 + ((xyz[2] - c[2]) / 1.3) ** 2)
        out[d["id"]] = [dist <= _radius(d["radii_mm"], k, n) for k in range(n)]
    return out


def design_collisions(sim: dict, regions: dict[int, list]) -> set[int]:
    """Designed lesions whose ovoid touches (26-neighbourhood) a designed lesion other than its
    own merge/split partner at some session: the phantom fuses them, so their designed events
    cannot all be observed (a phantom design problem, not a tracking one)."""
    from scipy import ndimage

    from pipeline.simulate.lesions import MS_DESIGN

    pairs = {frozenset((i["id"], i["partner"])) for i in MS_DESIGN if "partner" in i}
    out: set[int] = set()
    ids = sorted(regions)
    for a in ids:
        for k, region in enumerate(regions[a]):
            if not region.any():
                continue
            grown = ndimage.binary_dilation(region, np.ones((3, 3, 3), bool))
            for b in ids:
                if b != a and frozenset((a, b)) not in pairs and (grown & regions[b][k]).any():
                    out |= {a, b}
    return out


def _majority_id(dseg: np.ndarray, region: np.ndarray) -> int:
    ids = dseg[region]
    ids = ids[ids > 0]
    if ids.size == 0:
        return 0
    values, counts = np.unique(ids, return_counts=True)
    return int(values[np.argmax(counts)])


def observed_design_events(
    expected: pd.DataFrame,
    regions: dict[int, list],
    dseg: list[np.ndarray] | tuple[np.ndarray, ...],
    events: pd.DataFrame,
    sessions: list[str],
) -> pd.DataFrame:
    """Add the ``observed`` event of every designed lesion and interval.

    The tracked id of a designed lesion at a session is the most frequent id inside its
    designed ovoid (0 when none). The observed event is the event row of the id at the
    from-session in that interval (or of the id at the to-session when the lesion is born);
    ``missed`` when neither exists.
    """
    ev = events.set_index(["lesion_id", "from_session"])["event"]
    observed = []
    for row in expected.itertuples():
        k = row.interval
        id0 = _majority_id(dseg[k], regions[row.design_id][k]) if regions[row.design_id][k].any() else 0
        id1 = (_majority_id(dseg[k + 1], regions[row.design_id][k + 1])
               if regions[row.design_id][k + 1].any() else 0)
        lesion = id0 or id1
        observed.append(str(ev.get((lesion, sessions[k]), MISSED)) if lesion else MISSED)
    return expected.assign(observed=observed)


# --------------------------------------------------------------------------------------------
# pipeline outputs mapped into the truth space


def pipeline_file(out: Path, sub: str, ses: str | None, pattern: str) -> Path:
    """The one pipeline derivative of ``sub`` (and ``ses``) whose name matches ``pattern``."""
    folder = Path(out) / f"sub-{sub}" / (f"ses-{ses}" if ses else "")
    hits = sorted(folder.rglob(pattern))
    if len(hits) != 1:
        raise FileNotFoundError(f"{len(hits)} files match {pattern} under {folder}")
    return hits[0]


def truth_to_subject(out: Path, truth: Truth, ses: str) -> sitk.Transform:
    """Point map truth space -> the pipeline's subject space for session ``ses``.

    Pipeline ``from-FLAIR_to-subject`` (point map subject -> FLAIR) and phantom
    ``from-truth_to-FLAIR`` (point map FLAIR -> truth) are both rigid; the inverse chain is
    ``inv(subject->FLAIR)(inv(FLAIR->truth)(x))``.
    """
    sub_to_flair = read_transform(pipeline_file(
        out, truth.sub, ses, "*_from-FLAIR_to-subject_mode-image_xfm.txt"))
    flair_to_truth = read_transform(
        truth.root / f"ses-{ses}" / "anat" /
        f"sub-{truth.sub}_ses-{ses}_from-truth_to-FLAIR_mode-image_xfm.txt")
    from pipeline.core.registration import compose_transforms

    return compose_transforms(invert_transform(sub_to_flair), invert_transform(flair_to_truth))


def to_truth_space(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform,
                   *, interpolator: int) -> np.ndarray:
    """Resample a subject-space image onto the truth grid; returns an (i, j, k) array."""
    out = sitk.Resample(image, reference, transform, interpolator, 0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def match_ids(truth_dseg: np.ndarray, other_dseg: np.ndarray) -> pd.DataFrame:
    """Overlap (voxels) of every pair of truth id and other id sharing voxels."""
    both = (truth_dseg > 0) & (other_dseg > 0)
    if not both.any():
        return pd.DataFrame(columns=["truth_id", "other_id", "overlap"])
    pairs, counts = np.unique(np.stack([truth_dseg[both], other_dseg[both]]), axis=1,
                              return_counts=True)
    return pd.DataFrame({"truth_id": pairs[0], "other_id": pairs[1], "overlap": counts})


def best_match(truth_dseg: np.ndarray, other_dseg: np.ndarray) -> tuple[dict, dict]:
    """Truth id -> other id of largest overlap, and other id -> truth id of largest overlap."""
    m = match_ids(truth_dseg, other_dseg)
    if m.empty:
        return {}, {}
    t2o = m.sort_values("overlap").groupby("truth_id")["other_id"].last().to_dict()
    o2t = m.sort_values("overlap").groupby("other_id")["truth_id"].last().to_dict()
    return ({int(k): int(v) for k, v in t2o.items()}, {int(k): int(v) for k, v in o2t.items()})


def event_confusion(
    truth_events: pd.DataFrame,
    other_events: pd.DataFrame,
    truth_dseg: dict[str, list],
    other_dseg: dict[str, list],
    sessions: list[str],
) -> pd.DataFrame:
    """Pairs (truth event, other event) for every event row of both kinds, spatially matched.

    A truth event row (id, interval) is matched to the other id overlapping the truth lesion
    most at the from-session (or at the to-session for a lesion born in the interval); its
    event is the other id's event in that interval, ``missed`` when there is none. Other
    event rows whose id overlaps no truth lesion at either end are ``spurious``.
    ``volume_ml``: the larger of the row's two volumes (truth lesion, or the spurious one).
    Also per row, for listing the wrong ones: ``lesion_id`` (truth id; NaN for a spurious
    row), ``from_session``, ``other_id`` (NaN when missed), ``truth_from_ml``/``truth_to_ml``
    and ``other_from_ml``/``other_to_ml`` (the other id's volumes in that interval).
    """
    rows = []
    for kind in KINDS:
        tev = truth_events[truth_events["kind"] == kind]
        oev = other_events[other_events["kind"] == kind]
        o_index = oev.set_index(["lesion_id", "from_session"])
        matches = [best_match(t, o) for t, o in zip(truth_dseg[kind], other_dseg[kind])]
        for r in tev.itertuples():
            k = sessions.index(r.from_session)
            t2o_from, t2o_to = matches[k][0], matches[k + 1][0]
            other = t2o_from.get(r.lesion_id) if r.volume_from_ml > 0 else None
            if other is None:
                other = t2o_to.get(r.lesion_id) if r.volume_to_ml > 0 else None
            got, v_from, v_to = MISSED, np.nan, np.nan
            if other and (other, r.from_session) in o_index.index:
                hit = o_index.loc[(other, r.from_session)]
                got, v_from, v_to = str(hit["event"]), hit["volume_from_ml"], hit["volume_to_ml"]
            rows.append({"kind": kind, "truth": r.event, "pipeline": got,
                         "volume_ml": max(r.volume_from_ml, r.volume_to_ml),
                         "lesion_id": r.lesion_id, "from_session": r.from_session,
                         "other_id": other if other else np.nan,
                         "truth_from_ml": r.volume_from_ml, "truth_to_ml": r.volume_to_ml,
                         "other_from_ml": v_from, "other_to_ml": v_to})
        for r in oev.itertuples():
            k = sessions.index(r.from_session)
            o2t_from, o2t_to = matches[k][1], matches[k + 1][1]
            if r.lesion_id not in o2t_from and r.lesion_id not in o2t_to:
                rows.append({"kind": kind, "truth": SPURIOUS, "pipeline": r.event,
                             "volume_ml": max(r.volume_from_ml, r.volume_to_ml),
                             "lesion_id": np.nan, "from_session": r.from_session,
                             "other_id": r.lesion_id, "truth_from_ml": np.nan,
                             "truth_to_ml": np.nan, "other_from_ml": r.volume_from_ml,
                             "other_to_ml": r.volume_to_ml})
    return pd.DataFrame(rows, columns=["kind", "truth", "pipeline", "volume_ml", "lesion_id",
                                       "from_session", "other_id", "truth_from_ml",
                                       "truth_to_ml", "other_from_ml", "other_to_ml"])


def confusion_table(pairs: pd.DataFrame, row: str, col: str) -> pd.DataFrame:
    """Counts of ``row`` (truth) x ``col`` (observed) labels in event order."""
    labels = [e for e in (*EVENT_ORDER, MISSED, SPURIOUS)
              if e in set(pairs[row]) | set(pairs[col])]
    table = pd.crosstab(pairs[row], pairs[col]).reindex(index=labels, columns=labels, fill_value=0)
    table.index.name, table.columns.name = f"{row} \\ {col}", None
    return table


def markdown(table: pd.DataFrame, *, index: bool = True, floatfmt: str = ".4g") -> str:
    """A pandas table as GitHub markdown (without the optional tabulate dependency)."""
    t = table.reset_index() if index else table
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            return "n/a" if not np.isfinite(v) else format(v, floatfmt)
        return str(v)
    head = "| " + " | ".join(str(c) for c in t.columns) + " |"
    sep = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in r) + " |" for r in t.itertuples(index=False)]
    return "\n".join([head, sep, *body])
