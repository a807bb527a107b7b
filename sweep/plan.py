"""Planning a sweep: the grid, its hardware, its data and where its results go, validated once, without Ray.

`plan_sweep(cfg, gpus)` builds the grid a `SweepConfig` asks for (each point validated by `TrialConfig`),
decides whether it needs GPUs, resolves the dataset (the shipped sample when none is given) and the
experiment's storage and name; `plan_resume(cfg)` rebuilds the plan of an interrupted sweep from the grid
it saved. `check_data(plan)` then checks the dataset against the grid (every shard hashed, once, before any
trial). Every problem is one `SweepError` line.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.experiment import GRID_FILE
from contract.io import first_line, is_uri, read_text
from trainable.dataset_check import check_fits, open_checked
from trainable.errors import ConfigError

from .config import SweepConfig, check_name
from .errors import SweepError
from .grid import PRESETS, build_grid, grid_axes, grid_names
from .resume_state import finished_trials, valid_state
from .tuning import default_name, experiment_path, resolve_storage

# The shipped sample is prepared on first use with a vocabulary that suits its size. It is small (a few
# hundred rows of 256 tokens), so a GPU grid on it uses shorter rows and a step budget (several passes)
# unless the flags say otherwise; --data DIR is for real measurements.
SAMPLE_VOCAB = {"gpu": 2048, "cpu": 1024}
SAMPLE_GPU_OVERRIDES = {"seq_len": 256, "max_steps": 100, "warmup_steps": 10}
BUDGET_KEYS = ("epochs", "max_steps", "max_tokens")
# Fault tolerance: a trial snapshots its full state every CHECKPOINT_MINUTES in the background (it costs
# the training loop a copy to host memory) and a failed trial restarts from the latest one, up to
# MAX_FAILURES times. Max-batch probes never checkpoint and are never retried (an OOM is the answer).
CHECKPOINT_MINUTES = 5.0
MAX_FAILURES = 2


@dataclass
class SweepPlan:
    """A validated sweep: the grid, whether it needs GPUs, where data and results go."""

    cfg: SweepConfig
    preset_name: str  # seed | seed-report | cpu | custom
    grid: list[dict[str, Any]]
    use_gpu: bool
    data_dir: str
    storage: str
    name: str
    sample: tuple[str, int, int] | None = None  # (dir, vocab, seq_len) still to prepare
    notice: str | None = None
    vocab_size: int | None = None  # what the preset's model needs of the dataset

    @property
    def path(self) -> str:
        return experiment_path(self.storage, self.name)

    @property
    def names(self) -> list[str]:
        return grid_names(self.grid)


def _trial_overrides(cfg: SweepConfig, preset_overrides: dict[str, Any], use_gpu: bool) -> dict[str, Any]:
    overrides = {**preset_overrides, **cfg.overrides, "device": "cuda" if use_gpu else "cpu"}
    if cfg.device == "auto" and use_gpu:
        overrides["device"] = "auto"
    if cfg.gpu_memory_gb is not None:
        overrides["gpu_memory_gb"] = cfg.gpu_memory_gb
    if not cfg.find_max_batch:
        overrides.setdefault("checkpoint_minutes",
                             CHECKPOINT_MINUTES if cfg.checkpoint_minutes is None else cfg.checkpoint_minutes)
        if cfg.checkpoint_interval is not None:
            overrides.setdefault("checkpoint_interval", cfg.checkpoint_interval)
            if cfg.checkpoint_minutes is None:  # steps were asked for: by steps only
                overrides["checkpoint_minutes"] = 0.0
    return overrides


def _sample(cfg: SweepConfig, overrides: dict[str, Any], use_gpu: bool, preset_name: str) -> tuple:
    """(data_dir, sample to prepare or None, notice): the shipped sample when no --data is given."""
    if cfg.data_dir is not None:
        return str(Path(cfg.data_dir).expanduser().resolve()), None, None
    notice = None
    if use_gpu:
        for key, value in SAMPLE_GPU_OVERRIDES.items():
            if key in cfg.overrides or (key == "max_steps" and any(k in cfg.overrides for k in BUDGET_KEYS)):
                continue
            overrides[key] = value
        notice = (f"notice: no --data: the {preset_name} grid runs on the small shipped Polish sample "
                  f"(seq_len {overrides.get('seq_len')}"
                  f"{', %s steps' % overrides['max_steps'] if overrides.get('max_steps') else ''}); "
                  "pass --data DIR (python -m data_prep) for a real measurement")
    seq_len = int(overrides.get("seq_len", 512))
    vocab = SAMPLE_VOCAB["gpu" if use_gpu else "cpu"]
    data_dir = str(Path("prepared").resolve() / f"sample-bpe{vocab}-s{seq_len}")
    missing = not (Path(data_dir) / "manifest.json").is_file()
    return data_dir, (data_dir, vocab, seq_len) if missing else None, notice


def _needs_gpu(cfg: SweepConfig, preset_name: str, gpus: int | None) -> bool:
    if cfg.device != "auto":
        return cfg.device == "cuda"
    if preset_name == "custom":
        return gpus != 0
    return PRESETS[preset_name].needs_gpu


def require_gpus(plan: SweepPlan, gpus: int | None, address: str | None) -> None:
    if plan.use_gpu and gpus == 0:
        where = f"at {address}" if address else "(local instance)"
        raise SweepError(f"the {plan.preset_name} grid needs GPUs (one per trial) but the Ray cluster {where} "
                         "has none: use --device cpu for a CPU grid, or --address of a GPU cluster")


def plan_sweep(cfg: SweepConfig, gpus: int | None = None) -> SweepPlan:
    """Validate the whole sweep without Ray; `gpus` = the cluster's GPUs when known (None: not yet)."""
    cfg.validate()
    if cfg.resume:
        return plan_resume(cfg)
    preset_name, preset, techniques, batch_sizes, windows, seq_lens = grid_axes(cfg, gpus)
    use_gpu = _needs_gpu(cfg, preset_name, gpus)
    overrides = _trial_overrides(cfg, preset.overrides, use_gpu)
    data_dir, sample, notice = _sample(cfg, overrides, use_gpu, preset_name)
    overrides["data_dir"] = data_dir
    grid = build_grid(techniques, (1,) if cfg.find_max_batch else batch_sizes, windows, seq_lens=seq_lens,
                      tokens_per_batch=None if cfg.find_max_batch else cfg.tokens_per_batch,
                      overrides=overrides, only=cfg.only, skip=cfg.skip)
    why = "--device cpu" if cfg.device == "cpu" else "no GPU in the Ray cluster"
    if preset_name == "cpu" and cfg.preset is None:
        notice = f"notice: {why}: running {describe_grid(grid, 'the CPU grid')}; " \
                 "use --preset seed on a GPU machine for the real sweep"
    elif preset_name == "custom" and not use_gpu and cfg.techniques is None:
        notice = f"notice: {why.removesuffix(' in the Ray cluster')}: the grid uses the techniques a CPU runs " \
                 f"({', '.join(techniques)}): {describe_grid(grid, 'the custom CPU grid')}"
    check_local_cpus(cfg)
    storage = resolve_storage(cfg.storage_path)
    name = cfg.name or default_name("max-batch" if cfg.find_max_batch else preset_name)
    check_name(name)
    plan = SweepPlan(cfg=cfg, preset_name=preset_name, grid=grid, use_gpu=use_gpu, data_dir=data_dir,
                     storage=storage, name=name, sample=sample, notice=notice if cfg.verbose >= 1 else None,
                     vocab_size=preset.vocab_size)
    require_gpus(plan, gpus, cfg.address)
    check_fresh(plan.path)
    return plan


