"""Running subjects: validation, one Nipype workflow per subject, atomic publication, logs.

Every subject is its own unit: a subject that fails is recorded with its error and the run
goes on. A subject's derivatives are written to a staging folder inside OUTPUT_DIR and renamed
into place only when complete, so OUTPUT_DIR never holds a half-written subject.
"""

from __future__ import annotations

import csv
import fcntl
import gc
import getpass
import hashlib
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from pipeline import __version__
from pipeline import io as pipeline_io
from pipeline.bids import SubjectInputs
from pipeline.config import Config
from pipeline.io import atomic_path
from pipeline.validate import validate_subject

STAGING = ".lesionlapse-staging"
BIDSIGNORE = """\
*.html
logs/
*_xfm.txt
*_desc-qc_report.json
sub-*/sub-*_desc-*.tsv
sub-*/sub-*_desc-*.json
group/
"""
README = """\
Derivatives written by lesionlapse (serial brain MRI lesion tracking).

sub-X/sub-X_desc-sessions_timeseries.tsv  one row per session (volumes, ADC, pseudonormalization)
sub-X/sub-X_desc-lesions_timeseries.tsv   one row per lesion per session
sub-X/sub-X_desc-events.tsv               lesion events per interval
sub-X/sub-X_desc-lineage.tsv              lesion ids and their parents/children
sub-X/sub-X_desc-lesions_summary.tsv      per lesion: nadir, pseudonormalization day
sub-X/ses-Y/...                           images and masks (space-subject: the within-subject
                                          space; no space entity: the session's native grid)
sub-X.html                                per-subject report
logs/run_summary.tsv                      status of every subject (latest run of each)
Every TSV has a JSON sidecar describing its columns and units.
"""


def write_dataset_description(output_dir: Path, bids_dir: Path | None = None) -> None:
    """dataset_description.json and .bidsignore of the derivatives dataset."""
    desc = {
        "Name": "lesionlapse derivatives",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "lesionlapse", "Version": __version__,
                         "Description": "Serial brain MRI lesion tracking"}],
    }
    if bids_dir is not None:
        desc["SourceDatasets"] = [{"URL": Path(bids_dir).resolve().as_uri()}]
    with atomic_path(output_dir / "dataset_description.json") as tmp:
        tmp.write_text(json.dumps(desc, indent=2))
    with atomic_path(output_dir / ".bidsignore") as tmp:
        tmp.write_text(BIDSIGNORE)
    readme = output_dir / "README"
    if not readme.exists():
        with atomic_path(readme) as tmp:
            tmp.write_text(README)


LOCAL_PLUGINS = ("MultiProc", "Linear")
CLUSTER_PLUGINS = ("SLURM", "SLURMGraph")
FINGERPRINT = ".lesionlapse-fingerprint.json"
SUMMARY_FIELDS = ("subject", "status", "duration_s", "error", "finished", "log")
# status values in logs/run_summary.tsv
OK, FAILED, SKIPPED, RUNNING = "ok", "failed", "up-to-date", "running"
REQUIRED_TABLES = ("desc-sessions_timeseries.tsv", "desc-lesions_timeseries.tsv",
                   "desc-events.tsv", "desc-lineage.tsv", "desc-lesions_summary.tsv")

log = logging.getLogger("lesionlapse")


class RunError(ValueError):
    """The run cannot start (e.g. a work directory compute nodes cannot see)."""


def _configure_nipype(log_dir: Path, plugin: str) -> None:
    from nipype import config, logging

    # Nipype sleeps this long between scheduling rounds (default 2 s): local plugins poll fast,
    # cluster plugins slowly so as not to hammer the scheduler. (MultiProc: unused, the
    # runner's plugin starts a round when a node ends, see _multiproc_plugin.)
    poll = 0.05 if plugin in LOCAL_PLUGINS else 2.0
    config.update_config({
        "execution": {
            "crashdump_dir": str(log_dir),
            "crashfile_format": "txt",
            "remove_unnecessary_outputs": False,
            "stop_on_first_crash": True,
            "hash_method": "timestamp",
            "poll_sleep_duration": poll,
        },
        # Nipype's own log file uses a lock that breaks in forked MultiProc workers; the
        # subject log is a plain FileHandler instead (see _subject_log).
        "logging": {"workflow_level": "WARNING", "interface_level": "WARNING",
                    "log_to_file": False},
        "monitoring": {"enabled": False},
    })
    logging.update_logging(config)


