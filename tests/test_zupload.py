"""Compressed uploads on the device (firmware/mpboot/smp/zupload.py, group 64 command 7) run on
MicroPython: each request's data is one whole raw deflate stream that the device inflates
into the updater. Request packets are built on the host (tests/device/dev_smp.py runs them
through Server.handle), the streams by the host's packer (host/mpboot/smp/zchunk.py).

Round trips of compressible, incompressible and mixed images, also end to end (`mpboot flash`
against `mpboot sim`; kill -9 mid-upload: tests/test_smp_faults.py); a bomb (an announced length
past the image, past the per-request cap, or a stream that inflates past what it announced);
truncated, corrupted, trailing and reordered streams (a clear SMP error or a resync, nothing
marked, the running image kept); and the heap of a compressed upload."""

from __future__ import annotations

import hashlib
import random
import re
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pytest
from mpboot.image import parse_image
from mpboot.smp.zchunk import ZUPLOAD_MAX, Packer, deflate_raw
from test_smp_fuzz import HEAP
from test_smp_server import IMG, READ, V1, V2, WRITE, A, Reply, Session, image, images
from conftest import FIRMWARE, KEYS_DIR, signing_key
from mpboot.pack import pack_app
from simkit import make_app, sign_app
from simserve import SimProcess, ok

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"mpboot: serving SMP"
G = 64  # the mpboot group
ZCMD = 7
WBITS = 10  # the device's window (docs/PROTOCOL.md, "Compressed upload")
BAD_STREAM = 25  # zupload error
ROOM = 1900  # stream bytes per request (a 2 KiB buffer's worth)
BIG = 256 * 1024  # a chip whose slots hold 116 KiB (SIZE's hold 20 KiB)


