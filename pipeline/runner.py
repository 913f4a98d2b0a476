"""Running subjects: validation, one Nipype workflow per subject, atomic publication, logs.

Every subject is its own unit: a subject that fails is recorded with its error and the run
goes on. A subject's derivatives are written to a staging folder inside OUTPUT_DIR and renamed
into place only when complete, so OUTPUT_DIR never holds a half-written subject.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline import __version__
from pipeline.bids import SubjectInputs
from pipeline.config import Config
from pipeline.io import atomic_path
from pipeline.validate import validate_subject

STAGING = ".lesionlapse-staging"
BIDSIGNORE = """\
*.html
logs/
*_xfm.txt
*_desc-qc_report.json
sub-*/sub-*_desc-*.tsv
sub-*/sub-*_desc-*.json
group/
"""
README = """\
Derivatives written by lesionlapse (serial brain MRI lesion tracking).

sub-X/sub-X_desc-sessions_timeseries.tsv  one row per session (volumes, ADC, pseudonormalization)
sub-X/sub-X_desc-lesions_timeseries.tsv   one row per lesion per session
sub-X/sub-X_desc-events.tsv               lesion events per interval
sub-X/sub-X_desc-lineage.tsv              lesion ids and their parents/children
sub-X/sub-X_desc-lesions_summary.tsv      per lesion: nadir, pseudonormalization day
sub-X/ses-Y/...                           images and masks (space-subject: the within-subject
                                          space; no space entity: the session's native grid)
sub-X.html                                per-subject report
logs/run_summary.tsv                      status of every subject of the last run
Every TSV has a JSON sidecar describing its columns and units.
"""


def write_dataset_description(output_dir: Path, bids_dir: Path | None = None) -> None:
    """dataset_description.json and .bidsignore of the derivatives dataset."""
    desc = {
        "Name": "lesionlapse derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionlapse", "Version": __version__,
                         "Description": "Serial brain MRI lesion tracking"}],
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
    with atomic_path(output_dir / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(desc, indent=2))
    with atomic_path(output_dir / ".bidsignore") as tmp:
        tmp.write_text(BIDSIGNORE)
    readme = output_dir / "README"
    if not readme.exists():
        with atomic_path(readme) as tmp:
            tmp.write_text(README)


def _configure_nipype(log_dir: Path, plugin: str) -> None:
    from nipype import config, logging

    # Nipype sleeps this long between scheduling rounds (default 2 s): local plugins poll fast,
    # cluster plugins slowly so as not to hammer the scheduler.
    poll = 0.05 if plugin in ("MultiProc", "Linear") else 2.0
    config.update_config({
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "remove_unnecessary_outputs": False,
            "stop_on_first_crash": True,
            "hash_method": "timestamp",
            "poll_sleep_duration": poll,
        },
        # Nipype's own log file uses a lock that breaks in forked MultiProc workers; the
        # subject log is a plain FileHandler instead (see _subject_log).
        "logging": {"workflow_level": "WARNING", "interface_level": "WARNING",
                    "log_to_file": False},
        "monitoring": {"enabled": False},
    })
    logging.update_logging(config)


@contextmanager
def _subject_log(path: Path):
    """Send Nipype's workflow and interface messages to the subject's log file."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("nipype.workflow", "nipype.interface")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def _crash_message(log_dir: Path, since: float) -> str | None:
    """The last line of the newest crash file's traceback (the actual error)."""
    crashes = sorted((p for p in log_dir.glob("crash-*.txt") if p.stat().st_mtime >= since),
                     key=lambda p: p.stat().st_mtime)
    for crash in reversed(crashes):
        lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
        for line in reversed(lines):
            if ("Error" in line or "Exception" in line) and ":" in line and not line.startswith("File "):
                return line.split(":", 1)[1].strip() if line.split(":", 1)[0].endswith(
                    ("Error", "Exception")) else line
    return None


def _publish(staging_subject: Path, final: Path) -> None:
    """Replace ``final`` by the complete staging folder with renames (same filesystem)."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging_subject.rename(final)
    if old.exists():
        shutil.rmtree(old)


def run_subject(subject: SubjectInputs, *, config: Config, output_dir: Path, work_dir: Path,
                plugin: str, plugin_args: dict) -> None:
    """Validate, build and run one subject's workflow, then publish its derivatives."""
    from pipeline.reports.subject import write_subject_report
    from pipeline.workflows.base import init_subject_wf

    validate_subject(subject)
    staging = output_dir / STAGING / f"sub-{subject.subject}"
    workflow = init_subject_wf(subject=subject, config=config, staging_dir=staging)
    workflow.base_dir = str(work_dir)
    try:
        workflow.run(plugin=plugin, plugin_args=dict(plugin_args))
        _publish(staging / f"sub-{subject.subject}", output_dir / f"sub-{subject.subject}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_subject_report(output_dir, subject.subject)


def run_subjects(subjects: list[SubjectInputs], *, config: Config, bids_dir: Path,
                 output_dir: Path, work_dir: Path, plugin: str, plugin_args: dict) -> list[dict]:
    """Run each subject in turn; returns one summary row per subject (also in logs/)."""
    output_dir = Path(output_dir).resolve()
    work_dir = Path(work_dir).resolve()
    log_root = output_dir / "logs"
    log_root.mkdir(parents=True, exist_ok=True)
    write_dataset_description(output_dir, bids_dir)
    summary = []
    for subject in subjects:
        log_dir = log_root / f"sub-{subject.subject}"
        log_dir.mkdir(parents=True, exist_ok=True)
        _configure_nipype(log_dir, plugin)
        start = time.time()
        row = {"subject": subject.subject, "status": "ok", "duration_s": 0.0, "error": ""}
        try:
            with _subject_log(log_dir / "nipype.log"):
                run_subject(subject, config=config, output_dir=output_dir, work_dir=work_dir,
                            plugin=plugin, plugin_args=plugin_args)
        except Exception as exc:  # one subject's failure must not stop the cohort
            row["status"] = "failed"
            message = _crash_message(log_dir, start) if isinstance(exc, RuntimeError) else None
            row["error"] = message or str(exc) or type(exc).__name__
        row["duration_s"] = round(time.time() - start, 1)
        summary.append(row)
        print(f"sub-{subject.subject}: {row['status']} in {row['duration_s']:.0f} s"
              + (f" ({row['error']})" if row["error"] else ""), flush=True)
    shutil.rmtree(output_dir / STAGING, ignore_errors=True)
    _write_summary(log_root / "run_summary.tsv", summary)
    return summary


def _write_summary(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["subject", "status", "duration_s", "error"],
                                delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


GROUP_TABLES = ("desc-sessions_timeseries.tsv", "desc-lesions_timeseries.tsv", "desc-events.tsv",
                "desc-lineage.tsv", "desc-lesions_summary.tsv")


def run_group_level(output_dir: Path) -> tuple[list[Path], list[str]]:
    """Concatenate every subject's tables (with a ``subject`` column) into OUTPUT_DIR/group/."""
    import pandas as pd

    output_dir = Path(output_dir)
    subjects = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
    if not subjects:
        raise ValueError(f"{output_dir} holds no subject results; run the participant level first")
    summary = output_dir / "logs" / "run_summary.tsv"
    missing: list[str] = []
    if summary.exists():
        runs = pd.read_csv(summary, sep="\t", dtype=str, keep_default_na=False)
        missing = sorted(set(runs.loc[runs.status != "ok", "subject"]) - set(subjects))
    written = []
    for name in GROUP_TABLES:
        frames = []
        for sub in subjects:
            path = output_dir / f"sub-{sub}" / f"sub-{sub}_{name}"
            if path.exists():
                frame = pd.read_csv(path, sep="\t", na_values="n/a", dtype={"session": str})
                frames.append(frame.assign(subject=sub)[["subject", *frame.columns]])
        if frames:
            dst = output_dir / "group" / f"group_{name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst) as tmp:
                pd.concat(frames, ignore_index=True).to_csv(tmp, sep="\t", index=False,
                                                            na_rep="n/a", float_format="%.6g")
            sidecar = output_dir / f"sub-{subjects[0]}" / f"sub-{subjects[0]}_{name[:-4]}.json"
            if sidecar.exists():
                meta = json.loads(sidecar.read_text())
                meta = {"subject": {"Description": "Subject label (without 'sub-')"}, **meta}
                with atomic_path(dst.with_suffix(".json")) as tmp:
                    tmp.write_text(json.dumps(meta, indent=2))
            written.append(dst)
    return written, missing
