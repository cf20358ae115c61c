"""The simulated air (host/mpboot/sim/air.py): Bumble hosts joining one LocalLink over HCI on
TCP see each other's advertisements and connect; drop(), drop_after() and unplugging a host
end connections on both sides with the reasons a radio gives; the ATT trace records what
crossed. No sleeps: every wait is on an event with a timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from blekit import (
    SMP_CHARACTERISTIC,
    SMP_SERVICE,
    Central,
    ad_fields,
    adv_data,
    air,
    central,
    run,
    until,
    uuid_le,
)
from bumble import hci
from bumble.core import TimeoutError as BumbleTimeout
from bumble.device import Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.transport import open_transport

from mpboot.sim.air import AirThread, AttRecord

__all__ = ["air"]  # the fixture, imported for pytest

PERIPHERAL = "C1:22:33:44:55:66"


class Peripheral:
    """A Bumble host with the SMP service: records writes, notifies on demand."""

    def __init__(self, device: Device, transport: Any, char: Characteristic[bytes]) -> None:
        self.device = device
        self.transport = transport
        self.char = char
        self.writes: asyncio.Queue[bytes] = asyncio.Queue()
        self.disconnected: asyncio.Queue[int] = asyncio.Queue()
        device.on("connection", lambda c: c.on("disconnection", self.disconnected.put_nowait))

    @classmethod
    async def open(cls, spec: str, name: str = "periph", address: str = PERIPHERAL) -> Peripheral:
        transport = await open_transport(spec)
        device = Device.with_hci(name, hci.Address(address), transport.source, transport.sink)
        self: Peripheral
        char: Characteristic[bytes] = Characteristic(
            SMP_CHARACTERISTIC, Characteristic.Properties.WRITE_WITHOUT_RESPONSE | Characteristic.Properties.NOTIFY,
            Characteristic.WRITEABLE, CharacteristicValue(write=lambda _c, v: self.writes.put_nowait(bytes(v))))
        device.add_service(Service(SMP_SERVICE, [char]))
        self = cls(device, transport, char)
        await device.power_on()
        await device.start_advertising(advertising_data=adv_data(name), advertising_interval_min=20,
                                       advertising_interval_max=20)
        return self

    def connection(self) -> Any:
        [conn] = self.device.connections.values()
        return conn

    async def close(self) -> None:
        await self.transport.close()


@contextlib.asynccontextmanager
async def peripheral(spec: str, **kw: Any) -> AsyncIterator[Peripheral]:
    p = await Peripheral.open(spec, **kw)
    try:
        yield p
    finally:
        await p.close()


async def connected(c: Central, p: Peripheral) -> Any:
    link = await c.connect_smp("periph")
    await until(lambda: len(p.device.connections) == 1, what="peripheral connection")
    return link


def test_two_hosts_advertise_connect_write_notify(air: AirThread) -> None:
    async def main() -> None:
        async with peripheral(air.spec) as p, central(air.spec) as c:
            adv = await c.find("periph")
            assert str(adv.address) == PERIPHERAL
            fields = ad_fields(adv.data_bytes)
            assert fields[0x01] == b"\x06" and fields[0x07] == uuid_le(SMP_SERVICE)
            link = await connected(c, p)
            assert link.mtu == 247
            assert air.controllers() == 2
            [info] = air.connections()
            assert (info.central, info.peripheral) == (str(c.device.random_address), PERIPHERAL)
            await link.write(bytes(range(200)) + bytes(44))  # one 244-byte write
            assert await asyncio.wait_for(p.writes.get(), 5) == bytes(range(200)) + bytes(44)
            await p.device.notify_subscriber(p.connection(), p.char, b"pong")
            assert await asyncio.wait_for(link.notes.get(), 5) == b"pong"
            await link.disconnect()
            assert await asyncio.wait_for(p.disconnected.get(), 5) == hci.HCI_REMOTE_USER_TERMINATED_CONNECTION_ERROR
        await until(lambda: air.controllers() == 0, what="hosts unplugged")

    run(main())


def test_drop_ends_both_sides_with_0x08(air: AirThread) -> None:
    async def main() -> None:
        async with peripheral(air.spec) as p, central(air.spec) as c:
            link = await connected(c, p)
            assert air.drop(PERIPHERAL) == 1
            assert await link.wait_disconnected(5) == 0x08
            assert await asyncio.wait_for(p.disconnected.get(), 5) == 0x08
            assert air.connections() == []
            assert air.drop(PERIPHERAL) == 0
            # The peripheral advertises again (its host's choice); the air connects again.
            await p.device.start_advertising(advertising_data=adv_data("periph"), advertising_interval_min=20,
                                             advertising_interval_max=20)
            link2 = await connected(c, p)
            await link2.write(b"again")
            assert await asyncio.wait_for(p.writes.get(), 5) == b"again"

    run(main())


def test_drop_after_counts_write_commands_per_connection(air: AirThread) -> None:
    async def main() -> None:
        async with peripheral(air.spec) as p, central(air.spec) as c:
            air.drop_after(PERIPHERAL, [3, 0, 2])
            for k, limit in enumerate([3, 0, 2, None]):
                link = await connected(c, p) if limit != 0 else None
                if link is None:  # dropped as it connected: a connect then an immediate loss
                    conn = await c.connect(PERIPHERAL)
                    await until(lambda h=conn.handle: h not in c.device.connections, what="central's loss")
                    assert await asyncio.wait_for(p.disconnected.get(), 5) == 0x08
                else:
                    for i in range(5):
                        with contextlib.suppress(Exception):
                            await link.write(bytes([k, i]))
                    got = []
                    if limit is None:
                        for _ in range(5):
                            got.append(await asyncio.wait_for(p.writes.get(), 5))
                        assert got == [bytes([k, i]) for i in range(5)]
                        assert air.connections()[0].writes == 5
                        break
                    assert await link.wait_disconnected(5) == 0x08
                    assert await asyncio.wait_for(p.disconnected.get(), 5) == 0x08
                    while not p.writes.empty():
                        got.append(p.writes.get_nowait())
                    assert got == [bytes([k, i]) for i in range(limit)]
                await until(lambda: not p.device.connections and not c.device.connections, what="both sides gone")
                await p.device.start_advertising(advertising_data=adv_data("periph"), advertising_interval_min=20,
                                                 advertising_interval_max=20)

    run(main())


def test_trace_records_att_pdus(air: AirThread) -> None:
    async def main() -> None:
        async with peripheral(air.spec) as p, central(air.spec) as c:
            link = await connected(c, p)
            air.clear_trace()
            await link.write(b"x" * 100)
            await asyncio.wait_for(p.writes.get(), 5)
            await p.device.notify_subscriber(p.connection(), p.char, b"y" * 50)
            await asyncio.wait_for(link.notes.get(), 5)
            trace = air.trace()
            assert [(r.conn, r.direction, r.opcode, r.length) for r in trace] == [
                (1, "c2p", 0x52, 3 + 100), (1, "p2c", 0x1B, 3 + 50)]
            assert all(isinstance(r, AttRecord) for r in trace) and trace[0].t <= trace[1].t
            air.set_tracing(False)
            await link.write(b"z")
            await asyncio.wait_for(p.writes.get(), 5)
            assert len(air.trace()) == 2

    run(main())


def test_mtu_exchange_and_discovery_are_traced(air: AirThread) -> None:
    async def main() -> None:
        async with peripheral(air.spec) as p, central(air.spec) as c:
            await connected(c, p)
            ops = [(r.direction, r.opcode) for r in air.trace()]
            assert ops[:2] == [("c2p", 0x02), ("p2c", 0x03)]  # exchange MTU request, response
            assert ("c2p", 0x12) in ops  # write request: the CCCD subscription

    run(main())


def test_unplugged_host_ends_its_connections_for_the_peer(air: AirThread) -> None:
    async def main() -> None:
        async with central(air.spec) as c:
            p = await Peripheral.open(air.spec)
            link = await connected(c, p)
            await p.close()  # the peripheral's TCP connection closes: its controller is gone
            assert await link.wait_disconnected(5) == 0x08
            await until(lambda: air.controllers() == 1, what="controller removed")
            assert air.connections() == []
            # Nobody advertises now: a connect times out cleanly (the air answers the cancel).
            with pytest.raises(BumbleTimeout):
                await c.device.connect(hci.Address(PERIPHERAL), timeout=0.2)
            async with peripheral(air.spec):
                link = await c.connect_smp("periph")  # and the next connect still works
                assert link.mtu == 247

    run(main())


def test_controllers_get_distinct_public_addresses(air: AirThread) -> None:
    async def main() -> None:
        async with central(air.spec) as a, central(air.spec) as b:
            assert a.device.public_address != b.device.public_address
            assert a.device.public_address != hci.Address.ANY

    run(main())


def test_air_thread_is_a_context_manager() -> None:
    with AirThread() as a:
        assert a.spec == f"tcp-client:127.0.0.1:{a.port}" and a.port > 0
        assert a.controllers() == 0
    a.stop()  # idempotent