@contextmanager
def _subject_log(path: Path):
    """Send Nipype's workflow and interface messages to the subject's log file."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    loggers = [logging.getLogger(n) for n in ("nipype.workflow", "nipype.interface")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


def _crash_message(log_dir: Path, since: float) -> str | None:
    """The last line of the newest crash file's traceback (the actual error)."""
    crashes = sorted((p for p in log_dir.glob("crash-*.txt") if p.stat().st_mtime >= since),
                     key=lambda p: p.stat().st_mtime)
    for crash in reversed(crashes):
        lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
        for line in reversed(lines):
            if ("Error" in line or "Exception" in line) and ":" in line and not line.startswith("File "):
                return line.split(":", 1)[1].strip() if line.split(":", 1)[0].endswith(
                    ("Error", "Exception")) else line
    return None


# --- resume: fingerprints, staging leftovers, publication -------------------------------------

def _input_files(subject: SubjectInputs) -> list[Path]:
    files: set[Path] = set()
    for ses in subject.sessions:
        for path in (ses.flair, ses.dwi, ses.bval, ses.bvec, ses.adc, ses.trace, ses.trace_sidecar):
            if path is None:
                continue
            files.add(Path(path))
            name = Path(path).name
            for ext in (".nii.gz", ".nii"):
                if name.endswith(ext):  # the JSON sidecar can carry b-values, units, timing
                    sidecar = Path(path).with_name(name[: -len(ext)] + ".json")
                    if sidecar.exists():
                        files.add(sidecar)
    if subject.sessions:
        first = Path(next(p for p in (subject.sessions[0].flair, subject.sessions[0].dwi,
                                      subject.sessions[0].adc, subject.sessions[0].trace) if p))
        sessions_tsv = first.parents[2] / f"sub-{subject.subject}_sessions.tsv"
        if sessions_tsv.exists():
            files.add(sessions_tsv)
    return sorted(files)


def fingerprint(subject: SubjectInputs, config: Config) -> dict:
    """What a subject's derivatives depend on: input files (path, size, mtime), the sessions and
    their days, the configuration (without [resources], which does not change results) and the
    lesionlapse version. Stored in OUTPUT_DIR/sub-X/.lesionlapse-fingerprint.json."""
    cfg = config.to_dict()
    cfg.pop("resources", None)
    inputs = []
    for path in _input_files(subject):
        st = path.stat()
        inputs.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {
        "version": __version__,
        "subject": subject.subject,
        "sessions": [{"session": s.session, "day": s.day} for s in subject.sessions],
        "day_source": subject.day_source,
        "config_sha256": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest(),
        "inputs": inputs,
    }


def is_up_to_date(subject: SubjectInputs, config: Config, output_dir: Path) -> bool:
    """True when OUTPUT_DIR/sub-X is complete and was made from these inputs and config."""
    final = Path(output_dir) / f"sub-{subject.subject}"
    stamp = final / FINGERPRINT
    if not stamp.is_file():
        return False
    if not all((final / f"sub-{subject.subject}_{name}").is_file() for name in REQUIRED_TABLES):
        return False
    try:
        return json.loads(stamp.read_text()) == fingerprint(subject, config)
    except (OSError, ValueError):
        return False


