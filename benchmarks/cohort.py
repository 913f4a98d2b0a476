"""Cohort throughput: the same phantom cohort through Linear, MultiProc and Slurm.

    .venv/bin/python benchmarks/cohort.py [--subjects 8] [--backends Linear MultiProc SLURM]

Simulates N small-grid phantom subjects (2 sessions, days 0 and 3), runs the participant
level once per backend in fresh output/work folders and writes benchmarks/results/cohort.md:
wall time, subjects per hour, the scaling ratio against Linear, CPU time and peak memory of the
local runs, disk per subject, and whether every backend produced identical tables. The Slurm
backend uses the single-node cluster of scripts/local_slurm.sh (started here when root and not
already running via $SLURM_CONF). Not a test: machines are noisy, quote ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LESIONLAPSE = [str(Path(sys.executable).parent / "lesionlapse")]
RESULTS = REPO / "benchmarks" / "results" / "cohort.md"


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _run(cmd: list[str], env: dict) -> tuple[float, float, int, int]:
    """Wall s, CPU s (user+sys of the children) and peak RSS (MB) of the command, exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    status = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss // 1024, status


def _tables(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("sub-*/*.tsv"))}


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
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) // 1024 ** 2 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return f"{platform.node()}: {os.cpu_count()} CPU ({cpu}), {mem} GB RAM, {platform.platform()}"


def _versions() -> str:
    import nipype
    import SimpleITK

    import pipeline

    slurm = subprocess.run(["sinfo", "--version"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("sinfo") else "absent"
    return (f"lesionlapse {pipeline.__version__}, Python {platform.python_version()}, "
            f"Nipype {nipype.__version__}, SimpleITK {SimpleITK.Version_VersionString()}, {slurm}")


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
    command = " ".join(["python benchmarks/cohort.py", *(argv if argv is not None else sys.argv[1:])])
    load_before = os.getloadavg()
    rows, reference, notes = [], None, []
    for backend in args.backends:
        out, work = root / f"out-{backend}", root / f"work-{backend}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        run_env, extra = env, ["--plugin", backend]
        if backend == "MultiProc":
            extra += ["--nprocs", "2"]
        if backend.startswith("SLURM"):
            run_env, reason = _slurm(root, env)
            if reason:
                notes.append(f"{backend} skipped: {reason}")
                continue
            extra += ["--plugin-args", '{"sbatch_args": "-p debug --mem=1G"}']
        cmd = [*LESIONLAPSE, str(bids), str(out), "participant", "-w", str(work), *extra]
        print(f"{backend}: running {args.subjects} subjects ...", flush=True)
        wall, cpu, rss, status = _run(cmd, run_env)
        tables = _tables(out)
        reference = reference or tables
        subs = sorted(out.glob("sub-*/"))
        rows.append({
            "backend": backend + (" (2 procs)" if backend == "MultiProc" else ""),
            "status": status, "wall": wall, "per_hour": args.subjects / wall * 3600,
            "cpu": cpu if not backend.startswith("SLURM") else None, "rss": rss,
            "disk_out": sum(_du(s) for s in subs) / max(1, len(subs)) / 1e6,
            "disk_work": _du(work) / args.subjects / 1e6, "same": tables == reference,
        })
        print(f"{backend}: {wall:.0f} s, {rows[-1]['per_hour']:.1f} subjects/h", flush=True)
        _write(args, rows, notes, command, load_before)
    if (root / "slurm" / "slurm.conf").exists():
        subprocess.run(["sh", str(REPO / "scripts" / "local_slurm.sh"), "stop"],
                       env={**env, "LOCAL_SLURM_DIR": str(root / "slurm")},
                       stdout=subprocess.DEVNULL)
    print(f"wrote {args.out}")
    return 0


def _write(args, rows, notes, command, load_before) -> None:
    base = next((r["wall"] for r in rows if r["backend"] == "Linear"), rows[0]["wall"])
    lines = [
        "# Cohort throughput: Linear vs MultiProc vs Slurm", "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}  ",
        f"Versions: {_versions()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; load average before: "
        f"{', '.join(f'{x:.1f}' for x in load_before)}, after: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (the 2 cores were shared with other "
        "jobs: compare ratios, not absolute times)", "",
        f"Cohort: {args.subjects} phantom subjects (`simulate --preset mixed --grid {args.grid} "
        f"--days {' '.join(args.days)} --seed 0`), {len(args.days)} sessions each; fresh output and work folders per backend; Slurm is the "
        "single-node cluster of `scripts/local_slurm.sh` (2 CPUs), `--plugin SLURM` with "
        "`sbatch_args='-p debug --mem=1G'` plus per-node `--mem`/`--cpus-per-task` hints.", "",
        "| backend | exit | wall (s) | subjects/h | speed vs Linear | CPU s/subject | peak RSS (MB) "
        "| output MB/subject | work MB/subject | tables byte-identical to first |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = f"{r['cpu'] / args.subjects:.0f}" if r["cpu"] is not None else "n/a (in jobs)"
        lines.append(
            f"| {r['backend']} | {r['status']} | {r['wall']:.0f} | {r['per_hour']:.1f} | "
            f"{base / r['wall']:.2f} | {cpu} | {r['rss']} | {r['disk_out']:.1f} | "
            f"{r['disk_work']:.1f} | {'yes' if r['same'] else 'NO'} |")
    lines += ["", *[f"- {n}" for n in notes],
              "Peak RSS is the largest single process (for Linear: the whole pipeline in one "
              "process, so an upper bound for one Nipype node). CPU s/subject is user+sys of "
              "the local processes."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
