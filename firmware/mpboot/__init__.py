__version__ = "0.1.0"

# Kept to three names: every import of any mpboot module loads this one into the heap.
# The boot record: what mpboot.boot started (a list; its fields are mpboot.boot.BOOTED_*).
_booted = None
# mpboot.confirm() -- the call a running app makes once it works -- is put here by
# mpboot.boot when it starts the app (or enters recovery): see mpboot.boot.confirm.



def pull(url, **kw):
    # mpboot.pull(url, ...): fetch a channel record and the image it names (mpboot.puller,
    # README "Device pull"). That module loads at the first call, not at boot. (It is not
    # named mpboot.pull: importing a submodule sets the package's attribute of that name.)
    from mpboot.puller import pull

    return pull(url, **kw)
