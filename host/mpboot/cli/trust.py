"""Trust commands over SMP (serial port or BLE): `mpboot trust push` delivers root and
revocation records to a device, `mpboot trust show` reads its trust state (docs/KEYS.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mpboot.cli.common import DeviceLink, check_input_file, device_options, plural


@click.group("trust")
def trust_group() -> None:
    """A device's trust state: its root set and what is revoked (docs/KEYS.md)."""


def _read_record(path: Path) -> tuple[bytes, str]:
    """A trust record file, checked by the host's format rules before any port opens: its
    bytes and what it is ("root record version 2"). TrustRefused (MALFORMED, TOO_LARGE) for a
    file that is no root or revocation record (a certificate, a channel record)."""
    from mpboot.errors import TrustErrorCode, TrustRefused
    from mpboot.trust import MAX_RECORD_SIZE, Certificate, ChannelRecord, RootRecord, decode_signed

    size = check_input_file(path, "a trust record").stat().st_size
    if size > MAX_RECORD_SIZE:
        raise TrustRefused(TrustErrorCode.TOO_LARGE, f"{path}: {size} bytes")
    data = path.read_bytes()
    try:
        body = decode_signed(data).body
    except TrustRefused as err:
        raise TrustRefused(err.code, f"{path}: {err.detail}") from None
    if isinstance(body, Certificate):
        raise TrustRefused(TrustErrorCode.MALFORMED, f"{path}: a certificate, not a trust record: it goes in images")
    if isinstance(body, ChannelRecord):
        raise TrustRefused(TrustErrorCode.MALFORMED, f"{path}: a channel record ({body.name!r} number {body.number}), "
                                                     "not a trust record: devices pull it (README \"Device pull\")")
    if isinstance(body, RootRecord):
        return data, f"root record version {body.version}"
    return data, f"revocation record {body.number}"


@trust_group.command("push")
@click.argument("record_paths", metavar="RECORD...", nargs=-1, required=True, type=click.Path(path_type=Path))
@device_options
def push_cmd(record_paths: tuple[Path, ...], link: DeviceLink) -> None:
    """Send trust records to the device, in the order given: root records (a chain of
    rotations goes oldest first: version 2, 3, ...) and revocation records.

    The device applies each when it has arrived whole. The first refusal stops the push (one
    line: which record, why); the records before it stay applied."""
    from mpboot.errors import TrustRefused

    records = [(path, *_read_record(path)) for path in record_paths]  # all checked before the port opens

    async def action(client: Any) -> None:
        for path, data, what in records:
            try:
                applied = await client.trust_push(data)
            except TrustRefused as err:
                raise TrustRefused(err.code, f"{path}, {what}: {err.detail}", rc=err.rc, err_group=err.err_group,
                                   err_rc=err.err_rc, rsn=err.rsn) from None
            click.echo(f"pushed {path} ({what}): the device holds root set version {applied.root_version}, "
                       f"revocation {applied.revocation}")

    link.run(action)


@trust_group.command("show")
@device_options
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {root_version, threshold, image_threshold, roots, revocation, revoked_keys, "
                   "revoked_serials} (key hashes in hex).")
def show_cmd(link: DeviceLink, as_json: bool) -> None:
    """Show the device's trust state: root set version, thresholds, the roots' key hashes,
    and the revocation list it holds."""

    async def action(client: Any) -> Any:
        return await client.trust_show()

    t = link.run(action)
    if as_json:
        click.echo(json.dumps({"root_version": t.root_version, "threshold": t.threshold,
                               "image_threshold": t.image_threshold, "roots": [h.hex() for h in t.roots],
                               "revocation": t.revocation, "revoked_keys": [h.hex() for h in t.revoked_keys],
                               "revoked_serials": list(t.revoked_serials)}, indent=2))
        return
    click.echo(f"root set version {t.root_version}: {t.threshold} of {plural(len(t.roots), 'root')} sign records "
               f"and certificates; images need {plural(t.image_threshold, 'trusted signature')}")
    for h in t.roots:
        click.echo(f"  root {h.hex()}")
    if not t.revocation:
        click.echo("revocation: none taken")
        return
    click.echo(f"revocation {t.revocation}: {plural(len(t.revoked_keys), 'key')} and "
               f"{plural(len(t.revoked_serials), 'certificate serial')} revoked")
    for h in t.revoked_keys:
        click.echo(f"  key {h.hex()}")
    for n in t.revoked_serials:
        click.echo(f"  serial {n}")


COMMANDS = (trust_group,)

__all__ = ["COMMANDS"]
