"""End-to-end speed and memory of one subject, stage by stage, against the number of sessions.

    python benchmarks/end_to_end.py                 # clinical grid, 2, 4 and 8 sessions
    python benchmarks/end_to_end.py --sessions 4 --grid small
    python benchmarks/end_to_end.py --sessions 4 --json before.json    # keep the raw numbers
    python benchmarks/end_to_end.py --before before.json               # before/after per stage

For each session count, a seed-case phantom subject is simulated at clinical grids (FLAIR
~0.9x0.9x3 mm, DWI 2x2x4 mm with b0 + 6 directions) and ``lesionlapse ... participant`` runs
on it twice in fresh work directories: once with the Linear plugin (stage times add up, so
Nipype's overhead = wall - sum of node run times) and once with MultiProc on ``--nprocs``
processes (the wall time a user sees).

Memory: ``peak_rss_gb`` is the largest resident set of any single process of the run
(``getrusage(RUSAGE_CHILDREN)``); ``peak_tree_rss_gb`` is the largest sum over the process
tree (MultiProc workers together), sampled every 50 ms with psutil (shared pages of forked
workers count once per worker, so it is an upper bound). Per stage, the Linear run's process
RSS is sampled every 50 ms and each node gets the peak RSS seen between its start and end
(Nipype's result files give both): the process's memory while that stage ran, including
whatever the interpreter keeps from earlier stages.

CPU time (user + system of all child processes) is less sensitive to the load of a shared
machine than wall time; the load average is recorded before each run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown

RESULTS = Path(__file__).resolve().parent / "results"
DAYS = {2: (0, 8), 4: (0, 3, 8, 45), 8: (0, 3, 8, 14, 21, 30, 45, 60)}
EXE = Path(sys.executable).with_name("lesionlapse")
EXE_RUN = EXE  # the executable timed (--exe); simulation always uses EXE
SAMPLE_S = 0.05


def _stage(node_dir: Path, work: Path) -> str:
    """Stage name of a node folder: its node name without the session suffix."""
    name = node_dir.relative_to(work).parts[-1]
    if name.startswith(("merge_", "select_xfm_")):
        return "bookkeeping (merge/select nodes)"
    return "resample" if name.startswith("resample_") else name


def _utc(stamp: str) -> float:
    """POSIX time of one of Nipype's runtime time stamps (UTC, ISO format)."""
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def node_records(work: Path) -> list[dict]:
    """Stage, start, end and run time (s) of every node that ran, from Nipype's result files."""
    from nipype.utils.filemanip import loadpkl

    records = []
    for result in work.rglob("result_*.pklz"):
        runtime = getattr(loadpkl(result), "runtime", None)
        if runtime is None or getattr(runtime, "duration", None) is None:
            continue
        records.append({"stage": _stage(result.parent, work), "name": "/".join(
                            result.parent.relative_to(work).parts[1:]),
                        "duration_s": float(runtime.duration),
                        "start": _utc(runtime.startTime), "end": _utc(runtime.endTime)})
    return records


def gantt(records: list[dict], start: float, end: float, width: int = 60) -> list[str]:
    """A text Gantt chart of a run: one line per node (merge/select bookkeeping left out),
    its start and end in seconds from the process start, and a bar on ``width`` columns."""
    scale = width / max(end - start, 1e-9)
    lines = [f"{'node':28s} {'start':>6s} {'end':>6s}  "
             f"(s from the process start; it ended at {end - start:.1f} s)"]
    for rec in sorted(records, key=lambda r: (r["start"], r["name"])):
        if rec["stage"].startswith("bookkeeping"):
            continue
        a = int((rec["start"] - start) * scale)
        b = max(int((rec["end"] - start) * scale), a + 1)
        lines.append(f"{rec['name'][:28]:28s} {rec['start'] - start:6.1f} {rec['end'] - start:6.1f}"
                     f"  |{' ' * a}{'#' * (b - a)}")
    return lines


