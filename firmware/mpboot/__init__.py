__version__ = "0.1.0"

# Kept to three names: every import of any mpboot module loads this one into the heap.
# The boot record: what mpboot.boot started (a list; its fields are mpboot.boot.BOOTED_*).
_booted = None
# mpboot.confirm() -- the call a running app makes once it works -- is put here by
# mpboot.boot when it starts the app (or enters recovery): see mpboot.boot.confirm.


def pull(url, **kw):
    # mpboot.pull(url, ...): fetch a channel record and the image it names (mpboot.pull.pull,
    # README "Device pull"). The module loads at the first call, not at boot; its import sets
    # the package's `pull` to the module, so this function puts itself back.
    import sys

    f = globals()["pull"]
    __import__("mpboot.pull")
    globals()["pull"] = f
    return sys.modules["mpboot.pull"].pull(url, **kw)
