"""The radio timing model bench_ble.py projects BLE transfers with (tools/ble_model.py)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import cbor2
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ble_model import NOTIFY, WRITE_CMD, Pdu, Timing, messages, project  # noqa: E402

MTU = 247


def smp(n: int, seq: int, off: int | None = None) -> bytes:
    """An SMP image upload request of n bytes in all, at `off` (default: seq; 0 opens)."""
    off = seq if off is None else off
    m = n - 8
    while len(body := cbor2.dumps({"off": off, "data": bytes(m)})) > n - 8:
        m -= 1
    assert len(body) == n - 8, n
    return struct.pack(">BBHHBB", 2, 0, len(body), 1, seq, 1) + body


def reply(seq: int) -> bytes:
    body = cbor2.dumps({"off": seq + 1})
    return struct.pack(">BBHHBB", 3, 0, len(body), 1, seq, 1) + body


def pdus_of(packet: bytes, t: float, direction: str) -> list[Pdu]:
    op = WRITE_CMD if direction == "c2p" else NOTIFY
    step = MTU - 3
    return [Pdu(t, direction, op, packet[i : i + step]) for i in range(0, len(packet), step)]


def stop_and_wait(sizes: list[int]) -> list[Pdu]:
    out, t = [], 0.0
    for seq, n in enumerate(sizes):
        out += pdus_of(smp(n, seq), t, "c2p")
        t += 1
        out += pdus_of(reply(seq), t, "p2c")
        t += 1
    return out


def pipelined(sizes: list[int]) -> list[Pdu]:
    out = []
    for seq, n in enumerate(sizes):
        out += pdus_of(smp(n, seq), 0.0, "c2p")
    for seq in range(len(sizes)):
        out += pdus_of(reply(seq), 1.0, "p2c")
    return out


def test_messages_reassemble_by_header_length() -> None:
    trace = pipelined([2048, 244 * 8, 100])
    reqs = messages(trace, "c2p")
    assert [(m.size, m.pdus) for m in reqs] == [(2048, 9), (1952, 8), (100, 1)]
    assert [m.size for m in messages(trace, "p2c")] == [len(reply(0))] * 3
    assert [m.streamed for m in reqs] == [False, True, True]


def test_compressed_chunks_stream_as_upload_chunks() -> None:
    """mpboot's compressed chunk (group 64 command 7) past offset 0 is streamed like an upload
    chunk; other group 64 commands (device info) and writes elsewhere are not."""
    def request(group: int, cmd: int, body: dict, seq: int) -> bytes:
        data = cbor2.dumps(body)
        return struct.pack(">BBHHBB", 2, 0, len(data), group, seq, cmd) + data

    chunk = {"off": 2048, "ulen": 3000, "data": bytes(1900)}
    trace = []
    for seq, (group, cmd, body) in enumerate([(64, 7, chunk), (64, 6, chunk), (64, 7, {**chunk, "off": 0}),
                                              (0, 7, chunk)]):
        trace += pdus_of(request(group, cmd, body, seq), 0.0, "c2p")
    assert [m.streamed for m in messages(trace, "c2p")] == [True, False, False, False]


def test_stop_and_wait_pays_a_round_trip_per_request() -> None:
    # request 0: events 0-1 (6 + 3 packets); response: event 2; request 1: events 3-4; response 5
    p = project(stop_and_wait([2048, 2048]))
    assert (p.requests, p.events) == (2, 6)
    assert p.seconds == pytest.approx(6 * 0.015)
    assert (p.c2p_pdus, p.p2c_pdus, p.c2p_payload) == (18, 2, 4096)


def test_pipelined_requests_fill_the_events() -> None:
    # The opening request (off 0) goes alone: event 0, its response event 1; then 6-packet
    # requests back to back from event 2, one per event, each response one event later.
    p = project(pipelined([244 * 6] * 4))
    assert p.events == 6
    # after the opening (events 0-1, reply 2): three 8-packet requests, 24 packets in 6 per
    # event = events 3-6, + 1 for the last reply
    assert project(pipelined([244 * 8] * 4)).events == 8


def test_a_hosts_own_pace_is_not_taken_for_waiting() -> None:
    # Recorded: every reply back before the next request started (a slow host, a fast
    # device), yet the client had up to 2 in flight at times: streamed requests are modelled
    # at its window, not as waiting for each reply.
    trace = pipelined([244 * 6] * 2)  # request 0 (opening) alone; request 1 with 0 in flight
    t = 2.0
    for seq in (2, 3):  # two in flight together once
        trace += pdus_of(smp(244 * 6, seq), t, "c2p")
    t += 1
    for seq in (2, 3):
        trace += pdus_of(reply(seq), t, "p2c")
    waits_each = stop_and_wait([244 * 6] * 4)
    assert project(trace).events < project(waits_each).events


def test_ceiling() -> None:
    assert Timing().ceiling == pytest.approx(6 * 244 / 0.015)
    assert Timing(interval=0.0075, per_event=4).ceiling == pytest.approx(4 * 244 / 0.0075)


def test_ceiling_counts_ll_packets_per_pdu() -> None:
    # a full ATT PDU + the L2CAP header: 1 packet at DL 251 for MTU 247, 10 at DL 27, 3 for MTU 517
    assert Timing(data_length=251).packets_per_pdu == 1
    assert Timing(data_length=27).packets_per_pdu == 10
    assert Timing(mtu=517).packets_per_pdu == 3
    assert Timing().ceiling / 1024 == pytest.approx(95.3, abs=0.05)
    assert Timing(data_length=27).ceiling == pytest.approx(6 * 244 / 10 / 0.015)
    assert Timing(mtu=517).ceiling == pytest.approx(6 * 514 / 3 / 0.015)


def test_short_data_length_fragments_each_pdu() -> None:
    # 244-byte values are 251-byte L2CAP PDUs: 10 LL packets each at DL 27
    trace = stop_and_wait([2048])
    assert [m.packets for m in messages(trace, "c2p", 27)] == [8 * 10 + 4]  # the last PDU: 96 + 7 bytes
    assert [m.packets for m in messages(trace, "c2p", 251)] == [9]
    # 2048 bytes: 8 full PDUs (80 packets) and one of 96 bytes (4): 84 packets, 6 per event = 14
    # events; the reply (1 packet) one event later
    assert project(trace, Timing(data_length=27)).events == 15
    assert project(trace, Timing()).events == 3


def test_a_paced_trace_starts_requests_when_queued() -> None:
    # A paced air records when a PDU was sent (queued) apart from when it crossed (t): a
    # request queued before the previous reply crossed was in flight with it (window 2).
    trace: list[Pdu] = []
    for seq in range(4):
        request = pdus_of(smp(244 * 6, seq), 0, "c2p")
        trace += [Pdu(2.0 + seq, "c2p", WRITE_CMD, p.value, queued=0.5 + seq) for p in request]
    for seq in range(4):
        trace += [Pdu(2.5 + seq, "p2c", NOTIFY, p.value) for p in pdus_of(reply(seq), 0, "p2c")]
    trace.sort(key=lambda p: p.t)
    queued_view = project(trace)
    crossing_view = project([Pdu(p.t, p.direction, p.opcode, p.value) for p in trace])
    assert queued_view.events < crossing_view.events