def _old_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover(output_dir: Path, label: str) -> None:
    """Undo what an interruption (Ctrl-C, kill -9, node loss) may have left for one subject.

    The staging folder is dropped (it is rebuilt from the Nipype cache). If the process died
    between the two renames of :func:`_publish`, the previous complete derivatives are in
    ``.sub-X.old`` and ``sub-X`` is missing: they are put back; otherwise ``.sub-X.old`` is a
    leftover and is removed. Either way ``sub-X`` is absent or complete.
    """
    output_dir = Path(output_dir)
    shutil.rmtree(output_dir / STAGING / f"sub-{label}", ignore_errors=True)
    final = output_dir / f"sub-{label}"
    old = _old_path(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            old.rename(final)


def _publish(staging_subject: Path, final: Path) -> None:
    """Replace ``final`` by the complete staging folder with renames (same filesystem).

    At every instant ``final`` is either absent, the previous complete version or the new
    complete version; :func:`recover` handles an interruption between the renames.
    """
    old = _old_path(final)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    staging_subject.rename(final)
    if old.exists():
        shutil.rmtree(old)


# --- cluster plugins: resource hints, shared work directory, SLURMGraph completion -------------

def _apply_resource_hints(workflow, plugin: str) -> None:
    """Turn each node's mem_gb/n_procs hints into sbatch arguments (appended to the global
    ``sbatch_args``, so they win), so that the scheduler can pack small jobs."""
    if plugin not in CLUSTER_PLUGINS:
        return
    for node in workflow._get_all_nodes():
        if node.run_without_submitting and plugin == "SLURM":
            continue
        mem_mb = max(256, math.ceil(node.mem_gb * 1024))
        args = f" --mem={mem_mb}M --cpus-per-task={max(1, int(node.n_procs))}"
        node.plugin_args = {"sbatch_args": args, "overwrite": False}


def _is_local_path(path: Path) -> bool:
    """Under /tmp-like folders or on a memory filesystem: not visible from other nodes."""
    path = Path(path).resolve()
    if any(path.is_relative_to(p) for p in ("/tmp", "/var/tmp", "/dev/shm", "/run")):
        return True
    best, fstype = "", ""
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and path.is_relative_to(parts[1]) and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
    except OSError:
        return False
    return fstype in ("tmpfs", "ramfs")


def check_work_dir(work_dir: Path, output_dir: Path, plugin: str, plugin_args: dict) -> list[str]:
    """Check that the work dir is writable and, for Slurm, visible from the compute nodes.

    Raises :class:`RunError`; returns warnings. For SLURM/SLURMGraph a probe file is written to
    the work dir and the output dir and a one-second job (with the run's ``sbatch_args``) must
    read both: node-local folders (/tmp on most clusters) fail here instead of hours later.
    """
    warnings: list[str] = []
    probes = []
    for kind, folder in (("work", work_dir), ("output", output_dir)):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".lesionlapse-probe-{uuid.uuid4().hex}"
            probe.write_text("")
            probes.append(probe)
        except OSError as exc:
            raise RunError(f"{kind} directory {folder} is not writable ({exc.strerror}); choose "
                           "another with -w/--work-dir") from None
    try:
        if plugin not in CLUSTER_PLUGINS:
            return warnings
        for kind, folder in (("work", work_dir), ("output", output_dir)):
            if _is_local_path(folder):
                warnings.append(
                    f"{kind} directory {folder} looks node-local (/tmp or a memory filesystem); "
                    f"Slurm jobs on other nodes cannot see it. Use a shared filesystem unless "
                    "the cluster is this single machine.")
        if shutil.which("sbatch") is None:
            raise RunError(f"--plugin {plugin} needs Slurm's sbatch on PATH")
        sbatch_args = shlex.split(str(plugin_args.get("sbatch_args") or ""))
        answer = work_dir / f".lesionlapse-probe-{uuid.uuid4().hex}.ok"
        probes.append(answer)
        test = " && ".join(f"test -e {shlex.quote(str(p))}" for p in probes[:-1])
        cmd = ["sbatch", "--parsable", "-J", "lesionlapse-probe", "-o", "/dev/null",
               "-e", "/dev/null", "--mem=64M", *sbatch_args,
               f"--wrap={test} && touch {shlex.quote(str(answer))}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            job = proc.stdout.strip().split(";")[0]
            while subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                                 text=True, check=False).stdout.strip():
                time.sleep(0.5)
        if proc.returncode != 0:
            raise RunError(f"--plugin {plugin}: sbatch could not submit a probe job "
                           f"(sbatch_args {plugin_args.get('sbatch_args', '')!r}): "
                           f"{' '.join(proc.stderr.split())}")
        if not answer.exists():
            raise RunError(
                f"a Slurm job could not see the work directory {work_dir} and the output "
                f"directory {output_dir} ({proc.stderr.strip() or 'the probe job failed'}). "
                "Both must be on a filesystem shared by the submitting machine and the compute "
                "nodes (see docs/scaling.md).")
        return warnings
    finally:
        for probe in probes:
            probe.unlink(missing_ok=True)


def _wait_for_jobs(token: str, poll_s: float) -> None:
    """Wait until no Slurm job tagged ``token`` (in its comment) is pending or running.

    SLURMGraph submits the whole graph and returns; jobs downstream of a failed one stay pending
    forever ('DependencyNeverSatisfied') unless the cluster kills them: they are cancelled.
    """
    user = getpass.getuser()
    while True:
        proc = subprocess.run(["squeue", "-h", "-u", user, "-o", "%i|%T|%r|%k"],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            time.sleep(poll_s)
            continue
        jobs = [ln.split("|", 3) for ln in proc.stdout.splitlines() if ln.endswith(token)]
        if not jobs:
            return
        if all(state == "PENDING" and "DependencyNeverSatisfied" in reason
               for _, state, reason, _ in jobs):
            subprocess.run(["scancel", *[job for job, *_ in jobs]], capture_output=True,
                           check=False)
            return
        time.sleep(poll_s)


# --- one subject ---------------------------------------------------------------------------

#: longest wait of an idle MultiProc scheduling round for a node's end (see _multiproc_plugin)
_IDLE_ROUND_S = 1.0


def _multiproc_plugin(plugin_args: dict):
    """Nipype's MultiProc plugin with three changes to how it schedules, none to what a node
    computes (when a node runs changes none of its results):

    - A node running several workers (an interface input ``n_workers`` above 1: the subject
      space's template registrations, the segment node's sessions) claims one worker's
      processors (at least one) fewer than its ``n_procs``. MultiProc starts a node only when
      every processor it claims is free: the subject space (2 workers, n_procs 2 on 2
      processors) becomes ready when the last session's registration to the first session
      ends, while a DWI -> FLAIR registration (which only the resampling needs) still runs,
      and it waited for that one with a processor idle, ~3 s of one core per 4-session run
      (benchmarks/results/end_to_end.md, session 12 W). Now it starts beside it and the two
      share the cores for those seconds: at most one worker's threads beyond ``n_procs``.
    - The bookkeeping nodes this process runs itself (``run_without_submitting``: merges,
      selects) claim no processor and come after the nodes sent to the workers in a
      scheduling round: a processor that frees is given its next node first.
    - A scheduling round follows as soon as a node ends, instead of every
      ``poll_sleep_duration`` (0.05 s): stock MultiProc noticed a node's end 25 ms late on
      average, and its idle rounds (each sums the dependency matrix twice, ~1 ms of this
      process's CPU) took CPU from the cores the workers use: 2356 rounds and 13.3 s of this
      process's CPU in a 4-session run at load 7, 205 rounds and 5.0 s without them
      (benchmarks/results/end_to_end.md, session 12 W). A round is needed only after a node's
      end or after a round that sent or ran nodes; an idle round waits for a node's end, at
      most ``_IDLE_ROUND_S`` (a safety net), and only while a node runs (the last round of a
      run does not wait).

    Only this plugin's copies of the nodes change (the expanded graph Workflow.run builds): the
    workflow's own ``n_procs`` are what the cluster plugins ask Slurm for.

    And one fix: a node that dies in its worker before returning a result (an input that
    fails validation there) stops the run with its error; stock MultiProc loses that result and
    waits for it for ever.
    """
    import threading
    import traceback

    from nipype.pipeline.plugins.multiproc import MultiProcPlugin

    class OverlapMultiProcPlugin(MultiProcPlugin):
        def __init__(self, plugin_args=None):
            super().__init__(plugin_args=plugin_args)
            self._node_ended = threading.Event()
            self._died: list = []  # futures of nodes that died without a result

        def run(self, graph, config, updatehash=False):
            # the pause between rounds moves to _send_procs_to_workers (woken by a node's end)
            config = {**config, "execution": {**config["execution"], "poll_sleep_duration": 0}}
            return super().run(graph, config, updatehash=updatehash)

        def _prerun_check(self, graph):
            super()._prerun_check(graph)
            for node in graph.nodes():  # the run's copies (Workflow.run's expanded graph)
                workers = getattr(node.inputs, "n_workers", None)
                if node.run_without_submitting:
                    node.n_procs = 0
                elif isinstance(workers, int) and workers > 1:
                    node.n_procs = max(1, node.n_procs - max(1, node.n_procs // workers))

        def _sort_jobs(self, jobids, scheduler="tsort"):
            jobids = super()._sort_jobs(jobids, scheduler=scheduler)
            return sorted(jobids, key=lambda j: bool(self.procs[j].run_without_submitting))

        def _async_callback(self, args):  # in the pool's thread, when a node has ended
            try:
                super()._async_callback(args)
            except Exception:  # the node died before returning its result: see _died_results
                self._died.append(args)
            finally:
                self._node_ended.set()

        def _died_results(self):
            """A failed result for each node that died before returning one (e.g. an input
            that failed validation in the worker): stock MultiProc loses it in its callback
            and waits for it for ever; with it the run stops with the node's error."""
            while self._died:
                future = self._died.pop()
                taskid = next(t for t, f in self._task_obj.items() if f is future)
                self._taskresult[taskid] = {
                    "taskid": taskid, "result": None,
                    "traceback": traceback.format_exception(future.exception())}

        def _send_procs_to_workers(self, updatehash=False, graph=None):
            self._died_results()  # read at the next round's start
            started = self.proc_done.sum()
            super()._send_procs_to_workers(updatehash=updatehash, graph=graph)
            # nothing sent or run while nodes run: wait for one's end (with none running the
            # run is over, and a wait would only delay its end by _IDLE_ROUND_S)
            if self.proc_done.sum() == started and self.proc_pending.any():
                self._node_ended.wait(_IDLE_ROUND_S)
            self._node_ended.clear()  # a result it announced is read in the next round anyway

    return OverlapMultiProcPlugin(plugin_args=plugin_args)


def _validate(subject: SubjectInputs, config: Config) -> tuple[list[str], set]:
    """validate_subject, and the gzip files it found complete (pipeline.io skips checking them
    again in this process and in the workers it forks)."""
    return validate_subject(subject, config), set(pipeline_io._VERIFIED_GZIP)


class BackgroundValidation:
    """:func:`pipeline.validate.validate_subject` running in a forked process (see
    :func:`validate_in_background`)."""

    def __init__(self, subject: SubjectInputs, config: Config):
        sys.stdout.flush()  # nothing buffered is written twice by the child
        sys.stderr.flush()
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        self._future = self._pool.submit(_validate, subject, config)

    def result(self) -> list[str]:
        """Wait for the check: its warnings, or its error raised here."""
        try:
            warnings, verified = self._future.result()
        finally:
            self._pool.shutdown()
        pipeline_io._VERIFIED_GZIP.update(verified)
        return warnings


def validate_in_background(subject: SubjectInputs, config: Config) -> BackgroundValidation:
    """Start checking the subject's inputs in a forked process; ``.result()`` waits for it.

    The check reads every input image (~0.8 s of CPU) while this process imports Nipype and
    builds the workflow, instead of before them. A process, not a thread: on a thread it shared
    the GIL with the imports, and the two took as long as one after the other. The gzip files
    it found complete are added to this process's record, so that the workers forked later do
    not decompress them again to check them. :func:`run_subject` waits for the result before
    any node runs, so a bad input still stops the subject first, with the same error."""
    return BackgroundValidation(subject, config)


def run_subject(subject: SubjectInputs, *, config: Config, output_dir: Path, work_dir: Path,
                plugin: str, plugin_args: dict,
                validation: BackgroundValidation | None = None) -> None:
    """Validate, build and run one subject's workflow, then publish its derivatives.

    ``validation``: the subject's :func:`validate_in_background`, if the caller started it
    earlier (before importing Nipype); started here otherwise."""
    # before any work: config-dependent checks (ADC unit, b0 threshold...) use the run's config
    if validation is None:
        validation = validate_in_background(subject, config)
    staging = output_dir / STAGING / f"sub-{subject.subject}"
    try:
        from pipeline.reports.node import report_views_node, subject_report_node
        from pipeline.workflows.base import init_subject_wf

        # the report is drawn by nodes of the workflow (its slices beside tracking, the rest
        # beside the derivatives' compression); the workflow gets the functions from here
        # (the composition root): it never imports the reports
        workflow = init_subject_wf(subject=subject, config=config, staging_dir=staging,
                                   report=subject_report_node, report_views=report_views_node)
    except Exception:
        validation.result()  # a bad input is the error to report, not what it broke here
        raise
    for warning in validation.result():  # raises the first bad input's error
        log.warning(f"sub-{subject.subject}: warning: {warning}")
    recover(output_dir, subject.subject)
    workflow.base_dir = str(work_dir)
    _apply_resource_hints(workflow, plugin)
    args = dict(plugin_args)
    token = ""
    if plugin == "SLURMGraph":
        token = f"lesionlapse-{uuid.uuid4().hex[:12]}"
        args["sbatch_args"] = f"{args.get('sbatch_args', '')} --comment={token}".strip()
        args.setdefault("dont_resubmit_completed_jobs", True)
    if plugin in CLUSTER_PLUGINS and not os.environ.get("LOGNAME"):
        os.environ["LOGNAME"] = getpass.getuser()  # Nipype's SLURM plugin names jobs with it
    start = time.time()
    # Nipype's MultiProc scheduler calls gc.collect() in this process at every scheduling round
    # (poll_sleep_duration) that finds a free processor and after every node it runs itself; a
    # full collection walks every object of the interpreter (~150 000: nipype, pandas, scipy,
    # the graph), ~0.1 s of CPU each: 13 s of the main process's 47 s CPU on a 4-session
    # clinical subject (benchmarks/results/end_to_end.md, session 7 P). Freezing what exists now
    # moves it out of the collector's reach (forked workers inherit that); unfrozen below so
    # that this subject's graph can be collected before the next one.
    gc.collect()
    gc.freeze()
    try:
        workflow.run(plugin=_multiproc_plugin(args) if plugin == "MultiProc" else plugin,
                     plugin_args=args)
        if token:
            _wait_for_jobs(token, poll_s=2.0)
        produced = staging / f"sub-{subject.subject}"
        if not all((produced / f"sub-{subject.subject}_{n}").is_file() for n in REQUIRED_TABLES):
            crash = _crash_message(Path(config_crashdir()), start)
            raise RuntimeError(crash or f"the workflow ended without writing the tables of "
                               f"sub-{subject.subject} (see the Slurm .e files in {work_dir})")
        with atomic_path(produced / FINGERPRINT) as tmp:
            tmp.write_text(json.dumps(fingerprint(subject, config), indent=2))
        _publish(produced, output_dir / f"sub-{subject.subject}")
    finally:
        gc.unfreeze()
        shutil.rmtree(staging, ignore_errors=True)
    if not _publish_report(workflow, output_dir / f"sub-{subject.subject}.html"):
        from pipeline.reports.subject import write_subject_report

        write_subject_report(output_dir, subject.subject, _derivative_sources(workflow))


def _publish_report(workflow, dst: Path) -> bool:
    """Copy the report the workflow's subject_report node drew (beside the derivatives'
    compression) to ``dst``; False when the node left none (the caller draws it then)."""
    src = _node_dir(workflow, "subject_report") / "report" / dst.name
    if not src.is_file():
        return False
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
        tmp.chmod(0o644)  # a report is for reading (the temporary file is private)
    return True


def _node_dir(workflow, name: str) -> Path:
    """Folder of the top-level node ``name`` of a workflow that ran. (Node.output_dir() of
    the workflow's own node objects does not know it: Nipype runs copies of them, and
    output_dir() of a node without base_dir answers a new temporary folder.)"""
    return Path(workflow.base_dir) / workflow.name / name


def _derivative_sources(workflow) -> dict[str, str] | None:
    """The uncompressed work-dir image of each gzipped derivative (WriteDerivatives' JSON), for
    the report to read instead of decompressing; None when the file is not there."""
    from pipeline.interfaces.outputs import SOURCES_FILE

    path = _node_dir(workflow, "write_derivatives") / SOURCES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def config_crashdir() -> str:
    from nipype import config

    return config.get("execution", "crashdump_dir")


# --- the run summary ---------------------------------------------------------------------------

@contextmanager
def _locked(path: Path):
    """An exclusive lock (flock) so that concurrent runs (job arrays) update one summary."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_summary(path: Path) -> list[dict]:
    """Rows of logs/run_summary.tsv (empty if absent)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as fh:
        return [{k: (v or "") for k, v in row.items() if k in SUMMARY_FIELDS}
                for row in csv.DictReader(fh, delimiter="\t")]


def update_summary(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the summary: this run's subjects replace their earlier rows, the
    other subjects' rows (earlier runs) are kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(".run_summary.lock")):
        merged = {row["subject"]: row for row in read_summary(path)}
        for row in rows:
            merged[row["subject"]] = {k: row.get(k, "") for k in SUMMARY_FIELDS}
        _write_summary(path, [merged[k] for k in sorted(merged)])


def _write_summary(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SUMMARY_FIELDS), delimiter="\t",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# --- progress ----------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """Subjects done/total, failures, elapsed time and an estimate of the time left.

    On a terminal a single line on stderr is redrawn (every second while a subject runs);
    otherwise nothing is drawn and only the one-line-per-subject log messages appear.
    """

    def __init__(self, total: int, *, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.done, self.failed = total, 0, 0
        self.durations: list[float] = []
        self.start = time.time()
        self.current = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def line(self) -> str:
        elapsed = time.time() - self.start
        left = self.total - self.done
        text = f"[{self.done}/{self.total} subjects, {self.failed} failed, {_clock(elapsed)} elapsed"
        if self.durations and left:
            text += f", ~{_clock(left * sum(self.durations) / len(self.durations))} left"
        text += "]"
        return text + (f" running sub-{self.current}" if self.current and left else "")

    def draw(self) -> None:
        if self.enabled:
            with self._lock:
                self.stream.write("\r\x1b[2K" + self.line())
                self.stream.flush()

    def started(self, label: str) -> None:
        self.current = label
        self.draw()
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()

    def finished(self, row: dict, message: str) -> None:
        self.done += 1
        self.failed += row["status"] == FAILED
        if row["status"] != SKIPPED:
            self.durations.append(float(row["duration_s"]))
        if self.enabled:
            with self._lock:
                self.stream.write("\r\x1b[2K")
        log.info(message)
        self.draw()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.enabled:
            self.stream.write("\r\x1b[2K" + self.line() + "\n")
            self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.draw()


@contextmanager
def _run_log(path: Path):
    """One line per finished subject on stdout and in logs/lesionlapse.log."""
    log.setLevel(logging.INFO)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(file_handler)
    log.addHandler(console)
    log.propagate = False
    try:
        yield
    finally:
        log.removeHandler(file_handler)
        log.removeHandler(console)
        file_handler.close()


# --- the cohort -------------------------------------------------------------------------------

def run_subjects(subjects: list[SubjectInputs], *, config: Config, bids_dir: Path,
                 output_dir: Path, work_dir: Path, plugin: str, plugin_args: dict,
                 rerun: bool = False, progress: bool | None = None) -> list[dict]:
    """Run each subject in turn; returns one summary row per subject of this run.

    Subjects whose derivatives are complete and whose inputs, configuration and lesionlapse
    version are unchanged (see :func:`fingerprint`) are not recomputed unless ``rerun``; a
    failing subject is recorded and the others go on. logs/run_summary.tsv is updated after
    every subject, keeping the rows of subjects not run this time.
    """
    output_dir = Path(output_dir).resolve()
    work_dir = Path(work_dir).resolve()
    log_root = output_dir / "logs"
    log_root.mkdir(parents=True, exist_ok=True)
    summary_path = log_root / "run_summary.tsv"
    for warning in check_work_dir(work_dir, output_dir, plugin, plugin_args):
        print(f"lesionlapse: warning: {warning}", file=sys.stderr)
    write_dataset_description(output_dir, bids_dir)
    summary = []
    bar = Progress(len(subjects), enabled=progress)
    with _run_log(log_root / "lesionlapse.log"):
        log.info(f"lesionlapse {__version__}: {len(subjects)} subject(s), plugin {plugin}, "
                 f"work dir {work_dir}")
        try:
            for subject in subjects:
                summary.append(_run_one(subject, config=config, output_dir=output_dir,
                                        work_dir=work_dir, plugin=plugin,
                                        plugin_args=plugin_args, rerun=rerun,
                                        summary_path=summary_path, bar=bar))
        finally:
            bar.close()
    try:
        (output_dir / STAGING).rmdir()  # only if empty: a concurrent run may be staging
    except OSError:
        pass
    return summary


def _run_one(subject: SubjectInputs, *, config: Config, output_dir: Path, work_dir: Path,
             plugin: str, plugin_args: dict, rerun: bool, summary_path: Path,
             bar: Progress) -> dict:
    label = subject.subject
    log_dir = summary_path.parent / f"sub-{label}"
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    row = {"subject": label, "status": OK, "duration_s": 0.0, "error": "",
           "log": str((log_dir / "nipype.log").relative_to(output_dir))}
    bar.started(label)
    recover(output_dir, label)
    if not rerun and is_up_to_date(subject, config, output_dir):
        row["status"] = SKIPPED
        if not (output_dir / f"sub-{label}.html").exists():
            from pipeline.reports.subject import write_subject_report

            write_subject_report(output_dir, label)
    else:
        # the inputs are checked while Nipype is imported (below) and the workflow is built
        validation = validate_in_background(subject, config)
        update_summary(summary_path, [{**row, "status": RUNNING,
                                       "finished": "", "duration_s": ""}])
        _configure_nipype(log_dir, plugin)
        try:
            with _subject_log(log_dir / "nipype.log"):
                run_subject(subject, config=config, output_dir=output_dir, work_dir=work_dir,
                            plugin=plugin, plugin_args=plugin_args, validation=validation)
        except Exception as exc:  # noqa: BLE001 (one subject's failure must not stop the cohort)
            row["status"] = FAILED
            message = _crash_message(log_dir, start) if isinstance(exc, RuntimeError) else None
            row["error"] = " ".join((message or str(exc) or type(exc).__name__).split())
    row["duration_s"] = round(time.time() - start, 1)
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    update_summary(summary_path, [row])
    text = {OK: f"done in {row['duration_s']:.0f} s", FAILED: f"FAILED after "
            f"{row['duration_s']:.0f} s: {row['error']}",
            SKIPPED: "up to date (inputs, config and version unchanged), not recomputed"}
    bar.finished(row, f"sub-{label}: {text[row['status']]}")
    return row


GROUP_TABLES = ("desc-sessions_timeseries.tsv", "desc-lesions_timeseries.tsv", "desc-events.tsv",
                "desc-lineage.tsv", "desc-lesions_summary.tsv")


def run_group_level(output_dir: Path) -> tuple[list[Path], list[str]]:
    """Concatenate the tables of every subject with results into OUTPUT_DIR/group/.

    Returns the written tables and the subjects of logs/run_summary.tsv left out (failed,
    interrupted or without derivatives)."""
    import pandas as pd

    output_dir = Path(output_dir)
    latest = {row["subject"]: row["status"]
              for row in read_summary(output_dir / "logs" / "run_summary.tsv")}
    # A subject whose latest run failed (or was interrupted) is left out even if an older
    # complete result is still in its folder: that result no longer matches its inputs/config.
    found = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
    subjects = [s for s in found if latest.get(s) not in (FAILED, RUNNING)]
    if not subjects:
        raise ValueError(f"{output_dir} holds no subject results; run the participant level first")
    missing = sorted(s for s, status in latest.items() if s not in subjects)
    written = []
    for name in GROUP_TABLES:
        frames = []
        for sub in subjects:
            path = output_dir / f"sub-{sub}" / f"sub-{sub}_{name}"
            if path.exists():
                frame = pd.read_csv(path, sep="\t", na_values="n/a", dtype={"session": str})
                frames.append(frame.assign(subject=sub)[["subject", *frame.columns]])
        if frames:
            dst = output_dir / "group" / f"group_{name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(dst) as tmp:
                pd.concat(frames, ignore_index=True).to_csv(tmp, sep="\t", index=False,
                                                            na_rep="n/a", float_format="%.6g")
            sidecar = output_dir / f"sub-{subjects[0]}" / f"sub-{subjects[0]}_{name[:-4]}.json"
            if sidecar.exists():
                meta = json.loads(sidecar.read_text())
                meta = {"subject": {"Description": "Subject label (without 'sub-')"}, **meta}
                with atomic_path(dst.with_suffix(".json")) as tmp:
                    tmp.write_text(json.dumps(meta, indent=2))
            written.append(dst)
    return written, missing