def describe_grid(grid: list[dict[str, Any]], what: str) -> str:
    """What will actually run, from the grid itself: trials, model, budget (`the CPU grid: 8 trials, 2 layers x
    d_model 64, seq_len 64, 30 steps each`); a value the points disagree on is given as its range."""
    def span(key: str) -> str:
        values = sorted({p[key] for p in grid if p.get(key) is not None})
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    budget = [f"{span(k)} {k.removeprefix('max_').replace('_', ' ')}" for k in BUDGET_KEYS
              if any(p.get(k) for p in grid)] or ["1 epoch"]
    budget = [b.replace("1 epochs", "1 epoch") for b in budget]
    count = f"{len(grid)} trial{'s' if len(grid) != 1 else ''}"
    layers = f"{span('n_layers')} layer{'' if span('n_layers') == '1' else 's'}"
    return (f"{what}: {count}, {layers} x d_model {span('d_model')}, seq_len {span('seq_len')}, "
            f"{' / '.join(budget)} each")


def _runs_locally(cfg: SweepConfig) -> bool:
    return cfg.address == "local" or (cfg.address is None and not os.environ.get("RAY_ADDRESS"))


def check_local_cpus(cfg: SweepConfig) -> None:
    """A local Ray instance gets this machine's CPUs: a trial asking for more would wait forever. Said before
    Ray starts (a cluster's nodes are checked once connected)."""
    import sys

    ray = sys.modules.get("ray")
    if not cfg.cpus_per_trial or not _runs_locally(cfg) or (ray is not None and ray.is_initialized()):
        return
    have = os.cpu_count() or 1
    if cfg.cpus_per_trial > have:
        raise SweepError(f"--cpus-per-trial {cfg.cpus_per_trial}: this machine has {have} CPUs, so a local Ray "
                         f"instance could never start such a trial (use --cpus-per-trial {have} or less)")


def check_fresh(path: str) -> None:
    """A new experiment never lands on an old one (local paths and storage URIs alike)."""
    if _experiment_exists(path):
        raise SweepError(f"{path} already exists: pass --resume to continue it, or choose another --name")


