# Fake of MicroPython's pyb module (Flash only) for the unix port, over a file-backed NOR
# chip (mpboot.ports.nor_sim.NorFlash) that stands for the flash storage segment. Behaviour
# follows ports/stm32/storage.c (pyb.Flash), flashbdev.c (internal flash) and flash.c:
#
# mode "internal": 512-byte blocks (FLASH_BLOCK_SIZE), also after ioctl(1, 1); ioctl(6) does
#   nothing. Extended reads/writes walk 512-byte blocks through ONE RAM copy of a flash sector
#   shared by every Flash object (at most cache_max bytes of it); writing to another sector or
#   ioctl(2)/(3) flushes it: the whole physical sector is erased, then the copy programmed
#   back. The port's flash IRQ also erases the sector about 0.5 s after it is dirtied and
#   programs it back after 5 s without writes, which a fake without time does not do: here
#   data stays in RAM until a flush (a new setup() loses it, like a power cut).
# mode "spi" (MICROPY_HW_BDEV_SPIFLASH_EXTENDED): extended block numbers count 4096-byte
#   blocks; after ioctl(1, 1) ioctl(4)/(5) use 4096 too and ioctl(6, n) erases block n;
#   writes program directly.
#
# Reads and writes return 0, or -1 for a block outside the storage (they do not raise); on the
# deprecated Flash() the extended protocol answers -5 (EIO) and ioctl(1, 1) -1. Stricter than
# the port where the port is undefined: a block offset of 512 or more raises OSError(EINVAL)
# (flashbdev.c would overrun its sector copy), so does a copy access past cache_max; the
# simple protocol (no offset) is not modelled; one storage segment only (no SEG2).
#
#   import pyb
#   pyb.setup(path, sectors=(16384,) * 3 + (65536,), base=0x08004000, cache_max=65536)
#   pyb.setup(path, mode="spi", size=0x10000)
#   pyb.mem(addr, n)   # stands for uctypes.bytearray_at(addr, n): flash as the CPU reads it
import gc
import os
from micropython import const

from mpboot.ports.nor_sim import NorFlash

_BLOCK = const(512)  # FLASH_BLOCK_SIZE
_SPI = const(4096)  # MP_SPIFLASH_ERASE_BLOCK_SIZE
_EINVAL = const(22)

_chip = None
_spi = False
_size = 0  # storage bytes
_base = 0  # flash address of storage byte 0 (FLASH_MEM_SEG1_START_ADDR)
_sectors = ()  # physical sector sizes from storage byte 0 on
_unit = 0  # nor_sim sector: every physical sector is a whole number of them
_cache_max = 0  # FLASH_SECTOR_SIZE_MAX
_cache = None
_cache_sec = -1  # index in _sectors of the sector in the copy, -1: none
_cache_start = 0
_cache_len = 0
_dirty = False
flushes = 0  # sector flushes done (erase + program), for tests


def setup(path=None, sectors=(16384, 16384, 16384, 65536), base=0x08004000,
          cache_max=65536, mode="internal", size=0x10000, align=4):
    # path defaults to $MPBOOT_FAKE_FLASH. A new setup() is a power cycle: RAM is lost.
    global _chip, _spi, _size, _base, _sectors, _unit, _cache_max, _cache, _cache_sec, _dirty
    global flushes
    if _chip is not None:
        _chip.close()
    _cache = None
    gc.collect()
    path = path or os.getenv("MPBOOT_FAKE_FLASH")
    _spi = mode == "spi"
    _base = base
    _cache_sec = -1
    _dirty = False
    flushes = 0
    if _spi:
        _size = size
        _sectors = ()
        _chip = NorFlash(path, size, _SPI, 1)
        _cache = None
        return
    _sectors = sectors
    _size = sum(sectors)
    _unit = min(sectors)
    for s in sectors:
        if s % _unit or s % _BLOCK:
            raise ValueError("sectors")
    _cache_max = cache_max
    _cache = bytearray(cache_max)
    _chip = NorFlash(path, _size, _unit, align)


def chip():
    return _chip


def _sector(addr):
    # flash_get_sector_info: (index, start, size) of the physical sector holding addr.
    start = 0
    for i in range(len(_sectors)):
        if addr < start + _sectors[i]:
            return i, start, _sectors[i]
        start += _sectors[i]
    raise OSError(_EINVAL)


