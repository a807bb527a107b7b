"""Load a sweep's Ray Tune experiment directory into pandas DataFrames, from plain files only.

An experiment (`contract.experiment`) is read as JSON and JSON lines through pyarrow's filesystems, so it
loads on a laptop, from a finished or interrupted sweep, and from remote storage (any URI pyarrow reads),
without Ray's private modules and without unpickling anything the sweep wrote (which would import the
sweep, the trainable and torch):

* the newest valid `experiment_state-*.json`: each trial's id, Tune status, directory and config;
* each trial's `result.json`: one JSON object per report;
* each trial's `error.txt`, when it failed; `max_batch.json` and `predictions.json` when present.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from contract.experiment import (GRID_KEY, KIND_KEY, MAX_BATCH_FILE, MAX_BATCH_RECORD_KEYS, PREDICTION_RECORD_KEYS,
                                 PREDICTIONS_FILE)
from contract.io import error_line
from contract.keys import BREAKDOWN_KEYS, TRIAL_STATUSES, keys_of
from contract.techniques import Switches, technique_family, technique_label

from .files import AnalysisError, Files, TrialEntry, error_text, history, newest_state, trial_entries
from .speed import (  # noqa: F401  (re-exported: the speed rule's names are part of this module's API)
    SPEED_COLUMNS, SPEED_RULE_FLAG, SPEED_RULE_SKIP, WARMUP_STEPS, each_step_once, speed_rows, speed_stats, step_rows,
    warmup_steps,
)

MEMORY_AGGREGATES = (
    "peak_mem_mib", "fwd_peak_mean_mib", "fwd_peak_max_mib", "bwd_peak_mean_mib", "bwd_peak_max_mib",
    "opt_peak_mean_mib", "opt_peak_max_mib", "allocated_max_mib", "reserved_mib",
)
# What analysis computes from a trial's reports (the rest of a row is its config and the contract's keys).
AGGREGATES = ("steps_reported", "final_loss", *MEMORY_AGGREGATES, *SPEED_COLUMNS)
IDENTITY = ("trial_id", "name", "kind", "technique", "label", "family", "status")
# A technique's switches (contract.techniques.Switches: a new switch gets a column by itself), then the shape.
SWITCHES = (*(f.name for f in fields(Switches)), "batch_size", "seq_len")
FINAL_TOTALS = tuple(k for k in keys_of("final") if k not in ("final", "status"))
# Joined from PREDICTIONS_FILE by trial name: the memory model's CUDA peak for the trial's own config.
PREDICTED = ("predicted_peak_mib", "predicted_upper_bound")
EXTRA = ("val_loss", "val_ppl", "compile_time_s", "gpu_memory_gb", *keys_of("oom"), "error", "tune_status",
         "num_failures", "path")
# Leading columns of `trials`, in report order; every other config value follows them.
TRIAL_COLUMNS = tuple(dict.fromkeys((*IDENTITY, *SWITCHES, "attention_kernel", "dtype", "tf32", "gpu_name", "device",
                                     *AGGREGATES, *PREDICTED[:1], *FINAL_TOTALS, *keys_of("fact"), *EXTRA,
                                     *PREDICTED[1:])))
NUMERIC_COLUMNS = tuple(dict.fromkeys((
    "window", "batch_size", "seq_len", "steps_reported", "final_loss", *MEMORY_AGGREGATES,
    *(c for c in SPEED_COLUMNS if c != "speed_rule"), "predicted_peak_mib", "num_params", "model_flops_per_token",
    "peak_flops", "gpu_memory_gb", "gpu_total_mib", "oom_mem_peak_mib", "val_loss", "val_ppl", "num_failures")))
# PREDICTIONS_FILE rows (sweep.predict): `scope` trial = each trial's own config on a CUDA GPU; seed_grid = the seed
# grid at the sweep's model on the GPUs named in `gpu`. These columns are always there, rows or not.
PREDICTION_COLUMNS = ("scope", "gpu", *PREDICTION_RECORD_KEYS, "budget_source")


@dataclass
class SweepResults:
    """Everything a sweep produced, as DataFrames.

    trials:      one row per trial (status `ok` | `oom` | `nan` | `error` | `incomplete`; `nan` = the loss went
                 NaN or infinite; `incomplete` = interrupted or still pending: no final report and no error);
                 `kind` is `train`, or `probe` for the short trials of a max-batch search; `technique` is the
                 named preset, `label` the technique derived from the switches (`bf16_window16`).
                 Speed (over the steady steps, those not flagged warm-up; see `analysis.speed`):
                 `tokens_per_s` = median of each step's GPU-time throughput; `tokens_per_s_q25`/`_q75` its
                 interquartile range and `speed_steps` how many steps it rests on; `steady_tokens_per_s` =
                 total steady tokens / total steady GPU time (the trial's own figure; below the median when
                 some steps are slow); `wall_tokens_per_s` = steady tokens / the wall time between their
                 reports (reporting, evaluation and checkpoints included).
                 Memory: `peak_mem_mib` = max of `mem_step_peak_mib` (NaN on CPU: not measured);
                 `predicted_peak_mib` = the memory model's CUDA peak for the trial's config (from
                 PREDICTIONS_FILE, whenever the sweep wrote one); `measured_<component>_mib` and
                 `predicted_<component>_mib` (contract.keys.MEMORY_COMPONENTS) = where the peak's memory went.
    steps:       per-step history: trial_id, name and every key the trial reported, each step once (a trial
                 restarted from a checkpoint reports the steps after it again: the latest attempt is kept).
    max_batch:   the max-batch search records (no rows when the sweep ran no search; the columns are there).
    predictions: the memory model's predicted peaks the sweep wrote (PREDICTION_COLUMNS first); no rows, same
                 columns, when there are none.
    """

    path: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    max_batch: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MAX_BATCH_RECORD_KEYS)))
    predictions: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(PREDICTION_COLUMNS)))

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or self.path

    def _is_probe(self) -> pd.Series:
        trials = self.trials
        return trials["kind"].eq("probe") if "kind" in trials else pd.Series(False, index=trials.index)

    @property
    def probes(self) -> pd.DataFrame:
        """The max-batch search's probe trials (no rows, same columns, for a plain sweep)."""
        return self.trials[self._is_probe()]

    def training(self) -> SweepResults:
        """These results without the probe trials: what the comparison tables and plots 1-7 compare."""
        trials = self.trials[~self._is_probe()]
        steps = self.steps[self.steps["trial_id"].isin(trials["trial_id"])] if "trial_id" in self.steps else self.steps
        return SweepResults(self.path, trials, steps, self.max_batch, self.predictions)


