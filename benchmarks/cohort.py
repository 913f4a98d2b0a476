"""Cohort throughput: the same phantom cohort through Linear, MultiProc and Slurm.

    nice -n 5 .venv/bin/python benchmarks/cohort.py [--subjects 8] \
        [--backends Linear MultiProc SLURM] [--root SCRATCH]

Simulates N small-grid phantom subjects (2 sessions, days 0 and 3), runs the participant
level once per backend in fresh output/work folders and writes benchmarks/results/cohort.md:
wall time, subjects per hour, the scaling ratio against Linear, CPU time and peak memory of the
local runs, disk per subject, the load average around each run, and whether every backend
produced the same tables (same files and rows; byte-identical). The Slurm
backend uses the single-node cluster of scripts/local_slurm.sh (started here when root and not
already running via $SLURM_CONF). Not a test: machines are noisy, quote ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine_info  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
LESIONLAPSE = [str(Path(sys.executable).parent / "lesionlapse")]
RESULTS = REPO / "benchmarks" / "results" / "cohort.md"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _run(cmd: list[str], env: dict) -> tuple[float, float, int, int]:
    """Wall s, CPU s (user+sys of the command and the children it waited for: MultiProc
    workers, not Slurm jobs), its peak RSS (MB, largest single process) and exit status."""
    start = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, wait_status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, proc.returncode


def _tables(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("sub-*/*.tsv"))}


def _shapes(tables: dict[str, bytes]) -> dict[str, tuple[int, bytes]]:
    """Per table: number of rows and the header (what a bit-level difference cannot change
    unless a lesion appears or disappears)."""
    return {name: (data.count(b"\n"), data.split(b"\n", 1)[0]) for name, data in tables.items()}


def _slurm(root: Path, env: dict) -> tuple[dict, str | None]:
    """(env with SLURM_CONF, None) or (env, reason it is unavailable); starts a local cluster."""
    if env.get("SLURM_CONF") and shutil.which("sinfo"):
        return env, None
    if os.geteuid() != 0 or not shutil.which("slurmctld") or not shutil.which("munged"):
        return env, "needs root and the slurm-wlm + munge packages"
    folder = root / "slurm"
    env = {**env, "LOCAL_SLURM_DIR": str(folder), "LOCAL_SLURM_PORT": "17817"}
    subprocess.run(["sh", str(REPO / "scripts" / "local_slurm.sh"), "start"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return {**env, "SLURM_CONF": str(folder / "slurm.conf")}, None


def _machine() -> str:
    info = machine_info()
    mem = next(int(ln.split()[1]) // 1024 ** 2 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return (f"{info['nproc']} CPU ({info['cpu']}), {mem} GB RAM, {platform.platform()}; "
            f"lesionlapse {info['lesionlapse']}, Python {info['python']}, Nipype {info['nipype']}, "
            f"SimpleITK {info['SimpleITK']}, numpy {info['numpy']}")


def _slurm_version() -> str:
    """Versions of the Debian packages (sinfo --version needs a configured cluster)."""
    if not shutil.which("dpkg-query"):
        return "unknown"
    return subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}; ", "slurm-wlm",
                           "munge"], capture_output=True, text=True, check=False).stdout.strip(
                               "; ") or "absent"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=["Linear", "MultiProc", "SLURM"],
                   choices=["Linear", "MultiProc", "SLURM", "SLURMGraph"])
    p.add_argument("--grid", choices=("small", "clinical"), default="small")
    p.add_argument("--days", nargs="+", default=["0", "3"], help="session days (default: 0 3)")
    p.add_argument("--root", type=Path, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="lesionlapse-cohort-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NIPYPE_NO_ET": "1"}
    bids = root / "bids"
    if not bids.exists():
        subprocess.run([*LESIONLAPSE, "simulate", str(bids), "--preset", "mixed", "--subjects",
                        str(args.subjects), "--seed", "0", "--grid", args.grid, "--days", *args.days],
                       env=env, check=True, stdout=subprocess.DEVNULL)
    pythonpath = f"PYTHONPATH={os.environ['PYTHONPATH']} " if os.environ.get("PYTHONPATH") else ""
    command = pythonpath + " ".join(["nice -n 5 .venv/bin/python benchmarks/cohort.py",
                                     *(argv if argv is not None else sys.argv[1:])])
    rows, reference, notes = [], None, []
    for backend in args.backends:
        out, work = root / f"out-{backend}", root / f"work-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        run_env, extra = env, ["--plugin", backend]
        if backend == "MultiProc":
            extra += ["--nprocs", "2"]
        if backend.startswith("SLURM"):
            run_env, reason = _slurm(root, run_env)
            if reason:
                notes.append(f"{backend} skipped: {reason}")
                continue
            extra += ["--plugin-args", '{"sbatch_args": "-p debug --mem=1G"}']
        cmd = [*LESIONLAPSE, str(bids), str(out), "participant", "-w", str(work), *extra]
        print(f"{backend}: running {args.subjects} subjects ...", flush=True)
        load_before = os.getloadavg()[0]
        wall, cpu, rss, status = _run(cmd, run_env)
        tables = _tables(out)
        reference = reference or tables
        subs = sorted(out.glob("sub-*/"))
        rows.append({
            "backend": backend + (" (2 procs)" if backend == "MultiProc" else ""),
            "status": status, "done": len(subs), "wall": wall,
            "per_hour": len(subs) / wall * 3600,
            "cpu": cpu if not backend.startswith("SLURM") else None, "rss": rss,
            "disk_out": sum(_du(s) for s in subs) / max(1, len(subs)) / 1e6,
            "disk_work": _du(work) / args.subjects / 1e6, "same": tables == reference,
            "same_rows": _shapes(tables) == _shapes(reference),
            "load": (load_before, os.getloadavg()[0]),
        })
        print(f"{backend}: {wall:.0f} s, {rows[-1]['per_hour']:.1f} subjects/h", flush=True)
        _write(args, rows, notes, command)
    if (root / "slurm" / "slurm.conf").exists():
        subprocess.run(["sh", str(REPO / "scripts" / "local_slurm.sh"), "stop"],
                       env={**env, "LOCAL_SLURM_DIR": str(root / "slurm")},
                       stdout=subprocess.DEVNULL, check=False)
    print(f"wrote {args.out}")
    return 0


def _write(args, rows, notes, command) -> None:
    base = next((r["wall"] for r in rows if r["backend"] == "Linear"), rows[0]["wall"])
    multi = next((r["wall"] for r in rows if r["backend"].startswith("MultiProc")), None)
    lines = [
        "# Cohort throughput: Linear vs MultiProc vs Slurm", "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; Slurm: {_slurm_version()}  ",
        (f"Date: {time.strftime('%Y-%m-%d %H:%M')}. The load average (1 min) before/after each "
        "run is in the table: the 2 cores are shared with other jobs, so compare ratios, not "
        "absolute times."), "",
        (f"Cohort: {args.subjects} phantom subjects (`simulate --preset mixed --grid {args.grid} "
        f"--days {' '.join(args.days)} --seed 0`), {len(args.days)} sessions each; fresh output "
        "and work folders per backend; Slurm is the single-node cluster of "
        "`scripts/local_slurm.sh` (2 CPUs), `--plugin SLURM` with "
        "`sbatch_args='-p debug --mem=1G'` plus per-node `--mem`/`--cpus-per-task` hints."), "",
        ("| backend | exit | subjects done | wall (s) | subjects/h | speed vs Linear "
        "| speed vs MultiProc | CPU s/subject | peak RSS (MB) | output MB/subject "
        "| work MB/subject | load before/after | same tables and rows as first | byte-identical |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = f"{r['cpu'] / args.subjects:.0f}" if r["cpu"] is not None else "n/a (in jobs)"
        vs_multi = f"{multi / r['wall']:.2f}" if multi else "n/a"
        lines.append(
            f"| {r['backend']} | {r['status']} | {r['done']}/{args.subjects} | {r['wall']:.0f} | "
            f"{r['per_hour']:.1f} | {base / r['wall']:.2f} | {vs_multi} | {cpu} | {r['rss']} | "
            f"{r['disk_out']:.1f} | {r['disk_work']:.1f} | {r['load'][0]:.1f}/{r['load'][1]:.1f} "
            f"| {'yes' if r['same_rows'] else 'NO'} | {'yes' if r['same'] else 'NO'} |")
    lines += ["", *[f"- {n}" for n in notes],
              ("- Peak RSS: the largest single process of the run (lesionlapse and its MultiProc "
              "workers; for SLURM only the master, the nodes run in jobs). CPU s/subject: user+sys "
              "of the same processes."),
              ("- Same tables and rows: the same table files with the same headers and row counts "
              "as the first backend; byte-identical: the same bytes (runs are not "
              "bit-reproducible yet, see tests/test_cohort.py).")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
