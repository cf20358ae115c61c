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
from mpboot.errors import UsageError, reason


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
@click.argument("repo_dir", metavar="[REPO_DIR]", required=False, type=str)  # (a str: a URL stays whole)
@click.option("--repo", "repos", multiple=True, metavar="URL|DIR",
              help="A TUF repository's URL (repeat for mirrors, in order of preference; needs --root), "
                   "or a directory of signed images (as REPO_DIR).")
@click.option("--root", "root_path", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="With --repo URL: the repository's trusted root.json, obtained out of band "
                   "(required: trust is never taken from the URL).")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="With --repo URL: where verified metadata and images are kept, one folder per "
                   "trusted root (default: ~/.cache/mpboot/tuf, or under $XDG_CACHE_HOME).")
@click.option("--repo-timeout-s", default=10.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="S", help="With --repo URL: to connect, and the longest silence while reading.")
@click.option("--repo-deadline-s", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              metavar="S", help="With --repo URL: for one whole file (metadata or image).")
@scan_seconds_option
@click.option("--loop", is_flag=True, help="Keep going: a pass every --interval seconds until Ctrl-C.")
@click.option("--interval", default=30.0, show_default=True, type=click.FloatRange(min=0), metavar="S",
              help="With --loop: seconds between the end of a pass and the next scan.")
@click.option("--max-parallel", default=2, show_default=True, type=click.IntRange(1, 32), metavar="K",
              help="Devices updated at once.")
@click.option("--log", "log_path", metavar="FILE|URL",  # (a str: a Path would mangle a URL's //)
              help="Record every attempt: SQLite for .sqlite/.db, the attempts table of a PostgreSQL "
                   "database for postgresql://... (stations may share one; needs mpboot[postgres]), "
                   "else JSON lines (appended). What reverted where is read back when sync starts (from "
                   "PostgreSQL also at each pass of --loop: other stations' records).")
@click.option("--udp", "udp_addresses", multiple=True, metavar="HOST[:PORT]",
              help="Reach devices over the network (SMP over UDP, port 1337 by default) instead of "
                   "Bluetooth: each pass probes these addresses (repeat it).")
