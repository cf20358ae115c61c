# The trust state: the current root set and thresholds, and what is revoked (docs/KEYS.md).
#
# A list (cheaper than a class) read by these indices. Blank trust area: initial(), root set
# version 1 = the keys frozen into the firmware. The flash store of this list (the trust
# area, docs/KEYS.md section 5) is below; checking records and certificates is
# mpboot.records.
import struct
from binascii import crc32
from micropython import const

from mpboot.state import Log

ROOT_VERSION = const(0)  # root set version (1: the frozen keys)
THRESHOLD = const(1)  # distinct roots that must sign a certificate or record
IMAGE_THRESHOLD = const(2)  # distinct trusted keys that must sign an image
ROOTS = const(3)  # list of (keyhash, bits, modulus), as mpboot_keys.KEYS
REVOCATION = const(4)  # revocation number (0: none taken)
REVOKED_KEYS = const(5)  # list of 32-byte key hashes
REVOKED_SERIALS = const(6)  # list of certificate serials (int)


def initial(keys, threshold=1, image_threshold=1):
    # The trust state before any record: the frozen keys (mpboot_keys.KEYS) as version 1.
    return [1, threshold, image_threshold, list(keys), 0, [], []]


def policy(keys_module):
    # Root set version 1's thresholds as a keys module (mpboot_keys) declares them, 1 when
    # absent: keyword arguments for boot.start and Slots.
    return {"threshold": getattr(keys_module, "THRESHOLD", 1),
            "image_threshold": getattr(keys_module, "IMAGE_THRESHOLD", 1)}


# The trust area (docs/KEYS.md section 5): a state.Log of 2304-byte records, each save written
# twice. Little-endian: magic, seq (Log's), then from _HEAD root version, revocation number,
# root threshold, image threshold, number of roots, revoked key hashes, revoked serials; the
# roots, revoked key hashes and serials in fixed slots; at 2272 the highest channel number
# taken and its record's digest prefix (mpboot.channel; zeros: none, as records written before
# it read); the CRC-32 at 2300.
_MAGIC = const(0x5442504D)  # "MPBT"
_REC = const(2304)
_HEAD = const(8)
_HEAD_FMT = "<IIBBBBB"
_ROOTS_AT = const(24)
_ROOT = const(418)  # u16 bits, 32-byte key hash, modulus zero padded to 384 bytes
_MOD_AT = const(34)  # in a root slot
_MOD_MAX = const(384)  # bytes (RSA-3072)
_KEYS_AT = const(1696)
_SERIALS_AT = const(2208)
_TAIL = const(2272)  # mpboot.channel's 28 bytes: u32 highest channel number taken, its digest prefix
_END = const(2300)  # CRC-32 of bytes [0, 2300) follows
_PIECE = const(64)  # bytes read at a time
MAX_ROOTS = const(4)
MAX_REVOKED = const(16)  # key hashes, and serials


