"""BLE test kit: the simulated air, a plain Bumble central, a scripted stand-in for the
MicroPython `bluetooth` shim, and `mpboot sim --ble` as a subprocess.

Everything waits on events with timeouts, never on sleeps:

    def test_x(air):                            # an AirThread, stopped after the test
        sim = BleSim(tmp_path / "dev", keys, radio=air.spec)
        async def main():
            async with central(air.spec) as c:
                link = await c.connect_smp(sim.name)
                hdr, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "hi"})
        run(main())

`Central.connect_smp(name)` scans for the name, connects, exchanges the MTU (247), finds the
SMP characteristic and subscribes; `SmpLink.request(packet)` writes a packet as writes without
response of at most MTU - 3 bytes and reassembles the notified response by its SMP header.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from bumble import hci
from bumble.core import UUID
from bumble.device import Advertisement, Connection, Device, Peer
from bumble.transport import open_transport
from simserve import SimProcess

from mpboot.sim.air import AirThread
from mpboot.smp.header import HEADER_SIZE, Header, Op, decode_packet, encode_packet

T = TypeVar("T")

SMP_SERVICE = "8D53DC1D-1DB7-4CD3-868B-8A527460AA84"
SMP_CHARACTERISTIC = "DA2E7828-FBCE-4E01-AE9E-261174997C48"
BLE_LINE = re.compile(r"mpboot sim: BLE (\S+) (\S+) on (\S+)")

# ---------------------------------------------------------------------------------------
# the air


@pytest.fixture
def air() -> AirThread:  # type: ignore[misc]
    """A fresh simulated radio for one test (trace on)."""
    a = AirThread(trace=True)
    a.start()
    yield a
    a.stop()


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Runs a test's async body with an overall time limit."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    """Waits (polling the loop, not sleeping a guessed time) until cond() is true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------------------
# advertising data


def uuid_le(uuid: str) -> bytes:
    """A 128-bit UUID as advertising data and ATT carry it (little-endian)."""
    return bytes(reversed(bytes.fromhex(uuid.replace("-", ""))))


def uuid_be(uuid: str) -> bytes:
    return bytes.fromhex(uuid.replace("-", ""))


def adv_data(name: str, uuid: str = SMP_SERVICE) -> bytes:
    """Flags, the complete 128-bit service UUID list, the complete local name."""
    n = name.encode()
    return b"\x02\x01\x06" + b"\x11\x07" + uuid_le(uuid) + bytes([len(n) + 1, 0x09]) + n


def ad_fields(raw: bytes) -> dict[int, bytes]:
    """Advertising data structures, by AD type."""
    out: dict[int, bytes] = {}
    i = 0
    while i < len(raw) and raw[i]:
        n = raw[i]
        out[raw[i + 1]] = bytes(raw[i + 2:i + 1 + n])
        i += 1 + n
    return out


def name_matches(raw: bytes, name: str) -> bool:
    f = ad_fields(raw)
    if 0x09 in f:
        return f[0x09] == name.encode()
    return 0x08 in f and len(f[0x08]) > 0 and name.encode().startswith(f[0x08])


def ad_name(raw: bytes) -> str | None:
    f = ad_fields(raw)
    name = f.get(0x09, f.get(0x08))
    return None if name is None else name.decode(errors="replace")


# ---------------------------------------------------------------------------------------
# a plain Bumble central


