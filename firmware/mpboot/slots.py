# Two image slots and the boot state: which image boots, test boots, confirm, revert and the
# anti-rollback floor (MCUboot direct-XIP-with-revert semantics; state machine: docs/BOOT.md).
#
# Images run in place from either slot; nothing is copied. A slot counts only when its exact
# bytes verify (image.verify with the trust state: the root set of the trust area, or the
# embedded keys on a board without one) and pass this device's policy: vendor and class id,
# security counter at or above the floor, its kind (an app's slots hold apps), its
# dependencies (the firmware's ABI here; stage 1's in mpboot.pairs). A slot is "confirmed"
# when the state holds the first 16 bytes of its image digest, so rewriting a slot
# un-confirms it without a state write.
#
# A board with stage-1 slots has two pairs (issue 19): mpboot.pairs (imported only by such
# boards) subclasses Slots for them (one state record, v2) and decides for both; here a
# pair's fields are found at self.b in the state record.
import struct
from micropython import const

from mpboot import image
from mpboot import trust as _trust  # (the name `trust` is Slots' argument)
from mpboot.image import ImageError
from mpboot.reader import bytes_reader
from mpboot.state import ACTIVE, FLOOR, NONE, OK0, TEST, TRIAL, VERSION, Store

# Policy error codes, after the image verifier's: E_ + the host's ImageErrorCode name, same number.
E_VENDOR_MISMATCH = const(16)  # vendor id missing or not this device's
E_CLASS_MISMATCH = const(17)  # class id missing or not this device's
E_COUNTER_BELOW_FLOOR = const(18)  # security counter below the anti-rollback floor
E_DOWNGRADE = const(19)  # version below the confirmed image's (downgrades refused)
E_WRONG_KIND = const(26)  # an image of another kind (MPBOOT_KIND: an updater in the app's slots)
_E_DEPENDENCY = const(27)  # image.E_DEPENDENCY: a DEPENDENCY TLV this board does not meet
_KIND_APP = const(1)  # an image without MPBOOT_KIND is an app
# The firmware's stage-0 ABI, what a DEPENDENCY on image 255 ("the firmware") names: it
# holds iff the major is this one and the minor at most this one (docs/FORMAT.md). Private
# consts compiled into the policy that checks them: no module RAM (mpboot/__init__.py is
# loaded by every module and kept to two names; boot.py is not loaded by the updater).
_ABI_MAJOR = const(1)
_ABI_MINOR = const(0)
_FIRMWARE = const(255)


def _ver3(v):
    # Versions compare as MCUboot does by default: major, minor, revision (not build).
    return (v[0], v[1], v[2])


def newest(tried):
    # Of two slots' verified infos (None: refused), the slot of the newer image.
    if tried[0] and tried[1] and _ver3(tried[1]["version"]) > _ver3(tried[0]["version"]):
        return 1
    return 0 if tried[0] else 1


class Slots:
    def __init__(self, slot0, slot1, state_area, keys, vendor_id=None, class_id=None,
                 downgrade=True, mapped=None, factory=None, trust=None, threshold=1,
                 image_threshold=1, kind=_KIND_APP, store=None):
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
        # store: the state store (mpboot.pairs.Store2), else a Store on state_area.
        self.areas = (slot0, slot1)
        self.kind = kind
        self.errors = [0, 0]  # why each slot was last refused (image/policy code)
        self.image = 0  # which pair: 0 the app's, 1 stage 1's (mpboot.pairs)
        self.b = 0  # where this pair's fields are in the state record
        self.store = store or Store(state_area)
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
            for d in info.get("deps", ()):
                # The firmware's ABI is checked here. A dependency on stage 1 (image 1, in an
                # app) is checked against the stage 1 that boots with it (mpboot.pairs, on a
                # board with stage-1 slots: a Pair has a peer); an app-only board has none.
                v = d[1]
                if d[0] == _FIRMWARE:
                    if v[0] != _ABI_MAJOR or v[1] > _ABI_MINOR:
                        raise ImageError(_E_DEPENDENCY)
                elif getattr(self, "peer", None) is None:
                    raise ImageError(_E_DEPENDENCY)
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

    def decide(self):
        # The boot decision (one pair; two: mpboot.pairs.decide_all). Returns (slot, info,
        # trial): the slot to run (-1: none is bootable), its verified info, and whether
        # this is its one test boot. State changes are written before the image they
        # concern runs.
        st = self.state
        if st[TRIAL] != NONE:
            # Started for its test boot and reset without a confirm: revert.
            st[TRIAL] = NONE
            self.save(st)
        elif st[TEST] != NONE:
            t = st[TEST]
            st[TEST] = NONE
            info = self.probe(t)
            if info:
                st[TRIAL] = t  # the one test boot is used up now, whatever happens next
            self.save(st)
            if info:
                return t, info, True
        a = st[ACTIVE]
        tried = [None, None]
        for s in ((a, a ^ 1) if a != NONE else (0, 1)):
            info = tried[s] = self.probe(s)
            if info and self.confirmed(s, info):
                return s, info, False
        if not self.store.found:
            # A factory-fresh state area (so no active slot: both were tried above): boot the
            # newest valid image and confirm it (a board flashed in the factory with
            # esptool/picotool before any state was written).
            best = newest(tried)
            info = tried[best]
            if info:
                self.confirm(best, info)
                return best, info, False
        return -1, None, False

    def mark_test(self, slot):
        # The image in `slot` (verified by the caller) boots once at the next reset.
        st = self.state
        b = self.b
        if st[b + TEST] != slot or st[b + TRIAL] == slot:
            st[b + TEST] = slot
            if st[b + TRIAL] == slot:
                st[b + TRIAL] = NONE  # an earlier test boot of that slot that never ran its app
            self.save(st)

    def keep(self, slot, info):
        # confirm()'s state change, in RAM (mpboot.pairs writes two in one record).
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
        st = self.state
        b = self.b
        d = info["digest"][:16]
        if st[b + ACTIVE] == slot and st[b + OK0 + slot] == d and st[b + TRIAL] == NONE and st[b + TEST] != slot:
            return False
        self.keep(slot, info)
        self.save(st)
        return True

