# NOR flash simulator for the unix port: a file-backed chip, so the flash survives a
# "power cycle" (a new micropython process), behind the extended block device protocol.
#
# Like NOR flash: erased bytes read 0xFF; programming only clears bits (programming a 1 over
# a 0 raises OSError(EIO) and is counted in .errors); erases work on whole sectors (the
# block size); programs must be aligned to the write unit (1, 4, 8 or 16 bytes, else
# OSError(EINVAL)). Per-sector erase counters persist in PATH.wear (u32 LE per sector).
#
# Fault injection, set from outside: the environment variable MPBOOT_NOR_FAULT, or else a
# one-shot control file PATH.fault (deleted when read), holds "cut=N[,tear=MODE]": flash
# operations (programs and erases; reads do not count) 0..N-1 complete, operation N is torn
# by MODE or not done at all, then the power goes: the process exits with CUT_EXIT.
#   MODE: half | prefix:K   a program stops after half / K of its bytes
#         word              a program completes but for its last word, half-programmed
#         erase-half | erase:K   an erase leaves only the first half / K bytes erased
# MPBOOT_NOR_TRACE=FILE appends one line per operation ("W addr len" / "E addr len").
#
# Timing: timing=None (default) runs at file speed; timing="nor" takes as long as a typical
# SPI NOR chip (W25Q-class datasheet typical figures): an erase 45 ms per 4 KiB of sector (a
# 64 KiB sector 720 ms), a program 0.7 ms per full 256-byte page: per page it touches, 30 us
# to start (the datasheet's first-byte time) plus the rest in proportion to the bytes
# written in that page (a 16-byte write costs 71 us, one crossing a page boundary pays the
# start twice). Reads are free. A sleep overshoots (0.1-0.2 ms on a loaded host, hundreds of
# times an upload): what one overshot, the next sleeps less, so the flash's busy time adds
# up to the model's; time the device spends between operations is never taken back.
import os
import sys
import time
from micropython import const

CUT_EXIT = const(75)
_CHUNK = const(256)
_PAGE = const(256)  # program page of the timing model
_PROG_US = const(700)  # per full page
_START_US = const(30)  # per page touched
_ERASE_US = const(45000)  # per 4 KiB


