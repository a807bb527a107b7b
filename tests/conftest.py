"""Shared fixtures: a tiny prepared dataset from the shipped sample, a local Ray, CUDA skipping."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip cleanly on machines without a GPU."""
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
