"""The signing log: one JSON line per signature mpboot makes (or attaches), appended before the
signed file is written, so no signature leaves this tool unrecorded.

A line says when, what was signed (its digest, and an image's version and security counter or
an envelope's type), by which key (key hash, size, scheme), through what (a key file, a token
and its key object, or a signature made elsewhere), on which host, and the SHA-256 of the
signature itself: `mpboot info` matches an image's signatures to their lines by that hash.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mpboot import __version__
from mpboot.errors import UsageError
from mpboot.signing import MadeSignature

DEFAULT_NAME = "mpboot-signing.jsonl"
ENV = "MPBOOT_SIGNING_LOG"
# A log line is well under this; a longer one is not ours and is skipped when reading.
MAX_LINE = 64 * 1024


def default_path() -> Path:
    return Path(os.environ.get(ENV) or DEFAULT_NAME)


def signature_id(signature: bytes) -> str:
    """What the log calls a signature: its SHA-256, hex."""
    return hashlib.sha256(signature).hexdigest()


def _user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return ""


def entries_for(made: Iterable[MadeSignature], subject: dict[str, Any], output: Path | None) -> list[dict[str, Any]]:
    """Log lines for the signatures `made`, over one `subject` (what was signed: kind, version,
    security counter...), written to `output`."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    host = socket.gethostname()
    user = _user()
    return [{
        "time": now,
        **subject,
        "digest": m.digest.hex(),
        "key_hash": m.keyhash.hex(),
        "key_bits": m.bits,
        "scheme": m.scheme.value,
        "signature_sha256": signature_id(m.signature),
        "signer": m.signer,
        "host": host,
        "user": user,
        "output": str(output.resolve()) if output is not None else None,
        "mpboot": __version__,
    } for m in made]


@dataclass(frozen=True)
class SigningLog:
    path: Path

    def append(self, entries: Sequence[dict[str, Any]]) -> None:
        """Append `entries`, one line each, in one write, flushed to disk. UsageError when the
        log cannot be written: the caller then writes nothing signed."""
        if not entries:
            return
        data = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries).encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot open it: {err.strerror}; nothing written "
                             "(name another with --signing-log)") from None
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot append: {err.strerror}; nothing written") from None
        finally:
            os.close(fd)

    def read(self) -> list[dict[str, Any]]:
        """Every well-formed line (a torn or foreign line is skipped); [] when there is no log."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot read: {err.strerror}") from None
        out = []
        for line in raw.splitlines():
            if not line.strip() or len(line) > MAX_LINE:
                continue
            try:
                entry = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(entry, dict) and isinstance(entry.get("signature_sha256"), str):
                out.append(entry)
        return out

    def index(self) -> dict[str, dict[str, Any]]:
        """Entries by signature_sha256 (the first line for a signature wins)."""
        found: dict[str, dict[str, Any]] = {}
        for entry in self.read():
            found.setdefault(entry["signature_sha256"], entry)
        return found


def signer_text(signer: Any) -> str:
    """A log entry's signer for people: "key file /x/a.pem", "token 'rel' object 'k1'"."""
    if not isinstance(signer, dict):
        return "?"
    kind = signer.get("kind")
    if kind == "file":
        return f"key file {signer.get('path')}"
    if kind == "pkcs11":
        parts = [f"token {signer.get('token')!r}"]
        if signer.get("object") is not None:
            parts.append(f"object {signer.get('object')!r}")
        if signer.get("id") is not None:
            parts.append(f"id {signer.get('id')}")
        return "pkcs11 " + " ".join(parts)
    if kind == "detached":
        return f"attached signature {signer.get('signature_file')}"
    return str(kind)
