__version__ = "0.1.0"

# (slots, slot, info, watchdog) of the image mpboot.boot started; slot -1 in recovery.
# (Kept tiny: every import of an mpboot module loads this one.)
_booted = None


def confirm():
    # Called by the running app once it works: keep this image after the next reset (a test
    # image is otherwise reverted) and raise the anti-rollback floor to its counter.
    # Returns True if this changed the state, False if the image was confirmed already.
    b = _booted
    if b is None or b[1] < 0:
        raise OSError(19)  # ENODEV: not started by mpboot.boot
    return b[0].confirm(b[1], b[2])
