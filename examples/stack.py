"""The production shape on one machine: nginx (HTTP/2 over TLS) in front of two streamer
nodes and the SvelteKit app, each a process of its own; the two nodes are one fleet through
a Redis of the stack's own (STREAMER_BROKER_URL): one of them reads the database's changes,
both receive them through Redis.

`make example` runs `main()`: a database (the embedded Postgres, or DATABASE_URL), the
broker, two nodes, the app, nginx and the simulated file processor for a demo user, until
Ctrl-C or SIGTERM. tests/test_production_shape.py starts the same `Stack` on free ports.

nginx runs deploy/nginx.conf itself, included from a small main file that keeps its pid,
logs and temporary files in the stack's own directory (never the system service's). Redis
(Debian's redis-server, never the system service) persists nothing and keeps its files in
that directory too.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
SITE = ROOT / "deploy" / "nginx.conf"
APP = ROOT / "examples" / "sveltekit"
APP_SERVER = APP / "build" / "index.js"
NGINX = Path("/usr/sbin/nginx")
REDIS = Path("/usr/bin/redis-server")
START_SECONDS = 60.0  # a cold Python start and the LISTEN connection, on a busy CI box
STOP_SECONDS = 10.0

# nginx as an unprivileged foreground process: everything it writes stays under its prefix.
NGINX_MAIN = """\
# Written by examples/stack.py. The site is streamer.conf: deploy/nginx.conf.
daemon off;
worker_processes 2;
pid nginx.pid;
error_log stderr warn;
{user}
events {{
    worker_connections 1024;
}}

http {{
    log_format upstream '$time_iso8601 "$request_method $uri" $status $server_protocol '
                        'upstream=$upstream_addr seconds=$request_time';
    access_log access.log upstream;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    include streamer.conf;
}}
"""


class StackError(Exception):
    """A part of the stack could not start; the message says which and why."""


@dataclass(frozen=True)
class Ports:
    """Where each part listens: deploy/nginx.conf's own ports by default, and the broker's
    (not Redis's default 6379, which a Redis of the machine's may hold)."""

    https: int = 8443
    nodes: tuple[int, int] = (8081, 8082)
    app: int = 3000
    broker: int = 6380

    @classmethod
    def free(cls) -> Ports:
        """Five ports nothing listens on now, all different (held open together)."""
        with contextlib.ExitStack() as held:
            sockets = [held.enter_context(socket.socket()) for _ in range(5)]
            for s in sockets:
                s.bind(("127.0.0.1", 0))
            https, node_a, node_b, app, broker = (s.getsockname()[1] for s in sockets)
        return cls(https, (node_a, node_b), app, broker)

    @property
    def all(self) -> tuple[int, ...]:
        """The ports deploy/nginx.conf names."""
        return (self.https, *self.nodes, self.app)


def port_is_taken(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_answers(port: int) -> bool:
    """PING, in Redis's inline protocol: +PONG once it is ready (loading or not yet
    listening: anything else)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def site_config(ports: Ports) -> str:
    """deploy/nginx.conf with its ports swapped for `ports` (each must appear once)."""
    text = SITE.read_text()
    default = Ports()
    for old, new in zip(default.all, ports.all, strict=True):
        address = f"127.0.0.1:{old}"
        if text.count(address) != 1:
            raise StackError(f"{SITE} must name {address} exactly once")
        text = text.replace(address, f"127.0.0.1:{new}")
    return text


def make_certificate(directory: Path) -> None:
    """A self-signed certificate for 127.0.0.1 and localhost, kept while it is valid (a
    browser's exception for it then lasts across runs)."""
    crt, key = directory / "streamer.crt", directory / "streamer.key"
    if crt.exists() and key.exists():
        valid = subprocess.run(
            ["openssl", "x509", "-checkend", "86400", "-noout", "-in", str(crt)],
            capture_output=True,
        )
        if valid.returncode == 0:
            return
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "365", "-subj", "/CN=streamer example",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(crt)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    command: list[str]
    env: Mapping[str, str]
    port: int | None = None  # where it serves, for a part that tend() restarts
    stopping: bool = False
    serving: bool = True  # False from a restart until its port opens

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def died(self) -> str:
        return f"{self.name} exited with {self.popen.returncode}; its log ({self.log}):\n" + (
            self.tail()
        )


