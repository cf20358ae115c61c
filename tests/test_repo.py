"""`mpboot repo` (issue 20, repository side): a TUF repository of signed images built with
python-tuf's Metadata API, checked by python-tuf's own client (ngclient) against a real HTTP
server on 127.0.0.1: init and publish, thresholds (one signature is not enough), team
scopes, rotation (a client holding root v1 walks to v2), snapshot and timestamp versions,
status and its warnings, a timestamp key on a SoftHSM2 token, and the one-line errors."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import Result

from clikit import assert_error, assert_ok, run
from conftest import signing_key
from hsmkit import SoftHsm, openssl_sign, pin_file, uri
from repokit import (
    IMAGE_KEY,
    ROOT_KEYS,
    SNAPSHOT_KEY,
    TARGETS_KEY,
    TEAMS,
    TIMESTAMP_KEY,
    Team,
    app_image,
    build_repo,
    key_path,
    serve,
    updater,
)
from simkit import HEADER_ROOM
from mpboot.flashing import prepare
from mpboot.image import ImageVersion, SignOptions, build_image
from mpboot.keys import generate, load_public_key
from mpboot.repo.images import custom_mismatch

ACME, BETA = TEAMS
A, B, C = (key_path(k) for k in ROOT_KEYS)
TK, SK, TSK = key_path(TARGETS_KEY), key_path(SNAPSHOT_KEY), key_path(TIMESTAMP_KEY)


def k(*paths: Path) -> list[object]:
    """-k options for key files."""
    return [x for p in paths for x in ("-k", p)]


def new_key(folder: Path, name: str) -> Path:
    """A fresh RSA-2048 key file (a key being rotated in)."""
    path = folder / f"TEST-ONLY-{name}.pem"
    path.write_bytes(generate("rsa-2048").private_pem())
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def init_cli(repo: Path, *signers: Path, extra: tuple[object, ...] = ()) -> Result:
    return run("repo", "init", repo, "--root-key", A, "--root-key", B, "--root-key", C, "--root-threshold", "2",
               "--targets-key", TK,
               "--snapshot-key", SK, "--timestamp-key", TSK, *extra, *k(*signers))


def delegate_cli(repo: Path, team: Team = ACME) -> Result:
    """Delegate `team` its vendor and class, its own key, threshold 1 (signed by targets and the team)."""
    return run("repo", "delegate", repo, team.role, "--vendor-id", team.vendor, "--class-id", team.klass,
               "--role-key", key_path(team.key_file), "--threshold", 1, *k(TK, key_path(team.key_file)))


def client_sees(public: Path, root: bytes, cache: Path, paths: list[str]) -> dict[str, dict | None]:
    """What python-tuf's client, bootstrapped with `root`, finds for each target path (its
    custom metadata, after downloading and verifying the bytes; None: not listed)."""
    found: dict[str, dict | None] = {}
    with serve(public) as url:
        up = updater(cache, url, root)
        up.refresh()
        for p in paths:
            info = up.get_targetinfo(p)
            if info is not None:
                up.download_target(info)
            found[p] = info.custom if info is not None else None
    return found


def snapshot_meta(public: Path) -> dict[str, int]:
    ts = json.loads((public / "metadata" / "timestamp.json").read_bytes())
    version = ts["signed"]["meta"]["snapshot.json"]["version"]
    snap = json.loads((public / "metadata" / f"{version}.snapshot.json").read_bytes())
    return {"timestamp": ts["signed"]["version"], "snapshot": version,
            **{name[:-5]: m["version"] for name, m in snap["signed"]["meta"].items()}}


# --- the whole flow through the CLI -------------------------------------------------------------


def test_init_delegate_add_publish_and_a_tuf_client_gets_the_image(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    made = assert_ok(init_cli(repo, A, B, TK)).stdout
    assert "staged root version 1: signed by 2 of 2, ready to publish" in made
    assert "staged targets version 1: signed by 1 of 1, ready to publish" in made
    assert_ok(delegate_cli(repo))
    image = tmp_path / "thermo-1.2.0.bin"
    image.write_bytes(app_image(ACME, "1.2.0", counter=3))
    added = assert_ok(run("repo", "add", repo, image, "--role", "acme", "--expect-key",
                          key_path(IMAGE_KEY), *k(key_path(ACME.key_file)))).stdout
    path = ACME.path("thermo-1.2.0.bin")
    assert f"added {path} (version 1.2.0+0, counter 3, app" in added
    assert not (repo / "public" / "metadata" / "timestamp.json").exists()  # nothing live before publish
    published = assert_ok(run("repo", "publish", repo, *k(SK, TSK))).stdout
    assert "published snapshot version 1 and timestamp version 1" in published

    # What is served: versioned (immutable) metadata, hash-prefixed targets, one timestamp.json.
    public = repo / "public"
    names = sorted(listing(public))
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    assert names == sorted(["metadata/1.root.json", "metadata/1.targets.json", "metadata/1.acme.json",
                            "metadata/1.snapshot.json", "metadata/timestamp.json",
                            f"targets/{path.rsplit('/', 1)[0]}/{digest}.thermo-1.2.0.bin"])
    assert not listing(repo / "staging")  # everything staged went live
    root = (public / "metadata" / "1.root.json").read_bytes()
    custom = client_sees(public, root, tmp_path / "cache", [path])[path]
    prepared = prepare(image.read_bytes())
    assert prepared.hash is not None
    assert custom == {"mpboot": {"version": [1, 2, 0, 0], "counter": 3, "vendor": path.split("/")[0],
                                 "class": path.split("/")[1], "kind": "app", "image_hash": prepared.hash.hex()}}
    # The one parser a client uses after download: it agrees, and catches a role key that lies.
    assert custom_mismatch(custom, prepared) is None
    lying = json.loads(json.dumps(custom))
    lying["mpboot"]["counter"] = 9
    assert custom_mismatch(lying, prepared) == "custom counter 9, but the image says 3"
    assert custom_mismatch({"other": 1}, prepared) == "no mpboot custom metadata"


def test_every_published_file_but_timestamp_is_written_once(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    before = listing(built.public)
    assert snapshot_meta(built.public) == {"timestamp": 1, "snapshot": 1, "targets": 1, "acme": 1, "beta": 1}
    built.add("acme", "app-1.2.0.bin", app_image(ACME, "1.2.0", counter=3))
    built.publish()
    assert snapshot_meta(built.public) == {"timestamp": 2, "snapshot": 2, "targets": 1, "acme": 2, "beta": 1}
    after = listing(built.public)
    changed = [name for name, data in before.items() if after[name] != data]
    assert changed == ["metadata/timestamp.json"]
    assert {"metadata/2.acme.json", "metadata/2.snapshot.json"} <= set(after) - set(before)
    # A timer's publish: only a new timestamp, over the same snapshot.
    built.publish(timestamp_only=True)
    assert snapshot_meta(built.public) == {"timestamp": 3, "snapshot": 2, "targets": 1, "acme": 2, "beta": 1}
    # A full publish with nothing staged: new snapshot and timestamp, the roles as they were.
    lines = built.publish()
    assert lines[0] == "published snapshot version 3 and timestamp version 4"
    seen = client_sees(built.public, built.root_v1, tmp_path / "cache", list(built.images))
    assert all(seen[p] is not None for p in built.images)


def test_a_client_holding_an_older_timestamp_accepts_each_publish(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    cache = tmp_path / "cache"
    path = built.target_path("acme", "app-1.1.0.bin")
    assert client_sees(built.public, built.root_v1, cache, [path])[path] is not None
    built.add("beta", "lamp-2.1.0.bin", app_image(BETA, "2.1.0", counter=2))
    built.publish()
    new = built.target_path("beta", "lamp-2.1.0.bin")
    assert client_sees(built.public, built.root_v1, cache, [new])[new] is not None


def test_remove_delists_the_image_and_keeps_its_file(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    path = built.target_path("acme", "app-1.0.0.bin")
    files = [p for p in listing(built.public) if p.endswith(".app-1.0.0.bin")]
    out = assert_ok(run("repo", "remove", built.path, "app-1.0.0.bin", "--role", "acme",
                        *k(key_path(ACME.key_file)))).stdout
    assert f"removed {path}" in out
    assert_error(run("repo", "remove", built.path, "nothing.bin", "--role", "acme", *k(key_path(ACME.key_file))),
                 2, "nothing.bin: not listed in acme")
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    other = built.target_path("acme", "app-1.1.0.bin")
    seen = client_sees(built.public, built.root_v1, tmp_path / "cache", [path, other])
    assert seen[path] is None and seen[other] is not None
    assert files and all((built.public / f).is_file() for f in files)
    # An image added, then removed before it went live, never reaches public/ and leaves staging.
    early = _image(tmp_path, "app-9.0.0.bin", app_image(ACME, "9.0.0", counter=9))
    assert_ok(run("repo", "add", built.path, early, "--role", "acme", *k(key_path(ACME.key_file))))
    assert_ok(run("repo", "remove", built.path, "app-9.0.0.bin", "--role", "acme", *k(key_path(ACME.key_file))))
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert not listing(built.path / "staging")
    assert not [p for p in listing(built.public) if "app-9.0.0" in p]


# --- thresholds -------------------------------------------------------------------------------


def test_a_root_threshold_of_two_needs_two_root_keys(tmp_path: Path) -> None:
    from tuf.api.metadata import Metadata

    repo = tmp_path / "repo"
    out = assert_ok(init_cli(repo, A, TK)).stdout
    assert "staged root version 1: signed by 1 of 2, waiting for signatures" in out
    assert "staged targets version 1: signed by 1 of 1, goes live with root version 1, which waits for signatures" in out
    staged = Metadata.from_file(str(repo / "staging" / "metadata" / "root.json"))
    result = staged.signed.get_root_verification_result(None, staged.signed_bytes, staged.signatures)
    assert not result.verified and len(result.signed) == 1
    assert_error(run("repo", "publish", repo, *k(SK, TSK)), 2, "root version 1 is not signed yet",
                 "1 of 2", "repo sign")
    assert not listing(repo / "public")
    # The same key twice does not count twice.
    assert_error(run("repo", "sign", repo, "root", *k(A)), 2, "has already signed the staged root")
    assert_error(run("repo", "sign", repo, "root", *k(TK)), 2, "not a key of root")
    assert "signed by 2 of 2, ready to publish" in assert_ok(run("repo", "sign", repo, "root", *k(B))).stdout
    staged = Metadata.from_file(str(repo / "staging" / "metadata" / "root.json"))
    staged.signed.verify_delegate("root", staged.signed_bytes, staged.signatures)
    assert_ok(run("repo", "publish", repo, *k(SK, TSK)))
    assert (repo / "public" / "metadata" / "1.root.json").is_file()


def test_a_team_role_with_threshold_two_waits_for_its_second_key(tmp_path: Path) -> None:
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Metadata

    built = build_repo(tmp_path / "repo", apps={})
    team2 = new_key(tmp_path, "team-second")
    first = key_path(ACME.key_file)
    rotated = assert_ok(run("repo", "rotate", built.path, "acme", "--add", team2, "--threshold", "2",
                            *k(TK, first))).stdout
    assert "staged acme version 2: signed by 1 of 2, waiting for signatures" in rotated
    # Sign the key change off first: the image waits for both team keys.
    assert_ok(run("repo", "sign", built.path, "acme", *k(team2)))
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    image = tmp_path / "app-2.0.0.bin"
    image.write_bytes(app_image(ACME, "2.0.0", counter=5))
    out = assert_ok(run("repo", "add", built.path, image, "--role", "acme", *k(first))).stdout
    assert "staged acme version 3: signed by 1 of 2, waiting for signatures" in out
    targets = Metadata.from_file(str(built.public / "metadata" / "2.targets.json"))
    staged = Metadata.from_file(str(built.path / "staging" / "metadata" / "acme.json"))
    with pytest.raises(UnsignedMetadataError):
        targets.signed.verify_delegate("acme", staged.signed_bytes, staged.signatures)
    # publish leaves it staged: the live acme stays version 2, and the client does not see it.
    published = assert_ok(run("repo", "publish", built.path, *k(SK, TSK))).stdout
    assert "still staged: staged acme version 3: signed by 1 of 2" in published
    assert snapshot_meta(built.public)["acme"] == 2
    path = ACME.path("app-2.0.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "c1", [path])[path] is None
    assert_ok(run("repo", "sign", built.path, "acme", *k(team2)))
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert snapshot_meta(built.public)["acme"] == 3
    assert client_sees(built.public, built.root_v1, tmp_path / "c2", [path])[path] is not None


# --- what a team may list -------------------------------------------------------------------------


def test_an_image_outside_the_roles_scope_is_refused(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    staged_before = listing(built.path / "staging")
    lamp = tmp_path / "lamp.bin"
    lamp.write_bytes(app_image(BETA, "9.0.0"))
    line = assert_error(run("repo", "add", built.path, lamp, "--role", "acme", *k(key_path(ACME.key_file))), 1,
                        "outside role acme's scope", "nothing written")
    assert BETA.path("x").split("/")[0] in line
    # The other team's key cannot sign for acme either.
    thermo = tmp_path / "thermo.bin"
    thermo.write_bytes(app_image(ACME, "9.0.0"))
    assert_error(run("repo", "add", built.path, thermo, "--role", "acme", *k(key_path(BETA.key_file))), 2,
                 "not a key of acme")
    assert_error(run("repo", "add", built.path, thermo, "--role", "nobody", *k(key_path(ACME.key_file))), 2,
                 "nobody: no such role")
    assert listing(built.path / "staging") == staged_before


def _image(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_unsigned_unparsable_and_idless_images_are_refused(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    team_key = k(key_path(ACME.key_file))
    body = bytes(HEADER_ROOM) + b"payload" * 32
    unsigned = build_image(body, [], SignOptions(ImageVersion.parse("1.0.0"), vendor_id=ACME.vendor_id,
                                                 class_id=ACME.class_id))
    no_ids = build_image(body, signing_key(IMAGE_KEY), SignOptions(ImageVersion.parse("1.0.0")))
    cases = [("unsigned.bin", unsigned, "unsigned: sign it first"),
             ("garbage.bin", b"\x00" * 600, "garbage.bin"),
             ("no-ids.bin", no_ids, "no vendor and class ids")]
    for name, data, fragment in cases:
        assert_error(run("repo", "add", built.path, _image(tmp_path, name, data), "--role", "acme", *team_key),
                     1, fragment)
    # Signed, but not by the key the devices trust.
    other = _image(tmp_path, "other-key.bin", app_image(ACME, "3.0.0", key=signing_key("TEST-ONLY-rsa3072.pem")))
    assert_error(run("repo", "add", built.path, other, "--role", "acme", "--expect-key",
                     key_path(IMAGE_KEY), *team_key), 1, "other-key.bin")
    # The same name with other bytes: a new build takes a new name.
    again = _image(tmp_path, "app-1.1.0.bin", app_image(ACME, "1.1.0", counter=7))
    assert_error(run("repo", "add", built.path, again, "--role", "acme", *team_key), 1, "already listed with other bytes")
    assert_error(run("repo", "add", built.path, again, "--name", ".hidden", "--role", "acme", *team_key), 1,
                 "bad target name")
    assert not listing(built.path / "staging")


# --- rotation ---------------------------------------------------------------------------------


def test_a_client_bootstrapped_with_root_v1_follows_a_timestamp_key_rotation(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    cache = tmp_path / "cache"
    path = built.target_path("acme", "app-1.1.0.bin")
    assert client_sees(built.public, built.root_v1, cache, [path])[path] is not None
    new_ts = new_key(tmp_path, "timestamp-2")
    old_id = load_public_key(TSK).keyhash().hex()[:12]  # named by its mpboot key hash
    out = assert_ok(run("repo", "rotate", built.path, "timestamp", "--add", new_ts, "--remove", old_id,
                        *k(A))).stdout
    assert "staged root version 2: signed by previous root's keys 1 of 2, new root's keys 1 of 2" in out
    # One root key is not enough: publish keeps root v1 live (and the old timestamp key).
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert not (built.public / "metadata" / "2.root.json").exists()
    assert_ok(run("repo", "sign", built.path, "root", *k(B)))
    assert_error(run("repo", "publish", built.path, *k(SK, TSK)), 2, "not a key of snapshot or timestamp")
    assert_ok(run("repo", "publish", built.path, *k(SK, new_ts)))
    assert (built.public / "metadata" / "2.root.json").is_file()
    # The client that knew root v1 (and the fresh one bootstrapped with it) walk to v2.
    assert client_sees(built.public, built.root_v1, cache, [path])[path] is not None
    assert client_sees(built.public, built.root_v1, tmp_path / "fresh", [path])[path] is not None
    assert (cache / "metadata" / "root_history" / "2.root.json").is_file() or \
        json.loads((cache / "metadata" / "root.json").read_bytes())["signed"]["version"] == 2
    assert_error(run("repo", "publish", built.path, "--timestamp-only", *k(TSK)), 2, "not a key of timestamp")
    assert_ok(run("repo", "publish", built.path, "--timestamp-only", *k(new_ts)))


def test_root_rotation_needs_the_previous_roots_threshold_and_the_new_ones(tmp_path: Path) -> None:
    from tuf.api.metadata import Metadata

    built = build_repo(tmp_path / "repo")
    x, y = new_key(tmp_path, "root-x"), new_key(tmp_path, "root-y")
    ids = {p: load_public_key(p).keyhash().hex()[:16] for p in (A, B)}
    out = assert_ok(run("repo", "rotate", built.path, "root", "--remove", ids[A], "--remove", ids[B],
                        "--add", x, "--add", y, *k(x, y))).stdout
    assert "previous root's keys 0 of 2, new root's keys 2 of 2" in out
    staged = Metadata.from_file(str(built.path / "staging" / "metadata" / "root.json"))
    v1 = Metadata.from_bytes(built.root_v1)
    result = staged.signed.get_root_verification_result(v1.signed, staged.signed_bytes, staged.signatures)
    assert result.second.verified and not result.first.verified and not result.verified
    assert "1 of 2" in assert_ok(run("repo", "sign", built.path, "root", *k(A))).stdout
    status = json.loads(assert_ok(run("repo", "status", built.path, "--json")).stdout)
    root = next(r for r in status["roles"] if r["role"] == "root")
    assert root["staged"] == {"version": 2, "ready": False, "targets": None,
                              "signatures": "previous root's keys 1 of 2, new root's keys 2 of 2"}
    assert "ready to publish" in assert_ok(run("repo", "sign", built.path, "root", *k(B))).stdout
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    path = built.target_path("beta", "lamp-2.0.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "cache", [path])[path] is not None
    # The removed root keys no longer sign a root.
    assert_error(run("repo", "sign", built.path, "root", *k(A)), 2, "not a key of root")


def test_a_rotation_that_clients_could_not_verify_is_not_published(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    new_targets = new_key(tmp_path, "targets-2")
    out = assert_ok(run("repo", "rotate", built.path, "targets", "--add", new_targets, "--remove",
                        load_public_key(TK).keyhash().hex()[:16], *k(A, B))).stdout
    assert "staged targets version 2: signed by 0 of 1, waiting for signatures" in out
    before = listing(built.public)
    assert_error(run("repo", "publish", built.path, *k(SK, TSK)), 2, "targets would not verify", "nothing written")
    assert listing(built.public) == before
    assert_ok(run("repo", "sign", built.path, "targets", *k(new_targets)))
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    path = built.target_path("acme", "app-1.0.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "cache", [path])[path] is not None


def test_sign_renews_a_role_and_a_teams_key_is_replaced(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    beta_key = key_path(BETA.key_file)
    out = assert_ok(run("repo", "sign", built.path, "beta", *k(beta_key))).stdout
    assert "renewing beta: version 2" in out and "staged beta version 2: signed by 1 of 1, ready to publish" in out
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert snapshot_meta(built.public)["beta"] == 2
    # The team's key replaced: targets delegates to the new key, and beta is signed again by it.
    new_beta = new_key(tmp_path, "beta-2")
    old = load_public_key(beta_key).keyhash().hex()[:16]
    out = assert_ok(run("repo", "rotate", built.path, "beta", "--add", new_beta, "--remove", old,
                        *k(TK, new_beta))).stdout
    assert "staged targets version 2: signed by 1 of 1, ready to publish" in out
    assert "staged beta version 3: signed by 1 of 1, ready to publish" in out
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert snapshot_meta(built.public) == {"timestamp": 3, "snapshot": 3, "targets": 2, "acme": 1, "beta": 3}
    path = built.target_path("beta", "lamp-2.0.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "cache", [path])[path] is not None
    lamp = _image(tmp_path, "lamp-2.1.0.bin", app_image(BETA, "2.1.0", counter=2))
    assert_error(run("repo", "add", built.path, lamp, "--role", "beta", *k(beta_key)), 2, "not a key of beta")


def test_targets_signed_ahead_by_its_new_key_goes_live_with_the_new_root(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    new_targets = new_key(tmp_path, "targets-3")
    out = assert_ok(run("repo", "rotate", built.path, "targets", "--add", new_targets, "--remove",
                        load_public_key(TK).keyhash().hex()[:16], *k(A, new_targets))).stdout
    assert "staged root version 2: signed by previous root's keys 1 of 2, new root's keys 1 of 2" in out
    assert ("staged targets version 2: signed by 1 of 1, goes live with root version 2, which waits for "
            "signatures") in out
    published = assert_ok(run("repo", "publish", built.path, *k(SK, TSK))).stdout  # neither is ready
    assert "published root" not in published and "published targets" not in published
    assert_ok(run("repo", "sign", built.path, "root", *k(C)))
    published = assert_ok(run("repo", "publish", built.path, *k(SK, TSK))).stdout
    assert "published root version 2" in published and "published targets version 2" in published
    assert snapshot_meta(built.public)["targets"] == 2
    path = built.target_path("acme", "app-1.1.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "cache", [path])[path] is not None
    # The old targets key signs nothing any more.
    assert_error(run("repo", "sign", built.path, "targets", *k(TK)), 2, "not a key of targets")


def test_an_offline_root_key_signs_through_a_digest_on_another_machine(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    digest = tmp_path / "root.digest"
    out = assert_ok(run("repo", "sign", built.path, "root", "--digest-only", "-o", digest)).stdout
    assert "renewing root: version 2" in out and "signed by previous root's keys 0 of 2" in out
    assert len(digest.read_bytes()) == 32
    signatures = {}
    for key in (A, B):  # on the offline machine: openssl, with nothing but the key and the digest
        signatures[key] = tmp_path / f"{key.stem}.sig"
        openssl_sign(key, digest, signatures[key])
    # A signature over other bytes is refused: nothing added.
    other = tmp_path / "other.digest"
    other.write_bytes(bytes(32))
    openssl_sign(C, other, tmp_path / "other.sig")
    assert_error(run("repo", "sign", built.path, "root", "-k", C.with_name(C.stem + ".pub.pem"),
                     "--attach-signature", tmp_path / "other.sig"), 2, "not a signature of digest")
    log = tmp_path / "log.jsonl"
    out = assert_ok(run("repo", "sign", built.path, "root", "-k", A.with_name(A.stem + ".pub.pem"),
                        "--attach-signature", signatures[A], "--signing-log", log)).stdout
    assert "previous root's keys 1 of 2, new root's keys 1 of 2" in out
    # The digest is the same until the staged root changes.
    assert_ok(run("repo", "sign", built.path, "root", "--digest-only", "-o", tmp_path / "again.digest"))
    assert (tmp_path / "again.digest").read_bytes() == digest.read_bytes()
    out = assert_ok(run("repo", "sign", built.path, "root", "-k", B.with_name(B.stem + ".pub.pem"),
                        "--attach-signature", signatures[B], "--signing-log", log)).stdout
    assert "ready to publish" in out
    assert [json.loads(line)["signer"]["kind"] for line in log.read_text().splitlines()] == ["detached", "detached"]
    assert_ok(run("repo", "publish", built.path, *k(SK, TSK)))
    assert (built.public / "metadata" / "2.root.json").is_file()
    path = built.target_path("acme", "app-1.0.0.bin")
    assert client_sees(built.public, built.root_v1, tmp_path / "cache", [path])[path] is not None
    assert_error(run("repo", "sign", built.path, "root", "-k", A, "--attach-signature", signatures[A]), 2,
                 "nothing staged for root")


# --- status -----------------------------------------------------------------------------------


def test_status_shows_roles_keys_staged_changes_and_expiry_warnings(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import mpboot.repo.report as status_module
    from mpboot.repo.layout import now

    built = build_repo(tmp_path / "repo")
    built.add("acme", "app-1.2.0.bin", app_image(ACME, "1.2.0", counter=3))
    out = assert_ok(run("repo", "status", built.path)).stdout
    keyhash = load_public_key(key_path(ACME.key_file)).keyhash().hex()[:16]
    assert re.search(r"^acme: version 1, expires \S+ \(period 90d, threshold 1\)$", out, re.M)
    assert re.search(rf"^  key [0-9a-f]{{16}}  keyhash {keyhash}$", out, re.M)
    assert f"  paths {ACME.path('*')}" in out
    assert re.search(rf"^  target {re.escape(ACME.path('app-1.1.0.bin'))}  1.1.0  counter 2  app  \d+ bytes$", out, re.M)
    assert "  staged version 2: signed by 1 of 1, ready to publish" in out
    assert "warning" not in out
    assert_ok(run("repo", "status", built.path, "--check"))

    start = now()
    monkeypatch.setattr(status_module, "now", lambda: start + timedelta(hours=13))
    late = run("repo", "status", built.path, "--check")
    assert late.exit_code == 1
    assert re.search(r"^warning: timestamp version 1 expires in 1[01]h \d+m", late.stdout, re.M), late.stdout
    monkeypatch.setattr(status_module, "now", lambda: start + timedelta(days=2))
    expired = assert_ok(run("repo", "status", built.path)).stdout
    assert "timestamp: version 1, expires" in expired and "EXPIRED (period 1d" in expired
    assert re.search(r"^warning: timestamp version 1 EXPIRED at \S+: clients refuse it \(run mpboot repo publish\)$",
                     expired, re.M)
    assert "warning: snapshot" not in expired  # 5 days of its 7 left
    monkeypatch.setattr(status_module, "now", lambda: start + timedelta(days=6, hours=12))
    later = assert_ok(run("repo", "status", built.path)).stdout
    assert re.search(r"^warning: snapshot version 1 expires in 1[12]h \d+m", later, re.M), later
    report = json.loads(assert_ok(run("repo", "status", built.path, "--json")).stdout)
    assert {r["role"] for r in report["roles"]} == {"root", "targets", "snapshot", "timestamp", "acme", "beta"}
    assert any(f.endswith(".app-1.2.0.bin") for f in report["staged_files"])


def test_status_verify_runs_a_tuf_client_over_the_tree_on_disk(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    out = assert_ok(run("repo", "status", built.path, "--verify", "--check")).stdout
    assert "client check: root version 1, 3 listed image(s) found and verified" in out
    report = json.loads(assert_ok(run("repo", "status", built.path, "--verify", "--json")).stdout)
    assert report["client"] == {"root_version": 1, "targets": 3, "error": None}
    # A target file changed on disk (a bad copy, an intruder): a client refuses it, and so does --check.
    target = next(p for p in (built.public / "targets").rglob("*.lamp-2.0.0.bin"))
    data = target.read_bytes()
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    bad = run("repo", "status", built.path, "--verify", "--check")
    assert bad.exit_code == 1
    assert re.search(r"^warning: a client refuses public/: LengthOrHashMismatchError: ", bad.stdout, re.M), bad.stdout
    # Metadata signed by a key that is not the role's: refused too.
    target.unlink()
    built2 = build_repo(tmp_path / "repo2")
    ts = built2.public / "metadata" / "timestamp.json"
    doc = json.loads(ts.read_bytes())
    doc["signed"]["version"] += 1  # the signature no longer covers it
    ts.write_text(json.dumps(doc))
    report = json.loads(assert_ok(run("repo", "status", built2.path, "--verify", "--json")).stdout)
    assert report["client"]["error"].startswith("UnsignedMetadataError: timestamp was signed by 0/1 keys")


# --- keys on a token ----------------------------------------------------------------------------


def test_a_timestamp_key_on_a_softhsm_token_signs_what_clients_accept(tmp_path: Path) -> None:
    hsm = SoftHsm.create(tmp_path / "hsm")
    hsm.init_token("online")
    token_key = uri("online", "timestamp", pin_file=pin_file(tmp_path))
    env: dict[str, str | None] = {**hsm.env}
    pub = tmp_path / "timestamp.pub.pem"
    assert_ok(run("keygen", "--pkcs11", token_key, "-o", pub, env=env))
    log = tmp_path / "signing.jsonl"
    repo = tmp_path / "repo"
    assert_ok(run("repo", "init", repo, "--root-key", A, "--root-key", B, "--root-threshold", "2", "--targets-key",
                  TK, "--snapshot-key", SK, "--timestamp-key", token_key, *k(A, B, TK), "--signing-log", log,
                  env=env))
    assert_ok(delegate_cli(repo))
    image = _image(tmp_path, "app.bin", app_image(ACME, "1.0.0"))
    assert_ok(run("repo", "add", repo, image, "--role", "acme", *k(key_path(ACME.key_file))))
    assert_ok(run("repo", "publish", repo, "-k", SK, "-k", token_key, "--signing-log", log, env=env))
    path = ACME.path("app.bin")
    root = (repo / "public" / "metadata" / "1.root.json").read_bytes()
    assert client_sees(repo / "public", root, tmp_path / "cache", [path])[path] is not None
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    ts = [e for e in entries if e.get("role") == "timestamp"]
    assert len(ts) == 1 and ts[0]["what"] == "tuf metadata" and ts[0]["version"] == 1
    assert ts[0]["key_hash"] == load_public_key(pub).keyhash().hex()
    assert "pkcs11" in json.dumps(ts[0])
    assert {e["role"] for e in entries} == {"root", "targets", "snapshot", "timestamp"}
    assert_ok(run("repo", "publish", repo, "--timestamp-only", "-k", token_key, env=env))
    assert snapshot_meta(repo / "public")["timestamp"] == 2


# --- errors and help --------------------------------------------------------------------------


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    built = build_repo(tmp_path / "repo")
    assert_error(run("repo", "status", tmp_path), 2, "not an mpboot repository")
    assert_error(run("repo", "publish", built.path), 2, "give -k KEY")
    assert_error(run("repo", "publish", built.path, *k(SK, TSK, A)), 2, "not a key of snapshot or timestamp")
    assert_error(init_cli(built.path, A, B), 2, "already a repository")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_error(init_cli(tmp_path / "full", A, B), 2, "not empty")
    assert_error(run("repo", "init", tmp_path / "new", "--root-key", A, "--root-key", B, "--root-threshold", "3",
                     "--targets-key", TK, "--snapshot-key", SK, "--timestamp-key", TSK), 2,
                 "root threshold 3 with 2 keys")
    assert_error(init_cli(tmp_path / "new", A, extra=("--expires", "timestamp=1w")), 2, "bad timestamp expiry")
    assert_error(delegate_cli(built.path), 2, "acme: already delegated")
    assert_error(run("repo", "delegate", built.path, "Bad/Name", "--vendor-id", "x", "--class-id", "y",
                     "--role-key", TK, "--threshold", "1", *k(TK)), 2, "bad role name")
    assert_error(run("repo", "sign", built.path, "timestamp", *k(TSK)), 2, "signed by mpboot repo publish")
    assert_error(run("repo", "rotate", built.path, "timestamp", "--remove", "abc", *k(A, B)), 2, "8 digits or more")
    assert_error(run("repo", "rotate", built.path, "root", "--threshold", "1", *k(A, B)), 2, "root threshold 1")
    assert not (tmp_path / "new").exists()
    # Hand-edited metadata is one line, not a traceback.
    staged = built.path / "staging" / "metadata" / "acme.json"
    staged.write_bytes((built.public / "metadata" / "1.root.json").read_bytes())
    assert_error(run("repo", "status", built.path), 2, "root metadata where acme belongs")
    staged.write_text("{not json")
    assert_error(run("repo", "add", built.path, _image(tmp_path, "a.bin", app_image(ACME, "5.0.0")), "--role", "acme",
                     *k(key_path(ACME.key_file))), 2, "acme.json: not TUF metadata")


def test_one_writer_at_a_time_and_expiry_periods_from_init(tmp_path: Path) -> None:
    import fcntl
    import os

    from tuf.api.metadata import Metadata

    from mpboot.repo.layout import now

    repo = tmp_path / "repo"
    assert_ok(init_cli(repo, A, B, TK, extra=("--expires", "timestamp=6h", "--expires", "snapshot=2d")))
    before_publish = now()
    assert_ok(run("repo", "publish", repo, *k(SK, TSK)))
    after_publish = now()
    ts = Metadata.from_file(str(repo / "public" / "metadata" / "timestamp.json")).signed
    snap = Metadata.from_file(str(repo / "public" / "metadata" / "1.snapshot.json")).signed
    assert before_publish + timedelta(hours=6) <= ts.expires <= after_publish + timedelta(hours=6)
    assert before_publish + timedelta(days=2) <= snap.expires <= after_publish + timedelta(days=2)
    fd = os.open(repo / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another repo command is writing
        before = listing(repo)
        assert_error(run("repo", "publish", repo, *k(SK, TSK)), 2, "another mpboot repo command is writing it")
        assert listing(repo) == before
        assert_ok(run("repo", "status", repo))  # reading needs no lock
    finally:
        os.close(fd)
    assert_ok(run("repo", "publish", repo, *k(SK, TSK)))


@pytest.mark.parametrize("command", ["", "init", "delegate", "add", "remove", "sign", "rotate", "publish", "status"])
def test_help(command: str) -> None:
    result = assert_ok(run("repo", *([command] if command else []), "--help"))
    assert "Usage: mpboot repo" in result.stdout
    if command:
        assert "Exit status" in result.stdout


def test_expiry_periods_are_bounded_in_the_settings_file_and_on_the_command_line(tmp_path: Path) -> None:
    """An expiry period is at most 10 years (MAX_PERIOD), whether from mpboot-repo.json
    (hand-edited: a huge number is one line and exit 2, not an internal error) or --expires."""
    from mpboot.repo.layout import MAX_PERIOD

    built = build_repo(tmp_path / "repo")
    config = built.path / "mpboot-repo.json"
    good = json.loads(config.read_bytes())
    days = MAX_PERIOD.days
    for role, value, fragment in (("root", 99999999999999, "longer than"), ("timestamp", 1e300, "longer than"),
                                  ("snapshot", (days + 1) * 86400, f"longer than {days}d"),
                                  ("targets", float("inf"), "mpboot-repo.json")):
        doc = json.loads(json.dumps(good))
        doc["expires_s"][role] = value
        config.write_text(json.dumps(doc))
        for command in (("status", built.path), ("publish", built.path, *k(SK, TSK))):
            assert_error(run("repo", *command), 2, "mpboot-repo.json", fragment)
    doc = json.loads(json.dumps(good))
    doc["roles"]["acme"] = {"expires_s": 10**20}
    config.write_text(json.dumps(doc))
    assert_error(run("repo", "status", built.path), 2, "mpboot-repo.json", "longer than")
    doc["roles"]["acme"] = {"expires_s": days * 86400}  # the bound itself
    config.write_text(json.dumps(doc))
    assert_ok(run("repo", "status", built.path))
    # on the command line
    for period in (f"{days + 1}d", f"{days * 24 + 1}h", "999999d"):
        assert_error(init_cli(tmp_path / "new", A, extra=("--expires", f"root={period}")), 2,
                     f"bad root expiry '{period}'", f"at most {days}d")
        assert_error(run("repo", "delegate", built.path, "gamma", "--vendor-id", "g", "--class-id", "g",
                         "--role-key", TK, "--threshold", "1", "--expires", period, *k(TK)), 2,
                     f"bad --expires '{period}'", f"at most {days}d")
    assert not (tmp_path / "new").exists()
    assert_ok(init_cli(tmp_path / "new", A, extra=("--expires", f"root={days}d")))


def test_a_publish_that_dies_between_a_new_root_and_the_timestamp_is_recovered_by_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A root rotation that changes the snapshot key, and publish dying after writing the new
    root (disk full as the snapshot is written): stations walk to the new root and refuse the
    old snapshot (fail closed: the window of THREAT_MODEL "TUF repository"). The next
    publish recovers: status still works, and publish again makes the repository whole."""
    from tuf.api.exceptions import UnsignedMetadataError

    from mpboot.repo.layout import RepoDir

    built = build_repo(tmp_path / "repo")
    path = built.target_path("acme", "app-1.1.0.bin")
    cache = tmp_path / "cache"
    assert client_sees(built.public, built.root_v1, cache, [path])[path] is not None
    new_sk = new_key(tmp_path, "snapshot-2")
    old_id = load_public_key(SK).keyhash().hex()[:12]
    assert_ok(run("repo", "rotate", built.path, "snapshot", "--add", new_sk, "--remove", old_id, *k(A, B)))
    write_public = RepoDir.write_public

    def disk_full(self: RepoDir, where: Path, data: bytes, *, replace: bool = False) -> None:
        if where.name.endswith(".snapshot.json"):
            raise OSError(28, "No space left on device")
        write_public(self, where, data, replace=replace)

    monkeypatch.setattr(RepoDir, "write_public", disk_full)
    assert_error(run("repo", "publish", built.path, *k(new_sk, TSK)), 2, "No space left on device")
    monkeypatch.setattr(RepoDir, "write_public", write_public)
    assert (built.public / "metadata" / "2.root.json").is_file()
    with pytest.raises(UnsignedMetadataError):  # the window, held open: fail closed
        client_sees(built.public, built.root_v1, cache, [path])
    out = assert_ok(run("repo", "status", built.path)).stdout
    assert "root: version 2" in out, out
    out = assert_ok(run("repo", "publish", built.path, *k(new_sk, TSK))).stdout
    assert "published snapshot version 2 and timestamp version 2" in out, out
    assert not (built.path / "staging" / "metadata" / "root.json").exists()
    assert client_sees(built.public, built.root_v1, cache, [path])[path] is not None
    assert client_sees(built.public, built.root_v1, tmp_path / "fresh", [path])[path] is not None
