#!/usr/bin/env python3
"""Benchmark two stages on the emulated Cortex-M3 board (`make bench`; issue 19, docs/BOOT.md
"Two stages"): what loading the update service from a signed stage-1 slot costs against the
service frozen in the firmware, measured side by side in one run on MicroPython's qemu port
with mpboot frozen in (the firmware is built for a freshly generated RSA-2048 key).

Two boards, each with the same confirmed app (32 KiB) in its slot:
- one stage: boot.start, then the frozen service imported;
- two stages: stages.start (both pairs decided, stage 1, the real service packed by `mpboot
  firmware export --stage1` and signed, verified in place and its packages imported from its
  ROMFS, mapped from flash), then the same service from there.
Printed for each: the heap the boot and the service's import hold (gc.mem_free before
boot.start/stages.start and after the import, collected), and the time from the boot entry
to the service ready (time.ticks_ms on the board); then the two-stage figures as ratios.
Skips with one line where the toolchain or the MicroPython source is missing.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

import qemukit  # noqa: E402
from simkit import make_app, make_service, sign_app  # noqa: E402
from simserve import ok  # noqa: E402

from mpboot.image import ImageKind  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.qemu.serve import QemuSimServer  # noqa: E402

SLOT = 64 * 1024
S1 = 64 * 1024
SERVING = r"mpboot: serving SMP"
RUNS = 3

ENTRY = """
import gc, time
import mpboot_keys
from mpboot import {module}
from mpboot.ports import qemu as port
gc.collect()
f0 = gc.mem_free()
t0 = time.ticks_ms()
{module}.start(port, port.areas(0, {slot}, {state}{stage1}), mpboot_keys.KEYS)
from mpboot.smp import service
t1 = time.ticks_ms()
gc.collect()
print("BENCH %d %d" % (f0 - gc.mem_free(), time.ticks_diff(t1, t0)))
print("mpboot: serving SMP (buf_size 2048, buf_count 4)")
service.run(port, port.uart())
"""


def entry(two: bool) -> str:
    stage1 = f", stage1=({2 * SLOT + 16 * 4096}, {S1})" if two else ""
    return ENTRY.format(module="stages" if two else "boot", slot=SLOT, state=2 * SLOT, stage1=stage1)


def prepare(state: Path, keys: list, app: Path, stage1: Path | None) -> None:
    """A new board in `state` with the app (and stage 1) flashed, confirmed, over its UART."""
    console = qemukit.Console()
    server = QemuSimServer(state, keys, slot_size=SLOT, s1_size=S1 if stage1 else None, output=console.queue.put)
    try:
        server.start()
        console.wait_for(SERVING)
        ok("flash", app, "--port", server.path, "--confirm", "--no-progress")
        if stage1 is not None:
            ok("flash", stage1, "--port", server.path, "--image", "stage1", "--test", "--reset", "--no-progress")
    finally:
        server.stop()


def measure(state: Path, keys: list, two: bool) -> tuple[int, int]:
    """(heap held, ms to the service ready) of one power-on of the board in `state`."""
    console = qemukit.Console()
    server = QemuSimServer(state, keys, entry=entry(two), output=console.queue.put)
    try:
        server.start()
        line = console.lines[console.wait_for(r"BENCH \d+ \d+")]
        console.wait_for(SERVING)
    finally:
        server.stop()
    m = re.search(r"BENCH (\d+) (\d+)", line)
    assert m is not None, line
    return int(m.group(1)), int(m.group(2))


def main() -> int:
    reason = qemukit.unavailable_reason()
    if reason:
        print(f"bench_stages: skipped: {reason}")
        return 0
    started = time.monotonic()
    key = generate("rsa-2048")
    keys = [key.public()]
    print("two stages on the emulated Cortex-M3 (MicroPython qemu port, mpboot frozen in), fresh RSA-2048 key",
          flush=True)
    qemukit.build_firmware(keys)
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-stages-") as name:
        work = Path(name)
        app = work / "app.bin"
        app.write_bytes(sign_app(make_app(work / "app", "bench", confirm=True, filler=32 * 1024), key, "1.0.0"))
        s1 = work / "stage1.bin"
        s1.write_bytes(sign_app(make_service(work / "stage1"), key, "1.0.0", kind=ImageKind.UPDATER))
        prepare(work / "one", keys, app, None)
        prepare(work / "two", keys, app, s1)
        rows = {}
        for label, two in (("one stage (service frozen)", False), ("two stages (service from its slot)", True)):
            runs = [measure(work / ("two" if two else "one"), keys, two) for _ in range(RUNS)]
            held = max(r[0] for r in runs)
            ms = sorted(r[1] for r in runs)[RUNS // 2]
            rows[two] = (held, ms)
            print(f"  {label}: boot + service import hold {held} B of heap; entry to service ready {ms} ms "
                  f"(median of {RUNS})")
        (h1, t1), (h2, t2) = rows[False], rows[True]
        print(f"  two stages / one stage: heap {h2 / h1:.2f}x (+{h2 - h1} B), time {t2 / max(t1, 1):.2f}x "
              f"(+{t2 - t1} ms); stage-1 image {s1.stat().st_size} B")
    print(f"(took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
