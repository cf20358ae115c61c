# Fake of MicroPython's esp32 module (Partition only) for the unix port, over a file-backed
# NOR chip (mpboot.ports.nor_sim.NorFlash, 4096-byte sectors), with ESP-IDF's OTA bookkeeping
# (an ESP32, MicroPython v1.2x on ESP-IDF v5.2-v5.4, rollback built in as MP's
# boards/sdkconfig.base has it). Sources (research in notes/issue19-esp32-ota.md, sections 1,
# 2 and 4): ports/esp32/esp32_partition.c, mphalport.c check_esp_err; ESP-IDF
# components/esp_partition/partition_target.c, app_update/esp_ota_ops.c,
# bootloader_support/src/bootloader_utility.c, bootloader_common*.c, esp_image_format.c.
#
# Modelled:
# - The partition table (a setup() argument, not in flash), Partition(label / BOOT / RUNNING),
#   find(), info(), repr, readblocks/writeblocks/ioctl at block size 4096 (3-arg writeblocks
#   erases the covered sectors first, 4-arg only programs), get_next_update(), set_boot(),
#   Partition.mark_app_valid_cancel_rollback().
# - Errors as check_esp_err raises them: OSError(-code, "ESP_ERR_NAME") (-258 INVALID_ARG,
#   -260 INVALID_SIZE, -261 NOT_FOUND, -5379 OTA_VALIDATE_FAILED), OSError(1, "ESP_FAIL");
#   a NULL partition is OSError(ENOENT); a bad int id ValueError.
# - otadata as real bytes in the chip: entries {u32 ota_seq, u8 seq_label[20], u32 ota_state,
#   u32 crc} at 0 and 0x1000 of the data/ota (subtype 0) partition; crc = esp_rom_crc32_le(
#   UINT32_MAX, &ota_seq, 4); each rewrite is a sector erase then a 32-byte program, so
#   nor_sim power cuts tear it as they would the board's. set_boot() writes before returning
#   (esp_rewrite_ota_data, v5.2-v5.4: next seq into the other sector; state NEW, UNDEFINED
#   with rollback=False); set_boot() on the factory app erases otadata.
# - set_boot() and the boot check the app image (esp_image_verify, ESP32 rules): magic 0xE9,
#   chip id 0, at most 16 segments, each data_len a multiple of 4 and inside the partition,
#   flash-cache-mapped segments (IROM 0x400D0000-0x40400000, DROM 0x3F400000-0x3F800000) at a
#   flash offset equal to load_addr modulo 64 KiB, the XOR checksum (seed 0xEF, at the end of
#   the 16-byte padding), the appended SHA-256 when hash_appended is 1, the image fits the
#   partition. A failure is OSError(-5379, "ESP_ERR_OTA_VALIDATE_FAILED").
# - A power-on (setup(), or reset(): the chip is reopened from its file) runs the 2nd-stage
#   bootloader: no otadata -> factory; every PENDING_VERIFY entry becomes ABORTED (rollback);
#   both entries invalid -> factory, else ota_0 (and, when both are blank or bad-crc,
#   {seq index+1, VALID} into sector 0 once an OTA app loads); otherwise the active entry
#   (crc-valid, not INVALID/ABORTED, highest seq) picks ota_{(seq-1) % count}, NEW ->
#   PENDING_VERIFY; then the image check, falling back to lower indices down to factory,
#   then higher OTA indices (no otadata change). Nothing bootable raises NoBoot (the board
#   would reset-loop). RUNNING is the partition chosen, until the next power-on.
# - Stricter than silicon where it helps tests: programming a 1 over a 0 raises OSError(EIO)
#   (nor_sim) where SPI flash would silently keep the 0.
# Not modelled: block sizes below 4096 (the port then caches a sector for simple-protocol
# writes); chip revision and eFuse block revision windows; secure boot (signature block),
# flash encryption of otadata/apps (encrypted partitions only get 16-byte write units);
# anti-rollback eFuses; the test app partition; the bootloader's RAM-overlap load checks;
# ESP-IDF master's same-slot set_boot variant; esp_ota_begin/end and the other IDF calls MP
# does not expose. Nothing stops writeblocks on the running partition (MP does not either).
#
#   import esp32
#   esp32.setup(path, chip_size, table, running=None, rollback=True)
#       table: [(type, subtype, addr, size, label, encrypted)]; running=None: the bootloader
#       picks RUNNING; running=index: RUNNING is table[index] and the bootloader step is
#       skipped (a board whose flash holds no image the fake could check)
#   esp32.reset()        # power cycle with the same table, bootloader step included
#   esp32.otadata()      # the two raw entries (seq, label, state, crc), None without otadata
#   esp32.ota_state(label)   # as esp_ota_get_state_partition: the state of the crc-valid
#                            # entry selecting that partition, else None
import binascii
import hashlib
import os
import struct
from micropython import const

