"""The radio timing model bench_ble.py projects BLE transfers with (tools/ble_model.py)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from ble_model import NOTIFY, WRITE_CMD, Pdu, Timing, messages, project  # noqa: E402

MTU = 247


def smp(n: int, seq: int) -> bytes:
    """An SMP packet of n bytes in all."""
    return struct.pack(">BBHHBB", 2, 0, n - 8, 1, seq, 1) + bytes(n - 8)


def pdus_of(packet: bytes, t: float, direction: str) -> list[Pdu]:
    op = WRITE_CMD if direction == "c2p" else NOTIFY
    step = MTU - 3
    return [Pdu(t, direction, op, packet[i : i + step]) for i in range(0, len(packet), step)]


def stop_and_wait(sizes: list[int]) -> list[Pdu]:
    out, t = [], 0.0
    for seq, n in enumerate(sizes):
        out += pdus_of(smp(n, seq), t, "c2p")
        t += 1
        out += pdus_of(smp(20, seq), t, "p2c")
        t += 1
    return out


def pipelined(sizes: list[int]) -> list[Pdu]:
    out = []
    for seq, n in enumerate(sizes):
        out += pdus_of(smp(n, seq), 0.0, "c2p")
    for seq in range(len(sizes)):
        out += pdus_of(smp(20, seq), 1.0, "p2c")
    return out


def test_messages_reassemble_by_header_length() -> None:
    trace = pipelined([2048, 244 * 8, 100])
    reqs = messages(trace, "c2p")
    assert [(m.size, m.pdus) for m in reqs] == [(2048, 9), (1952, 8), (100, 1)]
    assert [m.size for m in messages(trace, "p2c")] == [20, 20, 20]


def test_stop_and_wait_pays_a_round_trip_per_request() -> None:
    # request 0: events 0-1 (6 + 3 packets); response: event 2; request 1: events 3-4; response 5
    p = project(stop_and_wait([2048, 2048]))
    assert (p.requests, p.events) == (2, 6)
    assert p.seconds == pytest.approx(6 * 0.015)
    assert (p.c2p_pdus, p.p2c_pdus, p.c2p_payload) == (18, 2, 4096)


def test_pipelined_requests_fill_the_events() -> None:
    # 6-packet requests back to back: one per event; each response one event later
    p = project(pipelined([244 * 6] * 4))
    assert p.events == 5
    # a full window of 8-packet requests: 32 packets in 6 per event = 6 events, + 1 for the last reply
    assert project(pipelined([244 * 8] * 4)).events == 7


def test_ceiling() -> None:
    assert Timing().ceiling == pytest.approx(6 * 244 / 0.015)
    assert Timing(interval=0.0075, per_event=4).ceiling == pytest.approx(4 * 244 / 0.0075)
