"""TUF repositories for tests (mpboot.repo): a complete published repository with two teams,
built from the TEST-ONLY keys in tests/keys through the library, an HTTP server for it on
127.0.0.1 (port 0) in a thread, and a python-tuf client for it.

    repo = build_repo(tmp_path / "repo")       # published: root v1 .. timestamp
    with serve(repo.public) as url:
        up = updater(tmp_path / "cache", url, repo.root_v1)
        up.refresh(); up.get_targetinfo(repo.target_path("acme", "app-1.1.0.bin"))

Keys (all TEST-ONLY): root = root-a, root-b, root-c (2 of 3); targets = root-d; snapshot =
ci; timestamp = rsa2048-untrusted; team "acme" (vendor "acme", class "thermo") = team;
team "beta" (vendor "beta", class "lamp") = rsa3072. Images are signed by TEST-ONLY-rsa2048,
the key the test devices trust.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import KEYS_DIR, signing_key
from simkit import sign_app
from mpboot import repo as tufrepo
from mpboot.image import class_uuid, vendor_uuid
from mpboot.keys import SigningKey
from mpboot.repo.images import image_target, uuid_text
from mpboot.repo.signer import KeyRing

ROOT_KEYS = ("TEST-ONLY-root-a.pem", "TEST-ONLY-root-b.pem", "TEST-ONLY-root-c.pem")
TARGETS_KEY = "TEST-ONLY-root-d.pem"
SNAPSHOT_KEY = "TEST-ONLY-ci.pem"
TIMESTAMP_KEY = "TEST-ONLY-rsa2048-untrusted.pem"
IMAGE_KEY = "TEST-ONLY-rsa2048.pem"


@dataclass(frozen=True)
class Team:
    role: str
    vendor: str  # the name given to mpboot sign --vendor-id
    klass: str
    key_file: str

    @property
    def vendor_id(self) -> bytes:
        return vendor_uuid(self.vendor)

    @property
    def class_id(self) -> bytes:
        return class_uuid(self.klass, self.vendor_id)

    @property
    def key(self) -> SigningKey:
        return signing_key(self.key_file)

    def path(self, name: str) -> str:
        """The target path of an image `name` of this team."""
        return f"{uuid_text(self.vendor_id)}/{uuid_text(self.class_id)}/{name}"


TEAMS = (Team("acme", "acme", "thermo", "TEST-ONLY-team.pem"), Team("beta", "beta", "lamp", "TEST-ONLY-rsa3072.pem"))


def key_path(name: str) -> Path:
    return KEYS_DIR / name


def ring(*names: str, log: Path | None = None) -> KeyRing:
    """A KeyRing of TEST-ONLY key files (by file name)."""
    return KeyRing.of([signing_key(n) for n in names], log)


def app_image(team: Team, version: str, *, counter: int = 1, payload: bytes | None = None,
              key: SigningKey | None = None) -> bytes:
    """A signed app image for `team`'s vendor and class (payload: a ROMFS, or filler bytes)."""
    body = payload if payload is not None else f"app {team.role} {version}".encode() * 16
    return sign_app(body, key or signing_key(IMAGE_KEY), version, security_counter=counter,
                    vendor_id=team.vendor_id, class_id=team.class_id)


@dataclass
class BuiltRepo:
    path: Path
    teams: dict[str, Team]
    images: dict[str, bytes] = field(default_factory=dict)  # target path -> image bytes

    @property
    def public(self) -> Path:
        return self.path / "public"

    @property
    def root_v1(self) -> bytes:
        """The trusted root a client is bootstrapped with (distributed out of band)."""
        return (self.public / "metadata" / "1.root.json").read_bytes()

    def target_path(self, role: str, name: str) -> str:
        return self.teams[role].path(name)

    def add(self, role: str, name: str, data: bytes) -> str:
        """List an image in `role` (staged; publish() makes it live)."""
        team = self.teams[role]
        tufrepo.add(self.path, role, [image_target(data, name, name)], ring(team.key_file))
        self.images[team.path(name)] = data
        return team.path(name)

    def publish(self, *, timestamp_only: bool = False) -> list[str]:
        keys = (TIMESTAMP_KEY,) if timestamp_only else (SNAPSHOT_KEY, TIMESTAMP_KEY)
        return tufrepo.publish(self.path, ring(*keys), timestamp_only=timestamp_only)


def build_repo(path: Path, apps: dict[str, Sequence[tuple[str, bytes]]] | None = None,
               teams: Sequence[Team] = TEAMS) -> BuiltRepo:
    """A published repository at `path` with `teams` delegated and `apps` listed ({role:
    [(name, image bytes)]}; default: acme app-1.0.0.bin and app-1.1.0.bin, beta lamp-2.0.0.bin)."""
    if apps is None:
        acme, beta = teams[0], teams[1]
        apps = {acme.role: [("app-1.0.0.bin", app_image(acme, "1.0.0")),
                            ("app-1.1.0.bin", app_image(acme, "1.1.0", counter=2))],
                beta.role: [("lamp-2.0.0.bin", app_image(beta, "2.0.0"))]}
    public = {name: signing_key(name).public() for name in (*ROOT_KEYS, TARGETS_KEY, SNAPSHOT_KEY, TIMESTAMP_KEY)}
    tufrepo.init(path, root_keys=[public[n] for n in ROOT_KEYS], root_threshold=2,
                 targets_keys=[public[TARGETS_KEY]], targets_threshold=1, snapshot_keys=[public[SNAPSHOT_KEY]],
                 timestamp_keys=[public[TIMESTAMP_KEY]], expires={}, ring=ring(ROOT_KEYS[0], ROOT_KEYS[1], TARGETS_KEY))
    built = BuiltRepo(path, {t.role: t for t in teams})
    for team in teams:
        tufrepo.delegate(path, team.role, scopes=[(team.vendor_id, team.class_id)], keys=[team.key.public()],
                         threshold=1, expires=None, ring=ring(TARGETS_KEY, team.key_file))
    for role, images in apps.items():
        for name, data in images:
            built.add(role, name, data)
    built.publish()
    return built


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(directory: Path, handler: type[http.server.BaseHTTPRequestHandler] = QuietHandler) -> Iterator[str]:
    """An HTTP server for `directory` on 127.0.0.1 (a free port) in a thread: its base URL."""
    def make(*args: Any, **kwargs: Any) -> Any:
        return handler(*args, directory=str(directory), **kwargs)  # type: ignore[call-arg]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def updater(cache: Path, url: str, root: bytes) -> Any:
    """A python-tuf client for the repository at `url`, bootstrapped with `root`."""
    from tuf.ngclient import Updater

    (cache / "metadata").mkdir(parents=True, exist_ok=True)
    (cache / "targets").mkdir(exist_ok=True)
    return Updater(str(cache / "metadata"), f"{url}/metadata/", target_dir=str(cache / "targets"),
                   target_base_url=f"{url}/targets/", bootstrap=root)
