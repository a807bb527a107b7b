"""The report's memory tables: per-phase details, where the memory goes, the seed grid predicted on named GPUs,
and the seq_len crossover (where sliding windows start to save memory over full-attention flash)."""
from __future__ import annotations

import math

import pandas as pd

from contract.keys import MEMORY_COMPONENTS

from .breakdown import SUM_TOLERANCE, Breakdown, breakdown_rows
from .compare import sorted_trials
from .load import SweepResults
from .selection import (
    PREDICTED, PREDICTED_NOTE, baseline_label, comparison_batch_size, comparison_note, memory_source,
)
from .text import Table, num, pct, share, text_cell


def memory_table(results: SweepResults) -> Table:
    """Per-phase peaks of each trial; the predicted peak beside the measured one whenever the sweep predicted."""
    trials = results.training().trials
    trials = sorted_trials(trials[trials["status"].isin(["ok", "oom"])], baseline_label(trials))
    source = memory_source(trials)
    if source is None:
        return Table("Memory details (MiB)", [], [], ["No GPU memory measured (CPU trials, or no completed trial), "
                                                      "and no memory-model predictions (predictions.json)."])
    if source.predicted:
        return _predicted_memory_table(results, trials)
    with_pred = trials["predicted_peak_mib"].notna().any()
    rows = [[
        str(t["label"]), num(t["batch_size"], 0), str(t["status"]), num(t["fwd_peak_mean_mib"], 0),
        num(t["fwd_peak_max_mib"], 0), num(t["bwd_peak_mean_mib"], 0), num(t["bwd_peak_max_mib"], 0),
        num(t["opt_peak_max_mib"], 0), num(t["peak_mem_mib"], 0), num(t["reserved_mib"], 0),
        *([num(t["predicted_peak_mib"], 0), pct(100 * (t["predicted_peak_mib"] / t["peak_mem_mib"] - 1))]
          if with_pred else []),
    ] for _, t in trials.iterrows()]
    notes = ["fwd/bwd/optimizer peak: peak allocated during that phase of a step (mean and max over steps; an OOM "
             "trial's max includes the memory at failure); reserved: max of mem_reserved_mib (the caching allocator's "
             "footprint, what nvidia-smi sees). '-': not measured."]
    if with_pred:
        notes.append("predicted: the memory model's peak for the trial's config; model error = predicted / step peak "
                     "max - 1 (compiled configs: the eager step's memory, an upper bound).")
    return Table("Memory details (MiB)",
                 ["technique", "batch size", "status", "fwd peak mean", "fwd peak max", "bwd peak mean", "bwd peak max",
                  "optimizer peak max", "step peak max", "reserved max",
                  *(["predicted peak", "model error"] if with_pred else [])], rows, notes)


def _predicted_memory_table(results: SweepResults, trials: pd.DataFrame) -> Table:
    own = results.predictions[results.predictions["scope"] == "trial"].drop_duplicates("trial", keep="last")
    own = own.set_index("trial")
    rows = []
    for _, t in trials.iterrows():
        p = own.loc[t["name"]] if t["name"] in own.index else pd.Series(dtype=object)
        rows.append([str(t["label"]), num(t["batch_size"], 0), str(t["status"]), num(t["predicted_peak_mib"], 0),
                     num(p.get("predicted_reserved_mib"), 0), text_cell(p.get("phase")), text_cell(p.get("kernel")),
                     "yes" if str(t.get("predicted_upper_bound")) == "True" else ""])
    budget = own["budget_source"].dropna().iloc[0] if "budget_source" in own and own["budget_source"].notna().any() \
        else None
    return Table(
        "Memory details (MiB), predicted for a CUDA GPU",
        ["technique", "batch size", "status", "predicted peak", "predicted reserved", "peak phase", "kernel on CUDA",
         "upper bound"], rows,
        [f"No GPU memory was measured (the trials ran on CPU): these are {PREDICTED_NOTE}. peak = "
         "max_memory_allocated of a steady training step; reserved adds the caching allocator's slack; kernel = the "
         "attention kernel the trial would use on a CUDA GPU; upper bound: compiled configs (torch.compile is not "
         "modelled: the eager step's memory)." + (f" Budget assumed for fits/max batch: {budget}." if budget else "")])


def _breakdown_cell(row: Breakdown, component: str, digits: int) -> str:
    measured, forecast = row.measured[component], row.forecast[component]
    shown = forecast if row.predicted else measured
    of = 100 * shown / row.peak if row.peak and not math.isnan(row.peak) and not math.isnan(shown) else math.nan
    return f"{num(measured, digits)} / {num(forecast, digits)} ({share(of)})"


def _digits(rows: list[Breakdown]) -> int:
    """Whole MiB, or tenths for a small model (whose components are a few MiB each)."""
    peaks = [r.peak for r in rows if not math.isnan(r.peak)]
    return 1 if peaks and max(peaks) < 100 else 0


def _sum_check(row: Breakdown) -> str:
    off = row.sum_off()
    if math.isnan(off):
        return "-"
    return f"{'ok' if abs(off) <= SUM_TOLERANCE else 'OFF'} ({100 * off:+.1f}%)"