@dataclass
class Stack:
    """A Redis, two streamer nodes (one fleet through it), the app and nginx, over
    `database_url`; files in `directory`."""

    directory: Path
    database_url: str
    jwt_secret: str
    ports: Ports = field(default_factory=Ports)
    node_env: Mapping[str, str] = field(default_factory=dict)  # e.g. STREAMER_RETRY_MS
    processes: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports.https}"

    def node_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.ports.nodes[index]}"

    @property
    def broker_url(self) -> str:
        return f"redis://127.0.0.1:{self.ports.broker}/0"

    @property
    def nodes(self) -> list[Process]:
        return [p for p in self.processes if p.name.startswith("streamer")]

    @property
    def broker(self) -> Process:
        return next(p for p in self.processes if p.name == "redis")

    def reading(self) -> list[Process]:
        """The nodes that say they read the database for the fleet (streamer_fleet_reader 1
        on their /metrics): one, but for a moment after the reader died (none yet)."""
        readers = []
        for index, node in enumerate(self.nodes):
            try:
                with urllib.request.urlopen(self.node_url(index) + "/metrics", timeout=2) as r:
                    metrics = r.read().decode()
            except (urllib.error.URLError, OSError):
                continue
            if re.search(r"^streamer_fleet_reader 1(\.0)?$", metrics, flags=re.MULTILINE):
                readers.append(node)
        return readers

    def start(self) -> None:
        """Start the broker, then every other part in parallel; return once each answers."""
        if not APP_SERVER.exists():
            raise StackError(f"{APP_SERVER} is missing: build the app with `make app`")
        if not NGINX.exists():
            raise StackError(f"{NGINX} is missing: install it with `make nginx-deps`")
        if not REDIS.exists():
            raise StackError(f"{REDIS} is missing: install it with `make broker-deps`")
        taken = [port for port in (*self.ports.all, self.ports.broker) if port_is_taken(port)]
        if taken:
            raise StackError(f"port {', '.join(map(str, taken))} is taken: is a stack running?")
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            # First (and so stopped last): a node does not start without its broker.
            self._start_broker()
            nodes = [
                self._spawn(
                    f"streamer-{'ab'[index]}",
                    [sys.executable, "-m", "streamer", "serve", "--no-migrate"],
                    {
                        **self.node_env,
                        "DATABASE_URL": self.database_url,
                        "STREAMER_JWT_SECRET": self.jwt_secret,
                        "STREAMER_BROKER_URL": self.broker_url,
                        "STREAMER_HOST": "127.0.0.1",
                        "STREAMER_PORT": str(port),
                    },
                    port,
                )
                for index, port in enumerate(self.ports.nodes)
            ]
            app = self._spawn(
                "app",
                ["node", str(APP_SERVER)],
                {
                    "HOST": "127.0.0.1",
                    "PORT": str(self.ports.app),
                    "ORIGIN": self.url,  # what the browser sees, for SvelteKit's CSRF check
                    "DEV_SIGNIN_LINKS": "1",
                },
            )
            nginx = self._start_nginx()
            for index, node in enumerate(nodes):
                self._wait_for(node, self.node_url(index) + "/readyz")
            self._wait_for(app, f"http://127.0.0.1:{self.ports.app}/signin")
            self._wait_for(nginx, self.url + "/signin")
        except BaseException:
            self.stop()
            raise

    def _start_broker(self) -> None:
        """Redis on the broker's port, persisting nothing (a restart loses every message and
        subscription: the nodes catch their streams up from the database), its log on
        stdout, into redis.log like the others'."""
        command = [
            str(REDIS),
            "--bind", "127.0.0.1",
            "--port", str(self.ports.broker),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", "",
            "--daemonize", "no",
        ]  # fmt: skip
        broker = self._spawn("redis", command, {}, self.ports.broker)
        self._wait_for_broker(broker)

    def _wait_for_broker(self, broker: Process) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not redis_answers(self.ports.broker):
            if broker.popen.poll() is not None:
                raise StackError(broker.died())
            if time.monotonic() > deadline:
                raise StackError(f"redis did not answer PING in {START_SECONDS:.0f} s")
            time.sleep(0.02)

    def _start_nginx(self) -> Process:
        tls = self.directory / "tls"
        make_certificate(tls)
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.directory / "tmp" / temp).mkdir(parents=True, exist_ok=True)
        # As root, nginx's workers drop to an unprivileged user (Debian has no group nobody).
        user = "user nobody nogroup;" if os.geteuid() == 0 else ""
        (self.directory / "nginx.conf").write_text(NGINX_MAIN.format(user=user))
        (self.directory / "streamer.conf").write_text(site_config(self.ports))
        prefix = f"{self.directory}/"
        command = [str(NGINX), "-e", "stderr", "-p", prefix, "-c", prefix + "nginx.conf"]
        return self._spawn("nginx", command, {})

    def _spawn(
        self, name: str, command: list[str], env: Mapping[str, str], port: int | None = None
    ) -> Process:
        log = self.directory / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own session: Ctrl-C reaches us alone, and we stop each part in order.
                start_new_session=True,
            )
        process = Process(name, popen, log, command, env, port)
        self.processes.append(process)
        return process

    def _wait_for(self, process: Process, url: str) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # our own self-signed certificate
        deadline = time.monotonic() + START_SECONDS
        while True:
            if process.popen.poll() is not None:
                raise StackError(process.died())
            try:
                with urllib.request.urlopen(url, timeout=2, context=context) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{process.name} did not answer {url} in {START_SECONDS:.0f} s")
            time.sleep(0.05)

    def tend(self) -> str | None:
        """Restart a streamer node or the broker that exited without being asked to (a
        `kill -9`, a crash), as systemd's `Restart=` would, on the same port: a node's tabs
        carry on through the other node meanwhile, and come back to it after; over a lost
        broker the tabs stay open, and catch up once it is back. Says so in one line; None if
        none did. One that dies again before it served is left to dead(), which stops the
        stack. A node waits for a restarted broker to serve (it does not start without)."""
        for index, process in enumerate(self.processes):
            if process.port is None or process.stopping:
                continue
            if process.popen.poll() is None:
                if not process.serving:  # it opens its port once it is ready
                    process.serving = port_is_taken(process.port)
                    if process.name == "redis" and not process.serving:
                        return None  # nodes after it wait for it
                continue
            if not process.serving:
                # It died again before it served: restarting it would only loop. dead()
                # stops the stack and shows its log.
                continue
            self.processes.pop(index)
            again = self._spawn(process.name, process.command, process.env, process.port)
            again.serving = False
            self.processes.insert(index, self.processes.pop())  # stopped in the same order
            if process.name == "redis":
                meanwhile = (
                    "the tabs stay open and catch up once it is back"
                    " (the nodes' /readyz is 503 meanwhile)"
                )
            else:
                meanwhile = "its tabs carry on through the other node"
            return (
                f"{process.name} (pid {process.popen.pid}) exited with"
                f" {process.popen.returncode}: {meanwhile}; restarted as pid {again.popen.pid}"
            )
        return None

    def dead(self) -> Process | None:
        """A part that exited without being asked to, and that tend() does not restart."""
        for process in self.processes:
            if process.stopping or process.popen.poll() is None:
                continue
            if process.port is None or not process.serving:
                return process
        return None

    def stop(self) -> None:
        """SIGTERM each part, front first (nginx, the app, the nodes, the broker); SIGKILL
        what lingers."""
        for process in reversed(self.processes):
            process.stopping = True
            if process.popen.poll() is None:
                process.popen.terminate()
            try:
                process.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        self.processes.clear()


