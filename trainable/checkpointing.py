"""Gradient (activation) checkpointing as a policy applied to a built model.

The model has no checkpointing branches: a policy from `CHECKPOINTING` rewires an existing model
in place. "full" recomputes every transformer block in backward (only each block's input is kept).
A new policy (e.g. "selective": every other block, or attention only) is one function plus one
registry entry; `TrialConfig` accepts whatever names the registry has.

Policies replace a block's `forward` on the instance, so parameter names and `state_dict` keys are
identical with and without checkpointing (same initial weights, interchangeable checkpoints).
"""
from __future__ import annotations

import functools
from typing import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

Policy = Callable[[nn.Module], nn.Module]


def no_checkpointing(model: nn.Module) -> nn.Module:
    """Keep every activation (the baseline)."""
    return model


def checkpoint_module(module: nn.Module) -> None:
    """Make `module(x)` keep only its inputs and recompute its insides during backward."""
    if getattr(module, "_checkpointed", False):
        return
    inner = module.forward
    module.forward = functools.partial(checkpoint, inner, use_reentrant=False)
    module._checkpointed = True


def full_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint every transformer block (`model.blocks`)."""
    for block in model.blocks:
        checkpoint_module(block)
    return model


CHECKPOINTING: dict[str, Policy] = {
    "none": no_checkpointing,
    "full": full_checkpointing,
}


def apply_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Apply the checkpointing policy `mode` to `model` (in place; returned for chaining)."""
    return CHECKPOINTING[mode](model)
