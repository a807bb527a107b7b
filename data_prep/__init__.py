"""Stage 1: Polish text -> tokenizer -> Arrow token shards (Contract 1 in docs/architecture.md).

A split's shards are Arrow IPC streams, so HF datasets opens them directly (memory-mapped, nothing copied):

    from datasets import Dataset, concatenate_datasets
    train = concatenate_datasets([Dataset.from_file(str(p)) for p in open_dataset(OUT).shard_paths("train")])
"""
from .errors import DataPrepError, DatasetError
from .hub import DatasetInfo, download_dataset, list_datasets
from .prepare import SAMPLE_CORPUS, PrepareConfig, prepare_dataset
from .reader import FORMAT_VERSION, PreparedDataset, TokenSplit, open_dataset

__all__ = [
    "DataPrepError", "DatasetError", "DatasetInfo", "FORMAT_VERSION", "PrepareConfig", "PreparedDataset",
    "SAMPLE_CORPUS", "TokenSplit", "download_dataset", "list_datasets", "open_dataset", "prepare_dataset",
]
