# MicroPython: time the device verifier against one bare SHA-256 pass over the same bytes.
# Usage: micropython bench_device.py IMAGE SLOT_SIZE ROUNDS
# Both read the file through the same reader and one image.BUF_SIZE buffer; rounds
# alternate so that both see the same machine state. Prints "bare_us <min> <median>" and
# "verify_us <min> <median>".
import hashlib
import sys
import time

from mpboot import image, reader
from mpboot_keys import KEYS

path, slot, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
buf = bytearray(image.BUF_SIZE)
mv = memoryview(buf)


def bare(read, size):
    h = hashlib.sha256()
    off = 0
    while off < size:
        chunk = mv if size - off >= len(buf) else mv[: size - off]
        read(off, chunk)
        h.update(chunk)
        off += len(chunk)
    return h.digest()


bare_t = []
verify_t = []
with open(path, "rb") as f:
    read = reader.file_reader(f)
    size = image.verify(read, KEYS, slot, buf)["total_size"]
    for _ in range(rounds):
        t = time.ticks_us()
        bare(read, size)
        bare_t.append(time.ticks_diff(time.ticks_us(), t))
        t = time.ticks_us()
        image.verify(read, KEYS, slot, buf)
        verify_t.append(time.ticks_diff(time.ticks_us(), t))
bare_t.sort()
verify_t.sort()
print("bare_us", bare_t[0], bare_t[len(bare_t) // 2])
print("verify_us", verify_t[0], verify_t[len(verify_t) // 2])
