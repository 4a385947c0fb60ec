"""Real ``redis-server`` processes for tests: one server, or a small Redis Cluster, on free loopback ports.

Each server runs in its own temporary directory with persistence off, is stopped (SIGTERM, then SIGKILL)
when the test is done, and can be ``kill()``ed and ``restart()``ed on the same port for fault tests.
A server given ``TlsFiles`` (a throwaway CA and certificates made with the ``openssl`` CLI) listens for
TLS only.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis

HOST = "127.0.0.1"


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


def tls_available() -> bool:
    """Whether ``openssl`` exists and this ``redis-server`` was built with TLS (Debian's is)."""
    if shutil.which("openssl") is None or not redis_available():
        return False
    probe = subprocess.run(["redis-server", "--port", "0", "--tls-port", "0"], capture_output=True, text=True,
                           timeout=10)
    return "not listen anywhere" in probe.stdout + probe.stderr  # the option parsed; nothing to serve


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path, ca_name: str = "kvtier-test-ca") -> TlsFiles:
        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

        directory.mkdir(parents=True, exist_ok=True)
        ca, ca_key = directory / "ca.crt", directory / "ca.key"
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={ca_name}",
            "-keyout", str(ca_key), "-out", str(ca))
        for name, extension in (("server", f"subjectAltName=IP:{HOST}"), ("client", "extendedKeyUsage=clientAuth")):
            key, csr, cert = (directory / f"{name}.{suffix}" for suffix in ("key", "csr", "crt"))
            ext = directory / f"{name}.ext"
            ext.write_text(extension + "\n")
            run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
            run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                "-days", "1", "-extfile", str(ext), "-out", str(cert))
        return cls(ca, directory / "server.crt", directory / "server.key", directory / "client.crt",
                   directory / "client.key")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for cluster mode also its bus port (+10000), so at most 55535."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if not cluster:
            return port
        port = 20000 + port % 35000
        if _is_free(port) and _is_free(port + 10000):
            return port


class RedisServer:
    """One ``redis-server`` on ``127.0.0.1:<port>``; ``password`` turns on ``requirepass``, ``tls`` serves
    TLS only on that port (``require_client_cert``: mutual TLS)."""

    def __init__(self, password: str | None = None, port: int | None = None, cluster: bool = False,
                 extra_args: tuple[str, ...] = (), tls: TlsFiles | None = None,
                 require_client_cert: bool = False) -> None:
        self.password = password
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.port = port or free_port(cluster)
        self.cluster = cluster
        self.extra_args = extra_args
        self._dir = tempfile.TemporaryDirectory(prefix="kvtier-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        if self.tls:
            kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls.ca), "ssl_certfile": str(self.tls.client_cert),
                      "ssl_keyfile": str(self.tls.client_key), **kwargs}
        return redis.Redis(host=HOST, port=self.port, password=self.password, **kwargs)

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        args = ["redis-server", "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--logfile", str(Path(self._dir.name) / "log")]
        if self.tls:
            args[1:3] = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server_cert),
                         "--tls-key-file", str(self.tls.server_key), "--tls-ca-cert-file", str(self.tls.ca),
                         "--tls-auth-clients", "yes" if self.require_client_cert else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.proc = subprocess.Popen([*args, *self.extra_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with self.client(socket_timeout=1) as probe:
                    probe.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    log = Path(self._dir.name, "log")
                    text = log.read_text() if log.exists() else self.proc.stderr.read().decode()
                    raise RuntimeError(f"redis-server exited: {text[-2000:]}") from None
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server on port {self.port} did not answer") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> RedisServer:
        """Kill (if running) and start again on the same port, empty (persistence is off)."""
        self.kill()
        self._close_pipes()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_pipes()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def _close_pipes(self) -> None:
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterServers:
    """``masters`` cluster-mode servers joined with ``redis-cli --cluster create`` (no replicas)."""

    def __init__(self, masters: int = 3) -> None:
        self.servers = [RedisServer(cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.servers[0].port}"

    def start(self, timeout_s: float = 20.0) -> RedisClusterServers:
        for server in self.servers:
            server.start()
        nodes = [f"{HOST}:{s.port}" for s in self.servers]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        for server in self.servers:
            with server.client() as probe:
                while b"cluster_state:ok" not in probe.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise TimeoutError("redis cluster did not reach cluster_state:ok")
                    time.sleep(0.05)
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisClusterServers:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
