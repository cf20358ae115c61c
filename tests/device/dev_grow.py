# MicroPython: what only grows (docs/KEYS.md section 1) under bit flips and power cuts: the
# anti-rollback floor in the boot state log (mpboot.state.Store) and the trust state in the
# trust area (mpboot.trust.TrustStore).
#
# Bit flips, on a RAM chip of two sectors (one process flips thousands of bits):
#   flips-floor SECTOR ALIGN BEFORE INNER OUTER
#       floor 1 (a raise: two records), BEFORE more records, then the raise to 2 (two more).
#       Flips bits one at a time on the area as saved (flips() below: every INNER-th bit of
#       the newest two records, all of their header and CRC bits, every OUTER-th bit of the
#       rest; 1 1: every bit). For each: a fresh Store loads (its floor must be 2), saves a
#       record without a raise (it must go through: a flipped bit in erased flash is
#       skipped, never EIO) and loads it back.
#   flips-trust SECTOR ALIGN INNER OUTER
#       the same for the trust area: a rotation to version 2, then a revocation (number 3),
#       each saved twice; a load must give exactly the newest state; a save after the flip
#       (another revocation) must go through and load back.
#   flips-erased SECTOR ALIGN
#       one save of each log (the floor raised to 1; trust version 2), then a bit flipped in
#       an erased record slot (its first, middle and last byte; every such slot of both
#       sectors), then enough saves to switch sectors twice: none may fail, and the last one
#       loads back.
#   They print "FLIPS n lower=N eio=N bad=N" and up to 8 "BAD bit what" lines; "POS a b",
#   the area offsets of the newest two records.
#
# Power cuts, on a nor_sim chip with the unix port's layout (MPBOOT_NOR_FAULT cuts it):
#   cut PATH SIZE SECTOR ALIGN OP...   OP: fill:N (N state saves, no raise) | floor:N (raise
#       the floor to N) | rotate (the next root set version, through Slots.set_trust) |
#       revoke (the next revocation number) | show (prints "FLOOR n", "STATE fields" and
#       "TRUST version threshold image_threshold roots revocation keys serials digest") |
#       dump (prints the trust state in full: "ROOT bits keyhash modulus", "KEY hash",
#       "SERIAL n" lines, hex) | at (prints "AT trust_area_start")
#
# Trust area edge cases, on a RAM chip:
#   fail K      Slots.set_trust with the flash failing from its K-th operation on: prints
#               "FAIL K raised=E ram=DIGEST flash=DIGEST old=DIGEST new=DIGEST"
#   bounds      records with out-of-range counts and thresholds under a valid CRC: prints
#               "BOUNDS roots keys serials threshold image_threshold modulus_len"
#   invalid     saves the record cannot hold: prints "INVALID n ValueError..." and whether
#               anything was written
import hashlib
import sys
from binascii import hexlify

from mpboot import trust
from mpboot.flash import Area
from mpboot.state import FLOOR, SEQ, SOFF, Store
from mpboot.trust import TrustStore

_KEYS = ((b"\x11" * 32, 2048, b"\x5a" * 256),)  # root set version 1 (frozen keys stand-in)


