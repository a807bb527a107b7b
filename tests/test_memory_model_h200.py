"""The memory model against real H200 measurements (docs/results/memory_model_h200.csv).

The CSV holds measured `max_memory_allocated` peaks of the seed grid (vocab 10,000), the same grid plus
fused_ce at GPT-2's vocabulary (50,257), and the peak at every measured max batch; a change to the model
that moves any prediction more than 2% off what the GPU measured fails here, on CPU. The predicted max
batch (what seeds the search) must stay within 8% of every measured one.
"""
import csv
import importlib.util
import math
from pathlib import Path

import pytest

from sweep.predict import memory_budget, predicted_max_batch
from trainable import TrialConfig
from trainable.memory_model import predict_peak_memory

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "results" / "memory_model_h200.csv"
ROWS = list(csv.DictReader(CSV.open()))
_spec = importlib.util.spec_from_file_location("memory_model_report", ROOT / "bench" / "memory_model_report.py")
REPORT = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(REPORT)


def _config(row: dict, data_dir: Path) -> TrialConfig:
    """The row's config, as bench/memory_model_report.py (which writes the doc's tables) reads it."""
    return REPORT.row_config(row, str(data_dir))


def test_the_measurements_cover_every_seed_technique_and_max_batch():
    assert len(ROWS) >= 51
    assert {r["technique"] for r in ROWS} == {"baseline", "bf16", "flash", "window", "gradcp", "fused_ce"}
    for cap in (True, False):  # every seed technique's max batch, with the 32 GB cap and without
        assert {r["technique"] for r in ROWS if r["source"] == "max batch" and bool(r["gpu_memory_gb"]) is cap} == \
            {"baseline", "bf16", "flash", "window", "gradcp"}
    assert {r["vocab_size"] for r in ROWS} == {"10000", "50257"}


def _id(r: dict) -> str:
    window = r["window"] and int(float(r["window"])) or ""
    return f"{r['source'].replace(' ', '')}-{r['technique']}{window}-bs{r['batch_size']}-{r['gpu_memory_gb'] or 'nocap'}"


@pytest.mark.parametrize("row", ROWS, ids=_id)
def test_prediction_within_two_percent_of_the_h200(row, tmp_path):
    predicted = predict_peak_memory(_config(row, tmp_path)).peak_mib
    measured = float(row["measured_peak_mib"])
    assert math.isclose(predicted, measured, rel_tol=0.02), (predicted, measured)


@pytest.mark.parametrize("row", [r for r in ROWS if r["source"] == "max batch"], ids=_id)
def test_predicted_max_batch_within_eight_percent_of_the_h200(row, tmp_path):
    cap = float(row["gpu_memory_gb"]) if row["gpu_memory_gb"] else None
    predicted = predicted_max_batch(_config(row, tmp_path), memory_budget(cap, gpu="h200"))
    measured = int(row["batch_size"])
    assert abs(predicted / measured - 1) <= 0.08, (predicted, measured)
