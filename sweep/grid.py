"""The sweep grid: technique x window x seq_len x batch size, as validated flat trial configs.

A grid point is a full `TrialConfig.to_dict()`; its name (`bf16_window16_bs32`; `bf16_flash_s1024_bs8`
when the grid has several sequence lengths) is derived from its switches (`contract.trial_name`), so
names never disagree with what ran, and nothing reads a value back out of a name.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from contract.experiment import trial_name as contract_trial_name
from contract.techniques import TECHNIQUES, WINDOWED_TECHNIQUES, is_windowed, technique_label
from trainable.config import TrialConfig
from trainable.errors import ConfigError

from .errors import SweepError


@dataclass(frozen=True)
class GridPreset:
    """A named grid: which techniques, windows and batch sizes, plus trial overrides (model, budget)."""

    techniques: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    windows: tuple[int, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)
    needs_gpu: bool = True
    vocab_size: int | None = None  # the vocabulary the preset's model is defined with (None: the dataset's)
    description: str = ""


SEED_TECHNIQUES = ("baseline", "bf16", "flash", "window", "gradcp")
SEED_WINDOWS = (16, 32)
SEED_BATCH_SIZES = (32, 64, 128)
GPT2_VOCAB = 50257
CPU_TECHNIQUES = tuple(t for t in TECHNIQUES if TECHNIQUES[t].get("attention") != "flash"
                       and not TECHNIQUES[t].get("compile"))

# A tiny model and a few dozen steps: finishes in a couple of minutes on a 2-core CPU.
CPU_OVERRIDES: dict[str, Any] = {
    "n_layers": 2, "d_model": 64, "n_heads": 4, "ff_dim": 256, "seq_len": 64,
    "max_steps": 30, "warmup_steps": 5, "eval_interval": 0, "eval_batches": 4, "eval_batch_size": 8,
}
# The seed report's own model: 4 layers, d_model 256, 8 heads, FFN 1024, seq_len 256, tied GPT-2 embeddings
# (28.9M parameters at GPT-2's vocabulary), one epoch.
SEED_REPORT_OVERRIDES: dict[str, Any] = {"n_layers": 4, "d_model": 256, "n_heads": 8, "ff_dim": 1024, "seq_len": 256}

PRESETS: dict[str, GridPreset] = {
    "seed": GridPreset(
        techniques=SEED_TECHNIQUES, batch_sizes=SEED_BATCH_SIZES, windows=SEED_WINDOWS,
        description="the seed's 18 experiments: baseline, bf16, flash, window 16/32, gradcp x batch 32/64/128",
    ),
    "seed-report": GridPreset(
        techniques=SEED_TECHNIQUES, batch_sizes=SEED_BATCH_SIZES, windows=SEED_WINDOWS,
        overrides=SEED_REPORT_OVERRIDES, vocab_size=GPT2_VOCAB,
        description="the seed report's table: its 4-layer d256 model at seq_len 256 and GPT-2's vocabulary, "
                    "baseline, bf16, flash, window 16/32, gradcp x batch 32/64/128",
    ),
    "cpu": GridPreset(
        techniques=("baseline", "bf16", "window", "gradcp"), batch_sizes=(8, 16), windows=(16,),
        overrides=CPU_OVERRIDES, needs_gpu=False,
        description="the CPU grid: baseline, bf16, window16, gradcp x batch 8/16",
    ),
}


def grid_axes(cfg, gpus: int | None) -> tuple[str, GridPreset, tuple, tuple, tuple, tuple]:
    """(preset name, preset, techniques, batch sizes, windows, seq_lens) a SweepConfig asks for.

    A named preset is refined by explicit flags; a grid given by flags alone (no --preset) is `custom`, on
    the preset the hardware suggests, and on a CPU defaults to the techniques a CPU can run. `gpus` is the
    cluster's GPU count (None: not known yet, as before connecting to a remote cluster)."""
    cpu = cfg.device == "cpu" or (cfg.device == "auto" and gpus == 0)
    if cfg.preset is not None:
        name, preset = cfg.preset, PRESETS[cfg.preset]
    else:
        name, preset = ("custom" if cfg.grid_given else "cpu" if cpu else "seed"), PRESETS["cpu" if cpu else "seed"]
    techniques = cfg.techniques or (CPU_TECHNIQUES if name == "custom" and cpu else preset.techniques)
    windows = cfg.windows or (preset.windows if any(is_windowed(t) for t in techniques) else ())
    seq_lens = cfg.seq_lens or ()
    batch_sizes = cfg.batch_sizes or (() if cfg.tokens_per_batch else preset.batch_sizes)
    return name, preset, tuple(techniques), tuple(batch_sizes), tuple(windows), tuple(seq_lens)


