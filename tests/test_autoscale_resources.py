"""A trial request no alive node can hold: refused with one line on a fixed cluster, but only noted on an
autoscaling one (cluster.yaml's GPU workers start at 0 nodes: the first GPU node comes once trials ask for it)."""
from __future__ import annotations

import pytest

from sweep import SweepConfig
from sweep.errors import SweepError
from sweep.orchestrate import check_resources
from sweep.plan import plan_sweep

pytestmark = pytest.mark.slow  # a local Ray instance (2 CPUs, no GPU)


def _plan(sample_dataset, **kw):
    return plan_sweep(SweepConfig(data_dir=str(sample_dataset), techniques=("baseline",), batch_sizes=(2,), **kw),
                      gpus=None)


def test_a_gpu_grid_on_a_cluster_without_gpus_is_refused_unless_it_autoscales(ray_local, sample_dataset, capsys):
    plan = _plan(sample_dataset, device="cuda")
    assert plan.use_gpu
    with pytest.raises(SweepError, match=r"^the grid needs a GPU per trial but no node of the cluster has one: use "
                                         r"--device cpu$"):
        check_resources(plan)
    check_resources(plan, can_autoscale=True)
    assert capsys.readouterr().err == ("note: the grid needs a GPU per trial but no node of the cluster has one yet; "
                                       "its trials wait until the autoscaler adds one\n")


def test_more_cpus_per_trial_than_any_node_has(ray_local, sample_dataset, capsys):
    plan = _plan(sample_dataset, device="cpu", cpus_per_trial=64, address="auto")  # a cluster: not checked locally
    with pytest.raises(SweepError, match=r"^--cpus-per-trial 64: no node of the cluster has that many CPUs \(the "
                                         r"largest has 2\); trials would wait forever$"):
        check_resources(plan)
    check_resources(plan, can_autoscale=True)
    assert "note: --cpus-per-trial 64: no node" in capsys.readouterr().err
