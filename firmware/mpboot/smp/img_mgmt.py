# SMP image management group (1): state read/write, upload, erase, slot info
# (docs/PROTOCOL.md). handle() follows the handler contract in mpboot.smp.server.
#
# Replies and error codes are Zephyr 4.4.0's img_mgmt (an MCUboot direct-XIP-with-revert
# device with one updatable image): the state flags as its state read derives them, its
# IMG_MGMT_ERR_* code for each refusal. SMP v1 keeps the MGMT_ERR rc and mpboot's `rsn`.
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
# Upload `image` (docs/PROTOCOL.md, "Upload" and "Stage 1"): 0 (Zephyr: any free slot) or 1 name the
# app's free slot, 2 or 3 stage 1's (on a board with stage-1 slots): `image // 2` is the image.

# MGMT_ERR
_EUNKNOWN = const(1)
_EINVAL = const(3)
_ENOENT = const(5)
_EBADSTATE = const(6)
_ENOTSUP = const(8)
_EACCESSDENIED = const(11)
# IMG_MGMT_ERR (SMP v2)
_NO_IMAGE = const(3)
_HASH_NOT_FOUND = const(8)
_NO_FREE_SLOT = const(9)
_FLASH_WRITE_FAILED = const(12)
_FLASH_ERASE_FAILED = const(13)
_INVALID_SLOT = const(14)
_INVALID_OFFSET = const(20)
_INVALID_LENGTH = const(21)
_INVALID_HASH = const(24)
_TOO_LARGE = const(30)
_CONFIRMATION_DENIED = const(32)
_TEST_TO_ACTIVE_DENIED = const(33)
_F_NON_BOOTABLE = const(0x10)
_HASH_SIZE = const(32)
_IMAGE_FIRMWARE = const(4)  # upload `image` 4: the MicroPython firmware itself (esp32, mpboot.espota)
_ZWBITS = const(10)  # compressed uploads' window: 1 KiB (docs/PROTOCOL.md, "Compressed upload")

# v1 MGMT_ERR and v2 IMG_MGMT_ERR of the mpboot image/policy codes (mpboot.image, slots):
# 1 magic 23, 2 header 22, 3 size 30, 4 truncated 22, 5-7 TLV area 5, 8 no hash 5, 9 two
# hashes 6, 10 hash mismatch 24, 11-15 signature/key 1, 16-17 vendor/class 22, 18-19
# counter/downgrade 27, 20-25 certificates/threshold 1, 26 kind 22, 27 dependency 22; others
# (30, an esp32 firmware whose payload is not an ESP app image) 1.
_IMG_RC = b"\x01\x17\x16\x1e\x16\x05\x05\x05\x05\x06\x18\x01\x01\x01\x01\x01\x16\x16\x1b\x1b\x01\x01\x01\x01\x01\x01\x16\x16"
# mpboot update codes (mpboot.update) 0-4: (v1 rc, v2 rc). 0 (unknown) EUNKNOWN/UNKNOWN,
# 1 BUSY EBUSY/NO_FREE_SLOT (Zephyr's "slot in use"), 2 STATE EBADSTATE (generic in v2:
# an upload answers v2 without a session as Zephyr does, _upload), 3 RANGE EINVAL/DATA_OVERRUN,
# 4 LENGTH EINVAL/INVALID_LENGTH.
_UPD_RC = b"\x01\x01\x0a\x09\x06\x00\x03\x1f\x03\x15"
# Zephyr's verbose reasons (CONFIG_MCUMGR_GRP_IMG_VERBOSE_ERR), sent in v1 where no mpboot
# code applies.
_RSN_MALFORMED = "header malformed"
_RSN_NO_SLOT = "no slot"
_EMPTY = memoryview(b"")  # the `data` of an upload request without it (Zephyr: no bytes)


def handle(srv, op, cmd, req, enc):
    return guard(_dispatch, srv, op, cmd, req, enc)


def _dispatch(srv, op, cmd, req, enc):
    if cmd == _CMD_STATE:
        if op == _OP_WRITE:
            err = _state_write(srv, req)
            if err:
                return err
        _images(srv, enc, op == _OP_READ and req.get("identity") is True)
        return None
    if op == _OP_WRITE and cmd == _CMD_UPLOAD:
        return upload(srv, req, enc)
    if op == _OP_WRITE and cmd == _CMD_ERASE:
        return _erase(srv, req, enc)
    if op == _OP_READ and cmd == _CMD_SLOT_INFO:
        return _slot_info(srv, enc)
    return (_ENOTSUP, 0, None)


def guard(fn, srv, op, cmd, req, enc):
    # fn's answer, with the image, update and flash errors it raises as their SMP errors
    # (also mpboot.smp.zupload's, whose writes go through the same updater).
    try:
        return fn(srv, op, cmd, req, enc)
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


