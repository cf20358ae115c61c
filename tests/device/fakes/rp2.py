# Fake of MicroPython's rp2 module (Flash only) for the unix port, over a file-backed NOR
# chip (mpboot.ports.nor_sim.NorFlash) that stands for the flash storage area. Behaviour
# follows ports/rp2/rp2_flash.c: Flash(start=, len=) keyword-only, multiples of 4096 inside
# the storage area else ValueError; 4096-byte blocks; ioctl(6, n) erases block n.
# Stricter than the port where the port is silent: flash_range_program needs 256-byte aligned
# offset and length (pico-sdk hardware_flash; unchecked there, it corrupts flash), this fake
# raises OSError(EINVAL); reads and writes outside the region raise OSError(EINVAL) (the port
# reads whatever XIP holds there); programming a 1 over a 0 raises OSError(EIO) (nor_sim).
#
#   import rp2
#   rp2.setup(path, size)    # path defaults to $MPBOOT_FAKE_FLASH; a new setup() is a power cycle
#   rp2.xip(flash)           # stands for memoryview(flash): the region as memory-mapped (XIP)
import gc
import os
from micropython import const

from mpboot.ports.nor_sim import NorFlash

_SECTOR = const(4096)  # FLASH_SECTOR_SIZE
_PAGE = const(256)  # FLASH_PAGE_SIZE
_EINVAL = const(22)

_chip = None
_size = 0  # MICROPY_HW_FLASH_STORAGE_BYTES


def setup(path=None, size=0x10000):
    global _chip, _size
    if _chip is not None:
        _chip.close()
    _chip = NorFlash(path or os.getenv("MPBOOT_FAKE_FLASH"), size, _SECTOR, 1)
    _size = size


def chip():
    return _chip


class Flash:
    def __init__(self, *, start=-1, len=-1):
        if start == -1:
            start = 0
        elif not (0 <= start < _size and start % _SECTOR == 0):
            raise ValueError
        if len == -1:
            len = _size - start
        elif not (0 < len and start + len <= _size and len % _SECTOR == 0):
            raise ValueError
        self._start = start
        self._len = len

    def _range(self, a, n):
        if a < 0 or a + n > self._len:
            raise OSError(_EINVAL)
        return self._start + a

    def readblocks(self, n, buf, off=0):
        _chip.readblocks(0, buf, self._range(n * _SECTOR + off, len(buf)))

    def writeblocks(self, n, buf, off=None):
        a = n * _SECTOR
        if off is None:
            # flash_range_erase(offset, len(buf)): whole sectors only
            if len(buf) % _SECTOR:
                raise OSError(_EINVAL)
            for i in range(len(buf) // _SECTOR):
                self.ioctl(6, n + i)
        else:
            a += off
        if (a | len(buf)) % _PAGE:
            raise OSError(_EINVAL)
        _chip.writeblocks(0, buf, self._range(a, len(buf)))

    def ioctl(self, op, arg):
        if op in (1, 2, 3):
            return 0
        if op == 4:
            return self._len // _SECTOR
        if op == 5:
            return _SECTOR
        if op == 6:
            _chip.ioctl(6, self._range(arg * _SECTOR, _SECTOR) // _SECTOR)
            return 0
        return None


def xip(flash):
    # memoryview(flash) on the port (rp2_flash_get_buffer: read-only, the whole region); here
    # a copy of what the chip holds now.
    gc.collect()  # the copy is the fake's cost, not the port's: make room for it
    buf = bytearray(flash._len)
    _chip.readblocks(0, buf, flash._start)
    return memoryview(buf)
