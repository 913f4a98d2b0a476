"""Reading a subject's derivatives for the reports and notebooks.

Everything a report shows comes from the files the participant level wrote: the TSV tables,
the QC JSON and the images in the within-subject space. Missing pieces are tolerated (a report
is most useful exactly when something went wrong) and reported as warnings instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

TABLES = {
    "sessions": "desc-sessions_timeseries",
    "lesions": "desc-lesions_timeseries",
    "events": "desc-events",
    "lineage": "desc-lineage",
    "summary": "desc-lesions_summary",
}

# key -> (datatype, file-name tail after sub-X_ses-Y_)
IMAGES = {
    "flair": ("anat", "space-subject_desc-preproc_FLAIR.nii.gz"),
    "dwi": ("dwi", "space-subject_desc-trace_dwi.nii.gz"),
    "adc": ("dwi", "space-subject_ADC.nii.gz"),
    "radc": ("dwi", "space-subject_desc-relative_ADC.nii.gz"),
    "brain": ("anat", "space-subject_desc-brain_mask.nii.gz"),
    "flair_mask": ("anat", "space-subject_label-lesion_desc-flair_mask.nii.gz"),
    "restricted_mask": ("dwi", "space-subject_label-lesion_desc-restricted_mask.nii.gz"),
    "flair_dseg": ("anat", "space-subject_desc-flair_dseg.nii.gz"),
    "restricted_dseg": ("dwi", "space-subject_desc-restricted_dseg.nii.gz"),
    # diffusion voxel classes of the lesion tissue (pipeline.core.dynamics.VOXEL_CLASS_LABELS)
    "diffusion_classes": ("dwi", "space-subject_desc-diffusionclass_dseg.nii.gz"),
}

GROWING_EVENTS = ("new", "enlarging")


def read_table(path: Path) -> pd.DataFrame:
    """Read a lesionlapse TSV ('n/a' as missing, session labels kept as text).

    Parameters
    ----------
    path : Path
        A TSV written by the pipeline.

    Returns
    -------
    pandas.DataFrame
        The table; empty (no columns) when the file does not exist.
    """
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    text_cols = {c: str for c in ("session", "from_session", "to_session", "first_session",
                                  "last_session", "subject", "parents", "children",
                                  "predecessor_ids", "successor_ids", "error")}
    return pd.read_csv(path, sep="\t", na_values="n/a", keep_default_na=False, dtype=text_cols)


@dataclass
class SessionFiles:
    """The images of one session in the within-subject space (None when absent)."""

    label: str
    day: float
    paths: dict[str, Path | None] = field(default_factory=dict)
    #: key -> an uncompressed file holding the same bytes as ``paths[key]`` once gunzipped
    #: (the work-dir image it was gzipped from, see :func:`uncompressed_source`): read instead
    sources: dict[str, Path] = field(default_factory=dict)

    def load(self, key: str, dtype: type | None = np.float32) -> np.ndarray | None:
        """The image ``key`` (see IMAGES) in RAS orientation as ``dtype`` (``None``: the type
        stored on disk), or None when absent."""
        path = self.paths.get(key)
        if path is None:
            return None
        img = nib.as_closest_canonical(nib.load(str(self.sources.get(key, path))))
        return np.asarray(img.dataobj, dtype=dtype)


@dataclass
class SubjectDerivatives:
    """A subject's tables, QC report and session images."""

    subject: str
    output_dir: Path
    tables: dict[str, pd.DataFrame]
    qc: dict
    sessions: list[SessionFiles]

    @property
    def config(self) -> dict:
        """The configuration recorded in the QC report (empty when unknown)."""
        return self.qc.get("config") or {}

    def table_path(self, key: str) -> Path:
        """Path of table ``key`` (see TABLES)."""
        return self.output_dir / f"sub-{self.subject}" / f"sub-{self.subject}_{TABLES[key]}.tsv"


def _session_days(tables: dict[str, pd.DataFrame], labels: list[str]) -> dict[str, float]:
    sessions = tables.get("sessions")
    days = {}
    if sessions is not None and {"session", "day"} <= set(sessions.columns):
        days = dict(zip(sessions["session"], sessions["day"].astype(float)))
    return {label: days.get(label, float(i)) for i, label in enumerate(labels)}


def _session_labels(subj_dir: Path, tables: dict[str, pd.DataFrame]) -> list[str]:
    sessions = tables.get("sessions")
    if sessions is not None and "session" in sessions.columns and len(sessions):
        return list(sessions["session"])
    return sorted(p.name[4:] for p in subj_dir.glob("ses-*") if p.is_dir())


