"""TUF repositories for tests, built directly with python-tuf's Metadata API (the layout of
/work/notes/issue20-tuf.md section 2: consistent snapshots, one delegated role per
vendor/class with paths "<vendor uuid>/<class uuid>/*", custom "mpboot" metadata), signed
with the TEST-ONLY keys of tests/keys, and served over HTTP on 127.0.0.1 (a port the OS
picks) by a server whose behaviour a test switches: serve a folder, hang, trickle, huge,
404. Nothing here is for production: every key is a test key."""

from __future__ import annotations

import http.server
import os
import threading
import uuid
from copy import deepcopy
from datetime import datetime, timedelta, timezone
from functools import cache
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from mpboot.flashing import prepare
from mpboot.image import ImageKind, TlvType
from mpboot.keys import load_signing_key

KEYS = Path(__file__).parent / "keys"
NOW = datetime.now(timezone.utc).replace(microsecond=0)
TOP = ("root", "targets", "snapshot", "timestamp")

# Which TEST-ONLY key signs what (distinct keys per role; "untrusted" is in no role).
ROLE_KEYS = {"root": ["root-a", "root-b"], "targets": ["root-c"], "snapshot": ["root-d"], "timestamp": ["ci"]}
TEAM_KEY = "team"
SPARE_KEYS = ("rsa2048-untrusted", "rsa3072")  # never in a role unless a test rotates one in


@cache
def signer(name: str) -> CryptoSigner:
    """The TEST-ONLY key tests/keys/TEST-ONLY-<name>.pem as a TUF signer (RSA-PSS, salt 32)."""
    key = load_signing_key(KEYS / f"TEST-ONLY-{name}.pem").key
    return CryptoSigner(key, SSlibKey.from_crypto(key.public_key(), scheme="rsassa-pss-sha256"))


def prefix(vendor_id: bytes, class_id: bytes) -> str:
    return f"{uuid.UUID(bytes=vendor_id)}/{uuid.UUID(bytes=class_id)}/"


def custom_for(data: bytes) -> dict[str, Any]:
    """The custom metadata `mpboot repo add` derives from an image: every field from its
    header and signed TLVs."""
    img = prepare(data)
    tlv = {t.type: t.value for t in img.parsed.protected}
    v = img.parsed.header.version
    sec = tlv.get(TlvType.SEC_CNT)
    assert img.hash is not None
    return {"mpboot": {"version": [v.major, v.minor, v.revision, v.build],
                       "counter": int.from_bytes(sec, "little") if sec else 0,
                       "vendor": str(uuid.UUID(bytes=tlv[TlvType.UUID_VID])),
                       "class": str(uuid.UUID(bytes=tlv[TlvType.UUID_CID])),
                       "kind": str(ImageKind(img.parsed.kind).name).lower(), "image_hash": img.hash.hex()}}


