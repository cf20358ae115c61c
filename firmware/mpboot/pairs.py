# Two image pairs on one board (issue 19): the app's and stage 1's (the update service, a
# signed image of kind updater), sharing one state record (mpboot.state v2). The boot
# decision for both (decide_all, one state write at most), the combined update (mark_pair:
# a pair boots, confirms and reverts together) and the pair-trial confirm (Pair.confirm).
# Imported only by boards with stage-1 slots (docs/BOOT.md, "Two image pairs").
#
# State record v2 (Store2; format: docs/BOOT.md): magic "MPB2", 160 bytes, the CRC-32 of
# [0, 156) at 156. Bytes 0-80 are v1's fields at v1's offsets (image 0, the app; FLAGS holds
# the pair bits, the session slot is absolute), image 1's fields at 84. In RAM: v1's list and
# image 1's fields at mpboot.state.IMAGE1 + the image-0 index of the same field.
import struct
from micropython import const

from mpboot import image
from mpboot.image import ImageError
from mpboot.slots import Slots, _ver3, newest
from mpboot.state import (ACTIVE, FLAGS, FLOOR, NONE, OK0, OK1, SEQ, SLEN, SOFF, SSHA, SSLOT, TEST,
                          TRIAL, VERSION, Log, Store, blank)

KIND_UPDATER = const(2)  # stage 1 (MPBOOT_KIND updater)
# Image 1's (stage 1's) fields in the RAM list: IMAGE1 + the image-0 index of the same field
# (IMAGE1 + ACTIVE, ..., IMAGE1 + OK1); IMAGE1 + FLAGS is image 1's link byte (reserved for
# the link its upload came over, NONE). Image 0's fields keep their v1 indices.
IMAGE1 = const(12)
# FLAGS bits (v1 writes 0): a combined update of both pairs.
PAIR = const(1)  # the test marks, then the trials, are one pair: they boot, confirm, revert together
PAIR_APP_OK = const(2)  # in a pair trial: the app confirmed its half
PAIR_S1_OK = const(4)  # in a pair trial: stage 1 confirmed its half
# mpboot.state's v1 record (its private consts, repeated): magic, size, format.
MAGIC = const(0x5342504D)
REC = const(96)
FMT = "<IIBBBBI8s16s16sII16sB"
_MAGIC2 = const(0x3242504D)  # "MPB2"
_REC2 = const(160)  # record size before rounding; the CRC-32 of [0, 156) is its last word
_AT1 = const(84)  # where image 1's fields start
# image 1: active test trial link floor version ok0 ok1 (48 bytes)
_FMT1 = "<BBBBI8s16s16s"
_E_DEPENDENCY = const(27)  # image.E_DEPENDENCY
_DEP_STAGE1 = const(1)  # a DEPENDENCY TLV's image id for stage 1 (in an app)


def meets(info, v):
    # Whether the app image described by info may run with stage 1 version v (None: no stage
    # 1 runs): each of its dependencies on stage 1 asks for v or lower. Compared as MCUboot
    # does: major, minor, revision, not the build (slots._ver3). (The firmware's ABI, image
    # 255: Slots.policy.)
    for d in info.get("deps", ()):
        if d[0] == _DEP_STAGE1 and (v is None or _ver3(v) < _ver3(d[1])):
            return False
    return True


def head(sl, slot):
    # The header fields and protected TLVs (version, deps) of the image in `slot`, verified
    # by the caller: read again through the verify buffer, without the hash or signatures.
    area = sl.areas[slot]
    mv = memoryview(sl.buf)
    info = {}
    h = mv[: image.HEADER_SIZE]
    area.read(0, h)
    n = image.parse_header(h, area.size, info)
    if n:
        a = mv[:n]
        area.read(info["hdr_size"] + info["img_size"], a)
        image.walk_protected(a, info)
    return info


def blank2():
    # A factory-fresh v2 state: v1's blank() and image 1's fields (link NONE).
    return blank() + [NONE, NONE, NONE, NONE, 0, bytes(8), bytes(16), bytes(16)]


