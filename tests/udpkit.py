"""SMP over UDP test kit: free ports, a seeded fault proxy, and the simulated device serving UDP.

    port = free_udp_port()
    with SimUdp(state, [KEY], port) as sim:           # SimServer(udp=port), in this process
        sim.wait_for(r"serving SMP over UDP")
        with FaultProxy(port, up=Faults(drop=0.1), down=Faults(dup=0.05), seed=3) as proxy:
            run mpboot ... --udp 127.0.0.1:{proxy.port}
            proxy.stats                                # what it dropped, duplicated, delayed

FaultProxy: one asyncio datagram endpoint on an ephemeral port of 127.0.0.1 (its own event
loop, in a thread, so a client in a subprocess or in another loop can use it). Datagrams from
a client go to the device (the "up" direction), the device's go to the client that sent last
("down"). Each direction has its own Faults: drop with probability `drop`, send twice with
`dup`, hold back by a uniform [0, delay_s] with `reorder` (which reorders); `drop_nth` drops
the datagrams of those ordinal numbers (1-based, per direction) for deterministic cases. One
seeded random.Random per direction: a given seed gives the same decisions for the same
sequence of datagrams. Delays and duplicates stay shorter than a power-on (delay_s 20 ms by
default), as docs/PROTOCOL.md asks of a network: a copy of a reset arriving after the reboot
would reset the new boot.
"""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from mpboot.keys import PublicKey
from simserve import WaitsForLines

MAX_DELAY_S = 0.05  # longer than this a held-back datagram could outlive a power-on


def free_udp_port() -> int:
    """A UDP port of 127.0.0.1 free right now (bound and released: ports are not reused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Faults:
    drop: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    delay_s: float = 0.02
    drop_nth: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        assert 0 <= self.delay_s <= MAX_DELAY_S, "delays must stay shorter than a power-on"


@dataclass
class Counters:
    seen: int = 0
    forwarded: int = 0
    dropped: int = 0
    duplicated: int = 0
    delayed: int = 0
    dropped_nth: list[int] = field(default_factory=list)


class _Direction:
    def __init__(self, faults: Faults, seed: int) -> None:
        self.faults = faults
        self.rng = __import__("random").Random(seed)
        self.count = Counters()

    def plan(self) -> list[float] | None:
        """None: drop; else the delays of the copies to send."""
        f, c = self.faults, self.count
        c.seen += 1
        # Always draw the same numbers per datagram, so a seed's decisions do not shift.
        r_drop, r_dup, r_re, r_delay = (self.rng.random() for _ in range(4))
        if c.seen in f.drop_nth:
            c.dropped += 1
            c.dropped_nth.append(c.seen)
            return None
        if r_drop < f.drop:
            c.dropped += 1
            return None
        delay = r_delay * f.delay_s if r_re < f.reorder else 0.0
        c.delayed += delay > 0
        copies = [delay]
        if r_dup < f.dup:
            c.duplicated += 1
            copies.append(delay + 0.001)
        c.forwarded += len(copies)
        return copies


class FaultProxy:
    """See the module docstring. `port` once started; `up` and `down` the counters."""

    def __init__(self, device_port: int, *, up: Faults = Faults(), down: Faults = Faults(), seed: int = 0,
                 device_host: str = "127.0.0.1") -> None:
        self.device = (device_host, device_port)
        self._up = _Direction(up, seed * 2 + 1)
        self._down = _Direction(down, seed * 2 + 2)
        self.port = 0
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    @property
    def up(self) -> Counters:
        return self._up.count

    @property
    def down(self) -> Counters:
        return self._down.count

    def start(self) -> Self:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="udp-fault-proxy",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _main(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        proxy = self

        class Front(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                proxy._client = addr
                proxy._forward(proxy._up, data, back_end, proxy.device)

            def error_received(self, exc: Exception) -> None:
                pass

        class Back(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if proxy._client is not None:
                    proxy._forward(proxy._down, data, front, proxy._client)

            def error_received(self, exc: Exception) -> None:
                pass  # the device is between power-ons: as a lost datagram

        front, _ = await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", 0))
        back_end, _ = await loop.create_datagram_endpoint(Back, local_addr=("127.0.0.1", 0))
        self.port = front.get_extra_info("sockname")[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            front.close()
            back_end.close()

    def _forward(self, direction: _Direction, data: bytes, out: Any, addr: Any) -> None:
        copies = direction.plan()
        if copies is None:
            return
        assert self._loop is not None
        for delay in copies:
            if delay <= 0:
                out.sendto(data, addr)
            else:
                self._loop.call_later(delay, out.sendto, data, addr)


class SimUdp(WaitsForLines):
    """mpboot.sim.serve.SimServer(udp=port) in this process, its lines collected for wait_for."""

    def __init__(self, state: Path, keys: Sequence[PublicKey], port: int, **options: Any) -> None:
        from mpboot.sim.serve import SimServer

        self.port = port
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        self._seen = 0
        self.server = SimServer(state, keys, udp=port, output=self._q.put, **options)

    def __enter__(self) -> Self:
        self.server.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.stop()

    def _stopped(self) -> str | None:
        return self.server.error


def link_local_addresses() -> list[str]:
    """This machine's IPv6 link-local addresses with their scope ("fe80::...%eth0"), from
    /proc/net/if_inet6 (Linux; scope 0x20 is link)."""
    found = []
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[3] == "20":
            ip = socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0]))
            found.append(f"{ip}%{fields[5]}")
    return found


class EchoDevice:
    """A stand-in device on any address (IPv6 link-local with a scope included), in a thread:
    answers the MCUmgr params read and OS echo, one datagram each, as the firmware does.

        with EchoDevice("fe80::1%eth0") as dev:     # dev.port: the port it bound
    """

    def __init__(self, host: str) -> None:
        family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_DGRAM)[0]
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(addr)
        self.port = int(self.sock.getsockname()[1])
        self.peers: list[Any] = []  # the sender of each request
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.sock.close()  # (recvfrom in the thread fails: it ends)
        self._thread.join(5)

    def _serve(self) -> None:
        import cbor2

        while True:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            self.peers.append(peer)
            group, seq, cmd = int.from_bytes(data[4:6], "big"), data[6], data[7]
            if group != 0 or cmd not in (0, 6):
                continue
            body = cbor2.dumps({"buf_size": 1472, "buf_count": 4} if cmd == 6 else {"r": cbor2.loads(data[8:])["d"]})
            op = (data[0] & 7) + 1
            header = bytes([op | 1 << 3, 0]) + len(body).to_bytes(2, "big") + data[4:6] + bytes([seq, cmd])
            self.sock.sendto(header + body, peer)
