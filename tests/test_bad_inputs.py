"""Every row of docs/bad_inputs.md, run for real: its command fails with exactly its message, fast, writing nothing.

The commands run as subprocesses, a few at a time (each starts Python and imports torch), all of them once for the
module; every row is then checked as its own test.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "bad_inputs.md"
SECONDS_PER_CASE = 15  # far below what a Ray start, a trial or a tokenizer training would take
PARALLEL = 3
ANY = "<...>"


@dataclass(frozen=True)
class Case:
    number: int
    stage: str
    bad_input: str
    command: str
    message: str

    @property
    def id(self) -> str:
        return f"{self.number:02d}-{self.stage}-{re.sub(r'[^a-z0-9]+', '-', self.bad_input.lower()).strip('-')}"


def _code(cell: str) -> str:
    """The text of a table cell's code span (`x` or ``x``)."""
    cell = cell.strip()
    ticks = len(cell) - len(cell.lstrip("`"))
    assert ticks and cell.endswith("`" * ticks), f"expected a code span in the table: {cell!r}"
    return cell[ticks:-ticks].strip()


def read_table(path: Path = TABLE) -> list[Case]:
    cases = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("|") and cells[0].isdigit():
            number, stage, bad_input, command, message = cells
            cases.append(Case(int(number), stage, bad_input, _code(command), _code(message)))
    return cases


CASES = read_table()


def test_the_table_covers_every_stage():
    assert len(CASES) >= 18 and len({c.number for c in CASES}) == len(CASES)
    assert {c.stage for c in CASES} == {"data_prep", "trainable", "sweep", "analysis"}


