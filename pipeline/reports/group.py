"""Group report: cohort trajectories and the status of every subject."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.io import atomic_path


def write_group_report(output_dir: Path) -> Path:
    """Write OUTPUT_DIR/group.html (a minimal table until the full report lands)."""
    output_dir = Path(output_dir)
    summary = output_dir / "logs" / "run_summary.tsv"
    status = (pd.read_csv(summary, sep="\t", dtype=str, keep_default_na=False)
              if summary.exists() else pd.DataFrame(columns=["subject", "status", "error"]))
    html = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>lesionlapse group</title>"
            "</head><body><h1>Subjects</h1>" + status.to_html(index=False) + "</body></html>")
    dst = output_dir / "group.html"
    with atomic_path(dst) as tmp:
        tmp.write_text(html)
    return dst
