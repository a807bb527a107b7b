"""One trial's configuration: a flat dataclass of switches, validated once at construction, free of torch.

Techniques are switches (`precision`, `attention`, `window`, `checkpointing`, `loss`, `compile`, and the LM
head's `loss_precision` and `tie_embeddings`);
the named techniques are presets over them (`contract.techniques.TECHNIQUES`). A preset only fills
switches left unset, so `{"technique": "flash", "checkpointing": "full"}` is FlashAttention plus
gradient checkpointing. The label a trial is known by (`bf16_flash_gradcp`) is derived from the
switches by `contract.technique_label`, never stored, so it cannot disagree with what ran.

This is the one place a trial's settings are validated: the sweep builds its grid from `TrialConfig`s
and repeats none of these checks. Checks that need the prepared dataset (`dataset_check.py`) or the
hardware (CUDA present, flash-attn installed) run at the start of the trial, still before any GPU work.
Field metadata (help, choices) is what `python -m trainable --help` shows (`contract.cli`).
"""
from __future__ import annotations

import difflib
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from contract.techniques import (
    ATTENTIONS, CHECKPOINTING, DEFAULT_SWITCHES, DEVICES, LOSS_PRECISIONS, LOSSES, PRECISIONS, SCHEDULES, TECHNIQUES,
    technique_label,
)

from .errors import ConfigError
from .kernels import CUDA_NEEDED, KERNELS, why_not

KERNEL_CHOICES = ("auto", *KERNELS)


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


def _choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}{_close(value, choices)}; choose from {', '.join(choices)}")


def _f(help: str, **meta: Any) -> dict[str, Any]:
    return {"help": help, **meta}


