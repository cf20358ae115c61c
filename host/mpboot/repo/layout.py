"""Where a repository's files live, and how they are read and written.

    REPO/
      mpboot-repo.json        settings (expiry periods); not served, no secrets
      .lock                   taken by every command that writes (one writer at a time)
      staging/                not served: the next version of each role, signed as far as
        metadata/ROLE.json    it is (cosigning), and images added but not yet published
        targets/<vid>/<cid>/<sha256>.<name>
      public/                 serve or upload exactly this folder
        metadata/N.root.json, N.targets.json, N.<role>.json, N.snapshot.json   immutable
        metadata/timestamp.json                                   the one file replaced
        targets/<vid>/<cid>/<sha256>.<name>                       immutable

Consistent snapshots: every file under public/ except timestamp.json is written once under a
name that changes with its content, so a CDN may cache it forever; `publish` writes targets,
then role metadata, root, snapshot, and timestamp.json last, each atomically.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from mpboot.errors import RepositoryError
from mpboot.files import write_atomic

if TYPE_CHECKING:
    from tuf.api.metadata import Metadata

TOP_ROLES: Final = ("root", "targets", "snapshot", "timestamp")
CONFIG_NAME: Final = "mpboot-repo.json"
CONFIG_FORMAT: Final = 1
ROLE_NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_METADATA_BYTES: Final = 4 * 1024 * 1024  # far above what a role grows to (~0.3 KB a target)

# Default expiry periods (the freshness each role gives clients).
DEFAULT_EXPIRES: Final = {"root": timedelta(days=365), "targets": timedelta(days=365),
                          "snapshot": timedelta(days=7), "timestamp": timedelta(days=1)}
DEFAULT_ROLE_EXPIRES: Final = timedelta(days=90)
# The longest expiry period (from --expires or mpboot-repo.json): 10 years. Longer is not a
# freshness any more, and keeps now() + period far from datetime's year 9999.
MAX_PERIOD: Final = timedelta(days=3653)

_VERSIONED_RE: Final = re.compile(r"^([1-9][0-9]{0,9})\.([a-z0-9-]+)\.json$")
_PERIOD_RE: Final = re.compile(r"^([1-9][0-9]{0,5})([dh])$")


def parse_period(text: str, what: str) -> timedelta:
    """An expiry period: 1d, 12h, 365d; at most MAX_PERIOD."""
    m = _PERIOD_RE.match(text.strip())
    if not m:
        raise RepositoryError(f"bad {what} {text!r}: expected days or hours, like 7d or 12h")
    n = int(m.group(1))
    period = timedelta(days=n) if m.group(2) == "d" else timedelta(hours=n)
    if period > MAX_PERIOD:
        raise RepositoryError(f"bad {what} {text!r}: at most {MAX_PERIOD.days}d (10 years)")
    return period


def period_text(period: timedelta) -> str:
    seconds = int(period.total_seconds())
    return f"{seconds // 86400}d" if seconds % 86400 == 0 else f"{seconds // 3600}h"


def check_role_name(name: str) -> str:
    """A delegated role's name: lower case letters, digits and '-' (it is part of file names
    and URLs), and not a top-level role's."""
    if not ROLE_NAME_RE.match(name) or name in TOP_ROLES:
        raise RepositoryError(f"bad role name {name!r}: use lower case letters, digits and '-' "
                              f"(like acme-thermo), not {', '.join(TOP_ROLES)}")
    return name


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass
class Settings:
    """mpboot-repo.json: the expiry period of each top-level role and of each delegated role."""

    expires: dict[str, timedelta]
    role_expires: dict[str, timedelta]

    def period(self, role: str) -> timedelta:
        if role in TOP_ROLES:
            return self.expires[role]
        return self.role_expires.get(role, DEFAULT_ROLE_EXPIRES)

    def to_json(self) -> bytes:
        doc = {"mpboot_repo": CONFIG_FORMAT,
               "expires_s": {r: int(p.total_seconds()) for r, p in self.expires.items()},
               "roles": {r: {"expires_s": int(p.total_seconds())} for r, p in sorted(self.role_expires.items())}}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> Settings:
        try:
            doc = json.loads(data)
            if doc.get("mpboot_repo") != CONFIG_FORMAT:
                raise ValueError(f"format {doc.get('mpboot_repo')!r}")
            expires_s = {r: int(doc["expires_s"][r]) for r in TOP_ROLES}
            roles_s = {check_role_name(r): int(v["expires_s"]) for r, v in doc["roles"].items()}
        except (ValueError, OverflowError, KeyError, TypeError, AttributeError, RepositoryError) as err:
            raise RepositoryError(f"{where}: not an mpboot repository settings file ({err})") from None
        for role, n in (*expires_s.items(), *roles_s.items()):  # (bounded before a timedelta: no overflow)
            if n <= 0:
                raise RepositoryError(f"{where}: {role}'s expiry period is not positive")
            if n > MAX_PERIOD.total_seconds():
                raise RepositoryError(f"{where}: {role}'s expiry period ({n} s) is longer than "
                                      f"{MAX_PERIOD.days}d (10 years)")
        return cls({r: timedelta(seconds=n) for r, n in expires_s.items()},
                   {r: timedelta(seconds=n) for r, n in roles_s.items()})


