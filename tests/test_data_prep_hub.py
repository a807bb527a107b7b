"""speakleash list/download against a real HTTP server on 127.0.0.1 serving speakleash's own layout."""
from __future__ import annotations

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import zstandard

from data_prep import DataPrepError, download_dataset, list_datasets, open_dataset, prepare_dataset
from data_prep.corpus import Corpus
from data_prep.hub import SPEAKLEASH_URL_ENV
from data_prep.synthetic import synthetic_documents

ROOT = Path(__file__).resolve().parents[1]
DATASETS = {"wolne_lektury_corpus": 300, "plwiki_sample": 40}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def _publish(root: Path, name: str, num_docs: int) -> list[str]:
    """Write NAME.jsonl.zst (lm_dataformat lines) and NAME.manifest the way speakleash publishes them."""
    docs = [doc for doc, _ in zip(synthetic_documents(10**9, seed=num_docs, max_sentences=6), range(num_docs))]
    lines = "".join(json.dumps({"text": d, "meta": {"length": len(d)}}, ensure_ascii=False) + "\n" for d in docs)
    data = zstandard.ZstdCompressor(level=3).compress(lines.encode("utf-8"))
    (root / f"{name}.jsonl.zst").write_bytes(data)
    manifest = {"project": "SpeakLeash", "name": name, "description": f"test corpus {name}", "license": "CC0",
                "file_size": len(data), "stats": {"documents": num_docs, "characters": sum(map(len, docs))}}
    (root / f"{name}.manifest").write_text(json.dumps(manifest))
    return docs


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, {name: documents}, served directory) of a speakleash mirror served from a thread."""
    root = tmp_path_factory.mktemp("speakleash-server")
    docs = {name: _publish(root, name, n) for name, n in DATASETS.items()}
    (root / "speakleash.json").write_text(json.dumps([{"name": n} for n in DATASETS]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", docs, root
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def run_cli(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), SPEAKLEASH_URL_ENV: url}
    return subprocess.run([sys.executable, "-m", "data_prep", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.mark.slow
def test_list_shows_name_documents_and_size(server, tmp_path):
    url, _, root = server
    infos = list_datasets(tmp_path, url=url)
    assert [d.name for d in infos] == sorted(DATASETS)
    for info in infos:
        assert info.documents == DATASETS[info.name]
        assert info.size_bytes == (root / f"{info.name}.jsonl.zst").stat().st_size
    result = run_cli("list", "--data-dir", str(tmp_path / "cli"), url=url)
    assert result.returncode == 0, result.stderr
    assert "wolne_lektury_corpus" in result.stdout and "300" in result.stdout and "plwiki_sample" in result.stdout


@pytest.mark.slow
def test_download_then_prepare_round_trips(server, tmp_path):
    url, docs, _ = server
    result = run_cli("download", "wolne_lektury_corpus", "--data-dir", str(tmp_path / "data"), url=url)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "data" / "wolne_lektury_corpus.jsonl.zst"
    assert f"downloaded wolne_lektury_corpus to {path}" in result.stdout
    assert "100%" in result.stderr  # speakleash's progress bar
    assert list(Corpus.from_path(path).documents()) == docs["wolne_lektury_corpus"]
    assert download_dataset("wolne_lektury_corpus", tmp_path / "data", url=url) == path  # complete: not fetched again

    ds = open_dataset(prepare_dataset(path, tmp_path / "ds", vocab_size=400, seq_len=32, progress=False))
    assert ds.manifest["sources"][0]["format"] == "jsonl.zst"
    assert sum(ds.split(s).num_documents for s in ("train", "val", "test")) == 300
    tokenizer = ds.load_tokenizer()
    val = ds.split("val")
    stream = val.get_rows(range(val.num_rows)).reshape(-1)[: val.num_tokens].tolist()
    assert tokenizer.decode(stream[: stream.index(ds.eot_id)]) in docs["wolne_lektury_corpus"]


@pytest.mark.slow
def test_unknown_name_suggests_close_matches(server, tmp_path):
    url, _, _ = server
    result = run_cli("download", "wolne_lektury", "--data-dir", str(tmp_path), url=url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = "error: unknown speakleash dataset 'wolne_lektury': did you mean wolne_lektury_corpus?"
    assert result.stderr.strip() == expected


@pytest.mark.slow
def test_unreachable_server_is_named(tmp_path):
    url = _closed_port_url()
    with pytest.raises(DataPrepError, match="could not reach the speakleash server"):
        list_datasets(tmp_path, url=url)
    result = run_cli("download", "plwiki_sample", "--data-dir", str(tmp_path), url=url)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "could not reach the speakleash server" in result.stderr
    assert not list(tmp_path.glob("*.json"))  # no cached failure that would hide the server for an hour


@pytest.mark.slow
def test_a_failed_call_leaves_no_directory_it_created(server, tmp_path):
    url, _, _ = server
    unreachable = _closed_port_url()
    data_dir = tmp_path / "data" / "speakleash"
    with pytest.raises(DataPrepError, match="could not reach the speakleash server"):
        list_datasets(data_dir, url=unreachable)
    with pytest.raises(DataPrepError, match="could not reach the speakleash server"):
        download_dataset("plwiki_sample", data_dir, url=unreachable)
    with pytest.raises(DataPrepError, match="unknown speakleash dataset"):  # the index was fetched, then it failed
        download_dataset("no_such_dataset", data_dir, url=url)
    for command in (["list"], ["download", "plwiki_sample"]):
        result = run_cli(*command, "--data-dir", str(data_dir), "--url", unreachable, url="")
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: could not reach the speakleash server at {unreachable}")
    assert list(tmp_path.iterdir()) == []


def test_a_data_dir_that_existed_is_kept(tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(DataPrepError):
        list_datasets(tmp_path, url=_closed_port_url())
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_a_successful_list_keeps_the_directory_it_made(server, tmp_path):
    url, _, _ = server
    assert list_datasets(tmp_path / "new", url=url)
    assert (tmp_path / "new").is_dir()
