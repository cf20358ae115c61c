# MicroPython: the esp32 firmware update (mpboot.espota) through the esp32 fake's OTA model
# (tests/device/fakes/esp32.py). Each call is one power-on of DIR/flash.bin, so a sequence of
# calls is a sequence of resets.
# Usage: dev_espota MODE DIR [ARGS]   (DEV_ESPOTA_BIG=1: 1152 KiB OTA partitions, not 192;
# DEV_ESPOTA_TABLE=factory: a factory app before ota_0/ota_1; =stock: MicroPython's stock
# table, no otadata and no OTA apps)
#   init IMAGE [junk]     a blank chip, IMAGE (an ESP app image, no envelope) in ota_0 as
#                         esptool would flash it, then a power-on (the bootloader adopts it);
#                         junk: the rest of ota_0 holds old bytes, not erased flash
#   update IMAGE[+IMAGE2] MARK CHUNK [ptlv] [gap] [short] [nosha] [nodowngrade]
#                         one upload of the signed firmware image IMAGE in CHUNK-byte writes
#                         (with +IMAGE2 a second one in the same power-on, the flags for it),
#                         then finish(MARK) (none, test, permanent). ptlv: the protected TLVs
#                         go with begin() (as mpboot's client sends them); gap: one chunk is
#                         sent at a wrong offset first (the reply must name the expected one);
#                         short: the upload stops 100 bytes early and finish() is called;
#                         nosha: no sha at begin(); badsha: the sha of other bytes;
#                         nodowngrade: the policy refuses downgrades; vendor: the device has a
#                         vendor id (11 * 16) images must carry; confirm: then
#                         espota.confirm_running() in the same power-on (the old firmware).
#   mark MARK [DIGEST]    a power-on, then Firmware.mark(MARK, DIGEST hex): the firmware an
#                         earlier upload left unmarked (SMP state set by its hash)
#   boot                  a power-on: prints where it runs
#   confirm               a power-on (STATUS), then espota.confirm_running() (STATUS again)
#   smp PACKETS           a power-on, then an SMP server (mpboot.smp.server, the esp32 port
#                         adapter) answers each SMP packet of the file PACKETS (one hex line
#                         each): "RSP HEX" per packet (image 4 is the firmware, issue 19)
#   appconfirm            a power-on as mpboot.boot.run makes it for an app on this firmware
#                         (boot.firmware_trial), then mpboot.confirm(): "APPCONFIRM 0|1"
# Prints "RESULT OK slot=N esp=LEN version=V", "RESULT REFUSED image|update CODE [CAUSE]" or
# "RESULT OSERROR ERRNO" (update only),
# and "STATUS running=.. boot=.. states=S0/S1 trial=0|1 run=SHA8" (states as
# esp_ota_get_state_partition: 0 NEW 1 PENDING_VERIFY 2 VALID 4 ABORTED, None: no entry;
# run: the first 8 hex digits of the SHA-256 of the running partition).
import hashlib
import os
import sys
from binascii import hexlify

import esp32

from mpboot import espota
from mpboot.image import ImageError
from mpboot.ports import esp32 as port
from mpboot.slots import Slots
from mpboot.update import MARK_NONE, MARK_PERMANENT, MARK_TEST, UpdateError
import mpboot_keys

MODE = sys.argv[1]
DIR = sys.argv[2]
FLASH = DIR + "/flash.bin"
SIZE = 0x80000
OTA = 0x30000
if os.getenv("DEV_ESPOTA_BIG"):  # room for a 1 MiB-class firmware
    SIZE = 0x280000
    OTA = 0x120000
