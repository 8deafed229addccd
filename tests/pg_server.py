"""A throw-away PostgreSQL server for tests: its own data folder, loopback TCP only, stopped afterwards.

The server binaries come from the system (Debian's ``postgresql`` package puts them under
``/usr/lib/postgresql/<major>/bin``, off ``PATH``). PostgreSQL refuses to run as root, so as
root the server runs as an unprivileged user (``postgres`` by default) through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SERVER_USER = "postgres"  # the unprivileged account Debian's package creates
DATABASE = "kvcomp"


class PostgresUnavailable(RuntimeError):
    """The server binaries, or an account that may run them, are missing."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: ``url(driver)`` gives a SQLAlchemy URL to its database."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"


def find_bin_dir() -> Path:
    """The folder with ``initdb`` and ``pg_ctl`` (``PATH`` first, then Debian's versioned folders, newest first)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True
    )
    for initdb in candidates:
        if (Path(initdb).parent / "pg_ctl").is_file():
            return Path(initdb).parent
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found; install them with `apt-get install postgresql` "
        "(.ci/run does this where it can)"
    )


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_server(timeout_s: int = 60) -> Iterator[PostgresServer]:
    """Start a fresh server in a temporary folder, yield it, then stop it and delete the folder.

    It listens on 127.0.0.1 only, on a free port, with its unix socket inside the temporary
    folder; the one role authenticates with a random password (scram-sha-256).
    """
    bin_dir = find_bin_dir()
    as_root = os.geteuid() == 0
    if as_root:
        try:
            account = pwd.getpwnam(SERVER_USER)
        except KeyError as exc:
            raise PostgresUnavailable(f"running as root and no {SERVER_USER!r} account to run PostgreSQL as") from exc
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root and `runuser` is missing")

    def run(cmd: Sequence[str]) -> None:
        # initdb and the server refuse root; run them as the unprivileged account.
        full = ["runuser", "-u", SERVER_USER, "--", *cmd] if as_root else list(cmd)
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(full)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    # Under /tmp (not pytest's 0700 tmp folders) so the unprivileged account can reach it.
    root = Path(tempfile.mkdtemp(prefix="kvcomp-pg-"))
    data, sockets, log = root / "data", root / "sock", root / "server.log"
    sockets.mkdir()
    password = secrets.token_hex(16)
    (root / "pwfile").write_text(password + "\n")
    if as_root:
        for path in (root, sockets, root / "pwfile"):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = _free_loopback_port()
    started = False
    try:
        run([
            str(bin_dir / "initdb"), "-D", str(data), "-U", "kvcomp", "--pwfile", str(root / "pwfile"),
            "--auth", "scram-sha-256", "-E", "UTF8", "--no-sync", "--no-instructions",
        ])
        # Throw-away data: fsync off keeps the test fast; the server never leaves loopback.
        options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={sockets} -c fsync=off"
        run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", str(timeout_s), "start"])
        started = True
        server = PostgresServer("127.0.0.1", port, "kvcomp", password, DATABASE)
        import psycopg

        with psycopg.connect(
            host=server.host, port=port, user=server.user, password=password, dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        yield server
    finally:
        if started:
            run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        shutil.rmtree(root, ignore_errors=True)
