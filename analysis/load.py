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

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from contract.experiment import GRID_KEY, KIND_KEY, MAX_BATCH_FILE, MAX_BATCH_RECORD_KEYS, PREDICTIONS_FILE
from contract.io import error_line
from contract.keys import keys_of

# A trial's first steps include CUDA context set-up, kernel autotuning, allocator growth and torch.compile work.
# The trainable flags those steps (`warmup`); speed (step time, tokens/s, MFU) is the median over the steps without
# the flag. Reports without the flag fall back to skipping the first WARMUP_STEPS steps (never more than half).
WARMUP_STEPS = 3
SPEED_RULE_FLAG = "warmup_flag"
SPEED_RULE_SKIP = f"skip_first_{WARMUP_STEPS}"

# Keys Tune adds to every report: bookkeeping, not measurements (left out of `steps`).
TUNE_BOOKKEEPING = ("checkpoint_dir_name", "done", "date", "pid", "hostname", "node_ip", "time_since_restore",
                    "iterations_since_restore", "experiment_tag", "time_this_iter_s", "timestamp", "trial_id",
                    "config", "should_checkpoint")

# What analysis computes from a trial's reports (the rest of a row is its config and the contract's keys).
AGGREGATES = (
    "steps_reported", "final_loss", "peak_mem_mib", "fwd_peak_mean_mib", "fwd_peak_max_mib", "bwd_peak_mean_mib",
    "bwd_peak_max_mib", "opt_peak_mean_mib", "opt_peak_max_mib", "allocated_max_mib", "reserved_mib",
    "step_time_median_s", "tokens_per_s", "mfu", "speed_rule", "speed_warmup_steps",
)
IDENTITY = ("trial_id", "name", "kind", "technique", "label", "family", "status")
SWITCHES = ("precision", "attention", "window", "checkpointing", "loss", "compile", "batch_size", "seq_len")
FINAL_TOTALS = tuple(k for k in keys_of("final") if k not in ("final", "status"))
EXTRA = ("val_loss", "val_ppl", "compile_time_s", "gpu_memory_gb", *keys_of("oom"), "error", "tune_status", "num_failures", "path")
# Leading columns of `trials`, in report order; every other config value follows them.
TRIAL_COLUMNS = tuple(dict.fromkeys((*IDENTITY, *SWITCHES, "attention_kernel", "dtype", "tf32", "gpu_name", "device",
                                     *AGGREGATES, *FINAL_TOTALS, *keys_of("fact"), *EXTRA)))
NUMERIC_COLUMNS = tuple(dict.fromkeys((
    "window", "batch_size", "seq_len", "steps_reported", "final_loss", "peak_mem_mib", "fwd_peak_mean_mib",
    "fwd_peak_max_mib", "bwd_peak_mean_mib", "bwd_peak_max_mib", "opt_peak_mean_mib", "opt_peak_max_mib",
    "allocated_max_mib", "reserved_mib", "step_time_median_s", "tokens_per_s", "mfu", "speed_warmup_steps",
    *FINAL_TOTALS, "compile_time_s", "num_params", "model_flops_per_token", "peak_flops", "gpu_memory_gb", "gpu_total_mib",
    "oom_mem_peak_mib", "val_loss", "val_ppl", "num_failures")))


class AnalysisError(ValueError):
    """A path that cannot be analysed; the message is one line meant for the user."""


@dataclass
class SweepResults:
    """Everything a sweep produced, as DataFrames.

    trials:      one row per trial (status `ok` | `oom` | `nan` | `error` | `incomplete`; `incomplete` =
                 interrupted or still pending: no final report and no error); `kind` is `train`, or `probe`
                 for the short trials of a max-batch search; `technique` is the named preset, `label` the
                 technique derived from the switches (`bf16_window16`).
    steps:       per-step history: trial_id, name and every key the trial reported, each step once (a trial
                 restarted from a checkpoint reports the steps after it again: the latest attempt is kept).
    max_batch:   the max-batch search records (no rows when the sweep ran no search; the columns are there).
    predictions: the memory model's predicted peaks the sweep wrote (`scope` trial: the trials' own configs
                 on a CUDA GPU; `seed_grid`: the seed grid on named GPUs); no rows when there are none.
    """

    path: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    max_batch: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MAX_BATCH_RECORD_KEYS)))
    predictions: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or self.path

    @property
    def probes(self) -> pd.DataFrame:
        """The max-batch search's probe trials (empty for a plain sweep)."""
        return self.trials[self.trials["kind"] == "probe"]

    def training(self) -> SweepResults:
        """These results without the probe trials: what the comparison tables and plots 1-7 compare."""
        trials = self.trials[self.trials["kind"] != "probe"]
        steps = self.steps[self.steps["trial_id"].isin(trials["trial_id"])]
        return SweepResults(self.path, trials, steps, self.max_batch, self.predictions)


