"""A real (single-node) Slurm cluster: the cohort through --plugin SLURM, compared with MultiProc.

scripts/local_slurm.sh starts slurmctld, slurmd and munged in a temporary folder; a good
(seed-case) subject of the phantom cohort of tests/conftest.py runs through ``--plugin SLURM``
(one Slurm job per Nipype node, with the nodes' mem_gb/n_procs turned into
--mem/--cpus-per-task) and must succeed with byte-identical tables to the MultiProc run (one
ITK thread per process makes runs reproducible whatever the backend: pipeline.threads).
The cohort and its MultiProc run are session fixtures shared with tests/test_cohort.py, so
they are made once. One subject goes through Slurm: the runner runs subjects in turn through
the same code whatever the plugin, so more subjects only repeat the same jobs (three took
~3x as long). Skips where it cannot be root or the slurm-wlm/munge packages are absent
(``make test`` installs them as root).
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
from conftest import COHORT_GOOD as GOOD
from conftest import tables

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LESIONLAPSE = str(Path(sys.executable).parent / "lesionlapse")
#: the subject run through Slurm: sub-04, a seed case (lesions, so the tables compared below
#: hold more than a control's zeros)
SUBJECTS = (GOOD[-1],)


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
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True,
                             check=False)
    if started.returncode != 0:
        subprocess.run([*script, "stop"], env=env, capture_output=True, check=False)
        pytest.fail(f"local_slurm.sh start failed: {started.stderr}")
    yield {**env, "SLURM_CONF": str(folder / "slurm.conf")}
    subprocess.run([*script, "stop"], env=env, capture_output=True, check=False)


def test_local_cluster_runs_a_job(slurm):
    out = subprocess.run(["sbatch", "--wait", "-p", "debug", "--mem=64M", "-o", "/dev/null",
                          "--wrap", "true"], env=slurm, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def slurm_run(slurm, cohort_run, tmp_path_factory) -> dict:
    """A good subject of the cohort through ``--plugin SLURM`` on the local cluster."""
    root = tmp_path_factory.mktemp("slurm_run")
    out, work = root / "out", root / "work"
    cmd = [LESIONLAPSE, str(cohort_run["bids"]), str(out), "participant", "-w", str(work),
           "--participant-label", *SUBJECTS, "--plugin", "SLURM",
           "--plugin-args", '{"sbatch_args": "-p debug --mem=1G"}']
    run = subprocess.run(cmd, env=slurm, capture_output=True, text=True, check=False)
    return {"out": out, "work": work, "run": run}


def test_slurm_plugin_runs_the_cohort(slurm, slurm_run, cohort_run):
    out, work, run = slurm_run["out"], slurm_run["work"], slurm_run["run"]
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = pd.read_csv(out / "logs" / "run_summary.tsv", sep="\t", dtype=str)
    assert summary.status.tolist() == ["ok"] * len(SUBJECTS)
    # the same tables as the MultiProc run, with the same columns
    names = sorted(tables(cohort_run["out"], SUBJECTS))
    assert names and sorted(tables(out, SUBJECTS)) == names
    for name in names:
        sub = name.split("_")[0]
        header = (out / sub / name).read_text().split("\n", 1)[0]
        assert header == (cohort_run["out"] / sub / name).read_text().split("\n", 1)[0], name
    # the jobs really went through Slurm: Nipype wrote one batch script per submitted node
    assert list(work.glob("sub_*_wf/batch/batchscript_*.sh"))
    # and each carried its node's memory hint (0.5-2 GB), not only the global --mem=1G
    jobs = subprocess.run(["scontrol", "-o", "show", "job"], env=slurm, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    mems = {field.split("=", 1)[1] for job in jobs if "JobName=lesionlapse-probe" not in job
            for field in job.split() if field.startswith("MinMemoryNode=")}
    assert {"512M", "2G"} <= mems, mems


# Determinism (issue 9, pipeline.threads): every backend gives byte-identical tables.
def test_slurm_tables_equal_multiproc(slurm_run, cohort_run):
    assert tables(slurm_run["out"], SUBJECTS) == tables(cohort_run["out"], SUBJECTS)


def test_work_dir_invisible_to_jobs_is_refused(slurm, cohort_bids, tmp_path):
    """An unknown partition makes the probe job impossible: the run stops before any work."""
    run = subprocess.run([LESIONLAPSE, str(cohort_bids), str(tmp_path / "out"),
                          "participant", "-w", str(tmp_path / "work"), "--participant-label",
                          GOOD[0], "--plugin", "SLURM", "--plugin-args",
                          '{"sbatch_args": "-p nosuchpartition"}'],
                         env=slurm, capture_output=True, text=True, check=False)
    assert run.returncode == 2 and "probe job" in run.stderr


def test_work_dir_jobs_cannot_reach_is_refused(slurm, cohort_bids, tmp_path):
    """A job that runs but cannot read the work/output dirs (here: submitted as user nobody,
    who cannot enter root's 0700 pytest folders; on a cluster: a node-local /tmp) makes the
    probe fail; the run stops with exit status 2 before any work and says why."""
    work = tmp_path / "work"
    run = subprocess.run([LESIONLAPSE, str(cohort_bids), str(tmp_path / "out"), "participant",
                          "-w", str(work), "--participant-label", GOOD[0], "--plugin", "SLURM",
                          "--plugin-args", '{"sbatch_args": "-p debug --uid=nobody"}'],
                         env=slurm, capture_output=True, text=True, check=False)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "could not see the work directory" in run.stderr and "shared" in run.stderr
    assert not list(work.glob("sub_*_wf")) and not (tmp_path / "out" / f"sub-{GOOD[0]}").exists()
