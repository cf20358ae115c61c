#!/usr/bin/env python3
"""Benchmark a fleet of simulated devices pulling one update over HTTP (`make bench`).

One Range-capable HTTP server (started here, on 127.0.0.1 port 0) serves a channel record
and a signed ~64 KiB image, counting requests and bytes per path. N simulated devices
(MicroPython unix-port processes over NOR flash files, each a copy of one prepared device
running a confirmed v1; N in {1, 8, 32}, BENCH_N=1,8,32,128 to go further) each power on,
and the app pulls, then power on again: the update's test boot, whose app confirms it. Under
`nice -n 10`, at most BENCH_JOBS (default 4) device processes at once.

Modes, side by side in one run against the same server and fleet:
- pull:       mpboot.pull (channel record, then the image by Range into the updater);
- get:        a plain full GET of the image into the updater (no record, no resume);
- pull-drop:  pull, the server dropping each device's first image connection half way
              (the device resumes with a Range from the next byte);
- get-drop:   get, the same drop (the device starts again from byte 0).

Per mode: devices updated per minute (pulled, test-booted and confirmed), p50/p95 per-device
time (both power-ons), bytes served / (N x image size), requests per update, failures by
cause, and the device processes' RSS/PSS (from /proc/self/smaps_rollup after the pull; the
unix `micropython` is CPython with MicroPython inside, so most of it is the interpreter).
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from mpboot import upy  # noqa: E402
from mpboot.channel import channel_record  # noqa: E402
from mpboot.image import class_uuid, vendor_uuid  # noqa: E402
from mpboot.keys import SignatureScheme, generate  # noqa: E402
from mpboot.pack import pack_app  # noqa: E402
from mpboot.sim import Geometry, SimDevice, build_lib  # noqa: E402
from simkit import boot, sign_app  # noqa: E402

KIB = 1024
IMAGE_KIB = 64
VENDOR = vendor_uuid("bench.example")
CLASS = class_uuid("fleet-widget", VENDOR)
MODES = ("pull", "get", "pull-drop", "get-drop")

APP = """import mpboot
print('APP {name}')
print('CONFIRM', mpboot.confirm())
if {pulls}:
    import time
    from binascii import hexlify
    from mpboot.ports import unix
    f = open({ctl!r})
    mode, base = f.read().split()
    f.close()
    url = base + '/d/' + hexlify(unix.unique_id()).decode()
    t0 = time.ticks_ms()
    try:
        if mode.startswith('pull'):
            print('RESULT ok', mpboot.pull(url + '/stable.cbor', timeout_ms=10000, tries=5))
        else:
            import get
            print('RESULT ok', get.get(url + '/images/app.bin', 5))
    except Exception as e:
        print('RESULT err', e.args[0] if e.args else -1)
    print('PULLMS', time.ticks_diff(time.ticks_ms(), t0))
    with open('/proc/self/smaps_rollup') as f:
        for line in f:
            if line.startswith(('Rss:', 'Pss:')):
                print('MEM', line.split()[0], line.split()[1])
"""

# The plain client for the get modes: the whole image in one GET, from byte 0 again after any
# failure; the updater verifies it at finish() as for a pull.
GET = """import time
import mpboot
from mpboot import http
from mpboot.update import MARK_TEST, Updater

def get(url, tries):
    b = mpboot._booted
    buf = bytearray(4096)
    line = bytearray(512)
    for t in range(tries):
        up = Updater(b[0], b[1])
        try:
            r = http.get(url, 0, -1, up.slots.areas[up.target()].size, line,
                         time.ticks_add(time.ticks_ms(), 600000), 10000)
            try:
                n = 0
                while n < 32:
                    n += r.readinto(memoryview(buf)[n:32])
                up.begin(r.length, memoryview(buf)[:32])
                up.write(0, memoryview(buf)[:32])
                while True:
                    k = r.readinto(buf)
                    if not k:
                        break
                    up.write(up.pos, memoryview(buf)[:k])
            finally:
                r.close()
            up.finish(MARK_TEST)
            return 3
        except http.HttpError:
            up.abort()
            if t == tries - 1:
                raise
