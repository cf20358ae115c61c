"""SMP over a serial port (UART, USB CDC ACM, a pty): console or raw framing.

pyserial opens and configures the port (baud rate, 8N1, raw mode, exclusive lock); the I/O
itself is event driven on the port's file descriptor (`loop.add_reader`, non-blocking
`os.write` + `loop.add_writer`), with no polling sleeps: a reply is handled as soon as its
last byte arrives, which is what keeps a pipelined upload's line busy. POSIX only.

A delimiter goes out before the frames (00 raw, a newline console): a partial frame that an
earlier session left in the device's decoder ends there instead of swallowing the request (the
device skips delimiters between frames, docs/PROTOCOL.md). Raw frames each get one (COBS
decoders skip the empty frame); console frames only the first after the port opens, because
Zephyr's console receiver queues every line, an empty one too, in one of its few receive
buffers (two in the stock build): on a link with no baud pacing a newline before each request
made it drop the second line of a two-line request. A port that takes no bytes for `write_timeout` seconds (nobody reading,
flow control holding the line) fails the link: `send` never waits forever.
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Final

import serial  # type: ignore[import-untyped]  # (pyserial has no type hints)

from mpboot.errors import PortError, TransportError, reason
from mpboot.transport import Inbox
from mpboot.transport.framing import FrameCodec, Framing, codec

_LEAD: Final = {Framing.RAW: b"\x00", Framing.CONSOLE: b"\n"}

DEFAULT_BAUDRATE: Final = 115200
DEFAULT_WRITE_TIMEOUT: Final = 5.0  # seconds a write may make no progress before the link fails
_READ_SIZE: Final = 1 << 16
_BUSY_ERRNOS: Final = frozenset({errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK})


class SerialTransport:
    """One serial port. `framing` is "raw" (COBS, the default of `mpboot flash`) or "console".

    >>> t = SerialTransport("/dev/ttyACM0", baudrate=115200, framing="raw")
    >>> # async with SMPClient(t) as client: ...
    """

    silent_hint: Final = "wrong port, baud or framing?"  # (a device that never answered)

    def __init__(self, port: str, *, baudrate: int = DEFAULT_BAUDRATE,
                 framing: Framing | str = Framing.RAW,
                 write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> None:
        if write_timeout <= 0:
            raise ValueError("write_timeout must be positive")
        self._port = port
        self._baudrate = baudrate
        self.write_timeout = write_timeout
        self.framing: Final = Framing(framing)
        self._codec: FrameCodec = codec(self.framing)
        self._lead_every_frame: Final = self.framing is Framing.RAW
        self._led = False  # the delimiter went out since the port opened
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = Inbox(f"{port} is not open")
        self._write_lock = asyncio.Lock()
        self._write_ready: asyncio.Future[None] | None = None

    @property
    def name(self) -> str:
        return self._port

    @property
    def is_open(self) -> bool:
        return self._serial is not None

    def max_packet(self, buf_size: int) -> int:
        return self._codec.max_packet(buf_size)

    def packet_limit(self, buf_size: int) -> int:
        return self._codec.max_packet(buf_size)

    async def open(self) -> None:
        if self._serial is not None:
            return
        if os.name != "posix":
            raise PortError("the serial transport needs a POSIX system (Linux, macOS)")
        try:
            port = serial.Serial(self._port, self._baudrate, timeout=0, exclusive=True)
        except serial.SerialException as err:
            raise _open_error(self._port, err) from None
        except ValueError as err:  # pyserial: bad baud rate or settings
            raise PortError(f"cannot configure {self._port}: {err}") from None
        try:
            port.reset_input_buffer()
            self._fd = port.fileno()
            os.set_blocking(self._fd, False)
        except (OSError, serial.SerialException) as err:
            port.close()
            raise PortError(f"cannot configure {self._port}: {reason(err)}") from None
        self._serial = port
        self._codec.reset()
        self._led = False
        self._inbox = Inbox(f"{self._port} is not open")
        self._write_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._on_readable)

    async def close(self) -> None:
        if self._serial is None:
            return
        self._fail(TransportError(f"{self._port} is closed"))
        port, self._serial = self._serial, None
        self._fd = -1
        try:
            port.close()
        except (OSError, serial.SerialException):
            pass

    async def send(self, packet: bytes) -> None:
        lead = _LEAD[self.framing] if self._lead_every_frame or not self._led else b""
        self._led = True
        frame = lead + self._codec.encode(packet)
        async with self._write_lock:
            if self.framing == Framing.CONSOLE:
                # A write per line, as the console framing is made of lines: the Zephyr
                # device on QEMU's mps2_an385 took a 2 KB request in 70 ms this way and in up
                # to 230 ms when the whole request came in one write (tools/bench_zephyr.py).
                start = 0
                while start < len(frame):
                    end = frame.find(b"\n", start) + 1 or len(frame)
                    await self._write_all(memoryview(frame)[start:end])
                    start = end
            else:
                await self._write_all(memoryview(frame))

    async def _write_all(self, data: memoryview) -> None:
        while data:
            self._check_open()
            try:
                n = os.write(self._fd, data)
            except BlockingIOError:
                n = 0
            except OSError as err:
                self._fail(TransportError(f"write to {self._port} failed: {err.strerror or err}"))
                raise self._error_or_closed() from None
            data = data[n:]
            if data:
                await self._wait_writable()

    async def recv(self) -> bytes:
        return await self._inbox.get()

    # --- event-loop callbacks ------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            self._fail(TransportError(f"read from {self._port} failed: {err.strerror or err} "
                                      "(device disconnected?)"))
            return
        if not data:  # readable but empty: the device went away
            self._fail(TransportError(f"{self._port} disconnected"))
            return
        for packet in self._codec.feed(data):
            self._inbox.put(packet)

    async def _wait_writable(self) -> None:
        assert self._loop is not None
        fut: asyncio.Future[None] = self._loop.create_future()
        self._write_ready = fut

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        fd = self._fd
        self._loop.add_writer(fd, ready)
        try:
            async with asyncio.timeout(self.write_timeout):
                await fut
        except TimeoutError:
            self._fail(TransportError(f"write to {self._port} stalled: it took no bytes for "
                                      f"{self.write_timeout:.3g} s (is the device reading?)"))
            raise self._error_or_closed() from None
        finally:
            self._write_ready = None
            if self._serial is not None:
                self._loop.remove_writer(fd)

    def _fail(self, error: TransportError) -> None:
        self._inbox.fail(error)
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_exception(self._error_or_closed())

    def _check_open(self) -> None:
        if self._serial is None or self._inbox.error is not None:
            raise self._error_or_closed()

    def _error_or_closed(self) -> TransportError:
        return self._inbox.error_or_closed()


def _open_error(port: str, err: serial.SerialException) -> PortError:
    code = err.errno
    cause = err.__context__  # "Could not configure port": termios.error(ENOTTY, ...) under it
    if code is None and cause is not None and cause.args and isinstance(cause.args[0], int):
        code = cause.args[0]
    if code == errno.ENOENT or (code is None and not os.path.exists(port)):
        return PortError(f"no such port: {port}")
    if code in (errno.ENOTTY, errno.EISDIR):
        return PortError(f"not a serial port: {port} (a file, folder or other device)")
    if code in _BUSY_ERRNOS:
        return PortError(f"port busy: {port} (another program has it open)")
    if code == errno.EACCES or code == errno.EPERM:
        return PortError(f"permission denied: {port} (are you in the port's group, e.g. dialout?)")
    reason = err.strerror or str(err)
    return PortError(f"cannot open {port}: {reason}")


__all__ = ["DEFAULT_BAUDRATE", "Framing", "SerialTransport"]
