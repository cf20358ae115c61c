# Port adapter for MicroPython's qemu port on the mps2-an385 board (Cortex-M3), the emulated
# board mpboot's tests run on (host/mpboot/qemu/, docs/PORTING.md).
#
# Flash: the board's 16 MiB PSRAM at 0x21000000, which the host runner backs with a file
# (QEMU memory-backend-file, share=on), so it survives QEMU restarts and kill -9 like flash
# survives power cycles. Nothing else of the firmware touches that region. Chip() gives it
# NOR semantics through uctypes.bytearray_at (no copy): erased bytes read 0xff, programming
# only clears bits (a 1 over a 0 raises OSError(EIO), as mpboot.ports.nor_sim does), erases
# work on whole 4 KiB sectors and programs must be aligned to the 4-byte write unit. Writes go
# straight into the mapping: sync (ioctl 3) has nothing to flush.
# - The last sector is the board's "OTP" page, outside the chip the areas are cut from: the
#   runner writes the 16-byte unique id at its start when it creates the flash file.
# - mapped(area) is the area's memory in place (a memoryview of the region, run in place the
#   way XIP flash is). It is writable, unlike rp2's; mpboot never writes through it.
# - machine.reset() exits QEMU (semihosting): the runner starts it again, as a board powers up.
# - No machine.WDT on this port: watchdog() returns None (a test boot is then reverted by the
#   next reset, not by a watchdog).
# - The one UART is the REPL's (CMSDK APB UART0, polled: a one-byte receive register, no
#   interrupt). uart() serves SMP on it once the boot is over: Ctrl-C off, writes through
#   sys.stdout.buffer (raw bytes), reads straight from the receive register (_NATIVE below):
#   sys.stdin.buffer.readinto blocks until its buffer is full, and one call per byte through
#   select costs the framer a pass per byte. QEMU hands the register a byte at a time (about
#   25 KB/s on a 2-core host, twice a 115200-baud line).
# - Power cuts (tests: mpboot.qemu.runner.arm_cut, trace_ops): a control block in the OTP
#   page after the unique id, all words erased (-1) unless the host set them: OPS counts
#   flash operations (programs, erases, syncs; reads do not count) across power-ons once the
#   host set it to 0, and TRACE holds one word per operation while it has room (kind << 24 |
#   chip offset; kinds _OP_*). CUT = N: operations 0..N-1 complete, N is not done (TEAR = 0)
#   or half done (TEAR = 1: half of a program's bytes, half of a sector erased), then the
#   power goes: the block disarms itself and QEMU exits with CUT_EXIT (semihosting
#   SYS_EXIT_EXTENDED), as mpboot.ports.nor_sim exits the unix port. Unarmed, an operation
#   costs one read of OPS (machine.mem32: no allocation).
# - main() is the board's boot.py: the port runs none (its main() starts the REPL), so the
#   runner (mpboot sim --machine qemu) calls it through the raw REPL at each power-on.
import machine
import micropython
import uctypes
from micropython import const

from mpboot.flash import Area

_BASE = const(0x21000000)  # mps2-an385 PSRAM
_REGION = const(0x1000000)  # 16 MiB
_SECTOR = const(4096)  # erase unit = block size
_WRITE = const(4)  # program unit
_SIZE = const(0xFFF000)  # the chip: the region but its last sector
_ID_LEN = const(16)  # unique id at _SIZE (the OTP page)
_CHUNK = const(256)
_CTL = const(_BASE + _SIZE + 32)  # power-cut control block (OTP page, after the id)
_CUT = const(_CTL)
_TEAR = const(_CTL + 4)
_OPS = const(_CTL + 8)
_TRACE = const(_CTL + 16)
_TRACE_END = const(_BASE + _REGION)
_OP_W = const(1)  # trace kinds
_OP_E = const(2)
_OP_S = const(3)
CUT_EXIT = const(75)  # QEMU's exit code when the power was cut (nor_sim.CUT_EXIT)

_BLANK = b"\xff" * _CHUNK


