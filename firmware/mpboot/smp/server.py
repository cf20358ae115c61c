# The SMP server core: one whole request packet in, one response packet out
# (docs/PROTOCOL.md). Transports (mpboot.transport) frame the packets; the groups
# (os_mgmt, img_mgmt, enum_mgmt, mpboot_mgmt) serve the commands.
#
#   srv = Server(slots, running, port, info=info)   # + s1=, s1_slot=, s1_info=, deadline= with stage 1
#   rsp = srv.handle(pkt)      # memoryview valid until the next call, or None: send nothing
#   if srv.reset_requested:    # after sending and draining rsp
#       port.reset()
#
# A handler gets (srv, op, cmd, req, enc): the decoded request map and the encoder, already
# placed after the response header. It encodes its response map and returns None, or returns
# an error (rc, group_rc, rsn): MGMT_ERR rc for SMP v1 and for v2 when group_rc is 0,
# {"err": {"group", "rc": group_rc}} for v2 otherwise; rsn (str or None) goes into v1 only.
# srv.ver is the request's SMP version (0: v1, 1: v2), for the rare answer that differs.
# Exceptions a handler lets out: ValueError/TypeError (a malformed request) are EINVAL,
# MemoryError ENOMEM, OverflowError (response too large) EMSGSIZE, others EUNKNOWN.
from micropython import const

from mpboot.image import ImageError
from mpboot.smp import img_mgmt, mpboot_mgmt, os_mgmt
from mpboot.cbor import Decoder, Encoder
from mpboot.update import Updater

_HDR = const(8)
_VERSION_MAX = const(1)  # SMP v2
# Ops (a response's op is its request's + 1) and groups
_OP_READ = const(0)
_OP_WRITE = const(2)
_GROUP_OS = const(0)
_GROUP_IMAGE = const(1)
_GROUP_ENUM = const(10)
_GROUP_MPBOOT = const(64)

# MGMT_ERR
_EUNKNOWN = const(1)
_ENOMEM = const(2)
_EINVAL = const(3)
_EMSGSIZE = const(7)
_ENOTSUP = const(8)
_TOO_NEW = const(13)  # MGMT_ERR_UNSUPPORTED_TOO_NEW: SMP versions 2-3 (v3, v4)

_UNKNOWN = const(0)  # cache entry: slot not looked at yet


