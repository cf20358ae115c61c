"""Channel records (docs/KEYS.md section 3, type 4): the golden vectors in tests/vectors/channel/
through the host's checks (mpboot.channel.check_channel) and the device's (mpboot.channel.parse
+ check on the MicroPython unix port), the same verdict for each; the channel
number kept in the trust area; and `mpboot channel sign/show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import KEYS_DIR, VECTORS

from mpboot import upy
from mpboot.channel import channel_record, check_channel, read_channel
from mpboot.cli import cli
from mpboot.errors import ChannelRefused, PullErrorCode, UsageError
from mpboot.image import class_uuid, vendor_uuid
from mpboot.keys import SignatureScheme, load_public_key, load_signing_key
from mpboot.trust import TrustState, decode_body

CHANNEL = VECTORS / "channel"
ENTRIES: list[dict[str, Any]] = json.loads((CHANNEL / "channel.json").read_text())
VENDOR = vendor_uuid("example.com")
CLASS = class_uuid("golden-widget", VENDOR)


def _host_verdict(e: dict[str, Any]) -> str:
    t, d = e["trust"], e["device"]
    state = TrustState(1, tuple(load_public_key(KEYS_DIR / r) for r in t["roots"]), t["threshold"], 1,
                       revoked_keys=tuple(bytes.fromhex(h) for h in t["revoked_keys"]),
                       revoked_serials=tuple(t["revoked_serials"]))
    try:
        check_channel((CHANNEL / e["file"]).read_bytes(), state, vendor_id=bytes.fromhex(d["vendor"]),
                      class_id=bytes.fromhex(d["class"]), name=d["channel"], taken=d["taken"],
                      taken_digest=bytes.fromhex(d["taken_digest"]), floor=d["floor"])
    except ChannelRefused as err:
        return err.code.name
    return "ok"


def test_the_vectors_cover_every_record_code() -> None:
    assert {e["expect"] for e in ENTRIES} == {"ok", "SIGNATURE", "PRODUCT", "STALE", "IMAGE", "RECORD", "TOO_LARGE"}
    for e in ENTRIES:
        for name in e["trust"]["roots"]:
            assert name.startswith("TEST-ONLY-"), name


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_host_verdicts_match_the_manifest(entry: dict[str, Any]) -> None:
    assert _host_verdict(entry) == entry["expect"], entry["note"]


DEVICE_CHECK = """
import json, sys
from binascii import unhexlify
from mpboot import channel, records, trust as T
for c in json.load(open(sys.argv[1])):
    t, d = c["trust"], c["device"]
    s = T.initial([records.der_key(memoryview(unhexlify(k))) for k in t["roots"]], t["threshold"], 1)
    s[T.REVOKED_KEYS] = [unhexlify(h) for h in t["revoked_keys"]]
    s[T.REVOKED_SERIALS] = t["revoked_serials"]
    with open(c["path"], "rb") as f:
        data = f.read()
    try:
        ch = channel.parse(data)
        channel.check(ch, s, unhexlify(d["vendor"]), unhexlify(d["class"]), d["channel"], d["taken"],
                      unhexlify(d["taken_digest"]), d["floor"])
        print(c["name"], 0)
    except channel.ChannelError as e:
        print(c["name"], e.args[0])
