# Shared by the device drivers that run plans against a NOR flash file (dev_update, dev_smp):
# the "dev PATH SIZE SECTOR ALIGN [vendor=HEX] [class=HEX] [downgrade=0|1] [factory=0]
# [trust=0] [s1=BYTES]" command (factory=0: a board started without its factory area; trust=0:
# without its trust area, the frozen root set; s1: stage-1 slots of BYTES each, seven areas,
# mpboot.pairs), and the per-command flash
# observations (area digests, operation counters).
import hashlib
from binascii import unhexlify

import mpboot_keys
from mpboot import trust
from mpboot.ports import unix as port
from mpboot.slots import Slots

_buf = bytearray(512)


def open_dev(words):
    # words: the dev command's arguments. Returns (chip, areas, policy).
    chip = port.flash(words[0], int(words[1]), int(words[2]), int(words[3]))
    policy = {"vendor_id": None, "class_id": None, "downgrade": True}
    s1 = [w for w in words[4:] if w.startswith("s1=")]
    areas = port.areas(chip, True, int(s1[0][3:]) if s1 else 0)
    for w in words[4:]:
        k, _, v = w.partition("=")
        if k == "vendor":
            policy["vendor_id"] = unhexlify(v)
        elif k == "class":
            policy["class_id"] = unhexlify(v)
        elif k == "downgrade":
            policy["downgrade"] = v == "1"
        elif k == "factory" and v == "0":
            areas = areas[:3] + (None,) + areas[4:]
        elif k == "trust" and v == "0":
            areas = areas[:4]
    return chip, areas, policy


def new_slots(areas, policy):
    # The app's Slots (a mpboot.pairs.Pair with stage-1 slots: new_stage1 gives stage 1's).
    cls = Slots
    if len(areas) > 5:
        from mpboot.pairs import Pair as cls
    return cls(areas[0], areas[1], areas[2], mpboot_keys.KEYS, mapped=port.mapped,
               factory=areas[3] if len(areas) > 3 else None,
               trust=areas[4] if len(areas) > 4 else None, **trust.policy(mpboot_keys), **policy)


def new_stage1(areas, app):
    # Stage 1's pair beside app (new_slots' Pair), or None on a board without stage-1 slots.
    if len(areas) < 7:
        return None
    from mpboot.pairs import stage1

    return stage1(app, areas[5], areas[6])


def area_digest(a):
    h = hashlib.sha256()
    off = 0
    while off < a.size:
        n = a.read(off, _buf)
        h.update(memoryview(_buf)[:n])
        off += n
    return h.digest()


def counters(chip):
    return (chip.ops, chip.programmed, chip.erases) if chip else (0, 0, 0)
