"""What the sync and async clients share: settings, request building, message conversion, retries.

Knows the coralline.v1 Generation messages (GenerateRequest, GenerateResponse, Session, Summary,
RoundStats) and the SDK's retry rule: UNAVAILABLE only, exponential backoff from BACKOFF_S,
never once a stream has delivered a response, never past the call's deadline. Knows nothing
about channels' I/O (grpc sync vs grpc.aio): _sync.py and _async.py drive the calls.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from coralline.client.errors import Internal
from coralline.client.types import Chunk, GenerationResult, RoundStats, SessionInfo, Summary
from coralline.rpc.protos import common_pb2, generation_pb2

BACKOFF_S = 0.1  # the first retry waits this long; each further retry waits twice as long
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_RETRIES = 3


class _Default(enum.Enum):
    DEFAULT = "DEFAULT"

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT = _Default.DEFAULT
"""Sentinel for a method's `timeout=`: use the client's default timeout."""

Timeout = float | None | _Default
ChannelOptions = Sequence[tuple[str, Any]]


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True, repr=False)
class Settings:
    """A client's configuration. No repr: it holds the bearer token."""

    target: str
    metadata: tuple[tuple[str, str], ...]
    root_certificates: bytes | None
    timeout: float | None
    retries: int
    options: tuple[tuple[str, Any], ...]
    client_cert: tuple[bytes, bytes] | None = None  # (certificate chain, private key) PEM

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials (the caller checked `tls`), with the client certificate if any."""
        chain, key = self.client_cert or (None, None)
        return grpc.ssl_channel_credentials(
            self.root_certificates, private_key=key, certificate_chain=chain
        )

    def describe(self, cls: str) -> str:
        """The client's repr: target and settings, never the token."""
        auth = any(k == "authorization" for k, _ in self.metadata)
        return (
            f"{cls}(target={self.target!r}, tls={self.tls}, authenticated={auth}, "
            f"timeout={self.timeout!r}, retries={self.retries})"
        )


def make_settings(
    target: str,
    token: str | None,
    root_certificates: bytes | None,
    timeout: float | None,
    retries: int,
    options: ChannelOptions | None,
    client_cert: tuple[bytes, bytes] | None = None,
) -> Settings:
    if not isinstance(target, str) or not target:
        raise ValueError(f"target must be a non-empty 'host:port' string, got {target!r}")
    check_timeout(timeout)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    if root_certificates is not None and not isinstance(root_certificates, bytes):
        raise TypeError("root_certificates must be PEM bytes (or None for an insecure channel)")
    if client_cert is not None:
        if root_certificates is None:
            raise ValueError("a client certificate needs TLS: give root_certificates too")
        if not (
            isinstance(client_cert, tuple)
            and len(client_cert) == 2
            and all(isinstance(b, bytes) for b in client_cert)
        ):
            raise TypeError("client_cert must be (certificate chain PEM bytes, key PEM bytes)")
    metadata: tuple[tuple[str, str], ...] = ()
    if token:  # None or "" (an unset environment variable): no authorization header
        metadata = (("authorization", f"Bearer {token}"),)
    return Settings(
        target=target,
        metadata=metadata,
        root_certificates=root_certificates,
        timeout=None if timeout is None else float(timeout),
        retries=retries,
        options=tuple((str(k), v) for k, v in (options or ())),
        client_cert=client_cert,
    )


def check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0 or None, got {timeout!r}")


def resolve_timeout(timeout: Timeout, settings: Settings) -> float | None:
    if timeout is DEFAULT:
        return settings.timeout
    check_timeout(timeout)
    return None if timeout is None else float(timeout)


