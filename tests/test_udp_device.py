"""SMP over UDP on the device (firmware/mpboot/transport/udp.py, mpboot.transport.udp.UdpLink) on the
MicroPython unix port, with raw datagrams from this process:

- the simulated device (SimServer(udp=), the real Server, its real heap) answers two packets in
  one datagram with two datagrams, an oversize datagram with EMSGSIZE, a header whose length
  runs past the datagram with EINVAL, each datagram to its own sender, and a reset by ending
  that power-on (the next one serves again on the same port);
- a driver (below) runs serve() over port.udp() with the transport stub at a small heap:
  allow= drops other senders unanswered, tick() runs while idle, fewer than 8 bytes are
  dropped, a server exception costs that request only, and serve() returns on a reset, once
  the reset's reply is sent and the link drained (UdpLink: about 250 ms);
- a link whose datagrams never stop (each one dropped: refused, oversize, short, empty) still
  gets tick() about once a second.

Every wait is on a datagram or a line the device prints; nothing sleeps."""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cbor2
import pytest
from conftest import KEYS_DIR
from udpkit import SimUdp, free_udp_port

from mpboot import upy
from mpboot.keys import load_public_key
from mpboot.upy import mpy_cross_compile

ROOT = Path(__file__).resolve().parents[1]
FIRMWARE = ROOT / "firmware" / "mpboot"
KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
RECV_TIMEOUT_S = 10.0
SERVING = r"serving SMP over UDP on 127\.0\.0\.1:(\d+) \(buf_size (\d+), buf_count (\d+)\)"


def request(op: int, group: int, cmd: int, seq: int, body: object, *, length: int | None = None) -> bytes:
    data = cbor2.dumps(body)
    n = len(data) if length is None else length
    return bytes([op | 1 << 3, 0]) + n.to_bytes(2, "big") + group.to_bytes(2, "big") + bytes([seq, cmd]) + data


def echo(seq: int, text: str) -> bytes:
    return request(2, 0, 0, seq, {"d": text})


def client() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(RECV_TIMEOUT_S)
    return s


def reply(s: socket.socket) -> tuple[bytes, dict[str, object]]:
    data, _ = s.recvfrom(4096)
    assert len(data) >= 8 and int.from_bytes(data[2:4], "big") == len(data) - 8, data
    return data[:8], cbor2.loads(data[8:]) if len(data) > 8 else {}


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimUdp]:
    """A fresh simulated device (recovery: no image) serving SMP over UDP."""
    state = tmp_path_factory.mktemp("udp") / "dev"
    with SimUdp(state, [load_public_key(KEY)], free_udp_port()) as s:
        s.wait_for(SERVING)
        yield s


def test_sim_announces_port_and_clamped_sizes(sim: SimUdp) -> None:
    assert any(f"mpboot sim: serving SMP over UDP on 127.0.0.1:{sim.port}" == line for line in sim.lines)
    m = next(m for m in map(__import__("re").compile(SERVING).search, sim.lines) if m)
    assert m.groups() == (str(sim.port), "1472", "4")  # 2048 asked for, one datagram's worth served
    with client() as s:
        s.sendto(request(0, 0, 6, 2, {}), ("127.0.0.1", sim.port))
        _, rsp = reply(s)
    assert rsp == {"buf_size": 1472, "buf_count": 4}


def test_two_packets_in_one_datagram_get_two_replies(sim: SimUdp) -> None:
    with client() as s:
        s.sendto(echo(10, "first") + echo(12, "second"), ("127.0.0.1", sim.port))
        (h1, r1), (h2, r2) = reply(s), reply(s)
    assert (h1[6], r1) == (10, {"r": "first"}) and (h2[6], r2) == (12, {"r": "second"})
    assert h1[0] & 7 == 3 and h1[4:6] == b"\x00\x00"


def test_oversize_datagram_gets_emsgsize(sim: SimUdp) -> None:
    big = echo(20, "x" * 1500)  # 1511 bytes: more than the 1472 the device reads
    assert len(big) > 1472
    with client() as s:
        s.sendto(big, ("127.0.0.1", sim.port))
        h, rsp = reply(s)
        assert (h[6], h[7], rsp) == (20, 0, {"rc": 7})
        # The largest datagram it takes is answered.
        n = 1472 - len(echo(22, "")) - 2  # (a text this long has a 2-byte length)
        fit = echo(22, "y" * n)
        assert len(fit) == 1472
        s.sendto(fit, ("127.0.0.1", sim.port))
        h, rsp = reply(s)
        assert h[6] == 22 and rsp == {"r": "y" * n}