"""


def test_device_verdicts_match_the_manifest(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cases = []
    for e in ENTRIES:
        c = dict(e, path=str(CHANNEL / e["file"]))
        c["trust"] = dict(e["trust"], roots=[load_public_key(KEYS_DIR / r).pkcs1_der().hex() for r in e["trust"]["roots"]])
        cases.append(c)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "check.py").write_text(DEVICE_CHECK)
    proc = upy.run([tmp_path / "check.py", tmp_path / "cases.json"], path=[device.lib], heapsize="256k")
    assert proc.returncode == 0, proc.stderr
    got = dict(line.split() for line in proc.stdout.splitlines())
    want = {e["name"]: str(0 if e["expect"] == "ok" else PullErrorCode[e["expect"]].value) for e in ENTRIES}
    assert got == want


TRUST_AREA = """
import sys
from mpboot import channel, flash, trust as T
from mpboot.ports import unix as port
chip = port.flash(sys.argv[1], 16384, 4096, 1, None)
area = flash.Area(chip, 0, 8192)
st = T.TrustStore(area)
keys = [(b"h" * 32, 2048, b"m" * 256)]
t = st.load(keys)
print("BLANK", channel.taken(st)[0], channel.taken(st)[1] == bytes(24))
channel.take(st, t, [7, 0, 0, 0, 0, 0, 0, 0, 0, [], b"d" * 32])  # (H_NUMBER, H_DIGEST)
print("SAVED", channel.taken(st)[0], channel.taken(st)[1] == b"d" * 24)
st.save(t)  # a root or revocation save keeps the number
print("KEPT", channel.taken(st)[0])
channel.take(st, t, [6, 0, 0, 0, 0, 0, 0, 0, 0, [], b"e" * 32])
print("LOWER kept", channel.taken(st)[0], channel.taken(st)[1] == b"d" * 24)
st2 = T.TrustStore(area)
st2.load(keys)
print("RELOAD", channel.taken(st2)[0], channel.taken(st2)[1] == b"d" * 24)
"""


def test_the_channel_number_lives_in_the_trust_area_and_only_grows(device, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "t.py").write_text(TRUST_AREA)
    proc = upy.run([tmp_path / "t.py", tmp_path / "chip.bin"], path=[device.lib], heapsize="64k")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:5] == ["BLANK 0 True", "SAVED 7 True", "KEPT 7", "LOWER kept 7 True",
                                           "RELOAD 7 True"]


# --- host library and CLI --------------------------------------------------------------------


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simkit import make_app, sign_app

    folder = tmp_path_factory.mktemp("app")
    data = sign_app(make_app(folder / "src", "v2", confirm=True), load_signing_key(KEYS_DIR / "TEST-ONLY-rsa2048.pem"),
                    "1.2.3+4", security_counter=9, vendor_id=VENDOR, class_id=CLASS)
    path = folder / "app-1.2.3.bin"
    path.write_bytes(data)
    return path


def test_a_record_names_the_image_it_was_made_from(image: Path) -> None:
    import hashlib

    key = load_signing_key(KEYS_DIR / "TEST-ONLY-rsa2048.pem")
    data = channel_record(image.read_bytes(), [key], SignatureScheme.PSS, name="stable", number=3,
                          path="images/app.bin")
    r = read_channel(data).record
    raw = image.read_bytes()
    assert (r.number, r.name, r.vendor_id, r.class_id, r.length, r.counter, r.path) == (
        3, "stable", VENDOR, CLASS, len(raw), 9, "images/app.bin")
    assert r.sha256 == hashlib.sha256(raw).digest()
    assert r.version == bytes([1, 2, 3, 0, 4, 0, 0, 0])
    assert decode_body(r.encode()) == r
    state = TrustState.initial([key.public()])
    assert check_channel(data, state, vendor_id=VENDOR, class_id=CLASS, name="stable") == r
    with pytest.raises(ChannelRefused) as err:
        check_channel(data, state, vendor_id=VENDOR, class_id=CLASS, name="stable", taken=4)
    assert err.value.code is PullErrorCode.STALE
    with pytest.raises(UsageError, match="relative"):
        channel_record(raw, [key], SignatureScheme.PSS, name="stable", number=3, path="../x.bin")


def test_cli_channel_sign_and_show(image: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "stable.cbor"
    key = str(KEYS_DIR / "TEST-ONLY-rsa2048.pem")
    log = str(tmp_path / "log.jsonl")
    r = runner.invoke(cli, ["channel", "sign", str(image), "-k", key, "-o", str(out), "--signing-log", log])
    assert r.exit_code == 2 and "--number" in r.output  # nothing to count from yet
    r = runner.invoke(cli, ["channel", "sign", str(image), "--number", "41", "-k", key, "-o", str(out),
                            "--signing-log", log])
    assert r.exit_code == 0, r.output
    assert "number 41" in r.output
    r = runner.invoke(cli, ["channel", "sign", str(image), "-k", key, "-o", str(out), "--signing-log", log])
    assert r.exit_code == 0, r.output
    assert read_channel(out.read_bytes()).record.number == 42  # one more than the file replaced
    r = runner.invoke(cli, ["channel", "show", str(out), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert (shown["name"], shown["number"], shown["path"], shown["version"], shown["counter"]) == (
        "stable", 42, image.name, "1.2.3+4", 9)
    r = runner.invoke(cli, ["channel", "show", str(out)])
    assert r.exit_code == 0 and "sha256:" in r.output
    # Not a channel record: one line, exit 1, no traceback.
    r = runner.invoke(cli, ["channel", "show", str(CHANNEL / "root-record.cbor")])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    # An image without vendor and class ids: refused, exit 2.
    from simkit import make_app, sign_app

    bare = tmp_path / "bare.bin"
    bare.write_bytes(sign_app(make_app(tmp_path / "b", "b", confirm=False), load_signing_key(key), "1.0.0"))
    r = runner.invoke(cli, ["channel", "sign", str(bare), "--number", "1", "-k", key, "-o", str(tmp_path / "x.cbor"),
                            "--signing-log", log])
    assert r.exit_code == 2 and "vendor" in r.output, r.output


def test_cli_channel_help_lists_exit_statuses() -> None:
    for cmd in (["channel", "sign", "--help"], ["channel", "show", "--help"]):
        r = CliRunner().invoke(cli, cmd)
        assert r.exit_code == 0 and "Exit status" in r.output


def test_key_show_points_at_channel_show() -> None:
    r = CliRunner().invoke(cli, ["key", "show", str(CHANNEL / "ok-root.cbor")])
    assert r.exit_code == 2 and "mpboot channel show" in r.output, r.output


# --- certificates for channel records (key delegate --kind channel), trust push refusal --------


def test_a_channel_certificate_signs_channel_records_and_not_images(device, image: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`key delegate --kind channel` makes a certificate (kind bit 8) whose key signs channel
    records, on the host and on the device, and no image; a certificate for app images signs
    no channel record."""
    from clikit import assert_ok, run
    from simkit import HEADER_ROOM

    from mpboot.errors import ImageErrorCode, ImageRejected
    from mpboot.image import ImageSigner, ImageVersion, SignOptions, build_image, verify_image

    def k(name: str) -> Path:
        return KEYS_DIR / f"TEST-ONLY-{name}.pem"

    certs = {}
    for kind, serial in (("channel", 30), ("app", 31)):
        certs[kind] = tmp_path / f"{kind}.cert"
        assert_ok(run("key", "delegate", "-k", k("root-a"), "--to", KEYS_DIR / "TEST-ONLY-ci.pub.pem",
                      "--serial", serial, "--vendor-id", "example.com", "--class-id", "golden-widget",
                      "--kind", kind, "-o", certs[kind]))
    shown = json.loads(assert_ok(run("key", "show", certs["channel"], "--json")).stdout)
    assert (shown["kinds"], shown["kind_mask"]) == (["channel"], 8)
    assert "channel" in assert_ok(run("key", "delegate", "--help")).stdout

    state = TrustState.initial([load_public_key(KEYS_DIR / "TEST-ONLY-root-a.pub.pem")])
    records = {}
    for kind in certs:
        records[kind] = tmp_path / f"by-{kind}.cbor"
        assert_ok(run("channel", "sign", image, "--number", 1, "--cert", certs[kind], "-k", k("ci"),
                      "-o", records[kind], "--signing-log", tmp_path / "log.jsonl"))
    assert check_channel(records["channel"].read_bytes(), state, vendor_id=VENDOR, class_id=CLASS,
                         name="stable").number == 1
    with pytest.raises(ChannelRefused) as err:
        check_channel(records["app"].read_bytes(), state, vendor_id=VENDOR, class_id=CLASS, name="stable")
    assert err.value.code is PullErrorCode.SIGNATURE and "serial 31 does not cover" in err.value.detail

    # The device's verdicts: the same.
    root_der = load_public_key(KEYS_DIR / "TEST-ONLY-root-a.pub.pem").pkcs1_der().hex()
    cases = [{"name": kind, "path": str(path), "trust": {"roots": [root_der], "threshold": 1, "revoked_keys": [],
                                                          "revoked_serials": []},
              "device": {"vendor": VENDOR.hex(), "class": CLASS.hex(), "channel": "stable", "taken": 0,
                         "taken_digest": "", "floor": 0}} for kind, path in records.items()]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "check.py").write_text(DEVICE_CHECK)
    proc = upy.run([tmp_path / "check.py", tmp_path / "cases.json"], path=[device.lib], heapsize="256k")
    assert proc.returncode == 0, proc.stderr
    assert dict(line.split() for line in proc.stdout.splitlines()) == {
        "channel": "0", "app": str(PullErrorCode.SIGNATURE.value)}

    # Images: the app certificate's key signs one, the channel certificate's key does not.
    ci = load_signing_key(k("ci"))
    opts = SignOptions(ImageVersion.parse("1.0.0"), security_counter=1, vendor_id=VENDOR, class_id=CLASS)
    body = bytes(HEADER_ROOM) + b"app" * 100
    by_app = build_image(body, [ImageSigner(ci, (certs["app"].read_bytes(),))], opts)
    cert = verify_image(by_app, state).signatures[0].signer.certificate
    assert cert is not None and cert.serial == 31
    by_channel = build_image(body, [ImageSigner(ci, (certs["channel"].read_bytes(),))], opts)
    with pytest.raises(ImageRejected) as rejected:
        verify_image(by_channel, state)
    assert rejected.value.code is ImageErrorCode.OUT_OF_SCOPE