class RamFlash:
    # Two or more sectors of NOR flash in RAM (Area refuses programs over unerased bytes);
    # the attributes of a nor_sim chip (ports/unix.areas() takes it). fail: programs and
    # erases from that operation on raise OSError(EIO) without doing anything (-1: never).
    def __init__(self, size, sector, align=1):
        self.mem = bytearray(b"\xff" * size)
        self.mv = memoryview(self.mem)
        self.size = size
        self.sector = sector
        self.align = align
        self.blank = b"\xff" * sector
        self.ops = 0
        self.fail = -1

    def _op(self):
        self.ops += 1
        if 0 <= self.fail < self.ops:
            raise OSError(5)

    def readblocks(self, n, buf, off=0):
        a = n * self.sector + off
        buf[:] = self.mv[a : a + len(buf)]

    def writeblocks(self, n, buf, off=0):
        self._op()
        a = n * self.sector + off
        self.mv[a : a + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:
            return len(self.mem) // self.sector
        if op == 5:
            return self.sector
        if op == 6:
            self._op()
            self.mv[arg * self.sector : (arg + 1) * self.sector] = self.blank
        return 0


def root(v, i):
    # A root of root set version v (bits, key hash, modulus: patterns, not real keys).
    bits = 3072 if (v + i) & 1 else 2048
    return (bytes((v * 31 + i * 7 + j) & 0xFF for j in range(32)), bits,
            bytes((v + i * 3 + j * 5) & 0xFF for j in range(bits // 8)))


def rotated(t):
    # The trust state after a root record naming version t[ROOT_VERSION] + 1.
    v = t[trust.ROOT_VERSION] + 1
    n = 1 + v % 4
    return [v, 1 + v % n, 1 + v % 6, [root(v, i) for i in range(n)], t[trust.REVOCATION],
            list(t[trust.REVOKED_KEYS]), list(t[trust.REVOKED_SERIALS])]


def revoked(t):
    # The trust state after a revocation record with the next number (its lists replace).
    r = t[trust.REVOCATION] + 1
    k = r % 17
    return [t[trust.ROOT_VERSION], t[trust.THRESHOLD], t[trust.IMAGE_THRESHOLD], list(t[trust.ROOTS]), r,
            [bytes((r * 13 + i + j) & 0xFF for j in range(32)) for i in range(k)],
            [(r << 16) + i for i in range(16 - k)]]


def digest(t):
    return hexlify(hashlib.sha256(repr(t)).digest()[:8]).decode()


def records(area, rec, crc_at, magic):
    # (seq, offset) of every valid record (magic, CRC-32 of [0, crc_at)) in the area, oldest
    # first.
    from binascii import crc32
    import struct

    out = []
    buf = bytearray(rec)
    es = area.erase_size
    for s in range(2):
        for i in range(es // rec):
            off = s * es + i * rec
            area.read(off, buf)
            if struct.unpack_from("<I", buf, 0)[0] == magic and \
                    crc32(memoryview(buf)[:crc_at]) == struct.unpack_from("<I", buf, crc_at)[0]:
                out.append((struct.unpack_from("<I", buf, 4)[0], off))
    out.sort()
    return out


def flips(chip, size, crc_at, newest, inner, outer, check):
    # Flips bits one at a time, the chip restored from its snapshot before each: in the
    # newest records every bit of the header (magic, seq and 16 more bytes) and of the CRC,
    # and every inner-th bit of the rest of them; elsewhere every outer-th bit.
    snap = bytes(chip.mem)
    n = lower = eio = bad = 0
    shown = 0
    for bit in range(8 * len(snap)):
        byte = bit >> 3
        stride = outer
        for a in newest:
            if a <= byte < a + size:
                at = byte - a
                stride = 1 if at < 24 or crc_at <= at < crc_at + 4 else inner
        if bit % stride:
            continue
        chip.mv[:] = snap
        chip.mem[byte] ^= 1 << (bit & 7)
        n += 1
        what = check()
        if what is None:
            continue
        if what == "lower":
            lower += 1
        elif what == "eio":
            eio += 1
        else:
            bad += 1
        if shown < 8:
            print("BAD", bit, what)
            shown += 1
    chip.mv[:] = snap
    print("FLIPS %d lower=%d eio=%d bad=%d" % (n, lower, eio, bad))


def flips_floor(sector, align, before, inner, outer):
    chip = RamFlash(2 * sector, sector)
    area = Area(chip, 0, 2 * sector, align)
    st = Store(area)
    rec = st.load()
    rec[FLOOR] = 1
    st.save(rec)
    for i in range(before):
        rec[SOFF] = i + 1
        st.save(rec)
    rec[FLOOR] = 2
    st.save(rec)
    pos = [off for _, off in records(area, st.rec, 92, 0x5342504D)[-2:]]
    print("POS", pos[0], pos[1], "SEQ", rec[SEQ])

    def check():
        s = Store(area)
        r = s.load()
        if r[FLOOR] < 2:
            return "lower"
        r[SOFF] = 0xABCD
        try:
            s.save(r)
        except OSError:
            return "eio"
        r = Store(area).load()
        if r[FLOOR] != 2 or r[SOFF] != 0xABCD:
            return "reload %d %d" % (r[FLOOR], r[SOFF])
        return None

    flips(chip, st.rec, 92, pos, inner, outer, check)


def flips_trust(sector, align, inner, outer):
    chip = RamFlash(2 * sector, sector)
    area = Area(chip, 0, 2 * sector, align)
    ts = TrustStore(area)
    t = ts.load(_KEYS)
    t = rotated(t)
    ts.save(t)
    t = revoked(revoked(revoked(t)))
    ts.save(t)
    want = digest(t)
    after = revoked(t)
    after_digest = digest(after)
    pos = [off for _, off in records(area, ts.rec, 2300, 0x5442504D)[-2:]]
    print("POS", pos[0], pos[1], "SEQ", ts.seq, "STATE", want)

    def check():
        s = TrustStore(area)
        got = s.load(_KEYS)
        if got[trust.ROOT_VERSION] < t[trust.ROOT_VERSION] or got[trust.REVOCATION] < t[trust.REVOCATION]:
            return "lower"
        if digest(got) != want:
            return "state " + digest(got)
        try:
            s.save(after)
        except OSError:
            return "eio"
        if digest(TrustStore(area).load(_KEYS)) != after_digest:
            return "reload"
        return None

    flips(chip, ts.rec, 2300, pos, inner, outer, check)


def flips_erased(sector, align):
    n = eio = bad = 0
    for kind in ("floor", "trust") if sector >= 2304 else ("floor",):
        chip = RamFlash(2 * sector, sector)
        area = Area(chip, 0, 2 * sector, align)
        if kind == "floor":
            log = Store(area)
            rec = log.load()
            rec[FLOOR] = 1
            log.save(rec)
        else:
            log = TrustStore(area)
            t = rotated(log.load(_KEYS))
            log.save(t)
        used = [off for _, off in records(area, log.rec, log.crc_at, log.magic)]
        snap = bytes(chip.mem)
        saves = 2 * log.per + 2
        for off in range(0, 2 * sector, log.rec):
            if off in used or off % sector + log.rec > sector:
                continue
            for at in (0, log.rec // 2, log.rec - 1):
                chip.mv[:] = snap
                chip.mem[off + at] ^= 0x10
                n += 1
                try:
                    if kind == "floor":
                        s = Store(area)
                        r = s.load()
                        for k in range(saves):
                            r[SOFF] = k + 1
                            s.save(r)
                        r = Store(area).load()
                        ok = r[FLOOR] == 1 and r[SOFF] == saves
                    else:
                        s = TrustStore(area)
                        t = s.load(_KEYS)
                        for _ in range(saves):
                            t = revoked(t)
                            s.save(t)
                        ok = digest(TrustStore(area).load(_KEYS)) == digest(t)
                except OSError:
                    eio += 1
                    print("BAD", kind, off + at, "eio")
                    continue
                if not ok:
                    bad += 1
                    print("BAD", kind, off + at, "reload")
    print("FLIPS %d lower=0 eio=%d bad=%d" % (n, eio, bad))


def cut(path, size, sector, align, ops):
    import mpboot_keys
    from mpboot.ports import unix as port
    from mpboot.slots import Slots

    chip = port.flash(path, size, sector, align)
    a = port.areas(chip)
    sl = Slots(a[0], a[1], a[2], mpboot_keys.KEYS, trust=a[4])
    st = sl.state
    for op in ops:
        k, _, v = op.partition(":")
        if k == "fill":
            for _ in range(int(v)):
                st[SOFF] += 1
                sl.save(st)
        elif k == "floor":
            st[FLOOR] = int(v)
            sl.save(st)
        elif k == "rotate":
            sl.set_trust(rotated(sl.trust))
        elif k == "revoke":
            sl.set_trust(revoked(sl.trust))
        elif k == "at":
            print("AT", a[4].start)
        elif k == "dump":
            t = sl.trust
            print("HEAD", t[trust.ROOT_VERSION], t[trust.THRESHOLD], t[trust.IMAGE_THRESHOLD], t[trust.REVOCATION])
            for r in t[trust.ROOTS]:
                print("ROOT", r[1], hexlify(r[0]).decode(), hexlify(r[2]).decode())
            for h in t[trust.REVOKED_KEYS]:
                print("KEY", hexlify(h).decode())
            for n in t[trust.REVOKED_SERIALS]:
                print("SERIAL", n)
        elif k == "show":
            print("FLOOR", st[FLOOR])
            print("STATE", " ".join(hexlify(x).decode() if isinstance(x, bytes) else str(x) for x in st[1:]))
            t = sl.trust
            print("TRUST", t[trust.ROOT_VERSION], t[trust.THRESHOLD], t[trust.IMAGE_THRESHOLD],
                  len(t[trust.ROOTS]), t[trust.REVOCATION], len(t[trust.REVOKED_KEYS]),
                  len(t[trust.REVOKED_SERIALS]), digest(t))
        print("OK", op)


def ram_slots(chip):
    import mpboot_keys
    from mpboot.ports import unix as port
    from mpboot.slots import Slots

    a = port.areas(chip)
    return Slots(a[0], a[1], a[2], mpboot_keys.KEYS, trust=a[4]), a[4]


def fail(k):
    chip = RamFlash(64 * 1024, 4096, 4)
    sl, area = ram_slots(chip)
    old = rotated(sl.trust)
    sl.set_trust(old)
    new = revoked(rotated(old))
    chip.fail = chip.ops + k
    raised = "-"
    try:
        sl.set_trust(new)
    except OSError as e:
        raised = "OSError:%d" % e.args[0]
    chip.fail = -1
    print("FAIL", k, "raised=" + raised, "ram=" + digest(sl.trust),
          "flash=" + digest(TrustStore(area).load(sl.keys)), "old=" + digest(old), "new=" + digest(new))


def bounds():
    import struct

    for nr, nk, ns, thr, ithr, bits in ((200, 255, 255, 0, 0, 65535), (0, 17, 17, 0, 255, 0),
                                        (5, 16, 16, 9, 7, 4096)):
        chip = RamFlash(8192, 4096)
        ts = TrustStore(Area(chip, 0, 8192))
        ts.buf = bytearray(ts.rec)
        b = ts.begin()
        for i in range(2300):
            b[i] = 0x5A
        struct.pack_into("<IIBBBBB", b, 8, 7, 9, thr, ithr, nr, nk, ns)
        for i in range(4):
            struct.pack_into("<H", b, 24 + 418 * i, bits)
        ts.append()
        t = TrustStore(Area(chip, 0, 8192)).load(_KEYS)
        print("BOUNDS", len(t[trust.ROOTS]), len(t[trust.REVOKED_KEYS]), len(t[trust.REVOKED_SERIALS]),
              t[trust.THRESHOLD], t[trust.IMAGE_THRESHOLD], max([len(r[2]) for r in t[trust.ROOTS]] or [0]),
              t[trust.ROOT_VERSION], t[trust.REVOCATION])


def invalid():
    good = rotated(trust.initial(_KEYS))
    cases = (("no_roots", 3, []), ("five_roots", 3, [root(2, i) for i in range(5)]),
             ("short_hash", 3, [(b"\x01" * 31, 2048, bytes(256))]),
             ("modulus_len", 3, [(b"\x01" * 32, 2048, bytes(255))]),
             ("too_big", 3, [(b"\x01" * 32, 4096, bytes(512))]),
             ("threshold_0", 1, 0), ("image_threshold_0", 2, 0),
             ("keys_17", 5, [bytes(32)] * 17), ("serials_17", 6, list(range(17))),
             ("key_len", 5, [bytes(31)]))
    for name, i, v in cases:
        chip = RamFlash(8192, 4096)
        ts = TrustStore(Area(chip, 0, 8192))
        t = list(good)
        t[i] = v
        try:
            ts.save(t)
            what = "saved"
        except ValueError:
            what = "ValueError"
        print("INVALID", name, what, "ops=%d" % chip.ops)


cmd = sys.argv[1]
args = sys.argv[2:]
if cmd == "flips-floor":
    flips_floor(int(args[0]), int(args[1]), int(args[2]), int(args[3]), int(args[4]))
elif cmd == "flips-trust":
    flips_trust(int(args[0]), int(args[1]), int(args[2]), int(args[3]))
elif cmd == "flips-erased":
    flips_erased(int(args[0]), int(args[1]))
elif cmd == "fail":
    fail(int(args[0]))
elif cmd == "bounds":
    bounds()
elif cmd == "invalid":
    invalid()
elif cmd == "cut":
    cut(args[0], int(args[1]), int(args[2]), int(args[3]), args[4:])
else:
    raise SystemExit("unknown command " + cmd)
