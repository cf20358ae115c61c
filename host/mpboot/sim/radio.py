"""The simulated device's radio: a Bumble peripheral that the MicroPython `bluetooth` shim
drives over TCP (docs/BLE.md sections 2 and 3).

The unix port has no Bluetooth. The simulator runs this `Companion` in its own (CPython)
process: a Bumble `Device` with a static random address derived from the board's unique id,
on any Bumble transport (`--radio SPEC`: another simulator's air, `mpboot sim air`, a USB
dongle), else on an `Air` it hosts itself. The device process connects to the companion's TCP
port and speaks the message protocol of docs/BLE.md section 2 (`u8 type | u16 LE length |
payload`): the companion builds the GATT database the firmware registers, advertises exactly
the data it is given, forwards writes to the device and sends its notifications. When the
device's socket closes (reset, crash, kill -9) every connection ends with reason 0x15 (power
off) and advertising stops; the next power-on connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bumble import hci
from bumble.core import UUID, PhysicalTransport
from bumble.device import AdvertisingType, Connection, Device, DeviceConfiguration
from bumble.gatt import (
    GATT_DEVICE_NAME_CHARACTERISTIC,
    Characteristic,
    CharacteristicValue,
    Service,
)
from bumble.transport import open_transport

from mpboot.sim.air import Air, LoopThread

logger = logging.getLogger(__name__)

# Messages (docs/BLE.md section 2).
READY, M_CONNECT, M_DISCONNECT, M_WRITE, M_MTU = 0x80, 0x81, 0x82, 0x83, 0x84
CONFIG, REGISTER, ADVERTISE, NOTIFY, DISCONNECT, VALUE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06

REASON_POWER_OFF = 0x15  # HCI: remote device terminated the connection due to power off
REASON_USER = 0x13  # HCI: remote user terminated the connection (gap_disconnect)
ATT_MTU_MIN, ATT_MTU_MAX = 23, 517
_BASE_UUID_TAIL = bytes.fromhex("00001000800000805F9B34FB")
_FLAG_READ, _FLAG_WRITE_NR, _FLAG_WRITE = 0x0002, 0x0004, 0x0008


def static_address(uid: bytes) -> str:
    """The board's LE static random address ("C3:..."), derived from its unique id."""
    b = bytearray(hashlib.sha256(b"mpboot ble address\0" + uid).digest()[:6])
    b[0] |= 0xC0  # static random: the two most significant bits are 1
    if b[1:] in (b"\0" * 5, b"\xff" * 5):
        b[5] ^= 0x01
    return ":".join(f"{x:02X}" for x in b)


def default_name(uid: bytes) -> str:
    # 8 bytes: what a legacy advertisement has left after the flags and the 128-bit SMP
    # service UUID, so the complete name is advertised (a longer one is shortened).
    return "mpb-" + uid.hex()[-4:]


def _addr_bytes(address: hci.Address) -> tuple[int, bytes]:
    """(MicroPython addr_type: 0 public, 1 random; 6 bytes big-endian, as printed)."""
    return (0 if address.is_public else 1), bytes(reversed(address.address_bytes))


def _uuid(b: bytes) -> UUID:
    """A 16-byte big-endian UUID as Bumble's UUID (16-bit form for the Bluetooth base)."""
    if b[:2] == b"\0\0" and b[4:] == _BASE_UUID_TAIL:
        return UUID.from_16_bits(int.from_bytes(b[2:4], "big"))
    return UUID(str(uuidlib.UUID(bytes=bytes(b))))


@dataclass(eq=False)
class _Char:
    handle: int  # the device's value handle (NimBLE numbering, from REGISTER)
    characteristic: Characteristic[bytes]
    value: bytes = b""


@dataclass(eq=False)
class _Service:
    definition: bytes  # the REGISTER payload
    service: Service
    chars: list[_Char] = field(default_factory=list)