# ---------------------------------------------------------------------- retries
class Deadline:
    """An absolute deadline over all attempts of one call (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self._end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        if self._end is None:
            return None
        return max(self._end - time.monotonic(), 0.001)  # grpc wants a positive timeout

    def allows(self, wait_s: float) -> bool:
        return self._end is None or time.monotonic() + wait_s < self._end


def backoff_s(attempt: int) -> float:
    """The wait before retry number `attempt + 1` (0.1 s, 0.2 s, 0.4 s, ...)."""
    return BACKOFF_S * 2**attempt


def retry_wait(
    e: grpc.RpcError, attempt: int, settings: Settings, deadline: Deadline
) -> float | None:
    """Seconds to wait before retrying a call that failed with `e`, or None: do not retry.

    `attempt` counts the retries already made. The caller has checked that no response of the
    call has been received (a stream that delivered anything is never retried).
    """
    code = e.code() if callable(getattr(e, "code", None)) else None
    if code != grpc.StatusCode.UNAVAILABLE or attempt >= settings.retries:
        return None
    wait = backoff_s(attempt)
    return wait if deadline.allows(wait) else None


# ---------------------------------------------------------------------- requests
def build_request(
    prompt: str | Sequence[Mapping[str, str]] | None,
    token_ids: Sequence[int] | None,
    chat_template: bool,
    max_new_tokens: int | None,
    temperature: float,
    top_k: int,
    top_p: float | None,
    seed: int | None,
    stop: Iterable[str],
    drafter: str | None,
    verifier: str | None,
    session_id: str | None,
    continue_session: bool = False,
    ignore_eos: bool = False,
) -> generation_pb2.GenerateRequest:
    """The GenerateRequest for the SDK's keyword arguments; optional fields only when given.

    Client-side checks are limited to what the wire cannot express (exactly one prompt form,
    argument types); value ranges are the server's to judge (INVALID_ARGUMENT with its message).
    """
    if (prompt is None) == (token_ids is None):
        raise ValueError(
            "pass exactly one of prompt (text) and token_ids (a list of ints), "
            + ("not both" if prompt is not None else "got neither")
        )
    if isinstance(stop, str):
        raise TypeError(f"stop must be a list of strings, not a string: use stop=[{stop!r}]")
    req = generation_pb2.GenerateRequest()
    if isinstance(prompt, list | tuple):  # a conversation: [{"role": ..., "content": ...}]
        for i, m in enumerate(prompt):
            if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
                raise TypeError(
                    f"prompt[{i}] must be a message (a mapping with 'role' and 'content'); "
                    "pass ids as token_ids=[...]"
                )
            req.messages.messages.add(role=str(m["role"]), content=str(m["content"]))
    elif prompt is not None:
        if not isinstance(prompt, str):
            raise TypeError(
                f"prompt must be a str or a list of messages, got {type(prompt).__name__}; "
                "pass ids as token_ids=[...]"
            )
        req.text = prompt
        req.chat_template = bool(chat_template)
    else:
        assert token_ids is not None
        if isinstance(token_ids, str | bytes):
            raise TypeError("token_ids must be a list of ints; pass text as prompt=...")
        req.token_ids.ids.extend(int(t) for t in token_ids)
        # chat_template is meaningless for ids (they are used as they are): left unset
    req.sampling.temperature = float(temperature)
    req.sampling.top_k = int(top_k)
    if top_p is not None:
        req.sampling.top_p = float(top_p)
    if seed is not None:
        req.sampling.seed = int(seed)
    if not isinstance(ignore_eos, bool):
        raise TypeError(f"ignore_eos must be a bool, got {type(ignore_eos).__name__}")
    req.sampling.ignore_eos = ignore_eos
    if max_new_tokens is not None:
        req.max_new_tokens = int(max_new_tokens)
    req.stop.extend(stop)
    if drafter is not None:
        req.drafter = drafter
    if verifier is not None:
        req.verifier = verifier
    if session_id is not None:
        req.session_id = session_id
    if continue_session:
        if not session_id:
            raise ValueError("continue_session=True needs the conversation's session_id")
        req.continue_session = True
    return req


# ---------------------------------------------------------------------- responses
_FINISH = {
    common_pb2.FINISH_REASON_EOS: "eos",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_CONTEXT: "context",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
}
_STATE = {
    generation_pb2.SESSION_STATE_RUNNING: "running",
    generation_pb2.SESSION_STATE_FINISHED: "finished",
    generation_pb2.SESSION_STATE_CANCELLED: "cancelled",
    generation_pb2.SESSION_STATE_FAILED: "failed",
}


def _enum_name(table: dict[int, str], value: int) -> str:
    if value in table:
        return table[value]
    return "unspecified" if value == 0 else f"unknown({value})"


def _ms(ns: int) -> float:
    return ns / 1e6


def stats_from_pb(msg: common_pb2.RoundStats) -> RoundStats:
    return RoundStats(
        round=msg.round,
        tree_nodes=msg.tree_nodes,
        accepted=msg.accepted,
        draft_ms=_ms(msg.draft_ns),
        verify_ms=_ms(msg.verify_ns),
        fallback=msg.fallback or None,
        bytes_to_drafter=msg.bytes_to_drafter,
        bytes_from_drafter=msg.bytes_from_drafter,
        forward_ms=_ms(msg.forward_ns),
        accept_ms=_ms(msg.accept_ns),
        commit_ms=_ms(msg.commit_ns),
        drafter_ms=_ms(msg.drafter_ns),
        tree_depth=msg.tree_depth,
        plain=msg.plain,
    )


def summary_from_pb(msg: common_pb2.Summary) -> Summary:
    return Summary(
        tokens=msg.tokens,
        rounds=msg.rounds,
        acceptance_length=msg.acceptance_length,
        tokens_per_second=msg.tokens_per_second,
        prefill_ms=_ms(msg.prefill_ns),
        draft_ms=_ms(msg.draft_ns),
        verify_ms=_ms(msg.verify_ns),
        finish_reason=_enum_name(_FINISH, msg.finish_reason),
        verifier=msg.verifier,
        drafter=msg.drafter,
        seed=msg.seed,
        prompt_tokens=msg.prompt_tokens,
        fallback_rounds=msg.fallback_rounds,
        drafter_reconnects=msg.drafter_reconnects,
        cached_prompt_tokens=msg.cached_prompt_tokens,
        failovers=msg.failovers,
        plain_rounds=msg.plain_rounds,
    )


def chunk_from_pb(msg: generation_pb2.GenerateResponse) -> Chunk:
    return Chunk(
        session_id=msg.session_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        stats=stats_from_pb(msg.stats) if msg.HasField("stats") else None,
        summary=summary_from_pb(msg.summary) if msg.HasField("summary") else None,
    )


def session_from_pb(msg: generation_pb2.Session) -> SessionInfo:
    return SessionInfo(
        session_id=msg.session_id,
        state=_enum_name(_STATE, msg.state),
        prompt_tokens=msg.prompt_tokens,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        drafter=msg.drafter,
        verifier=msg.verifier,
        summary=summary_from_pb(msg.summary) if msg.HasField("summary") else None,
        created_unix_ns=msg.created_unix_ns,
        error=msg.error or None,
        turns=msg.turns,
        placement=msg.placement,
        failovers=msg.failovers,
        updated_unix_ns=msg.updated_unix_ns,
    )


class Collector:
    """Folds a stream's chunks into a GenerationResult."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._ids: list[int] = []
        self._session_id = ""
        self._summary: Summary | None = None
        self._chunks = 0

    def add(self, chunk: Chunk) -> None:
        self._chunks += 1
        self._text.append(chunk.text)
        self._ids.extend(chunk.token_ids)
        self._session_id = chunk.session_id or self._session_id
        if chunk.summary is not None:
            self._summary = chunk.summary

    def result(self) -> GenerationResult:
        if self._summary is None:
            raise Internal(
                grpc.StatusCode.INTERNAL,
                f"the Generate stream ended after {self._chunks} responses without a summary",
            )
        return GenerationResult(
            session_id=self._session_id,
            text="".join(self._text),
            token_ids=self._ids,
            finish_reason=self._summary.finish_reason,
            summary=self._summary,
            chunks=self._chunks,
        )
