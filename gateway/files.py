"""files.py: private files and folders for what the gateway writes (prediction logs, the
control database): folders 0700, files 0600, whatever the process umask.

Request payloads and the audit trail are readable by the gateway's user alone. A folder
that cannot be created or written fails with one line naming the path (``DataDirError``),
not a traceback from deep inside SQLite or the log writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Final

from gateway.config import ConfigError

__all__ = ["DIR_MODE", "FILE_MODE", "DataDirError", "private_dir", "private_file", "open_new"]

DIR_MODE: Final = 0o700
FILE_MODE: Final = 0o600


class DataDirError(ConfigError):
    """A data folder cannot be created or written; the message names it."""


def private_dir(path: Path | str) -> Path:
    """Create ``path`` (and missing parents) as 0700 folders; check it is writable."""
    folder = Path(path)
    try:
        for parent in reversed([folder, *folder.parents]):
            if not parent.exists():
                parent.mkdir(mode=DIR_MODE)
                os.chmod(parent, DIR_MODE)  # mkdir's mode is masked by the umask
    except OSError as exc:
        raise DataDirError(f"cannot create data folder {folder}: {exc.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataDirError(f"data folder {folder} is not writable by this process")
    return folder


def private_file(path: Path | str) -> Path:
    """Create ``path`` empty as 0600 if missing, else tighten it to 0600 (its owner's)."""
    file = Path(path)
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        os.close(fd)
        if file.stat().st_mode & 0o077:
            os.chmod(file, FILE_MODE)
    except OSError as exc:
        raise DataDirError(f"cannot write {file}: {exc.strerror}") from None
    return file


def open_new(path: Path | str) -> IO[bytes]:
    """A new file opened for binary writing, 0600; ``FileExistsError`` if it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    return os.fdopen(fd, "wb")
