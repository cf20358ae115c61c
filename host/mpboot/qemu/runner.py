"""Run a firmware built by mpboot.qemu.build under qemu-system-arm (mps2-an385) and run code
on it through the raw REPL of its UART.

The board's flash is a 16 MiB host file mapped at 0x21000000 (QEMU memory-backend-file,
share=on): what the device writes is in the file at once, survives a restart and kill -9, and
the host may read or write the file while QEMU is stopped (or, for data the device only reads,
while it runs). The UART is a unix socket chardev QEMU serves and waits on before the machine
starts, so no output is lost. QEMU runs in its own process group; stop() kills the group.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mpboot.errors import DeviceRunError

FLASH_BASE = 0x21000000
FLASH_SIZE = 16 * 1024 * 1024
SECTOR = 4096
ID_OFFSET = FLASH_SIZE - SECTOR  # the "OTP" page: mpboot.ports.qemu.unique_id() reads it
ID_LEN = 16
# The power-cut control block mpboot.ports.qemu reads (OTP page, after the id): u32 CUT, TEAR,
# OPS, one spare, then one u32 per counted flash operation (kind << 24 | chip offset).
CTL_OFFSET = ID_OFFSET + 32
TRACE_OFFSET = CTL_OFFSET + 16
OP_KINDS = {1: "W", 2: "E", 3: "S"}  # program, erase, sync
NO_CUT = 0xFFFFFFFF
START_TIMEOUT_S = 10.0
EXEC_TIMEOUT_S = 120.0

_RAW_PROMPT = b"raw REPL; CTRL-B to exit\r\n>"


def create_flash(path: Path, unique_id: bytes | None = None) -> Path:
    """A blank (erased: all 0xff) flash file with the board's unique id in its OTP page."""
    uid = unique_id if unique_id is not None else os.urandom(ID_LEN)
    if len(uid) != ID_LEN:
        raise ValueError(f"a unique id is {ID_LEN} bytes")
    data = bytearray(b"\xff" * FLASH_SIZE)
    data[ID_OFFSET : ID_OFFSET + ID_LEN] = uid
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return Path(path)


def write_flash(path: Path, offset: int, data: bytes) -> None:
    """Put bytes into the flash file as a programmer would (no NOR rules): test data, images."""
    if offset < 0 or offset + len(data) > FLASH_SIZE:
        raise ValueError("outside the flash")
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def trace_ops(path: Path) -> None:
    """Start counting the board's flash operations (from 0, across power-ons), no cut armed.
    Write it while the board runs no flash operation (stopped, or idle serving SMP)."""
    write_flash(path, CTL_OFFSET, struct.pack("<III", NO_CUT, NO_CUT, 0) + b"\xff" * (SECTOR - 32 - 12))


def arm_cut(path: Path, op: int, tear: bool = False) -> None:
    """Count from 0 and cut the power at flash operation `op`: operations before it complete,
    it is not done (or, `tear`, half done), and QEMU exits with CUT_EXIT; once."""
    trace_ops(path)
    write_flash(path, CTL_OFFSET, struct.pack("<II", op, int(tear)))


def traced_ops(path: Path) -> list[tuple[str, int]]:
    """The operations counted since trace_ops/arm_cut: (kind "W"/"E"/"S", chip offset)."""
    with open(path, "rb") as f:
        f.seek(CTL_OFFSET + 8)
        (n,) = struct.unpack("<I", f.read(4))
        if n == NO_CUT:
            return []
        f.seek(TRACE_OFFSET)
        room = (FLASH_SIZE - TRACE_OFFSET) // 4
        if n > room:
            raise ValueError(f"{n} flash operations; the trace holds {room}")
        words = struct.unpack(f"<{n}I", f.read(4 * n))
    return [(OP_KINDS[w >> 24], w & 0xFFFFFF) for w in words]


def qemu_command(firmware: Path, flash: Path, uart_socket: Path) -> list[str]:
    return ["qemu-system-arm", "-machine", "mps2-an385,memory-backend=flash",
            "-object", f"memory-backend-file,id=flash,size={FLASH_SIZE},mem-path={flash},share=on",
            "-display", "none", "-monitor", "none", "-semihosting",
            "-chardev", f"socket,id=uart,path={uart_socket},server=on,wait=on",
            "-serial", "chardev:uart", "-kernel", str(firmware)]


