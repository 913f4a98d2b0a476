"""The participant level over a cohort: failures recorded, summary, resume, kill -9, group.

The phantom cohort of tests/conftest.py (4 tiny subjects, days 0 and 3; sub-02's FLAIR is a
truncated file) is run once per test session (MultiProc; tests/test_slurm.py compares Slurm
against the same run); most tests below read that run. The kill -9 tests interrupt one subject in
fresh folders and rerun it: what must hold after any interruption (nothing half-written
published, finished work not redone, the rerun completes), and the resumed subject's tables
are byte-identical to the uninterrupted run's.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import COHORT_BROKEN as BROKEN
from conftest import COHORT_GOOD as GOOD
from conftest import summary_table, tables

from pipeline import runner
from pipeline.bids import discover
from pipeline.cli import main
from pipeline.config import load_config

pytestmark = pytest.mark.slow
LESIONLAPSE = str(Path(sys.executable).parent / "lesionlapse")


def test_failing_subject_is_recorded_and_the_others_succeed(cohort_run):
    assert cohort_run["status"] != 0, "one subject failed: the exit status must say so"
    summary = cohort_run["summary"].set_index("subject")
    assert summary.loc[list(GOOD), "status"].tolist() == ["ok"] * 3
    assert summary.loc[BROKEN, "status"] == "failed"
    assert f"sub-{BROKEN}_ses-" in summary.loc[BROKEN, "error"]
    assert "_FLAIR.nii.gz" in summary.loc[BROKEN, "error"], summary.loc[BROKEN, "error"]
    assert all(float(summary.loc[s, "duration_s"]) > 0 for s in GOOD)
    out = cohort_run["out"]
    assert sorted(p.name for p in out.glob("sub-*/")) == [f"sub-{s}" for s in GOOD]
    assert not (out / runner.STAGING).exists()
    for sub in (*GOOD, BROKEN):
        assert (out / "logs" / f"sub-{sub}").is_dir()
    lines = (out / "logs" / "lesionlapse.log").read_text().splitlines()
    assert sum(f"sub-{BROKEN}: FAILED" in ln for ln in lines) == 1
    assert all(sum(f"sub-{s}: done" in ln for ln in lines) == 1 for s in GOOD)


def test_group_level_holds_the_successful_subjects(cohort_run):
    assert cohort_run["group_status"] == 0
    group = pd.read_csv(cohort_run["out"] / "group" / "group_desc-sessions_timeseries.tsv",
                        sep="\t", dtype={"subject": str})
    assert sorted(group.subject.unique()) == list(GOOD)
    _, missing = runner.run_group_level(cohort_run["out"])
    assert missing == [BROKEN]


def test_completed_subjects_have_a_fingerprint(cohort_run):
    config = load_config(None)
    for subject in discover(cohort_run["bids"], list(GOOD), None):
        stamp = json.loads((cohort_run["out"] / f"sub-{subject.subject}" /
                            runner.FINGERPRINT).read_text())
        assert stamp == runner.fingerprint(subject, config)
        assert runner.is_up_to_date(subject, config, cohort_run["out"])
    # a changed input (mtime), config or missing table makes it stale
    (subject, *_) = discover(cohort_run["bids"], [GOOD[0]], None)
    flair = subject.sessions[0].flair
    st = flair.stat()
    os.utime(flair, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        assert not runner.is_up_to_date(subject, config, cohort_run["out"])
    finally:
        os.utime(flair, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert runner.is_up_to_date(subject, config, cohort_run["out"])
    assert not runner.is_up_to_date(subject, config.replace("tracking", min_overlap_voxels=4),
                                    cohort_run["out"])
    # resources do not change results
    assert runner.is_up_to_date(subject, config.replace("resources", nprocs=1), cohort_run["out"])
    stamp = cohort_run["out"] / f"sub-{subject.subject}" / runner.FINGERPRINT
    saved = stamp.read_text()
    stamp.write_text(saved.replace(runner.__version__, "0.0.0-old"))
    try:
        assert not runner.is_up_to_date(subject, config, cohort_run["out"])
    finally:
        stamp.write_text(saved)


def test_rerun_skips_completed_subjects_and_merges_the_summary(cohort_run):
    out, bids = cohort_run["out"], cohort_run["bids"]
    before = cohort_run["tables"]
    # only one subject this time: the summary must keep the rows of the others
    status = main([str(bids), str(out), "participant", "-w", str(cohort_run["work"]),
                   "--participant-label", GOOD[0]])
    assert status == 0
    summary = summary_table(out).set_index("subject")
    assert sorted(summary.index) == sorted((*GOOD, BROKEN))
    assert summary.loc[GOOD[0], "status"] == "up-to-date"
    assert summary.loc[BROKEN, "status"] == "failed"
    assert summary.loc[GOOD[1], "status"] == "ok"
    assert tables(out) == before


def test_summary_merge_keeps_other_subjects(tmp_path):
    path = tmp_path / "run_summary.tsv"
    runner.update_summary(path, [{"subject": "01", "status": "ok", "duration_s": 3.0},
                                 {"subject": "02", "status": "failed", "error": "bad\tfile"}])
    runner.update_summary(path, [{"subject": "02", "status": "ok", "duration_s": 4.0},
                                 {"subject": "03", "status": "failed", "error": "x"}])
    rows = {r["subject"]: r for r in runner.read_summary(path)}
    assert [rows[s]["status"] for s in ("01", "02", "03")] == ["ok", "ok", "failed"]
    assert rows["01"]["duration_s"] == "3.0" and rows["02"]["error"] == ""


def test_recover_after_kill_during_publish(tmp_path):
    """kill -9 between the two renames of _publish: the previous version comes back."""
    out = tmp_path
    old = out / ".sub-01.old"
    (old / "x.tsv").parent.mkdir(parents=True)
    (old / "x.tsv").write_text("previous")
    staging = out / runner.STAGING / "sub-01" / "sub-01"
    staging.mkdir(parents=True)
    (staging / "x.tsv").write_text("half")
    runner.recover(out, "01")
    assert (out / "sub-01" / "x.tsv").read_text() == "previous"
    assert not old.exists() and not (out / runner.STAGING / "sub-01").exists()
    # both present (killed after the second rename): the old copy is the leftover
    old.mkdir()
    (old / "x.tsv").write_text("older")
    runner.recover(out, "01")
    assert (out / "sub-01" / "x.tsv").read_text() == "previous" and not old.exists()
    # publishing replaces the folder as a whole
    staging.mkdir(parents=True)
    (staging / "y.tsv").write_text("new")
    runner._publish(staging, out / "sub-01")
    assert sorted(p.name for p in (out / "sub-01").iterdir()) == ["y.tsv"]


def test_progress_line():
    stream = io.StringIO()
    bar = runner.Progress(4, enabled=True, stream=stream)
    bar.started("01")
    bar.finished({"status": "ok", "duration_s": 60.0}, "sub-01: done")
    bar.finished({"status": "failed", "duration_s": 30.0}, "sub-02: failed")
    line = bar.line()
    assert line.startswith("[2/4 subjects, 1 failed, ") and "~01:30 left" in line
    bar.close()
    assert stream.getvalue().endswith("\n")
    quiet = runner.Progress(4, stream=io.StringIO())  # not a terminal: no progress line
    assert not quiet.enabled


def test_multiproc_gets_the_process_and_memory_limits():
    """--nprocs and [resources] mem_gb (or --plugin-args memory_gb) reach Nipype's MultiProc,
    which schedules nodes by their mem_gb/n_procs hints within these limits."""
    from pipeline.cli import _plugin_settings, build_parser

    config = load_config(None).replace("resources", nprocs=3, mem_gb=5.0)
    args = build_parser().parse_args(["bids", "out", "participant", "--nprocs", "3"])
    plugin, plugin_args = _plugin_settings(args, config)
    assert plugin == "MultiProc"
    assert plugin_args == {"n_procs": 3, "memory_gb": 5.0, "raise_insufficient": False}
    args = build_parser().parse_args(["bids", "out", "participant",
                                      "--plugin-args", '{"memory_gb": 1.5}'])
    assert _plugin_settings(args, config)[1]["memory_gb"] == 1.5


def test_multiproc_counts_a_multi_worker_node_one_worker_short():
    """The run's MultiProc lets a node of several workers (the subject space, the segment node)
    start when all but one worker's processors are free, so that it does not wait with a
    processor idle for a single-threaded node that runs beside it; the bookkeeping nodes the
    scheduler runs itself claim no processor and come after the nodes sent to the workers.
    The workflow's own nodes (what the cluster plugins ask Slurm for) keep their n_procs."""
    from copy import deepcopy

    import networkx as nx
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from pipeline.interfaces.registration import SubjectSpace
    from pipeline.interfaces.segmentation import SegmentSessions
    from pipeline.interfaces.session import LoadSession

    nodes = {
        "merge": pe.Node(niu.Merge(2), name="merge", run_without_submitting=True),
        "space": pe.Node(SubjectSpace(n_threads=1, n_workers=2), name="space", n_procs=2),
        "space_2threads": pe.Node(SubjectSpace(n_threads=2, n_workers=2), name="space2",
                                  n_procs=4),
        "segment": pe.Node(SegmentSessions(n_workers=3), name="segment", n_procs=3),
        "time_shared": pe.Node(SubjectSpace(n_threads=1, n_workers=4), name="space4",
                               n_procs=2),
        "one_worker": pe.Node(SubjectSpace(n_workers=1), name="one", n_procs=1),
        "threads_only": pe.Node(LoadSession(), name="load", n_procs=2),
    }
    copies = {key: deepcopy(node) for key, node in nodes.items()}  # as Workflow.run copies
    graph = nx.DiGraph()
    graph.add_nodes_from(copies.values())
    plugin = runner._multiproc_plugin({"n_procs": 4, "memory_gb": 4.0,
                                       "raise_insufficient": False})
    try:
        plugin._prerun_check(graph)
        plugin.procs = list(copies.values())
        order = [plugin.procs[j].name for j in plugin._sort_jobs(list(range(len(copies))))]
    finally:
        plugin.pool.shutdown()
    claimed = {key: node.n_procs for key, node in copies.items()}
    assert claimed == {"merge": 0, "space": 1, "space_2threads": 2, "segment": 2,
                       "time_shared": 1, "one_worker": 1, "threads_only": 2}
    assert {key: node.n_procs for key, node in nodes.items()} == {
        "merge": 1, "space": 2, "space_2threads": 4, "segment": 3, "time_shared": 2,
        "one_worker": 1, "threads_only": 2}
    assert order == ["space", "space2", "segment", "space4", "one", "load", "merge"]