# An ESP32 OTA table (MicroPython's partitions-4MiB-ota.csv, scaled) with mpboot's data
# partitions for the app (only their state and policy matter here).
TABLE = (
    (1, 0x02, 0x9000, 0x4000, "nvs", False),
    (1, 0x00, 0xD000, 0x2000, "otadata", False),
    (1, 0x01, 0xF000, 0x1000, "phy_init", False),
    (0, 0x10, 0x10000, OTA, "ota_0", False),
    (0, 0x11, 0x10000 + OTA, OTA, "ota_1", False),
    (1, 0x06, 0x10000 + 2 * OTA, 0x2000, "mpboot", False),
    (1, 0x06, 0x12000 + 2 * OTA, 0x1000, "mpb_slot0", False),
    (1, 0x06, 0x13000 + 2 * OTA, 0x1000, "mpb_slot1", False),
)
FIRST = "ota_0"  # where init flashes the first firmware
VARIANT = os.getenv("DEV_ESPOTA_TABLE")
if VARIANT == "factory":  # a factory app and two OTA apps (ESP-IDF's "factory, two OTA")
    SIZE = 0x100000
    FIRST = "factory"
    TABLE = (
        (1, 0x00, 0xD000, 0x2000, "otadata", False),
        (0, 0x00, 0x10000, OTA, "factory", False),
        (0, 0x10, 0x10000 + OTA, OTA, "ota_0", False),
        (0, 0x11, 0x10000 + 2 * OTA, OTA, "ota_1", False),
        (1, 0x06, 0x10000 + 3 * OTA, 0x2000, "mpboot", False),
        (1, 0x06, 0x12000 + 3 * OTA, 0x1000, "mpb_slot0", False),
        (1, 0x06, 0x13000 + 3 * OTA, 0x1000, "mpb_slot1", False),
    )
elif VARIANT == "stock":  # MicroPython's stock table: a factory app, no otadata, no OTA apps
    FIRST = "factory"
    TABLE = (
        (1, 0x02, 0x9000, 0x6000, "nvs", False),
        (0, 0x00, 0x10000, OTA, "factory", False),
        (1, 0x06, 0x10000 + OTA, 0x2000, "mpboot", False),
        (1, 0x06, 0x12000 + OTA, 0x1000, "mpb_slot0", False),
        (1, 0x06, 0x13000 + OTA, 0x1000, "mpb_slot1", False),
    )
MARKS = {"none": MARK_NONE, "test": MARK_TEST, "permanent": MARK_PERMANENT}


