"""What the emulated Cortex-M3 board (mpboot.qemu) is measured by, shared by its tests
(tests/test_qemu.py, tests/test_qemu_serve.py) and `make bench` (tools/bench_qemu.py): the
heap the boot needs, the heap the SMP service holds during a full upload, the firmware size
mpboot adds, the upload rate over the emulated UART.

Heap figures are found as the smallest free heap something works in, with the garbage
collector on (a ballast takes the rest): what it holds at once at its peak, not what it
allocates over time (micropython.mem_peak and a disabled collector count that).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import qemukit
from simkit import make_app, sign_app
from simserve import ok

from mpboot.keys import PublicKey, SigningKey
from mpboot.qemu import FLASH_BASE, QemuBoard, create_flash, write_flash
from mpboot.qemu.build import build_bare, build_firmware, text_bytes
from mpboot.qemu.serve import QemuSimServer

SERVING = r"mpboot: serving SMP"
BOOT_GOAL = 12 * 1024  # the goal for the boot decision + verify (+ mount, app)
SERVICE_GOAL = 32 * 1024  # the goal for the SMP service + a full upload
BOOT_IMAGE_KIB = 256
_BALLAST_SLACK = 32  # the ballast bytearray's own object and rounding

# A factory-fresh board (the signed app in slot 0, state and factory areas erased) boots
# (decide, verify in place, confirm, VfsRom mount, the app's import) with FREE bytes of heap
# left by a ballast. Warm: mpboot's modules imported before the ballast (on a board they are
# loaded once, by boot.py); cold: the imports count too.
_IMPORTS = "from mpboot import boot\nfrom mpboot.ports import qemu as port\nfrom mpboot_keys import KEYS\n"
_BOOT_IN_HEAP = """
import gc
gc.collect()
{warm}gc.collect()
ballast = bytearray(gc.mem_free() - {free} - {slack})
gc.collect()
free = gc.mem_free()
try:
{cold}    ok = boot.start(port, port.areas(), KEYS)
    print("BOOT", ok, free)
except MemoryError:
    print("OOM", free)
"""


@dataclass(frozen=True)
class BootHeap:
    free_b: int  # the smallest free heap (to `step`) the boot completed in
    failed_b: int  # the largest one it failed in, `step` below
    cold: bool  # mpboot's imports included


def boot_image(folder: Path, key: SigningKey) -> bytes:
    """A signed BOOT_IMAGE_KIB KiB app (incompressible filler) that does not confirm itself."""
    return sign_app(make_app(folder, "qemu-1", confirm=False, filler=BOOT_IMAGE_KIB * 1024), key, "1.0.0")


def boots_in(elf: Path, flash: Path, image: bytes, free_b: int, cold: bool,
             extra: Sequence[tuple[int, bytes]] = ()) -> bool:
    """One power-on of a factory-fresh board with `image` in slot 0 (and each (offset, bytes)
    of `extra` written to its flash): did the boot complete with only `free_b` bytes of free
    heap?"""
    create_flash(flash)
    write_flash(flash, 0, image)
    for offset, data in extra:
        write_flash(flash, offset, data)
    code = _BOOT_IN_HEAP.format(warm="" if cold else _IMPORTS, free=free_b, slack=_BALLAST_SLACK,
                                cold="".join(f"    {line}\n" for line in _IMPORTS.splitlines()) if cold else "")
    with QemuBoard(elf, flash) as board:
        board.raw_repl()
        out = board.exec(code)
    (line,) = [x for x in out.splitlines() if x.startswith(("BOOT ", "OOM "))]
    verdict, *rest = line.split()
    got = int(rest[-1])
    assert abs(got - free_b) <= 32, f"ballast left {got} B free, not {free_b}"
    if verdict == "BOOT":
        assert rest[0] == "True" and "APP qemu-1" in out, out
    return verdict == "BOOT"


def smallest_boot_heap(elf: Path, flash: Path, image: bytes, cold: bool, lo_b: int, hi_b: int,
                       step_b: int = 256, extra: Sequence[tuple[int, bytes]] = ()) -> BootHeap:
    """Bisects the free heap the boot needs between lo_b (must fail) and hi_b (must work)."""
    assert boots_in(elf, flash, image, hi_b, cold, extra), f"the boot does not complete in {hi_b} B of free heap"
    assert not boots_in(elf, flash, image, lo_b, cold, extra), f"the boot completes in {lo_b} B: bisect lower"
    while hi_b - lo_b > step_b:
        mid = (lo_b + hi_b) // 2 // step_b * step_b
        if boots_in(elf, flash, image, mid, cold, extra):
            hi_b = mid
        else:
            lo_b = mid
    return BootHeap(hi_b, lo_b, cold)


# The board's boot (what it holds after), then a ballast that leaves the service exactly
# SERVICE_GOAL bytes of heap for everything after the boot (the link, the framer and server,
# the upload, the final verify): the upload must still complete. Each time a read of the UART
# finds nothing waiting (between requests) a collection, then the free heap: the most the
# service holds there. When the client asks for a reset, the figures go into the flash past
# the areas (read from the flash file), and the board resets.
FIGURES_OFFSET = qemukit.DATA_OFFSET
HEAP_ENTRY = f"""
import gc, micropython, uctypes
import mpboot_keys
from mpboot import boot
from mpboot.smp import service
from mpboot.ports import qemu as port
gc.collect()
f0 = gc.mem_free()
boot.start(port, port.areas(), mpboot_keys.KEYS)
gc.collect()
f1 = gc.mem_free()
ballast = bytearray(f1 - {SERVICE_GOAL} - 64)
gc.collect()
f2 = gc.mem_free()
link = port.uart()
low = [f2]
read = link.readinto
def readinto(buf):
    n = read(buf)
    if not n:
        gc.collect()
        f = gc.mem_free()
        if f < low[0]:
            low[0] = f
    return n
