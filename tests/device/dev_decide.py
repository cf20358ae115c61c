# The boot decision as a device makes it, for heap measurements:
#   micropython -m dev_decide FLASH SIZE SECTOR ALIGN [WORK [S1]]
# (mpboot_keys on sys.path: its KEYS and thresholds are the frozen root set)
# Verifies through flash reads (no memory map, no mount) and writes any state change, then
# prints "DECIDE slot trial version free". S1: the size of each stage-1 slot (issue 19): both
# pairs are decided (slots.decide_all) and a line "DECIDE1 slot trial version" follows.
#
# WORK (bytes): the heap left for the decision itself. On a device the firmware modules are
# frozen (firmware/manifest.py) and cost no heap; here they load from .mpy into the heap.
# So the modules and the flash driver (C code on a device) are loaded first, then a ballast
# takes all but WORK bytes of the free heap: what follows must fit in WORK.
import gc
import sys

import mpboot_keys
from mpboot import factory, image, records, rsa, state, trust  # noqa: F401 (loaded before the ballast, as if frozen)
from mpboot.ports import unix as port
from mpboot.slots import Slots
from mpboot import cbor  # noqa: F401 (the records' codec: frozen on a device)

chip = port.flash(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
s1_size = int(sys.argv[6]) if len(sys.argv) > 6 else 0
if s1_size:  # (only then: a module loaded before the ballast moves where the free heap lies)
    from mpboot.pairs import Pair, decide_all, stage1
a = port.areas(chip, True, s1_size)
ballast = None
if len(sys.argv) > 5:
    gc.collect()
    ballast = bytearray(gc.mem_free() - int(sys.argv[5]))
    gc.collect()
    print("WORK", gc.mem_free())
# With the factory record, the trust area (when the chip has one) and the keys module's
# thresholds: the boot as boot.start makes it.
slots = (Pair if s1_size else Slots)(a[0], a[1], a[2], mpboot_keys.KEYS, factory=a[3],
                                     trust=a[4] if len(a) > 4 else None, **trust.policy(mpboot_keys))
if s1_size:
    (slot, info, trial), r1 = decide_all(slots, stage1(slots, a[5], a[6]))
else:
    slot, info, trial = slots.decide()
print("DECIDE", slot, int(trial), "%d.%d.%d" % info["version"][:3] if info else "-")
if s1_size:
    print("DECIDE1", r1[0], int(r1[2]), "%d.%d.%d" % r1[1]["version"][:3] if r1[1] else "-")
