"""The repository's operations: init, delegate, add, remove, sign (cosign or renew), rotate,
publish. Each edits the *staged* next version of a role (staging/metadata/ROLE.json) and
signs it with the -k keys that belong to it; `publish` puts every staged version that meets
its threshold under public/, with a new snapshot and timestamp (timestamp.json last).

Thresholds: a role staged with fewer signatures than its threshold waits for `sign` by the
other key holders, one at a time. Root needs both thresholds: the previous root's and its
own (TUF's rotation rule, Root.get_root_verification_result). A change that would leave
clients unable to verify what is live (a new root whose targets keys the live targets is not
signed by) is refused at publish with what to sign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpboot.errors import RepositoryError, TargetRefused
from mpboot.files import write_atomic
from mpboot.keys import PublicKey
from mpboot.repo.images import ImageTarget, scope_pattern
from mpboot.repo.layout import DEFAULT_EXPIRES, TOP_ROLES, RepoDir, Settings, check_role_name, now
from mpboot.repo.signer import KeyRing, keyhash_of, tuf_key

if TYPE_CHECKING:
    from securesystemslib.signer import Key
    from tuf.api.metadata import DelegatedRole, Metadata, MetaFile, Root, TargetFile, Targets

MIN_ROOT_THRESHOLD = 2  # one root key alone is a single point of failure: refused


@dataclass(frozen=True)
class Signatures:
    """How far a staged role is signed: `have` of `need` (root: the smaller of its two
    thresholds' margins), and whether it may be published."""

    have: int
    need: int
    verified: bool
    detail: str  # "2 of 2", or for root "previous root's keys 1 of 2, new root's keys 2 of 2"
    waits_for: str | None = None  # signed enough, but under a delegator still staged ("root version 2")


# --- reading the effective state --------------------------------------------------------------


def published_root(repo: RepoDir) -> Metadata[Root] | None:
    found = repo.read_published("root")
    return found[0] if found else None


def effective(repo: RepoDir, role: str) -> Metadata[Any] | None:
    """The role as the next publish would have it: staged, else published."""
    staged = repo.read_staged(role)
    if staged is not None:
        return staged
    found = repo.read_published(role)
    return found[0] if found else None


def root_signatures(md: Metadata[Root], previous: Root | None) -> Signatures:
    res = md.signed.get_root_verification_result(previous, md.signed_bytes, md.signatures)
    first, second = res.first, res.second
    have = min(len(first.signed), len(second.signed))
    need = max(first.threshold, second.threshold)
    if previous is None:
        detail = f"{len(second.signed)} of {second.threshold}"
    else:
        detail = (f"previous root's keys {len(first.signed)} of {first.threshold}, "
                  f"new root's keys {len(second.signed)} of {second.threshold}")
    return Signatures(have, need, res.verified, detail)


def delegate_signatures(delegator: Root | Targets, role: str, md: Metadata[Any]) -> Signatures:
    res = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
    return Signatures(len(res.signed), res.threshold, res.verified, f"{len(res.signed)} of {res.threshold}")


def live(repo: RepoDir, role: str) -> Metadata[Any] | None:
    """Root or top-level targets as the next publish would make it live: the staged version
    if it is signed enough (under the live root, for targets), else the published one."""
    staged = repo.read_staged(role)
    found = repo.read_published(role)
    published = found[0] if found else None
    if staged is not None:
        if role == "root":
            if root_signatures(staged, published.signed if published is not None else None).verified:
                return staged
        else:
            root = live(repo, "root")
            if root is not None and delegate_signatures(root.signed, role, staged).verified:
                return staged
    return published


def _delegates(delegator: Metadata[Any] | None, role: str) -> bool:
    if delegator is None:
        return False
    return role in TOP_ROLES or role in delegated_roles(delegator)


def signatures_of(repo: RepoDir, role: str, md: Metadata[Any]) -> Signatures:
    """How far `md` (the staged `role`) is signed: against its delegator as the next publish
    makes it live; when that is not enough but the delegator's staged version would accept
    it, `waits_for` names that version."""
    if role == "root":
        previous = published_root(repo)
        return root_signatures(md, previous.signed if previous is not None else None)
    delegator_role = "root" if role in TOP_ROLES else "targets"
    live_d, staged_d = live(repo, delegator_role), repo.read_staged(delegator_role)
    current = delegate_signatures(live_d.signed, role, md) if live_d is not None and _delegates(live_d, role) else None
    if current is not None and current.verified:
        return current
    if staged_d is not None and staged_d is not live_d and _delegates(staged_d, role):
        pending = delegate_signatures(staged_d.signed, role, md)
        if pending.verified:
            return Signatures(pending.have, pending.need, False, pending.detail,
                              f"{delegator_role} version {staged_d.signed.version}")
        return current if current is not None and current.have >= pending.have else pending
    return current if current is not None else Signatures(0, 1, False, "no delegation")


def delegated_roles(targets: Metadata[Targets]) -> dict[str, DelegatedRole]:
    """The delegated roles of a top-level targets Metadata, by name, in search order."""
    d = targets.signed.delegations
    return dict(d.roles) if d is not None and d.roles else {}


def role_keyids(repo: RepoDir, role: str) -> list[str]:
    """The keyids that may sign `role` now: those of its delegator published and staged (during
    a rotation, a root is signed by the previous root's keys and the new root's, and a role
    may be signed ahead by the keys its staged delegator names)."""
    ids: list[str] = []
    if role in TOP_ROLES:
        for root in (published_root(repo), repo.read_staged("root")):
            if root is not None:
                ids += root.signed.roles[role].keyids
        return list(dict.fromkeys(ids))
    found = repo.read_published("targets")
    names: list[str] = []
    for targets in (found[0] if found else None, repo.read_staged("targets")):
        if targets is not None:
            for name, delegation in delegated_roles(targets).items():
                names.append(name)
                if name == role:
                    ids += delegation.keyids
    if role not in names:
        known = ", ".join(["root", "targets", *dict.fromkeys(names)])
        raise RepositoryError(f"{role}: no such role (the roles are {known})")
    return list(dict.fromkeys(ids))


def _next(repo: RepoDir, settings: Settings, role: str) -> Metadata[Any]:
    """The staged copy of `role` to edit: the staged one, else the newest published one as
    version + 1; its signatures cleared (they covered other content) and expiry renewed."""
    from tuf.api.metadata import Metadata

    md = repo.read_staged(role)
    if md is None:
        found = repo.read_published(role)
        if found is None:
            raise RepositoryError(f"{role}: nothing published or staged to change")
        md = Metadata.from_bytes(found[1])  # a fresh copy: never share lists with what was read
        md.signed.version += 1
    md.signatures.clear()
    md.signed.expires = now() + settings.period(role)
    return md


def _summary(repo: RepoDir, role: str, md: Metadata[Any]) -> str:
    s = signatures_of(repo, role, md)
    state = ("ready to publish" if s.verified else
             f"goes live with {s.waits_for}, which waits for signatures" if s.waits_for else
             "waiting for signatures (mpboot repo sign)")
    return f"staged {role} version {md.signed.version}: signed by {s.detail}, {state}"


# --- init -----------------------------------------------------------------------------------


def init(path: Path, *, root_keys: Sequence[PublicKey], root_threshold: int, targets_keys: Sequence[PublicKey],
         targets_threshold: int, snapshot_keys: Sequence[PublicKey], timestamp_keys: Sequence[PublicKey],
         expires: dict[str, timedelta], ring: KeyRing) -> list[str]:
    """A new repository at `path`: root version 1 and top-level targets version 1 (delegating
    nothing yet) staged and signed by the -k keys that are theirs. `publish` makes it live."""
    from tuf.api.metadata import Delegations, Metadata, Root, Targets

    keysets = {"root": root_keys, "targets": targets_keys, "snapshot": snapshot_keys, "timestamp": timestamp_keys}
    thresholds = {"root": root_threshold, "targets": targets_threshold, "snapshot": 1, "timestamp": 1}
    for role, keys in keysets.items():
        _check_keyset(role, keys, thresholds[role])
    settings = Settings({**DEFAULT_EXPIRES, **expires}, {})
    root = Root(expires=now() + settings.period("root"), consistent_snapshot=True)
    for role, keys in keysets.items():
        for key in keys:
            root.add_key(tuf_key(key), role)
        root.roles[role].threshold = thresholds[role]
    targets = Targets(expires=now() + settings.period("targets"), delegations=Delegations(keys={}, roles={}))
    ring.check_belongs(set(root.roles["root"].keyids) | set(root.roles["targets"].keyids), "root or targets")
    repo = RepoDir(path)
    repo.check_new()
    root_md, targets_md = Metadata(root), Metadata(targets)
    ring.sign(root_md, "root", root.roles["root"].keyids, repo.staged_path("root"))
    ring.sign(targets_md, "targets", root.roles["targets"].keyids, repo.staged_path("targets"))
    repo.create(settings)
    repo.stage("root", root_md)
    repo.stage("targets", targets_md)
    return [f"made repository {path}", _summary(repo, "root", root_md), _summary(repo, "targets", targets_md),
            "next: mpboot repo publish with the snapshot and timestamp keys"]


def _check_keyset(role: str, keys: Sequence[PublicKey], threshold: int) -> None:
    if not keys:
        raise RepositoryError(f"{role}: give at least one key")
    if len({k.modulus for k in keys}) != len(keys):
        raise RepositoryError(f"{role}: the same key is given twice")
    if role == "root" and threshold < MIN_ROOT_THRESHOLD:
        raise RepositoryError(f"root threshold {threshold}: at least {MIN_ROOT_THRESHOLD} root keys must sign "
                              "(one root key alone is a single point of failure)")
    if not 1 <= threshold <= len(keys):
        raise RepositoryError(f"{role} threshold {threshold} with {len(keys)} keys: it must be 1 to {len(keys)}")


# --- delegate, add, remove --------------------------------------------------------------------


def delegate(path: Path, role: str, *, scopes: Sequence[tuple[bytes, bytes]], keys: Sequence[PublicKey],
             threshold: int, expires: timedelta | None, ring: KeyRing) -> list[str]:
    """Delegate `role` (a team) the vendor/class pairs `scopes`, signed by `threshold` of
    `keys`: stages top-level targets with the delegation (signed by the -k targets keys) and
    an empty version 1 of the role (signed by the -k keys of the team)."""
    from tuf.api.metadata import DelegatedRole, Delegations, Metadata, Targets

    check_role_name(role)
    _check_keyset(role, keys, threshold)
    if not scopes:
        raise RepositoryError(f"{role}: give the vendor and class ids it may publish for")
    repo = RepoDir(path)
    with repo.locked() as settings:
        current = effective(repo, "targets")
        if current is not None and role in delegated_roles(current):
            raise RepositoryError(f"{role}: already delegated (change its keys with mpboot repo rotate)")
        if repo.published_versions(role) or repo.read_staged(role) is not None:
            raise RepositoryError(f"{role}: a role of that name was published before; choose another name")
        targets = _next(repo, settings, "targets")
        if targets.signed.delegations is None:
            targets.signed.delegations = Delegations(keys={}, roles={})
        assert targets.signed.delegations.roles is not None
        paths = list(dict.fromkeys(scope_pattern(v, c) for v, c in scopes))
        targets.signed.delegations.roles[role] = DelegatedRole(role, [], threshold, True, paths=paths)
        for key in keys:
            targets.signed.add_key(tuf_key(key), role)
        if expires is not None:
            settings.role_expires[role] = expires
        team = Metadata(Targets(expires=now() + settings.period(role), targets={}))
        targets_ids = role_keyids(repo, "targets")
        team_ids = targets.signed.delegations.roles[role].keyids
        ring.check_belongs(set(targets_ids) | set(team_ids), f"targets or {role}")
        ring.sign(targets, "targets", targets_ids, repo.staged_path("targets"))
        ring.sign(team, role, team_ids, repo.staged_path(role))
        repo.save_settings(settings)
        repo.stage("targets", targets)
        repo.stage(role, team)
        return [f"delegated {', '.join(paths)} to {role} ({threshold} of {len(keys)} key{'s' if len(keys) > 1 else ''})",
                _summary(repo, "targets", targets), _summary(repo, role, team)]


def _role_and_delegation(repo: RepoDir, role: str) -> DelegatedRole:
    if role in TOP_ROLES:
        raise RepositoryError(f"{role}: images go to a team's delegated role (mpboot repo delegate), not {role}")
    check_role_name(role)
    targets = effective(repo, "targets")
    delegated = delegated_roles(targets) if targets is not None else {}
    if role not in delegated:
        raise RepositoryError(f"{role}: no such role (delegated: {', '.join(delegated) or 'none yet'})")
    return delegated[role]


def add(path: Path, role: str, images: Sequence[ImageTarget], ring: KeyRing) -> list[str]:
    """List `images` in `role` (each checked against the role's vendor/class scope), stage
    their files and the role's next version, signed by the -k keys of the role."""
    from tuf.api.metadata import TargetFile

    repo = RepoDir(path)
    with repo.locked() as settings:
        delegation = _role_and_delegation(repo, role)
        ring.check_belongs(set(delegation.keyids), role)
        current = effective(repo, role)
        listed = dict(current.signed.targets) if current is not None else {}
        new: list[tuple[ImageTarget, TargetFile]] = []
        lines = []
        for img in images:
            if not delegation.is_delegated_path(img.path):
                raise TargetRefused(f"{img.name}: vendor {img.custom['mpboot']['vendor']} class "
                                    f"{img.custom['mpboot']['class']} is outside role {role}'s scope "
                                    f"({', '.join(delegation.paths or [])}); nothing written")
            tf = TargetFile.from_data(img.path, img.data, ["sha256"])
            tf.unrecognized_fields["custom"] = img.custom
            old = listed.get(img.path)
            if old is not None:
                if old.hashes == tf.hashes and old.length == tf.length:
                    lines.append(f"{img.path}: already listed with these bytes")
                    continue
                raise TargetRefused(f"{img.path}: already listed with other bytes; a new build takes a new name "
                                    "(--name), or remove the old one first")
            if img.path in {n.path for n, _ in new}:
                raise TargetRefused(f"{img.path}: given twice")
            new.append((img, tf))
        if not new:
            return lines or ["nothing to add"]
        md = _next(repo, settings, role)
        for img, tf in new:
            md.signed.targets[img.path] = tf
        ring.sign(md, role, delegation.keyids, repo.staged_path(role))
        for img, tf in new:
            staged = repo.staged_targets / _prefixed(tf)
            staged.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(staged, img.data)
        repo.stage(role, md)
        for img, tf in new:
            c = img.custom["mpboot"]
            lines.append(f"added {img.path} (version {img.image.version}, counter {c['counter']}, {c['kind']}, "
                         f"{tf.length} bytes)")
        lines.append(_summary(repo, role, md))
        return lines


def _prefixed(tf: TargetFile) -> str:
    """The target's file under targets/: <dir>/<sha256>.<name> (consistent snapshots)."""
    return str(tf.get_prefixed_paths()[0])


def remove(path: Path, role: str, names: Sequence[str], ring: KeyRing) -> list[str]:
    """Drop targets from `role` (by path, or by file name when that is unique in the role).
    The files stay under public/targets: clients holding an older snapshot may still fetch them."""
    repo = RepoDir(path)
    with repo.locked() as settings:
        delegation = _role_and_delegation(repo, role)
        ring.check_belongs(set(delegation.keyids), role)
        current = effective(repo, role)
        listed = list(current.signed.targets) if current is not None else []
        paths = []
        for name in names:
            matches = [p for p in listed if p == name] or [p for p in listed if p.rsplit("/", 1)[-1] == name]
            if not matches:
                raise RepositoryError(f"{name}: not listed in {role}")
            if len(matches) > 1:
                raise RepositoryError(f"{name}: {len(matches)} targets of {role} have that name; give the full path")
            paths.append(matches[0])
        md = _next(repo, settings, role)
        for p in dict.fromkeys(paths):
            del md.signed.targets[p]
        ring.sign(md, role, delegation.keyids, repo.staged_path(role))
        repo.stage(role, md)
        return [f"removed {p}" for p in dict.fromkeys(paths)] + [_summary(repo, role, md)]


# --- sign: cosign a staged role, or renew one ------------------------------------------------------


def sign(path: Path, role: str, ring: KeyRing, *, staged_only: bool = False) -> list[str]:
    """Add the -k keys' signatures to the staged `role` (root, targets or a team's role).
    With nothing staged for it: stage its next version with a new expiry (a renewal), unless
    `staged_only` (a signature made elsewhere covers the staged version it was made for)."""
    if role in ("snapshot", "timestamp"):
        raise RepositoryError(f"{role} is signed by mpboot repo publish")
    repo = RepoDir(path)
    with repo.locked() as settings:
        keyids = role_keyids(repo, role)
        ring.check_belongs(set(keyids), role)
        md = repo.read_staged(role)
        lines = []
        if md is None:
            if staged_only:
                raise RepositoryError(f"nothing staged for {role}: take its digest first (mpboot repo sign REPO "
                                      f"{role} --digest-only -o FILE)")
            md = _next(repo, settings, role)
            lines.append(f"renewing {role}: version {md.signed.version}, expires {md.signed.expires:%Y-%m-%d %H:%M} UTC")
        already = [s for s in ring.signers if s.keyid in md.signatures]
        if already:
            raise RepositoryError(f"-k {already[0]}: has already signed the staged {role}; nothing written")
        ring.sign(md, role, keyids, repo.staged_path(role))
        repo.stage(role, md)
        return lines + [_summary(repo, role, md)]


def digest_for_signing(path: Path, role: str) -> tuple[bytes, list[str]]:
    """Air-gapped signing, step 1: the SHA-256 a signature of the staged `role` covers (the
    digest of its canonical JSON), staging its renewal first when nothing is staged for it.
    Step 2 is `sign` with a signing.AttachedSignature made over that digest elsewhere."""
    if role in ("snapshot", "timestamp"):
        raise RepositoryError(f"{role} is signed by mpboot repo publish")
    repo = RepoDir(path)
    with repo.locked() as settings:
        role_keyids(repo, role)  # an unknown role is refused here
        md = repo.read_staged(role)
        lines = []
        if md is None:
            md = _next(repo, settings, role)
            repo.stage(role, md)
            lines.append(f"renewing {role}: version {md.signed.version}, expires {md.signed.expires:%Y-%m-%d %H:%M} UTC")
        return hashlib.sha256(md.signed_bytes).digest(), lines + [_summary(repo, role, md)]


# --- rotate -----------------------------------------------------------------------------------


def rotate(path: Path, role: str, *, add_keys: Sequence[PublicKey], remove_keys: Sequence[str],
           threshold: int | None, ring: KeyRing) -> list[str]:
    """Change the keys (and threshold) of `role`. A top-level role's keys live in root: a new
    root version is staged, to be signed by the previous root's threshold and the new one's.
    A team role's keys live in top-level targets: a new targets version is staged. A role
    whose live version would no longer verify under its new keys is staged again too, for
    the new keys to sign."""
    if not add_keys and not remove_keys and threshold is None:
        raise RepositoryError("nothing to change: give --add, --remove or --threshold")
    repo = RepoDir(path)
    with repo.locked() as settings:
        if role in TOP_ROLES:
            delegator_role = "root"
            holder = _next(repo, settings, "root")
            container, keys = holder.signed, holder.signed.keys
            current_ids, current_threshold = container.roles[role].keyids, container.roles[role].threshold
        else:
            check_role_name(role)
            delegator_role = "targets"
            _role_and_delegation(repo, role)
            holder = _next(repo, settings, "targets")
            container, keys = holder.signed, holder.signed.delegations.keys
            delegation = holder.signed.delegations.roles[role]
            current_ids, current_threshold = delegation.keyids, delegation.threshold
        ids = list(current_ids)
        for ident in remove_keys:
            keyid = _find_key(keys, ids, ident, role)
            container.revoke_key(keyid, role)
            ids.remove(keyid)
        for key in add_keys:
            tk = tuf_key(key)
            if tk.keyid in ids:
                raise RepositoryError(f"{role}: key {tk.keyid[:16]} is already one of its keys")
            container.add_key(tk, role)
            ids.append(tk.keyid)
        new_threshold = threshold if threshold is not None else current_threshold
        if role == "root" and new_threshold < MIN_ROOT_THRESHOLD:
            raise RepositoryError(f"root threshold {new_threshold}: at least {MIN_ROOT_THRESHOLD} root keys must sign")
        if not 1 <= new_threshold <= len(ids):
            raise RepositoryError(f"{role} threshold {new_threshold} with {len(ids)} keys: it must be 1 to {len(ids)}")
        if role in TOP_ROLES:
            container.roles[role].threshold = new_threshold
        else:
            container.delegations.roles[role].threshold = new_threshold
        # The role itself, staged again when its live version would not verify under the change.
        restage = None
        if role not in ("root", "snapshot", "timestamp"):
            live = effective(repo, role)
            if live is not None and not delegate_signatures(container, role, live).verified:
                restage = _next(repo, settings, role)
        signer_ids = set(role_keyids(repo, delegator_role))
        if delegator_role == "root":
            signer_ids |= set(holder.signed.roles["root"].keyids)
        restage_ids = set(ids) if restage is not None else set()
        ring.check_belongs(signer_ids | restage_ids, f"{delegator_role}{' or ' + role if restage else ''}")
        # Sign the delegator with the keys that may sign it now: for root, the previous
        # root's and the new root's.
        if delegator_role == "root":
            previous = published_root(repo)
            keyids = list(dict.fromkeys([*(previous.signed.roles["root"].keyids if previous else []),
                                         *holder.signed.roles["root"].keyids]))
        else:
            keyids = role_keyids(repo, "targets")
        ring.sign(holder, delegator_role, keyids, repo.staged_path(delegator_role))
        if restage is not None:
            ring.sign(restage, role, ids, repo.staged_path(role))
        repo.stage(delegator_role, holder)
        lines = [f"{role}: keys {', '.join(k[:16] for k in ids)}, threshold {new_threshold}",
                 _summary(repo, delegator_role, holder)]
        if restage is not None:
            repo.stage(role, restage)
            lines.append(_summary(repo, role, restage))
        return lines


def _find_key(keys: dict[str, Key], ids: Sequence[str], ident: str, role: str) -> str:
    """A key of `role` named by a TUF keyid or an mpboot KEYHASH (hex, 8 digits or more)."""
    text = ident.strip().lower()
    if len(text) < 8 or any(c not in "0123456789abcdef" for c in text):
        raise RepositoryError(f"--remove {ident!r}: give a key id or key hash in hex (8 digits or more), "
                              "as mpboot repo status shows")
    found = [k for k in ids if k.startswith(text) or keyhash_of(keys[k]).startswith(text)]
    if len(found) != 1:
        raise RepositoryError(f"--remove {ident}: {'no' if not found else 'more than one'} key of {role} matches")
    return found[0]


# --- publish ----------------------------------------------------------------------------------


def _meta(data: bytes, version: int) -> MetaFile:
    from tuf.api.metadata import MetaFile

    return MetaFile(version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})


