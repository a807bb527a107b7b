"""The trial's breakdown measurement: record one steady step's allocator history and replay it (`breakdown.py`).

`BreakdownProbe` is what the trial calls: it runs the first steady step of the process (the step after the
process's first, so the optimizer's states are resident, as in every later step) under a `StepRecorder`,
flags that step warm-up so the speed figures leave it out (the recording costs host time, not GPU memory), and
returns the breakdown keys for the final report: measured (NaN on CPU, or when no steady step ran) and
predicted by the memory model for the same config (NaN where the model does not cover it: torch.compile,
selective checkpointing).

`StepRecorder` records with Python stacks and leaves markers (tiny allocations the replay recognises and does
not count) where a stack cannot tell what an allocation is: when a gradient reaches a module's output (the
backward of that module's component starts), when autograd stores a parameter's `.grad`, when the residual
stream's gradient is complete, and which saved tensors are autocast's copies of the blocks' weights. Under
torch.compile no hooks are installed (they would change the compiled graphs): identity and stacks only.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .breakdown import (
    MARKER_FUNCTION, FrameRules, Marker, live_blocks, not_measured, parse_trace, predicted_keys, replay,
)

MAX_ENTRIES = 1 << 21  # far more events than one step makes; a full ring buffer means the record is incomplete
MATMUL_NODES = ("AddmmBackward0", "MmBackward0", "BmmBackward0")
assert MARKER_FUNCTION == "_emit_marker"


def project_rules() -> FrameRules:
    """FrameRules for this checkout: the line ranges of the model's attention and MLP classes."""
    import inspect

    from . import model

    ranges = {}
    for component, cls in (("act_attention", model.CausalSelfAttention), ("act_mlp", model.MLP)):
        lines, first = inspect.getsourcelines(cls)
        ranges[component] = (first, first + len(lines) - 1)
    return FrameRules(model_ranges=ranges)


def _emit_marker(device: torch.device) -> None:
    """One marker: an allocation (and free) the replay recognises by this function's name."""
    torch.empty(1, dtype=torch.uint8, device=device)


def _storage_ptr(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _weight_cast(node: Any, weight: Tensor) -> Tensor | None:
    """The bf16 cast of `weight` a Linear's matmul node saved, found from the Linear's output node."""
    todo, seen = deque([(node, 0)]), set()
    while todo:
        fn, depth = todo.popleft()
        if fn is None or id(fn) in seen or depth > 2:
            continue
        seen.add(id(fn))
        if fn.name() in MATMUL_NODES:
            for attr in ("_saved_mat2", "_saved_self", "_saved_other"):
                saved = getattr(fn, attr, None)
                if isinstance(saved, Tensor) and _is_cast_of(saved, weight):
                    return saved
        todo.extend((nxt, depth + 1) for nxt, _ in fn.next_functions)
    return None


def _is_cast_of(t: Tensor, weight: Tensor) -> bool:
    fn = t.grad_fn
    for _ in range(3):  # through a transpose / view to the cast
        if fn is None:
            return False
        if fn.name() == "ToCopyBackward0":
            source = fn.next_functions[0][0]
            return source is not None and getattr(source, "variable", None) is weight
        fn = fn.next_functions[0][0] if fn.next_functions else None
    return False


class StepRecorder:
    """Context manager: records one step on `device`; `result()` replays it (a `breakdown.Replay`)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *,
                 hooks: bool = True):
        self.model, self.optimizer, self.device, self.hooks = model, optimizer, device, hooks
        self.markers: list[Marker] = []
        self.snapshot: dict | None = None
        self._identities: dict[int, str] = {}
        self._handles: list[Any] = []
        self._main = threading.get_ident()

    # -- markers --
    def _mark(self, kind: str, component: str, ptr: int = 0) -> None:
        self.markers.append(Marker(kind, component, ptr))
        _emit_marker(self.device)

    def _on_main(self) -> bool:
        return threading.get_ident() == self._main

    # -- hooks --
    def _install(self) -> None:
        model = self.model
        for p in model.parameters():
            self._handles.append(p.register_post_accumulate_grad_hook(
                lambda p: self._mark("tag", "grads", _storage_ptr(p.grad))))
        contexts = [(model.ln_f, "act_norm"), (model.wte, "act_residual"), (model.wpe, "act_residual")]
        for block in model.blocks:
            contexts += [(block.ln_1, "act_norm"), (block.attn, "act_attention"), (block.ln_2, "act_norm"),
                         (block.mlp, "act_mlp")]
            if not getattr(block, "_checkpointed", False):  # reading a checkpointed node's saved tensors recomputes
                for linear in (m for m in block.modules() if isinstance(m, nn.Linear)):
                    self._handles.append(linear.register_forward_hook(self._tag_weight_copy))
        for module, component in contexts:
            self._handles.append(module.register_forward_hook(self._context_on_grad(component)))
        for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
            self._handles.append(norm.register_forward_pre_hook(self._residual_grad))

    def _context_on_grad(self, component: str) -> Callable:
        def hook(module, args, output):
            if self._on_main() and isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(lambda grad: self._mark("context", component))
        return hook

    def _residual_grad(self, module, args) -> None:
        x = args[0] if args else None
        if self._on_main() and isinstance(x, Tensor) and x.requires_grad:
            x.register_hook(lambda grad: self._mark("tag", "act_residual", _storage_ptr(grad)))

    def _tag_weight_copy(self, module, args, output) -> None:
        if self._on_main() and isinstance(output, Tensor) and output.grad_fn is not None and torch.is_autocast_enabled(
                self.device.type):
            cast = _weight_cast(output.grad_fn, module.weight)
            if cast is not None:
                self._mark("tag", "weight_copies", _storage_ptr(cast))

    # -- recording --
    def start(self) -> "StepRecorder":
        record = torch.cuda.memory._record_memory_history
        try:
            record("all", context="alloc", stacks="python", max_entries=MAX_ENTRIES, clear_history=True)
        except TypeError:  # a torch without clear_history
            record("all", context="alloc", stacks="python", max_entries=MAX_ENTRIES)
        self._mark("context", "logits_loss")  # where this record starts (older entries are dropped)
        if self.hooks:
            self._install()
        return self

    def stop(self, completed: bool, quiet: bool = False) -> None:
        """Remove the hooks, keep the record (when the step completed) and what it needs, stop recording."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        try:
            if completed:
                self.snapshot = torch.cuda.memory._snapshot(self.device)
                self._identities = self.identities()
        except Exception as exc:  # noqa: BLE001 - a measurement never fails the step it measured
            self.snapshot = None
            _not_measured(exc)
        finally:
            try:
                torch.cuda.memory._record_memory_history(None)
            except Exception as exc:  # noqa: BLE001
                if not quiet:
                    _not_measured(exc)
            self.model = self.optimizer = None  # the record must not keep the model alive

    def __enter__(self) -> "StepRecorder":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(completed=exc[0] is None)

    def identities(self) -> dict[int, str]:
        """Data pointers of what lives throughout the step: parameters and optimizer states."""
        if self.model is None:
            return self._identities
        ids = {_storage_ptr(p): "params" for p in self.model.parameters()}
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor) and value.is_cuda:
                    ids[_storage_ptr(value)] = "optimizer"
        return ids

    def result(self, rules: FrameRules | None = None):
        """The replayed peak (None when nothing usable was recorded)."""
        if self.snapshot is None:
            return None
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        trace = self.snapshot["device_traces"][index]
        if len(trace) >= MAX_ENTRIES:
            return None
        events = parse_trace(trace)
        marker_at = [i for i, e in enumerate(events) if e.action == "alloc"
                     and any(f.name == MARKER_FUNCTION for f in e.frames)]
        if len(marker_at) < len(self.markers) or not self.markers:
            return None
        start = marker_at[-len(self.markers)]  # this record's first marker (a kept older history comes before it)
        segments = [s for s in self.snapshot["segments"] if s.get("device", index) == index]
        live, reserved = live_blocks(segments)
        result = replay(events[start:], live, self.markers, rules or project_rules(), reserved_at_end=reserved,
                        identities=self.identities())
        return result if result.markers_matched else None


