# SMP OS management group (0): echo, reset, MCUmgr parameters, OS/app info, bootloader info
# (docs/PROTOCOL.md). handle() follows the handler contract in mpboot.smp.server.
#
# As Zephyr 4.4.0's os_mgmt answers for an MCUboot device: bootloader info names "MCUboot"
# (mpboot boots MCUboot-format images, direct XIP with revert, and clients such as
# mcumgr-toolkit pick their update flow by that name); OS info keeps mpboot's own fields.
import sys
from binascii import hexlify

from micropython import const

import mpboot
from mpboot.smp.img_mgmt import version, zwbits

_OP_READ = const(0)
_OP_WRITE = const(2)
_CMD_ECHO = const(0)
_CMD_RESET = const(5)
_CMD_PARAMS = const(6)  # MCUmgr parameters
_CMD_INFO = const(7)  # OS/app info
_CMD_BOOTLOADER_INFO = const(8)

_EINVAL = const(3)
_ENOENT = const(5)
_ENOTSUP = const(8)
_OS_INVALID_FORMAT = const(2)  # OS_MGMT_ERR_INVALID_FORMAT
_OS_NO_ANSWER = const(3)  # OS_MGMT_ERR_QUERY_YIELDS_NO_ANSWER
_MODE_DIRECT_XIP_REVERT = const(5)  # MCUBOOT_MODE_DIRECT_XIP_WITH_REVERT

_FORMAT = "snrvbmpio"  # the OS info fields, in output order ("a": all)
_FIELDS = const(9)  # len(_FORMAT)
_ALL_FIELDS = const(0x1FF)  # one bit per field
_KERNEL_NAME = const(1)  # the field of an empty format, as of none ("s")


def handle(srv, op, cmd, req, enc):
    if cmd == _CMD_ECHO:  # read or write, as Zephyr; no "d" echoes ""
        d = req.get("d", "")
        if type(d) is not str:
            return (_EINVAL, 0, None)
        enc.map(1)
        enc.text("r")
        enc.text(d)
        return None
    if cmd == _CMD_RESET and op == _OP_WRITE:
        # ("force" accepted) Sent, drained, then the transport resets.
        srv.reset_requested = True
        enc.map(0)
        return None
    if op != _OP_READ:
        return (_ENOTSUP, 0, None)
    if cmd == _CMD_PARAMS:
        # `pipeline: true` (mpboot's client) asks how many requests may be in flight, as an
        # opening upload request may (docs/PROTOCOL.md, "Pipelining"): known before the
        # upload, the client streams right behind its opening request. Only a request that
        # asks gets the key (smpclient's response models refuse keys they do not know).
        # `deflate: true` likewise asks for the window of the compressed chunks it takes, so
        # that those behind the opening request go compressed too (0: none, no key).
        pipe = req.get("pipeline") is True
        z = zwbits() if req.get("deflate") is True else 0
        enc.map(2 + (1 if pipe else 0) + (1 if z else 0))
        if z:  # ("deflate" < "buf_size": shorter keys first)
            enc.text("deflate")
            enc.uint(z)
        enc.text("buf_size")
        enc.uint(srv.buf_size)
        if pipe:  # (canonical order: "buf_size" < "pipeline" < "buf_count")
            enc.text("pipeline")
            enc.uint(srv.buf_count)
        enc.text("buf_count")
        enc.uint(srv.buf_count)
        return None
    if cmd == _CMD_INFO:
        return _info(srv, req, enc)
    if cmd == _CMD_BOOTLOADER_INFO:
        return _bootloader_info(srv, req, enc)
    return (_ENOTSUP, 0, None)


def _bootloader_info(srv, req, enc):
    # Zephyr: no "query" introduces the bootloader; "mode" answers the mode, with
    # "no-downgrade": true only when downgrades are refused (never false).
    q = req.get("query")
    if q is None:
        enc.map(1)
        enc.text("bootloader")
        enc.text("MCUboot")
        return None
    if type(q) is not str:
        return (_EINVAL, 0, None)
    if q != "mode":
        return (_ENOENT, _OS_NO_ANSWER, None)
    nd = not srv.slots.downgrade
    enc.map(2 if nd else 1)
    enc.text("mode")
    enc.uint(_MODE_DIRECT_XIP_REVERT)
    if nd:
        enc.text("no-downgrade")
        enc.bool(True)
    return None


def _info(srv, req, enc):
    f = req.get("format", "s")
    if type(f) is not str:
        return (_EINVAL, 0, None)
    mask = 0
    for c in f:
        i = _FORMAT.find(c)
        if c == "a":
            mask = _ALL_FIELDS
        elif i < 0:
            return (_EINVAL, _OS_INVALID_FORMAT, None)
        else:
            mask |= 1 << i
    if not mask:
        mask = _KERNEL_NAME  # "" as Zephyr reads it
    out = []
    for i in range(_FIELDS):
        if not mask >> i & 1:
            continue
        if i == 0:  # kernel name
            s = "mpboot"
        elif i == 1:  # node name: the board's serial once provisioned, else its unique id
            f = srv.slots.factory
            s = f.serial_text() if f is not None else None
            if s is None:
                s = hexlify(srv.port.unique_id()).decode()
        elif i == 2:  # kernel release: the bootloader's
            s = mpboot.__version__
        elif i == 3:  # kernel version: the running image's (none in recovery)
            v = srv.image(srv.running) if srv.running >= 0 else None
            s = version(v["version"]) if v else "none"
        elif i == 4:  # build date: MicroPython's
            s = sys.version
            s = s[s.find(" on ") + 4 :] if " on " in s else "unknown"
        elif i == 5:  # machine
            s = getattr(sys.implementation, "_machine", sys.platform)
        elif i == 6:  # processor
            s = sys.platform
        elif i == 7:  # hardware platform: the port adapter
            s = srv.port.__name__
            s = s[s.rfind(".") + 1 :]
        else:  # operating system
            s = "MicroPython %d.%d.%d" % sys.implementation.version[:3]
        out.append(s)
    enc.map(1)
    enc.text("output")
    enc.text(" ".join(out))
    return None