# ---- make example ---------------------------------------------------------------------


class Stop(Exception):
    """SIGTERM or SIGINT: stop everything, in order."""


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Stop


def dev_secret(data_dir: Path) -> str:
    """The same dev secret `streamer serve` keeps in the data dir: `streamer token` (in this
    directory, without DATABASE_URL) mints tokens these nodes accept."""
    path = data_dir / "jwt_secret"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


@contextlib.contextmanager
def simulated_processor(dsn: str, user: uuid.UUID) -> Iterator[None]:
    from streamer.simulator import run_simulator

    stop = threading.Event()
    writer = threading.Thread(
        target=run_simulator, args=(dsn, user), kwargs={"stop": stop}, daemon=True
    )
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(5.0)


def wait_until_stopped(stack: Stack, tick: Callable[[], None] = lambda: None) -> None:
    """Until Ctrl-C or SIGTERM (Stop), or a part dies on its own (StackError)."""
    while True:
        revived = stack.tend()
        if revived is not None:
            print(revived, flush=True)
        dead = stack.dead()
        if dead is not None:
            raise StackError(dead.died())
        tick()
        time.sleep(0.5)


def main() -> int:
    # Imported here: the test imports Stack without a database or settings of its own.
    from streamer.auth import mint_token
    from streamer.config import ConfigError, load_settings
    from streamer.db import Database, migrate
    from streamer.demo import demo_user

    signal.signal(signal.SIGINT, _raise_stop)
    signal.signal(signal.SIGTERM, _raise_stop)
    began = time.monotonic()
    try:
        settings = load_settings()
        if settings.jwt_secret:
            secret = settings.jwt_secret
        elif settings.embedded:
            secret = dev_secret(settings.data_dir)
        else:
            raise ConfigError("set STREAMER_JWT_SECRET too when DATABASE_URL is set")
        for tool in ("node", "openssl"):
            if shutil.which(tool) is None:
                raise StackError(f"{tool} is not installed: run `make example`, it installs it")
        with Database.from_settings(settings) as database:
            migrate(database.listen_dsn)
            user = demo_user(settings)
            stack = Stack(settings.data_dir.resolve() / "example", database.dsn, secret)
            stack.start()
            try:
                with simulated_processor(database.dsn, user):
                    token = mint_token(secret, user, 24 * 3600)
                    print(welcome(stack, user, token, database.dsn, time.monotonic() - began))
                    wait_until_stopped(stack)
            finally:
                print("\nstopping: nginx, the app, both streamer nodes, the broker", flush=True)
                stack.stop()
    except Stop:
        return 0
    except (ConfigError, StackError) as exc:
        print(f"make example: {exc}", file=sys.stderr)
        return 1
    return 0