def test_header_longer_than_the_datagram_gets_einval_and_ends_it(sim: SimUdp) -> None:
    short = request(2, 0, 0, 30, {"d": "abc"}, length=200)  # says 200 bytes follow; 5 do
    with client() as s:
        s.sendto(short + echo(32, "never"), ("127.0.0.1", sim.port))  # its rest is part of it
        h, rsp = reply(s)
        assert h[6] == 30 and rsp == {"rc": 3}
        s.sendto(echo(34, "after"), ("127.0.0.1", sim.port))
        h, rsp = reply(s)
        assert h[6] == 34 and rsp == {"r": "after"}  # (32 was never answered)


def test_each_datagram_is_answered_to_its_sender(sim: SimUdp) -> None:
    with client() as a, client() as b:
        a.sendto(echo(40, "to a"), ("127.0.0.1", sim.port))
        b.sendto(echo(40, "to b"), ("127.0.0.1", sim.port))
        assert reply(b)[1] == {"r": "to b"}
        assert reply(a)[1] == {"r": "to a"}


def test_reset_ends_the_power_on_and_the_next_serves(sim: SimUdp) -> None:
    with client() as s:
        s.sendto(request(2, 0, 5, 50, {}) + echo(52, "behind the reset"), ("127.0.0.1", sim.port))
        h, rsp = reply(s)
        assert (h[6], h[7], rsp) == (50, 5, {})
        sim.wait_for(r"mpboot sim: device reset")
        sim.wait_for(SERVING)
        s.sendto(echo(54, "back"), ("127.0.0.1", sim.port))
        h, rsp = reply(s)
        assert (h[6], rsp) == (54, {"r": "back"})  # and nothing for 52: it stayed unread


# ---------------------------------------------------------------- serve() over a stub server

