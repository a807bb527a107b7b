"""speakleash datasets: list and download through speakleash's own client (`Speakleash(dir).get(name)`).

speakleash reads its index URL from its packaged config.json and swallows network errors (the dataset list is
then None), so this module (a) lets DATA_PREP_SPEAKLEASH_URL or `url=` point the client elsewhere (tests use a
local HTTP server), (b) turns "None" into "could not reach the speakleash server", and (c) removes the cached
`null` answers speakleash writes on failure, which would otherwise hide the server for the rest of the hour.
A call that fails removes the data directory it created, so an unreachable server leaves no empty `data/speakleash/`.
"""
from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .atomic import created_dirs
from .errors import DataPrepError

SPEAKLEASH_URL_ENV = "DATA_PREP_SPEAKLEASH_URL"
DEFAULT_DATA_DIR = Path("data") / "speakleash"
_CACHE_FILE = re.compile(r"^[0-9a-f]{32}-\d\d_\d\d_\d\d(_\d\d)?\.json$")


@dataclass(frozen=True)
class DatasetInfo:
    """One speakleash dataset as the index and its manifest describe it."""

    name: str
    documents: int
    size_bytes: int  # of the compressed .jsonl.zst download
    characters: int
    description: str


def _index_url(url: str | None) -> str | None:
    url = url or os.environ.get(SPEAKLEASH_URL_ENV)
    if url and not url.endswith("/"):
        url += "/"
    return url


def _forget_failed_answers(data_dir: Path) -> None:
    """Delete speakleash's cached `null` answers (written when a request failed) so the next call retries."""
    for path in data_dir.glob("*.json"):
        if _CACHE_FILE.match(path.name):
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8").strip() == "null":
                    path.unlink()


def _client(data_dir: Path, url: str | None):
    """A speakleash client over `data_dir`, pointed at `url` when given; raises when the index is unreachable."""
    from speakleash import Speakleash

    base = _index_url(url)
    client_cls = Speakleash
    if base is not None:
        client_cls = type("Speakleash", (Speakleash,), {"get_url": staticmethod(lambda lang: base)})
    with contextlib.redirect_stdout(io.StringIO()):  # speakleash prints manifest failures to stdout
        client = client_cls(str(data_dir.resolve()))
    _forget_failed_answers(data_dir)
    if client.datasets is None:
        raise DataPrepError(f"could not reach the speakleash server at {client.url}: check the network "
                            f"(or {SPEAKLEASH_URL_ENV})")
    return client


def list_datasets(data_dir: str | Path = DEFAULT_DATA_DIR, *, url: str | None = None) -> list[DatasetInfo]:
    """Every speakleash dataset (name, documents, compressed size), sorted by name."""
    with created_dirs(Path(data_dir)):
        client = _client(Path(data_dir), url)
    return sorted((DatasetInfo(d.name, int(d.documents), int(d.jsonl_zst_file_size), int(d.characters),
                               str(d.description)) for d in client.datasets), key=lambda d: d.name)


def download_dataset(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, *, url: str | None = None) -> Path:
    """Download one speakleash dataset (a `.jsonl.zst`, with a progress bar) and return its path.

    An already complete file (size matches the manifest) is not downloaded again.
    """
    with created_dirs(Path(data_dir)):
        return _download(name, Path(data_dir), url)


def _download(name: str, data_dir: Path, url: str | None) -> Path:
    import requests

    client = _client(data_dir, url)
    dataset = client.get(name)
    if dataset is None:
        names = [d.name for d in client.datasets]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `python -m data_prep list`"
        raise DataPrepError(f"unknown speakleash dataset {name!r}: {hint}")
    target = Path(dataset.replicate_dir) / f"{name}.jsonl.zst"
    try:
        ok, path = dataset.check_file()
    except requests.RequestException as exc:
        target.unlink(missing_ok=True)
        raise DataPrepError(f"could not reach the speakleash server at {client.url}: {type(exc).__name__}") from None
    except BaseException:
        target.unlink(missing_ok=True)  # interrupted: leave no half-downloaded file behind
        raise
    expected = dataset.jsonl_zst_file_size
    if not ok or not path or (expected and Path(path).stat().st_size != expected):
        target.unlink(missing_ok=True)
        raise DataPrepError(f"download of {name} is incomplete: run `python -m data_prep download {name}` again")
    return Path(path)
