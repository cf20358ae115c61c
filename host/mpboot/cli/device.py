"""Device commands over SMP (serial port or BLE): flash, state, confirm, reset, erase, echo."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mpboot.cli.common import (
    DeviceLink,
    console,
    device_options,
    on_interrupt,
    plural,
    read_image,
    retries_option,
    size_text,
)
from mpboot.errors import ProtocolError, UsageError


@click.command("flash")
@click.argument("image_path", metavar="IMAGE", type=click.Path(path_type=Path))
@device_options
@click.option("--test", "test_boot", is_flag=True, help="Mark it for one test boot (the app confirms it, or it reverts).")
@click.option("--confirm", "permanent", is_flag=True, help="Make it permanent: it boots from the next reset on.")
@click.option("--reset", "reset_after", is_flag=True, help="Reset the device afterwards.")
@click.option("--image", "image_number", default="app", metavar="app|stage1|N",
              help="Which image: app (default: the app's free slot, as image 0 or 1), stage1 (stage 1's "
                   "free slot, image 2, on a device with stage-1 slots), or the upload's `image` number N.")
@click.option("--with-stage1", "stage1_path", type=click.Path(path_type=Path), metavar="STAGE1",
              help="A combined update (a device with two stages): upload STAGE1 into stage 1's free slot and "
                   "IMAGE into the app's, then mark both for one test boot together: they start, confirm "
                   "and revert as a pair (needs --test; with --reset stage 1 is then proven).")
@click.option("--prove/--no-prove", default=True,
              help="With --image stage1 --test --reset: once stage 1 runs its test boot, probe and confirm it "
                   "(default); --no-prove leaves it unproven (it reverts at its deadline unless proven).")
@click.option("--window", type=click.IntRange(1, 64), metavar="N",
              help="Upload requests in flight (default: the device's buf_count on an mpboot device, 1 on others).")
@click.option("--no-compress", is_flag=True,
              help="Send every chunk as it is (default: compressed where the device offers it and it pays).")
@retries_option
@click.option("--no-progress", is_flag=True, help="No progress bar: print a one-line summary at the end.")
def flash_cmd(image_path: Path, link: DeviceLink, test_boot: bool, permanent: bool, reset_after: bool,
              image_number: str, stage1_path: Path | None, prove: bool, window: int | None, no_compress: bool,
              retries: int, no_progress: bool) -> None:
    """Upload IMAGE to the device (resuming an interrupted upload), then optionally mark and reset.

    Without --test or --confirm the image is written and verified but does not boot. An image
    the device already runs is left as it is (exit 0); one it holds in the other slot is
    marked without a new upload. Stage 1 (--image stage1) is confirmed only by its proven test
    boot: --test --reset uploads, marks, resets, then probes and confirms it."""
    import asyncio

    from mpboot.flashing import STAGE1, Mark, flash, flash_with_retries, prepare

    if test_boot and permanent:
        raise UsageError("--test and --confirm exclude each other: test-boot it, or make it permanent")
    number = _image_number(image_number)
    stage1 = number in (STAGE1, STAGE1 + 1)
    if stage1 and permanent:
        raise UsageError("stage 1 cannot be made permanent: it is confirmed only by its proven test boot; "
                         "use --test --reset (the probe and the confirm follow)")
    mark = Mark.TEST if test_boot else Mark.CONFIRM if permanent else Mark.NONE
    prepared = prepare(read_image(image_path))  # a malformed image fails here, before the port opens
    compress = False if no_compress else None
    if stage1_path is not None:
        if not test_boot or number != 0:
            raise UsageError("--with-stage1 is a combined update of the app (IMAGE) and stage 1: it needs --test "
                             "(a pair boots once on trial, then confirms or reverts together) and no --image")
        _flash_pair(link, prepared, prepare(read_image(stage1_path)), image_path, stage1_path, reset_after,
                    prove, window, compress)
        return
    make = link.client_factory()
    acked = [0, len(prepared.data)]

    def where() -> str:
        if acked[0] == 0:
            return f"before the upload began; run the same command again to flash {image_path.name}"
        return (f"the upload reached {acked[0]} of {acked[1]} bytes; run the same command again: "
                "it resumes there (the device keeps the upload)")

    on_interrupt(where)

    async def run_flash(progress: Callable[[int, int], None], note: Callable[[str], None]) -> Any:
        def seen(done: int, total: int) -> None:
            acked[:] = [done, total]
            progress(done, total)

        try:
            if link.ble is None:
                async with make() as client:
                    return await flash(client, prepared, mark=mark, reset=reset_after, window=window,
                                       progress=seen, compress=compress, image_number=number)

            def on_retry(attempt: int, err: Exception) -> None:
                note(f"mpboot: link lost ({err}); reconnecting ({attempt}/{retries})")

            return await flash_with_retries(make, prepared, retries=retries, mark=mark, reset=reset_after,
                                            progress=seen, window=window, compress=compress,
                                            on_retry=on_retry, image_number=number)
        finally:
            await link.release()

    async def action() -> Any:
        if no_progress:
            return await run_flash(lambda done, total: None, lambda text: click.echo(text, err=True))
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                   TransferSpeedColumn(), TimeRemainingColumn())
        err_console = console(stderr=True)
        with contextlib.ExitStack() as stack:
            bars: list[tuple[Any, Any]] = []  # the bar appears once the device answers

            def progress(done: int, total: int) -> None:
                if not bars:
                    bar = stack.enter_context(Progress(*columns, console=err_console))
                    bars.append((bar, bar.add_task(f"flash {image_path.name}", total=total)))
                bar, task = bars[0]
                bar.update(task, completed=done, total=total)

            return await run_flash(progress, lambda text: err_console.print(text, markup=False))

    done = asyncio.run(action())
    if done.running:
        slot = done.slot
        state = ("on its test boot: confirmed it now" if done.confirmed_now else
                 "confirmed" if slot is not None and slot.confirmed else "on its test boot")
        number = f"slot {slot.slot}, " if slot is not None else ""
        click.echo(f"{image_path} (version {prepared.version}) already runs on the device ({number}{state}): "
                   f"nothing uploaded{', no reset needed' if reset_after else ''}")
        if stage1 and test_boot and prove and slot is not None and not slot.confirmed:
            # A re-run after the reset (the proof did not finish): it finishes now.
            entry = _prove_after_reset(link, prepared.hash)
            click.echo(f"stage 1 {image_path.name} (version {entry.version}) runs its test boot: proven and "
                       "confirmed (probe and confirm over this link)")
        return
    up = done.upload
    if no_progress and up is not None:
        resumed = f", resumed at {up.resumed_from}" if up.resumed_from else ""
        reconnects = f", {plural(done.reconnects, 'reconnect')}" if done.reconnects else ""
        squeezed = (f", {up.compressed} compressed, {up.image_sent / up.sent:.2f}x"
                    if up.compressed and up.sent else "")
        click.echo(f"uploaded {up.size} bytes in {up.elapsed:.1f} s ({size_text(up.rate)}/s, "
                   f"{plural(up.requests, 'request')}{squeezed}, window {up.window}{resumed}{reconnects})")
    held = " (the device held it already: nothing uploaded)" if up is None else ""
    where_slot = (f" in {'stage 1' if done.slot.image == 1 else 'image ' + str(done.slot.image)}'s slot "
                  f"{done.slot.slot}" if done.slot is not None and done.slot.image else
                  f" in slot {done.slot.slot}" if done.slot is not None else "")
    how = {Mark.NONE: "not marked (it does not boot until marked)" if not done.recovery else
           # What boots next is the bootloader's choice: MCUboot's serial recovery took it into
           # slot 0 and boots it as it is; an mpboot device in recovery needs a mark.
           "not marked; the device runs no image (recovery), so its bootloader decides whether it "
           "boots at the next reset: MCUboot's serial recovery boots slot 0 as it is, mpboot only "
           "a marked image",
           Mark.TEST: "marked for a test boot at the next reset",
           Mark.CONFIRM: "made permanent (boots from the next reset)"}[mark]
    click.echo(f"flashed {image_path} (version {prepared.version}){where_slot}{held}: {how}"
               f"{'; device reset' if reset_after else ''}")
    if stage1 and test_boot:
        if not reset_after or not prove:
            click.echo("stage 1 confirms it only once proven on its test boot: after the reset, run "
                       "`mpboot confirm --image stage1` (a probe, then the confirm) before its deadline")
            return
        entry = _prove_after_reset(link, prepared.hash)
        click.echo(f"stage 1 {image_path.name} (version {entry.version}) runs its test boot: proven and "
                   "confirmed (probe and confirm over this link)")


def _flash_pair(link: DeviceLink, app: Any, stage1: Any, app_path: Path, stage1_path: Path, reset_after: bool,
                prove: bool, window: int | None, compress: bool | None) -> None:
    """flash --with-stage1: both uploads, the pair mark, the reset, stage 1's proof."""
    import asyncio

    from mpboot.flashing import flash_pair

    make = link.client_factory()

    async def run() -> Any:
        try:
            async with make() as client:
                return await flash_pair(client, app, stage1, reset=reset_after, window=window, compress=compress)
        finally:
            await link.release()

    done_app, done_s1 = asyncio.run(run())
    sent = [d.upload.size for d in (done_app, done_s1) if d.upload is not None]
    click.echo(f"flashed {app_path} (version {app.version}) and stage 1 {stage1_path} (version {stage1.version})"
               f" ({plural(len(sent), 'upload')}, {sum(sent)} bytes): marked together for one test boot at the "
               f"next reset{'; device reset' if reset_after else ''}")
    if not reset_after or not prove:
        click.echo("the pair is kept once the app confirms itself and stage 1 is proven: after the reset, run "
                   "`mpboot confirm --image stage1` before its deadline")
        return
    entry = _prove_after_reset(link, stage1.hash)
    click.echo(f"stage 1 {stage1_path.name} (version {entry.version}) runs its test boot: proven and "
               + ("confirmed; the pair is kept" if entry.confirmed else
                  "confirmed its half: the pair is kept once the app confirms itself (a reset before reverts both)"))


