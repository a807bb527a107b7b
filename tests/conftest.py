"""Shared fixtures: a tiny prepared dataset from the shipped sample, a local Ray, the analysis tests' fake
experiments, the multi-node cluster's holder; CUDA skipping and `slow` for every test that starts Ray."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Fixtures that start Ray (a local instance, a `ray start` head, the multi-node cluster): a test that uses one,
# directly or through another fixture, is `slow` whether or not it says so (`pytest -m "not slow"` never starts
# Ray). Tests that start a subprocess of their own carry @pytest.mark.slow themselves.
STARTS_RAY = ("ray_local", "token_cluster", "multinode")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Tests that need a Ray fixture are `slow`; tests marked `cuda` skip cleanly on machines without a GPU."""
    for item in items:
        if any(name in item.fixturenames for name in STARTS_RAY):
            item.add_marker(pytest.mark.slow)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no CUDA either way
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Tiny tensors run fastest single-threaded, and stay fast on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """The shipped Polish sample prepared with a small BPE vocabulary and short rows (fast on CPU)."""
    from data_prep import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "sample"
    prepare_dataset(out_dir=out, tokenizer="bpe", vocab_size=512, seq_len=64, seed=0)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs, like CI) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# -- the analysis tests' fake experiments (built by test_analysis_fake.py, once per session) -------------------
@pytest.fixture(scope="module")
def experiment(ray_local, tmp_path_factory) -> Path:
    """A grid sweep: no max-batch search, no predictions file."""
    from test_analysis_fake import CASES, built_once, run_fake_experiment, stop_interrupted

    return built_once(tmp_path_factory, "fake_sweep",
                      lambda root: run_fake_experiment(root, "fake_sweep", CASES, stop=stop_interrupted))


@pytest.fixture(scope="module")
def experiment_full(experiment, tmp_path_factory) -> Path:
    """The same sweep with a max-batch search's records and the memory model's predictions beside it."""
    from contract.experiment import PREDICTIONS_FILE
    from test_analysis_fake import PREDICTIONS, SEARCH_RECORDS, built_once

    def build(root: Path) -> None:
        shutil.copytree(experiment, root / "fake_full")
        (root / "fake_full" / "max_batch.json").write_text(json.dumps(SEARCH_RECORDS))
        (root / "fake_full" / PREDICTIONS_FILE).write_text(json.dumps(PREDICTIONS))

    return built_once(tmp_path_factory, "fake_full", build)


@pytest.fixture(scope="module")
def search_experiment(ray_local, tmp_path_factory) -> Path:
    from test_analysis_fake import PROBES, SEARCH_RECORDS, built_once, run_fake_experiment

    def build(root: Path) -> None:
        run_fake_experiment(root, "fake_search", PROBES, kind="probe")
        (root / "fake_search" / "max_batch.json").write_text(json.dumps(SEARCH_RECORDS))

    return built_once(tmp_path_factory, "fake_search", build)


@pytest.fixture(scope="module")
def results(experiment):
    from analysis import load

    return load(experiment)


@pytest.fixture(scope="module")
def full(experiment_full):
    from analysis import load

    return load(experiment_full)


# -- the multi-node cluster of test_multinode*.py (multinode_cluster.py) --------------------------------------
_MULTINODE: list = []  # the session's holder, once a test asked for it


@pytest.fixture(scope="session")
def multinode():
    """Holds the one multi-node cluster every test_multinode*.py module shares (their `cluster` fixture starts
    it on first use); stopped as soon as the run moves past the last test that uses it, or at the end."""
    from multinode_cluster import Shared

    shared = Shared()
    _MULTINODE.append(shared)
    yield shared
    shared.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield  # the item's own teardown (and its modules' fixtures) first
    if _MULTINODE and "multinode" in item.fixturenames and (
            nextitem is None or "multinode" not in nextitem.fixturenames):
        _MULTINODE[-1].stop()  # no idle 4-node cluster under the rest of the suite