def _add_one(x):
    return x + 1


def _total(values):
    return sum(values)


def test_multiproc_plugin_runs_a_workflow_to_the_end(tmp_path):
    """The runner's MultiProc (rounds woken by the nodes' ends, bookkeeping nodes without a
    processor) runs a chain with a fan-out and a merge, every node once, in dependency order."""
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    wf = pe.Workflow(name="chain", base_dir=str(tmp_path))
    first = pe.Node(niu.Function(function=_add_one, input_names=["x"], output_names=["y"]),
                    name="first")
    first.inputs.x = 0
    branches = [pe.Node(niu.Function(function=_add_one, input_names=["x"], output_names=["y"]),
                        name=f"branch{i}") for i in range(3)]
    merge = pe.Node(niu.Merge(3), name="merge", run_without_submitting=True)
    last = pe.Node(niu.Function(function=_total, input_names=["values"],
                                output_names=["total"]), name="last")
    for i, node in enumerate(branches, start=1):
        wf.connect(first, "y", node, "x")
        wf.connect(node, "y", merge, f"in{i}")
    wf.connect(merge, "out", last, "values")
    plugin = runner._multiproc_plugin({"n_procs": 2, "memory_gb": 1.0,
                                       "raise_insufficient": False})
    # an idle round waits for a node's end only while a node runs: the last round of the run
    # once waited the whole _IDLE_ROUND_S for a node that would never end
    waits = []

    class Recorded(threading.Event):
        def wait(self, timeout=None):
            waits.append(bool(plugin.proc_pending.any()))
            return super().wait(timeout)

    plugin._node_ended = Recorded()
    graph = wf.run(plugin=plugin)
    (node,) = [n for n in graph.nodes if n.name == "last"]
    assert node.result.outputs.total == 6
    assert len(list(tmp_path.glob("chain/*/result_*.pklz"))) == 6
    assert waits and all(waits)


