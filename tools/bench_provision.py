#!/usr/bin/env python3
"""Benchmark the factory station (`make bench`): boards provisioned per minute with 1, 2, 4
and 8 simulated boards provisioned in parallel by one station.

Each run starts fresh `mpboot sim` boards (a freshly generated key, never a shipped or test
key) and times the station from its start to the last board sealed, read back and recorded in
SQLite: connect, key check, serial, upload of a 120 KiB first app, test boot, the app's
confirm, identity, floor, policy, verify, seal, verify. Two series: boards like real ones
(lines paced as a 921600-baud UART, NOR flash erase/program times: the board's time is mostly
waiting, as on a USB hub), and boards as fast as the simulator goes (no pacing, no flash
timing: every board is CPU work on this machine's cores, shared with the station). Prints
boards/minute per run and the speed-up over one board at a time, measured side by side.
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
from mpboot.factory.station import ProvisionOutcome, Station, StationConfig  # noqa: E402
from mpboot.flashing import prepare  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402
from simserve import SimProcess  # noqa: E402

COUNTS = (1, 2, 4, 8)
APP_FILLER = 120 * 1024  # incompressible bytes in the app: a 128 KiB image
SERIES = (("paced: 921600 baud, NOR flash timing", ("--baud", "921600", "--flash-timing", "nor")),
          ("unpaced: CPU-bound simulator", ()))


def run(tmp: Path, key_path: Path, image: bytes, n: int, keyhash: bytes,
        sim_args: tuple[str, ...]) -> tuple[float, list[float]]:
    where = tmp / f"{len(sim_args)}-{n}"
    sims = [SimProcess(where / f"b{i}", [key_path], *sim_args) for i in range(n)]
    try:
        for sim in sims:
            sim.wait_for(r"serving SMP")
        db = FactoryDB.open(str(where / "factory.sqlite"))
        cfg = StationConfig(image=prepare(image), expect_keys=frozenset({keyhash}),
                            serials=SerialPrefix(f"B{n}-"), station="bench", operator="bench")
        t0 = time.monotonic()
        boards = Station(cfg, db).run([s.path for s in sims], parallel=n)
        elapsed = time.monotonic() - t0
        db.close()
        bad = [b for b in boards if b.outcome is not ProvisionOutcome.PROVISIONED]
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
                         security_counter=1)
        print(f"factory station: {len(image) // 1024} KiB first app, {os.cpu_count()} cores")
        for title, sim_args in SERIES:
            print(f" {title}")
            base = None
            for n in COUNTS:
                elapsed, per_board = run(tmp, key_path, image, n, key.public().keyhash(), sim_args)
                rate = n / elapsed * 60
                base = base or rate
                print(f"  {n} in parallel: {elapsed:6.1f} s, {rate:5.1f} boards/min "
                      f"(per board {min(per_board):.1f}-{max(per_board):.1f} s), {rate / base:.2f}x one at a time")


if __name__ == "__main__":
    main()
