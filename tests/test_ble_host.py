"""Host BLE (docs/BLE.md section 4): the Bumble bleak backends, BleTransport, reconnect and
resume, and the CLI's --ble / scan.

A Bumble peripheral joins the simulated radio (mpboot.sim.air.Air, in the test's own event
loop, or AirThread for the CLI) over HCI/TCP and offers the SMP GATT service: requests arrive
as writes without response and are reassembled by the SMP header length; a scripted
responder (FakeDevice from test_smp_host: echo, MCUmgr params, Zephyr upload semantics,
image state) answers; responses leave as notifications of at most mtu - 3 bytes. The central
is mpboot's Bumble backend, driven only through bleak's public API (`backend=`), or through
BleTransport / SMPClient / the CLI. Nothing waits by sleeping: every step awaits the event
it needs (timeouts only bound the waits).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from bleak import BleakClient, BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakError
from bumble import gatt
from bumble.core import UUID, AdvertisingData
from bumble.device import Connection, Device
from bumble.hci import Address
from bumble.transport import open_transport
from bumble.transport.common import Transport as HciTransport
from click.testing import CliRunner
from mpboot import ble
from mpboot.ble import SMP_CHARACTERISTIC_UUID, SMP_SERVICE_UUID, bumble_backend
from mpboot.ble.bumble_backend import backends, close_all
from mpboot.cli import cli
from mpboot.errors import LinkLost, PortError, RequestTooLarge, TransportError, UsageError
from mpboot.flashing import Mark, flash_with_retries, prepare
from mpboot.image import ImageVersion, SignOptions, build_image
from mpboot.keys import load_signing_key
from mpboot.sim.air import Air, AirThread
from mpboot.smp import Group, ImageCmd, SMPClient
from mpboot.transport import Transport
from mpboot.transport.ble import BleTransport
from test_smp_host import KEY, FakeDevice, Req

NAME = "smp-dev"  # with flags and the 128-bit UUID list, 31 bytes leave 8 for the name
ADDRESS = "C0:11:22:33:44:55"
OTHER_ADDRESS = "C0:66:77:88:99:AA"
SLOW_UUID = "0000feed-0000-1000-8000-00805f9b34fb"  # a readable characteristic that answers late
WAIT = 10.0  # upper bound on any single wait; tests finish far sooner
MTU = 247
PAYLOAD = MTU - 3

Responder = Callable[[Req], "dict[str, Any] | None"]


# --------------------------------------------------------------------------- the peripheral


class Peripheral:
    """A Bumble device on the air: the SMP GATT service (plus a slow readable characteristic)
    and a scripted SMP responder, or (smp=False) a plain advertiser with manufacturer and
    service data."""

    def __init__(self, spec: str, *, name: str = NAME, address: str = ADDRESS,
                 responder: Responder | None = None, smp: bool = True) -> None:
        self.spec = spec
        self.name = name
        self.address = address
        self.responder = responder
        self.smp = smp
        self.writes: list[bytes] = []  # ATT payloads written to the SMP characteristic
        self.notified: list[int] = []  # sizes of the notifications sent
        self.requests: list[Req] = []
        self.errors: list[BaseException] = []
        self.connections = 0
        self.transport: HciTransport | None = None
        self.device: Device | None = None
        self._rx: dict[Connection, bytearray] = {}  # per live connection: a partial request
        self._out: asyncio.Queue[tuple[Connection, bytes]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self.read_started = asyncio.Event()
        self.release_read: asyncio.Future[bytes] | None = None
        self.written = asyncio.Event()  # set when `expect_writes` writes arrived
        self.expect_writes = -1

    async def start(self) -> Peripheral:
        self.transport = await open_transport(self.spec)
        device = Device.with_hci(self.name, Address(self.address), self.transport.source, self.transport.sink)
        self.device = device
        self.release_read = asyncio.get_running_loop().create_future()
        self.char: gatt.Characteristic[bytes] = gatt.Characteristic(
            SMP_CHARACTERISTIC_UUID,
            gatt.Characteristic.Properties.WRITE_WITHOUT_RESPONSE | gatt.Characteristic.Properties.NOTIFY,
            gatt.Characteristic.WRITEABLE, gatt.CharacteristicValue[bytes](write=self._on_write))
        self.label = gatt.Descriptor(gatt.GATT_CHARACTERISTIC_USER_DESCRIPTION_DESCRIPTOR,
                                     gatt.Descriptor.READABLE | gatt.Descriptor.WRITEABLE, b"slow")
        self.slow: gatt.Characteristic[bytes] = gatt.Characteristic(
            SLOW_UUID, gatt.Characteristic.Properties.READ, gatt.Characteristic.READABLE,
            gatt.CharacteristicValue[bytes](read=self._slow_read), descriptors=[self.label])
        if self.smp:
            device.add_service(gatt.Service(SMP_SERVICE_UUID, [self.char, self.slow]))
        device.on(Device.EVENT_CONNECTION, self._on_connection)
        await device.power_on()
        if self.smp:
            adv = AdvertisingData([
                (AdvertisingData.FLAGS, bytes([0x06])),
                (AdvertisingData.COMPLETE_LIST_OF_128_BIT_SERVICE_CLASS_UUIDS,
                 UUID(SMP_SERVICE_UUID).to_bytes(force_128=True)),
                (AdvertisingData.COMPLETE_LOCAL_NAME, self.name.encode()),
            ])
        else:
            adv = AdvertisingData([
                (AdvertisingData.FLAGS, bytes([0x06])),
                (AdvertisingData.COMPLETE_LOCAL_NAME, self.name.encode()),
                (AdvertisingData.MANUFACTURER_SPECIFIC_DATA, struct.pack("<H", 0xFFFF) + b"\x01\x02"),
                (AdvertisingData.SERVICE_DATA_16_BIT_UUID, struct.pack("<H", 0x180A) + b"\x07"),
                (AdvertisingData.TX_POWER_LEVEL, bytes([0xF8])),  # -8 dBm
            ])
        assert len(bytes(adv)) <= 31
        await device.start_advertising(advertising_data=bytes(adv), auto_restart=True,
                                       advertising_interval_min=20, advertising_interval_max=20)
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        return self

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        if self.transport is not None:
            await self.transport.close()

    # GATT server side

    def _on_connection(self, connection: Connection) -> None:
        self.connections += 1
        self._rx[connection] = bytearray()
        # A disconnect discards a partial request. (Bumble runs a write command's handler as a
        # task, so a write that crossed just before the link dropped can come after this.)
        connection.on(Connection.EVENT_DISCONNECTION, lambda _reason: self._rx.pop(connection, None))

    async def _slow_read(self, _connection: Connection) -> bytes:
        self.read_started.set()
        assert self.release_read is not None
        return await self.release_read

    def _on_write(self, connection: Connection, value: bytes) -> None:
        try:
            self._take(connection, bytes(value))
        except BaseException as err:  # noqa: BLE001 - surfaced by the test
            self.errors.append(err)

    def _take(self, connection: Connection, value: bytes) -> None:
        self.writes.append(value)
        if len(self.writes) == self.expect_writes:
            self.written.set()
        buf = self._rx.get(connection)
        if self.responder is None or buf is None:
            return
        buf += value
        while len(buf) >= 8:
            size = 8 + struct.unpack_from(">H", buf, 2)[0]
            if len(buf) < size:
                return
            packet = bytes(buf[:size])
            del buf[:size]
            b0, _, _, group, seq, cmd = struct.unpack_from(">BBHHBB", packet)
            req = Req(b0 & 7, (b0 >> 3) & 3, group, seq, cmd, cbor2.loads(packet[8:]) if size > 8 else {},
                      size, time.monotonic())
            self.requests.append(req)
            rsp = self.responder(req)
            if rsp is not None:
                body = cbor2.dumps(rsp)
                hdr = struct.pack(">BBHHBB", ((req.op + 1) & 7) | (req.version << 3), 0, len(body),
                                  req.group, req.seq, req.cmd)
                self._out.put_nowait((connection, hdr + body))

    async def _send_loop(self) -> None:
        assert self.device is not None
        while True:
            connection, packet = await self._out.get()
            step = connection.att_mtu - 3
            for i in range(0, len(packet), step):
                if connection.handle not in self.device.connections:
                    break  # gone: the rest of the response is lost, as on a real radio
                await self.device.notify_subscriber(connection, self.char, packet[i : i + step])
                self.notified.append(len(packet[i : i + step]))

    async def notify(self, values: list[bytes]) -> None:
        assert self.device is not None
        for connection in list(self.device.connections.values()):
            for v in values:
                await self.device.notify_subscriber(connection, self.char, v)


def on_air(body: Callable[[Air, str], Awaitable[Any]]) -> Any:
    """Run `body(air, spec)` in a fresh event loop with an Air on it; close everything after."""

    async def main() -> Any:
        air = Air()
        spec = await air.start()
        try:
            async with asyncio.timeout(60):
                return await body(air, spec)
        finally:
            await close_all()
            await air.close()

    return asyncio.run(main())


async def find(scanner_cls: Any, name: str = NAME) -> BLEDevice:
    device = await BleakScanner.find_device_by_name(name, timeout=WAIT, backend=scanner_cls)
    assert device is not None, f"{name} not found"
    return device


def smp_responder() -> tuple[FakeDevice, Responder]:
    dev = FakeDevice(buf_size=2048, buf_count=4)
    return dev, dev.handle


# --------------------------------------------------------------------------- bleak backend


def test_scan_reports_name_uuids_rssi_and_data_and_filters_by_service() -> None:
    async def body(air: Air, spec: str) -> None:
        smp = await Peripheral(spec).start()
        other = await Peripheral(spec, name="other", address=OTHER_ADDRESS, smp=False).start()
        Scanner, _ = backends(spec)
        filtered: dict[str, AdvertisementData] = {}
        everything: dict[str, AdvertisementData] = {}
        both = asyncio.Event()

        def keep(store: dict[str, AdvertisementData]) -> Callable[[BLEDevice, AdvertisementData], None]:
            def cb(d: BLEDevice, ad: AdvertisementData) -> None:
                store[d.address] = ad
                if ADDRESS in filtered and OTHER_ADDRESS in everything and ADDRESS in everything:
                    both.set()
            return cb

        # Two scanners share the one Bumble Device of the spec; each sees every advertisement
        # in the same dispatch, so once the unfiltered one saw `other`, the filtered one did too.
        async with BleakScanner(keep(filtered), [SMP_SERVICE_UUID.upper()], backend=Scanner), \
                BleakScanner(keep(everything), backend=Scanner) as unfiltered:
            await asyncio.wait_for(both.wait(), WAIT)
        assert set(filtered) == {ADDRESS}
        ad = filtered[ADDRESS]
        assert ad.local_name == NAME
        assert ad.service_uuids == [SMP_SERVICE_UUID]  # lower case, as bleak spells UUIDs
        assert isinstance(ad.rssi, int) and -127 <= ad.rssi <= 20
        o = everything[OTHER_ADDRESS]
        assert o.local_name == "other" and o.service_uuids == []
        assert o.manufacturer_data == {0xFFFF: b"\x01\x02"}
        assert o.service_data == {"0000180a-0000-1000-8000-00805f9b34fb": b"\x07"}
        assert o.tx_power == -8
        seen = {d.address: d.name for d in unfiltered.discovered_devices}
        assert seen[ADDRESS] == NAME and seen[OTHER_ADDRESS] == "other"
        assert unfiltered.backend_id == "BumbleScanner"

        # Passive scanning (no scan requests) finds it too.
        found: asyncio.Future[tuple[BLEDevice, AdvertisementData]] = asyncio.get_running_loop().create_future()

        def first(d: BLEDevice, a: AdvertisementData) -> None:
            if not found.done():
                found.set_result((d, a))

        with_passive = BleakScanner(first, [SMP_SERVICE_UUID], "passive", backend=Scanner)
        async with with_passive:
            d, a = await asyncio.wait_for(found, WAIT)
        assert d.address == ADDRESS and a.local_name == NAME
        await smp.stop()
        await other.stop()

    on_air(body)


def test_connect_fills_services_with_handles_properties_and_mtu_247() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        device = await find(Scanner)
        async with BleakClient(device, backend=Client) as client:
            assert client.is_connected and client.mtu_size == MTU
            assert client.name == NAME and client.address == ADDRESS
            svc = client.services.get_service(SMP_SERVICE_UUID)
            assert svc is not None
            char = client.services.get_characteristic(SMP_CHARACTERISTIC_UUID)
            assert char is not None and char.service_uuid == SMP_SERVICE_UUID
            assert sorted(char.properties) == ["notify", "write-without-response"]
            assert char.max_write_without_response_size == PAYLOAD
            # Handles as the server numbers them: the value handle, its CCCD right after.
            assert char.handle == p.char.handle
            assert [(d.uuid, d.handle) for d in char.descriptors] == [
                ("00002902-0000-1000-8000-00805f9b34fb", p.char.handle + 1)]
            slow = client.services.get_characteristic(SLOW_UUID)
            assert slow is not None and slow.properties == ["read"] and slow.handle == p.slow.handle
            assert svc.handle < char.handle < slow.handle
            # The GAP and GATT services come too (no services= filter given).
            assert client.services.get_service("00001800-0000-1000-8000-00805f9b34fb") is not None
        assert not client.is_connected

        # services= limits discovery, as bleak documents.
        async with BleakClient(device, services=[SMP_SERVICE_UUID], backend=Client) as client:
            assert [s.uuid for s in client.services] == [SMP_SERVICE_UUID]

        # Nobody at that address: the connect times out (as bleak's do), and the controller
        # is told to stop initiating, so the next connect works.
        with pytest.raises(TimeoutError):
            await BleakClient("C0:00:00:00:00:01", timeout=0.3, backend=Client).connect()
        async with BleakClient(ADDRESS, backend=Client) as client:  # a plain address string
            assert client.is_connected and client.mtu_size == MTU
        await p.stop()

    on_air(body)


def test_writes_without_response_arrive_in_order_and_yield_to_the_loop() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        n = 400
        p.expect_writes = n
        pieces = [bytes([i & 0xFF]) * PAYLOAD for i in range(n)]
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        async with BleakClient(await find(Scanner), backend=Client) as client:
            t = asyncio.get_running_loop().create_task(ticker())
            for piece in pieces:
                await client.write_gatt_char(SMP_CHARACTERISTIC_UUID, piece, response=False)
            await asyncio.wait_for(p.written.wait(), WAIT)
            stop.set()
            await t
            assert p.writes == pieces
            assert ticks >= n // 2  # each write yielded: the loop was never starved
            with pytest.raises(BleakError, match="at most 244"):
                await client.write_gatt_char(SMP_CHARACTERISTIC_UUID, bytes(PAYLOAD + 1), response=False)
        await p.stop()

    on_air(body)


def test_notifications_arrive_and_descriptors_read_and_write() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        values = [bytes([i]) * (1 + i % PAYLOAD) for i in range(60)]
        got: list[bytes] = []
        all_in = asyncio.Event()

        def on_note(_char: Any, data: bytearray) -> None:
            got.append(bytes(data))
            if len(got) == len(values):
                all_in.set()

        async with BleakClient(await find(Scanner), backend=Client) as client:
            char = client.services.get_characteristic(SMP_CHARACTERISTIC_UUID)
            assert char is not None
            cccd = char.descriptors[0]
            assert await client.read_gatt_descriptor(cccd.handle) == b"\x00\x00"
            await client.start_notify(char, on_note)
            assert await client.read_gatt_descriptor(cccd.handle) == b"\x01\x00"
            await p.notify(values)
            await asyncio.wait_for(all_in.wait(), WAIT)
            assert got == values
            await client.stop_notify(char)
            assert await client.read_gatt_descriptor(cccd.handle) == b"\x00\x00"
            slow = client.services.get_characteristic(SLOW_UUID)
            assert slow is not None
            label = slow.get_descriptor("00002901-0000-1000-8000-00805f9b34fb")
            assert label is not None and label.handle == p.label.handle
            assert await client.read_gatt_descriptor(label.handle) == b"slow"
            await client.write_gatt_descriptor(label.handle, b"renamed")
            assert await client.read_gatt_descriptor(label.handle) == b"renamed"
            p.release_read.set_result(b"late")  # type: ignore[union-attr]
            assert await client.read_gatt_char(SLOW_UUID) == b"late"
            assert await client.read_gatt_char(SLOW_UUID, use_cached=True) == b"late"
            with pytest.raises(NotImplementedError):
                await client.pair()
        await p.stop()

    on_air(body)


def test_a_dropped_link_fails_pending_and_later_calls_and_calls_the_disconnected_callback() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        dropped = asyncio.Event()
        calls: list[BleakClient] = []

        def on_disconnect(c: BleakClient) -> None:
            calls.append(c)
            dropped.set()

        client = BleakClient(await find(Scanner), on_disconnect, backend=Client)
        await client.connect()
        pending = asyncio.get_running_loop().create_task(client.read_gatt_char(SLOW_UUID))
        await asyncio.wait_for(p.read_started.wait(), WAIT)
        assert air.drop(ADDRESS) == 1  # radio loss (HCI reason 0x08) while the read waits
        with pytest.raises(BleakError, match="disconnected"):
            await asyncio.wait_for(pending, WAIT)  # Bumble cancels it: a BleakError, not CancelledError
        await asyncio.wait_for(dropped.wait(), WAIT)
        assert calls == [client] and not client.is_connected
        with pytest.raises(BleakError, match="Not connected"):
            await client.write_gatt_char(SMP_CHARACTERISTIC_UUID, b"x", response=False)
        await client.disconnect()  # a no-op now

        # A deliberate disconnect does not call the callback.
        dropped.clear()
        await client.connect()
        assert client.is_connected
        await client.disconnect()
        assert not client.is_connected and calls == [client]
        await p.stop()

    on_air(body)


def test_cancelling_the_callers_task_stays_a_cancellation() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        async with BleakClient(await find(Scanner), backend=Client) as client:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await client.read_gatt_char(SLOW_UUID)  # the server never answers it
            assert client.is_connected
        await p.stop()

    on_air(body)


def test_losing_the_hci_transport_ends_connections_and_the_next_use_reopens() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        Scanner, Client = backends(spec)
        dropped = asyncio.Event()
        client = BleakClient(await find(Scanner), lambda _c: dropped.set(), backend=Client)
        await client.connect()
        pending = asyncio.get_running_loop().create_task(client.read_gatt_char(SLOW_UUID))
        await asyncio.wait_for(p.read_started.wait(), WAIT)
        stack = bumble_backend._stacks[asyncio.get_running_loop()][spec]
        assert stack.transport is not None
        stack.transport.sink.close()  # type: ignore[attr-defined]  # the TCP link to the air dies
        with pytest.raises(BleakError):
            await asyncio.wait_for(pending, WAIT)
        await asyncio.wait_for(dropped.wait(), WAIT)
        assert not client.is_connected
        # A new Device is opened on the spec for the next user.
        assert (await find(Scanner)).address == ADDRESS
        await p.stop()

    on_air(body)


def test_install_default_makes_plain_bleak_use_bumble() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec).start()
        bumble_backend.install_default(spec)
        try:
            device = await BleakScanner.find_device_by_address(ADDRESS.lower(), timeout=WAIT)
            assert device is not None
            async with BleakClient(device) as client:
                assert client.backend_id == "BumbleClient" and client.mtu_size == MTU
        finally:
            bumble_backend.uninstall_default()
        assert BleakScanner().backend_id != "BumbleScanner"  # the platform's again
        await p.stop()

    on_air(body)


def test_smpclient_runs_on_the_default_backend() -> None:
    """smpclient's own BLE transport (it takes no backend) over install_default."""
    from smpclient import SMPClient as RefClient
    from smpclient.requests.os_management import EchoWrite
    from smpclient.transport.ble import SMPBLETransport

    async def body(air: Air, spec: str) -> None:
        _, respond = smp_responder()
        p = await Peripheral(spec, responder=respond).start()
        bumble_backend.install_default(spec)
        try:
            ref = RefClient(SMPBLETransport(), NAME)
            await ref.connect(WAIT)
            rsp = await ref.request(EchoWrite(d="hello over smpclient " * 20))
            assert rsp.r == "hello over smpclient " * 20  # type: ignore[union-attr]
            await ref.disconnect()
        finally:
            bumble_backend.uninstall_default()
        await p.stop()

    on_air(body)


