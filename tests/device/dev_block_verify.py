# MicroPython: verify an image through mpboot.reader.block_reader over a RAM block device
# with the extended block protocol (readblocks(n, buf, off), ioctl 4/5), as esp32.Partition,
# rp2.Flash and pyb.Flash provide it. Usage: dev_block_verify IMAGE BLOCK_SIZE BLOCKS
# Prints "OK <total size> <reads>" or "REJECT <code>".
import sys

from mpboot import image, reader
from mpboot_keys import KEYS


class RamBlockDevice:
    def __init__(self, block_size, blocks):
        self.bs = block_size
        self.data = bytearray(b"\xff" * (block_size * blocks))
        self.reads = 0

    def readblocks(self, n, buf, off=0):
        start = n * self.bs + off
        if start + len(buf) > len(self.data):
            raise OSError(22)  # the real ports refuse reads past the partition
        buf[:] = self.data[start : start + len(buf)]
        self.reads += 1

    def ioctl(self, op, arg):
        if op == 4:
            return len(self.data) // self.bs
        if op == 5:
            return self.bs
        return None


path, bs, blocks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dev = RamBlockDevice(bs, blocks)
with open(path, "rb") as f:
    img = f.read()
dev.data[: len(img)] = img
try:
    info = image.verify(reader.block_reader(dev), KEYS, bs * blocks)
    print("OK", info["total_size"], dev.reads)
except image.ImageError as e:
    print("REJECT", e.args[0])
