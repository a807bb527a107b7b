"""prepare's `--out`: checked before any work (a bad output costs nothing and writes nothing), then the hidden
build directory beside it.

`--overwrite` replaces only a directory this tool wrote: one whose manifest passes the schema check and which
holds nothing the manifest does not list, so a mistyped `--out` can never delete someone's files.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .atomic import MANIFEST_NAME, SIBLING_OVERHEAD, recover, sibling
from .errors import DataPrepError, DatasetError
from .reader import read_manifest
from .schema import SPLITS, listed_paths

NAME_MAX = 255  # bytes in one file name on Linux/macOS file systems


def check_out_path(out: Path) -> None:
    """The path itself: names that fit the file system, and never the current directory or one holding it."""
    for part in out.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise DataPrepError(f"output path component {part} is {size} bytes long: a file name has at most "
                                f"{NAME_MAX} bytes")
    size = len(os.fsencode(out.name))
    if size > NAME_MAX - SIBLING_OVERHEAD:
        raise DataPrepError(f"output directory name {out.name} is {size} bytes long: use at most "
                            f"{NAME_MAX - SIBLING_OVERHEAD} (prepare's hidden temp directory beside it adds "
                            f"{SIBLING_OVERHEAD} to the {NAME_MAX} a file name can have)")
    try:
        cwd, resolved = Path.cwd().resolve(), out.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise DataPrepError(f"cannot resolve output {out}: {exc}") from None
    if out.name in ("", ".", "..") or resolved == cwd or resolved in cwd.parents:
        raise DataPrepError(f"refusing to write the dataset to {out}: it is the current directory or holds it; "
                            "pass --out of a new directory, e.g. --out prepared/NAME")


def check_output(out: Path, overwrite: bool) -> None:
    """Repair what a killed run left beside `out`, then check `out` may be written (or replaced)."""
    try:
        recover(out)
        check_out_dir(out, overwrite)
    except OSError as exc:
        raise DataPrepError(f"cannot inspect output {out}: {exc.strerror}") from None


def make_build_dir(out: Path) -> Path:
    """The hidden directory the dataset is built in; also the early proof that `out`'s parent is writable."""
    tmp = sibling(out, "tmp")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise DataPrepError(f"cannot write the output {out}: creating a directory in {out.parent} failed "
                            f"({exc.strerror})") from None
    return tmp


def check_out_dir(out: Path, overwrite: bool) -> None:
    """What is at `out` now: nothing, an empty directory, or (with overwrite) a dataset this tool wrote."""
    if out.is_symlink():
        raise DataPrepError(f"output {out} is a symbolic link: pass the directory it points to, or another --out")
    if out.exists() and not out.is_dir():
        raise DataPrepError(f"output {out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise DataPrepError(f"output {out} already exists and is not empty: pass --overwrite or choose another --out")
    if not (out / MANIFEST_NAME).is_file():
        raise DataPrepError(f"refusing to overwrite {out}: it has no {MANIFEST_NAME}, so it is not a dataset this "
                            "tool wrote (remove it yourself or choose another --out)")
    try:
        manifest = read_manifest(out)
    except DatasetError as exc:
        raise DataPrepError(f"refusing to overwrite {out}: {exc}") from None
    extra = first_unlisted(out, manifest)
    if extra is not None:
        raise DataPrepError(f"refusing to overwrite {out}: {extra} is not part of the prepared dataset "
                            "(move it away or choose another --out)")


def first_unlisted(root: Path, manifest: dict) -> str | None:
    """The first (sorted) file or directory under `root` the manifest does not account for, or None."""
    files, tokenizer = listed_paths(manifest)
    dirs = {*SPLITS, tokenizer}
    for path in files:
        dirs.update(str(p) for p in PurePosixPath(path).parents if str(p) != ".")
    unlisted = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in dirnames:
            rel = str(rel_dir / name)
            if os.path.islink(os.path.join(dirpath, name)) and rel not in files:
                unlisted.append(rel)
            elif rel not in dirs and not _under(rel, tokenizer):
                unlisted.append(rel + "/")
        for name in filenames:
            rel = str(rel_dir / name)
            if rel not in files and not _under(rel, tokenizer):
                unlisted.append(rel)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return min(unlisted) if unlisted else None


def _under(rel: str, directory: str) -> bool:
    return rel.startswith(directory.rstrip("/") + "/")