# --------------------------------------------------------------------------- BleTransport


def test_ble_transport_round_trips_packets_larger_than_one_mtu() -> None:
    async def body(air: Air, spec: str) -> None:
        fake, respond = smp_responder()
        p = await Peripheral(spec, responder=respond).start()
        t = BleTransport(NAME, backend=ble.select(f"bumble:{spec}"), scan_timeout=WAIT)
        assert isinstance(t, Transport)
        async with SMPClient(t, timeout=WAIT) as client:
            assert t.address == ADDRESS and t.att_payload == PAYLOAD
            text = "x" * 1000
            await client.params()  # (echo reads them first, to refuse a text the device cannot hold)
            writes, notified = len(p.writes), len(p.notified)
            assert await client.echo(text) == text
            echo = p.requests[-1]
            assert echo.size > 4 * PAYLOAD
            # The request: full ATT payloads, then the rest; the response likewise.
            assert [len(w) for w in p.writes[writes:]] == [PAYLOAD] * 4 + [echo.size - 4 * PAYLOAD]
            assert p.notified[notified:notified + 4] == [PAYLOAD] * 4 and sum(p.notified[notified:]) > 4 * PAYLOAD
            # A request up to the device's whole buffer goes (it reassembles any split), more is
            # refused on the host: not at max_packet, which only rounds uploads to full payloads.
            assert len(await client.echo("y" * 2030)) == 2030
            with pytest.raises(RequestTooLarge, match=r"takes 2054 bytes, more than the device's buffer holds "
                                                      r"\(2048 of buf_size 2048"):
                await client.echo("y" * 2040)
            # max_packet: whole ATT payloads within the device's buffer.
            assert t.max_packet(2048) == 8 * PAYLOAD
            assert t.max_packet(PAYLOAD) == PAYLOAD
            assert t.max_packet(500) == 2 * PAYLOAD
            assert t.max_packet(100) == 100  # smaller than one payload: the buffer itself

            # A pipelined upload: every streamed request is exactly 8 full payloads.
            image = random.Random(1).randbytes(30_000)
            result = await client.upload(image)
            assert fake.received == image and result.window == 4
            ups = [r for r in p.requests if (r.group, r.cmd) == (Group.IMAGE, ImageCmd.UPLOAD)]
            assert all(r.size == 8 * PAYLOAD for r in ups[1:-1]) and len(ups) > 10
        assert not t.is_open
        await p.stop()

    on_air(body)