def welcome(stack: Stack, user: uuid.UUID, token: str, dsn: str, seconds: float) -> str:
    a, b = stack.ports.nodes
    change = f"update files set progress = 42 where user_id = '{user}' and status = 'processing'"
    node_a, node_b = (node.popen.pid for node in stack.nodes)
    readers = stack.reading()
    if len(readers) == 1:
        reader = f"  kill -9 {readers[0].popen.pid}"
    else:  # not one, for a moment: say how to tell
        reader = "  kill -9 " + " or ".join(str(node.popen.pid) for node in stack.nodes)
        reader += "  (the node that reads: streamer_fleet_reader 1 on its /metrics)"
    return f"""
The production shape is up ({seconds:.1f} s): nginx on {stack.url} (HTTP/2, self-signed
certificate), two streamer nodes on :{a} (pid {node_a}) and :{b} (pid {node_b}), the
broker (Redis on :{stack.ports.broker}) that makes them one fleet (one node reads the
database's changes, both receive them through Redis), the SvelteKit app on :{stack.ports.app},
and a simulated file processor writing the demo user's files to Postgres.

Sign in (a development link carrying a token for 24 h; accept the certificate warning):
  {stack.url}/signin?token={token}

The demo user's id:
  {user}

The same database, from psql:
  psql "{dsn}" -c "{change}"

Kill the node that reads the database for the fleet (the other reads within seconds; the
tabs it served carry on through the other, and it is restarted):
{reader}
Which node reads now (streamer_fleet_reader 1.0 on its /metrics; :{a}'s, then :{b}'s):
  curl -s {stack.node_url(0)}/metrics {stack.node_url(1)}/metrics | grep '^streamer_fleet_reader '
Kill the broker (the tabs stay open and catch up once it is back; it is restarted):
  kill -9 {stack.broker.popen.pid}
Logs: {stack.directory}/*.log. Ctrl-C stops everything.
"""


if __name__ == "__main__":
    raise SystemExit(main())
