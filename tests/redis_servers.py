"""Redis servers for the tests: real `redis-server` processes that the test owns.

Each server is a foreground child process bound to 127.0.0.1 on a port the test
chose, with its own directory, so a test can kill it (a crash), restart it on the
same port and directory (AOF data comes back) and always stop it at the end. Only
the processes started here are ever signalled, by their PID.

A server can speak TLS only (`tls=make_tls(DIR)`): a CA and a server certificate
for 127.0.0.1 made with openssl, and no plaintext port at all (`--port 0`).

A test module gets the fixtures (`redis_factory`, `redis_cluster`) with

    pytest_plugins = ["redis_servers"]

(It is imported before pytest loads it as a plugin, so it asks not to be
assert-rewritten: PYTEST_DONT_REWRITE. It raises rather than asserts.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CLUSTER_BUS_OFFSET = 10000  # a cluster node also listens on port + 10000


def require_redis() -> None:
    """Skip when the redis tools are not installed (examples/setup.sh installs them)."""
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (examples/setup.sh installs redis)")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(*, cluster: bool = False) -> int:
    """A port nobody listens on now (and, for a cluster node, its bus port too)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if not cluster:
            return port
        bus = port + CLUSTER_BUS_OFFSET
        if bus < 65536 and _port_free(bus):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate it signed for 127.0.0.1 (IP SAN) and the server's key."""

    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed:\n{result.stderr}")


def make_tls(directory: Path, *, name: str = "tmemfs test", san: str = f"IP:{HOST}") -> TlsFiles:
    """A fresh CA and a server certificate for `san` signed by it, in `directory`.

    Each call makes a new CA, so the CA of one call does not verify another's server.
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName = {san}\nbasicConstraints = CA:FALSE\n"
        "keyUsage = digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
    )
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name} CA",
        "-keyout",
        ca_key,
        "-out",
        ca,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name} server",
        "-keyout",
        key,
        "-out",
        csr,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        ext,
        "-out",
        cert,
    )
    return TlsFiles(ca, cert, key)


def redis_cli(port: int, *args: str, timeout: float = 10.0, tls: TlsFiles | None = None) -> str:
    """`redis-cli -p PORT ARGS`: its stdout, stripped (errors are printed there too)."""
    secure = ["--tls", "--cacert", str(tls.ca)] if tls is not None else []
    result = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *secure, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return (result.stdout + result.stderr).strip()


class RedisServer:
    """One redis-server child process with its own port and directory.

    `aof` turns on the append-only file with an fsync per write, so a kill loses
    nothing and `restart()` brings the data back; without it nothing is persisted
    (`--save ''`), and a restart comes back empty. With `tls` it listens with TLS only
    (no plaintext port) and does not ask clients for certificates.
    """

    def __init__(
        self,
        directory: Path,
        *,
        aof: bool = False,
        maxmemory: str | None = None,
        cluster: bool = False,
        tls: TlsFiles | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.maxmemory = maxmemory
        self.cluster = cluster
        self.tls = tls
        self.extra = tuple(extra)
        self.port = free_port(cluster=cluster)
        self.log = directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- what a test needs ---------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The --backend / --writeback value for this server (database 0).

        For a TLS server: rediss://, trusting this server's CA and nothing else.
        """
        if self.tls is not None:
            return f"rediss://{self.address}/0?ssl_ca_certs={self.tls.ca}"
        return f"redis://{self.address}/0"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args, tls=self.tls)

    def info(self, section: str = "") -> dict[str, str]:
        """INFO as a dict of strings."""
        values: dict[str, str] = {}
        for line in self.cli("info", *([section] if section else [])).splitlines():
            name, sep, value = line.strip().partition(":")
            if sep and not name.startswith("#"):
                values[name] = value
        return values

    def dbsize(self) -> int:
        return int(self.cli("dbsize"))

    def used_memory(self) -> int:
        return int(self.info("memory")["used_memory"])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- life cycle ------------------------------------------------------------------------

    def command(self) -> list[str]:
        if self.tls is None:
            ports = ["--port", str(self.port)]
        else:
            ports = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "no",
            ]
        args = [
            "redis-server",
            "--bind",
            HOST,
            *ports,
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--save",
            "",
            "--logfile",
            "",
        ]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        if self.maxmemory is not None:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--cluster-require-full-coverage",
                "no",
            ]
        return [*args, *self.extra]

    def start(self) -> None:
        """Start the server and wait until it answers PING (an AOF is loaded by then)."""
        if self.running():
            raise RuntimeError(f"redis on {self.address} is already running")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server on {self.address} exited with {self.proc.returncode}:\n"
                    f"{self.log_text()[-3000:]}"
                )
            if self.cli("ping") == "PONG":
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"redis-server on {self.address} did not answer PING "
                    f"in {START_TIMEOUT}s:\n{self.log_text()[-3000:]}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it does not go in time."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: a crash. With AOF (fsync always) every acknowledged write survives."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)

    def pause(self) -> None:
        """SIGSTOP: the server hangs; connections stay open but nothing is answered."""
        if self.proc is None:
            raise RuntimeError("not started")
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is None:
            raise RuntimeError("not started")
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port and directory (stopping it first if it runs)."""
        self.stop()
        self.start()


class RedisCluster:
    """Three masters, no replicas, each a RedisServer; slots spread by redis-cli."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(node.address for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(n.address for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed:\n{result.stdout}{result.stderr}"
            )
        self.wait_ok(self.nodes)

    def wait_ok(self, nodes: Sequence[RedisServer], timeout: float = 30.0) -> None:
        """Wait until every node in `nodes` says cluster_state:ok."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            while "cluster_state:ok" not in node.cli("cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cluster not ok on {node.address}:\n{node.cli('cluster', 'info')}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


RedisFactory = Callable[..., RedisServer]


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """redis_factory(aof=..., maxmemory=...) -> a started RedisServer; all stopped at the end."""
    require_redis()
    servers: list[RedisServer] = []
    counter = iter(range(1000))

    def factory(**options: object) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{next(counter)}", **options)  # type: ignore[arg-type]
        servers.append(server)
        server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            with contextlib.suppress(Exception):
                server.stop()
            if server.running():  # pragma: no cover - stop() failed: last resort
                os.kill(server.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A started 3-master cluster (no replicas, full coverage not required)."""
    require_redis()
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
