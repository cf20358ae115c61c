"""Connection events for the simulated air (mpboot.sim.air): a link paced like a radio.

A Bumble link carries a PDU the moment a host sends it, so a transfer measured on it is bound
by the CPU. `Air(pace=Pacing(...))` puts each LE connection on a clock instead:

- connection events at absolute times `anchor + k * interval` (the anchor: when the link was
  made), so a late event does not push the later ones back; an event whose time passed while
  the previous one was late is counted as `missed` and not run (no catch-up bursts);
- each event carries up to `per_event` LL data packets each way, taken from what was queued
  when the event began, oldest first;
- an L2CAP PDU of L bytes (its 4-byte header included) takes ceil(L / data_length) LL packets
  and crosses when its last packet is sent; a PDU can be split across events;
- a PDU that crosses is delivered after the event, so the peer's reply to it is queued after
  the event began and leaves in a later one;
- the timer runs only while something is queued (an idle link costs no wake-ups).

`LinkPacer` is the scheduler of one link, on an injected clock (`time()` and `call_at(when,
callback)`, an asyncio loop's methods), so tests can call `tick()` themselves.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

INTERVAL_UNIT_S = 0.00125  # LL connection interval units (ConnectInd, ConnectionUpdateInd)
L2CAP_HEADER = 4
MIN_DATA_LENGTH = 27  # LL data PDU payload without data length extension
MAX_DATA_LENGTH = 251
_LATENESS_SAMPLES = 100_000  # per link: a long-running air keeps the latest ones


@dataclass(frozen=True)
class Pacing:
    """How the air paces its links: `interval` seconds between connection events (None: the
    link's own, from the central's CONNECT_IND and later connection updates), `per_event` LL
    packets each way per event, LL payloads of `data_length` bytes (27..251)."""

    interval: float | None = None
    per_event: int = 6
    data_length: int = MAX_DATA_LENGTH

    def __post_init__(self) -> None:
        if self.interval is not None and not self.interval > 0:
            raise ValueError("interval must be > 0 seconds (or None: the link's own)")
        if self.per_event < 1:
            raise ValueError("per_event must be >= 1")
        if not MIN_DATA_LENGTH <= self.data_length <= MAX_DATA_LENGTH:
            raise ValueError(f"data_length must be {MIN_DATA_LENGTH}..{MAX_DATA_LENGTH}")

    def packets(self, pdu_length: int) -> int:
        """LL packets for an L2CAP PDU of `pdu_length` bytes (its header included)."""
        return max(1, math.ceil(pdu_length / self.data_length))


@dataclass(frozen=True)
class PacingStats:
    """`events`: connection events elapsed on the links (idle ones included, up to now or the
    link's end); `busy`: events that carried data; lateness of those events' timers against
    their anchor times (seconds); `missed`: events that passed while a late one ran."""

    events: int = 0
    busy: int = 0
    late_median: float = 0.0
    late_p99: float = 0.0
    late_max: float = 0.0
    missed: int = 0

    @property
    def missed_share(self) -> float:
        """Missed events per event that had data waiting (run or missed)."""
        return self.missed / max(1, self.busy + self.missed)


class Clock(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], Any]) -> Any: ...  # returns a .cancel()-able handle


@dataclass(eq=False)
class Queued:
    """One L2CAP PDU waiting to cross: `left` LL packets still to send."""

    pdu: bytes
    left: int
    queued: float  # clock time it was queued
    tag: Any = None  # the caller's (the air: the connection that sent it)


Cross = Callable[[str, Queued, int], None]  # (direction, item, event index)


class LinkPacer:
    """The connection events of one link (see the module docstring). `cross(direction, item,
    event)` is called for each PDU as its last packet is sent, in order, during the event."""

    def __init__(self, pacing: Pacing, clock: Clock, cross: Cross, *, interval: float | None = None) -> None:
        self.pacing = pacing
        self.clock = clock
        self.cross = cross
        self.interval = pacing.interval or interval or 0.0075
        self.anchor = clock.time()  # time of event `base`
        self.base = 0
        self.queues: dict[str, deque[Queued]] = {"c2p": deque(), "p2c": deque()}
        self.last = -1  # the last event run
        self.armed: int | None = None  # the event the timer is set for
        self.handle: Any = None
        self.busy = 0
        self.missed = 0
        self.lateness: deque[float] = deque(maxlen=_LATENESS_SAMPLES)
        self.closed_at: float | None = None

    def time_of(self, event: int) -> float:
        return self.anchor + (event - self.base) * self.interval

    def event_at(self, t: float) -> int:
        """The last event whose time is <= t."""
        return self.base + math.floor((t - self.anchor) / self.interval + 1e-9)

    def queue(self, direction: str, pdu: bytes, tag: Any = None) -> None:
        if self.closed_at is not None:
            return
        self.queues[direction].append(Queued(pdu, self.pacing.packets(len(pdu)), self.clock.time(), tag))
        if self.handle is None:
            self._arm()

    def set_interval(self, interval: float) -> None:
        """A connection update: the new interval applies from the next event (ignored when
        the pacing fixes the interval)."""
        if self.pacing.interval is not None or interval <= 0 or interval == self.interval:
            return
        nxt = self.armed if self.armed is not None else max(self.last + 1, self.event_at(self.clock.time()) + 1)
        self.anchor, self.base, self.interval = self.time_of(nxt), nxt, interval

    def tick(self) -> None:
        """One connection event (the timer's callback; tests call it directly)."""
        self.handle = None
        if self.closed_at is not None:
            return
        now = self.clock.time()
        due = self.armed if self.armed is not None else max(self.last + 1, self.event_at(now))
        self.armed = None
        event = max(due, self.event_at(now))  # a late tick runs as the latest event passed
        if event > due:
            self.missed += event - due
        self.lateness.append(max(0.0, now - self.time_of(due)))
        self.last = event
        counts = {d: len(q) for d, q in self.queues.items()}  # what was queued when it began
        sent = False
        for direction in ("c2p", "p2c"):
            q = self.queues[direction]
            budget = self.pacing.per_event
            n = counts[direction]
            while budget and n and q:
                item = q[0]
                take = min(budget, item.left)
                item.left -= take
                budget -= take
                sent = True
                if item.left:
                    break
                q.popleft()
                n -= 1
                self.cross(direction, item, event)
                if self.closed_at is not None:
                    return
        if sent:
            self.busy += 1
        if self.handle is None and any(self.queues.values()):
            self._arm()

    def _arm(self) -> None:
        nxt = max(self.last + 1, self.event_at(self.clock.time()) + 1)
        self.armed = nxt
        self.handle = self.clock.call_at(self.time_of(nxt), self.tick)

    def close(self) -> None:
        """The link ended: its queues are dropped (as a controller does), the timer stopped."""
        if self.closed_at is not None:
            return
        self.closed_at = self.clock.time()
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
        self.armed = None
        for q in self.queues.values():
            q.clear()

    def events(self) -> int:
        """Connection events elapsed from the anchor to now (or to the link's end)."""
        end = self.closed_at if self.closed_at is not None else self.clock.time()
        return max(self.last, self.event_at(end)) + 1


def stats(pacers: Iterable[LinkPacer]) -> PacingStats:
    """The figures of some links together."""
    events = busy = missed = 0
    late: list[float] = []
    for p in pacers:
        events += p.events()
        busy += p.busy
        missed += p.missed
        late.extend(p.lateness)
    if not late:
        return PacingStats(events, busy, missed=missed)
    late.sort()
    return PacingStats(events, busy, late[(len(late) - 1) // 2], late[max(0, math.ceil(0.99 * len(late)) - 1)],
                       late[-1], missed)


__all__ = ["INTERVAL_UNIT_S", "Clock", "LinkPacer", "Pacing", "PacingStats", "Queued", "stats"]
