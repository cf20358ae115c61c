# mpboot.pull(url) (this module: mpboot.puller): the device fetches a channel record (docs/KEYS.md, body type 4) over
# HTTP, checks it, and streams the image it names into the free slot through the updater,
# marked for a test boot. The app calls it (after mpboot.confirm(): no update during a test
# boot) and resets when it likes; the next boot test-boots the new image as after any update.
#
#   import mpboot
#   try:
#       outcome = mpboot.pull("https://updates.example.com/channels/VID/CID/stable.cbor")
#   except Exception as e:          # mpboot.puller.PullError: e.args = (code, detail)
#       ...
#
# The record is checked in this order (cheap first; docs/THREAT_MODEL.md "Device pull"):
# size and format, channel name, vendor and class (this device's), number (not below the
# highest taken; equal only with the same body), signature (a root threshold, or a key
# certified for kind channel and this scope), security counter (not below the floor). A
# record that passes and has a higher number is persisted in the trust area at once: from
# then on no older record is taken, whether or not its image ever arrives. Then: nothing to
# do if the running image is that one (CURRENT), if the free slot holds it marked to test
# (PENDING), or holds it unmarked with no upload session of it open (REVERTED: it was
# installed and failed its test boot; force=True pulls it again). The free slot's copy is
# verified and bound to the record (below) before either answer: an image that finish()
# refused stays there, and is refused again with the same code. Otherwise the image is
# fetched by Range into mpboot.update.Updater with the record's SHA-256 as the session name:
# a dropped connection resumes at the next byte (up to `tries` connections), a reset resumes
# at the updater's last checkpoint. finish() verifies the whole image (signature, policy,
# the record's SHA-256) and, before the test mark, binds it to the record: its vendor, class,
# security counter, version and length must be the record's (a record's signer is checked
# for the record's fields; this makes them the image's). On any failure the running image
# and its state are untouched.
#
# Not stage 0 (firmware/manifest.py freezes it beside the service): it parses HTTP, which is
# network input; every check that decides (channel, records, update, image) and every flash write is
# stage 0's.
import time
from micropython import const

import mpboot
from mpboot import channel as chan, http
from mpboot.records import MAX_RECORD
from mpboot.image import ImageError
from mpboot.update import MARK_TEST, UpdateError, Updater

# PullError codes: e.args = (code, detail).
E_NETWORK = const(1)  # connect/recv failed or timed out, too often (detail: errno, 110 timeout)
E_HTTP = const(2)  # a status other than 200/206, or a response the client refuses (detail: status)
E_TOO_LARGE = const(3)  # the record over 4096 bytes, or a body longer than expected
E_STALE = const(4)  # a channel number below the highest taken, or equal with another body (detail: that number)
E_SIGNATURE = const(5)  # not signed by a root threshold or a key certified for it (detail: trust code)
E_MISMATCH = const(6)  # the image is not the one the record names (detail: 10 its SHA-256,
# image.E_HASH_MISMATCH; 0 the header's version; else the record's key (docs/KEYS.md) the
# verified image differs in: 32 vendor, 33 class, 35 length, 36 version, 37 security counter)
E_PRODUCT = const(7)  # the record is for another channel name, vendor or class
E_RECORD = const(8)  # the record does not parse (detail: trust code)
E_NO_TRUST_AREA = const(9)  # the board cannot keep the channel number (no trust area)
E_IMAGE = const(10)  # the image or the policy refused it (detail: image code, mpboot.image/slots)
E_UPDATE = const(11)  # the updater refused (detail: update code, e.g. 1 busy: a test boot runs)
E_FLASH = const(12)  # the trust area write failed (detail: errno)
E_NOT_BOOTED = const(13)  # not started by mpboot.boot (no running image to keep)
E_INTERNAL = const(14)  # another exception, e.g. MemoryError (detail: 12 ENOMEM; 0 other)

# Outcomes pull() returns.
CURRENT = const(0)  # the running image is the one the record names
PENDING = const(1)  # the free slot holds it, marked for a test boot: reset to run it
REVERTED = const(2)  # the free slot holds it unmarked: installed before, not kept (force=True)
INSTALLED = const(3)  # pulled now and marked for a test boot: reset to run it

_LINE = const(512)  # status and header line buffer
_SHA = const(16)  # sha prefix the updater's session is named by (mpboot.state SSHA)
_IMAGE_MAGIC = const(0x96F3B83D)  # (mpboot.image's, private there)
_HEADER_SIZE = const(32)  # mpboot.image's HEADER_SIZE
_E_HASH_MISMATCH = const(10)  # mpboot.image's E_HASH_MISMATCH
_TLV_INFO_MAGIC = const(0x6907)  # the unprotected TLV area's info header
# mpboot.channel's H_* indices of a parsed record, as private consts (no module-dict entries).
_H_NUMBER = const(0)
_H_VENDOR = const(2)
_H_CLASS = const(3)
_H_SHA = const(4)
_H_LEN = const(5)
_H_VERSION = const(6)
_H_COUNTER = const(7)
_H_PATH = const(8)
# mpboot.boot's BOOTED_* indices of the boot record (mpboot._booted), as private consts.
_BOOTED_SLOTS = const(0)
_BOOTED_SLOT = const(1)
_BOOTED_INFO = const(2)

