"""Is this exception an allocation failure? Torch-free, so the Ray driver can classify a failed probe.

Allocation failures that reach Python as a plain RuntimeError rather than torch.OutOfMemoryError:
"CUDA error: out of memory" (kernel launches, cudaMalloc outside the caching allocator),
"CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)" and its cuDNN/cuSOLVER/cuSPARSE
siblings (a library workspace that no longer fits), cuFFT's own spelling, and the CPU allocator.
"""
from __future__ import annotations

OOM_MARKERS = (
    "out of memory",
    "status_alloc_failed",
    "cufft_alloc_failed",
    "can't allocate memory",
)


def is_oom_text(message: str) -> bool:
    message = message.lower()
    return any(marker in message for marker in OOM_MARKERS)


def is_oom_error(exc: BaseException | None) -> bool:
    """True when `exc` (or an exception it was explicitly raised from) is an allocation failure.

    Only `__cause__` is followed (`raise X from oom`, as torch.compile does), not `__context__`: a
    different error raised while handling an OOM is a bug, not a memory result.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if any(c.__name__ == "OutOfMemoryError" and c.__module__.startswith("torch") for c in type(exc).__mro__):
            return True
        if isinstance(exc, RuntimeError) and is_oom_text(str(exc)):
            return True
        exc = exc.__cause__
    return False
