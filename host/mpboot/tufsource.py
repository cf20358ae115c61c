"""A TUF repository as `mpboot sync`'s image source (`mpboot sync --repo URL --root FILE`).

python-tuf's ngclient does the verification (root rotation, timestamp, snapshot, targets and
the delegated roles: signatures and thresholds, expiry, rollback, lengths and hashes). What it
lacks, this module adds (research: /work/notes/issue20-tuf.md section 3, docs: README
"mpboot sync --repo"):

- BoundedFetcher: no silent retries, connect/read timeouts, a deadline per file, every
  failure a tuf DownloadError naming the URL (ngclient's own fetcher retries a hung mirror 4
  times, never cuts off a trickling one, and lets urllib3 errors escape).
- Mirrors: one Updater per mirror, in order, over ONE metadata cache keyed by the trusted
  root (so versions seen on any mirror protect against rollback on every other), locked
  against a second process.
- Listing: the target paths of the roles delegated for the device's vendor/class, each
  then looked up again with `get_targetinfo` (the public call, which applies the delegation
  scope and thresholds): a name a role lists outside its scope is never offered.
- Custom metadata ({"mpboot": {...}}, checked strictly) offers the image without
  downloading it; the chosen one is downloaded (or found in the target cache, re-hashed),
  and its signed TLVs must say what the metadata said, else it is refused and nothing is
  sent.

Target paths are "<vendor uuid>/<class uuid>/<name>" (str(uuid.UUID(bytes=...)), dashed), the
layout `mpboot repo` writes. Errors are mpboot's: RepositoryRefused (exit 1),
RepositoryUnavailable (exit 3), UsageError (exit 2) for a bad --root or a cache in use.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import urllib3
from tuf.api import exceptions as tx
from tuf.api.metadata import DelegatedRole, Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from mpboot import __version__
from mpboot.errors import (
    ImageRejected,
    MpbootError,
    RepositoryErrorCode,
    RepositoryRefused,
    RepositoryUnavailable,
    UsageError,
    reason,
    repository_error,
)
from mpboot.flashing import PreparedImage, prepare
from mpboot.image import ImageKind, TlvType
from mpboot.smp.messages import DeviceInfo
from mpboot.sync import ImageFacts, NothingFor

TIMEOUT_S = 10.0  # connect, and the longest silence while reading (--repo-timeout-s)
DEADLINE_S = 120.0  # for one whole file (--repo-deadline-s)
MAX_IMAGE_BYTES = 16 * 1024 * 1024  # a target longer than this is refused before any download
CHUNK = 65536
ROOT_MAX_BYTES = 512_000  # a --root file (ngclient's bound for root.json)
LIST_PROBE = ".mpboot-list"  # a name no target has (repo add refuses a leading "."): finds the roles for a prefix
_HEX64 = re.compile(r"[0-9a-f]{64}")

Warn = Callable[[str], None]


def target_prefix(vendor_id: bytes, class_id: bytes) -> str:
    """The folder of a vendor/class's targets: "<vendor uuid>/<class uuid>/"."""
    return f"{uuid.UUID(bytes=vendor_id)}/{uuid.UUID(bytes=class_id)}/"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mpboot/tuf, else ~/.cache/mpboot/tuf."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpboot" / "tuf"


