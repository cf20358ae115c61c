# SMP image management group (1): state read/write, upload, erase, slot info
# (docs/PROTOCOL.md). handle() follows the handler contract in mpboot.smp.server.
from micropython import const

import mpboot
from mpboot import image
from mpboot.image import ImageError
from mpboot.slots import E_DOWNGRADE
from mpboot.smp.identity import serial
from mpboot.state import ACTIVE, NONE, TEST, TRIAL
from mpboot.update import MARK_NONE, U_LENGTH, UpdateError

_OP_READ = const(0)
_OP_WRITE = const(2)
_CMD_STATE = const(0)
_CMD_UPLOAD = const(1)
_CMD_ERASE = const(5)
_CMD_SLOT_INFO = const(6)

# MGMT_ERR
_EUNKNOWN = const(1)
_EINVAL = const(3)
_ENOENT = const(5)
_ENOTSUP = const(8)
_EACCESSDENIED = const(11)
# IMG_MGMT_ERR (SMP v2)
_NO_IMAGE = const(3)
_HASH_NOT_FOUND = const(8)
_FLASH_WRITE_FAILED = const(12)
_INVALID_SLOT = const(14)
_INVALID_LENGTH = const(21)
_INVALID_HASH = const(24)
_TOO_LARGE = const(30)
_TEST_TO_ACTIVE_DENIED = const(33)
_F_NON_BOOTABLE = const(0x10)

# v1 MGMT_ERR and v2 IMG_MGMT_ERR of the mpboot image/policy codes (mpboot.image, slots):
# 1 magic 23, 2 header 22, 3 size 30, 4 truncated 22, 5-7 TLV area 5, 8 no hash 5, 9 two
# hashes 6, 10 hash mismatch 24, 11-15 signature/key 1, 16-17 vendor/class 22, 18-19
# counter/downgrade 27.
_IMG_RC = b"\x01\x17\x16\x1e\x16\x05\x05\x05\x05\x06\x18\x01\x01\x01\x01\x01\x16\x16\x1b\x1b"
# mpboot update codes (mpboot.update) 1-4: (v1 rc, v2 rc; 0 = the generic v1 rc in v2 too).
_UPD_RC = b"\x01\x00\x0a\x00\x06\x00\x03\x1f\x03\x15"


def handle(srv, op, cmd, req, enc):
    try:
        if cmd == _CMD_STATE:
            if op == _OP_WRITE:
                err = _state_write(srv, req)
                if err:
                    return err
            _images(srv, enc, op == _OP_READ and req.get("identity") is True)
            return None
        if op == _OP_WRITE and cmd == _CMD_UPLOAD:
            return _upload(srv, req, enc)
        if op == _OP_WRITE and cmd == _CMD_ERASE:
            return _erase(srv, req, enc)
        if op == _OP_READ and cmd == _CMD_SLOT_INFO:
            return _slot_info(srv, enc)
        return (_ENOTSUP, 0, None)
    except ImageError as e:
        c = e.args[0]
        return (_EINVAL, _IMG_RC[c] if 0 <= c < len(_IMG_RC) else 1, "image:%d" % c)
    except UpdateError as e:
        c = e.args[0]
        if not 0 < c < 5:
            c = 0
        return (_UPD_RC[2 * c], _UPD_RC[2 * c + 1], "update:%d" % c)
    except OSError:
        return (_EUNKNOWN, _FLASH_WRITE_FAILED, None)  # a flash error (it ends any upload)


def version(v):
    # "major.minor.revision", ".build" appended when non-zero (as Zephyr's img_mgmt).
    s = "%d.%d.%d" % (v[0], v[1], v[2])
    return s + ".%d" % v[3] if v[3] else s


