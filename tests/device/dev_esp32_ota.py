# MicroPython: ESP-IDF OTA through the esp32 fake (tests/device/fakes/esp32.py), as MicroPython's
# own tests/esp32/partition_ota.py drives a board: write the next partition, set_boot(),
# reset, confirm or not.
# Usage: dev_esp32_ota DIR [MODE]
#   DIR holds the app images (tests/espkit.py): a.bin, b.bin (good), and refused ones:
#   chip.bin (ESP32-S3 chip id), map.bin (DROM segment off its 64 KiB alignment),
#   sum.bin (checksum), hash.bin (appended SHA-256), magic.bin (first byte not 0xE9);
#   flash files go there too.
# MODE (power cuts in the bootloader's otadata writes, nor_sim's cut= fault set from outside):
#   prepare-trial     DIR/cut.bin: ota_0 runs (a.bin), ota_1 (b.bin) is set_boot (NEW)
#   prepare-rollback  the same, then a reset: ota_1 runs its trial boot (PENDING_VERIFY)
#   boot              a power-on of DIR/cut.bin; prints "BOOT running=.. states=../.."
# Without MODE: the checks below.
# Prints "OTADATA TAG HEX0 HEX1" (the two raw otadata entries, read through the partition as
# mpboot would) and "PASS NAME [DETAIL]" or "FAIL NAME ERROR" per check; exits 0 either way.
import gc
import sys
from binascii import hexlify

import esp32

DIR = sys.argv[1]
P = esp32.Partition
ENOENT = 2
EINVAL = 22
INVALID_ARG = -258
INVALID_SIZE = -260
NOT_FOUND = -261
VALIDATE_FAILED = -5379

# An ESP32_GENERIC-OTA-like table, scaled down: otadata, two OTA apps, a filesystem.
OTA = (
    (1, 0x02, 0x9000, 0x4000, "nvs", False),
    (1, 0x00, 0xD000, 0x2000, "otadata", False),
    (1, 0x01, 0xF000, 0x1000, "phy_init", False),
    (0, 0x10, 0x10000, 0x10000, "ota_0", False),
    (0, 0x11, 0x20000, 0x10000, "ota_1", False),
    (1, 0x81, 0x30000, 0x10000, "vfs", False),
)
# With a factory app too.
FACTORY = (
    (1, 0x00, 0xD000, 0x2000, "otadata", False),
    (0, 0x00, 0x10000, 0x10000, "factory", False),
    (0, 0x10, 0x20000, 0x10000, "ota_0", False),
    (0, 0x11, 0x30000, 0x10000, "ota_1", False),
)
# MicroPython's stock table: no otadata.
STOCK = (
    (1, 0x02, 0x9000, 0x6000, "nvs", False),
    (0, 0x00, 0x10000, 0x10000, "factory", False),
    (0, 0x10, 0x20000, 0x10000, "ota_0", False),
    (0, 0x11, 0x30000, 0x10000, "ota_1", False),
)
SIZE = 0x40000


def image(name):
    with open(DIR + "/" + name, "rb") as f:
        data = f.read()
    return data + b"\xff" * (-len(data) % 4096)


def flash(label, name):
    # As MicroPython's partition_ota.py copies an app: simple protocol, erases first.
    P(label).writeblocks(0, image(name))


def need(cond, what):
    if not cond:
        raise AssertionError(what)


def raises(fn, *args):
    try:
        fn(*args)
    except Exception as e:
        return e
    raise AssertionError("no exception")


def oserr(fn, *args):
    e = raises(fn, *args)
    need(isinstance(e, OSError), "not OSError: " + repr(e))
    return e.args


def label(pid):
    return P(pid).info()[4]


def raw_otadata():
    od = P.find(P.TYPE_DATA, 0)[0]
    out = []
    for sec in (0, 1):
        buf = bytearray(32)
        od.readblocks(sec, buf)
        out.append(bytes(buf))
    return out


def dump(tag):
    e = raw_otadata()
    print("OTADATA %s %s %s" % (tag, hexlify(e[0]).decode(), hexlify(e[1]).decode()))


def states():
    return "%s/%s" % (esp32.ota_state("ota_0"), esp32.ota_state("ota_1"))


def where():
    return "running=%s boot=%s" % (label(P.RUNNING), label(P.BOOT))


def check(name, fn):
    gc.collect()
    try:
        r = fn()
    except Exception as e:  # report and go on: one line per check
        print("FAIL " + name + " " + repr(e))
        return
    print("PASS " + name + ("" if r is None else " " + r))


