"""A seq_len sweep's peaks against the memory model, and where sliding windows start to pay over flash.

Reads an experiment directory of a `python -m sweep.run ... --seq-lens ...` sweep (`analysis.load`: plain files,
local or a URI) and prints, and writes to --out as markdown:

1. every trial's measured peak (`max_memory_allocated` over its steps) next to the memory model's prediction for
   its config (this checkout's model, the kernel the trial ran, the dataset's vocabulary), the error and the
   phase the model puts the peak in; the worst error per technique and whether all are within --tolerance;
2. the crossover (`analysis.seq_tables.crossover`: each trial against flash at the same seq_len and batch size):
   the first seq_len at which a window saves --threshold percent of memory over flash, and the first at which
   it is that much faster, or the honest negative with the best it reached.

    python bench/seq_len_report.py --make-dataset /tmp/seq8192          # random tokens, rows of 8192 + 1
    python -m sweep.run --data /tmp/seq8192 --techniques baseline bf16 flash window gradcp --windows 256 \\
        --seq-lens 512 1024 2048 4096 8192 --tokens-per-batch 16384 --max-steps 4 ...
    python bench/seq_len_report.py results/seq-len-h200 --out seq_len_h200.tables.md
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis.load import AnalysisError, load  # noqa: E402
from analysis.seq_tables import crossover  # noqa: E402
from trainable import TrialConfig  # noqa: E402
from trainable.memory_model import predict_peak_memory  # noqa: E402

TOLERANCE = 0.02
THRESHOLD_PCT = 5.0


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def row_config(trial: pd.Series) -> TrialConfig:
    """The trial's config from its row (every config value is a column); data_dir is not read."""
    names = {f.name for f in fields(TrialConfig)}
    values = {k: (v.item() if hasattr(v, "item") else v) for k, v in trial.items() if k in names and _present(v)}
    return TrialConfig.from_dict({**values, "data_dir": "unused", "device": "cuda", "gpu_memory_gb": None})


def dataset_vocab(data_dir: str | None) -> int | None:
    try:
        return int(json.loads((Path(data_dir) / "manifest.json").read_text())["vocab_size"])
    except (OSError, TypeError, ValueError, KeyError):
        return None


def vocab_of(trial: pd.Series, predictions: pd.DataFrame, given: int | None) -> int | None:
    """The vocabulary the trial trained with: --vocab-size, else the sweep's predictions, else its manifest."""
    if given:
        return given
    if not predictions.empty and "vocab_size" in predictions:
        rows = predictions[(predictions.get("scope") == "trial") & (predictions["trial"] == trial["name"])]
        if len(rows) and _present(rows["vocab_size"].iloc[-1]):
            return int(rows["vocab_size"].iloc[-1])
    return dataset_vocab(trial.get("data_dir"))


def predicted(trial: pd.Series, vocab: int | None) -> tuple[float, str]:
    """(predicted peak MiB, phase) by this checkout's memory model; the trial's own prediction when no vocab."""
    if vocab is None:
        parts = [trial.get(f"predicted_{c}_mib") for c in ("params", "grads", "optimizer", "act_attention", "act_mlp",
                                                           "act_norm", "act_residual", "logits_loss", "weight_copies",
                                                           "other")]
        return (float(sum(parts)) if all(_present(p) for p in parts) else math.nan), "-"
    kernel = trial.get("attention_kernel")
    bd = predict_peak_memory(row_config(trial), vocab_size=vocab,
                             **({"attention_kernel": kernel} if _present(kernel) else {}))
    return bd.peak_mib, bd.phase


def peak_rows(results, vocab: int | None) -> pd.DataFrame:
    trials = results.training().trials
    rows = []
    for _, t in trials[trials["status"].isin(["ok", "oom"])].iterrows():
        peak_mib, phase = predicted(t, vocab_of(t, results.predictions, vocab))
        measured = t["peak_mem_mib"] if t["status"] == "ok" else math.nan
        rows.append({"label": t["label"], "seq_len": int(t["seq_len"]), "batch_size": int(t["batch_size"]),
                     "kernel": t.get("attention_kernel"), "status": t["status"], "measured_mib": measured,
                     "predicted_mib": peak_mib, "error": peak_mib / measured - 1 if measured > 0 else math.nan,
                     "phase": phase, "tokens_per_s": t.get("tokens_per_s")})
    return pd.DataFrame(rows).sort_values(["label", "seq_len"]) if rows else pd.DataFrame()


def _num(value, spec: str) -> str:
    return format(value, spec) if _present(value) else "-"


