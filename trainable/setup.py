"""Everything a run builds before its first step: device, data, model, optimizer, schedule, memory cap.

Shared by the trial (`trial.py`) and the benchmark's plain loop (`bench/bench_trainable.py`), so both train
the same model on the same data with the same optimizer: `build_run(cfg)` is the one entry point.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from .attention import AttentionKernel, select_kernel
from .checkpointing import apply_checkpointing
from .config import TrialConfig
from .dataset_check import check_fits, open_checked
from .errors import ConfigError
from .model import GPT, ModelConfig
from .precision import PRECISIONS, Precision


def resolve_device(name: str) -> torch.device:
    """`auto` -> the current CUDA device when there is one, else CPU."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return torch.device("cuda", torch.cuda.current_device())


@dataclass
class TrialData:
    """The prepared dataset as one run uses it."""

    train: Any  # data_prep.TokenSplit
    val_rows: torch.Tensor  # (n, seq_len + 1) int64, on the host
    vocab_size: int
    steps_per_epoch: int


def open_trial_data(cfg: TrialConfig) -> TrialData:
    """Open and check the dataset against the config (before any GPU work); ConfigError on problems."""
    dataset = open_checked(cfg.data_dir)
    check_fits(dataset, [cfg], f"data_dir {cfg.data_dir}")
    train, val = dataset.split("train"), dataset.split("val")
    n_val = min(cfg.eval_batches * cfg.eval_batch_size, val.num_rows)
    val_rows = next(val.iter_batches(n_val, seed=0, shuffle=False)) if n_val else np.zeros((0, cfg.seq_len + 1))
    return TrialData(train, torch.from_numpy(val_rows[:, : cfg.seq_len + 1]).long(), dataset.vocab_size,
                     train.num_rows // cfg.batch_size)


def total_steps(cfg: TrialConfig, steps_per_epoch: int) -> int:
    """The budget in optimizer steps: the smallest of the limits given (one epoch when none is)."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / cfg.tokens_per_step))
    if cfg.epochs is not None or not limits:
        limits.append((cfg.epochs or 1) * steps_per_epoch)
    return min(limits)


def lr_multiplier(cfg: TrialConfig, steps: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to `min_lr_ratio` (or constant); `s` = optimizer steps taken."""
    def multiplier(s: int) -> float:
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return multiplier


def build_optimizer(model: torch.nn.Module, cfg: TrialConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, weight decay on matrices only (nanoGPT), the fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def model_config(cfg: TrialConfig, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, seq_len=cfg.seq_len, n_layers=cfg.n_layers,
                       d_model=cfg.d_model, n_heads=cfg.n_heads, ff_dim=cfg.ff_dim,
                       tie_embeddings=cfg.tie_embeddings)


def build_model(cfg: TrialConfig, vocab_size: int, kernel: AttentionKernel) -> GPT:
    """The seeded model with its attention kernel and checkpointing policy (on CPU: same init everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = GPT(model_config(cfg, vocab_size), kernel.bind(cfg.window))
    return apply_checkpointing(model, cfg.checkpointing)


@contextlib.contextmanager
def gpu_memory_limit(gb: float | None, device: torch.device) -> Iterator[None]:
    """Cap this process's CUDA allocator at `gb` GiB for the duration (emulates a smaller card)."""
    if gb is None or device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = gb * (1 << 30) / total
    if fraction > 1:
        raise ConfigError(f"gpu_memory_gb {gb} is more than the GPU has ({total / (1 << 30):.1f} GiB)")
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def rng_state(device: torch.device) -> dict:
    """Every RNG's state as tensors and plain Python values (loadable with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rngs(seed: int) -> None:
    """Every global RNG from the trial's seed: a trial's randomness never depends on what ran before it in the
    process (nothing in a step draws from them today; a checkpoint's saved states replace these on resume)."""
    torch.manual_seed(seed)  # CPU and every CUDA generator (lazily, before CUDA is initialised)
    np.random.seed(seed)
    random.seed(seed)


def reset_process(device: torch.device) -> None:
    """Return a process that already ran a trial to a fresh process's state (Tune's reuse_actors, a max-batch
    scout's sub-probes): so that what the next trial measures does not depend on what ran before it.

    What a trial leaves behind: compiled graphs (dynamo's caches, also counted against its recompile limit),
    cached attention masks and flex BlockMasks (device tensors), cuBLAS workspaces, cached allocator segments
    (which would change where the next trial's blocks land, i.e. its fragmentation at the memory edge), the
    allocator's peak statistics, a memory cap, pinned host buffers. Module imports, the CUDA context and loaded
    kernels stay: they are what reuse saves. tests/test_reuse_cuda.py holds every technique's peaks here equal
    to a fresh process's.
    """
    from .attention import clear_caches
    from .compile_policy import release_compiled

    release_compiled()
    clear_caches()
    if not torch.cuda.is_initialized():
        return
    gc.collect()  # tensors kept alive by reference cycles (an exception's frames) go before the cache is emptied
    torch.cuda.synchronize()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()
    host_empty_cache = getattr(torch._C, "_host_emptyCache", None)
    if host_empty_cache is not None:
        host_empty_cache()
    index = device.index if device.type == "cuda" and device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(1.0, index)
    torch.cuda.reset_peak_memory_stats(index)
    torch.cuda.reset_accumulated_memory_stats(index)


def prepare_process(run: "Run", reused: bool, timeline) -> None:
    """This process ready for `run`: reset if it ran a trial before, RNGs seeded, the CUDA context created
    (each milestone on the trial's `measure.Timeline`)."""
    from .measure import cuda_ready

    if reused:
        reset_process(run.device)
    seed_rngs(run.cfg.seed)
    timeline.mark("data_ready_time")
    cuda_ready(run.device)
    if run.device.type == "cuda":
        timeline.mark("cuda_ready_time")


@dataclass
class Run:
    """What a run is made of, resolved from its config on this machine (no GPU work yet)."""

    cfg: TrialConfig
    device: torch.device
    data: TrialData
    precision: Precision
    kernel: AttentionKernel
    total_steps: int

    def build_model(self) -> GPT:
        return build_model(self.cfg, self.data.vocab_size, self.kernel)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, batch index, rows) from (epoch, start) on, epoch after epoch: a budget may span epochs."""
        while True:
            stream = self.data.train.iter_batches(self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                                                  start_batch=start)
            for index, rows in enumerate(stream, start=start):
                yield epoch, index, rows
            epoch, start = epoch + 1, 0


def build_run(cfg: TrialConfig) -> Run:
    """Resolve the device, open and check the data, pick the kernel: every check that can fail before GPU work."""
    device = resolve_device(cfg.device)
    data = open_trial_data(cfg)
    kernel = select_kernel(cfg.attention, cfg.precision, device.type, cfg.kernel)
    return Run(cfg, device, data, PRECISIONS[cfg.precision], kernel, total_steps(cfg, data.steps_per_epoch))
