# The updater the transports call: begin(total, header) -> write(off, data)... -> finish().
#
# It writes into the slot the device is not running, erasing sector by sector just ahead of
# the data (sectors that already read erased are not erased again), so a refused or
# abandoned update costs only what it wrote. begin() refuses an
# image from its header (and, when the client sends it, the protected TLV area) before any
# byte reaches flash: bad magic, sizes over the slot, another vendor's or class's image, a
# security counter below the floor, a refused downgrade. finish() verifies the exact bytes
# in flash and then marks the image for a test boot or permanently.
#
# Persisted resume: when the client names the image by its SHA-256 (SMP `sha`), the session
# (slot, length, sha prefix) goes into the state record at begin() and its offset is
# checkpointed every CHECKPOINT bytes once the data before it is synced; after a reset,
# begin() with the same image continues from the last checkpoint.
import hashlib
from micropython import const

from mpboot import image
from mpboot.image import ImageError
from mpboot.state import ACTIVE, NONE, SEQ, SLEN, SOFF, SSHA, SSLOT, TEST, TRIAL, end_session

# UpdateError codes (the image's own problems raise ImageError instead).
U_BUSY = const(1)  # a test boot runs, or a permanent image waits for its reset: reset first
U_STATE = const(2)  # write/finish without a begin, or finish before every byte arrived
U_RANGE = const(3)  # data beyond the length announced at begin
U_LENGTH = const(4)  # the announced length cannot hold the image or does not fit the slot

MARK_NONE = const(0)
MARK_TEST = const(1)
MARK_PERMANENT = const(2)

CHECKPOINT = const(32768)  # persisted progress step (rounded up to whole erase sectors)


class UpdateError(Exception):
    # raise UpdateError(code): e.args[0] is the code.
    pass