def _last(frame: pd.DataFrame, key: str) -> Any:
    if frame.empty or key not in frame:
        return None
    values = frame[key].dropna()
    return _plain(values.iloc[-1]) if len(values) else None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _stat(rows: pd.DataFrame, key: str, how: str) -> float | None:
    if rows.empty or key not in rows:
        return None
    values = pd.to_numeric(rows[key], errors="coerce").dropna()
    return float(getattr(values, how)()) if len(values) else None


def _status(tune_status: str, error: str | None, final: dict) -> str:
    """A trial that ended in a final report has that report's status, even when an earlier attempt failed and
    left an error.txt (it restarted from a checkpoint and finished); one Tune marks ERROR did not finish."""
    if tune_status == "ERROR":
        return "error"
    if final.get("final") is True and final.get("status") in TRIAL_STATUSES:
        return final["status"]
    return "error" if error is not None else "incomplete"


def _memory(steps: pd.DataFrame, reports: pd.DataFrame) -> dict[str, float | None]:
    """Peaks: maxima over every report (an OOM's final report holds the memory at failure), means over steps."""
    return {
        "peak_mem_mib": _stat(reports, "mem_step_peak_mib", "max"),
        "fwd_peak_mean_mib": _stat(steps, "mem_fwd_peak_mib", "mean"),
        "fwd_peak_max_mib": _stat(reports, "mem_fwd_peak_mib", "max"),
        "bwd_peak_mean_mib": _stat(steps, "mem_bwd_peak_mib", "mean"),
        "bwd_peak_max_mib": _stat(reports, "mem_bwd_peak_mib", "max"),
        "opt_peak_mean_mib": _stat(steps, "mem_opt_peak_mib", "mean"),
        "opt_peak_max_mib": _stat(reports, "mem_opt_peak_mib", "max"),
        "allocated_max_mib": _stat(reports, "mem_allocated_mib", "max"),
        "reserved_mib": _stat(reports, "mem_reserved_mib", "max"),
    }


