"""What a repository holds: each role's published and staged version, expiry, keys (TUF keyid
and mpboot KEYHASH), threshold and signatures, each team's targets, and warnings.

Warnings: a published role that has expired (clients refuse it), or expires soon: the
timestamp within half its period (the job re-signing it should run every quarter period or
so), any other role within a fifth of its period or within one timestamp period, whichever
is longer (a timestamp-only publish cannot save it).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mpboot.repo.check import client_view
from mpboot.repo.state import delegated_roles, effective, published_root, signatures_of
from mpboot.repo.layout import TOP_ROLES, RepoDir, now, period_text
from mpboot.repo.signer import keyhash_of

if TYPE_CHECKING:
    from tuf.api.metadata import Role


def _time(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(delta: timedelta) -> str:
    s = int(delta.total_seconds())
    return f"{s // 86400}d {s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h {s % 3600 // 60}m"


def status(path: Path, *, verify: bool = False) -> dict[str, Any]:
    """The repository's state as a JSON-ready dict: {"repository", "roles": [...], "staged_files",
    "warnings": [...]}, and with `verify` "client": what python-tuf's client sees in public/
    (mpboot.repo.check; a refusal is a warning too). README "mpboot repo" shows the text form."""
    repo = RepoDir(path)
    settings = repo.settings()
    reference = now()
    root = published_root(repo) or repo.read_staged("root")
    targets = effective(repo, "targets")
    published_targets = repo.read_published("targets")
    names = list(TOP_ROLES)
    for t in (published_targets[0] if published_targets else None, targets):
        if t is not None:
            names += [n for n in delegated_roles(t) if n not in names]
    roles = []
    warnings: list[str] = []
    timestamp_period = settings.period("timestamp")
    for name in names:
        entry: dict[str, Any] = {"role": name, "period": period_text(settings.period(name))}
        if name in TOP_ROLES:
            keys = root.signed.keys if root is not None else {}
            role_obj: Role | None = root.signed.roles[name] if root is not None else None
        else:
            if targets is not None and name in delegated_roles(targets):
                holder = targets
            else:  # delegated by the published targets only
                assert published_targets is not None
                holder = published_targets[0]
            keys = holder.signed.delegations.keys
            delegation = delegated_roles(holder)[name]
            entry["paths"] = list(delegation.paths or [])
            role_obj = delegation
        if role_obj is not None:
            entry["threshold"] = role_obj.threshold
            entry["keys"] = [{"keyid": k, "keyhash": keyhash_of(keys[k])} for k in role_obj.keyids if k in keys]
        found = repo.read_published(name)
        if found is not None:
            md = found[0]
            expires = md.signed.expires
            entry["published"] = {"version": md.signed.version, "expires": _time(expires),
                                  "expired": expires <= reference}
            period = settings.period(name)
            window = period / 2 if name == "timestamp" else max(period / 5, timestamp_period)
            if expires <= reference:
                warnings.append(f"{name} version {md.signed.version} EXPIRED at {_time(expires)}: clients refuse it"
                                + (" (run mpboot repo publish)" if name in ("snapshot", "timestamp")
                                   else f" (renew it: mpboot repo sign REPO {name} -k KEY, then publish)"))
            elif expires - reference < window:
                warnings.append(f"{name} version {md.signed.version} expires in {_left(expires - reference)} "
                                f"({_time(expires)})")
            if name not in TOP_ROLES:
                entry["targets"] = [_target(p, tf) for p, tf in md.signed.targets.items()]
        staged = repo.read_staged(name)
        if staged is not None:
            s = signatures_of(repo, name, staged)
            entry["staged"] = {"version": staged.signed.version, "signatures": s.detail, "ready": s.verified,
                               "targets": [_target(p, tf) for p, tf in staged.signed.targets.items()]
                               if name not in TOP_ROLES else None}
        roles.append(entry)
    if repo.read_published("timestamp") is None:
        warnings.append("nothing published yet: clients see no repository (run mpboot repo publish)")
    staged_files = [str(p.relative_to(repo.staged_targets)) for p in repo.staged_target_files()]
    report: dict[str, Any] = {"repository": str(repo.path), "time": _time(reference), "roles": roles,
                              "staged_files": staged_files, "warnings": warnings}
    if verify:
        view = client_view(repo.path)
        report["client"] = {"root_version": view.root_version, "targets": view.targets, "error": view.error}
        if view.error is not None:
            warnings.append(f"a client refuses public/: {view.error}")
    return report


def _target(path: str, tf: Any) -> dict[str, Any]:
    custom = (tf.custom or {}).get("mpboot", {}) if isinstance(tf.custom, dict) else {}
    version = custom.get("version")
    return {"path": path, "length": tf.length,
            "version": ".".join(str(v) for v in version[:3]) + (f"+{version[3]}" if version[3] else "")
            if isinstance(version, list) and len(version) == 4 else None,
            "counter": custom.get("counter"), "kind": custom.get("kind"), "image_hash": custom.get("image_hash")}
