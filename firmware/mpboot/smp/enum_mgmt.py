# SMP enumeration management group (10): which groups this device serves, as Zephyr 4.4.0's
# enum_mgmt answers with CONFIG_MCUMGR_GRP_ENUM_DETAILS, _NAME and _HANDLERS on
# (docs/PROTOCOL.md). handle() follows the handler contract in mpboot.smp.server. Loaded on
# first use (mpboot.smp.server): a client that never enumerates never pays for it.
from micropython import const

_OP_READ = const(0)
_CMD_COUNT = const(0)
_CMD_LIST = const(1)
_CMD_SINGLE = const(2)
_CMD_DETAILS = const(3)
_MAX_INDEX = const(65535)  # Zephyr's MAX_MCUMGR_GROUPS: a larger index is EINVAL

_EINVAL = const(3)
_ENOTSUP = const(8)
_EUNKNOWN = const(1)
_INDEX_TOO_LARGE = const(4)  # ENUM_MGMT_ERR_INDEX_TOO_LARGE

# The groups served, in the order listed: id, Zephyr's name, handlers (Zephyr counts the
# slots of its handler table: the highest command + 1).
_GROUPS = ((0, "os mgmt", 9), (1, "img mgmt", 7), (10, "enum mgmt", 4), (64, "mpboot", 9))


def handle(srv, op, cmd, req, enc):
    if op != _OP_READ or cmd > _CMD_DETAILS:
        return (_ENOTSUP, 0, None)
    n = len(_GROUPS)
    if cmd == _CMD_COUNT:
        enc.map(1)
        enc.text("count")
        enc.uint(n)
        return None
    if cmd == _CMD_LIST:
        enc.map(1)
        enc.text("groups")
        enc.array(n)
        for g in _GROUPS:
            enc.uint(g[0])
        return None
    if cmd == _CMD_SINGLE:
        i = req.get("index", 0)
        if type(i) is not int or i < 0 or i > _MAX_INDEX:
            return (_EINVAL, 0, None)
        if i >= n:
            # v1: Zephyr's translation of this group code is EUNKNOWN.
            return (_EUNKNOWN, _INDEX_TOO_LARGE, None)
        if i == n - 1:  # the last group: "end" too (canonical order: before "group")
            enc.map(2)
            enc.text("end")
            enc.bool(True)
        else:
            enc.map(1)
        enc.text("group")
        enc.uint(_GROUPS[i][0])
        return None
    # Details, of the groups listed in "groups" (ids it does not serve are left out) or, when
    # it lists none or is not an array, of all.
    want = req.get("groups")
    if type(want) is not list or not want:
        want = None
    else:
        for g in want:
            if type(g) is not int or g < 0:
                return (_EINVAL, 0, None)
    k = 0
    for g in _GROUPS:
        if want is None or g[0] in want:
            k += 1
    enc.map(1)
    enc.text("groups")
    enc.array(k)
    for g in _GROUPS:
        if want is None or g[0] in want:
            enc.map(3)
            enc.text("name")
            enc.text(g[1])
            enc.text("group")
            enc.uint(g[0])
            enc.text("handlers")
            enc.uint(g[2])
    return None
