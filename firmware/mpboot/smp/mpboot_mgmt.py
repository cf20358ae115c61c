# SMP group 64 (the first user group): mpboot's own commands (docs/PROTOCOL.md, provisioning:
# docs/FACTORY.md section 2). handle() follows the handler contract in mpboot.smp.server.
#
# Command 0, read: who this device is and what it accepts, for fleet tools choosing an image
# before they send one: unique id, vendor and class id (null when the device does not check
# them), the security-counter floor, whether downgrades are refused and the serial.
# Commands 1-5 (factory info, identity, floor, policy, seal) are in mpboot.smp.factory_mgmt,
# loaded on their first use: a board in the field never pays for them.
#
# Imports: factory_mgmt imports this module at its top (ids, serial, bytes_or_null); this one
# imports factory_mgmt only inside handle(), lazily, to save the RAM. A cycle, harmless at run
# time because this module is always loaded first: keep that direction (no top-level import
# of factory_mgmt here).
from micropython import const

from mpboot.state import FLOOR

_OP_READ = const(0)
_CMD_DEVICE_INFO = const(0)
_CMD_FACTORY_INFO = const(1)  # the factory commands' read; 2-5 are writes (factory_mgmt)
_CMD_SEAL = const(5)  # the last factory command

_ENOTSUP = const(8)


def handle(srv, op, cmd, req, enc):
    if cmd == _CMD_DEVICE_INFO:
        if op != _OP_READ:
            return (_ENOTSUP, 0, None)
        _device_info(srv, enc)
        return None
    if cmd > _CMD_SEAL or (op == _OP_READ) != (cmd == _CMD_FACTORY_INFO):
        return (_ENOTSUP, 0, None)
    from mpboot.smp import factory_mgmt

    return factory_mgmt.handle(srv, cmd, req, enc)


def _device_info(srv, enc):
    sl = srv.slots
    f = sl.factory
    # Canonical key order (bytewise order of the encoded keys).
    enc.map(6)
    ids(srv, enc)
    enc.text("serial")
    serial(enc, f)
    enc.text("no-downgrade")
    enc.bool(not sl.downgrade)


def ids(srv, enc):
    # The keys device info and factory info share, in their canonical order: cid, ctr, uid, vid.
    sl = srv.slots
    enc.text("cid")
    bytes_or_null(enc, sl.class_id)
    enc.text("ctr")
    enc.uint(sl.state[FLOOR])
    enc.text("uid")
    enc.bytes(srv.port.unique_id())
    enc.text("vid")
    bytes_or_null(enc, sl.vendor_id)


def serial(enc, f):
    # The serial of factory state f (None: no factory area), or null before an identity.
    s = f.serial_text() if f is not None else None
    if s is None:
        enc.null()
    else:
        enc.text(s)


def bytes_or_null(enc, b):
    if b is None:
        enc.null()
    else:
        enc.bytes(b)
