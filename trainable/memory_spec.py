"""The shape of one training step as the memory model sees it, and the byte sizes it is built from (no torch).

`MemorySpec` is everything `trainable.memory_model` needs to predict a step's peak: the model's dimensions, the
batch, and the switches that change what is kept (precision, attention kernel, checkpointing, loss, the loss's
precision, tied or untied LM head). `KERNEL_MEMORY` says what each attention kernel keeps for backward.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MIB = float(1 << 20)
FP32 = 4
RESIDUAL_BYTES = FP32  # the residual stream stays fp32 under autocast (fp32 embeddings + bf16 branch = fp32)
INDEX_BYTES = 8  # int64 token ids / targets kept by embedding and nll_loss backward
PRECISION_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2}
CHECKPOINTING_MODES = ("none", "full")
LOSS_HEAD_NAMES = ("standard", "fused_ce")
LOSS_PRECISIONS = ("fp32", "compute")


@dataclass(frozen=True)
class KernelMemory:
    """What an attention kernel keeps for backward beyond q, k, v."""

    materialises_scores: bool  # keeps the (b, a, s, s) probabilities
    output_copies: int  # 1: output feeds the projection as a view; 2: the projection saves a contiguous copy
    saves_logsumexp: bool


KERNEL_MEMORY: dict[str, KernelMemory] = {
    "eager": KernelMemory(materialises_scores=True, output_copies=1, saves_logsumexp=False),
    "sdpa": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    "sdpa_flash": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    "flash_attn": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
    # Measured on an H200 (torch 2.11, docs/results/memory_model_h200.md): flex's output feeds the projection
    # without a copy, its window peaks equal SDPA flash's to the MiB.
    "flex": KernelMemory(materialises_scores=False, output_copies=1, saves_logsumexp=True),
}


@dataclass(frozen=True)
class MemorySpec:
    """The shape of one training step, everything the memory model needs (validated on creation)."""

    n_layers: int
    d_model: int
    n_heads: int
    ff_dim: int
    seq_len: int
    vocab_size: int
    batch_size: int
    precision: str = "tf32"
    kernel: str = "eager"
    window: int | None = None
    checkpointing: str = "none"
    loss: str = "standard"
    device: str = "cuda"
    chunk_size: int = 8192  # fused CE tokens per chunk
    loss_precision: str = "fp32"  # fp32: logits upcast before the log-softmax; compute: log-softmax in compute dtype
    tie_embeddings: bool = True  # False: the LM head has its own V x d weight

    def __post_init__(self) -> None:
        for name in ("n_layers", "d_model", "n_heads", "ff_dim", "seq_len", "vocab_size", "batch_size", "chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name, value, choices in (("precision", self.precision, PRECISION_BYTES),
                                     ("attention kernel", self.kernel, KERNEL_MEMORY),
                                     ("checkpointing", self.checkpointing, CHECKPOINTING_MODES),
                                     ("loss", self.loss, LOSS_HEAD_NAMES),
                                     ("loss_precision", self.loss_precision, LOSS_PRECISIONS)):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(choices)}")

    @property
    def compute_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    @property
    def loss_bytes(self) -> int:
        """Bytes per element of the log-probabilities and their gradient."""
        return FP32 if self.loss_precision == "fp32" else self.compute_bytes

    @property
    def autocast(self) -> bool:
        return self.precision == "bf16"

    @property
    def activation_key(self) -> str:
        """Which calibrated activation multiplier applies: precision family / kernel / checkpointing."""
        family = "bf16" if self.autocast else "fp32"
        return f"{family}/{self.kernel}/{self.checkpointing}"

    @property
    def kernel_memory(self) -> KernelMemory:
        return KERNEL_MEMORY[self.kernel]

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def with_batch_size(self, batch_size: int) -> "MemorySpec":
        return dataclasses.replace(self, batch_size=batch_size)
