__version__ = "0.1.0"

# Kept to two names: every import of any mpboot module loads this one into the heap.
# [slots, slot, info, watchdog, how] of the image mpboot.boot started (slot -1: recovery;
# how: 0 the confirmed image, 1 its test boot, 2 a fallback).
_booted = None
# mpboot.confirm() -- the call a running app makes once it works -- is put here by
# mpboot.boot when it starts the app (or enters recovery): see mpboot.boot.confirm.
