"""`python -m analysis PATH [--out DIR]`: the comparison report, plots and tables of one sweep."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import AnalysisError, format_table, load, write_report


def default_out_dir(path: str) -> Path:
    """PATH/analysis for a local experiment; ./analysis_NAME for one in remote storage."""
    if "://" in path:
        return Path.cwd() / f"analysis_{path.rstrip('/').rsplit('/', 1)[-1]}"
    return Path(path) / "analysis"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("path", help="the sweep's Ray Tune experiment directory STORAGE/NAME (or a storage URI)")
    parser.add_argument("--out", help="output directory (default: PATH/analysis)")
    args = parser.parse_args(argv)
    try:
        results = load(args.path)
        out = Path(args.out) if args.out else default_out_dir(args.path)
        written = write_report(results, out)
    except (AnalysisError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"\nWrote {len(written)} files to {out}:")
    for name in written:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
