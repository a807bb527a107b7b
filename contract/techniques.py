"""The technique vocabulary: switches, their values, the named presets, and the label derived from them.

A technique is a set of switches (`precision`, `attention`, `window`, `checkpointing`, `loss`, `compile`, and the
two training choices of the LM head: `loss_precision`, `tie_embeddings`).
The named techniques (`baseline`, `flash`, `window`, `gradcp`, ...) are presets over them. A trial's *label*
(`bf16_window16`, `bf16_flash_sac_fusedce_compile`) is derived from the switches, never stored apart from
them, so it cannot disagree with what ran; its *family* is the label with the attention switches taken out
(`bf16_window16` -> `bf16`), which is what a windowed trial is compared against.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

PRECISIONS = ("fp32", "tf32", "bf16")  # fp32: strict IEEE; tf32: TF32 matmuls (the baseline); bf16: autocast
ATTENTIONS = ("standard", "flash", "window")  # exact eager; exact fused; sliding window of `window` keys
CHECKPOINTING = ("none", "full", "selective")  # keep all; recompute every block; keep matmul outputs only
LOSSES = ("standard", "fused_ce")  # logits then cross-entropy; chunked linear + CE that never holds the logits
# fp32: upcast the logits before the cross-entropy (the default); compute: log-softmax and its gradient in the
# compute dtype (bf16 under autocast), as when the loss runs outside autocast. Meaningful on bf16 runs only.
LOSS_PRECISIONS = ("fp32", "compute")
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cuda", "cpu")

# The seed's techniques (baseline, bf16, flash, window, gradcp), the combinations the sweep uses, and the
# newer techniques: selective activation checkpointing (sac), fused linear cross-entropy, torch.compile.
TECHNIQUES: dict[str, dict[str, str | bool]] = {
    "baseline": {"precision": "tf32", "attention": "standard", "checkpointing": "none"},
    "fp32": {"precision": "fp32", "attention": "standard", "checkpointing": "none"},
    "bf16": {"precision": "bf16", "attention": "standard", "checkpointing": "none"},
    "flash": {"precision": "bf16", "attention": "flash", "checkpointing": "none"},
    "window": {"precision": "bf16", "attention": "window", "checkpointing": "none"},
    "gradcp": {"precision": "tf32", "attention": "standard", "checkpointing": "full"},
    "bf16_gradcp": {"precision": "bf16", "attention": "standard", "checkpointing": "full"},
    "flash_gradcp": {"precision": "bf16", "attention": "flash", "checkpointing": "full"},
    "window_gradcp": {"precision": "bf16", "attention": "window", "checkpointing": "full"},
    "sac": {"precision": "tf32", "attention": "standard", "checkpointing": "selective"},
    "flash_sac": {"precision": "bf16", "attention": "flash", "checkpointing": "selective"},
    "fused_ce": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "loss": "fused_ce"},
    "flash_compile": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "compile": True},
    "window_compile": {"precision": "bf16", "attention": "window", "checkpointing": "none", "compile": True},
    "fused_ce_compile": {"precision": "bf16", "attention": "flash", "checkpointing": "none", "loss": "fused_ce",
                         "compile": True},
}
# What a switch is when neither the config nor its preset sets it: the baseline.
DEFAULT_SWITCHES: dict[str, str | bool] = {**TECHNIQUES["baseline"], "loss": "standard", "compile": False}
# Label parts of non-default switch values (other values are spelled out: gradcp-<mode>, the loss name).
CHECKPOINTING_LABELS = {"none": "", "full": "gradcp", "selective": "sac"}
LOSS_LABELS = {"standard": "", "fused_ce": "fusedce"}
UNTIED_LABEL = "untied"  # tie_embeddings=False: the LM head has its own V x d weight
BASELINE_LABELS = ("baseline", "fp32")  # the FP32/TF32 references savings and speed-ups are measured against


def is_windowed(technique: str) -> bool:
    """Whether a named preset uses sliding-window attention (so a window size goes with it)."""
    return TECHNIQUES.get(technique, {}).get("attention") == "window"


WINDOWED_TECHNIQUES = tuple(t for t in TECHNIQUES if is_windowed(t))


@dataclass(frozen=True)
class Switches:
    """The switches that make a technique; everything a label is derived from."""

    precision: str = "tf32"
    attention: str = "standard"
    window: int | None = None
    checkpointing: str = "none"
    loss: str = "standard"
    compile: bool = False
    loss_precision: str = "fp32"
    tie_embeddings: bool = True

    @classmethod
    def of(cls, source: Any) -> "Switches":
        """The switches of a config object or a flat dict (missing ones: the baseline's)."""
        get = source.get if isinstance(source, Mapping) else lambda k, d=None: getattr(source, k, d)
        values = {name: get(name) for name in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if v is not None})


def technique_label(source: Any) -> str:
    """The name a trial is known by, from its switches: baseline, bf16, bf16_flash, bf16_window16, gradcp,
    bf16_flash_gradcp, sac, bf16_flash_fusedce, bf16_flash_compile, fp32, bf16_flash_bf16loss_untied, ... (TF32 is
    the baseline precision and is left unsaid; default switches add nothing). Order: precision, attention,
    checkpointing, loss, loss precision (`<precision>loss` when the loss runs in the compute dtype), head
    (`untied`), compile."""
    s = source if isinstance(source, Switches) else Switches.of(source)
    parts: list[str] = [s.precision if s.precision != "tf32" else ""]
    if s.attention == "flash":
        parts.append("flash")
    elif s.attention == "window":
        parts.append(f"window{s.window}")
    parts.append(CHECKPOINTING_LABELS.get(s.checkpointing, f"gradcp-{s.checkpointing}"))
    parts.append(LOSS_LABELS.get(s.loss, s.loss))
    if s.loss_precision != "fp32":
        parts.append(f"{s.precision}loss" if s.loss_precision == "compute" else f"loss{s.loss_precision}")
    if not s.tie_embeddings:
        parts.append(UNTIED_LABEL)
    if s.compile:
        parts.append("compile")
    return "_".join(p for p in parts if p) or "baseline"


def technique_family(source: Any) -> str:
    """The label without its attention part: a windowed trial's full-attention counterpart (`bf16_window16`
    -> `bf16`), every other trial's own label with flash left out."""
    s = source if isinstance(source, Switches) else Switches.of(source)
    return technique_label(replace(s, attention="standard", window=None))
