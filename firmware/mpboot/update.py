# The updater the transports call: begin(total, header) -> write(off, data)... -> finish().
#
# It writes into the slot the device is not running, erasing sector by sector just ahead of
# the data, so a refused or abandoned update costs only what it wrote. begin() refuses an
# image from its header (and, when the client sends it, the protected TLV area) before any
# byte reaches flash: bad magic, sizes over the slot, another vendor's or class's image, a
# security counter below the floor, a refused downgrade. finish() verifies the exact bytes
# in flash and then marks the image for a test boot or permanently.
from micropython import const

from mpboot import image
from mpboot.image import ImageError
from mpboot.state import ACTIVE, NONE, TEST, TRIAL

# UpdateError codes (the image's own problems raise ImageError instead).
U_BUSY = const(1)  # the running image is on its test boot: confirm it (or reset) first
U_STATE = const(2)  # write/finish without a begin, or finish before every byte arrived
U_RANGE = const(3)  # data beyond the length announced at begin
U_LENGTH = const(4)  # the announced length cannot hold the image or does not fit the slot

MARK_NONE = const(0)
MARK_TEST = const(1)
MARK_PERMANENT = const(2)


class UpdateError(Exception):
    # raise UpdateError(code): e.args[0] is the code.
    pass


class Updater:
    def __init__(self, slots, running):
        # running: the slot the device runs now (-1: none, in recovery); never written.
        self.slots = slots
        self.running = running
        self.total = -1  # announced length; -1 when no update is open

    def target(self):
        # The slot an update goes to: never the running image's.
        if self.running >= 0:
            return self.running ^ 1
        # Recovery: rewrite a slot that failed at this boot, keeping one that did not.
        e = self.slots.errors
        if e[0] and not e[1]:
            return 0
        if e[1] and not e[0]:
            return 1
        a = self.slots.state[ACTIVE]
        return a ^ 1 if a != NONE else 0

    def begin(self, total, header, manifest=None):
        # total: the image's whole length. header: its first bytes (at least 32).
        # manifest: its protected TLV area, if the client sends it ahead (mpboot does).
        sl = self.slots
        st = sl.state
        self.total = -1
        if self.running >= 0 and st[TRIAL] == self.running:
            raise UpdateError(U_BUSY)
        slot = self.target()
        area = sl.areas[slot]
        if len(header) < image.HEADER_SIZE:
            raise ImageError(image.E_TRUNCATED)
        info = {}
        prot = image.parse_header(header, area.size, info)
        if total < info["hdr_size"] + info["img_size"] + prot + 4 or total > area.size:
            raise UpdateError(U_LENGTH)
        if manifest is not None:
            if len(manifest) != prot:
                raise ImageError(image.E_TLV)
            info["security_counter"] = info["vendor_id"] = info["class_id"] = None
            if prot:
                image.walk_protected(manifest, info)
        sl.policy(info, True)
        if st[TEST] == slot:
            # Its old content was marked for a test boot: unmark before erasing, or a cut
            # later could test-boot a half-sent image that happens to verify.
            st[TEST] = NONE
            sl._save(st)
        self.slot = slot
        self.area = area
        self.total = total
        self.pos = 0  # bytes received
        self.flushed = 0  # bytes programmed (a multiple of the write unit)
        self.erased = 0  # bytes of the slot erased so far
        self.tail = bytearray(area.write_size)
        return slot

    def _program(self, data):
        area = self.area
        end = self.flushed + len(data)
        es = area.erase_size
        try:
            while self.erased < end:
                area.erase(self.erased, es)
                self.erased += es
            area.write(self.flushed, data)
        except Exception:
            self.total = -1  # a flash error closes the update: begin() again
            raise
        self.flushed = end

    def write(self, off, data):
        # Takes data at `off`; returns the offset expected next (unchanged when `off` is not
        # it, so a client can resume from there).
        if self.total < 0:
            raise UpdateError(U_STATE)
        if off != self.pos:
            return self.pos
        n = len(data)
        if off + n > self.total:
            raise UpdateError(U_RANGE)
        mv = memoryview(data)
        tail = self.tail
        ws = len(tail)
        t = self.pos - self.flushed
        if t:
            k = min(ws - t, n)
            tail[t : t + k] = mv[:k]
            mv = mv[k:]
            t += k
            if t == ws:
                self._program(tail)
                t = 0
        m = len(mv) // ws * ws
        if m:
            self._program(mv[:m])
            mv = mv[m:]
        if len(mv):
            tail[: len(mv)] = mv
        self.pos = off + n
        return self.pos

    def finish(self, mark=MARK_TEST):
        # Verifies the whole image in flash, then marks it. Returns (slot, info).
        if self.total < 0 or self.pos != self.total:
            raise UpdateError(U_STATE)
        t = self.pos - self.flushed
        if t:
            tail = self.tail
            for i in range(t, len(tail)):
                tail[i] = 0xFF
            self._program(tail)
        self.area.sync()
        self.total = -1
        sl = self.slots
        info = sl.check(self.slot, None, True)
        if info["total_size"] > self.pos:
            # It verified only with bytes that were in the slot before (not sent now).
            raise ImageError(image.E_SIZE)
        if mark == MARK_TEST:
            sl.mark_test(self.slot)
        elif mark == MARK_PERMANENT:
            sl.confirm(self.slot, info)
        return self.slot, info

    def abort(self):
        self.total = -1
