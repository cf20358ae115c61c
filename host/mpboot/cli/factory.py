"""Factory commands: `mpboot provision` and `mpboot provision report`, the click face of
mpboot.factory (docs/FACTORY.md)."""

from __future__ import annotations

import getpass
import glob
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click

from mpboot.cli.common import (
    baud_option,
    confirm_timeout_option,
    console,
    exit_interrupted_now,
    framing_option,
    plural,
    read_image,
    timeout_option,
)
from mpboot.errors import UsageError


def _labels(pairs: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {pair!r}: give KEY=VALUE")
        if key in out:
            raise UsageError(f"--label {key}: given twice")
        out[key] = value
    # The device's limits (docs/FACTORY.md): refused here in one line, before any board is touched.
    if len(out) > 8:
        raise UsageError(f"{len(out)} labels: a board holds at most 8")
    for key, value in out.items():
        if not 1 <= len(key.encode()) <= 16 or len(value.encode()) > 64:
            raise UsageError(f"--label {key}={value}: keys are 1-16 bytes, values at most 64")
    import cbor2

    size = len(cbor2.dumps(out, canonical=True))
    if size > 192:
        raise UsageError(f"the labels take {size} bytes encoded: a board holds at most 192")
    return out


def _ports(ports: tuple[str, ...], ports_glob: str | None) -> list[str]:
    found = list(ports)
    if ports_glob:
        matched = sorted(glob.glob(ports_glob))
        if not matched:
            raise UsageError(f"--ports-glob {ports_glob!r}: no port matches")
        found += matched
    if not found:
        raise UsageError("which boards? give --port PORT (repeatable) or --ports-glob 'GLOB'")
    seen: set[str] = set()
    unique = []
    for p in found:
        real = os.path.realpath(p)
        if real in seen:
            raise UsageError(f"{p}: the same port twice")
        seen.add(real)
        unique.append(p)
    return unique


@click.group("provision", invoke_without_command=True)
@click.option("-p", "--port", "ports", multiple=True, metavar="PORT", help="A board's serial port (repeatable).")
@click.option("--ports-glob", metavar="GLOB", help="Every port matching GLOB, e.g. '/dev/ttyACM*'.")
@click.option("--image", "image_path", type=click.Path(path_type=Path), metavar="APP.img",
              help="The signed first app every board gets.")
@click.option("--expect-key", "key_paths", multiple=True, type=click.Path(path_type=Path), metavar="PUB.pem",
              help="Public key the boards' bootloader must embed (repeatable: exactly this set).")
@click.option("--serials", "serials_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Serial numbers to give out, one per line, in order.")
@click.option("--serial-prefix", metavar="PFX", help="Give out PFX000001, PFX000002, ...")
@click.option("--db", "db_url", metavar="FILE|postgresql://...", help="The records (SQLite file, or PostgreSQL).")
@click.option("--station-id", default=None, metavar="ID", help="This station's name in the records [host name].")
@click.option("--operator", default=None, metavar="NAME", help="Who runs the line [login name].")
@click.option("--parallel", type=click.IntRange(1, 256), metavar="K", help="Boards at once [all ports].")
@click.option("--label", "label_pairs", multiple=True, metavar="KEY=VALUE", help="A free label for every board (repeatable, at most 8).")
@click.option("--floor", type=click.IntRange(0, 2**32 - 1), metavar="N",
              help="Security-counter floor to set [the image's security counter].")
@confirm_timeout_option
@timeout_option
@baud_option
@framing_option
@click.pass_context
def provision_cmd(ctx: click.Context, ports: tuple[str, ...], ports_glob: str | None, image_path: Path | None,
                  key_paths: tuple[Path, ...], serials_file: Path | None, serial_prefix: str | None,
                  db_url: str | None, station_id: str | None, operator: str | None, parallel: int | None,
                  label_pairs: tuple[str, ...], floor: int | None, confirm_timeout: float, timeout: float,
                  baud: int, framing: str) -> None:
    """Provision every board on the given ports: check its bootloader's key, give it a serial,
    install and prove the first app, write identity and production policy, seal, read back,
    record. Re-running after a failure is safe: done boards are skipped, others finished.
    Serials go to the boards in port order (--port as given, then --ports-glob sorted).

    Exit status 1 when any board failed or was refused (one line each, with the reason)."""
    if ctx.invoked_subcommand is not None:
        return
    from mpboot import keys
    from mpboot.factory.db import FactoryDB, SerialPrefix, SerialSource, serial_list_from_file
    from mpboot.factory.station import ProvisionOutcome, Station, StationConfig
    from mpboot.flashing import prepare
    from mpboot.image import verify_image

    board_ports = _ports(ports, ports_glob)
    if image_path is None:
        raise UsageError("--image APP.img is required: the signed app every board gets")
    if not key_paths:
        raise UsageError("--expect-key PUB.pem is required: the key the boards' bootloader must embed")
    if (serials_file is None) == (serial_prefix is None):
        raise UsageError("give exactly one of --serials FILE and --serial-prefix PFX")
    if db_url is None:
        raise UsageError("--db FILE (or postgresql://...) is required: where the records go")
    labels = _labels(label_pairs)
    expected = [keys.load_public_key(p, allow_private=False) for p in key_paths]
    data = read_image(image_path)
    verify_image(data, expected)  # signed by an expected key, whole: checked before any board
    prepared = prepare(data)
    if prepared.hash is None:
        raise UsageError(f"{image_path}: the image has no SHA256 TLV, so a board could not name it")
    source: SerialSource = serial_list_from_file(serials_file) if serials_file else SerialPrefix(serial_prefix or "")
    config = StationConfig(
        image=prepared, expect_keys=frozenset(k.keyhash() for k in expected), serials=source,
        station=station_id or socket.gethostname(), operator=operator or _login(), labels=labels,
        floor=floor, baudrate=baud, framing=framing, timeout=timeout, confirm_timeout=confirm_timeout)
    db = FactoryDB.open(db_url)
    try:
        boards = _run_live(Station, config, db, board_ports, parallel)
    except KeyboardInterrupt:
        # the boards' threads end at their next step; nothing waits for them
        exit_interrupted_now("boards not finished are finished by running the same command again "
                             "(provisioned boards are skipped)")
    finally:
        db.close()
    failed = [b for b in boards if b.outcome not in (ProvisionOutcome.PROVISIONED, ProvisionOutcome.SKIPPED)]
    counts = {o: sum(1 for b in boards if b.outcome is o) for o in ProvisionOutcome}
    click.echo("provision: " + ", ".join(f"{n} {o}" for o, n in counts.items() if n) + f" of {plural(len(boards), 'board')}")
    for b in failed:
        who = f" ({b.uid.hex()})" if b.uid else ""
        click.echo(f"provision: {b.port}{who}: {b.outcome or 'failed'}: {b.error}", err=True)
    if failed:
        raise click.exceptions.Exit(1)


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _run_live(station_cls: Any, config: Any, db: Any, ports: list[str], parallel: int | None) -> list[Any]:
    """Run the station with a live table (one row per port) on a terminal; on anything else
    one line per board as it ends, then the table."""
    from rich.live import Live

    out = console()  # a log or a pipe: whole lines, never wrapped
    boards: dict[str, Any] = {}

    def on_change(st: Any) -> None:
        boards[st.port] = st
        if not out.is_terminal and st.outcome is not None:
            out.print(f"provision: {st.port}: {st.outcome}"
                          + (f" as {st.serial}" if st.serial else "") + (f": {st.error}" if st.error else ""))

    station = station_cls(config, db, on_change=on_change)
    if out.is_terminal:
        with Live(get_renderable=lambda: _table(ports, boards), console=out, refresh_per_second=4):
            result = station.run(ports, parallel)
    else:
        result = station.run(ports, parallel)
    out.print(_table(ports, {b.port: b for b in result}), soft_wrap=False)
    return result


def _table(ports: list[str], boards: dict[str, Any]) -> Any:
    """One row per port; the reasons of failed boards follow the table as lines."""
    from rich.table import Table

    table = Table(title="mpboot provision")
    for col in ("port", "uid", "serial", "step", "progress", "result", "time"):
        table.add_column(col, justify="right" if col in ("progress", "time") else "left", no_wrap=True)
    for port in ports:
        b = boards.get(port)
        if b is None:
            table.add_row(port, "", "", "waiting", "", "", "")
            continue
        progress = f"{b.progress * 100:.0f}%" if b.progress is not None else ""
        table.add_row(port, b.uid.hex() if b.uid else "", b.serial or "", b.step, progress,
                      str(b.outcome) if b.outcome else "", f"{b.elapsed:.1f} s")
    return table


@provision_cmd.command("report")
@click.option("--db", "db_url", required=True, metavar="FILE|postgresql://...", help="The records.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV, one row per board.")
@click.option("--json", "as_json", is_flag=True, help="JSON: a list of boards.")
def report_cmd(db_url: str, as_csv: bool, as_json: bool) -> None:
    """The boards recorded in --db: a table, CSV or JSON. Opened read-only (never migrated:
    a database with an older schema is refused in one line; a station run migrates it)."""
    from mpboot.factory.db import FactoryDB, report_rows, write_csv, write_json

    if as_csv and as_json:
        raise UsageError("--csv and --json exclude each other")
    if "://" not in db_url and not Path(db_url).exists():
        raise UsageError(f"{db_url}: no such database")
    db = FactoryDB.open(db_url, read_only=True)
    try:
        rows = report_rows(db)
        where = db.target  # (without a password)
    finally:
        db.close()
    if as_csv:
        write_csv(rows, sys.stdout)
        return
    if as_json:
        write_json(rows, sys.stdout)
        return
    from rich.table import Table

    table = Table(title=f"{plural(len(rows), 'board')} in {where}")
    cols = ("serial", "uid", "result", "image_version", "station", "operator", "provisioned_at", "error")
    for col in cols:
        table.add_column(col, no_wrap=col != "error")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in cols))
    console().print(table, soft_wrap=False)


COMMANDS = (provision_cmd,)

__all__ = ["COMMANDS"]