class SmpLink:
    """One connection of a Central to a peripheral with the SMP characteristic."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.peer = Peer(connection)
        self.mtu = 23
        self.notes: asyncio.Queue[bytes] = asyncio.Queue()
        self.disconnected: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.char: Any = None
        connection.on("disconnection", self._gone)

    def _gone(self, reason: int) -> None:
        if not self.disconnected.done():
            self.disconnected.set_result(reason)

    async def setup(self, mtu: int = 247, service: str = SMP_SERVICE, characteristic: str = SMP_CHARACTERISTIC) -> None:
        self.mtu = await self.peer.request_mtu(mtu)
        await self.peer.discover_services([UUID(service)])
        [svc] = self.peer.get_services_by_uuid(UUID(service))
        await svc.discover_characteristics([UUID(characteristic)])
        [self.char] = svc.get_characteristics_by_uuid(UUID(characteristic))
        await self.peer.subscribe(self.char, self.notes.put_nowait)

    async def write(self, data: bytes) -> None:
        """Writes without response, in MTU - 3 byte pieces."""
        step = self.mtu - 3
        for off in range(0, len(data), step):
            await self.peer.write_value(self.char, data[off:off + step], with_response=False)
            await asyncio.sleep(0)  # Bumble's write-without-response never yields

    async def read_packet(self, timeout: float = 10) -> bytes:
        """One SMP packet reassembled from notifications."""
        buf = b""
        while len(buf) < HEADER_SIZE or len(buf) < HEADER_SIZE + Header.unpack(buf).length:
            buf += await self._next(timeout)
        return buf

    async def _next(self, timeout: float) -> bytes:
        get = asyncio.ensure_future(self.notes.get())
        done, _ = await asyncio.wait({get, self.disconnected}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        if self.disconnected.done():
            raise ConnectionError(f"disconnected (reason {self.disconnected.result():#04x})")
        raise TimeoutError("no notification")

    async def request(self, packet: bytes, timeout: float = 10) -> bytes:
        await self.write(packet)
        return await self.read_packet(timeout)

    async def smp(self, op: Op, group: int, command: int, payload: dict[str, Any], seq: int = 0,
                  timeout: float = 10) -> tuple[Header, dict[str, Any]]:
        return decode_packet(await self.request(encode_packet(op, group, command, seq, payload), timeout))

    async def wait_disconnected(self, timeout: float = 10) -> int:
        return await asyncio.wait_for(asyncio.shield(self.disconnected), timeout)

    async def disconnect(self) -> None:
        if not self.disconnected.done():
            with contextlib.suppress(Exception):
                await self.connection.disconnect()


class Central:
    """A Bumble host on a transport spec, acting as central."""

    def __init__(self, device: Device, transport: Any) -> None:
        self.device = device
        self.transport = transport
        self.adverts: asyncio.Queue[Advertisement] = asyncio.Queue()
        device.on("advertisement", self.adverts.put_nowait)

    @classmethod
    async def open(cls, spec: str, address: str | None = None) -> Central:
        transport = await open_transport(spec)
        device = Device.with_hci("central", hci.Address(address) if address else hci.Address.ANY_RANDOM,
                                 transport.source, transport.sink)
        await device.power_on()
        return cls(device, transport)

    async def close(self) -> None:
        for conn in list(self.device.connections.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.disconnect(), 2)
        await self.transport.close()

    async def scan(self, match: Callable[[Advertisement], bool], timeout: float = 10) -> Advertisement:
        """The first advertisement (heard from now on) that `match`es."""
        while not self.adverts.empty():
            self.adverts.get_nowait()
        await self.device.start_scanning(filter_duplicates=False)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    adv = await self.adverts.get()
                    if match(adv):
                        return adv
        finally:
            await self.device.stop_scanning()

    async def find(self, name: str, timeout: float = 10) -> Advertisement:
        """The first advertisement of `name`: its complete name, or a shortened name that
        begins it (an advertisement with a 128-bit UUID has room for 8 bytes of name)."""
        return await self.scan(lambda a: name_matches(a.data_bytes, name), timeout)

    async def connect(self, address: hci.Address | str, timeout: float = 10) -> Connection:
        if isinstance(address, str):
            address = hci.Address(address)
        return await self.device.connect(address, timeout=timeout)

    async def connect_smp(self, name_or_address: str, *, mtu: int = 247, timeout: float = 10) -> SmpLink:
        """Scans for a name (or takes an address), connects, sets up SMP."""
        if re.fullmatch(r"(?:[0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", name_or_address):
            address: hci.Address = hci.Address(name_or_address)
        else:
            address = (await self.find(name_or_address, timeout)).address
        link = SmpLink(await self.connect(address, timeout))
        await link.setup(mtu)
        return link


@contextlib.asynccontextmanager
async def central(spec: str, address: str | None = None) -> AsyncIterator[Central]:
    c = await Central.open(spec, address)
    try:
        yield c
    finally:
        await c.close()


# ---------------------------------------------------------------------------------------
# a scripted stand-in for the device's `bluetooth` shim (docs/BLE.md section 2)


class FakeShim:
    """The device side of the companion's message protocol, driven by a test."""

    READY, CONNECT, DISCONNECT, WRITE, MTU = 0x80, 0x81, 0x82, 0x83, 0x84

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.messages: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.address: tuple[int, bytes] = (0, b"")
        self._task: asyncio.Task[None] | None = None

    async def open(self, port: int, timeout: float = 5) -> FakeShim:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self._task = asyncio.ensure_future(self._pump())
        kind, p = await self.recv(timeout)
        assert kind == self.READY, f"first message {kind:#x}, not READY"
        self.address = (p[0], p[1:7])
        return self

    async def _pump(self) -> None:
        assert self.reader is not None
        try:
            while True:
                kind, n = struct.unpack("<BH", await self.reader.readexactly(3))
                self.messages.put_nowait((kind, await self.reader.readexactly(n) if n else b""))
        except (asyncio.IncompleteReadError, ConnectionError):
            self.messages.put_nowait(None)

    async def recv(self, timeout: float = 5) -> tuple[int, bytes]:
        m = await asyncio.wait_for(self.messages.get(), timeout)
        if m is None:
            raise ConnectionError("companion closed the shim's socket")
        return m

    async def expect(self, kind: int, timeout: float = 5) -> bytes:
        """The payload of the next message, which must be of `kind`."""
        got, p = await self.recv(timeout)
        assert got == kind, f"expected message {kind:#x}, got {got:#x} {p.hex()}"
        return p

    def send(self, kind: int, payload: bytes = b"") -> None:
        assert self.writer is not None
        self.writer.write(struct.pack("<BH", kind, len(payload)) + payload)

    def config(self, mtu: int = 247, name: str = "") -> None:
        self.send(0x01, struct.pack("<H", mtu) + name.encode())

    def register(self, service: str, chars: list[tuple[int, str, int]]) -> None:
        """chars: (value handle, UUID, flags)."""
        self.send(0x02, uuid_be(service) + b"".join(struct.pack("<H", h) + uuid_be(u) + struct.pack("<H", f)
                                                   for h, u, f in chars))

    def advertise(self, adv: bytes, resp: bytes = b"", interval_us: int = 100_000, connectable: bool = True) -> None:
        self.send(0x03, struct.pack("<IBB", interval_us, int(connectable), len(adv)) + adv + resp)

    def stop_advertising(self) -> None:
        self.send(0x03, struct.pack("<IBB", 0, 0, 0))

    def notify(self, conn: int, handle: int, data: bytes) -> None:
        self.send(0x04, struct.pack("<HH", conn, handle) + data)

    def disconnect(self, conn: int) -> None:
        self.send(0x05, struct.pack("<H", conn))

    def value(self, handle: int, data: bytes) -> None:
        self.send(0x06, struct.pack("<H", handle) + data)

    async def drain(self) -> None:
        if self.writer is not None:
            await self.writer.drain()

    async def close(self) -> None:
        """The device loses power: its socket closes."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


# ---------------------------------------------------------------------------------------
# `mpboot sim --ble` as a subprocess


class BleSim(SimProcess):
    """`mpboot sim --ble [--radio SPEC]`: name, address and spec from its BLE line."""

    def __init__(self, state: Path, keys: list[Path], *extra: str, radio: str | None = None,
                 name: str | None = None, cwd: Path | None = None) -> None:
        args = ["--ble"]
        if radio is not None:
            args += ["--radio", radio]
        if name is not None:
            args += ["--ble-name", name]
        super().__init__(state, keys, *args, *extra, cwd=cwd)
        m = self.wait_for(BLE_LINE)
        self.name, self.address, self.spec = m.group(1), m.group(2), m.group(3)


async def wait_all(*aws: Awaitable[Any], timeout: float = 10) -> list[Any]:
    return list(await asyncio.wait_for(asyncio.gather(*aws), timeout))