def _ver3(info):
    v = info["version"]
    return (v[0], v[1], v[2])


def _next_boot(sl, i0, i1):
    # The slot of pair sl the boot decision boots at the next reset when no test boot comes
    # first (the confirmed image: the active slot's, else the other slot's; on a
    # factory-fresh state area the newest valid image), or -1 (recovery). i0, i1: the infos.
    a = sl.state[sl.b + ACTIVE]
    for s in ((a, a ^ 1) if a != NONE else (0, 1)):
        i = i1 if s else i0
        if i is not None and sl.confirmed(s, i):
            return s
    if not sl.store.found:
        if i1 is not None and (i0 is None or _ver3(i1) > _ver3(i0)):
            return 1
        if i0 is not None:
            return 0
    return -1


def _images(srv, enc, identity=False):
    # The image list with Zephyr's flags (img_mgmt_state_read, direct XIP with revert; table
    # in docs/PROTOCOL.md). The running slot: active, and confirmed unless it runs its test
    # boot (and a reset would not boot it again). Another slot: pending and permanent when it
    # boots at the next reset and stays; pending alone when marked for its test boot;
    # confirmed when it is the image a reset reverts to (during a test boot; in recovery,
    # the one the marked test boot falls back to).
    # identity (an mpboot extension of the read: {"identity": true}): the board's unique id
    # and serial too. Keys in canonical order: uid, images, serial, splitStatus.
    # With stage-1 slots, image 1's two entries follow, by the same table (docs/PROTOCOL.md).
    infos = [srv.image(s) for s in range(len(srv.cache))]
    if identity:
        enc.map(4)
        enc.text("uid")
        enc.bytes(srv.port.unique_id())
    else:
        enc.map(2)
    enc.text("images")
    enc.array(len(infos) - infos.count(None))
    for p in range(len(srv.ups)):
        _entries(srv, enc, p, infos[2 * p], infos[2 * p + 1])
    if identity:
        enc.text("serial")
        serial(enc, srv.slots.factory)
    enc.text("splitStatus")  # always 0, as Zephyr sends it
    enc.uint(0)


def _entries(srv, enc, p, i0, i1):
    # Image p's entries (i0, i1: its slots' infos).
    sl = srv.pair(2 * p)
    st = sl.state
    b = sl.b
    run = srv.ups[p].running
    nxt = _next_boot(sl, i0, i1)
    trial = run >= 0 and st[b + TRIAL] == run
    t = st[b + TEST]
    if t == run or t == NONE or (i1 if t else i0) is None:
        t = -1  # no test boot comes at the next reset
    for s in (0, 1):
        info = i1 if s else i0
        if info is None:
            continue
        pending = permanent = False
        if s == run:
            confirmed = not trial or nxt == run
        elif trial:
            confirmed = s == nxt  # the image the reset reverts to
            pending = s == t
        elif t >= 0:
            confirmed = s == nxt and s != t  # the image the test boot reverts to
            pending = s == t
            permanent = s == t and s == nxt
        else:
            confirmed = False
            pending = permanent = s == nxt
        enc.map(9)
        enc.text("hash")
        enc.bytes(info["digest"])
        enc.text("slot")
        enc.uint(s)
        enc.text("image")
        enc.uint(p)
        enc.text("active")
        enc.bool(s == run)
        enc.text("pending")
        enc.bool(pending)
        enc.text("version")
        enc.text(version(info["version"]))
        enc.text("bootable")
        enc.bool(not info["flags"] & _F_NON_BOOTABLE)
        enc.text("confirmed")
        enc.bool(confirmed)
        enc.text("permanent")
        enc.bool(permanent)


