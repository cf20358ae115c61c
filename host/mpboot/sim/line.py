"""One direction of a UART-paced relay, shared by `mpboot sim --baud` (serve.py) and the
benchmarks' relay in front of the Zephyr devices (tests/zephyrkit.py)."""

from __future__ import annotations

import errno
import os
import time

# A write to a pty or socket whose other end is gone: the bytes are lost, as on a UART with
# nothing attached.
_GONE = frozenset({errno.EIO, errno.EPIPE, errno.ECONNRESET})


class PacedLine:
    """One direction of the relay: bytes waiting, released at `baud`/10 bytes per second
    (8N1: ten bit times per byte) or at once when `baud` is None."""

    def __init__(self, baud: int | None) -> None:
        self.buf = bytearray()
        self.rate = None if baud is None else baud / 10
        # A little credit absorbs the thread's wake-up jitter without exceeding the line rate
        # over any stretch longer than a few milliseconds.
        self.burst = 0.0 if self.rate is None else max(16.0, self.rate * 0.005)
        self.credit = 0.0
        self.last = time.monotonic()
        self.blocked = False  # the last write found the other side full: wait until writable

    def allowed(self, now: float) -> int:
        if self.rate is None:
            return len(self.buf)
        self.credit = min(self.burst, self.credit + (now - self.last) * self.rate)
        self.last = now
        return min(len(self.buf), int(self.credit))

    def sent(self, n: int) -> None:
        del self.buf[:n]
        if self.rate is not None:
            self.credit -= n

    def delay(self) -> float | None:
        """Seconds until the next chunk may go (None: nothing waits, no pacing, or blocked)."""
        if not self.buf or self.rate is None or self.blocked:
            return None
        need = min(len(self.buf), max(1.0, self.rate * 0.001))
        return max(0.0, (need - self.credit) / self.rate)

    def release(self, fd: int, now: float) -> None:
        """Write what may go now to `fd` (non-blocking). A full pty or socket takes part or
        none: the rest waits and the line is `blocked` until `fd` is writable again. An other
        end that is gone loses the bytes."""
        if self.blocked:
            return
        n = self.allowed(now)
        if n <= 0:
            return
        try:
            w = os.write(fd, self.buf[:n])
        except BlockingIOError:
            w = 0
        except OSError as err:
            if err.errno not in _GONE:
                raise
            w = n
        self.sent(w)
        self.blocked = w < n
