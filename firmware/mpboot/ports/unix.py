# The unix port as a simulated device: flash is a NorFlash file (mpboot.ports.nor_sim), laid
# out as slot 0 | slot 1 | state (two sectors). The unix port has no machine.WDT and cannot
# map flash: the watchdog is a fake that records what was asked of it, and mapped() returns
# None so the boot copies the image to RAM and verifies that copy (hardware maps flash).
import sys

from mpboot.flash import Area
from mpboot.ports.nor_sim import NorFlash


def flash(path, size, sector=4096, align=1):
    return NorFlash(path, size, sector, align)


def areas(chip):
    sec = chip.sector
    slot = (chip.size // sec - 2) // 2 * sec
    a = chip.align
    return Area(chip, 0, slot, a), Area(chip, slot, slot, a), Area(chip, 2 * slot, 2 * sec, a)


def mapped(area):
    return None


class _Watchdog:
    # machine.WDT stand-in: armed with a timeout, fed by the app; nothing resets the process.
    def __init__(self, timeout_ms):
        self.timeout_ms = timeout_ms
        self.feeds = 0

    def feed(self):
        self.feeds += 1


def watchdog(timeout_ms):
    return _Watchdog(timeout_ms)


def reset():
    sys.exit(0)  # a new process is the next power-on


def unique_id():
    return b"mpboot-sim"
