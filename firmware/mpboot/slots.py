# Two image slots and the boot state: which image boots, test boots, confirm, revert and the
# anti-rollback floor (MCUboot direct-XIP-with-revert semantics; state machine: docs/BOOT.md).
#
# Images run in place from either slot; nothing is copied. A slot counts only when its exact
# bytes verify (image.verify with the trust state: the root set of the trust area, or the
# embedded keys on a board without one) and pass this device's policy: vendor
# and class id, security counter at or above the floor, its kind (an app's slots hold apps). A slot is "confirmed" when the state
# holds the first 16 bytes of its image digest, so rewriting a slot un-confirms it without
# a state write.
#
# A board with stage-1 slots has two pairs (issue 19): the app's Slots (images=2) and stage
# 1's (stage1()), sharing one state record (mpboot.state v2); decide_all() makes the boot
# decision for both, and a combined update (mark_pair) boots, confirms and reverts together.
import struct
from micropython import const

from mpboot import image
from mpboot import trust as _trust  # (the name `trust` is Slots' argument)
from mpboot.image import ImageError
from mpboot.reader import bytes_reader
from mpboot.state import (ACTIVE, FLAGS, FLOOR, IMAGE1, NONE, OK0, PAIR, PAIR_APP_OK, PAIR_S1_OK,
                          TEST, TRIAL, VERSION, Store)

# Policy error codes, after the image verifier's: E_ + the host's ImageErrorCode name, same number.
E_VENDOR_MISMATCH = const(16)  # vendor id missing or not this device's
E_CLASS_MISMATCH = const(17)  # class id missing or not this device's
E_COUNTER_BELOW_FLOOR = const(18)  # security counter below the anti-rollback floor
E_DOWNGRADE = const(19)  # version below the confirmed image's (downgrades refused)
E_WRONG_KIND = const(26)  # an image of another kind (MPBOOT_KIND: an updater in the app's slots)
_KIND_APP = const(1)  # an image without MPBOOT_KIND is an app
KIND_UPDATER = const(2)  # stage 1 (MPBOOT_KIND updater)


def _ver3(v):
    # Versions compare as MCUboot does by default: major, minor, revision (not build).
    return (v[0], v[1], v[2])


