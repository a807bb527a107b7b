"""Ray's token authentication as the sweep uses it: where the token comes from, token files only their owner
can read, and which mode this process talks to the cluster in.

Ray itself reads the token from, in order, `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, and
`~/.ray/auth_token` (what `ray get-auth-token --generate` writes). `write_token_file`
(`python -m sweep.connect --generate-token`) creates one readable by its owner only; `warn_if_token_file_exposed`
warns once when the file Ray will read is readable by group or others.
"""
from __future__ import annotations

import logging
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_HELP = (
    "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token); "
    "`ray get-auth-token` on the head node prints it"
)
TOKEN_FILE_MODE = 0o600


def token_available() -> bool:
    """Whether Ray would find an authentication token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)."""
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def enable_token_mode_if_token_available() -> None:
    """Send the token when we hold one: Ray does this itself only for address="auto"."""
    if "RAY_AUTH_MODE" in os.environ:
        return  # the user chose explicitly (token or disabled)
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def default_token_path() -> Path:
    """Where Ray (`ray get-auth-token --generate`, a local `ray.init`) keeps the token: ~/.ray/auth_token."""
    return Path.home() / ".ray" / "auth_token"


def token_file_in_use() -> Path | None:
    """The file Ray takes the token from, or None when it comes from RAY_AUTH_TOKEN or there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    path = Path(named).expanduser() if named else default_token_path()
    return path if path.is_file() else None


def write_token_file(path: str | os.PathLike | None = None, *, token: str | None = None) -> Path:
    """Create a token file only its owner can read (0600, in a 0700 directory); never overwrite one.

    Ray's own `ray get-auth-token --generate` writes the file with the process umask (usually 0644), and
    the token admits anyone who holds it to run code on the cluster.
    """
    import secrets

    target = Path(path).expanduser() if path is not None else default_token_path()
    if not target.parent.exists():
        target.parent.mkdir(mode=0o700, parents=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, TOKEN_FILE_MODE)  # FileExistsError: keep it
    with os.fdopen(fd, "w") as f:
        f.write(token or secrets.token_hex(32))  # 256 bits, what Ray generates
    os.chmod(target, TOKEN_FILE_MODE)  # O_CREAT's mode is masked by the umask; this one is not
    return target


def warn_if_token_file_exposed() -> bool:
    """One line on stderr when the token file Ray will read is readable by group or others; True if warned."""
    path = token_file_in_use()
    if path is None or os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return False
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & 0o077:
        return False
    print(f"warning: the Ray token file {path} is readable by group/others (mode {mode:04o}): "
          f"chmod 600 {path}", file=sys.stderr)
    return True


def private_token_for_local_start() -> None:
    """A local Ray 2.60 instance turns token auth on and, lacking a token, writes one readable by all (0644):
    write it first, owner-only."""
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() != "token" or token_available():
        return
    try:
        write_token_file()
    except OSError as e:  # a read-only home: Ray writes its own, and we warn about its mode
        logger.debug("could not write %s: %s", default_token_path(), e)
        return
    from ray._raylet import AuthenticationTokenLoader

    AuthenticationTokenLoader.instance().reset_cache()


def auth_mode_name() -> str:
    """The mode this process talks to the cluster in: token or disabled."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m sweep.connect --generate-token [--token-path PATH]`: a new token file, owner-only (0600)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sweep.connect", description=main.__doc__)
    parser.add_argument("--generate-token", action="store_true", required=True,
                        help="write a new random token to --token-path (never overwrites one)")
    parser.add_argument("--token-path", help="where (default: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token)")
    args = parser.parse_args(argv)
    path = Path(args.token_path or os.environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path()).expanduser()
    try:
        written = write_token_file(path)
    except FileExistsError:
        print(f"error: {path} already exists (delete it first to rotate the token)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: could not write {path}: {e.strerror}", file=sys.stderr)
        return 2
    print(written)
    return 0