# The last pull: (ok, code, detail, number): ok True: code is the outcome; False: the
# PullError code and its detail. number: the record's channel number (0 unknown). None
# before the first pull. An app can report it (e.g. through its own telemetry); the SMP
# service's device info sends it as "pull" (docs/PROTOCOL.md) when this module is loaded.
last = None
_busy = False


class PullError(Exception):
    # raise PullError(code, detail)
    pass


def _fail(code, detail=0):
    raise PullError(code, detail)


def _fetch_record(url, line, deadline, timeout_ms, cadata, tries):
    # The record's bytes (at most MAX_RECORD), retried on network errors.
    for t in range(tries):
        try:
            r = http.get(url, 0, -1, MAX_RECORD, line, deadline, timeout_ms, cadata)
            try:
                buf = bytearray(r.length)
                mv = memoryview(buf)
                n = 0
                while n < len(buf):
                    n += r.readinto(mv[n:])
                return buf
            finally:
                r.close()
        except http.HttpError as e:
            if e.args[0] != http.E_NETWORK or t == tries - 1:
                raise PullError(*e.args)


def _holds(area, buf, n, sha):
    # Does the slot's area hold exactly the n-byte image file whose SHA-256 is sha? Its header
    # and TLV area lengths must add up to n before anything is hashed.
    import hashlib
    import struct

    if n > area.size:
        return False
    h = memoryview(buf)[:_HEADER_SIZE]
    area.read(0, h)
    if struct.unpack_from("<I", h, 0)[0] != _IMAGE_MAGIC:
        return False
    hs, prot, size = struct.unpack_from("<HHI", h, 8)
    at = hs + size + prot
    if at + 4 > n:
        return False
    t = memoryview(buf)[:4]
    area.read(at, t)
    magic, tot = struct.unpack_from("<HH", t, 0)
    if magic != _TLV_INFO_MAGIC or at + tot != n:
        return False
    d = hashlib.sha256()
    off = 0
    while off < n:
        k = min(len(buf), n - off)
        area.read(off, memoryview(buf)[:k])
        d.update(memoryview(buf)[:k])
        off += k
    return d.digest() == sha


def _bind(ch, info):
    # The verified image (its info from finish() or slots.check) is the one the record
    # describes, not only the one its SHA-256 names: PullError(E_MISMATCH, the record's key).
    import struct

    for k, a, b in ((32, info["vendor_id"], ch[_H_VENDOR]), (33, info["class_id"], ch[_H_CLASS]),
                    (35, info["total_size"], ch[_H_LEN]), (36, struct.pack("<BBHI", *info["version"]), ch[_H_VERSION]),
                    (37, info["security_counter"] or 0, ch[_H_COUNTER])):
        if a != b:
            _fail(E_MISMATCH, k)


def _check(ch, slots, info, channel):
    # mpboot.channel.check against this device (its vendor and class: the build's or the
    # factory's, else the running image's), then the number is kept when it grows.
    from mpboot.state import FLOOR

    vid = slots.vendor_id if slots.vendor_id is not None else info and info["vendor_id"]
    cid = slots.class_id if slots.class_id is not None else info and info["class_id"]
    store = slots.trust_store
    if store is None:
        _fail(E_NO_TRUST_AREA)
    n0, d0 = chan.taken(store)
    chan.check(ch, slots.trust, vid, cid, channel, n0, d0, slots.state[slots.b + FLOOR])
    try:
        chan.take(store, slots.trust, ch)
    except OSError as e:
        _fail(E_FLASH, e.args[0] if e.args else 0)


def _stream(up, url, ch, line, buf, deadline, timeout_ms, cadata, tries):
    # Fetches the image into the updater from where it stands (a session persisted before a
    # reset resumes at its checkpoint), reconnecting with a Range from the next byte after a
    # network error, at most `tries` connections in all. Returns when every byte is written.
    total = ch[_H_LEN]
    sha = ch[_H_SHA]
    mv = memoryview(buf)
    opened = False
    err = None
    for _ in range(tries):
        if opened and up.total < 0:
            _fail(E_UPDATE, 2)  # a flash error closed the update
        pos = up.pos if opened else 0
        if opened and pos == total:
            return
        if not opened:
            # A session of this image persisted before a reset: its header is in flash.
            from mpboot.state import SLEN, SSHA, SSLOT

            st = up.slots.state
            slot = up.target()
            if st[SSLOT] == 2 * up.slots.image + slot and st[SLEN] == total and st[SSHA] == sha[:_SHA]:
                h = mv[:_HEADER_SIZE]
                up.slots.areas[slot].read(0, h)
                pos = up.begin(total, h, None, sha)
                opened = True
                if pos == total:
                    return
        try:
            r = http.get(url, pos, total, total, line, deadline, timeout_ms, cadata)
        except http.HttpError as e:
            if e.args[0] != http.E_NETWORK:
                raise PullError(*e.args)
            err = e
            continue
        try:
            while True:
                if not opened:
                    # The header first: begin() refuses a wrong image before any erase.
                    n = 0
                    while n < _HEADER_SIZE:
                        k = r.readinto(mv[n:_HEADER_SIZE])
                        if not k:
                            _fail(E_MISMATCH)
                        n += k
                    if bytes(mv[20:28]) != ch[_H_VERSION]:
                        _fail(E_MISMATCH)  # another version than the record names
                    if up.begin(total, mv[:_HEADER_SIZE], None, sha):
                        # (a session appeared: cannot happen, the check above found none)
                        _fail(E_UPDATE, 2)
                    opened = True
                    up.write(0, mv[:_HEADER_SIZE])
                k = r.readinto(mv)
                if not k:
                    break
                up.write(up.pos, mv[:k])
        except http.HttpError as e:
            if e.args[0] != http.E_NETWORK:
                raise PullError(*e.args)
            err = e
            continue
        finally:
            r.close()
        if up.pos == total:
            return
    raise PullError(*(err.args if err else (E_NETWORK, 0)))