def _images(srv, enc, identity=False):
    # identity (an mpboot extension of the read: {"identity": true}): the board's unique id
    # and serial too. Keys in canonical order: uid, images, serial.
    sl = srv.slots
    st = sl.state
    run = srv.running
    infos = (srv.image(0), srv.image(1))
    if identity:
        enc.map(3)
        enc.text("uid")
        enc.bytes(srv.port.unique_id())
    else:
        enc.map(1)
    enc.text("images")
    enc.array((infos[0] is not None) + (infos[1] is not None))
    for s in (0, 1):
        info = infos[s]
        if info is None:
            continue
        # confirmed: the confirmed image (kept across resets). pending: boots next (marked
        # for a test boot, or confirmed and not running yet). permanent: pending, no revert.
        ok = st[ACTIVE] == s and sl.confirmed(s, info)
        pending = st[TEST] == s or (ok and s != run)
        enc.map(9)
        enc.text("hash")
        enc.bytes(info["digest"])
        enc.text("slot")
        enc.uint(s)
        enc.text("image")
        enc.uint(0)
        enc.text("active")
        enc.bool(s == run)
        enc.text("pending")
        enc.bool(pending)
        enc.text("version")
        enc.text(version(info["version"]))
        enc.text("bootable")
        enc.bool(not info["flags"] & _F_NON_BOOTABLE)
        enc.text("confirmed")
        enc.bool(ok)
        enc.text("permanent")
        enc.bool(pending and ok)
    if identity:
        enc.text("serial")
        serial(enc, sl.factory)


def _state_write(srv, req):
    # Which slot a write acts on (docs/PROTOCOL.md, image state write): both slots hold the
    # same image after a flash of the image that runs, so the running copy is considered
    # first. A confirm by its hash confirms it (as Zephyr); a test mark by its hash is a no-op
    # success while it is the confirmed image or on its test boot, and otherwise goes to the
    # other copy if there is one (else TEST_TO_ACTIVE_DENIED). A write acts on one slot at
    # most, and the reply (the image list) shows the state it left.
    h = req.get("hash")
    confirm = req.get("confirm", False)
    if type(confirm) is not bool or (h is not None and type(h) is not memoryview):
        return (_EINVAL, 0, None)
    sl = srv.slots
    run = srv.running
    if h is None:
        if not confirm:
            return (_EINVAL, 0, None)
        if run < 0:
            return (_ENOENT, _NO_IMAGE, None)
        srv.forget()
        return _confirm_running(srv)
    h = bytes(h)
    mine = run >= 0 and _holds(srv, run, h)
    s = -1  # a slot not running that holds the image (recovery: the lower one)
    for i in ((run ^ 1,) if run >= 0 else (0, 1)):
        if _holds(srv, i, h):
            s = i
            break
    if mine:
        if confirm:
            srv.forget()
            return _confirm_running(srv)
        st = sl.state
        if st[TRIAL] == run or (st[ACTIVE] == run and sl.confirmed(run, srv.image(run))):
            return None  # it runs confirmed, or on its test boot already: nothing to mark
        if s < 0:
            # A fallback (or replaced by a permanent install since it booted), no other copy:
            # a running image cannot be marked for a test boot (Zephyr's refusal).
            return (_EINVAL, _TEST_TO_ACTIVE_DENIED, None)
    elif s < 0:
        return (_ENOENT, _HASH_NOT_FOUND, None)
    srv.forget()
    if confirm and sl.test_boot:
        # Factory test-boot policy: an image becomes the confirmed one only through its test
        # boot, never made permanent from the other slot.
        return (_EACCESSDENIED, 0, "factory:8")
    info = srv.image(s)
    sl.policy(info, True)  # as for an update: the floor, and no downgrade if so configured
    if confirm:
        sl.confirm(s, info)  # permanent: boots next, no test boot
    else:
        sl.mark_test(s)
    return None


def _holds(srv, slot, h):
    # The image in `slot` verifies, passes the policy and has the digest h.
    info = srv.image(slot)
    return info is not None and info["digest"] == h


