#!/usr/bin/env python3
"""Benchmark one sync station updating N simulated devices from a TUF repository over HTTP
(`make bench`; issue 20's "one sync station serving N simulated devices").

A repository made with mpboot's own library (`mpboot repo`: root 2 of 2, targets, snapshot,
timestamp, one team role for the fleet's vendor/class; fresh keys, made here) lists v2 (about
64 KiB); an HTTP server on 127.0.0.1 (started here) serves its public tree, counting requests
and bytes. N simulated devices (MicroPython unix-port processes, `mpboot sim --udp`: each
power-on serves SMP over UDP on its own port) run a confirmed v1. One station
(mpboot.sync.Syncer, as `mpboot sync --repo URL --udp ...`) runs two passes:

- pass 1: refresh the metadata, probe every address, and bring each device to v2 (download
  once, verify, upload over UDP, test boot, the app confirms itself), `--max-parallel`
  BENCH_PARALLEL (default 8) devices at a time;
- pass 2: every device is current (the metadata refreshed again; nothing sent).

Side by side in one run, the same fleet size from a plain directory of images
(`mpboot sync DIR --udp ...`): the ratio says what the repository's verification costs a pass.

Per row: devices updated per minute, p50/p95 per-device time, bytes served by HTTP / (N x
image), HTTP requests, bytes sent to devices, the station process's CPU seconds (the
simulators' relay threads run in it too), and pass 2's time. The HTTP counts are of both
passes (pass 2 refreshes the metadata: one request for timestamp.json when nothing changed).
N in {1, 8, 32} by default, BENCH_N=1,8,32,64 to go further; the whole bench, station and
devices, runs under `nice -n 10` (the machine stays usable).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from mpboot import repo as tufrepo  # noqa: E402
from mpboot.image import class_uuid, vendor_uuid  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.pack import pack_app  # noqa: E402
from mpboot.repo.images import image_target  # noqa: E402
from mpboot.repo.signer import KeyRing  # noqa: E402
from mpboot.sim.serve import SimServer, open_state  # noqa: E402
from mpboot.sync import DirSource, Syncer, SyncOptions, SyncResult, UdpRadio, load_repo  # noqa: E402
from simkit import sign_app  # noqa: E402
from udpkit import free_udp_port  # noqa: E402

KIB = 1024
IMAGE_KIB = 64
VENDOR = vendor_uuid("bench.example")
CLASS = class_uuid("station-widget", VENDOR)

APP = "import mpboot\nprint('APP {name}')\nprint('CONFIRM', mpboot.confirm())\n"


class Counting(SimpleHTTPRequestHandler):
    """Serves the repository's public tree; counts requests and body bytes."""

    counts = {"requests": 0, "bytes": 0}
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        data = source.read()
        outputfile.write(data)
        with self.lock:
            self.counts["requests"] += 1
            self.counts["bytes"] += len(data)


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def make_repo(path: Path, v2: bytes) -> bytes:
    """A published repository listing v2 for the fleet's vendor/class; its root.json."""
    keys = {name: generate("rsa-2048") for name in ("root-a", "root-b", "targets", "snapshot", "timestamp", "team")}
    log = path.parent / "signing.jsonl"

    def ring(*names: str) -> KeyRing:
        return KeyRing.of([keys[n] for n in names], log)

    tufrepo.init(path, root_keys=[keys["root-a"].public(), keys["root-b"].public()], root_threshold=2,
                 targets_keys=[keys["targets"].public()], targets_threshold=1,
                 snapshot_keys=[keys["snapshot"].public()], timestamp_keys=[keys["timestamp"].public()],
                 expires={"timestamp": timedelta(days=1)}, ring=ring("root-a", "root-b", "targets"))
    tufrepo.delegate(path, "fleet", scopes=[(VENDOR, CLASS)], keys=[keys["team"].public()], threshold=1,
                     expires=None, ring=ring("targets", "team"))
    tufrepo.add(path, "fleet", [image_target(v2, "app-2.0.0.bin", "app-2.0.0.bin")], ring("team"))
    tufrepo.publish(path, ring("snapshot", "timestamp"))
    return (path / "public" / "metadata" / "1.root.json").read_bytes()


