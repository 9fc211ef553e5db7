"""The blocking client: `Client`, over a grpc sync channel.

Knows how to drive the Generation RPCs with grpc's sync API, with the shared retry rule and
deadlines of _common.py. Knows nothing about the server's internals; one Client may be used from
several threads (grpc channels are thread-safe).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from coralline.client import _common
from coralline.client._common import DEFAULT, ChannelOptions, Timeout
from coralline.client.errors import from_rpc_error
from coralline.client.types import Chunk, GenerationResult, SessionInfo
from coralline.rpc.protos import generation_pb2, generation_pb2_grpc

log = logging.getLogger("coralline.client")

_R = TypeVar("_R")


class Client:
    """A blocking client of the coralline Generation service at `target` ("host:port").

    TLS when `root_certificates` (PEM bytes) is given, else an insecure channel; `client_cert`
    = (certificate chain, private key) PEM bytes for a mutual-TLS port. `token` is sent
    as "authorization: Bearer <token>" on every call. `timeout` (seconds, None = none) is the
    default deadline of each call, retries included; every method takes `timeout=` to override.
    `retries`: how many times a call that failed with UNAVAILABLE is retried (a stream only
    before its first response). Use as a context manager or call close().
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
        s = self._settings
        if s.root_certificates is not None:
            creds = s.credentials()
            self._channel = grpc.secure_channel(s.target, creds, options=list(s.options))
        else:
            self._channel = grpc.insecure_channel(s.target, options=list(s.options))
        self._stub_ = generation_pb2_grpc.GenerationStub(self._channel)
        self._closed = False

    def _stub(self) -> generation_pb2_grpc.GenerationStub:
        if self._closed:
            raise RuntimeError("this Client is closed")
        return self._stub_

    def __repr__(self) -> str:
        return self._settings.describe(type(self).__name__)

    @property
    def target(self) -> str:
        return self._settings.target

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the channel (idempotent). Calls in flight are cancelled."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ generation
    def generate(
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
        """Generate from a text prompt or token ids and return the whole result.

        Exactly one of `prompt` and `token_ids` (ValueError otherwise). `prompt` is text, or
        a whole conversation as messages ([{"role": "system" | "user" | "assistant",
        "content": ...}], the last a user message; rendered with the target's chat template).
        `chat_template` applies to text prompts only. Unset optional arguments leave the
        server's defaults (top_p 1, a fresh seed reported in the summary, max_new_tokens 256,
        the default drafter and verifier, a server-made session id). `continue_session=True`
        with the `session_id` of a finished session continues that conversation: `prompt` is
        the next user message (or `token_ids` the ids appended); the server holding the
        conversation's KV cache prefills only the new tokens (`summary.cached_prompt_tokens`).
        `ignore_eos=True` goes on past an end-of-sequence token (emitted like any other) to
        max_new_tokens, a stop string or the context window, as vLLM's `ignore_eos` (for
        benchmarks: every request does the same work; the law of each token is unchanged).
        Raises a CorallineError subclass on failure.
        """
        request = _common.build_request(
            prompt, token_ids, chat_template, max_new_tokens, temperature, top_k, top_p, seed,
            stop, drafter, verifier, session_id, continue_session, ignore_eos,
        )  # fmt: skip
        collector = _common.Collector()
        for chunk in self._stream(request, _common.resolve_timeout(timeout, self._settings)):
            collector.add(chunk)
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
    ) -> Iterator[Chunk]:
        """Like generate(), but yields one Chunk per round as it arrives (the last one carries
        the Summary). Arguments are checked now; the call starts at the first next(). Closing
        the iterator early cancels the call. After a chunk arrived, errors are raised, never
        retried (a retry would repeat tokens)."""
        request = _common.build_request(
            prompt, token_ids, chat_template, max_new_tokens, temperature, top_k, top_p, seed,
            stop, drafter, verifier, session_id, continue_session, ignore_eos,
        )  # fmt: skip
        return self._stream(request, _common.resolve_timeout(timeout, self._settings))

    def _stream(
        self, request: generation_pb2.GenerateRequest, timeout: float | None
    ) -> Iterator[Chunk]:
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
                for response in call:
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
            time.sleep(wait)

    # ------------------------------------------------------------------ sessions
    def get_session(self, session_id: str, *, timeout: Timeout = DEFAULT) -> SessionInfo:
        """A session's state and output so far. NotFound for an unknown session."""
        request = generation_pb2.GetSessionRequest(session_id=session_id)
        msg = self._unary(self._stub().GetSession, request, timeout)
        return _common.session_from_pb(msg)

    def cancel(self, session_id: str, *, timeout: Timeout = DEFAULT) -> bool:
        """Cancel a running session: True when it was running and is now stopped, False when it
        had already ended. NotFound for an unknown session."""
        request = generation_pb2.CancelSessionRequest(session_id=session_id)
        return bool(self._unary(self._stub().CancelSession, request, timeout).cancelled)

    def _unary(self, method: Callable[..., _R], request: Any, timeout: Timeout) -> _R:
        deadline = _common.Deadline(_common.resolve_timeout(timeout, self._settings))
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=deadline.remaining(), metadata=self._settings.metadata
                )
            except grpc.RpcError as e:
                wait = _common.retry_wait(e, attempt, self._settings, deadline)
                if wait is None:
                    raise from_rpc_error(e) from e
                log.debug("unary call: UNAVAILABLE, retry %d in %.2f s", attempt + 1, wait)
            attempt += 1
            time.sleep(wait)
