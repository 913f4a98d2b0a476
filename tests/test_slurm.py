"""A real (single-node) Slurm cluster: the cohort through --plugin SLURM equals MultiProc.

scripts/local_slurm.sh starts slurmctld, slurmd and munged in a temporary folder; the three
good subjects of tests/test_cohort.py's phantom cohort run through ``--plugin SLURM`` (one
Slurm job per Nipype node, with the nodes' mem_gb/n_procs turned into --mem/--cpus-per-task)
and their tables must equal those of the MultiProc run (ids and categories exactly, numbers
within 5 %: two runs are not bit-identical, whatever the backend). Skips where it cannot be root or the
slurm-wlm/munge packages are absent (``make test`` installs them as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from test_cohort import (  # noqa: F401 (shared session fixtures)
    GOOD, assert_same_tables, cohort_bids, cohort_run, tables)

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LESIONLAPSE = str(Path(sys.executable).parent / "lesionlapse")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start slurmd/slurmctld/munged (run 'make test' as root)"
    absent = [c for c in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(c) is None]
    if absent:
        return (f"{', '.join(absent)} not installed (Debian packages slurm-wlm and munge; "
                "scripts/install_system_deps.sh installs them as root)")
    return None


def _free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65000:
            try:
                with socket.socket() as s2:
                    s2.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no free pair of ports")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "LOCAL_SLURM_DIR": str(folder), "LOCAL_SLURM_PORT": str(_free_port_pair())}
    script = ["sh", str(REPO / "scripts" / "local_slurm.sh")]
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True)
    if started.returncode != 0:
        subprocess.run([*script, "stop"], env=env, capture_output=True)
        pytest.fail(f"local_slurm.sh start failed: {started.stderr}")
    yield {**env, "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run([*script, "stop"], env=env, capture_output=True)


def test_local_cluster_runs_a_job(slurm):
    out = subprocess.run(["sbatch", "--wait", "-p", "debug", "--mem=64M", "-o", "/dev/null",
                          "--wrap", "true"], env=slurm, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_slurm_plugin_equals_multiproc(slurm, cohort_run, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [LESIONLAPSE, str(cohort_run["bids"]), str(out), "participant", "-w", str(work),
           "--participant-label", *GOOD, "--plugin", "SLURM",
           "--plugin-args", '{"sbatch_args": "-p debug --mem=1G"}']
    run = subprocess.run(cmd, env=slurm, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = pd.read_csv(out / "logs" / "run_summary.tsv", sep="\t", dtype=str)
    assert summary.status.tolist() == ["ok"] * len(GOOD)
    assert_same_tables(out, cohort_run["out"], GOOD)
    # the jobs really went through Slurm: Nipype wrote one batch script per submitted node
    assert list(work.glob("sub_*_wf/batch/batchscript_*.sh"))


def test_work_dir_invisible_to_jobs_is_refused(slurm, cohort_run, tmp_path):
    """An unknown partition makes the probe job impossible: the run stops before any work."""
    run = subprocess.run([LESIONLAPSE, str(cohort_run["bids"]), str(tmp_path / "out"),
                          "participant", "-w", str(tmp_path / "work"), "--participant-label",
                          GOOD[0], "--plugin", "SLURM", "--plugin-args",
                          '{"sbatch_args": "-p nosuchpartition"}'],
                         env=slurm, capture_output=True, text=True)
    assert run.returncode == 2 and "probe job" in run.stderr