def check_mirror_url(url: str) -> str:
    """A mirror's base URL, without a trailing "/", or ValueError saying why it cannot be one:
    http or https, ASCII (an international host name in punycode, xn--...), a host (each
    label 1-63 characters), a port 1-65535, and no query or fragment (metadata/ and targets/
    are appended to its path). Checked once, before any request: a URL no request could be
    made to is a usage error (exit 2), never "mirror unreachable" (exit 3)."""
    if not url.isascii():
        raise ValueError("not ASCII: give an international host name in punycode (xn--...), "
                         "and percent-encode the path")
    try:
        parts = urllib3.util.parse_url(url)
    except urllib3.exceptions.LocationParseError as err:
        why = str(err).removeprefix("Failed to parse: ")
        raise ValueError(f"not a URL ({'bad host or port' if why == url else why})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("not an http:// or https:// URL")
    if not parts.host:
        raise ValueError("no host")
    if not parts.host.startswith("["):  # (an IPv6 literal; urllib3 checked it)
        try:
            parts.host.encode("idna")  # (what urllib3 does before connecting: empty or long labels)
        except UnicodeError:
            raise ValueError(f"bad host name {parts.host!r} (a label empty or longer than 63 characters)") from None
    if parts.port == 0:
        raise ValueError("port 0")
    for what, value in (("query (?...)", parts.query), ("fragment (#...)", parts.fragment)):
        if value is not None:
            raise ValueError(f"a mirror's URL takes no {what}: metadata/ and targets/ are appended to its path")
    return url.rstrip("/")


# --- fetching ----------------------------------------------------------------------------------


class BoundedFetcher(FetcherInterface):
    """ngclient's fetcher, bounded: no retries and no redirects (give the final URL), a
    connect timeout and a read timeout (the longest silence) of `timeout_s`, and `deadline_s`
    for a whole file (checked as each piece arrives: a trickling mirror is cut off). Every
    failure is a tuf DownloadError (SlowRetrievalError when too slow, DownloadHTTPError for an
    HTTP status other than 200) whose message starts with the URL. No proxy support."""

    def __init__(self, timeout_s: float, deadline_s: float) -> None:
        if timeout_s <= 0 or deadline_s <= 0:
            raise UsageError("repository timeouts must be positive")
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._pool = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                         headers={"User-Agent": f"mpboot/{__version__}"})

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """As FetcherInterface's, with the URL in a length error."""
        try:
            with super().download_file(url, max_length) as f:
                yield f
        except tx.DownloadLengthMismatchError as err:
            if str(err).startswith(url):
                raise
            raise tx.DownloadLengthMismatchError(f"{url}: {err}") from None

    def _fetch(self, url: str) -> Iterator[bytes]:
        end = time.monotonic() + self.deadline_s
        try:
            r = self._pool.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.NewConnectionError as err:  # (a ConnectTimeoutError subclass: first)
            raise tx.DownloadError(f"{url}: cannot connect ({_why(err)})") from None
        except urllib3.exceptions.TimeoutError:
            raise tx.SlowRetrievalError(f"{url}: no answer within {self.timeout_s:g} s") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise tx.DownloadError(f"{url}: {_why(err)}") from None
        if r.status != 200:
            r.release_conn()
            moved = " (redirects are not followed: give the final URL)" if 300 <= r.status < 400 else ""
            raise tx.DownloadHTTPError(f"{url}: HTTP {r.status}{moved}", r.status)
        return self._pieces(r, url, end)

    def _pieces(self, r: urllib3.BaseHTTPResponse, url: str, end: float) -> Iterator[bytes]:
        try:
            while True:
                piece = r.read1(CHUNK)  # what has arrived (stream() would wait for a whole chunk)
                if not piece:
                    return
                if time.monotonic() > end:
                    raise tx.SlowRetrievalError(f"{url}: not complete within {self.deadline_s:g} s")
                yield piece
        except urllib3.exceptions.TimeoutError:
            raise tx.SlowRetrievalError(f"{url}: stalled for {self.timeout_s:g} s") from None
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise tx.DownloadError(f"{url}: {_why(err)}") from None
        finally:
            r.release_conn()


def _why(err: BaseException) -> str:
    """urllib3's reason without its object reprs: the innermost OSError's text if any."""
    inner: BaseException | None = err
    while inner is not None:
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror
        inner = inner.__cause__ or inner.__context__
    return reason(err)


# --- the images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TufImage(ImageFacts):
    """A target of the repository, from its (verified) TUF metadata: offered to `plan`
    without its bytes."""

    path: str  # the target path: "<vendor uuid>/<class uuid>/<name>"
    version_key: tuple[int, int, int, int]
    counter: int
    vendor_id: bytes | None
    class_id: bytes | None
    image_hash: bytes
    kind: str
    target: TargetFile = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def hash(self) -> bytes | None:
        return self.image_hash

    @property
    def key(self) -> tuple[int, ...]:
        return self.version_key