def test_resource_options_override_the_config():
    from pipeline.cli import _plugin_settings, build_parser, config_from_args

    args = build_parser().parse_args(["bids", "out", "participant", "--nprocs", "4",
                                      "--mem-gb", "3.5", "--omp-nthreads", "2"])
    config = config_from_args(args)
    assert (config.resources.nprocs, config.resources.mem_gb,
            config.resources.omp_nthreads) == (4, 3.5, 2)
    assert _plugin_settings(args, config)[1]["memory_gb"] == 3.5
    defaults = config_from_args(build_parser().parse_args(["bids", "out", "participant"]))
    assert defaults.resources == load_config(None).resources


def test_linear_run_of_reshuffled_copy_gives_identical_tables(cohort_run, tmp_path):
    """Determinism (issue 9): a fresh run with the Linear plugin, on a copy of a seed-case
    subject of the cohort whose session folders were written to disk in reverse order, gives
    byte-identical tables to the cohort's MultiProc run (one ITK thread per process:
    pipeline.threads). Moved here from tests/test_end_to_end.py, where it reran the 4-session
    sample_data seed case: the cohort's 2-session seed case checks the same at half the cost."""
    sub = GOOD[-1]
    bids = tmp_path / "bids"
    bids.mkdir()
    for name in ("dataset_description.json", "participants.tsv"):
        shutil.copy(cohort_run["bids"] / name, bids / name)
    src = cohort_run["bids"] / f"sub-{sub}"
    (bids / f"sub-{sub}").mkdir()
    for path in sorted(src.iterdir(), reverse=True):  # newest session first on disk
        if path.is_dir():
            shutil.copytree(path, bids / f"sub-{sub}" / path.name)
        else:
            shutil.copy(path, bids / f"sub-{sub}" / path.name)
    out = tmp_path / "out"
    status = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"),
                   "--participant-label", sub, "--plugin", "Linear"])
    assert status == 0
    names = sorted(tables(cohort_run["out"], [sub]))
    assert names
    for name in names:
        mine = (out / f"sub-{sub}" / name).read_bytes()
        assert mine == cohort_run["tables"][name], name


