# Runs on MicroPython: the device verifier over an image file, as `mpboot verify --device`.
# Usage: micropython verify_image.py IMAGE SLOT_SIZE   (mpboot_keys on sys.path)
# Prints one line: "OK <version> <security counter> <key index> <total size>" or
# "REJECT <code>".
import sys

from mpboot import image, reader
from mpboot_keys import KEYS


def main():
    path = sys.argv[1]
    slot_size = int(sys.argv[2])
    with open(path, "rb") as f:
        try:
            info = image.verify(reader.FileReader(f), KEYS, slot_size)
        except image.ImageError as e:
            print("REJECT", e.code)
            return
    v = info.version
    counter = -1 if info.security_counter is None else info.security_counter
    print("OK", "%d.%d.%d+%d" % v, counter, info.key_index, info.total_size)


main()
