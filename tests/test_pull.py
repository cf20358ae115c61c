"""Device pull (mpboot.pull, firmware/mpboot/puller.py + http.py) on the simulated device: an app
running on the MicroPython unix port pulls a channel record and its image from an HTTP server
this test starts on 127.0.0.1 (port 0, Range-capable, its behaviour switchable per path), and
the next power-on test-boots what it pulled. Every failure case checks that the device keeps
running its image and reports why (the PullError code).
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import KEYS_DIR
from simkit import boot, sign_app

from mpboot import upy
from mpboot.channel import channel_record
from mpboot.errors import PullErrorCode
from mpboot.image import class_uuid, vendor_uuid
from mpboot.keys import SignatureScheme, load_signing_key
from mpboot.pack import pack_app
from mpboot.sim import Geometry, SimDevice
from mpboot.trust import ChannelRecord, sign_envelope

VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("pull-widget", VENDOR)
OTHER_VENDOR = vendor_uuid("other.example")
KEY = load_signing_key(KEYS_DIR / "TEST-ONLY-rsa2048.pem")  # trusted by the simulated device
UNTRUSTED = load_signing_key(KEYS_DIR / "TEST-ONLY-rsa2048-untrusted.pem")
GEOMETRY = Geometry.for_slots(128 * 1024)
RECORD = "/channels/stable.cbor"
IMAGE = "/channels/images/app-2.bin"
FILLER = 60000  # the image spans two 32 KiB checkpoints of the updater


# --- the server ------------------------------------------------------------------------------


@dataclass
class Served:
    path: str
    start: int | None  # the Range start asked (None: no Range)
    status: int
    sent: int  # body bytes sent


@dataclass
class Site:
    """What the server serves: files by path, and per path how (keys of `how`):
    redirect (a 302 to that URL), hang (never answer), length (a Content-Length to claim, body
    as is), range_off (a Content-Range this far off the one asked), chunked,
    ignore_range (always 200, the whole file), drop_at (close after the file's byte N, the
    first `drops` times), stall_at (after byte N set `reached` and wait for `release`)."""

    files: dict[str, bytes] = field(default_factory=dict)
    how: dict[str, dict[str, Any]] = field(default_factory=dict)
    log: list[Served] = field(default_factory=list)
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def requests(self, path: str) -> list[Served]:
        return [s for s in self.log if s.path == path]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        site: Site = self.server.site  # type: ignore[attr-defined]
        how = site.how.get(self.path, {})
        data = site.files.get(self.path)
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else None
        if "redirect" in how:
            self.send_response(302)
            self.send_header("Location", how["redirect"])
            self.send_header("Content-Length", "0")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            site.log.append(Served(self.path, start, 302, 0))
            return
        if how.get("hang"):
            site.release.wait(30)
            self.close_connection = True
            return
        if data is None:
            self.send_error(404)
            return
        status, body_from = 200, 0
        if start is not None and not how.get("ignore_range"):
            if start >= len(data):
                self.send_error(416)
                return
            status, body_from = 206, start
        body = data[body_from:]
        self.send_response(status)
        if how.get("chunked"):
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(how.get("length", len(body))))
        if status == 206:
            a = start + how.get("range_off", 0)  # a server that answers another range than asked
            self.send_header("Content-Range", f"bytes {a}-{len(data) - 1}/{len(data)}")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0
        if how.get("chunked"):
            self.wfile.write(b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
            sent = len(body)
        else:
            end = len(body)
            drop = how.get("drop_at")
            if drop is not None and how.get("drops", 1) > 0 and body_from < drop:
                how["drops"] = how.get("drops", 1) - 1
                end = drop - body_from
            stall = how.get("stall_at")
            if stall is not None and body_from < stall:
                end = stall - body_from
            try:
                self.wfile.write(body[:end])
                self.wfile.flush()
                sent = end
                if stall is not None and end < len(body):
                    site.reached.set()
                    site.release.wait(30)
                if end < len(body):
                    self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        site.log.append(Served(self.path, start, status, sent))


@pytest.fixture
def site() -> Iterator[tuple[Site, str]]:
    s = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.site = s  # type: ignore[attr-defined]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield s, f"http://127.0.0.1:{server.server_address[1]}{RECORD}"
    finally:
        s.release.set()
        server.shutdown()
        server.server_close()


# --- the apps and the device ------------------------------------------------------------------


APP = """import mpboot
print('APP {name}')
if {confirm}:
    print('CONFIRM', mpboot.confirm())
try:
    f = open({ctl!r})
    a = f.read().split()
    f.close()
except OSError:
    a = None
