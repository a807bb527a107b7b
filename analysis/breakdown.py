"""Where the memory goes: each trial's peak split into `contract.keys.MEMORY_COMPONENTS`, measured and predicted.

A trial's final report carries `measured_<component>_mib` (an allocator snapshot at its peak; NaN on CPU),
`predicted_<component>_mib` (the memory model for the same config), the slack of each, the measured peak the
measured components sum to (`breakdown_peak_mib`) and the phase it fell in. The report's table and plot 9 read
these through `breakdown_rows`, so both show the same figures.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from contract.keys import MEMORY_COMPONENTS

from .load import SweepResults
from .selection import ok_trials

SUM_TOLERANCE = 0.01  # measured components must sum to the measured peak within 1%


def _value(trial: pd.Series, key: str) -> float:
    value = pd.to_numeric(trial.get(key), errors="coerce")
    return float(value) if pd.notna(value) else math.nan


@dataclass
class Breakdown:
    """One trial's peak by component, measured and predicted (NaN where not known)."""

    name: str  # how the report and plot name the trial (its label; with seq_len when several)
    trial: str
    measured: dict[str, float]
    forecast: dict[str, float]
    measured_peak: float
    measured_slack: float
    predicted_slack: float
    phase: str | None

    @classmethod
    def of(cls, trial: pd.Series, name: str) -> "Breakdown":
        phase = trial.get("breakdown_phase")
        return cls(
            name=name, trial=str(trial["name"]),
            measured={c: _value(trial, f"measured_{c}_mib") for c in MEMORY_COMPONENTS},
            forecast={c: _value(trial, f"predicted_{c}_mib") for c in MEMORY_COMPONENTS},
            measured_peak=_value(trial, "breakdown_peak_mib"), measured_slack=_value(trial, "measured_slack_mib"),
            predicted_slack=_value(trial, "predicted_slack_mib"),
            phase=phase if isinstance(phase, str) and phase else None,
        )

    @property
    def has_measured(self) -> bool:
        return any(not math.isnan(v) for v in self.measured.values())

    @property
    def has_forecast(self) -> bool:
        return any(not math.isnan(v) for v in self.forecast.values())

    @property
    def predicted(self) -> bool:
        """Whether what is shown for this trial is the prediction (nothing measured)."""
        return not self.has_measured

    @property
    def values(self) -> dict[str, float]:
        """What a plot stacks: the measured components, else the predicted ones."""
        return self.forecast if self.predicted else self.measured

    @property
    def predicted_peak(self) -> float:
        known = [v for v in self.forecast.values() if not math.isnan(v)]
        return sum(known) if known else math.nan

    @property
    def peak(self) -> float:
        """The peak the shares are of: the measured one when measured, else the predicted one."""
        if self.predicted:
            return self.predicted_peak
        if not math.isnan(self.measured_peak):
            return self.measured_peak
        return self.measured_sum

    @property
    def measured_sum(self) -> float:
        known = [v for v in self.measured.values() if not math.isnan(v)]
        return sum(known) if known else math.nan

    def largest(self) -> str | None:
        known = {c: v for c, v in self.values.items() if not math.isnan(v)}
        return max(known, key=known.get) if known else None

    def sum_off(self) -> float:
        """How far the measured components' sum is from the measured peak (a fraction; NaN when not measured)."""
        if not self.has_measured or math.isnan(self.measured_peak) or self.measured_peak <= 0:
            return math.nan
        return self.measured_sum / self.measured_peak - 1


def breakdown_rows(results: SweepResults, batch: int | None) -> list[Breakdown]:
    """The completed training trials at `batch` that reported a breakdown, by technique."""
    if batch is None:
        return []
    ok = ok_trials(results)
    at = ok[ok["batch_size"] == batch]
    at = at.sort_values(["label", "seq_len"] if "seq_len" in at else ["label"])
    with_seq = "seq_len" in at and at["seq_len"].dropna().nunique() > 1
    rows = []
    for _, trial in at.iterrows():
        name = f"{trial['label']} s{int(trial['seq_len'])}" if with_seq else str(trial["label"])
        row = Breakdown.of(trial, name)
        if row.has_measured or row.has_forecast:
            rows.append(row)
    return rows
