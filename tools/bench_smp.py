#!/usr/bin/env python3
"""Benchmark SMP uploads over a simulated UART (`make bench`): mpboot's pipelined client
against smpclient 7.3.0, side by side in one run, on the same simulated device, each
framing against the same framing (raw COBS frames, or console lines).

Every upload goes to a fresh copy of one prepared device: `mpboot sim` with the NOR flash
timing model (`--flash-timing nor`: 45 ms per 4 KiB sector erase, 0.7 ms per 256-byte page)
and its pty paced like a UART (`--baud`: 8N1, baud/10 bytes per second each way), running
a confirmed v1 in slot 0. The upload goes to slot 1, which holds an older image (so every
sector it needs is erased first, as on a device in the field) unless marked "blank slot".
Device parameters are the same for every client (buf_size 2048, buf_count 4); each client
reads them itself before the clock starts (smpclient when it connects). The clock runs from
the first upload request to the last reply (smpclient: its upload() iterator; mpboot:
SMPClient.upload); goodput = image bytes / that time, shown against the line rate baud/10.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.smp.client import SMPClient  # noqa: E402
from mpboot.transport.serial import SerialTransport  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402

KIB = 1024
SLOT = 1088 * KIB  # room for a 1 MiB image


class Sim:
    """`mpboot sim` as a subprocess; `path` is its UART."""

    def __init__(self, state: Path, pub: Path, *, baud: int | None, timing: str = "nor") -> None:
        cmd = [str(Path(sys.executable).parent / "mpboot"), "sim", "--state", str(state), "--keys", str(pub),
               "--slot-size", str(SLOT), "--flash-timing", timing]
        if baud:
            cmd += ["--baud", str(baud)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT)
        self.lines: list[str] = []
        self.path = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"UART on (\S+)", line)
            if m:
                self.path = m.group(1)
                break
        if not self.path:
            raise SystemExit("mpboot sim did not start:\n" + "".join(self.lines))

    def wait_for(self, text: str, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < end:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if text in line:
                return
        raise SystemExit(f"mpboot sim never printed {text!r}:\n" + "".join(self.lines[-20:]))

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: a clean stop
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def ours(path: str, baud: int, image: bytes, framing: str) -> float:
    async with SMPClient(SerialTransport(path, baudrate=baud, framing=framing)) as client:
        # The MCUmgr parameters before the clock, as smpclient reads them when it connects.
        await client.params_or_default()
        t0 = time.perf_counter()
        await client.upload(image)
        return time.perf_counter() - t0


async def theirs(path: str, baud: int, image: bytes, framing: str) -> float:
    from smpclient import SMPClient as TheirClient
    from smpclient.transport.serial import SMPSerialTransport
    from smpclient.transport.serial.framing.cobs import Cobs
    from smpclient.transport.serial.unencoded import SMPSerialRawTransport

    # The same framing on both sides: console lines, or raw COBS frames of up to buf_size.
    transport = SMPSerialTransport() if framing == "console" else SMPSerialRawTransport(framing=Cobs(), mtu=2048)
    async with TheirClient(transport, path) as client:  # connect() reads the MCUmgr parameters
        t0 = time.perf_counter()
        async for _off in client.upload(image):
            pass
        return time.perf_counter() - t0


Uploader = Callable[[str, int, bytes, str], Awaitable[float]]


def measure_dir(base: Path, work: Path) -> Path:
    """A fresh copy of the prepared device `base` (its state directory), for one run."""
    state = work / "run"
    shutil.rmtree(state, ignore_errors=True)
    shutil.copytree(base, state)
    return state


def measure(base: Path, work: Path, pub: Path, baud: int, image: bytes, client: Uploader, framing: str) -> float:
    sim = Sim(measure_dir(base, work), pub, baud=baud)
    try:
        sim.wait_for("serving")
        return asyncio.run(client(sim.path, baud, image, framing))
    finally:
        sim.stop()


async def _prepare(path: str, v1: bytes, old: bytes | None) -> None:
    async with SMPClient(SerialTransport(path, baudrate=921600)) as client:
        await client.upload(v1)
        states = await client.state()
        await client.state_write(next(s.hash for s in states if not s.active), confirm=True)
        if old is not None:
            await client.reset()


def prepare(work: Path, pub: Path, v1: bytes, old: bytes | None, name: str) -> Path:
    """A device running a confirmed v1 in slot 0; `old` (unmarked) in slot 1 unless None."""
    state = work / name
    sim = Sim(state, pub, baud=None, timing="none")
    try:
        sim.wait_for("serving")
        asyncio.run(_prepare(sim.path, v1, old))
        if old is not None:
            sim.wait_for("serving")

            async def upload_old() -> None:
                async with SMPClient(SerialTransport(sim.path, baudrate=921600)) as client:
                    await client.upload(old)

            asyncio.run(upload_old())
    finally:
        sim.stop()
    return state


def flash_bound_s(size: int) -> float:
    """Seconds the NOR timing model alone takes to write `size` bytes into a slot that holds
    an old image: every 4 KiB sector erased (45 ms), every 256-byte page programmed (30 us to
    start plus 670 us per full page)."""
    return -(-size // 4096) * 0.045 + size * 0.00067 / 256 + -(-size // 256) * 0.00003


def app_image(work: Path, key, version: str, size: int) -> bytes:  # type: ignore[no-untyped-def]
    romfs = make_app(work / f"app-{version}-{size}", version, confirm=True, filler=size)
    return sign_app(romfs, key, version)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-smp-") as name:
        work = Path(name)
        key = generate("rsa-2048")  # fresh every run: no key is shipped or reused
        pub = work / "pub.pem"
        pub.write_bytes(key.public().key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        v1 = app_image(work, key, "1.0.0", 16 * KIB)
        old = app_image(work, key, "0.9.0", SLOT - 16 * KIB)
        img256 = app_image(work, key, "2.0.0", 256 * KIB)
        img1m = app_image(work, key, "2.0.0", 1024 * KIB)
        dirty = prepare(work, pub, v1, old, "dirty")
        blank = prepare(work, pub, v1, None, "blank")
        print("mpboot SMP upload benchmark (mpboot sim, NOR timing, UART-paced pty; buf_size 2048, buf_count 4)")
        # Ratios compare like with like: the same framing, the same device state.
        pairs = (("mpboot raw", "smpclient raw"), ("mpboot console", "smpclient console"),
                 ("mpboot raw, blank slot", "smpclient raw, blank slot"))
        for baud, image, cases in (
            (115200, img256, (("mpboot raw", ours, "raw", dirty), ("smpclient raw", theirs, "raw", dirty),
                              ("mpboot console", ours, "console", dirty),
                              ("smpclient console", theirs, "console", dirty))),
            (921600, img1m, (("mpboot raw", ours, "raw", dirty), ("smpclient raw", theirs, "raw", dirty),
                             ("mpboot raw, blank slot", ours, "raw", blank),
                             ("smpclient raw, blank slot", theirs, "raw", blank),
                             ("mpboot console", ours, "console", dirty),
                             ("smpclient console", theirs, "console", dirty))),
        ):
            line = baud / 10
            print(f"  {baud} baud (line {line:.0f} B/s), {len(image)} byte image:")
            rates = {}
            for label, client, framing, base in cases:
                t = measure(base, work, pub, baud, image, client, framing)
                rates[label] = len(image) / t
                print(f"    {label}: {rates[label]:.0f} B/s, {rates[label] / line:.1%} of line ({t:.1f} s)")
            # What the flash model alone allows when every sector must be erased first.
            flash_s = flash_bound_s(len(image))
            if len(image) / flash_s < line:  # the flash, not the line, is the limit
                print(f"    flash-bound ceiling (old image in the slot): {len(image) / flash_s:.0f} B/s, "
                      f"{len(image) / flash_s / line:.1%} of line; mpboot raw reaches "
                      f"{rates['mpboot raw'] * flash_s / len(image):.1%} of it")
            for a, b in pairs:
                if a in rates and b in rates:
                    print(f"    ratio {a} / {b}: {rates[a] / rates[b]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
