"""Fleet distribution end to end (issue 20): a repository made by `mpboot repo` (the real
library and CLI), served by an HTTP server on 127.0.0.1, read by `mpboot sync --repo URL`, which
updates simulated devices over SMP over UDP."""

from __future__ import annotations

from pathlib import Path

from clikit import describe, run
from mpboot.keys import load_public_key
from repokit import IMAGE_KEY, TEAMS, TIMESTAMP_KEY, SNAPSHOT_KEY, app_image, build_repo, key_path, serve
from simkit import make_app
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
