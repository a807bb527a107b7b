"""CUDA: the LM head's switches at the seed report's model, measured against the memory model (skipped without a GPU).

The seed report's model (4 layers, d_model 256, 8 heads, FFN 1024, seq_len 256, GPT-2's vocabulary 50,257) at
batch 32, random tokens. For every technique and each switch and combination (loss_precision fp32 | compute,
tied | untied head), `run_trial` trains two steps; the second step's measured peak (max_memory_allocated over the
step, reset per phase) must match the memory model within 2%. Each trial's val_ppl is printed (random tokens:
only the order of magnitude means anything; the seed-report sweep measures the real effect).

    pytest -m cuda tests/test_cuda_switches.py -s        # ~1.5 min on an H200
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from trainable import TrialConfig
from trainable.memory_model import predict_peak_memory

pytestmark = pytest.mark.cuda
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 50257
SEED_REPORT = dict(n_layers=4, d_model=256, n_heads=8, ff_dim=1024, seq_len=256)
TECHNIQUES = ("baseline", "bf16", "flash", "window", "gradcp", "bf16_gradcp", "fused_ce")
BF16_STANDARD = ("bf16", "flash", "window", "bf16_gradcp")  # where the loss precision is a choice
CASES = [(t, lp, tie) for t in TECHNIQUES for tie in (True, False)
         for lp in (("fp32", "compute") if t in BF16_STANDARD else ("fp32",))]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_trainable", ROOT / "bench" / "bench_trainable.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report_data(tmp_path_factory) -> Path:
    """Random tokens at GPT-2's vocabulary, rows of 257 tokens (memory does not depend on the text)."""
    root = tmp_path_factory.mktemp("seed_report_data")
    return _load_bench().write_synthetic_dataset(root, vocab_size=VOCAB, seq_len=256, rows={"train": 128, "val": 16})


def _config(data: Path, technique: str, loss_precision: str = "fp32", tie: bool = True, **kw) -> TrialConfig:
    window = {"window": 16} if technique == "window" else {}
    return TrialConfig.from_dict({"technique": technique, "data_dir": str(data), "batch_size": 32, "max_steps": 2,
                                  "warmup_steps": 1, "eval_interval": 0, "eval_batches": 1, "eval_batch_size": 16,
                                  "loss_precision": loss_precision, "tie_embeddings": tie, **SEED_REPORT, **window,
                                  **kw})


def _run(cfg: TrialConfig) -> tuple[list[dict], dict]:
    from trainable import run_trial

    reports: list[dict] = []
    final = run_trial(cfg, reports.append)
    return reports, final


@pytest.mark.parametrize("technique, loss_precision, tie", CASES,
                         ids=[f"{t}-{lp}-{'tied' if tie else 'untied'}" for t, lp, tie in CASES])
def test_measured_step_peak_matches_the_memory_model(report_data, technique, loss_precision, tie):
    cfg = _config(report_data, technique, loss_precision, tie)
    reports, final = _run(cfg)
    assert final["status"] == "ok", final.get("oom_message")
    tied_params = predict_peak_memory(_config(report_data, technique), vocab_size=VOCAB).params_mib
    expected_params = tied_params + (0 if tie else VOCAB * 256 * 4 / 2**20)
    assert final["num_params"] * 4 / 2**20 == pytest.approx(expected_params, rel=1e-6), \
        "tie_embeddings did not reach the model: trainable/setup.py's model_config must pass cfg.tie_embeddings"
    measured = reports[1]["mem_step_peak_mib"]
    predicted = predict_peak_memory(cfg, vocab_size=VOCAB, attention_kernel=final["attention_kernel"]).peak_mib
    print(f"{final['label']:<28} kernel {final['attention_kernel']:<10} measured {measured:9.1f} MiB  "
          f"predicted {predicted:9.1f} MiB  {predicted / measured - 1:+.2%}  val_ppl {final['val_ppl']:.1f}")
    assert math.isfinite(final["val_ppl"])
    assert predicted == pytest.approx(measured, rel=0.02), \
        f"{final['label']}: measured {measured:.1f} MiB, predicted {predicted:.1f} MiB" + (
            " (is the loss precision wired? trial.py must build its loss with losses.loss_for)"
            if loss_precision == "compute" else "")


def test_the_loss_in_bf16_saves_6e_bytes_at_the_start_of_backward(report_data):
    """The mechanism, measured: 12E -> 6E bytes of loss buffers (E = batch x seq_len x vocab)."""
    peaks = {lp: _run(_config(report_data, "flash", lp))[0][1]["mem_step_peak_mib"] for lp in ("fp32", "compute")}
    e_mib = 32 * 256 * VOCAB / 2**20
    assert peaks["fp32"] - peaks["compute"] == pytest.approx(6 * e_mib, rel=0.03)
