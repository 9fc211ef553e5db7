"""RedisSessionStore: the `SessionStore` protocol in Redis, shared by router replicas.

Layout, for session id S under `prefix` P (default "coralline:session:"):

    P<S>          hash: one field per SessionRecord field but token_ids and text, each value JSON
                  (state '"running"', summary = dataclasses.asdict(engine.Summary) or null)
    P<S>:ids      string: the committed token ids, little-endian int32, grown with APPEND
    P<S>:text     string: the committed text (UTF-8), grown with APPEND
    Prunning      set: the ids of the RUNNING sessions (members whose hash has expired are
                  pruned by running())

Every write runs as one Lua script (atomic: two replicas never interleave a check and its
write), sets `updated_unix_ns` and PEXPIREs the three keys of the session to `ttl_s`, so an
abandoned session disappears one TTL after its last write while a running one (written every
round) lives on. Ended records are bounded by the TTL only (there is no `history`). Reads
(`get`) are one MULTI/EXEC of HGETALL + GET + GET, so a record is never seen half-written.

Connection failures (refused, timeout, Redis loading its data, failed authentication) raise
`StoreUnavailable` naming the URL without its password. Writes are not retried by the client:
a write whose reply was lost may have been applied, and a guarded `append` retried by the
caller then finds the new length (`SessionConflict.committed`). redis-py reconnects by itself
on the next call once Redis is back. The URL carries AUTH and TLS as redis-py reads it
(redis://user:pass@host:port/db, rediss://...?ssl_ca_certs=... for TLS).

Knows nothing about models or gRPC; not for Redis Cluster (the running set is one shared key).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from coralline.session import (
    ENDED,
    RUNNING,
    SessionConflict,
    SessionRecord,
    StoreUnavailable,
    validate_state,
    validate_token_ids,
    validate_update,
)

log = logging.getLogger("coralline.session")

_BLOB_FIELDS = ("token_ids", "text")  # kept in their own keys, not in the hash
_FIELDS = tuple(f.name for f in dataclasses.fields(SessionRecord) if f.name not in _BLOB_FIELDS)
_RUNNING_JSON = json.dumps(RUNNING)

# Lua shared by every write script. KEYS: hash, ids, text, running set.
# ARGV[1] ttl in ms, ARGV[2] now (ns, JSON), ARGV[3] session id; the rest per script.
_LUA_COMMON = """
local function touch()
  redis.call('HSET', KEYS[1], 'updated_unix_ns', ARGV[2])
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
end
local function add_running()
  redis.call('SADD', KEYS[4], ARGV[3])
  if redis.call('PTTL', KEYS[4]) < tonumber(ARGV[1]) then
    redis.call('PEXPIRE', KEYS[4], ARGV[1])
  end
end
"""

# ARGV[4] ids, ARGV[5] text, ARGV[6] "1" if running, ARGV[7..] hash field/value pairs
_CREATE = """
if redis.call('HGET', KEYS[1], 'state') == '"running"' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('SET', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5])
if ARGV[6] == '1' then add_running() else redis.call('SREM', KEYS[4], ARGV[3]) end
touch()
return 1
"""

# ARGV[4] ids, ARGV[5] text, ARGV[6] expected length (-1: unguarded)
# returns {new length} | {-1} unknown | {-2} not running | {-3, committed length} conflict
_APPEND = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
if state ~= '"running"' then return {-2} end
local n = math.floor(redis.call('STRLEN', KEYS[2]) / 4)
local expected = tonumber(ARGV[6])
if expected >= 0 and expected ~= n then return {-3, n} end
redis.call('APPEND', KEYS[2], ARGV[4])
redis.call('APPEND', KEYS[3], ARGV[5])
add_running()
touch()
return {n + math.floor(string.len(ARGV[4]) / 4)}
"""

# ARGV[4..] hash field/value pairs (state, summary, error); returns 1 if it was running
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= '"running"' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SREM', KEYS[4], ARGV[3])
touch()
return 1
"""

# ARGV[4..] hash field/value pairs; returns 0 for an unknown session
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #ARGV >= 4 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
touch()
return 1
"""

