"""Predicted peak memory and max batch size for every config of a grid, from the analytic memory model.

No Ray, no GPU, no training: `trainable.memory_model` predicts what `torch.cuda.max_memory_allocated`
reports for one steady-state training step (within ~2% on an H200 for the seed's techniques). The
same prediction seeds the max-batch search (`search.MaxBatchSearch(hint=...)`), so the search's
probes, which cost a trial process each, start next to the answer.

    from sweep import SweepConfig
    from sweep.predict import predict_grid
    prediction = predict_grid(SweepConfig(techniques=("bf16", "flash"), gpu_memory_gb=24))
    for row in prediction.rows: print(row["label"], row["batch_size"], row["predicted_max_batch"])

Budget semantics (what "fits" means). A trial's `gpu_memory_gb` calls
`torch.cuda.set_per_process_memory_fraction`, which caps what the caching allocator may *reserve*
(`memory_reserved`), not what tensors occupy (`max_memory_allocated`). So a batch size fits when

    predicted max_memory_allocated + allocator allowance <= budget,

where the allowance is the model's reserved estimate minus its allocated peak
(`MemoryBreakdown.reserved_mib - peak_mib`: caching-allocator slack and fragmentation), i.e. the
predicted `memory_reserved` must fit. The budget is `--gpu-memory-gb` GiB when given; without a cap
it is the GPU's total memory minus the CUDA context (which lives outside the allocator); a cap
larger than what the GPU leaves after its context is clipped to it. The GPU is `--gpu NAME` or
`--gpu-total-gb`, by default an H200 (143771 MiB).
"""
from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.experiment import PREDICTION_RECORD_KEYS

from .errors import SweepError
from .grid import build_grid, grid_axes, grid_names, trial_name

MIB_PER_GIB = 1024
# Total memory as nvidia-smi reports it (MiB); torch's total_memory agrees to the MiB on these cards.
GPU_TOTAL_MIB: dict[str, int] = {
    "h200": 143771,
    "h100": 81559,  # H100 80GB HBM3 (SXM)
    "a100-80gb": 81920,
    "a100-40gb": 40960,
    "rtx4090": 24564,
    "rtx5090": 32607,  # the seed report's card (32 GB GDDR7)
}
DEFAULT_GPU = "h200"
DEFAULT_VOCAB = 10000
PREDICT_LIMIT = 1 << 20  # the largest batch size the prediction considers
PLACEHOLDER_DATA = "predict-needs-no-data"  # TrialConfig requires a data_dir; the model reads none


@dataclass(frozen=True)
class MemoryBudget:
    """What the caching allocator of one trial may reserve, and where that number comes from."""

    allocator_mib: float
    gpu_total_mib: float
    gpu_memory_gb: float | None  # the per-trial cap, if any
    context_mib: float  # CUDA context, outside the allocator
    source: str  # one line for the user

    def fits(self, breakdown) -> bool:
        """Predicted reserved memory (allocated peak + the model's allocator allowance) within the budget."""
        return reserved_mib(breakdown) <= self.allocator_mib


def reserved_mib(breakdown) -> float:
    """The model's `memory_reserved` estimate; the allocated peak when the breakdown has none."""
    return max(breakdown.peak_mib, float(getattr(breakdown, "reserved_mib", None) or breakdown.peak_mib))


def gpu_total_mib(gpu: str | None = None, gpu_total_gb: float | None = None) -> tuple[float, str]:
    """(total MiB, description) from `--gpu-total-gb`, else `--gpu NAME`, else the default H200."""
    if gpu_total_gb is not None:
        if not (gpu_total_gb > 0 and math.isfinite(gpu_total_gb)):
            raise SweepError(f"--gpu-total-gb must be a positive number, got {gpu_total_gb}")
        return gpu_total_gb * MIB_PER_GIB, f"a {gpu_total_gb:g} GiB GPU (--gpu-total-gb)"
    if gpu is not None:
        key = gpu.lower()
        if key not in GPU_TOTAL_MIB:
            raise SweepError(f"unknown --gpu {gpu!r}; choose from {', '.join(GPU_TOTAL_MIB)} "
                             "or give --gpu-total-gb")
        return float(GPU_TOTAL_MIB[key]), f"{key} ({GPU_TOTAL_MIB[key]} MiB, --gpu)"
    return float(GPU_TOTAL_MIB[DEFAULT_GPU]), f"{DEFAULT_GPU} ({GPU_TOTAL_MIB[DEFAULT_GPU]} MiB, the default GPU)"