class Updater:
    checkpoint = CHECKPOINT  # (tests use smaller steps)

    def __init__(self, slots, running):
        # running: the slot the device runs now (-1: none, in recovery); never written.
        self.slots = slots
        self.running = running
        self.total = -1  # announced length; -1 when no update is open
        self.pos = 0
        self.sha = None  # the client's SHA-256 of the whole image, if it sent one

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
        a = self.slots.state[self.slots.b + ACTIVE]
        return a ^ 1 if a != NONE else 0

    def _check_busy(self, slot):
        # U_BUSY: during a test boot (the other slot holds the image a reset reverts to), and
        # while the image in `slot` was made permanent and waits for the reset that runs it
        # (overwriting it would leave nothing to boot but images below the raised floor). A
        # permanent image that failed verification at this boot may be overwritten.
        run = self.running
        st = self.slots.state
        b = self.slots.b
        if run >= 0 and (st[b + TRIAL] == run or (st[b + ACTIVE] == slot and not self.slots.errors[slot])):
            raise UpdateError(U_BUSY)
        if getattr(self.slots, "pinned", -1) == slot:
            # A stage-1 image imported at this boot, in flash the port maps (mpboot.stages): the
            # names it interned point into it. Reset first.
            raise UpdateError(U_BUSY)

    def begin(self, total, header, manifest=None, sha=None):
        # total: the image's whole length. header: its first bytes (at least 32).
        # manifest: its protected TLV area, if the client sends it ahead (mpboot does).
        # sha: the SHA-256 of the whole image, if the client sends it (SMP `sha`): finish()
        # checks it, and it names the session so a reset does not lose the progress.
        # Returns the offset to continue from: 0, or the last checkpoint of a persisted
        # session of this same image (then the client's data at 0 is not written again).
        sl = self.slots
        st = sl.state
        self.total = -1
        self.sha = None
        slot = self.target()
        self._check_busy(slot)
        area = sl.areas[slot]
        if len(header) < image.HEADER_SIZE:
            raise ImageError(image.E_TRUNCATED)
        info = {}
        prot = image.parse_header(header, area.size, info)
        if total < info["hdr_size"] + info["img_size"] + prot + 4 or total > area.size:
            raise UpdateError(U_LENGTH)
        if manifest is not None:
            if len(manifest) != prot:
                raise ImageError(image.E_BAD_TLV)
            info["security_counter"] = info["vendor_id"] = info["class_id"] = None
            if prot:
                image.walk_protected(manifest, info)
        sl.policy(info, True)
        es = area.erase_size
        self.ckpt = (self.checkpoint + es - 1) // es * es
        key = bytes(sha[:16]) if sha is not None and len(sha) >= 16 else None
        start = 0
        b = sl.b
        ss = 2 * sl.image + slot  # the session's slot is absolute (stage 1's: 2, 3)
        if key is not None and st[SSLOT] == ss and st[SLEN] == total and st[SSHA] == key:
            start = st[SOFF]  # the same image, interrupted: [0, start) is in flash
        if st[b + TEST] == slot or (st[SSLOT] != NONE and not start):
            # A test mark on the target (its old content) goes before anything is erased, or
            # a cut later could test-boot a half-sent image that happens to verify; so does
            # a session of another image. This one's session is written at its first
            # checkpoint (opening sessions costs no state writes).
            st[b + TEST] = NONE
            if not start:
                end_session(st)
            sl.save(st)
        self.slot = slot
        self.at = ss  # the slot's absolute number (mpboot.smp: 0, 1 the app's, 2, 3 stage 1's)
        self.area = area
        self.total = total
        self.sha = bytes(sha) if key is not None else None
        self.key = key
        # bytes received, bytes programmed (a multiple of the write unit), bytes of the slot
        # handled by erase-ahead: all equal at a (sector-aligned) checkpoint.
        self.pos = self.flushed = self.erased = start
        self.tail = bytearray(area.write_size)
        return start

    def _program(self, data):
        area = self.area
        end = self.flushed + len(data)
        es = area.erase_size
        try:
            while self.erased < end:
                if not area.is_erased(self.erased, es):
                    area.erase(self.erased, es)
                self.erased += es
            area.write(self.flushed, data)
            if self.key is not None and end // self.ckpt != self.flushed // self.ckpt:
                # Crossed a checkpoint: persist that everything before it is written.
                area.sync()
                st = self.slots.state
                st[SSLOT] = 2 * self.slots.image + self.slot
                st[SLEN] = self.total
                st[SSHA] = self.key
                st[SOFF] = end // self.ckpt * self.ckpt
                self.slots.save(st)
        except Exception:
            self.total = -1  # a flash (or state) error closes the update: begin() again
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

    def finish(self, mark=MARK_TEST, want=None):
        # Verifies the whole image in flash (and the client's sha of it), then marks it.
        # want: called with the verified info before the mark, to refuse it by raising
        # (mpboot.puller: the channel record's fields). Returns (slot, info). The session
        # ends whatever the outcome.
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
        st = sl.state
        seq = st[SEQ]
        dirty = st[SSLOT] != NONE
        end_session(st)
        try:
            info = sl.check(self.slot, None, True)
            if info["total_size"] > self.pos:
                # It verified only with bytes that were in the slot before (not sent now).
                raise ImageError(image.E_TOO_LARGE)
            if self.sha is not None and self._digest(self.pos) != self.sha:
                raise ImageError(image.E_HASH_MISMATCH)  # not the image the client meant
            if want is not None:
                want(info)
            if mark == MARK_TEST:
                sl.mark_test(self.slot)
            elif mark == MARK_PERMANENT:
                sl.confirm(self.slot, info)
        finally:
            if dirty and st[SEQ] == seq:
                sl.save(st)  # no mark was written: end the session on its own
        return self.slot, info

    def _digest(self, n):
        # SHA-256 of the slot's first n bytes, read through the verifier's buffer.
        h = hashlib.sha256()
        buf = self.slots.buf
        off = 0
        while off < n:
            k = self.area.read(off, buf)
            k = min(k, n - off)
            h.update(memoryview(buf)[:k])
            off += k
        return h.digest()

    def erase(self, slot):
        # Erases a slot the device is not running (SMP image erase), refused during a test
        # boot; its test mark and any upload session into it go first, in one state write.
        sl = self.slots
        st = sl.state
        if slot == self.running:
            raise UpdateError(U_BUSY)
        self._check_busy(slot)
        if self.total >= 0 and self.slot == slot:
            self.total = -1
        b = sl.b
        ss = 2 * sl.image + slot
        if st[b + TEST] == slot or st[b + TRIAL] == slot or st[SSLOT] == ss:
            if st[b + TEST] == slot:
                st[b + TEST] = NONE
            if st[b + TRIAL] == slot:
                st[b + TRIAL] = NONE
            if st[SSLOT] == ss:
                end_session(st)
            sl.save(st)
        area = sl.areas[slot]
        es = area.erase_size
        for off in range(0, area.size, es):
            if not area.is_erased(off, es):
                area.erase(off, es)

    def abort(self):
        self.total = -1
