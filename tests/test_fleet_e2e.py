"""Fleet distribution end to end (issue 20): a repository made by `mpboot repo` (the real
library and CLI), served by an HTTP server on 127.0.0.1, read by `mpboot sync --repo URL`, which
updates simulated devices over SMP over UDP; and the same tree with a channel record beside the
image (`mpboot channel sign --repo`), which a simulated device pulls by itself (mpboot.pull)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from clikit import assert_ok, describe, run
from mpboot.keys import load_public_key
from mpboot.pack import pack_app
from mpboot.repo.images import uuid_text
from mpboot.sim import Geometry, SimDevice
from repokit import IMAGE_KEY, TEAMS, TIMESTAMP_KEY, SNAPSHOT_KEY, QuietHandler, app_image, build_repo, key_path, serve
from simkit import boot, make_app
from udpkit import SimUdp, free_udp_port

SERVING = r"serving SMP over UDP"


def test_mpboot_repo_to_sync_over_udp(tmp_path: Path) -> None:
    """`mpboot repo add` + `publish` put 1.1.0 beside 1.0.0; one station pass brings the blank
    acme device to 1.1.0, the newest, and leaves the beta device (another vendor) alone: no-image."""
    acme, beta = TEAMS
    app = make_app(tmp_path / "app", "fleet", confirm=True)
    built = build_repo(tmp_path / "repo", apps={acme.role: [("app-1.0.0.bin", app_image(acme, "1.0.0", payload=app))],
                                                beta.role: []})
    new = tmp_path / "app-1.1.0.bin"
    new.write_bytes(app_image(acme, "1.1.0", counter=2, payload=app))
    signlog = ["--signing-log", str(tmp_path / "signing.jsonl")]
    r = run("repo", "add", built.path, new, "--role", acme.role, "-k", key_path(acme.key_file), *signlog)
    assert r.exit_code == 0, describe(r)
    r = run("repo", "publish", built.path, "-k", key_path(SNAPSHOT_KEY), "-k", key_path(TIMESTAMP_KEY), *signlog)
    assert r.exit_code == 0, describe(r)
    root = tmp_path / "root.json"
    root.write_bytes(built.root_v1)
    keys = [load_public_key(key_path(IMAGE_KEY))]
    pa, pb = free_udp_port(), free_udp_port()
    with serve(built.public) as url, \
            SimUdp(tmp_path / "a", keys, pa, vendor_id=acme.vendor_id, class_id=acme.class_id) as a, \
            SimUdp(tmp_path / "b", keys, pb, vendor_id=beta.vendor_id, class_id=beta.class_id) as b:
        a.wait_for(SERVING)
        b.wait_for(SERVING)
        r = run("sync", "--repo", url, "--root", root, "--cache", tmp_path / "cache", "--seconds", "1",
                "--udp", f"127.0.0.1:{pa}", "--udp", f"127.0.0.1:{pb}")
        assert r.exit_code == 0, describe(r)
        assert f"sync: 127.0.0.1:{pa}: nothing -> 1.1.0 (app-1.1.0.bin)" in r.stdout, describe(r)
        assert f"sync: 127.0.0.1:{pa}: updated" in r.stdout, describe(r)
        assert f"sync: 127.0.0.1:{pb}: no-image" in r.stdout, describe(r)
        a.wait_for(r"APP fleet")


PULL_APP = """import mpboot
print('APP {name}')
print('CONFIRM', mpboot.confirm())
try:
    f = open({ctl!r})
    url = f.read().strip()
    f.close()
except OSError:
    url = None
if url:
    try:
        print('PULLED', mpboot.pull(url, timeout_ms=3000, deadline_ms=20000))
    except Exception as e:
        print('PULLERR', e.args)
"""


def _pull_app(folder: Path, name: str, ctl: Path) -> bytes:
    folder.mkdir(parents=True)
    (folder / "main.py").write_text(PULL_APP.format(name=name, ctl=str(ctl)))
    (folder / "filler.bin").write_bytes(name.encode() * 4000)  # a few sectors
    return pack_app(folder)


def test_mpboot_repo_channel_record_pulled_by_a_device(tmp_path: Path, sim_lib: Path) -> None:
    """A release manager publishes 2.0.0 with `mpboot repo add` + `publish`, then its channel
    record beside it with `mpboot channel sign --repo`; public/ is served as is. The acme
    device's app pulls BASE/targets/VID/CID/stable.cbor (mpboot.pull, on the unix port), the
    image comes from the record's relative path (the consistent-snapshot file), and the next
    boot test-boots 2.0.0, which confirms itself: the pull then finds it current."""
    acme, _ = TEAMS
    ctl = tmp_path / "pull.ctl"
    v1 = app_image(acme, "1.0.0", payload=_pull_app(tmp_path / "v1", "v1", ctl))
    built = build_repo(tmp_path / "repo", apps={acme.role: [("app-1.0.0.bin", v1)]})
    new = tmp_path / "app-2.0.0.bin"
    new.write_bytes(app_image(acme, "2.0.0", counter=2, payload=_pull_app(tmp_path / "v2", "v2", ctl)))
    signlog = ["--signing-log", str(tmp_path / "signing.jsonl")]
    assert_ok(run("repo", "add", built.path, new, "--role", acme.role, "-k", key_path(acme.key_file), *signlog))
    assert_ok(run("repo", "publish", built.path, "-k", key_path(SNAPSHOT_KEY), "-k", key_path(TIMESTAMP_KEY),
                  *signlog))
    # The devices' root key signs the record (a root threshold of 1 on the simulated board).
    out = assert_ok(run("channel", "sign", new, "--repo", built.path, "-k", key_path(IMAGE_KEY), *signlog)).stdout
    where = re.search(r"devices pull BASE/(\S+)", out)
    assert where is not None, out
    assert where.group(1) == f"targets/{uuid_text(acme.vendor_id)}/{uuid_text(acme.class_id)}/stable.cbor"
    # The TUF side does not mind the record beside its targets (stations still verify all).
    assert "2 listed image(s) found and verified" in assert_ok(run("repo", "status", built.path, "--check",
                                                                   "--verify")).stdout

    dev = SimDevice(tmp_path / "dev", sim_lib, Geometry.for_slots(64 * 1024), vendor_id=acme.vendor_id,
                    class_id=acme.class_id)
    (tmp_path / "v1.bin").write_bytes(v1)
    dev.install(tmp_path / "v1.bin", "permanent", chunk=4096)
    b = boot(dev)
    assert (b.slot, b.version) == (0, "1.0.0")
    requests: list[str] = []

    class Logged(QuietHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            requests.append(self.path)
            super().do_GET()

    with serve(built.public, Logged) as base:
        ctl.write_text(f"{base}/{where.group(1)}\n")
        first = dev.boot().stdout
        assert "APP v1" in first and "PULLED 3" in first, first  # INSTALLED, marked for a test boot
        digest = hashlib.sha256(new.read_bytes()).hexdigest()
        assert requests == [f"/{where.group(1)}", f"/{where.group(1).rsplit('/', 1)[0]}/{digest}.app-2.0.0.bin"]
        second = dev.boot().stdout
        assert "mpboot: slot 1 version 2.0.0+0 test boot" in second and "APP v2" in second, second
        assert "PULLED 0" in second, second  # CURRENT: nothing fetched but the record
        assert len(requests) == 3
    ctl.unlink()
    b = boot(dev)
    assert (b.slot, b.version, b.trial) == (1, "2.0.0", False)
