# Port adapter for the esp32 port: the slots and the state are partitions (esp32.Partition).
#
# What the port gives (MicroPython ports/esp32/esp32_partition.c and mphalport.c, ESP-IDF
# components/esp_partition/partition_target.c):
# - esp32.Partition(label) looks the label up among app partitions, then data partitions;
#   OSError(ENOENT) if none. Partition(Partition.RUNNING) is the running app. info() is
#   (type, subtype, address, size, label, encrypted); TYPE_APP = 0, TYPE_DATA = 1.
# - ioctl(5) is 4096 (NATIVE_BLOCK_SIZE_BYTES, the SPI flash sector) unless the object was
#   made with a block_size argument; ioctl(6, n) erases exactly 4096 bytes at n * 4096
#   (esp_partition_erase_range) and returns -EINVAL for any other block size. So with the
#   default block size the block is the erase unit.
# - readblocks/writeblocks(n, buf, off) take any byte offset and length (esp_flash_read and
#   esp_flash_write); with off, writeblocks only programs. Out of range raises OSError(-258)
#   (ESP_ERR_INVALID_ARG, offset past the end) or OSError(-260) (ESP_ERR_INVALID_SIZE).
# - Encrypted partitions program 16-byte units (esp_flash_write_encrypted) and read erased
#   flash back as decrypted noise, not 0xFF, so the erased checks of Area cannot work: refused.
# - There is no Python-level mmap of a partition: only the "romfs" partition vfs.rom_ioctl
#   hands out has the buffer protocol (esp_partition_mmap). mapped() is None, so the boot
#   copies the image to RAM.
# - machine.WDT(timeout=ms) is the ESP-IDF task watchdog; older firmware passes whole seconds
#   (timeout // 1000, ValueError below 1000 ms), so the timeout is rounded up to seconds.
#   machine.unique_id() is the 6-byte base MAC; machine.reset() is esp_restart().
import esp32
import machine
from micropython import const

from mpboot.flash import Area
from mpboot.ports import BleLink, UartLink

_SECTOR = const(4096)  # erase unit and block size (ioctl 5) of a partition
_TYPE_DATA = const(1)

# The partition API itself, for the firmware update through ESP-IDF's OTA app partitions
# (mpboot.espota: set_boot, get_next_update, mark_app_valid_cancel_rollback, otadata), so
# that only this adapter imports the port's native module.
Partition = esp32.Partition


def _part(label):
    p = esp32.Partition(label)
    if p.info()[5]:
        raise ValueError("encrypted")
    if p.ioctl(5, 0) != _SECTOR:
        raise ValueError("block size")
    return p


def areas(slot0="ota_0", slot1="ota_1", state="mpboot", factory=True, trust=False, stage1=None):
    # Slots are whole partitions (app or data); the state is the first two sectors of a data
    # partition (at least 16 KiB) and the factory area its sectors 2 and 3 (factory=False:
    # none, three areas, an 8 KiB partition will do). trust=True: a trust area in its
    # sectors 4 and 5 (a fifth area, docs/KEYS.md; the partition must be at least 24 KiB);
    # off by default, so boards with a 16 KiB partition keep their layout. Refuses the
    # partition MicroPython runs from and partitions used twice.
    # stage1=(label0, label1), e.g. ("mpb1_0", "mpb1_1"): stage 1's two slots (docs/BOOT.md
    # "Two stages"), whole data partitions (not app ones, which ESP-IDF's OTA writes: an
    # mpboot.espota firmware update would land there), under the same refusals; seven areas
    # then (None for a missing factory or trust area).
    run = esp32.Partition(esp32.Partition.RUNNING).info()[2]
    p = [_part(slot0), _part(slot1), _part(state)]
    if stage1:
        p.append(_part(stage1[0]))
        p.append(_part(stage1[1]))
    for i in range(2, len(p)):
        if p[i].info()[0] != _TYPE_DATA:
            raise ValueError("state not a data partition" if i == 2 else "stage1 not a data partition")
    at = [x.info()[2] for x in p]
    if run in at:
        raise ValueError("running partition")
    for i in range(len(at)):
        if at[i] in at[i + 1 :]:
            raise ValueError("same partition")
    ps = p[2]
    a = (Area(p[0]), Area(p[1]), Area(ps, 0, 2 * _SECTOR),
         Area(ps, 2 * _SECTOR, 2 * _SECTOR) if factory else None)
    t = Area(ps, 4 * _SECTOR, 2 * _SECTOR) if trust else None
    if stage1:
        return a + (t, Area(p[3]), Area(p[4]))
    if trust:
        return a + (t,)
    return a if factory else a[:3]


def mapped(area):
    return None


# This port's MicroPython firmware can itself be updated (mpboot.espota, ESP-IDF's OTA,
# docs/PORTING.md): boot and img_mgmt use it when the build froze it (manifest ota=True).
FIRMWARE = True


def watchdog(timeout_ms):
    return machine.WDT(timeout=(timeout_ms + 999) // 1000 * 1000)


def reset():
    machine.reset()


def unique_id():
    return bytes(machine.unique_id())


def uart(id, baudrate=115200, rxbuf=11204, **pins):
    # SMP link on machine.UART(id) (tx=, rx= pins in **pins). UART 0 carries the REPL: use 1
    # or 2. rxbuf: the driver's receive ring buffer (more than its 128-byte FIFO), which holds
    # the requests in flight while one is handled: buf_count *
    # mpboot.transport.uart.frame_bytes(buf_size) for a pipelining client.
    return UartLink(machine.UART(id, baudrate=baudrate, rxbuf=rxbuf, timeout=0, **pins))


def ble(name="mpboot"):
    # SMP over BLE (mpboot.transport.ble), advertised as name. Every build but the
    # ESP32-S2's (no radio) has bluetooth (NimBLE); it is imported here, not at the top, so
    # a build without it still boots and serves the UART.
    import bluetooth

    return BleLink(bluetooth.BLE(), name)


def udp(port=1337, host="0.0.0.0", allow=None):
    # SMP over UDP (mpboot.transport.udp) on port (1337: Zephyr's default), bound to host
    # (default every interface). The app brings the network up first (network.WLAN, on esp32
    # boards); a board in recovery has none, so the UART and BLE stay the recovery path.
    # allow: the peers' IP addresses served (default any): docs/THREAT_MODEL.md.
    from mpboot.transport.udp import UdpLink

    return UdpLink(host, port, allow)
