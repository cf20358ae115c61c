"""BLE fleet commands: `mpboot scan` and `mpboot sync` (the click face of mpboot.sync)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import click

from mpboot.cli.common import (
    ble_backend_option,
    confirm_timeout_option,
    console,
    on_interrupt,
    plural,
    retries_option,
    scan_seconds_option,
    timeout_option,
)
from mpboot.errors import UsageError


@click.command("scan")
@scan_seconds_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON: a list of {name, address, rssi}.")
@ble_backend_option
def scan_cmd(seconds: float, as_json: bool, ble_backend: str | None) -> None:
    """List the BLE devices advertising the SMP service: name, address, RSSI (strongest first)."""
    from mpboot import ble

    backend = ble.select(ble_backend)

    async def run() -> list[ble.Found]:
        try:
            return await ble.scan(seconds, backend)
        finally:
            await ble.close()

    found = asyncio.run(run())
    if as_json:
        click.echo(json.dumps([{"name": f.name, "address": f.address, "rssi": f.rssi} for f in found], indent=2))
        return
    if not found:
        click.echo(f"no devices advertising SMP (listened {seconds:g} s)")
        return
    click.echo(f"{'address':<18} {'rssi':>5}  name")
    for f in found:
        click.echo(f"{f.address:<18} {f.rssi:>5}  {f.name or '-'}")


@click.command("sync")
@click.argument("repo_dir", metavar="REPO_DIR", type=click.Path(path_type=Path))
@scan_seconds_option
@click.option("--loop", is_flag=True, help="Keep going: a pass every --interval seconds until Ctrl-C.")
@click.option("--interval", default=30.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help="With --loop: seconds between the end of a pass and the next scan.")
@click.option("--max-parallel", default=2, show_default=True, type=click.IntRange(1, 32), metavar="K",
              help="Devices updated at once.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Record every attempt: SQLite for .sqlite/.db, else JSON lines (appended).")
@retries_option
@confirm_timeout_option
@timeout_option
@ble_backend_option
def sync_cmd(repo_dir: Path, seconds: float, loop: bool, interval: float, max_parallel: int,
             log_path: Path | None, retries: int, confirm_timeout: float, timeout: float,
             ble_backend: str | None) -> None:
    """Bring every device in range up to the newest image in REPO_DIR that it accepts.

    Each pass scans for devices advertising the SMP service; each one is read (identity,
    images), sent the newest fitting image (resuming a partial upload from an earlier meeting),
    test-booted, and watched until the new app confirms itself. An image that reverted on a
    device is not sent to it again (result held; remembered across runs with --log) until a
    newer one appears.

    \b
    Exit status, from the last pass (--loop runs until Ctrl-C):
    0    every update tried succeeded, or there was nothing to do
         (updated, current, ahead, held, no-image; or no device in range)
    1    an attempt failed (the next meeting resumes it) or reverted
    2    usage error (REPO_DIR, --log, --ble-backend) or no usable radio
    130  stopped (Ctrl-C): one line says after how many passes"""
    from rich.table import Table

    from mpboot import ble
    from mpboot.sync import (
        Attempt,
        AttemptLog,
        BleRadio,
        Syncer,
        SyncOptions,
        exit_status,
        load_repo,
        summary_rows,
    )

    repo, skipped = load_repo(repo_dir)
    if not repo:
        raise UsageError(f"{repo_dir}: no signed images (*.img, *.bin, *.signed)"
                         + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
    backend = ble.select(ble_backend)
    log = AttemptLog(log_path)  # (every usage error before the first line of output)
    out = console()  # a log or a pipe: whole lines (grep), never wrapped at 80 columns
    for line in skipped:
        out.print(f"sync: skipped {line}")
    out.print(f"sync: {plural(len(repo), 'image')} in {repo_dir}: "
              + ", ".join(f"{r.path.name} ({r.version})" for r in sorted(repo, key=lambda r: r.key)))
    opts = SyncOptions(scan_seconds=seconds, max_parallel=max_parallel, retries=retries, timeout=timeout,
                       confirm_timeout=confirm_timeout)

    def event(a: Attempt, text: str) -> None:
        out.print(f"sync: {a.device}: {text}")

    syncer = Syncer(repo, BleRadio(backend), opts, log, event)
    ended: list = [0, []]  # passes ended, and the last one's attempts (what the exit status reports)

    async def run() -> list:
        try:
            while True:
                attempts = await syncer.run_pass()
                table = Table(title=f"pass {syncer.passes}: {plural(len(attempts), 'device')}")
                for col in ("device", "from", "to", "bytes", "result", "time", "note"):
                    table.add_column(col, justify="right" if col in ("bytes", "time") else "left")
                for row in summary_rows(attempts):
                    table.add_row(*row)
                out.print(table, soft_wrap=False)  # (a centred title; the width keeps rows whole)
                ended[:] = [ended[0] + 1, attempts]
                if not loop:
                    return attempts
                await asyncio.sleep(interval)
        finally:
            await ble.close()

    def where() -> str:
        if not ended[0]:
            return "before the first pass ended; run it again (uploads resume where each device is)"
        counts = ", ".join(f"{n} {r}" for r, n in Counter(str(a.result) for a in ended[1]).items())
        return (f"after {plural(ended[0], 'pass', 'passes')} (the last: {counts or 'no device in range'}); "
                "run it again to go on (uploads resume where each device is)")

    on_interrupt(where)
    try:
        attempts = asyncio.run(run())
    finally:
        log.close()
    status = exit_status(attempts)
    if status:
        raise click.exceptions.Exit(status)


COMMANDS = (scan_cmd, sync_cmd)

__all__ = ["COMMANDS"]
