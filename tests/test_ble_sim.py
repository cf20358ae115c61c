"""The simulated device's radio (host/mpboot/sim/radio.py): the companion against a scripted
stand-in for the MicroPython `bluetooth` shim (docs/BLE.md section 2), with a plain Bumble
central on the same air; and, when the device side exists, `mpboot sim --ble` end to end.
No sleeps: every wait is on a message, an event or a printed line, with a timeout."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from blekit import (
    SMP_CHARACTERISTIC,
    SMP_SERVICE,
    BleSim,
    FakeShim,
    ad_fields,
    adv_data,
    air,
    central,
    name_matches,
    run,
    until,
    uuid_le,
)
from bumble.core import UUID
from conftest import KEYS_DIR
from simserve import MPBOOT

from mpboot.sim.air import AirThread
from mpboot.sim.radio import Companion, default_name, static_address
from mpboot.smp.header import Group, Op, OsCmd

__all__ = ["air"]

UID = bytes.fromhex("0123456789abcdef")
F_READ, F_WRITE_NR, F_WRITE, F_NOTIFY = 0x02, 0x04, 0x08, 0x10
SMP_HANDLE = 3  # NimBLE numbering for the first characteristic's value
READ_UUID = "00000001-0000-4000-8000-00000000AAAA"
KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"


@contextlib.asynccontextmanager
async def companion(radio: str | None = None, uid: bytes = UID) -> AsyncIterator[Companion]:
    c = Companion(uid, radio=radio)
    await c.start()
    try:
        yield c
    finally:
        await c.close()


async def powered(comp: Companion, name: str = "dev-1", extra: list[tuple[int, str, int]] | None = None) -> FakeShim:
    """A power-on as the firmware does it: CONFIG, REGISTER, ADVERTISE."""
    shim = await FakeShim().open(comp.shim_port)
    shim.config(247, name)
    shim.register(SMP_SERVICE, [(SMP_HANDLE, SMP_CHARACTERISTIC, F_WRITE_NR | F_NOTIFY)] + (extra or []))
    shim.advertise(adv_data(name))
    return shim


def test_address_and_name_come_from_the_unique_id() -> None:
    a = static_address(UID)
    assert a == static_address(UID) != static_address(b"\x00" * 8)
    assert int(a[:2], 16) >> 6 == 0b11  # static random
    assert default_name(UID) == "mpb-cdef"
    assert Companion(UID).name == "mpb-cdef" and Companion(UID, name="x").name == "x"


def test_ready_then_advertises_exactly_the_given_data() -> None:
    async def main() -> None:
        async with companion() as comp:
            assert comp.spec.startswith("tcp-client:127.0.0.1:")
            shim = await powered(comp, "dev-1")
            assert shim.address == (1, bytes.fromhex(comp.address.replace(":", "")))
            async with central(comp.spec) as c:
                adv = await c.find("dev-1")
                assert str(adv.address) == comp.address
                assert adv.data_bytes == adv_data("dev-1")
                assert ad_fields(adv.data_bytes)[0x07] == uuid_le(SMP_SERVICE)
                shim.stop_advertising()
                await until(lambda: not comp.device.is_advertising, what="advertising stopped")
            await shim.close()

    run(main())


def test_connect_mtu_write_notify_disconnect() -> None:
    async def main() -> None:
        async with companion() as comp, central(comp.spec) as c:
            shim = await powered(comp)
            link = await c.connect_smp("dev-1")
            p = await shim.expect(FakeShim.CONNECT)
            conn, kind = struct.unpack_from("<HB", p)
            assert kind == 1 and p[3:9] == bytes.fromhex(str(c.device.random_address).replace(":", ""))
            assert await shim.expect(FakeShim.MTU) == struct.pack("<HH", conn, 247)
            assert link.mtu == 247
            await link.write(b"\x01" * 244 + b"\x02" * 10)  # two writes without response, in order
            assert await shim.expect(FakeShim.WRITE) == struct.pack("<HH", conn, SMP_HANDLE) + b"\x01" * 244
            assert await shim.expect(FakeShim.WRITE) == struct.pack("<HH", conn, SMP_HANDLE) + b"\x02" * 10
            shim.notify(conn, SMP_HANDLE, b"response")
            assert await asyncio.wait_for(link.notes.get(), 5) == b"response"
            shim.disconnect(conn)
            assert await link.wait_disconnected() == 0x13  # gap_disconnect: remote user terminated
            assert (await shim.expect(FakeShim.DISCONNECT))[:3] == struct.pack("<HB", conn, 1)
            await shim.close()

    run(main())


def test_device_power_loss_ends_connections_with_0x15_and_stops_advertising() -> None:
    async def main() -> None:
        async with companion() as comp, central(comp.spec) as c:
            shim = await powered(comp)
            link = await c.connect_smp("dev-1")
            shim.advertise(adv_data("dev-1"))  # advertising again while connected
            await until(lambda: comp.device.is_advertising, what="advertising")
            await shim.close()  # reset, crash, kill -9: the device's socket closes
            assert await link.wait_disconnected() == 0x15
            await until(lambda: not comp.device.is_advertising, what="advertising stopped")
            assert not comp.device.connections

    run(main())


def test_next_power_on_keeps_the_same_gatt_database() -> None:
    async def main() -> None:
        async with companion() as comp, central(comp.spec) as c:
            shim = await powered(comp)
            link = await c.connect_smp("dev-1")
            char_handle = link.char.handle
            attrs = len(comp.device.gatt_server.attributes)
            await shim.close()
            await link.wait_disconnected()
            shim = await powered(comp)  # power-on 2: same definition
            assert comp.sessions == 2
            assert len(comp.device.gatt_server.attributes) == attrs
            link = await c.connect_smp("dev-1")
            assert link.char.handle == char_handle
            conn = struct.unpack_from("<H", await shim.expect(FakeShim.CONNECT))[0]
            await shim.expect(FakeShim.MTU)
            await link.write(b"ping")
            assert await shim.expect(FakeShim.WRITE) == struct.pack("<HH", conn, SMP_HANDLE) + b"ping"
            await shim.close()
            await link.wait_disconnected()
            # Power-on 3 registers another definition (a readable characteristic more): rebuilt.
            shim = await powered(comp, extra=[(6, READ_UUID, F_READ)])
            shim.value(6, b"hello")
            link = await c.connect_smp("dev-1")
            [svc] = link.peer.get_services_by_uuid(UUID(SMP_SERVICE))
            [rc] = await svc.discover_characteristics([UUID(READ_UUID)])
            assert await link.peer.read_value(rc) == b"hello"
            await shim.close()

    run(main())


def test_write_with_response_is_forwarded() -> None:
    async def main() -> None:
        async with companion() as comp, central(comp.spec) as c:
            shim = await powered(comp, extra=[(6, READ_UUID, F_READ | F_WRITE)])
            link = await c.connect_smp("dev-1")
            conn = struct.unpack_from("<H", await shim.expect(FakeShim.CONNECT))[0]
            await shim.expect(FakeShim.MTU)
            [svc] = link.peer.get_services_by_uuid(UUID(SMP_SERVICE))
            [rc] = await svc.discover_characteristics([UUID(READ_UUID)])
            await link.peer.write_value(rc, b"acked", with_response=True)
            assert await shim.expect(FakeShim.WRITE) == struct.pack("<HH", conn, 6) + b"acked"
            await shim.close()

    run(main())


def test_companion_on_a_shared_air_with_a_given_spec(air: AirThread) -> None:
    async def main() -> None:
        async with companion(radio=air.spec) as comp, central(air.spec) as c:
            assert comp.spec == air.spec and comp.air is None
            shim = await powered(comp)
            link = await c.connect_smp("dev-1")
            assert [(i.central, i.peripheral) for i in air.connections()] == [
                (str(c.device.random_address), comp.address)]
            air.drop(comp.address)
            assert await link.wait_disconnected() == 0x08
            assert (await shim.expect(FakeShim.CONNECT))
            await shim.expect(FakeShim.MTU)
            assert (await shim.expect(FakeShim.DISCONNECT))
            await shim.close()

    run(main())


def test_two_devices_on_one_air(air: AirThread) -> None:
    async def main() -> None:
        async with companion(air.spec, uid=b"\x01" * 8) as a, companion(air.spec, uid=b"\x02" * 8) as b:
            assert a.address != b.address
            sa, sb = await powered(a, "dev-a"), await powered(b, "dev-b")
            async with central(air.spec) as c:
                la = await c.connect_smp("dev-a")
                lb = await c.connect_smp("dev-b")
                ca = struct.unpack_from("<H", await sa.expect(FakeShim.CONNECT))[0]
                cb = struct.unpack_from("<H", await sb.expect(FakeShim.CONNECT))[0]
                await sa.expect(FakeShim.MTU)
                await sb.expect(FakeShim.MTU)
                await la.write(b"to a")
                await lb.write(b"to b")
                assert (await sa.expect(FakeShim.WRITE))[4:] == b"to a"
                assert (await sb.expect(FakeShim.WRITE))[4:] == b"to b"
                sa.notify(ca, SMP_HANDLE, b"from a")
                sb.notify(cb, SMP_HANDLE, b"from b")
                assert await asyncio.wait_for(la.notes.get(), 5) == b"from a"
                assert await asyncio.wait_for(lb.notes.get(), 5) == b"from b"
            await sa.close()
            await sb.close()

    run(main())


# ---------------------------------------------------------------------------------------
# end to end: `mpboot sim --ble` (needs the device side: firmware BLE transport and shim)


def _device_side_ready() -> bool:
    root = Path(__file__).resolve().parents[1]
    serve = (root / "host/mpboot/upy_scripts/sim_serve.py").read_text()
    return ((root / "firmware/mpboot/transport/ble.py").exists()
            and (root / "host/mpboot/upy_scripts/bluetooth.py").exists() and "ble" in serve)


needs_device = pytest.mark.skipif(not _device_side_ready(), reason="the device's BLE side is not there yet")


@needs_device
def test_sim_ble_serves_smp_and_resets(tmp_path: Path, air: AirThread) -> None:
    sim = BleSim(tmp_path / "dev", [KEY], radio=air.spec)
    try:
        assert sim.spec == air.spec and sim.name.startswith("mpb-")
        assert not any("UART on" in line for line in sim.lines)  # it serves SMP over BLE only

        async def main() -> None:
            async with central(air.spec) as c:
                adv = await c.find(sim.name, timeout=30)
                assert str(adv.address) == sim.address
                assert name_matches(adv.data_bytes, sim.name) and len(adv.data_bytes) <= 31
                assert ad_fields(adv.data_bytes)[0x07] == uuid_le(SMP_SERVICE)
                link = await c.connect_smp(sim.address)
                hdr, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "over the air"}, seq=7)
                assert (hdr.op, hdr.seq, rsp) == (Op.WRITE_RSP, 7, {"r": "over the air"})
                _, params = await link.smp(Op.READ, Group.OS, OsCmd.MCUMGR_PARAMS, {}, seq=8)
                assert params["buf_size"] > 0 and params["buf_count"] > 0
                _, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.RESET, {}, seq=9)
                assert rsp.get("rc", 0) == 0
                # The device answers, then ends the link itself (gap_disconnect), then resets.
                assert await link.wait_disconnected(20) == 0x13
                # It powers on again and advertises again.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, sim.wait_for, r"power on 2")
                await loop.run_in_executor(None, sim.wait_for, r"serving SMP over BLE")
                await c.find(sim.name, timeout=30)
                link = await c.connect_smp(sim.address)
                _, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "again"}, seq=10)
                assert rsp == {"r": "again"}

        run(main(), timeout=120)
    finally:
        assert sim.stop() == 0, sim.output()


@needs_device
def test_sim_ble_hosts_its_own_air(tmp_path: Path) -> None:
    sim = BleSim(tmp_path / "dev", [KEY], name="bench-1")
    try:
        assert sim.name == "bench-1" and sim.spec.startswith("tcp-client:127.0.0.1:")

        async def main() -> None:
            async with central(sim.spec) as c:
                link = await c.connect_smp("bench-1", timeout=30)
                _, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "x"})
                assert rsp == {"r": "x"}

        run(main(), timeout=120)
    finally:
        assert sim.stop() == 0, sim.output()


@needs_device
def test_sim_ble_device_crash_ends_the_link_with_0x15_and_comes_back(tmp_path: Path, air: AirThread) -> None:
    sim = BleSim(tmp_path / "dev", [KEY], radio=air.spec)
    try:
        sim.wait_for(r"serving SMP over BLE")

        async def main() -> None:
            async with central(air.spec) as c:
                link = await c.connect_smp(sim.address, timeout=30)
                pid = sim.device_pid()
                assert pid is not None
                os.kill(pid, signal.SIGKILL)  # the device's socket closes: power off
                assert await link.wait_disconnected(20) == 0x15
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(None, sim.wait_for, r"device crashed")
                await loop.run_in_executor(None, sim.wait_for, r"serving SMP over BLE")
                link = await c.connect_smp(sim.address, timeout=30)
                _, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.ECHO, {"d": "back"})
                assert rsp == {"r": "back"}

        run(main(), timeout=120)
    finally:
        assert sim.stop() == 0, sim.output()


@needs_device
def test_sim_ble_address_is_stable_across_runs(tmp_path: Path, air: AirThread) -> None:
    seen = []
    for _ in range(2):
        sim = BleSim(tmp_path / "dev", [KEY], radio=air.spec)
        seen.append((sim.name, sim.address))
        assert sim.stop() == 0, sim.output()
    assert seen[0] == seen[1]
    other = BleSim(tmp_path / "dev2", [KEY], radio=air.spec)
    try:
        assert other.address != seen[0][1]
    finally:
        other.stop()


def test_cli_sim_air_serves_until_interrupted() -> None:
    proc = subprocess.Popen([MPBOOT, "sim", "air"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"air on (tcp-client:127\.0\.0\.1:\d+)", line)
        assert m, line
        spec = m.group(1)

        async def main() -> None:
            async with companion(radio=spec) as comp, central(spec) as c:
                shim = await powered(comp)
                link = await c.connect_smp("dev-1")
                assert link.mtu == 247
                await shim.close()

        run(main())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130  # Ctrl-C, as for every command
        assert proc.stdout.read().splitlines()[-1:] == [
            "mpboot: interrupted: the air is down; the same command starts another"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (["--radio", "tcp-client:127.0.0.1:1"], "--radio and --ble-name go with --ble"),
    (["--ble", "--link", "/tmp/never-made"], "--link names the UART's pty"),
    (["--ble", "--radio", "tcp-client:127.0.0.1:1"], "--radio tcp-client:127.0.0.1:1: cannot open it"),
    (["--ble", "--ble-name", "two words"], "no spaces"),
])
def test_cli_sim_ble_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    r = subprocess.run([MPBOOT, "sim", "--state", str(tmp_path / "dev"), "--keys", str(KEY), *args],
                       check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr + r.stdout
