"""Project a recorded BLE SMP transfer onto a real radio's timing (bench_ble.py).

A measurement over the Bumble virtual link has no radio timing: packets cross at the speed of
the processes. What a client's traffic pattern costs on air is projected here from the ATT
PDUs the air recorded (mpboot.sim.air tracing), with this model:

- Connection events every `interval` seconds (15 ms); in each event up to `per_event` (6) LL
  data packets in each direction (the central's packet and the peripheral's reply in each pair
  may both carry data). An ATT PDU of n bytes is ceil((n + 4) / data_length) LL packets (its
  L2CAP header is 4 bytes): one for MTU 247 at data length 251 (data length extension), 10 at
  data length 27, 3 for MTU 517 at 251.
- The client's requests are the recorded SMP packets in order (reassembled from the write
  commands by the SMP header length). Its window W is the most requests it had in flight in
  the recording. An image upload request past offset 0 (streamed) waits only for response
  k - W (the window) and for the answers to the requests before it that were not streamed;
  any other request (the opening upload request, state, parameters) waits for every
  response before it; either starts no sooner than the event after that
  response arrived (a client reacts to a notification no sooner than the next event).
- The device's response to request k leaves in an event after the one in which request k's
  last packet arrived (never in the same event), in order; device processing time is not
  modelled (the flash writes overlap with the link in a pipelined client; a client that waits
  for every response would only lose more).

The result: the events the transfer needs, hence its duration and rate, and the ceiling
`per_event * (mtu - 3) / ceil((mtu + 4) / data_length) / interval` bytes per second of ATT
payload.

The simulated air can run these same rules as a clock (mpboot.sim.pacing: `Air(pace=
Pacing(interval, per_event, data_length))`). The two are written apart on purpose, so that a
transfer measured on the paced air checks this projection of its own trace and the other way
round. On a paced trace a PDU's `queued` (when its sender handed it over) marks when a request
started, and its `t` (when it crossed) when a response arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cbor2

SMP_HEADER = 8


@dataclass(frozen=True)
class Pdu:
    """One ATT PDU as recorded: when, which way ("c2p" central to peripheral, "p2c"), the ATT
    opcode and its value (the bytes after the opcode and handle)."""

    t: float
    direction: str
    opcode: int
    value: bytes
    queued: float | None = None  # when it was sent, if recorded apart from when it crossed (t)

    @property
    def start(self) -> float:
        return self.t if self.queued is None else self.queued

    def packets(self, data_length: int) -> int:
        """LL packets: the ATT PDU (opcode, handle, value) in an L2CAP PDU (4-byte header)."""
        return math.ceil((len(self.value) + 3 + 4) / data_length)


@dataclass(frozen=True)
class Message:
    """One SMP packet: how many ATT PDUs carried it and their value bytes; `first_t` when its
    first PDU was sent, `last_t` when its last one arrived; `packets` LL packets in all."""

    pdus: int
    size: int
    first_t: float
    last_t: float
    data: bytes = b""
    packets: int = 0

    @property
    def streamed(self) -> bool:
        """An image upload request past offset 0 (image group command 1, or mpboot's
        compressed chunk, group 64 command 7): what a pipelining client streams within its
        window (every other request, the opening one included, waits for its answer)."""
        d = self.data
        if len(d) < SMP_HEADER or d[0] & 7 != 2 or (d[4] << 8 | d[5], d[7]) not in ((1, 1), (64, 7)):
            return False
        try:
            off = cbor2.loads(d[SMP_HEADER:]).get("off")
        except (cbor2.CBORDecodeError, AttributeError):
            return False
        return isinstance(off, int) and off > 0


@dataclass(frozen=True)
class Timing:
    interval: float = 0.015
    per_event: int = 6
    mtu: int = 247
    data_length: int = 251

    @property
    def packets_per_pdu(self) -> int:
        """LL packets for a full ATT PDU (MTU bytes and the 4-byte L2CAP header)."""
        return math.ceil((self.mtu + 4) / self.data_length)

    @property
    def ceiling(self) -> float:
        """ATT payload bytes per second, one direction, every slot used by full PDUs."""
        return self.per_event * (self.mtu - 3) / self.packets_per_pdu / self.interval


@dataclass(frozen=True)
class Projection:
    requests: int
    events: int
    seconds: float
    c2p_payload: int  # ATT value bytes central -> peripheral
    p2c_payload: int
    c2p_pdus: int
    p2c_pdus: int


WRITE_CMD = 0x52
NOTIFY = 0x1B


def messages(pdus: Iterable[Pdu], direction: str, data_length: int = 251) -> list[Message]:
    """The SMP packets of one direction, reassembled by the SMP header length."""
    out: list[Message] = []
    buf = bytearray()
    count = packets = 0
    first = 0.0
    for p in pdus:
        if p.direction != direction or p.opcode not in (WRITE_CMD, NOTIFY):
            continue
        if not buf:
            first = p.start
        buf += p.value
        count += 1
        packets += p.packets(data_length)
        while len(buf) >= SMP_HEADER:
            size = SMP_HEADER + (buf[2] << 8 | buf[3])
            if len(buf) < size:
                break
            out.append(Message(count, size, first, p.t, bytes(buf[:size]), packets))
            del buf[:size]
            count = 1 if buf else 0  # a PDU that ends one packet and begins the next counts in both
            packets = p.packets(data_length) if buf else 0
            first = p.start
    return out


def project(pdus: Sequence[Pdu], timing: Timing = Timing()) -> Projection:
    reqs = messages(pdus, "c2p", timing.data_length)
    rsps = messages(pdus, "p2c", timing.data_length)
    # dep[k]: responses the client had fully received when it started sending request k
    dep = []
    j = 0
    for r in reqs:
        while j < len(rsps) and rsps[j].last_t <= r.first_t:
            j += 1
        dep.append(j)
    # The client's window: the most requests it had in flight. The recording's timing also
    # carries the host's own pace (replies that came back before the host got round to its
    # next request make it look as if it waited for them), so a streamed request is modelled
    # as sent as soon as the window allows; any other waits for every reply before it.
    # Nothing streams past a request waiting for its answer (the opening one's answer says
    # where to continue).
    window = max((k - d + 1 for k, d in enumerate(dep)), default=1)
    barrier = 0  # replies every later request needs: up to the last request not streamed
    for k in range(len(reqs)):
        if reqs[k].streamed:
            dep[k] = max(barrier, k - window + 1)
        else:
            dep[k] = k
            barrier = k + 1
    n = len(reqs)
    req_done = [math.inf] * n  # event in which request k's last packet went
    rsp_done = [math.inf] * n  # event in which response k's last packet went
    req_left = [m.packets for m in reqs]
    rsp_left = [m.packets for m in rsps[:n]] + [1] * max(0, n - len(rsps))
    k_req = k_rsp = 0
    event = 0
    while k_rsp < n:
        # central -> peripheral: requests in order, each once its dependencies arrived earlier
        slots = timing.per_event
        while slots and k_req < n:
            d = dep[k_req]
            if d > 0 and not rsp_done[d - 1] < event:
                break
            take = min(slots, req_left[k_req])
            req_left[k_req] -= take
            slots -= take
            if req_left[k_req] == 0:
                req_done[k_req] = event
                k_req += 1
        # peripheral -> central: responses in order, each after its request's event
        slots = timing.per_event
        while slots and k_rsp < n and req_done[k_rsp] < event:
            take = min(slots, rsp_left[k_rsp])
            rsp_left[k_rsp] -= take
            slots -= take
            if rsp_left[k_rsp] == 0:
                rsp_done[k_rsp] = event
                k_rsp += 1
        event += 1
    c2p = [p for p in pdus if p.direction == "c2p" and p.opcode in (WRITE_CMD, NOTIFY)]
    p2c = [p for p in pdus if p.direction == "p2c" and p.opcode in (WRITE_CMD, NOTIFY)]
    return Projection(n, event, event * timing.interval, sum(len(p.value) for p in c2p),
                      sum(len(p.value) for p in p2c), len(c2p), len(p2c))
