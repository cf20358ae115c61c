"""The paced air (host/mpboot/sim/pacing.py, `Air(pace=...)`): connection events at absolute
times, a cap of LL packets each way per event, PDUs fragmented by the data length and crossing
with their last packet, replies never in the event of their request, missed events counted,
queues dropped with the link; and, on a paced air at 7.5 ms, a Bumble peripheral and
`mpboot sim --ble` (round trips, an upload against tools/ble_model.py, drop_after, a reset).

The scheduler's tests run on an injected clock and call `tick()` themselves; the others wait
on events with timeouts. No sleeps, and no assertion on how long anything took."""

from __future__ import annotations

import asyncio
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from blekit import BleSim, central, run, until
from conftest import KEYS_DIR, signing_key
from simkit import make_app, sign_app
from simserve import MPBOOT
from test_ble_air import PERIPHERAL, connected, peripheral

from mpboot.sim.air import Air, AirThread, AttRecord, Pacing, _Link
from mpboot.sim.pacing import LinkPacer, Queued, stats
from mpboot.smp.header import Group, Op, OsCmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ble_model import Pdu, Timing, project  # noqa: E402

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
IV = 0.01  # the unit tests' interval
ATT_WRITE_COMMAND, ATT_NOTIFICATION = 0x52, 0x1B


# ---------------------------------------------------------------------------------------
# the scheduler, on an injected clock


class Handle:
    def __init__(self, when: float, callback: Any) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """time() and call_at() as a pacer uses them; nothing fires by itself."""

    def __init__(self) -> None:
        self.now = 0.0
        self.handles: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Handle:
        h = Handle(when, callback)
        self.handles.append(h)
        return h

    @property
    def pending(self) -> Handle | None:
        live = [h for h in self.handles if not h.cancelled and h.callback is not None]
        return live[-1] if live else None

    def fire(self, late: float = 0.0) -> None:
        """Runs the armed event, `late` seconds after its time."""
        h = self.pending
        assert h is not None, "no event armed"
        self.now = h.when + late
        cb, h.callback = h.callback, None
        cb()


def l2cap(n: int, tag: int = 0) -> bytes:
    """An L2CAP PDU of n bytes in all (4-byte header included), ATT CID, tagged."""
    return struct.pack("<HH", n - 4, 4) + bytes([tag]) * (n - 4)


class Rig:
    def __init__(self, interval: float | None = IV, per_event: int = 6, data_length: int = 251,
                 link_interval: float | None = None) -> None:
        self.clock = FakeClock()
        self.crossed: list[tuple[str, int, int]] = []  # (direction, tag, event)
        self.on_cross: Any = None
        self.p = LinkPacer(Pacing(interval, per_event, data_length), self.clock, self._cross, interval=link_interval)

    def _cross(self, direction: str, item: Queued, event: int) -> None:
        self.crossed.append((direction, item.pdu[4], event))
        if self.on_cross is not None:
            self.on_cross(direction, item, event)

    def queue(self, direction: str, n: int, tag: int, length: int = 251) -> None:
        for i in range(n):
            self.p.queue(direction, l2cap(length, tag + i))

    def events(self, direction: str) -> list[int]:
        return [ev for d, _, ev in self.crossed if d == direction]


def test_per_event_cap_each_way() -> None:
    r = Rig()
    r.clock.now = 0.001
    r.queue("c2p", 10, 0)
    r.queue("p2c", 8, 100)
    assert r.clock.pending is not None and r.clock.pending.when == pytest.approx(IV)  # event 1
    r.clock.fire()
    assert (len(r.events("c2p")), len(r.events("p2c"))) == (6, 6)
    r.clock.fire()
    assert r.events("c2p") == [1] * 6 + [2] * 4 and r.events("p2c") == [1] * 6 + [2] * 2
    assert [t for d, t, _ in r.crossed if d == "c2p"] == list(range(10))  # in order
    assert r.clock.pending is None  # idle: no timer
    assert (r.p.busy, r.p.missed) == (2, 0)


@pytest.mark.parametrize(("data_length", "length", "packets"), [
    (251, 251, 1),  # ATT MTU 247 + 4: one packet
    (251, 252, 2),
    (251, 521, 3),  # ATT MTU 517
    (27, 27, 1),
    (27, 28, 2),
    (27, 251, 10),  # no data length extension
])
def test_fragmentation_by_data_length(data_length: int, length: int, packets: int) -> None:
    assert Pacing(data_length=data_length).packets(length) == packets
    # per_event 1: a PDU of k packets crosses in the k-th event
    r = Rig(per_event=1, data_length=data_length)
    r.queue("c2p", 1, 7, length)
    for _ in range(packets):
        r.clock.fire()
    assert r.crossed == [("c2p", 7, packets)]


