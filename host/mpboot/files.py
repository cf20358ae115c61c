"""Output files written whole or not at all: a temporary file beside the target, renamed
into place once complete, so an error or Ctrl-C never leaves a partial or empty output."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from mpboot.errors import UsageError

# The most an image file, or an Intel hex input with its gaps filled, may hold: larger than
# any slot mpboot serves, so a larger input is refused before it is read or expanded.
MAX_IMAGE_BYTES = 64 * 1024 * 1024

# link() is not offered here (vfat, exFAT, some network shares): create with O_EXCL instead
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


def write_atomic(path: Path, data: bytes | Callable[[IO[bytes]], None], *, mode: int = 0o644,
                 exclusive: bool = False) -> None:
    """Write `data` (bytes, or a function writing to the open file) to `path`. A regular
    file (or a link to one: the file it names) is replaced whole, through a temporary file
    beside it; anything else that is there (a device, a pipe: /dev/stdout) is written as it
    is. `exclusive`: refuse to replace a file that exists (keys are never overwritten), also
    one created while this one was being written. Errors: UsageError, one line."""
    path = Path(path)
    if exclusive and (path.exists() or path.is_symlink()):
        raise UsageError(f"{path}: already exists; refusing to overwrite it")
    target = path.resolve() if path.is_symlink() else path
    try:
        kind = target.stat().st_mode
    except FileNotFoundError:
        kind = None
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror}") from None
    if kind is not None and stat.S_ISDIR(kind):
        raise UsageError(f"{path}: is a directory; give a file name")
    if kind is not None and not stat.S_ISREG(kind):
        _write_in_place(path, target, data)
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as err:
        raise UsageError(f"{path}: cannot create: {err.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, data)
            f.flush()
            os.fchmod(f.fileno(), mode & ~_umask())
        if not exclusive:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)  # fails if the name appeared meanwhile: never replaces
        except FileExistsError:
            raise UsageError(f"{path}: already exists; refusing to overwrite it") from None
        except OSError as err:
            if err.errno not in _NO_HARD_LINKS:
                raise
            _create_exclusive(path, target, Path(tmp).read_bytes(), mode)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write(f: IO[bytes], data: bytes | Callable[[IO[bytes]], None]) -> None:
    if callable(data):
        data(f)
    else:
        f.write(data)


def _write_in_place(path: Path, target: Path, data: bytes | Callable[[IO[bytes]], None]) -> None:
    try:
        with open(target, "wb") as f:
            _write(f, data)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror or err}") from None


def _create_exclusive(path: Path, target: Path, data: bytes, mode: int) -> None:
    """On a filesystem without hard links: create the file only if no file has that name.
    An error midway removes what was written."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise UsageError(f"{path}: already exists; refusing to overwrite it") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise


def _umask() -> int:
    # The mode open() would give a new file (mkstemp's is always 0600). Read once per
    # write, from the main thread.
    mask = os.umask(0)
    os.umask(mask)
    return mask