def peak_table(frame: pd.DataFrame, tolerance: float) -> str:
    lines = ["| technique | seq_len | batch | kernel | measured peak MiB | predicted MiB | error | predicted phase | "
             "tokens/s |", "|---|---:|---:|---|---:|---:|---:|---|---:|"]
    for _, r in frame.iterrows():
        measured = "OOM" if r["status"] == "oom" else _num(r["measured_mib"], ",.0f")
        lines.append(f"| {r['label']} | {r['seq_len']} | {r['batch_size']} | {r['kernel']} | {measured} | "
                     f"{_num(r['predicted_mib'], ',.0f')} | {_num(r['error'], '+.2%')} | {r['phase']} | "
                     f"{_num(r['tokens_per_s'], ',.0f')} |")
    errors = frame["error"].dropna()
    if errors.empty:
        return "\n".join(lines) + "\n\nNo measured peak to compare (no completed CUDA trial)."
    worst = frame.loc[errors.abs().idxmax()]
    per = frame.dropna(subset=["error"]).groupby("label")["error"].apply(lambda e: e.abs().max())
    verdict = "within" if abs(worst["error"]) <= tolerance else "NOT within"
    summary = [f"{len(errors)} measured peaks: max error {abs(worst['error']):.2%} ({worst['label']} at seq_len "
               f"{worst['seq_len']}), {verdict} {tolerance:.0%} up to seq_len {int(frame['seq_len'].max())}.",
               "Max |error| per technique: " + ", ".join(f"{k} {v:.2%}" for k, v in per.items()) + "."]
    return "\n".join(lines) + "\n\n" + "\n".join(summary)


def crossover_summary(results, threshold: float) -> str:
    """Each windowed trial against its full-attention reference (flash where it ran), and where a window pays."""
    frame = crossover(results)
    if frame.empty:
        return "No crossover: no full-attention trial at the seq_lens and batch sizes the windows ran."
    windowed = frame[(frame["window"].fillna(0) > 0) & ~frame["is_reference"]]
    lines = ["| technique | seq_len | batch | reference | memory vs reference | speed vs reference |",
             "|---|---:|---:|---|---:|---:|"]
    notes = []
    for label, rows in windowed.sort_values("seq_len").groupby("label"):
        reference = rows["reference"].iloc[0]
        for _, r in rows.iterrows():
            lines.append(f"| {label} | {r['seq_len']} | {r['batch_size']} | {r['reference']} | "
                         f"{_num(r['memory_vs_flash_pct'], '+.1f')}%{' (p)' if r['predicted'] else ''} | "
                         f"{_num(r['speed_vs_flash_pct'], '+.1f')}% |")
        saving, faster = -rows["memory_vs_flash_pct"], rows["speed_vs_flash_pct"]
        for gain, what in ((saving, "less memory than"), (faster, "faster than")):
            pays = rows[gain >= threshold]
            if len(pays):
                first = pays.iloc[0]
                notes.append(f"{label} is at least {threshold:g}% {what} {reference} from seq_len {first['seq_len']} "
                             f"({_num(gain.loc[first.name], '.1f')}% there).")
            elif gain.notna().any():
                notes.append(f"{label} is never {threshold:g}% {what} {reference} up to seq_len "
                             f"{int(rows['seq_len'].max())} (at best {gain.max():.1f}%, at seq_len "
                             f"{rows.loc[gain.idxmax(), 'seq_len']}).")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def make_dataset(out: Path, vocab_size: int, seq_len: int, rows: int) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_trainable", ROOT / "bench" / "bench_trainable.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_synthetic_dataset(out, vocab_size=vocab_size, seq_len=seq_len, rows={"train": rows, "val": 8})
    print(f"wrote {out}: {rows} training rows of {seq_len + 1} random tokens, vocab {vocab_size}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", nargs="?", help="the seq_len sweep's experiment directory (or URI)")
    p.add_argument("--out", type=Path, help="markdown file to write the tables to")
    p.add_argument("--vocab-size", type=int, help="the dataset's vocabulary (default: from the sweep's files)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="target |predicted / measured - 1|")
    p.add_argument("--threshold", type=float, default=THRESHOLD_PCT, help="percent a window must save to pay")
    p.add_argument("--make-dataset", type=Path, metavar="DIR", help="write a random-token dataset for the sweep")
    p.add_argument("--seq-len", type=int, default=8192, help="with --make-dataset: tokens per row (+1)")
    p.add_argument("--rows", type=int, default=256, help="with --make-dataset: training rows")
    args = p.parse_args(argv)
    if args.make_dataset:
        if args.make_dataset.exists():
            p.error(f"--make-dataset {args.make_dataset}: already exists")
        make_dataset(args.make_dataset, args.vocab_size or 10000, args.seq_len, args.rows)
        return 0
    if not args.experiment or not args.out:
        p.error("give the experiment directory and --out FILE (or --make-dataset DIR)")
    try:
        results = load(args.experiment)
    except AnalysisError as exc:
        p.exit(2, f"seq_len_report: {exc}\n")
    frame = peak_rows(results, args.vocab_size)
    if frame.empty:
        p.exit(2, f"seq_len_report: {args.experiment}: no completed or OOM training trial\n")
    seq_lens = ", ".join(str(int(s)) for s in sorted(frame["seq_len"].unique()))
    text = (f"Experiment {results.name}: {len(frame)} trials, seq_len {seq_lens}.\n\n"
            f"## Peak memory: measured vs the memory model\n\n{peak_table(frame, args.tolerance)}\n\n"
            f"## Sliding window vs flash\n\n{crossover_summary(results, args.threshold)}\n")
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
