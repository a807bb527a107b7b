"""The sweep grid: technique x window x batch size, as validated flat trial configs.

A grid point is a full `TrialConfig.to_dict()`; its name (`bf16_window16_bs32`) is derived from the
switches by `trainable.technique_label`, so names never disagree with what ran.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from trainable import TECHNIQUES, ConfigError, TrialConfig, technique_label


class SweepError(ValueError):
    """Bad sweep input; the message is one line meant for the user (the CLI exits 2)."""


@dataclass(frozen=True)
class GridPreset:
    """A named grid: which techniques, windows and batch sizes, plus trial overrides (model, budget)."""

    techniques: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    windows: tuple[int, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    needs_gpu: bool = True
    description: str = ""


SEED_TECHNIQUES = ("baseline", "bf16", "flash", "window", "gradcp")
SEED_WINDOWS = (16, 32)
SEED_BATCH_SIZES = (32, 64, 128)

# A tiny model and a few dozen steps: finishes in a couple of minutes on a 2-core CPU.
CPU_OVERRIDES: dict[str, Any] = {
    "n_layers": 2, "d_model": 64, "n_heads": 4, "ff_dim": 256, "seq_len": 64,
    "max_steps": 30, "warmup_steps": 5, "eval_interval": 0, "eval_batches": 4, "eval_batch_size": 8,
    "device": "cpu",
}

PRESETS: dict[str, GridPreset] = {
    "seed": GridPreset(
        techniques=SEED_TECHNIQUES, batch_sizes=SEED_BATCH_SIZES, windows=SEED_WINDOWS,
        description="the seed's 18 experiments: baseline, bf16, flash, window 16/32, gradcp x batch 32/64/128",
    ),
    "cpu": GridPreset(
        techniques=("baseline", "bf16", "window", "gradcp"), batch_sizes=(8, 16), windows=(16,),
        overrides=CPU_OVERRIDES, needs_gpu=False,
        description="a small CPU grid: tiny model, 30 steps, baseline/bf16/window16/gradcp x batch 8/16",
    ),
}


def is_windowed(technique: str) -> bool:
    return TECHNIQUES[technique].get("attention") == "window"


def trial_name(cfg: TrialConfig | dict) -> str:
    """`<technique label>_bs<batch size>`, e.g. `bf16_flash_bs64`."""
    if isinstance(cfg, dict):
        cfg = TrialConfig.from_dict(cfg)
    return f"{technique_label(cfg)}_bs{cfg.batch_size}"


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(p in name for p in patterns)


def build_grid(
    techniques: Iterable[str],
    batch_sizes: Iterable[int],
    windows: Iterable[int] = (),
    *,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Validated flat trial configs, one per (technique, window, batch size) kept by `only`/`skip`.

    Windows apply to windowed techniques only; `only`/`skip` are substrings of trial names
    (`--only window` keeps `bf16_window16_bs32`, `--skip bs128` drops the largest batch).
    Raises SweepError with one line on any bad input.
    """
    techniques, batch_sizes, windows = list(techniques), list(batch_sizes), list(windows)
    overrides = dict(overrides or {})
    if not techniques:
        raise SweepError("no techniques given")
    if not batch_sizes:
        raise SweepError("no batch sizes given")
    for technique in techniques:
        if technique not in TECHNIQUES:
            raise SweepError(f"unknown technique {technique!r}; choose from {', '.join(TECHNIQUES)}")
    for bs in batch_sizes:
        if not isinstance(bs, int) or bs < 1:
            raise SweepError(f"batch size must be a positive integer, got {bs!r}")
    for w in windows:
        if not isinstance(w, int) or w < 1:
            raise SweepError(f"window must be a positive integer, got {w!r}")
    windowed = [t for t in techniques if is_windowed(t)]
    if windows and not windowed:
        raise SweepError(f"--windows {','.join(map(str, windows))} needs a windowed technique "
                         f"({', '.join(t for t in TECHNIQUES if is_windowed(t))}); got {', '.join(techniques)}")
    if windowed and not windows:
        windows = list(SEED_WINDOWS)
    for key in ("technique", "batch_size", "window", "precision", "attention", "checkpointing"):
        if key in overrides:
            raise SweepError(f"{key} is set by the grid, not by an override")

    grid: dict[str, dict[str, Any]] = {}
    for technique in dict.fromkeys(techniques):
        for window in (dict.fromkeys(windows) if is_windowed(technique) else [None]):
            for bs in dict.fromkeys(batch_sizes):
                point = {**overrides, "technique": technique, "batch_size": bs}
                if window is not None:
                    point["window"] = window
                try:
                    cfg = TrialConfig.from_dict(point)
                except ConfigError as exc:
                    raise SweepError(f"{technique} at batch size {bs}"
                                     f"{f' window {window}' if window else ''}: {exc}") from None
                name = trial_name(cfg)
                if only and not _matches(name, only):
                    continue
                if skip and _matches(name, skip):
                    continue
                grid.setdefault(name, cfg.to_dict())  # presets that coincide run once
    if not grid:
        raise SweepError("the --only/--skip filters leave no trials in the grid")
    return list(grid.values())