class Store2(Store):
    # The boot state log of a board with two pairs. It never lowers either floor, and a
    # record that raises one is appended twice. A state area that holds v1 records only is
    # read as the app's state (migration: _migrate).
    def __init__(self, area):
        Log.__init__(self, area, _MAGIC2, _REC2)
        self.floor = self.floor1 = 0  # the floors of the newest record on flash (0: none)
        self.v1 = False  # the state was read from a v1 record (not written since)

    def load(self):
        if not self.find():
            self.floor = self.floor1 = 0
            return self._migrate()
        buf = self.buf
        f = struct.unpack_from(FMT, buf, 0)
        g = struct.unpack_from(_FMT1, buf, _AT1)
        self.floor = f[1 + FLOOR]
        self.floor1 = g[FLOOR - 1]
        return list(f[1:]) + list(g)

    def _migrate(self):
        # No v2 record: the newest v1 record (a board updated to a firmware with stage-1
        # slots) is the app's state, image 1 blank. The first v2 save then erases the
        # sector that does not hold that v1 record (pos -1, _last at it) and writes there
        # with the next sequence number, so a cut before that record is whole leaves the v1
        # record as it was. Later v1 records read as invalid (another magic, other offsets),
        # and the sector that holds them is erased at the next switch.
        v1 = Log(self.area, MAGIC, REC)
        if not v1.find():
            return blank2()
        self.found = self.v1 = True
        self.seq = v1.seq
        self._last = v1._last
        self.pos = -1
        f = struct.unpack_from(FMT, v1.buf, 0)
        self.floor = f[1 + FLOOR]
        rec = list(f[1:])
        rec[FLAGS] = 0
        return rec + blank2()[IMAGE1 + 1 :]

    def save(self, rec):
        # As Store.save, for both floors.
        b = IMAGE1
        if rec[FLOOR] < self.floor:
            rec[FLOOR] = self.floor
        if rec[b + FLOOR] < self.floor1:
            rec[b + FLOOR] = self.floor1
        rec[SEQ] += 1
        buf = self.begin()
        struct.pack_into(
            FMT, buf, 0, _MAGIC2, rec[SEQ], rec[ACTIVE], rec[TEST], rec[TRIAL], rec[FLAGS],
            rec[FLOOR], rec[VERSION], rec[OK0], rec[OK1], rec[SLEN], rec[SOFF], rec[SSHA],
            rec[SSLOT],
        )
        struct.pack_into(
            _FMT1, buf, _AT1, rec[b + ACTIVE], rec[b + TEST], rec[b + TRIAL], rec[b + FLAGS],
            rec[b + FLOOR], rec[b + VERSION], rec[b + OK0], rec[b + OK1],
        )
        self.seq = rec[SEQ] - 1  # the record's sequence number is the caller's
        self.append()
        self.v1 = False
        if rec[FLOOR] > self.floor or rec[b + FLOOR] > self.floor1:
            rec[SEQ] = self.append()  # buf still holds the fields: the second copy
        self.floor = rec[FLOOR]
        self.floor1 = rec[b + FLOOR]


def plan(sl):
    # Steps 1 and 2 of a pair's decision (as Slots.decide), in RAM (the caller saves):
    # revert a trial that was reset before its confirm, or start the test boot of a marked
    # slot that verifies. Returns ((slot, info) of the test boot or None, whether st changed).
    st = sl.state
    b = sl.b
    if st[b + TRIAL] != NONE:
        st[b + TRIAL] = NONE
        return None, True
    t = st[b + TEST]
    if t == NONE:
        return None, False
    st[b + TEST] = NONE
    info = sl.probe(t)
    if info:
        st[b + TRIAL] = t  # the one test boot is used up now, whatever happens next
        return (t, info), True
    return None, True