def _die_with_parent() -> None:
    # QEMU serving a socket UART outlives its client: if this process dies without stop()
    # (kill -9 of a test run), the kernel kills QEMU too (Linux PR_SET_PDEATHSIG).
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class QemuBoard:
    """One power-on of the emulated board: start(), exec() code, stop() (or `with`)."""

    def __init__(self, firmware: Path, flash: Path) -> None:
        self.firmware = Path(firmware)
        self.flash = Path(flash)
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._stderr: BinaryIO | None = None
        self._buf = bytearray()
        self.output = bytearray()  # everything the UART sent since start()

    def __enter__(self) -> QemuBoard:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        if not self.flash.is_file():
            create_flash(self.flash)
        # A short folder for the socket: unix socket paths are limited to 107 bytes.
        self._tmp = tempfile.TemporaryDirectory(prefix="mpboot-qemu-")
        path = Path(self._tmp.name) / "uart"
        self._stderr = open(Path(self._tmp.name) / "stderr", "w+b")
        self.proc = subprocess.Popen(qemu_command(self.firmware, self.flash, path), stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self._fail(f"qemu-system-arm exited ({self.proc.returncode}) before its UART opened")
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(str(path))
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    self._fail(f"qemu-system-arm did not open its UART in {START_TIMEOUT_S:.0f} s")
                time.sleep(0.02)
        self.sock = s
        self._buf.clear()
        self.output.clear()

    def _fail(self, message: str) -> None:
        err = b""
        if self._stderr:
            self._stderr.seek(0)
            err = self._stderr.read()[-500:]
        self.stop()
        raise DeviceRunError(f"{message}: {err.decode(errors='replace').strip()}")

    def stop(self) -> None:
        """Kill QEMU (its whole process group) and close the UART; safe to call twice."""
        if self.sock:
            self.sock.close()
            self.sock = None
        if self.proc:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self.proc = None
        if self._stderr:
            self._stderr.close()
            self._stderr = None
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def write(self, data: bytes) -> None:
        assert self.sock, "not started"
        self.sock.sendall(data)

    def read_until(self, marker: bytes, timeout_s: float) -> bytes:
        """The UART's bytes up to and including `marker` (what follows stays buffered)."""
        assert self.sock, "not started"
        deadline = time.monotonic() + timeout_s
        while (i := self._buf.find(marker)) < 0:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceRunError(f"the board did not send {marker!r} in {timeout_s:.0f} s; "
                                     f"last output: {bytes(self._buf[-300:])!r}")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise DeviceRunError(f"the board's UART closed (QEMU exited) before {marker!r}; "
                                     f"last output: {bytes(self._buf[-300:])!r}")
            self._buf += chunk
            self.output += chunk
        out = bytes(self._buf[: i + len(marker)])
        del self._buf[: i + len(marker)]
        return out

    def pending(self) -> bytes:
        """What the UART sent that no read_until returned (forgotten here: the caller has it)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def raw_repl(self) -> None:
        """Interrupt whatever runs and enter the raw REPL (MicroPython's pyboard protocol)."""
        self.write(b"\r\x03\x03\x01")
        self.read_until(_RAW_PROMPT, START_TIMEOUT_S)

    def exec(self, code: str, timeout_s: float = EXEC_TIMEOUT_S) -> str:
        """Run `code` in the raw REPL (enter it first with raw_repl()); its printed output.
        An exception on the device raises DeviceRunError with the device's traceback."""
        self.write(code.encode() + b"\x04")
        self.read_until(b"OK", START_TIMEOUT_S)
        out = self.read_until(b"\x04", timeout_s)[:-1]
        err = self.read_until(b"\x04", START_TIMEOUT_S)[:-1]
        self.read_until(b">", START_TIMEOUT_S)
        if err:
            raise DeviceRunError(f"device code raised:\n{err.decode(errors='replace').strip()}")
        return out.decode(errors="replace").replace("\r\n", "\n")

    def wait_exit(self, timeout_s: float = START_TIMEOUT_S) -> int:
        """Wait for QEMU to exit on its own (machine.reset() on this port); its exit code."""
        assert self.proc, "not started"
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise DeviceRunError(f"the board did not exit in {timeout_s:.0f} s") from None