def test_unwritable_work_dir_is_refused(tmp_path, cohort_bids):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = main([str(cohort_bids), str(tmp_path / "out"), "participant", "-w",
                   str(blocker / "work"), "--participant-label", GOOD[0]])
    assert status == 2


def test_config_dependent_input_checks_run_before_any_work(cohort_bids, tmp_path):
    """The run's config reaches validation: a plausible ADC range that fits none of the units
    refuses the scanner ADC map before any Nipype node runs (no workflow folder)."""
    config = tmp_path / "narrow.toml"
    config.write_text("[inputs]\nadc_plausible_min_um2_s = 4000.0\n"
                      "adc_plausible_max_um2_s = 5000.0\n")
    out, work = tmp_path / "out", tmp_path / "work"
    status = main([str(cohort_bids), str(out), "participant", "-w", str(work),
                   "--participant-label", GOOD[0], "--config", str(config)])
    assert status == 1
    row = summary_table(out).set_index("subject").loc[GOOD[0]]
    assert row.status == "failed"
    assert "_ADC.nii.gz" in row.error and "cannot detect the ADC unit" in row.error, row.error
    assert not (work / f"sub_{GOOD[0]}_wf").exists(), "work started before validation failed"


def _wait_for(predicate, timeout: float, proc) -> bool:
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _mtimes(paths) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


