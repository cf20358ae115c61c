#!/usr/bin/env python3
"""Benchmark SMP uploads over BLE (`make bench`): mpboot's pipelined client against smpclient
(its SMPBLETransport on bleak), side by side in one run, on the same simulated device.

The device is `mpboot sim --ble` (the firmware on MicroPython, its radio a Bumble controller),
on an air (mpboot.sim.air) that records every ATT PDU. Both clients go through bleak's public
API with the Bumble backend, upload the same 256 KiB image to the same device (buf_size 2048,
buf_count 4; both slots are erased before each upload, so each starts from the same state) at
MTU 247. Two figures per client:

(a) measured over the Bumble link: image bytes / time from the first upload request to the
    last reply (connection set-up excluded). The virtual link has no radio timing, so this
    measures the processes (the device's MicroPython, the Bumble stacks), not a radio.
(b) projected for a real radio from the recorded ATT traffic with tools/ble_model.py's model:
    15 ms connection interval, up to 6 packets per connection event each way, MTU 247, a
    response leaves in an event after its request arrived, a client sends a request no sooner
    than the event after the responses it waited for. Goal: ours >= 2x smpclient in both,
    >= 90% of the model's ceiling (6 x 244 bytes per 15 ms), image bytes per ATT payload byte
    >= 0.95.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from ble_model import Pdu, Timing, project  # noqa: E402
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat  # noqa: E402
from mpboot.ble import bumble_backend, select  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.sim.air import AirThread  # noqa: E402
from mpboot.smp.client import SMPClient  # noqa: E402
from mpboot.transport.ble import BleTransport  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402

KIB = 1024
IMAGE = 256 * KIB
SLOT = 264 * KIB


def start_sim(state: Path, pub: Path, spec: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [str(Path(sys.executable).parent / "mpboot"), "sim", "--state", str(state), "--keys", str(pub),
           "--slot-size", str(SLOT), "--ble", "--radio", spec, "--ble-name", "bench"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:
        if re.search(r"serving SMP over BLE", line):
            return proc, "bench"
        if line.startswith("mpboot: error") or "crashed" in line:
            break
    raise SystemExit(f"bench_ble: the simulator did not start: {line.strip()}")


def trace_pdus(air: AirThread) -> list[Pdu]:
    return [Pdu(r.t, r.direction, r.opcode, r.value) for r in air.trace()]


async def erase(name: str, backend: object) -> None:
    """Both slots blank (the device has no image: it serves in recovery), so every upload
    goes to the same slot and starts from the same flash."""
    async with SMPClient(BleTransport(name, backend=backend)) as client:
        await client.erase(0)
        await client.erase(1)


async def ours(name: str, image: bytes, air: AirThread, backend: object) -> float:
    async with SMPClient(BleTransport(name, backend=backend)) as client:
        await client.params()
        air.clear_trace()
        t0 = time.perf_counter()
        result = await client.upload(image, sha=True)
        elapsed = time.perf_counter() - t0
    assert result.resumed_from == 0 and result.size == len(image)
    return elapsed


async def smpclient_upload(name: str, image: bytes, air: AirThread) -> float:
    from smpclient import SMPClient as Theirs
    from smpclient.transport.ble import SMPBLETransport

    async with Theirs(SMPBLETransport(), name) as client:
        air.clear_trace()
        t0 = time.perf_counter()
        async for _ in client.upload(image):
            pass
        return time.perf_counter() - t0


def main() -> None:
    timing = Timing()
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-ble-") as tmp, AirThread(trace=True) as air:
        work = Path(tmp)
        key = generate("rsa-2048")  # a fresh key: nothing here trusts a shipped one
        pub = work / "pub.pem"
        pub.write_bytes(key.public().key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        app = make_app(work / "app", "bench", confirm=True, filler=IMAGE - 1400)
        image = sign_app(app, key, "1.0.0")
        proc, name = start_sim(work / "dev", pub, air.spec)
        backend = select(f"bumble:{air.spec}")
        rows = []
        try:
            async def run_all() -> None:
                await erase(name, backend)
                t = await ours(name, image, air, backend)
                rows.append(("mpboot (window 4)", t, trace_pdus(air)))
                await erase(name, backend)
                await bumble_backend.close_all()
                bumble_backend.install_default(air.spec)
                try:
                    t = await smpclient_upload(name, image, air)
                finally:
                    bumble_backend.uninstall_default()
                rows.append(("smpclient 7.3.0", t, trace_pdus(air)))
                await bumble_backend.close_all()

            asyncio.run(run_all())
        finally:
            proc.terminate()
            proc.wait(10)
    n = len(image)
    print(f"BLE upload of a {n // KIB} KiB image to mpboot sim --ble (buf_size 2048, buf_count 4, MTU 247)")
    print(f"model: {timing.interval * 1000:.0f} ms interval, {timing.per_event} packets/event each way, "
          f"MTU {timing.mtu}: ceiling {timing.ceiling / KIB:.1f} KiB/s of ATT payload")
    print(f"{'client':<20} {'measured':>12} {'projected':>12} {'% ceiling':>10} {'requests':>9} "
          f"{'img/ATT up':>11} {'img/ATT all':>12}")
    results = {}
    for label, t, pdus in rows:
        p = project(pdus, timing)
        measured = n / t
        projected = n / p.seconds
        results[label] = (measured, projected)
        print(f"{label:<20} {measured / KIB:>8.1f} KiB/s {projected / KIB:>7.1f} KiB/s "
              f"{projected / timing.ceiling * 100:>9.1f}% {p.requests:>9} {n / p.c2p_payload:>11.3f} "
              f"{n / (p.c2p_payload + p.p2c_payload):>12.3f}")
    (m_ours, p_ours), (m_theirs, p_theirs) = results.values()
    print(f"ratio ours/smpclient: measured {m_ours / m_theirs:.2f}x (goal 2), "
          f"projected {p_ours / p_theirs:.2f}x (goal 2); ours at {p_ours / timing.ceiling * 100:.1f}% "
          f"of the ceiling (goal 90)")


if __name__ == "__main__":
    main()
