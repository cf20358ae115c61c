# SMP group 64 commands 1-5: factory info (read), identity, floor, policy and seal (writes),
# each answered with the factory info map F (docs/FACTORY.md section 2). Loaded by
# mpboot.smp.mpboot_mgmt on the first such request. Errors: v2 {"err": {"group": 64, "rc": R}},
# v1 {"rc": MGMT_ERR, "rsn": "factory:R"} (R: mpboot.factory E_*); a missing or mistyped
# field is EINVAL (no group rc).
import sys
from micropython import const

import mpboot
from mpboot.factory import (
    CLASS_ID,
    E_FIXED_BY_BUILD,
    E_FLASH,
    E_INVALID,
    E_NO_FACTORY_AREA,
    E_NO_IDENTITY,
    E_SEALED,
    E_SERIAL_MISMATCH,
    IDENTITY,
    LABELS_MAX,
    NO_DOWNGRADE,
    NO_REPL,
    SEALED,
    SERIAL_MAX,
    TEST_BOOT,
    VENDOR_ID,
    FactoryError,
)
from mpboot.cbor import Encoder
from mpboot.smp.identity import bytes_or_null, ids, serial
from mpboot.state import FLOOR

_CMD_FACTORY_INFO = const(1)  # (a read; the others are writes)
_CMD_IDENTITY = const(2)
_CMD_FLOOR = const(3)
_CMD_POLICY = const(4)
_CMD_SEAL = const(5)

_EUNKNOWN = const(1)
_EINVAL = const(3)
_U32 = const(0x100000000)
_LABELS_N = const(8)  # at most 8 labels, keys 1-16 bytes, values 0-64 bytes
_KEY_MAX = const(16)
_VALUE_MAX = const(64)
_POLICY = const(14)  # NO_DOWNGRADE | TEST_BOOT | NO_REPL
_ROOT_VERSION = const(0)  # trust state indices: mpboot.trust ROOT_VERSION, REVOCATION (private
_REVOCATION = const(4)  # consts, no dict entries: the service heap is tight)

# v1 MGMT_ERR per factory code 1-8 (index 0 unused): 11 EACCESSDENIED, 6 EBADSTATE,
# 3 EINVAL, 8 ENOTSUP, 1 EUNKNOWN.
_V1_RC = b"\x01\x0b\x06\x06\x03\x0b\x08\x01\x0b"


def error(code):
    # The handler-contract error of a factory code.
    return (_V1_RC[code] if 0 < code < len(_V1_RC) else _EUNKNOWN, code, "factory:%d" % code)


def handle(srv, cmd, req, enc):
    # cmd 1 (read) to 5 (writes); the op is checked by the caller.
    sl = srv.slots
    f = sl.factory
    if f is None:
        return error(E_NO_FACTORY_AREA)
    try:
        if cmd == _CMD_IDENTITY:
            s = req.get("serial")
            vendor_id = req.get("vid")
            class_id = req.get("cid")
            labels = req.get("labels")
            if (type(s) is not str or not _bstr(vendor_id) or not _bstr(class_id)
                    or (labels is not None and type(labels) is not dict)):
                return (_EINVAL, 0, None)
            b = sl.build
            set_identity(f, s, vendor_id, class_id, labels, b[0], b[1])
        elif cmd == _CMD_FLOOR:
            ctr = req.get("ctr")
            if type(ctr) is not int:
                return (_EINVAL, 0, None)
            _unsealed(f)
            if ctr < 0 or ctr >= _U32:
                raise FactoryError(E_INVALID)
            st = sl.state
            if ctr > st[FLOOR]:
                st[FLOOR] = ctr  # it never goes down
                try:
                    sl.save(st)  # (on failure the state is re-read: RAM as flash is)
                except OSError:
                    raise FactoryError(E_FLASH)
        elif cmd == _CMD_POLICY:
            nd = req.get("no-downgrade")
            tb = req.get("test-boot")
            nr = req.get("no-repl")
            if type(nd) is not bool or type(tb) is not bool or type(nr) is not bool:
                return (_EINVAL, 0, None)
            set_policy(f, nd, tb, nr)
        elif cmd == _CMD_SEAL:
            s = req.get("serial")
            if type(s) is not str:
                return (_EINVAL, 0, None)
            seal(f, s)
    except FactoryError as e:
        return error(e.args[0])
    finally:
        if cmd != _CMD_FACTORY_INFO:
            # The ids and the floor decide which images pass: look at the slots again.
            f.apply(sl)
            srv.forget()
    _info(srv, f, enc)
    return None


def _bstr(v):
    return v is None or type(v) is memoryview


# The writes, on mpboot.factory.Factory f: validated (E_INVALID outside the limits; wrong
# types are the caller's: TypeError, EINVAL), refused on a sealed board (E_SEALED), and
# appended only when they change the record.


