"""Running a grid on Ray Tune: param_space, trial names, resources, storage paths, this node's GPUs.

The param space is flat (every switch is a Tune config column): one `tune.grid_search` over trial
names picks the grid point, and every switch that differs between points is a `tune.sample_from`
lookup into the validated grid, so filtered, non-product grids stay a single grid search. Nothing here
imports torch: the driver only schedules.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

from contract.experiment import GRID_KEY, KIND_KEY, SWEEP_KEYS
from contract.io import is_uri

from .grid import grid_names


# -- storage -------------------------------------------------------------------------------------
def resolve_storage(storage_path: str | os.PathLike) -> str:
    """Local storage as an absolute path (Tune needs one); URIs (s3://, gs://) unchanged."""
    return str(storage_path) if is_uri(str(storage_path)) else str(Path(storage_path).expanduser().resolve())


def experiment_path(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def default_name(prefix: str) -> str:
    return f"{prefix}-{datetime.now():%Y%m%d-%H%M%S}"


# -- this node's GPUs, without torch -----------------------------------------------------------------
def local_gpus() -> int:
    """GPUs a local Ray instance would see (CUDA_VISIBLE_DEVICES, else nvidia-smi); 0 without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def largest_node(resource: str) -> float:
    """The most of `resource` (CPU, GPU) any one alive node has: a trial must fit on one node."""
    import ray

    return max((n["Resources"].get(resource, 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)


def trial_resources(use_gpu: bool, cpus_per_trial: int | None) -> dict[str, float]:
    """One GPU per trial plus a share of a node's CPUs for data loading; CPU trials get CPUs only."""
    if use_gpu:
        gpus = max(1.0, largest_node("GPU"))
        share = cpus_per_trial or max(1, min(8, int(largest_node("CPU") // gpus)))
        return {"gpu": 1, "cpu": share}
    return {"cpu": cpus_per_trial or 1}


# -- the trainable and its naming ------------------------------------------------------------------
def sweep_trainable(config: dict[str, Any]) -> None:
    """`trainable.forked_tune_trainable` on the grid point, minus the keys the sweep added: a fresh fork each."""
    from trainable.forked import forked_tune_trainable

    return forked_tune_trainable({k: v for k, v in config.items() if k not in SWEEP_KEYS})


def sweep_trainable_in_worker(config: dict[str, Any]) -> None:
    """`trainable.tune_trainable` on the grid point, minus the keys the sweep added: trains in the Tune worker."""
    from trainable import tune_trainable

    return tune_trainable({k: v for k, v in config.items() if k not in SWEEP_KEYS})


class NamedActor:
    """Mixed into Tune's class for `sweep_trainable`: its Ray actor is named after the trial.

    The dashboard (and `ray.util.state.list_actors()`'s `repr_name`) shows an actor's `repr()`, taken once
    its constructor has run; Tune's function trainable returns the function's name, so every trial would read
    `sweep_trainable`. The constructor runs `setup(config)` with the trial's Tune config, which holds the
    name the grid gave it (GRID_KEY). With --reuse-actors a reused actor keeps its first trial's name.
    """

    def setup(self, config: dict[str, Any]) -> None:
        self._name = str(config.get(GRID_KEY) or self._name)  # ImplicitFunc.__repr__ returns self._name
        super().setup(config)


# Tune's wrap_function puts these before FunctionTrainable
sweep_trainable.__mixins__ = sweep_trainable_in_worker.__mixins__ = (NamedActor,)
TRAINABLES = {"fork": sweep_trainable, "worker": sweep_trainable_in_worker}  # by SweepConfig.trial_process


def name_trial(trial) -> str:
    """Tune naming hook: the name the grid gave the point (trial name and directory)."""
    return str(trial.config.get(GRID_KEY) or f"trial_{trial.trial_id}")


class _GridLookup:
    """`tune.sample_from` body: the value of one switch at the grid point picked by GRID_KEY."""

    def __init__(self, table: dict[str, dict[str, Any]], key: str):
        self.table, self.key = table, key

    def __call__(self, config: dict[str, Any]) -> Any:
        return self.table[config[GRID_KEY]][self.key]


def param_space(grid: list[dict[str, Any]], kind: str = "train") -> dict[str, Any]:
    """Flat param space: grid search over trial names, constants as values, the rest looked up."""
    from ray import tune

    table = dict(zip(grid_names(grid), grid))
    space: dict[str, Any] = {GRID_KEY: tune.grid_search(list(table)), KIND_KEY: kind}
    for key in grid[0]:
        values = {json.dumps(point.get(key), sort_keys=True) for point in grid}
        space[key] = grid[0][key] if len(values) == 1 else tune.sample_from(_GridLookup(table, key))
    return space
