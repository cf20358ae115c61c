__version__ = "0.1.0"

# [slots, slot, info, watchdog, how] of the image mpboot.boot started (slot -1: recovery;
# how: 0 the confirmed image, 1 its test boot, 2 a fallback). Kept tiny: every import of an
# mpboot module loads this one.
_booted = None


def confirm():
    # Called by the running app once it works: keep this image after the next reset (a test
    # image is otherwise reverted) and raise the anti-rollback floor to its counter. Also
    # makes a fallback image (run because the confirmed one failed) the confirmed one.
    # Returns True if this changed the state, False if there was nothing to confirm: the
    # image already was the confirmed one (and a permanent update it took since stays so).
    b = _booted
    if b is None or b[1] < 0:
        raise OSError(19)  # ENODEV: not started by mpboot.boot
    if not b[4]:
        return False
    b[4] = 0
    return b[0].confirm(b[1], b[2])