class TrustStore(Log):
    # The trust state (the list above) in the trust area: exactly two erase sectors. Records
    # are read from flash in small pieces (the CRC too); the 2304-byte record buffer exists
    # only while one is saved: the boot's heap has no room for it.
    def __init__(self, area):
        Log.__init__(self, area, _MAGIC, _REC, "trust area", False)
        self._piece = bytearray(_PIECE)

    def _read(self, off, n):
        # Bytes [off, off + n) of the area (n <= _PIECE) in a view of self._piece.
        b = memoryview(self._piece)[:n]
        self.area.read(off, b)
        return b

    def _valid(self, off):
        # Log._valid without the record buffer: the sequence number of a valid record at off,
        # else -1.
        b = self._read(off, 8)
        if struct.unpack_from("<I", b, 0)[0] != _MAGIC:
            return -1
        seq = struct.unpack_from("<I", b, 4)[0]
        crc = 0
        n = 0
        while n < _END:
            m = min(_PIECE, _END - n)
            crc = crc32(self._read(off + n, m), crc)
            n += m
        return seq if crc == struct.unpack_from("<I", self._read(off + _END, 4), 0)[0] else -1

    def load(self, keys, threshold=1, image_threshold=1):
        # The newest trust state on flash; a blank area: initial(keys, threshold,
        # image_threshold), root set version 1 from the frozen keys. Every count is bounded
        # (a length is never trusted, even under a valid CRC) and the thresholds are at
        # least 1: a bad record can make the device trust less, never more.
        if not self.find():
            return initial(keys, threshold, image_threshold)
        at = self._last
        ver, rev, thr, ithr, nr, nk, ns = struct.unpack_from(_HEAD_FMT, self._read(at + _HEAD, 13), 0)
        roots = []
        for i in range(min(nr, MAX_ROOTS)):
            o = at + _ROOTS_AT + i * _ROOT
            b = self._read(o, _MOD_AT)
            bits = struct.unpack_from("<H", b, 0)[0]
            h = bytes(b[2:_MOD_AT])
            m = bytearray(min(bits >> 3, _MOD_MAX))
            self.area.read(o + _MOD_AT, m)
            roots.append((h, bits, bytes(m)))
        revoked = []
        for i in range(min(nk, MAX_REVOKED)):
            revoked.append(bytes(self._read(at + _KEYS_AT + 32 * i, 32)))
        serials = []
        for i in range(min(ns, MAX_REVOKED)):
            serials.append(struct.unpack_from("<I", self._read(at + _SERIALS_AT + 4 * i, 4), 0)[0])
        return [ver, max(thr, 1), max(ithr, 1), roots, rev, revoked, serials]

    def tail(self):
        # Bytes [2272, 2300) of the newest record (mpboot.channel's: the highest channel number
        # taken and its digest prefix); zeros on a blank area. Read when asked, never at boot.
        t = bytearray(_END - _TAIL)
        if self.found:
            self.area.read(self._last + _TAIL, t)
        return t

    def save(self, trust, tail=None):
        # tail: new bytes [2272, 2300) (mpboot.channel.take); None keeps the newest record's.
        # Appends `trust` (a list as above) twice: a cut before the first copy is whole
        # leaves the old state, and a bit flip in one copy leaves the other. ValueError
        # (nothing written) for a state the record cannot hold; OSError when the flash write
        # fails (the caller re-reads the state: flash may hold the old or the new one).
        roots = trust[ROOTS]
        revoked = trust[REVOKED_KEYS]
        serials = trust[REVOKED_SERIALS]
        if not 1 <= len(roots) <= MAX_ROOTS or len(revoked) > MAX_REVOKED or len(serials) > MAX_REVOKED:
            raise ValueError("trust")
        if not 1 <= trust[THRESHOLD] <= 255 or not 1 <= trust[IMAGE_THRESHOLD] <= 255:
            raise ValueError("trust")
        for r in roots:
            if len(r[0]) != 32 or len(r[2]) != r[1] >> 3 or len(r[2]) > _MOD_MAX:
                raise ValueError("trust")
        for h in revoked:
            if len(h) != 32:
                raise ValueError("trust")
        self.buf = b = bytearray(self.rec)  # zeros: the record's padding and empty slots
        try:
            for i in range(_REC, len(b)):
                b[i] = 0xFF  # past the record, up to the write unit
            struct.pack_into(_HEAD_FMT, b, _HEAD, trust[ROOT_VERSION], trust[REVOCATION],
                             trust[THRESHOLD], trust[IMAGE_THRESHOLD], len(roots), len(revoked),
                             len(serials))
            for i in range(len(roots)):
                o = _ROOTS_AT + i * _ROOT
                r = roots[i]
                struct.pack_into("<H", b, o, r[1])
                b[o + 2 : o + _MOD_AT] = r[0]
                b[o + _MOD_AT : o + _MOD_AT + len(r[2])] = r[2]
            for i in range(len(revoked)):
                b[_KEYS_AT + 32 * i : _KEYS_AT + 32 * i + 32] = revoked[i]
            for i in range(len(serials)):
                struct.pack_into("<I", b, _SERIALS_AT + 4 * i, serials[i])
            b[_TAIL:_END] = tail or self.tail()
            self.append()
            self.append()
        finally:
            self.buf = None
