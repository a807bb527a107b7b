"""is_oom_error: what counts as running out of memory (the sweep's max-batch search relies on it)."""
from __future__ import annotations

import pytest
import torch

from trainable import is_oom_error


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.35 GiB total capacity)"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("cusolver error: CUSOLVER_STATUS_ALLOC_FAILED, when calling `cusolverDnCreate(handle)`"),
        RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to "
                     "allocate 1125899906842624 bytes."),
        torch.AcceleratorError("CUDA error: out of memory"),
    ],
)
def test_allocation_failures_are_oom(exc):
    assert is_oom_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x8)"),
        RuntimeError("CUDA error: device-side assert triggered"),
        ValueError("out of memory"),  # not a runtime failure: somebody's message, not an allocator's
        MemoryError(),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_oom(exc):
    assert not is_oom_error(exc)


def test_wrapped_oom_counts_but_an_error_while_handling_one_does_not():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise RuntimeError("compilation failed") from oom  # e.g. torch.compile's wrapper
    except RuntimeError as wrapped:
        assert is_oom_error(wrapped)
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise KeyError("bug in a handler")  # implicit context only
    except KeyError as bug:
        assert not is_oom_error(bug)


def test_a_real_allocator_failure_is_oom():
    with pytest.raises(RuntimeError) as info:
        torch.empty(1 << 50, dtype=torch.uint8)
    assert is_oom_error(info.value)
