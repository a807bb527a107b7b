"""Training losses in a small registry, all with one signature.

A loss takes the final hidden states (B, T, d), the output-embedding weight (V, d) and the targets
(B, T), and returns the mean token loss as a 0-d fp32 tensor. Taking hidden states instead of
logits lets a fused linear + cross-entropy loss (one that never materialises the B x T x V logits)
register here without touching the model.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from .fused_ce import fused_linear_cross_entropy

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def standard_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """Logits in the compute dtype (bf16 under autocast), cross entropy over them in fp32."""
    logits = F.linear(hidden, weight)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


LOSSES: dict[str, LossFn] = {
    "standard": standard_cross_entropy,
    # chunked LM head + CE that never materialises the N x V logits (fused_ce.py)
    "fused_ce": fused_linear_cross_entropy,
}