def choose(sl, fresh):
    # Step 3 (as Slots.decide): the confirmed image, the active slot first. fresh: no record
    # ever named this pair's images: the newest valid image, confirmed in RAM. Returns
    # (slot, info, whether st changed); slot -1: none is bootable.
    a = sl.state[sl.b + ACTIVE]
    tried = [None, None]
    for s in ((a, a ^ 1) if a != NONE else (0, 1)):
        info = tried[s] = sl.probe(s)
        if info and sl.confirmed(s, info):
            return s, info, False
    if fresh:
        best = newest(tried)
        info = tried[best]
        if info:
            sl.keep(best, info)
            return best, info, True
    return -1, None, False


class Pair(Slots):
    # The app's pair on a board with two (made instead of Slots, with the same arguments):
    # v2 state record, the pair rules for marks and confirms, and the app's dependencies on
    # stage 1 (docs/BOOT.md, "Dependencies").
    def __init__(self, slot0, slot1, state_area, keys, **kw):
        self.booted = None  # (slot, info) decide_all chose for this pair
        self.peer = None  # the other pair
        Slots.__init__(self, slot0, slot1, state_area, keys, store=Store2(state_area), **kw)

    def probe(self, slot):
        # Slots.probe, and for the app: its dependencies hold against the stage 1 this boot
        # runs (decide_all decides stage 1 first; boot.run's fallback comes after), else
        # None with errors[slot] E_DEPENDENCY.
        info = Slots.probe(self, slot)
        if info and not self.b:
            r = self.peer.booted
            if not meets(info, r[1]["version"] if r and r[1] else None):
                self.errors[slot] = _E_DEPENDENCY
                return None
        return info

    def _fits(self, slot):
        # An app in `slot` (verified by the caller) that the confirmed stage 1 does not meet
        # would not be started: E_DEPENDENCY, so the client hears it (update stage 1 first,
        # or both with mark_pair).
        st = self.state
        v = None if st[IMAGE1 + ACTIVE] == NONE else struct.unpack("<BBHI", st[IMAGE1 + VERSION])
        if not meets(head(self, slot), v):
            raise ImageError(_E_DEPENDENCY)

    def mark_test(self, slot):
        # A pair mark (mark_pair) not started yet becomes two marks of their own. The app's
        # dependencies: _fits.
        st = self.state
        if not self.b:
            self._fits(slot)
        if st[FLAGS] & PAIR and st[TRIAL] == NONE and st[IMAGE1 + TRIAL] == NONE:
            st[FLAGS] = 0
            st[self.b + TEST] = NONE  # (so Slots.mark_test writes)
        Slots.mark_test(self, slot)

    def confirm(self, slot, info):
        # In a pair trial the first half to confirm only records that it did (its bit, one
        # record; False when it confirms again); the second writes both halves' confirms
        # (the other's info from this boot's decision, else verified again) in one record.
        # An app made the confirmed one without running (a permanent install): _fits.
        st = self.state
        if not self.b and (self.booted is None or self.booted[0] != slot):
            self._fits(slot)
        if st[FLAGS] & PAIR and st[self.b + TRIAL] == slot:
            mine, other = (PAIR_APP_OK, PAIR_S1_OK) if self.b == 0 else (PAIR_S1_OK, PAIR_APP_OK)
            if not st[FLAGS] & other:
                if st[FLAGS] & mine:
                    return False
                st[FLAGS] |= mine
                self.save(st)
                return True
            p = self.peer
            ps = st[p.b + TRIAL]
            pinfo = p.booted[1] if p.booted and p.booted[0] == ps else p.probe(ps)
            if pinfo is None:
                raise ImageError(p.errors[ps])
            p.keep(ps, pinfo)
            st[FLAGS] = 0
        return Slots.confirm(self, slot, info)

    def set_trust(self, new):
        Slots.set_trust(self, new)
        self.peer.trust = new


class Stage1(Pair):
    # Stage 1's pair (kind updater): shares the app pair's state record, store, trust
    # state, policy and verify buffer instead of loading its own.
    def __init__(self, app, slot0, slot1):
        for k in ("store", "state", "keys", "threshold", "image_threshold", "trust_store",
                  "trust", "build", "vendor_id", "class_id", "downgrade", "test_boot",
                  "no_repl", "factory", "mapped", "buf"):
            setattr(self, k, getattr(app, k))
        self.areas = (slot0, slot1)
        self.kind = KIND_UPDATER
        self.errors = [0, 0]
        self.booted = None
        self.peer = app
        app.peer = self
        self.image = 1
        self.b = IMAGE1


