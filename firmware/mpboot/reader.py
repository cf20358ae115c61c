# Random-access readers the image verifier reads through.
#
# A reader is a callable read(offset, buf) -> number of bytes read: it fills buf from the
# given byte offset and returns fewer bytes only at the end of the medium. Any bound method
# with that shape works too (a flash area's readinto). These are closures rather than
# classes because a class costs a MicroPython heap several times what a closure does.


def file_reader(f):
    # An open binary file, or any stream with seek() and readinto() (io.BytesIO too).
    def read(offset, buf):
        f.seek(offset)
        got = f.readinto(buf) or 0
        want = len(buf)
        if got < want:
            mv = memoryview(buf)
            while got < want:
                n = f.readinto(mv[got:])
                if not n:
                    break
                got += n
        return got

    return read


def block_reader(bdev, block_size=0):
    # A MicroPython block device with the extended interface: readblocks(n, buf, off) reads
    # len(buf) bytes from byte `off` of block `n` (esp32.Partition, rp2.Flash, pyb.Flash).
    bs = block_size or bdev.ioctl(5, 0) or 512
    size = bdev.ioctl(4, 0) * bs

    def read(offset, buf):
        n = len(buf)
        if offset >= size:
            return 0
        if offset + n > size:
            n = size - offset
            buf = memoryview(buf)[:n]
        bdev.readblocks(offset // bs, buf, offset % bs)
        return n

    return read


def bytes_reader(data):
    # An image already in memory (bytes, bytearray, memoryview): tests and RAM buffers.
    mv = memoryview(data)

    def read(offset, buf):
        if offset >= len(mv):
            return 0
        n = min(len(buf), len(mv) - offset)
        buf[:n] = mv[offset : offset + n]
        return n

    return read
