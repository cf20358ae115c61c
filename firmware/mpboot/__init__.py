__version__ = "0.1.0"

# Kept to two names: every import of any mpboot module loads this one into the heap.
# The boot record: what mpboot.boot started (a list; its fields are mpboot.boot.BOOTED_*).
_booted = None
# mpboot.confirm() -- the call a running app makes once it works -- and mpboot.pull(url, ...)
# are put here by mpboot.boot when it starts the app (or enters recovery): see
# mpboot.boot.confirm and mpboot.boot.pull. (Not defined here: the device verifier, `mpboot
# verify --device`, imports this package in a 24 KiB heap too.)

