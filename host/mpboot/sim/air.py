"""The simulated radio: one Bumble `LocalLink` that any Bumble host joins over HCI on TCP.

Every TCP connection to the air's port gets a fresh Bumble `Controller` on the link (H4
packets both ways), so a host reaches it with the ordinary Bumble transport spec
`tcp-client:127.0.0.1:PORT`, as it would a USB dongle. Closing the TCP connection unplugs
that controller: its LE connections end for the peers with reason 0x08 (supervision
timeout), as when a board loses power mid-connection.

Extras for tests and benches: `drop(address)` (radio loss), `drop_after(address, [n1, ...])`
(the k-th connection to that peripheral is lost after it carried nk ATT Write Commands),
and a trace of every ATT PDU crossing the link (`AttRecord`). `AirThread` runs an Air on its
own event loop in a daemon thread, with thread-safe methods.

By default a PDU crosses as soon as it is sent (the processes set the pace). `Air(pace=
Pacing(...))` paces every LE link like a radio instead: connection events at the link's
interval, a few LL packets each way per event (mpboot.sim.pacing); the trace, `drop_after`
counting and the drop itself then happen when a PDU crosses, and `pacing_stats()` tells how
well the events kept their times.

Fixes over bumble 0.0.236's LocalLink and Controller, all confined to this module:
- ACL data is routed by the sender's connection (LocalLink routes by the sender's random
  address, which breaks for hosts that connect with a public own address);
- `LE Create Connection Cancel` ends the pending connection with an LE Connection Complete
  (status 0x02) as the spec says (Bumble sends none, and a Bumble host whose connect() times
  out then waits for ever);
- `Disconnect` for an unknown handle answers Command Status 0x02 (Bumble answers "pending"
  and never completes it);
- legacy advertising runs at its interval (Bumble reads the 0.625 ms units as milliseconds);
- a central's connection that the advertiser did not accept fails with 0x3E instead of
  lingering half-open;
- the controller buffers 251-byte LE ACL packets (as with data length extension).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from bumble import hci, ll
from bumble.controller import Connection, Controller, LegacyAdvertiser
from bumble.core import PhysicalTransport
from bumble.link import LocalLink
from bumble.transport.common import PacketParser

from mpboot.sim.pacing import INTERVAL_UNIT_S, Clock, LinkPacer, Pacing, PacingStats, Queued, stats

logger = logging.getLogger(__name__)
# A host keeps sending on a connection the air has just dropped (it learns of the loss from the
# disconnection event, which crosses after): the controller then warns "no connection for
# handle" once per packet. Expected on a lossy radio; not worth a line each.
logging.getLogger("bumble.controller").setLevel(logging.ERROR)

ATT_CID = 4
ATT_WRITE_COMMAND = 0x52
ATT_NOTIFICATION = 0x1B
REASON_CONNECTION_TIMEOUT = 0x08  # HCI: "connection timeout" (supervision timeout): radio loss
REASON_FAILED_TO_ESTABLISH = 0x3E
STATUS_UNKNOWN_CONNECTION = 0x02

T = TypeVar("T")


@dataclass(frozen=True)
class AttRecord:
    """One ATT PDU that crossed the air: `t` (time.monotonic() when it crossed), `conn` (the
    air's serial number of the connection, from 1), `direction` ("c2p": central to peripheral,
    or "p2c"), the ATT `opcode` and `length` (the ATT PDU's bytes, opcode included), and the
    PDU's `value` after the opcode and handle for write commands and notifications (what a
    timing model needs to find the SMP packets in it; empty for other PDUs). On a paced air,
    `queued` is when its sender handed it to the air and `event` the connection event (of
    that link, from 0) that carried its last packet; unpaced, `queued` is `t` and `event`
    None."""

    t: float
    conn: int
    direction: str
    opcode: int
    length: int
    value: bytes = b""
    queued: float | None = None
    event: int | None = None


@dataclass(frozen=True)
class LinkInfo:
    """A connection on the air (see `Air.connections`)."""

    conn: int
    central: str
    peripheral: str
    writes: int  # ATT Write Commands the central sent so far


def address_key(address: hci.Address | str) -> str:
    """An LE address as "AA:BB:CC:DD:EE:FF" (upper case, no type qualifier)."""
    if isinstance(address, hci.Address):
        return address.to_string(False).upper()
    return address.split("/")[0].strip().upper()


@dataclass(eq=False)
class _Link:
    serial: int
    central: tuple[Controller, Connection]
    peripheral: tuple[Controller, Connection]
    limit: int | None = None
    writes: int = 0
    doomed: bool = False  # a drop is scheduled: nothing more crosses
    pacer: LinkPacer | None = None  # its connection events, on a paced air

    def side(self, conn: Connection) -> tuple[tuple[Controller, Connection], str]:
        """(the other side, direction of a PDU sent by `conn`)."""
        if conn is self.central[1]:
            return self.peripheral, "c2p"
        return self.central, "p2c"

    def info(self) -> LinkInfo:
        return LinkInfo(self.serial, address_key(self.central[1].self_address),
                        address_key(self.peripheral[1].self_address), self.writes)


class _Advertiser(LegacyAdvertiser):
    """Bumble's legacy advertiser, at its interval in 0.625 ms units (not milliseconds)."""

    def _on_timer_fired(self) -> None:
        self.send_advertising_data()
        self.timer_handle = asyncio.get_running_loop().call_later(
            max(self.advertising_interval_min * 0.000625, 0.02), self._on_timer_fired)