for i in range(int(a[4]) if a else 0):
    try:
        ca = None
        if len(a) > 5 and a[5] != '-':
            with open(a[5], 'rb') as f:
                ca = f.read()
        print('PULLED', mpboot.pull(a[0], timeout_ms=int(a[1]), tries=int(a[2]), deadline_ms=int(a[3]),
                                    cadata=ca, force=len(a) > 6))
    except Exception as e:
        print('PULLERR', e.args[0], e.args[1] if len(e.args) > 1 else 0)
    import mpboot.puller
    print('LAST', mpboot.puller.last)
"""


@dataclass
class World:
    ctl: Path
    v1: bytes
    v2: bytes
    v2_other: bytes  # same version and length as v2, other bytes
    v2_broken: bytes  # v2 whose app never confirms itself: its test boot is reverted


def _app(folder: Path, name: str, ctl: Path, seed: str, confirm: bool = True) -> bytes:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(APP.format(name=name, ctl=str(ctl), confirm=confirm))
    (folder / "filler.bin").write_bytes(random.Random(seed).randbytes(FILLER))
    return pack_app(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    base = tmp_path_factory.mktemp("pull")
    ctl = base / "pull.ctl"

    def signed(name: str, version: str, seed: str, confirm: bool = True) -> bytes:
        return sign_app(_app(base / f"{name}-{seed}", name, ctl, seed, confirm), KEY, version, security_counter=1,
                        vendor_id=VENDOR, class_id=CLASS)

    w = World(ctl, signed("v1", "1.0.0", "a"), signed("v2", "2.0.0", "b"), signed("v2", "2.0.0", "c"),
              signed("v2", "2.0.0", "d", confirm=False))
    assert len(w.v2) == len(w.v2_other) and w.v2 != w.v2_other
    return w


@pytest.fixture
def dev(tmp_path: Path, sim_lib: Path, world: World) -> SimDevice:
    d = SimDevice(tmp_path / "dev", sim_lib, GEOMETRY, vendor_id=VENDOR, class_id=CLASS)
    img = tmp_path / "v1.bin"
    img.write_bytes(world.v1)
    d.install(img, "permanent", chunk=4096)
    world.ctl.unlink(missing_ok=True)
    b = boot(d)
    assert (b.slot, b.version, b.trial) == (0, "1.0.0", False)
    return d


def record(image: bytes, number: int, key: Any = KEY, path: str = "images/app-2.bin") -> bytes:
    return channel_record(image, [key], SignatureScheme.PSS, name="stable", number=number, path=path)


@dataclass
class Pulled:
    outcome: int | None  # the value pull() returned, or None when it raised
    code: int  # PullError code (0: none)
    detail: int
    stdout: str


def pull_all(dev: SimDevice, world: World, url: str, *, timeout_ms: int = 3000, tries: int = 3,
             deadline_ms: int = 20000, times: int = 1, ca: Path | None = None, force: bool = False) -> list[Pulled]:
    """One power-on whose app pulls `times` times: what each pull came to. ca: a CA
    certificate file for https (cadata); force: pull an image that was reverted again."""
    extra = f" {ca or '-'}" if ca or force else ""
    extra += " force" if force else ""
    world.ctl.write_text(f"{url} {timeout_ms} {tries} {deadline_ms} {times}{extra}\n")
    try:
        out = dev.boot().stdout
    finally:
        world.ctl.unlink(missing_ok=True)
    got = []
    for line in out.splitlines():
        w = line.split()
        if w[:1] == ["PULLED"]:
            got.append(Pulled(int(w[1]), 0, 0, out))
        if w[:1] == ["PULLERR"]:
            got.append(Pulled(None, int(w[1]), int(w[2]), out))
    assert len(got) == times, out
    return got


def pull(dev: SimDevice, world: World, url: str, **kw: Any) -> Pulled:
    return pull_all(dev, world, url, **kw)[0]


def keeps_running_v1(dev: SimDevice) -> None:
    b = boot(dev)
    assert (b.slot, b.version, b.trial, b.app) == (0, "1.0.0", False, "v1"), b


INSTALLED, REVERTED, PENDING, CURRENT = 3, 2, 1, 0


# --- the cases -------------------------------------------------------------------------------


def test_clean_pull_then_the_next_boot_test_boots_it(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    p, again = pull_all(dev, world, url, times=2)
    assert p.outcome == INSTALLED, p.stdout
    assert "LAST (True, 3, 0, 1)" in p.stdout
    # Again in the same power-on: the free slot holds it, marked for its test boot.
    assert again.outcome == PENDING
    # One request for the record (each time), one for the image (a Range from 0).
    assert [(r.start, r.status) for r in s.requests(RECORD)] == [(None, 200)] * 2
    assert [(r.start, r.status, r.sent) for r in s.requests(IMAGE)] == [(0, 206, len(world.v2))]
    # The next power-on test-boots it; that app confirms itself and pulls: nothing to do.
    p = pull(dev, world, url)
    assert p.outcome == CURRENT
    assert "mpboot: slot 1 version 2.0.0+0 test boot" in p.stdout and "APP v2" in p.stdout
    assert len(s.requests(IMAGE)) == 1
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", False)


def test_a_dropped_connection_resumes_at_the_next_byte(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"drop_at": 40000}
    p = pull(dev, world, url)
    assert p.outcome == INSTALLED, p.stdout
    assert [(r.start, r.status, r.sent) for r in s.requests(IMAGE)] == [
        (0, 206, 40000), (40000, 206, len(world.v2) - 40000)]
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", True)


def checkpointed(dev: SimDevice, offset: int) -> bool:
    """Whether a state record in the flash file names an upload session at `offset` (its
    SOFF field, docs/BOOT.md: magic "MPBS", then the fields of state._FMT; SOFF at byte 60)."""
    g = dev.geometry
    chip = dev.flash.read_bytes()
    for sector in (g.state_start, g.state_start + g.sector):
        for at in range(sector, sector + g.sector - 95, 96):
            if chip[at : at + 4] == b"MPBS" and int.from_bytes(chip[at + 60 : at + 64], "little") == offset:
                return True
    return False


def test_a_device_reset_mid_body_resumes_at_its_checkpoint(dev: SimDevice, world: World,
                                                           site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"stall_at": 45000}
    world.ctl.write_text(f"{url} 20000 3 60000 1\n")
    cmd, env, cwd = upy.command(["-m", "sim_device", dev.config, "boot"], path=[dev.lib], heapsize=dev.heapsize)
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert s.reached.wait(60), "the device never got 45000 bytes"
        # Wait (bounded) until the updater's checkpoint at 32768 is in the state area: the
        # device has the first 45000 bytes on the wire, and the condition is what flash holds.
        deadline = time.monotonic() + 30
        while not checkpointed(dev, 32768):
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        proc.kill()  # the power goes, mid-body
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        world.ctl.unlink(missing_ok=True)
    s.how.pop(IMAGE)
    s.release.set()
    p = pull(dev, world, url)
    assert p.outcome == INSTALLED, p.stdout
    starts = [r.start for r in s.requests(IMAGE)]
    assert starts[-1] == 32768, s.log  # the updater's last checkpoint before the cut
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", True)


def test_a_lower_channel_number_is_stale(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v1, 5, path="images/app-1.bin")
    assert pull(dev, world, url).outcome == CURRENT  # number 5 taken, nothing to fetch
    s.files[RECORD] = record(world.v2, 4)
    s.files[IMAGE] = world.v2
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.STALE, 5), p.stdout
    assert "LAST (False, 4, 5, 4)" in p.stdout
    assert not s.requests(IMAGE)
    keeps_running_v1(dev)


def test_the_same_number_with_another_body_is_refused(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v1, 5, path="images/app-1.bin")
    assert pull(dev, world, url).outcome == CURRENT
    s.files[RECORD] = record(world.v2, 5)  # a rolled-back (or forked) channel
    s.files[IMAGE] = world.v2
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.STALE, 5), p.stdout
    keeps_running_v1(dev)


def test_an_image_other_than_the_record_names_is_refused(dev: SimDevice, world: World,
                                                         site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2_other  # signed, same version and length: not the record's bytes
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.MISMATCH, 10), p.stdout  # image.E_HASH_MISMATCH
    keeps_running_v1(dev)


def test_huge_bodies_and_lengths_are_refused(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.how[RECORD] = {"length": 10**9}
    p = pull(dev, world, url)
    assert p.code == PullErrorCode.TOO_LARGE, p.stdout
    s.how.pop(RECORD)
    s.files[RECORD] = bytes(5000)  # a 5000-byte "record"
    assert pull(dev, world, url).code == PullErrorCode.TOO_LARGE
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2 + bytes(100000)  # served whole, longer than the record says
    s.how[IMAGE] = {"ignore_range": True}
    p = pull(dev, world, url)
    assert p.code == PullErrorCode.TOO_LARGE, p.stdout
    keeps_running_v1(dev)


def test_a_server_that_ignores_range(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"ignore_range": True, "drop_at": 20000}
    # From byte 0 a 200 with the whole file will do; resuming from 20000 it will not.
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.HTTP, 200), p.stdout
    keeps_running_v1(dev)
    s.how[IMAGE] = {"ignore_range": True}
    assert pull(dev, world, url).outcome == INSTALLED


def test_a_chunked_body_is_refused(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"chunked": True}
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.HTTP, 206), p.stdout
    keeps_running_v1(dev)


def test_a_record_the_device_does_not_trust_is_refused(dev: SimDevice, world: World,
                                                       site: tuple[Site, str]) -> None:
    s, url = site
    s.files[IMAGE] = world.v2
    s.files[RECORD] = record(world.v2, 1, key=UNTRUSTED)
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.SIGNATURE, 18), p.stdout  # records.E_SIGNATURES
    bad = bytearray(record(world.v2, 1))
    bad[-3] ^= 0x40  # the trusted key's signature, one bit off
    s.files[RECORD] = bytes(bad)
    assert pull(dev, world, url).code == PullErrorCode.SIGNATURE
    assert not s.requests(IMAGE)
    # The refused records left no channel number behind: number 1 is still taken.
    s.files[RECORD] = record(world.v2, 1)
    assert pull(dev, world, url).outcome == INSTALLED


def test_another_vendors_record_is_refused(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    import hashlib

    s, url = site
    s.files[IMAGE] = world.v2
    body = ChannelRecord(1, "stable", OTHER_VENDOR, CLASS, hashlib.sha256(world.v2).digest(), len(world.v2),
                         bytes([2, 0, 0, 0, 0, 0, 0, 0]), 1, "images/app-2.bin")
    s.files[RECORD] = sign_envelope(body, [KEY], SignatureScheme.PSS)
    p = pull(dev, world, url)
    assert p.code == PullErrorCode.PRODUCT, p.stdout
    assert not s.requests(IMAGE)
    keeps_running_v1(dev)


def test_a_server_that_hangs_is_bounded_by_the_timeouts(dev: SimDevice, world: World,
                                                        site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.how[RECORD] = {"hang": True}
    t0 = time.monotonic()
    p = pull(dev, world, url, timeout_ms=400, tries=2, deadline_ms=5000)
    assert time.monotonic() - t0 < 15
    assert (p.code, p.detail) == (PullErrorCode.NETWORK, 110), p.stdout
    # A body that stops mid-way: the overall deadline ends it (before timeout_ms).
    s.how[RECORD] = {}
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"stall_at": 10000}
    t0 = time.monotonic()
    p = pull(dev, world, url, timeout_ms=20000, tries=1, deadline_ms=2000)
    assert time.monotonic() - t0 < 10
    assert (p.code, p.detail) == (PullErrorCode.NETWORK, 110), p.stdout
    keeps_running_v1(dev)
    # With tries left, the connection that stalled is given up after timeout_ms and the next
    # one resumes at the next byte: every byte that arrived before the stall was kept (a read
    # returns what has arrived, it does not wait to fill its buffer).
    p = pull(dev, world, url, timeout_ms=300, tries=3, deadline_ms=10000)
    assert p.outcome == INSTALLED, p.stdout
    assert [r.start for r in s.requests(IMAGE)] == [10000]  # (the stalled ones are not logged yet)
    s.release.set()


def test_an_image_that_failed_its_test_boot_is_not_pulled_again(dev: SimDevice, world: World,
                                                                site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2_broken, 1)
    s.files[IMAGE] = world.v2_broken
    assert pull(dev, world, url).outcome == INSTALLED
    b = boot(dev)  # its test boot: the app never confirms
    assert (b.slot, b.version, b.trial, b.confirmed) == (1, "2.0.0", True, None)
    # The next power-on reverts to v1, whose app pulls: the free slot holds that image,
    # unmarked: it was tried and not kept.
    p = pull(dev, world, url)
    assert p.outcome == REVERTED, p.stdout
    assert "mpboot: slot 0 version 1.0.0+0" in p.stdout
    assert len(s.requests(IMAGE)) == 1
    # force=True: fetched and marked again.
    assert pull(dev, world, url, force=True).outcome == INSTALLED
    assert len(s.requests(IMAGE)) == 2


def test_a_board_without_a_trust_area_does_not_pull(tmp_path: Path, sim_lib: Path, world: World,
                                                    site: tuple[Site, str]) -> None:
    s, url = site
    d = SimDevice(tmp_path / "old", sim_lib, Geometry(GEOMETRY.size, GEOMETRY.sector, trust=False),
                  vendor_id=VENDOR, class_id=CLASS)
    img = tmp_path / "v1.bin"
    img.write_bytes(world.v1)
    d.install(img, "permanent", chunk=4096)
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    p = pull(d, world, url)
    assert p.code == PullErrorCode.NO_TRUST_AREA, p.stdout  # it could not keep the number
    assert not s.requests(IMAGE)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A self-signed server certificate for localhost (cert, key, cert as DER), and the DER of
    another one (a CA the server's certificate does not chain to)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    base = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)
    ders = []
    for n in ("server", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .sign(key, hashes.SHA256()))
        (base / f"{n}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (base / f"{n}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        (base / f"{n}.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
        ders.append(base / f"{n}.der")
    return base / "server.pem", base / "server.key", ders[0], ders[1]


def test_pull_over_https_checks_the_server_when_given_a_ca(dev: SimDevice, world: World,
                                                           tls_files: tuple[Path, Path, Path, Path]) -> None:
    import ssl

    cert, key, ca, other = tls_files
    s = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.site = s  # type: ignore[attr-defined]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"https://localhost:{server.server_address[1]}{RECORD}"
        s.files[RECORD] = record(world.v2, 1)
        s.files[IMAGE] = world.v2
        p = pull(dev, world, url, ca=other)  # a server the app's CA did not sign: refused
        assert p.code == PullErrorCode.NETWORK, p.stdout
        assert not s.log
        p = pull(dev, world, url, ca=ca)
        assert p.outcome == INSTALLED, p.stdout
    finally:
        server.shutdown()
        server.server_close()


# The pull's own heap: a power-on that decides and records the boot as boot.run does, without
# running the app (on the unix port the boot copies the image it runs into RAM: a board maps
# it), then pulls. Slots, the trust state and the firmware's .mpy modules are in that heap too.
PULL_ONLY = """
import sys, gc
import mpboot, mpboot_keys, sim_config
from mpboot import boot
from mpboot.ports import unix as port
from mpboot.slots import Slots
cfg, chip, policy = sim_config.load(sys.argv[1])
a = sim_config.areas(cfg, chip)
slots = Slots(a[0], a[1], a[2], mpboot_keys.KEYS, mapped=port.mapped, factory=a[3], trust=a[4], **policy)
slot, info, trial = slots.decide()
boot.set_booted(slots, slot, info, None, boot.HOW_CONFIRMED)
gc.collect()
try:
    print("PULLED", mpboot.pull(sys.argv[2], timeout_ms=3000))