def local_gpu_total_mib() -> float | None:
    """GPU 0's total memory from nvidia-smi (no CUDA context is created in this process); None if unknown."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def memory_budget(gpu_memory_gb: float | None = None, *, gpu: str | None = None,
                  gpu_total_gb: float | None = None, total_mib: float | None = None,
                  total_source: str | None = None) -> MemoryBudget:
    """The allocator budget of one trial (see the module docstring); `total_mib` overrides the GPU lookup."""
    from trainable.memory_model import DEFAULT_CONSTANTS

    if total_mib is None:
        total_mib, total_source = gpu_total_mib(gpu, gpu_total_gb)
    context = DEFAULT_CONSTANTS.context_mib
    usable = total_mib - context
    if gpu_memory_gb is None:
        return MemoryBudget(usable, total_mib, None, context,
                            f"{usable:.0f} MiB = {total_source} minus {context:.0f} MiB CUDA context "
                            "(no --gpu-memory-gb)")
    if not (gpu_memory_gb > 0 and math.isfinite(gpu_memory_gb)):
        raise SweepError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
    cap = gpu_memory_gb * MIB_PER_GIB
    if cap > total_mib:
        raise SweepError(f"--gpu-memory-gb {gpu_memory_gb:g} is more than the GPU has "
                         f"({total_mib / MIB_PER_GIB:.1f} GiB: {total_source})")
    clipped = " (clipped to the GPU minus its CUDA context)" if cap > usable else ""
    return MemoryBudget(min(cap, usable), total_mib, gpu_memory_gb, context,
                        f"{min(cap, usable):.0f} MiB = --gpu-memory-gb {gpu_memory_gb:g} on {total_source}{clipped}")


# -- one config ----------------------------------------------------------------------------------


def predicted_max_batch(cfg: Any, budget: MemoryBudget | float, *, limit: int = PREDICT_LIMIT) -> int:
    """Largest batch size (<= limit) whose predicted reserved memory fits the budget; 0 if none does.

    `cfg`: a TrialConfig, a flat dict or a MemorySpec with `vocab_size` set. A float budget is the
    allocator's MiB.
    """
    from trainable.memory_model import predict_max_batch_size

    budget_mib = budget.allocator_mib if isinstance(budget, MemoryBudget) else float(budget)
    return predict_max_batch_size(cfg, budget_mib, limit=limit, footprint=reserved_mib)


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 1)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def predict_point(point: dict[str, Any], budget: MemoryBudget, *, granularity: int = 1,
                  max_batch: int | None = None) -> dict[str, Any]:
    """One grid point's prediction as a flat row (the breakdown fields included); `error` when not modelled.

    `max_batch`: this config's predicted max batch when already known (it does not depend on the batch size).
    """
    from contract.techniques import technique_label
    from trainable.config import TrialConfig
    from trainable.errors import ConfigError
    from trainable.memory_model import predict_peak_memory, to_spec

    cfg = TrialConfig.from_dict(point)
    row: dict[str, Any] = {
        "trial": trial_name(cfg), "label": technique_label(cfg), "technique": cfg.technique,
        "batch_size": cfg.batch_size, "window": cfg.window, "vocab_size": cfg.vocab_size, "seq_len": cfg.seq_len,
        "precision": cfg.precision, "checkpointing": cfg.checkpointing, "loss": cfg.loss, "kernel": None,
        "predicted_peak_mib": None, "predicted_reserved_mib": None, "fits": None, "predicted_max_batch": None,
        "budget_mib": round(budget.allocator_mib, 1), "gpu_memory_gb": budget.gpu_memory_gb, "error": None,
        # torch.compile is not modelled: the eager step's memory, an upper bound for the compiled one
        "upper_bound": bool(cfg.compile),
    }
    try:
        spec = to_spec(cfg)
        breakdown = predict_peak_memory(spec)
        if max_batch is None:
            max_batch = predicted_max_batch(spec, budget)
    except (ValueError, ConfigError) as exc:
        row["error"] = f"not covered by the memory model: {exc}"
        return row
    row.update(
        kernel=spec.kernel,
        predicted_peak_mib=round(breakdown.peak_mib, 1),
        predicted_reserved_mib=round(reserved_mib(breakdown), 1),
        fits=budget.fits(breakdown),
        predicted_max_batch=(max_batch // granularity) * granularity,
    )
    row.update({k: _round(v) for k, v in dataclasses.asdict(breakdown).items()})
    return row


# -- a grid --------------------------------------------------------------------------------------


@dataclass
class GridPrediction:
    """Every config's prediction plus the budget and vocabulary they were made for."""

    rows: list[dict[str, Any]]
    budget: MemoryBudget
    vocab_size: int
    vocab_source: str


