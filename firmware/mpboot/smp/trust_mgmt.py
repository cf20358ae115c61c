# SMP group 64 command 6: the trust state (read) and trust records (write, in chunks), docs/KEYS.md
# section 5 and docs/PROTOCOL.md. Loaded by mpboot.smp.mpboot_mgmt on the first such request, and
# mpboot.records (the record checks) only when a record's last byte arrives: a board that never
# gets a record never pays for either.
#
# Read: {"roots": [keyhash...], "threshold", "revocation", "revoked-keys": [keyhash...],
# "root-version", "image-threshold", "revoked-serials": [serial...]} (canonical key order).
#
# Write: {"off": uint, "data": bstr, "len": uint (at off 0)}. Off 0 starts a record of `len`
# bytes (at most _MAX_RECORD: TOO_LARGE), replacing one being received, and allocates its
# buffer; each later chunk must start at the next expected byte (CHUNK). Answered {"off": next}
# until the last byte arrives; then the record is applied (records.apply, then
# Slots.set_trust: FLASH when the trust area cannot be written and keeps the old state) and
# the answer is {"off": len, "revocation": n, "root-version": v}. Any error ends the record (its buffer is
# freed; the client starts again at off 0) and leaves the trust state as it was.
#
# Errors: v2 {"err": {"group": 64, "rc": R}}, v1 {"rc": MGMT_ERR, "rsn": "trust:R"} (R: the
# codes below and mpboot.records E_*); a missing or mistyped field is EINVAL (no group rc).
from micropython import const

# The trust state's indices (mpboot.trust, same names), as private consts: no dict entries.
_ROOT_VERSION = const(0)
_THRESHOLD = const(1)
_IMAGE_THRESHOLD = const(2)
_ROOTS = const(3)
_REVOCATION = const(4)
_REVOKED_KEYS = const(5)
_REVOKED_SERIALS = const(6)

_OP_READ = const(0)
_EUNKNOWN = const(1)
_EINVAL = const(3)
_MAX_RECORD = const(4096)  # = mpboot.records.MAX_RECORD (not imported: records loads late)

# Trust codes this module raises (the record checks' own, 17-21 and 23, are mpboot.records E_*;
# host mpboot.errors.TrustErrorCode, same names and numbers).
E_NO_TRUST_AREA = const(16)  # the board has no trust area
E_FLASH = const(22)  # the trust area write failed (the old state stays)
E_TOO_LARGE = const(23)  # `len` over _MAX_RECORD, or data past `len`
E_CHUNK = const(24)  # a chunk offset other than the next expected byte

# v1 MGMT_ERR per trust code 16-24: 8 ENOTSUP, 3 EINVAL, 11 EACCESSDENIED, 6 EBADSTATE,
# 1 EUNKNOWN.
_E_FIRST = const(16)
_V1_RC = b"\x08\x03\x0b\x0b\x06\x0b\x01\x03\x03"


def error(code):
    # The handler-contract error of a trust code.
    i = code - _E_FIRST
    return (_V1_RC[i] if 0 <= i < len(_V1_RC) else _EUNKNOWN, code, "trust:%d" % code)


def handle(srv, op, req, enc):
    # The handler contract of mpboot.smp.server (the command is 6: checked by the caller).
    if op == _OP_READ:
        _state(srv.slots.trust, enc)
        return None
    # The record being received, taken: any error below ends it (its buffer goes with it).
    rx = srv.record
    srv.record = None
    sl = srv.slots
    if sl.trust_store is None:
        return error(E_NO_TRUST_AREA)
    off = req.get("off")
    data = req.get("data")  # (absent: no bytes)
    if type(off) is not int or off < 0 or (data is not None and type(data) is not memoryview):
        return (_EINVAL, 0, None)
    if off == 0:
        n = req.get("len")
        if type(n) is not int or n < 0:
            return (_EINVAL, 0, None)
        if n > _MAX_RECORD:
            return error(E_TOO_LARGE)
        rx = None  # (freed before the new buffer is allocated)
        rx = [bytearray(n), 0]  # [buffer, next expected offset]
    elif rx is None or off != rx[1]:
        return error(E_CHUNK)
    buf = rx[0]
    end = off + (0 if data is None else len(data))
    if end > len(buf):
        return error(E_TOO_LARGE)
    if data is not None:
        buf[off:end] = data
    if end < len(buf):
        rx[1] = end
        srv.record = rx
        enc.map(1)
        enc.text("off")
        enc.uint(end)
        return None
    rx = None
    from mpboot import records

    try:
        new = records.apply(sl.trust, buf)
    except records.TrustError as e:
        return error(e.args[0])
    buf = None
    try:
        sl.set_trust(new)
    except OSError:
        # Slots.trust is now what flash holds: the old state (FLASH), or the new one when its
        # first copy was whole before the failure (the record was taken: answered as such).
        t = sl.trust
        if t[_ROOT_VERSION] != new[_ROOT_VERSION] or t[_REVOCATION] != new[_REVOCATION]:
            return error(E_FLASH)
    srv.forget()  # the slots' verdicts may change with the roots and what is revoked
    enc.map(3)
    enc.text("off")
    enc.uint(end)
    enc.text("revocation")
    enc.uint(new[_REVOCATION])
    enc.text("root-version")
    enc.uint(new[_ROOT_VERSION])
    return None


def _hashes(enc, items):
    enc.array(len(items))
    for h in items:
        enc.bytes(h)


def _state(t, enc):
    # The trust state t (mpboot.trust indices), keys in canonical order.
    enc.map(7)
    enc.text("roots")
    roots = t[_ROOTS]
    enc.array(len(roots))
    for k in roots:
        enc.bytes(k[0])  # the key hash
    enc.text("threshold")
    enc.uint(t[_THRESHOLD])
    enc.text("revocation")
    enc.uint(t[_REVOCATION])
    enc.text("revoked-keys")
    _hashes(enc, t[_REVOKED_KEYS])
    enc.text("root-version")
    enc.uint(t[_ROOT_VERSION])
    enc.text("image-threshold")
    enc.uint(t[_IMAGE_THRESHOLD])
    enc.text("revoked-serials")
    serials = t[_REVOKED_SERIALS]
    enc.array(len(serials))
    for s in serials:
        enc.uint(s)