except Exception as e:
    print("PULLERR", e.args)
"""
PULL_HEAP = "96k"


def test_a_pull_fits_a_small_heap(dev: SimDevice, world: World, site: tuple[Site, str], tmp_path: Path) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"drop_at": 30000}  # the resume path too
    (tmp_path / "pull_only.py").write_text(PULL_ONLY)
    proc = upy.run([tmp_path / "pull_only.py", dev.config, url], path=[dev.lib], heapsize=PULL_HEAP)
    assert "PULLED 3" in proc.stdout, proc.stdout + proc.stderr
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", True)


def test_redirects_are_followed_three_times_at_most(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    s, url = site
    root = url[: -len(RECORD)]
    s.files["/real/stable.cbor"] = record(world.v2, 1)
    s.files["/real/images/app-2.bin"] = world.v2
    chain = [RECORD, "/r1", "/r2", "/r3"]
    for a, b in zip(chain, chain[1:] + ["/real/stable.cbor"]):
        s.how[a] = {"redirect": root + b}
    p = pull(dev, world, url)  # four redirects
    assert (p.code, p.detail) == (PullErrorCode.HTTP, 302), p.stdout
    keeps_running_v1(dev)
    s.how[RECORD] = {"redirect": root + "/r2"}  # three
    s.files[IMAGE] = world.v2  # (the image's path is relative to the URL the app gave)
    assert pull(dev, world, url).outcome == INSTALLED


def test_a_content_range_other_than_asked_is_refused(dev: SimDevice, world: World,
                                                     site: tuple[Site, str]) -> None:
    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2
    s.how[IMAGE] = {"range_off": 1}
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.HTTP, 206), p.stdout
    keeps_running_v1(dev)


def test_a_device_without_ids_of_its_own_takes_the_running_images(tmp_path: Path, sim_lib: Path, world: World,
                                                                  site: tuple[Site, str]) -> None:
    # No vendor or class in its build or factory record: the record must name the running
    # image's, and another vendor's record is still refused.
    import hashlib

    s, url = site
    d = SimDevice(tmp_path / "noids", sim_lib, GEOMETRY)
    img = tmp_path / "v1.bin"
    img.write_bytes(world.v1)
    d.install(img, "permanent", chunk=4096)
    s.files[IMAGE] = world.v2
    body = ChannelRecord(1, "stable", OTHER_VENDOR, CLASS, hashlib.sha256(world.v2).digest(), len(world.v2),
                         bytes([2, 0, 0, 0, 0, 0, 0, 0]), 1, "images/app-2.bin")
    s.files[RECORD] = sign_envelope(body, [KEY], SignatureScheme.PSS)
    assert pull(d, world, url).code == PullErrorCode.PRODUCT
    s.files[RECORD] = record(world.v2, 1)
    assert pull(d, world, url).outcome == INSTALLED


def test_device_info_reports_the_last_pull_and_the_channel_number(dev: SimDevice, world: World,
                                                                  site: tuple[Site, str]) -> None:
    """The app pulls at power-on, then the update service runs (as sim_serve does): `mpboot
    state` shows the highest channel number the trust area holds, and the outcome of the
    pull of this boot (mpboot.puller.last, device info "pull"); a boot without a pull has no
    "pull"."""
    import json

    from clikit import assert_ok, run
    from conftest import trusted_public_keys
    from udpkit import SimUdp, free_udp_port

    s, url = site
    s.files[RECORD] = record(world.v2, 1)
    s.files[IMAGE] = world.v2

    def power_on(pulls: bool) -> tuple[dict[str, Any], str, list[str]]:
        if pulls:
            world.ctl.write_text(f"{url} 3000 3 20000 1\n")
        port = free_udp_port()
        try:
            with SimUdp(dev.workdir, trusted_public_keys(), port, vendor_id=VENDOR, class_id=CLASS) as sim:
                sim.wait_for(r"LAST" if pulls else r"APP v")
                sim.wait_for(r"device: .*serving SMP over UDP")
                link = ("--udp", f"127.0.0.1:{port}")
                shown = json.loads(assert_ok(run("state", *link, "--json")).stdout)
                text = assert_ok(run("state", *link)).stdout
                return shown, text, sim.lines
        finally:
            world.ctl.unlink(missing_ok=True)

    shown, text, lines = power_on(False)  # nothing taken, nothing pulled: neither is reported
    assert "channel" not in shown and "pull" not in shown and "channel number" not in text
    shown, text, lines = power_on(True)
    assert any("PULLED 3" in line for line in lines), lines
    assert shown["channel"] == 1
    assert shown["pull"] == {"ok": True, "outcome": "installed", "code": 3, "detail": 0, "number": 1}
    assert "channel number 1 taken; last pull installed, record number 1" in text
    # The same number with another body: STALE, detail the number taken. (This power-on
    # test-boots v2, whose app pulls too.)
    s.files[RECORD] = record(world.v2_other, 1)
    shown, text, lines = power_on(True)
    assert any("APP v2" in line for line in lines) and any("PULLERR 4 1" in line for line in lines), lines
    assert shown["pull"] == {"ok": False, "error": "STALE", "code": 4, "detail": 1, "number": 1}
    assert "last pull failed: STALE (detail 1), record number 1" in text
    # No pull in this boot: no "pull"; the number stays.
    shown, text, lines = power_on(False)
    assert shown["channel"] == 1 and "pull" not in shown
    assert "channel number 1 taken" in text and "last pull" not in text


def test_device_info_pull_fields_are_checked_on_the_host() -> None:
    """A "chan" or "pull" of the wrong shape is a protocol error (one line), not a crash; both
    absent (a device that took and pulled nothing) are None."""
    from mpboot.errors import ProtocolError
    from mpboot.smp.client import _pull_fields
    from mpboot.smp.messages import PullOutcome

    assert _pull_fields({}, "device info") == {}
    got = _pull_fields({"chan": 7, "pull": [False, 4, 6, 5]}, "device info")
    assert got == {"channel": 7, "pull": PullOutcome(False, 4, 6, 5)}
    assert got["pull"].words == "failed: STALE (detail 6)"
    assert PullOutcome(True, 1, 0, 5).words == "pending" and PullOutcome(False, 99, 0, 0).name == "code 99"
    for bad in ({"chan": -1}, {"chan": True}, {"pull": [True, 3, 0]}, {"pull": [1, 3, 0, 1]},
                {"pull": [True, True, 0, 1]}, {"pull": [True, 3, 0, -1]}, {"pull": "installed"}):
        with pytest.raises(ProtocolError):
            _pull_fields(bad, "device info")


# --- review 2 (docs/THREAT_MODEL.md "Device pull"): the image is bound to the record ------------


def test_an_image_of_another_vendor_is_refused_on_a_device_without_ids(tmp_path: Path, sim_lib: Path, world: World,
                                                                       site: tuple[Site, str]) -> None:
    """A device with no ids of its own checks the record against the running image's; the image
    the record names must then carry the record's vendor too, or a record for this product could
    install another vendor's (validly signed) image."""
    import hashlib

    s, url = site
    other = sign_app(_app(tmp_path / "o", "OTHER", world.ctl, "o"), KEY, "2.0.0", security_counter=1,
                     vendor_id=OTHER_VENDOR, class_id=CLASS)
    d = SimDevice(tmp_path / "noids", sim_lib, GEOMETRY)
    img = tmp_path / "v1.bin"
    img.write_bytes(world.v1)
    d.install(img, "permanent", chunk=4096)
    s.files[IMAGE] = other
    body = ChannelRecord(1, "stable", VENDOR, CLASS, hashlib.sha256(other).digest(), len(other),
                         bytes([2, 0, 0, 0, 0, 0, 0, 0]), 1, "images/app-2.bin")
    s.files[RECORD] = sign_envelope(body, [KEY], SignatureScheme.PSS)
    p, again = pull_all(d, world, url, times=2)
    assert (p.code, p.detail) == (PullErrorCode.MISMATCH, 32), p.stdout  # record key 32: vendor
    # The free slot holds exactly the record's bytes, never marked: not PENDING or REVERTED
    # at the next pull, the same refusal (without a second download).
    assert (again.code, again.detail) == (PullErrorCode.MISMATCH, 32), again.stdout
    assert len(s.requests(IMAGE)) == 1
    # The record's vendor and another class in the image: refused the same way (key 33).
    im = sign_app(_app(tmp_path / "c", "CLS", world.ctl, "c"), KEY, "2.0.0", security_counter=1,
                  vendor_id=VENDOR, class_id=class_uuid("other-widget", VENDOR))
    body = ChannelRecord(2, "stable", VENDOR, CLASS, hashlib.sha256(im).digest(), len(im),
                         bytes([2, 0, 0, 0, 0, 0, 0, 0]), 1, "images/app-2.bin")
    s.files[RECORD] = sign_envelope(body, [KEY], SignatureScheme.PSS)
    s.files[IMAGE] = im
    p = pull(d, world, url)
    assert (p.code, p.detail) == (PullErrorCode.MISMATCH, 33), p.stdout
    keeps_running_v1(d)