def _uuid_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    try:
        u = uuid.UUID(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a UUID") from None
    if str(u) != value:
        raise ValueError(f"{what} {value!r} is not a lower-case dashed UUID")
    return u.bytes


def image_from_target(tf: TargetFile) -> TufImage:
    """The custom metadata {"mpboot": {version, counter, vendor, class, kind, image_hash}} of a
    target, checked strictly (ValueError saying what is wrong)."""
    custom = tf.custom
    meta = custom.get("mpboot") if isinstance(custom, dict) else None
    if not isinstance(meta, dict):
        raise ValueError('no custom "mpboot" metadata')
    version = meta.get("version")
    if (not isinstance(version, list) or len(version) != 4
            or not all(type(v) is int and 0 <= v <= (255 if i < 2 else 0xFFFF if i == 2 else 0xFFFFFFFF)
                       for i, v in enumerate(version))):
        raise ValueError("version is not [major, minor, revision, build] in range")
    counter = meta.get("counter")
    if type(counter) is not int or not 0 <= counter <= 0xFFFFFFFF:
        raise ValueError("counter is not a u32")
    kind = meta.get("kind")
    if not isinstance(kind, str) or kind not in {k.name.lower() for k in ImageKind}:  # type: ignore[union-attr]
        raise ValueError(f"kind {kind!r} is not one of app, updater, firmware")
    image_hash = meta.get("image_hash")
    if not isinstance(image_hash, str) or not _HEX64.fullmatch(image_hash):
        raise ValueError("image_hash is not 64 lower-case hex digits")
    vendor_id = _uuid_bytes(meta.get("vendor"), "vendor")
    class_id = _uuid_bytes(meta.get("class"), "class")
    if not tf.path.startswith(target_prefix(vendor_id, class_id)):
        raise ValueError("its path is not under its own vendor/class")
    return TufImage(tf.path, (version[0], version[1], version[2], version[3]), counter, vendor_id, class_id,
                    bytes.fromhex(image_hash), kind, tf)


def check_image(img: PreparedImage, t: TufImage) -> None:
    """The downloaded image says what its metadata said (version, counter, vendor, class, kind,
    SHA256 TLV): else RepositoryRefused (BAD_CUSTOM), and nothing is sent."""
    v = img.parsed.header.version
    tlv = {x.type: x.value for x in img.parsed.protected}
    sec = tlv.get(TlvType.SEC_CNT)
    kind = ImageKind(img.parsed.kind).name
    says = {"version": (v.major, v.minor, v.revision, v.build),
            "counter": int.from_bytes(sec, "little") if sec else 0,
            "vendor": tlv.get(TlvType.UUID_VID), "class": tlv.get(TlvType.UUID_CID),
            "kind": kind.lower() if kind else None, "image_hash": img.hash}
    meant = {"version": t.version_key, "counter": t.counter, "vendor": t.vendor_id, "class": t.class_id,
             "kind": t.kind, "image_hash": t.image_hash}
    wrong = [k for k in meant if says[k] != meant[k]]
    if wrong:
        show = lambda x: x.hex() if isinstance(x, bytes) else x  # noqa: E731
        diff = ", ".join(f"{k} {show(meant[k])!s} in the metadata, {show(says[k])!s} in the image" for k in wrong)
        raise RepositoryRefused(RepositoryErrorCode.BAD_CUSTOM,
                                f"{t.path}: its metadata does not match the image ({diff}): refused")


# --- the source ---------------------------------------------------------------------------------


def _lock_now(f: IO[bytes]) -> None:
    """An exclusive lock on the open file, now or OSError (released when it is closed)."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        return
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


@dataclass
class MirrorFailure:
    url: str
    error: MpbootError


class TufSource:
    """`mpboot sync`'s images from a TUF repository with mirrors `urls` (in order of
    preference), trusting `root_bytes` (the root.json given out of band). The cache (metadata
    and verified targets) is `cache_dir/<first 16 hex of SHA-256(root)>`, locked for the life
    of the source (close() releases it). Every method blocks, and runs one at a time.
    `warn`: one line per mirror passed over and per target ignored."""

    def __init__(self, urls: Sequence[str], root_bytes: bytes, cache_dir: Path, *, timeout_s: float = TIMEOUT_S,
                 deadline_s: float = DEADLINE_S, warn: Warn | None = None) -> None:
        if not urls:
            raise UsageError("no repository URL")
        self.urls = []
        for u in urls:
            try:
                self.urls.append(check_mirror_url(u))
            except ValueError as err:
                raise UsageError(f"--repo {u}: {err}") from None
        self.root_bytes = root_bytes
        self.warn: Warn = warn or (lambda text: None)
        try:
            root = Metadata[Root].from_bytes(root_bytes)
            if not isinstance(root.signed, Root):
                raise ValueError(f"a {root.signed.type} metadata file, not root")
            root.signed.verify_delegate(Root.type, root.signed_bytes, root.signatures)
        except Exception as err:  # (securesystemslib and tuf raise many kinds for bad JSON)
            raise UsageError(f"--root: not a TUF root.json signed by its own threshold ({reason(err)})") from None
        self.root_version = root.signed.version
        self.cache = Path(cache_dir) / hashlib.sha256(root_bytes).hexdigest()[:16]
        self.fetcher = BoundedFetcher(timeout_s, deadline_s)
        self.config = UpdaterConfig(app_user_agent=f"mpboot/{__version__}")
        self._lock = threading.Lock()
        self._lockfile = self._take_cache()
        self._updater: Updater | None = None
        self.mirror: str | None = None  # the mirror whose metadata this pass uses
        self._fresh = False  # refreshed and not yet used by a pass
        self._listed: dict[tuple[bytes, bytes], list[TufImage]] = {}

    def _take_cache(self) -> IO[bytes]:
        try:
            (self.cache / "metadata").mkdir(parents=True, exist_ok=True)
            (self.cache / "targets").mkdir(exist_ok=True)
            f = open(self.cache / "lock", "ab")
        except OSError as err:
            raise UsageError(f"--cache {self.cache}: cannot use it: {reason(err)}") from None
        try:
            _lock_now(f)
        except OSError:
            f.close()
            raise UsageError(f"--cache {self.cache}: in use by another mpboot sync "
                             "(one station, one cache: give another --cache)") from None
        return f

    def close(self) -> None:
        if not self._lockfile.closed:
            self._lockfile.close()  # (releases the lock)

    def __enter__(self) -> TufSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata --

    def _new_updater(self, url: str) -> Updater:
        return Updater(str(self.cache / "metadata"), f"{url}/metadata/", target_dir=str(self.cache / "targets"),
                       target_base_url=f"{url}/targets/", fetcher=self.fetcher, config=self.config,
                       bootstrap=self.root_bytes)

    def refresh(self) -> str:
        """Fresh metadata from the first mirror that has it (each one passed over: a warning
        line); the mirror used. No mirror: RepositoryRefused when a mirror answered but was
        refused, else RepositoryUnavailable; the message lists every mirror's reason."""
        with self._lock:
            failures: list[MirrorFailure] = []
            self._updater, self.mirror, self._listed = None, None, {}
            for n, url in enumerate(self.urls):
                try:
                    up = self._new_updater(url)
                    up.refresh()
                except (tx.DownloadError, tx.RepositoryError, OSError) as err:
                    failure = MirrorFailure(url, _mirrors_fault(err, url))
                    failures.append(failure)
                    if n + 1 < len(self.urls):
                        self.warn(f"{failure.error}; trying {self.urls[n + 1]}")
                    continue
                self._updater, self.mirror, self._fresh = up, url, True
                return url
            raise _all_failed(failures)

    def describe(self) -> str:
        """The versions of this pass's metadata: "root v1, timestamp v5, snapshot v4"."""
        trusted = _verified_set(self._need())
        return (f"root v{trusted.root.version}, timestamp v{trusted.timestamp.version}, "
                f"snapshot v{trusted.snapshot.version}")

    def begin_pass(self) -> None:
        """A pass refreshes the metadata (a new Updater: ngclient refreshes once per Updater),
        unless a refresh was made since the last pass and not used (the CLI's first check)."""
        if self._fresh and self._updater is not None:
            self._fresh = False
            return
        self.refresh()
        self._fresh = False

    def _need(self) -> Updater:
        if self._updater is None:
            raise RepositoryUnavailable("the repository's metadata was not refreshed")
        return self._updater

    # -- listing --

    def candidates(self, info: DeviceInfo) -> list[TufImage]:
        """The targets for the device's vendor and class (NothingFor a device that reports
        none: a TUF repository serves per vendor and class). A role's error (expired,
        threshold not met, ...) is RepositoryRefused for this vendor/class only."""
        if info.vendor_id is None or info.class_id is None:
            raise NothingFor("the device reports no vendor/class id: a TUF repository serves per vendor and class")
        ids = (info.vendor_id, info.class_id)
        with self._lock:
            if ids not in self._listed:
                self._listed[ids] = self._list(target_prefix(*ids))
            return self._listed[ids]

    def _list(self, prefix: str) -> list[TufImage]:
        up = self._need()
        try:
            up.get_targetinfo(prefix + LIST_PROBE)  # loads and verifies the roles for this prefix
            names = self._names(up, prefix)
            out: list[TufImage] = []
            for path in names:
                tf = up.get_targetinfo(path)  # the authority: scope, threshold and order are ngclient's
                if tf is None:
                    self.warn(f"repo: {path}: listed outside its role's delegated paths: ignored")
                    continue
                try:
                    image = image_from_target(tf)
                except ValueError as err:
                    self.warn(f"repo: {path}: bad custom metadata ({err}): ignored")
                    continue
                if image.kind == "app":  # (sync sends apps; updaters and firmware go another way)
                    out.append(image)
            return out
        except (tx.DownloadError, tx.RepositoryError, OSError) as err:
            raise _mapped(err, self.mirror) from None

    def _names(self, up: Updater, prefix: str) -> list[str]:
        """The target paths under `prefix` listed by the verified roles that the lookup of a
        name under it visited (ngclient has no listing call: this reads its verified set,
        `Updater._trusted_set`, pinned by tuf<8 and tested). A name a role lists outside its
        delegated paths: a warning."""
        trusted = _verified_set(up)
        probe = prefix + LIST_PROBE
        names: list[str] = []
        todo: list[tuple[str, str, DelegatedRole | None]] = [(Targets.type, Root.type, None)]
        seen: set[str] = set()
        while todo and len(seen) <= self.config.max_delegations:
            role, delegator, scope = todo.pop(0)
            if role in seen or not trusted.contains(role, delegator):  # (verified against that delegator)
                continue
            seen.add(role)
            signed = trusted[role]
            assert isinstance(signed, Targets)
            for path in signed.targets:
                if scope is not None and not scope.is_delegated_path(path):
                    self.warn(f"repo: role {role} lists {path}, outside its delegated paths: ignored")
                elif path.startswith(prefix) and path not in names:
                    names.append(path)
            if signed.delegations is not None and signed.delegations.roles is not None:
                for child, _terminating in signed.delegations.get_roles_for_target(probe):
                    todo.append((child, role, signed.delegations.roles[child]))
        return names

    # -- the bytes --

    def load(self, image: ImageFacts) -> PreparedImage:
        """The image, from the target cache (re-hashed) or downloaded (the mirror of this
        pass first, then the others), checked against its metadata (check_image)."""
        assert isinstance(image, TufImage)
        tf = image.target
        if tf.length > MAX_IMAGE_BYTES:
            raise RepositoryRefused(RepositoryErrorCode.TOO_LARGE, f"{image.path}: {tf.length} bytes, more "
                                    f"than an image may be ({MAX_IMAGE_BYTES}): refused")
        with self._lock:
            up = self._need()
            where = up.find_cached_target(tf)
            if where is None:
                where = self._download(up, tf)
            try:
                data = Path(where).read_bytes()
            except OSError as err:
                raise UsageError(f"--cache {self.cache}: cannot read {where}: {reason(err)}") from None
        try:
            img = prepare(data)
        except ImageRejected as err:
            raise RepositoryRefused(RepositoryErrorCode.BAD_CUSTOM, f"{image.path}: not a valid image ({err}): "
                                    "refused") from None
        check_image(img, image)
        return img

    def _download(self, up: Updater, tf: TargetFile) -> str:
        order = [self.mirror] + [u for u in self.urls if u != self.mirror]
        failures: list[MirrorFailure] = []
        for n, url in enumerate(order):
            assert url is not None
            try:
                return up.download_target(tf, target_base_url=f"{url}/targets/")
            except (tx.DownloadError, tx.RepositoryError, OSError) as err:
                failure = MirrorFailure(url, _mirrors_fault(err, url))
                failures.append(failure)
                if n + 1 < len(order):
                    self.warn(f"{failure.error}; trying {order[n + 1]}")
        raise _all_failed(failures)


