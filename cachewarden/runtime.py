"""Runtime directories and the files in them, private to the user who runs cachewarden.

A runtime directory (heartbeats and prefork metrics: `[monitoring] dir`; `cachewarden
run`'s state and Flower's credentials) is created with mode 0700 and, whether just
created or found, must be a real directory (not a symbolic link) owned by this user
and closed to everyone else; anything else is refused with `UnsafePath`, naming the
path and the fix. Files in it are never written through a symbolic link: they are
created with O_NOFOLLOW (O_EXCL for a secret, so it is 0600 from its first byte),
or replaced whole (`os.replace` swaps a planted link itself, never its target).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path

from cachewarden.errors import UnsafePath

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_verified: set[tuple[int, str]] = set()  # (pid, directory) checked by this process
_REMAKE = "remove it (a new one is made, mode 0600)"


def default_dir(prefix: str) -> str:
    """The default runtime directory of a key prefix: one per user, in the temp folder."""
    return os.path.join(tempfile.gettempdir(), f"cachewarden-{os.geteuid()}-{prefix}")


def private_dir(path: str | Path, setting: str) -> Path:
    """Create `path` (mode 0700) if missing, and check that it is private to this user.

    `setting` names where the path comes from, for the error's advice. Raises
    UnsafePath when it is a symbolic link, not a directory, owned by another user, or
    open to others (group or other permission bits).
    """
    directory = Path(path)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise UnsafePath(f"{directory}: cannot create it ({exc.strerror}); set {setting}") from None
    _check_dir(directory, setting)
    return directory


def ensure_dir(path: str | Path, setting: str) -> Path:
    """`private_dir`, checked once per process (a file operation that fails with ENOENT
    calls `private_dir` again)."""
    key = (os.getpid(), str(path))
    if key not in _verified:
        private_dir(path, setting)
        _verified.add(key)
    return Path(path)


def _check_dir(directory: Path, setting: str) -> None:
    info = os.lstat(directory)
    mine = os.geteuid()
    advice = f"remove it, or set {setting} to a directory of your own"
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePath(f"{directory}: is a symbolic link, not a directory; {advice}")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePath(f"{directory}: is not a directory; {advice}")
    if info.st_uid != mine:
        raise UnsafePath(
            f"{directory}: is owned by uid {info.st_uid}, not by this user (uid {mine}); {advice}"
        )
    if info.st_mode & 0o077:
        raise UnsafePath(
            f"{directory}: has mode {stat.S_IMODE(info.st_mode):o}, open to other users; "
            f"run `chmod 700 {directory}`"
        )


def replace_file(path: Path, text: str) -> None:
    """Write `path` whole (mode 0600) through a new file renamed over it: a symbolic link
    planted at `path` is replaced, never followed."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)


def touch_file(path: Path) -> None:
    """Set `path`'s modification time to now, creating it (0600) if missing; a symbolic
    link or anything but a regular file found there is replaced by an empty file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW, 0o600)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        replace_file(path, "")
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            replace_file(path, "")
            return
        os.utime(fd)
    finally:
        os.close(fd)


def create_secret(path: Path, text: str) -> bool:
    """Create `path` holding `text`, mode 0600 from the start (O_EXCL, O_NOFOLLOW): False
    when something exists at `path` already (left as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return True


def read_secret(path: Path) -> str:
    """The text of a secret file, refused (UnsafePath) unless it is a regular file (not a
    link) owned by this user and closed to others. FileNotFoundError when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{path}: is a symbolic link; {_REMAKE}") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePath(f"{path}: is not a regular file; {_REMAKE}")
        if info.st_uid != os.geteuid():
            raise UnsafePath(f"{path}: is owned by uid {info.st_uid}, not by this user; {_REMAKE}")
        if info.st_mode & 0o077:
            mode = stat.S_IMODE(info.st_mode)
            raise UnsafePath(f"{path}: has mode {mode:o}, readable by others; {_REMAKE}")
        with os.fdopen(fd, "r", closefd=False) as handle:
            return handle.read()
    finally:
        os.close(fd)
