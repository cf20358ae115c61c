"""SMP over UDP between implementations nobody here wrote and ours:

- smpclient 7.3.0's SMPUDPTransport against the simulated device serving UDP (SimServer(udp=)):
  MCUmgr parameters, echo, image state, `upload(data, 1)`, then the image is in slot 1;
- our host (`mpboot echo --udp`, and SMPClient over UdpTransport: params, OS info) against the
  Zephyr 4.4.0 native_sim UDP fixtures of the smpclient sdist (tests/zephyrkit.py fetches them),
  IPv4 and IPv6. Those bind port 1337 on every interface, a port nobody can choose: the tests
  take a file lock (one fixture at a time on this machine) and skip only when something else
  holds 1337. Where the 32-bit C library is missing they skip saying what to install
  (MPBOOT_ZEPHYR_REQUIRED=1 makes that a failure, as in test_zephyr_devices.py).

Every wait is on a reply or a line a device prints; nothing sleeps."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zephyrkit
from conftest import KEYS_DIR, signing_key
from simkit import installed, make_app, sign_app
from smpclient import SMPClient as StockClient
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead
from smpclient.requests.os_management import EchoWrite, MCUMgrParametersRead
from smpclient.transport.udp import SMPUDPTransport
from udpkit import SimUdp, free_udp_port

from mpboot.image import parse_image
from mpboot.keys import load_public_key
from mpboot.sim.serve import open_state
from mpboot.smp import SMPClient
from mpboot.transport.udp import UdpTransport

KEY = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
MPBOOT = str(Path(sys.executable).parent / "mpboot")
ZEPHYR_PORT = 1337  # fixed in the fixtures (CONFIG_MCUMGR_TRANSPORT_UDP_PORT)
START_TIMEOUT_S = 30.0
TIMEOUT_S = 10.0


# ---------------------------------------------------------------- smpclient -> mpboot sim


class _UdpOnPort(SMPUDPTransport):
    """SMPUDPTransport on another port than 1337 (SMPClient.connect gives it the address only)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    async def connect(self, address: str, timeout_s: float, port: int = ZEPHYR_PORT) -> None:
        await super().connect(address, timeout_s, self._port)


def test_smpclient_udp_against_the_sim(tmp_path: Path) -> None:
    apps = tmp_path / "apps"
    one = sign_app(make_app(apps / "1", "1.0.0", confirm=True), signing_key(KEY.name), "1.0.0")
    two = sign_app(make_app(apps / "2", "2.0.0", confirm=False, filler=40000), signing_key(KEY.name), "2.0.0")
    (tmp_path / "one.bin").write_bytes(one)
    state = tmp_path / "dev"
    dev = open_state(state, [load_public_key(KEY)])
    assert installed(dev.install(tmp_path / "one.bin", "permanent")) == 0

    async def flow(port: int) -> tuple[Any, ...]:
        async with StockClient(_UdpOnPort(port), "127.0.0.1", timeout_s=TIMEOUT_S) as client:
            params = await client.request(MCUMgrParametersRead())
            echo = await client.request(EchoWrite(d="over udp"))
            before = await client.request(ImageStatesRead())
            offsets = [off async for off in client.upload(two, 1)]
            after = await client.request(ImageStatesRead())
            return params, echo, before, offsets, after, client._transport.max_unencoded_size

    with SimUdp(state, [load_public_key(KEY)], free_udp_port()) as sim:
        sim.wait_for(r"device: mpboot: serving SMP over UDP")
        params, echo, before, offsets, after, max_size = asyncio.run(flow(sim.port))
    assert success(params) and (params.buf_size, params.buf_count) == (1472, 4)
    assert max_size == 1472  # smpclient sizes by the MTU: the device's buffer matches it
    assert success(echo) and echo.r == "over udp"
    assert success(before) and [s.slot for s in before.images] == [0]
    assert offsets[-1] == len(two) and len(offsets) > 20
    assert success(after)
    slot1 = next(s for s in after.images if s.slot == 1)
    assert slot1.hash == parse_image(two).digest and slot1.version == "2.0.0" and not slot1.active


# ---------------------------------------------------------------- mpboot -> Zephyr fixtures


def _fixture(config: str) -> dict[str, Any]:
    """The manifest entry of the native_sim UDP fixture `config` (udp, udp6), fetched."""
    reason = zephyrkit.unavailable(f"native_sim.{config}")
    if reason is not None:
        if os.environ.get("MPBOOT_ZEPHYR_REQUIRED"):
            pytest.fail(f"{reason} (MPBOOT_ZEPHYR_REQUIRED is set)")
        pytest.skip(reason)
    directory = zephyrkit.fetch_fixtures()
    entries = json.loads((directory / "manifest.json").read_text())
    entry = next(e for e in entries if e["target"] == "native_sim" and e["config"] == config)
    assert entry["transport"] == "udp" and entry["udp_port"] == ZEPHYR_PORT
    return {**entry, "path": directory / entry["artifact"]}


@contextlib.contextmanager
def _port_1337(family: socket.AddressFamily) -> Iterator[None]:
    """Holds this machine's lock for port 1337; skips when something else has the port."""
    lock = zephyrkit.cache_dir() / "udp-1337.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                try:
                    probe.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", ZEPHYR_PORT))
                except OSError as err:
                    if err.errno == errno.EADDRINUSE:
                        pytest.skip(f"UDP port {ZEPHYR_PORT} is in use by another program: the Zephyr fixture needs it")
                    raise
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def zephyr_udp(config: str) -> Iterator[str]:
    """A fresh native_sim UDP fixture, its address as `--udp` takes it."""
    entry = _fixture(config)
    six = entry["ip_family"] == "ipv6"
    with _port_1337(socket.AF_INET6 if six else socket.AF_INET):
        workdir = Path(tempfile.mkdtemp(prefix="zephyr-udp-"))
        setpriv = shutil.which("setpriv")
        proc = subprocess.Popen([*([setpriv, "--pdeathsig=KILL"] if setpriv else []), str(entry["path"])],
                                cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started = threading.Event()
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                lines.append(raw.decode(errors="replace").rstrip())
                if "smp_udp: Started" in lines[-1]:
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        try:
            assert started.wait(START_TIMEOUT_S) and proc.poll() is None, "\n".join(lines[-20:])
            yield "[::1]" if six else "127.0.0.1"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.parametrize("config", ["udp", "udp6"])
def test_mpboot_against_zephyr_udp(config: str) -> None:
    with zephyr_udp(config) as where:
        # Its socket is bound before it logs "Started": the first echo is answered.
        done = subprocess.run([MPBOOT, "echo", "hello zephyr", "--udp", where], capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0 and done.stdout.strip() == "hello zephyr", done.stderr

        async def ask() -> tuple[Any, str, int]:
            t = UdpTransport(where.strip("[]"))
            async with SMPClient(t, timeout=TIMEOUT_S) as client:
                params = await client.params()
                info = await client.os_info("s")
                # The largest echo one datagram carries over this path (its buffer is larger).
                room = t.max_packet(params.buf_size)
                text = "z" * (room - 8 - 6)  # header; {"d": text}: map, key, a 3-byte text head
                assert await client.echo(text) == text
                return params, info, room

        params, info, room = asyncio.run(ask())
    assert (params.buf_size, params.buf_count) == (2048, 2)
    assert info == "Zephyr"
    assert room == (1452 if config == "udp6" else 1472)
