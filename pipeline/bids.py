"""BIDS input discovery (subjects, sessions, days, files) and derivative file names.

Only the small part of BIDS this pipeline reads is handled here, with plain pathlib: per
session ``anat/*_FLAIR.nii[.gz]``, ``dwi/*_dwi.nii[.gz]`` with ``.bval``/``.bvec``,
``dwi/*_ADC.nii[.gz]`` and ``dwi/*_trace.nii[.gz]`` (with an optional JSON sidecar). The time
axis comes from ``sub-X_sessions.tsv`` (``acq_time``), else from session labels like
``day08``/``d8``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

NIFTI_EXTS = (".nii.gz", ".nii")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_DAY_RE = re.compile(r"(?:day|d)(\d+(?:\.\d+)?)$", re.IGNORECASE)


class BIDSError(ValueError):
    """The input dataset cannot be used as given; the message names the file and the fix."""


@dataclass(frozen=True)
class SessionInputs:
    """The files of one session and its position on the time axis."""

    subject: str
    session: str
    day: float
    flair: Path | None = None
    dwi: Path | None = None
    bval: Path | None = None
    bvec: Path | None = None
    adc: Path | None = None
    trace: Path | None = None
    trace_sidecar: Path | None = None

    @property
    def has_diffusion(self) -> bool:
        return self.dwi is not None or self.adc is not None or self.trace is not None

    @property
    def prefix(self) -> str:
        return f"sub-{self.subject}_ses-{self.session}"


@dataclass(frozen=True)
class SubjectInputs:
    subject: str
    sessions: tuple[SessionInputs, ...]
    day_source: str = field(default="sessions.tsv")


def clean_label(label: str, entity: str) -> str:
    """Strip an optional ``sub-``/``ses-`` prefix and refuse anything but letters and digits.

    Labels become path components, so ``../x`` or ``01/..`` must never get through.
    """
    prefix = f"{entity}-"
    value = label[len(prefix):] if label.startswith(prefix) else label
    if not _LABEL_RE.match(value):
        raise BIDSError(
            f"invalid {entity} label {label!r}: BIDS labels contain only letters and digits "
            f"(e.g. '{prefix}01' or '01')"
        )
    return value


def strip_ext(path: Path) -> str:
    """File name without .nii/.nii.gz."""
    name = path.name
    for ext in NIFTI_EXTS:
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _find_one(folder: Path, suffix: str) -> Path | None:
    if not folder.is_dir():
        return None
    hits = sorted(
        p for ext in NIFTI_EXTS for p in folder.glob(f"*_{suffix}{ext}") if not p.name.startswith(".")
    )
    if len(hits) > 1:
        names = ", ".join(str(p) for p in hits)
        raise BIDSError(
            f"more than one *_{suffix} image in {folder}: {names}. Keep one per session "
            "(move the others out of the dataset or into sourcedata/)."
        )
    return hits[0] if hits else None


def _sidecar(image: Path, ext: str) -> Path | None:
    candidate = image.with_name(strip_ext(image) + ext)
    return candidate if candidate.exists() else None


def _read_acq_times(tsv: Path) -> dict[str, datetime]:
    try:
        with open(tsv, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
    except OSError as exc:
        raise BIDSError(f"cannot read {tsv}: {exc}") from None
    if not rows or "session_id" not in rows[0] or "acq_time" not in rows[0]:
        return {}
    times: dict[str, datetime] = {}
    for row in rows:
        ses = clean_label(row["session_id"].strip(), "ses")
        value = (row.get("acq_time") or "").strip()
        if value in ("", "n/a"):
            return {}
        try:
            times[ses] = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BIDSError(
                f"{tsv}: acq_time {value!r} for session {ses} is not an ISO 8601 date-time "
                "(e.g. 2024-03-01T09:30:00)"
            ) from None
    return times


def session_days(subject_dir: Path, labels: list[str]) -> tuple[dict[str, float], str]:
    """Days since the first session, from sessions.tsv acq_time or from the labels.

    Returns the mapping and where it came from (``"sessions.tsv"`` or ``"session labels"``).
    """
    subject = subject_dir.name
    tsv = subject_dir / f"{subject}_sessions.tsv"
    times = _read_acq_times(tsv) if tsv.exists() else {}
    if times and all(lab in times for lab in labels):
        t0 = min(times[lab] for lab in labels)
        return {lab: round((times[lab] - t0).total_seconds() / 86400.0, 4) for lab in labels}, (
            "sessions.tsv"
        )
    parsed = {lab: _DAY_RE.search(lab) for lab in labels}
    if all(parsed.values()):
        raw = {lab: float(m.group(1)) for lab, m in parsed.items()}
        d0 = min(raw.values())
        return {lab: raw[lab] - d0 for lab in labels}, "session labels"
    missing = [lab for lab in labels if lab not in times]
    raise BIDSError(
        f"cannot tell the day of sessions {missing} of {subject}: add {tsv} with columns "
        "session_id and acq_time (ISO 8601), or name sessions like ses-day08"
    )


def discover(
    bids_dir: Path,
    participant_labels: list[str] | None = None,
    session_labels: list[str] | None = None,
) -> list[SubjectInputs]:
    """Subjects and sessions of a BIDS dataset, sessions ordered by day (then label).

    Raises
    ------
    BIDSError
        When the dataset, a requested subject or the days cannot be found.
    """
    bids_dir = Path(bids_dir).resolve()
    if not (bids_dir / "dataset_description.json").is_file():
        raise BIDSError(
            f"{bids_dir} is not a BIDS dataset: dataset_description.json is missing at its top"
        )
    available = sorted(p.name[4:] for p in bids_dir.glob("sub-*") if p.is_dir())
    wanted = [clean_label(s, "sub") for s in participant_labels] if participant_labels else available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise BIDSError(f"participant(s) {missing} not found in {bids_dir}; found {available}")
    ses_filter = {clean_label(s, "ses") for s in session_labels} if session_labels else None
    return [_discover_subject(bids_dir / f"sub-{sub}", sub, ses_filter) for sub in wanted]


def _discover_subject(subject_dir: Path, subject: str, ses_filter: set[str] | None) -> SubjectInputs:
    ses_dirs = sorted(p for p in subject_dir.glob("ses-*") if p.is_dir())
    if ses_dirs:
        labels = [p.name[4:] for p in ses_dirs]
    else:  # a dataset without session folders: one session named after nothing
        labels = []
    if ses_filter is not None:
        labels = [lab for lab in labels if lab in ses_filter]
    if not labels:
        raise BIDSError(
            f"no sessions found for sub-{subject} in {subject_dir}: lesionlapse expects "
            "sub-X/ses-Y/{anat,dwi}/ folders"
        )
    days, source = session_days(subject_dir, labels)
    sessions = []
    for lab in labels:
        ses_dir = subject_dir / f"ses-{lab}"
        dwi = _find_one(ses_dir / "dwi", "dwi")
        trace = _find_one(ses_dir / "dwi", "trace")
        sessions.append(
            SessionInputs(
                subject=subject,
                session=lab,
                day=days[lab],
                flair=_find_one(ses_dir / "anat", "FLAIR"),
                dwi=dwi,
                bval=_sidecar(dwi, ".bval") if dwi else None,
                bvec=_sidecar(dwi, ".bvec") if dwi else None,
                adc=_find_one(ses_dir / "dwi", "ADC"),
                trace=trace,
                trace_sidecar=_sidecar(trace, ".json") if trace else None,
            )
        )
    sessions.sort(key=lambda s: (s.day, s.session))
    return SubjectInputs(subject=subject, sessions=tuple(sessions), day_source=source)


#: Offset (days) given to a session on the same day as the previous one, so that the time axis
#: of lesion tracking is strictly increasing (0.001 day = 86.4 s; sessions on one day are
#: ordered by label).
SAME_DAY_OFFSET_DAYS = 0.001


def tracking_days(days: list[float]) -> list[float]:
    """Strictly increasing days for lesion tracking.

    Sessions arrive sorted by (day, label); a session on or before the previous one's day is
    moved to ``previous + SAME_DAY_OFFSET_DAYS``. Other days are returned unchanged.
    """
    out: list[float] = []
    for d in days:
        d = float(d)
        if out and d <= out[-1]:
            d = round(out[-1] + SAME_DAY_OFFSET_DAYS, 6)
        out.append(d)
    return out


def derivative_name(
    subject: str,
    session: str | None,
    suffix: str,
    *,
    space: str | None = None,
    label: str | None = None,
    desc: str | None = None,
    extra: dict[str, str] | None = None,
    ext: str = ".nii.gz",
) -> str:
    """BIDS derivative file name with entities in the specification's order."""
    parts = [f"sub-{subject}"]
    if session:
        parts.append(f"ses-{session}")
    for key, value in (extra or {}).items():
        parts.append(f"{key}-{value}")
    if space:
        parts.append(f"space-{space}")
    if label:
        parts.append(f"label-{label}")
    if desc:
        parts.append(f"desc-{desc}")
    parts.append(suffix)
    return "_".join(parts) + ext


def derivative_path(
    out_dir: Path, subject: str, session: str | None, datatype: str | None, suffix: str, **kw
) -> Path:
    """Full path of a derivative: OUT/sub-X[/ses-Y][/datatype]/name."""
    folder = Path(out_dir) / f"sub-{subject}"
    if session:
        folder = folder / f"ses-{session}"
    if datatype:
        folder = folder / datatype
    return folder / derivative_name(subject, session, suffix, **kw)


def read_json(path: Path | None) -> dict:
    """A JSON sidecar as a dict ({} when absent)."""
    if path is None or not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BIDSError(f"{path} is not valid JSON: {exc}") from None