class BreakdownProbe:
    """The trial's breakdown: predicted once from the config, measured on the first steady step on CUDA.

    The replay runs when the report is asked for (the final report), so its host time falls in no timed step.
    A recording that fails leaves the measured side NaN with one line on stderr; it never fails the trial.
    """

    def __init__(self, cfg: Any, vocab_size: int, kernel: str, device: torch.device):
        self.device = device
        self.compile = bool(cfg.compile)
        self.recorder: StepRecorder | None = None
        self.measured: dict[str, Any] | None = None
        self.done = device.type != "cuda"
        self.predicted = predicted_breakdown(cfg, vocab_size, kernel if device.type == "cuda" else None)

    def step(self, train_step: Callable, step: int, first_step: int, inputs: Tensor, targets: Tensor,
             model: nn.Module, optimizer: torch.optim.Optimizer):
        """`train_step(step, inputs, targets)`, recorded when it is the process's first steady step."""
        if self.done or step != first_step + 1:
            return train_step(step, inputs, targets)
        self.done = True
        recorder = StepRecorder(model, optimizer, self.device, hooks=not self.compile)
        try:
            recorder.start()
        except Exception as exc:  # noqa: BLE001 - a measurement never fails the trial
            _not_measured(exc)
            recorder.stop(completed=False, quiet=True)
            return train_step(step, inputs, targets)
        completed = False
        try:
            record = train_step(step, inputs, targets)
            completed = True
        finally:
            recorder.stop(completed)
        self.recorder = recorder
        record.warmup = True  # the recording's host work is not the trial's speed
        return record

    def report(self) -> dict[str, Any]:
        """Every breakdown key: predicted, and measured when a step was recorded (else NaN)."""
        if self.recorder is not None:
            recorder, self.recorder = self.recorder, None
            try:
                result = recorder.result()
                self.measured = result.report() if result is not None else None
            except Exception as exc:  # noqa: BLE001
                _not_measured(exc)
        return {**not_measured(), **self.predicted, **(self.measured or {})}


def _not_measured(exc: BaseException) -> None:
    import sys

    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    print(f"breakdown: where the memory goes was not measured ({type(exc).__name__}: {line})", file=sys.stderr)


def predicted_breakdown(cfg: Any, vocab_size: int, kernel: str | None) -> dict[str, float]:
    """The memory model's breakdown of `cfg` on a CUDA GPU with `kernel` (None: the one it would select there)."""
    from .memory_model import predict_peak_memory

    if getattr(cfg, "compile", False):
        return predicted_keys(None, math.nan)  # not modelled: the eager prediction is only an upper bound
    overrides: dict[str, Any] = {"vocab_size": vocab_size, "device": "cuda"}
    if kernel is not None:
        overrides["attention_kernel"] = kernel
    try:
        bd = predict_peak_memory(cfg, **overrides)
    except ValueError:  # a config the memory model does not cover (e.g. selective checkpointing)
        return predicted_keys(None, math.nan)
    return predicted_keys(bd.components_mib, bd.slack_mib)
