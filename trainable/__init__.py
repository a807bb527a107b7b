"""Stage 2: the GPT-style decoder, memory-efficiency techniques as switches, one measured trial.

Contract 2 in docs/architecture.md. Import cost: torch (not Ray; Ray is imported inside the trainable).
"""
from .attention import ATTENTION_BACKENDS, KERNEL_PREFERENCE, select_kernel, sliding_window_causal_mask
from .checkpoint_io import CheckpointIO, DirectoryCheckpointIO, TuneCheckpointIO
from .checkpointing import CHECKPOINTING, apply_checkpointing
from .compile_policy import CompileWatch
from .config import TECHNIQUES, TrialConfig, technique_label
from .errors import ConfigError
from .flops import PEAK_BF16_FLOPS, model_flops_per_token, peak_bf16_flops
from .losses import LOSSES
from .measure import is_oom_error
from .model import GPT, ModelConfig
from .observe import RayMetricsExporter
from .precision import PRECISIONS
from .trial import run_trial, tune_trainable

__all__ = [
    "ATTENTION_BACKENDS", "CHECKPOINTING", "CheckpointIO", "CompileWatch", "ConfigError", "DirectoryCheckpointIO",
    "GPT", "KERNEL_PREFERENCE", "LOSSES", "ModelConfig", "PEAK_BF16_FLOPS", "PRECISIONS", "RayMetricsExporter",
    "TECHNIQUES", "TrialConfig", "TuneCheckpointIO", "apply_checkpointing", "is_oom_error", "model_flops_per_token",
    "peak_bf16_flops", "run_trial", "select_kernel", "sliding_window_causal_mask", "technique_label",
    "tune_trainable",
]