def test_pdus_split_across_events() -> None:
    r = Rig(per_event=6)
    r.queue("c2p", 2, 0, 4 * 251)  # 4 packets each: the second is split 2 + 2
    r.clock.fire()
    assert r.crossed == [("c2p", 0, 1)]
    r.clock.fire()
    assert r.crossed == [("c2p", 0, 1), ("c2p", 1, 2)]
    # MTU 517 at DL 27: 20 packets, 6 per event: crosses in the 4th event
    r = Rig(per_event=6, data_length=27)
    r.queue("p2c", 1, 9, 521)
    for _ in range(4):
        r.clock.fire()
    assert r.crossed == [("p2c", 9, 4)] and r.clock.pending is None


def test_no_reply_in_the_event_of_its_request() -> None:
    r = Rig()
    # a peer that answers the instant a request crosses (even before the event ends)
    r.on_cross = lambda d, item, ev: r.p.queue("p2c", l2cap(30, 200 + item.pdu[4])) if d == "c2p" else None
    r.queue("c2p", 3, 0)
    r.clock.fire()
    assert r.crossed == [("c2p", 0, 1), ("c2p", 1, 1), ("c2p", 2, 1)]
    r.clock.fire()
    assert r.crossed[3:] == [("p2c", 200, 2), ("p2c", 201, 2), ("p2c", 202, 2)]


def test_events_keep_their_anchor_times_and_late_ones_are_missed_not_caught_up() -> None:
    r = Rig()
    r.queue("c2p", 40, 0)
    times = []
    for _ in range(3):  # each tick 0.4 ms late: no drift
        times.append(r.clock.pending.when)  # type: ignore[union-attr]
        r.clock.fire(late=0.0004)
    assert times == pytest.approx([IV, 2 * IV, 3 * IV])
    r.clock.fire(late=2.5 * IV)  # event 4 fires 25 ms late: events 5 and 6 have passed
    assert r.events("c2p")[-6:] == [6] * 6  # one event's worth, as event 6: no burst
    assert r.p.missed == 2
    assert r.clock.pending.when == pytest.approx(7 * IV)  # type: ignore[union-attr]
    r.clock.fire()
    s = stats([r.p])
    assert (s.busy, s.missed, s.events) == (5, 2, 8)
    assert s.late_max == pytest.approx(2.5 * IV) and s.late_median == pytest.approx(0.0004)
    assert s.missed_share == pytest.approx(2 / 7)


def test_an_idle_link_sleeps_and_wakes_at_its_next_anchor() -> None:
    r = Rig()
    r.queue("c2p", 1, 0)
    r.clock.fire()
    assert r.clock.pending is None
    r.clock.now = 5.3 * IV
    r.queue("p2c", 1, 1)
    assert r.clock.pending.when == pytest.approx(6 * IV)  # type: ignore[union-attr]
    r.clock.fire()
    assert r.crossed == [("c2p", 0, 1), ("p2c", 1, 6)] and r.p.missed == 0


def test_link_interval_and_its_updates() -> None:
    r = Rig(interval=None, link_interval=0.015)
    r.queue("c2p", 7, 0)
    assert r.clock.pending.when == pytest.approx(0.015)  # type: ignore[union-attr]
    r.p.set_interval(0.0075)  # from the next event (the armed one) on
    r.clock.fire()
    assert r.clock.pending.when == pytest.approx(0.0225)  # type: ignore[union-attr]
    fixed = Rig(interval=0.02, link_interval=0.015)
    fixed.p.set_interval(0.0075)
    fixed.queue("c2p", 1, 0)
    assert fixed.clock.pending.when == pytest.approx(0.02)  # type: ignore[union-attr]


def test_close_drops_the_queues_and_stops_the_timer() -> None:
    r = Rig()
    r.queue("c2p", 20, 0)
    r.queue("p2c", 3, 100)
    r.clock.fire()
    h = r.clock.pending
    r.p.close()
    assert h is not None and h.cancelled
    assert not any(r.p.queues.values())
    r.p.queue("c2p", l2cap(30))  # after the end: nothing is queued, nothing armed
    assert not any(r.p.queues.values()) and r.clock.pending is None
    assert len(r.crossed) == 9


def test_pacing_rejects_bad_parameters() -> None:
    for kw in ({"interval": 0}, {"per_event": 0}, {"data_length": 26}, {"data_length": 252}):
        with pytest.raises(ValueError):
            Pacing(**kw)


