# The board's identity fields as the SMP replies encode them: shared by the image state read
# (img_mgmt: serial), device info (mpboot_mgmt) and factory info (factory_mgmt), so none of
# those imports another for them.
from mpboot.state import FLOOR


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
