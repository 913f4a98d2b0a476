"""Command-line interface.

BIDS-App style::

    lesionlapse BIDS_DIR OUTPUT_DIR participant [--participant-label L ...] [...]
    lesionlapse BIDS_DIR OUTPUT_DIR group

plus the tools ``lesionlapse simulate OUT_DIR`` (phantom datasets with ground truth).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import __version__

TOOLS = ("simulate", "import-dicom")


def _fail(message: str, status: int = 1) -> int:
    print(f"lesionlapse: error: {message}", file=sys.stderr)
    return status


def _simulate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lesionlapse simulate",
        description="Write a synthetic BIDS dataset (DWI, ADC, FLAIR over sessions) with its "
        "complete ground truth under OUT_DIR/derivatives/truth/.",
    )
    p.add_argument("out_dir", type=Path, help="new or empty folder for the dataset")
    p.add_argument("--preset", default="seed-case", help="phantom preset (default: seed-case)")
    p.add_argument("--subjects", type=int, default=1, help="number of subjects (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files")
    p.add_argument("--grid", choices=("clinical", "small"), default="clinical",
                   help="clinical acquisition grids or small fast ones (default: clinical)")
    p.add_argument("--epi-distortion", type=float, default=0.0, metavar="MM",
                   help="largest EPI-like shift of the DWI along its phase-encode axis, mm "
                   "(default 0: none; 2-3 is mild)")
    p.add_argument("--days", type=float, nargs="+", default=None, metavar="DAY",
                   help="session days (default: the preset's, e.g. 0 3 8 45)")
    return p


def run_simulate(argv: list[str]) -> int:
    from pipeline.simulate import PRESETS, simulate_dataset

    args = _simulate_parser().parse_args(argv)
    if args.preset not in PRESETS:
        print(f"lesionlapse simulate: unknown preset {args.preset!r}; choose from "
              f"{', '.join(sorted(PRESETS))}", file=sys.stderr)
        return 2
    if args.subjects < 1:
        print("lesionlapse simulate: --subjects must be at least 1", file=sys.stderr)
        return 2
    try:
        subjects = simulate_dataset(
            args.out_dir, preset=args.preset, n_subjects=args.subjects, seed=args.seed,
            grid=args.grid, days=tuple(args.days) if args.days else None,
            epi_distortion_mm=args.epi_distortion,
        )
    except (ValueError, OSError) as exc:
        print(f"lesionlapse simulate: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(subjects)} subject(s) ({', '.join('sub-' + s for s in subjects)}) to "
          f"{args.out_dir}; ground truth in {args.out_dir / 'derivatives' / 'truth'}")
    return 0


def _import_dicom_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lesionlapse import-dicom",
        description="Convert a DICOM series (dcm2niix) into a BIDS session: FLAIR to anat/, DWI "
        "with bval/bvec and scanner ADC/trace maps to dwi/, sidecars without identifying fields.",
    )
    p.add_argument("dicom_dir", type=Path, help="folder with the DICOM files of one session")
    p.add_argument("bids_dir", type=Path, help="BIDS dataset to add the session to")
    p.add_argument("--participant-label", required=True, help="subject label, e.g. 01")
    p.add_argument("--session-label", required=True, help="session label, e.g. day0")
    return p


def run_import_dicom(argv: list[str]) -> int:
    from pipeline.dicom import import_dicom

    args = _import_dicom_parser().parse_args(argv)
    try:
        written = import_dicom(args.dicom_dir, args.bids_dir, subject=args.participant_label,
                               session=args.session_label)
    except (ValueError, OSError) as exc:
        return _fail(str(exc), 1)
    for path in written:
        print(f"wrote {path}")
    return 0


def _label_list(values: list[str] | None) -> list[str] | None:
    return [v for value in values for v in value.split(",") if v] if values else None


def build_parser() -> argparse.ArgumentParser:
    """The BIDS-App parser: ``BIDS_DIR OUTPUT_DIR {participant,group}``."""
    p = argparse.ArgumentParser(
        prog="lesionlapse",
        description="Serial brain MRI lesion tracking: registration, FLAIR and restricted-diffusion "
        "lesions, lesion histories and ADC pseudonormalization over sessions. "
        "Tools: 'lesionlapse simulate OUT_DIR' writes a phantom dataset with ground truth.",
    )
    p.add_argument("bids_dir", type=Path, help="the input BIDS dataset")
    p.add_argument("output_dir", type=Path, help="where the derivatives go")
    p.add_argument("analysis_level", choices=("participant", "group"))
    p.add_argument("--version", action="version", version=f"lesionlapse {__version__}")
    p.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="subjects to process, with or without 'sub-' (default: all)")
    p.add_argument("--session-label", nargs="+", metavar="LABEL",
                   help="sessions to use, with or without 'ses-' (default: all)")
    p.add_argument("--config", type=Path, help="TOML file overriding configs/default.toml")
    p.add_argument("-w", "--work-dir", type=Path,
                   help="Nipype working directory (cache; default: OUTPUT_DIR/../lesionlapse_work)")
    p.add_argument("--nprocs", type=int, help="processes for MultiProc (default: config)")
    p.add_argument("--omp-nthreads", type=int, help="threads per process (default: config)")
    p.add_argument("--mem-gb", type=float,
                   help="memory MultiProc may schedule at once, GB (default: config)")
    p.add_argument("--reports-only", action="store_true",
                   help="rebuild the HTML reports from existing derivatives, run nothing else")
    p.add_argument("--plugin", default=None,
                   help="Nipype execution plugin: MultiProc (default), Linear, SLURM, SLURMGraph")
    p.add_argument("--rerun", action="store_true",
                   help="recompute subjects whose derivatives are up to date (default: skip them)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--plugin-args", type=str, help="plugin arguments as JSON")
    group.add_argument("--use-plugin", type=Path,
                       help="YAML file with 'plugin:' and 'plugin_args:' (fmriprep style)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lesionlapse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network at run time
    if argv and argv[0] == "simulate":
        return run_simulate(argv[1:])
    if argv and argv[0] == "import-dicom":
        return run_import_dicom(argv[1:])
    if argv and argv[0] in ("--version", "-v"):
        print(f"lesionlapse {__version__}")
        return 0
    args = build_parser().parse_args(argv)
    if args.analysis_level == "participant":
        return run_participant(args)
    return run_group(args)




def _check_paths(bids_dir: Path, output_dir: Path) -> None:
    """Refuse an OUTPUT_DIR inside the input dataset (except under derivatives/)."""
    from pipeline.bids import BIDSError

    bids = bids_dir.resolve()
    out = output_dir.resolve()
    if out == bids or (bids in out.parents and not out.is_relative_to(bids / "derivatives")):
        raise BIDSError(
            f"OUTPUT_DIR {output_dir} is inside the input dataset {bids_dir}; choose a folder "
            f"outside it or under {bids_dir / 'derivatives'}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lesionlapse-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BIDSError(f"OUTPUT_DIR {output_dir} is not writable ({exc.strerror}); "
                        "choose a folder you can write to") from None


def config_from_args(args):
    """The configuration file (or the defaults) with the command line's resource options."""
    from pipeline.config import load_config

    config = load_config(args.config)
    for option in ("nprocs", "omp_nthreads", "mem_gb"):
        if getattr(args, option) is not None:
            config = config.replace("resources", **{option: getattr(args, option)})
    return config