# -- the inputs -------------------------------------------------------------------------------------------
def _copy_dataset(good: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(good, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    return dest, dest / manifest["splits"]["train"]["shards"][0]["path"]


@pytest.fixture(scope="module")
def inputs(sample_dataset, tmp_path_factory) -> dict[str, Path]:
    """The placeholders' shared paths (read-only for the cases)."""
    import zstandard

    from data_prep import FORMAT_VERSION

    base = tmp_path_factory.mktemp("bad_inputs")
    data, _ = _copy_dataset(sample_dataset, base / "data")
    truncated, shard = _copy_dataset(sample_dataset, base / "truncated")
    shard.write_bytes(shard.read_bytes()[:-100])
    corrupted, shard = _copy_dataset(sample_dataset, base / "corrupted")
    body = bytearray(shard.read_bytes())
    body[len(body) // 2] ^= 0xFF
    shard.write_bytes(bytes(body))
    newer, _ = _copy_dataset(sample_dataset, base / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    (newer / "manifest.json").write_text(json.dumps({**manifest, "format_version": FORMAT_VERSION + 1}))
    (base / "empty_dir").mkdir()
    (base / "empty.txt").write_text("\n\n   \n\n")
    (base / "bad_utf8.txt").write_bytes("Zażółć gęślą jaźń.\n\nDruga ".encode() + b"\xff" + " linia.\n".encode())
    (base / "nonempty").mkdir()
    (base / "nonempty" / "notes.txt").write_text("keep me\n")
    (base / "not_tune").mkdir()
    (base / "not_tune" / "results.csv").write_text("a,b\n1,2\n")
    # rows 100-: foreign and padded --out directories, cut and damaged .zst corpora, a named pipe, bad manifests
    foreign = base / "foreign"
    (foreign / "src").mkdir(parents=True)
    (foreign / "src" / "main.py").write_text("print('hello')\n")
    (foreign / "README.md").write_text("my app\n")
    (foreign / "manifest.json").write_text(json.dumps({"name": "my-app", "version": "1.0"}))
    data_plus, _ = _copy_dataset(sample_dataset, base / "data_plus")
    (data_plus / "notes.txt").write_text("keep me\n")
    lines = "".join(json.dumps({"text": f"Dokument numer {i}: zażółć gęślą jaźń."}) + "\n" for i in range(400))
    first, second = (zstandard.ZstdCompressor(write_checksum=True).compress(part.encode())
                     for part in (lines[: len(lines) // 2], lines[len(lines) // 2:]))
    (base / "cut.jsonl.zst").write_bytes(first + second[: len(second) // 2])
    damaged = bytearray(first + second)
    damaged[len(first) // 2] ^= 0xFF
    (base / "damaged.jsonl.zst").write_bytes(bytes(damaged))
    os.mkfifo(base / "fifo.jsonl")
    no_sha256, _ = _copy_dataset(sample_dataset, base / "no_sha256")
    manifest = json.loads((no_sha256 / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    (no_sha256 / "manifest.json").write_text(json.dumps(manifest))
    escaping, _ = _copy_dataset(sample_dataset, base / "escaping")
    manifest["splits"]["train"]["shards"][0].update(path="../x", sha256="0" * 64)
    (escaping / "manifest.json").write_text(json.dumps(manifest))
    # rows 200-: experiments that cannot be resumed (or reused)
    bad_grid = base / "bad_grid_store" / "exp"
    bad_grid.mkdir(parents=True)
    (bad_grid / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [], "runner_data": {}}')
    (bad_grid / "sweep_grid.json").write_text("{not json")
    bad_state = base / "bad_state_store" / "exp"
    bad_state.mkdir(parents=True)
    (bad_state / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": [')
    return {"DATA": data, "TRUNCATED": truncated, "CORRUPTED": corrupted, "NEWER": newer,
            "EMPTY_DIR": base / "empty_dir", "EMPTY_TXT": base / "empty.txt", "BAD_UTF8": base / "bad_utf8.txt",
            "NONEMPTY": base / "nonempty", "NOT_TUNE": base / "not_tune",
            "FOREIGN": foreign, "DATA_PLUS": data_plus, "CUT_ZST": base / "cut.jsonl.zst",
            "DAMAGED_ZST": base / "damaged.jsonl.zst", "FIFO": base / "fifo.jsonl", "NO_SHA256": no_sha256,
            "ESCAPING": escaping, "BAD_GRID_STORE": bad_grid.parent, "BAD_STATE_STORE": bad_state.parent}


def _placeholders(inputs: dict[str, Path], case_dir: Path) -> dict[str, str]:
    """Every placeholder of the table; outputs live in the case's own directory."""
    own = {"TMP": case_dir, "OUT": case_dir / "out", "RESULTS": case_dir / "results", "MISSING": case_dir / "missing"}
    return {name: str(path) for name, path in {**inputs, **own}.items()}


def _fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"<([A-Z_0-9]+)>", lambda m: values[m.group(1)], text)


def _message_pattern(message: str, values: dict[str, str]) -> str:
    parts = re.split(r"(<[A-Z_0-9]+>|<\.\.\.>)", message)
    return "".join(".+?" if p == ANY else re.escape(values[p[1:-1]]) if re.fullmatch(r"<[A-Z_0-9]+>", p)
                   else re.escape(p) for p in parts)


def _snapshot(paths: list[Path]) -> dict[str, str]:
    """Every file under `paths` with its content hash (absent paths: absent)."""
    state = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*")) if root.exists() else []
        for f in files:
            state[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return state


def visible_lines(text: str) -> list[str]:
    """The lines a terminal shows: a carriage return moves back to the line's start and what follows overwrites
    (a progress bar that erases itself on exit leaves nothing); only a newline starts a new line."""
    lines = []
    for raw in text.split("\n")[:-1] if text.endswith("\n") else text.split("\n"):
        shown = ""
        for part in raw.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def test_visible_lines_is_what_a_terminal_shows():
    assert visible_lines("\rbar 0%|  |\r          \rerror: x\n") == ["error: x"]
    assert visible_lines("a\nb\n") == ["a", "b"] and visible_lines("\n") == [""]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    before: dict[str, str]
    after: dict[str, str]
    values: dict[str, str]


def _run(case: Case, inputs: dict[str, Path], case_dir: Path) -> Outcome:
    case_dir.mkdir()
    values = _placeholders(inputs, case_dir)
    argv = shlex.split(_fill(case.command, values))
    assert argv[0] == "python"
    watched = [case_dir, *inputs.values()]
    before = _snapshot(watched)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": str(case_dir / "ray")}  # a Ray start would show up as files here
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=case_dir, env=env, capture_output=True, timeout=120)
    seconds = time.monotonic() - t0
    return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"),
                   seconds, before, _snapshot(watched), values)


@pytest.fixture(scope="module")
def outcomes(request, inputs, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected row's run, PARALLEL at a time."""
    selected = {item.callspec.params["case"].id for item in request.session.items
                if getattr(item, "callspec", None) and isinstance(item.callspec.params.get("case"), Case)}
    base = tmp_path_factory.mktemp("bad_input_runs")
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = {case.id: pool.submit(_run, case, inputs, base / case.id) for case in CASES if case.id in selected}
        return {case_id: future.result() for case_id, future in futures.items()}


@pytest.mark.slow  # `outcomes` runs every row as a subprocess
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, outcomes):
    out = outcomes[case.id]
    lines = visible_lines(out.stderr)
    detail = f"{case.command}\nexit {out.returncode} in {out.seconds:.1f}s\nstderr:\n{out.stderr[-2000:]}"
    assert "Traceback" not in out.stderr + out.stdout, detail
    assert out.returncode == 2, detail
    assert len(lines) == 1, detail
    assert re.fullmatch(_message_pattern(case.message, out.values), lines[0]), \
        f"{detail}\nexpected (docs/bad_inputs.md): {_fill(case.message, out.values)}"
    assert out.seconds < SECONDS_PER_CASE, detail
    assert out.after == out.before, f"{case.command} changed files: " \
        f"{sorted(set(out.after.items()) ^ set(out.before.items()))}"