"""


@dataclass
class Counts:
    requests: int = 0
    bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    dropped: set[str] = field(default_factory=set)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        parts = self.path.split("/")  # /d/<uid>/stable.cbor or /d/<uid>/images/app.bin
        data = srv.files.get("/".join(parts[3:])) if len(parts) > 3 else None  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        status = 206 if rng else 200
        body = data[start:]
        counts: Counts = srv.counts  # type: ignore[attr-defined]
        end = len(body)
        if srv.drop and parts[3] == "images" and start == 0:  # type: ignore[attr-defined]
            with counts.lock:
                if parts[2] not in counts.dropped:
                    counts.dropped.add(parts[2])
                    end = len(body) // 2
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(body[:end])
            self.wfile.flush()
        except OSError:
            end = 0
        with counts.lock:
            counts.requests += 1
            counts.bytes += end


def _percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def _device_run(dev: SimDevice) -> tuple[float, str]:
    t0 = time.monotonic()
    out = dev.boot().stdout
    out += boot_again(dev)
    return time.monotonic() - t0, out


def boot_again(dev: SimDevice) -> str:
    b = boot(dev)
    return f"\nBOOTED {b.slot} {b.version} {int(b.trial)} {b.confirmed}\n"


def main() -> int:
    os.nice(10)
    ns = [int(x) for x in os.environ.get("BENCH_N", "1,8,32").split(",")]
    jobs = int(os.environ.get("BENCH_JOBS", "4"))
    key = generate("rsa-2048")
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-fleet-") as tmp_name:
        tmp = Path(tmp_name)
        lib = build_lib(tmp / "lib", [key.public()])
        (tmp / "src").mkdir()
        (tmp / "src" / "get.py").write_text(GET)
        upy.compile_tree(tmp / "src", lib)
        ctl = tmp / "ctl"
        images = {}
        for name, pulls in (("v1", True), ("v2", False)):
            folder = tmp / name
            folder.mkdir()
            (folder / "main.py").write_text(APP.format(name=name, pulls=pulls, ctl=str(ctl)))
            (folder / "filler.bin").write_bytes(os.urandom(IMAGE_KIB * KIB - 4 * KIB))
            images[name] = sign_app(pack_app(folder), key, "1.0.0" if name == "v1" else "2.0.0",
                                    vendor_id=VENDOR, class_id=CLASS)
        v2 = images["v2"]
        geometry = Geometry.for_slots(IMAGE_KIB * KIB + 64 * KIB)
        base = SimDevice(tmp / "base", lib, geometry, vendor_id=VENDOR, class_id=CLASS)
        (tmp / "v1.bin").write_bytes(images["v1"])
        base.install(tmp / "v1.bin", "permanent", chunk=4096)
        ctl.write_text("none http://127.0.0.1:1\n")
        base.snapshot(tmp / "snap")

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.request_queue_size = 256
        server.files = {"stable.cbor": channel_record(v2, [key], SignatureScheme.PSS, name="stable", number=1,  # type: ignore[attr-defined]
                                                      path="images/app.bin"), "images/app.bin": v2}
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        print(f"mpboot fleet pull benchmark: {len(v2)}-byte image, record {len(server.files['stable.cbor'])} bytes, "  # type: ignore[attr-defined]
              f"{jobs} device processes at once, nice 10 (BENCH_N, BENCH_JOBS)")
        print(f"{'mode':<10} {'N':>4} {'upd/min':>8} {'p50 s':>6} {'p95 s':>6} {'bytes/(N*img)':>13} "
              f"{'req/upd':>7} {'ok':>4} {'failures':<12} {'RSS MB':>6} {'PSS MB':>6}")
        for n in ns:
            rows = {}
            for mode in MODES:
                ctl.write_text(f"{mode} {url}\n")
                server.counts = Counts()  # type: ignore[attr-defined]
                server.drop = mode.endswith("drop")  # type: ignore[attr-defined]
                devs = []
                for i in range(n):
                    d = SimDevice(tmp / f"{mode}-{n}-{i}", lib, geometry, vendor_id=VENDOR, class_id=CLASS)
                    d.restore(tmp / "snap")
                    devs.append(d)
                t0 = time.monotonic()
                with ThreadPoolExecutor(max_workers=min(jobs, n)) as pool:
                    results = list(pool.map(_device_run, devs))
                wall = time.monotonic() - t0
                ok = 0
                fails: dict[str, int] = {}
                rss, pss = [], []
                for _, out in results:
                    good = "RESULT ok 3" in out and "BOOTED 1 2.0.0 1 True" in out
                    ok += good
                    if not good:
                        why = next((line.split(maxsplit=2)[2] for line in out.splitlines()
                                    if line.startswith("RESULT err")), "boot")
                        fails[why] = fails.get(why, 0) + 1
                    for line in out.splitlines():
                        if line.startswith("MEM Rss:"):
                            rss.append(int(line.split()[2]) / 1024)
                        if line.startswith("MEM Pss:"):
                            pss.append(int(line.split()[2]) / 1024)
                times = [t for t, _ in results]
                c: Counts = server.counts  # type: ignore[attr-defined]
                rows[mode] = c.bytes / (n * len(v2))
                print(f"{mode:<10} {n:>4} {ok / wall * 60:>8.0f} {statistics.median(times):>6.2f} "
                      f"{_percentile(times, 0.95):>6.2f} {c.bytes / (n * len(v2)):>13.3f} "
                      f"{c.requests / max(ok, 1):>7.2f} {ok:>4} {','.join(f'{k}:{v}' for k, v in fails.items()) or '-':<12} "
                      f"{statistics.mean(rss) if rss else 0:>6.1f} {statistics.mean(pss) if pss else 0:>6.1f}")
                for d in devs:
                    shutil.rmtree(d.workdir, ignore_errors=True)
            print(f"{'':<10} {n:>4} bytes ratio get-drop / pull-drop: {rows['get-drop'] / rows['pull-drop']:.2f}x "
                  f"(resume saves what a restart sends again)")
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