# -- a board with two OTA apps and no factory app ------------------------------------------

def c_blank():
    # Nothing flashed: the bootloader finds no app (a real board resets in a loop).
    e = raises(esp32.setup, DIR + "/ota.bin", SIZE, OTA)
    need(isinstance(e, esp32.NoBoot), repr(e))
    dump("blank")


def c_esptool():
    # esptool writes ota_0 (otadata stays blank); the first boot runs it and records it.
    flash("ota_0", "a.bin")
    esp32.reset()
    dump("esptool")
    return where() + " states=" + states()


def c_next_update():
    run = P(P.RUNNING)
    n1 = run.get_next_update()
    n2 = n1.get_next_update()
    data = P("vfs").get_next_update()
    return "%s->%s->%s vfs->%s" % (run.info()[4], n1.info()[4], n2.info()[4], data.info()[4])


def c_refused():
    # set_boot on an image esp_image_verify refuses: -5379, otadata untouched.
    before = raw_otadata()
    out = []
    for name in ("blank", "magic.bin", "chip.bin", "map.bin", "sum.bin", "hash.bin"):
        if name == "blank":
            P("ota_1").ioctl(6, 0)
        else:
            flash("ota_1", name)
        a = oserr(P("ota_1").set_boot)
        need(a == (VALIDATE_FAILED, "ESP_ERR_OTA_VALIDATE_FAILED"), name + " " + repr(a))
        out.append(name)
    need(raw_otadata() == before, "otadata changed")
    return ",".join(out)


def c_set_boot():
    target = P(P.RUNNING).get_next_update()
    flash(target.info()[4], "b.bin")
    target.set_boot()
    dump("set_boot")
    return where() + " states=" + states()


def c_trial():
    esp32.reset()
    dump("trial")
    return where() + " states=" + states()


def c_rollback():
    # No mark_app_valid_cancel_rollback() on the trial boot: the next reset rolls back.
    esp32.reset()
    dump("rollback")
    return where() + " states=" + states()


def c_confirm():
    P("ota_1").set_boot()
    dump("again")
    esp32.reset()
    r = where() + " states=" + states()
    P.mark_app_valid_cancel_rollback()
    dump("confirmed")
    ops = esp32.chip().ops
    P.mark_app_valid_cancel_rollback()  # already VALID: no flash write
    need(esp32.chip().ops == ops, "wrote again")
    esp32.reset()
    return r + " then " + where() + " states=" + states()


def c_back():
    # Back to ota_0: seq 3 (the next one selecting slot 0 above 2) into sector 0.
    P("ota_0").set_boot()
    dump("back")
    return where() + " states=" + states()


def c_bad_image_skipped():
    # ota_0 (selected, NEW) gets a flipped byte: the bootloader marks it PENDING_VERIFY, fails
    # to load it and falls back to ota_1 without touching otadata; the reset after aborts it.
    buf = bytearray(1)
    p = P("ota_0")
    p.readblocks(0, buf, 0x30)  # the first character of the app descriptor's version
    p.writeblocks(0, bytes([buf[0] & (buf[0] - 1)]), 0x30)  # its lowest 1 bit programmed to 0
    esp32.reset()
    dump("skipped")
    r = where() + " states=" + states()
    esp32.reset()
    return r + " then " + where() + " states=" + states()


def c_misuse():
    out = []
    e = raises(P, 5)
    need(isinstance(e, ValueError), repr(e))
    need(oserr(P, "nope") == (ENOENT,), "label")
    vfs = P("vfs")
    need(oserr(vfs.set_boot) == (VALIDATE_FAILED, "ESP_ERR_OTA_VALIDATE_FAILED"), "data blank")
    vfs.writeblocks(0, image("a.bin"))
    need(oserr(vfs.set_boot) == (INVALID_ARG, "ESP_ERR_INVALID_ARG"), "data with an image")
    out.append("set_boot_data")
    need(oserr(vfs.writeblocks, 0, bytes(100)) == (INVALID_SIZE, "ESP_ERR_INVALID_SIZE"), "size")
    need(oserr(vfs.writeblocks, 0, b"\xff" * 16, 8)[0] == 5, "1s over 0s")  # nor_sim EIO
    need(oserr(vfs.readblocks, 16, bytearray(1)) == (INVALID_SIZE, "ESP_ERR_INVALID_SIZE"), "end")
    need(oserr(vfs.readblocks, 17, bytearray(1)) == (INVALID_ARG, "ESP_ERR_INVALID_ARG"), "past")
    small = P("vfs", 512)
    need(small.ioctl(6, 0) == -EINVAL and small.ioctl(4, 0) == 128, "block size 512")
    out.append("blocks")
    need(repr(P("ota_1")) == "<Partition type=0, subtype=17, address=131072, size=65536, "
         "label=ota_1, encrypted=0>", repr(P("ota_1")))
    need(P("ota_1").info() == (0, 0x11, 0x20000, 0x10000, "ota_1", False), "info")
    need([p.info()[4] for p in P.find()] == ["ota_0", "ota_1"], "find apps")
    need([p.info()[4] for p in P.find(P.TYPE_DATA, 0x81)] == ["vfs"], "find fat")
    need(P.find(P.TYPE_DATA, label="nope") == [], "find none")
    out.append("find")
    return ",".join(out)


