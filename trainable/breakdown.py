"""Where the memory goes, measured: replay one step's allocator history and attribute what is live at its peak.

The CUDA caching allocator can record every allocation and free with the Python stack that made it
(`torch.cuda.memory._record_memory_history`). `breakdown_probe.py` records one training step that way; this
module (no torch) turns the record into the step's peak split into `contract.keys.MEMORY_COMPONENTS`:

1. The blocks live when recording began are rebuilt from the snapshot taken after the step (its live blocks,
   with every alloc of the trace undone and every free redone, newest first).
2. Replaying the events from there finds the event at which allocated bytes peaked and the blocks live then;
   their sizes sum to that peak, so the components do too (what is not attributed is `other`).
3. Each live block gets a component, first rule that applies:
   * a tag: identity, from the recorder's markers or the live-at-start identity sets (the parameters, the
     optimizer's states, a parameter's `.grad` when autograd stores it, autocast's weight copies saved for
     backward, the residual stream's gradient);
   * its stack: allocated under losses.py / fused_ce.py (logits_loss), attention.py or the model's attention
     (act_attention), its MLP (act_mlp), a LayerNorm called by the model (act_norm), elsewhere in the model's
     blocks (the residual adds, the embeddings: act_residual), the optimizer (optimizer);
   * allocated in backward with no such stack (autograd's own thread): the component whose backward was
     running, which the recorder marks as gradients reach each module's output (the loss first);
   * else `other` (workspaces, the batch, cached masks, anything compiled).

Sizes: the trace gives each request's size; a block counts it rounded up to 512 bytes, which is what
`max_memory_allocated` counts, except where the allocator hands out a cached large block up to 1 MiB bigger than
the request (it splits a block only when more than 1 MiB would be left): such a block reads up to 1 MiB short.
In a steady step every request finds the block its twin used in the step before, so this is rare.

The recorder's markers are tiny allocations made by `MARKER_FUNCTION`, recognised by that frame and paired in
order with the recorder's list of what each one means; they are not counted. The phase of an allocation is
forward until the first one made by backward (autograd's gradient seed, or a frameless allocation), then
backward until the first made by gradient clipping or the optimizer. The convention each component follows is
the memory model's (`memory_terms.py`), so measured and predicted components compare one to one.
"""
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from contract.keys import BREAKDOWN_KEYS, MEMORY_COMPONENTS

MIB = float(1 << 20)
BLOCK_ROUNDING = 512  # the caching allocator rounds every request up to a multiple of 512 bytes
MARKER_FUNCTION = "_emit_marker"
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class Frame:
    filename: str
    line: int
    name: str


@dataclass(frozen=True)
class Event:
    """One allocator trace entry: alloc, free_requested, free_completed, segment_alloc, segment_free, ..."""

    action: str
    addr: int
    size: int
    frames: tuple[Frame, ...] = ()


@dataclass(frozen=True)
class Marker:
    """What the recorder meant by one marker: `context` (backward of `component` starts) or `tag` (the block at
    `ptr` is `component`)."""

    kind: str
    component: str
    ptr: int = 0


@dataclass
class Block:
    addr: int
    size: int
    frames: tuple[Frame, ...] = ()
    phase: str = "forward"
    context: str | None = None  # the backward context when it was allocated
    tag: str | None = None
    live_at_start: bool = False


@dataclass
class Replay:
    """The peak of a recorded step, by component (bytes)."""

    components: dict[str, float]
    peak_bytes: float
    reserved_at_peak: float
    phase: str
    events: int
    blocks_at_peak: list[Block] = field(default_factory=list)
    markers_matched: bool = True  # every marker the recorder made was found in the trace, in order

    def report(self) -> dict[str, float | str]:
        """The measured half of the breakdown keys."""
        out: dict[str, float | str] = {f"measured_{c}_mib": self.components.get(c, 0.0) / MIB for c in MEMORY_COMPONENTS}
        out["measured_slack_mib"] = (self.reserved_at_peak - self.peak_bytes) / MIB
        out["breakdown_peak_mib"] = self.peak_bytes / MIB
        out["breakdown_phase"] = self.phase
        return out


