"""Writing a file atomically: a reader sees the old file or the whole new one, never half of it.

The data goes to a fresh temporary file in the target's folder, created with O_EXCL under a random
name, so a file or symlink someone placed there is never opened or deleted. The temporary file is
flushed to disk and renamed over the target (os.replace, atomic on one file system). It gets
mode 0666 minus the umask, like any file a program writes (tempfile.mkstemp would make it 0600).
"""

import os
import secrets
import stat
from pathlib import Path
from typing import Callable

TEMP_SUFFIX = ".tmp"
NAME_ATTEMPTS = 100


def create_temp_beside(path: Path) -> Path:
    """Create an empty file with a new random name next to path and return its path."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(NAME_ATTEMPTS):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(6)}{TEMP_SUFFIX}")
        try:
            fd = os.open(candidate, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file beside {path}")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_folder(folder: Path) -> None:
    """Make the rename itself durable, where the system allows: only POSIX can open a folder, and
    some file systems (network shares) refuse to sync one; the file is in place either way."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call write(temp_path) to fill a fresh temporary file, then rename it over path. Missing
    parent folders are created. On any failure the temporary file is removed and path is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = create_temp_beside(path)
    mode = stat.S_IMODE(temp.stat().st_mode)
    try:
        write(str(temp))
        # A writer may replace the file rather than fill it (safetensors writes its own temporary
        # file, mode 0600, and renames it): give the result the mode we created.
        os.chmod(temp, mode)
        fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def check_writable_folder(path) -> None:
    """Raise OSError unless a file can be created beside path (probes with a real temporary
    file: permission bits say nothing for root, read-only mounts or network shares)."""
    create_temp_beside(Path(path)).unlink()
