"""Running a grid on Ray Tune: connecting, param_space, naming, resources, resume.

The param space is flat (every switch is a Tune config column): one `tune.grid_search` over trial
names picks the grid point, and every switch that differs between points is a `tune.sample_from`
lookup into the validated grid, so filtered, non-product grids stay a single grid search.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from .grid import SweepError, trial_name

GRID_KEY = "trial_name"  # the grid-search key; stripped before the config reaches TrialConfig


# -- storage -------------------------------------------------------------------------------------
def is_uri(path: str) -> bool:
    return "://" in str(path)


def resolve_storage(storage_path: str | os.PathLike) -> str:
    """Local storage as an absolute path (Tune needs one); URIs (s3://, gs://) unchanged."""
    return str(storage_path) if is_uri(str(storage_path)) else str(Path(storage_path).expanduser().resolve())


def experiment_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def default_name(prefix: str) -> str:
    return f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"


def latest_experiment(storage: str) -> str | None:
    """Name of the most recently written Tune experiment under a local storage path."""
    if is_uri(storage) or not Path(storage).is_dir():
        return None
    runs = [p for p in Path(storage).iterdir() if p.is_dir() and any(p.glob("experiment_state-*.json"))]
    return max(runs, key=lambda p: p.stat().st_mtime).name if runs else None


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON so readers never see half a file: local temp + rename, or one object-store put."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    if not is_uri(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, target)
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode())


def read_json(path: str) -> Any:
    """JSON from a local path or a storage URI; None when the file is not there."""
    if not is_uri(path):
        return json.loads(Path(path).read_text()) if Path(path).is_file() else None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as stream:
        return json.loads(stream.readall().decode())


# -- ray -----------------------------------------------------------------------------------------
def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def local_gpus() -> int:
    """GPUs a local Ray instance would see; checked before starting Ray so a doomed run fails fast."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable torch CUDA: no GPUs for us either
        return 0


def trial_resources(use_gpu: bool, cpus_per_trial: int | None) -> dict[str, float]:
    """One GPU per trial plus a share of the node's CPUs for data loading; CPU trials get CPUs only."""
    if use_gpu:
        share = cpus_per_trial or max(1, min(8, cluster_cpus() // max(1, cluster_gpus())))
        return {"gpu": 1, "cpu": share}
    return {"cpu": cpus_per_trial or 1}


# -- the trainable and its naming ------------------------------------------------------------------
def sweep_trainable(config: dict[str, Any]) -> None:
    """`trainable.tune_trainable` on the grid point, minus the grid-search key."""
    from trainable import tune_trainable

    return tune_trainable({k: v for k, v in config.items() if k != GRID_KEY})


def name_trial(trial) -> str:
    """Tune naming hook: `bf16_flash_bs64` (trial name and directory)."""
    config = trial.config
    if GRID_KEY in config:
        return str(config[GRID_KEY])
    try:
        return trial_name(config)
    except Exception:  # not a trial config: keep Tune's default-like name
        return f"trial_{trial.trial_id}"


class _GridLookup:
    """`tune.sample_from` body: the value of one switch at the grid point picked by GRID_KEY."""

    def __init__(self, table: dict[str, dict[str, Any]], key: str):
        self.table, self.key = table, key

    def __call__(self, config: dict[str, Any]) -> Any:
        return self.table[config[GRID_KEY]][self.key]


def param_space(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """Flat param space: grid search over trial names, constants as values, the rest looked up."""
    from ray import tune

    table = {trial_name(point): point for point in grid}
    keys = list(grid[0])
    space: dict[str, Any] = {GRID_KEY: tune.grid_search(list(table))}
    for key in keys:
        values = {json.dumps(point.get(key), sort_keys=True) for point in grid}
        space[key] = grid[0][key] if len(values) == 1 else tune.sample_from(_GridLookup(table, key))
    return space


# -- results -------------------------------------------------------------------------------------
def summary_rows(results) -> list[dict[str, Any]]:
    """One plain row per trial from a ResultGrid (the fallback when `analysis` is unavailable)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        peak = None
        if history is not None and "mem_step_peak_mib" in history:
            peak = history["mem_step_peak_mib"].max()
        tps = None
        if history is not None and "tokens_per_s" in history and len(history):
            tps = history["tokens_per_s"].iloc[len(history) // 2:].median()
        status = "error" if result.error is not None else metrics.get("status", "incomplete")
        rows.append({
            "trial": (result.config or {}).get(GRID_KEY) or metrics.get("technique", "?"),
            "status": status,
            "steps": metrics.get("step"),
            "peak_mem_mib": peak,
            "tokens_per_s": tps,
            "val_ppl": metrics.get("val_ppl"),
        })
    return sorted(rows, key=lambda r: str(r["trial"]))


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain fixed-width table."""
    if not rows:
        return "(no trials)"
    cols = list(rows[0])

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and v != v):
            return "-"
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def check_fresh_name(storage: str, name: str) -> None:
    path = experiment_path(storage, name)
    if not is_uri(path) and Path(path).exists():
        raise SweepError(f"{path} already exists: pass --resume to continue it, or choose another --name")