def predict_points(grid: list[dict[str, Any]], budget: MemoryBudget, *, granularity: int = 1) -> list[dict[str, Any]]:
    """Predictions for validated grid points (each with `vocab_size`); the max batch is solved once per technique."""
    max_batch: dict[str, int | None] = {}
    rows = []
    for point, name in zip(grid, grid_names(grid)):
        key = trial_name({**point, "batch_size": 1}, with_seq_len=True)
        row = predict_point(point, budget, granularity=granularity, max_batch=max_batch.get(key))
        row["trial"] = name
        if row["error"] is None:
            max_batch[key] = row["predicted_max_batch"]
        rows.append(row)
    return rows


def dataset_shape(data_dir: str) -> tuple[int, int]:
    """(vocab size, row length) from a prepared dataset's manifest."""
    from data_prep import DataPrepError, open_dataset

    if not Path(data_dir).expanduser().is_dir():
        raise SweepError(f"--data {data_dir}: no such directory (prepare one with python -m data_prep)")
    try:
        ds = open_dataset(Path(data_dir).expanduser(), verify="none")
    except DataPrepError as exc:
        raise SweepError(f"--data {data_dir}: {exc}") from None
    return int(ds.vocab_size), int(ds.seq_len)


def resolve_vocab(data_dir: str | None, vocab_size: int | None, preset_vocab: int | None = None) -> tuple[int, str]:
    """(vocab, where it comes from): the dataset's manifest, else --vocab-size, else the preset's, else the default."""
    if vocab_size is not None and (not isinstance(vocab_size, int) or vocab_size < 2):
        raise SweepError(f"--vocab-size must be an integer >= 2, got {vocab_size}")
    if data_dir is not None:
        vocab, _ = dataset_shape(data_dir)
        if vocab_size is not None and vocab_size != vocab:
            raise SweepError(f"--vocab-size {vocab_size} disagrees with --data {data_dir} (vocab {vocab}): drop one")
        return vocab, f"from {data_dir}/manifest.json"
    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    if preset_vocab is not None:
        return preset_vocab, "the preset's model; --vocab-size or --data to change"
    return DEFAULT_VOCAB, "the default; --vocab-size or --data to change"


def prediction_grid(cfg, vocab_size: int) -> list[dict[str, Any]]:
    """The grid `cfg` describes, on a CUDA GPU, as real runs would train it (no shipped-sample overrides)."""
    if cfg.device == "cpu":
        raise SweepError("--predict predicts CUDA memory: drop --device cpu")
    _, preset, techniques, batch_sizes, windows, seq_lens = grid_axes(cfg, gpus=1)
    overrides = {**preset.overrides, **cfg.overrides, "device": "cuda", "vocab_size": vocab_size,
                 "data_dir": cfg.data_dir or PLACEHOLDER_DATA}
    return build_grid(techniques, batch_sizes, windows, seq_lens=seq_lens, tokens_per_batch=cfg.tokens_per_batch,
                      overrides=overrides, only=cfg.only, skip=cfg.skip)


