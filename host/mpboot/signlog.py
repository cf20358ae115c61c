"""The signing log: one JSON line per signature mpboot makes (or attaches), appended before the
signed file is written: a signature mpboot writes out has its line (a line may outlive an
output that failed to be written after it).

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
import stat
from collections.abc import Collection, Iterable, Sequence
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
MAX_LINE_BYTES = 64 * 1024


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
        """Append `entries`, one line each, flushed to disk; a last line left without its
        newline (a crash, a full disk, a hand edit) is ended first, so it cannot swallow
        ours. UsageError when the log cannot be written: the caller then writes nothing
        signed."""
        if not entries:
            return
        data = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries).encode()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot open it: {err.strerror}; nothing written "
                             "(name another with --signing-log)") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"signing log {self.path}: not a regular file; nothing written")
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot append: {err.strerror}; nothing written") from None
        finally:
            os.close(fd)

    def find(self, signature_ids: Collection[str]) -> dict[str, dict[str, Any]]:
        """The lines of these signatures (by signature_sha256; the first line for a signature
        wins), read line by line: a torn, over-long or foreign line is skipped, and a log that
        is missing or not a regular file (a FIFO, a device) holds none."""
        wanted = set(signature_ids)
        found: dict[str, dict[str, Any]] = {}
        try:
            if not stat.S_ISREG(self.path.stat().st_mode):
                return found
            f = self.path.open("rb")
        except FileNotFoundError:
            return found
        except OSError as err:
            raise UsageError(f"signing log {self.path}: cannot read: {err.strerror}") from None
        with f:
            while wanted - found.keys():
                line = f.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break
                if len(line) > MAX_LINE_BYTES:
                    while line and not line.endswith(b"\n"):  # skip the rest of an over-long line
                        line = f.readline(MAX_LINE_BYTES + 1)
                    continue
                entry = _parse_line(line)
                if entry is not None and entry["signature_sha256"] in wanted:
                    found.setdefault(entry["signature_sha256"], entry)
        return found


def _parse_line(line: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(entry, dict) and isinstance(entry.get("signature_sha256"), str):
        return entry
    return None


def entry_text(entry: dict[str, Any]) -> str:
    """A log line for people: when, with what, where, by whom."""
    user = entry.get("user")
    return (f"signed {entry.get('time')} with {signer_text(entry.get('signer'))} on {entry.get('host')}"
            + (f" by {user}" if user else "")
            + f" ({entry.get('scheme')}; log {str(entry.get('signature_sha256', ''))[:16]})")


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
