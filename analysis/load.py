"""Load a sweep's Ray Tune experiment directory into pandas DataFrames.

Reads through Ray Tune's own result API (`ExperimentAnalysis` + `ResultGrid`), which needs neither the
trainable nor a running Ray cluster, so it works on a laptop, on finished or interrupted experiments, and on
remote storage (any URI pyarrow understands). Never imports `trainable`, `sweep` or `data_prep`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# A trial's first steps include CUDA context set-up, kernel autotuning, allocator growth and torch.compile work.
# The trainable flags those steps (`warmup`: the first step of each process and every step that compiled); speed
# (step time, tokens/s, MFU) is the median over the steps without the flag. Experiments from before the flag fall
# back to skipping the first WARMUP_STEPS steps (never more than half of them); `speed_rule` says which applied.
WARMUP_STEPS = 3
SPEED_RULE_FLAG = "warmup_flag"
SPEED_RULE_SKIP = f"skip_first_{WARMUP_STEPS}"

# Trials a max-batch search ran are short probes named `probe_<label>_bsN`; `kind` tells them from training trials.
PROBE_PREFIX = "probe_"

# Keys Tune adds to every report; they are bookkeeping, not measurements, and are left out of `steps`.
TUNE_BOOKKEEPING = (
    "checkpoint_dir_name", "done", "date", "pid", "hostname", "node_ip", "time_since_restore",
    "iterations_since_restore", "experiment_tag", "time_this_iter_s",
)

# Labels the trainable gives its FP32/TF32 reference preset; savings and speed-ups are measured against it.
BASELINE_LABELS = ("baseline", "fp32", "tf32")

MAX_BATCH_FILE = "max_batch.json"

# Leading columns of `trials`, in report order; every other config switch and run fact follows them.
TRIAL_COLUMNS = (
    "trial_id", "name", "kind", "technique", "preset", "precision", "attention", "window", "checkpointing",
    "batch_size", "status", "attention_kernel", "dtype", "tf32", "gpu_name", "device", "seq_len", "steps_reported",
    "final_loss", "val_loss", "val_ppl", "peak_mem_mib", "fwd_peak_mean_mib", "fwd_peak_max_mib",
    "bwd_peak_mean_mib", "bwd_peak_max_mib", "opt_peak_mean_mib", "opt_peak_max_mib", "allocated_max_mib",
    "reserved_mib", "step_time_median_s", "tokens_per_s", "mfu", "speed_rule", "speed_warmup_steps",
    "steady_tokens_per_s", "steady_mfu", "compile_time_s", "compile", "loss_fn", "train_time_s", "num_params",
    "model_flops_per_token", "peak_flops", "gpu_memory_limit_gb", "gpu_total_mib", "oom_phase", "oom_mem_peak_mib",
    "oom_message", "error", "tune_status", "path",
)


class AnalysisError(ValueError):
    """A path that cannot be analysed; the message is one line meant for the user."""


@dataclass
class SweepResults:
    """Everything a sweep produced, as DataFrames.

    trials:    one row per trial (status `ok` | `oom` | `error` | `incomplete`; `incomplete` = interrupted
               or still pending: no final report and no error); `kind` is `train`, or `probe` for the short
               trials of a max-batch search.
    steps:     long-format per-step history: trial_id, name and every key the trial reported.
    max_batch: the max-batch search records (empty when the sweep ran no search).
    """

    path: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    max_batch: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return os.path.basename(self.path.rstrip("/")) or self.path

    @property
    def probes(self) -> pd.DataFrame:
        """The max-batch search's probe trials (empty for a plain sweep)."""
        return self.trials[self.trials["kind"] == "probe"]

    def training(self) -> SweepResults:
        """These results without the probe trials: what the comparison tables and plots 1-7 compare."""
        keep = self.trials["kind"] != "probe"
        trials = self.trials[keep]
        steps = self.steps[self.steps["trial_id"].isin(trials["trial_id"])] if "trial_id" in self.steps else self.steps
        return SweepResults(path=self.path, trials=trials, steps=steps, max_batch=self.max_batch)