class Server:
    def __init__(self, slots, running, port, buf_size=2048, buf_count=4, info=None, s1=None, s1_slot=-1,
                 s1_info=None, deadline=None):
        # slots: mpboot.slots.Slots. running: the slot running now (-1 in recovery). port: the
        # port module (reset, unique_id). info: the running image's verified info, or None.
        # On a board with stage-1 slots (docs/PROTOCOL.md, "Stage 1"): s1, its pair
        # (mpboot.pairs.Stage1); s1_slot, the stage-1 slot running (-1: none); s1_info, its
        # verified info; deadline, a stage-1 test boot's proof deadline (time.ticks_ms) or None.
        # Slots are absolute here: 0, 1 the app's, 2, 3 stage 1's (image 1).
        self.slots = slots
        self.running = running
        self.port = port
        self.info = info
        self.buf_size = buf_size
        self.buf_count = buf_count
        self.up = Updater(slots, running)  # the updater of the upload open (or last opened)
        self.ups = (self.up,)  # one per image
        self.s1 = s1
        self.s1_trial = False  # stage 1 runs its test boot, unproven: the service's tick resets at the deadline
        if s1 is not None:
            self.ups = (self.up, Updater(s1, s1_slot))
        self.fw = None  # image 4's writer, the esp32 firmware (img_mgmt.firmware: made on first use; False: none)
        self.out = bytearray(buf_size)
        self.dec = Decoder()
        self.enc = Encoder(self.out)
        self.reset_requested = False
        self.ver = 0  # the SMP version of the request being handled (0: v1, 1: v2)
        # The upload finished last (sha, len, slot): a client whose last reply got lost asks
        # again, and must hear "done", not open a session that erases the verified image.
        self.done = None
        # The trust record being received (mpboot.smp.trust_mgmt: [buffer, next offset]), or None.
        self.record = None
        # Verified info per slot (None: no valid image), _UNKNOWN until looked at. Forgotten
        # whenever that slot or the state changes.
        # The running images' infos (absolute slot -> info) are kept.
        self.keep = {running: info} if running >= 0 and info is not None else {}
        self.cache = [_UNKNOWN] * (2 * len(self.ups))
        for s in self.keep:
            self.cache[s] = self.keep[s]
        if s1 is not None:
            from mpboot.smp import stage1

            stage1.init(self, s1_slot, s1_info, deadline)

    def pair(self, slot):
        # The slot pair (Slots) an absolute slot belongs to.
        return self.slots if slot < 2 else self.s1

    def forget(self, slot=-1):
        # The slot's bytes (slot >= 0, absolute) or the state (-1) change: drop what was remembered.
        d = self.done
        if d is not None and d[2] == slot:
            self.done = None  # (a state write leaves the finished image as it is)
        c = self.cache
        for s in range(len(c)):
            if (slot < 0 or s == slot) and s not in self.keep:
                c[s] = _UNKNOWN

    def image(self, slot):
        # The verified info of the image in absolute `slot` (passing this device's policy), or None.
        c = self.cache
        v = c[slot]
        if v is _UNKNOWN:
            try:
                v = self.pair(slot).check(slot & 1)
            except ImageError:
                v = None
            c[slot] = v
        return v

    def handle(self, pkt):
        n = len(pkt)
        if n < _HDR:
            return None
        b0 = pkt[0]
        op = b0 & 7
        if op != _OP_READ and op != _OP_WRITE:
            return None  # a response, or no SMP op: never answered
        ver = (b0 >> 3) & 3
        group = pkt[4] << 8 | pkt[5]
        cmd = pkt[7]
        enc = self.enc
        enc.n = _HDR
        err = None
        if ver > _VERSION_MAX:
            ver = _VERSION_MAX
            err = (_TOO_NEW, 0, None)
        elif (pkt[2] << 8 | pkt[3]) != n - _HDR:
            err = (_EINVAL, 0, None)
        else:
            self.ver = ver
            try:
                req = self.dec.decode(memoryview(pkt)[_HDR:]) if n > _HDR else {}
                if group == _GROUP_OS:
                    err = os_mgmt.handle(self, op, cmd, req, enc)
                elif group == _GROUP_IMAGE:
                    err = img_mgmt.handle(self, op, cmd, req, enc)
                elif group == _GROUP_MPBOOT:
                    err = mpboot_mgmt.handle(self, op, cmd, req, enc)
                elif group == _GROUP_ENUM:
                    from mpboot.smp import enum_mgmt  # (loaded on first use)

                    err = enum_mgmt.handle(self, op, cmd, req, enc)
                else:
                    err = (_ENOTSUP, 0, None)
                req = None
            except (ValueError, TypeError):
                err = (_EINVAL, 0, None)
            except MemoryError:
                err = (_ENOMEM, 0, None)
            except OverflowError:
                err = (_EMSGSIZE, 0, None)
            except Exception:
                err = (_EUNKNOWN, 0, None)
        if err is not None:
            enc.n = _HDR
            rc, grc, rsn = err
            if ver or rsn is None:
                if ver and grc:
                    enc.map(1)
                    enc.text("err")
                    enc.map(2)
                    enc.text("rc")
                    enc.uint(grc)
                    enc.text("group")
                    enc.uint(group)
                else:
                    enc.map(1)
                    enc.text("rc")
                    enc.uint(rc)
            else:
                enc.map(2)
                enc.text("rc")
                enc.uint(rc)
                enc.text("rsn")
                enc.text(rsn)
        out = self.out
        m = enc.n - _HDR
        out[0] = (op + 1) | ver << 3
        out[1] = 0
        out[2] = m >> 8
        out[3] = m & 0xFF
        out[4] = group >> 8
        out[5] = group & 0xFF
        out[6] = pkt[6]
        out[7] = cmd
        return enc.mv[: enc.n]