class _Controller(Controller):
    le_acl_data_packet_length = 251
    supported_max_tx_octets = 251
    supported_max_rx_octets = 251
    suggested_max_tx_octets = 251

    def __init__(self, name: str, air: Air, sink: Any, public_address: hci.Address) -> None:
        self.air = air
        super().__init__(name, host_sink=sink, link=air.link, public_address=public_address)
        self.le_legacy_advertiser = _Advertiser(self)

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        # Bumble's formats every packet into a debug line first, logged or not (a sixth of the
        # air's CPU time in a paced upload); the same without that line.
        if self.host:
            asyncio.get_running_loop().call_soon(self.host.on_packet, bytes(packet))

    def on_le_connect_ind(self, packet: ll.ConnectInd) -> None:
        before = self.le_connections.get(packet.initiator_address)
        super().on_le_connect_ind(packet)
        conn = self.le_connections.get(packet.initiator_address)
        if conn is not None and conn is not before:
            self.air._connected(self, conn, packet.interval * INTERVAL_UNIT_S)

    def on_le_disconnected(self, connection: Connection, reason: int) -> None:
        if self.le_connections.get(connection.peer_address) is not connection:
            return  # already ended (both sides may end it in the same turn)
        super().on_le_disconnected(connection, reason)
        self.air._forget(connection)

    def on_hci_le_create_connection_cancel_command(self, command: Any) -> Any:
        pending = self.pending_le_connection
        if pending is not None:
            self.pending_le_connection = None
            event = hci.HCI_LE_Connection_Complete_Event(
                status=STATUS_UNKNOWN_CONNECTION, connection_handle=0, role=hci.Role.CENTRAL,
                peer_address_type=pending.peer_address_type, peer_address=pending.peer_address,
                connection_interval=0, peripheral_latency=0, supervision_timeout=0,
                central_clock_accuracy=0)
            # After the Command Complete (send_hci_packet itself defers by one turn).
            asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return super().on_hci_le_create_connection_cancel_command(command)

    def on_hci_disconnect_command(self, command: hci.HCI_Disconnect_Command) -> None:
        h = command.connection_handle
        if (self.find_le_connection_by_handle(h) is None
                and self.find_classic_connection_by_handle(h) is None
                and self.find_classic_sco_link_by_handle(h) is None
                and h not in self.central_cis_links and h not in self.peripheral_cis_links):
            self._send_hci_command_status(STATUS_UNKNOWN_CONNECTION, command.op_code)
            return None
        return super().on_hci_disconnect_command(command)