# ARGV[4..] hash field/value pairs of the new turn
# returns {-1} unknown | {-2} running | {1, HGETALL of the new record}
_BEGIN_TURN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {-1} end
if state == '"running"' then return {-2} end
local turns = tonumber(redis.call('HGET', KEYS[1], 'turns') or '1') + 1
redis.call('HSET', KEYS[1], 'turns', string.format('%d', turns), unpack(ARGV, 4))
redis.call('SET', KEYS[2], '')
redis.call('SET', KEYS[3], '')
add_running()
touch()
return {1, redis.call('HGETALL', KEYS[1])}
"""

# ARGV[4] the holder (JSON); returns 1 if it was released
_RELEASE_HOLDER = """
if redis.call('HGET', KEYS[1], 'holder') ~= ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'holder', '""', 'cached_tokens', '0')
touch()
return 1
"""

# returns -1 unknown | 0 not running | 1 flag set
_REQUEST_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return -1 end
if state ~= '"running"' then return 0 end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
touch()
return 1
"""

# KEYS[1] the running set, KEYS[2..] hashes of members found stale, ARGV their ids: removes a
# member only if its hash is still gone (another replica may have just re-created it)
_PRUNE = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""
_RUNNING_BYTES = _RUNNING_JSON.encode()


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def pack_ids(token_ids: list[int]) -> bytes:
    return struct.pack(f"<{len(token_ids)}i", *token_ids)


