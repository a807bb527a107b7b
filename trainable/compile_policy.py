"""torch.compile as a policy over a built model and its loss, and a watch on compilation work.

Like checkpointing, compilation is applied after the model is built (and after its checkpointing
policy, which it composes with: non-reentrant and selective checkpointing are traced into the graph),
and the model has no branches for it. What gets compiled is the training forward: the model plus
the loss in ONE graph, so inductor can fuse the final LayerNorm, the LM head and the cross-entropy.
A loss with its own compiled implementation (`SELF_COMPILED_LOSSES`: the fused CE's chunk body)
is called as such after the compiled model instead, so its chunk loop is not unrolled into the graph.

The uncompiled model stays the one that is evaluated and checkpointed (validation runs eagerly:
eval mode and no-grad would otherwise compile a second graph; `state_dict` keys are unchanged).
Compilation happens during the first step(s); `CompileWatch` tells the trial which steps compiled
so they can be reported as warm-up and kept out of the steady-state throughput.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .fused_ce import fused_linear_cross_entropy
from .losses import LossFn

ForwardLoss = Callable[[Tensor, Tensor], Tensor]  # (inputs, targets) -> mean token loss

# Losses that compile their own insides when the `compile` switch is on (on CUDA).
SELF_COMPILED_LOSSES: dict[str, LossFn] = {
    "fused_ce": functools.partial(fused_linear_cross_entropy, compiled=True),
}


def forward_loss(model: nn.Module, loss_fn: LossFn) -> ForwardLoss:
    """inputs, targets -> loss, through `model` and the tied LM head in `loss_fn`."""
    def forward_and_loss(inputs: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(model(inputs), model.output_weight, targets)
    return forward_and_loss


def compiled_forward_loss(model: nn.Module, loss_name: str, loss_fn: LossFn) -> ForwardLoss:
    """The compiled training forward of `model` + `loss_fn` (static shapes: the batch never changes)."""
    if loss_name in SELF_COMPILED_LOSSES:
        return forward_loss(torch.compile(model, dynamic=False), SELF_COMPILED_LOSSES[loss_name])
    return torch.compile(forward_loss(model, loss_fn), dynamic=False)


def build_forward_loss(model: nn.Module, loss_name: str, loss_fn: LossFn, compile: bool) -> ForwardLoss:
    return compiled_forward_loss(model, loss_name, loss_fn) if compile else forward_loss(model, loss_fn)


def release_compiled() -> None:
    """Drop dynamo's caches: they are keyed by code object, so the next trial in this process would
    otherwise count against the recompile limit (and they keep the graphs' memory). Nothing to drop when
    nothing compiled since the last reset: the fused AdamW imports dynamo without compiling. On an H200, reused
    eager workers that reset that untouched dynamo between trials died of SIGSEGV in 4 of 8 hand-overs, and in
    none of 9 once the reset was skipped (docs/results/startup_h200.md)."""
    if "torch._dynamo" not in sys.modules:
        return
    frames = _frames_compiled()
    if frames == _FRAMES_AT_RESET[0]:
        return
    torch._dynamo.reset()
    _FRAMES_AT_RESET[0] = frames


_FRAMES_AT_RESET = [0]  # dynamo's frame count at this process's last reset


def _frames_compiled() -> int:
    """Frames dynamo has processed in this process (its counters survive `torch._dynamo.reset`)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"].get("total", 0))


class CompileWatch:
    """Counts torch.compile work (new graphs and lazily compiled backward graphs) while active, and
    the host seconds spent in it, through dynamo's compilation callbacks.

    `available` is False on a torch without those callbacks (the trial then treats the first step as
    the compiling one), and when the watch is not `active`: a run that compiles nothing never imports dynamo.
    """

    def __init__(self, active: bool = True) -> None:
        self.active = active  # off for runs that never compile: importing dynamo costs a trial 2-4 s of CPU
        self.events = 0
        self.seconds = 0.0
        self.available = False
        self._t0: float | None = None
        self._handler: Any = None

    def __enter__(self) -> "CompileWatch":
        if not self.active:
            return self
        try:
            from torch._dynamo.callback import callback_handler
        except ImportError:
            return self
        callback_handler.register_start_callback(self._on_start)
        callback_handler.register_end_callback(self._on_end)
        self._handler, self.available = callback_handler, True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handler is None:
            return
        for name, callback in (("remove_start_callback", self._on_start), ("remove_end_callback", self._on_end)):
            remove = getattr(self._handler, name, None)
            if remove is not None:
                try:
                    remove(callback)
                except ValueError:
                    pass
        self._handler = None

    def _on_start(self, *_: object) -> None:
        self.events += 1
        self._t0 = time.perf_counter()

    def _on_end(self, *_: object) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
