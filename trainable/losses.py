"""Training losses in a small registry, all with one signature.

A loss takes the final hidden states (B, T, d), the output-embedding weight (V, d) and the targets
(B, T), and returns the mean token loss as a 0-d fp32 tensor. Taking hidden states instead of
logits lets a fused linear + cross-entropy loss (one that never materialises the B x T x V logits)
register here without touching the model.

The loss's precision is a switch of its own (`loss_precision`, `loss_for`): by default the logits are upcast
to fp32 before the log-softmax; `compute` keeps the log-softmax and its gradient in the compute dtype (bf16
under autocast), which is what a loss computed outside the autocast region does: 6 instead of 12 bytes per
logit at the start of backward (the memory model's `standard_head`).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_ce import fused_linear_cross_entropy

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def standard_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Logits in the compute dtype (bf16 under autocast), cross entropy over them in fp32."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def compute_dtype_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Logits, log-softmax and its gradient all in the compute dtype (bf16 under autocast, whose fp32 list would
    otherwise upcast the cross-entropy); only the mean over tokens is taken in fp32, so the reported loss is not
    rounded to bf16 (a per-token vector: nothing of the logits' size)."""
    logits = F.linear(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        per_token = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return per_token.float().mean()


LOSSES: dict[str, LossFn] = {
    "standard": standard_cross_entropy,
    # chunked LM head + CE that never materialises the N x V logits (fused_ce.py)
    "fused_ce": fused_linear_cross_entropy,
}

# The same losses with `loss_precision="compute"` (TrialConfig refuses it for fused_ce, whose softmax is fp32).
COMPUTE_DTYPE_LOSSES: dict[str, LossFn] = {"standard": compute_dtype_cross_entropy}


def loss_for(loss: str, loss_precision: str = "fp32") -> LossFn:
    """The loss a trial trains with: the `loss` switch at its `loss_precision`."""
    return COMPUTE_DTYPE_LOSSES[loss] if loss_precision == "compute" else LOSSES[loss]
