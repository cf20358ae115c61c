# mpboot.confirm() (mpboot.boot.confirm) semantics and state-log edge cases, on MicroPython:
#   micropython -m dev_confirm CASE FLASH SIZE SECTOR ALIGN [IMAGE]
# confirm-after-permanent: slot 0 runs its confirmed image; an update installs IMAGE
#   permanently into slot 1; the old app's confirm() must not take "active" back.
# confirm-fallback: runs slot 0 as a fallback (how=2); confirm() makes it active.
# odd-sector: a state log whose sector is not a multiple of the record size.
import sys

import mpboot_keys
from mpboot import boot
from mpboot.ports import unix as port
from mpboot.slots import Slots
from mpboot.state import ACTIVE, SEQ, SOFF, Store
from mpboot.update import MARK_PERMANENT, Updater

case = sys.argv[1]
chip = port.flash(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))


def slots():
    a = port.areas(chip)
    return Slots(a[0], a[1], a[2], mpboot_keys.KEYS)


if case == "odd-sector":
    from mpboot.flash import Area

    # One record per save: a field other than the floor changes (a floor raise is two).
    store = Store(Area(chip, 0, 2 * chip.sector, chip.align))
    rec = store.load()
    for i in range(store.per + 2):
        rec[SOFF] = i + 1
        store.save(rec)
        again = Store(Area(chip, 0, 2 * chip.sector, chip.align)).load()
        print("SAVE", i, again[SEQ], again[SOFF], chip.erases)
    sys.exit(0)

def install_permanent(sl, running, path):
    # The running app takes the image at `path` through the updater, marked permanent.
    up = Updater(sl, running)
    with open(path, "rb") as f:
        data = f.read()
    up.begin(len(data), data[:64])
    up.write(0, data)
    return up.finish(MARK_PERMANENT)[0]


sl = slots()
slot, info, trial = sl.decide()
print("BOOTED", slot, int(trial))
if case == "confirm-after-permanent":
    boot.set_booted(sl, slot, info, None, boot.HOW_CONFIRMED)
    target = install_permanent(sl, slot, sys.argv[6])
    print("PERMANENT", target, sl.state[ACTIVE])
    print("CONFIRM", boot.confirm(), sl.state[ACTIVE], slots().state[ACTIVE])
elif case == "fallback-then-permanent":
    # Running slot 0 as a fallback; the app takes IMAGE permanently into slot 1, then calls
    # confirm(): the permanent install must stay the confirmed image.
    boot.set_booted(sl, slot, info, None, boot.HOW_FALLBACK)
    install_permanent(sl, slot, sys.argv[6])
    print("CONFIRM", boot.confirm(), slots().state[ACTIVE])
elif case == "confirm-fallback":
    boot.set_booted(sl, slot, info, None, boot.HOW_FALLBACK)
    print("CONFIRM", boot.confirm(), slots().state[ACTIVE], boot.confirm())
