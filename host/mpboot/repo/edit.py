"""The repository's edits: init, delegate, add, remove, sign (cosign, renew, or a signature
made elsewhere), rotate. Each edits the *staged* next version of a role
(staging/metadata/ROLE.json) and signs it with the -k keys that belong to it; `publish`
(mpboot.repo.publish) puts every staged version that meets its threshold under public/.

Thresholds: a role staged with fewer signatures than its threshold waits for `sign` by the
other key holders, one at a time. Root needs both thresholds: the previous root's and its
own (TUF's rotation rule, Root.get_root_verification_result). A change that would leave
clients unable to verify what is live (a new root whose targets keys the live targets is not
signed by) is refused at publish with what to sign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from mpboot.errors import RepositoryError, TargetRefused
from mpboot.files import write_atomic
from mpboot.keys import PublicKey
from mpboot.repo.images import ImageTarget, scope_pattern
from mpboot.repo.layout import DEFAULT_EXPIRES, TOP_ROLES, RepoDir, Settings, check_role_name, now
from mpboot.repo.signer import KeyRing, keyhash_of, tuf_key
from mpboot.repo.state import (
    delegate_signatures,
    delegated_roles,
    effective,
    next_version,
    published_root,
    role_keyids,
    summary,
    target_file,
)

if TYPE_CHECKING:
    from securesystemslib.signer import Key
    from tuf.api.metadata import DelegatedRole

MIN_ROOT_THRESHOLD = 2  # one root key alone is a single point of failure: refused


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
    return [f"made repository {path}", summary(repo, "root", root_md), summary(repo, "targets", targets_md),
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
        targets = next_version(repo, settings, "targets")
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
                summary(repo, "targets", targets), summary(repo, role, team)]


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
    from tuf.api.metadata import TargetFile as TufTargetFile

    repo = RepoDir(path)
    with repo.locked() as settings:
        delegation = _role_and_delegation(repo, role)
        ring.check_belongs(set(delegation.keyids), role)
        current = effective(repo, role)
        listed = dict(current.signed.targets) if current is not None else {}
        new: list[tuple[ImageTarget, TufTargetFile]] = []
        lines = []
        for img in images:
            if not delegation.is_delegated_path(img.path):
                raise TargetRefused(f"{img.name}: vendor {img.custom['mpboot']['vendor']} class "
                                    f"{img.custom['mpboot']['class']} is outside role {role}'s scope "
                                    f"({', '.join(delegation.paths or [])}); nothing written")
            tf = TufTargetFile.from_data(img.path, img.data, ["sha256"])
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
        md = next_version(repo, settings, role)
        for img, tf in new:
            md.signed.targets[img.path] = tf
        ring.sign(md, role, delegation.keyids, repo.staged_path(role))
        for img, tf in new:
            staged = repo.staged_targets / target_file(tf)
            staged.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(staged, img.data)
        repo.stage(role, md)
        for img, tf in new:
            c = img.custom["mpboot"]
            lines.append(f"added {img.path} (version {img.image.version}, counter {c['counter']}, {c['kind']}, "
                         f"{tf.length} bytes)")
        lines.append(summary(repo, role, md))
        return lines


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
        md = next_version(repo, settings, role)
        for p in dict.fromkeys(paths):
            del md.signed.targets[p]
        ring.sign(md, role, delegation.keyids, repo.staged_path(role))
        repo.stage(role, md)
        return [f"removed {p}" for p in dict.fromkeys(paths)] + [summary(repo, role, md)]


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
            md = next_version(repo, settings, role)
            lines.append(f"renewing {role}: version {md.signed.version}, expires {md.signed.expires:%Y-%m-%d %H:%M} UTC")
        already = [s for s in ring.signers if s.keyid in md.signatures]
        if already:
            raise RepositoryError(f"-k {already[0]}: has already signed the staged {role}; nothing written")
        ring.sign(md, role, keyids, repo.staged_path(role))
        repo.stage(role, md)
        return lines + [summary(repo, role, md)]


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
            md = next_version(repo, settings, role)
            repo.stage(role, md)
            lines.append(f"renewing {role}: version {md.signed.version}, expires {md.signed.expires:%Y-%m-%d %H:%M} UTC")
        return hashlib.sha256(md.signed_bytes).digest(), lines + [summary(repo, role, md)]


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
            holder = next_version(repo, settings, "root")
            container, keys = holder.signed, holder.signed.keys
            current_ids, current_threshold = container.roles[role].keyids, container.roles[role].threshold
        else:
            check_role_name(role)
            delegator_role = "targets"
            _role_and_delegation(repo, role)
            holder = next_version(repo, settings, "targets")
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
                restage = next_version(repo, settings, role)
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
                 summary(repo, delegator_role, holder)]
        if restage is not None:
            repo.stage(role, restage)
            lines.append(summary(repo, role, restage))
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


__all__ = ["MIN_ROOT_THRESHOLD", "add", "delegate", "digest_for_signing", "init", "remove", "rotate", "sign"]