def grid_names(grid: Sequence[dict[str, Any]]) -> list[str]:
    """Each point's trial name; the sequence length is part of it only when the grid has several."""
    several = len({p["seq_len"] for p in grid}) > 1
    return [trial_name(p, with_seq_len=several) for p in grid]


def trial_name(cfg: TrialConfig | dict, *, with_seq_len: bool = False, kind: str = "train") -> str:
    """`<technique label>_bs<batch size>`, e.g. `bf16_flash_bs64` (`bf16_flash_s1024_bs64` with the seq_len)."""
    d = cfg.to_dict() if isinstance(cfg, TrialConfig) else cfg
    seq_len = d["seq_len"] if with_seq_len else None
    return contract_trial_name(technique_label(d), d["batch_size"], kind, seq_len=seq_len)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(p in name for p in patterns)


def _check_axes(techniques: list[str], windows: list[int]) -> None:
    if not techniques:
        raise SweepError("no techniques given")
    for technique in techniques:
        if technique not in TECHNIQUES:
            import difflib

            close = difflib.get_close_matches(technique, list(TECHNIQUES), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SweepError(f"unknown technique {technique!r}{hint}; choose from {', '.join(TECHNIQUES)}")
    if windows and not any(is_windowed(t) for t in techniques):
        raise SweepError(f"--windows {','.join(map(str, windows))} needs a windowed technique "
                         f"({', '.join(WINDOWED_TECHNIQUES)}); got {', '.join(techniques)}")


def build_grid(
    techniques: Iterable[str],
    batch_sizes: Iterable[int],
    windows: Iterable[int] = (),
    *,
    seq_lens: Iterable[int] = (),
    tokens_per_batch: int | None = None,
    overrides: dict[str, Any] | None = None,
    only: Sequence[str] = (),
    skip: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Validated flat trial configs, one per (technique, window, seq_len, batch size) kept by `only`/`skip`.

    Windows apply to windowed techniques only; `only`/`skip` are substrings of trial names (`--only window`
    keeps `bf16_window16_bs32`, `--skip bs128` drops the largest batch). With `tokens_per_batch`, each
    seq_len's batch size is tokens_per_batch // seq_len. Each point is validated by `TrialConfig` (the one
    validation); a bad one raises SweepError naming the point.
    """
    techniques, windows = list(dict.fromkeys(techniques)), list(dict.fromkeys(windows))
    batch_sizes, seq_lens = list(dict.fromkeys(batch_sizes)), list(dict.fromkeys(seq_lens))
    overrides = dict(overrides or {})
    _check_axes(techniques, windows)
    for key in ("technique", "batch_size", "window", "precision", "attention", "checkpointing"):
        if key in overrides:
            raise SweepError(f"{key} is set by the grid, not by an override")
    base_seq_len = overrides.pop("seq_len", None)
    seq_axis = seq_lens or [base_seq_len]
    if tokens_per_batch is not None:
        batch_of = {s: tokens_per_batch // (s or TrialConfig.seq_len) for s in seq_axis}
        if min(batch_of.values()) < 1:
            raise SweepError(f"--tokens-per-batch {tokens_per_batch} is less than one sequence of "
                             f"{max(s or TrialConfig.seq_len for s in seq_axis)} tokens")
    elif not batch_sizes:
        raise SweepError("no batch sizes given")
    points: list[dict[str, Any]] = []
    for technique in techniques:
        for window in (windows or list(SEED_WINDOWS)) if is_windowed(technique) else [None]:
            for seq_len in seq_axis:
                sizes = [batch_of[seq_len]] if tokens_per_batch is not None else batch_sizes
                for bs in sizes:
                    points.append(_point(technique, window, seq_len, bs, overrides, on_axis=bool(seq_lens)))
    grid = {name: point for name, point in zip(grid_names(points), points)}  # presets that coincide run once
    kept = [p for name, p in grid.items() if (not only or _matches(name, only)) and not (skip and _matches(name, skip))]
    if not kept:
        raise SweepError("the --only/--skip filters leave no trials in the grid")
    return kept


def _point(technique: str, window: int | None, seq_len: int | None, batch_size: int,
           overrides: dict[str, Any], on_axis: bool) -> dict[str, Any]:
    point = {**overrides, "technique": technique, "batch_size": batch_size}
    if window is not None:
        point["window"] = window
    if seq_len is not None:
        point["seq_len"] = seq_len
    try:
        return TrialConfig.from_dict(point).to_dict()
    except ConfigError as exc:
        where = f"{technique} at batch size {batch_size}" + (f" window {window}" if window else "") + \
            (f" seq_len {seq_len}" if on_axis else "")
        raise SweepError(f"{where}: {exc}") from None
