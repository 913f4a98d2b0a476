"""Group report: OUTPUT_DIR/group.html with every subject's status and the cohort trajectories."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from pipeline import __version__
from pipeline.io import atomic_path
from pipeline.reports.data import TABLES, read_table
from pipeline.reports.embed import environment, figure_data_uri, table_html
from pipeline.reports.trajectories import COHORT_PANELS, cohort_trajectories, plot_mean_ci


def group_sessions(output_dir: Path) -> pd.DataFrame:
    """The cohort session table: OUTPUT_DIR/group/ when present, else the subjects' own tables.

    Parameters
    ----------
    output_dir : Path
        The pipeline's OUTPUT_DIR.

    Returns
    -------
    pandas.DataFrame
        One row per subject and session, with a ``subject`` column.
    """
    output_dir = Path(output_dir)
    name = TABLES["sessions"]
    group = read_table(output_dir / "group" / f"group_{name}.tsv")
    if not group.empty:
        return group
    frames = [read_table(p).assign(subject=p.parent.name[4:])
              for p in sorted(output_dir.glob(f"sub-*/sub-*_{name}.tsv"))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def subject_status(output_dir: Path) -> pd.DataFrame:
    """Status of every subject: logs/run_summary.tsv, plus subjects with results but no log row."""
    output_dir = Path(output_dir)
    status = read_table(output_dir / "logs" / "run_summary.tsv")
    if status.empty:
        status = pd.DataFrame(columns=["subject", "status", "duration_s", "error"])
    status["subject"] = status["subject"].astype(str)
    found = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
    extra = [s for s in found if s not in set(status["subject"])]
    if extra:
        status = pd.concat([status, pd.DataFrame({"subject": extra, "status": "ok (earlier run)",
                                                  "duration_s": None, "error": ""})])
    return status.fillna("").reset_index(drop=True)


def _cohort_config(output_dir: Path) -> dict:
    """The config recorded by the first subject's QC report (for the rADC band)."""
    for path in sorted(Path(output_dir).glob("sub-*/sub-*_desc-qc_report.json")):
        return json.loads(path.read_text()).get("config") or {}
    return {}


def _figures(sessions: pd.DataFrame, config: dict) -> list[dict]:
    from matplotlib.figure import Figure

    mean_fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (column, label) in zip(mean_fig.subplots(1, len(COHORT_PANELS)), COHORT_PANELS):
        plot_mean_ci(sessions, column, ax, label)
    return [
        {"uri": figure_data_uri(cohort_trajectories(sessions, config)),
         "alt": "cohort trajectories, one line per subject",
         "caption": "One line per subject: FLAIR-lesion volume, restricted volume and rADC of the "
                    "ever-restricted tissue (green band: pseudonormal range) against day."},
        {"uri": figure_data_uri(mean_fig), "alt": "mean and 95 % CI by day",
         "caption": "Mean across subjects per day with its t-based 95 % confidence interval "
                    "(sessions on the same day pooled; no interval with one subject)."},
    ]


def _status_rows(output_dir: Path) -> list[dict]:
    rows = subject_status(output_dir).to_dict("records")
    for row in rows:
        report = Path(output_dir) / f"sub-{row['subject']}.html"
        row["report"] = report.name if report.exists() else ""
    return rows


def write_group_report(output_dir: Path) -> Path:
    """Write OUTPUT_DIR/group.html: subject status table and cohort trajectories.

    Parameters
    ----------
    output_dir : Path
        The pipeline's OUTPUT_DIR.

    Returns
    -------
    Path
        The report written (atomically).
    """
    output_dir = Path(output_dir)
    sessions = group_sessions(output_dir)
    rows = _status_rows(output_dir)
    html = environment().get_template("group.html").render(
        version=__version__, created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        subjects=rows, n_subjects=len(rows),
        n_ok=sum(str(r["status"]) != "failed" for r in rows),
        figures=_figures(sessions, _cohort_config(output_dir)),
        sessions=table_html(sessions), n_rows=len(sessions),
    )
    dst = output_dir / "group.html"
    with atomic_path(dst) as tmp:
        tmp.write_text(html, encoding="utf-8")
        tmp.chmod(0o644)  # a report is for reading (the temporary file is private)
    return dst
