"""The shipped Grafana dashboard (dashboards/memeff_grafana.json) asks for what the trials really export.

The slow test runs a real tiny trial under Tune in the shared local Ray and a real exporter in a Ray actor (for the
CUDA-only gauges, which a CPU trial leaves unset), scrapes the node's metrics export port over HTTP, and checks
that every metric and label name the dashboard's queries use is in the scrape.
"""
from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from trainable.observe import GAUGES, TAG_KEYS

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboards" / "memeff_grafana.json"
RAY_LABELS = {"SessionName"}  # added by Ray to every exported metric
SCRAPE_TIMEOUT_S = 60


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(dash: dict) -> list[str]:
    """Every PromQL text of the dashboard: panel targets and templating variables."""
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return exprs + [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]


def names_used(query: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a query refers to."""
    metrics = set(re.findall(r"\bray_memeff_\w+", query))
    labels = {m for sel in re.findall(r"\{([^}]*)\}", query) for m in re.findall(r"(\w+)\s*=~?", sel)}
    labels |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", query))
    return metrics, labels


def test_the_dashboard_queries_only_what_observe_exports():
    dash = dashboard()
    used_metrics, used_labels = set(), set()
    for q in queries(dash):
        metrics, labels = names_used(q)
        assert metrics, f"a query without a memeff metric: {q}"
        used_metrics |= metrics
        used_labels |= labels
    legends = {m for p in dash["panels"] for t in p["targets"] for m in re.findall(r"\{\{(\w+)\}\}", t["legendFormat"])}
    assert used_metrics == {f"ray_{name}" for name in GAUGES}  # one panel per gauge, none left out
    assert used_labels | legends <= set(TAG_KEYS) | RAY_LABELS
    assert {p["title"] for p in dash["panels"]} >= {"Training loss", "Throughput (tokens/s)", "MFU"}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"]) and dash["uid"]


def recorder_class():
    """A Ray actor holding a real exporter, outside Tune (its trial tag is then `<label>_bs<batch size>`)."""
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        def __init__(self):
            from trainable.observe import RayMetricsExporter

            self.exporter = RayMetricsExporter("bf16_flash", 32)

        def record(self, metrics: dict) -> bool:
            self.exporter.record(metrics)
            return bool(self.exporter.enabled)

    return Recorder


def _scrape(url: str) -> dict[str, list[dict[str, str]]]:
    """memeff metric name -> the label sets of its samples."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:  # the export port answers once the node's agent is up
        return {}
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ray_memeff_"):
                found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def _exports_metrics(url: str, wait_s: float = 20.0) -> bool:
    """Whether the node's metrics export port answers with Ray's own metrics within `wait_s`."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if b"ray_" in urllib.request.urlopen(url, timeout=5).read():
                return True
        except OSError:
            pass
        time.sleep(1)
    return False


@pytest.mark.slow
def test_every_dashboard_query_matches_the_metrics_a_trial_exports(ray_local, sample_dataset, tmp_path):
    from ray import tune

    from trainable import TrialConfig, tune_trainable

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    seen: dict[str, list[dict[str, str]]] = {}
    done = threading.Event()

    def scrape_until_done():
        while not done.is_set():
            for name, labels in _scrape(url).items():
                seen.setdefault(name, []).extend(labels)
            done.wait(1.0)

    recorder = recorder_class().remote()
    assert ray_local.get(recorder.record.remote({"loss": 2.5, "tokens_per_s": 1e5, "mem_step_peak_mib": 1234.0,
                                                 "mfu": 0.4}))
    scraper = threading.Thread(target=scrape_until_done, daemon=True)
    scraper.start()
    cfg = TrialConfig.from_dict(dict(data_dir=str(sample_dataset), device="cpu", n_layers=1, d_model=32, n_heads=2,
                                     ff_dim=64, seq_len=64, batch_size=4, max_steps=300, warmup_steps=1,
                                     eval_interval=0, eval_batches=1, eval_batch_size=4)).to_dict()
    tuner = tune.Tuner(tune.with_resources(tune_trainable, {"cpu": 1}), param_space=cfg,
                       run_config=tune.RunConfig(name="dash", storage_path=str(tmp_path), verbose=0))
    [result] = tuner.fit()
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S  # the recorder's gauges reach the port within a report period
    while time.monotonic() < deadline and len(seen) < len(GAUGES):
        time.sleep(1)
    done.set()
    scraper.join()
    ray_local.kill(recorder)

    assert set(seen) == {f"ray_{name}" for name in GAUGES}, sorted(seen)
    for q in queries(dashboard()):
        metrics, labels = names_used(q)
        for metric in metrics:
            missing = labels - set().union(*map(set, seen[metric]))
            assert not missing, f"{q}: {metric} has no label {missing} in the scrape"
    trials = {labels["trial"] for labels in seen["ray_memeff_loss"]}
    assert "bf16_flash_bs32" in trials and result.metrics["status"] == "ok"
    tune_trial = next(t for t in trials if t.startswith("tune_trainable_"))  # Tune's trial name, tagged on the worker
    assert {labels["label"] for labels in seen["ray_memeff_loss"] if labels["trial"] == tune_trial} == {"baseline"}


@pytest.mark.cuda
@pytest.mark.slow
def test_a_cuda_trial_exports_every_gauge_the_dashboard_plots(ray_local, sample_dataset, tmp_path):
    """On a GPU the trial itself fills all four panels (peak memory and MFU are measured there), under its Tune name.

    A tiny trial on an H200 finishes within Ray's metrics report period (its worker exits before anything reaches
    the export port), so the trial runs until the scrape has seen every gauge under a Tune trial name, then Tune
    stops it; SCRAPE_TIMEOUT_S bounds the wait.
    """
    from ray import tune

    from trainable import TrialConfig, tune_trainable

    node = next(n for n in ray_local.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    if not _exports_metrics(url):
        pytest.skip(f"this node's Ray serves no metrics at {url} (its metrics agent is not running, as in a Ray "
                    "without the `default` extra): the gauges cannot be scraped here")
    seen: dict[str, list[dict[str, str]]] = {}
    complete, done = tmp_path / "all-gauges-seen", threading.Event()  # a file: Tune pickles the stopper

    def tune_trials(name: str) -> set[str]:
        return {labels.get("trial", "") for labels in seen.get(f"ray_{name}", [])
                if labels.get("trial", "").startswith("tune_trainable_")}

    def scrape_until_done():
        while not done.is_set():
            for name, labels in _scrape(url).items():
                seen.setdefault(name, []).extend(labels)
            if set.intersection(*(tune_trials(name) for name in GAUGES)):
                complete.touch()
            done.wait(1.0)

    scraper = threading.Thread(target=scrape_until_done, daemon=True)
    scraper.start()
    cfg = TrialConfig.from_dict(dict(data_dir=str(sample_dataset), device="cuda", technique="flash", n_layers=2,
                                     d_model=256, n_heads=4, ff_dim=1024, seq_len=64, batch_size=32,
                                     max_steps=1_000_000, warmup_steps=10, eval_interval=0, eval_batches=1,
                                     eval_batch_size=4, checkpoint_interval=0)).to_dict()
    deadline = time.time() + SCRAPE_TIMEOUT_S

    def stop(trial_id: str, result: dict) -> bool:
        return complete.exists() or time.time() > deadline

    tuner = tune.Tuner(tune.with_resources(tune_trainable, {"cpu": 1, "gpu": 1}), param_space=cfg,
                       run_config=tune.RunConfig(name="dash-cuda", storage_path=str(tmp_path), verbose=0, stop=stop))
    [result] = tuner.fit()
    done.set()
    scraper.join()
    assert result.error is None, result.error
    assert complete.exists(), f"not every gauge under one Tune trial name within {SCRAPE_TIMEOUT_S} s: {sorted(seen)}"
    [trial] = set.intersection(*(tune_trials(name) for name in GAUGES))
    assert Path(result.path).name.startswith(trial)  # Tune's trial name, its directory's prefix
    labels = {labels["label"] for labels in seen["ray_memeff_loss"] if labels["trial"] == trial}
    assert labels == {"bf16_flash"}, labels
