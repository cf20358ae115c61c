# Boot state store: a log of fixed-size records in two alternating erase sectors
# (format and power-safety argument: docs/BOOT.md). The log (Log) also holds the factory
# record (mpboot.factory, docs/FACTORY.md).
#
# Every change appends one whole record with a higher sequence number and a CRC-32; loading
# takes the valid record with the highest sequence number. A power cut at any byte of an
# append leaves a record whose CRC fails, so the previous record is read; a sector is
# erased only to switch to it when the other is full, and the other still holds the newest
# record until the first record in the fresh sector is complete. A save that raises the
# anti-rollback floor appends its record twice, so neither a torn write nor a bit flip in
# one record lowers the floor (docs/BOOT.md, "What only grows").
#
# A board with stage-1 slots (issue 19: two image pairs, the app and stage 1) keeps both
# pairs' fields in one record, format v2 (mpboot.pairs.Store2), so a change to both pairs
# is one append; its RAM list is this one followed by image 1's fields (mpboot.pairs.IMAGE1).
# (mpboot.pairs repeats _MAGIC, _REC and _FMT to read v1 records: private consts cost no
# RAM, public ones a module-dict entry each.)
import struct
from binascii import crc32
from micropython import const

_MAGIC = const(0x5342504D)  # "MPBS"
_REC = const(96)  # record size before rounding up to the write unit; the CRC-32 of bytes
# [0, 92) is its last word
# magic seq active test trial flags floor version ok0 ok1 | upload session: len off sha slot
_FMT = "<IIBBBBI8s16s16sII16sB"
NONE = const(0xFF)  # "no slot" in active/test/trial

# Record fields, in a list (cheaper than a class):
SEQ = const(0)
ACTIVE = const(1)  # slot of the last confirmed image, or NONE
TEST = const(2)  # slot marked for one test boot, or NONE
TRIAL = const(3)  # slot that was started for its test boot and not yet confirmed, or NONE
FLAGS = const(4)  # reserved (0); v2: the pair bits (mpboot.pairs)
FLOOR = const(5)  # anti-rollback: lowest security counter accepted
VERSION = const(6)  # 8-byte version (header layout) of the confirmed image in ACTIVE
OK0 = const(7)  # first 16 bytes of the digest of the confirmed image in slot 0 (or zeros)
OK1 = const(8)  # ... in slot 1
# The open upload session (docs/PROTOCOL.md, persisted resume): the image being written to
# slot SSLOT, its length, the first 16 bytes of its SHA-256 and how far it is known written.
SLEN = const(9)
SOFF = const(10)  # bytes [0, SOFF) of the slot are written and synced
SSHA = const(11)
SSLOT = const(12)  # NONE: no session (v2: the absolute slot, 2 * image + slot)


def blank():
    # The state of a device that has never written one (factory-fresh state area).
    return [0, NONE, NONE, NONE, 0, 0, bytes(8), bytes(16), bytes(16), 0, 0, bytes(16), NONE]


def end_session(rec):
    # Forgets the upload session (the caller saves the record).
    rec[SLEN] = rec[SOFF] = 0
    rec[SSHA] = bytes(16)
    rec[SSLOT] = NONE