def _verified_set(up: Updater) -> Any:
    """ngclient's verified metadata (`Updater._trusted_set`: the only way to list a role's
    targets, python-tuf has no public call; pinned by tuf<8, and the tests use it)."""
    trusted = getattr(up, "_trusted_set", None)
    if trusted is None or not callable(getattr(trusted, "contains", None)):
        import tuf

        raise UsageError(f"python-tuf {tuf.__version__} keeps no verified metadata set mpboot can list "
                         "targets from: install tuf>=7.0.1,<8")
    return trusted  # noqa: SLF001


def _mapped(err: BaseException, url: str | None) -> MpbootError:
    if isinstance(err, OSError) and not isinstance(err, tx.DownloadError):
        return UsageError(f"TUF cache: {reason(err)}")
    return repository_error(err, url)


def _mirrors_fault(err: BaseException, url: str) -> MpbootError:
    """The error of a mirror that failed a step (the next one is then tried); a local one,
    the shared cache (disk full, permissions: an OSError), is raised at once, whatever the
    number of mirrors: exit 2, and no other mirror tried."""
    error = _mapped(err, url)
    if isinstance(error, UsageError):
        raise error from None
    return error


def _all_failed(failures: list[MirrorFailure]) -> MpbootError:
    """One error for a step no mirror could do: refused (exit 1) if any mirror answered and
    was refused, else unavailable (exit 3)."""
    if len(failures) == 1:
        return failures[0].error
    text = "no mirror could be used: " + "; ".join(str(f.error) for f in failures)
    refused = [f.error for f in failures if isinstance(f.error, RepositoryRefused)]
    if refused:
        first = refused[0]
        assert isinstance(first, RepositoryRefused)
        return RepositoryRefused(first.code, text)
    return RepositoryUnavailable(text)