class Slots:
    def __init__(self, slot0, slot1, state_area, keys, vendor_id=None, class_id=None,
                 downgrade=True, mapped=None, factory=None, trust=None, threshold=1,
                 image_threshold=1, kind=_KIND_APP, images=1, share=None):
        # slot0, slot1, state_area: mpboot.flash.Area. keys: mpboot_keys.KEYS.
        # vendor_id, class_id: 16-byte UUIDs images must carry (None: not checked).
        # downgrade: False refuses updates older than the confirmed image.
        # mapped: a port's mapped(area) (verify the bytes the app will run from) or None.
        # factory: the factory area (mpboot.factory, docs/FACTORY.md), or None: no factory
        # state, the policy is only the build's.
        # trust: the trust area (mpboot.trust.TrustStore, docs/KEYS.md), or None: the frozen
        # root set stays. threshold, image_threshold: root set version 1's (mpboot_keys'
        # THRESHOLD and IMAGE_THRESHOLD). kind: the MPBOOT_KIND bit of the images these
        # slots hold (1 app, 2 updater); an image of another kind is refused in them.
        # images: 2 on a board with stage-1 slots (state record v2). share: see stage1().
        self.areas = (slot0, slot1)
        self.kind = kind
        self.errors = [0, 0]  # why each slot was last refused (image/policy code)
        self.booted = None  # (slot, info) the boot decision chose for this pair
        self.peer = None  # the other pair's Slots, on a board with two
        self.image = 0 if share is None else 1
        self.b = 0 if share is None else IMAGE1  # where this pair's fields are in the state
        if share is not None:
            # Stage 1's pair: the app's state record, store, trust, policy and buffer.
            for k in ("store", "state", "keys", "threshold", "image_threshold", "trust_store",
                      "trust", "build", "vendor_id", "class_id", "downgrade", "test_boot",
                      "no_repl", "factory", "mapped", "buf"):
                setattr(self, k, getattr(share, k))
            self.peer = share
            share.peer = self
            return
        self.store = Store(state_area, images)
        self.state = self.store.load()
        self.keys = keys
        self.threshold = threshold
        self.image_threshold = image_threshold
        # The trust state (a list read by the mpboot.trust indices) and its store.
        self.trust_store = None
        if trust is None:
            self.trust = _trust.initial(keys, threshold, image_threshold)
        else:
            self.trust_store = _trust.TrustStore(trust)
            self.trust = self.trust_store.load(keys, threshold, image_threshold)
        # The build's policy; the effective one (vendor_id, class_id, downgrade, test_boot,
        # no_repl) is it tightened by the factory record.
        self.build = (vendor_id, class_id, downgrade)
        self.vendor_id = vendor_id
        self.class_id = class_id
        self.downgrade = downgrade
        self.test_boot = False  # images become confirmed only through their test boot
        self.no_repl = False  # the app's exceptions never end boot.py (no REPL)
        self.factory = None
        if factory is not None:
            from mpboot.factory import Factory

            self.factory = Factory(factory)
            self.factory.apply(self)
        self.mapped = mapped
        self.buf = bytearray(image.BUF_SIZE)

    def policy(self, info, update=False):
        # Raises ImageError unless this device may run the image described by info. With
        # only a header (an update's begin, no protected TLVs yet) the TLV checks wait.
        st = self.state
        b = self.b
        if "security_counter" in info:
            if self.vendor_id is not None and info["vendor_id"] != self.vendor_id:
                raise ImageError(E_VENDOR_MISMATCH)
            if self.class_id is not None and info["class_id"] != self.class_id:
                raise ImageError(E_CLASS_MISMATCH)
            if (info["security_counter"] or 0) < st[b + FLOOR]:
                raise ImageError(E_COUNTER_BELOW_FLOOR)
            if info.get("kind", _KIND_APP) != self.kind:
                raise ImageError(E_WRONG_KIND)
        if update and not self.downgrade and st[b + ACTIVE] != NONE:
            if _ver3(info["version"]) < _ver3(struct.unpack("<BBHI", st[b + VERSION])):
                raise ImageError(E_DOWNGRADE)

    def check(self, slot, read=None, update=False):
        # Verifies the slot's exact bytes (through `read`, else the port's memory map, else
        # flash reads) and the policy; returns the image info, raises ImageError.
        area = self.areas[slot]
        if read is None:
            m = self.mapped(area) if self.mapped else None
            read = bytes_reader(m) if m is not None else area.read
        info = image.verify(read, self.trust, area.size, self.buf)
        self.policy(info, update)
        return info

    def save(self, st):
        # Writes the state record st (self.state, changed by the caller: the updater and the
        # factory floor write use it too). A failed write leaves flash as it was: re-read it
        # so RAM never runs ahead of it (in place: two pairs share the list).
        try:
            self.store.save(st)
        except Exception:
            new = self.store.load()
            for i in range(len(new)):
                st[i] = new[i]
            raise

    def set_trust(self, new):
        # Makes `new` (a trust list, checked by the caller: mpboot.records) the trust state:
        # saved to the trust area (twice), then used. A failed write raises OSError with RAM
        # re-read as flash is (the old or the new state); ValueError before any write for a
        # state the record cannot hold. A board without a trust area: OSError(19) (ENODEV).
        ts = self.trust_store
        if ts is None:
            raise OSError(19)
        try:
            ts.save(new)
        except OSError:
            self.trust = ts.load(self.keys, self.threshold, self.image_threshold)
            raise
        self.trust = new
        if self.peer:
            self.peer.trust = new

    def probe(self, slot):
        # check(slot) for boot decisions (also boot.run's fallback): None instead of raising,
        # and why in errors[slot] (0: it passed).
        try:
            info = self.check(slot)
            self.errors[slot] = 0
            return info
        except ImageError as e:
            self.errors[slot] = e.args[0]
            return None

    def confirmed(self, slot, info):
        return info["digest"][:16] == self.state[self.b + OK0 + slot]

    def _plan(self):
        # Steps 1 and 2 of this pair's decision, in RAM (the caller saves): revert a trial
        # that was reset before its confirm, or start the test boot of a marked slot that
        # verifies. Returns ((slot, info) of the test boot or None, whether st changed).
        st = self.state
        b = self.b
        if st[b + TRIAL] != NONE:
            # Started for its test boot and reset without a confirm: revert.
            st[b + TRIAL] = NONE
            return None, True
        t = st[b + TEST]
        if t == NONE:
            return None, False
        st[b + TEST] = NONE
        info = self.probe(t)
        if info:
            st[b + TRIAL] = t  # the one test boot is used up now, whatever happens next
            return (t, info), True
        return None, True

    def _choose(self, fresh):
        # Step 3: the confirmed image, the active slot first. fresh: no record ever named
        # this pair's images (a factory-fresh state area): the newest valid image, confirmed
        # in RAM (a board flashed in the factory with esptool/picotool before any state was
        # written). Returns (slot, info, whether st changed); slot -1: none is bootable.
        a = self.state[self.b + ACTIVE]
        tried = [None, None]
        for s in ((a, a ^ 1) if a != NONE else (0, 1)):
            info = tried[s] = self.probe(s)
            if info and self.confirmed(s, info):
                return s, info, False
        if fresh:
            # (so no active slot: both were tried above)
            best = 0 if tried[0] else 1
            if tried[0] and tried[1] and _ver3(tried[1]["version"]) > _ver3(tried[0]["version"]):
                best = 1
            info = tried[best]
            if info:
                self._keep(best, info)
                return best, info, True
        return -1, None, False

    def decide(self):
        # The boot decision (one pair). Returns (slot, info, trial): the slot to run (-1:
        # none is bootable), its verified info, and whether this is its one test boot. State
        # changes (one record at most) are written before the image they concern runs.
        test, changed = self._plan()
        if test:
            r = (test[0], test[1], True)
        else:
            slot, info, c = self._choose(not self.store.found)
            r = (slot, info, False)
            changed = changed or c
        if changed:
            self.save(self.state)
        self.booted = r[:2]
        return r

    def mark_test(self, slot):
        # The image in `slot` (verified by the caller) boots once at the next reset. A
        # pair mark (mark_pair) not started yet becomes two marks of their own.
        st = self.state
        b = self.b
        if st[b + TEST] != slot or st[b + TRIAL] == slot or st[FLAGS] & PAIR:
            st[b + TEST] = slot
            if st[b + TRIAL] == slot:
                st[b + TRIAL] = NONE  # an earlier test boot of that slot that never ran its app
            if st[FLAGS] & PAIR and st[TRIAL] == NONE and st[IMAGE1 + TRIAL] == NONE:
                st[FLAGS] = 0
            self.save(st)

    def _keep(self, slot, info):
        # confirm()'s state change, in RAM.
        st = self.state
        b = self.b
        st[b + ACTIVE] = slot
        st[b + OK0 + slot] = info["digest"][:16]
        st[b + TRIAL] = NONE
        if st[b + TEST] == slot:
            st[b + TEST] = NONE
        st[b + FLOOR] = max(st[b + FLOOR], info["security_counter"] or 0)
        st[b + VERSION] = struct.pack("<BBHI", *info["version"])

    def confirm(self, slot, info):
        # Keep the image in `slot` (info: its verified info) from now on and raise the floor
        # to its security counter. Returns False when it already was the confirmed image.
        # In a pair trial (mark_pair) the first half to confirm only records that it did;
        # the second writes both halves' confirms in one record.
        st = self.state
        b = self.b
        d = info["digest"][:16]
        if st[b + ACTIVE] == slot and st[b + OK0 + slot] == d and st[b + TRIAL] == NONE and st[b + TEST] != slot:
            return False
        if st[FLAGS] & PAIR and st[b + TRIAL] == slot:
            mine, other = (PAIR_APP_OK, PAIR_S1_OK) if b == 0 else (PAIR_S1_OK, PAIR_APP_OK)
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
            p._keep(ps, pinfo)
            st[FLAGS] = 0
        self._keep(slot, info)
        self.save(st)
        return True