class Log:
    # A power-safe log of fixed-size records in an area of exactly two erase sectors (the boot
    # state here; the factory record, mpboot.factory). A record is `size` bytes: u32 magic,
    # u32 sequence number, the owner's fields, and a CRC-32 of the bytes before it as its last
    # word; it is padded with 0xff to a multiple of the write unit. The owner fills `buf`
    # between begin() and append(); after find() (a valid record was read) `buf` holds the
    # newest record. hold=False: no buffer is made here; the owner sets `buf` before it
    # appends and reads records its own way (mpboot.trust: its 2304-byte one exists only
    # while it saves).
    def __init__(self, area, magic, size, name="state area", hold=True):
        ws = area.write_size
        self.magic = magic
        self.crc_at = size - 4
        self.rec = (size + ws - 1) // ws * ws
        self.per = area.erase_size // self.rec
        if area.size != 2 * area.erase_size or self.per < 1:
            raise ValueError(name)
        self.area = area
        self.buf = bytearray(self.rec) if hold else None
        self.seq = 0  # sequence number of the newest record (0: none)
        self.pos = -1  # byte offset of the next append; -1: switch sectors first
        self.found = False  # a valid record was read or written
        self._last = 0  # offset of the newest record

    def _valid(self, off):
        buf = self.buf
        self.area.read(off, buf)
        if struct.unpack_from("<I", buf, 0)[0] != self.magic:
            return -1
        c = self.crc_at
        if crc32(memoryview(buf)[:c]) != struct.unpack_from("<I", buf, c)[0]:
            return -1
        return struct.unpack_from("<I", buf, 4)[0]

    def _blank(self, off):
        return self.area.is_erased(off, self.rec)

    def find(self):
        # Finds the newest valid record (left in buf; returns True) and where the next one
        # goes. False: no valid record (a blank or never completed area).
        best = -1
        best_off = -1
        end_of = [0, 0]  # per sector: offset just past its last non-blank record slot
        es = self.area.erase_size
        for s in range(2):
            base = s * es
            # Appends are sequential, so a sector's used record slots come first: find the
            # first blank one by bisection, then walk back to the newest valid record.
            lo, hi = 0, self.per
            while lo < hi:
                mid = (lo + hi) // 2
                if self._blank(base + mid * self.rec):
                    hi = mid
                else:
                    lo = mid + 1
            end_of[s] = lo
            i = lo - 1
            while i >= 0:
                seq = self._valid(base + i * self.rec)
                if seq >= 0:
                    if seq >= best:
                        best = seq
                        best_off = base + i * self.rec
                    break
                i -= 1
        if best_off < 0:
            self.found = False
            self.pos = -1
            self.seq = 0
            return False
        self.found = True
        self._last = best_off
        s = best_off // es
        nxt = end_of[s]
        self.pos = s * es + nxt * self.rec if nxt < self.per else -1
        self.seq = self._valid(best_off)  # (and into buf, for an owner that holds one)
        return True

    def begin(self):
        # An all-0xff buf for the next record; returns it.
        buf = self.buf
        for i in range(len(buf)):
            buf[i] = 0xFF
        return buf

    def append(self):
        # Appends buf (the owner's fields filled after begin()) as the next record: magic,
        # sequence number (the newest + 1) and CRC are written here. Returns the sequence.
        # A record slot that is not erased (a bit flipped in erased flash, a torn write that
        # read as blank at load) is never programmed over: the append takes the next slot,
        # or the other sector. A fresh sector that takes no record either: OSError(EIO).
        buf = self.buf
        seq = self.seq + 1
        struct.pack_into("<II", buf, 0, self.magic, seq)
        c = self.crc_at
        struct.pack_into("<I", buf, c, crc32(memoryview(buf)[:c]))
        es = self.area.erase_size
        switched = False
        while True:
            if self.pos < 0:
                if switched:
                    raise OSError(5)
                # Current sector full (or nothing written yet): erase the other one and start
                # it. It never holds the newest record (self._last).
                cur = (self._last // es) ^ 1 if self.found else 0
                self.area.erase(cur * es, es)
                self.pos = cur * es
                switched = True
            try:
                self.area.write(self.pos, buf)
                break
            except OSError:
                if self._blank(self.pos):
                    raise  # the flash refused an erased slot: a real write failure
                self._skip()
        self.area.sync()
        self.found = True
        self.seq = seq
        self._last = self.pos
        self._skip()
        return seq

    def _skip(self):
        # The next record slot in this sector, or -1 (the next append switches sectors).
        self.pos += self.rec
        at = self.pos % self.area.erase_size
        if at == 0 or at // self.rec >= self.per:
            self.pos = -1


class Store(Log):
    # The boot state log. It never lowers the floor it holds, and writes a raise twice.
    def __init__(self, area):
        # area: an mpboot.flash.Area of exactly two erase sectors.
        Log.__init__(self, area, _MAGIC, _REC)
        self.floor = 0  # the floor of the newest record on flash (0: none)

    def load(self):
        # Returns the newest record (blank() if none) and finds where the next one goes.
        if not self.find():
            self.floor = 0
            return blank()
        f = struct.unpack_from(_FMT, self.buf, 0)
        self.floor = f[1 + FLOOR]
        return list(f[1:])

    def save(self, rec):
        # Appends rec with the next sequence number (rec[SEQ] is updated first, so a caller
        # sees that a save was tried even when the write then fails). A record that raises
        # the floor is appended twice: a cut before the first copy is whole leaves the old
        # floor (the raise did not happen), and once it is whole a bit flip in one copy
        # leaves the other. rec[FLOOR] below the floor on flash is raised to it first.
        if rec[FLOOR] < self.floor:
            rec[FLOOR] = self.floor
        rec[SEQ] += 1
        buf = self.begin()
        struct.pack_into(
            _FMT, buf, 0, _MAGIC, rec[SEQ], rec[ACTIVE], rec[TEST], rec[TRIAL], rec[FLAGS],
            rec[FLOOR], rec[VERSION], rec[OK0], rec[OK1], rec[SLEN], rec[SOFF], rec[SSHA],
            rec[SSLOT],
        )
        self.seq = rec[SEQ] - 1  # the record's sequence number is the caller's
        self.append()
        if rec[FLOOR] > self.floor:
            rec[SEQ] = self.append()  # buf still holds the fields: the second copy
        self.floor = rec[FLOOR]
