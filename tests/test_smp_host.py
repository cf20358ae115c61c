"""The host SMP client, the serial transport and the flashing CLI.

1. Codecs against the reference implementations: our console and raw (COBS) framings encode
   byte-identically to the smp package / smpclient's Cobs, and each side decodes the other's
   frames, over random sizes; corrupt frames are dropped and the next one still decodes.
2. The client against a scripted, adversarial device on a real pty: a CPython thread on the
   master side decodes requests with the *reference* codecs (smp.packet / smpclient Cobs),
   models Zephyr img_mgmt upload semantics, and misbehaves on purpose: late replies with old
   sequence numbers, duplicates, lost requests forcing a resync, an unexpected `off`,
   silence forcing a timeout and a re-send, error replies with `rsn`. The tests check what
   the client sent (offsets, window, sizes, what went alone) and which typed error it raised.
3. CLI error contract: missing/busy port, silent device: one line on stderr, exit code, no
   traceback; and `mpboot flash`/`state`/`confirm` against the scripted device.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import os
import random
import select
import struct
import subprocess
import sys
import threading
import time
import tty
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner
from mpboot.cli import cli
from mpboot.errors import (
    CompressedChunkRefused,
    DeviceSilent,
    ImageErrorCode,
    PortError,
    ProtocolError,
    TransportError,
    UpdateErrorCode,
    UsageError,
)
from mpboot.flashing import Mark, flash, prepare
from mpboot.image import ImageVersion, SignOptions, TlvType, build_image, parse_image
from mpboot.keys import load_signing_key
from mpboot.sim import Run, install_result
from mpboot.smp import (
    ClientStats,
    CommandNotSupported,
    Group,
    ImageCmd,
    ImageRefused,
    MgmtErrorCode,
    Op,
    OsCmd,
    SMPClient,
    SMPError,
    UpdateRefused,
    UploadResult,
    VerificationFailed,
    decode_packet,
    encode_packet,
    error_from_response,
    max_data,
)
from mpboot.transport import Transport
from mpboot.smp.header import MpbootCmd
from mpboot.smp.upload import PARAMS_TIMEOUT, RTO_MIN, RTO_MIN_ONE_AT_A_TIME
from mpboot.smp.zchunk import ZUPLOAD_MAX
from mpboot.transport.framing import (
    CONSOLE_LINE_MAX,
    ConsoleCodec,
    RawCodec,
    cobs_decode,
    cobs_encode,
    crc16_xmodem,
)
from mpboot.transport.serial import SerialTransport
from smp import packet as smppacket
from smp.header import Header as SmpHeader
from smp.image_management import ImageUploadWriteRequest
from smpclient.transport.serial.framing.cobs import Cobs

KEY = Path(__file__).resolve().parent / "keys" / "TEST-ONLY-rsa2048.pem"

# --------------------------------------------------------------------------- codecs


def _ref_console_encode(packet: bytes) -> bytes:
    return b"".join(smppacket.encode(packet, line_length=128))


def _ref_console_decode(wire: bytes) -> bytes:
    decoder = smppacket.decode()
    next(decoder)
    for line in wire.splitlines(keepends=True):
        try:
            decoder.send(line)
        except StopIteration as done:
            return bytes(done.value)
    raise AssertionError("reference decoder wants more lines")


def _ref_raw_encode(packet: bytes) -> bytes:
    return b"".join(Cobs().encode(packet))


def _sizes(rng: random.Random) -> list[int]:
    edge = [0, 1, 2, 3, 91, 92, 93, 94, 252, 253, 254, 255, 256, 508, 509, 510, 2044, 2048]
    return edge + [rng.randrange(0, 4096) for _ in range(120)]


def _payload(rng: random.Random, n: int) -> bytes:
    kind = rng.randrange(3)
    if kind == 0:
        return rng.randbytes(n)
    if kind == 1:
        return bytes(n)  # all zeros: every COBS block is a single byte
    return bytes(rng.choice((0, 0xFF, 1)) for _ in range(n))


def test_crc16_is_xmodem() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3  # the CRC-16/XMODEM check value
    rng = random.Random(1)
    for n in (0, 1, 17, 1000):
        data = rng.randbytes(n)
        assert crc16_xmodem(data) == smppacket.crc16_func(data)


def test_console_codec_matches_smp_package() -> None:
    rng = random.Random(2)
    for n in _sizes(rng):
        packet = _payload(rng, n)
        ours = ConsoleCodec().encode(packet)
        assert ours == _ref_console_encode(packet)  # byte-identical, 127-byte lines
        assert all(len(line) <= CONSOLE_LINE_MAX for line in ours.splitlines(keepends=True))
        if n:
            assert _ref_console_decode(ours) == packet
        # their encoding, fed to our decoder in random pieces
        wire = _ref_console_encode(packet)
        dec, got = ConsoleCodec(), []
        pos = 0
        while pos < len(wire):
            step = rng.randrange(1, 200)
            got += dec.feed(wire[pos : pos + step])
            pos += step
        assert got == [packet]


def test_raw_codec_matches_smpclient_cobs() -> None:
    rng = random.Random(3)
    for n in _sizes(rng):
        packet = _payload(rng, n)
        ours = RawCodec().encode(packet)
        assert ours == _ref_raw_encode(packet)
        assert ours.count(0) == 1 and ours.endswith(b"\x00")
        theirs = Cobs()
        theirs.feed(ours)
        assert theirs.take() == (packet or None)  # smpclient drops an empty message
        dec, got = RawCodec(), []
        wire = _ref_raw_encode(packet)
        for i in range(0, len(wire), 7):
            got += dec.feed(wire[i : i + 7])
        assert got == ([packet] if packet else [])
    for data in (b"", b"\x00", b"\x11\x00\x22", bytes(range(1, 255)), bytes(range(256)) * 3):
        assert cobs_decode(cobs_encode(data)) == data


@pytest.mark.parametrize("framing", ["console", "raw"])
def test_corrupt_frames_are_dropped_and_the_stream_resyncs(framing: str) -> None:
    rng = random.Random(4)
    codec_cls = ConsoleCodec if framing == "console" else RawCodec
    for _ in range(200):
        good1, bad, good2 = (rng.randbytes(rng.randrange(9, 700)) for _ in range(3))
        wire_bad = bytearray(codec_cls().encode(bad))
        # flip one byte that is not a frame delimiter (a '\n' or 00 would split it instead)
        while True:
            i = rng.randrange(len(wire_bad))
            if wire_bad[i] not in (0x00, 0x0A) and (framing == "raw" or i % 127 > 1):
                break
        wire_bad[i] ^= 1 << rng.randrange(7)
        if wire_bad[i] in (0x00, 0x0A):
            continue
        dec = codec_cls()
        out = dec.feed(codec_cls().encode(good1) + bytes(wire_bad) + codec_cls().encode(good2))
        assert out == [good1, good2] or (out == [good1, bad, good2] and bytes(wire_bad) == codec_cls().encode(bad))
    # noise, console text and truncated frames between good frames
    dec = codec_cls()
    p = rng.randbytes(300)
    junk = b"boot: hello\r\n" if framing == "console" else b"\x05\x01\x02\x00"
    assert dec.feed(junk + codec_cls().encode(p)[:-5] + b"\n\x00" + codec_cls().encode(p)) == [p]


def test_header_and_request_decode_with_the_smp_package() -> None:
    data = bytes(range(256)) * 2
    pkt = encode_packet(Op.WRITE, Group.IMAGE, ImageCmd.UPLOAD, 0x17,
                        {"off": 0, "len": 4096, "sha": b"\x01" * 32, "data": data})
    h = SmpHeader.loads(pkt[:8])
    assert (h.op, h.version, h.length, h.group_id, h.sequence, h.command_id) == (2, 0, len(pkt) - 8, 1, 0x17, 1)
    req = ImageUploadWriteRequest.loads(pkt)
    assert (req.off, req.len, req.sha, req.data) == (0, 4096, b"\x01" * 32, data)
    header, payload = decode_packet(pkt)
    assert header.seq == 0x17 and payload["data"] == data
    with pytest.raises(ProtocolError):
        decode_packet(pkt[:-1])  # length field disagrees


def test_max_data_fills_the_budget_exactly() -> None:
    for budget in range(60, 3000, 7):
        for fields in ({"off": 123456}, {"off": 0, "len": 99999, "sha": bytes(32), "ptlv": bytes(44)}):
            n = max_data(budget, fields)
            size = len(encode_packet(Op.WRITE, 1, 1, 0, {**fields, "data": bytes(n)}))
            assert size <= budget or n == 0
            assert len(encode_packet(Op.WRITE, 1, 1, 0, {**fields, "data": bytes(n + 1)})) > budget


def test_error_mapping() -> None:
    err = error_from_response({"rc": 3, "rsn": "image:16"}, "image upload")
    assert isinstance(err, ImageRefused) and err.code is ImageErrorCode.VENDOR_MISMATCH
    assert str(err) == ("device refused the image: image is for another vendor (vendor id) "
                        "(image error 16, SMP rc 3 EINVAL)")
    err = error_from_response({"rc": 10, "rsn": "update:1"}, "image upload")
    assert isinstance(err, UpdateRefused) and err.code is UpdateErrorCode.BUSY
    assert str(err).startswith("device refused the update: the device runs an unconfirmed test image")
    assert str(err).endswith("(update error 1, SMP rc 10 EBUSY)")
    err = error_from_response({"rc": 10, "rsn": "update:1"}, "image erase")  # busy means in use, for an erase
    assert isinstance(err, UpdateRefused) and err.code is UpdateErrorCode.BUSY
    assert str(err) == ("device refused the erase: the slot is running, or holds the image a test boot reverts to "
                        "(update error 1, SMP rc 10 EBUSY)")
    err = error_from_response({"rc": 8}, "OS info")
    assert isinstance(err, CommandNotSupported) and str(err) == "OS info failed: SMP rc 8 ENOTSUP (command not supported)"
    err = error_from_response({"err": {"group": 1, "rc": 24}}, "image upload")
    assert isinstance(err, ImageRefused) and err.code is None and "24 INVALID_HASH" in str(err)
    err = error_from_response({"err": {"group": 1, "rc": 8}}, "image state write")
    assert type(err) is SMPError and str(err) == "image state write failed: image group error 8 HASH_NOT_FOUND"
    # The slot in use (v1 update:1): one type, worded for the request it refused.
    err = error_from_response({"err": {"group": 1, "rc": 9}}, "image upload")
    assert isinstance(err, UpdateRefused) and err.code is None
    assert str(err) == "device refused the update: image group error 9 NO_FREE_SLOT"
    err = error_from_response({"err": {"group": 1, "rc": 9}}, "image erase")
    assert isinstance(err, UpdateRefused) and str(err) == "device refused the erase: image group error 9 NO_FREE_SLOT"
    err = error_from_response({"err": {"group": 1, "rc": 32}}, "image state write")
    assert type(err) is SMPError and "32 IMAGE_CONFIRMATION_DENIED" in str(err)
    assert error_from_response({"rc": 0, "off": 5}, "x") is None
    assert error_from_response({"off": 5}, "x") is None
    assert error_from_response({"rc": 5, "rsn": "nope"}, "x") is not None
    assert error_from_response({"rc": 3, "rsn": "image:99"}, "x").code is None  # type: ignore[union-attr]
    for e in (err,):
        assert e is not None and e.exit_code == 1


@pytest.mark.parametrize("kind, number", [*(("image", c.value) for c in ImageErrorCode),
                                          *(("update", c.value) for c in UpdateErrorCode),
                                          ("image", 99), ("update", 99)])
def test_a_refusal_maps_alike_from_smp_and_from_the_simulator(kind: str, number: int) -> None:
    """The device's reason N arrives as `rsn` "image:N" over SMP and as a "REFUSED image N"
    line from the simulator's install: one type and one code for both (None when unknown);
    only the SMP one carries wire details."""
    over_smp = error_from_response({"rc": 3, "rsn": f"{kind}:{number}"}, "image upload")
    with pytest.raises(SMPError) as caught:
        install_result(Run(0, f"REFUSED {kind} {number}\n", ""))
    from_sim = caught.value
    assert type(from_sim) is type(over_smp) is (ImageRefused if kind == "image" else UpdateRefused)
    assert isinstance(over_smp, (ImageRefused, UpdateRefused)) and isinstance(from_sim, (ImageRefused, UpdateRefused))
    assert from_sim.code == over_smp.code and (from_sim.code is None) == (number == 99)
    # the same words, less how they came
    assert str(over_smp).replace(", SMP rc 3 EINVAL)", ")").replace(" (SMP rc 3 EINVAL)", "") == str(from_sim)
    assert (from_sim.rc, from_sim.rsn, over_smp.rc, over_smp.rsn) == (None, None, MgmtErrorCode.EINVAL, f"{kind}:{number}")
    assert from_sim.exit_code == over_smp.exit_code == 1


# --------------------------------------------------------------------------- scripted device


@dataclass
class Req:
    op: int
    version: int
    group: int
    seq: int
    cmd: int
    payload: dict[str, Any]
    size: int  # SMP packet bytes
    t: float  # arrival (monotonic)
    replied_at: float | None = None


class Peer:
    """A device on the master side of a pty, decoding with the reference codecs. `respond`
    runs in the peer thread for each request and calls reply()/write()."""

    def __init__(self, framing: str, respond: Callable[[Peer, Req], None]) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.port = os.ttyname(self.slave)
        self.framing = framing
        self.respond = respond
        self.requests: list[Req] = []
        self.errors: list[BaseException] = []
        self._due: list[tuple[float, int, bytes, Req | None]] = []
        self._n = itertools.count()
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._cobs = Cobs()
        self._lines = bytearray()
        self._console: Any = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # reply helpers (peer thread)
    def reply(self, req: Req, payload: dict[str, Any], *, delay: float = 0.0, seq: int | None = None,
              group: int | None = None) -> None:
        body = cbor2.dumps(payload)
        b0 = ((req.op + 1) & 7) | (req.version << 3)
        hdr = struct.pack(">BBHHBB", b0, 0, len(body), req.group if group is None else group,
                          req.seq if seq is None else seq, req.cmd)
        self.write(hdr + body, delay, req if seq is None else None)

    def write(self, packet: bytes, delay: float = 0.0, req: Req | None = None) -> None:
        frame = _ref_console_encode(packet) if self.framing == "console" else _ref_raw_encode(packet)
        with self._lock:
            heapq.heappush(self._due, (time.monotonic() + delay, next(self._n), frame, req))

    def close_master(self) -> None:
        """Hang up: the client's next read fails (as an unplugged USB device)."""
        self._closed = True
        os.write(self._stop_w, b"x")

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(5)
        for fd in (self.slave, self._stop_r, self._stop_w) + (() if self._closed else (self.master,)):
            os.close(fd)
        if self.errors:
            raise self.errors[0]

    def uploads(self) -> list[Req]:
        """Upload requests, plain and compressed."""
        return [r for r in self.requests if (r.group, r.cmd) in ((Group.IMAGE, ImageCmd.UPLOAD),
                                                                  (Group.MPBOOT, MpbootCmd.ZUPLOAD))]

    def _decode(self, data: bytes) -> Iterator[bytes]:
        if self.framing == "raw":
            self._cobs.feed(data)
            while (m := self._cobs.take()) is not None:
                yield m
            return
        self._lines += data
        while (nl := self._lines.find(b"\n")) >= 0:
            line = bytes(self._lines[: nl + 1])
            del self._lines[: nl + 1]
            if line.startswith(b"\x06\x09"):
                self._console = smppacket.decode()
                next(self._console)
            if self._console is None:
                continue
            try:
                self._console.send(line)
            except StopIteration as done:
                self._console = None
                yield bytes(done.value)
            except ValueError:  # a corrupt frame (bad base64): dropped, as a device does
                self._console = None

    def _run(self) -> None:
        while True:
            with self._lock:
                wait = max(0.0, self._due[0][0] - time.monotonic()) if self._due else None
            r, _, _ = select.select([self.master, self._stop_r], [], [], wait)
            if self._stop_r in r:
                if self._closed:
                    os.close(self.master)
                return
            if self.master in r:
                try:
                    data = os.read(self.master, 65536)
                except OSError:
                    return
                for packet in self._decode(data):
                    b0, _, length, group, seq, cmd = struct.unpack_from(">BBHHBB", packet)
                    assert length == len(packet) - 8
                    req = Req(b0 & 7, (b0 >> 3) & 3, group, seq, cmd, cbor2.loads(packet[8:]), len(packet),
                              time.monotonic())
                    self.requests.append(req)
                    try:
                        self.respond(self, req)
                    except BaseException as err:  # noqa: BLE001  (surfaced by stop())
                        self.errors.append(err)
            now = time.monotonic()
            while True:
                with self._lock:
                    if not self._due or self._due[0][0] > now:
                        break
                    _, _, frame, owner = heapq.heappop(self._due)
                os.write(self.master, frame)
                if owner is not None and owner.replied_at is None:
                    owner.replied_at = time.monotonic()


@dataclass
class Session:
    length: int
    sha: bytes | None
    data: bytearray
    off: int = 0


@dataclass
class FakeDevice:
    """Zephyr img_mgmt upload semantics (docs/PROTOCOL.md, "Upload"), processed strictly in
    order with an optional per-request service time, plus a minimal two-slot state."""

    buf_size: int = 512
    buf_count: int = 4
    service: float = 0.0  # seconds per request, serialised like a real device
    params_rc: int | None = None  # answer params with this rc (8: not supported)
    params_silent: bool = False
    mpboot: bool = True  # answers `pipeline` in the opening reply: takes buf_count requests in flight
    write_unit: int = 1  # writes whole units of a chunk but the last, as MCUboot's serial recovery
    deflate: int = 0  # offers compressed chunks with this window (group 64 command 7), as mpboot does
    params_pipeline: bool = False  # answers `pipeline` in its parameters when asked, as mpboot does
    session: Session | None = None
    received: bytes | None = None  # the last complete upload
    slots: list[dict[str, Any]] = field(default_factory=lambda: [
        {"image": 0, "slot": 0, "version": "1.0.0", "hash": b"\xaa" * 32, "bootable": True,
         "pending": False, "confirmed": True, "active": True, "permanent": False}])
    resets: int = 0
    firmware: bytes | None = None  # an upload with `image` 4 (esp32's firmware): its hash; not in the list
    firmware_mark: str = ""  # "test" or "permanent" once a state write marked it
    _image: int = 0
    _busy_until: float = 0.0

    def delay(self) -> float:
        now = time.monotonic()
        self._busy_until = max(now, self._busy_until) + self.service
        return self._busy_until - now

    def __call__(self, peer: Peer, req: Req) -> None:
        rsp = self.handle(req)
        if rsp is not None:
            peer.reply(req, rsp, delay=self.delay())

    def handle(self, req: Req) -> dict[str, Any] | None:
        key = (req.group, req.cmd)
        p = req.payload
        if key == (Group.OS, OsCmd.MCUMGR_PARAMS):
            if self.params_silent:
                return None
            if self.params_rc is not None:
                return {"rc": self.params_rc}
            rsp = {"buf_size": self.buf_size, "buf_count": self.buf_count}
            if self.params_pipeline and p.get("pipeline") is True:
                rsp["pipeline"] = self.buf_count
            if self.params_pipeline and self.deflate and p.get("deflate") is True:
                rsp["deflate"] = self.deflate
            return rsp
        if key == (Group.MPBOOT, MpbootCmd.DEVICE) and self.mpboot:
            return {"cid": None, "ctr": 0, "uid": b"\x01" * 8, "vid": None, "serial": None, "no-downgrade": False}
        if key == (Group.OS, OsCmd.ECHO):
            return {"r": p["d"]}
        if key == (Group.OS, OsCmd.RESET):
            self.resets += 1
            return {}
        if key == (Group.OS, OsCmd.OS_INFO):
            return {"output": f"fake {p.get('format', 's')}"}
        if key == (Group.OS, OsCmd.BOOTLOADER_INFO):
            return {"mode": 5, "no-downgrade": False} if p.get("query") == "mode" else {"bootloader": "mpboot"}
        if key == (Group.IMAGE, ImageCmd.STATE):
            if req.op == Op.WRITE:
                return self.state_write(p)
            return {"images": self.slots}
        if key == (Group.IMAGE, ImageCmd.ERASE):
            self.slots = [s for s in self.slots if s["slot"] != p.get("slot", 1)]
            return {}
        if key == (Group.IMAGE, ImageCmd.UPLOAD):
            return self.upload(p)
        if key == (Group.MPBOOT, MpbootCmd.ZUPLOAD) and self.deflate:
            return self.zupload(p)
        return {"rc": MgmtErrorCode.ENOTSUP}

    def upload(self, p: dict[str, Any]) -> dict[str, Any]:
        rsp = self._upload(p)
        if p["off"] == 0 and p.get("pipeline") is True and self.mpboot and "off" in rsp:
            rsp["pipeline"] = self.buf_count
        if p["off"] == 0 and p.get("deflate") is True and self.deflate and "off" in rsp:
            rsp["deflate"] = self.deflate
        return rsp

    def zupload(self, p: dict[str, Any]) -> dict[str, Any]:
        """A compressed chunk (firmware/mpboot/smp/zupload.py): one whole raw deflate stream
        of exactly `ulen` image bytes, in the offered window."""
        off, ulen = p["off"], p["ulen"]
        if off < 1 or not 0 < ulen <= ZUPLOAD_MAX:
            return {"rc": MgmtErrorCode.EINVAL, "rsn": "zupload:25"}
        s = self.session
        if s is not None and off == s.off:
            d = zlib.decompressobj(-self.deflate)
            data = d.decompress(p["data"], ulen + 1)
            if len(data) != ulen or not d.eof or d.unused_data or d.unconsumed_tail:
                self.session = None
                return {"rc": MgmtErrorCode.EINVAL, "rsn": "zupload:25"}
        else:
            data = bytes(ulen)  # not written: answered with where the device is, as a plain chunk
        return self._upload({"off": off, "data": data})

    def _upload(self, p: dict[str, Any]) -> dict[str, Any]:
        off, data = p["off"], p["data"]
        if off == 0 and "len" in p:
            s = self.session
            if s is not None and p.get("sha") is not None and p.get("sha") == s.sha and p["len"] == s.length:
                return {"off": s.off}
            self.session = Session(p["len"], p.get("sha"), bytearray(p["len"]))
            self._image = p.get("image", 0)
        s = self.session
        if s is None:
            return {"rc": MgmtErrorCode.EBADSTATE, "rsn": "update:2"}
        if off != s.off:
            return {"off": s.off}
        if s.off + len(data) > s.length:
            return {"rc": MgmtErrorCode.EINVAL, "rsn": "update:3"}
        if off + len(data) < s.length and len(data) >= self.write_unit:
            data = data[: len(data) - len(data) % self.write_unit]
        s.data[off : off + len(data)] = data
        s.off += len(data)
        if s.off < s.length:
            return {"off": s.off}
        self.session = None
        self.received = bytes(s.data)
        rsp: dict[str, Any] = {"off": s.off}
        if s.sha is not None:
            rsp["match"] = hashlib.sha256(s.data).digest() == s.sha
        if self.received[:4] == b"\x3d\xb8\xf3\x96":  # an MCUboot image: it lands in slot 1
            img = parse_image(self.received)
            h = next(t.value for t in img.unprotected if t.type == TlvType.SHA256)
            if self._image == 4:
                self.firmware = h
                return rsp
            self.slots = [x for x in self.slots if x["slot"] != 1] + [
                {"image": 0, "slot": 1, "version": str(img.header.version).removesuffix("+0"), "hash": h,
                 "bootable": True, "pending": False, "confirmed": False, "active": False, "permanent": False}]
        return rsp

    def state_write(self, p: dict[str, Any]) -> dict[str, Any]:
        h, confirm = p.get("hash"), p.get("confirm", False)
        if h is None:
            return {"images": self.slots}
        if h is not None and h == self.firmware:
            self.firmware_mark = "permanent" if confirm else "test"
            return {"images": self.slots}
        for s in self.slots:
            if s["hash"] == h:
                if s["active"]:
                    return {"rc": MgmtErrorCode.EINVAL} if not confirm else {"images": self.slots}
                s["pending"] = True
                s["permanent"] = s["confirmed"] = bool(confirm)
                return {"images": self.slots}
        return {"rc": MgmtErrorCode.ENOENT}


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(respond: Callable[[Peer, Req], None], framing: str = "raw") -> Peer:
        peer = Peer(framing, respond)
        made.append(peer)
        return peer

    yield make
    for p in made:
        p.stop()


def run_client(peer: Peer, action: Callable[[SMPClient], Awaitable[Any]], *, timeout: float = 2.0) -> Any:
    async def main() -> Any:
        async with SMPClient(SerialTransport(peer.port, framing=peer.framing), timeout=timeout) as client:
            return await action(client)

    return asyncio.run(main())


def upload(peer: Peer, image: bytes, *, timeout: float = 2.0, **kw: Any) -> Any:
    acks: list[tuple[int, int]] = []

    async def action(c: SMPClient) -> Any:
        result = await c.upload(image, progress=lambda a, t: acks.append((a, t)), **kw)
        return result, c.stats

    result, stats = run_client(peer, action, timeout=timeout)
    return Outcome(result, acks, stats)


@dataclass
class Outcome:
    """An UploadResult plus the progress calls and the client's reply counters."""

    result: UploadResult
    acks: list[tuple[int, int]]
    stats: ClientStats

    def __getattr__(self, name: str) -> Any:
        return getattr(self.result, name)


def _image(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _assert_contiguous(reqs: list[Req]) -> None:
    """Each upload request starts where the one before ended: no resend, no gap."""
    end = 0
    for r in reqs:
        assert r.payload["off"] == end, [x.payload["off"] for x in reqs]
        end += len(r.payload["data"])


# --------------------------------------------------------------------------- client vs device


def _max_in_flight(ups: list[Req]) -> int:
    return max(sum(1 for r in ups if r.t <= x.t and (r.replied_at or 1e18) > x.t) for x in ups)


def test_a_device_that_is_not_mpboot_gets_one_request_at_a_time(peers: Callable[..., Peer]) -> None:
    """Zephyr's and MCUboot's UART transports report buf_count 4 but lose a request that
    arrives while one is processed: without --window, only a device that answers the opening
    request's `pipeline` question gets requests in flight (as many as it names, at most
    buf_count), and asking costs no round trip of its own."""
    dev = FakeDevice(buf_count=4, service=0.002, mpboot=False)
    peer = peers(dev)
    image = _image(20_000)
    result = upload(peer, image)
    assert dev.received == image and result.window == 1 and _max_in_flight(peer.uploads()) == 1
    assert peer.uploads()[0].payload["pipeline"] is True
    assert all(r.group == Group.IMAGE for r in peer.requests if r.group != Group.OS)  # nothing else asked
    # an mpboot device: as many as it names
    mp = FakeDevice(buf_count=4, service=0.002)
    peer_mp = peers(mp)
    result = upload(peer_mp, image)
    assert mp.received == image and result.window == 4 and _max_in_flight(peer_mp.uploads()) == 4
    # --window still sets it, and then nothing is asked
    dev2 = FakeDevice(buf_count=4, service=0.002, mpboot=False)
    peer2 = peers(dev2)
    result = upload(peer2, image, window=3)
    assert dev2.received == image and result.window == 3 and _max_in_flight(peer2.uploads()) == 3
    assert "pipeline" not in peer2.uploads()[0].payload


def test_a_lost_request_costs_the_resend_timeout_not_the_timeout(peers: Callable[..., Peer]) -> None:
    """One request at a time, a device loses a request only to line noise: the resend comes
    after RTO_MIN_ONE_AT_A_TIME (a needless resend would cost a whole request on the line),
    not after `timeout`. (A device that takes a window gets resends after the measured reply
    times, down to RTO_MIN: test_a_lost_last_reply_costs_one_timeout_not_the_final_timeout.)"""
    dev = FakeDevice(service=0.002, mpboot=False)
    image = _image(30_000)
    lost: list[Req] = []

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD and req.payload["off"] > 10_000 and not lost:
            lost.append(req)  # the line lost it
            return
        dev(peer, req)

    peer = peers(respond)
    t0 = time.monotonic()
    result = upload(peer, image, timeout=5.0)
    assert dev.received == image and lost and result.timeouts == 1 and result.window == 1
    assert time.monotonic() - t0 < 4.0
    again = [r for r in peer.uploads() if r.payload["off"] == lost[0].payload["off"]]
    assert len(again) == 2 and RTO_MIN_ONE_AT_A_TIME <= again[1].t - again[0].t < 2.5  # not 5 s


def test_chunks_end_on_the_write_unit_of_a_device_that_takes_part_of_one(peers: Callable[..., Peer]) -> None:
    """MCUboot's serial recovery writes whole flash-write units of a chunk but the last and
    answers that offset: the opening request is a multiple of 64 bytes (taken whole, so not
    read as a resumed session), and after the first partial take every chunk ends on a
    boundary of the unit learnt."""
    dev = FakeDevice(buf_size=509, service=0.001, mpboot=False, write_unit=8)
    peer = peers(dev)
    image = _image(30_001)
    result = upload(peer, image)
    assert dev.received == image and result.resumed_from == 0
    ups = peer.uploads()
    assert len(ups[0].payload["data"]) % 64 == 0
    assert result.chunk % 8  # (what the buffer holds is not a multiple of the unit)
    assert result.resyncs == 1  # the first partial take, and no other
    cut = next(i for i, r in enumerate(ups) if (r.payload["off"] + len(r.payload["data"])) % 8)
    ends = [r.payload["off"] + len(r.payload["data"]) for r in ups[cut + 2 : -1]]
    assert ends and all(e % 8 == 0 for e in ends)


@pytest.fixture
def unhurried_resend_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of reply matching and windows, not of the resend timer: a floor of 1 s on the
    resend timeout, so a loaded CI machine stalling this process past RTO_MIN (0.1 s) cannot
    turn into a resend (after which the harness's deliberately stale replies would answer a
    request still outstanding, and be taken as real)."""
    import mpboot.smp.upload as upload_module

    monkeypatch.setattr(upload_module, "RTO_MIN", 1.0)


@pytest.mark.parametrize("framing", ["raw", "console"])
def test_pipelined_upload_fills_packets_and_window(peers: Callable[..., Peer], unhurried_resend_timer: None,
                                                   framing: str) -> None:
    dev = FakeDevice(buf_size=512, buf_count=4, service=0.004)
    peer = peers(dev, framing)
    image = _image(40_000)
    ptlv = bytes.fromhex("0869") + bytes(2) + b"\x50\x00\x04\x00" + bytes(4)
    result = upload(peer, image, ptlv=ptlv)
    assert dev.received == image and result.match is True
    ups = peer.uploads()
    _assert_contiguous(ups)
    budget = 512 if framing == "raw" else 508
    assert all(r.size <= budget for r in ups)
    assert all(r.size >= budget - 2 for r in ups[1:-1])  # full chunks use the whole buffer
    first = ups[0].payload
    assert first["len"] == len(image) and first["sha"] == hashlib.sha256(image).digest()
    assert first["ptlv"] == ptlv
    assert all(set(r.payload) == {"off", "data"} for r in ups[1:])
    # the first went alone: the second arrived only after the first was answered
    assert ups[0].replied_at is not None and ups[1].t >= ups[0].replied_at
    # up to buf_count requests in flight, never more
    inflight = max(sum(1 for r in ups if r.t <= x.t and (r.replied_at or 1e18) > x.t) for x in ups)
    assert inflight == 4
    assert result.window == 4 and result.resyncs == 0 and result.timeouts == 0
    assert result.acks[-1] == (len(image), len(image))
    assert [a for a, _ in result.acks] == sorted(a for a, _ in result.acks)
    assert result.stats.ignored == 0


def test_a_device_that_names_its_pipeline_gets_the_window_behind_the_opening(
        peers: Callable[..., Peer], unhurried_resend_timer: None) -> None:
    """An mpboot device says in its parameters how many requests it takes in flight: the
    client sends the window right behind the opening request instead of waiting for its
    answer (the opening erases the first sector: the line would sit idle meanwhile)."""
    dev = FakeDevice(buf_size=512, buf_count=4, service=0.004, params_pipeline=True)
    peer = peers(dev)
    image = _image(20_000)
    result = upload(peer, image)
    assert dev.received == image and result.window == 4 and result.resyncs == 0
    ups = peer.uploads()
    _assert_contiguous(ups)
    assert ups[0].replied_at is not None and ups[1].t < ups[0].replied_at  # not alone
    assert sum(1 for r in ups[1:4] if r.t < ups[0].replied_at) == 3
    params = next(r for r in peer.requests if (r.group, r.cmd) == (Group.OS, OsCmd.MCUMGR_PARAMS))
    assert params.payload == {"pipeline": True, "deflate": True}


def test_a_refused_or_resumed_opening_with_the_window_behind_it(peers: Callable[..., Peer],
                                                                 unhurried_resend_timer: None) -> None:
    """Behind an opening the device refuses, the client raises the refusal (the requests
    behind it are answered or refused and ignored); behind one that resumes elsewhere, the
    stream moves to the offset the device named."""
    image = _image(20_000)

    def refusing(peer: Peer, req: Req) -> None:
        if (req.group, req.cmd) == (Group.IMAGE, ImageCmd.UPLOAD) and req.payload["off"] == 0:
            peer.reply(req, {"rc": MgmtErrorCode.EINVAL, "rsn": "image:16"})  # (replies in order)
            return
        dev(peer, req)

    dev = FakeDevice(buf_size=512, buf_count=4, service=0.002, params_pipeline=True)
    with pytest.raises(ImageRefused, match="another vendor"):
        upload(peers(refusing), image)
    dev = FakeDevice(buf_size=512, buf_count=4, service=0.002, params_pipeline=True)
    dev.session = Session(len(image), hashlib.sha256(image).digest(), bytearray(image[:8192]) + bytearray(11808),
                          8192)
    peer = peers(dev)
    result = upload(peer, image)
    assert dev.received == image and result.resumed_from == 8192
    offs = [r.payload["off"] for r in peer.uploads()]
    assert offs[0] == 0 and 8192 in offs and offs[offs.index(8192):] == sorted(offs[offs.index(8192):])


def test_a_lost_opening_with_the_window_behind_it_is_sent_again(peers: Callable[..., Peer],
                                                                 unhurried_resend_timer: None) -> None:
    """The opening request is lost (a corrupted frame, a dropped datagram) while the window
    follows it: the followers find no session open (update error 2). That means the opening
    was lost, not that the device lost a session it had: the client opens again, alone, and
    the upload completes (it raised "update steps out of order" before)."""
    image = _image(20_000)
    dev = FakeDevice(buf_size=512, buf_count=4, service=0.002, params_pipeline=True)
    lost = []

    def losing(peer: Peer, req: Req) -> None:
        if (req.group, req.cmd) == (Group.IMAGE, ImageCmd.UPLOAD) and req.payload["off"] == 0 and not lost:
            lost.append(req)  # the device never saw it
            return
        dev(peer, req)

    peer = peers(losing)
    result = upload(peer, image)
    assert lost and dev.received == image
    offs = [r.payload["off"] for r in peer.uploads()]
    assert offs.count(0) == 2 and result.window == 4


def test_window_option_limits_requests_in_flight(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.004)
    peer = peers(dev)
    upload(peer, _image(12_000), window=2)
    ups = peer.uploads()
    inflight = max(sum(1 for r in ups if r.t <= x.t and (r.replied_at or 1e18) > x.t) for x in ups)
    assert inflight == 2


def test_stale_duplicate_and_foreign_replies_are_ignored(peers: Callable[..., Peer], unhurried_resend_timer: None) -> None:
    dev = FakeDevice(service=0.002)
    answered: list[Req] = []

    def respond(peer: Peer, req: Req) -> None:
        rsp = dev.handle(req)
        d = dev.delay()
        if answered:
            old = answered[-1]
            peer.reply(req, {"off": 0}, delay=d, seq=old.seq)  # late reply, old sequence number
            peer.reply(req, {"off": 1}, delay=d, seq=(old.seq - 3) & 0xFF)
        peer.reply(req, {"off": 7}, delay=d, group=9)  # right seq, wrong group
        assert rsp is not None
        peer.reply(req, rsp, delay=d)
        peer.reply(req, {"off": 3}, delay=d + 0.0001, seq=req.seq)  # duplicate with junk
        answered.append(req)

    peer = peers(respond)
    image = _image(20_000)
    result = upload(peer, image)
    assert dev.received == image
    _assert_contiguous(peer.uploads())
    assert result.resyncs == 0 and result.timeouts == 0
    assert result.stats.ignored >= 3 * len(peer.requests)


def test_lost_request_makes_the_client_resync_from_the_device_offset(peers: Callable[..., Peer], unhurried_resend_timer: None) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(30_000)
    lost: list[int] = []

    def respond(peer: Peer, req: Req) -> None:
        p = req.payload
        if req.cmd == ImageCmd.UPLOAD and req.group == Group.IMAGE and p["off"] > 5000 and not lost:
            lost.append(p["off"])  # this frame never reaches the device: no write, no reply
            return
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image)
    assert dev.received == image
    offs = [r.payload["off"] for r in peer.uploads()]
    i = offs.index(lost[0])
    assert offs.count(lost[0]) == 2  # sent again after the resync
    j = offs.index(lost[0], i + 1)
    assert all(o > lost[0] for o in offs[i + 1 : j])  # the rest of that window
    assert offs[j:] == sorted(offs[j:])  # then straight on
    assert result.resyncs == 1 and result.timeouts == 0


def test_unexpected_offset_moves_the_stream(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(30_000)
    rewound: list[int] = []

    def respond(peer: Peer, req: Req) -> None:
        s = dev.session
        if req.cmd == ImageCmd.UPLOAD and s is not None and s.off > 20_000 and not rewound:
            s.off = 4096  # e.g. back to a checkpoint: the device now expects 4096
            rewound.append(req.payload["off"])
            peer.reply(req, {"off": 4096}, delay=dev.delay())
            return
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image)
    assert dev.received == image
    offs = [r.payload["off"] for r in peer.uploads()]
    k = offs.index(rewound[0])
    assert 4096 in offs[k + 1 :]
    after = offs[offs.index(4096, k + 1) :]
    assert after == sorted(after) and result.resyncs == 1
    assert (4096, len(image)) in result.acks  # progress went back with the device


def test_silence_makes_the_client_resend_from_the_last_acknowledged_offset(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(30_000)
    silent_from: list[float] = []
    silent_off: list[int] = []

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD and req.group == Group.IMAGE and req.payload["off"] > 8000:
            if not silent_from:
                silent_from.append(req.t)
                silent_off.append(dev.session.off if dev.session else -1)
            if req.t - silent_from[0] < 0.6:
                return  # deaf for 0.6 s: requests are lost
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image, timeout=0.25)
    assert dev.received == image
    assert result.timeouts >= 1
    ups = peer.uploads()
    # first request after the deaf period: a probe from what the device last acknowledged
    probe = next(r for r in ups if r.t - silent_from[0] >= 0.6)
    assert probe.payload["off"] == silent_off[0]
    later = [r for r in ups if r.t > probe.t]
    assert probe.replied_at is not None and later[0].t >= probe.replied_at  # it went alone


def test_slow_device_late_replies_after_a_timeout_do_not_derail(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(30_000)
    stalled: list[int] = []

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD and req.payload["off"] > 10_000 and not stalled:
            stalled.append(req.payload["off"])
            dev._busy_until = time.monotonic() + 0.5  # one slow flash erase, 2x the timeout
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image, timeout=0.25)
    assert dev.received == image and result.timeouts >= 1 and result.match is True
    assert result.stats.ignored >= 1  # the late replies to the abandoned requests


def test_silent_device_raises_device_silent(peers: Callable[..., Peer]) -> None:
    peer = peers(lambda p, r: None)
    t0 = time.monotonic()
    with pytest.raises(DeviceSilent) as exc:
        upload(peer, _image(5000), timeout=0.2)
    assert time.monotonic() - t0 < 2.0  # a device that never answered gets no retries
    assert str(exc.value).startswith(f"no SMP reply from {peer.port} in ")
    assert str(exc.value).endswith(" s (wrong port, baud or framing?)")
    assert exc.value.exit_code == 3
    with pytest.raises(DeviceSilent, match=r"in 0\.2 s \(wrong port"):
        run_client(peer, lambda c: c.state(), timeout=0.2)


def test_device_that_stops_answering_gets_bounded_retries(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice()

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD and req.payload["off"] >= 3000:
            return
        dev(peer, req)

    peer = peers(respond)
    with pytest.raises(DeviceSilent, match=r"device stopped answering: .* \(4 tries, at offset \d+ of 9000\)"):
        upload(peer, _image(9000), timeout=0.15, retries=3)
    ups = peer.uploads()
    acked = dev.session.off if dev.session else 0
    probes = [r for r in ups if r.payload["off"] == acked]
    # The original, one probe per retry, and before those the quick probes at the resend
    # timeout (below `timeout`, doubling: here 0.1 s, then capped at 0.15 s, a try).
    assert 1 + 3 < len(probes) <= 1 + 3 + 2


def _ends_image(req: Req, total: int) -> bool:
    p = req.payload
    return (req.group, req.cmd) == (Group.IMAGE, ImageCmd.UPLOAD) and p["off"] + len(p["data"]) == total


def test_a_lost_last_reply_costs_one_timeout_not_the_final_timeout(peers: Callable[..., Peer]) -> None:
    """The soak hang (tests/test_smp_faults.py, `timeout` 1 s): the line lost the reply to the
    last chunk (or the chunk), and the client waited final_timeout, 30 s, for it, then 30 s
    again for each re-send, while client, line and device sat idle. Now the last chunk goes
    again after the resend timeout, and the device, which remembers the upload it finished, answers
    the repeat at once (docs/PROTOCOL.md, "Upload")."""
    dev = FakeDevice(service=0.002)
    image = _image(9000)
    lost: list[Req] = []

    def respond(peer: Peer, req: Req) -> None:
        if _ends_image(req, len(image)) and dev.received is not None:
            peer.reply(req, {"off": len(image)}, delay=dev.delay())  # the last chunk again
            return
        rsp = dev.handle(req)
        assert rsp is not None
        if _ends_image(req, len(image)) and not lost:
            lost.append(req)  # verified and answered; the line lost the reply
            return
        peer.reply(req, rsp, delay=dev.delay())

    peer = peers(respond)
    t0 = time.monotonic()
    result = upload(peer, image, timeout=0.3)
    assert time.monotonic() - t0 < 3.0  # was 30 s (final_timeout)
    assert dev.received == image and lost and result.match is None  # (the repeat's answer)
    last = [r for r in peer.uploads() if _ends_image(r, len(image))]
    # re-sent after the resend timeout (from this fast device's reply times), before `timeout`
    assert len(last) == 2 and RTO_MIN <= last[1].t - last[0].t < 0.3
    assert result.timeouts == 1


def test_the_device_still_gets_final_timeout_to_verify(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(9000)
    verify = 1.2  # 4x the timeout

    def respond(peer: Peer, req: Req) -> None:
        if not _ends_image(req, len(image)):
            dev(peer, req)
        elif dev.received is None:
            rsp = dev.handle(req)
            assert rsp is not None
            dev._busy_until = max(time.monotonic(), dev._busy_until) + verify
            peer.reply(req, rsp, delay=dev._busy_until - time.monotonic())
        else:  # repeats wait their turn behind the verification, then are answered at once
            peer.reply(req, {"off": len(image)}, delay=dev.delay())

    peer = peers(respond)
    t0 = time.monotonic()
    result = upload(peer, image, timeout=0.3, retries=2)
    assert verify <= time.monotonic() - t0 < verify + 1.0
    assert dev.received == image and result.match is True  # the first send's answer
    last = [r for r in peer.uploads() if _ends_image(r, len(image))]
    assert len(last) == 1 + 2 and result.timeouts == 2  # re-sent `retries` times, 0.3 s apart


def test_silence_at_the_last_chunk_is_bounded(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)
    image = _image(9000)

    def respond(peer: Peer, req: Req) -> None:
        if not _ends_image(req, len(image)):
            dev(peer, req)

    peer = peers(respond)
    t0 = time.monotonic()
    with pytest.raises(DeviceSilent, match=r"device stopped answering: .* \(2 tries, at offset \d+ of 9000\)"):
        upload(peer, image, timeout=0.1, final_timeout=0.5, retries=1)
    assert time.monotonic() - t0 < 2.0  # (retries + 1) x final_timeout, and a little


def test_refused_first_request_raises_with_the_reason(peers: Callable[..., Peer]) -> None:
    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD:
            peer.reply(req, {"rc": 3, "rsn": "image:16"})
        else:
            FakeDevice()(peer, req)

    peer = peers(respond)
    with pytest.raises(ImageRefused) as exc:
        upload(peer, _image(9000))
    assert type(exc.value) is ImageRefused and exc.value.code is ImageErrorCode.VENDOR_MISMATCH
    assert exc.value.rc is MgmtErrorCode.EINVAL and exc.value.rsn == "image:16"
    assert str(exc.value) == ("device refused the image: image is for another vendor (vendor id) "
                              "(image error 16, SMP rc 3 EINVAL)")
    assert len(peer.uploads()) == 1  # nothing streamed after the refusal


def test_failed_verification_at_the_end(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice()

    def respond(peer: Peer, req: Req) -> None:
        rsp = dev.handle(req)
        if dev.received is not None and req.cmd == ImageCmd.UPLOAD:
            rsp = {"rc": 3, "rsn": "image:14"}
        assert rsp is not None
        peer.reply(req, rsp)

    peer = peers(respond)
    with pytest.raises(VerificationFailed, match=r"^image verification on the device failed: signature does "
                                                 r"not verify \(image error 14, SMP rc 3 EINVAL\)$"):
        upload(peer, _image(9000))


def test_match_false_is_a_verification_failure(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice()

    def respond(peer: Peer, req: Req) -> None:
        rsp = dev.handle(req)
        assert rsp is not None
        if rsp.get("match") is True:
            rsp["match"] = False
        peer.reply(req, rsp)

    peer = peers(respond)
    with pytest.raises(VerificationFailed, match="match false"):
        upload(peer, _image(3000))


def test_busy_device_refuses_the_update(peers: Callable[..., Peer]) -> None:
    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD:
            peer.reply(req, {"rc": 10, "rsn": "update:1"})
        else:
            FakeDevice()(peer, req)

    peer = peers(respond)
    with pytest.raises(UpdateRefused, match="unconfirmed test image") as exc:
        upload(peer, _image(3000))
    assert exc.value.code is UpdateErrorCode.BUSY


def _text(n: int, seed: int = 0) -> bytes:
    """Compressible bytes, as an app's code is: words from a small vocabulary."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij_") for _ in range(rng.randrange(2, 9))) for _ in range(300)]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + rng.choice([b" ", b"(", b")", b"\n    ", b", "])
    return bytes(out[:n])


def _end(r: Req) -> int:
    return r.payload["off"] + (r.payload["ulen"] if r.group == Group.MPBOOT else len(r.payload["data"]))


def test_compressed_chunks_where_the_device_offers_them(peers: Callable[..., Peer], unhurried_resend_timer: None) -> None:
    """A device that answers the opening request's `deflate: true` with its window gets the
    later chunks compressed (group 64 command 7), each a whole raw deflate stream that fills
    the request; the image arrives byte for byte, pipelined as plain chunks are."""
    dev = FakeDevice(buf_size=2048, service=0.002, deflate=10)
    peer = peers(dev)
    image = _text(60_000)
    result = upload(peer, image)
    assert dev.received == image and result.match is True
    ups = peer.uploads()
    assert ups[0].group == Group.IMAGE and ups[0].payload["deflate"] is True  # the opening asks
    assert all(r.group == Group.MPBOOT for r in ups[1:])
    assert [r.payload["off"] for r in ups[1:]] == [_end(r) for r in ups[:-1]]  # contiguous
    assert all(r.size <= 2048 for r in ups) and all(r.size >= 2048 - 24 for r in ups[1:-1])
    assert all(r.payload["ulen"] <= ZUPLOAD_MAX for r in ups[1:])
    assert result.wbits == 10 and result.compressed == len(ups) - 1 and result.window == 4
    assert result.image_sent == len(image) and result.image_sent / result.sent > 2.0
    plain = upload(peers(FakeDevice(buf_size=2048, service=0.002, deflate=10)), image, compress=False)
    assert plain.compressed == 0 and plain.requests > 2 * result.requests


def test_the_window_behind_the_opening_goes_compressed_when_the_parameters_offer_it(
        peers: Callable[..., Peer], unhurried_resend_timer: None) -> None:
    """Parameters that name both the pipeline and the window: the requests behind the opening
    go compressed already; a reconnect (`resuming`) sends the opening alone."""
    dev = FakeDevice(buf_size=2048, service=0.02, deflate=10, params_pipeline=True)
    peer = peers(dev)
    image = _text(60_000)
    result = upload(peer, image)
    assert dev.received == image and result.compressed == result.requests - 1
    ups = peer.uploads()
    assert [r.group for r in ups[:4]] == [Group.IMAGE] + [Group.MPBOOT] * 3
    assert ups[1].t < ups[0].replied_at  # sent behind the opening (20 ms to its answer)
    dev = FakeDevice(buf_size=2048, service=0.02, deflate=10, params_pipeline=True)
    peer = peers(dev)
    upload(peer, image, resuming=True)
    ups = peer.uploads()
    assert dev.received == image and ups[1].t >= ups[0].replied_at  # alone


def test_incompressible_chunks_go_plain(peers: Callable[..., Peer]) -> None:
    """Where a compressed chunk would carry less than a plain one (random bytes), the chunk
    goes plain: never slower than a plain upload. Mixed data mixes both."""
    dev = FakeDevice(buf_size=2048, service=0.001, deflate=10)
    peer = peers(dev)
    image = _image(30_000) + _text(30_000) + _image(10_000, seed=1)
    result = upload(peer, image)
    assert dev.received == image and 0 < result.compressed < result.requests - 1
    kinds = [r.group for r in peer.uploads()[1:]]
    assert Group.MPBOOT in kinds and Group.IMAGE in kinds
    assert kinds[0] == Group.IMAGE and kinds[-1] == Group.IMAGE
    plain = upload(peers(FakeDevice(buf_size=2048, service=0.001, deflate=10)), _image(40_000))
    assert plain.compressed == 0


def test_compressed_upload_resyncs_after_a_lost_request(peers: Callable[..., Peer],
                                                       unhurried_resend_timer: None) -> None:
    """A lost compressed chunk: the device answers the next one with the offset it expects,
    and the client re-packs from there (any offset is a place a stream can start)."""
    dev = FakeDevice(buf_size=1024, service=0.002, deflate=10)
    image = _text(50_000)
    lost: list[int] = []

    def respond(peer: Peer, req: Req) -> None:
        if req.group == Group.MPBOOT and req.payload["off"] > 10_000 and not lost:
            lost.append(req.payload["off"])
            return
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image)
    assert dev.received == image and result.resyncs == 1
    offs = [r.payload["off"] for r in peer.uploads()]
    assert offs.count(lost[0]) == 2


def test_compressed_upload_reopens_a_session_lost_mid_way(peers: Callable[..., Peer]) -> None:
    """The device lost the session (it reset): the next compressed chunk is refused with
    update 2; the client reopens, resumes where the device is, and goes on compressed."""
    dev = FakeDevice(buf_size=1024, service=0.001, deflate=10)
    image = _text(40_000)
    dropped: list[int] = []
    kept: list[Session] = []  # what the device persisted: the session at its checkpoint

    def respond(peer: Peer, req: Req) -> None:
        if req.group == Group.MPBOOT and req.payload["off"] > 20_000 and not dropped:
            assert dev.session is not None
            dropped.append(dev.session.off)
            kept.append(Session(dev.session.length, dev.session.sha, dev.session.data, 8192))
            dev.session = None  # reset: the session is gone until it is opened again
        elif req.group == Group.IMAGE and req.payload["off"] == 0 and kept:
            dev.session = kept.pop()  # opened with its sha: resumed from the checkpoint
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image)
    assert dev.received == image and dropped
    ups = peer.uploads()
    reopen = [i for i, r in enumerate(ups) if r.payload["off"] == 0]
    assert len(reopen) == 2 and ups[reopen[1] + 1].payload["off"] == 8192
    assert ups[reopen[1] + 1].group == Group.MPBOOT and result.compressed > 0


def test_compress_true_needs_a_device_that_offers_it(peers: Callable[..., Peer]) -> None:
    with pytest.raises(UsageError, match="does not take compressed uploads"):
        upload(peers(FakeDevice(service=0.001)), _text(10_000), compress=True)
    dev = FakeDevice(service=0.001, deflate=10)
    peer = peers(dev)
    result = upload(peer, _text(10_000), compress=False)
    assert dev.received == _text(10_000) and result.compressed == 0
    assert "deflate" not in peer.uploads()[0].payload  # not even asked


def test_a_bad_stream_refusal_is_one_clear_error(peers: Callable[..., Peer]) -> None:
    def respond(peer: Peer, req: Req) -> None:
        if req.group == Group.MPBOOT:
            peer.reply(req, {"rc": MgmtErrorCode.EINVAL, "rsn": "zupload:25"})
            return
        dev(peer, req)

    dev = FakeDevice(service=0.001, deflate=10)
    with pytest.raises(CompressedChunkRefused, match="compressed upload chunk.*zupload error 25"):
        upload(peers(respond), _text(10_000))


def test_upload_resumes_where_the_device_is(peers: Callable[..., Peer]) -> None:
    image = _image(25_000)
    dev = FakeDevice()
    done = 12_345
    dev.session = Session(len(image), hashlib.sha256(image).digest(), bytearray(image[:done]) + bytearray(len(image) - done), done)
    peer = peers(dev)
    result = upload(peer, image)
    assert dev.received == image and result.resumed_from == done
    ups = peer.uploads()
    assert ups[0].payload["off"] == 0 and ups[1].payload["off"] == done
    assert result.acks[0] == (done, len(image))
    assert result.sent == len(ups[0].payload["data"]) + len(image) - done


def test_session_lost_mid_upload_is_reopened_and_resumed(peers: Callable[..., Peer]) -> None:
    image = _image(30_000)
    dev = FakeDevice(service=0.001)
    state = {"reset": False}

    def respond(peer: Peer, req: Req) -> None:
        s = dev.session
        if s is not None and s.off > 15_000 and not state["reset"]:
            state["reset"] = True  # power cut: the device comes back with its checkpoint only
            dev.session = None
            dev.checkpoint = Session(s.length, s.sha, s.data, 8192)  # type: ignore[attr-defined]
        if dev.session is None and state["reset"] and req.payload.get("off") == 0 and "sha" in req.payload:
            dev.session = dev.checkpoint  # type: ignore[attr-defined]
        dev(peer, req)

    peer = peers(respond)
    result = upload(peer, image)
    assert dev.received == image
    opens = [r for r in peer.uploads() if r.payload["off"] == 0]
    assert len(opens) == 2 and "sha" in opens[1].payload
    assert (8192, len(image)) in result.acks


@pytest.mark.parametrize("how", ["unsupported", "silent"])
def test_params_fall_back_to_conservative_defaults(peers: Callable[..., Peer], how: str) -> None:
    dev = FakeDevice(params_rc=8 if how == "unsupported" else None, params_silent=how == "silent")
    peer = peers(dev)
    image = _image(6000)
    result = upload(peer, image, timeout=0.3)
    assert dev.received == image
    assert not result.params.reported and result.window == 1
    assert all(r.size <= 256 for r in peer.uploads())
    _assert_contiguous(peer.uploads())


def test_late_params_reply_is_ignored(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.02)  # the upload lasts ~0.5 s: the late reply comes during it

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == OsCmd.MCUMGR_PARAMS and req.group == Group.OS:
            peer.reply(req, {"buf_size": 4096, "buf_count": 9}, delay=0.3)  # after the client gave up
            return
        dev(peer, req)

    peer = peers(respond)
    image = _image(6000)
    result = upload(peer, image, timeout=0.2)
    assert dev.received == image and result.window == 1 and result.stats.ignored == 1


def test_sequence_numbers_increment_mod_256(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(buf_size=128)
    peer = peers(dev)
    upload(peer, _image(40_000))
    seqs = [r.seq for r in peer.requests]
    assert len(seqs) > 300
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs))


def test_console_frames_go_out_a_line_per_write(peers: Callable[..., Peer], monkeypatch: pytest.MonkeyPatch) -> None:
    """The console framing is lines, and each goes to the port in a write of its own (a Zephyr
    device under QEMU took requests faster so: tools/bench_zephyr.py); raw frames go whole."""
    import mpboot.transport.serial as serial_module

    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        n = real_write(fd, data)
        if threading.current_thread() is threading.main_thread():  # the client's (the peer has a thread)
            writes.append(bytes(data[:n]))
        return n

    monkeypatch.setattr(serial_module.os, "write", write)
    peer = peers(FakeDevice(), "console")
    assert run_client(peer, lambda c: c.echo("x" * 400)) == "x" * 400
    echo = b"".join(writes[-4:])
    assert len(writes) >= 4 and all(w.endswith(b"\n") for w in writes)  # 400 chars: 4+ lines, each alone
    assert echo.count(b"\n") == 4 and len(echo) > 400
    writes.clear()
    raw = peers(FakeDevice())
    assert run_client(raw, lambda c: c.echo("x" * 400)) == "x" * 400
    assert len(writes) == 2  # params and echo: a frame a write


