"""What a client would see: python-tuf's own client (ngclient) run over REPO/public as it is
on disk, bootstrapped with root version 1 (so every root rotation is walked and checked),
then every listed target looked up and its bytes verified. `repo status --verify` runs it
before the tree is uploaded."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from mpboot.repo.layout import RepoDir

if TYPE_CHECKING:
    from tuf.ngclient import FetcherInterface

_BASE = "file://public/"
_MAX_FILE_BYTES = 64 * 1024 * 1024  # as mpboot.files.MAX_IMAGE_BYTES: nothing served is larger


@dataclass(frozen=True)
class ClientView:
    """The check's outcome: `error` is None when a client accepts everything."""

    root_version: int
    targets: int  # target paths a client finds, each with its bytes verified
    error: str | None


def _fetcher(public: Path) -> FetcherInterface:
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface

    root = public.resolve()

    class LocalFetcher(FetcherInterface):
        """Serves REPO/public as a static web server would: a missing file is a 404."""

        def _fetch(self, url: str) -> Iterator[bytes]:
            rel = unquote(urlsplit(url).path).lstrip("/")
            path = (root / rel).resolve()
            if root not in path.parents or not path.is_file():
                raise DownloadHTTPError(f"{rel}: not found", 404)
            if path.stat().st_size > _MAX_FILE_BYTES:
                raise DownloadHTTPError(f"{rel}: too large", 413)
            return iter([path.read_bytes()])

    return LocalFetcher()


def client_view(path: Path) -> ClientView:
    """Refresh a fresh ngclient over REPO/public and fetch every target listed by a role
    the top-level targets delegates to (RepositoryError if nothing is published)."""
    from tuf.api import exceptions as tx
    from tuf.ngclient import Updater

    repo = RepoDir(path)
    first = repo.read_published("root", 1)
    if first is None:
        return ClientView(0, 0, "nothing published: no metadata/1.root.json")
    with tempfile.TemporaryDirectory(prefix="mpboot-repo-check-") as tmp:
        cache = Path(tmp)
        (cache / "metadata").mkdir()
        (cache / "targets").mkdir()
        updater = Updater(str(cache / "metadata"), f"{_BASE}metadata/", target_dir=str(cache / "targets"),
                          target_base_url=f"{_BASE}targets/", fetcher=_fetcher(repo.public),
                          bootstrap=first[1])
        root_version = 1
        found = 0
        try:
            updater.refresh()
            top = repo.read_published("targets")
            root_version = repo.published_versions("root")[-1]
            roles = top[0].signed.delegations.roles if top and top[0].signed.delegations else {}
            for name in roles or {}:
                listed = repo.read_published(name)
                for target in (listed[0].signed.targets if listed else {}):
                    info = updater.get_targetinfo(target)
                    if info is None:
                        return ClientView(root_version, found, f"{target}: listed by {name}, but a client does not "
                                                               "find it (outside the role's scope?)")
                    updater.download_target(info)
                    found += 1
        except (tx.RepositoryError, tx.DownloadError, OSError, ValueError) as err:
            return ClientView(root_version, found, f"{type(err).__name__}: {err}")
        return ClientView(root_version, found, None)
