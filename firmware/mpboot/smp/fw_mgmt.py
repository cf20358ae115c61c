# Image 4 over SMP: the MicroPython firmware itself, on a port whose adapter says FIRMWARE
# (esp32: mpboot.espota, in builds that froze it; docs/PROTOCOL.md "Stage 1", PORTING.md).
# Loaded by mpboot.smp.img_mgmt on the first image-4 upload or unknown hash: other boards
# never pay for it.
from micropython import const

from mpboot.image import ImageError
from mpboot.update import MARK_PERMANENT, MARK_TEST

_ENOENT = const(5)
_EACCESSDENIED = const(11)
_HASH_NOT_FOUND = const(8)
_CONFIRMATION_DENIED = const(32)


def firmware(srv):
    # Image 4's writer: the MicroPython firmware itself (mpboot.espota on esp32 builds that
    # froze it: the port says FIRMWARE, docs/PORTING.md), made on first use; None on other
    # boards, or without OTA partitions.
    fw = srv.fw
    if fw is None:
        try:
            from mpboot import espota

            fw = espota.Firmware(srv.slots)
            fw.target()  # OSError(ENOENT): no OTA app partition to update into
        except (ImportError, OSError):
            fw = False
        srv.fw = fw
    return fw or None


def mark(srv, h, confirm):
    # A state write whose hash no slot holds: the firmware an image-4 upload left in the next
    # OTA partition (verified again in place, then ESP-IDF's set_boot; confirm: no trial).
    fw = firmware(srv)
    if fw is None:
        return (_ENOENT, _HASH_NOT_FOUND, None)
    if confirm and srv.slots.test_boot:
        # Factory test-boot policy: the firmware too goes through its trial (as the app's).
        return (_EACCESSDENIED, _CONFIRMATION_DENIED, "factory:8")
    try:
        fw.mark(MARK_PERMANENT if confirm else MARK_TEST, h)
    except ImageError:
        return (_ENOENT, _HASH_NOT_FOUND, None)
    return None
