# The trust state: the current root set and thresholds, and what is revoked (docs/KEYS.md).
#
# A list (cheaper than a class) read by these indices. Blank trust area: initial(), root set
# version 1 = the keys frozen into the firmware. The flash store of this list (the trust
# area, docs/KEYS.md section 5) is below; checking records and certificates is
# mpboot.records.
from micropython import const

ROOT_VERSION = const(0)  # root set version (1: the frozen keys)
THRESHOLD = const(1)  # distinct roots that must sign a certificate or record
IMAGE_THRESHOLD = const(2)  # distinct trusted keys that must sign an image
ROOTS = const(3)  # list of (keyhash, bits, modulus), as mpboot_keys.KEYS
REVOCATION = const(4)  # revocation number (0: none taken)
REVOKED_KEYS = const(5)  # list of 32-byte key hashes
REVOKED_SERIALS = const(6)  # list of certificate serials (int)


def initial(keys, threshold=1, image_threshold=1):
    # The trust state before any record: the frozen keys (mpboot_keys.KEYS) as version 1.
    return [1, threshold, image_threshold, list(keys), 0, [], []]