def stage_table(records: list[dict], samples: list[tuple[float, float]]) -> pd.DataFrame:
    """Per stage: number of nodes, summed run time (s), CPU share, peak process RSS (GB)."""
    stamps = pd.Series([rss for _, rss in samples], index=[t for t, _ in samples], dtype=float)
    rows: dict[str, dict] = defaultdict(lambda: {"nodes": 0, "time_s": 0.0, "peak_rss_gb": 0.0})
    for rec in records:
        row = rows[rec["stage"]]
        row["nodes"] += 1
        row["time_s"] += rec["duration_s"]
        # the sample just before the start counts too: a short node may fall between samples
        window = stamps[(stamps.index >= rec["start"] - SAMPLE_S) & (stamps.index <= rec["end"])]
        if len(window):
            row["peak_rss_gb"] = max(row["peak_rss_gb"], float(window.max()))
    table = pd.DataFrame.from_dict(rows, orient="index").sort_values("time_s", ascending=False)
    table.index.name = "stage"
    return table


class _Sampler(threading.Thread):
    """Samples (time, RSS of the root process, RSS summed over its process tree) in GB."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            try:
                root = self.proc.memory_info().rss
                tree = root
                for child in self.proc.children(recursive=True):
                    try:
                        tree += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.samples.append((time.time(), root / 1024**3, tree / 1024**3))
            self.done.wait(SAMPLE_S)


def run_once(bids: Path, out: Path, work: Path, plugin_args: list[str]) -> tuple[dict, list]:
    """One participant run in a child process: wall, CPU time, peak RSS, and RSS samples."""
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    epoch = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen([str(EXE_RUN), str(bids), str(out), "participant", "-w", str(work),
                             *plugin_args], stdout=subprocess.DEVNULL)
    sampler = _Sampler(proc.pid)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    sampler.done.set()
    sampler.join()
    if code:
        raise subprocess.CalledProcessError(code, proc.args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tree_peak = max((s[2] for s in sampler.samples), default=float("nan"))
    return ({"wall_s": wall, "cpu_s": cpu, "sys_s": after.ru_stime - before.ru_stime,
             "minor_faults_k": (after.ru_minflt - before.ru_minflt) / 1000,
             "peak_rss_gb": after.ru_maxrss / 1024**2,
             "peak_tree_rss_gb": tree_peak, "load_1min": load, "start": epoch,
             "end": epoch + wall},
            [(t, root) for t, root, _ in sampler.samples])


def bench(n_sessions: int, grid: str, nprocs: int, data: Path, root: Path,
          linear_run: bool = True) -> tuple[dict, pd.DataFrame | None]:
    """Linear (unless ``linear_run`` is False) and MultiProc runs of one simulated subject."""
    bids = data / f"bids{n_sessions}"
    if not (bids / "dataset_description.json").exists():
        subprocess.run([str(EXE), "simulate", str(bids), "--preset", "seed-case", "--grid", grid,
                        "--days", *map(str, DAYS[n_sessions])], check=True,
                       stdout=subprocess.DEVNULL)
    row: dict = {"sessions": n_sessions}
    stages = None
    if linear_run:
        linear, samples = run_once(bids, root / f"out{n_sessions}L", root / f"work{n_sessions}L",
                                   ["--plugin", "Linear", "--omp-nthreads", str(nprocs)])
        records = node_records(root / f"work{n_sessions}L")
        stages = stage_table(records, samples)
        node_sum = float(stages["time_s"].sum())
        # time outside the nodes: before the first (start-up, input validation, graph
        # building), after the last (publishing, HTML report) and between nodes (Nipype)
        before_first = min(r["start"] for r in records) - linear["start"]
        after_last = linear["end"] - max(r["end"] for r in records)
        row.update({
            "linear_wall_s": linear["wall_s"], "linear_cpu_s": linear["cpu_s"],
            "linear_node_sum_s": node_sum,
            "nipype_overhead_pct": 100 * (linear["wall_s"] - node_sum) / linear["wall_s"],
            "before_first_node_s": before_first, "after_last_node_s": after_last,
            "between_nodes_pct": 100 * (linear["wall_s"] - node_sum - before_first - after_last)
            / linear["wall_s"],
            "linear_peak_rss_gb": linear["peak_rss_gb"], "linear_load_1min": linear["load_1min"]})
    multi, _ = run_once(bids, root / f"out{n_sessions}M", root / f"work{n_sessions}M",
                        ["--nprocs", str(nprocs)])
    records = node_records(root / f"work{n_sessions}M")
    row["gantt"] = gantt(records, multi["start"], multi["end"])
    # the cores the MultiProc run left idle: wall x nprocs - CPU time, as seconds of wall time
    # (each second of it is one core idle for nprocs seconds or all cores for one)
    row.update({"multiproc_idle_s": multi["wall_s"] - multi["cpu_s"] / nprocs,
                "multiproc_before_first_node_s": min(r["start"] for r in records) - multi["start"],
                "multiproc_after_last_node_s": multi["end"] - max(r["end"] for r in records)})
    row.update({"multiproc_wall_s": multi["wall_s"], "multiproc_cpu_s": multi["cpu_s"],
                "multiproc_sys_s": multi["sys_s"],
                "multiproc_minor_faults_k": multi["minor_faults_k"],
                "multiproc_peak_rss_gb": multi["peak_rss_gb"],
                "multiproc_tree_rss_gb": multi["peak_tree_rss_gb"],
                "multiproc_load_1min": multi["load_1min"]})
    row["peak_rss_gb"] = max(row.get("linear_peak_rss_gb", 0.0), multi["peak_rss_gb"])
    row["load_1min"] = max(row.get("linear_load_1min", 0.0), multi["load_1min"])
    return row, stages


def _comparison(before: dict, after: dict, n: int) -> list[str]:
    """Before/after tables (whole run and per stage) for ``n`` sessions."""
    b_run, a_run = before["runs"].get(str(n), {}), after["runs"].get(str(n), {})
    keys = [k for k in a_run if k in b_run and k != "sessions"]
    run = pd.DataFrame({"before": [b_run[k] for k in keys], "after": [a_run[k] for k in keys]},
                       index=pd.Index(keys, name="measure"))
    run["after/before"] = run["after"] / run["before"]
    b_st = pd.DataFrame(before["stages"][str(n)])
    a_st = pd.DataFrame(after["stages"][str(n)])
    st = pd.DataFrame({"before_s": b_st["time_s"], "after_s": a_st["time_s"]})
    if "peak_rss_gb" in b_st:
        st["before_rss_gb"] = b_st["peak_rss_gb"]
    st["after_rss_gb"] = a_st["peak_rss_gb"]
    st[["before_s", "after_s"]] = st[["before_s", "after_s"]].fillna(0.0)
    st = st.sort_values("before_s", ascending=False)
    st["after/before"] = st["after_s"] / st["before_s"].where(st["before_s"] > 0)
    # shares of the node-time sum compare runs made under different machine loads
    st["before_%"] = 100 * st["before_s"] / st["before_s"].sum()
    st["after_%"] = 100 * st["after_s"] / st["after_s"].sum()
    st.index.name = "stage"
    return [
        f"## Before / after, {n} sessions",
        "",
        (f"Before: {before['command']} at lesionlapse {before['machine'].get('lesionlapse')}, "
        f"load average {before['machine'].get('load average')}."),
        "",
        markdown(run, floatfmt=".3g"),
        "",
        ("Per stage (Linear plugin; time = sum of node run times, RSS = peak process RSS while the "
        "stage ran):"),
        "",
        markdown(st, floatfmt=".3g"),
        "",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[2, 4, 8], choices=sorted(DAYS))
    parser.add_argument("--grid", choices=("clinical", "small"), default="clinical")
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "end_to_end.md")
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--before", type=Path,
                        help="raw numbers (--json) of an earlier run: adds before/after tables")
    parser.add_argument("--data", type=Path,
                        help="keep the simulated datasets here and reuse them (default: temporary)")
    parser.add_argument("--no-linear", action="store_true",
                        help="MultiProc runs only (no per-stage times)")
    parser.add_argument("--from-json", type=Path, nargs="+",
                        help="write the report from the raw numbers of earlier runs, run nothing")
    parser.add_argument("--exe", type=Path, default=EXE,
                        help="lesionlapse executable to time (e.g. one of an older commit)")
    args = parser.parse_args()
    global EXE_RUN
    EXE_RUN = args.exe
    command = (f"`python benchmarks/end_to_end.py --sessions {' '.join(map(str, args.sessions))}"
               f" --grid {args.grid} --nprocs {args.nprocs}"
               + (" --no-linear" if args.no_linear else "")
               + (f" --exe {args.exe}" if args.exe != EXE else "") + "`")

    if args.from_json:  # rebuild the report from earlier runs (e.g. run side by side)
        parts = [json.loads(p.read_text()) for p in args.from_json]
        raw = {"command": " and ".join(p["command"] for p in parts),
               "machine": dict(next((p["machine"] for p in parts if "nproc" in p["machine"]),
                                    parts[0]["machine"])),
               "runs": {k: v for p in parts for k, v in p["runs"].items()},
               "stages": {k: v for p in parts for k, v in p["stages"].items()}}
        raw["machine"]["load average"] = "; ".join(p["machine"]["load average"] for p in parts)
    else:
        raw = {"command": command, "machine": machine_info(), "runs": {}, "stages": {}}
        with tempfile.TemporaryDirectory(prefix="ll-e2e-bench-") as tmp:
            for n in args.sessions:
                data = args.data / args.grid if args.data else Path(tmp)
                data.mkdir(parents=True, exist_ok=True)
                row, stage = bench(n, args.grid, args.nprocs, data, Path(tmp),
                                   linear_run=not args.no_linear)
                raw["runs"][str(n)] = row
                print(pd.DataFrame([{k: v for k, v in row.items() if k != "gantt"}])
                      .to_string(index=False), flush=True)
                print("\n".join(row["gantt"]), flush=True)
                if stage is not None:
                    raw["stages"][str(n)] = stage.to_dict()
                    print(stage.to_string(), flush=True)
        if args.json:
            args.json.write_text(json.dumps(raw, indent=2))
    info = raw["machine"]
    charts = {n: run.pop("gantt") for n, run in raw["runs"].items() if "gantt" in run}
    table = pd.DataFrame(list(raw["runs"].values())).set_index("sessions").sort_index().T
    table.columns = [f"{n} sessions" for n in table.columns]
    table.index.name = "measure"
    if "4" in raw["runs"] and "8" in raw["runs"]:
        four, eight = raw["runs"]["4"], raw["runs"]["8"]
        ratio = eight["multiproc_wall_s"] / four["multiproc_wall_s"]
        cpu_ratio = eight["multiproc_cpu_s"] / four["multiproc_cpu_s"]
        scaling = (f"8 sessions take {ratio:.2f}x the MultiProc wall time of 4 and {cpu_ratio:.2f}x "
                   "its CPU time (target <= 2.2x).")
    else:
        scaling = "(scaling needs 4 and 8 sessions)"
    stages = {n: pd.DataFrame(st) for n, st in raw["stages"].items()}
    times = pd.DataFrame({f"{n} sessions": st["time_s"] for n, st in stages.items()})
    rss = pd.DataFrame({f"{n} sessions": st["peak_rss_gb"] for n, st in stages.items()})
    if stages:  # no Linear run (--no-linear): no per-stage numbers
        times = times.fillna(0.0).sort_values(by=times.columns[-1], ascending=False)
        times = times.loc[times.sum(axis=1) > 0]
        rss = rss.loc[times.index]
    times.index.name = rss.index.name = "stage"
    lines = [
        "# End-to-end speed and memory (one subject)",
        "",
        f"Command: {raw['command']}",
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
        ("`nipype_overhead_pct` = Linear wall time outside all node run times; of it, "
        "`before_first_node_s` is start-up, input validation and graph building, "
        "`after_last_node_s` publishing and the HTML report, and `between_nodes_pct` Nipype's "
        "own work between nodes (hashing, pickling results, scheduling). "
        "`multiproc_idle_s` = MultiProc wall - CPU / nprocs: the wall time lost to idle cores; "
        "`multiproc_before_first_node_s` / `multiproc_after_last_node_s`: the same run's "
        "start-up and tail outside the nodes. `multiproc_sys_s`: the system (kernel) part of its "
        "CPU time, mostly page faults of fresh memory; `multiproc_minor_faults_k`: those faults "
        "(thousands, all processes of the run)."),
        ("`peak_rss_gb`: largest single process; `multiproc_tree_rss_gb`: largest sum over the "
        "MultiProc process tree (upper bound, shared pages counted per worker)."),
        "",
        "## Time per stage (Linear plugin, sum of node run times, s)",
        "",
        markdown(times, floatfmt=".2f"),
        "",
        "## Peak process RSS while each stage ran (Linear plugin, GB)",
        "",
        markdown(rss, floatfmt=".2f"),
        "",
    ]
    for n in sorted(charts, key=int):
        lines += [f"## MultiProc schedule, {n} sessions (node start/end from Nipype's result "
                  "files)", "", "```", *charts[n], "```", ""]
    if args.before:
        before = json.loads(args.before.read_text())
        for n in sorted(raw["stages"], key=int):
            if n in before["runs"] and n in before["stages"]:
                lines += _comparison(before, raw, int(n))
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
