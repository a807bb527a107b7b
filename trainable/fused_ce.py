"""Fused linear + cross-entropy loss that never materialises the full N x V logits.

The LM head and its loss are usually the largest single activation of a small GPT: for
N = batch * seq_len tokens and a vocabulary V the standard path keeps the logits (N x V, bf16 or
fp32), an fp32 log-softmax copy and, in backward, a gradient of the same size. This module
computes the loss *and both gradients* chunk by chunk during the forward pass:

    for each chunk c of tokens:
        logits_c      = hidden_c @ weight.T                   (compute dtype, e.g. bf16)
        loss_c        = logsumexp(logits_c) - logits_c[target] (fp32)
        grad_logits_c = (softmax(logits_c) - onehot) / n_valid (fp32, then compute dtype)
        grad_hidden_c = grad_logits_c @ weight
        grad_weight  += grad_logits_c.T @ hidden_c             (accumulated in fp32)

and backward only scales the stored gradients by `grad_output`. The matmul FLOPs equal the
standard loss (forward 1x, backward 2x, nothing recomputed); the extra memory is one chunk of
logits plus grad_hidden (N x d) and grad_weight (V x d, fp32) held from forward to backward.
The same idea underlies Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut Cross-Entropy
(Wijmans et al. 2024), which go further with custom kernels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

ChunkFn = Callable[[Tensor, Tensor, Tensor, Tensor, int, bool], tuple[Tensor, Tensor | None, Tensor | None]]


def chunk_loss_and_grads(
    hidden_c: Tensor, weight: Tensor, targets_c: Tensor, grad_scale: Tensor, ignore_index: int, need_grads: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed CE of one token chunk and, if asked, its gradients w.r.t. hidden_c and weight.

    `hidden_c` and `weight` are already in the compute dtype; `grad_scale` is 1 / n_valid (a 0-d
    tensor, so the compiled version does not specialise on it). Softmax/CE math runs in fp32; the
    gradient is cast back to the compute dtype for the two matmuls, as autocast would do.
    Separate and side-effect free so that it can be handed to torch.compile.
    """
    logits = (hidden_c @ weight.T).float()  # C x V, the only chunk-sized buffers live here
    valid = targets_c != ignore_index
    safe_targets = torch.where(valid, targets_c, torch.zeros_like(targets_c))
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss_sum = ((lse - target_logit) * valid).sum()
    if not need_grads:
        return loss_sum, None, None
    probs = logits.sub_(lse[:, None]).exp_()  # in place: reuse the fp32 logits buffer
    probs.scatter_add_(1, safe_targets[:, None], -valid[:, None].to(probs.dtype))
    row_scale = valid.to(probs.dtype) * grad_scale
    grad_logits = probs.mul_(row_scale[:, None]).to(hidden_c.dtype)
    grad_hidden_c = grad_logits @ weight
    grad_weight_c = grad_logits.T @ hidden_c
    return loss_sum, grad_hidden_c, grad_weight_c


_compiled_chunk_fn: ChunkFn | None = None


def _compiled_chunk() -> ChunkFn:
    """torch.compile'd chunk body, built on first use (compilation is slow and CUDA-only here)."""
    global _compiled_chunk_fn
    if _compiled_chunk_fn is None:
        _compiled_chunk_fn = torch.compile(chunk_loss_and_grads, fullgraph=True)  # a graph break is a bug
    return _compiled_chunk_fn


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean CE of `hidden @ weight.T` against `targets`; gradients are computed in forward."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        compute_dtype: torch.dtype,
        chunk_size: int,
        ignore_index: int,
        chunk_fn: ChunkFn,
    ) -> Tensor:
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        n_tokens = hidden.shape[0]
        n_valid = (targets != ignore_index).sum()
        grad_scale = 1.0 / n_valid.clamp_min(1).to(torch.float32)
        w = weight.to(compute_dtype)  # one V x d copy, as autocast makes for the standard head
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=compute_dtype, device=hidden.device) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n_tokens, chunk_size):
                end = min(start + chunk_size, n_tokens)
                h_c = hidden[start:end].to(compute_dtype)
                loss_c, grad_h_c, grad_w_c = chunk_fn(h_c, w, targets[start:end], grad_scale, ignore_index, need_grads)
                loss_sum += loss_c
                if need_grads:
                    grad_hidden[start:end] = grad_h_c
                    grad_weight += grad_w_c
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)  # None entries are fine
        return loss_sum / n_valid  # NaN when every target is ignored, like F.cross_entropy

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_hidden * grad_output).to(ctx.hidden_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_weight * grad_output).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype the standard `F.linear` would run in: autocast's, else the promoted input dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    chunk_size: int = 8192,
    ignore_index: int = -100,
    compiled: bool = False,
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (hidden [..., d], weight [V, d], targets [...]).

    Equals `F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore_index)` but keeps at
    most `chunk_size` x V logits alive. `compiled=True` compiles the chunk body with torch.compile
    (CUDA only; ignored on other devices). Works under autocast (logits in the autocast dtype,
    softmax in fp32) and with tied embeddings (autograd sums the head and embedding gradients).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[-1] != weight.shape[-1] or hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    chunk_fn = _compiled_chunk() if compiled and hidden.is_cuda else chunk_loss_and_grads
    return FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        targets.reshape(-1),
        _compute_dtype(hidden, weight),
        chunk_size,
        ignore_index,
        chunk_fn,
    )