class NorFlash:
    def __init__(self, path, size, sector=4096, align=1, timing=None):
        if size % sector or align not in (1, 4, 8, 16):
            raise ValueError("geometry")
        if timing not in (None, "none", "nor"):
            raise ValueError("timing")
        self.timing = timing == "nor"
        self.over = 0  # microseconds the last sleeps overshot, not yet taken back
        self.size = size
        self.sector = sector
        self.align = align
        self.ops = 0
        self.programmed = 0
        self.erases = 0
        self.errors = 0
        try:
            self.f = open(path, "r+b")
        except OSError:
            self.f = open(path, "w+b")
            self._fill(0, size)
            self._set_wear(bytes(4 * (size // sector)), path)
        self.wear = open(path + ".wear", "r+b")
        self.cut = -1
        self.tear = ""
        spec = os.getenv("MPBOOT_NOR_FAULT")
        if not spec:
            try:
                with open(path + ".fault") as c:
                    spec = c.read().strip()
                os.remove(path + ".fault")
            except OSError:
                pass
        for part in (spec or "").replace(",", " ").split():
            k, _, v = part.partition("=")
            if k == "cut":
                self.cut = int(v)
            elif k == "tear":
                self.tear = v
        t = os.getenv("MPBOOT_NOR_TRACE")
        self.trace = open(t, "a") if t else None

    def _set_wear(self, data, path):
        with open(path + ".wear", "wb") as w:
            w.write(data)

    def _fill(self, addr, n):
        blank = b"\xff" * _CHUNK
        self.f.seek(addr)
        while n > 0:
            m = min(n, _CHUNK)
            self.f.write(blank[:m] if m < _CHUNK else blank)
            n -= m

    def _op(self, kind, addr, n):
        # Counts one operation; True if the power is cut during it.
        if self.trace:
            self.trace.write("%s %d %d\n" % (kind, addr, n))
            self.trace.flush()
        i = self.ops
        self.ops += 1
        return i == self.cut

    def _power_cut(self):
        self.f.flush()
        self.wear.flush()
        sys.stderr.write("nor_sim: power cut at operation %d\n" % self.cut)
        sys.exit(CUT_EXIT)

    def _busy(self, us):
        us -= self.over
        if us <= 0:
            self.over = -us
            return
        t = time.ticks_us()
        time.sleep_us(us)
        self.over = time.ticks_diff(time.ticks_us(), t) - us

    def _program(self, addr, data):
        n = len(data)
        if addr < 0 or addr + n > self.size or (addr | n) % self.align:
            raise OSError(22)
        old = bytearray(_CHUNK)
        mv = memoryview(data)
        # Check the whole range first: a 1 over a 0 is a caller bug, reported, not programmed.
        for i in range(0, n, _CHUNK):
            m = min(_CHUNK, n - i)
            self.f.seek(addr + i)
            self.f.readinto(memoryview(old)[:m])
            w = int.from_bytes(mv[i : i + m], "little")
            if int.from_bytes(old[:m], "little") & w != w:
                self.errors += 1
                raise OSError(5)
        cut = self._op("W", addr, n)
        if self.timing and n:
            pages = (addr + n - 1) // _PAGE - addr // _PAGE + 1
            self._busy(pages * _START_US + (_PROG_US - _START_US) * n // _PAGE)
        if cut:
            t = self.tear
            if t == "half" or t[:7] == "prefix:":
                k = n // 2 if t == "half" else min(int(t[7:]), n - 1)
                mv = mv[:k]
            elif t == "word" and n:
                w = max(4, self.align)
                k = max(0, n - w)
                last = bytearray(n - k)
                self.f.seek(addr + k)
                self.f.readinto(last)
                for j in range(n - k):
                    last[j] &= mv[k + j] | 0x55  # half its bits programmed
                self.f.seek(addr + k)
                self.f.write(last)
                mv = mv[:k]
            else:
                mv = mv[:0]
        self.f.seek(addr)
        self.f.write(mv)
        self.programmed += len(mv)
        if cut:
            self._power_cut()

    def _erase(self, block):
        if block < 0 or block >= self.size // self.sector:
            raise OSError(22)
        addr = block * self.sector
        cut = self._op("E", addr, self.sector)
        n = self.sector
        if self.timing:
            self._busy(_ERASE_US * n // 4096)
        if cut:
            t = self.tear
            n = n // 2 if t == "erase-half" else min(int(t[6:]), n - 1) if t[:6] == "erase:" else 0
        if n:
            # Wear: an erase that started counts (a torn one too); one cut before it did not.
            self.erases += 1
            self.wear.seek(4 * block)
            count = int.from_bytes(self.wear.read(4), "little") + 1
            self.wear.seek(4 * block)
            self.wear.write(count.to_bytes(4, "little"))
        self._fill(addr, n)
        if cut:
            self._power_cut()

    # The extended block device protocol.

    def readblocks(self, block, buf, off=0):
        addr = block * self.sector + off
        if addr < 0 or addr + len(buf) > self.size:
            raise OSError(22)
        self.f.seek(addr)
        self.f.readinto(buf)

    def writeblocks(self, block, buf, off=None):
        if off is None:
            # Basic protocol (filesystems): erase the blocks, then program them (whole
            # blocks only: checked before anything is erased).
            if len(buf) % self.sector or block < 0 or (block * self.sector + len(buf)) > self.size:
                raise OSError(22)
            for i in range(len(buf) // self.sector):
                self._erase(block + i)
            off = 0
        self._program(block * self.sector + off, buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.size // self.sector
        if op == 5:
            return self.sector
        if op == 6:
            self._erase(arg)
            return 0
        if op == 3:
            self.f.flush()
            self.wear.flush()
        if op in (1, 2, 3):
            return 0
        return None

    def close(self):
        self.f.close()
        self.wear.close()
        if self.trace:
            self.trace.close()