DRIVER = """
import sys
import time
from mpboot.ports import unix as port
from mpboot.transport import udp
from smp_stub import Stub

args = dict(a.split("=", 1) for a in sys.argv[1:])
allow = args["allow"].split(",") if "allow" in args else None
link = port.udp(int(args["port"]), allow=allow)
server = Stub(int(args.get("buf", "256")))
ticks = [0]


def tick():
    ticks[0] += 1
    if ticks[0] == 1:
        print("READY")


# The link's last two calls (sendto, drain: how long it took), for the reset's drain.
last = ["", ""]
_sendto = link.sendto


def sendto(buf, addr):
    last[0], last[1] = last[1], "sendto"
    _sendto(buf, addr)


link.sendto = sendto
if hasattr(link, "drain"):
    _drain = link.drain

    def drain():
        t = time.ticks_ms()
        _drain()
        last[0], last[1] = last[1], "drain %d" % time.ticks_diff(time.ticks_ms(), t)

    link.drain = drain

stats = udp.Stats()
udp.serve(link, server, tick, stats)
print("DONE handled=%d datagrams=%d oversize=%d short=%d refused=%d" % (
    server.count, stats.datagrams, stats.oversize, stats.short, stats.refused))
print("LAST %s,%s" % (last[0], last[1]))
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lib = tmp_path_factory.mktemp("udp-lib")
    for rel in ("__init__.py", "transport/__init__.py", "transport/udp.py", "ports/__init__.py", "ports/unix.py",
                "ports/nor_sim.py", "flash.py"):
        target = lib / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    mpy_cross_compile(ROOT / "tests" / "device" / "smp_stub.py", lib / "smp_stub.mpy")
    (lib / "dev_udp.py").write_text(DRIVER)
    return lib


class Driver:
    def __init__(self, lib: Path, *args: str, heapsize: str = "32k") -> None:
        cmd, env, cwd = upy.command(["-m", "dev_udp", *args], path=[lib], heapsize=heapsize)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                     cwd=cwd)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", line + self.proc.stdout.read()

    def finish(self) -> str:
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, out
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_serve_at_a_small_heap_drops_short_and_survives_a_server_bug(lib: Path) -> None:
    port = free_udp_port()
    d = Driver(lib, f"port={port}", "buf=256")
    try:
        with client() as s:
            to = ("127.0.0.1", port)
            s.sendto(b"\x02\x00\x00", to)  # no whole header: nothing to answer
            s.sendto(echo(2, "ok") + b"\x02\x00", to)  # a packet, then 2 stray bytes
            assert reply(s)[1] == {"d": "ok"}  # (the stub answers the request itself)
            s.sendto(request(2, 0, 0xEE, 4, {}) + echo(6, "after the bug"), to)  # the stub raises on 0xEE
            assert reply(s)[1] == {"d": "after the bug"}
            s.sendto(echo(8, "z" * 300), to)  # over the stub's 256-byte buffer
            h, rsp = reply(s)
            assert h[6] == 8 and rsp == {"rc": 7}
            for i in range(40):  # the heap holds: nothing grows with what arrives
                s.sendto(echo(10, "w" * 200), to)
                assert reply(s)[0][6] == 10
            s.sendto(request(2, 0, 5, 12, {}), to)
            assert reply(s)[0][6:8] == bytes([12, 5])
        out = d.finish()
    finally:
        d.kill()
    assert "DONE handled=44 datagrams=45 oversize=1 short=2 refused=0" in out, out


def test_allow_drops_other_senders_and_idle_ticks(lib: Path) -> None:
    port = free_udp_port()
    d = Driver(lib, f"port={port}", "allow=127.0.0.2")
    try:
        with client() as s:
            s.sendto(echo(2, "not allowed"), ("127.0.0.1", port))
            allowed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with allowed:
                allowed.bind(("127.0.0.2", 0))
                allowed.settimeout(RECV_TIMEOUT_S)
                allowed.sendto(echo(4, "allowed"), ("127.0.0.1", port))
                assert reply(allowed)[1] == {"d": "allowed"}
                allowed.sendto(request(2, 0, 5, 6, {}), ("127.0.0.1", port))
                assert reply(allowed)[0][6] == 6
            s.settimeout(0)
            with pytest.raises(BlockingIOError):
                s.recvfrom(4096)  # (the reset's reply came after it: the refused echo had none)
        out = d.finish()
    finally:
        d.kill()
    assert "refused=1" in out and "handled=2" in out, out


def test_reset_reply_is_drained_before_serve_returns(lib: Path) -> None:
    """The reset's reply is sent, then the link drains (UdpLink: about 250 ms, for a stack whose
    sendto only queues the datagram), and only then does serve() return for the reset."""
    port = free_udp_port()
    d = Driver(lib, f"port={port}")  # (32k)
    try:
        with client() as s:
            s.sendto(echo(2, "before"), ("127.0.0.1", port))
            assert reply(s)[1] == {"d": "before"}
            s.sendto(request(2, 0, 5, 4, {}), ("127.0.0.1", port))
            assert reply(s)[0][6:8] == bytes([4, 5])
        out = d.finish()
    finally:
        d.kill()
    m = re.search(r"^LAST sendto,drain (\d+)$", out, re.M)
    assert m, out
    assert 240 <= int(m.group(1)) < 2000, out  # (ticks_ms: 250 ms, give or take a tick)
    assert out.index("DONE") < out.index("LAST")


FLOOD = """
import sys
import time
from mpboot.transport import udp
from smp_stub import Stub

# A link whose datagrams never stop coming (each one dropped unanswered): serve() is never idle.
kind = sys.argv[1]
DATAGRAM = {"refused": b"\\x02\\x00\\x00\\x00\\x00\\x00\\x01\\x00", "oversize": b"\\x01" * 300,
            "short": b"\\x02\\x00\\x00", "empty": b""}[kind]


class Flood:
    def __init__(self):
        self.t0 = time.ticks_ms()
        self.n = 0

    def recvfrom(self, n):
        if time.ticks_diff(time.ticks_ms(), self.t0) > 5000:
            raise OSError(0)
        self.n += 1
        return DATAGRAM[:n], b"peer"

    def sendto(self, buf, addr):
        raise AssertionError("sendto")

    def wait(self, ms):
        raise AssertionError("wait: the flood never pauses")