def _state_write(srv, req):
    # Which slot a write acts on (docs/PROTOCOL.md, image state write): both slots hold the
    # same image after a flash of the image that runs, so the running copy is considered
    # first. A confirm by its hash confirms it (as Zephyr); a test mark by its hash is a no-op
    # success while it is the confirmed image or on its test boot, and otherwise goes to the
    # other copy if there is one (else TEST_TO_ACTIVE_DENIED). A write acts on one slot at
    # most, and the reply (the image list) shows the state it left.
    # With stage-1 slots the hash also names the image (kinds keep the pairs apart): stage 1
    # is marked as the app is, but confirmed only by its proven test boot (mpboot.smp.stage1).
    h = req.get("hash")
    confirm = req.get("confirm", False)
    if type(confirm) is not bool or (h is not None and type(h) is not memoryview):
        return (_EINVAL, 0, None)
    sl = srv.slots
    run = srv.running
    if h is None:
        if not confirm:
            return (_EINVAL, _INVALID_HASH, None)  # a test mark names its image
        if run < 0:
            return (_ENOENT, _NO_IMAGE, None)
        srv.forget()
        return _confirm_running(srv)
    if len(h) != _HASH_SIZE:
        return (_EINVAL, _INVALID_HASH, None)
    h = bytes(h)
    w = req.get("with")
    if w is not None:
        if srv.s1 is None:
            return (_EINVAL, 0, None)
        from mpboot.smp import stage1

        return stage1.mark_pair(srv, h, w, confirm)
    for p in range(len(srv.ups)):
        sl = srv.pair(2 * p)
        run = srv.ups[p].running
        mine = run >= 0 and _holds(srv, 2 * p + run, h)
        s = -1  # a slot not running that holds the image (recovery: the lower one)
        for i in ((run ^ 1,) if run >= 0 else (0, 1)):
            if _holds(srv, 2 * p + i, h):
                s = i
                break
        if mine or s >= 0:
            break
    else:
        if getattr(srv.port, "FIRMWARE", False):
            from mpboot.smp import fw_mgmt

            return fw_mgmt.mark(srv, h, confirm)
        return (_ENOENT, _HASH_NOT_FOUND, None)
    if mine:
        if confirm:
            srv.forget()
            if p:
                from mpboot.smp import stage1

                return stage1.confirm(srv)
            return _confirm_running(srv)
        st = sl.state
        b = sl.b
        if st[b + TRIAL] == run or (st[b + ACTIVE] == run and sl.confirmed(run, srv.image(2 * p + run))):
            return None  # it runs confirmed, or on its test boot already: nothing to mark
        if s < 0:
            # A fallback (or replaced by a permanent install since it booted), no other copy:
            # a running image cannot be marked for a test boot (Zephyr's refusal).
            return (_EINVAL, _TEST_TO_ACTIVE_DENIED, None)
    srv.forget()
    if confirm and p:
        # Stage 1 becomes the confirmed one only through its proven test boot.
        return (_EACCESSDENIED, _CONFIRMATION_DENIED, "stage1:test")
    if confirm and sl.test_boot:
        # Factory test-boot policy: an image becomes the confirmed one only through its test
        # boot, never made permanent from the other slot (Zephyr's confirmation refusal).
        return (_EACCESSDENIED, _CONFIRMATION_DENIED, "factory:8")
    info = srv.image(2 * p + s)
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


def upload(srv, req, enc, sink=None):
    # Checks in Zephyr's order (img_mgmt_upload_inspect): off, header size, len, sha, the
    # slot, then the image itself (mpboot.update). sink: the probe (mpboot.smp.stage1), an
    # updater whose flash is a hash: the same requests through the same code, so a stage 1
    # that breaks uploads fails its probe too.
    off = req.get("off")
    data = req.get("data", _EMPTY)
    if off is None:
        return (_EINVAL, _INVALID_OFFSET, _RSN_MALFORMED)
    if type(off) is not int or off < 0 or type(data) is not memoryview:
        return (_EINVAL, 0, None)
    up = srv.up
    # `pipeline: true` in an opening request (mpboot's client): the reply says how many
    # requests may be in flight (docs/PROTOCOL.md, "Pipelining"). Only asked, so only a client
    # that knows the key ever sees it (smpclient refuses unknown reply keys).
    pipe = srv.buf_count if off == 0 and req.get("pipeline") is True else 0
    # `deflate: true` likewise asks whether later chunks may come compressed (group 64
    # command 7, mpboot.smp.zupload): the reply names the window bits the device inflates.
    z = zwbits() if off == 0 and req.get("deflate") is True else 0
    if off == 0:
        if len(data) < image.HEADER_SIZE:
            raise ImageError(image.E_TRUNCATED)
        total = req.get("len")
        if total is None:
            return (_EINVAL, _INVALID_LENGTH, _RSN_MALFORMED)
        n = req.get("image", 0)
        if type(total) is not int or total < 0 or type(n) is not int or n < 0:
            return (_EINVAL, 0, None)
        sha = req.get("sha")
        if sha is not None:
            if type(sha) is not memoryview or len(sha) != _HASH_SIZE:
                return (_EINVAL, _INVALID_HASH, None)
            sha = bytes(sha)
        p = n >> 1
        if sink is not None:
            p = -1
            nu = sink
        elif p < len(srv.ups):
            nu = srv.ups[p]
        elif n == _IMAGE_FIRMWARE and getattr(srv.port, "FIRMWARE", False):
            from mpboot.smp import fw_mgmt

            nu = fw_mgmt.firmware(srv)
        else:
            nu = None
        if nu is None:
            # Further images: none here (Zephyr's answer for a slot it does not have).
            return (_EBADSTATE, _NO_FREE_SLOT, _RSN_NO_SLOT)
        if nu is not up:
            up.abort()  # one upload at a time: another image's session ends
            srv.up = up = nu
        if sha is not None:
            if up.total >= 0 and up.sha == sha and up.total == total:
                return _off(enc, up.pos, False, pipe, z)  # the open session: continue it
            d = srv.done
            if up.total < 0 and d is not None and d[0] == sha and d[1] == total and d[2] >> 1 == p:
                return _off(enc, total, True, pipe, z)  # finished and verified already (reply lost)
        ptlv = req.get("ptlv")
        if ptlv is not None and type(ptlv) is not memoryview:
            return (_EINVAL, 0, None)
        slot = up.target()
        if sink is None:
            if req.get("upgrade") is True:
                _upgrade(srv, data, up, slot, n)
            srv.forget(2 * p + slot)
        try:
            nxt = up.begin(total, data, ptlv, sha)
        except UpdateError as e:
            room = up.partition().info()[3] if n == _IMAGE_FIRMWARE else up.slots.areas[slot].size
            if e.args[0] == U_LENGTH and total > room:
                return (_EINVAL, _TOO_LARGE, "update:4")
            raise
        if not nxt:
            nxt = up.write(0, data)
    else:
        d = srv.done
        if up.total < 0:
            if d is not None and off + len(data) == d[1]:
                return _off(enc, d[1], False)  # the last chunk again: its reply was lost
            if srv.ver:
                # SMP v2, no upload open (the device reset, or it ended): Zephyr answers the
                # offset it expects, 0, and the client starts again. v1 (mpboot's dialect)
                # gets update:2, so `mpboot flash` reopens with its sha and resumes.
                return _off(enc, 0, False)
        nxt = up.write(off, data)
        srv.forget(up.at)
    if up.total >= 0 and nxt == up.total:
        return _finish(srv, enc, nxt, pipe, z)
    return _off(enc, nxt, False, pipe, z)


