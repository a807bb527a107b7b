"""Numeric precision as a policy: what matmuls may use (TF32) and what autocast runs in.

fp32: strict IEEE fp32 everywhere (TF32 off), the reference.
tf32: fp32 weights and math, but CUDA matmuls/convolutions may use TF32 tensor cores (the baseline).
bf16: autocast to bfloat16 with fp32 master weights and fp32 optimizer state; the few ops autocast
      keeps in fp32 may use TF32.
TF32 only exists on CUDA, so on CPU fp32 and tf32 compute the same thing and `tf32` reports False.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    autocast_dtype: torch.dtype | None  # None: no autocast
    allow_tf32: bool

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or torch.float32

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Autocast context for forward passes (a no-op when this precision has none)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def tf32_active(self, device_type: str) -> bool:
        return self.allow_tf32 and device_type == "cuda"


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        Precision("fp32", None, allow_tf32=False),
        Precision("tf32", None, allow_tf32=True),
        Precision("bf16", torch.bfloat16, allow_tf32=True),
    )
}


@contextlib.contextmanager
def tf32_matmuls(allowed: bool) -> Iterator[None]:
    """Allow or forbid TF32 for CUDA matmuls and cuDNN for the duration, then restore the old setting."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32, cudnn.allow_tf32 = allowed, allowed
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