def load(path: str | os.PathLike) -> SweepResults:
    """Load the Tune experiment at `path` (local directory or storage URI, e.g. `s3://bucket/sweeps/run1`)."""
    grid, trials = _open_experiment(str(path))
    trial_rows, step_frames = [], []
    for trial, result in sorted(zip(trials, grid), key=lambda tr: tr[0].trial_id):
        history = _reported_history(result.metrics_dataframe)
        row = _trial_row(trial, result, history)
        trial_rows.append(row)
        if not history.empty:
            step_frames.append(history.assign(trial_id=row["trial_id"], name=row["name"]))
    return SweepResults(
        path=str(path) if "://" in str(path) else str(Path(path).resolve()),
        trials=_numeric(_order_columns(pd.DataFrame(trial_rows), TRIAL_COLUMNS)),
        steps=_steps_frame(step_frames),
        max_batch=_read_max_batch(grid),
    )


def combine(parts: list[SweepResults]) -> SweepResults:
    """Several experiments as one (e.g. max-batch searches under different GPU memory limits, or a sweep and its
    search); `trials.experiment` and `max_batch.experiment` name where each row came from."""
    if not parts:
        raise AnalysisError("combine: no experiments given")
    if len(parts) == 1:
        return parts[0]

    def stacked(frames: list[pd.DataFrame]) -> pd.DataFrame:
        frames = [f for f in frames if not f.empty]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    tagged = [(r.name, r) for r in parts]
    trials = stacked([r.trials.assign(experiment=name) for name, r in tagged])
    if trials["trial_id"].duplicated().any():  # Tune's ids are random per experiment; a clash would merge steps
        raise AnalysisError("combine: two experiments share a trial id (the same experiment given twice?)")
    steps = stacked([r.steps for _, r in tagged])
    return SweepResults(
        path=" + ".join(r.path for r in parts),
        trials=_order_columns(trials, TRIAL_COLUMNS),
        steps=steps if not steps.empty else _steps_frame([]),
        max_batch=stacked([r.max_batch.assign(experiment=name) for name, r in tagged]),
    )


def load_many(paths: list[str | os.PathLike]) -> SweepResults:
    """`load` each path and `combine` them."""
    return combine([load(p) for p in paths])


def _open_experiment(path: str):
    """ResultGrid over the experiment's saved state, without the trainable and without `ray.init`."""
    is_uri = "://" in path
    if not is_uri and not Path(path).is_dir():
        raise AnalysisError(f"{path}: no such directory (expected a Ray Tune experiment directory STORAGE/NAME)")
    shown = path
    if not is_uri:  # Ray's filesystem layer reads a relative path as a URI without a scheme
        path = str(Path(path).resolve())
    from ray.tune import ExperimentAnalysis, ResultGrid

    try:
        try:
            analysis = _analysis_without_user_code(path)
        except AnalysisError:
            raise
        except Exception:  # a Ray whose saved-state layout differs: its own loader (may import the sweep's code)
            analysis = ExperimentAnalysis(path)
    except AnalysisError:
        raise
    except Exception as exc:  # Tune raises ValueError/OSError/pickling errors; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "experiment snapshot file" in first or "No experiment" in first:
            first = "no experiment_state-*.json found"
        raise AnalysisError(
            f"{shown}: not a Ray Tune experiment directory ({first}); pass the sweep's STORAGE/NAME directory"
        ) from None
    return ResultGrid(analysis), analysis.trials


# The saved state stores the sweep's own callables (trial_name_creator, ...) cloudpickled by reference;
# Ray's loader would import `sweep` (and through it `trainable` and torch) just to restore them.
_PICKLED = "CLOUDPICKLE_FALLBACK"
_RAY_PICKLED_FIELDS = ("storage",)  # Ray's own StorageContext: needed, and imports only Ray


