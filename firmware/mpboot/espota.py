# The MicroPython firmware itself as an update, on esp32 (issue 19): an MCUboot image of kind
# firmware (MPBOOT_KIND 4) whose payload is the ESP-IDF app image, written into the OTA app
# partition MicroPython does not run from, verified, then handed to ESP-IDF's OTA rollback.
# Format and placement: docs/FORMAT.md "Firmware images (esp32)"; ESP-IDF's side:
# notes/issue19-esp32-ota.md. Not frozen by default (firmware/manifest.py says how).
#
# Placement in the target partition (size S, sectors of 4096): the payload (the ESP app
# image, which the 2nd-stage bootloader loads from offset 0) at offset 0; the envelope (the
# image's hdr_size header bytes, then its TLV areas: E = total - img_size bytes) at
# env = S - ceil(E / 4096) * 4096, the partition's last sectors. The payload's sectors and
# the envelope's never share one: ceil(img_size / 4096) * 4096 <= env, and E <= 16 KiB,
# else the image is refused (E_TOO_LARGE) before anything is written. The verifier reads
# the image through a reader that maps image offsets onto those two places, so what is
# verified is exactly what is in flash.
#
# Power cuts: the running partition is never written, and otadata only by ESP-IDF's own
# set_boot()/mark_app_valid_cancel_rollback() (each an erase then a 32-byte program of one
# otadata sector) and by begin()'s erase of otadata entries that select the target (a
# staged update being replaced): a torn entry fails its CRC, so the bootloader takes the
# other entry, the running firmware's. The old firmware boots until set_boot() has written
# its entry whole; the new one boots (on trial, PENDING_VERIFY) after.
#
# Anti-rollback: there is no firmware floor in the state record (v1 has no room; v2's free
# bytes are mpboot.pairs's). The floor is the running firmware's own envelope: its security
# counter, and its version when the policy refuses downgrades, read from the running
# partition's last sectors and trusted only if it verifies (signature, and the hash over the
# payload in flash). A running firmware without one (flashed by cable) sets no floor.
import struct
from micropython import const

from mpboot import espimg, image
from mpboot.flash import Area
from mpboot.image import ImageError
from mpboot.ports.esp32 import Partition as P  # esp32.Partition (only adapters import esp32)
from mpboot.reader import block_reader
from mpboot.slots import E_CLASS_MISMATCH, E_COUNTER_BELOW_FLOOR, E_DOWNGRADE, E_VENDOR_MISMATCH, E_WRONG_KIND
from mpboot.update import MARK_NONE, MARK_PERMANENT, U_BUSY, U_LENGTH, U_RANGE, U_STATE, UpdateError

KIND_FIRMWARE = const(4)  # MPBOOT_KIND bit of a firmware image
# ImageError code: the payload is not an ESP-IDF app image this chip boots (espimg's check,
# the chip id, or set_boot()'s esp_image_verify refused it); e.args[1] says which: espimg's
# code, -1 another chip's image, or set_boot()'s OSError number.
E_NOT_ESP_APP = const(30)
_SECTOR = const(4096)
_ENV_SECTORS = const(4)  # the envelope takes at most 16 KiB
_OTA_0 = const(0x10)  # app subtypes ota_0..ota_15
_OTA_END = const(0x20)
_CHIP_ID = const(12)  # ESP image header offset of u16 chip_id
_TLV_INFO_MAGIC = const(0x6907)
# otadata (esp_ota_select_entry_t: u32 seq, u8 label[20], u32 state, u32 crc) states
_PENDING_VERIFY = const(1)
_INVALID = const(3)
_ABORTED = const(4)
_SEQ_BLANK = const(0xFFFFFFFF)


def _ver3(v):
    return (v[0], v[1], v[2])


def env_start(size, img_size, env_len):
    # Where the envelope of E = env_len bytes goes in a partition of `size` bytes; raises
    # ImageError(E_TOO_LARGE) unless payload and envelope fit in separate sectors.
    k = (env_len + _SECTOR - 1) // _SECTOR
    env = size - k * _SECTOR
    if k > _ENV_SECTORS or (img_size + _SECTOR - 1) // _SECTOR * _SECTOR > env:
        raise ImageError(image.E_TOO_LARGE)
    return env


