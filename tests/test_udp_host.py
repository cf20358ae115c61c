"""The host over SMP over UDP (host/mpboot/transport/udp.py, the resend rules of
mpboot.smp.client, `--udp` on the device commands) against the simulated device serving UDP
(SimServer(udp=)), directly and through the seeded fault proxy of tests/udpkit.py:

- `mpboot flash --test --reset` then `mpboot confirm`, with loss, duplication and reordering
  in both directions (several seeds): the device boots the new image on its test boot (so it
  verified it) and keeps it once confirmed;
- deterministic losses: the opening upload request with the window behind it; an echo and the
  params before it; the reset request (the device did not reset: one more is sent); the
  reset's reply (the device did reset: none more is sent). Each power-on is counted;
- addresses (an IPv6 link-local one with its %scope, against a stand-in device bound to this
  machine's), sizes, usage errors, and the hint of a device that never answered.

Every wait is on a reply or on a line the simulator prints; nothing sleeps."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import KEYS_DIR, signing_key
from simkit import installed, make_app, sign_app
from simserve import mpboot, ok
from udpkit import EchoDevice, Faults, FaultProxy, SimUdp, free_udp_port, link_local_addresses

from mpboot.errors import DeviceSilent, PortError
from mpboot.image import parse_image
from mpboot.keys import load_public_key
from mpboot.sim.serve import open_state
from mpboot.smp import SMPClient
from mpboot.transport.udp import UdpTransport, parse_address

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
SERVING = r"device: mpboot: serving SMP over UDP"
TIMEOUT = "2"  # --timeout: a lost opening costs this much; the device answers in milliseconds


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """1.0.0 (installed first) and 2.0.0 (the update, ~40 KB: 28 requests; it does not
    confirm itself), signed with the test key."""
    out = tmp_path_factory.mktemp("apps")
    files = {}
    for v in ("1.0.0", "2.0.0"):
        data = sign_app(make_app(out / v, v, confirm=False, filler=40000 if v == "2.0.0" else 0),
                        signing_key(KEY.name), v)
        files[v] = out / f"app-{v}.bin"
        files[v].write_bytes(data)
    return files


@pytest.fixture
def sim(images: dict[str, Path], tmp_path: Path) -> Iterator[SimUdp]:
    """A device running 1.0.0 confirmed, serving SMP over UDP on a free port."""
    state = tmp_path / "dev"
    dev = open_state(state, [load_public_key(KEY)])
    assert installed(dev.install(images["1.0.0"], "permanent")) == 0
    with SimUdp(state, [load_public_key(KEY)], free_udp_port()) as s:
        s.wait_for(r"APP 1\.0\.0")
        s.wait_for(SERVING)
        yield s


def powerons(sim: SimUdp) -> int:
    return sim.server.powerons


def assert_2_on_test_boot_then_confirmed(sim: SimUdp, where: str, images: dict[str, Path]) -> None:
    sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0 test boot")
    sim.wait_for(r"APP 2\.0\.0")
    sim.wait_for(SERVING)
    assert "confirmed the running image (slot 1, version 2.0.0)" in ok(
        "confirm", "--udp", where, "--timeout", TIMEOUT)
    state = {s["version"]: s for s in __import__("json").loads(
        ok("state", "--udp", where, "--timeout", TIMEOUT, "--json"))["images"]}
    new = state["2.0.0"]
    assert new["active"] and new["confirmed"] and new["slot"] == 1
    assert new["hash"] == parse_image(images["2.0.0"].read_bytes()).digest.hex()


def test_flash_test_reset_and_confirm_over_udp(sim: SimUdp, images: dict[str, Path]) -> None:
    where = f"127.0.0.1:{sim.port}"
    assert ok("echo", "hi", "--udp", where).strip() == "hi"
    out = ok("flash", images["2.0.0"], "--test", "--reset", "--udp", where, "--no-progress")
    assert "window 4" in out and "marked for a test boot" in out and "device reset" in out, out
    assert_2_on_test_boot_then_confirmed(sim, where, images)
    assert powerons(sim) == 2


FAULTS = {
    "drop": (Faults(drop=0.1), Faults(drop=0.1)),
    "dup": (Faults(dup=0.05), Faults(dup=0.05)),
    "reorder": (Faults(reorder=0.1), Faults(reorder=0.1)),
    "all": (Faults(drop=0.1, dup=0.05, reorder=0.1), Faults(drop=0.1, dup=0.05, reorder=0.1)),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("faults", sorted(FAULTS))
def test_flash_and_confirm_through_faults(sim: SimUdp, images: dict[str, Path], faults: str, seed: int) -> None:
    up, down = FAULTS[faults]
    with FaultProxy(sim.port, up=up, down=down, seed=seed) as proxy:
        where = f"127.0.0.1:{proxy.port}"
        out = ok("flash", images["2.0.0"], "--test", "--reset", "--udp", where, "--no-progress",
                 "--timeout", TIMEOUT)
        assert "marked for a test boot" in out and "device reset" in out, out
        assert_2_on_test_boot_then_confirmed(sim, where, images)
    hit = {"drop": proxy.up.dropped + proxy.down.dropped, "dup": proxy.up.duplicated + proxy.down.duplicated,
           "reorder": proxy.up.delayed + proxy.down.delayed}
    for kind, n in hit.items():
        if kind in faults or faults == "all":
            assert n > 0, (kind, proxy.up, proxy.down)  # the faults did happen
    assert powerons(sim) == 2  # exactly one reset: never a second one


# ---------------------------------------------------------------- deterministic losses


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def client(port: int) -> SMPClient:
    return SMPClient(UdpTransport("127.0.0.1", port), timeout=2.0)


def test_lost_opening_with_the_window_behind_it(sim: SimUdp, images: dict[str, Path]) -> None:
    data = images["2.0.0"].read_bytes()

    async def flow(port: int) -> object:
        async with client(port) as c:
            await c.params()  # datagram 1; the opening is datagram 2
            return await c.upload(data)

    with FaultProxy(sim.port, up=Faults(drop_nth=frozenset({2})), seed=0) as proxy:
        result = run(flow(proxy.port))
    assert proxy.up.dropped_nth == [2]
    assert result.match is True and result.size == len(data)  # type: ignore[attr-defined]


def test_lost_echo_and_params_are_sent_again(sim: SimUdp) -> None:
    async def flow(port: int) -> tuple[str, int]:
        async with client(port) as c:
            text = await c.echo("again")
            return text, c.resends

    with FaultProxy(sim.port, up=Faults(drop_nth=frozenset({1})), down=Faults(drop_nth=frozenset({1})),
                    seed=0) as proxy:
        text, resends = run(flow(proxy.port))
    # params: the request lost, then its first reply; the echo went through
    assert text == "again" and resends == 2 and proxy.up.dropped == 1 and proxy.down.dropped == 1


async def _mark_2(port: int, data: bytes) -> None:
    async with client(port) as c:
        await c.upload(data)
        await c.state_write(parse_image(data).digest, confirm=False)


@pytest.mark.parametrize("lost", ["request", "reply"])
def test_a_lost_reset_is_never_repeated_once_it_acted(sim: SimUdp, images: dict[str, Path], lost: str) -> None:
    data = images["2.0.0"].read_bytes()
    run(_mark_2(sim.port, data))

    async def reset(port: int) -> None:
        async with client(port) as c:
            await c.reset()  # a state read (datagram 1), then the reset (datagram 2)

    drop = Faults(drop_nth=frozenset({2}))
    with FaultProxy(sim.port, up=drop if lost == "request" else Faults(),
                    down=drop if lost == "reply" else Faults(), seed=0) as proxy:
        run(reset(proxy.port))
    assert (proxy.up if lost == "request" else proxy.down).dropped_nth == [2]
    sim.wait_for(r"mpboot: slot 1 version 2\.0\.0\+0 test boot")
    sim.wait_for(SERVING)
    assert powerons(sim) == 2  # one reset reached the device, whichever datagram was lost
    # The test boot is still on: a second reset would have reverted it.
    state = {s.version: s for s in run(_state(sim.port))}  # type: ignore[attr-defined]
    assert state["2.0.0"].active and not state["2.0.0"].confirmed


async def _state(port: int) -> object:
    async with client(port) as c:
        return await c.state()


def test_a_silent_reset_with_nothing_pending_is_not_repeated(sim: SimUdp) -> None:
    """No image pending: whether the reset acted cannot be told, and it is not sent again."""
    async def reset(port: int) -> None:
        async with client(port) as c:
            await c.reset()

    with FaultProxy(sim.port, down=Faults(drop_nth=frozenset({2})), seed=0) as proxy:
        with pytest.raises(DeviceSilent, match="whether it reset cannot be told"):
            run(reset(proxy.port))
    sim.wait_for(r"mpboot sim: device reset")
    sim.wait_for(SERVING)
    assert powerons(sim) == 2


def test_icmp_unreachable_is_counted_not_fatal() -> None:
    port = free_udp_port()  # nothing listens

    async def flow() -> tuple[int, bool]:
        t = UdpTransport("127.0.0.1", port)
        async with SMPClient(t, timeout=0.5) as c:
            with pytest.raises(DeviceSilent):
                await c.params()
            return t.icmp_errors, c.failure is None

    errors, alive = run(flow())  # type: ignore[misc]
    assert errors >= 1 and alive


# ---------------------------------------------------------------- addresses, sizes, usage


@pytest.mark.parametrize("text, expected", [
    ("192.168.1.20", ("192.168.1.20", 1337)),
    ("dev.local:5683", ("dev.local", 5683)),
    ("[::1]", ("::1", 1337)),
    ("[fe80::1%eth0]:2000", ("fe80::1%eth0", 2000)),
    ("::1", ("::1", 1337)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":1337", "host:", "host:0", "host:65536", "host:x", "[::1", "[::1]x", "[::1]:"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_max_packet_is_one_unfragmented_datagram() -> None:
    t = UdpTransport("127.0.0.1")
    assert t.max_packet(2048) == 1472 and t.max_packet(512) == 512 and t.packet_limit(4096) == 1472
    assert UdpTransport("127.0.0.1", mtu=1280).max_packet(2048) == 1252
    t6 = UdpTransport("::1")
    t6.family = socket.AF_INET6  # (set by open())
    assert t6.max_packet(2048) == 1452 and t6.name == "udp:[::1]:1337"


@pytest.mark.parametrize("args, message", [
    (["--udp", "127.0.0.1", "--ble", "x"], "--udp and --ble exclude each other"),
    (["--udp", "127.0.0.1", "--port", "/dev/null"], "--port and --udp exclude each other"),
    (["--udp", "127.0.0.1", "--baud", "9600"], "--baud is for serial ports, not --udp"),
    (["--udp", "host:99999"], "--udp host:99999: port '99999'"),
    (["--port", "/dev/null", "--mtu", "1280"], "--mtu goes with --udp"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    result = mpboot("echo", "x", *args)
    assert result.exit_code == 2 and message in result.stderr, result.stderr


def test_sim_udp_usage_errors(tmp_path: Path) -> None:
    result = mpboot("sim", "--state", tmp_path / "d", "--keys", KEY, "--udp", "1337", "--ble")
    assert result.exit_code == 2 and "--udp and --ble exclude each other" in result.stderr
    result = mpboot("sim", "--state", tmp_path / "d", "--keys", KEY, "--udp", "1337", "--machine", "qemu")
    assert result.exit_code == 2 and "--udp" in result.stderr and "not with --machine qemu" in result.stderr


# ---------------------------------------------------------------- IPv6 scope, silent hint

def scope_reaches_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket is connected to the whole sockaddr getaddrinfo gave, scope id included
    (fe80::1%lo: nothing answers there; the connect's own error is reported)."""
    connects: list[Any] = []
    connect = socket.socket.connect

    def recording(self: socket.socket, addr: Any) -> None:
        connects.append(addr)
        connect(self, addr)

    monkeypatch.setattr(socket.socket, "connect", recording)
    port = free_udp_port()

    async def flow() -> None:
        t = UdpTransport("fe80::1%lo", port)
        try:
            await t.open()
        finally:
            await t.close()

    try:
        run(flow())
    except PortError as err:
        assert "Invalid argument" not in str(err)  # (what a sockaddr without its scope gets)
    assert connects == [("fe80::1", port, 0, socket.if_nametoindex("lo"))]


def test_ipv6_scope_reaches_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    scope_reaches_connect(monkeypatch)


def test_link_local_address_with_its_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--udp "[fe80::...%IF]:PORT"` (the README's form) against a device bound to this
    machine's link-local address of IF. (A machine without one: the socket-level check above
    stands in for it.)"""
    addresses = link_local_addresses()
    if not addresses:
        scope_reaches_connect(monkeypatch)
        return
    with EchoDevice(addresses[0]) as dev:
        out = ok("echo", "scoped", "--udp", f"[{addresses[0]}]:{dev.port}", "--mtu", "1280", "--timeout", TIMEOUT)
    assert out.strip() == "scoped"
    assert dev.peers and all(p[3] == socket.if_nametoindex(addresses[0].split("%")[1]) for p in dev.peers)


def test_silent_device_over_udp_gets_a_udp_hint() -> None:
    port = free_udp_port()  # nothing listens
    result = mpboot("state", "--udp", f"127.0.0.1:{port}", "--timeout", "0.3")
    assert result.exit_code == 3
    assert result.stderr == (f"mpboot: error: no SMP reply from udp:127.0.0.1:{port} in 0.3 s (wrong address or port, "
                             "the device not serving run_udp, or a firewall?)\n")
