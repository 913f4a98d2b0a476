"""End-to-end speed and memory of one subject, stage by stage, against the number of sessions.

    python benchmarks/end_to_end.py                 # clinical grid, 2, 4 and 8 sessions
    python benchmarks/end_to_end.py --sessions 4 --grid small

For each session count, a seed-case phantom subject is simulated at clinical grids (FLAIR
~0.9x0.9x3 mm, DWI 2x2x4 mm with b0 + 6 directions) and ``lesionlapse ... participant`` runs
on it twice in fresh work directories: once with the Linear plugin (stage times add up, so
Nipype's overhead = wall - sum of node run times) and once with MultiProc on ``--nprocs``
processes (the wall time a user sees). Peak RSS is the largest resident set of any process of
the run (``getrusage(RUSAGE_CHILDREN)``); with MultiProc, workers add up to at most
``nprocs`` times that. Writes benchmarks/results/end_to_end.md.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DAYS = {2: (0, 8), 4: (0, 3, 8, 45), 8: (0, 3, 8, 14, 21, 30, 45, 60)}
EXE = Path(sys.executable).with_name("lesionlapse")


def _stage(node_dir: Path, work: Path) -> str:
    """Stage name of a node folder: its node name without the session suffix."""
    parts = node_dir.relative_to(work).parts
    name = parts[-1]
    if name.startswith(("merge_", "select_xfm_")):
        return "bookkeeping (merge/select nodes)"
    return "resample" if name.startswith("resample_") else name


def node_times(work: Path) -> dict[str, float]:
    """Sum of node run times per stage, from Nipype's result files (seconds)."""
    from nipype.utils.filemanip import loadpkl

    totals: dict[str, float] = defaultdict(float)
    for result in work.rglob("result_*.pklz"):
        runtime = getattr(loadpkl(result), "runtime", None)
        duration = getattr(runtime, "duration", None) if runtime is not None else None
        if duration is not None:
            totals[_stage(result.parent, work)] += float(duration)
    return dict(totals)


def run_once(bids: Path, out: Path, work: Path, plugin_args: list[str]) -> dict:
    """One participant run in a child process: wall, CPU time and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([str(EXE), str(bids), str(out), "participant", "-w", str(work), *plugin_args],
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_gb": after.ru_maxrss / 1024**2}


def bench(n_sessions: int, grid: str, nprocs: int, root: Path) -> tuple[dict, dict]:
    bids = root / f"bids{n_sessions}"
    subprocess.run([str(EXE), "simulate", str(bids), "--preset", "seed-case", "--grid", grid,
                    "--days", *map(str, DAYS[n_sessions])], check=True, stdout=subprocess.DEVNULL)
    linear = run_once(bids, root / f"out{n_sessions}L", root / f"work{n_sessions}L",
                      ["--plugin", "Linear", "--omp-nthreads", str(nprocs)])
    stages = node_times(root / f"work{n_sessions}L")
    linear["node_sum_s"] = sum(stages.values())
    linear["overhead_pct"] = 100 * (linear["wall_s"] - linear["node_sum_s"]) / linear["wall_s"]
    multi = run_once(bids, root / f"out{n_sessions}M", root / f"work{n_sessions}M",
                     ["--nprocs", str(nprocs)])
    row = {"sessions": n_sessions, "multiproc_wall_s": multi["wall_s"],
           "multiproc_cpu_s": multi["cpu_s"], "linear_wall_s": linear["wall_s"],
           "linear_node_sum_s": linear["node_sum_s"], "nipype_overhead_pct": linear["overhead_pct"],
           "peak_rss_gb": max(linear["peak_rss_gb"], multi["peak_rss_gb"])}
    return row, stages


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[2, 4, 8], choices=sorted(DAYS))
    parser.add_argument("--grid", choices=("clinical", "small"), default="clinical")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "end_to_end.md")
    args = parser.parse_args()

    rows, stages = [], {}
    with tempfile.TemporaryDirectory(prefix="ll-e2e-bench-") as tmp:
        for n in args.sessions:
            row, stage = bench(n, args.grid, args.nprocs, Path(tmp))
            rows.append(row)
            stages[f"{n} sessions"] = stage
            print(pd.DataFrame([row]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows).set_index("sessions")
    if 4 in table.index and 8 in table.index:
        ratio = table.loc[8, "multiproc_wall_s"] / table.loc[4, "multiproc_wall_s"]
        scaling = f"8 sessions take {ratio:.2f}x the wall time of 4 (target <= 2.2x)."
    else:
        scaling = "(scaling needs 4 and 8 sessions)"
    stage_table = pd.DataFrame(stages).fillna(0.0).sort_values(by=list(stages)[-1], ascending=False)
    info = machine_info()
    text = "\n".join([
        "# End-to-end speed and memory (one subject)",
        "",
        f"Command: `python benchmarks/end_to_end.py --sessions {' '.join(map(str, args.sessions))}"
        f" --grid {args.grid} --nprocs {args.nprocs}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        "## Whole run",
        "",
        markdown(table, floatfmt=".3g"),
        "",
        scaling,
        "",
        "Targets: 4 sessions <= 60 s wall on 2 cores, <= 2 GB peak RSS, Nipype overhead <= 15%.",
        "",
        "## Time per stage (Linear plugin, sum of node run times, s)",
        "",
        markdown(stage_table, floatfmt=".2f"),
        "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