def code_text(n: int) -> bytes:
    """Real code, compressible as an app's is: the firmware's own sources."""
    text = b"".join(p.read_bytes() for p in sorted(FIRMWARE.rglob("*.py")))
    return (text * (n // len(text) + 1))[:n]


def compressible(version: str, n: int = 16_000) -> bytes:
    return sign_app(code_text(n), signing_key("TEST-ONLY-rsa2048.pem"), version)


def mixed(version: str) -> bytes:
    """Code, then noise, then code: the host sends the noise plain."""
    body = code_text(6000) + random.Random(version).randbytes(5000) + code_text(6000)[::-1]
    return sign_app(body, signing_key("TEST-ONLY-rsa2048.pem"), version)


@pytest.fixture
def session(device, tmp_path: Path) -> Session:  # type: ignore[no-untyped-def]
    return Session(device, tmp_path)


def zchunks(data: bytes, start: int, room: int = ROOM) -> list[dict[str, Any]]:
    """The compressed requests for data[start:], as the host packs them."""
    p = Packer(data, WBITS, room)
    out, off = [], start
    while off < len(data):
        c = p.chunk(off)
        assert c is not None
        out.append({"off": off, "ulen": c.end - off, "data": c.data})
        off = c.end
    return out


def opening(s: Session, data: bytes, n: int = 1024, version: int = V2, **extra: Any) -> Reply:
    body = {"off": 0, "len": len(data), "sha": hashlib.sha256(data).digest(), "data": data[:n], "deflate": True}
    body.update(extra)
    return s.send(WRITE, IMG, 1, body, version=version)


def zupload(s: Session, data: bytes, *, version: int = V2) -> tuple[Reply, list[Reply]]:
    first = opening(s, data, version=version)
    return first, [s.send(WRITE, G, ZCMD, body, version=version) for body in zchunks(data, 1024)]


def ready(s: Session, name: str, **kw: Any):  # type: ignore[no-untyped-def]
    flash = s.dev(name, slots=(A, None), **kw)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    return flash


def bad_stream_v2(rep: Reply) -> None:
    assert rep.body == {"err": {"group": G, "rc": BAD_STREAM}}, rep.body


def nothing_marked(rep: Reply) -> None:
    """A state read: the running image alone is active and confirmed; nothing is pending."""
    entries = images(rep)
    assert [e.slot for e in entries if e.active] == [0] and entries[0].confirmed
    assert not any(e.pending for e in entries)


@pytest.mark.parametrize("kind", ["compressible", "incompressible", "mixed"])
def test_round_trip(session: Session, kind: str) -> None:
    data = {"compressible": lambda: compressible("2.0.0"),
            "incompressible": lambda: image("2.0.0", payload=16_000),
            "mixed": lambda: mixed("2.0.0")}[kind]()
    s = session
    flash = ready(s, kind)
    first, chunks = zupload(s, data)
    mark = s.send(WRITE, IMG, 0, {"hash": parse_image(data).digest, "confirm": False})
    s.run()
    assert first.body == {"off": 1024, "deflate": WBITS}
    for rep, body in zip(chunks[:-1], zchunks(data, 1024)):
        assert rep.body == {"off": body["off"] + body["ulen"]}
    assert chunks[-1].body == {"off": len(data), "match": True}
    assert flash.slot_bytes(1)[: len(data)] == data
    assert images(mark)[1].pending
    if kind == "compressible":  # the streams carry more than their size
        streamed = sum(len(b["data"]) for b in zchunks(data, 1024))
        assert (len(data) - 1024) / streamed > 2.0


def test_device_info_and_opening_advertise_the_window(session: Session) -> None:
    s = session
    ready(s, "info")
    info = s.send(READ, G, 0)
    asked = opening(s, A)  # A is the running image: the slot is free for another
    plain = s.send(WRITE, IMG, 1, {"off": 0, "len": len(A), "data": A[:1024]})
    s.run()
    assert info.body["deflate"] == WBITS
    assert asked.body["deflate"] == WBITS
    assert "deflate" not in plain.body  # only a request that asks gets it (smpclient's models)


def test_bombs_are_refused_before_they_pass_the_bound(session: Session) -> None:
    s = session
    ready(s, "bomb")
    data = compressible("2.0.0")
    total = len(data)
    opening(s, data)
    blank = deflate_raw(b"\xff" * (2 << 20), WBITS)  # 2 MiB of 0xff in a small request
    assert len(blank) < 2100
    # An honest announcement past the image, or past the per-request cap: refused before
    # anything is inflated or written.
    past_image = s.send(WRITE, G, ZCMD, {"off": 1024, "ulen": total - 1024 + 1,
                                         "data": deflate_raw(b"\xff" * (total - 1023), WBITS)}, version=V1)
    past_cap = s.send(WRITE, G, ZCMD, {"off": 1024, "ulen": 2 << 20, "data": blank})
    # A false one: the stream goes on past `ulen`: refused once the bound is passed.
    lying = s.send(WRITE, G, ZCMD, {"off": 1024, "ulen": 4096, "data": blank})
    # The upload is closed (what the bad stream wrote may be wrong): v2 answers off 0.
    after = s.send(WRITE, G, ZCMD, zchunks(data, 1024)[0])
    state = s.state()
    s.run()
    assert past_image.body == {"rc": 3, "rsn": "update:3"} and past_image.prog == 0
    bad_stream_v2(past_cap)
    assert past_cap.prog == past_cap.erase == 0
    bad_stream_v2(lying)
    assert lying.prog <= 4096  # bytes programmed: at most what `ulen` allowed
    assert after.body == {"off": 0}
    nothing_marked(state)


@pytest.mark.parametrize("fault", ["truncated", "corrupt block type", "trailing bytes", "short of ulen",
                                   "window too large", "not deflate", "empty"])
def test_bad_streams_get_an_error_and_nothing_is_marked(session: Session, fault: str) -> None:
    s = session
    flash = ready(s, "bad")
    data = compressible("2.0.0")
    good = zchunks(data, 1024)
    body = dict(good[0])
    stream = body["data"]
    if fault == "truncated":
        body["data"] = stream[: len(stream) // 2]
    elif fault == "corrupt block type":
        body["data"] = bytes([stream[0] | 0x06]) + stream[1:]  # BTYPE 11: reserved
    elif fault == "trailing bytes":
        body["data"] = stream + b"\x00"
    elif fault == "short of ulen":
        body["ulen"] += 1
    elif fault == "window too large":
        # A 32 KiB window with a match 1500 bytes back: past the device's 1 KiB.
        block = random.Random(1).randbytes(1500)
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        body = {"off": 1024, "ulen": 3000, "data": c.compress(block * 2) + c.flush()}
        assert len(body["data"]) < 1600
    elif fault == "not deflate":
        body["data"] = b"\x07" * 64
    elif fault == "empty":
        body["data"] = b""
    opening(s, data)
    bad = s.send(WRITE, G, ZCMD, body, version=V1)
    state = s.state()
    # Opening the session again resumes it (no checkpoint yet: from 0); the upload then
    # completes with good streams.
    again = opening(s, data)
    rest = [s.send(WRITE, G, ZCMD, b) for b in zchunks(data, 1024)]
    s.run()
    assert bad.body == {"rc": 3, "rsn": f"zupload:{BAD_STREAM}"}, bad.body
    nothing_marked(state)
    assert again.body["off"] == 1024
    assert rest[-1].body == {"off": len(data), "match": True}
    assert flash.slot_bytes(1)[: len(data)] == data


def test_reordered_streams_resync_without_writing(session: Session) -> None:
    s = session
    flash = ready(s, "order")
    data = compressible("2.0.0")
    good = zchunks(data, 1024)
    assert len(good) >= 3
    opening(s, data)
    early = s.send(WRITE, G, ZCMD, good[1])  # the second before the first
    replies = [s.send(WRITE, G, ZCMD, b) for b in good]
    again = s.send(WRITE, G, ZCMD, good[-1])  # the last again (its reply lost): answered, not written
    s.run()
    assert early.body == {"off": 1024} and early.prog == early.erase == 0
    assert replies[-1].body == {"off": len(data), "match": True}
    assert again.body == {"off": len(data)} and again.prog == 0
    assert flash.slot_bytes(1)[: len(data)] == data


def test_malformed_requests(session: Session) -> None:
    s = session
    ready(s, "malformed")
    data = compressible("2.0.0")
    chunk = zchunks(data, 1024)[0]
    no_session = s.send(WRITE, G, ZCMD, chunk, version=V1)  # nothing open: reopen (update:2)
    no_session_v2 = s.send(WRITE, G, ZCMD, chunk)  # v2: off 0, as a plain upload
    at_zero = s.send(WRITE, G, ZCMD, {**chunk, "off": 0})  # only a plain request opens
    read = s.send(READ, G, ZCMD, {})
    mistyped = [s.send(WRITE, G, ZCMD, {**chunk, k: v}) for k, v in
                (("off", "x"), ("ulen", b"1"), ("data", 5), ("ulen", -1))]
    zero = s.send(WRITE, G, ZCMD, {**chunk, "ulen": 0})
    cap = s.send(WRITE, G, ZCMD, {**chunk, "ulen": ZUPLOAD_MAX + 1})
    state = s.state()
    s.run()
    assert no_session.body == {"rc": 6, "rsn": "update:2"}
    assert no_session_v2.body == {"off": 0}
    bad_stream_v2(at_zero)
    assert read.body == {"rc": 8}
    for rep in mistyped[:3]:
        assert rep.body == {"rc": 3}, rep.body
    assert mistyped[3].body in ({"rc": 3}, {"err": {"group": G, "rc": BAD_STREAM}})
    bad_stream_v2(zero)
    bad_stream_v2(cap)
    nothing_marked(state)


def test_compressed_upload_in_a_small_heap(device, tmp_path: Path) -> None:
    """The plain upload's heap bound (test_smp_fuzz.HEAP) plus the inflater: its 1 KiB window,
    its 1.3 KiB of decoder state and the 2 KiB copy of a request's stream."""
    s = Session(device, tmp_path, "zheap")
    flash = s.dev("zheap", slots=(A, None), size=BIG)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    data = compressible("2.0.0", 100_000)
    first, chunks = zupload(s, data)
    state = s.state()
    s.run(heapsize=f"{int(HEAP[:-1]) + 5}k")
    assert first.body["deflate"] == WBITS
    assert chunks[-1].body == {"off": len(data), "match": True}
    assert flash.slot_bytes(1)[: len(data)] == data
    assert images(state)[1].version == "2.0.0"


def test_heap_bound_is_real(device, tmp_path: Path) -> None:
    """Control: the same compressed upload with 24 KiB less heap runs out of memory, so the
    pass above measures something."""
    s = Session(device, tmp_path, "zheap-small")
    s.dev("zheap", slots=(A, None), size=BIG)
    s.cmd("confirm", 0)
    s.cmd("server", 0)
    data = compressible("2.0.0", 100_000)
    _, chunks = zupload(s, data)
    try:
        s.run(heapsize=f"{int(HEAP[:-1]) - 24}k")
    except AssertionError as err:
        assert "MemoryError" in str(err)  # MicroPython itself ran out
        return
    assert any(r.body == {"rc": 2} for r in chunks)  # ENOMEM
    assert chunks[-1].body != {"off": len(data), "match": True}




# --- end to end: `mpboot flash` against `mpboot sim` (the firmware on the unix port, a pty) ---


def text_app(folder: Path, version: str, size: int, *, confirm: bool = True) -> bytes:
    """An app with a compressible asset (text) beside its main: signed."""
    make_app(folder, version, confirm=confirm)
    (folder / "asset.txt").write_bytes(code_text(size))
    return sign_app(pack_app(folder), signing_key(KEY.name), version)


def test_flash_compressed_then_plain_end_to_end(tmp_path: Path) -> None:
    v2 = tmp_path / "v2.bin"
    v2.write_bytes(text_app(tmp_path / "a2", "2.0.0", 40_000))
    v3 = tmp_path / "v3.bin"
    v3.write_bytes(text_app(tmp_path / "a3", "3.0.0", 40_000))
    sim = SimProcess(tmp_path / "dev", [KEY])
    port = ["--port", sim.path]
    try:
        sim.wait_for(SERVING)
        out = ok("flash", v2, *port, "--confirm", "--reset", "--no-progress")
        m = re.search(r"(\d+) compressed, ([\d.]+)x", out)
        assert m and int(m.group(1)) > 5 and float(m.group(2)) > 2.0, out
        sim.wait_for(r"APP 2\.0\.0")
        sim.wait_for(SERVING)
        out = ok("flash", v3, *port, "--test", "--reset", "--no-progress", "--no-compress")
        assert not re.search(r"\d+ compressed", out) and "marked for a test boot" in out
        sim.wait_for(r"mpboot: slot \d version 3\.0\.0\+0 test boot")
        sim.wait_for(r"APP 3\.0\.0")
    finally:
        assert sim.stop() == 0


# --- power cuts: at every flash operation of a compressed upload (tests/powercut.py) ---------


def zsmp_file(path: Path, data: bytes, ckpt: int = 4096) -> Path:
    """The records of sim_device's zsmp: a client's compressed upload of `data` (SMP v1), from
    each offset its opening may answer, then the test mark."""
    from test_smp_server import packet

    def rec(kind: bytes, payload: bytes) -> bytes:
        return kind + len(payload).to_bytes(4, "big") + payload

    seq = iter(range(1, 10**6))
    out = [rec(b"O", packet(WRITE, IMG, 1, {"off": 0, "len": len(data), "sha": hashlib.sha256(data).digest(),
                                            "data": data[:1024], "deflate": True}, version=V1, seq=next(seq) % 256))]
    for start in [1024] + list(range(ckpt, len(data), ckpt)):
        out.append(rec(b"S", start.to_bytes(4, "big")))
        out += [rec(b"P", packet(WRITE, G, ZCMD, body, version=V1, seq=next(seq) % 256))
                for body in zchunks(data, start)]
    out.append(rec(b"M", packet(WRITE, IMG, 0, {"hash": parse_image(data).digest, "confirm": False}, version=V1,
                                seq=next(seq) % 256)))
    path.write_bytes(b"".join(out))
    return path


def test_power_cut_at_every_flash_operation_of_a_compressed_upload(sim_lib: Path, tmp_path: Path,
                                                                   record_property) -> None:  # type: ignore[no-untyped-def]
    """Update = the compressed upload of a test image and its mark, then two boots (the test
    boot confirms itself): cut at every flash operation of the upload and mark, writes and
    erases torn too. Every cut boots the old or the new image, and the scenario then completes
    as it did uncut (resuming the persisted session where a checkpoint was reached)."""
    from mpboot.sim import Geometry, SimDevice
    from powercut import Matrix, Scenario, Step, run_step, summary
    from simkit import boot, installed

    v1 = tmp_path / "v1.bin"
    v1.write_bytes(text_app(tmp_path / "a1", "1.0.0", 3000))
    v2 = text_app(tmp_path / "a2", "2.0.0", 14_000)
    z = zsmp_file(tmp_path / "v2.zsmp", v2)
    dev = SimDevice(tmp_path / "device", sim_lib, Geometry(64 * 1024, 4096, 16))
    installed(dev.install(v1, "permanent"))
    assert boot(dev).version == "1.0.0"
    dev.age_to(2)  # the state log switches sectors inside the scenario
    m = Matrix(dev, Scenario("zupdate", (Step("zinstall", z), Step("boot"), Step("boot")), "1.0.0", "2.0.0"),
               tmp_path)
    m.trace()
    assert m.expected[0][1] == f"ZDONE off={len(v2)} match=1"
    assert m.expected[1:] == [("boot", "2.0.0", True, "2.0.0"), ("boot", "2.0.0", False, "2.0.0")]
    assert m.ops[0].count("W") >= 8  # several compressed chunks, each programmed
    # The upload's own operations (step 0): cuts in the boots that follow are
    # test_power_cut's, whatever carried the image (and after one, this harness's re-run would
    # mark by the hash of the image then running, which a host does not do).
    counts = m.run_points([p for p in m.points() if p.step == 0], dev)
    line = summary(" (compressed upload)", counts)
    record_property("summary", line + f" ({len(m.ops[0])} flash operations)")
    assert not m.failures, "\n".join(m.failures[:20])
    assert counts["safe"] == sum(counts.values()) > 40
    # Cut at each operation and run the upload again: from a cut past a checkpoint on, the
    # opening resumes there (4096 bytes a step here), and the upload lands whole.
    resumed = []
    for op in range(len(m.ops[0])):
        dev.restore(m.snaps[0])
        assert run_step(dev, m.scenario.steps[0], fault=f"cut={op}").cut
        again = run_step(dev, m.scenario.steps[0])
        assert again.line("ZDONE") == f"ZDONE off={len(v2)} match=1", again.stdout
        first = cbor2.loads(bytes.fromhex(again.stdout.split()[1])[8:])
        if first["off"] > 1024:
            assert first["off"] % 4096 == 0
            resumed.append(first["off"])
    assert len(set(resumed)) >= 2, resumed
