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
import struct
from binascii import crc32
from micropython import const

_MAGIC = const(0x5342504D)  # "MPBS"
_REC = const(96)  # record size before rounding up to the write unit; the CRC-32 of bytes
# [0, 92) is its last word
# magic seq active test trial flags floor version ok0 ok1 | upload session: len off sha slot
_FMT = "<IIBBBBI8s16s16sII16sB"
NONE = const(0xFF)  # "no slot" in active/test/trial
_MAGIC2 = const(0x3242504D)  # "MPB2": the record of a board with two image pairs
_REC2 = const(160)  # v2 record size before rounding; the CRC-32 of [0, 156) is its last word
_AT1 = const(84)  # v2: where image 1's fields start
# image 1: active test trial link floor version ok0 ok1 (48 bytes)
_FMT1 = "<BBBBI8s16s16s"

# Record fields, in a list (cheaper than a class):
SEQ = const(0)
ACTIVE = const(1)  # slot of the last confirmed image, or NONE
TEST = const(2)  # slot marked for one test boot, or NONE
TRIAL = const(3)  # slot that was started for its test boot and not yet confirmed, or NONE
FLAGS = const(4)  # reserved (0)
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
# v2 only: image 1's (stage 1's) fields follow, at IMAGE1 + the image-0 index of the same
# field (IMAGE1 + ACTIVE, ..., IMAGE1 + OK1); IMAGE1 + FLAGS is image 1's link byte (reserved
# for the link its upload came over, NONE). Image 0's fields keep their v1 indices.
IMAGE1 = const(12)
# FLAGS bits (v2; v1 writes 0): a combined update of both pairs (docs/BOOT.md).
PAIR = const(1)  # the test marks, then the trials, are one pair: they boot, confirm, revert together
PAIR_APP_OK = const(2)  # in a pair trial: the app confirmed its half
PAIR_S1_OK = const(4)  # in a pair trial: stage 1 confirmed its half


def blank(images=1):
    # The state of a device that has never written one (factory-fresh state area).
    rec = [0, NONE, NONE, NONE, 0, 0, bytes(8), bytes(16), bytes(16), 0, 0, bytes(16), NONE]
    if images == 2:
        rec += [NONE, NONE, NONE, NONE, 0, bytes(8), bytes(16), bytes(16)]
    return rec


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
    # The boot state log. It never lowers the floors it holds, and writes a raise twice.
    def __init__(self, area, images=1):
        # area: an mpboot.flash.Area of exactly two erase sectors. images: 1 (v1 records,
        # the app's pair) or 2 (v2 records: the app's and stage 1's pairs).
        self.images = images
        if images == 2:
            Log.__init__(self, area, _MAGIC2, _REC2)
        else:
            Log.__init__(self, area, _MAGIC, _REC)
        self.floor = 0  # the floor of the newest record on flash (0: none)
        self.floor1 = 0  # v2: image 1's
        self.v1 = False  # v2: the state was read from a v1 record (not written since)

    def load(self):
        # Returns the newest record (blank() if none) and finds where the next one goes.
        if not self.find():
            self.floor = self.floor1 = 0
            if self.images == 2:
                return self._migrate()
            return blank()
        f = struct.unpack_from(_FMT, self.buf, 0)
        self.floor = f[1 + FLOOR]
        rec = list(f[1:])
        if self.images == 2:
            g = struct.unpack_from(_FMT1, self.buf, _AT1)
            self.floor1 = g[FLOOR - 1]
            rec += g
        return rec

    def _migrate(self):
        # A v2 area without a v2 record: the newest v1 record (a board updated to a firmware
        # with stage-1 slots) is image 0's state, image 1 is blank. The first v2 save then
        # erases the sector that does not hold that v1 record (pos -1, _last at it) and
        # writes there with the next sequence number, so a cut before that record is whole
        # leaves the v1 record as it was. Later, v1 records read as invalid (another magic,
        # other offsets), and the sector that holds them is erased at the next switch.
        v1 = Log(self.area, _MAGIC, _REC)
        if not v1.find():
            return blank(2)
        self.found = self.v1 = True
        self.seq = v1.seq
        self._last = v1._last
        self.pos = -1
        f = struct.unpack_from(_FMT, v1.buf, 0)
        self.floor = f[1 + FLOOR]
        rec = list(f[1:])
        rec[FLAGS] = 0
        return rec + blank(2)[IMAGE1 + 1 :]

    def save(self, rec):
        # Appends rec with the next sequence number (rec[SEQ] is updated first, so a caller
        # sees that a save was tried even when the write then fails). A record that raises
        # a floor is appended twice: a cut before the first copy is whole leaves the old
        # floor (the raise did not happen), and once it is whole a bit flip in one copy
        # leaves the other. A floor in rec below the one on flash is raised to it first.
        if rec[FLOOR] < self.floor:
            rec[FLOOR] = self.floor
        two = self.images == 2
        if two and rec[IMAGE1 + FLOOR] < self.floor1:
            rec[IMAGE1 + FLOOR] = self.floor1
        rec[SEQ] += 1
        buf = self.begin()
        struct.pack_into(
            _FMT, buf, 0, _MAGIC2 if two else _MAGIC, rec[SEQ], rec[ACTIVE], rec[TEST],
            rec[TRIAL], rec[FLAGS], rec[FLOOR], rec[VERSION], rec[OK0], rec[OK1], rec[SLEN],
            rec[SOFF], rec[SSHA], rec[SSLOT],
        )
        raised = rec[FLOOR] > self.floor
        if two:
            b = IMAGE1
            struct.pack_into(
                _FMT1, buf, _AT1, rec[b + ACTIVE], rec[b + TEST], rec[b + TRIAL],
                rec[b + FLAGS], rec[b + FLOOR], rec[b + VERSION], rec[b + OK0], rec[b + OK1],
            )
            raised = raised or rec[b + FLOOR] > self.floor1
        self.seq = rec[SEQ] - 1  # the record's sequence number is the caller's
        self.append()
        self.v1 = False
        if raised:
            rec[SEQ] = self.append()  # buf still holds the fields: the second copy
        self.floor = rec[FLOOR]
        if two:
            self.floor1 = rec[IMAGE1 + FLOOR]
