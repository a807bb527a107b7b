"""`python -m analysis PATH [PATH ...] [--out DIR]`: the comparison report, plots and tables of a sweep (several
experiments, e.g. max-batch searches under different memory limits, are reported together; --out is then required)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import AnalysisError, format_max_batch_table, format_table, load_many, write_report


def default_out_dir(path: str) -> Path:
    """PATH/analysis for a local experiment; ./analysis_NAME for one in remote storage."""
    if "://" in path:
        return Path.cwd() / f"analysis_{path.rstrip('/').rsplit('/', 1)[-1]}"
    return Path(path) / "analysis"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="the sweep's Ray Tune experiment directory STORAGE/NAME (or a storage URI)")
    parser.add_argument("--out", help="output directory (default: PATH/analysis)")
    args = parser.parse_args(argv)
    if len(args.paths) > 1 and not args.out:
        print("error: several experiments need --out DIR (where their combined report goes)", file=sys.stderr)
        return 2
    try:
        results = load_many(args.paths)
        out = Path(args.out) if args.out else default_out_dir(args.paths[0])
        written = write_report(results, out)
    except (AnalysisError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results))
    if max_batch := format_max_batch_table(results):
        print("\n" + max_batch)
    print(f"\nWrote {len(written)} files to {out}:")
    for name in written:
        print(f"  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
