"""Replace a dataset directory so that a kill at any moment leaves the old or the new dataset complete, never neither.

prepare builds the new dataset in a hidden sibling `.OUT.tmp-PID-XXXXXXXX`, manifest last. On Linux the finished
directory and the old one then trade names in one `renameat2(RENAME_EXCHANGE)`. Where that is missing (another OS,
a file system without it) the old one is first renamed aside to `.OUT.old-PID-XXXXXXXX`, which leaves a moment
with no OUT; `restore_missing` repairs it (the reader and the next prepare call it), and `recover` also deletes
the hidden siblings of dead processes. A directory being deleted loses its manifest first, so a half-deleted one
never looks complete. A sibling's name carries its owner's pid and a tag of its host, so on shared storage a
process is only ever judged dead by the host it ran on.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

from .errors import DataPrepError

MANIFEST_NAME = "manifest.json"
KILL_ENV = "DATA_PREP_KILL_AT"  # test hook: the process SIGKILLs itself at this step (see `step`)
SWAP_ENV = "DATA_PREP_SWAP"  # "rename": skip RENAME_EXCHANGE and use the two-rename swap (tests both)
SIBLING_OVERHEAD = len("..tmp-") + 7 + len("-") + 8  # bytes a hidden sibling's name adds to OUT's (pid <= 7 digits)
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d{1,7})-(?P<host>[0-9a-f]{4})[0-9a-f]{4}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def step(name: str) -> None:
    """A point a kill test can stop at: `DATA_PREP_KILL_AT=name` SIGKILLs this process right here (uncatchably);
    `name:INT` sends SIGINT instead (a Ctrl-C at that moment)."""
    at, _, signame = os.environ.get(KILL_ENV, "").partition(":")
    if at == name:
        os.kill(os.getpid(), signal.SIGINT if signame == "INT" else signal.SIGKILL)


def host_tag() -> str:
    """4 hex digits naming this host, so a pid in a sibling's name is only checked on the host that owns it."""
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=2).hexdigest()


def sibling(out: Path, kind: str) -> Path:
    """A new hidden sibling of `out` owned by this process (`kind` is "tmp" or "old")."""
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{host_tag()}{uuid.uuid4().hex[:4]}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id still runs (a zombie does not: it was killed and awaits its parent)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _siblings(out: Path) -> list[tuple[Path, str, bool]]:
    """(path, kind, whether its owner is known to be dead) of every hidden tmp/old sibling of `out`."""
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _SIBLING.match(entry.name)
        if match and match["name"] == out.name and entry.is_dir(follow_symlinks=False):
            dead = match["host"] == host_tag() and not pid_alive(int(match["pid"]))
            found.append((Path(entry.path), match["kind"], dead))
    return found


def is_complete(path: Path) -> bool:
    return (path / MANIFEST_NAME).is_file()


def restore_missing(out: Path, wait_s: float = 2.0) -> None:
    """When `out` is missing mid-swap, put its complete old copy back (owner dead) or wait for the swap (owner alive)."""
    deadline = time.monotonic() + wait_s
    while not os.path.lexists(out):
        olds = [(p, dead) for p, kind, dead in _siblings(out) if kind == "old" and is_complete(p)]
        if not olds:
            return
        for path, dead in olds:
            if dead:
                with contextlib.suppress(OSError):  # another process may have restored it first
                    os.rename(path, out)
                    return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def recover(out: Path) -> None:
    """Repair what killed prepares left beside `out`: restore a missing `out`, delete dead owners' hidden siblings."""
    restore_missing(out, wait_s=0.0)
    for path, _, dead in _siblings(out):
        if dead:
            remove_dataset(path)


def remove_dataset(path: Path) -> None:
    """Delete a dataset directory, manifest first, so that no reader or recovery takes a half-deleted one for whole."""
    with contextlib.suppress(OSError):
        (path / MANIFEST_NAME).unlink()
    step("unmanifested")
    shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically trade the names of two directories; False where the OS or file system cannot."""
    if os.environ.get(SWAP_ENV) == "rename" or not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so a renamed-in manifest never points at unwritten shards."""
    for dirpath, _, filenames in os.walk(root):
        for name in [*filenames, "."]:
            _fsync(Path(dirpath, name))


def install(tmp: Path, out: Path, replace: bool) -> None:
    """Put the finished dataset `tmp` (manifest written) at `out`; with `replace`, an old dataset there is swapped
    out atomically and deleted (without it, a directory that appeared meanwhile makes the rename fail)."""
    _fsync_tree(tmp)
    step("built")
    if not replace or not os.path.lexists(out) or not any(out.iterdir()):
        os.rename(tmp, out)  # onto nothing, or onto an empty directory: one atomic rename
    elif _exchange(tmp, out):
        step("exchanged")
        remove_dataset(tmp)  # now the old dataset
    else:
        old = sibling(out, "old")
        os.rename(out, old)
        try:
            step("old-aside")
            os.rename(tmp, out)
        except BaseException:  # Ctrl-C or a failed rename between the two: the old dataset goes back
            with contextlib.suppress(OSError):
                os.rename(old, out)
            raise
        step("new-in-place")
        remove_dataset(old)
    with contextlib.suppress(OSError):
        _fsync(out.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def created_dirs(path: Path) -> Iterator[None]:
    """`mkdir -p path` for the body; if the body fails, remove the directories this call created (no empty leftovers)."""
    top = None
    probe = Path(path)
    while not os.path.lexists(probe) and probe != probe.parent:
        top, probe = probe, probe.parent
    try:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataPrepError(f"cannot create directory {path}: {exc.strerror}") from None
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise
