"""The device's UART transport (firmware/mpboot/transport/uart.py) on MicroPython: byte streams
framed on the host by the client libraries (smp.packet.encode for the console framing,
smpclient's Cobs for the raw one), mixed, split at random points, with noise, corrupt and
oversize frames; the device driver (tests/device/dev_uart.py) serves them with a stand-in
server (tests/device/smp_stub.py) and the host decodes the answers with the same libraries.
Also: the CRC16 against crcmod, the port adapters' uart() over a fake machine.UART, and the
decode throughput."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from crcmod.predefined import mkPredefinedCrcFun
from smp import packet as smppacket
from smpclient.transport.serial.framing.cobs import Cobs

from mpboot import upy
from mpboot.upy import compile_tree, mpy_cross_compile

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mpboot"
DEVICE = ROOT / "tests" / "device"
NEEDED = ("__init__.py", "flash.py", "transport/__init__.py", "transport/uart.py", "ports/nor_sim.py",
          "ports/__init__.py", "ports/esp32.py", "ports/rp2.py", "ports/stm32.py")
crc16 = mkPredefinedCrcFun("xmodem")


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The transport (and the port adapters) as .mpy, the drivers, the stub, the fakes."""
    lib = tmp_path_factory.mktemp("uart") / "lib"
    for rel in NEEDED:
        target = lib / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    compile_tree(DEVICE / "fakes", lib)
    for name in ("dev_uart", "dev_port_uart", "smp_stub"):
        mpy_cross_compile(DEVICE / f"{name}.py", lib / f"{name}.mpy")
    return lib


