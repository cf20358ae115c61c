"""`mpboot sync --udp`'s radio (mpboot.sync.UdpRadio) against many small SMP responders on
127.0.0.1: a scan finds every device with a bounded number of sockets, a wait after a reset
asks only the device waited for, an address this side cannot use is a warning, and one board
at two addresses is updated through one of them. (The whole flow against simulated devices:
tests/test_sync_tuf.py::test_cli_sync_repo_updates_devices_over_udp, tests/test_fleet_e2e.py.)"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import cbor2

from mpboot.smp import Group, ImageCmd, MgmtErrorCode, OsCmd
from mpboot.smp.header import MpbootCmd
from mpboot.sync import DirSource, Found, Syncer, SyncOptions, SyncResult, UdpRadio, exit_status


class Responder(asyncio.DatagramProtocol):
    """A device answering params, device info and image state over UDP; counts requests."""

    def __init__(self, uid: bytes) -> None:
        self.uid = uid
        self.requests = 0
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def answer(self, group: int, cmd: int) -> dict[str, Any]:
        if (group, cmd) == (Group.OS, OsCmd.MCUMGR_PARAMS):
            return {"buf_size": 1472, "buf_count": 4}
        if (group, cmd) == (Group.MPBOOT, MpbootCmd.DEVICE):
            return {"uid": self.uid, "vid": None, "cid": None, "ctr": 0, "no-downgrade": False}
        if (group, cmd) == (Group.IMAGE, ImageCmd.STATE):
            return {"images": [{"image": 0, "slot": 0, "version": "1.0.0", "hash": b"\xaa" * 32,
                                "bootable": True, "pending": False, "confirmed": True, "active": True,
                                "permanent": False}]}
        return {"rc": MgmtErrorCode.ENOTSUP}

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.requests += 1
        b0, _, _, group, seq, cmd = struct.unpack_from(">BBHHBB", data)
        body = cbor2.dumps(self.answer(group, cmd))
        self.transport.sendto(struct.pack(">BBHHBB", (b0 & ~7) | ((b0 & 7) + 1), 0, len(body), group, seq, cmd)
                              + body, addr)


async def responders(n: int, uids: list[bytes] | None = None) -> tuple[list[Responder], list[tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    made, addresses = [], []
    for i in range(n):
        r = Responder(uids[i] if uids else i.to_bytes(8, "big"))
        transport, _ = await loop.create_datagram_endpoint(lambda r=r: r, local_addr=("127.0.0.1", 0))
        made.append(r)
        addresses.append(transport.get_extra_info("sockname")[:2])
    return made, addresses


def close(made: list[Responder]) -> None:
    for r in made:
        r.transport.close()


def test_a_scan_finds_every_device_with_a_bounded_number_of_sockets() -> None:
    async def main() -> None:
        made, addresses = await responders(300)
        radio = UdpRadio(addresses)
        opened = [0, 0]  # now, most at once
        transport = radio.transport

        def counting(address: str) -> Any:
            t = transport(address)
            real_open, real_close = t.open, t.close

            async def open_() -> None:
                opened[0] += 1
                opened[1] = max(opened)
                await real_open()

            async def close_() -> None:
                opened[0] -= 1
                await real_close()

            t.open, t.close = open_, close_  # type: ignore[method-assign]
            return t

        radio.transport = counting  # type: ignore[method-assign]
        found = await radio.scan(2.0)
        close(made)
        assert [f.address for f in found] == [UdpRadio.name(a) for a in addresses]
        assert all(r.requests >= 1 for r in made)
        assert 1 < opened[1] <= UdpRadio.PROBES, opened

    asyncio.run(main())


def test_waiting_for_a_device_asks_that_device_only() -> None:
    async def main() -> None:
        made, addresses = await responders(20)
        radio = UdpRadio(addresses)
        scans = []
        real_scan = radio.scan

        async def counting_scan(seconds: float) -> list[Found]:
            scans.append(seconds)
            return await real_scan(seconds)

        radio.scan = counting_scan  # type: ignore[method-assign]
        syncer = Syncer(DirSource([]), radio, SyncOptions(reconnect_timeout=5.0))
        name = UdpRadio.name(addresses[7])
        await syncer._wait_seen(Found(name, name))
        close(made)
        assert scans == []
        assert [r.requests for r in made] == [1 if i == 7 else 0 for i in range(20)]

    asyncio.run(main())


def test_an_address_this_side_cannot_use_is_a_warning_not_an_absent_device() -> None:
    warnings: list[str] = []
    radio = UdpRadio([("fe80::1%nosuchif0", 1337)], warn=warnings.append)
    assert asyncio.run(radio.scan(0.5)) == []
    assert len(warnings) == 1 and warnings[0].startswith("[fe80::1%nosuchif0]:1337: cannot resolve"), warnings


def test_one_board_at_two_addresses_is_met_through_one() -> None:
    """The same host and port given twice (an address and another spelling of it): one
    attempt, the other `duplicate`, not a failure."""
    async def main() -> list[Any]:
        made, addresses = await responders(2)
        host, port = addresses[0]
        twice = [addresses[0], ("127.0.0.01", port), addresses[1]]  # (inet_aton spellings)
        syncer = Syncer(DirSource([]), UdpRadio(twice), SyncOptions(scan_seconds=1.0, max_parallel=1))
        attempts = await syncer.run_pass()
        close(made)
        return attempts

    attempts = asyncio.run(main())
    results = sorted(str(a.result) for a in attempts)
    assert results == ["duplicate", "no-image", "no-image"], results
    dup = next(a for a in attempts if a.result is SyncResult.DUPLICATE)
    first = next(a for a in attempts if a.uid == dup.uid and a is not dup)
    assert dup.note == f"the same device as {first.address}: met through that address"


def test_two_hosts_reporting_one_uid_is_a_failure_not_a_duplicate() -> None:
    """A device answering with another's uid must not quietly keep that one from its update
    (a `duplicate` counts as success): it is a failure the operator sees (exit 1)."""
    async def main() -> list[Any]:
        made, addresses = await responders(2, [b"\x01" * 8, b"\x01" * 8])
        syncer = Syncer(DirSource([]), UdpRadio(addresses), SyncOptions(scan_seconds=1.0, max_parallel=1))
        attempts = await syncer.run_pass()
        close(made)
        return attempts

    attempts = asyncio.run(main())
    failed = [a for a in attempts if a.result is SyncResult.FAILED]
    assert len(failed) == 1 and exit_status(attempts) == 1, attempts
    other = next(a for a in attempts if a is not failed[0])
    assert failed[0].error == (f"{other.address} reports the same uid {'01' * 8}: two devices claiming one "
                               "identity; not updated through this address")


def test_scans_in_separate_event_loops_and_a_failing_address_warned_once() -> None:
    """A radio outlives an event loop (a bench, a library caller running asyncio.run per
    pass) with more addresses than PROBES; an address this side cannot use is said once."""
    warnings: list[str] = []
    # (a scope naming no interface: refused by the resolver at once, without asking DNS)
    radio = UdpRadio([("fe80::1%nosuchif0", 1000 + i) for i in range(UdpRadio.PROBES + 6)], warn=warnings.append)
    for _ in range(2):
        assert asyncio.run(radio.scan(0.2)) == []
    assert len(warnings) == UdpRadio.PROBES + 6
