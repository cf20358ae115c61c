# Runs on MicroPython: the device verifier over image files (`mpboot verify --device`, tests).
# Usage: micropython -m verify_images LISTFILE   (lines "PATH SLOT_SIZE"; mpboot_keys on
# sys.path). Prints per image "OK <maj.min.rev+build> <counter|-1> <key index> <total size>"
# followed by one "<image id>:<maj.min.rev+build>" word per DEPENDENCY TLV, or "REJECT <code>".
# Each image is read from its file through one image.BUF_SIZE buffer.
import sys

from mpboot import image, reader
from mpboot_keys import KEYS

buf = bytearray(image.BUF_SIZE)
with open(sys.argv[1]) as listing:
    for line in listing:
        path, slot = line.split()
        with open(path, "rb") as f:
            try:
                info = image.verify(reader.file_reader(f), KEYS, int(slot), buf)
            except image.ImageError as e:
                print("REJECT", e.args[0])
                continue
        counter = info["security_counter"]
        deps = " ".join("%d:%d.%d.%d+%d" % ((d[0],) + d[1]) for d in info.get("deps", ()))
        print("OK", "%d.%d.%d+%d" % info["version"], -1 if counter is None else counter,
              info["key_index"], info["total_size"], deps)
