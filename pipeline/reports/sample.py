"""Derivatives of the bundled sample_data for the notebooks and the report tests.

The pipeline runs on a copy-free read of sample_data/ and writes only to the output and work
folders given (by default the git-ignored demo_output/ and demo_output_work/ of ``make demo``),
never into sample_data/.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pipeline

REPO = Path(pipeline.__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"
DEFAULT_OUTPUT = REPO / "demo_output"
_CLI = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"


def is_complete(output_dir: Path) -> bool:
    """True when ``output_dir`` holds a finished participant and group run."""
    output_dir = Path(output_dir)
    return ((output_dir / "logs" / "run_summary.tsv").exists()
            and (output_dir / "group" / "group_desc-sessions_timeseries.tsv").exists())


def _run(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", _CLI, *args], capture_output=True, text=True)
    if result.returncode not in (0, 1):  # 1: some subject failed, recorded in run_summary.tsv
        raise RuntimeError(f"lesionlapse {' '.join(args)} failed ({result.returncode}):\n"
                           f"{result.stderr[-3000:]}")


def sample_derivatives(output_dir: Path | None = None, work_dir: Path | None = None,
                       nprocs: int = 2) -> Path:
    """Return a folder of sample_data derivatives, running the pipeline only when needed.

    Parameters
    ----------
    output_dir : Path, optional
        Where the derivatives are (or go); default ``demo_output/`` beside sample_data.
    work_dir : Path, optional
        Nipype cache; default ``<output_dir>_work``.
    nprocs : int
        Processes for the run.

    Returns
    -------
    Path
        ``output_dir``, holding the participant and group results.
    """
    output_dir = Path(output_dir or DEFAULT_OUTPUT).resolve()
    if is_complete(output_dir):
        return output_dir
    if not SAMPLE_DATA.is_dir():
        raise FileNotFoundError(f"sample_data not found at {SAMPLE_DATA} (installed without the "
                                "repository?); run lesionlapse yourself and pass its OUTPUT_DIR")
    if output_dir == SAMPLE_DATA or SAMPLE_DATA in output_dir.parents:
        raise ValueError(f"refusing to write derivatives into {SAMPLE_DATA}")
    work_dir = Path(work_dir or output_dir.with_name(output_dir.name + "_work")).resolve()
    _run([str(SAMPLE_DATA), str(output_dir), "participant", "-w", str(work_dir),
          "--nprocs", str(nprocs)])
    _run([str(SAMPLE_DATA), str(output_dir), "group"])
    return output_dir