def _analysis_without_user_code(path: str):
    """`ExperimentAnalysis` over trials restored with the user-code fields dropped, as Ray's own
    `ExperimentAnalysis._load_trials` does otherwise; so a laptop without the sweep's code can read it."""
    from ray.train._internal.storage import get_fs_and_path
    from ray.tune import ExperimentAnalysis
    from ray.tune.execution.experiment_state import _find_newest_experiment_checkpoint
    from ray.tune.experiment import Trial

    fs, fs_path = get_fs_and_path(path)
    state_path = _find_newest_experiment_checkpoint(fs_path, fs=fs)
    if state_path is None:
        raise AnalysisError(f"{path}: not a Ray Tune experiment directory (no experiment_state-*.json found); "
                            "pass the sweep's STORAGE/NAME directory")
    with fs.open_input_stream(state_path) as stream:
        state = json.loads(stream.readall().decode("utf-8"))
    experiment_dir = Path(os.path.dirname(state_path))
    trials = []
    for trial_json, run_metadata in state["trial_data"]:
        fields = {key: value if key in _RAY_PICKLED_FIELDS else _without_pickles(value)
                  for key, value in json.loads(trial_json).items()}
        trial = Trial.from_json_state(json.dumps(fields), stub=True)
        trial.restore_run_metadata(run_metadata)
        storage = copy.copy(trial.storage)
        storage.storage_fs_path = experiment_dir.parent.as_posix()
        storage.storage_filesystem = fs
        storage.experiment_dir_name = experiment_dir.name
        trial.set_storage(storage)
        trials.append(trial)
    return ExperimentAnalysis(state_path, storage_filesystem=fs, trials=trials)