def _aggregates(reports: pd.DataFrame) -> dict[str, Any]:
    steps = step_rows(reports)
    last_loss = steps["loss"].iloc[-1] if len(steps) and "loss" in steps else None  # NaN for a diverged trial
    return {"steps_reported": int(len(steps)), "final_loss": _plain(last_loss), **_memory(steps, reports),
            **speed_stats(steps)}


def _trial_row(files: Files, trial: TrialEntry, reports: pd.DataFrame) -> dict[str, Any]:
    """One trial's row: its config, the facts it reported, its final report, and aggregates of its steps."""
    finals = reports[reports["final"].eq(True)] if "final" in reports else pd.DataFrame()
    final = {k: _plain(v) for k, v in finals.iloc[-1].dropna().items()} if not finals.empty else {}
    text = error_text(files, trial)
    error = error_line(text) if text else None
    row: dict[str, Any] = {k: v for k, v in trial.config.items() if not isinstance(v, (dict, list))}
    row.update({k: _last(reports, k) for k in keys_of("fact")})
    row.update({k: final.get(k) for k in (*FINAL_TOTALS, *keys_of("oom"))})
    row.update(_aggregates(reports))
    row.update(
        trial_id=trial.trial_id, name=trial.config.get(GRID_KEY) or trial.logdir or trial.trial_id,
        kind=trial.config.get(KIND_KEY, "train"), status=_status(trial.status, error, final),
        val_loss=final.get("val_loss", _last(reports, "val_loss")),
        val_ppl=final.get("val_ppl", _last(reports, "val_ppl")),
        compile_time_s=final.get("compile_time_s", _last(reports, "compile_time_s")),
        error=error, tune_status=trial.status, num_failures=trial.num_failures,
        path=f"{files.root}/{trial.logdir}" if trial.logdir else None,
    )
    for key in (GRID_KEY, KIND_KEY):
        row.pop(key, None)
    if row.get("label") is None and "precision" in trial.config:  # never reported: the label from its config
        row["label"], row["family"] = technique_label(trial.config), technique_family(trial.config)
    return row


def _order_columns(frame: pd.DataFrame, leading: tuple[str, ...]) -> pd.DataFrame:
    for column in leading:
        if column not in frame:
            frame[column] = None
    return frame[list(leading) + sorted(c for c in frame.columns if c not in leading)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """Measurement columns as numbers (NaN where absent), so they sort, plot and aggregate: the known ones, and
    every final total whose reported values are all numbers (not `gpu_uuid`, `breakdown_phase`)."""
    totals = [c for c in FINAL_TOTALS if c in frame and frame[c].dropna().map(_is_number).all()]
    for column in (*NUMERIC_COLUMNS, *totals):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _steps_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=["trial_id", "name", "step"])
    steps = pd.concat(frames, ignore_index=True)
    leading = ["trial_id", "name"] + [c for c in ("step", "training_iteration") if c in steps]
    return steps[leading + [c for c in steps.columns if c not in leading]]


def _max_batch(files: Files) -> pd.DataFrame:
    records = files.json(MAX_BATCH_FILE)
    if records is None:
        return pd.DataFrame(columns=list(MAX_BATCH_RECORD_KEYS))
    if not isinstance(records, list):
        raise AnalysisError(f"{files.root}/{MAX_BATCH_FILE}: expected a list of max-batch records")
    return _order_columns(pd.DataFrame(records), MAX_BATCH_RECORD_KEYS)