def test_an_image_whose_counter_is_not_the_records_is_refused(dev: SimDevice, world: World, site: tuple[Site, str],
                                                              tmp_path: Path) -> None:
    """A record says counter 1 (inside a delegate's certified range, say) and names an image
    with counter 900: refused before its test mark, or its confirm would lift the floor to 900."""
    import hashlib

    s, url = site
    hi = sign_app(_app(tmp_path / "h", "HI", world.ctl, "h"), KEY, "2.0.0", security_counter=900,
                  vendor_id=VENDOR, class_id=CLASS)
    body = ChannelRecord(1, "stable", VENDOR, CLASS, hashlib.sha256(hi).digest(), len(hi),
                         bytes([2, 0, 0, 0, 0, 0, 0, 0]), 1, "images/app-2.bin")
    s.files[RECORD] = sign_envelope(body, [KEY], SignatureScheme.PSS)
    s.files[IMAGE] = hi
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.MISMATCH, 37), p.stdout  # record key 37: counter
    assert "LAST (False, 6, 37, 1)" in p.stdout
    keeps_running_v1(dev)


def test_an_image_refused_at_finish_is_not_reported_reverted(dev: SimDevice, world: World, site: tuple[Site, str],
                                                             tmp_path: Path) -> None:
    """The free slot holds the record's exact bytes after finish() refused them (a key this
    device does not trust): the next pull says so again, not REVERTED (it never test-booted)."""
    s, url = site
    bad = sign_app(_app(tmp_path / "u", "UNTR", world.ctl, "q"), UNTRUSTED, "2.0.0", security_counter=1,
                   vendor_id=VENDOR, class_id=CLASS)
    s.files[RECORD] = record(bad, 1)
    s.files[IMAGE] = bad
    a, b = pull_all(dev, world, url, times=2)
    assert (a.code, a.detail) == (PullErrorCode.IMAGE, 12), a.stdout  # image.E_UNKNOWN_KEY
    assert (b.code, b.detail) == (PullErrorCode.IMAGE, 12), b.stdout
    assert "LAST (False, 10, 12, 1)" in b.stdout
    # After a reset too (nothing in RAM), and with force=True (the same bytes would be refused).
    c = pull(dev, world, url, force=True)
    assert (c.code, c.detail) == (PullErrorCode.IMAGE, 12), c.stdout
    assert len(s.requests(IMAGE)) == 1
    keeps_running_v1(dev)


