"""Stage 2: the GPT-style decoder, memory-efficiency techniques as switches, one measured trial.

Importing the package costs nothing: the configuration (`TrialConfig`, validated without torch), the
technique vocabulary and the memory model load without torch, so the Ray driver, `--predict` and
`--dry-run` never import it. Everything that trains (the model, the kernels, `run_trial`) is loaded on
first use of its name.
"""
from __future__ import annotations

import importlib
from typing import Any

from contract.techniques import TECHNIQUES, technique_label

from .config import TrialConfig
from .errors import ConfigError

# name -> module that defines it, imported on first access (these import torch)
_LAZY = {
    "ATTENTION_BACKENDS": "attention", "select_kernel": "attention", "sliding_window_causal_mask": "attention",
    "KERNEL_PREFERENCE": "kernels",
    "CheckpointIO": "checkpoint_io", "DirectoryCheckpointIO": "checkpoint_io", "TuneCheckpointIO": "checkpoint_io",
    "CHECKPOINTING": "checkpointing", "apply_checkpointing": "checkpointing",
    "CompileWatch": "compile_policy",
    "PEAK_BF16_FLOPS": "flops", "model_flops_per_token": "flops", "peak_bf16_flops": "flops",
    "LOSSES": "losses", "is_oom_error": "oom",
    "GPT": "model", "ModelConfig": "model",
    "RayMetricsExporter": "observe", "PRECISIONS": "precision",
    "run_trial": "trial", "tune_trainable": "trial",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trainable' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["ConfigError", "TECHNIQUES", "TrialConfig", "technique_label", *_LAZY]