def _finish(srv, enc, end, pipe, z):
    # The last byte arrived: verify the image, answer its end (and `match`).
    up = srv.up
    match = up.sha is not None
    up.finish(MARK_NONE)  # verifies; the session ends either way
    srv.forget(up.at)
    srv.done = (up.sha, end, up.at)
    if srv.s1_trial:
        from mpboot.smp import stage1

        stage1.proved(srv)  # a completed upload: the first half of stage 1's proof
    return _off(enc, end, match, pipe, z)


def _off(enc, off, match, pipe=0, z=0):
    enc.map(1 + (1 if match else 0) + (1 if pipe else 0) + (1 if z else 0))
    enc.text("off")
    enc.uint(off)
    if match:
        enc.text("match")
        enc.bool(True)
    if z:
        enc.text("deflate")
        enc.uint(z)
    if pipe:
        enc.text("pipeline")
        enc.uint(pipe)
    return None


def zwbits():
    # The window bits of the compressed uploads this device takes (0: none; MicroPython's
    # `deflate` module needs a build at the EXTRA_FEATURES ROM level).
    try:
        import deflate  # noqa: F401
    except ImportError:
        return 0
    return _ZWBITS


def _upgrade(srv, data, up, slot, n):
    # `upgrade: true`: only a version (major, minor, revision) above the running one of the
    # same image (up: its updater; image 4: the running firmware's envelope).
    if len(data) < image.HEADER_SIZE:
        raise ImageError(image.E_TRUNCATED)
    info = {}
    if n == _IMAGE_FIRMWARE:
        image.parse_header(data, up.partition().info()[3], info)
        run = up.running()
    else:
        image.parse_header(data, up.slots.areas[slot].size, info)
        r = up.running
        run = srv.image(2 * up.slots.image + r) if r >= 0 else None
    if run is not None and info["version"][:3] <= run["version"][:3]:
        raise ImageError(E_DOWNGRADE)


def _erase(srv, req, enc):
    # `slot`: absolute (0, 1 the app's, 2, 3 stage 1's); the default is the app's free slot.
    slot = req.get("slot")
    if slot is None:
        slot = srv.ups[0].target()
    if type(slot) is not int or slot < 0:
        return (_EINVAL, 0, None)
    if slot >= len(srv.cache):
        return (_EINVAL, _INVALID_SLOT, None)
    srv.forget(slot)
    try:
        srv.ups[slot >> 1].erase(slot & 1)
    except OSError:
        return (_EUNKNOWN, _FLASH_ERASE_FAILED, None)
    enc.map(0)
    return None


def _slot_info(srv, enc):
    # One map per image (slots numbered within it, as Zephyr's).
    enc.map(1)
    enc.text("images")
    enc.array(len(srv.ups))
    for p in range(len(srv.ups)):
        up = srv.ups[p]
        a = up.slots.areas
        enc.map(3)
        enc.text("image")
        enc.uint(p)
        enc.text("slots")
        enc.array(2)
        for s in (0, 1):
            enc.map(2)
            enc.text("size")
            enc.uint(a[s].size)
            enc.text("slot")
            enc.uint(s)
        enc.text("max_image_size")
        enc.uint(a[up.target()].size)
    return None
