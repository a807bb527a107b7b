"""The fused linear + CE loss equals the standard loss (value and gradients) without N x V tensors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from trainable.fused_ce import fused_linear_cross_entropy

N, D, V = 96, 16, 200


def _inputs(seed: int = 0, n: int = N, ignore_every: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    return hidden, weight, targets


def _loss_and_grads(loss_fn, hidden, weight, targets):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(h, w, targets)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def _standard(h, w, t):
    return F.cross_entropy(h @ w.T, t, ignore_index=-100)


def _assert_close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() / scale <= rtol, f"max rel err {((a - b).abs().max() / scale).item():.2e}"


@pytest.mark.parametrize("chunk_size", [32, 40, 1, 96, 1000])  # divides N, doesn't, per-token, whole, larger
@pytest.mark.parametrize("ignore_every", [0, 5])
def test_matches_standard_fp32(chunk_size, ignore_every):
    hidden, weight, targets = _inputs(ignore_every=ignore_every)
    expected = _loss_and_grads(_standard, hidden, weight, targets)
    fused = _loss_and_grads(
        lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size), hidden, weight, targets
    )
    for got, want in zip(fused, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        _assert_close(got, want, rtol=1e-5)


def test_grad_output_scaling_and_3d_input():
    hidden, weight, targets = _inputs()
    h3, t2 = hidden.detach().view(4, 24, D), targets.view(4, 24)
    expected = _loss_and_grads(lambda h, w, t: 3.0 * _standard(h.view(-1, D), w, t.view(-1)), h3, weight, t2)
    fused = _loss_and_grads(lambda h, w, t: 3.0 * fused_linear_cross_entropy(h, w, t, chunk_size=17), h3, weight, t2)
    for got, want in zip(fused, expected):
        assert got.shape == want.shape
        _assert_close(got, want, rtol=1e-5)


def test_all_ignored_gives_nan_loss_and_zero_grads():
    hidden, weight, targets = _inputs()
    targets[:] = -100
    loss, grad_h, grad_w = _loss_and_grads(
        lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=32), hidden, weight, targets
    )
    assert torch.isnan(loss) and torch.isnan(_standard(hidden, weight, targets))
    assert not grad_h.any() and not grad_w.any()


def test_no_grad_path_returns_loss_only():
    hidden, weight, targets = _inputs()
    with torch.no_grad():
        got = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=32)
        want = _standard(hidden, weight, targets)
    _assert_close(got, want, rtol=1e-5)


class _TiedLM(torch.nn.Module):
    """A toy tied-embedding LM: the head reuses the input embedding matrix."""

    def __init__(self, vocab: int = V, dim: int = D):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def hidden(self, tokens):
        return self.norm(torch.tanh(self.mix(self.embed(tokens))))


def test_tied_embedding_model_end_to_end():
    torch.manual_seed(0)
    model = _TiedLM()
    tokens = torch.randint(0, V, (3, 32))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = -100

    def grads(loss_fn):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model.hidden(tokens), model.embed.weight, targets)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    want_loss, want = grads(lambda h, w, t: F.cross_entropy((h @ w.T).view(-1, V), t.view(-1)))
    got_loss, got = grads(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=20))
    _assert_close(got_loss, want_loss, rtol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        _assert_close(got[name], want[name], rtol=1e-5)


def _cpu_autocast_bf16_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    except RuntimeError:
        return False


@pytest.mark.skipif(not _cpu_autocast_bf16_works(), reason="CPU autocast bf16 unavailable")
def test_bf16_autocast_close_to_standard():
    hidden, weight, targets = _inputs(ignore_every=7)

    def under_autocast(fn):
        def run(h, w, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(h, w, t)

        return run

    exact = _loss_and_grads(_standard, hidden, weight, targets)  # fp32 reference
    std = _loss_and_grads(under_autocast(lambda h, w, t: F.cross_entropy(F.linear(h, w), t)), hidden, weight, targets)
    fused = _loss_and_grads(
        under_autocast(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=40)), hidden, weight, targets
    )
    assert fused[0].dtype == torch.float32
    assert fused[1].dtype == hidden.dtype and fused[2].dtype == weight.dtype  # grads match the inputs
    for got, ref, want in zip(fused, std, exact):
        _assert_close(got, ref, rtol=2e-2)  # same bf16 rounding regime as the autocast standard loss
        _assert_close(got, want, rtol=2e-2)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.mark.parametrize("autocast", [False, True])
def test_never_creates_an_n_by_v_tensor(autocast):
    hidden, weight, targets = _inputs(n=N, ignore_every=9)
    chunk = 16

    def peak_numel(loss_fn) -> int:
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with _MaxNumel() as mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss_fn(h, w, targets).backward()
        return mode.max_numel

    assert peak_numel(_standard) >= N * V  # the probe does see the standard loss's logits
    fused_peak = peak_numel(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=chunk))
    assert fused_peak < N * V
    assert fused_peak <= max(chunk * V, V * D, N * D)  # one chunk of logits, the weight, the hidden


@pytest.mark.cuda
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_matches_standard_and_saves_memory(compiled):
    """On the GPU: same loss/grads as the autocast standard loss, and a much lower peak."""
    device = torch.device("cuda")
    n, d, v = 4096, 64, 8192
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, device=device, generator=g)
    weight = 0.1 * torch.randn(v, d, device=device, generator=g)
    targets = torch.randint(0, v, (n,), device=device, generator=g)

    def run(loss_fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(h, w, targets)
        loss.backward()
        return (loss.detach(), h.grad, w.grad), torch.cuda.max_memory_allocated(device) - before

    std, std_peak = run(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t))
    fused, fused_peak = run(lambda h, w, t: fused_linear_cross_entropy(h, w, t, chunk_size=512, compiled=compiled))
    for got, want in zip(fused, std):
        _assert_close(got, want, rtol=2e-2)
    assert fused_peak < std_peak / 2
