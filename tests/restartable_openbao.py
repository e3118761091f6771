"""An OpenBao server that can be stopped and started again on the same address with its data.

The dev server of :mod:`tests.services` keeps everything in memory, so a restart loses the KV secrets
and the Transit keys. The fault tests need Vault to go away and come back as it was: this server
keeps its storage in a folder (integrated ``raft`` storage, one node), is initialised with one unseal key on first
start and unsealed again after every restart. The root token and the unseal key stay in this
object; nothing prints them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import hvac
import pytest
import requests

from tests.services import bao_binary, free_port


class RestartableOpenBao:
    """``start()``, ``stop()`` and ``start()`` again: same address, same token, same secrets and keys."""

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


@pytest.fixture
def restartable_openbao() -> Iterator[RestartableOpenBao]:
    """A started :class:`RestartableOpenBao` of the test's own, removed with its data afterwards."""
    bao = RestartableOpenBao()
    try:
        yield bao.start()
    finally:
        bao.remove()
