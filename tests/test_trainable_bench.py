"""bench/bench_trainable.py as a CPU smoke run: technique specs, the side-by-side table, the profile file."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from trainable import ConfigError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_trainable.py"
TINY = ["--device", "cpu", "--vocabs", "512", "--batch-size", "4", "--seq-len", "64", "--n-layers", "2",
        "--d-model", "32", "--n-heads", "4", "--ff-dim", "64", "--steps", "3", "--warmup", "1", "--report", "none"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_trainable", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_technique_specs(bench):
    assert bench.technique_switches("flash") == {"technique": "flash"}
    assert bench.technique_switches("window16+compile") == {"technique": "window", "window": 16, "compile": True}
    assert bench.technique_switches("flash+sac+fused_ce") == {"technique": "flash", "checkpointing": "selective",
                                                              "loss": "fused_ce"}
    with pytest.raises(ConfigError, match=r"unknown modifier \+fast"):
        bench.technique_switches("flash+fast")
    with pytest.raises(ConfigError, match="unknown technique 'flsh'"):
        bench.technique_switches("flsh")


def test_cpu_smoke_run_writes_the_table(bench, tmp_path, capsys):
    out = tmp_path / "table.md"
    code = bench.main([*TINY, "--techniques", "baseline,baseline+sac+fused_ce", "--peak-flops", "1e12",
                       "--out", str(out)])
    assert code == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| technique | vocab | kernel | tok/s plain | tok/s trainable | ratio | GPU-time")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| baseline", "| sac_fusedce"]
    for row in rows[1:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "512" and float(cells[3].replace(",", "")) > 0 and float(cells[5]) > 0
        assert float(cells[6].replace(",", "")) > 0  # GPU-time (host time on CPU) figure of the trainable
        assert cells[9].endswith("%") and cells[10].endswith("%")  # MFU plain / trainable against --peak-flops
        assert cells[13].endswith("%") and 0 <= float(cells[13].rstrip("%")) < 100  # idle between steps
        median, slowest = map(float, cells[14].split(" / "))
        assert 0 < median <= slowest


def test_profile_writes_a_kernel_table(bench, tmp_path):
    out = tmp_path / "profile.txt"
    assert bench.main([*TINY, "--profile", "bf16+sac", "--profile-out", str(out), "--profile-rows", "5"]) == 0
    text = out.read_text()
    assert text.startswith("bf16_sac, vocab 512") and "aten::" in text and "Self CPU" in text


def test_bad_technique_is_one_line_exit_2(bench, capsys):
    assert bench.main([*TINY, "--techniques", "flash+bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bench_trainable: error: unknown modifier +bogus") and "\n" not in err


def test_device_time_compares_both_loops(bench, tmp_path):
    out = tmp_path / "device_time.md"
    assert bench.main([*TINY, "--device-time", "--techniques", "baseline", "--out", str(out)]) == 0
    row = out.read_text().splitlines()[-1].split("|")
    plain, trainable = float(row[2]), float(row[3])
    assert plain > 0 and trainable > 0


def test_checkpoint_bench_compares_checkpoint_settings_with_none(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_checkpoint", BENCH.with_name("bench_checkpoint.py"))
    checkpoint = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checkpoint)
    out = tmp_path / "ckpt.md"
    tiny = [a for a in TINY if a not in ("--report", "none")] + ["--report", "mimic", "--steps", "10", "--warmup", "2"]
    assert checkpoint.main([*tiny, "--techniques", "baseline", "--checkpoints", "steps:4,minutes:5", "--out", str(out),
                            "--no-plain"]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| baseline")]
    assert [r[2] for r in rows] == ["none", "every 4 steps", "every 5 min"]  # none first: the reference
    assert [int(r[3]) for r in rows] == [0, 2, 0]  # saves at steps 4 and 8 of the timed steps 3..11
    assert rows[0][5] == "1.000" and float(rows[1][5]) > 0 and float(rows[1][9]) > 0  # vs none; write ms/save
    assert checkpoint.main([*tiny, "--checkpoints", "steps:0"]) == 2
    assert capsys.readouterr().err.strip().startswith("bench_checkpoint: error: --checkpoints: 'steps:0'")