def envelope_reader(part, hdr_size, img_size, total, env):
    # A reader (mpboot.reader) of the image as uploaded, from where it lies in `part`.
    pread = block_reader(part, _SECTOR)
    end = hdr_size + img_size

    def read(off, buf):
        mv = memoryview(buf)
        got = 0
        want = min(len(buf), total - off) if off < total else 0
        while got < want:
            o = off + got
            if o < hdr_size:
                p, k = env + o, hdr_size - o
            elif o < end:
                p, k = o - hdr_size, end - o
            else:
                p, k = env + o - img_size, total - o
            k = min(k, want - got)
            n = pread(p, mv[got : got + k])
            got += n
            if n < k:
                break
        return got

    return read


def _otadata():
    # (otadata partition, its two entries) or None (no otadata); an entry is (seq, state,
    # slot) as ESP-IDF's bootloader reads it (bootloader_common_ota_select_valid).
    od = P.find(type=P.TYPE_DATA, subtype=0)
    if not od:
        return None
    od = od[0]
    n = 0  # OTA apps: ota_0, ota_1, ... while consecutive (esp_ota_get_app_partition_count)
    while n < _OTA_END - _OTA_0 and P.find(type=P.TYPE_APP, subtype=_OTA_0 + n):
        n += 1
    from binascii import crc32

    buf = bytearray(32)
    out = []
    for s in (0, 1):
        od.readblocks(s, buf, 0)
        seq, state, crc = struct.unpack_from("<I20xII", buf, 0)
        ok = (seq != _SEQ_BLANK and state != _INVALID and state != _ABORTED and n
              and crc == crc32(struct.pack("<I", seq), 0xFFFFFFFF))
        # (seq, state, the OTA index it selects, -1 for an entry the bootloader ignores)
        out.append((seq, state, ((seq - 1) & 0xFFFFFFFF) % n if ok else -1))
    return od, out


def _index(part):
    # The OTA index of an app partition (-1: factory, or not an OTA app).
    t = part.info()[1]
    return t - _OTA_0 if _OTA_0 <= t < _OTA_END else -1


def trial():
    # True while the running firmware boots on trial (its otadata entry PENDING_VERIFY): the
    # next reset without confirm_running() returns to the previous firmware.
    d = _otadata()
    if d is None:
        return False
    i = _index(P(P.RUNNING))
    for e in d[1]:
        if e[2] == i >= 0 and e[1] == _PENDING_VERIFY:
            return True
    return False


def confirm_running():
    # Keep the running firmware (ESP-IDF: mark_app_valid_cancel_rollback, which marks the
    # *active* otadata entry). Only when that entry is the running firmware's: after a
    # firmware update was marked (set_boot) and before its reset, the active entry is the new
    # one, and confirming it from the old firmware would skip its trial. Returns True when
    # the running firmware is (now) the confirmed one, False when there is nothing to
    # confirm (a factory app, no otadata) or an update waits for its reset.
    try:
        if P(P.BOOT).info() != P(P.RUNNING).info():
            return False
        P.mark_app_valid_cancel_rollback()
    except OSError:
        return False
    return True


def installed(part, trust, buf):
    # The verified info of the firmware envelope in `part`'s last sectors, or None (none
    # there, or it does not verify over the payload in flash: an image flashed by cable).
    size = part.info()[3]
    hdr = bytearray(image.HEADER_SIZE)
    for k in range(1, _ENV_SECTORS + 1):
        env = size - k * _SECTOR
        try:
            part.readblocks(0, hdr, env)
            info = {}
            prot = image.parse_header(hdr, size, info)
            h = info["hdr_size"]
            n = info["img_size"]
            tot = hdr[:4]
            part.readblocks(0, tot, env + h + prot)
            magic, tot = struct.unpack("<HH", tot)
            e = h + prot + tot
            if magic != _TLV_INFO_MAGIC or env_start(size, n, e) != env:
                continue
            info = image.verify(envelope_reader(part, h, n, n + e, env), trust, n + e, buf)
            if info.get("kind") == KIND_FIRMWARE:
                return info
        except (ImageError, OSError):
            pass
    return None