from mpboot.ports.nor_sim import NorFlash

_NATIVE = const(4096)  # NATIVE_BLOCK_SIZE_BYTES = SPI_FLASH_SEC_SIZE
_ESP_FAIL = const(1)  # -ESP_FAIL
_INVALID_ARG = const(-258)  # -ESP_ERR_INVALID_ARG
_INVALID_SIZE = const(-260)  # -ESP_ERR_INVALID_SIZE
_NOT_FOUND = const(-261)  # -ESP_ERR_NOT_FOUND
_VALIDATE_FAILED = const(-5379)  # -ESP_ERR_OTA_VALIDATE_FAILED
_ENOENT = const(2)
_EINVAL = const(22)
_ANY = const(0xFF)  # ESP_PARTITION_SUBTYPE_ANY
_TYPE_APP = const(0)
_TYPE_DATA = const(1)
_FACTORY = const(0x00)  # app subtype
_OTA_0 = const(0x10)  # app subtypes ota_0..ota_15
_OTA_MAX = const(0x20)
_OTADATA = const(0x00)  # data subtype "ota"
_FACTORY_INDEX = const(-1)  # bootloader_utility.c

# esp_ota_img_states_t
NEW = const(0)
PENDING_VERIFY = const(1)
VALID = const(2)
INVALID = const(3)
ABORTED = const(4)
UNDEFINED = const(0xFFFFFFFF)

_ENTRY = "<I20sII"  # esp_ota_select_entry_t: ota_seq, seq_label, ota_state, crc
_ENTRY_SIZE = const(32)
_SEQ_BLANK = const(0xFFFFFFFF)

_IMG_MAGIC = const(0xE9)
_CHIP_ID = const(0)  # ESP32 (CONFIG_IDF_FIRMWARE_CHIP_ID)
_MAX_SEGMENTS = const(16)
_SIXTEEN_MB = const(0x1000000)
_MMU_PAGE = const(0x10000)
_CHECKSUM_SEED = const(0xEF)
_HASH_LEN = const(32)
_CHUNK = const(256)

_NAMES = {_ESP_FAIL: "ESP_FAIL", _INVALID_ARG: "ESP_ERR_INVALID_ARG",
          _INVALID_SIZE: "ESP_ERR_INVALID_SIZE", _NOT_FOUND: "ESP_ERR_NOT_FOUND",
          _VALIDATE_FAILED: "ESP_ERR_OTA_VALIDATE_FAILED"}

_chip = None
_table = ()
_running = None  # the table row MicroPython runs from (per boot)
_config = None  # (path, size, table, rollback) for reset()


class NoBoot(Exception):
    # The bootloader found no app that loads: a real board resets in a loop.
    pass


def _err(code):
    # check_esp_err: OSError(-err, esp_err_to_name(err)); code is -err already.
    return OSError(code, _NAMES[code])


def setup(path=None, size=0x40000, table=(), running=None, rollback=True):
    # A power-on. path defaults to $MPBOOT_FAKE_FLASH.
    global _chip, _table, _running, _config
    if _chip is not None:
        _chip.close()
    path = path or os.getenv("MPBOOT_FAKE_FLASH")
    _chip = NorFlash(path, size, _NATIVE, 1)
    for p in table:
        if p[2] % _NATIVE or p[3] % _NATIVE or p[2] + p[3] > size:
            raise ValueError("partition table")
    _table = table
    _config = (path, size, table, rollback)
    _running = table[running] if running is not None else _bootloader(rollback)