def publish(path: Path, ring: KeyRing, *, timestamp_only: bool = False) -> list[str]:
    """Publish every staged role that meets its threshold, with a new snapshot and timestamp
    signed by the -k snapshot and timestamp keys; `timestamp_only`: just a new timestamp over
    the published snapshot (the cron job that keeps clients' freshness window open)."""
    from tuf.api.exceptions import LengthOrHashMismatchError
    from tuf.api.metadata import Metadata, Snapshot, Timestamp

    repo = RepoDir(path)
    with repo.locked() as settings:
        lines: list[str] = []
        found_root = repo.read_published("root")
        old_ts = repo.read_published("timestamp")
        old_snap = repo.read_published("snapshot")
        if timestamp_only:
            if found_root is None or old_ts is None or old_snap is None:
                raise RepositoryError("--timestamp-only: nothing published yet; run a full mpboot repo publish first")
            root = found_root[0].signed
            ring.check_belongs(set(root.roles["timestamp"].keyids), "timestamp")
            ts = Metadata(Timestamp(old_ts[0].signed.version + 1, expires=now() + settings.period("timestamp"),
                                    snapshot_meta=old_ts[0].signed.snapshot_meta))
            _sign_top(ring, root, ts, "timestamp", repo.published_path("timestamp", 0))
            repo.write_public(repo.published_path("timestamp", 0), ts.to_bytes(), replace=True)
            lines.append(f"published timestamp version {ts.signed.version} (snapshot version "
                         f"{ts.signed.snapshot_meta.version}), expires {ts.signed.expires:%Y-%m-%d %H:%M} UTC")
            if old_snap[0].signed.expires <= ts.signed.expires:
                lines.append(f"warning: snapshot version {old_snap[0].signed.version} expires "
                             f"{old_snap[0].signed.expires:%Y-%m-%d %H:%M} UTC, before this timestamp: "
                             "run a full publish with the snapshot key")
            return lines

        # 1. What goes live: root, targets, and each delegated role, staged when complete.
        previous = found_root[0].signed if found_root else None
        staged_root = repo.read_staged("root")
        new: dict[str, Metadata[Any]] = {}  # role -> Metadata to write now
        if staged_root is not None and root_signatures(staged_root, previous).verified:
            new["root"] = staged_root
        live_root = new["root"].signed if "root" in new else previous
        if live_root is None:
            raise RepositoryError(f"root version 1 is not signed yet by enough root keys "
                                  f"({signatures_of(repo, 'root', staged_root).detail if staged_root else 'none staged'}): "
                                  "mpboot repo sign REPO root -k KEY")
        live: dict[str, tuple[Metadata[Any], bytes]] = {}  # role -> (Metadata, bytes) as clients will see it
        targets = _pick(repo, "targets", live_root, new, live)
        for name in delegated_roles(targets):
            _pick(repo, name, targets.signed, new, live)

        # 2. Snapshot and timestamp over them: signed before anything is written.
        ring.check_belongs(set(live_root.roles["snapshot"].keyids) | set(live_root.roles["timestamp"].keyids),
                           "snapshot or timestamp")
        meta = dict(old_snap[0].signed.meta) if old_snap else {}
        for name, (md, data) in live.items():
            before = meta.get(f"{name}.json")
            if before is not None and before.version > md.signed.version:
                raise RepositoryError(f"{name}: version {md.signed.version} is older than the published "
                                      f"{before.version}: clients refuse a rollback")
            meta[f"{name}.json"] = _meta(data, md.signed.version)
        snap_version = old_snap[0].signed.version + 1 if old_snap else 1
        snap = Metadata(Snapshot(snap_version, expires=now() + settings.period("snapshot"), meta=meta))
        snap_path = repo.published_path("snapshot", snap_version)
        _sign_top(ring, live_root, snap, "snapshot", snap_path)
        snap_bytes = snap.to_bytes()
        ts = Metadata(Timestamp(old_ts[0].signed.version + 1 if old_ts else 1,
                                expires=now() + settings.period("timestamp"),
                                snapshot_meta=_meta(snap_bytes, snap_version)))
        _sign_top(ring, live_root, ts, "timestamp", repo.published_path("timestamp", 0))

        # 3. Write: target files, role metadata, root, snapshot; timestamp.json last.
        published_files = []
        for name, md in new.items():
            if name == "root":
                continue
            for tf in md.signed.targets.values():
                rel = _prefixed(tf)
                staged_file, public_file = repo.staged_targets / rel, repo.targets / rel
                if public_file.is_file():
                    continue
                if not staged_file.is_file():
                    raise RepositoryError(f"{tf.path}: its file {rel} is neither staged nor published")
                data = staged_file.read_bytes()
                try:
                    tf.verify_length_and_hashes(data)
                except LengthOrHashMismatchError:
                    raise RepositoryError(f"{staged_file}: does not match its listing; nothing more written") from None
                repo.write_public(public_file, data)
                published_files.append(staged_file)
        for name, md in new.items():
            if name not in ("root", "targets"):
                repo.write_public(repo.published_path(name, md.signed.version), live[name][1])
        if "targets" in new:
            repo.write_public(repo.published_path("targets", new["targets"].signed.version), live["targets"][1])
        if "root" in new:
            repo.write_public(repo.published_path("root", new["root"].signed.version), new["root"].to_bytes())
        repo.write_public(snap_path, snap_bytes)
        repo.write_public(repo.published_path("timestamp", 0), ts.to_bytes(), replace=True)
        for name in new:
            repo.unstage(name)
        for f in published_files:
            f.unlink(missing_ok=True)
        # Images added, then removed before they went live: no staged role lists them now.
        listed = {repo.staged_targets / _prefixed(tf) for name in repo.staged_roles() if name not in TOP_ROLES
                  for tf in _staged_targets(repo, name)}
        for f in repo.staged_target_files():
            if f not in listed:
                f.unlink(missing_ok=True)

        for name, md in new.items():
            lines.append(f"published {name} version {md.signed.version}")
        lines.append(f"published snapshot version {snap_version} and timestamp version {ts.signed.version}")
        for name in repo.staged_roles():
            waiting = repo.read_staged(name)
            if waiting is not None:
                lines.append(f"still staged: {_summary(repo, name, waiting)}")
        for name, (md, _) in live.items():
            if md.signed.is_expired():
                lines.append(f"warning: {name} version {md.signed.version} expired {md.signed.expires:%Y-%m-%d %H:%M} "
                             f"UTC: clients refuse it until it is renewed (mpboot repo sign REPO {name} -k KEY)")
        return lines


