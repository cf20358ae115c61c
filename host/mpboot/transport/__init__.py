"""Links to a device that carry whole SMP packets (one module per transport).

A transport moves complete SMP packets (8-byte header + CBOR) both ways and knows the largest
packet the link and the device's buffer allow; framing, MTU and flow control stay inside it.
`mpboot.smp.SMPClient` only uses this protocol, so serial, BLE and UDP plug in alike. A
transport that may lose, duplicate or reorder packets (UDP) also has `lossy = True`: the
client then resends what is safe to resend (mpboot.smp.client, docs/PROTOCOL.md "SMP over UDP").
An optional `silent_hint` (str) says what to check when a device never answered (serial:
"wrong port, baud or framing?"; UDP: the address, run_udp, a firewall): the client's
DeviceSilent message ends with it.

Errors: opening raises mpboot.errors.PortError (missing, busy, not permitted); a failure while
open raises mpboot.errors.TransportError from `send` / `recv`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from mpboot.errors import TransportError


@runtime_checkable
class Transport(Protocol):
    @property
    def name(self) -> str:
        """What the link is connected to, for messages ("/dev/ttyACM0")."""
        ...

    async def open(self) -> None:
        """Connect. Raises PortError when the link cannot be opened."""
        ...

    async def close(self) -> None:
        """Disconnect; idempotent. Pending `recv` calls raise TransportError."""
        ...

    async def send(self, packet: bytes) -> None:
        """Send one SMP packet; returns once it is handed to the link (not acknowledged).
        Never waits forever: a link that takes no data for a while raises TransportError."""
        ...

    async def recv(self) -> bytes:
        """The next SMP packet received (in arrival order); waits as long as needed.
        Corrupt frames are dropped by the transport and never returned."""
        ...

    def max_packet(self, buf_size: int) -> int:
        """The largest SMP packet (header included) to send to a device whose receive buffer
        is `buf_size` bytes (MCUmgr parameters), within this link's own limits: the size the
        upload fills each request to."""
        ...

    def packet_limit(self, buf_size: int) -> int:
        """The largest SMP packet such a device takes at all (beyond it, a request is dropped
        unanswered): max_packet, or more where max_packet rounds down for efficiency."""
        ...


class Inbox:
    """A transport's received packets, in order, for `recv`, and the error that ended the
    link: `fail` keeps the first error and wakes every waiting and later `get` with it. A
    transport makes a new one each time it opens; `not_open` is the error of an inbox that
    was closed without a failure (or never opened)."""

    def __init__(self, not_open: str) -> None:
        self._not_open = not_open
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: failed or closed
        self.error: TransportError | None = None

    def put(self, packet: bytes) -> None:
        self._queue.put_nowait(packet)

    def fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        self._queue.put_nowait(None)

    def error_or_closed(self) -> TransportError:
        return self.error or TransportError(self._not_open)

    async def get(self) -> bytes:
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)  # wake any other receiver too
            raise self.error_or_closed()
        return item


__all__ = ["Inbox", "Transport"]