class _AirLink(LocalLink):
    def __init__(self, air: Air) -> None:
        super().__init__()
        self.air = air

    def send_advertising_pdu(self, sender_controller: Controller, packet: ll.AdvertisingPdu) -> None:
        if sender_controller not in self.controllers:
            return  # unplugged: a timer that outlived its controller
        super().send_advertising_pdu(sender_controller, packet)
        if isinstance(packet, ll.ConnectInd):
            conn = sender_controller.le_connections.get(packet.advertiser_address)
            if conn is not None:
                # After every controller has seen the CONNECT_IND: was it accepted?
                asyncio.get_running_loop().call_soon(self.air._check_established, sender_controller, conn)

    def send_acl_data(self, sender_controller: Controller, destination_address: hci.Address,
                      transport: PhysicalTransport, data: bytes) -> None:
        if transport != PhysicalTransport.LE:
            super().send_acl_data(sender_controller, destination_address, transport, data)
            return
        conn = sender_controller.le_connections.get(destination_address)
        if conn is not None:
            self.air._carry(conn, data)

    def send_ll_control_pdu(self, sender_address: hci.Address, receiver_address: hci.Address,
                            packet: ll.ControlPdu) -> None:
        if self.find_le_controller(receiver_address) is None:
            return  # the peer is gone: nobody hears it (Bumble raises here)
        if isinstance(packet, ll.ConnectionUpdateInd):
            self.air._interval_changed(sender_address, receiver_address, packet.interval * INTERVAL_UNIT_S)
        super().send_ll_control_pdu(sender_address, receiver_address, packet)