@dataclass
class TrialConfig:
    """Every knob of one training run. Switches left None come from `technique` (else baseline)."""

    # techniques as switches
    technique: str | None = field(default=None, metadata=_f("a named preset of switches", choices=tuple(TECHNIQUES),
                                                            metavar="NAME", default_help="unset: the baseline"))
    precision: str | None = field(default=None, metadata=_f("fp32 (strict), tf32 (TF32 matmuls) or bf16 autocast",
                                                            choices=PRECISIONS, default_help="from the technique"))
    attention: str | None = field(default=None, metadata=_f("standard (eager), flash (fused) or window (sliding)",
                                                            choices=ATTENTIONS, default_help="from the technique"))
    window: int | None = field(default=None, metadata=_f("sliding window W: query i sees keys j with i - W < j <= i",
                                                         metavar="W"))
    checkpointing: str | None = field(default=None, metadata=_f(
        "none, full (recompute every block) or selective (save matmul outputs)", choices=CHECKPOINTING,
        default_help="from the technique"))
    loss: str | None = field(default=None, metadata=_f("standard or fused_ce (never materialises the logits)",
                                                       choices=LOSSES, default_help="standard"))
    compile: bool | None = field(default=None, metadata=_f("torch.compile the model and loss",
                                                           default_help="from the technique, else off"))
    kernel: str = field(default="auto", metadata=_f("force one attention kernel", choices=KERNEL_CHOICES))
    loss_precision: str = field(default="fp32", metadata=_f(
        "the cross-entropy's precision: fp32 (upcast the logits) or compute (log-softmax and its gradient in the "
        "compute dtype, bf16: as when the loss runs outside autocast; bf16 runs only)", choices=LOSS_PRECISIONS))
    tie_embeddings: bool = field(default=True, metadata=_f(
        "share the input embedding with the LM head (--no-tie-embeddings: the head has its own V x d weight)"))
    # model (vocab_size None: the dataset's)
    n_layers: int = field(default=6, metadata=_f("transformer blocks"))
    d_model: int = field(default=512, metadata=_f("hidden size"))
    n_heads: int = field(default=8, metadata=_f("attention heads"))
    ff_dim: int = field(default=2048, metadata=_f("MLP hidden size"))
    seq_len: int = field(default=512, metadata=_f("tokens per training sequence (<= the dataset's rows)"))
    vocab_size: int | None = field(default=None, metadata=_f("vocabulary; must equal the dataset's",
                                                             default_help="the dataset's"))
    # optimisation
    batch_size: int = field(default=32, metadata=_f("sequences per step"))
    lr: float = field(default=3e-4, metadata=_f("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.1, metadata=_f("AdamW weight decay on matrices"))
    warmup_steps: int = field(default=100, metadata=_f("linear learning-rate warm-up steps"))
    schedule: str = field(default="cosine", metadata=_f("learning-rate schedule after warm-up", choices=SCHEDULES))
    min_lr_ratio: float = field(default=0.1, metadata=_f("final learning rate / peak (cosine)"))
    grad_clip: float = field(default=1.0, metadata=_f("gradient-norm clip; 0 disables it"))
    seed: int = field(default=0, metadata=_f("initial weights and data order"))
    # data and budget (no budget given: one epoch; several: the first one reached ends the run)
    data_dir: str | None = field(default=None, metadata=_f("prepared dataset directory (python -m data_prep prepare)",
                                                           flag="--data", metavar="DIR", default_help="required"))
    epochs: int | None = field(default=None, metadata=_f("passes over the training split",
                                                         default_help="1 when no budget is given"))
    max_steps: int | None = field(default=None, metadata=_f("optimizer steps"))
    max_tokens: int | None = field(default=None, metadata=_f("training tokens"))
    eval_interval: int = field(default=250, metadata=_f("steps between validations (0: only at the end)"))
    eval_batches: int = field(default=8, metadata=_f("validation = the first eval_batches x eval_batch_size val rows"))
    eval_batch_size: int = field(default=16, metadata=_f("rows per validation forward"))
    # hardware
    device: str = field(default="auto", metadata=_f("auto (CUDA when there is one), cuda or cpu", choices=DEVICES))
    gpu_memory_gb: float | None = field(default=None, metadata=_f(
        "cap this process's CUDA allocator at X GiB, emulating a smaller card", metavar="X"))
    checkpoint_interval: int = field(default=0, metadata=_f("steps between resumable checkpoints (0: off)",
                                                            metavar="STEPS"))
    checkpoint_minutes: float = field(default=0.0, metadata=_f("minutes between resumable checkpoints (0: off)",
                                                               metavar="MIN"))
    peak_flops: float | None = field(default=None, metadata=_f("the GPU's peak dense bf16 FLOP/s for MFU",
                                                               metavar="FLOPS", default_help="looked up by GPU name"))

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
            kind = str(f.type).split(" |")[0]
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
            if kind == "float" and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            setattr(self, f.name, value)

    # -- validation (pure: no torch, no files, no GPU) ---------------------------------------------
    def _validate(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("checkpointing", self.checkpointing, CHECKPOINTING)
        _choice("loss", self.loss, LOSSES)
        _choice("loss_precision", self.loss_precision, LOSS_PRECISIONS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("kernel", self.kernel, KERNEL_CHOICES)
        self._validate_model()
        self._validate_attention()
        self._validate_head()
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
            reason = why_not(KERNELS[self.kernel], self.attention, self.precision,
                             "cpu" if self.device == "cpu" else "cuda", check_installed=False)
            if reason:
                raise ConfigError(reason)

    def _validate_head(self) -> None:
        """loss_precision is a choice only where the compute dtype is not fp32 and the loss has a log-softmax
        to run in it; tie_embeddings composes with every other switch."""
        if self.loss_precision == "compute" and self.precision != "bf16":
            raise ConfigError(f"loss_precision 'compute' runs the loss in the compute dtype, which is fp32 on a "
                              f"{self.precision!r} run (the default already): use it with bf16 precision")
        if self.loss_precision == "compute" and self.loss == "fused_ce":
            raise ConfigError("loss_precision 'compute' is for the standard loss: fused_ce computes its softmax in "
                              "fp32 chunk by chunk (drop one of the two)")

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
        if not self.lr > 0:
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.grad_clip >= 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables it), got {self.grad_clip}")
        for name in ("warmup_steps", "eval_interval", "checkpoint_interval", "checkpoint_minutes"):
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
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise ConfigError(f"peak_flops must be a positive number of FLOP/s (e.g. 989.5e12), got {self.peak_flops}")
        if self.gpu_memory_gb is not None:
            if not self.gpu_memory_gb > 0:
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


__all__ = ["TrialConfig", "TECHNIQUES", "technique_label", "ATTENTIONS", "PRECISIONS", "KERNEL_CHOICES"]
