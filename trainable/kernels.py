"""Which attention kernel a trial runs: the kernels' requirements and the preference order, without torch.

The kernels themselves (torch functions) live in `attention.py`; this table says what each needs, so a
config is validated, and the memory model knows the kernel, on a machine that never imports torch (the
Ray driver, `--predict`). Kernels do not fall back silently: a requested kernel that cannot run is an error.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from .errors import ConfigError

FLASH_INSTALL_HINT = "pip install 'memeff-sweep[flash]'"
CUDA_NEEDED = "flash attention needs a CUDA GPU; use --device cuda or technique bf16"


@dataclass(frozen=True)
class KernelSpec:
    """What one attention kernel can run and needs."""

    name: str
    attentions: tuple[str, ...]  # which `attention` switches it runs
    needs_cuda: bool = False
    needs_bf16: bool = False
    package: str | None = None  # an optional dependency it imports (checked without importing it)
    install_hint: str | None = None

    def available(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None


KERNELS: dict[str, KernelSpec] = {k.name: k for k in (
    KernelSpec("eager", ("standard", "window")),
    KernelSpec("sdpa", ("standard", "window")),
    KernelSpec("sdpa_flash", ("flash",), needs_cuda=True, needs_bf16=True),
    KernelSpec("flash_attn", ("flash", "window"), needs_cuda=True, needs_bf16=True, package="flash_attn",
               install_hint=FLASH_INSTALL_HINT),
    KernelSpec("flex", ("window",), needs_cuda=True),
)}

# First eligible kernel wins ("auto"). Exact causal attention for `standard` stays eager on purpose:
# the baseline is the memory-hungry textbook kernel the memory-efficient ones are measured against.
KERNEL_PREFERENCE: dict[str, tuple[str, ...]] = {
    "standard": ("eager",),
    "flash": ("flash_attn", "sdpa_flash"),
    "window": ("flash_attn", "flex", "eager"),
}


def why_not(kernel: KernelSpec, attention: str, precision: str, device_type: str, *,
            check_installed: bool = True) -> str | None:
    """Why `kernel` cannot run here (one line), or None when it can."""
    if attention not in kernel.attentions:
        return f"kernel {kernel.name!r} cannot run {attention!r} attention"
    if kernel.needs_cuda and device_type != "cuda":
        return CUDA_NEEDED
    if kernel.needs_bf16 and precision != "bf16":
        return f"kernel {kernel.name!r} needs bf16 precision, got {precision!r}"
    if check_installed and not kernel.available():
        return f"kernel {kernel.name!r} is not installed: {kernel.install_hint}"
    return None


def select_kernel_name(attention: str, precision: str, device_type: str, requested: str = "auto") -> str:
    """The kernel a trial runs: `requested` if it can run here, else the first eligible preference."""
    if requested != "auto":
        if requested not in KERNELS:
            raise ConfigError(f"unknown kernel {requested!r}; choose from auto, {', '.join(KERNELS)}")
        reason = why_not(KERNELS[requested], attention, precision, device_type)
        if reason:
            raise ConfigError(reason)
        return requested
    reasons = []
    for name in KERNEL_PREFERENCE[attention]:
        reason = why_not(KERNELS[name], attention, precision, device_type)
        if reason is None:
            return name
        reasons.append(reason)
    raise ConfigError(CUDA_NEEDED if CUDA_NEEDED in reasons else reasons[0])