# ---------------------------------------------------------------------------------------
# the air around the pacer (fake controllers; the scheduler on the injected clock)


def fake_link(air: Air, serial: int = 1) -> tuple[_Link, Any, Any]:
    def side(name: str) -> tuple[Any, Any]:
        return SimpleNamespace(name=name), SimpleNamespace(self_address=name)

    lk = _Link(serial, side("central"), side("peripheral"))
    air._links[id(lk.central[1])] = air._links[id(lk.peripheral[1])] = lk
    return lk, lk.central[1], lk.peripheral[1]


def att(opcode: int, value: bytes = b"") -> bytes:
    body = bytes([opcode]) + b"\x03\x00" + value
    return struct.pack("<HH", len(body), 4) + body


def test_unpaced_air_delivers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    air = Air(trace=True)
    delivered: list[bytes] = []
    monkeypatch.setattr(air, "_deliver", lambda peer, pconn, conn, pdu: delivered.append(pdu))
    lk, c, _ = fake_link(air)
    air._carry(c, att(ATT_WRITE_COMMAND, b"hi"))
    assert delivered == [att(ATT_WRITE_COMMAND, b"hi")] and lk.pacer is None and lk.writes == 1
    [rec] = air.trace
    assert (rec.queued, rec.event, rec.value) == (rec.t, None, b"hi")
    assert air.pacing_stats().events == 0


def test_paced_air_traces_counts_and_delivers_at_the_crossing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    air = Air(trace=True, pace=Pacing(IV, per_event=1), clock=clock)
    delivered: list[bytes] = []
    monkeypatch.setattr(air, "_deliver", lambda peer, pconn, conn, pdu: delivered.append(pdu))
    lk, c, p = fake_link(air)
    air._pace(lk, 0.03)
    clock.now = 0.002
    air._carry(c, att(ATT_WRITE_COMMAND, b"a"))
    air._carry(c, att(ATT_WRITE_COMMAND, b"b"))
    air._carry(p, att(ATT_NOTIFICATION, b"n"))
    assert delivered == [] and lk.writes == 0 and air.trace == []
    clock.fire()
    assert delivered == [att(ATT_WRITE_COMMAND, b"a"), att(ATT_NOTIFICATION, b"n")] and lk.writes == 1
    clock.fire()
    assert lk.writes == 2
    assert [(r.direction, r.value, r.event, r.queued, r.t) for r in air.trace] == [
        ("c2p", b"a", 1, 0.002, pytest.approx(IV)), ("p2c", b"n", 1, 0.002, pytest.approx(IV)),
        ("c2p", b"b", 2, 0.002, pytest.approx(2 * IV))]
    assert all(isinstance(r, AttRecord) for r in air.trace)


def test_a_link_that_ends_drops_what_it_had_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    air = Air(pace=Pacing(IV, per_event=2), clock=clock)
    delivered: list[bytes] = []
    monkeypatch.setattr(air, "_deliver", lambda peer, pconn, conn, pdu: delivered.append(pdu))
    lk, c, _ = fake_link(air)
    air._pace(lk, IV)
    for i in range(5):
        air._carry(c, att(ATT_WRITE_COMMAND, bytes([i])))
    clock.fire()
    armed = clock.pending
    air._forget(c)
    assert armed is not None and armed.cancelled and not any(lk.pacer.queues.values())  # type: ignore[union-attr]
    assert len(delivered) == 2 and air._links == {}
    assert air.pacing_stats(1).busy == 1 and air.pacing_stats(2).busy == 0


# ---------------------------------------------------------------------------------------
# on a paced air at 7.5 ms: real Bumble hosts, and `mpboot sim --ble`

PACE = Pacing(interval=0.0075, per_event=6, data_length=251)


@pytest.fixture
def paced() -> Any:
    with AirThread(trace=True, pace=PACE) as a:
        yield a


def test_a_round_trip_takes_at_least_two_events(paced: AirThread) -> None:
    async def main() -> None:
        async with peripheral(paced.spec) as p, central(paced.spec) as c:
            link = await connected(c, p)
            paced.clear_trace()
            await link.write(b"ping")
            assert await asyncio.wait_for(p.writes.get(), 5) == b"ping"
            await p.device.notify_subscriber(p.connection(), p.char, b"pong")
            assert await asyncio.wait_for(link.notes.get(), 5) == b"pong"
            [w, n] = paced.trace()
            assert (w.direction, w.opcode, n.direction, n.opcode) == ("c2p", 0x52, "p2c", 0x1B)
            assert w.event is not None and n.event is not None and n.event >= w.event + 1
            assert w.queued is not None and w.queued <= w.t <= n.t
            s = paced.pacing_stats(w.conn)
            assert s.busy >= 2 and s.events >= n.event + 1

    run(main())