def test_a_location_that_is_not_text_is_a_pull_error(dev: SimDevice, world: World, site: tuple[Site, str]) -> None:
    """A redirect whose Location is not printable ASCII: PullError HTTP (status), never another
    exception (the app's handler reads e.args[0], e.args[1]), and `last` is this pull's."""
    s, url = site
    s.files[RECORD] = record(world.v1, 1, path="images/app-1.bin")
    s.files[IMAGE] = world.v2
    assert pull(dev, world, url).outcome == CURRENT
    s.files[RECORD] = record(world.v2, 2)
    s.how[RECORD] = {"redirect": "http://\xff\xfe/x"}
    p = pull(dev, world, url)
    assert (p.code, p.detail) == (PullErrorCode.HTTP, 302), p.stdout
    assert "LAST (False, 2, 302, 0)" in p.stdout
    keeps_running_v1(dev)


# --- mpboot.http on its own (the unix port) ------------------------------------------------------

HTTP_GET = """
import sys, time
from mpboot import http
line = bytearray(512)
t0 = time.ticks_ms()
try:
    r = http.get(sys.argv[1], 0, -1, 4096, line, time.ticks_add(t0, int(sys.argv[2])), int(sys.argv[3]))
    b = bytearray(r.length)
    n = 0
    while n < len(b):
        n += r.readinto(memoryview(b)[n:])
    r.close()
    print("OK", r.status, bytes(b).decode())
except http.HttpError as e:
    print("ERR", e.args[0], e.args[1])
print("MS", time.ticks_diff(time.ticks_ms(), t0))
print("JOIN", http.join("http://h/a/stable.cbor?sig=ab/cd", "images/x.bin"), http.join("http://h/a/b#f/g", "y"))
"""


