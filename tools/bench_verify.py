#!/usr/bin/env python3
"""Benchmark the device verifier on the MicroPython unix port (`make bench`).

For a 1 MiB image signed with a freshly generated key (RSA-2048 and RSA-3072), prints:
- the device verify time divided by the time of one bare SHA-256 pass over the same bytes,
  both measured in the same MicroPython run, through the same reader and buffer (goal for
  RSA-2048 <= 1.25; timing is reported, never asserted);
- the smallest heap (-X heapsize, in 512-byte steps) in which the device verifies it, with
  the firmware loaded as .mpy, and the heap the imports alone take (what freezing saves).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "host"))

from mpboot import upy  # noqa: E402
from mpboot.device import script_path, write_keys_module  # noqa: E402
from mpboot.image import ImageVersion, SignOptions, build_image  # noqa: E402
from mpboot.keys import generate  # noqa: E402
from mpboot.upy import compile_tree  # noqa: E402

MIB = 1024 * 1024
ROUNDS = 30
GOAL = 1.25


def smallest_heap(lib: Path, args: list[str], lo_kib: int = 4, hi_kib: int = 64) -> int:
    """Smallest -X heapsize (bytes, 512-byte steps) for which `micropython args` prints OK."""
    lo, hi = lo_kib * 2, hi_kib * 2
    while lo < hi:
        mid = (lo + hi) // 2
        proc = upy.run(args, path=[lib], heapsize=str(mid * 512))
        if proc.returncode == 0 and proc.stdout.startswith("OK"):
            hi = mid
        else:
            lo = mid + 1
    return lo * 512


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mpboot-bench-") as tmp_name:
        tmp = Path(tmp_name)
        payload = os.urandom(MIB)
        print(f"mpboot device verify benchmark: 1 MiB image, MicroPython unix port, {ROUNDS} rounds")
        for key_type in ("rsa-2048", "rsa-3072"):
            key = generate(key_type)  # fresh key: benchmarks never use shipped or test keys
            image = build_image(b"\xff" * 0x200 + payload, key,
                                SignOptions(ImageVersion(1, 0, 0), security_counter=1))
            work = tmp / key_type
            src, lib = work / "src", work / "lib"
            src.mkdir(parents=True)
            compile_tree(ROOT / "firmware" / "mpboot", lib / "mpboot")
            write_keys_module(src, [key.public()])
            shutil.copyfile(script_path("verify_images.py"), src / "verify_images.py")
            shutil.copyfile(ROOT / "tools" / "bench_device.py", src / "bench_device.py")
            (src / "imports_only.py").write_text(
                "from mpboot import image, reader\nfrom mpboot_keys import KEYS\nprint('OK')\n")
            compile_tree(src, lib)
            image_path = work / "image.bin"
            image_path.write_bytes(image)
            listing = work / "images.txt"
            listing.write_text(f"{image_path} {len(image)}\n")

            proc = upy.run(["-m", "bench_device", image_path, len(image), ROUNDS], path=[lib], heapsize="256k")
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            times = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in proc.stdout.splitlines()}
            bare_min, bare_med = times["bare_us"]
            ver_min, ver_med = times["verify_us"]
            ratio = ver_med / bare_med
            heap = smallest_heap(lib, ["-m", "verify_images", str(listing)])
            imports = smallest_heap(lib, ["-m", "imports_only"], lo_kib=1)
            if key_type == "rsa-2048":
                goal = f"goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT MET'}"
            else:
                goal = "no goal: one RSA-3072 public-key operation alone is ~0.4 of a 1 MiB SHA-256 pass"
            print(f"{key_type}: verify {ver_med / 1000:.2f} ms / bare SHA-256 {bare_med / 1000:.2f} ms "
                  f"(medians; min {ver_min / 1000:.2f} / {bare_min / 1000:.2f}) = ratio {ratio:.3f} ({goal})")
            print(f"{key_type}: smallest heap that verifies it: {heap / 1024:.1f} KiB "
                  f"(of which module imports as .mpy: {imports / 1024:.1f} KiB; frozen modules cost none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
