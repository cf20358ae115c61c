# Fake of MicroPython's esp32 module (Partition only) for the unix port, over a file-backed
# NOR chip (mpboot.ports.nor_sim.NorFlash, 4096-byte sectors). Behaviour follows
# ports/esp32/esp32_partition.c and ESP-IDF esp_partition_read/write/erase_range
# (components/esp_partition/partition_target.c); errors are raised as check_esp_err does:
# OSError(-258) ESP_ERR_INVALID_ARG, OSError(-260) ESP_ERR_INVALID_SIZE, OSError(ENOENT).
# Stricter than silicon where it helps tests: programming a 1 over a 0 raises OSError(EIO)
# (nor_sim) where SPI flash would silently keep the 0. Not modelled: block sizes below 4096
# (the port then caches a sector for simple-protocol writes), set_boot and OTA bookkeeping.
#
#   import esp32
#   esp32.setup(path, chip_size, table, running=0)   # table: [(type, subtype, addr, size,
#                                                    #   label, encrypted)], running: index
# A new setup() is a power cycle (the chip is reopened from its file).
import os
from micropython import const

from mpboot.ports.nor_sim import NorFlash

_NATIVE = const(4096)  # NATIVE_BLOCK_SIZE_BYTES = SPI_FLASH_SEC_SIZE
_INVALID_ARG = const(-258)  # -ESP_ERR_INVALID_ARG
_INVALID_SIZE = const(-260)  # -ESP_ERR_INVALID_SIZE
_ENOENT = const(2)
_EINVAL = const(22)
_ANY = const(0xFF)  # ESP_PARTITION_SUBTYPE_ANY

_chip = None
_table = ()
_running = 0


def setup(path=None, size=0x40000, table=(), running=0):
    # path defaults to $MPBOOT_FAKE_FLASH.
    global _chip, _table, _running
    if _chip is not None:
        _chip.close()
    _chip = NorFlash(path or os.getenv("MPBOOT_FAKE_FLASH"), size, _NATIVE, 1)
    for p in table:
        if p[2] % _NATIVE or p[3] % _NATIVE or p[2] + p[3] > size:
            raise ValueError("partition table")
    _table = table
    _running = running


def chip():
    return _chip


def _match(p, type, subtype, label):
    return p[0] == type and subtype in (_ANY, p[1]) and label in (None, p[4])


def _first(type, subtype, label):
    for p in _table:
        if _match(p, type, subtype, label):
            return p
    return None


def _check(p, off, n):
    # esp_partition_read/write/erase_range range checks, in their order.
    if off > p[3]:
        raise OSError(_INVALID_ARG)
    if off + n > p[3]:
        raise OSError(_INVALID_SIZE)


def _erase(p, off, n):
    _check(p, off, n)
    if n % _NATIVE:
        raise OSError(_INVALID_SIZE)
    if off % _NATIVE:
        raise OSError(_INVALID_ARG)
    for i in range(n // _NATIVE):
        _chip.ioctl(6, (p[2] + off) // _NATIVE + i)


def _write(p, off, buf):
    _check(p, off, len(buf))
    if p[5] and (off | len(buf)) % 16:
        raise OSError(_INVALID_ARG)  # esp_flash_write_encrypted: 16-byte units
    _chip.writeblocks(0, buf, p[2] + off)


class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=_NATIVE):
        if isinstance(id, tuple):  # from find()
            p = id
        elif isinstance(id, int):
            if id not in (0, 1):
                raise ValueError
            p = _table[_running]  # the fake boots what runs
        else:
            p = _first(0, _ANY, id) or _first(1, _ANY, id)
        if p is None:
            raise OSError(_ENOENT)
        self._p = p
        self._bs = block_size

    @staticmethod
    def find(type=0, subtype=_ANY, label=None, block_size=_NATIVE):
        out = []
        for p in _table:
            if _match(p, type, subtype, label):
                out.append(Partition(p, block_size))
        return out

    def info(self):
        p = self._p
        return (p[0], p[1], p[2], p[3], p[4], bool(p[5]))

    def readblocks(self, n, buf, off=0):
        p = self._p
        a = n * self._bs + off
        _check(p, a, len(buf))
        _chip.readblocks(0, buf, p[2] + a)

    def writeblocks(self, n, buf, off=None):
        p = self._p
        a = n * self._bs
        if off is None:
            _erase(p, a, len(buf))
        else:
            a += off
        _write(p, a, buf)

    def ioctl(self, op, arg):
        if op in (1, 2, 3):
            return 0
        if op == 4:
            return self._p[3] // self._bs
        if op == 5:
            return self._bs
        if op == 6:
            if self._bs != _NATIVE:
                return -_EINVAL
            _erase(self._p, arg * _NATIVE, _NATIVE)
            return 0
        return None
