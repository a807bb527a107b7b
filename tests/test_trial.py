"""run_trial on the shipped sample (tiny model, CPU): contract keys, fairness, checkpoint resume, OOM."""
from __future__ import annotations

import math

import pytest
import torch

from contract.keys import keys_of
from helpers import losses, run, tiny
from trainable import LOSSES, ConfigError, DirectoryCheckpointIO, run_trial
from trainable.losses import standard_cross_entropy

STEP_KEYS = set(keys_of("step"))
FACT_KEYS = set(keys_of("fact"))
FINAL_KEYS = set(keys_of("final"))
MEM_KEYS = {k for k in STEP_KEYS if k.startswith("mem_")}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_step_reports_the_contract_keys(sample_dataset):
    reports, final = run(tiny(sample_dataset))
    assert [r["step"] for r in reports] == [1, 2, 3, 4, 5, 6]
    for r in reports:
        assert STEP_KEYS | FACT_KEYS <= r.keys()
        assert set(r) <= STEP_KEYS | FACT_KEYS | FINAL_KEYS | set(keys_of("eval"))  # nothing outside the contract
        assert r["oom"] is False and math.isfinite(r["loss"]) and r["step_time_s"] > 0
        assert r["tokens_seen"] == r["step"] * 4 * 64 and r["tokens_per_s"] == pytest.approx(256 / r["step_time_s"])
        assert all(math.isnan(r[k]) for k in MEM_KEYS)  # CPU: memory is not measured -> NaN
        assert r["label"] == "baseline" and r["attention_kernel"] == "eager" and r["device"] == "cpu"
        assert r["dtype"] == "float32" and r["tf32"] is False and r["family"] == "baseline"
    assert [r["step"] for r in reports if "val_loss" in r] == [3, 6]  # eval_interval and the end
    assert final is reports[-1] and final["final"] is True and final["status"] == "ok"
    assert FINAL_KEYS <= final.keys() and final["wall_tokens_per_s"] > 0 and final["setup_time_s"] > 0
    assert final["val_ppl"] == pytest.approx(math.exp(final["val_loss"]))
    assert final["train_time_s"] > 0 and "final" not in reports[0]
    assert reports[0]["lr"] == pytest.approx(1.5e-3)  # warm-up 1/2 of lr


def test_same_seed_same_curve_and_different_seed_differs(sample_dataset):
    a, _ = run(tiny(sample_dataset, max_steps=4, eval_interval=0))
    b, _ = run(tiny(sample_dataset, max_steps=4, eval_interval=0))
    c, _ = run(tiny(sample_dataset, max_steps=4, eval_interval=0, seed=1))
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_gradient_checkpointing_leaves_the_curve_unchanged(sample_dataset):
    plain, p_final = run(tiny(sample_dataset, max_steps=4))
    ckpt, c_final = run(tiny(sample_dataset, max_steps=4, technique="gradcp"))
    assert losses(plain) == pytest.approx(losses(ckpt), rel=1e-6)
    assert p_final["val_loss"] == pytest.approx(c_final["val_loss"], rel=1e-6)
    assert c_final["label"] == "gradcp"


def test_window_on_cpu_runs_eager_with_a_window_mask(sample_dataset):
    reports, final = run(tiny(sample_dataset, technique="window", window=16, max_steps=2))
    assert final["label"] == "bf16_window16" and final["attention_kernel"] == "eager"
    assert final["dtype"] == "bfloat16" and final["family"] == "bf16" and math.isfinite(final["loss"])


def test_validation_uses_the_same_rows_at_every_batch_size(sample_dataset):
    """Before any training step counts, val_loss depends on the weights only: batch size 2 vs 8 with lr ~ 0."""
    _, a = run(tiny(sample_dataset, batch_size=2, max_steps=1, lr=1e-12))
    _, b = run(tiny(sample_dataset, batch_size=8, max_steps=1, lr=1e-12))
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6)


