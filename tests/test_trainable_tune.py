"""The function trainable under a real local Ray Tune: contract keys every step, checkpoint resume after a crash."""
from __future__ import annotations

import json
import math
import sys

import pytest

import helpers
from contract.keys import keys_of
from trainable import RayMetricsExporter, TrialConfig, TuneCheckpointIO, run_trial, tune_trainable

STEP_KEYS = set(keys_of("step", "fact"))
pytestmark = pytest.mark.slow  # every test here starts trials on a local Ray


def tiny(data, **kw) -> dict:
    """helpers.tiny with one warm-up step and one eval batch, as Tune's flat config dict."""
    return helpers.tiny(data, **{"warmup_steps": 1, "eval_batches": 1, **kw}).to_dict()


def fit(trainable, config: dict, tmp_path, max_failures: int = 0):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space=config,
        run_config=tune.RunConfig(name="t", storage_path=str(tmp_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    results = tuner.fit()
    assert len(results) == 1 and results[0].error is None, results[0].error
    return results[0]


def test_tune_trial_reports_contract_keys_every_step(ray_local, sample_dataset, tmp_path):
    result = fit(tune_trainable, tiny(sample_dataset, technique="gradcp"), tmp_path)
    history = result.metrics_dataframe
    assert history["step"].tolist() == [1, 2, 3, 4, 5, 6]
    assert STEP_KEYS <= set(history.columns)
    assert not history["oom"].any() and history["loss"].notna().all()
    assert history["val_loss"].notna().tolist() == [False, False, True, False, False, True]
    final = result.metrics
    assert final["final"] is True and final["status"] == "ok" and final["label"] == "gradcp"
    assert math.isfinite(final["val_ppl"]) and final["train_time_s"] > 0
    assert history["warmup"].tolist() == [True] + [False] * 5 and not history["compiling"].any()
    assert final["steady_tokens_per_s"] > 0


def preempted_once(config: dict) -> None:
    """tune_trainable, except that the first attempt dies before reporting step 5."""
    from ray import tune

    first_attempt = tune.get_checkpoint() is None

    def report(metrics):
        if first_attempt and metrics["step"] == 5:
            raise RuntimeError("simulated preemption")
        tune.report(metrics)

    run_trial(TrialConfig.from_dict(config), report, checkpoint_io=TuneCheckpointIO())


def test_tune_restarts_a_failed_trial_from_its_checkpoint(ray_local, sample_dataset, tmp_path):
    config = tiny(sample_dataset, max_steps=7, checkpoint_interval=2)
    reference: list[dict] = []
    run_trial(TrialConfig.from_dict(config), reference.append)

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not importable on workers
    result = fit(preempted_once, config, tmp_path, max_failures=1)
    history = result.metrics_dataframe
    assert history["step"].tolist() == list(range(1, 8))  # steps 1-4, crash, resume at 5 from the step-4 checkpoint
    assert history["loss"].tolist() == pytest.approx([m["loss"] for m in reference], rel=1e-5)
    assert result.metrics["final"] is True and result.checkpoint is not None


def exporting_trial(config: dict) -> None:
    """tune_trainable with the exporter in hand: what it exported is written to a file for the test."""
    from ray import tune

    config = dict(config)
    out = config.pop("exporter_out")
    cfg = TrialConfig.from_dict(config)
    exporter = RayMetricsExporter(cfg.label, cfg.batch_size)
    run_trial(cfg, tune.report, exporter=exporter)
    with open(out, "w") as f:
        json.dump({"enabled": exporter.enabled, "gauges": {n: type(g).__module__ + "." + type(g).__name__
                                                           for n, g in exporter.gauges.items()},
                   "tags": exporter.tags, "last_values": exporter.last_values, "num_records": exporter.num_records}, f)


def test_ray_metrics_are_exported_from_the_trial_worker(ray_local, sample_dataset, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    out = tmp_path / "exported.json"
    result = fit(exporting_trial, {**tiny(sample_dataset, technique="sac"), "exporter_out": str(out)}, tmp_path)
    exported = json.loads(out.read_text())
    assert exported["enabled"] is True and exported["num_records"] == 6  # one per report
    assert exported["gauges"] == dict.fromkeys(
        ["memeff_step_peak_mib", "memeff_loss", "memeff_tokens_per_s", "memeff_mfu"], "ray.util.metrics.Gauge")
    tags = exported["tags"]
    assert (tags["label"], tags["batch_size"]) == ("sac", "4")
    assert tags["trial"].startswith("exporting_trial_")  # Tune's trial name, not the `sac_bs4` fallback
    # CPU: memory and MFU are not measured (NaN) and not exported; loss and speed are, from the last step
    assert set(exported["last_values"]) == {"memeff_loss", "memeff_tokens_per_s"}
    assert exported["last_values"]["memeff_loss"] == pytest.approx(result.metrics["loss"])
