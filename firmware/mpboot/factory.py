# Factory state: the board's identity (serial, vendor and class id, labels), its production
# policy (no-downgrade, test-boot, no-repl) and whether it is sealed (docs/FACTORY.md).
#
# One 272-byte record in its own two-sector area, written with the boot state's power-safe
# log (mpboot.state.Log): every change appends one whole record, a cut at any byte of it
# leaves the previous one in force, and a write that changes nothing appends nothing. Sealing
# is one append: a board is sealed or not, never half. This module is what the boot needs
# (load the record, apply its policy) and the record write; the provisioning commands that
# validate and make changes (identity, policy, seal) are in mpboot.smp.factory_mgmt, loaded
# only when one is asked for.
import struct
from micropython import const

from mpboot.state import Log

_MAGIC = const(0x4642504D)  # "MPBF"
_SIZE = const(272)  # record size before rounding up to the write unit (CRC-32 last)
# magic seq flags serial_len labels_len serial vendor_id class_id labels
_FMT = "<IIBBH32s16s16s192s"
SERIAL_MAX = const(32)
LABELS_MAX = const(192)  # canonical CBOR bytes of the labels map

# Record flags
SEALED = const(1)
NO_DOWNGRADE = const(2)
TEST_BOOT = const(4)
NO_REPL = const(8)
IDENTITY = const(16)  # an identity was written (serial)
VENDOR_ID = const(32)  # the identity sets a vendor id
CLASS_ID = const(64)  # the identity sets a class id

# FactoryError codes (the group-64 rc of docs/FACTORY.md section 2)
E_SEALED = const(1)
E_NO_IDENTITY = const(2)
E_SERIAL_MISMATCH = const(3)
E_INVALID = const(4)
E_FIXED_BY_BUILD = const(5)
E_NO_FACTORY_AREA = const(6)
E_FLASH = const(7)
E_TEST_BOOT_REQUIRED = const(8)

_ZERO16 = bytes(16)


class FactoryError(Exception):
    # raise FactoryError(code): e.args[0] is the code.
    pass


class Factory(Log):
    def __init__(self, area):
        # area: an mpboot.flash.Area of exactly two erase sectors (the factory area).
        Log.__init__(self, area, _MAGIC, _SIZE, "factory area")
        self.load()

    def load(self):
        # The newest record into flags, serial, vendor_id, class_id, labels (a blank area: none
        # of them).
        if self.find():
            f = struct.unpack_from(_FMT, self.buf, 0)
            flags = f[2]
            n = min(f[3], SERIAL_MAX)  # bounded: never trust a length, even under a CRC
            m = min(f[4], LABELS_MAX)
            if not n:
                flags &= ~IDENTITY  # (a sealed flag stays: fail closed)
            self.flags = flags
            self.serial = f[5][:n] if flags & IDENTITY else b""
            self.vendor_id = f[6]
            self.class_id = f[7]
            self.labels = f[8][:m]
        else:
            self.flags = 0
            self.serial = b""
            self.vendor_id = self.class_id = _ZERO16
            self.labels = b""

    def apply(self, slots):
        # The effective policy: the build's (slots.build) tightened by the record.
        v, c, d = slots.build
        f = self.flags
        slots.vendor_id = self.vendor_id if f & VENDOR_ID else v
        slots.class_id = self.class_id if f & CLASS_ID else c
        slots.downgrade = d and not f & NO_DOWNGRADE
        slots.test_boot = bool(f & TEST_BOOT)
        slots.no_repl = bool(f & NO_REPL)

    def serial_text(self):
        # The serial (str), or None before an identity was written.
        return self.serial.decode() if self.flags & IDENTITY else None

    def sealed(self):
        return bool(self.flags & SEALED)

    def write(self, flags, serial, vendor_id, class_id, labels):
        # Appends the record (serial, labels: bytes within the limits; vendor_id, class_id: 16
        # bytes or None) unless it equals the current one (no wear for a re-run). Returns True
        # if it appended; a failed flash write raises FactoryError(E_FLASH), RAM as flash is.
        vendor_id = vendor_id or _ZERO16
        class_id = class_id or _ZERO16
        if (flags == self.flags and serial == self.serial and vendor_id == self.vendor_id
                and class_id == self.class_id and labels == self.labels):
            return False
        buf = self.begin()
        struct.pack_into(_FMT, buf, 0, _MAGIC, 0, flags, len(serial), len(labels), serial,
                         vendor_id, class_id, labels)
        try:
            self.append()
        except Exception as e:
            self.load()  # RAM as flash is
            if isinstance(e, OSError):
                raise FactoryError(E_FLASH)
            raise
        self.flags = flags
        self.serial = serial
        self.vendor_id = vendor_id
        self.class_id = class_id
        self.labels = labels
        return True
