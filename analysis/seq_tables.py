"""The seq_len crossover: each technique's peak against full-attention flash at the same seq_len and batch size,
so a reader sees at which sequence length sliding windows start to save memory (or time) over flash. Where no
flash trial ran (flash needs CUDA: a CPU sweep), the reference is the same technique with standard attention."""
from __future__ import annotations

import pandas as pd

from .load import SweepResults
from .selection import PREDICTED_NOTE, flash_counterpart
from .text import Table, num, pct

TITLE = "Sequence length: techniques vs full attention (flash where it ran)"
WINDOW_PAYS = 1.0  # a window pays at a seq_len where it needs at least this many percent less memory than flash
PLAIN_FLASH = "bf16_flash"


def _reference(trial: pd.Series, same: pd.DataFrame) -> pd.Series | None:
    """The full-attention trial a trial is compared with, at the same seq_len and batch size: its own flash
    counterpart (the same switches with flash attention), else plain bf16 flash, else its family (the same
    switches with standard attention)."""
    for label in dict.fromkeys((flash_counterpart(trial), PLAIN_FLASH, trial.get("family"))):
        rows = same[same["label"] == label]
        if len(rows):
            return rows.iloc[0]
    return None


def _peaks(trial: pd.Series, ref: pd.Series) -> tuple[float, float, bool]:
    """(peak, reference peak, predicted?): measured when both completed and measured, else the predictions (an OOM
    trial's measured memory is where it failed, not what it needed)."""
    both_ok = trial["status"] == "ok" and ref["status"] == "ok"
    if both_ok and pd.notna(trial.get("peak_mem_mib")) and pd.notna(ref.get("peak_mem_mib")):
        return trial["peak_mem_mib"], ref["peak_mem_mib"], False
    return trial.get("predicted_peak_mib"), ref.get("predicted_peak_mib"), True


def crossover(results: SweepResults) -> pd.DataFrame:
    """One row per completed or OOM training trial with a flash reference at its seq_len and batch size."""
    trials = results.training().trials
    trials = trials[trials["status"].isin(["ok", "oom"])].dropna(subset=["seq_len", "batch_size"])
    rows = []
    for (seq, batch), same in trials.groupby(["seq_len", "batch_size"]):
        for _, t in same.sort_values("label").iterrows():
            ref = _reference(t, same)
            if ref is None:
                continue
            peak, ref_peak, predicted = _peaks(t, ref)
            fits, ref_fits = t["status"] == "ok", ref["status"] == "ok"
            rows.append({
                "seq_len": int(seq), "batch_size": int(batch), "label": t["label"], "reference": ref["label"],
                "window": t.get("window"), "status": t["status"], "reference_status": ref["status"],
                "peak_mib": peak, "reference_peak_mib": ref_peak, "predicted": predicted,
                "memory_vs_flash_pct": 100 * (peak / ref_peak - 1) if pd.notna(peak) and pd.notna(ref_peak) else None,
                "tokens_per_s": t["tokens_per_s"] if fits else None,
                "reference_tokens_per_s": ref["tokens_per_s"] if ref_fits else None,
                "is_reference": t["trial_id"] == ref["trial_id"],
            })
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["speed_vs_flash_pct"] = 100 * (frame["tokens_per_s"] / frame["reference_tokens_per_s"] - 1)
    return frame


def _memory_cell(row: pd.Series) -> str:
    if row["is_reference"]:
        return "reference" + (" (OOM)" if row["status"] == "oom" else "")
    if row["reference_status"] == "oom" and row["status"] == "ok":
        return f"fits; {row['reference']} OOM"
    if row["status"] == "oom":
        needs = row["memory_vs_flash_pct"]
        return "OOM" + (f" (needs {pct(needs)}, p)" if pd.notna(needs) else "")
    return pct(row["memory_vs_flash_pct"]) + (" (p)" if row["predicted"] else "")


def _pays_notes(frame: pd.DataFrame) -> list[str]:
    """For each windowed technique: the first seq_len at which it saves memory over flash."""
    notes = []
    windowed = frame[(frame["window"].fillna(0) > 0) & ~frame["is_reference"]]
    for label, rows in windowed.sort_values("seq_len").groupby("label"):
        saving = -rows["memory_vs_flash_pct"]
        pays = rows[(saving >= WINDOW_PAYS) | ((rows["reference_status"] == "oom") & (rows["status"] == "ok"))]
        if len(pays):
            first = pays.iloc[0]
            how = (f"{first['reference']} runs out of memory there" if first["reference_status"] == "oom"
                   else f"{pct(first['memory_vs_flash_pct'])} memory vs {first['reference']}")
            notes.append(f"{label} starts to pay at seq_len {first['seq_len']} ({how}).")
        else:
            best = saving.max()
            notes.append(f"{label} saves no memory over {rows['reference'].iloc[0]} at these seq_lens (at most "
                         f"{num(best, 1) if pd.notna(best) else '-'}%).")
    return notes


def seq_len_table(results: SweepResults) -> Table | None:
    """The crossover table; None unless the experiment ran several seq_lens."""
    trials = results.training().trials
    if "seq_len" not in trials or trials["seq_len"].dropna().nunique() < 2:
        return None
    frame = crossover(results)
    if frame.empty:
        return Table(TITLE, [], [], ["Not computed: no full-attention trial (flash, or the technique's own standard "
                                     "attention) at a seq_len and batch size another technique ran."])
    frame = frame.sort_values(["seq_len", "batch_size", "is_reference", "label"], ascending=[True, True, False, True])
    rows = [[
        str(r["seq_len"]), str(r["batch_size"]), str(r["label"]), str(r["reference"]),
        num(r["peak_mib"], 0) + (" (p)" if r["predicted"] and pd.notna(r["peak_mib"]) else ""),
        num(r["reference_peak_mib"], 0) + (" (p)" if r["predicted"] and pd.notna(r["reference_peak_mib"]) else ""),
        _memory_cell(r), num(r["tokens_per_s"], 0), "" if r["is_reference"] else pct(r["speed_vs_flash_pct"]),
    ] for _, r in frame.iterrows()]
    notes = ["reference = the full-attention trial each row is compared with, at the same seq_len and batch size: its "
             "flash counterpart, else bf16_flash, else the same technique with standard attention. memory vs "
             "reference = peak / the reference's peak - 1 (negative: the technique needs less); speed vs reference = "
             "tokens/s / the reference's - 1 (medians)."]
    if frame["predicted"].any():
        notes.append(f"(p): {PREDICTED_NOTE} (where a trial ran out of memory or measured none).")
    return Table(TITLE,
                 ["seq_len", "batch size", "technique", "reference", "peak (MiB)", "reference peak (MiB)",
                  "memory vs reference", "tokens/s", "speed vs reference"], rows, notes + _pays_notes(frame))