def pull(url, channel="stable", timeout_ms=10000, deadline_ms=600000, tries=5, cadata=None, force=False):
    # Fetch the channel record at url (the image at its path, relative to url); see the top
    # of this module. channel: the channel name this device follows. timeout_ms: each recv
    # and connect; deadline_ms: the whole pull; tries: connections per fetch (a dropped one
    # resumes). cadata: the CA certificate (DER) an https server must present; None: https
    # is unauthenticated (the record's signature and the image's are what the device
    # trusts). Returns CURRENT, PENDING, REVERTED or INSTALLED; raises PullError(code,
    # detail). mpboot.puller.last keeps the outcome either way.
    global last, _busy
    tries = max(1, tries)
    if _busy:
        last = (False, E_UPDATE, 1, 0)
        raise PullError(E_UPDATE, 1)  # another pull runs (asyncio apps): U_BUSY
    _busy = True
    number = 0
    try:
        b = mpboot._booted
        if b is None or b[_BOOTED_SLOT] < 0:
            _fail(E_NOT_BOOTED)
        slots, running, info = b[_BOOTED_SLOTS], b[_BOOTED_SLOT], b[_BOOTED_INFO]
        deadline = time.ticks_add(time.ticks_ms(), deadline_ms)
        line = bytearray(_LINE)
        rec = _fetch_record(url, line, deadline, timeout_ms, cadata, tries)
        ch = chan.parse(rec)
        number = ch[_H_NUMBER]
        _check(ch, slots, info, channel)
        rec = None
        total = ch[_H_LEN]
        sha = ch[_H_SHA]
        # The verifier's buffer (2 KiB) carries the body: the updater does not use it while
        # it takes data, and finish() (which does) comes after the last byte.
        buf = slots.buf
        up = Updater(slots, running)
        other = up.target()
        if _holds(slots.areas[running], buf, total, sha):
            out = CURRENT
        elif _holds(slots.areas[other], buf, total, sha):
            from mpboot.state import SSHA, SSLOT, TEST

            st = slots.state
            if st[slots.b + TEST] == other:
                out = PENDING
            elif st[SSLOT] != 2 * slots.image + other or st[SSHA] != sha[:_SHA]:
                out = REVERTED
            else:
                out = -1  # a session of it is open: finish it
            if out >= 0:
                # Marked, or tried and reverted, only if it verified and matched the record
                # then; else finish() refused it (the same bytes would be refused again).
                _bind(ch, slots.check(other, None, True))
                if out == REVERTED and force:
                    out = -1
        else:
            out = -1
        if out < 0:
            try:
                _stream(up, http.join(url, ch[_H_PATH]), ch, line, buf, deadline, timeout_ms, cadata, tries)
                up.finish(MARK_TEST, lambda i, c=ch: _bind(c, i))  # (c: not a closure)
            finally:
                up.abort()
            out = INSTALLED
        last = (True, out, 0, number)
        return out
    except (PullError, chan.ChannelError) as e:
        last = (False, e.args[0], e.args[1], number)
        raise PullError(*e.args)
    except ImageError as e:
        c = e.args[0]
        last = (False, E_MISMATCH if c == _E_HASH_MISMATCH else E_IMAGE, c, number)
        raise PullError(last[1], c)
    except UpdateError as e:
        last = (False, E_UPDATE, e.args[0], number)
        raise PullError(E_UPDATE, e.args[0])
    except OSError as e:  # flash (the updater's writes)
        last = (False, E_FLASH, e.args[0] if e.args else 0, number)
        raise PullError(E_FLASH, last[2])
    except Exception as e:
        # Anything else (MemoryError on a small heap, or a bug): a PullError too, so that
        # e.args is always (code, detail). (KeyboardInterrupt and SystemExit go on as they
        # are: they stop the app, not a pull; `last` keeps the pull before.)
        last = (False, E_INTERNAL, 12 if isinstance(e, MemoryError) else 0, number)
        raise PullError(E_INTERNAL, last[2])
    finally:
        _busy = False
