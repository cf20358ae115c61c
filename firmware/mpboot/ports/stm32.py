# Port adapter for the stm32 port: areas are pyb.Flash(start=, len=) regions.
#
# What the port gives (MicroPython ports/stm32/storage.c, flashbdev.c, flash.c, wdt.c):
# - pyb.Flash(start=, len=) (keyword-only) is a region of the flash *storage* segment, not of
#   the chip: byte 0 is FLASH_MEM_SEG1_START_ADDR of flashbdev.c (0x08004000 on F405: sectors
#   1-4, 112 KiB), or the linker's _flash_fs_start (L4, H7). start and len must be multiples
#   of the block size inside the storage, else ValueError. readblocks/writeblocks return 0 or
#   an error number (-1: block outside the storage); they do not raise.
# - Internal flash: ioctl(5) is 512 (FLASH_BLOCK_SIZE), also after ioctl(1, 1), and ioctl(6)
#   does nothing (returns 0). Writes land in a RAM copy of one flash sector (flashbdev.c;
#   FLASH_SECTOR_SIZE_MAX: 64 KiB CCM on F405/F429, 16 KiB on F401/F411/F446, linker-set on
#   L4/H7). The port's flash IRQ (every 512 ms) erases the whole sector soon after the first
#   write (16/64/128 KiB on F4, 128 KiB on H7, 2 KiB pages on L4; flash.c flash_layout) and
#   programs the copy back after 5 s without writes (words on F4, double words on L4, 32-byte
#   flash words on H7); ioctl(3) (sync) or a write to another sector does both at once. So
#   any byte can be written over anything, nothing is on flash before the flush, a cut
#   before it ends loses the whole sector, and a sector larger than the copy loses its tail.
# - SPI flash boards (MICROPY_HW_BDEV_SPIFLASH_EXTENDED, e.g. PYBD): after ioctl(1, 1) the
#   block is the 4096-byte erase block, ioctl(6, n) erases it and writes program directly at
#   any alignment (spi_bdev_writeblocks_raw): plain NOR flash.
# - Internal flash is memory-mapped at its address; pyb.Flash has no buffer protocol, so
#   mapping needs the flash address of storage byte 0 (`base`) and uctypes.bytearray_at.
# - machine.WDT(timeout=ms) is the IWDG: 1 to 32767 ms (prescaler up to /256 of ~32 kHz, 12-bit
#   reload), else ValueError; clamped. machine.unique_id() is the 12-byte device UID.
#
# How this adapter copes, on internal flash:
# - A slot's erase unit is the physical sector size there (slot_sector); erasing writes 0xFF
#   over it through the RAM copy. Slot writes are not synced (each sync rewrites a sector):
#   they reach flash when the writer moves on to the next sector, on mapped(), on reset() or
#   when the port's idle timer flushes.
# - The state is two 512-byte erase units at the starts of two sectors (state_start and
#   state_start + state_sector) with a 512-byte write unit, synced after every write and
#   erase: one record per sector (mpboot.state), so a cut while the port rewrites one sector
#   never touches the sector holding the newest record. The factory area is the same in the
#   next two sectors (state_start + 2 and 3 * state_sector), which must be state_sector
#   sized physical sectors too; the trust area (trust=True) in the two after those, with a
#   2560-byte erase unit at the start of each (one trust record per sector).
import machine
import pyb
from micropython import const

from mpboot.flash import Area
from mpboot.ports import BleLink, UartLink

_BLOCK = const(512)  # FLASH_BLOCK_SIZE: the pyb.Flash block on internal flash
_WDT_MAX = const(32767)  # ms: IWDG prescaler /256, reload 0xfff
_TRUST_UNIT = const(2560)  # internal flash: the trust area's erase unit, one 2304-byte record in blocks

_flash = None  # any pyb.Flash: its ioctl(3) flushes the port's (single) sector copy
_base = 0  # flash address of storage byte 0, 0 if not mapped
_blank = None  # _BLOCK bytes of 0xFF (internal flash erases)


