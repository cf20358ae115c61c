"""Links to a device that carry whole SMP packets (one module per transport).

A transport moves complete SMP packets (8-byte header + CBOR) both ways and knows the largest
packet the link and the device's buffer allow; framing, MTU and flow control stay inside it.
`mpboot.smp.SMPClient` only uses this protocol, so serial today and BLE later plug in alike.

Errors: opening raises mpboot.errors.PortError (missing, busy, not permitted); a failure while
open raises mpboot.errors.TransportError from `send` / `recv`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


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
        is `buf_size` bytes (MCUmgr parameters), within this link's own limits."""
        ...


__all__ = ["Transport"]