def stage1(app, slot0, slot1):
    # Stage 1's pair beside app (a Pair). One decision for both, one write: decide_all.
    return Stage1(app, slot0, slot1)


def _run(sl, t, fresh):
    # What runs of a pair: its test boot t ((slot, info) from plan), else its confirmed image
    # (choose). Sets sl.booted; returns ((slot, info, trial), whether st changed).
    if t:
        r, c = (t[0], t[1], True), False
    else:
        slot, info, c = choose(sl, fresh)
        r = (slot, info, False)
    sl.booted = r[:2]
    return r, c


def decide_all(app, s1):
    # The boot decision for both pairs (app, stage1(app, ...)), with one state record
    # written at most. Each pair decides as Slots.decide does; a pair mark (PAIR) starts
    # both test boots or neither, and a reset in a pair trial reverts both, even a half
    # that confirmed. Stage 1 is decided first and never constrained by the app (the board
    # always takes updates); the app's candidates (its test image, then the confirmed ones)
    # count only if their dependencies hold against that stage 1 (Pair.probe): none holds,
    # recovery with E_DEPENDENCY. Stage 1's pair is also fresh (its newest valid image
    # confirmed) at the first boot after the v1 -> v2 migration: a board given stage-1
    # slots by a firmware update. Returns ((slot, info, trial) of the app, the same for
    # stage 1).
    st = app.state
    b = IMAGE1
    pair = st[FLAGS] & PAIR
    changed = False
    t0 = t1 = None
    back = pair and (st[TRIAL] != NONE or st[b + TRIAL] != NONE)
    if back:
        # A pair trial reset before both halves confirmed: both revert (and marks made during
        # it start nothing).
        st[TRIAL] = st[b + TRIAL] = NONE
        st[TEST] = st[b + TEST] = NONE
    else:
        if pair and (st[TEST] == NONE) != (st[b + TEST] == NONE):
            # An upload or erase took one half of the pair mark: neither starts.
            st[TEST] = st[b + TEST] = NONE
        m1 = st[b + TEST] != NONE
        t1, changed = plan(s1)
        if pair and m1 and not t1:
            st[TEST] = NONE  # half of the pair does not verify: neither starts
    f1 = not app.store.found or app.store.v1
    r1, c = _run(s1, t1, f1)
    changed = changed or c
    if not back:
        m0 = st[TEST] != NONE
        t0, c = plan(app)  # its dependencies against r1's stage 1
        changed = changed or c
        if pair and m0 and not t0 and t1:
            # The app half does not verify, or its dependencies fail against the new stage
            # 1: neither starts, stage 1 runs its confirmed image.
            st[b + TRIAL] = NONE
            t1 = None
            r1, c = _run(s1, None, f1)
            changed = changed or c
    if pair:
        st[FLAGS] = PAIR if t0 and t1 else 0
        changed = True
    r0, c = _run(app, t0, not app.store.found)
    if changed or c:
        app.save(st)
    return r0, r1


def mark_pair(app, t0, s1, t1):
    # A combined update: app slot t0 and stage-1 slot t1 (both verified by the caller) boot
    # once, together, at the next reset (one record); they confirm and revert together.
    # Refused (E_DEPENDENCY, nothing written) if the app's dependencies on stage 1 do not
    # hold against that stage 1.
    if not meets(head(app, t0), head(s1, t1)["version"]):
        raise ImageError(_E_DEPENDENCY)
    st = app.state
    for sl, t in ((app, t0), (s1, t1)):
        st[sl.b + TEST] = t
        if st[sl.b + TRIAL] == t:
            st[sl.b + TRIAL] = NONE
    st[FLAGS] = PAIR
    app.save(st)