def _without_pickles(value: Any) -> Any:
    """JSON state with every cloudpickled object replaced by None (callables, custom config objects)."""
    if isinstance(value, dict):
        if value.get("_type") == _PICKLED:
            return None
        return {k: _without_pickles(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_pickles(v) for v in value]
    return value


def _reported_history(metrics: pd.DataFrame | None) -> pd.DataFrame:
    """What the trial reported, one row per report, without Tune's bookkeeping and config columns."""
    if metrics is None or metrics.empty:
        return pd.DataFrame()
    keep = [c for c in metrics.columns if not c.startswith("config/") and c not in TUNE_BOOKKEEPING]
    return metrics[keep].drop(columns=["trial_id"], errors="ignore").reset_index(drop=True)


def step_rows(history: pd.DataFrame) -> pd.DataFrame:
    """One row per completed training step.

    The final report repeats the last step (counted once) or, after an OOM, names the step that failed (not a
    completed step); a final report is a step only when it carries a step no earlier report had and is not an OOM.
    A trial restarted from a checkpoint reports the steps after that checkpoint twice: the later (resumed) run's
    report is the one that counts.
    """
    if history.empty or "step" not in history:
        return pd.DataFrame()
    rows = history[history["step"].notna()]
    is_final = rows["final"].eq(True) if "final" in rows else pd.Series(False, index=rows.index)
    is_oom = rows["oom"].eq(True) if "oom" in rows else pd.Series(False, index=rows.index)
    seen = set(rows.loc[~is_final, "step"])
    keep = ~is_final | (~is_oom & ~rows["step"].isin(seen))
    return rows[keep].drop_duplicates(subset="step", keep="last").sort_values("step")


def warmup_steps(num_steps: int) -> int:
    """How many leading steps the fallback speed rule skips."""
    return min(WARMUP_STEPS, num_steps // 2)


def speed_rows(steps: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """The steps speed is measured over, and the rule that chose them (None: no step to measure).

    Steps the trainable flagged `warmup: False` when it reports the flag; else all but the first WARMUP_STEPS.
    """
    if steps.empty:
        return steps, None
    if "warmup" in steps and steps["warmup"].notna().any():
        return steps[steps["warmup"].eq(False)], SPEED_RULE_FLAG  # NaN (flag missing on a step) is not False
    return steps.iloc[warmup_steps(len(steps)):], SPEED_RULE_SKIP


def _last(history: pd.DataFrame, key: str) -> Any:
    """The last reported value of `key` (None when never reported)."""
    if history.empty or key not in history:
        return None
    values = history[key].dropna()
    return _plain(values.iloc[-1]) if len(values) else None


def _stat(rows: pd.DataFrame, key: str, how: str) -> float | None:
    if rows.empty or key not in rows:
        return None
    values = pd.to_numeric(rows[key], errors="coerce").dropna()
    return float(getattr(values, how)()) if len(values) else None


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so rows hold plain values."""
    return value.item() if hasattr(value, "item") else value


def _status(trial, result, final: dict) -> str:
    if result.error is not None or trial.status == "ERROR":
        return "error"
    if final.get("oom") is True or final.get("status") == "oom":
        return "oom"
    if final.get("final") is True or final.get("status") == "ok":
        return "ok"
    return "incomplete"


def _error_line(error: BaseException | None) -> str | None:
    """`Type: message` of the exception the trial raised, not Ray's wrapper and traceback."""
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else ""
    return f"{type(cause).__name__}: {message}"[:500] if message else type(cause).__name__


def _flat_config(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in (config or {}).items():
        if isinstance(value, dict):
            flat.update(_flat_config(value, f"{prefix}{key}/"))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _trial_row(trial, result, history: pd.DataFrame) -> dict:
    """One trial's row: config switches, run facts, and aggregates over its per-step reports."""
    last = {k: _plain(v) for k, v in (result.metrics or {}).items() if not isinstance(v, dict)}
    finals = history[history["final"] == True] if "final" in history else pd.DataFrame()  # noqa: E712
    final = dict(last)
    if not finals.empty:
        final.update({k: _plain(v) for k, v in finals.iloc[-1].dropna().items()})
    steps = step_rows(history)
    tokens, speed_rule = speed_rows(steps)

    row: dict[str, Any] = dict(_flat_config(trial.config))
    row["preset"] = row.get("technique")  # the config's named preset; `technique` becomes the reported label
    for fact in ("technique", "precision", "attention", "window", "checkpointing", "batch_size", "attention_kernel",
                 "dtype", "tf32", "gpu_name", "device", "seq_len", "num_params", "gpu_memory_limit_gb",
                 "gpu_total_mib", "torch_version", "cuda_version", "compile", "loss_fn", "model_flops_per_token",
                 "peak_flops"):
        reported = _last(history, fact)
        if reported is None:
            reported = final.get(fact)
        if reported is not None:
            row[fact] = reported
    status = _status(trial, result, final)
    row.update(
        trial_id=trial.trial_id,
        status=status,
        steps_reported=int(len(steps)),
        final_loss=_last(steps, "loss"),
        val_loss=final.get("val_loss") if final.get("val_loss") is not None else _last(history, "val_loss"),
        val_ppl=final.get("val_ppl") if final.get("val_ppl") is not None else _last(history, "val_ppl"),
        peak_mem_mib=_stat(history, "mem_step_peak_mib", "max"),
        fwd_peak_mean_mib=_stat(steps, "mem_fwd_peak_mib", "mean"),
        fwd_peak_max_mib=_stat(history, "mem_fwd_peak_mib", "max"),
        bwd_peak_mean_mib=_stat(steps, "mem_bwd_peak_mib", "mean"),
        bwd_peak_max_mib=_stat(history, "mem_bwd_peak_mib", "max"),
        opt_peak_mean_mib=_stat(steps, "mem_opt_peak_mib", "mean"),
        opt_peak_max_mib=_stat(history, "mem_opt_peak_mib", "max"),
        allocated_max_mib=_stat(history, "mem_allocated_mib", "max"),
        reserved_mib=_stat(history, "mem_reserved_mib", "max"),
        step_time_median_s=_stat(tokens, "step_time_s", "median"),
        tokens_per_s=_stat(tokens, "tokens_per_s", "median"),
        mfu=_stat(tokens, "mfu", "median"),
        speed_rule=speed_rule,
        speed_warmup_steps=int(len(steps) - len(tokens)),
        steady_tokens_per_s=_final_or_last(final, history, "steady_tokens_per_s"),
        steady_mfu=_final_or_last(final, history, "steady_mfu"),
        compile_time_s=_final_or_last(final, history, "compile_time_s"),
        train_time_s=final.get("train_time_s"),
        oom_phase=final.get("oom_phase") if status == "oom" else None,
        oom_mem_peak_mib=final.get("oom_mem_peak_mib") if status == "oom" else None,
        oom_message=final.get("oom_message") if status == "oom" else None,
        error=_error_line(result.error),
        tune_status=trial.status,
        path=str(result.path),
    )
    tune_name = str(trial)
    row["kind"] = "probe" if tune_name.startswith(PROBE_PREFIX) else "train"
    if _last(history, "technique") is None:  # never reported: the label is in Tune's name, not in the config
        row["technique"] = _label_from_tune_name(tune_name, row.get("batch_size")) or row.get("technique")
    row["name"] = _trial_name(tune_name, row)
    return row


def _final_or_last(final: dict, history: pd.DataFrame, key: str) -> Any:
    value = final.get(key)
    return value if value is not None else _last(history, key)


def _label_from_tune_name(tune_name: str, batch_size: Any) -> str | None:
    """`bf16_window16` from `probe_bf16_window16_bs263` (the sweep's naming), None for other names."""
    if batch_size is None or _isnan(batch_size):
        return None
    suffix = f"_bs{int(batch_size)}"
    label = tune_name.removeprefix(PROBE_PREFIX)
    return label.removesuffix(suffix) if label.endswith(suffix) and len(label) > len(suffix) else None


def _trial_name(tune_name: str, row: dict) -> str:
    """`label_bsN` (probes: `probe_label_bsN`) from what the trial reported; Tune's own name when it never said."""
    technique, batch_size = row.get("technique"), row.get("batch_size")
    if technique is not None and batch_size is not None and not _isnan(batch_size):
        return f"{PROBE_PREFIX if row['kind'] == 'probe' else ''}{technique}_bs{int(batch_size)}"
    return tune_name


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _order_columns(frame: pd.DataFrame, leading: tuple[str, ...]) -> pd.DataFrame:
    for column in leading:
        if column not in frame:
            frame[column] = None
    return frame[list(leading) + sorted(c for c in frame.columns if c not in leading)]


NUMERIC_COLUMNS = (
    "batch_size", "window", "seq_len", "steps_reported", "final_loss", "val_loss", "val_ppl", "peak_mem_mib",
    "fwd_peak_mean_mib", "fwd_peak_max_mib", "bwd_peak_mean_mib", "bwd_peak_max_mib", "opt_peak_mean_mib",
    "opt_peak_max_mib", "allocated_max_mib", "reserved_mib", "step_time_median_s", "tokens_per_s", "mfu",
    "speed_warmup_steps", "steady_tokens_per_s", "steady_mfu", "compile_time_s", "train_time_s", "num_params",
    "model_flops_per_token", "peak_flops", "gpu_memory_limit_gb", "gpu_total_mib", "oom_mem_peak_mib",
)


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    """Measurement columns as numbers (NaN where absent), so they sort, plot and aggregate."""
    for column in NUMERIC_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _steps_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    if not frames:
        return pd.DataFrame(columns=["trial_id", "name", "step"])
    steps = pd.concat(frames, ignore_index=True)
    leading = ["trial_id", "name"] + [c for c in ("step", "training_iteration") if c in steps]
    return steps[leading + [c for c in steps.columns if c not in leading]]


def _read_max_batch(grid) -> pd.DataFrame:
    """max_batch.json next to the experiment state, read through the experiment's own filesystem."""
    import pyarrow.fs

    fs, file_path = grid.filesystem, f"{str(grid.experiment_path).rstrip('/')}/{MAX_BATCH_FILE}"
    if "://" in file_path:  # experiment_path is a URI; the filesystem wants the path inside it
        file_path = file_path.split("://", 1)[1]
    if fs.get_file_info(file_path).type != pyarrow.fs.FileType.File:
        return pd.DataFrame()
    with fs.open_input_stream(file_path) as stream:
        try:
            records = json.loads(stream.readall().decode("utf-8"))
        except json.JSONDecodeError as exc:
            raise AnalysisError(f"{file_path}: not valid JSON ({exc})") from None
    if not isinstance(records, list):
        raise AnalysisError(f"{file_path}: expected a list of max-batch records")
    return pd.DataFrame(records)