def predict_grid(cfg) -> GridPrediction:
    """Predictions for every config of the sweep `cfg` (a `SweepConfig`) describes; raises SweepError."""
    if cfg.granularity < 1:
        raise SweepError(f"--granularity must be >= 1, got {cfg.granularity}")
    budget = memory_budget(cfg.gpu_memory_gb, gpu=cfg.gpu, gpu_total_gb=cfg.gpu_total_gb)
    preset = grid_axes(cfg, gpus=1)[1]
    vocab, vocab_source = resolve_vocab(cfg.data_dir, cfg.vocab_size, preset.vocab_size)
    grid = prediction_grid(cfg, vocab)
    if cfg.data_dir is not None:
        _, rows_len = dataset_shape(cfg.data_dir)
        longest = max(p["seq_len"] for p in grid)
        if longest > rows_len:
            raise SweepError(f"dataset {cfg.data_dir} has rows of {rows_len} tokens, shorter than the grid's seq_len "
                             f"{longest}: pass --seq-len {rows_len}")
    return GridPrediction(predict_points(grid, budget, granularity=cfg.granularity), budget, vocab, vocab_source)


# -- what the sweep says before it runs -------------------------------------------------------------


def trial_budget(cfg, local_mib: float | None) -> MemoryBudget:
    """One trial's memory budget as the memory model sees it (SweepError on a bad flag).

    The GPU's size comes from --gpu-total-gb / --gpu, else `local_mib` (nvidia-smi on this node), else the
    default H200; --gpu-memory-gb caps it.
    """
    local = None if (cfg.gpu or cfg.gpu_total_gb) else local_mib
    return memory_budget(cfg.gpu_memory_gb, gpu=cfg.gpu, gpu_total_gb=cfg.gpu_total_gb, total_mib=local,
                         total_source=f"this node's GPU ({local:.0f} MiB, nvidia-smi)" if local else None)


def predicted_oom_notice(plan, local_mib: float | None) -> str | None:
    """The trials the memory model predicts will not fit their GPU, said before any GPU time is spent.

    They still run: an OOM is a measured result (seconds of GPU time), and the prediction is an estimate.
    Said only when the GPU is known (a local GPU, or --gpu / --gpu-total-gb / --gpu-memory-gb): the driver
    of a remote cluster may not see the workers' GPUs. Compiled configs are left out: for them the model
    gives the eager step, an upper bound.
    """
    cfg = plan.cfg
    if not plan.use_gpu or cfg.resume:
        return None
    if local_mib is None and not (cfg.gpu or cfg.gpu_total_gb or cfg.gpu_memory_gb):
        return None
    try:
        budget = trial_budget(cfg, local_mib)
    except SweepError:
        return None
    vocab = dataset_shape(plan.data_dir)[0]
    rows = predict_points([{**point, "vocab_size": vocab} for point in plan.grid], budget)
    over = [f"{row['trial']} (~{row['predicted_reserved_mib'] / 1024:.1f} GiB)" for row in rows
            if row["error"] is None and row["fits"] is False and not row["upper_bound"]]
    if not over:
        return None
    return (f"note: the memory model predicts {len(over)} of {len(plan.grid)} trials will not fit "
            f"{budget.source}: {', '.join(over)}. They run anyway and end as OOM results; `--skip NAME` leaves one out.")


