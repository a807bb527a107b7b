"""Gradient (activation) checkpointing as a policy applied to a built model.

The model has no checkpointing branches: a policy from `CHECKPOINTING` rewires an existing model
in place. "full" recomputes every transformer block in backward (only each block's input is kept).
"selective" (selective activation checkpointing, SAC) also checkpoints every block, but keeps the
outputs of the expensive ops (matmuls and attention kernels, `SAVED_OPS`) and recomputes only the
cheap ones (LayerNorm, GELU, adds, softmax/masking, casts, views): most of full checkpointing's
memory saving on the elementwise activations, without re-running a single matmul in backward.
A new policy is one function plus one registry entry; `TrialConfig` accepts whatever names the
registry has.

Policies replace a block's `forward` on the instance, so parameter names and `state_dict` keys are
identical with and without checkpointing (same initial weights, interchangeable checkpoints). All
policies use non-reentrant checkpointing, so they also work inside a torch.compile'd model.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

Policy = Callable[[nn.Module], nn.Module]

# Ops whose outputs selective checkpointing keeps, by name (aten overloads as "aten::mm", higher-order
# ops and custom ops by their registered name), so an op missing from one torch build costs nothing.
SAVED_OPS: frozenset[str] = frozenset({
    # matmuls (nn.Linear lowers to addmm/mm, eager attention's q @ k^T and p @ v to bmm)
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
    # fused attention kernels (SDPA backends, the flex higher-order op, flash_attn's custom op)
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "flex_attention", "flash_attn::_flash_attn_forward",
    # a torch.compile'd region called inside the block (the compiled flex kernel in an eager model)
    "inductor_compiled_code",
})


def op_name(op: Any) -> str:
    """`aten::mm` for an aten overload, the registered name for higher-order and custom ops."""
    schema = getattr(op, "_schema", None)
    if schema is not None:
        return schema.name
    return getattr(op, "__name__", None) or str(op)


def save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul and attention outputs (expensive to recompute), recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op_name(op) in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def no_checkpointing(model: nn.Module) -> nn.Module:
    """Keep every activation (the baseline)."""
    return model


def checkpoint_module(module: nn.Module, context_fn: Callable | None = None) -> None:
    """Make `module(x)` keep only its inputs (plus what `context_fn`'s policy saves) and recompute
    the rest during backward."""
    if getattr(module, "_checkpointed", False):
        return
    inner = module.forward
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    module.forward = functools.partial(checkpoint, inner, use_reentrant=False, **extra)
    module._checkpointed = True


def full_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every transformer block (`model.blocks`)."""
    for block in model.blocks:
        checkpoint_module(block)
    return model


def selective_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every block, but save matmul/attention outputs (`save_matmuls_policy`)."""
    context_fn = functools.partial(create_selective_checkpoint_contexts, save_matmuls_policy)
    for block in model.blocks:
        checkpoint_module(block, context_fn)
    return model


CHECKPOINTING: dict[str, Policy] = {
    "none": no_checkpointing,
    "full": full_checkpointing,
    "selective": selective_checkpointing,
}


def apply_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Apply the checkpointing policy `mode` to `model` (in place; returned for chaining)."""
    return CHECKPOINTING[mode](model)
