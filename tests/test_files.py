"""Outputs written whole or not at all (mpboot.files.write_atomic), without replacing what
a user pointed the output at: the file behind a link, a device such as /dev/null."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import IO

import pytest

from mpboot import files
from mpboot.errors import UsageError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "app.bin"
    out.write_bytes(b"old")

    def half(f: IO[bytes]) -> None:
        f.write(b"new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(out, half)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]
    files.write_atomic(out, b"new")
    assert out.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]


def test_a_link_is_written_through_and_stays_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real.pem"
    real.write_bytes(b"old")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link.pem"
    link.symlink_to(real)
    files.write_atomic(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["link.pem"]


def test_a_device_is_written_in_place() -> None:
    files.write_atomic(Path("/dev/null"), b"anything")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_exclusive_never_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = tmp_path / "key.pem"
    files.write_atomic(key, b"secret", mode=0o600, exclusive=True)
    assert key.read_bytes() == b"secret" and stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="already exists"):
        files.write_atomic(key, b"other", exclusive=True)
    assert key.read_bytes() == b"secret"
    # a filesystem without hard links (vfat, exFAT): created with O_EXCL instead

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    usb = tmp_path / "usb-key.pem"
    files.write_atomic(usb, b"secret2", mode=0o600, exclusive=True)
    assert usb.read_bytes() == b"secret2" and stat.S_IMODE(usb.stat().st_mode) == 0o600
    with pytest.raises(UsageError, match="already exists"):
        files.write_atomic(usb, b"other", exclusive=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.pem", "usb-key.pem"]


def test_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        files.write_atomic(tmp_path, b"x")
