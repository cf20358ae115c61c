"""Pipelined, resumable image upload (docs/PROTOCOL.md, "Upload" and "Pipelining").

1. Read the MCUmgr parameters (buf_size, buf_count, and asked: `pipeline`, the requests an
   mpboot device takes in flight); conservative defaults if the device does not answer.
   Chunks are the largest data that keep each request within transport.max_packet(buf_size).
2. The first request (off 0) carries `len`, `sha` (SHA-256 of the whole file) and `ptlv` (the
   image's protected TLV area, so the device refuses another vendor's image or a rolled-back
   counter before writing anything): its reply either refuses the image or gives the offset
   to continue from (a resumed session answers its own offset). It goes alone, unless the
   parameters named a `pipeline`: then the window fills right behind it (the device answers
   it first; what follows is answered with the offset it expects, or refused, and nothing
   is lost either way).
3. Then up to `window` requests stay in flight: by default the `pipeline` the device named in
   its parameters or in its answer to the opening request (an mpboot device answers it, no
   other does), one on others (Zephyr's and MCUboot's UART transports take one request
   at a time and lose what comes meanwhile). Chunks after the opening go compressed (group 64
   command 7) where the parameters or the opening's answer offered it (`deflate`) and that
   carries more of the image (docs/PROTOCOL.md, "Compressed upload"). A reply whose `off` is not the end of its request
   means the device expects `off`: every request still in flight is dropped (their replies
   are ignored when they come) and the stream continues from `off`.
4. A request unanswered for the resend timeout (RTO: from the reply times measured so far, as
   TCP does, between RTO_MIN (RTO_MIN_ONE_AT_A_TIME at a window of 1) and `timeout`, doubling
   while the silence lasts) is taken as
   lost: the rest of the window is dropped and that request is sent again, alone, while its
   first send stays awaited (a slow device's late answer settles it as well). Silent rounds
   of the whole `timeout` count as tries; after `retries` of them in a row, DeviceSilent.
5. The last reply comes after the device verified the image, so the device gets up to
   `final_timeout` for it; it may carry `match` (the device's check of `sha`). Meanwhile the
   last chunk is re-sent after each RTO, up to `retries` times, without giving up on the
   earlier sends: a lost request or reply then costs one RTO, not `final_timeout`, because a
   device that verified already answers a repeated last chunk at once (it remembers the
   finished upload), and one still verifying answers it after the first.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

import cbor2

from mpboot.errors import (
    DeviceSilent,
    ImageRefused,
    ProtocolError,
    UpdateErrorCode,
    UpdateRefused,
    UsageError,
    VerificationFailed,
)
from mpboot.smp.error_map import error_from_response
from mpboot.smp.header import HEADER_SIZE, Group, ImageCmd, MpbootCmd, Op
from mpboot.smp.messages import ClientStats, McuMgrParams, PendingReply, ProgressCallback
from mpboot.smp.zchunk import MAX_WBITS, MIN_WBITS, ZUPLOAD_MAX, Packer
from mpboot.transport import Transport

PARAMS_TIMEOUT: Final = 2.0  # a device that serves the params request answers it at once
DEFAULT_FINAL_TIMEOUT: Final = 30.0  # verifying a large image on a slow MCU
IMAGE_HEADER_SIZE: Final = 32  # the first request's data must hold the image header
MAX_REOPENS: Final = 2  # re-open a session the device lost (it reset mid-upload)
MAX_STALLS: Final = 8  # resyncs in a row that do not get past the best offset reached
MAX_BAD_REPLIES: Final = 8  # undecodable replies in a row
# The shortest silence taken as a lost request. A device answers an upload request within
# milliseconds of its last byte (more while it erases); scheduling noise on a loaded host
# stays below this, and a resend it causes anyway costs one duplicate request.
RTO_MIN: Final = 0.1
# ... but one request at a time, a device loses a request only to line noise, while its reply
# times vary twofold or more (Zephyr + MCUboot on QEMU's mps2_an385: 150-440 ms for 2 KB), and
# a resend that was not needed costs the line a whole request: there it is at least this.
RTO_MIN_ONE_AT_A_TIME: Final = 1.0
FIRST_ALIGN: Final = 64  # the opening request's data is a multiple of this (unless the whole image)
MAX_ALIGN: Final = 64  # the largest chunk alignment learnt from a device's partial takes


class Requester(Protocol):
    """What the upload needs of a client; mpboot.smp.client.SMPClient is one. (Typed by this
    protocol, not by SMPClient, so the client imports this module and not the reverse.)"""

    @property
    def transport(self) -> Transport: ...

    @property
    def timeout(self) -> float: ...

    @property
    def stats(self) -> ClientStats: ...

    async def params_or_default(self, timeout: float | None = None) -> McuMgrParams: ...

    async def send_request(self, group: int, command: int, op: Op, payload: dict[str, Any]) -> PendingReply: ...

    def forget(self, pending: PendingReply) -> None: ...

    def silent(self, waited: float, where: str = "") -> DeviceSilent: ...


@dataclass(frozen=True)
class UploadResult:
    size: int
    resumed_from: int  # the offset the device's open session was at (0: a fresh upload)
    match: bool | None  # the device's check of `sha` against what it received (None: not said)
    elapsed: float  # seconds, from the params request to the last reply
    sent: int  # data bytes put on the link, resends included
    requests: int
    resyncs: int
    timeouts: int
    chunk: int  # data bytes per (non-first) plain request
    window: int
    params: McuMgrParams
    wbits: int = 0  # the window bits of the compressed chunks the device offered (0: none)
    compressed: int = 0  # requests sent as compressed chunks, resends included
    image_sent: int = 0  # image bytes those requests and the plain ones carried, resends included

    @property
    def rate(self) -> float:
        """Bytes per second of what this call transferred."""
        return (self.size - self.resumed_from) / self.elapsed if self.elapsed > 0 else 0.0


def max_data(budget: int, fields: dict[str, Any]) -> int:
    """The largest n for which an upload request with `fields` plus n bytes of `data` is at
    most `budget` bytes, SMP header included (0 if not even an empty one fits)."""
    n = budget - HEADER_SIZE - len(cbor2.dumps({**fields, "data": b""}))
    while n > 0 and HEADER_SIZE + len(cbor2.dumps({**fields, "data": bytes(n)})) > budget:
        n -= 1
    return max(n, 0)


@dataclass
class _Chunk:
    off: int
    end: int
    pending: PendingReply
    sent_at: float
    request: _Request


@dataclass(frozen=True)
class _Request:
    """One upload request as sent (a re-send repeats it): a plain chunk (image group, upload)
    or a compressed one (mpboot group, command 7)."""

    group: int
    command: int
    fields: dict[str, Any]
    wire: int  # data bytes on the link


class _ResendTimer:
    """The resend timeout from the reply times of upload requests (RFC 6298's estimator:
    smoothed time + 4 x its variation), between `floor` and `ceiling`; doubled for each silent
    round in a row. `ceiling` until a first reply was timed. A reply names its request's
    sequence number, so every reply gives a sample, repeats' included (no Karn ambiguity)."""

    def __init__(self, ceiling: float, floor: float = RTO_MIN) -> None:
        self.ceiling = ceiling
        self.floor = floor
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.backoff = 0

    @property
    def rto(self) -> float:
        if self.srtt is None:
            return self.ceiling
        base = max(self.floor, self.srtt + 4 * self.rttvar)
        return min(self.ceiling, base * (1 << min(self.backoff, 16)))


