# The boot on a firmware built without ROMFS support (no vfs.VfsRom: the stock esp32, rp2
# and stm32 builds, docs/PORTING.md): the image cannot run, and the board must say so and
# stay in recovery, serviceable, not stop on an AttributeError.
#   micropython -m dev_no_vfsrom FLASH SIZE SECTOR ALIGN
# Prints "RAN <run()'s result> <errors of slot 0 and 1>".
import sys

import vfs as _vfs


class _NoRom:
    mount = staticmethod(_vfs.mount)
    umount = staticmethod(_vfs.umount)


sys.modules["vfs"] = _NoRom  # before mpboot.boot imports it

import mpboot_keys  # noqa: E402
from mpboot import boot  # noqa: E402
from mpboot.ports import unix as port  # noqa: E402
from mpboot.slots import Slots  # noqa: E402

chip = port.flash(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
a = port.areas(chip)
slots = Slots(a[0], a[1], a[2], mpboot_keys.KEYS)
slot, info, trial = slots.decide()
print("RAN", boot.run(slots, port, slot, info, trial), slots.errors[0], slots.errors[1])
