"""A real PostgreSQL 15 for the store's tests: Debian's postgresql-15 (`make test`'s bootstrap
installs it), a new cluster in a temporary directory, reachable only through a unix socket in that
directory (no TCP port), run as an unprivileged user when the suite runs as root (PostgreSQL
refuses to run as root), and stopped, its directory removed, when the run ends. tests/conftest.py
starts one per pytest-xdist worker (``postgres_server``) and each test gets its own database."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Any

PG_BIN = Path(os.environ.get("EDGESMITH_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
RUN_AS = "nobody"  # the unprivileged user the server runs as when the suite runs as root
SUPERUSER = "edgesmith"
PREFIX = "edgesmith-pg-"


def reap_orphans() -> None:
    """Stop and remove the servers of earlier runs whose pytest process is gone (killed before its
    session teardown, e.g. by `timeout`): each directory names the process that started it."""
    for directory in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((directory / "owner").read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or being created
        if _alive(owner):
            continue  # its run is still going
        server = PostgresServer()
        server.dir = directory
        if (directory / "data" / "postmaster.pid").is_file():
            user = directory.stat()
            if os.geteuid() == 0 and user.st_uid != 0:
                server._as = {"user": user.st_uid, "group": user.st_gid, "extra_groups": []}
            subprocess.run([str(server.bin_dir / "pg_ctl"), "-D", str(directory / "data"), "-m", "immediate", "-w",
                            "stop"], capture_output=True, timeout=60, cwd=directory, **server._as)
        shutil.rmtree(directory, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:  # the state follows the command's closing parenthesis; a zombie (Z) has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class PostgresServer:
    def __init__(self, bin_dir: Path = PG_BIN):
        self.bin_dir = bin_dir
        self.dir: Path | None = None
        self._as: dict[str, Any] = {}  # subprocess's user/group, when switching from root

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None
        return self.dir / "sock"

    def start(self) -> PostgresServer:
        missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if not (self.bin_dir / tool).is_file()]
        assert not missing, (f"PostgreSQL 15 is not installed ({', '.join(missing)} missing in {self.bin_dir}); "
                             "`make bootstrap` installs Debian's postgresql-15")
        reap_orphans()
        # In /tmp, not under pytest's temporary root: that one is private to root, and the server's user
        # must reach its directory. The socket path must stay short (its limit is 107 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.dir / "owner").write_text(str(os.getpid()))
        self.socket_dir.mkdir()
        if os.geteuid() == 0:
            user = pwd.getpwnam(RUN_AS)
            for path in (self.dir, self.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
            self._as = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        try:
            self._run("initdb", "-D", str(self.dir / "data"), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
                      "--locale=C", "--no-sync")
            # fsync off: a test cluster is thrown away, and nothing here measures durability.
            options = f"-k {self.socket_dir} -h '' -F -c max_connections=200 -c shared_buffers=32MB"
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o", options,
                      "-w", "-t", "60", "start")
        except BaseException:
            self.stop()
            raise
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@/{database}?host={self.socket_dir}"

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        name = f"store_{uuid.uuid4().hex[:12]}"
        self._admin(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        self._admin(f"DROP DATABASE {make_url(url).database} WITH (FORCE)")

    def stop(self) -> None:
        if self.dir is None:
            return
        if (self.dir / "data" / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def log_text(self) -> str:
        log = self.dir / "server.log" if self.dir else None
        return log.read_text(errors="replace") if log and log.is_file() else ""

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=str(self.socket_dir), user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run([str(self.bin_dir / tool), *args], capture_output=True, text=True, timeout=120,
                                cwd=self.dir, **self._as)
        assert result.returncode == 0, (f"{tool} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
                                        f"{self.log_text()[-3000:]}")