def test_trust_push_of_a_channel_record_says_what_it_is() -> None:
    from clikit import assert_error, run

    r = run("trust", "push", CHANNEL / "ok-root.cbor", "--port", "/dev/null")
    assert_error(r, 1, "a channel record", "not a trust record", "number")


# --- beside a TUF repository (mpboot channel sign --repo) -------------------------------------


def test_channel_sign_beside_an_image_published_by_mpboot_repo(tmp_path: Path) -> None:
    """The record goes to REPO/public/targets/<vid>/<cid>/<channel>.cbor, names the published
    file <sha256>.<name> beside it, and counts on from the record it replaces; an image the
    published metadata does not list (never added, or removed) is refused with nothing written."""
    import hashlib

    from clikit import assert_error, assert_ok, run
    from repokit import IMAGE_KEY, TEAMS, app_image, build_repo, ring
    from repokit import key_path as repo_key

    from mpboot import repo as tufrepo
    from mpboot.repo.images import uuid_text

    acme, beta = TEAMS
    built = build_repo(tmp_path / "repo")
    images = {}
    for name in ("app-1.0.0.bin", "app-1.1.0.bin"):
        images[name] = tmp_path / name
        images[name].write_bytes(built.images[acme.path(name)])
    folder = built.public / "targets" / uuid_text(acme.vendor_id) / uuid_text(acme.class_id)
    stable = folder / "stable.cbor"
    key = repo_key(IMAGE_KEY)
    log = tmp_path / "log.jsonl"

    def sign(image: Path, *extra: object) -> Any:
        return run("channel", "sign", image, "-k", key, "--repo", built.path, "--signing-log", log, *extra)

    out = assert_ok(sign(images["app-1.1.0.bin"])).stdout
    url = f"targets/{uuid_text(acme.vendor_id)}/{uuid_text(acme.class_id)}/stable.cbor"
    assert f"devices pull BASE/{url} (the channel's first; acme lists" in out
    first = read_channel(stable.read_bytes()).record
    data = images["app-1.1.0.bin"].read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert (first.number, first.name, first.path, first.length) == (1, "stable", f"{digest}.app-1.1.0.bin", len(data))
    assert (folder / first.path).read_bytes() == data  # the relative path names the published file
    state = TrustState.initial([load_public_key(repo_key(IMAGE_KEY))])
    check_channel(stable.read_bytes(), state, vendor_id=acme.vendor_id, class_id=acme.class_id, name="stable")
    # Back to 1.0.0 (a channel may go back; its number still grows).
    assert "replaces number 1" in assert_ok(sign(images["app-1.0.0.bin"])).stdout
    second = read_channel(stable.read_bytes()).record
    assert (second.number, second.path.split(".", 1)[1]) == (2, "app-1.0.0.bin")
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["what"], e["channel"], e["number"]) for e in logged] == [("channel record", "stable", 1),
                                                                        ("channel record", "stable", 2)]
    assert logged[1]["output"] == str(stable)
    # --number: only above the record it replaces.
    assert_error(sign(images["app-1.1.0.bin"], "--number", 2), 2, "--number 2", "number 2")
    assert_ok(sign(images["app-1.1.0.bin"], "--number", 10))
    assert read_channel(stable.read_bytes()).record.number == 10
    # Another channel: its own file and numbers.
    assert_ok(sign(images["app-1.1.0.bin"], "--name", "beta"))
    assert read_channel((folder / "beta.cbor").read_bytes()).record.number == 1
    held = stable.read_bytes()

    # Refusals, each one line, exit 2, nothing written.
    unpublished = tmp_path / "app-9.bin"
    unpublished.write_bytes(app_image(acme, "9.0.0", counter=3))
    assert_error(sign(unpublished), 2, "not published", "mpboot repo add")
    built.add(acme.role, "app-9.bin", unpublished.read_bytes())  # staged, not yet published
    assert_error(sign(unpublished), 2, "not published")
    tufrepo.remove(built.path, acme.role, ["app-1.0.0.bin"], ring(acme.key_file))
    built.publish()
    assert (folder / second.path).is_file()  # the file stays, the metadata no longer lists it
    assert_error(sign(images["app-1.0.0.bin"]), 2, "not published")
    assert stable.read_bytes() == held
    assert_ok(sign(unpublished))  # published by that publish
    held = stable.read_bytes()
    for name in ("../x", "a/b", ".hidden", "x" * 17):
        assert_error(sign(images["app-1.1.0.bin"], "--name", name), 2, "channel name")
    assert_error(run("channel", "sign", images["app-1.1.0.bin"], "-k", key, "--repo", built.path, "-o",
                     tmp_path / "x.cbor"), 2, "-o FILE, or --repo")
    assert_error(run("channel", "sign", images["app-1.1.0.bin"], "-k", key, "--repo", built.path, "--path", "x.bin"),
                 2, "--path")
    assert_error(run("channel", "sign", images["app-1.1.0.bin"], "-k", key, "--repo", tmp_path), 2,
                 "not an mpboot repository")
    stable.write_bytes(b"\xa0")  # what is there is no channel record
    assert_error(sign(images["app-1.1.0.bin"]), 2, "not a channel record")
    stable.write_bytes(held)
    # The beta team's image goes to its own folder.
    lamp = tmp_path / "lamp.bin"
    lamp.write_bytes(built.images[beta.path("lamp-2.0.0.bin")])
    assert_ok(sign(lamp))
    lamp_folder = built.public / "targets" / uuid_text(beta.vendor_id) / uuid_text(beta.class_id)
    assert read_channel((lamp_folder / "stable.cbor").read_bytes()).record.vendor_id == beta.vendor_id
    assert read_channel(stable.read_bytes()).record.number == 11  # app-9 above