def unpack_ids(data: bytes | None) -> list[int]:
    if not data:
        return []
    return list(struct.unpack(f"<{len(data) // 4}i", data[: len(data) // 4 * 4]))


def summary_to_json(summary: object | None) -> str:
    """JSON of an engine.Summary (dataclasses.asdict) or null."""
    if summary is None:
        return "null"
    if not dataclasses.is_dataclass(summary) or isinstance(summary, type):
        raise TypeError(f"summary must be a dataclass instance, got {type(summary).__name__}")
    return json.dumps(dataclasses.asdict(summary))


def summary_from_json(value: object) -> object | None:
    """engine.Summary(**known fields) from its decoded JSON (unknown keys ignored); None if
    absent or if a field the running code requires is missing (logged)."""
    if value is None:
        return None
    from coralline.engine import Summary  # lazily: the engine pulls in torch

    known = {f.name for f in dataclasses.fields(Summary)}
    try:
        return Summary(**{k: v for k, v in dict(value).items() if k in known})
    except TypeError as e:
        log.warning("ignoring a stored summary that does not fit engine.Summary: %s", e)
        return None


def _encode(name: str, value: object) -> str:
    return summary_to_json(value) if name == "summary" else json.dumps(value)


def _pairs(fields: dict[str, object]) -> list[str]:
    out: list[str] = []
    for name, value in fields.items():
        out += [name, _encode(name, value)]
    return out


def _decode_hash(raw: dict[bytes, bytes] | list[bytes]) -> dict[str, object]:
    if isinstance(raw, list):  # a Lua HGETALL: flat field, value, field, value...
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    out: dict[str, object] = {}
    for key, value in raw.items():
        name = key.decode()
        if name in _FIELDS:  # fields a newer writer added are ignored
            decoded = json.loads(value)
            out[name] = summary_from_json(decoded) if name == "summary" else decoded
    return out


class RedisSessionStore:
    """Session records in Redis (layout in the module docstring); thread-safe, and any number
    of instances (router replicas) may share one Redis and prefix."""

    def __init__(
        self,
        url: str,
        ttl_s: float = 3600.0,
        prefix: str = "coralline:session:",
        socket_timeout_s: float = 2.0,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be > 0")
        if not socket_timeout_s > 0:
            raise ValueError("socket_timeout_s must be > 0")
        self.url, self.ttl_s, self.prefix = redact_url(url), ttl_s, prefix
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),  # writes are not idempotent: never resend one
        )
        scripts = {
            "create": _CREATE,
            "append": _APPEND,
            "finish": _FINISH,
            "update": _UPDATE,
            "begin_turn": _BEGIN_TURN,
            "release_holder": _RELEASE_HOLDER,
            "request_cancel": _REQUEST_CANCEL,
        }
        self._scripts = {
            name: self.client.register_script(_LUA_COMMON + body) for name, body in scripts.items()
        }
        self._prune = self.client.register_script(_PRUNE)

    def close(self) -> None:
        self.client.close()

    # internals

    def _keys(self, session_id: str) -> list[str]:
        base = f"{self.prefix}{session_id}"
        return [base, f"{base}:ids", f"{base}:text", f"{self.prefix}running"]

    @contextlib.contextmanager
    def _reachable(self, op: str) -> Iterator[None]:
        try:
            yield
        except redis.AuthenticationError as e:
            raise StoreUnavailable(
                f"session store {self.url}: authentication failed during {op} ({e})"
            ) from e
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as e:
            raise StoreUnavailable(
                f"session store {self.url} unavailable during {op}: {type(e).__name__}: {e}"
            ) from e

    def _run(self, name: str, session_id: str, *args: object) -> object:
        argv = [self._ttl_ms, str(time.time_ns()), session_id, *args]
        with self._reachable(name):
            return self._scripts[name](keys=self._keys(session_id), args=argv)

    # the protocol

    def create(self, record: SessionRecord) -> None:
        validate_state(record.state)
        ids = validate_token_ids(record.token_ids)
        meta = {name: getattr(record, name) for name in _FIELDS}
        meta["updated_unix_ns"] = time.time_ns()
        running = "1" if record.state == RUNNING else "0"
        ok = self._run(
            "create", record.session_id, pack_ids(ids), record.text, running, *_pairs(meta)
        )
        if not ok:
            raise KeyError(f"session {record.session_id!r} is already running")

    def get(self, session_id: str) -> SessionRecord | None:
        hash_key, ids_key, text_key, _ = self._keys(session_id)
        with self._reachable("get"):
            pipe = self.client.pipeline(transaction=True)
            pipe.hgetall(hash_key).get(ids_key).get(text_key)
            meta, ids, text = pipe.execute()
        if not meta:
            return None
        fields = _decode_hash(meta)
        return SessionRecord(
            **fields, token_ids=unpack_ids(ids), text=(text or b"").decode("utf-8", "replace")
        )

    def append(
        self, session_id: str, token_ids: list[int], text: str, expected_len: int | None = None
    ) -> int:
        ids = validate_token_ids(token_ids)
        if expected_len is not None and expected_len < 0:
            raise ValueError("expected_len must be >= 0")
        guard = -1 if expected_len is None else expected_len
        out = self._run("append", session_id, pack_ids(ids), text, guard)
        code = out[0]
        if code == -1:
            raise KeyError(f"unknown session {session_id!r}")
        if code == -2:
            raise KeyError(f"session {session_id!r} is not running")
        if code == -3:
            raise SessionConflict(
                f"session {session_id!r} has {out[1]} committed tokens, not {expected_len}",
                out[1],
            )
        return code

    def finish(self, session_id: str, state: str, summary=None, error: str = "") -> None:
        validate_state(state, ENDED)
        pairs = _pairs({"state": state, "summary": summary, "error": error})
        self._run("finish", session_id, *pairs)

    def update(self, session_id: str, **fields) -> None:
        validate_update(fields)
        if not self._run("update", session_id, *_pairs(fields)):
            raise KeyError(f"unknown session {session_id!r}")

    def begin_turn(
        self, session_id: str, prompt_ids: list[int], sampling: dict, drafter: str
    ) -> SessionRecord:
        prompt = validate_token_ids(prompt_ids)
        turn = {
            "state": RUNNING,
            "prompt_ids": prompt,
            "prompt_tokens": len(prompt),
            "sampling": sampling,
            "drafter": drafter,
            "summary": None,
            "error": "",
            "cancel_requested": False,
            "placement": "",
            "drafter_address": "",
            "failovers": 0,
        }
        out = self._run("begin_turn", session_id, *_pairs(turn))
        if out[0] == -1:
            raise KeyError(f"unknown session {session_id!r}")
        if out[0] == -2:
            raise SessionConflict(f"session {session_id!r} is still running")
        return SessionRecord(**_decode_hash(out[1]))

    def release_holder(self, session_id: str, holder: str) -> None:
        if holder:
            self._run("release_holder", session_id, json.dumps(holder))

    def request_cancel(self, session_id: str) -> bool:
        out = self._run("request_cancel", session_id)
        if out == -1:
            raise KeyError(f"unknown session {session_id!r}")
        return out == 1

    def cancel_requested(self, session_id: str) -> bool:
        with self._reachable("cancel_requested"):
            raw = self.client.hget(self._keys(session_id)[0], "cancel_requested")
        return raw is not None and json.loads(raw) is True

    def running(self) -> list[str]:
        running_key = f"{self.prefix}running"
        with self._reachable("running"):
            members = sorted(m.decode() for m in self.client.smembers(running_key))
            if not members:
                return []
            pipe = self.client.pipeline(transaction=False)
            for sid in members:
                pipe.hget(self._keys(sid)[0], "state")
            states = pipe.execute()
            stale = [sid for sid, st in zip(members, states, strict=True) if st is None]
            if stale:
                hashes = [self._keys(sid)[0] for sid in stale]
                self._prune(keys=[running_key, *hashes], args=stale)
        return [sid for sid, st in zip(members, states, strict=True) if st == _RUNNING_BYTES]