def run_fleet(tmp: Path, tag: str, n: int, key: Any, v1: Path, source: Any, parallel: int) -> dict[str, Any]:
    """N devices on v1 serving UDP; two station passes from `source`; the numbers."""
    servers = []
    addresses = []
    try:
        for i in range(n):
            state = tmp / f"{tag}-{n}-{i}"
            dev = open_state(state, [key.public()], slot_size=IMAGE_KIB * KIB + 64 * KIB,
                             vendor_id=VENDOR, class_id=CLASS)
            dev.install(v1, "permanent")
            port = free_udp_port()
            s = SimServer(state, [key.public()], udp=port, slot_size=IMAGE_KIB * KIB + 64 * KIB,
                          vendor_id=VENDOR, class_id=CLASS, output=lambda line: None)
            s.start()
            servers.append(s)
            addresses.append(("127.0.0.1", port))
        radio = UdpRadio(addresses)
        syncer = Syncer(source, radio, SyncOptions(scan_seconds=2.0, max_parallel=parallel, timeout=5.0,
                                                   confirm_timeout=30.0))

        async def until_all_answer() -> None:
            end = time.monotonic() + 60
            while len(await radio.scan(1.0)) < n:
                if time.monotonic() > end:
                    raise SystemExit(f"bench: only some of {n} simulated devices serve UDP")

        asyncio.run(until_all_answer())
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.monotonic()
        first = asyncio.run(syncer.run_pass())
        wall = time.monotonic() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        t1 = time.monotonic()
        second = asyncio.run(syncer.run_pass())
        wall2 = time.monotonic() - t1
        ok = sum(a.result is SyncResult.UPDATED for a in first)
        fails: dict[str, int] = {}
        for a in first:
            if a.result is not SyncResult.UPDATED:
                fails[str(a.result)] = fails.get(str(a.result), 0) + 1
        return {"ok": ok, "wall": wall, "times": [a.seconds for a in first], "fails": fails,
                "sent": sum(a.bytes for a in first), "cpu": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
                "pass2": wall2, "current": sum(a.result is SyncResult.CURRENT for a in second)}
    finally:
        for s in servers:
            s.stop()


def main() -> int:
    ns = [int(x) for x in os.environ.get("BENCH_N", "1,8,32").split(",")]
    parallel = int(os.environ.get("BENCH_PARALLEL", "8"))
    key = generate("rsa-2048")  # the devices' image key: fresh, never shipped
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-station-") as tmp_name:
        tmp = Path(tmp_name)
        images = {}
        for name, version in (("v1", "1.0.0"), ("v2", "2.0.0")):
            folder = tmp / name
            folder.mkdir()
            (folder / "main.py").write_text(APP.format(name=name))
            (folder / "filler.bin").write_bytes(os.urandom(IMAGE_KIB * KIB - 4 * KIB))
            images[name] = sign_app(pack_app(folder), key, version, vendor_id=VENDOR, class_id=CLASS)
        v1 = tmp / "v1.bin"
        v1.write_bytes(images["v1"])
        v2 = images["v2"]
        root = make_repo(tmp / "repo", v2)
        (tmp / "dir").mkdir()
        (tmp / "dir" / "app-2.0.0.bin").write_bytes(v2)
        dir_images, _ = load_repo(tmp / "dir")
        server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Counting, directory=str(tmp / "repo" / "public")))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        os.nice(10)  # (the simulated devices are this process's children: they inherit it)
        from mpboot.tufsource import TufSource

        print(f"mpboot station benchmark: one station, N devices over UDP, {len(v2)}-byte image, "
              f"--max-parallel {parallel}, nice 10 (BENCH_N, BENCH_PARALLEL)")
        print(f"{'source':<6} {'N':>4} {'upd/min':>8} {'p50 s':>6} {'p95 s':>6} {'http/(N*img)':>12} "
              f"{'http req':>8} {'sent/(N*img)':>12} {'cpu s':>6} {'ok':>4} {'failures':<10} {'pass 2 s':>8}")
        for n in ns:
            per_update = {}
            for tag in ("repo", "dir"):
                Counting.counts = {"requests": 0, "bytes": 0}
                cache = tmp / f"cache-{n}"
                shutil.rmtree(cache, ignore_errors=True)
                source: Any
                if tag == "repo":
                    source = TufSource([url], root, cache, timeout_s=10.0, deadline_s=120.0)
                else:
                    source = DirSource(dir_images)
                try:
                    r = run_fleet(tmp, tag, n, key, v1, source, parallel)
                finally:
                    if tag == "repo":
                        source.close()
                per_update[tag] = r["wall"] / max(r["ok"], 1)
                c = Counting.counts
                print(f"{tag:<6} {n:>4} {r['ok'] / r['wall'] * 60:>8.0f} {statistics.median(r['times']):>6.2f} "
                      f"{percentile(r['times'], 0.95):>6.2f} {c['bytes'] / (n * len(v2)):>12.3f} {c['requests']:>8} "
                      f"{r['sent'] / (n * len(v2)):>12.3f} {r['cpu']:>6.1f} {r['ok']:>4} "
                      f"{','.join(f'{k}:{v}' for k, v in r['fails'].items()) or '-':<10} {r['pass2']:>8.2f}")
            print(f"{'':<6} {n:>4} pass time per update, repository / directory: "
                  f"{per_update['repo'] / per_update['dir']:.2f}x")
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