PROVE_ATTEMPTS = 5  # links opened to find stage 1 back after the reset


def _image_number(text: str) -> int:
    """--image: app (0), stage1 (2), or the upload's `image` number."""
    words = {"app": 0, "stage1": 2}
    if text in words:
        return words[text]
    if not text.isdigit() or int(text) > 255:
        raise UsageError(f"--image {text!r}: expected app, stage1 or an image number (0-255)")
    return int(text)


def _prove_after_reset(link: DeviceLink, image_hash: bytes | None) -> Any:
    """Stage 1's proof once the device is back from its reset: reconnects (the device is
    booting: a few silent attempts are expected), then probe and confirm."""
    import asyncio

    from mpboot.errors import DeviceSilent, PortError, TransportError
    from mpboot.flashing import prove_stage1

    make = link.client_factory()

    async def attempt() -> Any:
        try:
            async with make() as client:
                return (await prove_stage1(client, image_hash))[0]
        finally:
            await link.release()

    last: Exception | None = None
    for _ in range(PROVE_ATTEMPTS):
        try:
            return asyncio.run(attempt())
        except (DeviceSilent, TransportError, PortError) as err:
            last = err
    raise DeviceSilent(f"stage 1 did not answer after the reset ({last}); run `mpboot confirm --image stage1` "
                       "before its deadline")