# -- reading plain files ------------------------------------------------------------------------------
class _Files:
    """Reads files of one experiment directory, local or remote, through one pyarrow filesystem."""

    def __init__(self, path: str):
        import pyarrow.fs

        self._fs_module = pyarrow.fs
        if "://" in path:
            try:
                self.fs, self.root = pyarrow.fs.FileSystem.from_uri(path)
            except (OSError, ValueError) as exc:
                raise AnalysisError(f"{path}: cannot open ({str(exc).splitlines()[0][:160]})") from None
        else:
            self.fs, self.root = pyarrow.fs.LocalFileSystem(), str(Path(path).resolve())
        self.root = self.root.rstrip("/")

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/{rel}").type == self._fs_module.FileType.File

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.root).type == self._fs_module.FileType.Directory

    def read(self, rel: str) -> str | None:
        if not self.exists(rel):
            return None
        with self.fs.open_input_stream(f"{self.root}/{rel}") as stream:
            return stream.readall().decode("utf-8", errors="replace")

    def listdir(self) -> list[str]:
        selector = self._fs_module.FileSelector(self.root, recursive=False)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))


def _newest_state(files: _Files, shown: str) -> dict:
    """The newest experiment_state-*.json that parses (a damaged newer one is skipped, as --resume does)."""
    states = [n for n in files.listdir() if n.startswith("experiment_state-") and n.endswith(".json")]
    if not states:
        raise AnalysisError(f"{shown}: not a Ray Tune experiment directory (no experiment_state-*.json found); "
                            "pass the sweep's STORAGE/NAME directory")
    for name in reversed(states):
        try:
            state = json.loads(files.read(name) or "")
        except ValueError:
            continue
        if isinstance(state, dict) and isinstance(state.get("trial_data"), list):
            return state
    raise AnalysisError(f"{shown}: every experiment_state-*.json is damaged")


@dataclass
class _Trial:
    trial_id: str
    status: str
    logdir: str
    config: dict
    num_failures: int


def _trials(state: dict) -> list[_Trial]:
    trials = []
    for trial_json, run_metadata in state["trial_data"]:
        t = json.loads(trial_json) if isinstance(trial_json, str) else trial_json
        meta = json.loads(run_metadata) if isinstance(run_metadata, str) else (run_metadata or {})
        config = t.get("config") if isinstance(t.get("config"), dict) else {}
        trials.append(_Trial(str(t.get("trial_id")), str(t.get("status")), str(t.get("relative_logdir") or ""),
                             config, int(meta.get("num_failures") or 0)))
    return sorted(trials, key=lambda tr: tr.trial_id)


def _history(files: _Files, trial: _Trial) -> pd.DataFrame:
    """What the trial reported, one row per report, without Tune's bookkeeping."""
    text = files.read(f"{trial.logdir}/result.json") if trial.logdir else None
    rows = []
    for line in (text or "").splitlines():
        try:
            report = json.loads(line)
        except ValueError:  # a line cut short by a kill: the reports before it stand
            continue
        if isinstance(report, dict):
            rows.append({k: v for k, v in report.items() if k not in TUNE_BOOKKEEPING})
    return pd.DataFrame(rows)


def step_rows(history: pd.DataFrame) -> pd.DataFrame:
    """One row per completed training step, the latest attempt of each (an OOM's final report names the step
    that failed, not a completed one, and is left out)."""
    if history.empty or "step" not in history:
        return pd.DataFrame()
    rows = history[history["step"].notna()]
    if "oom" in rows:
        rows = rows[~rows["oom"].eq(True)]
    return rows.drop_duplicates(subset="step", keep="last").sort_values("step")


def _each_step_once(history: pd.DataFrame) -> pd.DataFrame:
    """The history with each step once: the latest report of it (a restart re-reports steps after its checkpoint)."""
    if history.empty or "step" not in history:
        return history
    return history.drop_duplicates(subset="step", keep="last").sort_values("step", kind="stable")


