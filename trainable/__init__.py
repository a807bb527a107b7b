"""Stage 2: the GPT-style decoder, memory-efficiency techniques as switches, one measured trial.

Contract 2 in docs/architecture.md. Import cost: torch (not Ray; Ray is imported inside the trainable).
"""
from .attention import ATTENTION_BACKENDS, KERNEL_PREFERENCE, select_kernel, sliding_window_causal_mask
from .checkpoint_io import CheckpointIO, DirectoryCheckpointIO, TuneCheckpointIO
from .checkpointing import CHECKPOINTING, apply_checkpointing
from .config import TECHNIQUES, TrialConfig, technique_label
from .errors import ConfigError
from .losses import LOSSES
from .measure import is_oom_error
from .model import GPT, ModelConfig
from .precision import PRECISIONS
from .trial import run_trial, tune_trainable

__all__ = [
    "ATTENTION_BACKENDS", "CHECKPOINTING", "CheckpointIO", "ConfigError", "DirectoryCheckpointIO", "GPT",
    "KERNEL_PREFERENCE", "LOSSES", "ModelConfig", "PRECISIONS", "TECHNIQUES", "TrialConfig", "TuneCheckpointIO",
    "apply_checkpointing", "is_oom_error", "run_trial", "select_kernel", "sliding_window_causal_mask",
    "technique_label", "tune_trainable",
]