class Chip:
    # The region as a block device (extended protocol) with NOR rules.
    def __init__(self):
        self.mem = memoryview(uctypes.bytearray_at(_BASE, _REGION))
        self.size = _SIZE
        self.sector = _SECTOR
        self.align = _WRITE

    def readblocks(self, block, buf, off=0):
        a = block * _SECTOR + off
        n = len(buf)
        if a < 0 or a + n > _SIZE:
            raise OSError(22)
        buf[:] = self.mem[a : a + n]

    def writeblocks(self, block, buf, off=None):
        if off is None:
            # Basic protocol (filesystems): erase, then program whole blocks.
            if len(buf) % _SECTOR:
                raise OSError(22)
            for i in range(len(buf) // _SECTOR):
                self._erase(block + i)
            off = 0
        a = block * _SECTOR + off
        n = len(buf)
        if a < 0 or a + n > _SIZE or (a | n) % _WRITE:
            raise OSError(22)
        mem = self.mem
        new = memoryview(buf)
        # Check the whole range first: a 1 over a 0 is refused, nothing programmed.
        for i in range(0, n, _CHUNK):
            m = min(_CHUNK, n - i)
            w = int.from_bytes(new[i : i + m], "little")
            if int.from_bytes(mem[a + i : a + i + m], "little") & w != w:
                raise OSError(5)
        if _op(_OP_W, a):
            k = n // 2 // _WRITE * _WRITE if machine.mem32[_TEAR] == 1 else 0
            mem[a : a + k] = new[:k]
            _power_cut()
        mem[a : a + n] = new

    def _erase(self, block):
        if block < 0 or block >= _SIZE // _SECTOR:
            raise OSError(22)
        mem = self.mem
        a = block * _SECTOR
        end = a + _SECTOR
        cut = _op(_OP_E, a)
        if cut:
            end = a + _SECTOR // 2 if machine.mem32[_TEAR] == 1 else a
        for i in range(a, end, _CHUNK):
            mem[i : i + _CHUNK] = _BLANK
        if cut:
            _power_cut()

    def ioctl(self, op, arg):
        if op == 4:
            return _SIZE // _SECTOR
        if op == 5:
            return _SECTOR
        if op == 6:
            self._erase(arg)
            return 0
        if op == 3 and _op(_OP_S, 0):
            _power_cut()
        if op in (1, 2, 3):
            return 0
        return None


def _op(kind, a):
    # Counts one flash operation when the host armed the count; True: the power goes now.
    m = machine.mem32
    i = m[_OPS]
    if i < 0:
        return False
    m[_OPS] = i + 1
    t = _TRACE + 4 * i
    if t < _TRACE_END:
        m[t] = kind << 24 | a
    return i == m[_CUT]


_OFF = """
@micropython.asm_thumb
def off(r0):
    mov(r1, r0)
    mov(r0, 0x20)
    data(2, 0xBEAB)
"""


def _power_cut():
    # Disarm (the next power-on runs normally), then exit QEMU with CUT_EXIT: semihosting
    # SYS_EXIT_EXTENDED (0x20, bkpt 0xab) with {ADP_Stopped_ApplicationExit, code}.
    machine.mem32[_CUT] = -1
    g = {}
    exec(_OFF, g)  # native code: compiled on the board (see _NATIVE)
    block = (0x20026).to_bytes(4, "little") + CUT_EXIT.to_bytes(4, "little")
    g["off"](uctypes.addressof(block))


_chip = None


def chip():
    # The one Chip (a board has one flash).
    global _chip
    if _chip is None:
        _chip = Chip()
    return _chip


def areas(slot0_start=0, slot_size=0x100000, state_start=0x200000, factory=True, trust=True, stage1=None):
    # Slot 0 at slot0_start, slot 1 right after it, the state (two sectors) at state_start,
    # the factory area (two sectors) right after it and the trust area (two sectors) after
    # that: byte offsets in the chip, multiples of 4096. The defaults: two 1 MiB slots, then
    # state, factory and trust. factory=False: no factory area (None in its place;
    # docs/FACTORY.md); trust=False: no trust area (four areas: the frozen root set stays,
    # docs/KEYS.md). The trust area stays at state_start + 4 sectors either way.
    # stage1=(start, size): stage 1's two slots (docs/BOOT.md "Two stages") at start and
    # start + size; seven areas then (None for a missing factory or trust area).
    end = slot0_start + 2 * slot_size
    n = 6 if trust else 4 if factory else 2
    if state_start < end and slot0_start < state_start + n * _SECTOR:
        raise ValueError("overlap")
    c = chip()
    a = (Area(c, slot0_start, slot_size, _WRITE), Area(c, slot0_start + slot_size, slot_size, _WRITE),
         Area(c, state_start, 2 * _SECTOR, _WRITE),
         Area(c, state_start + 2 * _SECTOR, 2 * _SECTOR, _WRITE) if factory else None)
    t = Area(c, state_start + 4 * _SECTOR, 2 * _SECTOR, _WRITE) if trust else None
    if stage1:
        s, z = stage1
        e = s + 2 * z
        if s % _SECTOR or z % _SECTOR or z <= 0 or e > _SIZE or (s < end and slot0_start < e) or (
                s < state_start + 6 * _SECTOR and state_start < e):
            raise ValueError("overlap")
        return a + (t, Area(c, s, z, _WRITE), Area(c, s + z, z, _WRITE))
    if trust:
        return a + (t,)
    return a if factory else a[:3]


def mapped(area):
    return area.bdev.mem[area.start : area.start + area.size]


def watchdog(timeout_ms):
    return None


def reset():
    machine.reset()


def unique_id():
    return bytes(chip().mem[_SIZE : _SIZE + _ID_LEN])


# The UART's fast paths as native code, compiled by the board's own compiler when the link is
# made (as mpboot.transport.uart compiles its CRC): mpy-cross without -march (the unix
# simulator's build compiles every adapter) refuses native decorators. UART0's registers at
# 0x40004000: DATA, then STATE (bit 0: the transmitter is full, bit 1: a received byte waits).
# rx(buf, n) moves received bytes into buf[:n] and returns the count: 0 at once when none
# waits, else after a frame's last byte (00 or "\n": the framer can take the frame now), with
# buf full, or once no byte came for 4000 polls of the register (far longer than QEMU takes
# between two bytes of a frame).
_NATIVE = """
@micropython.viper
def rx(buf, n: int) -> int:
    p = ptr8(buf)
    u = ptr32(0x40004000)
    i = 0
    q = 0
    while i < n:
        if u[1] & 2:
            c = u[0]
            p[i] = c
            i += 1
            if c == 0 or c == 10:
                break
            q = 0
        elif i == 0 or q >= 4000:
            break
        else:
            q += 1
    return i

@micropython.viper
def state() -> int:
    return int(ptr32(0x40004000)[1])

@micropython.asm_thumb
def sleep():
    wfi()
"""
_RX_FULL = const(2)  # STATE bits
_TX_FULL = const(1)


class _Uart:
    # The REPL UART as a transport link (mpboot.transport.uart). sleep() waits for the next
    # interrupt: SysTick's, every millisecond (the port enables no receive interrupt).
    def __init__(self):
        import sys

        g = {}
        exec(_NATIVE, g)
        self._rx = g["rx"]
        self._state = g["state"]
        self._sleep = g["sleep"]
        micropython.kbd_intr(-1)  # 0x03 is data now
        self.write = sys.stdout.buffer.write  # all of buf: waits while the transmitter is full

    def readinto(self, buf):
        return self._rx(buf, len(buf))

    def wait(self, ms):
        # Until a byte waits (noticed within a millisecond) or ms passed.
        import time

        t = time.ticks_ms()
        while not self._state() & _RX_FULL and time.ticks_diff(time.ticks_ms(), t) < ms:
            self._sleep()

    def drain(self):
        while self._state() & _TX_FULL:
            pass


def uart():
    # The SMP link on the REPL UART. From here on the REPL cannot be reached by Ctrl-C.
    return _Uart()


def main(slot_size=0x100000, buf_size=2048, buf_count=4, s1_size=0, **policy):
    # The board's boot.py: boot the chosen image in place (the app runs), then serve SMP on
    # the UART until a client asks for a reset, which exits QEMU (the runner starts it again).
    # policy: vendor_id, class_id, downgrade (mpboot.boot.start); the thresholds come from
    # mpboot_keys (mpboot.trust.policy). An exception out of the service resets the board
    # too: nobody waits at this board's REPL. s1_size: a board with two stages (docs/BOOT.md):
    # stage 1's two slots of s1_size bytes after the trust area (state + 16 sectors), the
    # update service loaded from the one mpboot.stages decides.
    import sys

    import mpboot_keys
    from mpboot import boot, trust
    from mpboot.ports import qemu as port

    st = 2 * slot_size
    try:
        if s1_size:
            from mpboot import stages

            stages.start(port, areas(0, slot_size, st, stage1=(st + 16 * _SECTOR, s1_size)), mpboot_keys.KEYS,
                         **trust.policy(mpboot_keys), **policy)
        else:
            boot.start(port, areas(0, slot_size, st), mpboot_keys.KEYS, **trust.policy(mpboot_keys), **policy)
    except Exception as e:  # the app failed: still take updates
        print("mpboot: the app raised:")
        sys.print_exception(e)
    from mpboot.smp import service  # only now (stages.start loads stage 1's, on boards with one)

    link = uart()
    print("mpboot: serving SMP (buf_size %d, buf_count %d)" % (buf_size, buf_count))
    try:
        service.run(port, link, buf_size, buf_count)
    except Exception as e:
        sys.print_exception(e)
    reset()
