# SMP group 64 (the first user group): mpboot's own commands (docs/PROTOCOL.md).
# Command 0, read: who this device is and what it accepts, for fleet tools choosing an image
# before they send one: unique id, vendor and class id (null when the device does not check
# them), the security-counter floor, and whether downgrades are refused
# (no-downgrade, as in bootloader info's mode query).
# handle() follows the handler contract in mpboot.smp.server.
from micropython import const

from mpboot.state import FLOOR

_ENOTSUP = const(8)


def handle(srv, op, cmd, req, enc):
    if cmd != 0 or op != 0:
        return (_ENOTSUP, 0, None)
    sl = srv.slots
    # Canonical key order (bytewise order of the encoded keys): cid, ctr, uid, vid, no-downgrade.
    enc.map(5)
    enc.text("cid")
    _bytes_or_null(enc, sl.class_id)
    enc.text("ctr")
    enc.uint(sl.state[FLOOR])
    enc.text("uid")
    enc.bytes(srv.port.unique_id())
    enc.text("vid")
    _bytes_or_null(enc, sl.vendor_id)
    enc.text("no-downgrade")
    enc.bool(not sl.downgrade)
    return None


def _bytes_or_null(enc, b):
    if b is None:
        enc.null()
    else:
        enc.bytes(b)
