# SMP group 64 (the first user group): mpboot's own commands (docs/PROTOCOL.md, provisioning:
# docs/FACTORY.md section 2). handle() follows the handler contract in mpboot.smp.server.
#
# Command 0, read: who this device is and what it accepts, for fleet tools choosing an image
# before they send one: unique id, vendor and class id (null when the device does not check
# them), the security-counter floor, whether downgrades are refused, the serial, the trust
# state's root set version and revocation number, the highest channel number taken, and the
# outcome of the last device pull of this boot (mpboot.pull).
# Commands 1-5 (factory info, identity, floor, policy, seal) are in mpboot.smp.factory_mgmt,
# command 6 (trust state and records) in mpboot.smp.trust_mgmt, command 7 (a compressed upload
# chunk) in mpboot.smp.zupload, command 8 (a probe chunk, stage 1's proof; boards with stage-1
# slots) in mpboot.smp.probe, each loaded on its first use: a board in the field never pays
# for the factory's, one that never gets a record for the trust's.
from micropython import const

from mpboot.smp.identity import ids, serial
from mpboot.smp.img_mgmt import zwbits

_OP_READ = const(0)
_CMD_DEVICE_INFO = const(0)
_CMD_FACTORY_INFO = const(1)  # the factory commands' read; 2-5 are writes (factory_mgmt)
_CMD_SEAL = const(5)  # the last factory command
_CMD_TRUST = const(6)  # read: the trust state; write: a trust record, in chunks (trust_mgmt)
_CMD_ZUPLOAD = const(7)  # write: a compressed upload chunk (zupload)
_CMD_PROBE = const(8)  # write: a probe chunk (mpboot.smp.probe), on boards with stage-1 slots

_ENOTSUP = const(8)
# Trust state indices (mpboot.trust ROOT_VERSION, REVOCATION), as private consts: importing the
# public names costs this always-loaded module's dict RAM (the service heap is tight).
_ROOT_VERSION = const(0)
_REVOCATION = const(4)
_FLOOR = const(5)  # mpboot.state.FLOOR (a pair's fields start at its .b)


def handle(srv, op, cmd, req, enc):
    if cmd == _CMD_DEVICE_INFO:
        if op != _OP_READ:
            return (_ENOTSUP, 0, None)
        _device_info(srv, enc)
        return None
    if cmd == _CMD_TRUST:
        from mpboot.smp import trust_mgmt

        return trust_mgmt.handle(srv, op, req, enc)
    if cmd == _CMD_ZUPLOAD:
        if not zwbits():
            return (_ENOTSUP, 0, None)  # no deflate module in this firmware: none offered
        from mpboot.smp import zupload

        return zupload.handle(srv, op, req, enc)
    if cmd == _CMD_PROBE:
        if srv.s1 is None:
            return (_ENOTSUP, 0, None)
        from mpboot.smp import probe

        return probe.handle(srv, op, req, enc)
    if cmd > _CMD_SEAL or (op == _OP_READ) != (cmd == _CMD_FACTORY_INFO):
        return (_ENOTSUP, 0, None)
    from mpboot.smp import factory_mgmt

    return factory_mgmt.handle(srv, cmd, req, enc)


def _device_info(srv, enc):
    sl = srv.slots
    f = sl.factory
    t = sl.trust
    s1 = srv.s1
    ts = sl.trust_store
    c = int.from_bytes(ts.tail()[:4], "little") if ts else 0  # the highest channel number taken
    # The last pull of this boot (mpboot.puller.last), read only if the app imported the
    # puller: answering must not load it.
    import sys

    p = sys.modules.get("mpboot.puller")
    p = p and getattr(p, "last", None)
    # Canonical key order (bytewise order of the encoded keys). With stage-1 slots also "s1",
    # the version of the stage 1 serving (null: the rescue), and "ctr1", stage 1's floor. Once a
    # channel record was taken "chan", the highest channel number (mpboot.channel); after a
    # pull in this boot "pull": [ok, code, detail, number] (mpboot.puller.last).
    enc.map((9 if s1 is None else 11) + (c > 0) + (p is not None))
    if s1 is not None:
        enc.text("s1")
        r = srv.ups[1].running
        info = srv.image(2 + r) if r >= 0 else None
        if info is None:
            enc.null()
        else:
            v = info["version"]
            enc.text("%d.%d.%d+%d" % (v[0], v[1], v[2], v[3]))
    ids(srv, enc)
    if c:
        enc.text("chan")
        enc.uint(c)
    if s1 is not None:
        enc.text("ctr1")
        enc.uint(s1.state[s1.b + _FLOOR])
    if p:
        enc.text("pull")
        enc.array(4)
        enc.bool(p[0])
        for v in p[1:]:
            enc.int(v)
    enc.text("serial")
    serial(enc, f)
    enc.text("deflate")
    enc.uint(zwbits())
    enc.text("revocation")
    enc.uint(t[_REVOCATION])
    enc.text("no-downgrade")
    enc.bool(not sl.downgrade)
    enc.text("root-version")
    enc.uint(t[_ROOT_VERSION])