def _confirm_running(srv):
    # As mpboot.confirm() in the running app (mpboot.boot.confirm): keeps the running image
    # if it is on its test boot or a fallback, unless an image made permanent since waits.
    sl = srv.slots
    run = srv.running
    b = mpboot._booted
    if b is not None:
        # mpboot.boot set the record, so importing its field names loads nothing.
        from mpboot.boot import BOOTED_SLOT, BOOTED_SLOTS

        if b[BOOTED_SLOTS] is sl and b[BOOTED_SLOT] == run:
            mpboot.confirm()
            return None
    st = sl.state
    a = st[ACTIVE]
    info = srv.image(run)
    if info is None:
        return (_ENOENT, _NO_IMAGE, None)  # it no longer verifies
    if st[TRIAL] == run:
        sl.confirm(run, info)
    elif a != run:
        o = srv.image(a) if a != NONE else None
        if o is None or not sl.confirmed(a, o):
            sl.confirm(run, info)
    return None


def _upload(srv, req, enc):
    off = req.get("off")
    data = req.get("data")
    if type(off) is not int or off < 0 or type(data) is not memoryview:
        return (_EINVAL, 0, None)
    up = srv.up
    if off == 0:
        if req.get("image", 0) != 0:
            return (_EINVAL, 0, None)
        total = req.get("len")
        if type(total) is not int or total < 0:
            return (_EINVAL, _INVALID_LENGTH, None)
        sha = req.get("sha")
        if sha is not None:
            if type(sha) is not memoryview or len(sha) != 32:
                return (_EINVAL, _INVALID_HASH, None)
            sha = bytes(sha)
            if up.total >= 0 and up.sha == sha and up.total == total:
                return _off(enc, up.pos, False)  # the open session: continue it
            d = srv.done
            if up.total < 0 and d is not None and d[0] == sha and d[1] == total:
                return _off(enc, total, True)  # finished and verified already (reply lost)
        ptlv = req.get("ptlv")
        if ptlv is not None and type(ptlv) is not memoryview:
            return (_EINVAL, 0, None)
        slot = up.target()
        if req.get("upgrade") is True:
            _upgrade(srv, data, slot)
        srv.forget(slot)
        try:
            nxt = up.begin(total, data, ptlv, sha)
        except UpdateError as e:
            if e.args[0] == U_LENGTH and total > srv.slots.areas[slot].size:
                return (_EINVAL, _TOO_LARGE, "update:4")
            raise
        if not nxt:
            nxt = up.write(0, data)
    else:
        d = srv.done
        if up.total < 0 and d is not None and off + len(data) == d[1]:
            return _off(enc, d[1], False)  # the last chunk again: its reply was lost
        nxt = up.write(off, data)
        srv.forget(up.slot)
    if up.total >= 0 and nxt == up.total:
        match = up.sha is not None
        up.finish(MARK_NONE)  # verifies; the session ends either way
        srv.forget(up.slot)
        srv.done = (up.sha, nxt, up.slot)
        return _off(enc, nxt, match)
    return _off(enc, nxt, False)


def _off(enc, off, match):
    enc.map(2 if match else 1)
    enc.text("off")
    enc.uint(off)
    if match:
        enc.text("match")
        enc.bool(True)
    return None


def _upgrade(srv, data, slot):
    # `upgrade: true`: only a version (major, minor, revision) above the running one.
    if len(data) < image.HEADER_SIZE:
        raise ImageError(image.E_TRUNCATED)
    info = {}
    image.parse_header(data, srv.slots.areas[slot].size, info)
    run = srv.image(srv.running) if srv.running >= 0 else None
    if run is not None and info["version"][:3] <= run["version"][:3]:
        raise ImageError(E_DOWNGRADE)


def _erase(srv, req, enc):
    up = srv.up
    slot = req.get("slot")
    if slot is None:
        slot = up.target()
    if type(slot) is not int or slot < 0 or slot > 1:
        return (_EINVAL, _INVALID_SLOT, None)
    srv.forget(slot)
    up.erase(slot)
    enc.map(0)
    return None


def _slot_info(srv, enc):
    a = srv.slots.areas
    enc.map(1)
    enc.text("images")
    enc.array(1)
    enc.map(3)
    enc.text("image")
    enc.uint(0)
    enc.text("slots")
    enc.array(2)
    for s in (0, 1):
        enc.map(2)
        enc.text("size")
        enc.uint(a[s].size)
        enc.text("slot")
        enc.uint(s)
    enc.text("max_image_size")
    enc.uint(a[srv.up.target()].size)
    return None