def _experiment_exists(path: str) -> bool:
    if not is_uri(path):
        return Path(path).exists()
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        return fs.get_file_info(inner).type != pyarrow.fs.FileType.NotFound
    except (OSError, ValueError) as exc:
        raise SweepError(f"--storage-path {path}: cannot reach it ({first_line(exc, limit=160)})") from None


def latest_experiment(storage: str) -> str | None:
    """Name of the most recently written Tune experiment under a local storage path."""
    if is_uri(storage) or not Path(storage).is_dir():
        return None
    runs = [p for p in Path(storage).iterdir() if p.is_dir() and any(p.glob("experiment_state-*.json"))]
    return max(runs, key=lambda p: p.stat().st_mtime).name if runs else None


def read_saved_grid(path: str) -> dict[str, Any]:
    """The grid a sweep saved at its start; SweepError when it is missing or damaged."""
    grid_file = f"{path}/{GRID_FILE}"
    try:
        text = read_text(grid_file)
        saved = json.loads(text) if text is not None else None
    except (ValueError, OSError) as exc:
        raise SweepError(f"--resume: {grid_file} is damaged ({type(exc).__name__}): the sweep cannot be rebuilt "
                         "from it") from None
    if text is None:
        raise SweepError(f"--resume: {grid_file} is missing: {path} was not written by python -m sweep.run")
    grid = saved.get("grid") if isinstance(saved, dict) else None
    if not isinstance(grid, list) or not grid or not all(isinstance(p, dict) for p in grid):
        raise SweepError(f"--resume: {grid_file} holds no grid: the sweep cannot be rebuilt from it")
    try:
        return {**saved, "grid": [_validated(p) for p in grid]}
    except SweepError as exc:
        raise SweepError(f"--resume: {grid_file}: {exc}") from None


def _validated(point: dict[str, Any]) -> dict[str, Any]:
    """The saved point itself, once `TrialConfig` accepts it: a field added to TrialConfig since the sweep
    started must not enter the param space, which Tune's restore requires to be the one it saved."""
    from trainable.config import TrialConfig

    try:
        TrialConfig.from_dict(point)
    except (ConfigError, TypeError) as exc:
        raise SweepError(f"a trial config is invalid ({exc})") from None
    return point


def plan_resume(cfg: SweepConfig) -> SweepPlan:
    """The plan of an interrupted sweep, from the grid it saved (so the param space is the same)."""
    storage = resolve_storage(cfg.storage_path)
    name = cfg.name or latest_experiment(storage)
    if name is None:
        raise SweepError(f"--resume: no experiment under {storage} (pass --name of the one to resume)")
    path = experiment_path(storage, name)
    state = None if is_uri(path) else valid_state(path)[1]
    saved = read_saved_grid(path)
    grid, preset = saved["grid"], str(saved.get("preset", "custom"))
    progress = "" if state is None else _progress(path, state, len(grid))
    check_local_cpus(cfg)
    notice = f"notice: {describe_grid(grid, f'resuming the {preset} grid')}{progress}"
    return SweepPlan(cfg=cfg, preset_name=preset, grid=grid, use_gpu=bool(saved.get("use_gpu")),
                     data_dir=grid[0]["data_dir"], storage=storage, name=name,
                     notice=notice if cfg.verbose >= 1 else None)


def _progress(path: str, state: dict[str, Any], total: int) -> str:
    """`; 3 finished, 5 to run` from Tune's saved state and the trials' final reports."""
    try:
        finished = len(finished_trials(path, state))
    except (ValueError, KeyError, TypeError):
        return ""
    return f"; {finished} finished, {total - finished} to run"


def check_data(plan: SweepPlan, verify: str = "full") -> None:
    """The dataset exists, is intact and fits every grid point; "full" hashes every shard once, in the driver
    (trials only compare sizes, which a flipped byte passes)."""
    if not Path(plan.data_dir).is_dir():
        raise SweepError(f"--data {plan.data_dir}: no such directory (prepare one with python -m data_prep)")
    try:
        dataset = open_checked(plan.data_dir, verify=verify)
    except ConfigError as exc:
        raise SweepError(f"--data {plan.data_dir}: {str(exc).removeprefix(f'data_dir {plan.data_dir}: ')}") from None
    points = [{**p, "batch_size": 1} for p in plan.grid] if plan.cfg.find_max_batch else plan.grid
    try:
        check_fits(dataset, points, f"--data {plan.data_dir}")
    except ConfigError as exc:
        raise SweepError(str(exc)) from None
    if plan.vocab_size is not None and dataset.vocab_size != plan.vocab_size:
        raise SweepError(f"the {plan.preset_name} preset's model has a {plan.vocab_size:,}-token vocabulary, but "
                         f"--data {plan.data_dir} has {dataset.vocab_size:,}: prepare one with "
                         "`python -m data_prep prepare --tokenizer gpt2` (or a --vocab-size 50257 BPE)")