def breakdown_table(results: SweepResults) -> Table | None:
    """Where the memory goes at the comparison batch size: each component measured / predicted, its share of the
    peak, the largest component, and whether the measured components add up to the measured peak."""
    batch = comparison_batch_size(results)
    rows = breakdown_rows(results, batch)
    if not rows:
        return None
    digits = _digits(rows)
    body = [[component, *(_breakdown_cell(r, component, digits) for r in rows)] for component in MEMORY_COMPONENTS]
    body += [
        ["= peak", *(f"{num(r.measured_peak, digits)} / {num(r.predicted_peak, digits)}" for r in rows)],
        ["allocator slack", *(f"{num(r.measured_slack, digits)} / {num(r.predicted_slack, digits)}" for r in rows)],
        ["peak phase", *(text_cell(r.phase) for r in rows)],
        ["largest", *(text_cell(r.largest()) for r in rows)],
        ["components sum to peak", *(_sum_check(r) for r in rows)],
    ]
    notes = [f"At batch size {batch}{comparison_note(batch)}. Each cell: measured / predicted MiB (share of the "
             "peak: the measured one, or the predicted one where nothing was measured); '-': not known. "
             "Components (contract.keys.MEMORY_COMPONENTS): "
             + "; ".join(f"{c} = {meaning}" for c, meaning in MEMORY_COMPONENTS.items()) + ".",
             f"components sum to peak: the measured components add up to the measured peak within "
             f"{100 * SUM_TOLERANCE:.0f}% ('OFF': they do not; the attribution missed memory). Slack (reserved minus "
             "allocated) is not part of the peak."]
    if any(r.predicted for r in rows):
        notes.append(f"Trials without a measurement show the prediction only ({PREDICTED_NOTE}).")
    return Table("Where the memory goes (MiB)", ["component", *(r.name for r in rows)], body, notes)


def seed_grid_tables(results: SweepResults) -> list[Table]:
    """The seed grid at this sweep's model size, predicted on the named GPUs: shown when no trial measured GPU
    memory, so a user without a GPU still sees what the techniques would do on one."""
    seed = results.predictions[results.predictions["scope"] == "seed_grid"]
    if seed.empty or memory_source(results.training().trials) != PREDICTED:
        return []
    gpus = list(dict.fromkeys(seed["gpu"].dropna().astype(str))) or ["-"]
    first = seed[seed["gpu"].astype(str) == gpus[0]].sort_values(["label", "window", "batch_size"], na_position="first")
    fits = {g: seed[seed["gpu"].astype(str) == g].drop_duplicates("trial").set_index("trial")["fits"] for g in gpus}
    rows = [[str(r["trial"]), text_cell(r["kernel"]), num(r["predicted_peak_mib"], 0),
             *(_fits(fits[g].get(r["trial"])) for g in gpus)] for _, r in first.iterrows()]
    budgets = "; ".join(f"{g}: {num(seed[seed['gpu'].astype(str) == g]['budget_mib'].max(), 0)} MiB for the allocator "
                        "(its memory less the CUDA context)" for g in gpus)
    model = _model_line(first)
    peaks = Table(f"Seed grid predicted on {', '.join(gpus)} (peak per trial)",
                  ["trial", "kernel", "predicted peak (MiB)", *(f"fits {g}" for g in gpus)], rows,
                  [f"Predicted by the memory model for a CUDA GPU; not measured: the seed grid ({_grid_line(first)}) at "
                   f"this sweep's model{model}. Budgets: {budgets}. fits = the predicted reserved memory (peak plus "
                   "allocator slack) fits the budget."])
    per_technique = first.drop_duplicates(["label"])
    max_rows = [[str(r["label"]), *(num(_max_batch(seed, g, r["label"]), 0) for g in gpus)]
                for _, r in per_technique.iterrows()]
    limits = Table(f"Seed grid predicted max batch per technique on {', '.join(gpus)}",
                   ["technique", *(f"max batch {g}" for g in gpus)], max_rows,
                   ["The largest batch whose predicted reserved memory fits each GPU's budget (an estimate: "
                    "`--find-max-batch` on a GPU measures it)."])
    return [peaks, limits]


def _fits(value) -> str:
    return "yes" if value is True or str(value) == "True" else "no" if value is False or str(value) == "False" else "-"


def _max_batch(seed: pd.DataFrame, gpu: str, label: str) -> float | None:
    rows = seed[(seed["gpu"].astype(str) == gpu) & (seed["label"] == label)]["predicted_max_batch"].dropna()
    return float(rows.iloc[0]) if len(rows) else None


def _grid_line(rows: pd.DataFrame) -> str:
    """`baseline, bf16, ... x batch 32/64/128`, from the rows themselves."""
    labels = ", ".join(dict.fromkeys(map(str, rows["label"])))
    sizes = "/".join(str(int(b)) for b in sorted(rows["batch_size"].dropna().unique()))
    return f"{labels} x batch {sizes}" if sizes else labels


def _model_line(rows: pd.DataFrame) -> str:
    parts = []
    for column, name in (("seq_len", "seq_len"), ("vocab_size", "vocab")):
        values = rows[column].dropna() if column in rows else pd.Series(dtype=float)
        if len(values):
            parts.append(f"{name} {int(values.iloc[0])}")
    return f" ({', '.join(parts)})" if parts else ""
