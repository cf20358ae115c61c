"""The state a repository's commands reason about: each role as published, as staged, and as
the next publish makes it live; how far a version is signed against its delegator (root:
both thresholds); which keys may sign a role now; the next version of a role to edit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpboot.errors import RepositoryError
from mpboot.repo.layout import TOP_ROLES, RepoDir, Settings, now

if TYPE_CHECKING:
    from tuf.api.metadata import DelegatedRole, Metadata, Root, TargetFile, Targets


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


def next_version(repo: RepoDir, settings: Settings, role: str) -> Metadata[Any]:
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


def summary(repo: RepoDir, role: str, md: Metadata[Any]) -> str:
    """One line: the staged version of `role`, how far it is signed, and what it waits for."""
    s = signatures_of(repo, role, md)
    state = ("ready to publish" if s.verified else
             f"goes live with {s.waits_for}, which waits for signatures" if s.waits_for else
             "waiting for signatures (mpboot repo sign)")
    return f"staged {role} version {md.signed.version}: signed by {s.detail}, {state}"


def target_file(tf: TargetFile) -> str:
    """The target's file under targets/: <dir>/<sha256>.<name> (consistent snapshots)."""
    return str(tf.get_prefixed_paths()[0])


def staged_targets(repo: RepoDir, role: str) -> list[TargetFile]:
    """The targets the staged version of `role` lists (none when nothing is staged)."""
    md = repo.read_staged(role)
    return list(md.signed.targets.values()) if md is not None else []
