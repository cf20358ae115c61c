"""`mpboot sync`: the click face of mpboot.sync (registered by mpboot.cli)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from mpboot.errors import UsageError

LOG_WIDTH = 1000  # columns of output that is not a terminal: tables as wide as their rows


@click.command("sync")
@click.argument("repo_dir", metavar="REPO_DIR", type=click.Path(path_type=Path))
@click.option("--seconds", default=5.0, show_default=True, type=click.FloatRange(min=0.5), metavar="N",
              help="Scan this long for devices each pass.")
@click.option("--loop", is_flag=True, help="Keep going: a pass every --interval seconds until Ctrl-C.")
@click.option("--interval", default=30.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help="With --loop: seconds between the end of a pass and the next scan.")
@click.option("--max-parallel", default=2, show_default=True, type=click.IntRange(1, 32), metavar="K",
              help="Devices updated at once.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), metavar="FILE",
              help="Record every attempt: SQLite for .sqlite/.db, else JSON lines (appended).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 100), metavar="N",
              help="Lost links per device reconnected and resumed within a pass.")
@click.option("--confirm-timeout", default=30.0, show_default=True, type=click.FloatRange(min=1), metavar="S",
              help="How long the new app gets to confirm itself before the device is reset back.")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.05), metavar="S",
              help="Seconds to wait for an SMP reply.")
@click.option("--ble-backend", envvar="MPBOOT_BLE_BACKEND", metavar="bumble:SPEC",
              help="Use Bumble on a transport (e.g. bumble:usb:0) instead of the platform's Bluetooth.")
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
    Exit status, from the last pass that ended (--loop runs until Ctrl-C):
    0    every update tried succeeded, or there was nothing to do
         (updated, current, ahead, held, no-image; or no device in range)
    1    an attempt failed (the next meeting resumes it) or reverted
    2    usage error (REPO_DIR, --log, --ble-backend) or no usable radio
    130  stopped (Ctrl-C) before any pass ended"""
    from rich.console import Console
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
    out = Console(highlight=False)
    if not out.is_terminal:  # a log or a pipe: whole lines (grep), never wrapped at 80 columns
        out = Console(highlight=False, soft_wrap=True, width=LOG_WIDTH)
    for line in skipped:
        out.print(f"sync: skipped {line}")
    if not repo:
        raise UsageError(f"{repo_dir}: no signed images (*.img, *.bin, *.signed)")
    out.print(f"sync: {len(repo)} images in {repo_dir}: "
              + ", ".join(f"{r.path.name} ({r.version})" for r in sorted(repo, key=lambda r: r.key)))
    backend = ble.select(ble_backend)
    log = AttemptLog(log_path)
    opts = SyncOptions(scan_seconds=seconds, max_parallel=max_parallel, retries=retries, timeout=timeout,
                       confirm_timeout=confirm_timeout)

    def event(a: Attempt, text: str) -> None:
        out.print(f"sync: {a.device}: {text}")

    syncer = Syncer(repo, BleRadio(backend), opts, log, event)
    last: list[list] = []  # [the attempts of the last pass ended] (what the exit status reports)

    async def run() -> list:
        try:
            while True:
                attempts = await syncer.run_pass()
                table = Table(title=f"pass {syncer.passes}: {len(attempts)} devices")
                for col in ("device", "from", "to", "bytes", "result", "time", "note"):
                    table.add_column(col, justify="right" if col in ("bytes", "time") else "left")
                for row in summary_rows(attempts):
                    table.add_row(*row)
                out.print(table, soft_wrap=False)  # (a centred title; the width keeps rows whole)
                last[:] = [attempts]
                if not loop:
                    return attempts
                await asyncio.sleep(interval)
        finally:
            await ble.close()

    try:
        attempts = asyncio.run(run())
    except KeyboardInterrupt:
        out.print("sync: stopped")
        if not last:
            raise SystemExit(130) from None  # stopped before any pass ended
        attempts = last[0]
    finally:
        log.close()
    status = exit_status(attempts)
    if status:
        raise SystemExit(status)
