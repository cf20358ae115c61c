"""A throwaway PostgreSQL server for tests, from the machine's PostgreSQL binaries (Debian's
postgresql package: /usr/lib/postgresql/*/bin, or initdb/postgres on PATH).

    server = start_server()          # None when no PostgreSQL binaries are installed
    url = server.create_schema("t1")   # or create_database("t1")
    ...
    server.stop()

Each server has its own temporary directory (data, unix socket, log) and its own free TCP port
on 127.0.0.1, so several test processes (pytest-xdist workers) can each run one at once. Trust
authentication, user `postgres`; durability off (fsync) for speed. initdb and postgres refuse
to run as root: as root the server runs as `nobody` (setpriv), in a directory it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT = 60.0  # seconds for initdb + the server to accept connections
STOP_TIMEOUT = 30.0
UNPRIVILEGED_USER = "nobody"


def find_bindir() -> Path | None:
    """The directory with initdb and postgres, or None when PostgreSQL is not installed.
    Debian keeps the server binaries out of PATH (/usr/lib/postgresql/VERSION/bin); the newest
    version wins."""
    initdb = shutil.which("initdb")
    if initdb is not None:
        bindir = Path(os.path.realpath(initdb)).parent
        if (bindir / "postgres").exists():
            return bindir

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        bindir = Path(candidate)
        if (bindir / "initdb").exists() and (bindir / "postgres").exists():
            return bindir
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerError(RuntimeError):
    pass


@dataclass
class PgServer:
    bindir: Path
    base: Path  # temporary directory: data/, sock/, server.log
    port: int
    process: subprocess.Popen[bytes]

    @property
    def socket_dir(self) -> Path:
        return self.base / "sock"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def log(self) -> str:
        try:
            return (self.base / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL. (A quarter of a second: see create_schema.)"""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def create_schema(self, name: str, dbname: str = "postgres") -> str:
        """A new empty schema; returns a URL whose connections use it alone (search_path), so
        that it works as a new database does, in milliseconds."""
        import psycopg

        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')
        return f"{self.url(dbname)}?options=-csearch_path%3D{name}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then the directory is removed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.base, ignore_errors=True)


def _as_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix to run initdb and the server unprivileged, and the uid/gid to own
    their files. With setpriv the server also gets a fast shutdown (SIGINT) when the test
    process dies without stopping it (killed by a timeout, say): no server is left behind."""
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig=INT"] if setpriv is not None else []
    if os.geteuid() != 0:
        return prefix, None, None
    if setpriv is None:
        raise ServerError("running as root, and setpriv (util-linux) is missing to start "
                          "PostgreSQL as an unprivileged user")
    pw = pwd.getpwnam(UNPRIVILEGED_USER)
    return ([*prefix, f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"],
            pw.pw_uid, pw.pw_gid)


def start_server(bindir: Path | None = None, tries: int = 3) -> PgServer | None:
    """A running server, or None when no PostgreSQL binaries are installed. ServerError when
    they are installed but the server does not start (with its log)."""
    bindir = bindir or find_bindir()
    if bindir is None:
        return None
    prefix, uid, gid = _as_user()
    # Not under pytest's tmp_path: that is private to root (0700), and the server runs as nobody.
    base = Path(tempfile.mkdtemp(prefix="mpboot-pg-"))
    try:
        for sub in ("data", "sock"):
            (base / sub).mkdir()
        (base / "server.log").touch()
        if uid is not None and gid is not None:
            for path in (base, base / "data", base / "sock", base / "server.log"):
                os.chown(path, uid, gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "TZ": "UTC"}
        env.pop("PGDATA", None)
        initdb = subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(base / "data"), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"],
            cwd=base, env=env, capture_output=True, timeout=START_TIMEOUT, check=False)
        if initdb.returncode != 0:
            raise ServerError(f"initdb failed ({initdb.returncode}): "
                              f"{initdb.stderr.decode(errors='replace').strip()}")
        last = ""
        for _ in range(tries):  # a free port can be taken by another process before we bind it
            port = _free_port()
            with open(base / "server.log", "ab") as log:
                process = subprocess.Popen(
                    [*prefix, str(bindir / "postgres"), "-D", str(base / "data"),
                     "-k", str(base / "sock"), "-h", "127.0.0.1", "-p", str(port),
                     "-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off", "-c", "max_connections=100",
                     "-c", "shared_buffers=16MB", "-c", "logging_collector=off"],
                    cwd=base, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)
            server = PgServer(bindir, base, port, process)
            if _wait_ready(server):
                return server
            server_log = server.log()
            if process.poll() is None:
                process.kill()
                process.wait()
            last = server_log.strip().splitlines()[-1] if server_log.strip() else "no log"
        raise ServerError(f"PostgreSQL did not start ({last}); log in {base / 'server.log'}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


def _wait_ready(server: PgServer) -> bool:
    """Polls until the server accepts connections (True) or exits / the deadline passes."""
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            with psycopg.connect(server.url(), connect_timeout=5):
                return True
        except psycopg.OperationalError:
            time.sleep(0.05)  # polling interval while the server starts, not synchronisation
    return False
