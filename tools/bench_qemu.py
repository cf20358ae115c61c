#!/usr/bin/env python3
"""Benchmark mpboot on the emulated Cortex-M3 board (`make bench`): MicroPython's qemu port
(mps2-an385) with mpboot frozen in, run under QEMU (mpboot.qemu, docs/PORTING.md Recipe 1).

With a freshly generated RSA-2048 key (never a shipped or test key; the firmware is built
for it, about a second once the port is built), prints, measured as the tests measure them
(tests/qemumeasure.py):
- the heap the boot needs (decide, verify a 256 KiB image in place, confirm, mount, the app),
  the smallest free heap it completes in with the garbage collector on: with mpboot's modules
  loaded (goal <= 12 KiB) and from cold;
- the heap the SMP service holds during a full upload and test mark, in a heap cut to 32 KiB
  (goal: it completes there);
- the firmware size mpboot (and one key) adds to the port's firmware (text + rodata);
- the upload rate of `mpboot flash` over the emulated UART (unpaced; QEMU's UART model sets
  the pace).
Skips with one line where the toolchain (gcc-arm-none-eabi, newlib, qemu-system-arm) or the
MicroPython source is missing.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))
sys.path.insert(0, str(ROOT / "tests"))

import qemukit  # noqa: E402
import qemumeasure as qm  # noqa: E402
from simkit import make_app, sign_app  # noqa: E402

from mpboot.keys import generate  # noqa: E402

UPLOAD_KIB = 64


def main() -> int:
    reason = qemukit.unavailable_reason()
    if reason:
        print(f"bench_qemu: skipped: {reason}")
        return 0
    started = time.monotonic()
    key = generate("rsa-2048")
    keys = [key.public()]
    print("mpboot on the emulated Cortex-M3 (MicroPython v1.28.0 qemu port, mps2-an385, mpboot frozen in), "
          "fresh RSA-2048 key", flush=True)
    firmware = qemukit.build_firmware(keys)
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-qemu-") as name:
        work = Path(name)
        image = qm.boot_image(work / "boot-app", key)
        flash = work / "flash.img"
        warm = qm.smallest_boot_heap(firmware.elf, flash, image, False, 4 * 1024, 16 * 1024)
        cold = qm.smallest_boot_heap(firmware.elf, flash, image, True, warm.failed_b, 32 * 1024)
        verdict = "met" if warm.free_b <= qm.BOOT_GOAL else "MISSED"
        print(f"  boot of a {qm.BOOT_IMAGE_KIB} KiB image (decide, verify in place, confirm, mount, app), gc on: "
              f"completes in {warm.free_b} B of free heap with mpboot's modules loaded (not in {warm.failed_b}); "
              f"goal <= {qm.BOOT_GOAL} B: {verdict}")
        print(f"  the same from cold (mpboot's imports included): {cold.free_b} B (not in {cold.failed_b})")

        app = work / "service-app.bin"
        app.write_bytes(sign_app(make_app(work / "service-app", "heap", confirm=False, filler=36 * 1024), key,
                                 "1.0.0"))
        heap = qm.service_heap(work / "heap-dev", keys, app)
        verdict = "met" if heap.held_b < qm.SERVICE_GOAL else "MISSED"
        print(f"  SMP service + full upload ({heap.flashed.image_b} B, test mark) in {heap.free_b} B of free heap: "
              f"completes, holding at most {heap.held_b} B between requests (after the boot: {heap.boot_held_b} B "
              f"held); goal <= {qm.SERVICE_GOAL} B: {verdict}")

        bare, with_mpboot = qm.firmware_sizes(keys)
        print(f"  firmware text + rodata: {bare} B bare, {with_mpboot} B with mpboot and one RSA-2048 key "
              f"(+{with_mpboot - bare} B)")

        big = work / "upload.bin"
        big.write_bytes(sign_app(make_app(work / "upload-app", "rate", confirm=False, filler=UPLOAD_KIB * 1024),
                                 key, "1.0.0"))
        flashed = qm.flash_board(work / "rate-dev", keys, big)
        print(f"  mpboot flash over the emulated UART: {flashed.rate()}; the whole command (connect, upload, "
              f"verify, mark, reset) {flashed.seconds:.1f} s")
    print(f"(took {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