@pytest.fixture(scope="module")
def killed_and_rerun(cohort_run, tmp_path_factory) -> dict:
    """A participant run over sub-01 (already complete: its published folder is copied from the
    cohort run) and sub-03, killed with SIGKILL (whole process group, like a lost node) while
    sub-03's workflow runs; then the same command again. Returns what was seen after each."""
    bids, done, sub = cohort_run["bids"], GOOD[0], GOOD[1]
    root = tmp_path_factory.mktemp("kill9")
    out, work = root / "out", root / "work"
    out.mkdir()
    shutil.copytree(cohort_run["out"] / f"sub-{done}", out / f"sub-{done}")
    cmd = [LESIONLAPSE, str(bids), str(out), "participant", "-w", str(work),
           "--participant-label", done, sub, "--nprocs", "2"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wf = work / f"sub_{sub}_wf"
    try:
        started = _wait_for(lambda: any(wf.glob("ses_*/*/result_*.pklz")), 600, proc)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    seen = {"done": done, "sub": sub, "out": out, "work": work, "started": started,
            "published_after_kill": (out / f"sub-{sub}").exists(),
            "status_after_kill": summary_table(out).set_index("subject").status.to_dict(),
            "finished_nodes": _mtimes(wf.glob("ses_*/*/result_*.pklz")),
            "done_files": _mtimes((out / f"sub-{done}").rglob("*"))}
    seen["rerun"] = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seen["status_after_rerun"] = summary_table(out).set_index("subject").status.to_dict()
    return seen


def test_kill_9_leaves_nothing_half_written_and_the_rerun_resumes(killed_and_rerun, cohort_run):
    k = killed_and_rerun
    done, sub, out = k["done"], k["sub"], k["out"]
    assert k["started"], "the run ended before any node finished: nothing was interrupted"
    # after the kill: the interrupted subject is not published, the summary says so
    assert not k["published_after_kill"], "a half-written subject was published"
    assert k["status_after_kill"] == {done: "up-to-date", sub: "running"}
    # the same command completes, resuming from the cache
    assert k["rerun"].returncode == 0, k["rerun"].stdout[-2000:] + k["rerun"].stderr[-2000:]
    assert k["status_after_rerun"] == {done: "up-to-date", sub: "ok"}
    assert f"sub-{done}: up to date" in k["rerun"].stdout
    assert _mtimes(k["done_files"]) == k["done_files"], "the completed subject was recomputed"
    assert _mtimes(k["finished_nodes"]) == k["finished_nodes"], "finished nodes ran again"
    assert sorted(tables(out, [sub])) == sorted(tables(cohort_run["out"], [sub]))
    (subject,) = discover(cohort_run["bids"], [sub], None)
    assert runner.is_up_to_date(subject, load_config(None), out)
    assert not (out / runner.STAGING).exists()


# Determinism (issue 9, pipeline.threads): the resumed subject's tables are byte-identical.
def test_kill_9_rerun_tables_equal_the_uninterrupted_run(killed_and_rerun, cohort_run):
    sub = killed_and_rerun["sub"]
    assert tables(killed_and_rerun["out"], [sub]) == tables(cohort_run["out"], [sub])


def test_scheduler_runs_with_the_heap_frozen_and_unfreezes_after(tmp_path, monkeypatch):
    """run_subject freezes the objects that exist before the workflow runs (Nipype's MultiProc
    scheduler calls gc.collect() every round) and unfreezes them afterwards, also on failure."""
    import gc

    from conftest import REPO

    from pipeline.workflows import base

    seen = []

    class Workflow:
        base_dir = None

        def run(self, **_):
            seen.append(gc.get_freeze_count())
            raise RuntimeError("stop here")

    monkeypatch.setattr(base, "init_subject_wf", lambda **_: Workflow())
    subject = discover(REPO / "sample_data")[0]
    with pytest.raises(RuntimeError, match="stop here"):
        runner.run_subject(subject, config=load_config(), output_dir=tmp_path / "out",
                           work_dir=tmp_path / "work", plugin="Linear", plugin_args={})
    assert seen and seen[0] > 1000
    assert gc.get_freeze_count() == 0


def _stub_workflow(monkeypatch, init, ran):
    from pipeline.workflows import base

    class Workflow:
        base_dir = None

        def run(self, **_):
            ran.append(True)

    def build(**_):
        init()
        return Workflow()

    monkeypatch.setattr(base, "init_subject_wf", build)


def test_inputs_are_checked_while_the_workflow_is_built(tmp_path, monkeypatch):
    """run_subject checks the inputs in a process of their own while it builds the workflow
    (the check waits until the workflow is built and the build until the check has started:
    done one after the other, either would time out), runs the workflow only once the check
    has passed, and keeps the gzip files the check found complete (not checked again)."""
    from conftest import REPO

    from pipeline import io

    started, built, ran = tmp_path / "started", tmp_path / "built", []
    subject = discover(REPO / "sample_data")[0]
    flair = subject.sessions[0].flair

    def wait_for(path):
        end = time.time() + 30
        while not path.exists() and time.time() < end:
            time.sleep(0.05)
        return path.exists()

    def check(subject, config):
        started.write_text(str(os.getpid()))
        io._check_readable(flair)
        assert wait_for(built), "the inputs were checked before the workflow was built"
        return ["a warning"]

    def build():
        assert wait_for(started), "the workflow was built before the inputs were checked"
        built.write_text("")

    monkeypatch.setattr(runner, "validate_subject", check)
    monkeypatch.setattr(io, "_VERIFIED_GZIP", set())
    _stub_workflow(monkeypatch, build, ran)
    with pytest.raises(RuntimeError, match="without writing the tables"):
        runner.run_subject(subject, config=load_config(), output_dir=tmp_path / "out",
                           work_dir=tmp_path / "work", plugin="Linear", plugin_args={})
    assert ran == [True] and int(started.read_text()) != os.getpid()
    assert any(key[0] == str(flair.resolve()) for key in io._VERIFIED_GZIP)


def test_a_bad_input_stops_the_subject_before_the_workflow_runs(tmp_path, monkeypatch):
    """The check's error is the subject's error, also when building the workflow failed too
    (on what the bad input broke), and the workflow never runs."""
    from conftest import REPO

    from pipeline.io import InputError

    ran = []

    def check(subject, config):
        raise InputError("sub-01_ses-01_FLAIR.nii.gz: truncated")

    def broken_graph():
        raise ValueError("no such field")

    monkeypatch.setattr(runner, "validate_subject", check)
    subject = discover(REPO / "sample_data")[0]
    for init in (lambda: None, broken_graph):
        _stub_workflow(monkeypatch, init, ran)
        with pytest.raises(InputError, match="FLAIR.nii.gz: truncated"):
            runner.run_subject(subject, config=load_config(), output_dir=tmp_path / "out",
                               work_dir=tmp_path / "work", plugin="Linear", plugin_args={})
    assert not ran


_DIES_WITHOUT_RESULT = """
import tempfile
from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe
from pipeline import runner
from pipeline.interfaces.registration import ResampleSession

def _slash():
    return "/"

wf = pe.Workflow(name="dies", base_dir=tempfile.mkdtemp())
a = pe.Node(niu.Function(function=_slash, input_names=[], output_names=["out"]), name="a")
b = pe.Node(ResampleSession(), name="b")
wf.connect(a, "out", b, "subject_xfm")  # not a file: fails in the worker, before any result
wf.run(plugin=runner._multiproc_plugin({"n_procs": 2, "memory_gb": 1.0,
                                        "raise_insufficient": False}))
"""


def test_multiproc_plugin_stops_when_a_node_dies_without_a_result(tmp_path):
    """A node whose input fails validation in the worker returns no result; stock MultiProc
    waited for it for ever, the runner's plugin stops the run with the node's error. (A script
    in a subprocess, so that a regression fails here instead of hanging the suite; a file, so
    that Nipype can read the Function node's source.)"""
    script = tmp_path / "dies.py"
    script.write_text(_DIES_WITHOUT_RESULT)
    # cwd: Nipype writes the crash file there
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "subject_xfm" in proc.stderr