class RepoDir:
    """A repository directory: paths, settings, published and staged metadata."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.config = self.path / CONFIG_NAME
        self.staging = self.path / "staging"
        self.staged_metadata = self.staging / "metadata"
        self.staged_targets = self.staging / "targets"
        self.public = self.path / "public"
        self.metadata = self.public / "metadata"
        self.targets = self.public / "targets"

    # --- the directory -----------------------------------------------------------------

    def check_new(self) -> None:
        """RepositoryError unless the directory is new or empty."""
        if self.config.exists():
            raise RepositoryError(f"{self.path}: already a repository ({self.config.name}); nothing written")
        if self.path.exists() and not self.path.is_dir():
            raise RepositoryError(f"{self.path}: not a directory")
        if self.path.is_dir() and any(self.path.iterdir()):
            raise RepositoryError(f"{self.path}: not empty; a repository starts in a new or empty directory")

    def create(self, settings: Settings) -> None:
        self.check_new()
        for d in (self.staged_metadata, self.staged_targets, self.metadata, self.targets):
            d.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config, settings.to_json())

    def settings(self) -> Settings:
        if not self.config.is_file():
            raise RepositoryError(f"{self.path}: not an mpboot repository (no {CONFIG_NAME}; "
                                  "make one with mpboot repo init)")
        return Settings.from_json(self.config.read_bytes(), self.config)

    def save_settings(self, settings: Settings) -> None:
        write_atomic(self.config, settings.to_json())

    @contextlib.contextmanager
    def locked(self) -> Iterator[Settings]:
        """The repository's settings, with the write lock held (RepositoryError when another
        command holds it: two writers would interleave versions)."""
        settings = self.settings()
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RepositoryError(f"{self.path}: another mpboot repo command is writing it; "
                                      "run this one when it has finished") from None
            yield settings
        finally:
            os.close(fd)

    # --- published metadata --------------------------------------------------------------

    def published_versions(self, role: str) -> list[int]:
        """The versions of `role` under public/metadata, ascending (not timestamp)."""
        found = []
        if self.metadata.is_dir():
            for p in self.metadata.iterdir():
                m = _VERSIONED_RE.match(p.name)
                if m and m.group(2) == role:
                    found.append(int(m.group(1)))
        return sorted(found)

    def published_path(self, role: str, version: int) -> Path:
        return self.metadata / ("timestamp.json" if role == "timestamp" else f"{version}.{role}.json")

    def read_published(self, role: str, version: int | None = None) -> tuple[Metadata[Any], bytes] | None:
        """(Metadata, its bytes as written) of `role` at `version` (None: the newest), or None."""
        if role == "timestamp":
            path = self.metadata / "timestamp.json"
        else:
            versions = self.published_versions(role)
            if not versions or (version is not None and version not in versions):
                return None
            path = self.published_path(role, version or versions[-1])
        if not path.is_file():
            return None
        data = _read_bounded(path)
        return load_metadata(data, path, role), data

    def write_public(self, path: Path, data: bytes, *, replace: bool = False) -> None:
        """Write a file under public/ once (replace: timestamp.json only)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not replace and path.exists():
            if path.read_bytes() == data:
                return
            raise RepositoryError(f"{path}: already published with other content; published files never change")
        write_atomic(path, data, exclusive=not replace)

    # --- staged metadata -----------------------------------------------------------------

    def staged_path(self, role: str) -> Path:
        return self.staged_metadata / f"{role}.json"

    def staged_roles(self) -> list[str]:
        if not self.staged_metadata.is_dir():
            return []
        return sorted(p.name[:-5] for p in self.staged_metadata.iterdir() if p.name.endswith(".json"))

    def read_staged(self, role: str) -> Metadata[Any] | None:
        """The staged version of `role`, or None: nothing staged, or only what a publish that
        died half way left (that version is published as it is; the next publish unstages it)."""
        path = self.staged_path(role)
        if not path.is_file():
            return None
        md = load_metadata(_read_bounded(path), path, role)
        published = self.read_published(role, md.signed.version) if role != "timestamp" else None
        if published is not None and published[0].to_bytes() == md.to_bytes():
            return None
        return md

    def stage(self, role: str, md: Metadata[Any]) -> Path:
        path = self.staged_path(role)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, md.to_bytes())
        return path

    def unstage(self, role: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.staged_path(role).unlink()

    def staged_target_files(self) -> list[Path]:
        if not self.staged_targets.is_dir():
            return []
        return sorted(p for p in self.staged_targets.rglob("*") if p.is_file() and not p.name.startswith("."))


def _read_bounded(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_METADATA_BYTES:
        raise RepositoryError(f"{path}: {size} bytes, far more than TUF metadata here grows to")
    return path.read_bytes()


def load_metadata(data: bytes, where: Path, role: str) -> Metadata[Any]:
    """TUF metadata of `role`'s type (a team's role is targets metadata), else RepositoryError."""
    from tuf.api.exceptions import RepositoryError as TufRepositoryError
    from tuf.api.metadata import Metadata
    from tuf.api.serialization import DeserializationError

    try:
        md = Metadata.from_bytes(data)
    except (DeserializationError, TufRepositoryError, ValueError) as err:
        raise RepositoryError(f"{where}: not TUF metadata ({err})") from None
    expected = role if role in TOP_ROLES else "targets"
    if md.signed.type != expected:
        raise RepositoryError(f"{where}: {md.signed.type} metadata where {role} belongs")
    return md