def _flush():
    # flash_bdev_ioctl(BDEV_IOCTL_SYNC): erase the cached sector (flash_erase takes the whole
    # physical sector), then program the copy back (flash_write).
    global _dirty, flushes
    if not _dirty:
        return
    i, start, size = _sector(_cache_start)
    for b in range(size // _unit):
        _chip.ioctl(6, start // _unit + b)
    _chip.writeblocks(0, memoryview(_cache)[:_cache_len], start)
    _dirty = False
    flushes += 1


def _copy_offset(addr, n, write):
    # flash_cache_get_addr_for_write/read: offset in the copy, or -1 to use the flash.
    global _cache_sec, _cache_start, _cache_len, _dirty
    i, start, size = _sector(addr)
    if write and i != _cache_sec:
        _flush()
        size = min(size, _cache_max)
        _chip.readblocks(0, memoryview(_cache)[:size], start)
        _cache_sec, _cache_start, _cache_len = i, start, size
    if i != _cache_sec:
        return -1
    if addr - start + n > _cache_len:
        raise OSError(_EINVAL)  # the port would read or write past its sector copy
    if write:
        _dirty = True
    return addr - start


def _ext(buf, block, off, write):
    # flash_bdev_readblocks_ext / flash_bdev_writeblocks_ext.
    if off >= _BLOCK:
        raise OSError(_EINVAL)
    mv = memoryview(buf)
    i = 0
    while i < len(mv):
        n = min(len(mv) - i, _BLOCK - off)
        if block >= _size // _BLOCK:
            return -1
        addr = block * _BLOCK + off
        o = _copy_offset(addr, n, write)
        if write:
            _cache[o : o + n] = mv[i : i + n]
        elif o >= 0:
            mv[i : i + n] = _cache[o : o + n]
        else:
            _chip.readblocks(0, mv[i : i + n], addr)
        i += n
        block += 1
        off = 0
    return 0


def _spi_io(buf, block, off, write):
    # spi_bdev_readblocks_raw / spi_bdev_writeblocks_raw (mp_spiflash_read/write).
    addr = block * _SPI + off
    if addr + len(buf) > _size:
        return -1
    if write:
        _chip.writeblocks(0, buf, addr)
    else:
        _chip.readblocks(0, buf, addr)
    return 0


class Flash:
    def __init__(self, *, start=-1, len=-1):
        self._legacy = start == -1 and len == -1
        self._native = False  # use_native_block_size
        if self._legacy:
            self._start, self._len = 0, _size
            return
        unit = _SPI if _spi else _BLOCK  # PYB_FLASH_NATIVE_BLOCK_SIZE
        if start == -1:
            start = 0
        elif not (0 <= start < _size and start % unit == 0):
            raise ValueError
        if len == -1:
            len = _size - start
        elif not (0 < len and start + len <= _size and len % unit == 0):
            raise ValueError
        self._start = start
        self._len = len

    def _io(self, n, buf, off, write):
        if off is None:
            raise NotImplementedError("simple block protocol")
        if self._legacy:
            return -5
        if _spi:
            return _spi_io(buf, n + self._start // _SPI, off, write)
        return _ext(buf, n + self._start // _BLOCK, off, write)

    def readblocks(self, n, buf, off=None):
        return self._io(n, buf, off, False)

    def writeblocks(self, n, buf, off=None):
        return self._io(n, buf, off, True)

    def ioctl(self, op, arg):
        if op == 1:
            if arg == 1:
                if self._legacy:
                    return -1
                if _spi:
                    self._native = True
            return 0
        if op in (2, 3):
            if not _spi:
                _flush()
            return 0
        if op == 4:
            return self._len // (_SPI if self._native else _BLOCK)
        if op == 5:
            return _SPI if self._native else _BLOCK
        if op == 6:
            if self._native:
                _chip.ioctl(6, self._start // _SPI + arg)
            return 0
        return None


def mem(addr, n):
    # The flash as the CPU bus reads it (uctypes.bytearray_at): what is programmed, not the
    # port's RAM sector copy. A copy here.
    off = addr - _base
    if off < 0 or off + n > _size:
        raise ValueError("not storage")
    gc.collect()  # the copy is the fake's cost, not the port's: make room for it
    buf = bytearray(n)
    _chip.readblocks(0, buf, off)
    return memoryview(buf)
