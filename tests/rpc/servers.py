"""Test helpers: real gRPC servers on loopback, in this process (a background event loop) or as
separate OS processes (the `coralline drafter` / `coralline verifier` commands)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class LoopThread:
    """An asyncio loop in a daemon thread; `call(coro)` runs a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class ServerProcess:
    """`coralline <kind> --port 0 ...` in its own process; `.address` once it is ready."""

    READY = re.compile(r"listening on (\S+)")

    def __init__(self, kind: str, *args: str, timeout: float = 120.0) -> None:
        env = dict(os.environ, CORALLINE_THREADS="1", CORALLINE_LOG="INFO")
        self.log = Path(f"/tmp/coralline-test-{kind}-{os.getpid()}-{time.time_ns()}.log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "coralline.cli", kind, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=open(self.log, "w"),  # noqa: SIM115 (lives as long as the process)
            text=True,
            env=env,
        )
        self.address = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            m = self.READY.search(line)
            if m:
                self.address = m.group(1)
                return
        self.stop()
        raise RuntimeError(f"coralline {kind} did not start: {self.log.read_text()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text()