def warmup_steps(num_steps: int) -> int:
    """How many leading steps the fallback speed rule skips."""
    return min(WARMUP_STEPS, num_steps // 2)


def speed_rows(steps: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The steps speed is measured over, and the rule that chose them (None: no step to measure)."""
    if steps.empty:
        return steps, None
    if "warmup" in steps and steps["warmup"].notna().any():
        return steps[steps["warmup"].eq(False)], SPEED_RULE_FLAG  # NaN (flag missing on a step) is not False
    return steps.iloc[warmup_steps(len(steps)):], SPEED_RULE_SKIP


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _last(frame: pd.DataFrame, key: str) -> Any:
    if frame.empty or key not in frame:
        return None
    values = frame[key].dropna()
    return _plain(values.iloc[-1]) if len(values) else None


def _stat(rows: pd.DataFrame, key: str, how: str) -> float | None:
    if rows.empty or key not in rows:
        return None
    values = pd.to_numeric(rows[key], errors="coerce").dropna()
    return float(getattr(values, how)()) if len(values) else None


def _status(tune_status: str, error: str | None, final: dict) -> str:
    if error is not None or tune_status == "ERROR":
        return "error"
    if final.get("final") is True and final.get("status") in ("ok", "oom", "nan"):
        return final["status"]
    return "incomplete"


def _aggregates(history: pd.DataFrame) -> dict[str, Any]:
    steps = step_rows(history)
    speed, rule = speed_rows(steps)
    memory = history  # an OOM's final report holds the memory at failure: part of the max
    return {
        "steps_reported": int(len(steps)), "final_loss": _last(steps, "loss"),
        "peak_mem_mib": _stat(memory, "mem_step_peak_mib", "max"),
        "fwd_peak_mean_mib": _stat(steps, "mem_fwd_peak_mib", "mean"),
        "fwd_peak_max_mib": _stat(memory, "mem_fwd_peak_mib", "max"),
        "bwd_peak_mean_mib": _stat(steps, "mem_bwd_peak_mib", "mean"),
        "bwd_peak_max_mib": _stat(memory, "mem_bwd_peak_mib", "max"),
        "opt_peak_mean_mib": _stat(steps, "mem_opt_peak_mib", "mean"),
        "opt_peak_max_mib": _stat(memory, "mem_opt_peak_mib", "max"),
        "allocated_max_mib": _stat(memory, "mem_allocated_mib", "max"),
        "reserved_mib": _stat(memory, "mem_reserved_mib", "max"),
        "step_time_median_s": _stat(speed, "step_time_s", "median"), "tokens_per_s": _stat(speed, "tokens_per_s", "median"),
        "mfu": _stat(speed, "mfu", "median"), "speed_rule": rule, "speed_warmup_steps": int(len(steps) - len(speed)),
    }


def _trial_row(files: _Files, trial: _Trial, history: pd.DataFrame) -> dict[str, Any]:
    """One trial's row: its config, the facts it reported, its final report, and aggregates of its steps."""
    finals = history[history["final"].eq(True)] if "final" in history else pd.DataFrame()
    final = {k: _plain(v) for k, v in finals.iloc[-1].dropna().items()} if not finals.empty else {}
    error_text = files.read(f"{trial.logdir}/error.txt") if trial.logdir else None
    error = error_line(error_text) if error_text else None
    row: dict[str, Any] = {k: v for k, v in trial.config.items() if not isinstance(v, (dict, list))}
    row.update({k: _last(history, k) for k in keys_of("fact")})
    row.update({k: final.get(k) for k in (*FINAL_TOTALS, *keys_of("oom"))})
    row.update(_aggregates(history))
    row.update(
        trial_id=trial.trial_id, name=trial.config.get(GRID_KEY) or trial.logdir or trial.trial_id,
        kind=trial.config.get(KIND_KEY, "train"), status=_status(trial.status, error, final),
        val_loss=final.get("val_loss", _last(history, "val_loss")), val_ppl=final.get("val_ppl", _last(history, "val_ppl")),
        compile_time_s=final.get("compile_time_s", _last(history, "compile_time_s")),
        error=error, tune_status=trial.status, num_failures=trial.num_failures,
        path=f"{files.root}/{trial.logdir}" if trial.logdir else None,
    )
    row.pop(GRID_KEY, None)
    row.pop(KIND_KEY, None)
    if row.get("label") is None:  # a trial that never reported: its label from its config
        from contract.techniques import technique_family, technique_label

        if "precision" in trial.config:
            row["label"], row["family"] = technique_label(trial.config), technique_family(trial.config)
    return row


def _order_columns(frame: pd.DataFrame, leading: tuple[str, ...]) -> pd.DataFrame:
    for column in leading:
        if column not in frame:
            frame[column] = None
    return frame[list(leading) + sorted(c for c in frame.columns if c not in leading)]


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """Measurement columns as numbers (NaN where absent), so they sort, plot and aggregate."""
    for column in NUMERIC_COLUMNS:
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _steps_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=["trial_id", "name", "step"])
    steps = pd.concat(frames, ignore_index=True)
    leading = ["trial_id", "name"] + [c for c in ("step", "training_iteration") if c in steps]
    return steps[leading + [c for c in steps.columns if c not in leading]]


def _json_file(files: _Files, name: str) -> Any:
    text = files.read(name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnalysisError(f"{files.root}/{name}: not valid JSON ({exc})") from None


def _max_batch(files: _Files) -> pd.DataFrame:
    records = _json_file(files, MAX_BATCH_FILE)
    if records is None:
        return pd.DataFrame(columns=list(MAX_BATCH_RECORD_KEYS))
    if not isinstance(records, list):
        raise AnalysisError(f"{files.root}/{MAX_BATCH_FILE}: expected a list of max-batch records")
    return _order_columns(pd.DataFrame(records), MAX_BATCH_RECORD_KEYS)


def _predictions(files: _Files) -> pd.DataFrame:
    data = _json_file(files, PREDICTIONS_FILE)
    if not isinstance(data, dict):
        return pd.DataFrame()
    rows = [{**r, "scope": "trial"} for r in data.get("trials", [])]
    rows += [{**r, "scope": "seed_grid"} for r in data.get("seed_grid", [])]
    frame = pd.DataFrame(rows)
    if not frame.empty:
        frame["budget_source"] = data.get("budget")
    return frame


def load(path: str | os.PathLike) -> SweepResults:
    """Load the Tune experiment at `path` (local directory or storage URI, e.g. `s3://bucket/sweeps/run1`)."""
    shown = str(path)
    if "://" not in shown and not Path(shown).is_dir():
        raise AnalysisError(f"{shown}: no such directory (expected a Ray Tune experiment directory STORAGE/NAME)")
    files = _Files(shown)
    state = _newest_state(files, shown)
    rows, frames = [], []
    for trial in _trials(state):
        history = _history(files, trial)
        row = _trial_row(files, trial, history)
        rows.append(row)
        steps = _each_step_once(history)
        if not steps.empty:
            frames.append(steps.assign(trial_id=row["trial_id"], name=row["name"]))
    trials = pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(TRIAL_COLUMNS))
    return SweepResults(
        path=shown if "://" in shown else str(Path(shown).resolve()),
        trials=_numeric(_order_columns(trials, TRIAL_COLUMNS)),
        steps=_steps_frame(frames),
        max_batch=_max_batch(files),
        predictions=_predictions(files),
    )


def combine(parts: list[SweepResults]) -> SweepResults:
    """Several experiments as one (e.g. max-batch searches under different GPU memory limits, or a sweep and its
    search); `trials.experiment` and `max_batch.experiment` name where each row came from."""
    if not parts:
        raise AnalysisError("combine: no experiments given")
    if len(parts) == 1:
        return parts[0]

    def stacked(frames: list[pd.DataFrame], columns: tuple[str, ...] = ()) -> pd.DataFrame:
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(columns))

    trials = stacked([r.trials.assign(experiment=r.name) for r in parts], TRIAL_COLUMNS)
    if trials["trial_id"].duplicated().any():  # Tune's ids are random per experiment; a clash would merge steps
        raise AnalysisError("combine: two experiments share a trial id (the same experiment given twice?)")
    steps = stacked([r.steps for r in parts])
    return SweepResults(
        path=" + ".join(r.path for r in parts),
        trials=_order_columns(trials, TRIAL_COLUMNS),
        steps=steps if not steps.empty else _steps_frame([]),
        max_batch=stacked([r.max_batch.assign(experiment=r.name) for r in parts], MAX_BATCH_RECORD_KEYS),
        predictions=stacked([r.predictions.assign(experiment=r.name) for r in parts]),
    )


def load_many(paths: list[str | os.PathLike]) -> SweepResults:
    """`load` each path and `combine` them."""
    return combine([load(p) for p in paths])


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