class Firmware:
    # The firmware writer: Updater's shapes (begin/write/finish/abort, total/pos/sha/slot,
    # target()), for SMP upload `image: 4`. slots: the app's Slots (its trust state, its
    # vendor/class/downgrade policy and its verify buffer are used; its state is not).
    def __init__(self, slots):
        self.slots = slots
        self.total = -1
        self.pos = 0
        self.sha = None
        self.slot = -1
        self.at = 4  # its SMP image number (mpboot.smp.img_mgmt: 0-3 are the app's and stage 1's slots)
        self.run_info = False  # the running firmware's envelope info, once read (running())
        self.run = P(P.RUNNING)

    def partition(self):
        # The OTA app partition an update goes to (never the running one).
        return self.run.get_next_update()

    def target(self):
        return _index(self.partition())

    def running(self):
        # The verified envelope info of the firmware MicroPython runs (None: it has none, as
        # one flashed by cable), read once: the anti-rollback floor, and for an SMP state read.
        if self.run_info is False:
            self.run_info = installed(self.run, self.slots.trust, self.slots.buf)
        return self.run_info

    def _policy(self, info, tlvs):
        # tlvs: the protected TLVs were read (else only the header's version is known).
        sl = self.slots
        r = self.running()
        counter = (r["security_counter"] or 0) if r else 0
        version = r["version"] if r else None
        if tlvs:
            if sl.vendor_id is not None and info["vendor_id"] != sl.vendor_id:
                raise ImageError(E_VENDOR_MISMATCH)
            if sl.class_id is not None and info["class_id"] != sl.class_id:
                raise ImageError(E_CLASS_MISMATCH)
            if (info["security_counter"] or 0) < counter:
                raise ImageError(E_COUNTER_BELOW_FLOOR)
            if info.get("kind", 1) != KIND_FIRMWARE:
                raise ImageError(E_WRONG_KIND)
        if not sl.downgrade and version is not None and _ver3(info["version"]) < _ver3(version):
            raise ImageError(E_DOWNGRADE)

    def _busy(self, t):
        # U_BUSY while the running firmware is on trial (the target holds the firmware a
        # reset returns to). Returns the otadata sectors whose entries select OTA index t
        # (an update marked earlier and not yet run): begin() erases them before it writes,
        # as esp_ota_begin does, so a half-written target is never the bootloader's choice.
        d = _otadata()
        if d is None:
            return ()
        entries = d[1]
        r = _index(self.run)
        for e in entries:
            if e[2] == r >= 0 and e[1] == _PENDING_VERIFY:
                raise UpdateError(U_BUSY)
        return [s for s in (0, 1) if t >= 0 and entries[s][2] == t]

    def begin(self, total, header, manifest=None, sha=None):
        # As Updater.begin; returns 0 (no persisted resume: an upload cut by a reset starts
        # again; within one boot, write() answers the offset it expects).
        self.total = -1
        self.sha = None
        part = self.partition()
        pi = part.info()
        if pi[2] == self.run.info()[2]:
            raise UpdateError(U_BUSY)  # one OTA partition, and MicroPython runs from it
        if pi[5]:
            raise ValueError("encrypted")
        t = _index(part)
        unstage = self._busy(t)
        if len(header) < image.HEADER_SIZE:
            raise ImageError(image.E_TRUNCATED)
        size = pi[3]
        info = {}
        prot = image.parse_header(header, size, info)
        h = info["hdr_size"]
        n = info["img_size"]
        if total < h + n + prot + 4 or total > size:
            raise UpdateError(U_LENGTH)
        env = env_start(size, n, total - n)
        if manifest is not None:
            if len(manifest) != prot:
                raise ImageError(image.E_BAD_TLV)
            info["security_counter"] = info["vendor_id"] = info["class_id"] = None
            if prot:
                image.walk_protected(manifest, info)
        self._policy(info, manifest is not None)
        if unstage:
            od = _otadata()[0]
            for s in unstage:
                od.ioctl(6, s)
        self.part = part
        self.area = Area(part)
        self.slot = t
        self.h = h
        self.n = n
        self.env = env
        self.total = total
        self.sha = bytes(sha) if sha is not None else None
        self.pos = 0
        self.erased = 0  # payload bytes [0, erased) are erased (whole sectors)
        self.env_erased = False
        return 0

    def _place(self, off):
        # (partition offset, bytes until the region ends) of image offset off.
        h = self.h
        end = h + self.n
        if off < h:
            return self.env + off, h - off
        if off < end:
            return off - h, end - off
        return self.env + off - self.n, self.total - off

    def _prepare(self, p, k):
        a = self.area
        if p >= self.env:
            if not self.env_erased:
                a.erase(self.env, a.size - self.env)
                self.env_erased = True
            return
        while self.erased < p + k:
            if not a.is_erased(self.erased, _SECTOR):
                a.erase(self.erased, _SECTOR)
            self.erased += _SECTOR

    def write(self, off, data):
        # As Updater.write: returns the offset expected next.
        if self.total < 0:
            raise UpdateError(U_STATE)
        if off != self.pos:
            return self.pos
        if off + len(data) > self.total:
            raise UpdateError(U_RANGE)
        mv = memoryview(data)
        try:
            while len(mv):
                p, k = self._place(off)
                k = min(k, len(mv))
                self._prepare(p, k)
                self.area.write(p, mv[:k])
                mv = mv[k:]
                off += k
        except Exception:
            self.total = -1
            raise
        self.pos = off
        return off

    def finish(self, mark=MARK_NONE):
        # Verifies the image in flash (envelope: signature, kind, policy, floor; payload:
        # espimg's check, chip id) and the client's sha, then marks it: MARK_NONE nothing,
        # MARK_TEST set_boot() (one trial boot: ESP-IDF rolls back unless the new firmware
        # calls confirm_running()), MARK_PERMANENT set_boot() and ESP-IDF's valid mark on
        # its entry at once (no trial; only the bootloader's image check falls back).
        # Returns (OTA index, info); info["esp"] is espimg's. The session ends either way.
        if self.total < 0 or self.pos != self.total:
            raise UpdateError(U_STATE)
        total = self.total
        self.total = -1
        a = self.area
        a.sync()
        sl = self.slots
        buf = sl.buf
        read = envelope_reader(self.part, self.h, self.n, total, self.env)
        info = image.verify(read, sl.trust, total, buf)
        if info["total_size"] != total:
            raise UpdateError(U_LENGTH)  # the announced length is not the image's
        self._policy(info, True)
        if self.sha is not None:
            import hashlib

            h = hashlib.sha256()
            off = 0
            while off < total:
                k = read(off, buf)
                h.update(memoryview(buf)[: min(k, total - off)])
                off += k
            if h.digest() != self.sha:
                raise ImageError(image.E_HASH_MISMATCH)
        self._payload(self.part, self.n, info)
        self._set(self.part, mark)
        return self.slot, info

    def _payload(self, part, n, info):
        # espimg's check of the app image at offset 0 of part (within the n payload bytes),
        # the running firmware's chip; info["esp"] = espimg's info.
        buf = self.slots.buf
        try:
            esp = espimg.check(block_reader(part, _SECTOR), n, buf)
        except espimg.EspImageError as e:
            raise ImageError(E_NOT_ESP_APP, e.args[0])
        hdr = memoryview(buf)[:24]
        self.run.readblocks(0, hdr, 0)
        if hdr[0] == 0xE9 and struct.unpack_from("<H", hdr, _CHIP_ID)[0] != esp["chip_id"]:
            raise ImageError(E_NOT_ESP_APP, -1)
        info["esp"] = esp

    def _set(self, part, mark):
        if mark == MARK_NONE:
            return
        try:
            part.set_boot()
        except OSError as e:
            if e.args[0] == -0x1503:  # ESP_ERR_OTA_VALIDATE_FAILED: esp_image_verify said no
                raise ImageError(E_NOT_ESP_APP, e.args[0])
            raise
        if mark == MARK_PERMANENT:
            P.mark_app_valid_cancel_rollback()

    def mark(self, mark, digest=None):
        # Marks the firmware an earlier upload left in the target partition (finish with
        # MARK_NONE; SMP state set by its hash): verified again in place (envelope, policy,
        # payload; digest: the image's SHA-256, which must match). Returns (OTA index, info).
        # ImageError(E_BAD_MAGIC) when no firmware image verifies there.
        part = self.partition()
        if part.info()[2] == self.run.info()[2]:
            raise UpdateError(U_BUSY)
        self._busy(-1)
        info = installed(part, self.slots.trust, self.slots.buf)
        if info is None:
            raise ImageError(image.E_BAD_MAGIC)
        if digest is not None and info["digest"] != bytes(digest):
            raise ImageError(image.E_HASH_MISMATCH)
        self._policy(info, True)
        self._payload(part, info["img_size"], info)
        self._set(part, mark)
        return _index(part), info

    def abort(self):
        self.total = -1
