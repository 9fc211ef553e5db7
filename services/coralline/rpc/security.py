"""Who may talk to a coralline server: TLS and mutual TLS from certificate files, bearer tokens.

- `TlsConfig`: this process's certificate and key, and the CA its peers' certificates must be
  signed by. A server with a CA requires and verifies client certificates (mutual TLS: the
  internal links router <-> verifier <-> drafter); without one it is plain TLS (the public port,
  whose clients only hold the CA). A channel with a CA verifies the server against it and
  presents its own certificate. `coralline certs` makes a development CA (rpc/certs.py).
- `load_tokens`: the bearer tokens a public API accepts, from a file (one per line, `#`
  comments) and / or an environment variable (comma-separated). Tokens are secrets: they are
  never logged or shown in a repr.
- `BearerAuth`: a server interceptor; calls to the protected services must carry
  `authorization: Bearer <token>` equal to one of the tokens (compared in constant time against
  every token), else UNAUTHENTICATED. The health service stays open (probes carry no token).

Knows nothing about what the services do.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

TOKENS_ENV = "CORALLINE_API_TOKENS"
MIN_TOKEN_CHARS = 16  # shorter tokens are guessable; refused at start-up


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read the {what} {path!r}: {e.strerror or e}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"the {what} {path!r} is not PEM")
    return data


@dataclass(frozen=True)
class TlsConfig:
    cert: str  # PEM certificate chain of this process
    key: str  # PEM private key of that certificate
    ca: str | None = None  # PEM CA certificate(s) the peers' certificates must chain to:
    # a server then requires client certificates (mutual TLS); a channel verifies the server
    server_name: str | None = None  # the name a channel checks in the server's certificate
    # (default: the host it dials; for an address not among the certificate's names)

    def __post_init__(self) -> None:
        self.files()  # missing or unreadable files fail at start-up, with their path

    def files(self) -> tuple[bytes, bytes, bytes | None]:
        cert = _read(self.cert, "certificate")
        key = _read(self.key, "private key")
        ca = _read(self.ca, "CA certificate") if self.ca else None
        return cert, key, ca

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key, ca = self.files()
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self.files()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    @classmethod
    def from_dir(cls, folder: str, name: str, server_name: str | None = None) -> TlsConfig:
        """`folder`/ca.pem, `folder`/`name`.pem and `folder`/`name`-key.pem (`coralline certs`)."""
        d = Path(folder)
        return cls(
            str(d / f"{name}.pem"), str(d / f"{name}-key.pem"), str(d / "ca.pem"), server_name
        )


def aio_channel(target: str, tls: TlsConfig | None, options: list) -> grpc.aio.Channel:
    """A grpc.aio channel to a coralline server: mutual TLS with `tls`, else insecure."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


def sync_channel(target: str, tls: TlsConfig | None, options: list | None = None) -> grpc.Channel:
    """A blocking channel to a coralline server: mutual TLS with `tls`, else insecure."""
    options = list(options or [])
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(
        target, tls.channel_credentials(), options=[*options, *tls.channel_options()]
    )


# ---------------------------------------------------------------------- bearer tokens
def check_token(token: str, where: str) -> str:
    """The token, if it is long enough and printable ASCII without spaces."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"a token from {where} is shorter than {MIN_TOKEN_CHARS} characters")
    if any(c.isspace() for c in token) or not token.isprintable() or not token.isascii():
        raise ValueError(f"a token from {where} holds spaces or non-printable characters")
    return token


def load_tokens(file: str | None = None, env: str | None = TOKENS_ENV) -> frozenset[str]:
    """The accepted tokens: lines of `file` (blank lines and `#` comments skipped) and the
    comma-separated values of $`env`. Empty when neither is given (auth off)."""
    tokens: set[str] = set()
    if file:
        try:
            text = Path(file).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the token file {file!r}: {e.strerror or e}") from None
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.add(check_token(line, f"{file} line {n}"))
        if not tokens:
            raise ValueError(f"the token file {file!r} holds no token")
    value = os.environ.get(env, "") if env else ""
    for part in value.split(","):
        if part.strip():
            tokens.add(check_token(part.strip(), f"${env}"))
    return frozenset(tokens)


class Tokens:
    """A set of bearer tokens; `accepts` compares in constant time against every one of them
    (no early exit: the time does not say which token, or how much of one, matched)."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(t.encode() for t in tokens)
        if not self._tokens:
            raise ValueError("no bearer tokens given")

    def __repr__(self) -> str:
        return f"Tokens({len(self._tokens)} tokens)"

    def accepts(self, authorization: str | bytes | None) -> bool:
        if isinstance(authorization, bytes):
            try:
                authorization = authorization.decode()
            except UnicodeDecodeError:
                return False
        scheme, _, given_text = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":  # the scheme is case-insensitive (RFC 6750)
            return False
        given = given_text.strip().encode()
        ok = False
        for token in self._tokens:
            ok |= hmac.compare_digest(given, token)
        return ok


HEALTH_SERVICE = "grpc.health.v1.Health"


class BearerAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for calls to `protected` services (full names; None = every service but
    health) without an accepted bearer token."""

    def __init__(self, tokens: Tokens, protected: Iterable[str] | None = None) -> None:
        self.tokens = tokens
        self.protected = frozenset(protected) if protected is not None else None

    def _guards(self, method: str) -> bool:
        service = method.lstrip("/").split("/", 1)[0]
        if self.protected is None:
            return service != HEALTH_SERVICE
        return service in self.protected

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self._guards(details.method):
            return handler
        value = None
        for key, v in details.invocation_metadata or ():
            if key == "authorization":
                value = v
                break
        if self.tokens.accepts(value):
            return handler
        why = "no bearer token" if value is None else "the bearer token is not accepted"
        return _refusal(handler, f"{why}: send 'authorization: Bearer <token>'")


def _refusal(handler, message: str):
    """A handler of the same kind as `handler` that fails with UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (a generator: abort raises first)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return grpc.stream_stream_rpc_method_handler(streaming, **kw)