def _plugin_settings(args, config) -> tuple[str, dict]:
    plugin = args.plugin or "MultiProc"
    plugin_args: dict = {}
    if args.use_plugin:
        import yaml

        settings = yaml.safe_load(args.use_plugin.read_text()) or {}
        plugin = settings.get("plugin", plugin)
        plugin_args = settings.get("plugin_args", {}) or {}
    elif args.plugin_args:
        import json

        plugin_args = json.loads(args.plugin_args)
    if plugin == "MultiProc":
        plugin_args.setdefault("n_procs", config.resources.nprocs)
        plugin_args.setdefault("memory_gb", config.resources.mem_gb)
        plugin_args.setdefault("raise_insufficient", False)
    return plugin, plugin_args


def run_participant(args) -> int:
    """Run every requested subject; a failing subject is recorded and the others go on."""
    from pipeline.bids import BIDSError, discover
    from pipeline.config import ConfigError
    from pipeline.runner import run_subjects

    try:
        _check_paths(args.bids_dir, args.output_dir)
        config = config_from_args(args)
        subjects = discover(args.bids_dir, _label_list(args.participant_label),
                            _label_list(args.session_label))
        plugin, plugin_args = _plugin_settings(args, config)
    except (BIDSError, ConfigError, ValueError, OSError) as exc:
        return _fail(str(exc), 2)
    from pipeline.threads import pin_threads

    pin_threads(config.resources.omp_nthreads)  # one thread (default): bit-identical runs
    if args.reports_only:
        from pipeline.reports.subject import write_subject_report

        status = 0
        for subject in subjects:
            if not (args.output_dir / f"sub-{subject.subject}").is_dir():
                print(f"sub-{subject.subject}: no derivatives in {args.output_dir}", file=sys.stderr)
                status = 1
                continue
            print(f"wrote {write_subject_report(args.output_dir, subject.subject)}")
        return status
    work_dir = args.work_dir or args.output_dir.resolve().parent / "lesionlapse_work"
    try:
        summary = run_subjects(subjects, config=config, bids_dir=args.bids_dir,
                               output_dir=args.output_dir, work_dir=work_dir, plugin=plugin,
                               plugin_args=plugin_args, rerun=args.rerun)
    except (ValueError, OSError) as exc:
        return _fail(str(exc), 2)
    failed = [row for row in summary if row["status"] == "failed"]  # "up-to-date" succeeded
    print(f"{len(summary) - len(failed)} of {len(summary)} subject(s) succeeded; "
          f"summary in {args.output_dir / 'logs' / 'run_summary.tsv'}")
    for row in failed:
        print(f"  sub-{row['subject']}: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def run_group(args) -> int:
    """Concatenate the subjects' tables into cohort tables."""
    from pipeline.runner import run_group_level

    try:
        written, missing = run_group_level(args.output_dir)
    except (ValueError, OSError) as exc:
        return _fail(str(exc), 2)
    from pipeline.reports.group import write_group_report

    written.append(write_group_report(args.output_dir))
    for path in written:
        print(f"wrote {path}")
    if missing:
        print(f"subjects without results (failed or not run): {', '.join(missing)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