def _rto_floor(window: int) -> float:
    return RTO_MIN if window > 1 else RTO_MIN_ONE_AT_A_TIME


async def upload(client: Requester, image: bytes, *, window: int | None = None,
                 chunk: int | None = None, progress: ProgressCallback | None = None,
                 sha: bool = True, ptlv: bytes | None = None, upgrade: bool = False,
                 timeout: float | None = None, final_timeout: float | None = None,
                 retries: int = 4, compress: bool | None = None, resuming: bool = False,
                 image_number: int = 0) -> UploadResult:
    """Upload `image` (the whole file) to image 0 and return once the device verified it.

    window: requests in flight (default: as many as the device's answer to the opening
    request says it takes, at most buf_count; 1 where it says nothing). chunk: cap on data bytes
    per request (default: as large as the device's buffer allows). progress(acked, total):
    called whenever the acknowledged offset changes. sha: send the file's SHA-256 (enables
    resume and the device's `match` check). ptlv: the image's protected TLV area bytes.
    upgrade: ask the device to refuse an image not newer than the running one. timeout:
    silence before re-sending (default: the client's). final_timeout: how long the device may
    take to verify the image and answer the last chunk, which is re-sent meanwhile (default
    max(timeout, 30 s)). retries: silent rounds of `timeout` tolerated in a row (and re-sends
    of the last chunk while waiting for its answer). compress: None (default) sends a chunk
    compressed wherever the device offers it (its parameters or its answer to the opening
    request say so) and the compressed chunk carries more of the image than a plain one;
    False never; True as None, but raises UsageError when the device does not offer it.
    image_number: the upload's `image` (0: the app's free slot; 2: stage 1's, on a device with
    stage-1 slots, docs/PROTOCOL.md "Stage 1"). resuming: the device likely
    holds a session of this image (a reconnect): the opening request goes alone even to a
    device that takes a window behind it (what followed would be for the wrong offsets).

    Raises ImageRefused (the device refused the image), VerificationFailed (it arrived whole
    and failed the device's check), UpdateRefused, DeviceSilent, ProtocolError,
    TransportError."""
    data = bytes(image)
    total = len(data)
    if total == 0:
        raise UsageError("nothing to upload: the image is empty")
    if window is not None and window < 1:
        raise UsageError(f"window {window}: at least 1 request must be in flight")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    t = client.timeout if timeout is None else timeout
    t_final = max(t, DEFAULT_FINAL_TIMEOUT) if final_timeout is None else final_timeout
    started = time.monotonic()

    params = await client.params_or_default(timeout=min(t, PARAMS_TIMEOUT))
    budget = client.transport.max_packet(params.buf_size)
    first_fields: dict[str, Any] = {"off": 0, "len": total}
    if sha:
        first_fields["sha"] = hashlib.sha256(data).digest()
    if ptlv:
        first_fields["ptlv"] = bytes(ptlv)
    if upgrade:
        first_fields["upgrade"] = True
    if image_number:
        first_fields["image"] = image_number
    if window is None and params.buf_count > 1:
        first_fields["pipeline"] = True  # ask how many requests the device takes in flight
    if compress is not False:
        first_fields["deflate"] = True  # ask whether later chunks may come compressed
    first_max = max_data(budget, first_fields)
    stream_max = max_data(budget, {"off": total})  # the largest offset has the longest encoding
    if chunk is not None:
        if chunk < 1:
            raise UsageError(f"chunk {chunk}: must be at least 1 byte")
        if chunk > stream_max:
            raise UsageError(f"chunk {chunk} does not fit the device's {params.buf_size}-byte buffer "
                             f"over {client.transport.name} (at most {stream_max})")
        stream_max, first_max = chunk, min(first_max, chunk)
    first_n = min(first_max, total)
    if first_n < total and first_n >= FIRST_ALIGN:
        # A bootloader may write only whole flash-write units of a chunk and answer that
        # offset (MCUboot's serial recovery does); the opening one it must take whole, or its
        # answer reads like a resumed session.
        first_n -= first_n % FIRST_ALIGN
    if first_n < min(total, IMAGE_HEADER_SIZE) or stream_max < 1:
        raise UsageError(f"the device's {params.buf_size}-byte buffer cannot carry the first upload "
                         f"request (its data must hold the {IMAGE_HEADER_SIZE}-byte image header)")
    # None: decided once the opening request is answered (a refused image costs no more)
    win: int | None = window if window is not None else None if params.buf_count > 1 else 1
    # A device that said in its parameters how many requests it takes in flight (mpboot) gets
    # them right behind the opening request: its answer (which may refuse the image, or
    # resume elsewhere) comes before theirs, and they cost nothing if it does. Others get the
    # opening alone: Zephyr's and MCUboot's UART transports lose what comes while one runs.
    eager = params.pipeline is not None and not resuming
    if params.pipeline is not None and win is None:
        win = min(params.pipeline or 1, params.buf_count)
    eager = eager and (win or 1) > 1
    timer = _ResendTimer(t, _rto_floor(win or 1))
    # Compressed chunks: the stream room of a request with the largest `off` and `ulen`.
    zroom = max_data(budget, {"off": total, "ulen": ZUPLOAD_MAX})
    if chunk is not None:
        zroom = min(zroom, chunk)
    packer: Packer | None = None
    wbits = 0

    def offered(zb: object) -> None:
        """Compress from now on if the device offers a window (its parameters or its answer
        to the opening request say)."""
        nonlocal packer, wbits
        if compress is not False and packer is None and isinstance(zb, int) and not isinstance(zb, bool) \
                and zb >= MIN_WBITS and zroom > 0:
            wbits = min(zb, MAX_WBITS)
            packer = Packer(data, wbits, zroom)

    offered(params.deflate)
    compressed = image_sent = 0

    align = 1  # chunk ends fall on multiples of this (learnt from a device that takes part of one)
    inflight: deque[_Chunk] = deque()
    acked = 0  # the offset the device last said it expects
    best = 0  # the furthest offset it ever acknowledged in this call
    next_off = 0  # where the next request starts
    opened = False  # an off-0 request was answered: a session is open
    opens = 0  # off-0 requests sent
    solo = not eager  # send one request and wait for its reply (opening, or after a silence)
    resumed_from = 0
    attempts = 0  # silent rounds in a row
    waited = 0.0
    reopens = stalls = bad_replies = 0
    sent = requests = resyncs = timeouts = 0
    undecodable: ProtocolError | None = None
    final_at: float | None = None  # when the last chunk became the only one in flight
    repeats = 0  # re-sends of it since

    def plain(off: int, end: int) -> _Request:
        fields = dict(first_fields) if off == 0 else {"off": off}
        fields["data"] = data[off:end]
        return _Request(Group.IMAGE, ImageCmd.UPLOAD, fields, end - off)

    def request_at(off: int, n: int) -> _Request:
        """The request for the chunk at `off` (n: the image bytes a plain one carries)."""
        if packer is not None and off > 0:
            z = packer.chunk(off)
            if z is not None and z.end - off > n:
                return _Request(Group.MPBOOT, MpbootCmd.ZUPLOAD,
                                {"off": off, "ulen": z.end - off, "data": z.data}, len(z.data))
        return plain(off, off + n)

    async def send(req: _Request, off: int, end: int) -> None:
        nonlocal sent, requests, compressed, image_sent
        pending = await client.send_request(req.group, req.command, Op.WRITE, req.fields)
        inflight.append(_Chunk(off, end, pending, time.monotonic(), req))
        sent += req.wire
        image_sent += end - off
        requests += 1
        compressed += req.group == Group.MPBOOT

    def drop_all() -> None:
        for c in inflight:
            client.forget(c.pending)
        inflight.clear()

    try:
        while True:
            limit = 1 if solo or win is None else win
            while len(inflight) < limit and next_off < total:
                if next_off == 0:
                    if inflight:
                        break  # off 0 goes first
                    n = first_n
                    solo = not eager
                    opens += 1
                else:
                    n = min(stream_max, total - next_off)
                    end = (next_off + n) // align * align
                    if next_off + n < total and end > next_off:
                        n = end - next_off
                req = request_at(next_off, n) if next_off else plain(0, n)
                end = next_off + (req.fields["ulen"] if req.group == Group.MPBOOT else n)
                await send(req, next_off, end)
                if end == total:
                    final_at, repeats = None, 0
                next_off = end
                if solo:
                    break
            if not inflight:  # the last reply was undecodable: ask again where the device is
                next_off, solo = (acked if opened else 0), True
                continue

            head = inflight[0]
            # Only the last chunk in flight: the device may be verifying the image (it gets up
            # to t_final from about now), or the chunk or its reply was lost. Re-sending it is
            # safe: a device answers a repeated last chunk (and, with `sha`, a repeated first
            # request) with where it is, without writing again (docs/PROTOCOL.md, "Upload").
            repeatable = head.end == total and (sha or head.off != 0)
            rto = timer.rto
            if repeatable:
                now = time.monotonic()
                if final_at is None:
                    final_at = now
                left = final_at + t_final - now
                wait = max(0.0, min(rto, left) if repeats < retries else left)
            elif head.end == total:
                wait = t_final
            else:
                # The opening request may make the device erase the slot: it gets `timeout`.
                wait = t if head.off == 0 else rto
            done, _ = await asyncio.wait([c.pending.future for c in inflight], timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                timeouts += 1
                waited += wait
                timer.backoff += 1
                if (repeatable and repeats < retries and final_at is not None
                        and time.monotonic() < final_at + t_final):
                    # Re-send it, still waiting for every send of it: whichever answer comes
                    # first settles the upload (replies come in the order of the requests).
                    await send(head.request, head.off, head.end)
                    repeats += 1
                    continue
                # A whole `timeout` of silence is a try, and so is each round past the last
                # chunk's final_timeout; a shorter round (at the resend timeout) is a probe.
                if wait >= t or head.end == total:
                    attempts += 1
                # A device that never answered anything is absent (wrong port), not slow.
                allowed = retries if client.stats.replies else 0
                if attempts > allowed:
                    if undecodable is not None:
                        raise undecodable
                    raise client.silent(waited, f" ({attempts} tries, at offset {acked} of {total})")
                # Taken as lost: the rest of the window goes, and the oldest request goes again,
                # alone. Its first send stays awaited: a slow device's late answer settles it.
                oldest = inflight.popleft() if opened and inflight[0].off == acked else None
                drop_all()
                if oldest is not None:
                    inflight.append(oldest)
                    await send(oldest.request, oldest.off, oldest.end)
                    next_off, solo = oldest.end, True
                else:
                    next_off, solo = (acked if opened else 0), True
                continue
            attempts = 0
            waited = 0.0

            # Replies come in the order the device took the requests: the first answered chunk
            # also settles those before it (their requests or replies were lost).
            index = next(i for i, c in enumerate(inflight) if c.pending.future.done())
            for _ in range(index):
                client.forget(inflight.popleft().pending)
            c = inflight.popleft()
            timer.sample(time.monotonic() - c.sent_at)  # (unambiguous: replies carry its seq)
            try:
                _, rsp = c.pending.future.result()
            except ProtocolError as err:
                # Treated as lost (what follows tells where the device is), within bounds.
                undecodable = err
                bad_replies += 1
                if bad_replies > MAX_BAD_REPLIES:
                    raise
                continue
            undecodable, bad_replies = None, 0
            refusal = error_from_response(rsp, "image upload")
            if refusal is not None:
                if (isinstance(refusal, UpdateRefused) and refusal.code is UpdateErrorCode.STATE
                        and (opened or c.off != 0) and reopens < MAX_REOPENS):
                    # The device lost the session (it reset), or never saw the opening (lost,
                    # or overtaken by the window sent behind it): open it again, alone; with
                    # `sha` it resumes from its last checkpoint.
                    reopens += 1
                    drop_all()
                    next_off, opened, solo = 0, False, True
                    continue
                # A refusal of the last chunk comes from verifying what was written; one of the
                # first request (even when it holds the whole image) refuses the image as offered.
                if (isinstance(refusal, ImageRefused) and c.end == total and c.off != 0
                        and not isinstance(refusal, VerificationFailed)):
                    raise refusal.after_upload()
                raise refusal
            off = rsp.get("off")
            if not isinstance(off, int) or isinstance(off, bool) or not 0 <= off <= total:
                raise ProtocolError(f"image upload reply has a bad 'off' {off!r} (image is {total} bytes)")
            if c.off == 0:
                opened = True
                if win is None:
                    # An mpboot device names the requests it takes in flight; Zephyr's and
                    # MCUboot's ignore the question: one at a time.
                    pipe = rsp.get("pipeline")
                    ok = isinstance(pipe, int) and not isinstance(pipe, bool) and pipe >= 1
                    win = min(pipe, params.buf_count) if ok else 1
                    timer.floor = _rto_floor(win)
                # An mpboot device with MicroPython's deflate names its window; others
                # ignore the question.
                offered(rsp.get("deflate"))
                if compress and packer is None:
                    raise UsageError("the device does not take compressed uploads (it offers no "
                                     "'deflate' window); leave compression to the default")
                if opens == 1 and off != c.end:
                    resumed_from = off
            solo = False
            if off == c.end:
                acked = off
            else:  # the device expects `off`: what is in flight was sent for another offset
                resyncs += c.off != 0  # (an answer to off 0 elsewhere is a resume, not a resync)
                if 0 < c.off < off < c.end:
                    # It took the chunk up to a flash-write unit boundary (MCUboot's serial
                    # recovery): from now on chunks end on such a boundary. The largest power
                    # of two dividing what it took is a multiple of its unit.
                    took = off - c.off
                    align = max(align, min(MAX_ALIGN, took & -took))
                drop_all()
                acked = next_off = off
                if off == 0:
                    opened = False
                if off <= best:
                    stalls += 1
                    if stalls > MAX_STALLS:
                        raise ProtocolError(f"the upload makes no progress: the device keeps asking "
                                            f"for offset {off} of {total}")
            if acked > best:
                best, stalls = acked, 0
            if progress is not None:
                progress(acked, total)
            if acked == total:
                match = rsp.get("match")
                match = match if isinstance(match, bool) else None
                if sha and match is False:
                    raise VerificationFailed("image verification on the device failed: the SHA-256 of "
                                             "what it received does not match the file (match false)")
                return UploadResult(size=total, resumed_from=resumed_from, match=match,
                                    elapsed=time.monotonic() - started, sent=sent, requests=requests,
                                    resyncs=resyncs, timeouts=timeouts, chunk=stream_max, window=win or 1,
                                    params=params, wbits=wbits, compressed=compressed,
                                    image_sent=image_sent)
    finally:
        drop_all()