def _unsealed(f):
    if f.flags & SEALED:
        raise FactoryError(E_SEALED)


def _serial(s):
    # A serial (str) as bytes: 1-32 bytes of 0x21-0x7e.
    b = s.encode()
    if not 0 < len(b) <= SERIAL_MAX:
        raise FactoryError(E_INVALID)
    for c in b:
        if c < 0x21 or c > 0x7E:
            raise FactoryError(E_INVALID)
    return b


def _id(v):
    # A vendor or class id (a bstr or None) as 16 bytes or None.
    if v is None:
        return None
    if len(v) != 16:
        raise FactoryError(E_INVALID)
    return bytes(v)


def _labels(d):
    # A labels map ({text: text} or None) as its canonical CBOR encoding (b"" for none).
    if not d:
        return b""
    n = len(d)
    if n > _LABELS_N:
        raise FactoryError(E_INVALID)
    items = []
    for k, v in d.items():
        if type(k) is not str or type(v) is not str:
            raise TypeError
        kb = k.encode()
        vb = v.encode()
        if not 0 < len(kb) <= _KEY_MAX or len(vb) > _VALUE_MAX:
            raise FactoryError(E_INVALID)
        items.append((len(kb), kb, vb))
    # Canonical (RFC 8949 4.2.1): keys in bytewise order of their encoding. Keys of at most 16
    # bytes have a one-byte head (0x60 + length): shorter first, then bytewise.
    items.sort()
    enc = Encoder(bytearray(LABELS_MAX))
    try:
        enc.map(n)
        for _, kb, vb in items:
            enc.text(kb)
            enc.text(vb)
    except OverflowError:
        raise FactoryError(E_INVALID)
    return bytes(enc.mv[: enc.n])


def set_identity(f, serial, vendor_id, class_id, labels, build_vendor_id, build_class_id):
    # Replaces the whole identity: serial (str), vendor_id, class_id (16-byte bstr or None:
    # none, the build's apply), labels ({text: text} or None). build_vendor_id/build_class_id:
    # the ids the build fixed (None: free); another one is E_FIXED_BY_BUILD.
    _unsealed(f)
    s = _serial(serial)
    vendor_id = _id(vendor_id)
    class_id = _id(class_id)
    lab = _labels(labels)
    if (vendor_id is not None and build_vendor_id is not None and vendor_id != build_vendor_id) or (
            class_id is not None and build_class_id is not None and class_id != build_class_id):
        raise FactoryError(E_FIXED_BY_BUILD)
    flags = (f.flags & _POLICY) | IDENTITY
    if vendor_id is not None:
        flags |= VENDOR_ID
    if class_id is not None:
        flags |= CLASS_ID
    return f.write(flags, s, vendor_id, class_id, lab)


def set_policy(f, no_downgrade, test_boot, no_repl):
    _unsealed(f)
    flags = f.flags & ~_POLICY
    if no_downgrade:
        flags |= NO_DOWNGRADE
    if test_boot:
        flags |= TEST_BOOT
    if no_repl:
        flags |= NO_REPL
    return f.write(flags, f.serial, f.vendor_id, f.class_id, f.labels)


def seal(f, serial):
    # serial (str): the identity's. Sealing a sealed board again with it changes nothing.
    s = serial.encode()
    if f.flags & SEALED:
        if s != f.serial:
            raise FactoryError(E_SEALED)
        return False
    if not f.flags & IDENTITY:
        raise FactoryError(E_NO_IDENTITY)
    if s != f.serial:
        raise FactoryError(E_SERIAL_MISMATCH)
    return f.write(f.flags | SEALED, f.serial, f.vendor_id, f.class_id, f.labels)


def _info(srv, f, enc):
    # F, keys in canonical order.
    sl = srv.slots
    enc.map(13)
    enc.text("fw")
    enc.text("%d.%d.%d" % sys.implementation.version[:3])
    ids(srv, enc)
    enc.text("boot")
    enc.text(mpboot.__version__)
    enc.text("keys")
    keys = sl.keys
    enc.array(len(keys))
    for k in keys:
        enc.bytes(k[0])  # the key hash (MCUboot KEYHASH)
    enc.text("labels")
    if f.labels:
        enc.raw(f.labels)  # stored as its canonical encoding
    else:
        enc.map(0)
    enc.text("policy")
    enc.map(3)
    enc.text("no-repl")
    enc.bool(sl.no_repl)
    enc.text("test-boot")
    enc.bool(sl.test_boot)
    enc.text("no-downgrade")
    enc.bool(not sl.downgrade)
    enc.text("sealed")
    enc.bool(f.flags & SEALED)
    enc.text("serial")
    serial(enc, f)
    t = sl.trust
    enc.text("revocation")
    enc.uint(t[_REVOCATION])
    enc.text("root-version")
    enc.uint(t[_ROOT_VERSION])
