"""A TUF repository of signed mpboot images, with python-tuf's Metadata API (`mpboot repo`).

Root (offline keys, a threshold of at least 2) delegates top-level targets, snapshot and
timestamp; top-level targets delegates one role per team, terminating, with the paths
"<vendor uuid>/<class uuid>/*" of the products it releases; snapshot (7 d) and timestamp
(1 d, online key) are signed at each publish. Consistent snapshots: everything under
public/ but timestamp.json is immutable (README "mpboot repo", docs/THREAT_MODEL.md).

    layout   the directory, settings, reading and writing metadata
    signer   TufSigner (an mpboot key file or token key as a TUF signer), KeyRing
    images   an image's checks, target path and custom metadata
    state    each role published, staged and as publish makes it live; signatures against
             delegators; the keys that may sign a role
    edit     init, delegate, add, remove, sign, rotate
    publish  publish (snapshot and timestamp, timestamp.json last)
    report   status(): what the repository holds, and warnings
    check    client_view(): python-tuf's client over public/ as it is on disk

tuf and securesystemslib load with this package: import it inside command callbacks.
"""

from mpboot.repo.edit import add, delegate, init, remove, rotate, sign
from mpboot.repo.images import ImageTarget, custom_mismatch, custom_of, image_target, scope_pattern
from mpboot.repo.layout import DEFAULT_EXPIRES, RepoDir, parse_period
from mpboot.repo.publish import publish
from mpboot.repo.report import status
from mpboot.repo.signer import KeyRing, TufSigner, keyhash_of, tuf_key
from mpboot.repo.state import signatures_of

__all__ = ["DEFAULT_EXPIRES", "ImageTarget", "KeyRing", "RepoDir", "TufSigner", "add", "custom_mismatch", "custom_of",
           "delegate", "image_target", "init", "keyhash_of", "parse_period", "publish", "remove", "rotate",
           "scope_pattern", "sign", "signatures_of", "status", "tuf_key"]
