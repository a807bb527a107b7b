"""One trial's configuration: a flat dataclass of switches, validated once at construction.

Techniques are switches (`precision`, `attention`, `window`, `checkpointing`, `loss`, `compile`);
the named techniques are presets over them (`TECHNIQUES`). A preset only fills switches left
unset, so `{"technique": "flash", "checkpointing": "full"}` is FlashAttention plus gradient
checkpointing. The label a trial is known by (`bf16_flash_gradcp`, `bf16_flash_sac_fusedce_compile`)
is derived from the switches by `technique_label`, never stored, so it cannot disagree with what ran.

Checks that need the prepared dataset (vocab, rows) or the hardware (CUDA present, flash-attn
installed) run at the start of the trial, still before any GPU work (see `trial.py`).
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from .attention import ATTENTION_BACKENDS, CUDA_NEEDED, KERNEL_PREFERENCE
from .checkpointing import CHECKPOINTING
from .errors import ConfigError
from .losses import LOSSES
from .precision import PRECISIONS

# standard: exact causal attention through the eager kernel (materialises the T x T scores);
# flash: exact causal attention through a fused kernel (flash_attn, else SDPA's flash backend);
# window: sliding-window causal attention of `window` keys (flash_attn, else flex, else eager on CPU).
ATTENTIONS = tuple(KERNEL_PREFERENCE)
KERNELS = ("auto", *ATTENTION_BACKENDS)
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cuda", "cpu")

# The seed's techniques (baseline, bf16, flash, window, gradcp), the combinations the sweep uses, and the
# newer techniques: selective activation checkpointing (sac), fused linear cross-entropy, torch.compile.
TECHNIQUES: dict[str, dict[str, str | bool]] = {
    "baseline": {"precision": "tf32", "attention": "standard", "checkpointing": "none"},
    "fp32": {"precision": "fp32", "attention": "standard", "checkpointing": "none"},
    "bf16": {"precision": "bf16", "attention": "standard", "checkpointing": "none"},
    "flash": {"precision": "bf16", "attention": "flash", "checkpointing": "none"},
    "window": {"precision": "bf16", "attention": "window", "checkpointing": "none"},
    "gradcp": {"precision": "tf32", "attention": "standard", "checkpointing": "full"},
    "bf16_gradcp": {"precision": "bf16", "attention": "standard", "checkpointing": "full"},
    "flash_gradcp": {"precision": "bf16", "attention": "flash", "checkpointing": "full"},
    "window_gradcp": {"precision": "bf16", "attention": "window", "checkpointing": "full"},
    "sac": {"precision": "tf32", "attention": "standard", "checkpointing": "selective"},
    "flash_sac": {"precision": "bf16", "attention": "flash", "checkpointing": "selective"},
    "fused_ce": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "loss": "fused_ce"},
    "flash_compile": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "compile": True},
    "window_compile": {"precision": "bf16", "attention": "window", "checkpointing": "none", "compile": True},
    "fused_ce_compile": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "loss": "fused_ce",
                         "compile": True},
}
# What a switch is when neither the config nor its preset sets it: the baseline.
DEFAULT_SWITCHES: dict[str, str | bool] = {**TECHNIQUES["baseline"], "loss": "standard", "compile": False}
# Label parts of non-default switch values (other values are spelled out: gradcp-<mode>, the loss name).
CHECKPOINTING_LABELS = {"none": "", "full": "gradcp", "selective": "sac"}
LOSS_LABELS = {"standard": "", "fused_ce": "fusedce"}


def _close(name: str, choices) -> str:
    match = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _as_bool(name: str, value: Any) -> bool:
    """A real bool (numpy's bool_ from Tune included); 1/"true" and friends are errors, not guesses."""
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):
        return bool(value)
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _choice(field: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {field} {value!r}{_close(value, choices)}; choose from {', '.join(choices)}")


@dataclass
class TrialConfig:
    """Every knob of one training run. Switches left None come from `technique` (else baseline)."""

    # techniques as switches
    technique: str | None = None
    precision: str | None = None  # fp32 | tf32 | bf16
    attention: str | None = None  # standard | flash | window
    window: int | None = None  # sliding window W: query i sees keys j with i - W < j <= i
    checkpointing: str | None = None  # none | full | selective
    loss: str | None = None  # standard | fused_ce
    compile: bool | None = None  # torch.compile the model and loss (False when unset)
    kernel: str = "auto"  # force one attention kernel (else chosen from attention + hardware)
    # model (vocab_size None: the dataset's)
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    ff_dim: int = 2048
    seq_len: int = 512
    vocab_size: int | None = None
    # optimisation
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.1
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 0
    # data and budget (no budget given: one epoch; several: the first one reached ends the run)
    data_dir: str | None = None
    epochs: int | None = None
    max_steps: int | None = None
    max_tokens: int | None = None
    eval_interval: int = 250  # steps between validations (0: only at the end)
    eval_batches: int = 8  # validation = the first eval_batches * eval_batch_size rows of val, unshuffled
    eval_batch_size: int = 16
    # hardware
    device: str = "auto"  # auto | cuda | cpu
    gpu_memory_gb: float | None = None  # cap this process's CUDA allocator, emulating a smaller card
    checkpoint_interval: int = 0  # steps between resumable checkpoints (0: off)
    peak_flops: float | None = None  # the GPU's peak dense bf16 FLOP/s for MFU (None: look up the GPU's name)

    def __post_init__(self) -> None:
        self._normalise_types()
        self._fill_from_technique()
        self._validate()

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrialConfig":
        """Build and validate from a flat dict (Tune's `config`); unknown keys are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"a trial config must be a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        for key in d:
            if key not in names:
                raise ConfigError(f"unknown config key {key!r}{_close(key, names)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-serialisable; `from_dict(cfg.to_dict()) == cfg`."""
        return asdict(self)

    def _fill_from_technique(self) -> None:
        if self.technique is not None:
            _choice("technique", self.technique, TECHNIQUES)
        preset = TECHNIQUES[self.technique] if self.technique is not None else {}
        for switch, default in DEFAULT_SWITCHES.items():
            if getattr(self, switch) is None:
                setattr(self, switch, preset.get(switch, default))

    def _normalise_types(self) -> None:
        """Tune and JSON hand us numpy scalars and 16.0-style floats; store plain Python values."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            kind = f.type.split(" |")[0]
            if kind == "bool":
                value = _as_bool(f.name, value)
            try:
                if kind in ("int", "float") and isinstance(value, (str, bytes)):
                    raise ValueError
                if kind == "int":
                    if isinstance(value, bool) or float(value) != int(value):
                        raise ValueError
                    value = int(value)
                elif kind == "float":
                    if isinstance(value, bool):
                        raise ValueError
                    value = float(value)
                elif kind == "str" and not isinstance(value, str):
                    raise ValueError
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"{f.name} must be {'an' if kind == 'int' else 'a'} {kind}, got {value!r}") from None
            setattr(self, f.name, value)

    # -- validation (pure: no torch, no files, no GPU) ---------------------------------------------
    def _validate(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("checkpointing", self.checkpointing, CHECKPOINTING)
        _choice("loss", self.loss, LOSSES)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("kernel", self.kernel, KERNELS)
        self._validate_model()
        self._validate_attention()
        self._validate_training()

    def _validate_attention(self) -> None:
        if self.attention == "window":
            if self.window is None:
                raise ConfigError("sliding-window attention needs a window size (e.g. window=16 / --window-size 16)")
        elif self.window is not None:
            raise ConfigError(f"window={self.window} needs sliding-window attention, but attention is "
                              f"{self.attention!r}: use technique 'window' (--window-size alone) or drop the window")
        if self.window is not None and not 0 < self.window < self.seq_len:
            raise ConfigError(f"window must be between 1 and seq_len - 1 = {self.seq_len - 1}, got {self.window}"
                              " (a window >= seq_len is plain causal attention: use technique bf16 or flash)")
        if self.attention == "flash" and self.precision != "bf16":
            raise ConfigError(f"flash attention needs bf16 precision, got {self.precision!r}: "
                              "use technique flash or add --bf16")
        if self.attention == "flash" and self.device == "cpu":
            raise ConfigError(CUDA_NEEDED)
        if self.kernel != "auto":
            kernel = ATTENTION_BACKENDS[self.kernel]
            if self.attention not in kernel.attentions:
                raise ConfigError(f"kernel {self.kernel!r} cannot run {self.attention!r} attention")
            if kernel.needs_cuda and self.device == "cpu":
                raise ConfigError(CUDA_NEEDED)
            if kernel.needs_bf16 and self.precision != "bf16":
                raise ConfigError(f"kernel {self.kernel!r} needs bf16 precision, got {self.precision!r}")

    def _validate_model(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "ff_dim", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2, got {self.vocab_size}")

    def _validate_training(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "max_tokens", "eval_batches", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0, got {self.seed}")
        if not self.data_dir:
            raise ConfigError("data_dir is required: a prepared dataset directory (python -m data_prep prepare)")
        # Absolute at the edge: Tune runs trials in their own working directory.
        self.data_dir = os.path.abspath(os.path.expanduser(self.data_dir))
        if self.peak_flops is not None and not (self.peak_flops > 0 and math.isfinite(self.peak_flops)):
            raise ConfigError(f"peak_flops must be a positive number of FLOP/s (e.g. 989.5e12), got {self.peak_flops}")
        if self.gpu_memory_gb is not None:
            if not (self.gpu_memory_gb > 0 and math.isfinite(self.gpu_memory_gb)):
                raise ConfigError(f"gpu_memory_gb must be a positive number, got {self.gpu_memory_gb}")
            if self.device == "cpu":
                raise ConfigError("gpu_memory_gb limits a CUDA GPU; it cannot be used with --device cpu")

    # -- derived ---------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        return technique_label(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len


def technique_label(cfg: TrialConfig) -> str:
    """The name a trial is known by, from its switches: baseline, bf16, bf16_flash, bf16_window16,
    gradcp, bf16_flash_gradcp, sac, bf16_flash_fusedce, bf16_flash_compile, fp32, ... (TF32 is the
    baseline precision and is left unsaid). Order: precision, attention, checkpointing, loss, compile."""
    parts: list[str] = []
    if cfg.precision != "tf32":
        parts.append(cfg.precision)
    if cfg.attention == "flash":
        parts.append("flash")
    elif cfg.attention == "window":
        parts.append(f"window{cfg.window}")
    parts.append(CHECKPOINTING_LABELS.get(cfg.checkpointing, f"gradcp-{cfg.checkpointing}"))
    parts.append(LOSS_LABELS.get(cfg.loss, cfg.loss))
    if cfg.compile:
        parts.append("compile")
    return "_".join(p for p in parts if p) or "baseline"