def _open(start, size):
    f = pyb.Flash(start=start, len=size)
    f.ioctl(1, 1)  # init for the extended protocol: SPI flash switches to 4 KiB blocks
    return f


class _Dev:
    # n blocks of es bytes, block i at byte i * stride of pyb.Flash(start=start, ...); turns
    # the error numbers pyb returns into OSError. Passes block offsets below the pyb block
    # size, as flashbdev.c's extended read/write walk blocks from there.
    def __init__(self, start, es, stride, n, bs, sync):
        self.f = _open(start, stride * (n - 1) + es)
        self.start = start
        self.es = es
        self.stride = stride
        self.n = n
        self.bs = bs
        self.sync = sync

    def _io(self, fn, n, buf, off):
        mv = memoryview(buf)
        i = 0
        end = len(mv)
        while i < end:
            k = min(end - i, self.es - off)
            a = n * self.stride + off
            if fn(a // self.bs, mv[i : i + k], a % self.bs):
                raise OSError(5)
            i += k
            n += 1
            off = 0

    def readblocks(self, n, buf, off=0):
        self._io(self.f.readblocks, n, buf, off)

    def writeblocks(self, n, buf, off=0):
        self._io(self.f.writeblocks, n, buf, off)
        if self.sync:
            self.f.ioctl(3, 0)

    def ioctl(self, op, arg):
        if op == 4:
            return self.n
        if op == 5:
            return self.es
        if op == 6:
            if self.bs != _BLOCK:
                if self.f.ioctl(6, arg):
                    raise OSError(5)
            else:
                for off in range(0, self.es, _BLOCK):
                    self._io(self.f.writeblocks, arg, _blank, off)
                if self.sync:
                    self.f.ioctl(3, 0)
            return 0
        return self.f.ioctl(op, arg)


def areas(slot0_start, slot_size, state_start, slot_sector=0, state_sector=0, base=0,
          factory=True, trust=False, stage1=None):
    # Slot 0 at slot0_start, slot 1 right after it, the state at state_start and the factory
    # area in the two state-sized sectors after it (state_start + 2 * state_sector): byte
    # offsets in the pyb.Flash() storage. Those must be two physical sectors of state_sector
    # bytes each (on an F4's internal flash, e.g. 16 KiB sectors 0-3 hold state and factory
    # area; sector 4 is 64 KiB and would hold both factory sectors, losing the power
    # safety): the adapter cannot see the physical layout, so this is the integrator's to
    # check. factory=False: no factory area (three areas). trust=True: a trust area (a fifth
    # area, docs/KEYS.md) in the two state-sized sectors after the factory area's
    # (state_start + 4 * state_sector; on internal flash state_sector must be at least
    # 2560 bytes, one 2304-byte trust record in 512-byte blocks); off by default: the F4's
    # four 16 KiB sectors have no room for it, and boards set up before it keep their
    # layout. On internal flash slot_sector and state_sector are the sizes of
    # the physical sectors there (flash.c flash_layout; the slots' sectors must fit the port's
    # RAM sector copy); on SPI flash they are ignored (4 KiB blocks). base: flash address of
    # storage byte 0, to map slots and check sector alignment (0: do neither).
    # stage1=(start, size): stage 1's two slots (docs/BOOT.md "Two stages") at start and
    # start + size, under the app's slots' rules (physical sectors of slot_sector bytes that
    # fit the port's RAM sector copy, size a multiple of slot_sector, aligned with base, no
    # sector shared with another area), off the app's slots and the state, factory and trust
    # areas in use; seven areas then (None for a missing factory or trust area).
    global _flash, _base, _blank
    f = _open(state_start, 4096)
    bs = f.ioctl(5, 0)
    native = bs != _BLOCK
    if native:
        slot_sector = state_sector = bs
    elif not slot_sector or not state_sector or (slot_sector | state_sector) % _BLOCK:
        raise ValueError("sector sizes")
    if slot_size <= 0 or slot_size % slot_sector:
        raise ValueError("slot size")
    if base and ((base + slot0_start) % slot_sector or (base + state_start) % state_sector):
        raise ValueError("sector alignment")
    n = 6 if trust else 4 if factory else 2
    if state_start < slot0_start + 2 * slot_size and slot0_start < state_start + n * state_sector:
        raise ValueError("overlap")
    if trust and not native and state_sector < _TRUST_UNIT:
        raise ValueError("trust sector")
    if stage1:
        s, z = stage1
        if s < 0 or z <= 0 or z % slot_sector:
            raise ValueError("stage1 size")
        if base and (base + s) % slot_sector:
            raise ValueError("sector alignment")
        if (s < slot0_start + 2 * slot_size and slot0_start < s + 2 * z) or (
                s < state_start + n * state_sector and state_start < s + 2 * z):
            raise ValueError("overlap")
    n = slot_size // slot_sector
    s0 = Area(_Dev(slot0_start, slot_sector, slot_sector, n, bs, False))
    s1 = Area(_Dev(slot0_start + slot_size, slot_sector, slot_sector, n, bs, False))
    fa = state_start + 2 * state_sector
    ta = state_start + 4 * state_sector
    fy = ty = None
    if native:
        st = Area(_Dev(state_start, bs, bs, 2, bs, False))
        if factory:
            fy = Area(_Dev(fa, bs, bs, 2, bs, False))
        if trust:
            ty = Area(_Dev(ta, bs, bs, 2, bs, False))
    else:
        _blank = b"\xff" * _BLOCK
        st = Area(_Dev(state_start, _BLOCK, state_sector, 2, bs, True), 0, 0, _BLOCK)
        if factory:
            fy = Area(_Dev(fa, _BLOCK, state_sector, 2, bs, True), 0, 0, _BLOCK)
        if trust:
            ty = Area(_Dev(ta, _TRUST_UNIT, state_sector, 2, bs, True), 0, 0, _BLOCK)
    p = None  # (made before the globals change: pyb.Flash refuses a range outside the storage)
    if stage1:
        k = z // slot_sector
        p = (Area(_Dev(s, slot_sector, slot_sector, k, bs, False)),
             Area(_Dev(s + z, slot_sector, slot_sector, k, bs, False)))
    _flash = f
    _base = base
    if p:
        return (s0, s1, st, fy, ty) + p
    if trust:
        return (s0, s1, st, fy, ty)
    return (s0, s1, st, fy) if factory else (s0, s1, st)


def _map(addr, n):
    import uctypes

    return memoryview(uctypes.bytearray_at(addr, n))


def mapped(area):
    d = area.bdev
    if not _base or d.stride != d.es:
        return None
    _flash.ioctl(3, 0)  # flush the port's sector copy: the view shows what was written
    return _map(_base + d.start + area.start, area.size)


def watchdog(timeout_ms):
    return machine.WDT(timeout=min(timeout_ms, _WDT_MAX))


def reset():
    if _flash is not None:
        _flash.ioctl(3, 0)
    machine.reset()


def unique_id():
    return bytes(machine.unique_id())


def uart(id, baudrate=115200, rxbuf=11204, **kw):
    # SMP link on machine.UART(id) (the board's UART numbering). rxbuf: the interrupt-filled
    # receive buffer, which holds the requests in flight while one is handled: buf_count *
    # mpboot.transport.uart.frame_bytes(buf_size).
    return UartLink(machine.UART(id, baudrate=baudrate, rxbuf=rxbuf, timeout=0, **kw))


def ble(name="mpboot"):
    # SMP over BLE (mpboot.transport.ble), advertised as name. Boards with a radio have
    # bluetooth (PYBD-SF6: CYW43 and BTstack; NUCLEO_WB55: NimBLE over rfcore), others do
    # not: it is imported here, not at the top, so they still boot and serve the UART.
    import bluetooth

    return BleLink(bluetooth.BLE(), name)
