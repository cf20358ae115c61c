# Port adapter for the rp2 port (RP2040, RP2350): areas are rp2.Flash(start=, len=) regions.
#
# What the port gives (MicroPython ports/rp2/rp2_flash.c and machine_wdt.c, pico-sdk
# src/rp2_common/hardware_flash/flash.c):
# - rp2.Flash(start=, len=) (keyword-only) is a region of the flash *storage* area, not of
#   the whole chip: byte 0 is MICROPY_HW_FLASH_STORAGE_BASE (the end of flash minus the
#   storage size), so the offsets below are storage offsets. start and len must be multiples
#   of 4096 inside the storage area, else ValueError.
# - ioctl(5) is 4096 (FLASH_SECTOR_SIZE) and ioctl(6, n) erases exactly that sector
#   (flash_range_erase): the block is the erase unit.
# - writeblocks(n, buf, off) calls flash_range_program, which needs a 256-byte aligned
#   offset and a length that is a multiple of 256 (FLASH_PAGE_SIZE). Nothing checks it at
#   run time (pico-sdk parameter asserts are off by default): a misaligned program corrupts
#   flash silently, so the areas' write unit is 256. Reads and writes are not range checked.
# - Flash is memory-mapped (XIP at 0x10000000) and rp2.Flash has the buffer protocol (read
#   only; added with ROMFS support): memoryview(rp2.Flash(...)) is the region in place. On
#   firmware without it memoryview() raises TypeError and mapped() returns None. The program
#   and erase functions flush the XIP cache, so the view shows what was written.
# - machine.WDT(timeout=ms): at most 8388 ms on RP2040 (16777 on RP2350), else ValueError;
#   the timeout is clamped to 8388. machine.unique_id() is 8 bytes; machine.reset() resets.
import machine
import rp2
from micropython import const

from mpboot.flash import Area
from mpboot.ports import BleLink, UartLink

_SECTOR = const(4096)  # erase unit = block size
_PAGE = const(256)  # program unit
_WDT_MAX = const(8388)  # ms, RP2040 (24-bit counter at 2 ticks per us)


def _area(start, size):
    return Area(rp2.Flash(start=start, len=size), 0, 0, _PAGE)


def areas(slot0_start, slot_size, state_start, factory=True, trust=False, stage1=None):
    # Slot 0 at slot0_start, slot 1 right after it, the state (two sectors) at state_start
    # and the factory area (two sectors) right after it: byte offsets in the rp2.Flash()
    # storage area, multiples of 4096. factory=False: no factory area (three areas, the
    # layout of boards set up before it; docs/FACTORY.md). trust=True: a trust area (two
    # sectors) after the factory area's, at state_start + 16384 (a fifth area; docs/KEYS.md);
    # off by default, as those sectors may hold something else on boards set up before it.
    # stage1=(start, size): stage 1's two slots (docs/BOOT.md "Two stages") at start and
    # start + size, multiples of 4096 off the app's slots and the state, factory and trust
    # areas in use; seven areas then (None for a missing factory or trust area).
    end = slot0_start + 2 * slot_size
    n = 6 if trust else 4 if factory else 2
    if state_start < end and slot0_start < state_start + n * _SECTOR:
        raise ValueError("overlap")
    if stage1:
        s, z = stage1
        if s < 0 or z <= 0 or (s | z) % _SECTOR:
            raise ValueError("stage1")
        if (s < end and slot0_start < s + 2 * z) or (s < state_start + n * _SECTOR and state_start < s + 2 * z):
            raise ValueError("overlap")
    a = (_area(slot0_start, slot_size), _area(slot0_start + slot_size, slot_size),
         _area(state_start, 2 * _SECTOR), _area(state_start + 2 * _SECTOR, 2 * _SECTOR) if factory else None)
    t = _area(state_start + 4 * _SECTOR, 2 * _SECTOR) if trust else None
    if stage1:
        return a + (t, _area(s, z), _area(s + z, z))
    if trust:
        return a + (t,)
    return a if factory else a[:3]


def _map(dev):
    return memoryview(dev)


def mapped(area):
    try:
        m = _map(area.bdev)
    except TypeError:
        return None
    return m[area.start : area.start + area.size]


def watchdog(timeout_ms):
    return machine.WDT(timeout=min(timeout_ms, _WDT_MAX))


def reset():
    machine.reset()


def unique_id():
    return bytes(machine.unique_id())


def uart(id, baudrate=115200, rxbuf=11204, **pins):
    # SMP link on machine.UART(id) (0 or 1; tx=, rx= pins in **pins). rxbuf: the receive ring
    # buffer the UART interrupt fills (machine.UART's own default is 256), which holds the requests in flight while
    # one is handled: buf_count * mpboot.transport.uart.frame_bytes(buf_size) (the default,
    # 11204, is 4 * frame_bytes(2048), the service's default pipeline).
    return UartLink(machine.UART(id, baudrate=baudrate, rxbuf=rxbuf, timeout=0, **pins))


def ble(name="mpboot"):
    # SMP over BLE (mpboot.transport.ble), advertised as name. Pico W and Pico 2 W builds
    # have bluetooth (CYW43 radio, BTstack), plain Pico builds do not: it is imported here,
    # not at the top, so they still boot and serve the UART.
    import bluetooth

    return BleLink(bluetooth.BLE(), name)


def udp(port=1337, host="0.0.0.0", allow=None):
    # SMP over UDP (mpboot.transport.udp) on port (1337: Zephyr's default), bound to host
    # (default every interface). The app brings the network up first (network.WLAN, on Pico W / Pico 2 W
    # boards); a board in recovery has none, so the UART and BLE stay the recovery path.
    # allow: the peers' IP addresses served (default any): docs/THREAT_MODEL.md.
    from mpboot.transport.udp import UdpLink

    return UdpLink(host, port, allow)
