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


def _tune_trials(seen: dict[str, list[dict[str, str]]], gauge: str) -> set[str]:
    """The Tune trial names (`tune_trainable_...`) the scrape has seen `gauge` under."""
    return {labels.get("trial", "") for labels in seen.get(f"ray_{gauge}", [])
            if labels.get("trial", "").startswith("tune_trainable_")}


def _run_until_scraped(url: str, trial_config: dict, resources: dict, gauges: tuple[str, ...], tmp_path: Path):
    """Run one Tune trial until the scrape has seen every gauge in `gauges` under one Tune trial name.

    A tiny trial can finish within Ray's metrics report period (its worker exits before anything reaches the
    export port), so the trial runs until the scrape has seen what the test needs, then Tune stops it;
    SCRAPE_TIMEOUT_S bounds the wait. Returns (Tune's result, what the scrape saw).
    """
    from ray import tune

    from trainable import tune_trainable

    seen: dict[str, list[dict[str, str]]] = {}
    complete, done = tmp_path / "all-gauges-seen", threading.Event()  # a file: Tune pickles the stopper

    def scrape_until_done():
        while not done.is_set():
            for name, labels in _scrape(url).items():
                seen.setdefault(name, []).extend(labels)
            if set.intersection(*(_tune_trials(seen, name) for name in gauges)):
                complete.touch()
            done.wait(1.0)

    scraper = threading.Thread(target=scrape_until_done, daemon=True)
    scraper.start()
    deadline = time.time() + SCRAPE_TIMEOUT_S

    def stop(trial_id: str, result: dict) -> bool:
        return complete.exists() or time.time() > deadline

    tuner = tune.Tuner(tune.with_resources(tune_trainable, resources), param_space=trial_config,
                       run_config=tune.RunConfig(name="dash", storage_path=str(tmp_path), verbose=0, stop=stop))
    [result] = tuner.fit()
    done.set()
    scraper.join()
    assert result.error is None, result.error
    assert complete.exists(), f"not every gauge of {gauges} under one Tune trial name within {SCRAPE_TIMEOUT_S} s: " \
                              f"{sorted(seen)}"
    return result, seen


def _metrics_url(ray_local) -> str:
    node = next(n for n in ray_local.nodes() if n["Alive"])
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


@pytest.mark.slow
def test_every_dashboard_query_matches_the_metrics_a_trial_exports(ray_local, sample_dataset, tmp_path):
    """A CPU trial exports loss and throughput under its Tune name; the recorder fills the CUDA-only gauges."""
    from trainable import TrialConfig

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    url = _metrics_url(ray_local)
    recorder = recorder_class().remote()
    assert ray_local.get(recorder.record.remote({"loss": 2.5, "tokens_per_s": 1e5, "mem_step_peak_mib": 1234.0,
                                                 "mfu": 0.4}))
    cfg = TrialConfig.from_dict(dict(data_dir=str(sample_dataset), device="cpu", n_layers=1, d_model=32, n_heads=2,
                                     ff_dim=64, seq_len=64, batch_size=4, max_steps=1_000_000, warmup_steps=1,
                                     eval_interval=0, eval_batches=1, eval_batch_size=4,
                                     checkpoint_interval=0)).to_dict()
    _, seen = _run_until_scraped(url, cfg, {"cpu": 1}, ("memeff_loss", "memeff_tokens_per_s"), tmp_path)
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S  # the recorder's gauges reach the port within a report period
    while time.monotonic() < deadline and len(seen) < len(GAUGES):
        seen_now = _scrape(url)
        for name, labels in seen_now.items():
            seen.setdefault(name, []).extend(labels)
        time.sleep(1)
    ray_local.kill(recorder)

    assert set(seen) == {f"ray_{name}" for name in GAUGES}, sorted(seen)
    for q in queries(dashboard()):
        metrics, labels = names_used(q)
        for metric in metrics:
            missing = labels - set().union(*map(set, seen[metric]))
            assert not missing, f"{q}: {metric} has no label {missing} in the scrape"
    assert "bf16_flash_bs32" in {labels["trial"] for labels in seen["ray_memeff_loss"]}  # the recorder's own tag
    [tune_trial] = _tune_trials(seen, "memeff_loss")  # Tune's trial name, tagged on the worker
    assert {labels["label"] for labels in seen["ray_memeff_loss"] if labels["trial"] == tune_trial} == {"baseline"}


@pytest.mark.cuda
@pytest.mark.slow
def test_a_cuda_trial_exports_every_gauge_the_dashboard_plots(ray_local, sample_dataset, tmp_path):
    """On a GPU the trial itself fills all four panels (peak memory and MFU are measured there), under its Tune name."""
    from trainable import TrialConfig

    url = _metrics_url(ray_local)
    if not _exports_metrics(url):
        pytest.skip(f"this node's Ray serves no metrics at {url} (its metrics agent is not running, as in a Ray "
                    "without the `default` extra): the gauges cannot be scraped here")
    cfg = TrialConfig.from_dict(dict(data_dir=str(sample_dataset), device="cuda", technique="flash", n_layers=2,
                                     d_model=256, n_heads=4, ff_dim=1024, seq_len=64, batch_size=32,
                                     max_steps=1_000_000, warmup_steps=10, eval_interval=0, eval_batches=1,
                                     eval_batch_size=4, checkpoint_interval=0)).to_dict()
    result, seen = _run_until_scraped(url, cfg, {"cpu": 1, "gpu": 1}, tuple(GAUGES), tmp_path)
    [trial] = set.intersection(*(_tune_trials(seen, name) for name in GAUGES))
    assert Path(result.path).name.startswith(trial)  # Tune's trial name, its directory's prefix
    labels = {labels["label"] for labels in seen["ray_memeff_loss"] if labels["trial"] == trial}
    assert labels == {"bf16_flash"}, labels
