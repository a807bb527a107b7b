"""The memory model against measured H200 peaks: markdown tables for docs/results/memory_model_h200.md.

Reads docs/results/memory_model_h200.csv (one measured `max_memory_allocated` peak per row: seed grid, gpt2-vocab
grid, and the peak at each measured max batch) and prints, on CPU, (1) predicted vs measured peak for every row and
(2) for the max-batch rows, the memory model's predicted max batch against the measured one.

    python bench/memory_model_report.py [--csv PATH]
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep.predict import memory_budget, predicted_max_batch  # noqa: E402
from trainable import TrialConfig  # noqa: E402
from trainable.memory_model import predict_peak_memory  # noqa: E402

CSV = Path(__file__).resolve().parents[1] / "docs" / "results" / "memory_model_h200.csv"


def row_config(row: dict, data_dir: str) -> TrialConfig:
    """The TrialConfig a CSV row was measured with (seed model, seq_len 512, unless the row's optional columns
    say otherwise: loss_precision, tie_embeddings, n_layers, d_model, n_heads, ff_dim, seq_len)."""
    d = {"technique": row["technique"], "batch_size": int(row["batch_size"]), "data_dir": data_dir,
         "vocab_size": int(row.get("vocab_size") or 10000)}
    if row["window"]:
        d["window"] = int(float(row["window"]))
    if row.get("loss_precision"):  # optional columns: the LM head's switches (default: fp32 loss, tied)
        d["loss_precision"] = row["loss_precision"]
    if row.get("tie_embeddings"):
        d["tie_embeddings"] = row["tie_embeddings"].strip().lower() in ("true", "1", "yes")
    for key in ("n_layers", "d_model", "n_heads", "ff_dim", "seq_len"):  # optional: another model than the seed's
        if row.get(key):
            d[key] = int(row[key])
    return TrialConfig.from_dict(d)


def peak_table(rows: list[dict], data_dir: str) -> tuple[str, float]:
    lines = ["| source | technique | window | vocab | batch | memory cap (GB) | kernel | measured peak MiB | "
             "predicted MiB | error | peak phase |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    worst = 0.0
    for r in rows:
        bd = predict_peak_memory(row_config(r, data_dir))
        measured = float(r["measured_peak_mib"])
        error = bd.peak_mib / measured - 1
        worst = max(worst, abs(error))
        window = int(float(r["window"])) if r["window"] else "-"
        lines.append(f"| {r['source']} | {r['technique']} | {window} | {r.get('vocab_size') or 10000} | "
                     f"{r['batch_size']} | {r['gpu_memory_gb'] or '-'} | {r['kernel']} | {measured:,.1f} | "
                     f"{bd.peak_mib:,.1f} | {error:+.2%} | {bd.phase} |")
    return "\n".join(lines), worst


def max_batch_table(rows: list[dict], data_dir: str) -> tuple[str, float]:
    lines = ["| technique | window | memory cap (GB) | measured max batch | predicted max batch | error |",
             "|---|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for r in (r for r in rows if r["source"] == "max batch"):
        cap = float(r["gpu_memory_gb"]) if r["gpu_memory_gb"] else None
        predicted = predicted_max_batch(row_config(r, data_dir), memory_budget(cap, gpu="h200"))
        measured = int(r["batch_size"])
        error = predicted / measured - 1
        worst = max(worst, abs(error))
        window = int(float(r["window"])) if r["window"] else "-"
        lines.append(f"| {r['technique']} | {window} | {cap or '-'} | {measured} | {predicted} | {error:+.1%} |")
    return "\n".join(lines), worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=CSV)
    args = p.parse_args(argv)
    if not args.csv.is_file():
        p.error(f"--csv {args.csv}: no such file (the measurements, e.g. docs/results/memory_model_h200.csv)")
    rows = list(csv.DictReader(args.csv.open()))
    with tempfile.TemporaryDirectory() as data_dir:  # configs need a data_dir; nothing is read from it
        peaks, worst_peak = peak_table(rows, data_dir)
        batches, worst_batch = max_batch_table(rows, data_dir)
    print(f"{len(rows)} measured peaks, max error {worst_peak:.2%}\n\n{peaks}\n\n"
          f"max batch: max error {worst_batch:.1%}\n\n{batches}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