def test_budget_by_tokens_and_epochs(sample_dataset):
    reports, _ = run(tiny(sample_dataset, max_steps=None, max_tokens=3 * 256 - 10, eval_interval=0))
    assert len(reports) == 3


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(sample_dataset, tmp_path):
    cfg = tiny(sample_dataset, max_steps=8, checkpoint_interval=3, eval_interval=4)
    uninterrupted, final = run(cfg)

    class Preempted(Exception):
        pass

    first: list[dict] = []

    def crash_at_step_5(metrics):
        if metrics["step"] == 5:
            raise Preempted
        first.append(metrics)

    io = DirectoryCheckpointIO(tmp_path / "ckpt")
    with pytest.raises(Preempted):
        run_trial(cfg, crash_at_step_5, checkpoint_io=io)
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    resumed, resumed_final = run(cfg, checkpoint_io=io)  # last checkpoint: step 3
    history = [m for m in first if m["step"] <= 3] + resumed
    assert [m["step"] for m in history] == list(range(1, 9))  # no gap, no duplicate
    assert losses(history) == losses(uninterrupted)
    assert [m.get("val_loss") for m in history] == [m.get("val_loss") for m in uninterrupted]
    assert resumed_final["loss"] == final["loss"] and resumed_final["val_loss"] == final["val_loss"]
    assert resumed_final["tokens_seen"] == final["tokens_seen"]


def test_resume_refuses_a_checkpoint_of_another_config(sample_dataset, tmp_path):
    io = DirectoryCheckpointIO(tmp_path)
    run(tiny(sample_dataset, max_steps=2, checkpoint_interval=1), checkpoint_io=io)
    with pytest.raises(ConfigError, match="differs in: lr"):
        run(tiny(sample_dataset, max_steps=2, lr=1e-3), checkpoint_io=io)


@pytest.mark.parametrize(("fail_in", "phase", "reported"), [("train", "forward", [1, 2, 3]), ("eval", "eval", [1, 2, 3])])
def test_allocation_failure_is_a_result_not_a_crash(sample_dataset, monkeypatch, fail_in, phase, reported):
    """A real allocator failure (CPU allocator, 1 PiB) in the loss ends the trial as an OOM result:
    at the third training forward, or in the first validation (step 3)."""
    calls: list[int] = []

    def loss_that_runs_out_of_memory(hidden, weight, targets):
        training = torch.is_grad_enabled()
        calls.append(1) if training else None
        if (fail_in == "train" and training and len(calls) == 3) or (fail_in == "eval" and not training):
            torch.empty(1 << 50, dtype=torch.uint8)
        return standard_cross_entropy(hidden, weight, targets)

    monkeypatch.setitem(LOSSES, "standard", loss_that_runs_out_of_memory)
    reports, final = run(tiny(sample_dataset, eval_interval=3))
    assert [r["step"] for r in reports] == reported  # steps before it, then the OOM report
    assert final is reports[-1] and final["oom"] is True and final["status"] == "oom" and final["final"] is True
    assert final["oom_phase"] == phase and math.isnan(final["loss"])
    assert "can't allocate memory" in final["oom_message"] and STEP_KEYS | FACT_KEYS <= final.keys()


def test_other_errors_propagate(sample_dataset, monkeypatch):
    def broken(hidden, weight, targets):
        raise ValueError("a bug, not a memory result")

    monkeypatch.setitem(LOSSES, "standard", broken)
    with pytest.raises(ValueError, match="a bug"):
        run(tiny(sample_dataset))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vocab_size": 1000}, "vocab_size 1000 does not match the dataset's 512"),
        ({"seq_len": 128}, "seq_len 128 is longer than the dataset's rows"),
        ({"batch_size": 100_000}, "batch size 100000 is larger than the train split"),
        ({"technique": "flash", "device": "auto"}, "flash attention needs a CUDA GPU"),
    ],
)
def test_rejected_against_the_dataset_or_hardware(sample_dataset, overrides, message):
    if overrides.get("device") == "auto" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(ConfigError, match=message):
        run(tiny(sample_dataset, **overrides))


def test_missing_or_invalid_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run(tiny(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="not a prepared dataset"):
        run(tiny(tmp_path))
