__version__ = "0.1.0"

# (slots, slot, info, watchdog) of the image mpboot.boot started; slot -1 in recovery.
_booted = None


def confirm():
    # Called by the running app once it works: keep this image after the next reset (a test
    # image is otherwise reverted) and raise the anti-rollback floor to its counter.
    # Returns True if this changed the state, False if the image was confirmed already.
    b = _booted
    if b is None or b[1] < 0:
        raise OSError(19)  # ENODEV: not started by mpboot.boot
    return b[0].confirm(b[1], b[2])


def feed():
    # Feeds the watchdog a test boot armed (no-op otherwise). Hardware watchdogs cannot be
    # stopped once armed, so an app that confirms after a test boot keeps feeding it.
    b = _booted
    if b is not None and b[3] is not None:
        b[3].feed()


def updater():
    # An mpboot.update.Updater for the running image (the update service's entry point).
    from mpboot.update import Updater

    b = _booted
    if b is None:
        raise OSError(19)
    return Updater(b[0], b[1])
