"""SMP over UDP (docs/PROTOCOL.md, "SMP over UDP"), as Zephyr's smp_udp transport: each SMP
packet goes out in one datagram to the device's port (1337 by default), and each datagram
that comes back from that address is one response (several packets in one are split by
their headers' length fields).

UDP is not reliable: a datagram may be lost, duplicated or overtaken, and nothing here hides
that. `lossy` tells mpboot.smp.SMPClient to resend what is safe to resend (docs/PROTOCOL.md,
"SMP over UDP"); the upload resends and resyncs by offset as on any link. ICMP errors (port
unreachable while the device resets: nothing listens until it serves again) are counted in
`icmp_errors`, never fatal: to the client they are a lost datagram.

Sizes: a request must fit one datagram without IP fragmentation, so `max_packet` is the
device's buf_size capped at `mtu - 28` (IPv4: 20 bytes of IP header, 8 of UDP) or `mtu - 48`
(IPv6): 1472 / 1452 bytes for the usual 1500-byte MTU.

    t = UdpTransport("192.168.1.20")                  # port 1337
    t = UdpTransport("::1", 1337, mtu=1280)
    async with SMPClient(t) as client: ...
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final

from mpboot.errors import PortError, TransportError
from mpboot.transport import Inbox

DEFAULT_PORT: Final = 1337  # Zephyr's CONFIG_MCUMGR_TRANSPORT_UDP_PORT
DEFAULT_MTU: Final = 1500  # Ethernet, and WLAN as IP sees it
MIN_MTU: Final = 576  # the least an IPv4 host must take (RFC 791); IPv6's is 1280
IPV4_OVERHEAD: Final = 28  # IPv4 header 20 + UDP header 8
IPV6_OVERHEAD: Final = 48  # IPv6 header 40 + UDP header 8
_HEADER_SIZE: Final = 8


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT (a bare IPv6 address is taken whole) -> (host,
    port). ValueError with the reason when it is not one of those."""
    text = text.strip()
    if not text:
        raise ValueError("no host")
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("an IPv6 address in brackets lacks its ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after ']'")
        port_text = rest[1:] if rest else ""
        if rest and not port_text:
            raise ValueError("no port after ':'")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        if not port_text:
            raise ValueError("no port after ':'")
    if not host:
        raise ValueError("no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port {port_text!r}: expected 1 to 65535")
    return host, int(port_text)


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.owner._on_datagram(data)

    def error_received(self, exc: Exception) -> None:
        self.owner.icmp_errors += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(exc)


class UdpTransport:
    """One device's SMP over UDP: see the module docstring."""

    lossy: Final = True  # datagrams may be lost, duplicated or reordered
    silent_hint: Final = "wrong address or port, the device not serving run_udp, or a firewall?"

    def __init__(self, host: str, port: int = DEFAULT_PORT, *, mtu: int = DEFAULT_MTU) -> None:
        if not host:
            raise ValueError("a host is required")
        if not 0 < port < 65536:
            raise ValueError(f"UDP port {port}: expected 1 to 65535")
        if mtu < MIN_MTU:
            raise ValueError(f"MTU {mtu}: at least {MIN_MTU}")
        self.host: Final = host
        self.port: Final = port
        self.mtu: Final = mtu
        self.icmp_errors = 0  # ICMP errors reported for our datagrams (port unreachable, ...)
        self.undecodable = 0  # datagrams dropped: not a whole number of SMP packets
        self.family = socket.AF_INET  # once open: AF_INET6 for an IPv6 peer
        self._transport: asyncio.DatagramTransport | None = None
        self._inbox = Inbox(f"{self.name} is not open")

    @property
    def name(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"udp:{host}:{self.port}"

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    @property
    def datagram_limit(self) -> int:
        """The largest SMP packet one unfragmented datagram carries over this path."""
        return self.mtu - (IPV6_OVERHEAD if self.family == socket.AF_INET6 else IPV4_OVERHEAD)

    def max_packet(self, buf_size: int) -> int:
        return min(buf_size, self.datagram_limit)

    def packet_limit(self, buf_size: int) -> int:
        return min(buf_size, self.datagram_limit)

    async def open(self) -> None:
        if self._transport is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        except (socket.gaierror, UnicodeError) as err:
            raise PortError(f"cannot resolve {self.host}: {getattr(err, 'strerror', None) or err}") from None
        if not infos:
            raise PortError(f"cannot resolve {self.host}")
        family, _, _, _, addr = infos[0]
        self._inbox = Inbox(f"{self.name} is not open")
        sock: socket.socket | None = None
        try:
            # Connected to the whole sockaddr getaddrinfo gave: an IPv6 link-local address's
            # scope ("fe80::1%eth0") is its 4th field, which (host, port) would lose.
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(addr)  # (UDP: sets the peer, never waits)
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except OSError as err:
            if sock is not None:
                sock.close()
            raise PortError(f"cannot open {self.name}: {err.strerror or err}") from None
        except BaseException:
            if sock is not None:
                sock.close()
            raise
        self.family = family
        self._transport = transport

    async def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is None:
            return
        self._inbox.fail(TransportError(f"{self.name} is closed"))
        transport.close()

    async def send(self, packet: bytes) -> None:
        transport = self._transport
        if transport is None or self._inbox.error is not None:
            raise self._inbox.error_or_closed()
        # Never blocks: a datagram the host cannot queue is dropped by the kernel, which to the
        # client is a lost datagram.
        transport.sendto(bytes(packet))

    async def recv(self) -> bytes:
        return await self._inbox.get()

    # --- callbacks -----------------------------------------------------------------------

    def _on_datagram(self, data: bytes) -> None:
        packets = []
        i = 0
        while i < len(data):
            if len(data) - i < _HEADER_SIZE:
                self.undecodable += 1
                return
            end = i + _HEADER_SIZE + int.from_bytes(data[i + 2 : i + 4], "big")
            if end > len(data):
                self.undecodable += 1
                return
            packets.append(data[i:end])
            i = end
        for p in packets:
            self._inbox.put(p)

    def _on_lost(self, exc: Exception | None) -> None:
        if self._transport is not None and exc is not None:
            self._inbox.fail(TransportError(f"{self.name} failed: {exc}"))


__all__ = ["DEFAULT_MTU", "DEFAULT_PORT", "UdpTransport", "parse_address"]