# -- rollback off (a build without CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE) -----------------

def c_no_rollback():
    esp32.setup(DIR + "/norb.bin", SIZE, OTA, running=3, rollback=False)  # pinned: ota_0
    flash("ota_0", "a.bin")
    flash("ota_1", "b.bin")
    P("ota_1").set_boot()
    dump("norb")
    esp32.reset()
    r = where()
    esp32.reset()
    return r + " then " + where() + " states=" + states()


# -- a factory app and two OTA apps -------------------------------------------------------

def c_factory():
    esp32.setup(DIR + "/factory.bin", SIZE, FACTORY, running=1)
    flash("factory", "a.bin")
    esp32.reset()
    out = [where()]
    dump("factory")
    a = oserr(P.mark_app_valid_cancel_rollback)
    need(a == (1, "ESP_FAIL"), repr(a))
    flash("ota_0", "b.bin")
    P("ota_0").set_boot()
    dump("factory_set")
    esp32.reset()
    out.append(where() + " states=" + states())
    esp32.reset()
    out.append(where() + " states=" + states())
    P("ota_0").set_boot()
    esp32.reset()
    P.mark_app_valid_cancel_rollback()
    P("factory").set_boot()  # erases otadata
    dump("factory_back")
    esp32.reset()
    out.append(where())
    return "; ".join(out)


# -- MicroPython's stock table: no otadata ------------------------------------------------

def c_no_otadata():
    esp32.setup(DIR + "/stock.bin", SIZE, STOCK, running=1)
    flash("factory", "a.bin")
    flash("ota_0", "b.bin")
    esp32.reset()
    need(oserr(P, P.BOOT) == (ENOENT,), "boot")
    need(oserr(P.mark_app_valid_cancel_rollback) == (NOT_FOUND, "ESP_ERR_NOT_FOUND"), "mark")
    need(oserr(P("ota_0").set_boot) == (NOT_FOUND, "ESP_ERR_NOT_FOUND"), "set_boot")
    need(oserr(P("factory").set_boot) == (NOT_FOUND, "ESP_ERR_NOT_FOUND"), "set_boot factory")
    need(esp32.otadata() is None, "otadata")
    return "running=%s next=%s" % (label(P.RUNNING), P(P.RUNNING).get_next_update().info()[4])


def cut_mode(mode):
    path = DIR + "/cut.bin"
    if mode == "boot":
        esp32.setup(path, SIZE, OTA)
        print("BOOT " + where().split()[0] + " states=" + states())
        return
    esp32.setup(path, SIZE, OTA, running=3)  # pinned to ota_0: esptool writes it
    flash("ota_0", "a.bin")
    esp32.reset()
    flash("ota_1", "b.bin")
    P("ota_1").set_boot()
    if mode == "prepare-rollback":
        esp32.reset()
    print("READY " + where() + " states=" + states())


if len(sys.argv) > 2:
    cut_mode(sys.argv[2])
    sys.exit(0)
check("blank", c_blank)
check("esptool", c_esptool)
check("next_update", c_next_update)
check("refused", c_refused)
check("set_boot", c_set_boot)
check("trial", c_trial)
check("rollback", c_rollback)
check("confirm", c_confirm)
check("back", c_back)
check("bad_image_skipped", c_bad_image_skipped)
check("misuse", c_misuse)
check("no_rollback", c_no_rollback)
check("factory", c_factory)
check("no_otadata", c_no_otadata)
