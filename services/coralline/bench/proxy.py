"""DelayProxy: a loopback TCP proxy that adds latency (and keeps order) in each direction.

What `coralline bench pipeline` puts on the verifier <-> drafter link to show what the network
costs; reliability tests can put it on any link. Knows nothing about gRPC: it moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading


class DelayProxy:
    """A TCP proxy on loopback holding every chunk of bytes for `delay_s` in each direction.

    Order is kept and chunks are pipelined (each is due `delay_s` after it was read), so the
    delay adds latency, not a bandwidth cap. Runs its own event loop in a daemon thread.
    `upstream` ("host:port") may be set after start, before the first connection arrives."""

    def __init__(
        self,
        delay_s: float,
        upstream: str | None = None,
        host: str = "127.0.0.1",
        jitter_s: float = 0.0,
        seed: int = 0,
    ):
        """jitter_s: each chunk is held delay_s plus a uniform draw in [0, jitter_s) (order
        kept: a chunk never overtakes the one before it)."""
        if delay_s < 0 or jitter_s < 0:
            raise ValueError("delay_s and jitter_s must be >= 0")
        self.delay_s = delay_s
        self.jitter_s = jitter_s
        self._rng = random.Random(seed)
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.connections = 0
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> DelayProxy:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="delay-proxy", daemon=True
        )
        self._thread.start()
        coro = asyncio.start_server(self._handle, self.host, 0)
        self._server = asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def close(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._loop = None

        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        up_writer = None
        try:
            if not self.upstream:
                return
            host, port = self.upstream.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            self.connections += 1
            await asyncio.gather(
                self._pipe(reader, up_writer, up=True), self._pipe(up_reader, writer, up=False)
            )
        except OSError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
    ) -> None:
        """Forward one direction; when it ends (EOF or error) both sockets are closed."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        sender.add_done_callback(lambda t: t.cancelled() or t.exception())
        last = 0.0
        try:
            while True:
                data = await reader.read(1 << 16)
                jitter = self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0
                last = max(last, loop.time() + self.delay_s + jitter)
                queue.put_nowait((last, data))
                if not data:
                    break
                if up:
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
            await sender  # what is in flight still arrives, late by the delay
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sender.cancel()
            writer.close()  # ends the opposite direction's reader too