class _HciPort(asyncio.Protocol):
    """One TCP connection: H4 packets in -> a controller on the air -> H4 packets out."""

    def __init__(self, air: Air) -> None:
        self.air = air
        self.transport: asyncio.Transport | None = None
        self.parser = PacketParser()
        self.controller: _Controller | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.controller = self.air._plug(self)
        self.parser.set_packet_sink(self.controller)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as err:  # noqa: BLE001 - a host that speaks no H4: hang up on it
            logger.warning("air: bad HCI stream (%s); closing", err)
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.controller is not None:
            self.air._unplug(self.controller)
            self.controller = None
        self.transport = None

    # The controller's host sink.
    def on_packet(self, packet: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(packet)


class Air:
    """A virtual LE radio serving HCI over TCP (see the module docstring). Use it inside a
    running event loop: `spec = await air.start()`, ..., `await air.close()`."""

    def __init__(self, *, trace: bool = False, pace: Pacing | None = None, clock: Clock | None = None) -> None:
        """`pace`: pace every LE link like a radio (None: PDUs cross at once); `clock`: what
        the pacers schedule on (default: the running loop; tests inject their own)."""
        self.tracing = trace
        self.pace = pace
        self.clock = clock
        self._paced: dict[int, LinkPacer] = {}  # link serial -> pacer, ended links included
        self.trace: list[AttRecord] = []
        self.link: _AirLink | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._ports: set[_HciPort] = set()
        self._links: dict[int, _Link] = {}  # id(Connection) (either side) -> link
        self._serial = itertools.count(1)
        self._addresses = itertools.count(1)
        self._plans: dict[str, list[int]] = {}  # peripheral -> write counts of its next connections

    @property
    def spec(self) -> str:
        """The Bumble transport spec by which hosts join this air."""
        return f"tcp-client:{self.host}:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listens on `host`:`port` (0: a free port); returns the spec."""
        self.host = host
        self.link = _AirLink(self)  # inside the running loop, as Bumble expects
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _HciPort(self), host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.spec

    async def close(self) -> None:
        """Stops listening and unplugs every controller."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for p in list(self._ports):
            if p.transport is not None:
                p.transport.abort()
            p.connection_lost(None)
        self._ports.clear()

    # ---- extras ----------------------------------------------------------------------

    def drop(self, address: hci.Address | str) -> int:
        """Radio loss: ends every connection of the LE `address` (central or peripheral side)
        with reason 0x08 on both sides. Returns how many connections ended."""
        key = address_key(address)
        doomed = {id(lk): lk for lk in self._links.values()
                  if key in (address_key(lk.central[1].self_address), address_key(lk.peripheral[1].self_address))}
        for lk in doomed.values():
            self._end(lk, REASON_CONNECTION_TIMEOUT)
        return len(doomed)

    def drop_after(self, address: hci.Address | str, writes: Iterable[int]) -> None:
        """The k-th connection to the peripheral `address` from now on is lost (reason 0x08,
        both sides) right after it carried writes[k-1] ATT Write Commands central ->
        peripheral (0: at once); later connections are left alone. Replaces an earlier plan."""
        counts = [int(n) for n in writes]
        if any(n < 0 for n in counts):
            raise ValueError("write counts must be >= 0")
        self._plans[address_key(address)] = counts

    def connections(self) -> list[LinkInfo]:
        """The connections on the air now."""
        seen: dict[int, LinkInfo] = {}
        for lk in self._links.values():
            seen[lk.serial] = lk.info()
        return [seen[k] for k in sorted(seen)]

    def controllers(self) -> int:
        """How many hosts are plugged in."""
        return len(self._ports)

    def pacing_stats(self, conn: int | None = None) -> PacingStats:
        """How well the connection events kept time, over every paced link so far, or over
        the connection with serial `conn` (see `PacingStats`; all zero when unpaced)."""
        return stats(p for serial, p in self._paced.items() if conn is None or serial == conn)

    # ---- plumbing --------------------------------------------------------------------

    def _plug(self, port: _HciPort) -> _Controller:
        n = next(self._addresses)
        # Locally administered public-style addresses, distinct per controller.
        address = hci.Address(f"F0:A1:00:00:{n >> 8 & 0xFF:02X}:{n & 0xFF:02X}", hci.Address.PUBLIC_DEVICE_ADDRESS)
        self._ports.add(port)
        return _Controller(f"air-{n}", self, port, address)

    def _unplug(self, controller: _Controller) -> None:
        port = controller.host
        controller.host = None  # its host is gone: nothing more is sent to it
        self._ports.discard(port)  # type: ignore[arg-type]
        controller.le_legacy_advertiser.stop()
        for adv in controller.advertising_sets.values():
            adv.stop()
        controller.le_scan_enable = False
        controller.pending_le_connection = None
        for conn in list(controller.le_connections.values()):
            lk = self._links.get(id(conn))
            if lk is not None:
                self._end(lk, REASON_CONNECTION_TIMEOUT)
            else:
                controller.on_le_disconnected(conn, REASON_CONNECTION_TIMEOUT)
        assert self.link is not None
        if controller in self.link.controllers:
            self.link.remove_controller(controller)

    def _connected(self, peripheral: _Controller, pconn: Connection, interval: float) -> None:
        """The peripheral accepted a CONNECT_IND (connection interval `interval` s): pair it
        with the central's connection."""
        assert self.link is not None
        for c in self.link.controllers:
            if c is peripheral:
                continue
            cconn = c.le_connections.get(pconn.self_address)
            if cconn is not None and cconn.self_address == pconn.peer_address and id(cconn) not in self._links:
                lk = _Link(next(self._serial), (c, cconn), (peripheral, pconn))
                key = address_key(pconn.self_address)
                plan = self._plans.get(key)
                if plan:
                    lk.limit = plan.pop(0)
                    if not plan:
                        del self._plans[key]
                self._links[id(cconn)] = self._links[id(pconn)] = lk
                if self.pace is not None:
                    self._pace(lk, interval)
                if lk.limit == 0:
                    self._doom(lk)
                return

    def _pace(self, lk: _Link, interval: float) -> None:
        """Puts a new link on connection events (`interval`: its own, from the CONNECT_IND)."""
        assert self.pace is not None
        clock = self.clock or asyncio.get_running_loop()
        lk.pacer = LinkPacer(self.pace, clock, lambda d, item, ev: self._crossed(lk, d, item, ev), interval=interval)
        self._paced[lk.serial] = lk.pacer

    def _check_established(self, central: Controller, cconn: Connection) -> None:
        if id(cconn) not in self._links and central.le_connections.get(cconn.peer_address) is cconn:
            central.on_le_disconnected(cconn, REASON_FAILED_TO_ESTABLISH)

    def _interval_changed(self, sender: hci.Address, receiver: hci.Address, interval: float) -> None:
        """A connection update between these two: the link's events follow it."""
        s, r = address_key(sender), address_key(receiver)
        for lk in set(self._links.values()):
            ends = {address_key(lk.central[1].self_address), address_key(lk.peripheral[1].self_address)}
            if lk.pacer is not None and ends == {s, r}:
                lk.pacer.set_interval(interval)

    def _forget(self, conn: Connection) -> None:
        lk = self._links.pop(id(conn), None)
        if lk is not None:
            if lk.pacer is not None:
                lk.pacer.close()  # what was still queued is lost with the link
            for _, c in (lk.central, lk.peripheral):
                if self._links.get(id(c)) is lk:
                    del self._links[id(c)]

    def _end(self, lk: _Link, reason: int) -> None:
        for ctrl, conn in (lk.central, lk.peripheral):
            ctrl.on_le_disconnected(conn, reason)
        self._forget(lk.central[1])

    def _doom(self, lk: _Link) -> None:
        lk.doomed = True
        asyncio.get_running_loop().call_soon(self._end, lk, REASON_CONNECTION_TIMEOUT)

    def _carry(self, conn: Connection, pdu: bytes) -> None:
        """An L2CAP PDU (u16 length, u16 CID, payload) sent on `conn`: it crosses now, or,
        on a paced air, when the link's connection events have carried it."""
        lk = self._links.get(id(conn))
        if lk is None or lk.doomed:
            return  # nobody at the other end (any more)
        if lk.pacer is not None:
            lk.pacer.queue(lk.side(conn)[1], pdu, conn)
            return
        now = time.monotonic()
        self._cross(lk, conn, pdu, now, now, None)

    def _crossed(self, lk: _Link, direction: str, item: Queued, event: int) -> None:
        """A pacer sent a PDU's last packet."""
        if not lk.doomed and lk.pacer is not None:
            # the pacer's clock is the loop's: time.monotonic() (asyncio's default clock)
            self._cross(lk, item.tag, item.pdu, lk.pacer.clock.time(), item.queued, event)

    def _cross(self, lk: _Link, conn: Connection, pdu: bytes, t: float, queued: float, event: int | None) -> None:
        """The PDU crosses at `t`: traced, counted against a planned drop, delivered."""
        (peer, pconn), direction = lk.side(conn)
        if len(pdu) >= 5 and struct.unpack_from("<H", pdu, 2)[0] == ATT_CID:
            opcode = pdu[4]
            if self.tracing:
                value = bytes(pdu[7:]) if opcode in (ATT_WRITE_COMMAND, ATT_NOTIFICATION) else b""
                self.trace.append(AttRecord(t, lk.serial, direction, opcode, len(pdu) - 4, value, queued, event))
            if opcode == ATT_WRITE_COMMAND and direction == "c2p":
                lk.writes += 1
                if lk.limit is not None and lk.writes >= lk.limit:
                    self._deliver(peer, pconn, conn, pdu)
                    self._doom(lk)
                    return
        self._deliver(peer, pconn, conn, pdu)

    @staticmethod
    def _deliver(peer: Controller, pconn: Connection, conn: Connection, pdu: bytes) -> None:
        asyncio.get_running_loop().call_soon(peer.on_link_acl_data, conn.self_address, PhysicalTransport.LE, pdu)


class LoopThread:
    """An asyncio event loop in a daemon thread, for code that is not async itself.

    `start(setup, teardown)` runs `setup()` (a coroutine function) on the loop and returns its
    result (or raises its error); `stop()` runs `teardown()` there and ends the thread.
    `run(coro)` / `call(fn, *args)` run work on the loop from any thread."""

    def __init__(self, name: str, timeout: float = 10.0) -> None:
        self.name = name
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, setup: Callable[[], Coroutine[Any, Any, T]],
              teardown: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> T:
        assert self._thread is None, "already started"
        started: Future[T] = Future()

        def main() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                started.set_result(loop.run_until_complete(setup()))
            except BaseException as err:  # noqa: BLE001 - handed to start()'s caller
                started.set_exception(err)
                if teardown is not None:
                    try:
                        loop.run_until_complete(teardown())
                    except Exception:
                        logger.exception("%s: teardown after a failed start", self.name)
                loop.close()
                return
            self.loop = loop
            try:
                loop.run_forever()
            finally:
                try:
                    if teardown is not None:
                        loop.run_until_complete(asyncio.wait_for(teardown(), self.timeout))
                    _cancel_all(loop)
                finally:
                    loop.close()

        self._thread = threading.Thread(target=main, name=self.name, daemon=True)
        self._thread.start()
        try:
            return started.result(self.timeout)
        except BaseException:
            self._thread.join(self.timeout)
            self._thread = None
            raise

    def stop(self) -> None:
        """Runs the teardown and ends the thread (idempotent)."""
        if self._thread is None:
            return
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(self.timeout * 2)
        self._thread = None
        self.loop = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Runs a coroutine on the loop and returns its result."""
        if self.loop is None:
            coro.close()
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout or self.timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn(*args) on the loop and returns its result."""
        async def wrapped() -> T:
            return fn(*args)

        return self.run(wrapped())


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


class AirThread:
    """An Air on its own event loop in a daemon thread; every method is thread-safe.

        air = AirThread(trace=True)
        spec = air.start()            # "tcp-client:127.0.0.1:PORT"
        ...                           # hosts join with that spec
        air.drop("C0:11:22:33:44:55")
        air.drop_after(addr, [40, 200])
        records = air.trace(); air.clear_trace()
        air.stop()
    """

    def __init__(self, *, port: int = 0, trace: bool = False, pace: Pacing | None = None,
                 timeout: float = 10.0) -> None:
        self.air = Air(trace=trace, pace=pace)
        self.spec = ""
        self._port = port
        self._loop = LoopThread("mpboot-air", timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Starts the thread and the air; returns the spec."""
        if not self._loop.running:
            self.spec = self._loop.start(lambda: self.air.start(port=self._port), self.air.close)
        return self.spec

    def stop(self) -> None:
        """Unplugs every host and ends the thread (idempotent)."""
        self._loop.stop()

    @property
    def port(self) -> int:
        return self.air.port

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the air's loop (e.g. to drive its `Air` directly)."""
        return self._loop.run(coro)

    def drop(self, address: str) -> int:
        return self._loop.call(self.air.drop, address)

    def drop_after(self, address: str, writes: Sequence[int]) -> None:
        self._loop.call(self.air.drop_after, address, list(writes))

    def connections(self) -> list[LinkInfo]:
        return self._loop.call(self.air.connections)

    def controllers(self) -> int:
        return self._loop.call(self.air.controllers)

    def set_tracing(self, on: bool) -> None:
        self._loop.call(setattr, self.air, "tracing", on)

    def trace(self) -> list[AttRecord]:
        """A snapshot of the ATT trace so far."""
        return self._loop.call(list, self.air.trace)

    def clear_trace(self) -> None:
        self._loop.call(self.air.trace.clear)

    def pacing_stats(self, conn: int | None = None) -> PacingStats:
        return self._loop.call(self.air.pacing_stats, conn)


async def serve(port: int = 0, *, ready: Any = None, pace: Pacing | None = None) -> None:
    """Runs an Air until cancelled; `ready(spec)` is called once it listens."""
    air = Air(pace=pace)
    spec = await air.start(port=port)
    if ready is not None:
        ready(spec)
    try:
        await asyncio.Event().wait()
    finally:
        await air.close()


__all__ = ["Air", "AirThread", "AttRecord", "LinkInfo", "LoopThread", "Pacing", "PacingStats", "address_key",
           "serve"]