def stage1(app, slot0, slot1):
    # Stage 1's pair (kind updater) on a board with stage-1 slots: app is the app's Slots,
    # made with images=2; the two share its state record, store, trust state, policy and
    # verify buffer (one decision, one write: decide_all).
    return Slots(slot0, slot1, None, None, kind=KIND_UPDATER, share=app)


def decide_all(app, s1):
    # The boot decision for both pairs (app, stage1(app, ...)), with one state record
    # written at most. Each pair decides as Slots.decide does; a pair mark (PAIR) starts
    # both test boots or neither, and a reset in a pair trial reverts both, even a half
    # that confirmed. Stage 1's pair is also fresh (its newest valid image confirmed) at the
    # first boot after the v1 -> v2 migration: a board given stage-1 slots by a firmware
    # update. Returns ((slot, info, trial) of the app, the same for stage 1).
    st = app.state
    b = IMAGE1
    if st[FLAGS] & PAIR:
        if st[TRIAL] != NONE or st[b + TRIAL] != NONE:
            # A pair trial reset before both halves confirmed: both revert.
            st[TRIAL] = st[b + TRIAL] = NONE
            t0 = t1 = None
        else:
            m0 = st[TEST] != NONE
            m1 = st[b + TEST] != NONE
            t0, _ = app._plan()
            t1, _ = s1._plan()
            if (m0 and not t0) or (m1 and not t1):
                # Half of the pair does not verify: neither starts.
                st[TRIAL] = st[b + TRIAL] = NONE
                t0 = t1 = None
        st[FLAGS] = PAIR if t0 and t1 else 0
        changed = True
    else:
        t0, c0 = app._plan()
        t1, c1 = s1._plan()
        changed = c0 or c1
    fresh = not app.store.found
    out = []
    for sl, t, f in ((s1, t1, fresh or app.store.v1), (app, t0, fresh)):
        if t:
            r = (t[0], t[1], True)
        else:
            slot, info, c = sl._choose(f)
            r = (slot, info, False)
            changed = changed or c
        sl.booted = r[:2]
        out.append(r)
    if changed:
        app.save(st)
    return out[1], out[0]


def mark_pair(app, t0, s1, t1):
    # A combined update: app slot t0 and stage-1 slot t1 (both verified by the caller) boot
    # once, together, at the next reset (one record); they confirm and revert together.
    st = app.state
    for sl, t in ((app, t0), (s1, t1)):
        st[sl.b + TEST] = t
        if st[sl.b + TRIAL] == t:
            st[sl.b + TRIAL] = NONE
    st[FLAGS] = PAIR
    app.save(st)