def test_drop_after_counts_writes_as_they_cross(paced: AirThread) -> None:
    async def main() -> None:
        async with peripheral(paced.spec) as p, central(paced.spec) as c:
            paced.drop_after(PERIPHERAL, [3])
            link = await connected(c, p)
            for i in range(20):  # all queued at once: 20 writes in 4 events, the drop after 3
                await link.write(bytes([i]))
            assert await link.wait_disconnected(5) == 0x08
            await until(lambda: p.writes.qsize() >= 3, what="the 3 writes that crossed")
            got = [p.writes.get_nowait() for _ in range(p.writes.qsize())]
            assert got == [bytes([i]) for i in range(3)]
            assert [r.value for r in paced.trace() if r.opcode == ATT_WRITE_COMMAND] == got

    run(main())


@pytest.fixture(scope="module")
def app16k(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("app16k")
    return sign_app(make_app(out / "a", "1.0.0", confirm=True, filler=16 * 1024 - 1400), signing_key(KEY.name), "1.0.0")


def test_device_on_a_paced_air_upload_matches_the_model_and_reset_answers(tmp_path: Path, paced: AirThread,
                                                                          app16k: bytes) -> None:
    from mpboot.ble import bumble_backend, select
    from mpboot.smp.client import SMPClient
    from mpboot.transport.ble import BleTransport

    sim = BleSim(tmp_path / "dev", [KEY], radio=paced.spec, name="paced")
    try:
        sim.wait_for(r"serving SMP over BLE")

        async def upload() -> list[AttRecord]:
            backend = select(f"bumble:{paced.spec}")
            try:
                async with SMPClient(BleTransport("paced", backend=backend)) as client:
                    await client.params()
                    paced.clear_trace()
                    result = await client.upload(app16k, sha=True)
                    trace = paced.trace()
                    assert result.size == len(app16k)
            finally:
                await bumble_backend.close_all()
            return trace

        trace = run(upload(), timeout=120)
        writes = [r for r in trace if r.opcode in (ATT_WRITE_COMMAND, ATT_NOTIFICATION)]
        first, last = writes[0], writes[-1]
        assert first.direction == "c2p" and last.direction == "p2c"
        assert first.event is not None and last.event is not None
        measured = last.event - first.event + 1
        timing = Timing(interval=PACE.interval or 0, per_event=PACE.per_event, data_length=PACE.data_length)
        projected = project([Pdu(r.t, r.direction, r.opcode, r.value, r.queued) for r in writes], timing)
        assert projected.requests >= len(app16k) // 1952
        assert abs(measured - projected.events) <= 2, (measured, projected)

        async def reset() -> None:
            async with central(paced.spec) as c:
                link = await c.connect_smp("paced", timeout=30)
                hdr, rsp = await link.smp(Op.WRITE, Group.OS, OsCmd.RESET, {}, seq=3)
                assert hdr.seq == 3 and rsp.get("rc", 0) == 0  # the answer crossed before the end
                assert await link.wait_disconnected(20) == 0x13

        run(reset(), timeout=60)
    finally:
        assert sim.stop() == 0, sim.output()


def test_cli_sim_air_paced() -> None:
    proc = subprocess.Popen([MPBOOT, "sim", "air", "--pace-ms", "7.5", "--per-event", "4", "--data-length", "27"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"air on (tcp-client:127\.0\.0\.1:\d+)", line)
        assert m, line
        assert line.rstrip().endswith("paced: connection events every 7.5 ms, 4 packets each way, data length 27")

        async def main() -> None:
            async with peripheral(m.group(1)) as p, central(m.group(1)) as c:
                link = await connected(c, p)
                await link.write(bytes(244))  # 251 bytes: 10 packets at DL 27, 3 events
                assert await asyncio.wait_for(p.writes.get(), 5) == bytes(244)

        run(main())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(("args", "message"), [
    (["--pace-ms", "0"], "--pace-ms"),
    (["--per-event", "0"], "--per-event"),
    (["--data-length", "252"], "--data-length"),
])
def test_cli_sim_air_pacing_usage_errors(args: list[str], message: str) -> None:
    out = subprocess.run([MPBOOT, "sim", "air", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr, out.stderr
