"""Real redis-server processes for tests: 127.0.0.1 only, on a free port, that a test can
kill -9 and restart on the same port with the same arguments (`make test` installs the Debian
package when it is missing)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from coralline.rpc.process import stop_process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server of this test's own (127.0.0.1 only) that it can kill -9 and restart on
    the same port with the same arguments."""

    def __init__(self, folder: Path, *extra: str, tls: bool = False, probe_url: str = "") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt redis-server)")
        self.port = _free_port()
        self.folder = folder
        ports = ["--port", "0", "--tls-port", str(self.port)] if tls else ["--port", str(self.port)]
        self.argv = [binary, *ports, "--bind", "127.0.0.1", "--save", "", "--dir", str(folder)]
        self.argv += extra
        self.probe_url = probe_url or f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.log = folder / "redis.log"

    @property
    def url(self) -> str:
        return self.probe_url

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        probe = redis.Redis.from_url(self.probe_url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.AuthenticationError:
                    return  # up, and asking for a password
                except (redis.ConnectionError, redis.TimeoutError):  # not yet, or loading
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"redis-server did not start: {self.log.read_text()[-2000:]}"
                        ) from None
                    time.sleep(0.05)
        finally:
            probe.close()

    def kill9(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10.0)


@contextlib.contextmanager
def own_redis(folder: Path, *extra: str, **kw) -> Iterator[OwnRedis]:
    server = OwnRedis(folder, *extra, **kw)
    try:
        server.start()
        yield server
    finally:
        server.stop()
