"""`make demo`: run lesionlapse on sample_data/ and show what it produced."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "demo_output")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    out = args.out.resolve()
    work = (args.work or out.with_name(out.name + "_work")).resolve()
    exe = Path(sys.executable).with_name("lesionlapse")
    data = REPO / "sample_data"
    steps = [
        [str(exe), str(data), str(out), "participant", "-w", str(work)],
        [str(exe), str(data), str(out), "group"],
    ]
    for cmd in steps:
        print("$", " ".join(cmd), flush=True)
        status = subprocess.call(cmd)
        if status:
            print(f"demo: '{' '.join(cmd[1:4])}' failed with status {status}", file=sys.stderr)
            return status
    pd.set_option("display.width", 200, "display.max_columns", 20)
    for tsv in sorted(out.glob("sub-*/sub-*_desc-sessions_timeseries.tsv")):
        table = pd.read_csv(tsv, sep="\t", na_values="n/a", dtype={"session": str})
        cols = ["session", "day", "flair_volume_ml", "restricted_volume_ml",
                "radc_mean_ever_restricted", "pseudonormalized_fraction"]
        print(f"\n{tsv.relative_to(out)}")
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\nReports:")
    for html in sorted(out.glob("sub-*.html")):
        print(f"  {html}")
    print(f"Tables:  {out}/sub-*/*.tsv and {out}/group/")
    print(f"Nipype cache: {work} (rerunning reuses it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
