"""ServerProcess: a coralline server (`coralline drafter` / `coralline verifier`) in its own OS
process on loopback, ready once it printed its address; stopped with SIGTERM (then killed).

Used by the pipeline benchmark and the end-to-end tests. Knows nothing about the services
beyond their command line and their ready line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DIE_WITH_PARENT = "CORALLINE_DIE_WITH_PARENT"  # the starting process's pid, for the child


def die_with_parent_env() -> dict[str, str]:
    """Environment for a `coralline` child that must die with this process (see below)."""
    return {DIE_WITH_PARENT: str(os.getpid())}


def die_with_parent() -> None:
    """Linux, in the child, first thing (`coralline` CLI main): SIGKILL when the process that
    started it dies, however it dies (no orphan servers after a crashed `coralline serve` or
    test run). The signal follows the THREAD that started the child: start servers from a
    thread that outlives them. Armed in the child rather than in a `preexec_fn`: a preexec_fn
    forces a plain fork that runs Python (and gRPC's fork handlers) in the child, which can
    kill it before exec while gRPC threads are busy in the parent."""
    parent = os.environ.pop(DIE_WITH_PARENT, "")
    if not parent:
        return
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(1)


def stop_process(proc: subprocess.Popen, grace_s: float) -> int | None:
    """SIGTERM, up to grace_s seconds to exit, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


class ServerProcess:
    """`python -m coralline.cli <kind> --port 0 ...` in its own process, stderr to a log file."""

    READY = re.compile(r"listening on (\S+)")
    METRICS = re.compile(r"metrics (http://\S+/metrics)")

    def __init__(
        self, kind: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None
    ) -> None:
        """env: variables added to this process's environment (e.g. OTEL_*)."""
        self.kind = kind
        self.log = log_dir / f"{kind}-{time.time_ns()}.log"
        env = {**os.environ, "CORALLINE_THREADS": "1", "CORALLINE_LOG": "INFO", **(env or {})}
        env.update(die_with_parent_env())
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "coralline.cli", kind, "--port", "0", *args],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                env=env,
            )
        self.address = ""
        self.metrics_url = ""  # its Prometheus endpoint, when started with --metrics-port
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{kind}-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # drained to the end: the pipe never fills
            m = self.READY.search(line)
            if m and not self.address:
                self.address = m.group(1).rstrip(",")
                metrics = self.METRICS.search(line)
                self.metrics_url = metrics.group(1) if metrics else ""
                self._ready.set()
        self._ready.set()  # EOF: the process ended

    def wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.2):
            if time.monotonic() > deadline:
                break
        if not self.address:
            self.stop()
            raise RuntimeError(
                f"coralline {self.kind} did not start within {timeout:g} s: {self.stderr()[-3000:]}"
            )
        return self.address

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL (fault tests: a worker that dies without draining)."""
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> int | None:
        return stop_process(self.proc, 30.0)