def _slot_dict(s: Any) -> dict[str, Any]:
    return {"image": s.image, "slot": s.slot, "version": s.version, "hash": s.hash.hex(),
            "bootable": s.bootable, "pending": s.pending, "confirmed": s.confirmed,
            "active": s.active, "permanent": s.permanent}


@click.command("state")
@device_options
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: {uid, serial, root_version, revocation, [stage1, stage1_floor,] [channel,] "
                   "[pull: {ok, outcome or error, detail, number},] images: [{slot, version, hash, flags...}]}.")
def state_cmd(link: DeviceLink, as_json: bool) -> None:
    """List the images on the device: slot, version, hash and flags (and, on an mpboot
    device, its trust state's root set version and revocation number, the highest channel
    number it took and its last device pull in this boot)."""

    async def action(client: Any) -> Any:
        from mpboot.errors import CommandNotSupported

        slots, uid, serial = await client.identity()
        try:
            info = await client.device_info()
        except CommandNotSupported:  # not mpboot (Zephyr, MCUboot): no group 64
            info = None
        return slots, uid, serial, info

    slots, uid, serial, info = link.run(action)
    root_version = info.root_version if info is not None else None
    revocation = info.revocation if info is not None else None
    stage1 = info.stage1 if info is not None else None
    if as_json:
        extra = {} if stage1 is None else {"stage1": stage1 or None, "stage1_floor": info.stage1_floor}  # type: ignore[union-attr]
        extra.update(_pull_json(info))
        click.echo(json.dumps({"uid": uid.hex() if uid is not None else None, "serial": serial,
                               "root_version": root_version, "revocation": revocation, **extra,
                               "images": [_slot_dict(s) for s in slots]}, indent=2))
        return
    if uid is not None:
        trust = f"; root set version {root_version}, revocation {revocation}" if root_version is not None else ""
        if stage1 is not None:
            trust += f"; stage 1 {stage1}" if stage1 else "; stage 1: the firmware's rescue serves"
        click.echo(f"device {uid.hex()}" + (f", serial {serial}" if serial else ", not provisioned") + trust)
    if info is not None and (info.channel is not None or info.pull is not None):
        chan = f"channel number {info.channel} taken" if info.channel is not None else ""
        pull = f"last pull {info.pull.words}, record number {info.pull.number}" if info.pull is not None else ""
        click.echo("; ".join(w for w in (chan, pull) if w))
    if not slots:
        click.echo("no images (the device is in recovery: flash one with --test or --confirm)")
        return
    # A device with stage-1 slots lists image 1 (stage 1) too: the image column says which.
    image = "" if all(s.image == 0 for s in slots) else f"{'image':<6} "
    click.echo(f"{image}{'slot':<5} {'version':<14} {'hash':<17} flags")
    for s in slots:
        number = f"{s.image:<6} " if image else ""
        click.echo(f"{number}{s.slot:<5} {s.version:<14} {s.hash.hex()[:16]:<17} {' '.join(s.flags)}")