class TufRepo:
    """A repository in `folder` (served as it is: metadata/ and targets/). Team roles are
    added with `delegate`; images with `add`; `publish` writes the roles named, then
    snapshot, then timestamp (last). `history` keeps every file written, by (role, version)."""

    def __init__(self, folder: Path, *, expires: dict[str, timedelta] | None = None) -> None:
        self.dir = folder
        (folder / "metadata").mkdir(parents=True)
        (folder / "targets").mkdir()
        self.keys: dict[str, list[Signer]] = {r: [signer(k) for k in ks] for r, ks in ROLE_KEYS.items()}
        life = {"root": timedelta(days=365), "targets": timedelta(days=365), "snapshot": timedelta(days=7),
                "timestamp": timedelta(days=1), **(expires or {})}
        root = Root(expires=NOW + life["root"], consistent_snapshot=True)
        for r in TOP:
            for s in self.keys[r]:
                root.add_key(s.public_key, r)
        root.roles["root"].threshold = 2
        targets = Targets(expires=NOW + life["targets"])
        targets.delegations = Delegations(keys={}, roles={})
        self.md: dict[str, Metadata[Any]] = {
            "root": Metadata(root), "targets": Metadata(targets),
            "snapshot": Metadata(Snapshot(expires=NOW + life["snapshot"])),
            "timestamp": Metadata(Timestamp(expires=NOW + life["timestamp"]))}
        self.history: dict[tuple[str, int], bytes] = {}
        self.root_bytes = self.write("root")

    def delegate(self, role: str, vendor_id: bytes, class_id: bytes, *, keys: tuple[str, ...] = (TEAM_KEY,),
                 threshold: int = 1, expires: timedelta = timedelta(days=90)) -> None:
        t: Targets = self.md["targets"].signed
        assert t.delegations is not None and t.delegations.roles is not None
        t.delegations.roles[role] = DelegatedRole(role, [], threshold, True, paths=[prefix(vendor_id, class_id) + "*"])
        for k in keys:
            t.add_key(signer(k).public_key, role)
        self.keys[role] = [signer(k) for k in keys]
        self.md[role] = Metadata(Targets(expires=NOW + expires))

    def add(self, role: str, name: str, data: bytes, *, custom: dict[str, Any] | None = None,
            path: str | None = None) -> TargetFile:
        """The image as a target of `role` (path: under its own vendor/class unless given)."""
        if path is None:
            c = custom_for(data)["mpboot"]
            path = f"{c['vendor']}/{c['class']}/{name}"
        tf = TargetFile.from_data(path, data, ["sha256"])
        tf.unrecognized_fields["custom"] = custom if custom is not None else custom_for(data)
        self.md[role].signed.targets[path] = tf
        self.target_file(tf).parent.mkdir(parents=True, exist_ok=True)
        self.target_file(tf).write_bytes(data)
        return tf

    def target_file(self, tf: TargetFile) -> Path:
        """Where the target's bytes are served (consistent snapshot: <sha256>.<name>)."""
        folder, _, name = tf.path.rpartition("/")
        return self.dir / "targets" / folder / f"{tf.hashes['sha256']}.{name}"

    def write(self, role: str, *, signers: list[Signer] | None = None, bump: bool = True) -> bytes:
        """Sign (all the role's keys, or `signers`) and write the role's next version."""
        md = self.md[role]
        if bump and (role, md.signed.version) in self.history:
            md.signed.version += 1
        md.signatures.clear()
        for s in signers if signers is not None else self.keys[role]:
            md.sign(s, append=True)
        data = md.to_bytes()
        self.history[(role, md.signed.version)] = data
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        (self.dir / "metadata" / name).write_bytes(data)
        return data

    def teams(self) -> list[str]:
        return [r for r in self.md if r not in TOP]

    def snapshot(self, meta: dict[str, int] | None = None) -> None:
        """A new snapshot listing the current versions of targets and every team role (or
        `meta`'s), then a new timestamp for it."""
        snap: Snapshot = self.md["snapshot"].signed
        for r in ("targets", *self.teams()):
            snap.meta[f"{r}.json"] = MetaFile(self.md[r].signed.version)
        for r, v in (meta or {}).items():
            snap.meta[f"{r}.json"] = MetaFile(v)
        self.write("snapshot")
        self.md["timestamp"].signed.snapshot_meta = MetaFile(snap.version)
        self.write("timestamp")

    def publish(self, roles: tuple[str, ...] | None = None) -> None:
        """Write `roles` (default: targets and every team role), then snapshot and timestamp."""
        for r in roles if roles is not None else ("targets", *self.teams()):
            self.write(r)
        self.snapshot()

    def rotate_root(self, *, timestamp_key: str | None = None, root_signers: list[Signer] | None = None) -> bytes:
        """Root N+1 (its timestamp key replaced by `timestamp_key`), signed by the old root keys
        (or `root_signers`); written as N+1.root.json."""
        root: Root = self.md["root"].signed
        if timestamp_key is not None:
            for keyid in list(root.roles["timestamp"].keyids):
                root.revoke_key(keyid, "timestamp")
            root.add_key(signer(timestamp_key).public_key, "timestamp")
            self.keys["timestamp"] = [signer(timestamp_key)]
        root.version += 1
        return self.write("root", signers=root_signers if root_signers is not None else ROOT_SIGNERS(), bump=False)

    def copy_to(self, folder: Path) -> None:
        """The served files as they are now (a mirror's copy)."""
        import shutil

        shutil.copytree(self.dir, folder)

    def saved(self) -> dict[str, Metadata[Any]]:
        return deepcopy(self.md)


def ROOT_SIGNERS() -> list[Signer]:  # noqa: N802 (a constant, built lazily)
    return [signer(k) for k in ROLE_KEYS["root"]]


# --- serving -----------------------------------------------------------------------------------


class Mirror:
    """An HTTP server on 127.0.0.1 (port 0) in a thread. `mode`: "serve" (the files of
    `folder`), "404" (nothing), "hang" (accepts, reads the request, never answers until
    closed), "trickle" (200 with a large Content-Length, then a byte every 0.2 s), "huge" (200
    and megabytes of spaces). `requests`: every path asked for. close() ends it."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.mode = "serve"
        self.requests: list[str] = []
        self.closing = threading.Event()
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **k: Any) -> None:
                super().__init__(*a, directory=str(mirror.folder or os.devnull), **k)

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                mirror.requests.append(self.path)
                mode = mirror.mode
                if mode == "serve" and mirror.folder is not None:
                    return super().do_GET()
                if mode == "hang":
                    mirror.closing.wait(60)
                    return None
                if mode in ("trickle", "huge"):
                    self.send_response(200)
                    self.send_header("Content-Length", str(100_000_000))
                    self.end_headers()
                    try:
                        for _ in range(3000):
                            if mirror.closing.is_set():
                                return None
                            self.wfile.write(b" " if mode == "trickle" else b" " * 65536)
                            self.wfile.flush()
                            if mode == "trickle" and mirror.closing.wait(0.2):
                                return None
                    except OSError:
                        return None
                    return None
                self.send_error(404)
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


def dead_url() -> str:
    """A URL on a port nothing listens on (bound, then closed)."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
