"""Test helpers: real gRPC servers on loopback, in this process (a background event loop) or as
separate OS processes (the `coralline drafter` / `coralline verifier` commands, rpc/process.py)."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

from coralline.rpc.process import ServerProcess as _ServerProcess


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


class ServerProcess(_ServerProcess):
    """`coralline <kind> --port 0 ...` in its own process; `.address` once it is ready."""

    def __init__(self, kind: str, *args: str, timeout: float = 120.0) -> None:
        super().__init__(kind, list(args), Path(tempfile.mkdtemp(prefix="coralline-test-")))
        self.wait_ready(timeout)