def test_ble_transport_finds_by_address_and_reports_a_missing_device() -> None:
    async def body(air: Air, spec: str) -> None:
        _, respond = smp_responder()
        p = await Peripheral(spec, responder=respond).start()
        backend = ble.select(f"bumble:{spec}")
        async with SMPClient(BleTransport(ADDRESS.lower(), backend=backend, scan_timeout=WAIT)) as client:
            assert await client.echo("by address") == "by address"
        # A device that advertises, but not SMP, is not taken for one.
        other = await Peripheral(spec, name="other", address=OTHER_ADDRESS, smp=False).start()
        for target in ("nosuch", "other", OTHER_ADDRESS):
            with pytest.raises(PortError, match=f"no BLE device {target} advertising SMP"):
                await BleTransport(target, backend=backend, scan_timeout=0.3).open()
        await p.stop()
        await other.stop()

    on_air(body)


def test_ble_transport_link_loss_fails_pending_and_later_calls_with_link_lost() -> None:
    async def body(air: Air, spec: str) -> None:
        p = await Peripheral(spec, responder=lambda req: None).start()  # never answers
        t = BleTransport(NAME, backend=ble.select(f"bumble:{spec}"), scan_timeout=WAIT)
        await t.open()
        p.expect_writes = 1
        await t.send(struct.pack(">BBHHBB", 0, 0, 0, 0, 1, 6))  # an MCUmgr params request
        await asyncio.wait_for(p.written.wait(), WAIT)
        receiving = asyncio.get_running_loop().create_task(t.recv())
        air.drop(ADDRESS)
        with pytest.raises(LinkLost):
            await asyncio.wait_for(receiving, WAIT)
        assert isinstance(LinkLost("x"), TransportError)
        with pytest.raises(LinkLost):
            await t.send(b"\x00" * 8)
        with pytest.raises(LinkLost):
            await t.recv()
        await t.close()
        with pytest.raises(TransportError):
            await t.send(b"\x00" * 8)
        # Opening again reconnects (the peripheral advertises again).
        await t.open()
        assert t.is_open
        await t.close()
        await p.stop()

    on_air(body)


