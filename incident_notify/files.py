"""Reading input files (playbooks, variables, contacts, secrets, config) with bounded work.

Only regular files are read: a FIFO would block forever and a device (``/dev/zero``) never
ends. Size is checked before reading; symlink loops and unreadable files become errors.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAX_INPUT_BYTES = 4 * 1024 * 1024
"""Playbooks, variables, templates, secrets and config files."""
MAX_CONTACTS_BYTES = 512 * 1024 * 1024
"""A contacts source (a customer list of millions of rows is a few hundred MiB)."""


class InputFileError(OSError):
    """The path is not something to read as input; `message` and `hint` say why."""

    def __init__(self, path: Path, message: str, hint: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message
        self.hint = hint


def check_input(path: Path, limit: int = MAX_INPUT_BYTES) -> os.stat_result:
    """Stat `path` (following links) and refuse anything but a regular file within
    `limit` bytes. Raises InputFileError, or FileNotFoundError when it does not exist."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink loop, a permission problem
        raise InputFileError(path, f"cannot read: {exc.strerror or exc}",
                             "check the path and its permissions") from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a directory" if stat.S_ISDIR(info.st_mode) else
                "a FIFO" if stat.S_ISFIFO(info.st_mode) else
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "not a regular file")
        raise InputFileError(path, f"is {kind}, not a regular file",
                             "name a regular file")
    if info.st_size > limit:
        raise InputFileError(path, f"is {info.st_size:,} bytes, more than the "
                             f"{limit:,} this input may be", "check the file is the right one")
    return info


def read_input(path: Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (read no further than that)."""
    check_input(path, limit)
    with open(path, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InputFileError(path, f"grew past {limit:,} bytes while being read",
                             "check the file is the right one")
    return data
