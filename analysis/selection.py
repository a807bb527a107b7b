"""Which trials a table or plot compares, and which memory figure it shows (measured, else predicted).

Shared by the report's tables and the plots, so both say the same thing about the same trials.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from contract.techniques import BASELINE_LABELS, Switches, technique_label

from .load import SweepResults

PREFERRED_COMPARISON_BATCH = 128
PREDICTED_NOTE = "predicted by the memory model for a CUDA GPU; not measured"


def ok_trials(results: SweepResults) -> pd.DataFrame:
    """Completed training trials (a max-batch search's probes are not training runs)."""
    trials = results.trials
    is_probe = trials["kind"].eq("probe") if "kind" in trials else False
    return trials[(trials["status"] == "ok") & ~is_probe]


def comparison_batch_size(results: SweepResults) -> int | None:
    """128 when completed trials ran at it, else the largest batch size with completed trials."""
    sizes = ok_trials(results)["batch_size"].dropna()
    if sizes.empty:
        return None
    return PREFERRED_COMPARISON_BATCH if (sizes == PREFERRED_COMPARISON_BATCH).any() else int(sizes.max())


def comparison_note(batch: int) -> str:
    return "" if batch == PREFERRED_COMPARISON_BATCH else (
        f" (the largest batch size with completed trials; none at {PREFERRED_COMPARISON_BATCH})")


def baseline_label(trials: pd.DataFrame) -> str | None:
    """The reference technique the sweep ran (first of BASELINE_LABELS present)."""
    present = set(trials["label"].dropna())
    return next((label for label in BASELINE_LABELS if label in present), None)


@dataclass(frozen=True)
class MemorySource:
    """The peak-memory column a comparison uses: measured on a GPU, else the memory model's prediction."""

    column: str  # peak_mem_mib | predicted_peak_mib
    predicted: bool

    @property
    def axis(self) -> str:
        return "predicted CUDA peak memory (MiB)" if self.predicted else "peak GPU memory per step (MiB)"

    @property
    def short(self) -> str:
        return "predicted peak (MiB)" if self.predicted else "peak mem (MiB)"

    @property
    def tag(self) -> str:
        """Said in a plot's title or a table's note when the figures are predictions."""
        return f" ({PREDICTED_NOTE})" if self.predicted else ""


MEASURED = MemorySource("peak_mem_mib", False)
PREDICTED = MemorySource("predicted_peak_mib", True)


def memory_source(trials: pd.DataFrame) -> MemorySource | None:
    """Measured peaks when any trial measured one; else predicted peaks when the sweep wrote predictions
    (CPU trials measure no GPU memory); None when there is neither."""
    if "peak_mem_mib" in trials and trials["peak_mem_mib"].notna().any():
        return MEASURED
    if "predicted_peak_mib" in trials and trials["predicted_peak_mib"].notna().any():
        return PREDICTED
    return None


def no_memory_reason(trials: pd.DataFrame) -> str:
    """Why no memory figure can be shown."""
    on_cpu = "device" in trials and trials["device"].eq("cpu").any()
    return ("no GPU memory was measured (CPU trials) and the experiment has no memory-model predictions "
            "(predictions.json)" if on_cpu else "no trial reported peak memory")


def memory_savings(results: SweepResults, source: MemorySource | None = None) -> pd.DataFrame:
    """Each completed non-baseline trial vs the baseline at the same batch size (and seq_len): memory saving and
    speed change; memory from `source` (default: measured, else predicted)."""
    ok = ok_trials(results)
    label = baseline_label(ok)
    source = source or memory_source(ok)
    if label is None or source is None:
        return pd.DataFrame()
    seq = pd.to_numeric(ok["seq_len"], errors="coerce").fillna(-1) if "seq_len" in ok else -1
    ok = ok.assign(_seq=seq, _mem=ok[source.column])
    keys = ["batch_size", "_seq"]
    base = ok[ok["label"] == label].drop_duplicates(keys)[[*keys, "_mem", "tokens_per_s", "val_ppl"]]
    pairs = ok[ok["label"] != label].merge(base, on=keys, suffixes=("", "_base"))
    if pairs.empty:
        return pd.DataFrame()
    return pd.DataFrame({
        "label": pairs["label"], "batch_size": pairs["batch_size"].astype(int), "seq_len": pairs["_seq"].where(
            pairs["_seq"] >= 0), "baseline": label, "peak_mem_mib": pairs["_mem"], "baseline_peak_mem_mib":
        pairs["_mem_base"], "memory_saving_pct": 100 * (1 - pairs["_mem"] / pairs["_mem_base"]),
        "tokens_per_s": pairs["tokens_per_s"], "baseline_tokens_per_s": pairs["tokens_per_s_base"],
        "speed_change_pct": 100 * (pairs["tokens_per_s"] / pairs["tokens_per_s_base"] - 1),
        "val_ppl": pairs["val_ppl"], "baseline_val_ppl": pairs["val_ppl_base"], "predicted": source.predicted,
    })


def flash_counterpart(trial: pd.Series) -> str:
    """The label of the same trial with full-attention flash in place of its attention (`bf16_window16` ->
    `bf16_flash`): what a window's saving is measured against."""
    fields = Switches.__dataclass_fields__
    switches = {k: _plain(trial.get(k)) for k in fields if _known(trial.get(k))}
    switches.update(attention="flash", window=None)
    return technique_label(Switches.of(switches))


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _plain(value):
    """CSV and DataFrame round trips turn booleans into strings; switches want the values themselves."""
    if hasattr(value, "item"):
        value = value.item()
    return {"True": True, "False": False}.get(value, value) if isinstance(value, str) else value