def test_ble_backend_selection() -> None:
    assert ble.select("") is ble.PLATFORM and ble.select("bleak") is ble.PLATFORM
    b = ble.select("bumble:tcp-client:127.0.0.1:1")
    assert b.spec == "tcp-client:127.0.0.1:1" and b.name == "bumble:tcp-client:127.0.0.1:1"
    assert b.scanner is backends("tcp-client:127.0.0.1:1")[0]
    assert b.scanner_kwargs() == {"backend": b.scanner} and ble.PLATFORM.client_kwargs() == {}
    for bad in ("bumble:", "usb:0", "bluez"):
        with pytest.raises(UsageError):
            ble.select(bad)


def test_ble_select_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPBOOT_BLE_BACKEND", "bumble:usb:0")
    assert ble.select(None).spec == "usb:0"
    monkeypatch.delenv("MPBOOT_BLE_BACKEND")
    assert ble.select(None) is ble.PLATFORM


def test_unreachable_bumble_transport_is_a_port_error() -> None:
    async def main() -> None:
        backend = ble.select("bumble:tcp-client:127.0.0.1:1")  # nothing listens on port 1
        with pytest.raises(PortError, match="cannot scan"):
            await ble.scan(0.2, backend)
        with pytest.raises(PortError, match="cannot scan for BLE device x"):
            await BleTransport("x", backend=backend).open()
        await ble.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- reconnect + resume


