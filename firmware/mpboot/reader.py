# Random-access readers the image verifier reads through.
#
# A reader has one method, readinto(offset, buf) -> number of bytes read, which fills buf
# from the given byte offset and returns fewer bytes only at the end of the medium. The
# verifier never asks for more than it has bounded against the slot size first.


class FileReader:
    # An open binary file or any stream with seek() and readinto() (io.BytesIO too).
    def __init__(self, f):
        self._f = f

    def readinto(self, offset, buf):
        f = self._f
        f.seek(offset)
        got = 0
        want = len(buf)
        mv = memoryview(buf)
        while got < want:
            n = f.readinto(mv[got:]) if got else f.readinto(buf)
            if not n:
                break
            got += n
        return got


class BlockReader:
    # A MicroPython block device with the extended interface: readblocks(n, buf, off)
    # reads len(buf) bytes starting at byte `off` of block `n` (esp32.Partition,
    # rp2.Flash, pyb.Flash, and the NOR simulator).
    def __init__(self, bdev, block_size=None):
        self._bdev = bdev
        bs = block_size or bdev.ioctl(5, 0) or 512
        self._bs = bs
        self.size = bdev.ioctl(4, 0) * bs

    def readinto(self, offset, buf):
        n = len(buf)
        if offset >= self.size:
            return 0
        if offset + n > self.size:
            n = self.size - offset
            buf = memoryview(buf)[:n]
        bs = self._bs
        self._bdev.readblocks(offset // bs, buf, offset % bs)
        return n


class BytesReader:
    # An image already in memory (bytes, bytearray, memoryview): tests and RAM buffers.
    def __init__(self, data):
        self._mv = memoryview(data)

    def readinto(self, offset, buf):
        mv = self._mv
        if offset >= len(mv):
            return 0
        n = min(len(buf), len(mv) - offset)
        buf[:n] = mv[offset : offset + n]
        return n