def _predictions(files: Files) -> pd.DataFrame:
    data = files.json(PREDICTIONS_FILE)
    if data is None:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    if not isinstance(data, dict):
        raise AnalysisError(f"{files.root}/{PREDICTIONS_FILE}: expected an object with 'trials' and 'seed_grid'")
    rows = [{**r, "scope": "trial"} for r in data.get("trials") or [] if isinstance(r, dict)]
    rows += [{**r, "scope": "seed_grid"} for r in data.get("seed_grid") or [] if isinstance(r, dict)]
    frame = _order_columns(pd.DataFrame(rows), PREDICTION_COLUMNS)
    frame["budget_source"] = data.get("budget")
    for column in ("batch_size", "window", "seq_len", "vocab_size", "predicted_peak_mib", "predicted_reserved_mib",
                   "predicted_max_batch", "budget_mib"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def join_predictions(trials: pd.DataFrame, predictions: pd.DataFrame) -> pd.DataFrame:
    """`predicted_peak_mib` (and whether it is an upper bound: compiled configs) for each trial the sweep
    predicted, matched by trial name; NaN for the others (probes, trials the model does not cover)."""
    own = predictions[predictions["scope"] == "trial"].drop_duplicates("trial", keep="last").set_index("trial")
    trials = trials.copy()
    trials["predicted_peak_mib"] = pd.to_numeric(trials["name"].map(own["predicted_peak_mib"]), errors="coerce")
    trials["predicted_upper_bound"] = trials["name"].map(own["upper_bound"])
    return trials


def load(path: str | os.PathLike) -> SweepResults:
    """Load the Tune experiment at `path` (local directory or storage URI, e.g. `s3://bucket/sweeps/run1`)."""
    shown = str(path)
    if "://" not in shown and not Path(shown).is_dir():
        raise AnalysisError(f"{shown}: no such directory (expected a Ray Tune experiment directory STORAGE/NAME)")
    files = Files(shown)
    state = newest_state(files, shown)
    rows, frames = [], []
    for trial in trial_entries(state):
        reports = history(files, trial)
        row = _trial_row(files, trial, reports)
        rows.append(row)
        steps = each_step_once(reports)
        if not steps.empty:
            frames.append(steps.assign(trial_id=row["trial_id"], name=row["name"]))
    trials = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(TRIAL_COLUMNS))
    predictions = _predictions(files)
    trials = join_predictions(_order_columns(trials, TRIAL_COLUMNS), predictions)
    return SweepResults(
        path=shown if "://" in shown else str(Path(shown).resolve()),
        trials=_numeric(_order_columns(trials, TRIAL_COLUMNS)),
        steps=_steps_frame(frames),
        max_batch=_max_batch(files),
        predictions=predictions,
    )


def combine(parts: list[SweepResults]) -> SweepResults:
    """Several experiments as one (e.g. max-batch searches under different GPU memory limits, or a sweep and its
    search); `trials.experiment`, `max_batch.experiment` and `predictions.experiment` name where a row came from."""
    if not parts:
        raise AnalysisError("combine: no experiments given")
    if len(parts) == 1:
        return parts[0]

    def stacked(frames: list[pd.DataFrame], columns: tuple[str, ...] = ()) -> pd.DataFrame:
        frames = [f for f in frames if not f.empty]
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*columns, "experiment"])
        return _order_columns(frame, columns) if columns else frame

    trials = stacked([r.trials.assign(experiment=r.name) for r in parts], TRIAL_COLUMNS)
    if trials["trial_id"].duplicated().any():  # Tune's ids are random per experiment; a clash would merge steps
        raise AnalysisError("combine: two experiments share a trial id (the same experiment given twice?)")
    steps = stacked([r.steps for r in parts])
    return SweepResults(
        path=" + ".join(r.path for r in parts),
        trials=_numeric(trials),
        steps=steps if not steps.empty else _steps_frame([]),
        max_batch=stacked([r.max_batch.assign(experiment=r.name) for r in parts], MAX_BATCH_RECORD_KEYS),
        predictions=stacked([r.predictions.assign(experiment=r.name) for r in parts], PREDICTION_COLUMNS),
    )


def load_many(paths: list[str | os.PathLike]) -> SweepResults:
    """`load` each path and `combine` them."""
    return combine([load(p) for p in paths])


__all__ = ["AnalysisError", "BREAKDOWN_KEYS", "NUMERIC_COLUMNS", "PREDICTION_COLUMNS", "SweepResults",
           "TRIAL_COLUMNS", "WARMUP_STEPS", "combine", "join_predictions", "load", "load_many", "step_rows"]