@click.option("--udp-list", "udp_list", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Like --udp, one HOST[:PORT] per line of FILE ('#' starts a comment; at most 1 MiB).")
@click.option("--mtu", default=1500, show_default=True, type=click.IntRange(576, 65535), metavar="BYTES",
              help="With --udp: the network path's MTU (a request fits one unfragmented datagram).")
@retries_option
@confirm_timeout_option
@timeout_option
@ble_backend_option
def sync_cmd(repo_dir: str | None, repos: tuple[str, ...], root_path: Path | None, cache_dir: Path | None,
             repo_timeout_s: float, repo_deadline_s: float, seconds: float, loop: bool, interval: float,
             max_parallel: int, log_path: str | None, retries: int, confirm_timeout: float, timeout: float,
             udp_addresses: tuple[str, ...], udp_list: Path | None, mtu: int,
             ble_backend: str | None) -> None:
    """Bring every device in range up to the newest image in REPO_DIR (or in the TUF
    repository at --repo URL; a URL given as REPO_DIR is one too) that it accepts.

    Each pass scans for devices advertising the SMP service (with --udp: asks each address
    given, and goes on with those that answer); each one is read (identity,
    images), sent the newest fitting image (resuming a partial upload from an earlier meeting),
    test-booted, and watched until the new app confirms itself. An image that reverted on a
    device is not sent to it again (result held; remembered across runs with --log) until a
    newer one appears.

    With --repo URL (a TUF repository, `mpboot repo`): each pass first refreshes the
    repository's metadata from the first mirror that has it fresh and valid (a mirror down,
    too slow, or serving expired, rolled-back or badly signed metadata: one line, then the
    next); with none, the pass sends nothing. A device is offered the images its vendor and
    class's role lists (a device without vendor/class ids: none); the chosen one is
    downloaded, verified against the metadata, and checked against it (version, counter,
    ids, hash) before a byte of it is sent.

    \b
    Exit status, from the last pass (--loop runs until Ctrl-C):
    0    every update tried succeeded, or there was nothing to do
         (updated, current, ahead, held, no-image; or no device in range)
    1    an attempt failed (the next meeting resumes it) or reverted; or the
         repository's metadata was refused on every mirror (expired, rolled
         back, not signed by enough keys)
    2    usage error (REPO_DIR, --repo, --root, --cache, --log, --ble-backend,
         --udp, --udp-list) or no usable radio
    3    no mirror of the repository could be reached (down, hung, too slow)
    130  stopped (Ctrl-C): one line says after how many passes"""
    from rich.table import Table

    from mpboot import ble
    from mpboot.errors import RepositoryRefused, RepositoryUnavailable
    from mpboot.sync import (
        Attempt,
        AttemptLog,
        BleRadio,
        DirSource,
        ImageSource,
        Radio,
        Syncer,
        SyncOptions,
        UdpRadio,
        exit_status,
        load_repo,
        summary_rows,
    )

    given = ([("REPO_DIR", repo_dir)] if repo_dir is not None else []) + [("--repo", r) for r in repos]
    named_urls = [(flag, g) for flag, g in given if g.startswith(("http://", "https://"))]
    urls = [g for _flag, g in named_urls]
    dirs = [Path(g) for _flag, g in given if g not in urls]
    if not given:
        raise UsageError("give REPO_DIR, or --repo URL|DIR (a TUF repository's URL: repeat it for mirrors)")
    if dirs and urls:
        raise UsageError("--repo: a DIR of signed images, or the URLs of one TUF repository's mirrors, not both")
    if len(dirs) > 1:
        raise UsageError("one DIR of signed images (REPO_DIR or --repo DIR), not several")
    if urls and root_path is None:
        raise UsageError("--repo URL needs --root FILE: the repository's trusted root.json, obtained out of "
                         "band (trust is never taken from the URL)")
    if dirs and (root_path is not None or cache_dir is not None):
        raise UsageError("--root and --cache are for a TUF repository (--repo URL), not a DIR of images")
    if urls:
        from mpboot.tufsource import check_mirror_url

        for flag, url in named_urls:  # (before any request: exit 2, never "unreachable")
            try:
                check_mirror_url(url)
            except ValueError as err:
                raise UsageError(f"{flag} {url}: {err}") from None
    network = udp_addresses_given(udp_addresses, udp_list)
    if network and click.get_current_context().get_parameter_source("ble_backend") is \
            click.core.ParameterSource.COMMANDLINE:  # ($MPBOOT_BLE_BACKEND, a station's setting: ignored)
        raise UsageError("--ble-backend is for Bluetooth, not --udp")
    if not network and mtu != 1500:
        raise UsageError("--mtu goes with --udp HOST[:PORT]")
    repo: list = []
    skipped: list[str] = []
    root = b""
    if dirs:
        repo, skipped = load_repo(dirs[0])
        if not repo:
            raise UsageError(f"{dirs[0]}: no signed images (*.img, *.bin, *.signed)"
                             + (f"; skipped {'; '.join(skipped)}" if skipped else ""))
    else:
        assert root_path is not None
        root = read_root(root_path)
    backend = None if network else ble.select(ble_backend)
    log = AttemptLog(log_path)  # (every usage error before the first line of output)
    out = console()  # a log or a pipe: whole lines (grep), never wrapped at 80 columns
    source: ImageSource
    closing = []
    if dirs:
        for line in skipped:
            out.print(f"sync: skipped {line}")
        out.print(f"sync: {plural(len(repo), 'image')} in {dirs[0]}: "
                  + ", ".join(f"{r.path.name} ({r.version})" for r in sorted(repo, key=lambda r: r.key)))
        source = DirSource(repo)
    else:
        from mpboot.tufsource import TufSource, default_cache_dir

        try:
            tuf = TufSource(urls, root, cache_dir or default_cache_dir(), timeout_s=repo_timeout_s,
                            deadline_s=repo_deadline_s, warn=lambda text: out.print(f"sync: {text}"))
        except BaseException:
            log.close()
            raise
        closing.append(tuf)
        try:
            mirror = tuf.refresh()  # (a repository that cannot be used: one line before any scan)
        except BaseException:
            tuf.close()
            log.close()
            raise
        out.print(f"sync: repo {mirror}: {tuf.describe()} (cache {tuf.cache})")
        source = tuf
    opts = SyncOptions(scan_seconds=seconds, max_parallel=max_parallel, retries=retries, timeout=timeout,
                       confirm_timeout=confirm_timeout)

    def event(a: Attempt, text: str) -> None:
        out.print(f"sync: {a.device}: {text}")

    radio: Radio = UdpRadio(network, mtu, warn=lambda text: out.print(f"sync: {text}")) if network else BleRadio(backend)
    syncer = Syncer(source, radio, opts, log, event)
    ended: list = [0, []]  # passes ended, and the last one's attempts (what the exit status reports)

    async def run() -> list:
        try:
            while True:
                try:
                    attempts = await syncer.run_pass()
                except (RepositoryRefused, RepositoryUnavailable) as err:
                    if not loop:
                        raise
                    out.print(f"sync: pass {syncer.passes}: {err}: nothing sent; trying again in {interval:g} s")
                    await asyncio.sleep(interval)
                    continue
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
        for c in closing:
            c.close()
    status = exit_status(attempts)
    if status:
        raise click.exceptions.Exit(status)


UDP_LIST_MAX_BYTES = 1 << 20  # a --udp-list file (some 60000 addresses); a longer one is refused, never cut


def udp_addresses_given(addresses: tuple[str, ...], list_path: Path | None) -> list[tuple[str, int]]:
    """--udp and --udp-list as (host, port)s; a usage error names the one that is not an
    address, or a list longer than UDP_LIST_MAX_BYTES (cut, its last line could be another
    valid address)."""
    from mpboot.errors import InputFileError
    from mpboot.transport.udp import parse_address

    given = [(f"--udp {a}", a) for a in addresses]
    if list_path is not None:
        try:
            with open(list_path, "rb") as f:
                data = f.read(UDP_LIST_MAX_BYTES + 1)
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise InputFileError(f"--udp-list {list_path}: cannot read it: {reason(err)}") from None
        if len(data) > UDP_LIST_MAX_BYTES:
            raise InputFileError(f"--udp-list {list_path}: longer than {UDP_LIST_MAX_BYTES} bytes: refused "
                                 "(a list is read whole, never cut)")
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if line:
                given.append((f"--udp-list {list_path} line {n}", line))
        if not given:
            raise UsageError(f"--udp-list {list_path}: no addresses in it")
    out = []
    for where, text in given:
        try:
            out.append(parse_address(text))
        except ValueError as err:
            raise UsageError(f"{where}: {err} (expected HOST, HOST:PORT or [IPV6]:PORT)") from None
    return out


def read_root(path: Path) -> bytes:
    """The --root file's bytes (bounded; checked by mpboot.tufsource.TufSource)."""
    from mpboot.errors import InputFileError
    from mpboot.tufsource import ROOT_MAX_BYTES

    try:
        with open(path, "rb") as f:
            data = f.read(ROOT_MAX_BYTES + 1)
    except OSError as err:
        raise InputFileError(f"--root {path}: cannot read it: {reason(err)}") from None
    if len(data) > ROOT_MAX_BYTES:
        raise InputFileError(f"--root {path}: larger than a root.json may be ({ROOT_MAX_BYTES} bytes)")
    return data


COMMANDS = (scan_cmd, sync_cmd)

__all__ = ["COMMANDS"]
