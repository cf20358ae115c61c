#!/usr/bin/env python3
"""Benchmark the factory station (`make bench`): boards provisioned per minute with 1, 2, 4
and 8 simulated boards provisioned in parallel by one station.

Each run starts fresh `mpboot sim` boards (a freshly generated key, never a shipped or test
key; lines paced as a 921600-baud UART; NOR flash timing) and times the station from its start
to the last board sealed, read back and recorded in SQLite: connect, key check, serial, upload
of a 128 KiB first app, test boot, the app's confirm, identity, floor, policy, verify, seal,
verify. Prints boards/minute per run and the speed-up over one board at a time, measured side
by side in this run. The simulated boards share this machine's cores with the station, so the
scaling shows the station's overhead and the CPU the simulated boards need, not a USB hub's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from mpboot.factory.db import FactoryDB, SerialPrefix  # noqa: E402
from mpboot.factory.station import Outcome, Station, StationConfig  # noqa: E402
from mpboot.flashing import prepare  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402
from simserve import SimProcess  # noqa: E402

COUNTS = (1, 2, 4, 8)
APP_FILLER = 120 * 1024  # incompressible bytes in the app: a 128 KiB image
SIM_ARGS = ("--baud", "921600", "--flash-timing", "nor")


def run(tmp: Path, key_path: Path, image: bytes, n: int, keyhash: bytes) -> tuple[float, list[float]]:
    sims = [SimProcess(tmp / f"n{n}" / f"b{i}", [key_path], *SIM_ARGS) for i in range(n)]
    try:
        for sim in sims:
            sim.wait_for(r"serving SMP")
        db = FactoryDB.open(str(tmp / f"n{n}.sqlite"))
        cfg = StationConfig(image=prepare(image), expect_keys=frozenset({keyhash}),
                            serials=SerialPrefix(f"B{n}-"), station="bench", operator="bench")
        t0 = time.monotonic()
        boards = Station(cfg, db).run([s.path for s in sims], parallel=n)
        elapsed = time.monotonic() - t0
        db.close()
        bad = [b for b in boards if b.outcome is not Outcome.PROVISIONED]
        if bad:
            raise SystemExit(f"bench_provision: {len(bad)} boards failed: {bad[0].error}")
        return elapsed, [b.elapsed for b in boards]
    finally:
        for sim in sims:
            sim.stop()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-provision-") as d:
        tmp = Path(d)
        key = generate("rsa-2048")
        key_path = tmp / "bench-key.pem"
        key_path.write_bytes(key.private_pem())
        os.chmod(key_path, 0o600)
        image = sign_app(make_app(tmp / "app", "1.0.0", confirm=True, filler=APP_FILLER), key, "1.0.0",
                         counter=1)
        print(f"factory station: {len(image) // 1024} KiB first app, sims at 921600 baud with NOR timing, "
              f"{os.cpu_count()} cores")
        base = None
        for n in COUNTS:
            elapsed, per_board = run(tmp, key_path, image, n, key.public().keyhash())
            rate = n / elapsed * 60
            base = base or rate
            print(f"  {n} in parallel: {elapsed:6.1f} s, {rate:5.1f} boards/min "
                  f"(per board {min(per_board):.1f}-{max(per_board):.1f} s), {rate / base:.2f}x one at a time")


if __name__ == "__main__":
    main()