def search_hints(plan, local_mib: float | None) -> tuple[dict[str, dict[str, Any]], str]:
    """Per search target (technique label): the memory model's predicted max batch under the trial's budget,
    and a line saying where the budget came from. A technique the model does not cover gets no hint (its
    search grows from --start)."""
    try:
        budget = trial_budget(plan.cfg, local_mib)
    except SweepError as exc:
        return {}, f"note: no predicted max batch ({exc}); searching unseeded"
    vocab = dataset_shape(plan.data_dir)[0]
    hints: dict[str, dict[str, Any]] = {}
    for point in plan.grid:
        row = predict_point({**point, "vocab_size": vocab, "batch_size": 1}, budget, granularity=1)
        if row["error"] is None:
            hints[row["label"]] = {"max_batch": row["predicted_max_batch"], "budget_mib": row["budget_mib"],
                                       "vocab_size": vocab}
    return hints, (f"seeding each search with its predicted max batch (budget {budget.source}); "
                   "--no-seed-search to search without")


# Named GPUs the report shows the seed grid's predicted memory on, for a user without a GPU.
REPORT_GPUS = (("h200", None), ("rtx5090", None))


def prediction_rows_for(plan) -> dict[str, Any]:
    """PREDICTIONS_FILE's content: each trial's predicted peak on its GPU (the local one, else the default),
    and the seed grid at the sweep's model and vocabulary on the named GPUs (REPORT_GPUS)."""
    from copy import copy

    from .grid import PRESETS

    vocab = dataset_shape(plan.data_dir)[0]
    cuda_grid = [{**p, "device": "cuda", "vocab_size": vocab, "gpu_memory_gb": None} for p in plan.grid]
    budget = trial_budget(plan.cfg, local_gpu_total_mib())
    trials = predict_points(cuda_grid, budget)
    seed = PRESETS["seed"]
    base = {k: v for k, v in plan.grid[0].items() if k not in ("technique", "window", "batch_size", "precision",
                                                                 "attention", "checkpointing")}
    base.update(device="cuda", vocab_size=vocab, gpu_memory_gb=None, loss="standard", compile=False, kernel="auto")
    windows = [w for w in seed.windows if w < base["seq_len"]] or [max(1, base["seq_len"] // 4)]
    seed_grid = build_grid(seed.techniques, seed.batch_sizes, windows, overrides=base)
    seed_rows = []
    for gpu, cap in REPORT_GPUS:
        for row in predict_points(seed_grid, memory_budget(cap, gpu=gpu)):
            seed_rows.append({**copy(row), "gpu": gpu})
    return {"budget": budget.source, "vocab_size": vocab,
            "trials": [{k: r.get(k) for k in PREDICTION_RECORD_KEYS} for r in trials],
            "seed_grid": [{**{k: r.get(k) for k in PREDICTION_RECORD_KEYS}, "gpu": r["gpu"]} for r in seed_rows]}


def dry_run_rows(plan) -> tuple[list[dict[str, Any]], str]:
    """`--dry-run`'s rows: each trial with the memory model's predicted CUDA peak, and what it assumed.

    A CPU trial's peak is what the same step would take on the GPU (`fits` is then None: CPU memory is not
    what the model predicts); a technique the model does not cover says so."""
    vocab = dataset_shape(plan.data_dir)[0] if plan.sample is None else plan.sample[1]
    budget = trial_budget(plan.cfg, local_gpu_total_mib())
    predicted = predict_points([{**p, "device": "cuda", "vocab_size": vocab, "gpu_memory_gb": None}
                                for p in plan.grid], budget)
    rows = []
    for point, row in zip(plan.grid, predicted):
        peak = row["predicted_peak_mib"]
        rows.append({"trial": row["trial"], "device": point["device"], "batch": point["batch_size"],
                     "seq_len": point["seq_len"],
                     "predicted peak (MiB)": "not modelled" if peak is None else
                     f"{peak:,.0f}" + (" (upper bound)" if row["upper_bound"] else ""),
                     "fits": None if point["device"] == "cpu" else row["fits"]})
    where = "" if plan.sample is None else ", the shipped sample's (prepared on the first run)"
    return rows, f"vocab {vocab}{where}; budget {budget.source}"


__all__ = ["GridPrediction", "MemoryBudget", "memory_budget", "predict_grid", "predict_point",
           "predict_points", "predicted_max_batch", "predicted_oom_notice", "search_hints", "trial_budget"]
