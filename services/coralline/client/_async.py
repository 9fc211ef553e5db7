"""The asyncio client: `AsyncClient`, over a grpc.aio channel.

Knows how to drive the Generation RPCs with grpc.aio, with the shared retry rule and deadlines
of _common.py. The channel is opened on first use, inside the running event loop, and belongs
to that loop: use one AsyncClient per loop. Knows nothing about the server's internals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from coralline.client import _common
from coralline.client._common import DEFAULT, ChannelOptions, Timeout
from coralline.client.errors import from_rpc_error
from coralline.client.types import Chunk, GenerationResult, SessionInfo
from coralline.rpc.protos import generation_pb2, generation_pb2_grpc

log = logging.getLogger("coralline.client")

_R = TypeVar("_R")


class AsyncClient:
    """An asyncio client of the coralline Generation service at `target` ("host:port").

    Same arguments and behaviour as Client; methods are coroutines and stream() returns an async
    iterator. Use as `async with AsyncClient(...) as c` or `await c.close()`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        timeout: float | None = _common.DEFAULT_TIMEOUT_S,
        retries: int = _common.DEFAULT_RETRIES,
        options: ChannelOptions | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
    ) -> None:
        self._settings = _common.make_settings(
            target, token, root_certificates, timeout, retries, options, client_cert
        )
        self._channel: grpc.aio.Channel | None = None
        self._stub_: generation_pb2_grpc.GenerationStub | None = None
        self._closed = False

    def __repr__(self) -> str:
        return self._settings.describe(type(self).__name__)

    @property
    def target(self) -> str:
        return self._settings.target

    def _stub(self) -> generation_pb2_grpc.GenerationStub:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._stub_ is None:
            s = self._settings
            if s.root_certificates is not None:
                creds = s.credentials()
                self._channel = grpc.aio.secure_channel(s.target, creds, options=list(s.options))
            else:
                self._channel = grpc.aio.insecure_channel(s.target, options=list(s.options))
            self._stub_ = generation_pb2_grpc.GenerationStub(self._channel)
        return self._stub_

    # ------------------------------------------------------------------ lifecycle
    async def close(self) -> None:
        """Close the channel (idempotent). Calls in flight are cancelled."""
        self._closed = True
        channel, self._channel, self._stub_ = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ generation
    async def generate(
        self,
        prompt: str | Sequence[Mapping[str, str]] | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        chat_template: bool = True,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        drafter: str | None = None,
        verifier: str | None = None,
        session_id: str | None = None,
        continue_session: bool = False,
        ignore_eos: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> GenerationResult:
        """Generate and return the whole result (see Client.generate)."""
        request = _common.build_request(
            prompt, token_ids, chat_template, max_new_tokens, temperature, top_k, top_p, seed,
            stop, drafter, verifier, session_id, continue_session, ignore_eos,
        )  # fmt: skip
        collector = _common.Collector()
        stream = self._stream(request, _common.resolve_timeout(timeout, self._settings))
        try:
            async for chunk in stream:
                collector.add(chunk)
        finally:
            await stream.aclose()
        return collector.result()

    def stream(
        self,
        prompt: str | Sequence[Mapping[str, str]] | None = None,
        *,
        token_ids: Sequence[int] | None = None,
        chat_template: bool = True,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        drafter: str | None = None,
        verifier: str | None = None,
        session_id: str | None = None,
        continue_session: bool = False,
        ignore_eos: bool = False,
        timeout: Timeout = DEFAULT,
    ) -> AsyncIterator[Chunk]:
        """An async iterator of the Chunks (see Client.stream): `async for c in client.stream(..)`.

        Not a coroutine: arguments are checked now, the call starts at the first iteration.
        To cancel promptly when leaving the loop early, close it (contextlib.aclosing)."""
        request = _common.build_request(
            prompt, token_ids, chat_template, max_new_tokens, temperature, top_k, top_p, seed,
            stop, drafter, verifier, session_id, continue_session, ignore_eos,
        )  # fmt: skip
        return self._stream(request, _common.resolve_timeout(timeout, self._settings))

    async def _stream(
        self, request: generation_pb2.GenerateRequest, timeout: float | None
    ) -> AsyncIterator[Chunk]:
        stub = self._stub()
        deadline = _common.Deadline(timeout)
        attempt = 0
        while True:
            received = False
            call: Any = None
            try:
                call = stub.Generate(
                    request, timeout=deadline.remaining(), metadata=self._settings.metadata
                )
                async for response in call:
                    received = True
                    yield _common.chunk_from_pb(response)
                return
            except grpc.RpcError as e:
                # once a response arrived, a retry would repeat its tokens: never retry then
                wait = _common.retry_wait(e, attempt, self._settings, deadline)
                if received or wait is None:
                    raise from_rpc_error(e) from e
                log.debug("Generate: UNAVAILABLE, retry %d in %.2f s", attempt + 1, wait)
            finally:
                if call is not None:
                    call.cancel()  # a no-op when the call ended; stops it when closed early
            attempt += 1
            await asyncio.sleep(wait)

    # ------------------------------------------------------------------ sessions
    async def get_session(self, session_id: str, *, timeout: Timeout = DEFAULT) -> SessionInfo:
        """A session's state and output so far. NotFound for an unknown session."""
        request = generation_pb2.GetSessionRequest(session_id=session_id)
        msg = await self._unary(self._stub().GetSession, request, timeout)
        return _common.session_from_pb(msg)

    async def cancel(self, session_id: str, *, timeout: Timeout = DEFAULT) -> bool:
        """Cancel a running session: True when it was stopped, False when it had already ended.
        NotFound for an unknown session."""
        request = generation_pb2.CancelSessionRequest(session_id=session_id)
        response = await self._unary(self._stub().CancelSession, request, timeout)
        return bool(response.cancelled)

    async def _unary(
        self, method: Callable[..., Awaitable[_R]], request: Any, timeout: Timeout
    ) -> _R:
        deadline = _common.Deadline(_common.resolve_timeout(timeout, self._settings))
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=deadline.remaining(), metadata=self._settings.metadata
                )
            except grpc.RpcError as e:
                wait = _common.retry_wait(e, attempt, self._settings, deadline)
                if wait is None:
                    raise from_rpc_error(e) from e
                log.debug("unary call: UNAVAILABLE, retry %d in %.2f s", attempt + 1, wait)
            attempt += 1
            await asyncio.sleep(wait)
