# MicroPython: flip every bit of IMAGE in [START, END), one at a time, and verify each
# mutant from RAM. Usage: dev_bitflip IMAGE SLOT START END
# Prints "accepted <bit offsets...>" (must be empty) and "codes <code>:<count> ...".
import sys

from mpboot import image, reader
from mpboot_keys import KEYS

with open(sys.argv[1], "rb") as f:
    data = bytearray(f.read())
slot, start, end = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
buf = bytearray(image.BUF_SIZE)
src = reader.bytes_reader(data)
accepted = []
codes = {}
for pos in range(start, end):
    for bit in range(8):
        data[pos] ^= 1 << bit
        try:
            image.verify(src, KEYS, slot, buf)
            accepted.append(pos * 8 + bit)
        except image.ImageError as e:
            codes[e.args[0]] = codes.get(e.args[0], 0) + 1
        data[pos] ^= 1 << bit
print("accepted", " ".join(str(a) for a in accepted))
print("codes", " ".join("%d:%d" % (c, codes[c]) for c in sorted(codes)))