link.readinto = readinto
reset = port.reset
def report():
    line = b"HEAP %d %d %d %d\\n" % (f0 - f1, f2, f2 - low[0], len(ballast))
    uctypes.bytearray_at({FLASH_BASE + FIGURES_OFFSET:#x}, len(line))[:] = line
    reset()
port.reset = report
print("mpboot: serving SMP (buf_size 2048, buf_count 4)")
service.run(port, link)
"""


@dataclass(frozen=True)
class Flashed:
    output: str  # the CLI's
    seconds: float  # the flash command's wall time
    image_b: int

    def rate(self) -> str:
        """The CLI's own upload summary ("uploaded N bytes in S s (R KiB/s, ...)")."""
        m = re.search(r"uploaded .*\)", self.output)
        return m.group(0) if m else "?"


def flash_board(state: Path, keys: Sequence[PublicKey], image: Path, entry: str | None = None) -> Flashed:
    """The board in `state` served in-process (boot entry `entry`, else the board's own):
    `mpboot flash IMAGE --test --reset` over its UART, until the board has reset."""
    console = qemukit.Console()
    server = QemuSimServer(state, keys, entry=entry, output=console.queue.put)
    try:
        server.start()
        console.wait_for(SERVING)
        t0 = time.monotonic()
        out = ok("flash", image, "--port", server.path, "--test", "--reset", "--no-progress")
        seconds = time.monotonic() - t0
        assert "marked for a test boot" in out
        console.wait_for(r"mpboot sim: device reset")
    finally:
        server.stop()
    return Flashed(out, seconds, image.stat().st_size)


@dataclass(frozen=True)
class ServiceHeap:
    boot_held_b: int  # what the board holds after its boot
    free_b: int  # the free heap the service and the upload ran in
    held_b: int  # the most the service held between requests
    ballast_b: int
    flashed: Flashed


def service_heap(state: Path, keys: Sequence[PublicKey], image: Path) -> ServiceHeap:
    """A full upload (and test mark) into a board whose service has SERVICE_GOAL of heap."""
    flashed = flash_board(state, keys, image, HEAP_ENTRY)
    with open(state / "flash.img", "rb") as f:
        f.seek(FIGURES_OFFSET)
        figures = f.read(80).split(b"\n")[0].decode(errors="replace")
    assert figures.startswith("HEAP "), figures
    boot_b, free_b, held_b, ballast_b = map(int, figures.split()[1:])
    return ServiceHeap(boot_b, free_b, held_b, ballast_b, flashed)


def firmware_sizes(keys: Sequence[PublicKey]) -> tuple[int, int]:
    """text + rodata of the firmware without and with mpboot and `keys` frozen in."""
    return text_bytes(build_bare().elf), text_bytes(build_firmware(keys).elf)
