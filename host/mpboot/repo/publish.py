"""`publish`: every staged version that meets its threshold goes under public/, with a new
snapshot and timestamp (timestamp.json written last); or, for a timer, a new timestamp only.
What goes live is checked as a client would (each role against its delegator as it goes
live); a result clients could not verify is refused with nothing written."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpboot.errors import RepositoryError
from mpboot.repo.layout import TOP_ROLES, RepoDir, now
from mpboot.repo.signer import KeyRing
from mpboot.repo.state import (
    delegate_signatures,
    delegated_roles,
    root_signatures,
    signatures_of,
    staged_targets,
    summary,
    target_file,
)

if TYPE_CHECKING:
    from tuf.api.metadata import Metadata, MetaFile, Root, Targets


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
                rel = target_file(tf)
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
        for name in repo.staged_roles():  # (what a publish that died half way left: published)
            if repo.read_staged(name) is None:
                repo.unstage(name)
        for f in published_files:
            f.unlink(missing_ok=True)
        # Images added, then removed before they went live: no staged role lists them now.
        listed = {repo.staged_targets / target_file(tf) for name in repo.staged_roles() if name not in TOP_ROLES
                  for tf in staged_targets(repo, name)}
        for f in repo.staged_target_files():
            if f not in listed:
                f.unlink(missing_ok=True)

        for name, md in new.items():
            lines.append(f"published {name} version {md.signed.version}")
        lines.append(f"published snapshot version {snap_version} and timestamp version {ts.signed.version}")
        for name in repo.staged_roles():
            waiting = repo.read_staged(name)
            if waiting is not None:
                lines.append(f"still staged: {summary(repo, name, waiting)}")
        for name, (md, _) in live.items():
            if md.signed.is_expired():
                lines.append(f"warning: {name} version {md.signed.version} expired {md.signed.expires:%Y-%m-%d %H:%M} "
                             f"UTC: clients refuse it until it is renewed (mpboot repo sign REPO {name} -k KEY)")
        return lines


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


__all__ = ["publish"]