@pytest.fixture(scope="module")
def signed_image() -> bytes:
    key = load_signing_key(KEY)
    body = bytes(0x200) + random.Random(7).randbytes(40_000)
    return build_image(body, key, SignOptions(version=ImageVersion(1, 2, 3), security_counter=7))


def test_flash_with_retries_reconnects_and_resumes_after_lost_links(signed_image: bytes) -> None:
    async def body(air: Air, spec: str) -> None:
        fake, respond = smp_responder()
        p = await Peripheral(spec, responder=respond).start()
        # The 1st connection drops after 30 ATT writes, the 2nd after 60; the 3rd is left alone.
        air.drop_after(ADDRESS, [30, 60])
        backend = ble.select(f"bumble:{spec}")
        acks: list[tuple[int, int]] = []
        retried: list[tuple[int, str]] = []
        result = await flash_with_retries(
            lambda: SMPClient(BleTransport(NAME, backend=backend, scan_timeout=WAIT), timeout=WAIT),
            signed_image, retries=3, mark=Mark.TEST, reset=True,
            progress=lambda done, total: acks.append((done, total)),
            on_retry=lambda n, err: retried.append((n, type(err).__name__)))
        assert fake.received == signed_image
        assert result.reconnects == 2 and [n for n, _ in retried] == [1, 2]
        assert all(kind in ("LinkLost", "TransportError") for _, kind in retried)
        assert result.slot is not None and result.slot.pending and fake.resets == 1
        assert p.connections == 3
        # Each reconnect reopened the session at off 0 and the device answered where it was.
        opens = [r for r in p.requests if r.cmd == ImageCmd.UPLOAD and r.payload["off"] == 0]
        assert len(opens) == 3
        # Progress carried on: same total, never backwards, to the end.
        total = len(signed_image)
        assert {t for _, t in acks} == {total}
        assert [d for d, _ in acks] == sorted(d for d, _ in acks) and acks[-1][0] == total
        assert result.upload.resumed_from > 0  # the last connection resumed mid-image
        await p.stop()

    on_air(body)