def _staged_targets(repo: RepoDir, role: str) -> list[TargetFile]:
    md = repo.read_staged(role)
    return list(md.signed.targets.values()) if md is not None else []


def _pick(repo: RepoDir, role: str, delegator: Root | Targets, new: dict[str, Metadata[Any]],
          live: dict[str, tuple[Metadata[Any], bytes]]) -> Metadata[Any]:
    """The version of `role` that goes live: the staged one when it verifies under
    `delegator` as it goes live, else the published one, which must verify too."""
    staged = repo.read_staged(role)
    if staged is not None and delegate_signatures(delegator, role, staged).verified:
        new[role] = staged
        live[role] = (staged, staged.to_bytes())
        return staged
    found = repo.read_published(role)
    if found is not None and delegate_signatures(delegator, role, found[0]).verified:
        live[role] = found
        return found[0]
    detail = signatures_of(repo, role, staged).detail if staged is not None else "nothing staged"
    raise RepositoryError(f"{role} would not verify for clients: its live version is not signed by its keys as "
                          f"they go live (staged: {detail}); sign it (mpboot repo sign REPO {role} -k KEY), "
                          "then publish; nothing written")


def _sign_top(ring: KeyRing, root: Root, md: Metadata[Any], role: str, output: Path) -> None:
    ring.sign(md, role, root.roles[role].keyids, output)
    res = root.get_verification_result(role, md.signed_bytes, md.signatures)
    if not res.verified:
        raise RepositoryError(f"{role}: {len(res.signed)} of {res.threshold} signatures: give its key with -k; "
                              "nothing written")


__all__ = ["Signatures", "add", "delegate", "delegated_roles", "digest_for_signing", "effective", "init", "live",
           "publish", "remove", "role_keyids", "rotate", "sign", "signatures_of"]
