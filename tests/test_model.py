"""The decoder and its policies on tiny models with synthetic tokens (CPU)."""
from __future__ import annotations

import pytest
import torch

from trainable import ATTENTION_BACKENDS, GPT, LOSSES, ModelConfig, apply_checkpointing
from trainable.losses import standard_cross_entropy

TINY = ModelConfig(vocab_size=97, seq_len=32, n_layers=2, d_model=32, n_heads=4, ff_dim=64)

pytestmark = pytest.mark.usefixtures("one_thread")



def build(seed=0, kernel="eager", window=None, checkpointing="none", cfg=TINY) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg, ATTENTION_BACKENDS[kernel].bind(window))
    return apply_checkpointing(model, checkpointing)


def tokens(seed=0, batch=4, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def train_losses(model: GPT, steps=4, autocast=False) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x, y = tokens(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = standard_cross_entropy(model(x), model.output_weight, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_default_config_is_the_seed_model():
    c = ModelConfig(vocab_size=1000)
    assert (c.n_layers, c.d_model, c.n_heads, c.ff_dim, c.seq_len) == (6, 512, 8, 2048, 512)


def test_embeddings_are_tied_and_counted_once():
    model = build()
    assert model.output_weight is model.wte.weight
    V, T, d, f, L = TINY.vocab_size, TINY.seq_len, TINY.d_model, TINY.ff_dim, TINY.n_layers
    per_block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * f + f) + (f * d + d)
    assert model.num_params() == V * d + T * d + L * per_block + 2 * d  # no separate (V, d) head


def test_same_seed_same_weights_for_every_technique():
    ref = build(seed=3).state_dict()
    for model in (build(seed=3, kernel="sdpa"), build(seed=3, checkpointing="full"), build(seed=3, window=4)):
        state = model.state_dict()
        assert state.keys() == ref.keys()
        assert all(torch.equal(state[k], ref[k]) for k in ref)
    assert not torch.equal(build(seed=4).wte.weight, ref["wte.weight"])


def test_initial_loss_is_near_uniform():
    x, y = tokens()
    loss = standard_cross_entropy(build()(x), build().output_weight, y)
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.2


def test_loss_equals_cross_entropy_of_logits():
    model = build()
    x, y = tokens()
    hidden = model(x)
    expected = torch.nn.functional.cross_entropy(model.logits(hidden).flatten(0, 1), y.flatten())
    torch.testing.assert_close(LOSSES["standard"](hidden, model.output_weight, y), expected)


@pytest.mark.parametrize("window", [None, 4])
def test_causal_future_tokens_do_not_leak(window):
    model = build(window=window)
    x, _ = tokens()
    changed = x.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], atol=0, rtol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_window_limits_what_a_position_sees():
    model = build(window=4)
    x, _ = tokens()
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(x), model(changed)
    # 2 layers of a 4-key window: position 0 reaches at most position 2 * (4 - 1) = 6
    torch.testing.assert_close(a[:, 7:], b[:, 7:], atol=0, rtol=0)
    assert not torch.allclose(a[:, 6], b[:, 6])


@pytest.mark.parametrize("autocast", [False, True])
def test_gradient_checkpointing_leaves_every_loss_unchanged(autocast):
    plain = train_losses(build(seed=1), autocast=autocast)
    checkpointed = train_losses(build(seed=1, checkpointing="full"), autocast=autocast)
    assert plain == pytest.approx(checkpointed, rel=1e-6, abs=1e-6)


def test_full_checkpointing_recomputes_each_block_in_backward():
    def forward_calls(model: GPT) -> int:
        calls = []
        for block in model.blocks:
            block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
        x, y = tokens()
        standard_cross_entropy(model(x), model.output_weight, y).backward()
        return len(calls)

    assert forward_calls(build()) == TINY.n_layers
    assert forward_calls(build(checkpointing="full")) == 2 * TINY.n_layers


def test_sequence_longer_than_model_is_an_error():
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        build()(torch.zeros(1, TINY.seq_len + 1, dtype=torch.long))