def test_flash_with_retries_gives_up_after_the_allowed_reconnects(signed_image: bytes) -> None:
    async def body(air: Air, spec: str) -> None:
        fake, respond = smp_responder()
        p = await Peripheral(spec, responder=respond).start()
        air.drop_after(ADDRESS, [20, 20, 20])
        backend = ble.select(f"bumble:{spec}")
        with pytest.raises(TransportError):
            await flash_with_retries(
                lambda: SMPClient(BleTransport(NAME, backend=backend, scan_timeout=WAIT), timeout=WAIT),
                prepare(signed_image), retries=2)
        assert p.connections == 3 and fake.received is None
        # A first open that fails is raised at once, as it is.
        with pytest.raises(PortError):
            await flash_with_retries(
                lambda: SMPClient(BleTransport("nosuch", backend=backend, scan_timeout=0.3)),
                signed_image, retries=5)
        await p.stop()

    on_air(body)


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def air_thread() -> Any:
    with AirThread() as air:
        yield air


def _peripheral_on(air: AirThread, **kw: Any) -> Peripheral:
    async def start() -> Peripheral:
        return await Peripheral(air.spec, **kw).start()

    return air.run(start())


def test_cli_scan_json_lists_smp_devices(air_thread: AirThread) -> None:
    smp = _peripheral_on(air_thread)
    _peripheral_on(air_thread, name="other", address=OTHER_ADDRESS, smp=False)
    result = CliRunner().invoke(cli, ["scan", "--seconds", "0.5", "--json",
                                      "--ble-backend", f"bumble:{air_thread.spec}"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [(f["name"], f["address"]) for f in found] == [(NAME, ADDRESS)]
    assert isinstance(found[0]["rssi"], int)
    text = CliRunner().invoke(cli, ["scan", "--seconds", "0.3"],
                              env={"MPBOOT_BLE_BACKEND": f"bumble:{air_thread.spec}"})
    assert text.exit_code == 0 and ADDRESS in text.stdout and NAME in text.stdout
    air_thread.run(smp.stop())


def test_cli_device_commands_over_ble(air_thread: AirThread, signed_image: bytes, tmp_path: Path) -> None:
    fake = FakeDevice(buf_size=2048, buf_count=4)
    _peripheral_on(air_thread, responder=fake.handle)
    link = ["--ble", NAME, "--ble-backend", f"bumble:{air_thread.spec}"]
    runner = CliRunner()
    r = runner.invoke(cli, ["echo", "hello", *link])
    assert r.exit_code == 0 and r.stdout == "hello\n", r.output
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    r = runner.invoke(cli, ["flash", str(img), *link, "--test", "--reset", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert fake.received == signed_image and fake.resets == 1
    assert "marked for a test boot" in r.stdout and "device reset" in r.stdout
    r = runner.invoke(cli, ["state", "--json", *link])
    assert r.exit_code == 0 and [s["slot"] for s in json.loads(r.stdout)["images"]] == [0, 1]
    r = runner.invoke(cli, ["reset", "--ble", ADDRESS, "--ble-backend", f"bumble:{air_thread.spec}"])
    assert r.exit_code == 0 and r.stdout == f"reset {ADDRESS}\n"
    # MPBOOT_PORT in the environment does not get in the way of --ble.
    r = runner.invoke(cli, ["echo", "env", *link], env={"MPBOOT_PORT": "/dev/ttyNOPE"})
    assert r.exit_code == 0 and r.stdout == "env\n"


def test_cli_flash_over_ble_reconnects_when_the_link_drops(air_thread: AirThread, tmp_path: Path) -> None:
    fake = FakeDevice(buf_size=2048, buf_count=4)
    _peripheral_on(air_thread, responder=fake.handle)
    image = build_image(bytes(0x200) + random.Random(9).randbytes(60_000), load_signing_key(KEY),
                        SignOptions(version=ImageVersion(2, 0, 0)))
    img = tmp_path / "app.bin"
    img.write_bytes(image)
    air_thread.drop_after(ADDRESS, [40, 40])
    r = CliRunner().invoke(cli, ["flash", str(img), "--ble", NAME, "--ble-backend", f"bumble:{air_thread.spec}",
                                 "--confirm"])  # with the progress bar
    assert r.exit_code == 0, r.output
    assert fake.received == image
    assert r.stderr.count("reconnecting") == 2 and "reconnecting (2/5)" in r.stderr
    assert "made permanent" in r.stdout
    # With --retries 0 a lost link is the end of it: one line, exit 3.
    air_thread.drop_after(ADDRESS, [10])
    fake.received = None
    fake.slots = fake.slots[:1]
    r = CliRunner().invoke(cli, ["flash", str(img), "--ble", NAME, "--ble-backend", f"bumble:{air_thread.spec}",
                                 "--retries", "0", "--no-progress"])
    assert r.exit_code == 3, r.output
    assert r.stderr.startswith("mpboot: error: BLE link to smp-dev lost") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["echo", "x"], "which device? give --port PORT"),
    (["echo", "x", "--port", "/dev/ttyNOPE", "--ble", "dev"], "--port and --ble exclude each other"),
    (["echo", "x", "--ble", "dev", "--baud", "9600"], "--baud is for serial ports"),
    (["echo", "x", "--port", "/dev/ttyNOPE", "--ble-backend", "bumble:usb:0"], "--ble-backend goes with --ble"),
    (["echo", "x", "--ble", "dev", "--ble-backend", "nonsense"], "bad BLE backend 'nonsense'"),
    (["scan", "--ble-backend", "nonsense"], "bad BLE backend 'nonsense'"),
    (["scan", "--seconds", "0.2", "--ble-backend", "bumble:tcp-client:127.0.0.1:1"], "cannot scan for BLE devices"),
    (["echo", "x", "--ble", "dev", "--ble-backend", "bumble:tcp-client:127.0.0.1:1"], "cannot scan for BLE device dev"),
])
def test_cli_ble_errors_are_one_line_with_exit_2(args: list[str], message: str) -> None:
    r = CliRunner().invoke(cli, args, env={"MPBOOT_PORT": None, "MPBOOT_BLE_BACKEND": None})
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"mpboot: error: {message}"), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.output