if kind == "refused":
    Flood.allow = lambda self, addr: False

link = Flood()
ticks = []


def tick():
    ticks.append((time.ticks_diff(time.ticks_ms(), link.t0), link.n))
    if len(ticks) == 3:
        raise KeyboardInterrupt


try:
    udp.serve(link, Stub(256), tick)
except KeyboardInterrupt:
    pass
except OSError:
    print("NO TICK in 5 s of %d datagrams" % link.n)
for ms, n in ticks:
    print("TICK %d %d" % (ms, n))
"""


@pytest.mark.parametrize("kind", ["refused", "oversize", "short", "empty"])
def test_tick_runs_through_a_flood_of_dropped_datagrams(tmp_path: Path, lib: Path, kind: str) -> None:
    """Datagrams that serve() drops (refused by allow=, oversize, short of a header, empty)
    arriving without a pause still let tick() (the watchdog feed) run about once a second."""
    (tmp_path / "dev_flood.py").write_text(FLOOD)
    proc = upy.run(["-m", "dev_flood", kind], path=[tmp_path, lib], heapsize="24k", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ticks = [tuple(map(int, line.split()[1:])) for line in proc.stdout.splitlines() if line.startswith("TICK ")]
    assert len(ticks) == 3, proc.stdout
    gaps = [b[0] - a[0] for a, b in zip([(0, 0), *ticks], ticks)]
    assert all(g < 3000 for g in gaps), ticks  # (about 1000 ms each: no tick waits for a pause)
    assert all(b[1] > a[1] for a, b in zip([(0, 0), *ticks], ticks)), ticks  # datagrams between ticks


ADAPTERS = """
import socket
import sys
from mpboot.ports import esp32, rp2, unix

port = int(sys.argv[1])
dest = socket.getaddrinfo("127.0.0.1", port, 0, socket.SOCK_DGRAM)[0][-1]
for name, mod in (("esp32", esp32), ("rp2", rp2), ("unix", unix)):
    link = mod.udp(port, "127.0.0.1")
    assert link.recvfrom(64) is None  # nothing waits: None at once, no exception
    link.s.sendto(("to " + name).encode(), dest)
    link.wait(5000)
    data, addr = link.recvfrom(64)
    link.sendto(data, addr)  # to itself, as serve() answers a sender
    link.wait(5000)
    print(name, link.recvfrom(64)[0].decode(), link.allow(addr) if hasattr(link, "allow") else "any")
    link.close()
"""


def test_port_adapters_make_udp_links(tmp_path: Path) -> None:
    """udp() of the esp32 and rp2 adapters (on the fakes of their native modules; the socket is
    the unix port's) and of the unix one: a bound link that takes and sends datagrams."""
    lib = tmp_path / "lib"
    for rel in ("__init__.py", "flash.py", "ports/__init__.py", "ports/esp32.py", "ports/rp2.py", "ports/unix.py",
                "ports/nor_sim.py", "transport/__init__.py", "transport/udp.py"):
        target = lib / "mpboot" / Path(rel).with_suffix(".mpy")
        target.parent.mkdir(parents=True, exist_ok=True)
        mpy_cross_compile(FIRMWARE / rel, target)
    upy.compile_tree(ROOT / "tests" / "device" / "fakes", lib)
    (lib / "dev_udp_ports.py").write_text(ADAPTERS)
    proc = upy.run(["-m", "dev_udp_ports", str(free_udp_port())], path=[lib], heapsize="256k", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:3] == ["esp32 to esp32 any", "rp2 to rp2 any", "unix to unix any"]


def test_mpboot_sim_udp_from_the_cli(tmp_path: Path) -> None:
    from simserve import SimProcess, ok

    port = free_udp_port()
    sim = SimProcess(tmp_path / "dev", [KEY], "--udp", str(port))
    try:
        sim.wait_for(rf"^mpboot sim: serving SMP over UDP on 127\.0\.0\.1:{port}$")
        sim.wait_for(SERVING)
        assert ok("echo", "from the cli", "--udp", f"127.0.0.1:{port}").strip() == "from the cli"
        assert "UART on" not in sim.output()
    finally:
        assert sim.stop() == 0
