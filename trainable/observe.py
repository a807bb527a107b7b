"""Live per-step metrics on the Ray dashboard (Prometheus/Grafana), next to Tune's results.

`tune.report` stores results for later analysis; while a sweep runs, `RayMetricsExporter` also
exports a few per-step numbers as Ray custom metrics (`ray.util.metrics.Gauge`, exported as
`ray_memeff_*`), tagged with the trial, its technique label and batch size, so a dashboard can plot
memory and speed of every running trial. It is active only inside a Ray process
(`ray.is_initialized()`); elsewhere recording is a no-op. The gauges are created on the first
report; recording is a handful of host-side calls made after the next step is queued, like the rest
of the reporting, so it stays off the GPU's critical path.

Names and labels are a contract: `dashboards/memeff_grafana.json` queries `ray_<GAUGES key>` by the
TAG_KEYS (and Ray's own `SessionName`), and tests/test_dashboard.py checks both against a real scrape;
docs/dashboard.md sets up Prometheus and Grafana.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any

from contract.experiment import trial_name

# Ray metric name -> (report key, description)
GAUGES: dict[str, tuple[str, str]] = {
    "memeff_step_peak_mib": ("mem_step_peak_mib", "peak GPU memory allocated during the training step (MiB)"),
    "memeff_loss": ("loss", "training loss of the step"),
    "memeff_tokens_per_s": ("tokens_per_s", "training throughput of the step (tokens/s)"),
    "memeff_mfu": ("mfu", "model FLOPs utilisation of the step (0-1)"),
}
TAG_KEYS = ("trial", "label", "batch_size")


def _ray_initialized() -> bool:
    """True inside a Ray worker or a driver that called ray.init (without importing Ray otherwise)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _trial_name(label: str, batch_size: int) -> str:
    """Tune's trial name when running under Tune, else `<label>_bs<batch size>`."""
    try:
        from ray import tune

        with warnings.catch_warnings():  # outside Tune it warns and returns None
            warnings.simplefilter("ignore")
            name = tune.get_context().get_trial_name()
    except Exception:  # noqa: BLE001 - outside a Tune session there is no trial name
        name = None
    return name or trial_name(label, batch_size)


class RayMetricsExporter:
    """Sets one Ray Gauge per exported key on every report; keeps the last values it exported."""

    def __init__(self, label: str = "", batch_size: int = 0) -> None:
        self.label, self.batch_size = label, batch_size
        self.enabled: bool | None = None  # decided on the first report
        self.gauges: dict[str, Any] = {}  # metric name -> ray.util.metrics.Gauge
        self.tags: dict[str, str] = {}
        self.last_values: dict[str, float] = {}
        self.num_records = 0

    def _start(self, metrics: dict[str, Any]) -> None:
        self.enabled = _ray_initialized()
        if not self.enabled:
            return
        from ray.util.metrics import Gauge

        label = self.label or str(metrics.get("label"))
        self.tags = {"trial": _trial_name(label, self.batch_size), "label": label, "batch_size": str(self.batch_size)}
        self.gauges = {name: Gauge(name, description, tag_keys=TAG_KEYS).set_default_tags(self.tags)
                       for name, (_, description) in GAUGES.items()}

    def record(self, metrics: dict[str, Any]) -> None:
        """Export the finite values among `metrics`' exported keys (NaN means not measured: skipped)."""
        if self.enabled is None:
            self._start(metrics)
        if not self.enabled:
            return
        for name, gauge in self.gauges.items():
            value = metrics.get(GAUGES[name][0])
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                gauge.set(float(value))
                self.last_values[name] = float(value)
        self.num_records += 1
