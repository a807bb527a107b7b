"""Plot 8 (largest batch that fits) of the H200 max-batch searches, from the CSVs committed in docs/results/.

The searches ran in two rounds (docs/results/max_batch_h200.md): part 1 searched baseline, bf16 and flash, part 2
the windows, gradcp and what part 1 left out. Only the analysis outputs of each round are committed
(`max_batch.csv`, `trials.csv`), not the experiment directories, so this builds one `SweepResults` per round from
them, combines the two, and draws plot 8 with every technique that has a record (README.md shows it).

The records predate the current contract: their `technique` is what is now the `label`, `preset` the named preset
(now `technique`), and `gpu_memory_limit_gb` is now `gpu_memory_gb`.

    .venv/bin/python bench/max_batch_plot.py [--out docs/results/max-batch-h200/8_max_batch.png]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import SweepResults, combine  # noqa: E402
from analysis.plots import plot_max_batch  # noqa: E402

PARTS = (ROOT / "docs/results/max-batch-h200", ROOT / "docs/results/max-batch-h200-part2")
OLD_NAMES = {"technique": "label", "preset": "technique", "gpu_memory_limit_gb": "gpu_memory_gb"}


def part(directory: Path) -> SweepResults:
    """One round's records and trials, renamed to the current contract."""
    records = pd.read_csv(directory / "max_batch.csv").rename(columns=OLD_NAMES)
    trials = pd.read_csv(directory / "trials.csv")  # its config already has gpu_memory_gb beside the old fact
    trials = trials.drop(columns=["gpu_memory_limit_gb"], errors="ignore").rename(columns=OLD_NAMES)
    return SweepResults(path=str(directory), trials=trials, steps=pd.DataFrame(columns=["trial_id", "name", "step"]),
                        max_batch=records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PARTS[0] / "8_max_batch.png"), help="where the PNG goes")
    args = parser.parse_args(argv)
    results = combine([part(d) for d in PARTS])
    name, fig = plot_max_batch(results)
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    labels = sorted(results.max_batch["label"].unique())
    print(f"{name}: {len(results.max_batch)} records, {len(labels)} techniques ({', '.join(labels)}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