def run(lib: Path, *args: object, heapsize: str = "256k") -> list[str]:
    proc = upy.run(["-m", str(args[0]), *map(str, args[1:])], path=[lib], heapsize=heapsize, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout.splitlines()


# ---- building streams -----------------------------------------------------------------------


def smp_packet(rng: random.Random, size: int, seq: int, *, group: int = 1, cmd: int = 1) -> bytes:
    """An SMP request of `size` bytes (header + random payload with zeros, newlines and
    framing markers in it)."""
    assert size >= 8
    op = rng.choice((0, 2))
    ver = rng.choice((0, 1))
    payload = bytearray(rng.randbytes(size - 8))
    for _ in range(min(len(payload), 6)):  # bytes that mean something to the framings
        i = rng.randrange(len(payload))
        payload[i:i + 2] = rng.choice((b"\x00\x00", b"\n\x00", b"\x06\x09", b"\x04\x14", b"\xff\x00"))[
            :len(payload) - i]
    header = bytes([op | ver << 3, 0]) + (size - 8).to_bytes(2, "big") + group.to_bytes(2, "big") + bytes(
        [seq, cmd])
    return header + bytes(payload[:size - 8])


def console(pkt: bytes) -> bytes:
    return b"".join(smppacket.encode(pkt))


def raw(pkt: bytes) -> bytes:
    return b"".join(Cobs().encode(pkt))


def respond(pkt: bytes) -> bytes:
    """What the stub answers."""
    return bytes([(pkt[0] & 0xF8) | ((pkt[0] + 1) & 7)]) + pkt[1:]


@dataclass
class Stream:
    data: bytearray
    accepted: list[bytes]  # what the server must get, in order
    answers: list[tuple[str, bytes]]  # (framing, response) expected, in order
    cut: int = 0  # console frames with other frames between their lines


def no_markers(rng: random.Random, n: int) -> bytes:
    """Random bytes without 00, 0a, 04 or 06: nothing a resynchronising decoder could take
    for the start or the end of a frame."""
    return bytes(rng.choice([b for b in range(1, 256) if b not in (0x04, 0x06, 0x0A)]) for _ in range(n))


def corrupt(rng: random.Random, frame: bytes, kind: str) -> bytes:
    """The frame with one byte changed; delimiters and start markers stay as they were."""
    out = bytearray(frame)
    while True:
        i = rng.randrange(len(out))
        if kind == "console":
            line_start = out.rfind(b"\n", 0, i) + 1
            if i < line_start + 2 or out[i] == 0x0A:
                continue
            alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            new = rng.choice([c for c in alphabet if c != out[i]])
        else:
            if i == 0 or out[i] == 0:
                continue
            new = rng.choice([b for b in range(1, 256) if b != out[i]])
        out[i] = new
        return bytes(out)


def make_stream(seed: int, buf_size: int, count: int, *, noise: bool = True, silent: bool = True,
                reset_at: int | None = None) -> Stream:
    rng = random.Random(seed)
    s = Stream(bytearray(), [], [])
    for n in range(count):
        kind = rng.choice(("console", "raw"))
        limit = buf_size - 4 if kind == "console" else buf_size
        size = rng.choice((8, 9, rng.randrange(8, limit + 1), limit))
        seq = n & 0xFF
        if seq == 0xEE or (silent and rng.random() < 0.1):
            seq = 0xEE  # the stub stays silent
        if n == reset_at:
            pkt = smp_packet(rng, 8, 1, group=0, cmd=5)
            pkt = bytes([2]) + pkt[1:]
        else:
            # Command 0xEE makes the stub raise: no answer, and serving goes on.
            pkt = smp_packet(rng, size, seq, cmd=0xEE if silent and rng.random() < 0.05 else 1)
        frame = console(pkt) if kind == "console" else raw(pkt)
        if noise and rng.random() < 0.3:
            s.data += rng.choice((b"\r\n", b"\n", b"\x00", b"\x00\x00", b"\r\n\r\n", b"hello\r\n"))
        if noise and rng.random() < 0.15:
            # A frame that must be dropped, before the good one.
            what = rng.choice(("corrupt", "oversize", "garbage_raw", "garbage_line", "orphan_line"))
            if what == "corrupt":
                s.data += corrupt(rng, frame, kind)
            elif what == "oversize":
                big = bytes([2, 0]) + no_markers(rng, buf_size + (1 if kind == "raw" else -3) - 2)
                s.data += raw(big) if kind == "raw" else console(big)
            elif what == "garbage_raw":
                s.data += b"\x02" + no_markers(rng, rng.randrange(1, 300)) + b"\x00"
            elif what == "garbage_line":
                s.data += b"\x06\x09" + bytes(rng.choice(b"ABCDabcd0123+/") for _ in range(40)) + b"\n"
            else:
                s.data += b"\x04\x14QUJD\n"  # a continuation without its start
        s.data += frame
        s.accepted.append(pkt)
        if pkt[6] != 0xEE and pkt[7] != 0xEE:
            s.answers.append((kind, respond(pkt)))
        if n == reset_at:
            s.data += raw(smp_packet(rng, 40, 3))  # after the reset: never read
            break
    return s


def decode_answers(out: bytes) -> list[tuple[str, bytes]]:
    """The device's output, frame by frame, decoded by the client libraries."""
    answers: list[tuple[str, bytes]] = []
    i = 0
    while i < len(out):
        if out[i] == 0:  # the delimiter a raw reply starts with
            i += 1
            continue
        if out[i:i + 2] == smppacket.START_DELIMITER:
            decoder = smppacket.decode()
            next(decoder)
            while True:
                end = out.index(b"\n", i) + 1
                line = out[i:end]
                assert len(line) <= 127, line
                i = end
                try:
                    decoder.send(line)
                except StopIteration as done:
                    answers.append(("console", done.value))
                    break
        else:
            end = out.index(b"\x00", i) + 1
            cobs = Cobs()
            cobs.feed(out[i:end])
            message = cobs.take()
            assert message is not None, out[i:end]
            answers.append(("raw", message))
            i = end
    return answers


def requests(log: bytes) -> list[bytes]:
    out = []
    i = 0
    while i < len(log):
        n = int.from_bytes(log[i:i + 2], "big")
        out.append(log[i + 2:i + 2 + n])
        i += 2 + n
    return out


def serve_stream(lib: Path, tmp_path: Path, s: Stream, buf_size: int, seed: int, maxchunk: int,
                 mode: str = "") -> tuple[str, list[bytes], list[tuple[str, bytes]]]:
    src, out, log = tmp_path / "in.bin", tmp_path / "out.bin", tmp_path / "log.bin"
    src.write_bytes(s.data)
    lines = run(lib, "dev_uart", "stream", src, out, log, seed, maxchunk, buf_size, *([mode] if mode else []))
    return lines[-1], requests(log.read_bytes()), decode_answers(out.read_bytes())


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("buf_size,seed,maxchunk", [(512, 1, 1), (512, 2, 7), (512, 3, 300), (2048, 4, 3000),
                                                    (256, 5, 64)])
def test_mixed_streams(lib: Path, tmp_path: Path, buf_size: int, seed: int, maxchunk: int) -> None:
    """Both framings on one stream, split at random points, with noise, corrupt, oversize,
    orphan and garbage frames between good ones: exactly the good packets reach the server,
    in order, and each answer decodes with the client library in its request's framing."""
    s = make_stream(seed, buf_size, 120 if buf_size <= 512 else 40)
    last, got, answers = serve_stream(lib, tmp_path, s, buf_size, seed, maxchunk)
    assert last == f"DONE handled={len(s.accepted)}"
    assert got == s.accepted
    assert answers == s.answers


def test_largest_packets_and_one_more(lib: Path, tmp_path: Path) -> None:
    """Console carries buf_size - 4 bytes, raw buf_size; one byte more is dropped silently and
    the next frame still gets through."""
    rng = random.Random(7)
    buf_size = 1024
    good_c = smp_packet(rng, buf_size - 4, 1)
    good_r = smp_packet(rng, buf_size, 2)
    big_c = smp_packet(rng, buf_size - 3, 3)
    big_r = smp_packet(rng, buf_size + 1, 5)
    after = smp_packet(rng, 20, 7)
    s = Stream(bytearray(console(good_c) + raw(good_r) + console(big_c) + raw(after) + raw(big_r) + console(after)),
               [good_c, good_r, after, after],
               [("console", respond(good_c)), ("raw", respond(good_r)), ("raw", respond(after)),
                ("console", respond(after))])
    _, got, answers = serve_stream(lib, tmp_path, s, buf_size, 9, 200)
    assert got == s.accepted
    assert answers == s.answers


def test_console_only_client_after_line_noise(lib: Path, tmp_path: Path) -> None:
    """Noise that looks like the start of a raw frame (01/02 and no 00 after it) before a
    console-only conversation: the decoder gives up on it after one raw frame's worth of
    bytes and finds the console lines again."""
    rng = random.Random(8)
    buf_size = 256
    pkts = [smp_packet(rng, rng.randrange(8, 200), i + 1) for i in range(12)]
    data = bytearray(b"\x02\x7f") + b"".join(console(p) for p in pkts)
    _, got, answers = serve_stream(lib, tmp_path, Stream(data, [], []), buf_size, 3, 50)
    # The noise swallows at most one raw frame's worth (~buf_size bytes) of console lines.
    lost = len(pkts) - len(got)
    assert got == pkts[lost:] and 1 <= lost <= 3
    assert answers == [("console", respond(p)) for p in pkts[lost:]]


def test_reset_request_ends_serve(lib: Path, tmp_path: Path) -> None:
    """serve() returns after the reset response is written and drained; bytes after it stay
    unread."""
    s = make_stream(11, 512, 30, reset_at=17)
    last, got, answers = serve_stream(lib, tmp_path, s, 512, 11, 100)
    assert last == f"RESET handled={len(s.accepted)} drains=1"
    assert got == s.accepted
    assert answers == s.answers


def test_serve_async(lib: Path, tmp_path: Path) -> None:
    s = make_stream(12, 512, 60, reset_at=50)
    last, got, answers = serve_stream(lib, tmp_path, s, 512, 12, 90, "async")
    assert last.startswith(f"RESET handled={len(s.accepted)}")
    assert got == s.accepted
    assert answers == s.answers


# ---- the two framings' partial frames kept apart -----------------------------------------


def console_lines(pkt: bytes) -> list[bytes]:
    return list(smppacket.encode(pkt))


def interleaved_stream(seed: int, buf_size: int, count: int) -> Stream:
    """Console frames sent line by line, with raw frames (good ones, corrupt and garbage ones
    that must be dropped) and noise (CR/LF, stray 00s) before, between and after their lines.
    One console frame is open at a time (a first line starts a new frame); the server must get
    each good packet when its frame ends: a raw frame at its 00, a console frame at its last
    line."""
    rng = random.Random(seed)
    s = Stream(bytearray(), [], [])
    lines: list[bytes] = []  # what is left of the open console frame
    open_pkt = b""
    seq = 0

    def packet_for(kind: str) -> bytes:
        nonlocal seq
        seq = (seq + 1) & 0xFF
        if seq == 0xEE:
            seq = 1
        limit = buf_size - 4 if kind == "console" else buf_size
        size = rng.choice((8, rng.randrange(8, limit + 1), rng.randrange(limit // 2, limit + 1), limit))
        return smp_packet(rng, size, 0xEE if rng.random() < 0.05 else seq)  # 0xEE: no answer

    def accept(kind: str, pkt: bytes) -> None:
        s.accepted.append(pkt)
        if pkt[6] != 0xEE:
            s.answers.append((kind, respond(pkt)))

    made = 0
    started = interrupted = False  # the open console frame: a line sent; another frame or noise since
    while made < count or lines:
        r = rng.random()
        if lines and r < 0.8:
            s.data += lines.pop(0)
            started = True
            if not lines:
                accept("console", open_pkt)
                s.cut += interrupted
            continue
        if not lines and r < 0.5:
            if made < count:
                open_pkt = packet_for("console")
                lines = console_lines(open_pkt)
                started = interrupted = False
                made += 1
            continue
        if lines and started:
            interrupted = True
        r = rng.random()
        if r < 0.7:
            pkt = packet_for("raw")
            s.data += raw(pkt)
            accept("raw", pkt)
            made += 1
        elif r < 0.8:
            s.data += corrupt(rng, raw(packet_for("raw")), "raw")
        elif r < 0.9:
            s.data += b"\x02" + no_markers(rng, rng.randrange(1, buf_size)) + b"\x00"
        else:
            s.data += rng.choice((b"\r\n", b"\n", b"\x00", b"\x00\x00", b"\r"))
    return s


def test_raw_frames_between_console_lines(lib: Path, tmp_path: Path) -> None:
    """A console frame of several lines with raw frames between them (and a corrupt one, and
    garbage): each raw frame is answered when it ends, and the console frame completes after
    them and is answered too. Also a raw frame between every two lines, and a console frame
    whose first line comes while nothing else is open, right after a raw frame."""
    rng = random.Random(20)
    buf_size = 1024
    big = smp_packet(rng, buf_size - 4, 1)
    lines = console_lines(big)
    assert len(lines) == 12
    raws = [smp_packet(rng, n, 2 + i) for i, n in enumerate((8, 200, buf_size, 33))]
    data = bytearray(lines[0] + raw(raws[0]) + b"".join(lines[1:5]) + raw(raws[1]) + raw(raws[2])
                     + corrupt(rng, raw(smp_packet(rng, 100, 9)), "raw") + b"\x02junk\x00" + b"\r\n"
                     + b"".join(lines[5:11]) + b"\x00" + raw(raws[3]) + lines[11])
    accepted = [raws[0], raws[1], raws[2], raws[3], big]
    every = smp_packet(rng, buf_size - 4, 20)
    every_raws = [smp_packet(rng, rng.randrange(8, 64), 21 + i) for i in range(len(console_lines(every)) - 1)]
    every_lines = console_lines(every)
    for i, line in enumerate(every_lines):
        data += line
        if i < len(every_raws):
            data += raw(every_raws[i])
    accepted += every_raws + [every]
    small = smp_packet(rng, 40, 50)
    data += raw(raws[0]) + console(small)
    accepted += [raws[0], small]
    s = Stream(data, accepted, [("console" if p in (big, every, small) else "raw", respond(p)) for p in accepted])
    for seed, maxchunk in ((1, 1), (2, 9), (3, 300), (4, 5000)):
        last, got, answers = serve_stream(lib, tmp_path, s, buf_size, seed, maxchunk)
        assert last == f"DONE handled={len(accepted)}"
        assert got == s.accepted
        assert answers == s.answers


@pytest.mark.parametrize("buf_size,seed,maxchunk,mode", [(256, 21, 1, ""), (512, 22, 13, ""), (512, 23, 200, ""),
                                                         (1024, 24, 64, "async"), (2048, 25, 5000, "")])
def test_interleaved_framings(lib: Path, tmp_path: Path, buf_size: int, seed: int, maxchunk: int,
                              mode: str) -> None:
    """Random interleavings of console frames (line by line) and raw frames, with frames to
    drop and noise between them, read in random pieces: every good frame reaches the server
    exactly once, in the order its frame ended, and gets exactly its answer in its framing."""
    s = interleaved_stream(seed, buf_size, 150 if buf_size <= 512 else 80)
    assert s.cut >= 10  # console frames with raw frames, garbage or noise between their lines
    last, got, answers = serve_stream(lib, tmp_path, s, buf_size, seed, maxchunk, mode)
    assert last == f"DONE handled={len(s.accepted)}"
    assert got == s.accepted
    assert answers == s.answers


def test_frames_cut_by_the_other_framing_are_lost(lib: Path, tmp_path: Path) -> None:
    """What cannot be kept apart (docs/PROTOCOL.md): a raw frame ends only at its 00 and may hold
    any other byte, so a console line inside it is part of it: the raw frame fails its CRC and
    is dropped with the line (and with the console frame that line belonged to). A raw frame
    inside a console line corrupts the line: both are dropped. The frames after go through."""
    rng = random.Random(26)
    buf_size = 512
    before, after = smp_packet(rng, 50, 3), smp_packet(rng, 60, 4)
    cut = raw(smp_packet(rng, 300, 1))
    inside = console_lines(smp_packet(rng, 200, 2))
    line_cut = console_lines(smp_packet(rng, 200, 5))
    inner = raw(smp_packet(rng, 20, 6).replace(b"\n", b"\x01"))  # no 0a: the line ends at its own
    assert len(inside) == 3 and b"\n" not in inner
    data = bytearray(console(before) + inside[0] + cut[:150] + inside[1] + cut[150:] + inside[2]
                     + line_cut[0] + line_cut[1][:40] + inner + line_cut[1][40:] + line_cut[2]
                     + raw(after) + console(after))
    s = Stream(data, [before, after, after], [("console", respond(before)), ("raw", respond(after)),
                                              ("console", respond(after))])
    for seed, maxchunk in ((5, 40), (6, 1), (7, 1000)):
        _, got, answers = serve_stream(lib, tmp_path, s, buf_size, seed, maxchunk)
        assert got == s.accepted
        assert answers == s.answers


@pytest.mark.parametrize("buf_size", [256, 2048])
def test_receive_memory_is_bounded(lib: Path, tmp_path: Path, buf_size: int, record_property) -> None:
    """The Framer allocates its buffers once (rx, the console frame, the packet, tx: about three
    buf_size) and keeps nothing from what arrives: after interleaved frames, an open console
    frame under a stream of raw frames, oversize and endless frames, the heap holds what it held
    before."""
    rng = random.Random(27 + buf_size)
    s = interleaved_stream(28 + buf_size, buf_size, 80)
    data = bytearray(s.data)
    answered = len(s.answers)
    # A console frame left open under 300 raw frames, then completed.
    pkt = smp_packet(rng, buf_size - 4, 1)
    lines = console_lines(pkt)
    data += lines[0]
    for i in range(300):
        data += raw(smp_packet(rng, rng.randrange(8, buf_size + 1), 2))
    data += b"".join(lines[1:])
    answered += 301
    # Oversize frames, orphan lines and a raw frame that never ends.
    data += raw(smp_packet(rng, buf_size + 1, 3)) + console(smp_packet(rng, buf_size - 3, 3))
    data += b"\x04\x14QUJD\n" * 200 + b"\x06\x09" + b"QUJD" * 100 + b"\n"
    data += b"\x02" + no_markers(rng, 20 * buf_size)

    def measure(stream: bytes) -> tuple[int, int, int]:
        src = tmp_path / f"mem-{len(stream)}.bin"
        src.write_bytes(stream)
        line = run(lib, "dev_uart", "mem", src, buf_size, 97, heapsize="1m")[-1]
        m = re.fullmatch(r"MEM framer=(\d+) growth=(-?\d+) handled=(\d+) answered=(\d+)", line)
        assert m, line
        return int(m.group(1)), int(m.group(2)), int(m.group(4))

    framer, growth, answers = measure(bytes(data))
    _, idle_growth, _ = measure(b"")  # what the run itself leaves (the GC scans the C stack)
    record_property("summary", f"uart Framer({buf_size}): {framer} bytes of buffers and objects; "
                               f"{growth} kept after {len(data)} bytes of input, {idle_growth} after none")
    assert answers == answered
    assert framer <= 3 * buf_size + 1024
    assert growth <= idle_growth


def test_crc16_native_and_table_agree_with_crcmod(lib: Path, tmp_path: Path) -> None:
    data = random.Random(13).randbytes(5000)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    spans = [(0, 0), (0, 1), (0, 9), (3, 4096), (0, 5000), (4999, 1), (100, 777)]
    lines = run(lib, "dev_uart", "crc", path, *[x for span in spans for x in span])
    assert lines[0] == "NATIVE 1"  # the unix port has the native emitter: viper is in use
    for (off, n), line in zip(spans, lines[1:], strict=True):
        want = crc16(data[off:off + n])
        assert line == f"CRC {want} {want}", (off, n)


@pytest.mark.parametrize("kind", ["raw", "console"])
def test_decode_throughput(lib: Path, tmp_path: Path, kind: str, record_property) -> None:
    """1 MiB of 2 KiB requests decoded and CRC-checked on the device (unix port)."""
    rng = random.Random(14)
    buf_size = 2048
    size = buf_size if kind == "raw" else buf_size - 4
    pkts = [smp_packet(rng, size, i & 0x7F) for i in range((1 << 20) // size + 1)]
    data = b"".join(raw(p) if kind == "raw" else console(p) for p in pkts)
    path = tmp_path / "bench.bin"
    path.write_bytes(data)
    line = run(lib, "dev_uart", "bench", path, buf_size, 4096, heapsize="4m")[-1]
    m = re.fullmatch(r"BENCH bytes=(\d+) packets=(\d+) us=(\d+) native=1", line)
    assert m, line
    assert int(m.group(2)) == len(pkts)
    payload = sum(map(len, pkts))
    ms_per_mib = int(m.group(3)) / 1000 * (1 << 20) / payload
    record_property("summary", f"uart {kind} framing: {ms_per_mib:.0f} ms per MiB of packets decoded "
                               f"({len(data) / payload:.3f} wire bytes per packet byte; MicroPython unix port)")
    assert ms_per_mib < 2000


# ---- the port adapters' uart() over a fake machine.UART -------------------------------------


@pytest.mark.parametrize("port", ["esp32", "rp2", "stm32"])
def test_port_uart(lib: Path, tmp_path: Path, port: str) -> None:
    """port.uart() opens machine.UART with timeout=0 and the rxbuf asked; a burst of buf_count
    largest console requests fits that rxbuf (the fake drops bytes past it, as a UART driver
    does), and serve() answers them all over the link, then drains it for the reset."""
    rng = random.Random(15)
    buf_size = 512
    pkts = [smp_packet(rng, buf_size - 4, i + 1) for i in range(3)]
    reset = bytes([2, 0, 0, 0, 0, 0, 9, 5])
    data = b"".join(console(p) for p in pkts) + raw(reset)
    src, out = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(data)
    lines = run(lib, "dev_port_uart", port, src, out, buf_size, 4)
    info = dict(line.split(" ", 1) for line in lines)
    assert info["OPEN"] == {"esp32": "id=1 baudrate=115200 timeout=0 rxbuf=",
                            "rp2": "id=0 baudrate=115200 timeout=0 rxbuf=",
                            "stm32": "id=3 baudrate=115200 timeout=0 rxbuf="}[port] + info["RXBUF"]
    assert int(info["RXBUF"]) >= len(data)
    assert info["LOST"] == "0"
    assert info["SERVED"] == "handled=4 drains=1"
    default, needed = info["DEFAULT_RXBUF"].split()
    assert int(default) >= int(needed)  # the default rxbuf holds the default pipeline
    assert decode_answers(out.read_bytes()) == [("console", respond(p)) for p in pkts] + [("raw", respond(reset))]
