# Flash areas over MicroPython block devices (extended protocol).
#
# A block device here has readblocks(n, buf, off), writeblocks(n, buf, off) (program only:
# with an offset it never erases), ioctl(4) block count, ioctl(5) block size and ioctl(6, n)
# erase block n. The block size is the erase unit: port adapters (mpboot.ports) hand out
# devices whose blocks are exactly what one ioctl(6) erases.
#
# An Area is a block-aligned byte range of such a device. It refuses writes that are not
# aligned to the flash's write unit or that would program over bytes not erased (NOR flash
# can only clear bits; a write over old data silently corrupts it), and erases whole blocks.

from micropython import const

_CHECK = const(64)  # bytes compared per read when checking that a range is erased
_BLANK = b"\xff" * _CHECK


class Area:
    def __init__(self, bdev, start=0, size=0, write_size=1):
        bs = bdev.ioctl(5, 0)
        total = bdev.ioctl(4, 0) * bs
        if not size:
            size = total - start
        if start < 0 or start % bs or size % bs or size <= 0 or start + size > total:
            raise ValueError("area")
        if write_size < 1 or bs % write_size:
            raise ValueError("write size")
        self.bdev = bdev
        self.erase_size = bs
        self.write_size = write_size
        self.start = start
        self.size = size
        self._check = bytearray(_CHECK)

    def read(self, off, buf):
        # A reader (mpboot.reader): fills buf from byte `off`, fewer bytes only at the end.
        n = len(buf)
        if off < 0 or off > self.size:
            raise ValueError("read")
        if off + n > self.size:
            n = self.size - off
            buf = memoryview(buf)[:n]
        if n:
            a = self.start + off
            if self.bdev.readblocks(a // self.erase_size, buf, a % self.erase_size):
                raise OSError(5)  # some ports (pyb.Flash) return an error number
        return n

    def is_erased(self, off, n):
        check = self._check
        end = off + n
        while off < end:
            m = end - off
            if m >= _CHECK:
                self.read(off, check)
                if check != _BLANK:
                    return False
                off += _CHECK
            else:
                b = memoryview(check)[:m]
                self.read(off, b)
                for x in b:
                    if x != 0xFF:
                        return False
                off = end
        return True

    def write(self, off, data):
        # Program len(data) bytes at `off`: both aligned to the write unit, the target erased.
        n = len(data)
        if off < 0 or off + n > self.size or (off | n) % self.write_size:
            raise ValueError("write")
        if not self.is_erased(off, n):
            raise OSError(5)  # EIO: would program over unerased bytes
        a = self.start + off
        if self.bdev.writeblocks(a // self.erase_size, data, a % self.erase_size):
            raise OSError(5)

    def sync(self):
        # Make what was written durable (ioctl 3): ports that cache writes flush them here.
        self.bdev.ioctl(3, 0)

    def erase(self, off, n):
        # Erase [off, off + n), which must be whole erase blocks of this area.
        es = self.erase_size
        if off < 0 or off + n > self.size or (off | n) % es:
            raise ValueError("erase")
        b = (self.start + off) // es
        for i in range(n // es):
            if self.bdev.ioctl(6, b + i):
                raise OSError(5)