def test_requests_are_smp_v1(peers: Callable[..., Peer]) -> None:
    peer = peers(FakeDevice())
    run_client(peer, lambda c: c.echo("hi"))  # (params first, then the echo)
    assert [r.version for r in peer.requests] == [0, 0]


def test_simple_commands(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice()
    peer = peers(dev, "console")

    async def action(c: SMPClient) -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["echo"] = await c.echo("hello wörld " * 30)
        out["params"] = await c.params()
        out["info"] = await c.os_info("snr")
        out["bl"] = await c.bootloader_info()
        out["mode"] = await c.bootloader_info("mode")
        out["state"] = await c.state()
        with pytest.raises(SMPError, match=r"image state write failed: SMP rc 5 ENOENT \(no such entry\)"):
            await c.state_write(b"\x01" * 32, confirm=False)
        with pytest.raises(CommandNotSupported):
            await c.slot_info()
        await c.erase(1)
        await c.erase()
        await c.reset()
        return out

    out = run_client(peer, action)
    assert out["echo"] == "hello wörld " * 30
    assert (out["params"].buf_size, out["params"].buf_count) == (512, 4)
    assert out["info"] == "fake snr" and out["bl"] == {"bootloader": "mpboot"}
    assert out["mode"] == {"mode": 5, "no-downgrade": False}
    (s0,) = out["state"]
    assert (s0.slot, s0.version, s0.hash, s0.active, s0.confirmed, s0.pending) == (0, "1.0.0", b"\xaa" * 32, True, True, False)
    assert s0.flags == ["active", "confirmed", "bootable"]
    by_cmd = [(r.group, r.cmd, r.op, r.payload) for r in peer.requests]
    assert (Group.IMAGE, ImageCmd.STATE, Op.WRITE, {"confirm": False, "hash": b"\x01" * 32}) in by_cmd
    assert (Group.IMAGE, ImageCmd.ERASE, Op.WRITE, {"slot": 1}) in by_cmd
    assert (Group.IMAGE, ImageCmd.ERASE, Op.WRITE, {}) in by_cmd
    assert dev.resets == 1


def test_state_write_arguments_are_checked() -> None:
    client = SMPClient(SerialTransport("/dev/null"))
    with pytest.raises(ValueError, match="needs the image's hash"):
        asyncio.run(client.state_write(None, confirm=False))
    with pytest.raises(ValueError, match="32 bytes"):
        asyncio.run(client.state_write(b"\x01" * 31, confirm=True))


def test_echo_waits_for_the_params_no_longer_than_an_upload_does(peers: Callable[..., Peer]) -> None:
    """A device that ignores the MCUmgr params request (and answers the echo): the echo goes
    after PARAMS_TIMEOUT (2 s), not after the client's whole timeout."""
    dev = FakeDevice(params_silent=True)
    peer = peers(dev)
    t0 = time.monotonic()
    assert run_client(peer, lambda c: c.echo("hi"), timeout=5.0) == "hi"
    assert PARAMS_TIMEOUT <= time.monotonic() - t0 < PARAMS_TIMEOUT + 1.5


def test_undecodable_reply_is_a_protocol_error(peers: Callable[..., Peer]) -> None:
    def respond(peer: Peer, req: Req) -> None:
        peer.write(struct.pack(">BBHHBB", 3, 0, 3, req.group, req.seq, req.cmd) + b"\xff\xff\xff")

    peer = peers(respond)
    with pytest.raises(ProtocolError, match="CBOR"):
        run_client(peer, lambda c: c.echo("x"))


# --------------------------------------------------------------------------- transport


def test_missing_port() -> None:
    with pytest.raises(PortError, match=r"^no such port: /dev/ttyNOPE0$") as exc:
        asyncio.run(SerialTransport("/dev/ttyNOPE0").open())
    assert exc.value.exit_code == 2


def test_busy_port(peers: Callable[..., Peer]) -> None:
    peer = peers(FakeDevice())

    async def main() -> None:
        first = SerialTransport(peer.port)
        await first.open()
        try:
            with pytest.raises(PortError, match=rf"^port busy: {peer.port} "):
                await SerialTransport(peer.port).open()
        finally:
            await first.close()

    asyncio.run(main())


def test_hangup_during_upload_is_a_transport_error(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice(service=0.002)

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD and req.payload["off"] > 4000:
            peer.close_master()
            return
        dev(peer, req)

    peer = peers(respond)
    with pytest.raises(TransportError):
        upload(peer, _image(20_000), timeout=1.0)


def test_a_port_that_takes_no_bytes_fails_instead_of_hanging() -> None:
    """Nobody reads the other end (a device that stopped reading, flow control holding the
    line): once the port's buffer is full a write makes no progress. It fails the link."""
    master, slave = os.openpty()
    tty.setraw(slave)

    async def main() -> None:
        transport = SerialTransport(os.ttyname(slave), write_timeout=0.3)
        async with SMPClient(transport, timeout=0.3) as client:
            await asyncio.wait_for(client.echo("x" * 60_000), 10)  # 3x what a pty holds

    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match=r" stalled: it took no bytes for 0\.3 s"):
            asyncio.run(main())
        assert time.monotonic() - t0 < 3.0
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("framing", ["raw", "console"])
def test_a_frame_cut_short_on_the_line_does_not_swallow_the_next_request(
        peers: Callable[..., Peer], framing: str) -> None:
    """An earlier session's request cut mid-frame (a link cut, a lost tail) waits in the
    device's decoder for its end; the next request completed it and was dropped with it (the
    soak's reset over the clean link after a failed update went unanswered)."""
    peer = peers(FakeDevice(), framing)
    cut = (RawCodec() if framing == "raw" else ConsoleCodec()).encode(
        encode_packet(Op.WRITE, Group.OS, OsCmd.ECHO, 1, {"d": "cut short"}))
    fd = os.open(peer.port, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, cut[: len(cut) // 2])
    finally:
        os.close(fd)
    assert run_client(peer, lambda c: c.echo("hello"), timeout=1.0) == "hello"


@pytest.mark.parametrize(("framing", "leads"), [("raw", [b"\x00", b"\x00", b"\x00"]),
                                               ("console", [b"\n", b"", b"\n"])])
def test_delimiters_before_frames(framing: str, leads: list[bytes]) -> None:
    """Raw frames each go out behind a 00; console frames only the first after the port opens
    (Zephyr's console receiver spends one of its two line buffers on an empty line too)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    codec = RawCodec() if framing == "raw" else ConsoleCodec()
    packets = [encode_packet(Op.READ, Group.OS, OsCmd.MCUMGR_PARAMS, seq, {}) for seq in range(3)]

    async def send(*batch: bytes) -> None:
        transport = SerialTransport(os.ttyname(slave), framing=framing)
        await transport.open()
        try:
            for packet in batch:
                await transport.send(packet)
        finally:
            await transport.close()

    expected = b"".join(lead + codec.encode(p) for lead, p in zip(leads, packets, strict=True))
    wire = b""
    try:
        asyncio.run(send(packets[0], packets[1]))
        asyncio.run(send(packets[2]))  # the port opened again
        # The tty layer hands written bytes to the master side a little later: read until
        # they are all there (or nothing more comes).
        while len(wire) < len(expected) and select.select([master], [], [], 2.0)[0]:
            wire += os.read(master, 65536)
    finally:
        os.close(master)
        os.close(slave)
    assert wire == expected


def test_serial_transport_is_a_transport() -> None:
    assert isinstance(SerialTransport("/dev/null"), Transport)
    assert SerialTransport("/dev/null", framing="console").max_packet(2048) == 2044
    assert SerialTransport("/dev/null", framing="raw").max_packet(2048) == 2048


# --------------------------------------------------------------------------- flashing + CLI


@pytest.fixture(scope="module")
def signed_image() -> bytes:
    key = load_signing_key(KEY)
    body = bytes(0x200) + random.Random(5).randbytes(20_000)
    return build_image(body, key, SignOptions(version=ImageVersion(1, 2, 3), security_counter=7,
                                              vendor_id=b"\x11" * 16))


def test_flash_workflow_marks_for_test_and_resets(peers: Callable[..., Peer], signed_image: bytes) -> None:
    dev = FakeDevice(service=0.001)
    peer = peers(dev)
    prepared = prepare(signed_image)
    result = run_client(peer, lambda c: flash(c, prepared, mark=Mark.TEST, reset=True))
    assert dev.received == signed_image
    first = peer.uploads()[0].payload
    h = prepared.parsed.header
    assert first["ptlv"] == signed_image[h.hdr_size + h.img_size : h.hdr_size + h.img_size + h.protect_tlv_size]
    assert first["ptlv"][:2] == b"\x08\x69"
    writes = [r.payload for r in peer.requests if r.cmd == ImageCmd.STATE and r.op == Op.WRITE]
    assert writes == [{"confirm": False, "hash": prepared.hash}]
    assert result.slot.slot == 1 and result.slot.pending and not result.slot.permanent
    assert dev.resets == 1 and peer.requests[-1].cmd == OsCmd.RESET


@pytest.mark.parametrize("mark", [Mark.TEST, Mark.CONFIRM])
def test_flash_of_the_firmware_image_4_marks_it_by_hash(peers: Callable[..., Peer], signed_image: bytes,
                                                       mark: Mark) -> None:
    """Image 4 (the esp32 firmware) is not in the device's image list: the state write's
    answer is the check, and the reset follows (docs/PROTOCOL.md "Stage 1")."""
    dev = FakeDevice(service=0.001)
    peer = peers(dev)
    prepared = prepare(signed_image)
    result = run_client(peer, lambda c: flash(c, prepared, mark=mark, reset=True, image_number=4))
    assert peer.uploads()[0].payload["image"] == 4 and dev.firmware == prepared.hash
    assert dev.firmware_mark == ("test" if mark is Mark.TEST else "permanent")
    assert result.slot is None and dev.resets == 1 and len(dev.slots) == 1


def _cli(*args: object) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="mpboot")


def _one_error_line(result: Any, code: int, text: str) -> None:
    assert result.exit_code == code, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines == [f"mpboot: error: {text}"], result.stderr
    assert "Traceback" not in result.output + result.stderr


@pytest.mark.parametrize("args", [["state"], ["echo", "hi"], ["reset"], ["erase"], ["confirm"]])
def test_cli_missing_port(args: list[str]) -> None:
    _one_error_line(_cli(*args, "--port", "/dev/ttyNOPE0"), 2, "no such port: /dev/ttyNOPE0")


def test_cli_flash_missing_port(tmp_path: Path, signed_image: bytes) -> None:
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    _one_error_line(_cli("flash", img, "--port", "/dev/ttyNOPE0"), 2, "no such port: /dev/ttyNOPE0")
    _one_error_line(_cli("flash", tmp_path / "none.bin", "--port", "/dev/ttyNOPE0"), 2,
                    f"{tmp_path / 'none.bin'}: no such file")
    _one_error_line(_cli("flash", img, "--port", "/dev/x", "--test", "--confirm"), 2,
                    "--test and --confirm exclude each other: test-boot it, or make it permanent")
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 100)
    result = _cli("flash", bad, "--port", "/dev/ttyNOPE0")
    assert result.exit_code == 1 and result.stderr.startswith("mpboot: error: not an MCUboot image")


def test_cli_silent_device(peers: Callable[..., Peer]) -> None:
    peer = peers(lambda p, r: None)
    _one_error_line(_cli("echo", "hi", "--port", peer.port, "--timeout", "0.2"), 3,
                    f"no SMP reply from {peer.port} in 0.2 s (wrong port, baud or framing?)")


def test_cli_busy_port(peers: Callable[..., Peer]) -> None:
    peer = peers(FakeDevice())

    async def main() -> Any:
        t = SerialTransport(peer.port)
        await t.open()
        try:
            return await asyncio.to_thread(_cli, "state", "--port", peer.port)
        finally:
            await t.close()

    result = asyncio.run(main())
    _one_error_line(result, 2, f"port busy: {peer.port} (another program has it open)")


def test_cli_device_refusal(peers: Callable[..., Peer], tmp_path: Path, signed_image: bytes) -> None:
    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD:
            peer.reply(req, {"rc": 3, "rsn": "image:18"})
        else:
            FakeDevice()(peer, req)

    peer = peers(respond)
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    _one_error_line(_cli("flash", img, "--port", peer.port, "--no-progress"), 1,
                    "device refused the image: image security counter is below the device's anti-rollback "
                    "floor (image error 18, SMP rc 3 EINVAL)")


@pytest.mark.parametrize("framing", ["raw", "console"])
def test_cli_flash_state_confirm(peers: Callable[..., Peer], tmp_path: Path, signed_image: bytes,
                                 framing: str) -> None:
    dev = FakeDevice(service=0.001)
    peer = peers(dev, framing)
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    common = ["--port", peer.port, "--framing", framing]
    r = _cli("flash", img, *common, "--test", "--no-progress")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"uploaded {len(signed_image)} bytes in ")
    assert lines[1] == f"flashed {img} (version 1.2.3+0) in slot 1: marked for a test boot at the next reset"
    assert dev.received == signed_image

    r = _cli("state", *common)
    assert r.exit_code == 0, r.stderr
    h = prepare(signed_image).hash
    assert h is not None
    assert r.stdout.splitlines()[2].split() == ["1", "1.2.3", h.hex()[:16], "pending", "bootable"]
    r = _cli("state", *common, "--json")
    assert [s["pending"] for s in __import__("json").loads(r.stdout)["images"]] == [False, True]

    r = _cli("confirm", h.hex()[:10], *common)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == f"image {h.hex()[:16]} in slot 1 (version 1.2.3) made permanent: it boots from the next reset"
    r = _cli("confirm", "beef", *common)
    _one_error_line(r, 2, "no image on the device has a hash starting beef")

    # the device holds it already (slot 1, not running): marked again without a new upload
    received = dev.received
    r = _cli("flash", img, *common, "--confirm", "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == (f"flashed {img} (version 1.2.3+0) in slot 1 (the device held it already: "
                                "nothing uploaded): made permanent (boots from the next reset)")
    assert dev.received is received

    # the progress bar path (not a terminal here: rich prints it plainly) and --reset
    assert _cli("erase", *common).exit_code == 0
    r = _cli("flash", img, *common, "--confirm", "--reset", "--window", "2")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == (f"flashed {img} (version 1.2.3+0) in slot 1: made permanent (boots from the "
                                "next reset); device reset")
    assert dev.resets == 1


class SerialRecovery(FakeDevice):
    """As MCUboot's serial recovery answers (Zephyr 4.4.0's mps2-an385 build): nothing runs,
    images are listed without flags, an upload goes to slot 0, there is no state write."""

    def handle(self, req: Req) -> dict[str, Any] | None:
        if (req.group, req.cmd, req.op) == (Group.IMAGE, ImageCmd.STATE, Op.WRITE):
            return {"rc": MgmtErrorCode.ENOTSUP}
        rsp = super().handle(req)
        self.slots = [{"slot": 0, "version": s["version"], "hash": s["hash"]} for s in self.slots[-1:]]
        return rsp


def test_cli_flash_to_mcuboot_serial_recovery(peers: Callable[..., Peer], tmp_path: Path,
                                              signed_image: bytes) -> None:
    """It boots what it took into slot 0 without a mark, and cannot mark: the summary must not
    say the image does not boot until marked, and --test must say the image is there."""
    peer = peers(SerialRecovery(service=0.001, slots=[{"slot": 0, "version": "0.0.0", "hash": b"\xbb" * 32}]))
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    r = _cli("flash", img, "--port", peer.port, "--no-progress")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines()[1] == (
        f"flashed {img} (version 1.2.3+0) in slot 0: not marked; the device runs no image (recovery), "
        "so its bootloader decides whether it boots at the next reset: MCUboot's serial recovery boots "
        "slot 0 as it is, mpboot only a marked image")
    _one_error_line(_cli("flash", img, "--port", peer.port, "--no-progress", "--test"), 1,
                    "the image is on the device, but the device cannot mark it (image state write failed: "
                    "SMP rc 8 ENOTSUP (command not supported)): a serial recovery bootloader such as "
                    "MCUboot's boots the image in slot 0 at its next reset, without a mark")


def test_cli_console_script_prints_no_traceback(tmp_path: Path, signed_image: bytes) -> None:
    img = tmp_path / "app.bin"
    img.write_bytes(signed_image)
    mpboot = Path(sys.executable).parent / "mpboot"
    proc = subprocess.run([str(mpboot), "flash", str(img), "--port", "/dev/ttyNOPE0"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "mpboot: error: no such port: /dev/ttyNOPE0\n"


class LoopbackTransport:
    """A link with a 244-byte MTU (like BLE after an MTU exchange) to an in-process device:
    the client needs nothing but the Transport protocol."""

    def __init__(self, device: FakeDevice, mtu: int = 244) -> None:
        self.device = device
        self.mtu = mtu
        self.sizes: list[int] = []
        self._rx: asyncio.Queue[bytes] = asyncio.Queue()

    @property
    def name(self) -> str:
        return "loopback"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, packet: bytes) -> None:
        self.sizes.append(len(packet))
        b0, _, _, group, seq, cmd = struct.unpack_from(">BBHHBB", packet)
        req = Req(b0 & 7, (b0 >> 3) & 3, group, seq, cmd, cbor2.loads(packet[8:]), len(packet), 0.0)
        rsp = self.device.handle(req)
        if rsp is not None:
            body = cbor2.dumps(rsp)
            self._rx.put_nowait(struct.pack(">BBHHBB", b0 + 1, 0, len(body), group, seq, cmd) + body)

    async def recv(self) -> bytes:
        return await self._rx.get()

    def max_packet(self, buf_size: int) -> int:
        return min(buf_size, self.mtu)

    def packet_limit(self, buf_size: int) -> int:
        return self.max_packet(buf_size)


def test_client_over_any_transport(signed_image: bytes) -> None:
    dev = FakeDevice(buf_size=2048)
    link = LoopbackTransport(dev)
    assert isinstance(link, Transport)

    async def main() -> Any:
        async with SMPClient(link) as client:
            return await flash(client, signed_image, mark=Mark.CONFIRM)

    result = asyncio.run(main())
    assert dev.received == signed_image and result.slot.permanent
    assert max(link.sizes) == 244 and result.upload.window == 4


def test_upload_replies_that_never_decode_end_in_a_protocol_error(peers: Callable[..., Peer]) -> None:
    dev = FakeDevice()

    def respond(peer: Peer, req: Req) -> None:
        if req.cmd == ImageCmd.UPLOAD:
            peer.write(struct.pack(">BBHHBB", 3, 0, 2, req.group, req.seq, req.cmd) + b"\xa1\xff")
        else:
            dev(peer, req)

    peer = peers(respond)
    with pytest.raises(ProtocolError, match="undecodable CBOR"):
        upload(peer, _image(50_000))
    assert len(peer.uploads()) == 9