def reset():
    # A power cycle (or machine.reset(): the same for the bootloader): the chip is reopened
    # from its file and the bootloader chooses what runs.
    setup(*_config[:3], running=None, rollback=_config[3])


def chip():
    return _chip


def _match(p, type, subtype, label):
    return p[0] == type and subtype in (_ANY, p[1]) and label in (None, p[4])


def _first(type, subtype, label=None):
    for p in _table:
        if _match(p, type, subtype, label):
            return p
    return None


def _check(p, off, n):
    # esp_partition_read/write/erase_range range checks, in their order.
    if off > p[3]:
        raise _err(_INVALID_ARG)
    if off + n > p[3]:
        raise _err(_INVALID_SIZE)


def _erase(p, off, n):
    _check(p, off, n)
    if n % _NATIVE:
        raise _err(_INVALID_SIZE)
    if off % _NATIVE:
        raise _err(_INVALID_ARG)
    for i in range(n // _NATIVE):
        _chip.ioctl(6, (p[2] + off) // _NATIVE + i)


def _write(p, off, buf):
    _check(p, off, len(buf))
    if p[5] and (off | len(buf)) % 16:
        raise _err(_INVALID_ARG)  # esp_flash_write_encrypted: 16-byte units
    _chip.writeblocks(0, buf, p[2] + off)


def _read(p, off, buf):
    _check(p, off, len(buf))
    _chip.readblocks(0, buf, p[2] + off)


# -- OTA apps and otadata ------------------------------------------------------------------

def _ota_apps():
    # ota_0, ota_1, ... while consecutive (esp_ota_get_app_partition_count).
    out = []
    for t in range(_OTA_0, _OTA_MAX):
        p = _first(_TYPE_APP, t)
        if p is None:
            break
        out.append(p)
    return out


def _index_part(index):
    # bootloader_utility.c index_to_partition: -1 factory, n ota_n (None if absent).
    if index == _FACTORY_INDEX:
        return _first(_TYPE_APP, _FACTORY)
    return _first(_TYPE_APP, _OTA_0 + index) if index < 16 else None


def _crc(seq):
    return binascii.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


def _read_entries(od):
    out = []
    buf = bytearray(_ENTRY_SIZE)
    for sec in (0, 1):
        _read(od, sec * _NATIVE, buf)
        out.append(list(struct.unpack(_ENTRY, buf)))
    return out


def _write_entry(od, sec, e):
    # rewrite_ota_seq / the bootloader's write_otadata: erase the sector, program 32 bytes.
    _erase(od, sec * _NATIVE, _NATIVE)
    _write(od, sec * _NATIVE, struct.pack(_ENTRY, e[0], e[1], e[2], e[3]))


def _unusable(e):
    # bootloader_common_ota_select_invalid (no crc check)
    return e[0] == _SEQ_BLANK or e[2] in (INVALID, ABORTED)


def _valid(e):
    return not _unusable(e) and e[3] == _crc(e[0])


def _active(entries):
    # bootloader_common_get_active_otadata: the valid entry with the larger seq (tie: 0).
    v0, v1 = _valid(entries[0]), _valid(entries[1])
    if v0 and v1:
        return 0 if entries[0][0] >= entries[1][0] else 1
    return 0 if v0 else 1 if v1 else -1


def _slot(seq, n):
    return ((seq - 1) & 0xFFFFFFFF) % n


def _default_boot():
    # esp_ota_ops.c find_default_boot_partition: factory, else the first OTA app.
    p = _first(_TYPE_APP, _FACTORY)
    if p is None:
        apps = _ota_apps()
        p = apps[0] if apps else None
    return p


def _boot_partition():
    # esp_ota_get_boot_partition
    od = _first(_TYPE_DATA, _OTADATA)
    if od is None:
        return None
    entries = _read_entries(od)
    apps = _ota_apps()
    if (_unusable(entries[0]) and _unusable(entries[1])) or not apps:
        return _default_boot()
    a = _active(entries)
    if a < 0:
        return _default_boot()
    return apps[_slot(entries[a][0], len(apps))]


def otadata():
    od = _first(_TYPE_DATA, _OTADATA)
    if od is None:
        return None
    return tuple(tuple(e) for e in _read_entries(od))


def ota_state(label):
    od = _first(_TYPE_DATA, _OTADATA)
    apps = _ota_apps()
    if od is None or not apps:
        return None
    for e in _read_entries(od):
        if e[0] != _SEQ_BLANK and e[3] == _crc(e[0]) and apps[_slot(e[0], len(apps))][4] == label:
            return e[2]
    return None


# -- the app image check (esp_image_verify, ESP32) ------------------------------------------

def _mapped(addr):
    return 0x400D0000 <= addr < 0x40400000 or 0x3F400000 <= addr < 0x3F800000


def image_ok(p):
    # Is there an app image at offset 0 of partition p that esp_image_verify accepts?
    if p[3] > _SIXTEEN_MB:
        return False
    hdr = bytearray(24)
    try:
        _read(p, 0, hdr)
        if hdr[0] != _IMG_MAGIC or hdr[1] > _MAX_SEGMENTS:
            return False
        if struct.unpack("<H", hdr[12:14])[0] != _CHIP_ID:
            return False
        h = hashlib.sha256(hdr)
        off = 24
        xor = _CHECKSUM_SEED
        seg = bytearray(8)
        buf = bytearray(_CHUNK)
        for _ in range(hdr[1]):
            _read(p, off, seg)
            h.update(seg)
            addr, n = struct.unpack("<II", seg)
            off += 8
            if n % 4 or n >= _SIXTEEN_MB or off + n > p[3]:
                return False
            if _mapped(addr) and (p[2] + off) % _MMU_PAGE != addr % _MMU_PAGE:
                return False
            while n:
                m = min(n, _CHUNK)
                mv = memoryview(buf)[:m]
                _read(p, off, mv)
                h.update(mv)
                for b in mv:
                    xor ^= b
                off += m
                n -= m
        end = (off + 16) & ~15  # zero padding, the checksum is the last byte
        if end > p[3]:
            return False
        pad = memoryview(buf)[: end - off]
        _read(p, off, pad)
        h.update(pad)
        if pad[-1] != xor:
            return False
        if hdr[23] == 1:
            if end + _HASH_LEN > p[3]:
                return False
            want = bytearray(_HASH_LEN)
            _read(p, end, want)
            return h.digest() == want
        return True
    except OSError:  # a read past the partition: the image does not fit
        return False


# -- the 2nd-stage bootloader -----------------------------------------------------------------

def _bootloader(rollback):
    # bootloader_utility_get_selected_boot_partition, then bootloader_utility_load_boot_image.
    od = _first(_TYPE_DATA, _OTADATA)
    apps = _ota_apps()
    initial = False  # ota_has_initial_contents
    if od is None:
        start = _FACTORY_INDEX
    else:
        entries = _read_entries(od)
        if rollback:
            for sec in (0, 1):
                if entries[sec][2] == PENDING_VERIFY:
                    entries[sec][2] = ABORTED
                    _write_entry(od, sec, entries[sec])
        if (_unusable(entries[0]) and _unusable(entries[1])) or not apps:
            if _first(_TYPE_APP, _FACTORY) is not None:
                start = _FACTORY_INDEX
            else:
                start = 0
                initial = all(e[0] == _SEQ_BLANK or e[3] != _crc(e[0]) for e in entries)
        else:
            a = _active(entries)
            if a < 0:
                start = _FACTORY_INDEX  # factory, or "try all partitions"
            else:
                start = _slot(entries[a][0], len(apps))
                if rollback and entries[a][2] == NEW:
                    entries[a][2] = PENDING_VERIFY
                    _write_entry(od, a, entries[a])
    order = list(range(start, _FACTORY_INDEX - 1, -1)) + list(range(start + 1, len(apps)))
    for index in order:
        p = _index_part(index)
        if p is not None and image_ok(p):
            if index > _FACTORY_INDEX and initial:  # set_actual_ota_seq
                s = index + 1
                _write_entry(od, 0, (s, b"\xff" * 20, VALID, _crc(s)))
            return p
    raise NoBoot("no bootable app partition")


# -- esp32.Partition ------------------------------------------------------------------------

class Partition:
    BOOT = 0
    RUNNING = 1
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, id, block_size=_NATIVE):
        if isinstance(id, tuple):  # from find() and the OTA calls: an esp_partition_t
            p = id
        elif isinstance(id, int):
            if id == 0:
                p = _boot_partition()
            elif id == 1:
                p = _running
            else:
                raise ValueError
        else:
            p = _first(_TYPE_APP, _ANY, id) or _first(_TYPE_DATA, _ANY, id)
        if p is None:
            raise OSError(_ENOENT)
        self._p = p
        self._bs = block_size

    @staticmethod
    def find(type=0, subtype=_ANY, label=None, block_size=_NATIVE):
        out = []
        for p in _table:
            if _match(p, type, subtype, label):
                out.append(Partition(p, block_size))
        return out

    def info(self):
        p = self._p
        return (p[0], p[1], p[2], p[3], p[4], bool(p[5]))

    def __repr__(self):
        p = self._p
        return "<Partition type=%u, subtype=%u, address=%u, size=%u, label=%s, encrypted=%u>" % (
            p[0], p[1], p[2], p[3], p[4], 1 if p[5] else 0)

    def readblocks(self, n, buf, off=0):
        _read(self._p, n * self._bs + off, buf)

    def writeblocks(self, n, buf, off=None):
        p = self._p
        a = n * self._bs
        if off is None:
            _erase(p, a, len(buf))
        else:
            a += off
        _write(p, a, buf)

    def ioctl(self, op, arg):
        if op in (1, 2, 3):
            return 0
        if op == 4:
            return self._p[3] // self._bs
        if op == 5:
            return self._bs
        if op == 6:
            if self._bs != _NATIVE:
                return -_EINVAL
            _erase(self._p, arg * _NATIVE, _NATIVE)
            return 0
        return None

    def set_boot(self):
        # esp_ota_set_boot_partition (v5.2-v5.4)
        p = self._p
        if not image_ok(p):
            raise _err(_VALIDATE_FAILED)
        if p[0] != _TYPE_APP:
            raise _err(_INVALID_ARG)
        od = _first(_TYPE_DATA, _OTADATA)
        if p[1] == _FACTORY:
            if od is None:
                raise _err(_NOT_FOUND)
            _erase(od, 0, od[3])
            return
        # esp_rewrite_ota_data
        if od is None:
            raise _err(_NOT_FOUND)
        apps = _ota_apps()
        slot = p[1] - _OTA_0
        if slot >= len(apps):
            raise _err(_INVALID_ARG)
        n = len(apps)
        entries = _read_entries(od)
        a = _active(entries)
        state = NEW if _config[3] else UNDEFINED
        if a >= 0:
            seq = (slot + 1) % n
            while entries[a][0] > seq:
                seq += n
            sec = 1 - a
        else:
            seq = slot + 1
            sec = 0
        e = entries[sec]
        _write_entry(od, sec, (seq, e[1], state, _crc(seq)))

    def get_next_update(self):
        # esp_ota_get_next_update_partition: the OTA app after this one, wrapping to the
        # first; the first when this is not an OTA app.
        apps = [p for p in (_first(_TYPE_APP, t) for t in range(_OTA_0, _OTA_MAX)) if p]
        if not apps:
            raise OSError(_ENOENT)
        for i in range(len(apps) - 1):
            if apps[i] == self._p:
                return Partition(apps[i + 1])
        return Partition(apps[0])

    @classmethod
    def mark_app_valid_cancel_rollback(cls):
        # esp_ota_mark_app_valid_cancel_rollback = esp_ota_current_ota_is_workable(true)
        od = _first(_TYPE_DATA, _OTADATA)
        if od is None:
            raise _err(_NOT_FOUND)
        entries = _read_entries(od)
        a = _active(entries)
        if a < 0 or not _ota_apps():
            raise _err(_ESP_FAIL)  # "Running firmware is factory"
        if entries[a][2] != VALID:
            entries[a][2] = VALID
            _write_entry(od, a, entries[a])