def block_size(size: int) -> int:
    """What an allocation of `size` bytes counts in `max_memory_allocated`."""
    return max(BLOCK_ROUNDING, -(-int(size) // BLOCK_ROUNDING) * BLOCK_ROUNDING)


# -- attribution by stack ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameRules:
    """Which component a stack belongs to. `model_ranges`: component -> (first, last) line of the model's
    classes (attention, MLP) in `model_file`; the other files are matched by their path's ending."""

    model_file: str = "trainable/model.py"
    model_ranges: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    loss_files: tuple[str, ...] = ("trainable/losses.py", "trainable/fused_ce.py")
    attention_files: tuple[str, ...] = ("trainable/attention.py",)
    norm_files: tuple[str, ...] = ("torch/nn/modules/normalization.py",)
    optimizer_files: tuple[str, ...] = ("torch/optim/",)
    backward_files: tuple[str, ...] = ("torch/autograd/__init__.py",)
    clip_files: tuple[str, ...] = ("torch/nn/utils/clip_grad.py",)

    @staticmethod
    def _in(frame: Frame, endings: Sequence[str]) -> bool:
        name = frame.filename.replace("\\", "/")
        return any(name.endswith(e) or (e.endswith("/") and e in name) for e in endings)

    def component(self, frames: Sequence[Frame]) -> str | None:
        """The component of an allocation made under `frames` (any order), or None when they say nothing."""
        if any(self._in(f, self.loss_files) for f in frames):
            return "logits_loss"
        if any(self._in(f, self.attention_files) for f in frames):
            return "act_attention"
        model = [f for f in frames if self._in(f, (self.model_file,))]
        if model:
            for component, (first, last) in self.model_ranges.items():
                if any(first <= f.line <= last for f in model):
                    return component
            if any(f.name == "logits" for f in model):
                return "logits_loss"
            return "act_norm" if any(self._in(f, self.norm_files) for f in frames) else "act_residual"
        if any(self._in(f, self.optimizer_files) for f in frames):
            return "optimizer"
        return None

    def phase_after(self, phase: str, frames: Sequence[Frame]) -> str:
        """The phase of a step after an allocation made under `frames` (phases only move forward)."""
        if phase == "forward" and (not frames or any(self._in(f, self.backward_files) for f in frames)):
            return "backward"
        if phase != "optimizer" and any(self._in(f, self.optimizer_files + self.clip_files) for f in frames):
            return "optimizer"
        return phase


def is_marker(event: Event) -> bool:
    return event.action == "alloc" and any(f.name == MARKER_FUNCTION for f in event.frames)


# -- replay ------------------------------------------------------------------------------------------


def blocks_at_start(events: Sequence[Event], live_at_end: Mapping[int, Block]) -> dict[int, Block]:
    """The blocks live when recording began: the end state with the trace undone, newest event first."""
    state = {addr: Block(b.addr, b.size, b.frames, live_at_start=True) for addr, b in live_at_end.items()}
    for event in reversed(events):
        if event.action == "alloc":
            state.pop(event.addr, None)
        elif event.action == "free_requested":
            state[event.addr] = Block(event.addr, block_size(event.size), live_at_start=True)
    return state


def reserved_at_start(events: Sequence[Event], reserved_at_end: float) -> float:
    reserved = float(reserved_at_end)
    for event in events:
        if event.action == "segment_alloc":
            reserved -= event.size
        elif event.action == "segment_free":
            reserved += event.size
    return reserved


def tag_identities(blocks: Mapping[int, Block], identities: Mapping[int, str]) -> None:
    """Tag each block that holds one of `identities` (data pointer -> component), e.g. parameters."""
    starts = sorted(blocks)
    for ptr, component in identities.items():
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < starts[i] + blocks[starts[i]].size:
            blocks[starts[i]].tag = component


def _find(live: Mapping[int, Block], ptr: int) -> Block | None:
    block = live.get(ptr)
    if block is not None:
        return block
    return next((b for b in live.values() if b.addr <= ptr < b.addr + b.size), None)


def replay(events: Sequence[Event], live_at_end: Mapping[int, Block], markers: Sequence[Marker],
           rules: FrameRules, *, reserved_at_end: float = math.nan,
           identities: Mapping[int, str] | None = None) -> Replay:
    """The recorded step's peak and what was live at it, attributed (see the module docstring).

    `events`: the trace, oldest first; `live_at_end`: the blocks live after it (address -> Block);
    `markers`: the recorder's markers, in the order it made them; `identities`: data pointers of tensors live
    throughout (parameters, optimizer states) -> component. Tags made after the peak still apply to the blocks
    live at it (a gradient is tagged when autograd stores it, after it was allocated).
    """
    start = blocks_at_start(events, live_at_end)
    tag_identities(start, identities or {})
    live = dict(start)
    lifetimes: list[list] = [[b, -1, math.inf] for b in live.values()]  # [block, allocated at, freed at]
    open_at: dict[int, list] = {row[0].addr: row for row in lifetimes}
    current = float(sum(b.size for b in live.values()))
    reserved = reserved_at_start(events, reserved_at_end)
    peak, peak_at, peak_reserved, peak_phase = current, -1, reserved, "forward"
    phase, context, queue, seen = "forward", "logits_loss", list(markers), 0
    marker_blocks: set[int] = set()
    for i, event in enumerate(events):
        if is_marker(event):
            marker_blocks.add(event.addr)
            seen += 1
            if queue:
                marker = queue.pop(0)
                if marker.kind == "context":
                    context = marker.component
                elif (target := _find(live, marker.ptr)) is not None:
                    target.tag = marker.component
        elif event.action == "alloc":
            phase = rules.phase_after(phase, event.frames)
            block = Block(event.addr, block_size(event.size), event.frames, phase,
                          context if phase == "backward" else None)
            live[event.addr] = block
            open_at[event.addr] = row = [block, i, math.inf]
            lifetimes.append(row)
            current += block.size
            if current > peak:
                peak, peak_at, peak_reserved, peak_phase = current, i, reserved, phase
        elif event.action == "free_requested":
            if event.addr in marker_blocks:
                marker_blocks.discard(event.addr)
            elif (block := live.pop(event.addr, None)) is not None:
                current -= block.size
                open_at.pop(event.addr)[2] = i
        elif event.action == "segment_alloc":
            reserved += event.size
        elif event.action == "segment_free":
            reserved -= event.size
    at_peak = [b for b, born, freed in lifetimes if born <= peak_at < freed]
    components = {c: 0.0 for c in MEMORY_COMPONENTS}
    for block in at_peak:
        components[attribute(block, rules)] += block.size
    return Replay(components, peak, peak_reserved, peak_phase, len(events), at_peak,
                  markers_matched=seen == len(markers))


def attribute(block: Block, rules: FrameRules) -> str:
    """The component of one live block (first rule that applies, see the module docstring)."""
    if block.tag is not None:
        return block.tag
    by_stack = rules.component(block.frames)
    if by_stack is not None:
        return by_stack
    if block.phase == "backward" and block.context is not None:
        return block.context
    return "other"


# -- the breakdown keys ------------------------------------------------------------------------------


def not_measured() -> dict[str, float | str | None]:
    """Every breakdown key unknown: NaN (the phase None)."""
    return {k: (None if k == "breakdown_phase" else math.nan) for k in BREAKDOWN_KEYS}


def predicted_keys(components_mib: Mapping[str, float] | None, slack_mib: float) -> dict[str, float]:
    """The predicted half of the breakdown keys (NaN when the memory model does not cover the config)."""
    if components_mib is None:
        return {**{f"predicted_{c}_mib": math.nan for c in MEMORY_COMPONENTS}, "predicted_slack_mib": math.nan}
    return {**{f"predicted_{c}_mib": float(components_mib.get(c, 0.0)) for c in MEMORY_COMPONENTS},
            "predicted_slack_mib": float(slack_mib)}


def parse_trace(entries: Iterable[Mapping]) -> list[Event]:
    """Events from `torch.cuda.memory._snapshot()["device_traces"][device]`."""
    return [Event(e["action"], int(e.get("addr", 0)), int(e.get("size", 0)), parse_frames(e.get("frames") or ()))
            for e in entries]


def parse_frames(frames: Iterable[Mapping]) -> tuple[Frame, ...]:
    return tuple(Frame(str(f.get("filename", "")), int(f.get("line", 0)), str(f.get("name", ""))) for f in frames)


def live_blocks(segments: Iterable[Mapping]) -> tuple[dict[int, Block], float]:
    """(blocks allocated now, reserved bytes) from a snapshot's segments."""
    live: dict[int, Block] = {}
    reserved = 0.0
    for segment in segments:
        reserved += segment["total_size"]
        for b in segment.get("blocks", ()):
            if b.get("state") == "active_allocated":
                live[int(b["address"])] = Block(int(b["address"]), int(b["size"]), parse_frames(b.get("frames") or ()))
    return live, reserved
