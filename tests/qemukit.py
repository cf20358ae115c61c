"""Running device code on the emulated Cortex-M3 board (mpboot.qemu) from tests.

Test data does not go through the UART: the host writes it into the board's flash file (a
sequence of length-prefixed fields at DATA_OFFSET, past the default areas) and the device
code reads it in place from the mapped flash with `field()` (DEVICE_PRELUDE), so one QEMU run
takes hundreds of cases. No pytest in here but the skip logic; tests import it.
"""

from __future__ import annotations

import os
import queue
import re
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from mpboot.qemu import FLASH_BASE, QemuBoard, build_firmware, create_flash, local_source, missing_tools, write_flash
from mpboot.qemu.build import SRC_ENV, SHARED_TARBALL

REQUIRED_ENV = "MPBOOT_QEMU_REQUIRED"  # set by .ci/run: a missing toolchain fails, not skips
DATA_OFFSET = 0x400000  # 4 MiB: past ports/qemu.areas()'s defaults (two 1 MiB slots, state, factory)
DATA_MAX = 0xA00000

# Device code: field() returns the next field at DATA_OFFSET as a memoryview of the mapped
# flash (no copy), or None after the last one (erased flash reads 0xffffffff).
DEVICE_PRELUDE = f"""
import uctypes
_m = memoryview(uctypes.bytearray_at({FLASH_BASE + DATA_OFFSET:#x}, {DATA_MAX:#x}))
_p = 0
def field():
    global _p
    n = int.from_bytes(_m[_p:_p + 4], "little")
    if n == 0xffffffff:
        return None
    v = _m[_p + 4:_p + 4 + n]
    _p += 4 + n
    return v
"""


def unavailable_reason() -> str | None:
    """Why the QEMU board cannot run here (one line), or None."""
    missing = missing_tools()
    if missing:
        return f"QEMU board: apt-get install {' '.join(missing)} (not installed)"
    if local_source() is None:
        return (f"QEMU board: no MicroPython source (set {SRC_ENV} to a v1.28.0 tree or .tar.gz, "
                f"or put it at {SHARED_TARBALL})")
    return None


def skip_or_fail(reason: str) -> None:
    if os.environ.get(REQUIRED_ENV):
        pytest.fail(f"{reason} ({REQUIRED_ENV} is set)")
    pytest.skip(reason)


def require() -> None:
    """Skip the test where the QEMU board cannot run (fail where it is required, as in CI)."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)


def pack_fields(records: Iterable[Sequence[bytes]]) -> bytes:
    out = bytearray()
    for record in records:
        for value in record:
            out += struct.pack("<I", len(value)) + value
    if len(out) > DATA_MAX:
        raise ValueError(f"{len(out)} bytes of test data; the data region holds {DATA_MAX}")
    return bytes(out)


def run_with_data(firmware: Path, flash: Path, data: bytes, code: str, timeout_s: float = 120.0) -> str:
    """A fresh flash file holding `data`, one power-on, `code` (after DEVICE_PRELUDE) run in
    the raw REPL; returns what it printed."""
    create_flash(flash)
    write_flash(flash, DATA_OFFSET, data)
    with QemuBoard(firmware, flash) as board:
        board.raw_repl()
        return board.exec(DEVICE_PRELUDE + code, timeout_s)


class Console:
    """The lines a QemuSimServer run in-process prints (its output), waited on with a deadline."""

    def __init__(self) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        self.lines: list[str] = []

    def drain(self) -> list[str]:
        """Every line so far (call once the server has stopped)."""
        while not self.queue.empty():
            self.lines.append(self.queue.get())
        return self.lines

    def wait_for(self, pattern: str, timeout_s: float = 60, after: int = 0) -> int:
        """The index of the first line from lines[after] on that matches `pattern`."""
        deadline = time.monotonic() + timeout_s
        i = after
        while True:
            while i < len(self.lines):
                if re.search(pattern, self.lines[i]):
                    return i
                i += 1
            left = deadline - time.monotonic()
            assert left > 0, f"never /{pattern}/:\n" + "\n".join(self.lines)
            try:
                self.lines.append(self.queue.get(timeout=left))
            except queue.Empty:
                pass


__all__ = ["Console", "DATA_OFFSET", "DEVICE_PRELUDE", "build_firmware", "pack_fields", "require", "run_with_data",
           "skip_or_fail", "unavailable_reason"]
