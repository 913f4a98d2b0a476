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

TOOLS = ("simulate",)


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
        )
    except (ValueError, OSError) as exc:
        print(f"lesionlapse simulate: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {len(subjects)} subject(s) ({', '.join('sub-' + s for s in subjects)}) to "
          f"{args.out_dir}; ground truth in {args.out_dir / 'derivatives' / 'truth'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lesionlapse`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")  # no network at run time
    if argv and argv[0] == "simulate":
        return run_simulate(argv[1:])
    if argv and argv[0] in ("--version", "-v"):
        print(f"lesionlapse {__version__}")
        return 0
    from pipeline.app import run_app

    return run_app(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