def _parse_register(payload: bytes) -> tuple[bytes, list[tuple[int, bytes, int]]]:
    if len(payload) < 16 or (len(payload) - 16) % 20:
        raise ValueError(f"REGISTER payload of {len(payload)} bytes")
    chars = [struct.unpack_from("<H16sH", payload, off) for off in range(16, len(payload), 20)]
    return payload[:16], [(h, u, f) for h, u, f in chars]


class _Session:
    """One power-on's connection from the device's shim."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.registered = 0  # services the current gatts_register_services call registered
        self.top = 0  # the highest value handle registered so far
        self.closed = False

    def send(self, kind: int, payload: bytes = b"") -> None:
        if self.closed or self.writer.is_closing():
            return
        self.writer.write(struct.pack("<BH", kind, len(payload)) + payload)


class Companion:
    """The Bumble peripheral of one simulated device (see the module docstring). Use inside a
    running loop: `await start()`, then the device connects to `shim_port`; `await close()`.

    `radio`: a Bumble transport spec, or None to host an Air on a free port (then `spec` is
    its spec). `address`: the static random address, `name`: the default advertised name
    (the device's CONFIG may set another)."""

    def __init__(self, uid: bytes, *, name: str | None = None, radio: str | None = None) -> None:
        self.uid = uid
        self.name = name or default_name(uid)
        self.address = static_address(uid)
        self.radio = radio
        self.spec = radio or ""
        self.shim_port = 0
        self.air: Air | None = None
        self.device: Device | None = None
        self._transport: Any = None
        self._server: asyncio.base_events.Server | None = None
        self._session: _Session | None = None
        self._services: list[_Service] = []  # the GATT database the device registered
        self._by_handle: dict[int, _Char] = {}  # device value handle -> characteristic
        self._tasks: set[asyncio.Task[Any]] = set()
        self.sessions = 0  # power-ons that connected (for tests)

    # ---- life cycle -------------------------------------------------------------------

    async def start(self) -> None:
        if self.radio is None:
            self.air = Air()
            self.spec = await self.air.start()
        self._transport = await open_transport(self.spec)
        config = DeviceConfiguration(name=self.name, address=hci.Address(self.address, hci.Address.RANDOM_DEVICE_ADDRESS))
        self.device = Device.from_config_with_hci(config, self._transport.source, self._transport.sink)
        self.device.on("connection", self._on_connection)
        await self.device.power_on()
        self._server = await asyncio.start_server(self._on_shim, "127.0.0.1", 0)
        self.shim_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._session is not None:
            self._session.writer.close()  # its handler reads the end and ends the session
        # Let HCI work in flight finish: a Bumble host whose transport closes under a
        # cancelled command raises InvalidStateError from its transport-lost callback.
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._session is not None:
            await self._end_session(self._session)
        for t in list(self._tasks):
            t.cancel()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
            self._transport = None
        if self.air is not None:
            await self.air.close()
            self.air = None

    # ---- the shim's side --------------------------------------------------------------

    async def _on_shim(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._tasks.add(me)
        try:
            await self._serve_shim(reader, writer)
        finally:
            self._tasks.discard(me)  # type: ignore[arg-type]

    async def _serve_shim(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._session is not None:  # a new power-on while the old socket lingers
            await self._end_session(self._session)
        s = self._session = _Session(reader, writer)
        self.sessions += 1
        kind, addr = 1, bytes.fromhex(self.address.replace(":", ""))
        s.send(READY, bytes([kind]) + addr)
        try:
            while True:
                head = await reader.readexactly(3)
                kind, n = struct.unpack("<BH", head)
                payload = await reader.readexactly(n) if n else b""
                try:
                    await self._handle(s, kind, payload)
                except Exception:  # a bad message: say so, keep serving
                    logger.exception("companion: message 0x%02x (%d bytes) failed", kind, n)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._session is s:
                await self._end_session(s)

    async def _end_session(self, s: _Session) -> None:
        """The device lost power: stop advertising, end every connection (0x15)."""
        if s.closed:
            return
        s.closed = True
        if self._session is s:
            self._session = None
        with contextlib.suppress(Exception):
            s.writer.close()
        dev = self.device
        if dev is None:
            return
        with contextlib.suppress(Exception):
            await dev.stop_advertising()
        conns = [c for c in list(dev.connections.values()) if c.transport == PhysicalTransport.LE]
        if conns:
            await asyncio.gather(*(self._disconnect(c, REASON_POWER_OFF) for c in conns))

    async def _disconnect(self, conn: Connection, reason: int) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.disconnect(reason), 5)

    async def _handle(self, s: _Session, kind: int, p: bytes) -> None:
        dev = self.device
        assert dev is not None
        if kind == CONFIG:
            (mtu,) = struct.unpack_from("<H", p)
            dev.gatt_server.max_mtu = max(ATT_MTU_MIN, min(ATT_MTU_MAX, mtu))
            name = p[2:].decode("utf-8", "replace")
            if name:
                self._set_name(name)
        elif kind == REGISTER:
            self._register(s, p)
        elif kind == ADVERTISE:
            interval_us, connectable, adv_len = struct.unpack_from("<IBB", p)
            adv, resp = p[6:6 + adv_len], p[6 + adv_len:]
            if not interval_us:
                await dev.stop_advertising()
                return
            self._truncate(s.registered)  # services an earlier power-on had and this one has not
            kind_ = (AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE if connectable
                     else AdvertisingType.UNDIRECTED_SCANNABLE if resp else AdvertisingType.UNDIRECTED)
            ms = interval_us / 1000
            await dev.start_advertising(advertising_type=kind_, advertising_data=bytes(adv),
                                        scan_response_data=bytes(resp), advertising_interval_min=ms,
                                        advertising_interval_max=ms, auto_restart=False)
        elif kind == NOTIFY:
            conn_h, handle = struct.unpack_from("<HH", p)
            ch, conn = self._by_handle.get(handle), dev.lookup_connection(conn_h)
            if ch is None or conn is None:
                logger.debug("companion: notify on conn %d handle %d: no such", conn_h, handle)
                return
            # As NimBLE: a notification goes out whether or not the client subscribed.
            await dev.notify_subscriber(conn, ch.characteristic, bytes(p[4:]) or ch.value, force=True)
        elif kind == DISCONNECT:
            (conn_h,) = struct.unpack_from("<H", p)
            conn = dev.lookup_connection(conn_h)
            if conn is not None:
                self._spawn(self._disconnect(conn, REASON_USER))
        elif kind == VALUE:
            (handle,) = struct.unpack_from("<H", p)
            ch = self._by_handle.get(handle)
            if ch is not None:
                ch.value = bytes(p[2:])
        else:
            logger.warning("companion: unknown message type 0x%02x", kind)

    def _spawn(self, coro: Any) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _set_name(self, name: str) -> None:
        dev = self.device
        assert dev is not None
        dev.name = name
        for attr in dev.gatt_server.attributes:
            if isinstance(attr, Characteristic) and attr.uuid == GATT_DEVICE_NAME_CHARACTERISTIC:
                attr.value = name.encode()

    def _register(self, s: _Session, p: bytes) -> None:
        """A service the device registers (one REGISTER per service; value handles that start
        over begin a new registration): kept when this power-on registers the same definition
        at the same place as an earlier one, else the database is rebuilt from that service
        on. Services left over from a longer earlier registration go when advertising starts."""
        dev = self.device
        assert dev is not None
        _, chars = _parse_register(p)
        low = min((h for h, _, _ in chars), default=None)
        if low is not None and low <= s.top:
            s.registered = 0  # handles start over: a new gatts_register_services call
        s.top = max((h for h, _, _ in chars), default=s.top)
        index = s.registered
        s.registered += 1
        if index < len(self._services) and self._services[index].definition == p:
            entry = self._services[index]
        else:
            self._truncate(index)
            svc_uuid, chars = _parse_register(p)
            entry = _Service(p, Service(_uuid(svc_uuid), []))
            for handle, cu, flags in chars:
                perms = ((Characteristic.READABLE if flags & _FLAG_READ else 0)
                         | (Characteristic.WRITEABLE if flags & (_FLAG_WRITE | _FLAG_WRITE_NR) else 0))
                ch = _Char(handle, None)  # type: ignore[arg-type]
                ch.characteristic = Characteristic(
                    _uuid(cu), Characteristic.Properties(flags & 0xFF), perms,
                    CharacteristicValue(read=lambda _conn, ch=ch: ch.value,
                                        write=lambda conn, value, ch=ch: self._on_write(conn, ch, value)))
                entry.chars.append(ch)
            entry.service.characteristics = [c.characteristic for c in entry.chars]
            dev.add_service(entry.service)
            self._services.append(entry)
        if index == 0:
            self._by_handle = {}
        for ch in entry.chars:
            self._by_handle[ch.handle] = ch

    def _truncate(self, index: int) -> None:
        """Removes the device's services from `index` on (always the tail of Bumble's DB)."""
        if index >= len(self._services):
            return
        server = self.device.gatt_server  # type: ignore[union-attr]
        first = self._services[index].service.handle
        for attr in server.attributes[first - 1:]:
            server.attributes_by_handle.pop(attr.handle, None)
        del server.attributes[first - 1:]
        gone = {id(e.service) for e in self._services[index:]}
        server.services = [sv for sv in server.services if id(sv) not in gone]
        del self._services[index:]
        for sub in server.subscribers.values():
            for h in [h for h in sub if h >= first]:
                del sub[h]

    def _on_write(self, conn: Connection, ch: _Char, value: bytes) -> None:
        ch.value = bytes(value)
        s = self._session
        if s is not None:
            s.send(M_WRITE, struct.pack("<HH", conn.handle, ch.handle) + bytes(value))

    # ---- the radio's side -------------------------------------------------------------

    def _on_connection(self, conn: Connection) -> None:
        if conn.transport != PhysicalTransport.LE:
            return
        kind, addr = _addr_bytes(conn.peer_address)
        handle = conn.handle
        s = self._session
        if s is None:  # connected while the device is off: refuse it
            self._spawn(self._disconnect(conn, REASON_POWER_OFF))
            return
        s.send(M_CONNECT, struct.pack("<HB", handle, kind) + addr)

        def on_disconnection(_reason: int) -> None:
            if self._session is not None:
                self._session.send(M_DISCONNECT, struct.pack("<HB", handle, kind) + addr)

        def on_mtu() -> None:
            if self._session is not None:
                self._session.send(M_MTU, struct.pack("<HH", handle, conn.att_mtu))

        conn.on("disconnection", on_disconnection)
        conn.on("connection_att_mtu_update", on_mtu)


@dataclass(frozen=True)
class RadioInfo:
    name: str
    address: str
    spec: str
    shim_port: int


class CompanionThread:
    """A Companion on its own event loop in a daemon thread (for the simulator's relay,
    which is not async)."""

    def __init__(self, uid: bytes, *, name: str | None = None, radio: str | None = None,
                 timeout: float = 10.0) -> None:
        self.companion = Companion(uid, name=name, radio=radio)
        self._loop = LoopThread("mpboot-sim-radio", timeout)

    def start(self) -> RadioInfo:
        c = self.companion

        async def setup() -> RadioInfo:
            await c.start()
            return RadioInfo(c.name, c.address, c.spec, c.shim_port)

        return self._loop.start(setup, c.close)

    def stop(self) -> None:
        self._loop.stop()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._loop.call(fn, *args)


__all__ = ["Companion", "CompanionThread", "RadioInfo", "default_name", "static_address"]
