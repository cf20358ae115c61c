#!/usr/bin/env python3
"""Benchmark flash wear of updates on the simulated device (`make bench`).

With a freshly generated key (never a shipped or test key), a device running a confirmed
v1 takes updates v2, v3, ... (upload in 512-byte writes, test boot, confirm), each a
full-slot-size image, named by its SHA-256 as SMP uploads are (so the persisted session and
its checkpoints are counted), with the NOR simulator tracing every flash operation. Prints:
- flash bytes programmed per image byte, per update (upload + state records; goal <= 1.02);
- erases per slot sector per update, and the state area's erases per update (amortised:
  its log switches sectors only when one fills);
- the heap the boot decision needs beyond the firmware modules (bisected), for RSA-2048.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

from mpboot import upy  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.sim import Geometry, SimDevice, build_lib  # noqa: E402
from simkit import Booted, installed, make_app, sign_app  # noqa: E402

GOAL = 1.02
KIB = 1024


def ops(trace: Path) -> list[tuple[str, int, int]]:
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        kind, addr, length = line.split()
        out.append((kind, int(addr), int(length)))
    return out


def update_wear(tmp: Path, lib: Path, key, image_kib: int, updates: int, geometry: Geometry) -> None:  # type: ignore[no-untyped-def]
    dev = SimDevice(tmp / f"dev-{image_kib}", lib, geometry)
    images = []
    for i in range(updates + 1):
        version = f"{i + 1}.0.0"
        romfs = make_app(tmp / f"app-{image_kib}-{i}", version, confirm=True, filler=image_kib * KIB - 4 * KIB)
        path = tmp / f"v{version}-{image_kib}.bin"
        path.write_bytes(sign_app(romfs, key, version))
        images.append(path)
    installed(dev.install(images[0], "permanent"))
    slot_sectors = geometry.slot_size // geometry.sector
    state_base = 2 * geometry.slot_size
    ratios = []
    slot_erases: Counter[int] = Counter()
    state_erases = 0
    for path in images[1:]:
        trace = tmp / "trace.txt"
        trace.unlink(missing_ok=True)
        # Named by sha, as SMP uploads are: the persisted session and its checkpoints count.
        installed(dev.install(path, "test", chunk=512, sha=True, trace=trace))
        b = Booted.parse(dev.boot(trace=trace))
        assert b.trial and b.confirmed, b
        done = ops(trace)
        programmed = sum(n for kind, _, n in done if kind == "W")
        ratios.append(programmed / path.stat().st_size)
        for kind, addr, _ in done:
            if kind == "E":
                if state_base <= addr < state_base + 2 * geometry.sector:
                    state_erases += 1
                else:
                    slot_erases[addr] += 1
    size = images[1].stat().st_size
    worst = max(ratios)
    print(f"  {image_kib:5d} KiB images ({size} bytes), {updates} updates, sector {geometry.sector // KIB} KiB, "
          f"write unit {geometry.align}:")
    print(f"    programmed / image bytes: worst {worst:.4f}, mean {sum(ratios) / len(ratios):.4f} "
          f"(goal <= {GOAL}: {'met' if worst <= GOAL else 'MISSED'})")
    per_sector = [slot_erases[a] / (updates / 2) for a in slot_erases]  # each slot takes every other update
    print(f"    erases per slot sector per update into that slot: max {max(per_sector):.2f}, "
          f"sectors touched {len(slot_erases)} of {2 * slot_sectors}")
    print(f"    state area erases: {state_erases} in {updates} updates ({state_erases / updates:.3f} per update)")


def decision_heap(tmp: Path, lib: Path, key) -> int:  # type: ignore[no-untyped-def]
    dev = SimDevice(tmp / "heap", lib, Geometry.for_slots(1024 * KIB, 4096, 4))
    path = tmp / "heap.bin"
    path.write_bytes(sign_app(make_app(tmp / "heap-app", "1.0.0", confirm=True, filler=1020 * KIB), key, "1.0.0"))
    installed(dev.install(path, "permanent", chunk=4096))
    shutil.copyfile(ROOT / "tests" / "device" / "dev_decide.py", tmp / "dev_decide.py")
    upy.mpy_cross_compile(tmp / "dev_decide.py", lib / "dev_decide.mpy")
    g = dev.geometry
    lo, hi = 4, 64  # KiB
    while lo < hi:
        mid = (lo + hi) // 2
        proc = upy.run(["-m", "dev_decide", dev.flash, g.size, g.sector, g.align, mid * KIB],
                       path=[lib], heapsize="256k")
        if proc.returncode == 0 and "DECIDE 0 0" in proc.stdout:
            hi = mid
        else:
            lo = mid + 1
    return lo


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-update-") as name:
        tmp = Path(name)
        key = generate("rsa-2048")
        lib = build_lib(tmp / "lib", [key.public()])
        print("mpboot update flash-wear benchmark (simulated NOR flash, MicroPython unix port)")
        update_wear(tmp, lib, key, 60, 50, Geometry.for_slots(64 * KIB, 4096, 16))
        update_wear(tmp, lib, key, 1000, 4, Geometry.for_slots(1024 * KIB, 4096, 4))
        update_wear(tmp, lib, key, 250, 4, Geometry(8 * 128 * KIB, 128 * KIB, 8))
        print(f"  boot decision (1 MiB image, RSA-2048): fits in {decision_heap(tmp, lib, key)} KiB of heap "
              "beyond the firmware modules (which are frozen on a device)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