def status():
    P = esp32.Partition
    run = P(P.RUNNING)
    h = hashlib.sha256()
    buf = bytearray(4096)
    for n in range(run.info()[3] // 4096):
        run.readblocks(n, buf, 0)
        h.update(buf)
    try:
        boot = P(P.BOOT).info()[4]
    except OSError:
        boot = "-"  # no otadata
    print("STATUS running=%s boot=%s states=%s/%s trial=%d run=%s" % (
        run.info()[4], boot, esp32.ota_state("ota_0"), esp32.ota_state("ota_1"),
        espota.trial(), hexlify(h.digest()).decode()[:8]))


def init(name, junk):
    # junk: the rest of the partition holds old bytes (0x5a), not erased flash
    esp32.setup(FLASH, SIZE, TABLE, running=[p[4] for p in TABLE].index(FIRST))
    part = esp32.Partition(FIRST)
    buf = bytearray(4096)
    with open(name, "rb") as f:
        for n in range(part.info()[3] // 4096):
            for i in range(len(buf)):
                buf[i] = 0x5A if junk else 0xFF
            if not f.readinto(buf) and not junk:
                break
            part.writeblocks(n, buf)
    esp32.reset()


def update(names, mark, chunk, flags):
    esp32.setup(FLASH, SIZE, TABLE)
    areas = port.areas("mpb_slot0", "mpb_slot1", "mpboot", factory=False)
    vendor = b"\x11" * 16 if "vendor" in flags else None  # a device with a vendor id
    slots = Slots(areas[0], areas[1], areas[2], mpboot_keys.KEYS, downgrade="nodowngrade" not in flags,
                  vendor_id=vendor)
    fw = espota.Firmware(slots)
    names = names.split("+")
    for name in names:
        last = name == names[-1]
        upload(fw, name, MARKS[mark], chunk, flags if last else ())
    if "confirm" in flags:
        print("CONFIRM", int(espota.confirm_running()))  # the old firmware, before the reset


def mark(how, digest):
    esp32.setup(FLASH, SIZE, TABLE)
    areas = port.areas("mpb_slot0", "mpb_slot1", "mpboot", factory=False)
    fw = espota.Firmware(Slots(areas[0], areas[1], areas[2], mpboot_keys.KEYS))
    slot, info = fw.mark(MARKS[how], bytes.fromhex(digest) if digest else None)
    print("RESULT OK slot=%d esp=%d version=%s" % (slot, info["esp"]["length"], "%d.%d.%d" % info["version"][:3]))


def upload(fw, name, mark, chunk, flags):
    buf = bytearray(chunk)
    with open(name, "rb") as f:
        total = f.seek(0, 2)
        sha = None
        if "badsha" in flags:
            sha = hashlib.sha256(b"another image").digest()
        elif "nosha" not in flags:
            h = hashlib.sha256()
            f.seek(0)
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(memoryview(buf)[:n])
            sha = h.digest()
        manifest = None
        if "ptlv" in flags:
            import struct

            f.seek(0)
            hdr = f.read(32)
            hs, prot, isz = struct.unpack_from("<HHI", hdr, 8)
            f.seek(hs + isz)
            manifest = f.read(prot)
        end = total - 100 if "short" in flags else total
        f.seek(0)
        n = f.readinto(buf)
        off = fw.begin(total, memoryview(buf)[:n], manifest, sha)
        gap = "gap" in flags
        while off < end:
            f.seek(off)
            n = f.readinto(memoryview(buf)[: min(chunk, end - off)])
            if gap and off:
                gap = False
                got = fw.write(off + n, memoryview(buf)[:n])  # not the expected offset
                if got != off:
                    raise AssertionError("gap answered %d, not %d" % (got, off))
            off = fw.write(off, memoryview(buf)[:n])
    slot, info = fw.finish(mark)
    e = info["esp"]
    print("RESULT OK slot=%d esp=%d version=%s" % (slot, e["length"], "%d.%d.%d" % info["version"][:3]))


try:
    if MODE == "init":
        init(sys.argv[3], sys.argv[4:] == ["junk"])
    elif MODE == "update":
        try:
            update(sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:])
        except ImageError as e:
            print("RESULT REFUSED image", " ".join(str(a) for a in e.args))
        except UpdateError as e:
            print("RESULT REFUSED update", e.args[0])
        except OSError as e:
            print("RESULT OSERROR", e.args[0])
    elif MODE == "mark":
        try:
            mark(sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        except ImageError as e:
            print("RESULT REFUSED image", " ".join(str(a) for a in e.args))
        except UpdateError as e:
            print("RESULT REFUSED update", e.args[0])
    elif MODE == "boot":
        esp32.setup(FLASH, SIZE, TABLE)
    elif MODE == "smp":
        from binascii import unhexlify

        from mpboot.smp.server import Server

        esp32.setup(FLASH, SIZE, TABLE)
        areas = port.areas("mpb_slot0", "mpb_slot1", "mpboot", factory=False)
        srv = Server(Slots(areas[0], areas[1], areas[2], mpboot_keys.KEYS), -1, port)
        with open(sys.argv[3]) as f:
            for line in f:
                rsp = srv.handle(unhexlify(line.strip()))
                print("RSP " + ("-" if rsp is None else hexlify(rsp).decode()))
    elif MODE == "appconfirm":
        import mpboot
        from mpboot import boot

        esp32.setup(FLASH, SIZE, TABLE)
        areas = port.areas("mpb_slot0", "mpb_slot1", "mpboot", factory=False)
        slots = Slots(areas[0], areas[1], areas[2], mpboot_keys.KEYS)
        boot._fw = boot.firmware_trial(port)  # as boot.run() finds it before the app runs
        print("FWTRIAL", int(boot._fw is not None))
        boot.set_booted(slots, 0, None, None, boot.HOW_CONFIRMED)  # a confirmed app runs
        print("APPCONFIRM", int(mpboot.confirm()))
    elif MODE == "confirm":
        esp32.setup(FLASH, SIZE, TABLE)
        status()
        print("CONFIRM", int(espota.confirm_running()))
    else:
        raise ValueError(MODE)
    status()
except esp32.NoBoot:
    print("STATUS noboot")
