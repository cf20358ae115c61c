"""A serial line that misbehaves: a pty relay between a host tool and a device's pty that
drops, corrupts, duplicates and delays bytes, and cuts the link for a while.

    relay = FaultRelay(device_path, Faults(drop=0.01, corrupt=0.01, seed=3))
    relay.start()          # relay.path: the pty the host tool opens
    ...
    relay.stop()

Faults are drawn per chunk of bytes as they arrive (a read from one side), from a seeded
random generator, so a failing seed replays the same kinds of faults (the chunking itself
follows the OS). Counters in `relay.stats` say what happened.

With a `gate` (a threading.Event), nothing is delivered either way until the gate is set: a
device that answers only once the test says so."""

from __future__ import annotations

import heapq
import os
import random
import selectors
import termios
import threading
import time
import tty
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0  # probability a chunk is lost
    corrupt: float = 0.0  # probability one byte of a chunk is flipped
    duplicate: float = 0.0  # probability a chunk is delivered twice
    delay: float = 0.0  # probability a chunk is held back (later chunks are held behind it)
    delay_s: float = 0.05  # how long
    cut: float = 0.0  # probability, per chunk, that the link goes dead for cut_s
    cut_s: float = 0.3
    seed: int = 0
    directions: str = "both"  # "to_device", "to_host" or "both"


def _raw(fd: int) -> None:
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[6][termios.VMIN] = 0
    attrs[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class FaultRelay:
    def __init__(self, device_path: str, faults: Faults, gate: threading.Event | None = None) -> None:
        self.faults = faults
        self.gate = gate
        self.rng = random.Random(faults.seed)
        self.stats: Counter[str] = Counter()
        self.master, self._slave = os.openpty()
        _raw(self._slave)
        self.path = os.ttyname(self._slave)
        self.device = os.open(device_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        _raw(self.device)
        os.set_blocking(self.master, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._dead_until = 0.0
        # Per direction: a heap of (release time, order, bytes) and the last release time, so
        # a delayed chunk holds back the ones after it (a line does not reorder bytes).
        self._queue: dict[int, list[tuple[float, int, bytes]]] = {self.master: [], self.device: []}
        self._last: dict[int, float] = {self.master: 0.0, self.device: 0.0}
        self._order = 0

    def start(self) -> FaultRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for fd in (self.master, self._slave, self.device):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> FaultRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _applies(self, dst: int) -> bool:
        d = self.faults.directions
        return d == "both" or (d == "to_device") == (dst == self.device)

    def _chunk(self, data: bytes, dst: int, now: float) -> None:
        f = self.faults
        rng = self.rng
        if now < self._dead_until:
            self.stats["cut_bytes"] += len(data)
            return
        if self._applies(dst):
            if f.cut and rng.random() < f.cut:
                self._dead_until = now + f.cut_s
                self.stats["cuts"] += 1
                self.stats["cut_bytes"] += len(data)
                return
            if f.drop and rng.random() < f.drop:
                self.stats["drops"] += 1
                return
            if f.corrupt and rng.random() < f.corrupt:
                b = bytearray(data)
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
                data = bytes(b)
                self.stats["corrupts"] += 1
            copies = 1
            if f.duplicate and rng.random() < f.duplicate:
                copies = 2
                self.stats["duplicates"] += 1
            at = now
            if f.delay and rng.random() < f.delay:
                at = now + f.delay_s
                self.stats["delays"] += 1
        else:
            copies, at = 1, now
        at = max(at, self._last[dst])
        self._last[dst] = at
        for _ in range(copies):
            self._order += 1
            heapq.heappush(self._queue[dst], (at, self._order, data))

    def _flush(self, now: float) -> float | None:
        """Write what is due; return the time of the next held chunk (None: nothing held)."""
        if self.gate is not None and not self.gate.is_set():
            return now + 0.01 if any(self._queue.values()) else None
        nxt = None
        for dst, q in self._queue.items():
            due = None
            while q and q[0][0] <= now:
                at, order, data = heapq.heappop(q)
                try:
                    n = os.write(dst, data)
                except BlockingIOError:
                    n = 0
                except OSError:
                    self.stats["write_errors"] += 1
                    n = len(data)
                if n < len(data):  # the far side is full: the rest keeps its place, retried soon
                    heapq.heappush(q, (at, order, data[n:]))
                    due = now + 0.002
                    break
            if q:
                due = q[0][0] if due is None else due
                nxt = due if nxt is None else min(nxt, due)
        return nxt

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.master, selectors.EVENT_READ, self.device)
        sel.register(self.device, selectors.EVENT_READ, self.master)
        while not self._stop.is_set():
            now = time.monotonic()
            nxt = self._flush(now)
            timeout = 0.05 if nxt is None else max(0.0, min(0.05, nxt - now))
            for key, _ in sel.select(timeout):
                try:
                    data = os.read(key.fd, 4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""  # the host side closed its end (EIO): nothing to relay
                if data:
                    self.stats["bytes"] += len(data)
                    self._chunk(data, key.data, time.monotonic())
        sel.close()
