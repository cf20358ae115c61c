"""Output files written whole or not at all: a temporary file beside the target, renamed
into place once complete, so an error or Ctrl-C never leaves a partial or empty output."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mpboot.errors import UsageError


def write_atomic(path: Path, data: bytes | Callable[[IO[bytes]], None], *, mode: int = 0o644,
                 exclusive: bool = False) -> None:
    """Write `data` (bytes, or a function writing to the open file) to `path`. `exclusive`:
    refuse to replace a file that exists (keys are never overwritten), also one created
    while this one was being written. Errors: UsageError, one line."""
    path = Path(path)
    if exclusive and (path.exists() or path.is_symlink()):
        raise UsageError(f"{path}: already exists; refusing to overwrite it")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; give a file name")
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    except OSError as err:
        raise UsageError(f"{path}: cannot create: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode & ~_umask())
        if exclusive:
            try:
                os.link(tmp, path)  # fails if the name appeared meanwhile: never replaces
            except FileExistsError:
                raise UsageError(f"{path}: already exists; refusing to overwrite it") from None
        else:
            os.replace(tmp, path)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    # The mode open() would give a new file (mkstemp's is always 0600). Read once per
    # write, from the main thread.
    mask = os.umask(0)
    os.umask(mask)
    return mask