def http_get(sim_lib: Path, tmp_path: Path, url: str, deadline_ms: int, timeout_ms: int) -> tuple[str, int]:
    """mpboot.http.get(url) on the unix port: ("OK status body" or "ERR code detail", its ms)."""
    script = tmp_path / "http_get.py"
    script.write_text(HTTP_GET)
    proc = upy.run([script, url, str(deadline_ms), str(timeout_ms)], path=[sim_lib], timeout=120)
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("MS "), proc.stdout + proc.stderr
    assert lines[2] == "JOIN http://h/a/images/x.bin http://h/a/y"  # a query or fragment is not a folder
    return lines[0], int(lines[1].split()[1])


def _serve_once(listener: socket.socket, got: list[bytes], reply: bytes) -> None:
    """Accept connections on `listener`; keep each request's head in `got`, answer `reply`."""
    while True:
        try:
            c, _ = listener.accept()
        except OSError:
            return
        with c:
            head = b""
            while b"\r\n\r\n" not in head:
                d = c.recv(4096)
                if not d:
                    break
                head += d
            got.append(head)
            c.sendall(reply)


def test_http_refuses_to_connect_after_the_deadline(sim_lib: Path, tmp_path: Path) -> None:
    ls = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []
    threading.Thread(target=_serve_once, args=(ls, got, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
                     daemon=True).start()
    try:
        port = ls.getsockname()[1]
        assert http_get(sim_lib, tmp_path, f"http://127.0.0.1:{port}/x", 3000, 1000)[0] == "OK 200 hi"
        assert len(got) == 1
        line, ms = http_get(sim_lib, tmp_path, f"http://127.0.0.1:{port}/x", 0, 1000)  # the deadline is now
        assert line == "ERR 1 110"
        assert len(got) == 1  # no connection was made
    finally:
        ls.close()


def test_http_sends_an_ipv6_literal_host_in_brackets(sim_lib: Path, tmp_path: Path) -> None:
    ls = socket.create_server(("::1", 0), family=socket.AF_INET6)
    got: list[bytes] = []
    threading.Thread(target=_serve_once, args=(ls, got, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
                     daemon=True).start()
    try:
        port = ls.getsockname()[1]
        assert http_get(sim_lib, tmp_path, f"http://[::1]:{port}/x", 3000, 1000)[0] == "OK 200 hi"
        assert f"\r\nHost: [::1]:{port}\r\n".encode() in got[0], got
    finally:
        ls.close()


def test_https_is_bounded_by_the_deadline_too(sim_lib: Path, tmp_path: Path,
                                              tls_files: tuple[Path, Path, Path, Path]) -> None:
    """A TLS server behind a relay that passes its bytes on one at a time, 20 ms apart: the
    handshake alone takes ~30 s, each recv much less than timeout_ms. The deadline (1.5 s)
    ends it, handshake included."""
    import ssl

    cert, key, _, _ = tls_files
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = socket.create_server(("127.0.0.1", 0))
    relay = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def tls_server() -> None:
        while not stop.is_set():
            try:
                c, _ = server.accept()
                with ctx.wrap_socket(c, server_side=True) as t:
                    t.recv(1000)
                    t.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            except OSError:
                pass

    def pipe(a: socket.socket, b: socket.socket, delay: float) -> None:
        try:
            while not stop.is_set():
                d = a.recv(1 if delay else 4096)
                if not d:
                    break
                b.sendall(d)
                time.sleep(delay)  # (the trickle itself, not synchronisation)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def relay_loop() -> None:
        while not stop.is_set():
            try:
                c, _ = relay.accept()
            except OSError:
                return
            u = socket.create_connection(server.getsockname())
            threading.Thread(target=pipe, args=(c, u, 0), daemon=True).start()
            threading.Thread(target=pipe, args=(u, c, 0.02), daemon=True).start()

    threading.Thread(target=tls_server, daemon=True).start()
    threading.Thread(target=relay_loop, daemon=True).start()
    try:
        line, ms = http_get(sim_lib, tmp_path, f"https://localhost:{relay.getsockname()[1]}/x", 1500, 1000)
        assert line == "ERR 1 110", line
        assert ms < 2500, ms
    finally:
        stop.set()
        server.close()
        relay.close()