def uncompressed_source(derivative: Path, source: Path | str | None) -> Path | None:
    """``source`` when it can stand for the gzipped ``derivative``: a file whose size is the
    derivative's uncompressed size (the gzip trailer's ISIZE, modulo 2**32), else None.

    The participant run gzips each work-dir image into its derivative (WriteDerivatives); the
    report, written right after, reads the work-dir copy instead of decompressing ~25
    subject-space volumes (about half of the report's CPU on a 4-session clinical subject).
    """
    if source is None:
        return None
    source = Path(source)
    try:
        with open(derivative, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")
        size = source.stat().st_size
    except OSError:
        return None
    return source if size % 2**32 == isize else None


def load_subject(output_dir: Path, subject: str, sources: dict[str, str] | None = None,
                 images: dict[str, str] | None = None) -> SubjectDerivatives:
    """Collect the derivatives of ``sub-<subject>`` under ``output_dir``.

    Parameters
    ----------
    output_dir : Path
        The pipeline's OUTPUT_DIR.
    subject : str
        Subject label, with or without ``sub-``.
    sources : dict, optional
        Derivative path relative to ``output_dir`` -> the uncompressed file it was gzipped
        from (written by the participant run, see :func:`uncompressed_source`).
    images : dict, optional
        Derivative path relative to ``output_dir`` -> the uncompressed work-dir image it will
        be gzipped from, read when the derivative is not written yet: the participant run's
        report node draws the report beside the compression of the derivatives.

    Returns
    -------
    SubjectDerivatives
        Tables (empty frames when missing), the QC report (empty dict when missing) and the
        image paths of every session, ordered by day.
    """
    output_dir = Path(output_dir)
    subject = subject.removeprefix("sub-")
    subj_dir = output_dir / f"sub-{subject}"
    tables = {key: read_table(subj_dir / f"sub-{subject}_{name}.tsv")
              for key, name in TABLES.items()}
    qc_path = subj_dir / f"sub-{subject}_desc-qc_report.json"
    qc = json.loads(qc_path.read_text()) if qc_path.exists() else {}
    labels = _session_labels(subj_dir, tables)
    days = _session_days(tables, labels)
    sessions = [session_files(output_dir, subject, label, days[label], sources, images)
                for label in labels]
    sessions.sort(key=lambda s: s.day)
    return SubjectDerivatives(subject=subject, output_dir=output_dir, tables=tables, qc=qc,
                              sessions=sessions)


def session_files(output_dir: Path, subject: str, label: str, day: float,
                  sources: dict[str, str] | None = None,
                  images: dict[str, str] | None = None) -> SessionFiles:
    """The images of session ``label`` of ``sub-<subject>`` (without ``sub-``) under
    ``output_dir``; ``sources`` and ``images`` as in :func:`load_subject`."""
    subj_dir = Path(output_dir) / f"sub-{subject}"
    prefix = f"sub-{subject}_ses-{label}"
    paths, uncompressed = {}, {}
    for key, (datatype, tail) in IMAGES.items():
        path = subj_dir / f"ses-{label}" / datatype / f"{prefix}_{tail}"
        paths[key] = path if path.exists() else None
        rel = str(path.relative_to(output_dir))
        if paths[key] is None and images and (src := images.get(rel)):
            paths[key] = Path(src)
            continue
        if paths[key] is not None and sources and (
                src := uncompressed_source(path, sources.get(rel))) is not None:
            uncompressed[key] = src
    return SessionFiles(label=label, day=day, paths=paths, sources=uncompressed)


def growing_ids(events: pd.DataFrame, session: str) -> set[int]:
    """Lesion ids whose event in the interval ending at ``session`` is new or enlarging.

    Parameters
    ----------
    events : pandas.DataFrame
        An events table (one kind of lesion; rows with a ``kind`` column are not filtered here).
    session : str
        Session label at the end of the interval.

    Returns
    -------
    set of int
        The ids to draw as new or progressive.
    """
    if events.empty or not {"to_session", "event", "lesion_id"} <= set(events.columns):
        return set()
    rows = events[(events["to_session"] == session) & events["event"].isin(GROWING_EVENTS)]
    return {int(i) for i in rows["lesion_id"]}


def events_of_kind(events: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Rows of the events table for one lesion kind ('flair' or 'restricted').

    The table may hold both kinds (a ``kind`` column) or only FLAIR lesions (no such column);
    in the latter case restricted-diffusion lesions have no events.
    """
    if events.empty:
        return events
    if "kind" in events.columns:
        return events[events["kind"] == kind]
    return events if kind == "flair" else events.iloc[0:0]
