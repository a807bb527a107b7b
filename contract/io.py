"""Writes that no reader ever sees half done, on local paths and storage URIs, and one-line error messages.

Local files are written to a temporary sibling and renamed into place (the rename is atomic on POSIX);
a storage URI (s3://, gs://, file://) is written with one object put through pyarrow's filesystems, which
objects stores make visible whole or not at all.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

ERROR_LINE_LIMIT = 300


def is_uri(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` into a temporary sibling of `path`, then rename it into place; nothing is left on failure.

    Not mkstemp: its 0600 mode would survive the rename and hide results from the rest of a team.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(path: str, text: str) -> None:
    """A whole text file at a local path or a storage URI."""
    if not is_uri(path):
        atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    with fs.open_output_stream(inner) as out:
        out.write(text.encode("utf-8"))


def write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(str(path), json.dumps(data, indent=2, default=str) + "\n")


def read_text(path: str) -> str | None:
    """A text file from a local path or a storage URI; None when it is not there."""
    if not is_uri(path):
        return Path(path).read_text(encoding="utf-8") if Path(path).is_file() else None
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    if fs.get_file_info(inner).type != pyarrow.fs.FileType.File:
        return None
    with fs.open_input_stream(inner) as stream:
        return stream.readall().decode("utf-8")


def read_json(path: str) -> Any:
    """JSON from a local path or a storage URI; None when the file is not there (ValueError when it is not JSON)."""
    text = read_text(str(path))
    return None if text is None else json.loads(text)


def first_line(text: Any, limit: int = ERROR_LINE_LIMIT) -> str:
    """The first non-empty line of `text`, cut to `limit` characters with an ellipsis."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def error_line(error: BaseException | str, limit: int = ERROR_LINE_LIMIT) -> str:
    """`Type: message` of the exception a trial raised (unwrapped from Ray's wrapper), or the meaningful last
    line of an error text (a traceback's `File ...` lines and carets skipped)."""
    if isinstance(error, BaseException):
        cause = getattr(error, "cause", None)  # RayTaskError keeps the trial's own exception here
        exc = cause if isinstance(cause, BaseException) else error
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        text = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__
        return text if len(text) <= limit else text[: limit - 3] + "..."
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    meaningful = [ln for ln in lines if not ln.startswith(("File ", "^", "~", "Traceback", "Failure #"))]
    text = (meaningful or lines or ["unknown error"])[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def counted(n: int, noun: str) -> str:
    """`1 trial`, `3 trials`: every message that counts things says it the same way."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
