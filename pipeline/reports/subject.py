"""A minimal per-subject HTML page linking the tables and images (the full report is richer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

from pipeline import __version__
from pipeline.io import atomic_path


def _env() -> Environment:
    return Environment(loader=PackageLoader("pipeline", "reports/templates"),
                       autoescape=select_autoescape(["html"]))


def write_subject_report(output_dir: Path, subject: str) -> Path:
    """Write OUTPUT_DIR/sub-X.html from the subject's derivative tables."""
    output_dir = Path(output_dir)
    subj_dir = output_dir / f"sub-{subject}"
    tables = []
    for name, title in (("desc-sessions_timeseries", "Sessions over time"),
                        ("desc-lesions_summary", "Lesions"),
                        ("desc-events", "Events per interval")):
        path = subj_dir / f"sub-{subject}_{name}.tsv"
        if path.exists():
            frame = pd.read_csv(path, sep="\t", na_values="n/a", dtype={"session": str})
            tables.append({"title": title, "file": path.relative_to(output_dir).as_posix(),
                           "html": frame.to_html(index=False, na_rep="n/a", float_format="%.4g",
                                                 border=0, classes="table")})
    files = sorted(p.relative_to(output_dir).as_posix() for p in subj_dir.rglob("*") if p.is_file())
    html = _env().get_template("subject.html").render(subject=subject, tables=tables, files=files,
                                                      version=__version__)
    dst = output_dir / f"sub-{subject}.html"
    with atomic_path(dst) as tmp:
        tmp.write_text(html)
    return dst