def test_cli_channel_sign_counts_only_from_a_record_of_its_own_channel(image: Path, tmp_path: Path) -> None:
    """Without --number, -o FILE must hold a record of this channel name, vendor and class: a
    record of another channel (or product) says nothing about this one's numbers. Refused in
    one line naming FILE (exit 2), as is a FILE that is not a channel record; nothing written."""
    from clikit import assert_error, assert_ok, run

    key = KEYS_DIR / "TEST-ONLY-rsa2048.pem"
    log = tmp_path / "log.jsonl"
    beta = tmp_path / "beta.cbor"
    assert_ok(run("channel", "sign", image, "--name", "beta", "--number", 50, "-k", key, "-o", beta,
                  "--signing-log", log))
    before = beta.read_bytes()
    line = assert_error(run("channel", "sign", image, "-k", key, "-o", beta, "--signing-log", log), 2, str(beta),
                        "'beta'", "--number")
    assert beta.read_bytes() == before
    # A record of the same channel name for another product: refused the same way.
    from mpboot.trust import ChannelRecord, sign_envelope

    other = tmp_path / "other.cbor"
    body = ChannelRecord(7, "stable", vendor_uuid("other.example"), CLASS, bytes(32), 100, bytes(8), 1, "x.bin")
    other.write_bytes(sign_envelope(body, [load_signing_key(key)], SignatureScheme.PSS))
    line = assert_error(run("channel", "sign", image, "-k", key, "-o", other, "--signing-log", log), 2, str(other),
                        "another product")
    assert "'stable'" in line
    # Not a channel record at all: exit 2, naming FILE.
    root = tmp_path / "root.cbor"
    root.write_bytes((CHANNEL / "root-record.cbor").read_bytes())
    assert_error(run("channel", "sign", image, "-k", key, "-o", root, "--signing-log", log), 2, str(root),
                 "not a channel record")
    # Its own channel's record: counted from.
    assert_ok(run("channel", "sign", image, "--name", "beta", "-k", key, "-o", beta, "--signing-log", log))
    assert read_channel(beta.read_bytes()).record.number == 51