def _pull_json(info: Any) -> dict[str, Any]:
    """`state --json`'s "channel" and "pull" (each only when the device reports it)."""
    out: dict[str, Any] = {}
    if info is not None and info.channel is not None:
        out["channel"] = info.channel
    p = info.pull if info is not None else None
    if p is not None:
        out["pull"] = {"ok": p.ok, "outcome" if p.ok else "error": p.name, "code": p.code, "detail": p.detail,
                       "number": p.number}
    return out


@click.command("confirm")
@click.argument("hash_text", metavar="[HASH]", required=False)
@click.option("--image", "which", type=click.Choice(["app", "stage1"]), default="app",
              help="Without HASH: confirm the running app (default) or the running stage 1 (on its test "
                   "boot: a probe proves it first).")
@device_options
def confirm_cmd(hash_text: str | None, which: str, link: DeviceLink) -> None:
    """Confirm the running image, or make the image with HASH permanent.

    HASH is its SHA256 TLV in hex (as `mpboot state` lists it); a unique prefix will do. The
    running stage 1 on its test boot (HASH, or --image stage1) is proven first: a probe over
    this link, then the confirm (docs/BOOT.md, "Stage 1's proof")."""
    wanted = hash_text.strip().lower() if hash_text else None
    if wanted is not None and not re.fullmatch(r"[0-9a-f]{4,64}", wanted):
        raise UsageError(f"bad hash {hash_text!r}: expected hex digits (at least 4) as `mpboot state` lists them")
    if wanted is not None and which == "stage1":
        raise UsageError("give HASH or --image stage1, not both: the hash names the image")

    async def action(client: Any) -> Any:
        from mpboot.flashing import check_no_permanent_waiting, prove_stage1, running_stage1

        slots = await client.state()
        s1 = running_stage1(slots)
        matches = [s for s in slots if wanted is not None and s.hash.hex().startswith(wanted)]
        if len({s.hash for s in matches}) > 1:
            raise UsageError(f"more than one image on the device has a hash starting {wanted}")
        if which == "stage1" or (matches and s1 is not None and matches[0].hash == s1.hash):
            entry, changed = await prove_stage1(client)
            return None, entry, changed
        if wanted is None:
            if not any(s.active for s in slots):
                raise UsageError("the device runs no image (it is in recovery): nothing to confirm; "
                                 "flash one with `mpboot flash IMAGE --test` or `--confirm`")
            check_no_permanent_waiting(slots, "the running image cannot be kept", "then confirm again")
            return await client.state_write(None, confirm=True), None
        if not matches:
            raise UsageError(f"no image on the device has a hash starting {wanted}")
        return await client.state_write(matches[0].hash, confirm=True), matches[0].hash

    slots, target, *stage1 = link.run(action)
    if slots is None:
        entry, changed = target, stage1[0]
        click.echo(f"stage 1 (version {entry.version}, image 1 slot {entry.slot}) "
                   + ("proven and confirmed" if changed else "is confirmed already: nothing to do"))
        return
    if target is None:
        entry = next((s for s in slots if s.active), None)
    else:
        same = [s for s in slots if s.hash == target]
        # The device's answer says which copy it acted on (both slots may hold the image).
        entry = next((s for s in same if s.active and s.confirmed),
                     next((s for s in same if s.permanent), same[0] if same else None))
    what = f" (slot {entry.slot}, version {entry.version})" if entry else ""
    if entry is None or (entry.active and entry.confirmed):
        click.echo(f"confirmed the running image{what}")
    elif entry.permanent:
        click.echo(f"image {entry.hash.hex()[:16]} in slot {entry.slot} (version {entry.version}) made "
                   "permanent: it boots from the next reset")
    else:
        raise ProtocolError(f"the device accepted the confirm but does not list image {entry.hash.hex()[:16]}"
                            f"{what} as confirmed or permanent")


@click.command("reset")
@device_options
def reset_cmd(link: DeviceLink) -> None:
    """Reset the device."""

    async def action(client: Any) -> None:
        await client.reset()

    link.run(action)
    click.echo(f"reset {link.name}")


@click.command("erase")
@click.option("--slot", type=click.IntRange(0, 3),
              help="Slot to erase (default: the app's slot not running); 2 and 3 are stage 1's, on a device "
                   "with stage-1 slots.")
@device_options
def erase_cmd(slot: int | None, link: DeviceLink) -> None:
    """Erase a slot (never the running one)."""

    async def action(client: Any) -> None:
        await client.erase(slot)

    link.run(action)
    click.echo(f"erased {'the slot not running' if slot is None else f'slot {slot}'}")


@click.command("echo")
@click.argument("text")
@device_options
def echo_cmd(text: str, link: DeviceLink) -> None:
    """Send TEXT to the device and print its echo (a link check)."""

    async def action(client: Any) -> Any:
        return await client.echo(text)

    click.echo(link.run(action))


COMMANDS = (flash_cmd, state_cmd, confirm_cmd, reset_cmd, erase_cmd, echo_cmd)

__all__ = ["COMMANDS"]
