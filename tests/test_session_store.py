"""The SessionStore contract on both stores (MemorySessionStore, RedisSessionStore on a real
redis-server), plus what only Redis has: router replicas sharing one Redis and racing to
append, TTL expiry, Redis killed and restarted (with and without an append-only file), AUTH
and TLS. No mocks: every Redis here is a real redis-server bound to 127.0.0.1."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from coralline.engine import Summary
from coralline.session import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    MemorySessionStore,
    SessionConflict,
    SessionRecord,
    StoreUnavailable,
)
from coralline.session_redis import RedisSessionStore, redact_url

from .redis_servers import OwnRedis, own_redis

# helpers: stores and records


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


def _summary(**over) -> Summary:
    base = dict(
        tokens=5,
        rounds=2,
        acceptance_length=2.5,
        tokens_per_second=41.5,
        prefill_ms=3.25,
        draft_ms=1.5,
        verify_ms=7.0,
        finish_reason="eos",
        verifier="traversal",
        drafter="coral",
        seed=1234,
        prompt_tokens=3,
        fallback_rounds=1,
    )
    return Summary(**{**base, **over})


def _record(sid: str = "s1", **over) -> SessionRecord:
    base = dict(
        session_id=sid,
        prompt_tokens=3,
        drafter="coral",
        prompt_ids=[10, 11, 12],
        sampling={"temperature": 0.8, "top_p": 0.9, "seed": 7},
    )
    return SessionRecord(**{**base, **over})


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request) -> Iterator[Callable[..., object]]:
    """make_store(ttl_s=None) -> a fresh, empty store of the parametrized kind."""
    made: list[RedisSessionStore] = []

    def make(ttl_s: float | None = None):
        if request.param == "memory":
            return MemorySessionStore(ttl_s=ttl_s)
        url = request.getfixturevalue("redis_url")
        kwargs = {} if ttl_s is None else {"ttl_s": ttl_s}
        store = RedisSessionStore(url, prefix=_prefix(), **kwargs)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


# the contract, on both stores


def test_create_and_get_are_copies(store):
    rec = _record(token_ids=[1, 2], text="ab", summary=None)
    store.create(rec)
    rec.token_ids.append(99)  # the caller's record is not the stored one
    rec.sampling["temperature"] = 0.0
    got = store.get("s1")
    assert got is not None
    assert got.token_ids == [1, 2] and got.text == "ab"
    assert got.sampling == {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    assert (got.prompt_ids, got.prompt_tokens, got.drafter) == ([10, 11, 12], 3, "coral")
    assert (got.state, got.turns, got.holder, got.cancel_requested) == (RUNNING, 1, "", False)
    assert got.created_unix_ns == rec.created_unix_ns
    got.token_ids.append(5)
    got.sampling["seed"] = 0
    got.prompt_ids.clear()
    got.state = FAILED
    again = store.get("s1")
    assert again.token_ids == [1, 2] and again.sampling["seed"] == 7
    assert again.prompt_ids == [10, 11, 12] and again.state == RUNNING
    assert store.get("nope") is None


def test_create_refuses_a_running_session_and_replaces_an_ended_one(store):
    store.create(_record())
    with pytest.raises(KeyError):
        store.create(_record(drafter="other"))
    store.finish("s1", FINISHED)
    store.create(_record(drafter="other", token_ids=[4]))
    got = store.get("s1")
    assert (got.state, got.drafter, got.token_ids) == (RUNNING, "other", [4])
    with pytest.raises(ValueError):
        store.create(_record("s2", state="weird"))


def test_append_returns_lengths_and_guards_the_length(store):
    store.create(_record())
    before = store.get("s1").updated_unix_ns
    assert store.append("s1", [5, 6], "Hé") == 2
    assert store.append("s1", [], "") == 2  # a heartbeat
    assert store.append("s1", [7], "你好", expected_len=2) == 3
    with pytest.raises(SessionConflict) as err:
        store.append("s1", [8], "x", expected_len=2)
    assert err.value.committed == 3
    with pytest.raises(SessionConflict):
        store.append("s1", [8], "x", expected_len=4)
    got = store.get("s1")
    assert got.token_ids == [5, 6, 7] and got.text == "Hé你好"  # nothing from the conflicts
    assert got.updated_unix_ns > before
    with pytest.raises(ValueError):
        store.append("s1", [-1], "")
    with pytest.raises(ValueError):
        store.append("s1", [2**31], "")
    assert store.append("s1", [2**31 - 1], "") == 4


def test_append_to_an_unknown_or_ended_session_is_a_key_error(store):
    with pytest.raises(KeyError):
        store.append("nope", [1], "a")
    store.create(_record())
    store.finish("s1", CANCELLED)
    with pytest.raises(KeyError):
        store.append("s1", [1], "a")
    with pytest.raises(KeyError):
        store.append("s1", [1], "a", expected_len=0)


def test_finish_keeps_a_real_summary_and_is_a_no_op_when_not_running(store):
    store.create(_record())
    store.append("s1", [1, 2, 3], "abc")
    summary = _summary()
    store.finish("s1", FINISHED, summary)
    got = store.get("s1")
    assert got.state == FINISHED and got.error == ""
    assert isinstance(got.summary, Summary) and got.summary == summary
    assert got.token_ids == [1, 2, 3] and got.text == "abc"
    store.finish("s1", FAILED, None, "late")  # already ended: ignored
    assert store.get("s1").state == FINISHED and store.get("s1").summary == summary
    store.finish("nope", FAILED)  # unknown: ignored
    assert store.get("nope") is None
    store.create(_record("s2"))
    store.finish("s2", FAILED, error="RuntimeError: boom")
    got = store.get("s2")
    assert (got.state, got.error, got.summary) == (FAILED, "RuntimeError: boom", None)
    with pytest.raises(ValueError):
        store.finish("s2", RUNNING)


def test_update_sets_only_the_whitelisted_fields(store):
    store.create(_record())
    before = store.get("s1").updated_unix_ns
    store.update(
        "s1",
        placement="10.0.0.1:50051",
        drafter_address="10.0.0.2:50052",
        holder="10.0.0.1:50051",
        cached_tokens=42,
        failovers=1,
        verifier="traversal",
        sampling={"temperature": 0.0},
    )
    got = store.get("s1")
    assert (got.placement, got.drafter_address, got.holder) == (
        "10.0.0.1:50051",
        "10.0.0.2:50052",
        "10.0.0.1:50051",
    )
    assert (got.cached_tokens, got.failovers, got.verifier) == (42, 1, "traversal")
    assert got.sampling == {"temperature": 0.0}
    assert got.updated_unix_ns > before
    for bad in ("state", "token_ids", "text", "turns", "cancel_requested", "summary", "nope"):
        with pytest.raises(ValueError):
            store.update("s1", **{bad: "x"})
    with pytest.raises(TypeError):
        store.update("s1", cached_tokens="12")
    with pytest.raises(KeyError):
        store.update("nope", holder="x")
    store.finish("s1", FINISHED)
    store.update("s1", holder="10.0.0.3:50051")  # ended sessions keep their metadata
    assert store.get("s1").holder == "10.0.0.3:50051"
    assert store.get("s1").state == FINISHED


def test_begin_turn_reopens_an_ended_session(store):
    store.create(_record())
    store.append("s1", [1, 2], "ab")
    store.update("s1", holder="v1", cached_tokens=5, placement="v1", failovers=2)
    with pytest.raises(SessionConflict):
        store.begin_turn("s1", [1], {}, "coral")  # still running
    store.request_cancel("s1")
    store.finish("s1", CANCELLED, _summary(), "cancelled")
    rec = store.begin_turn("s1", [10, 11, 12, 1, 2, 13], {"temperature": 0.5}, "plain")
    for got in (rec, store.get("s1")):
        assert (got.state, got.turns, got.drafter) == (RUNNING, 2, "plain")
        assert got.prompt_ids == [10, 11, 12, 1, 2, 13] and got.prompt_tokens == 6
        assert got.sampling == {"temperature": 0.5}
        assert (got.token_ids, got.text, got.summary, got.error) == ([], "", None, "")
        assert got.cancel_requested is False
        assert (got.holder, got.cached_tokens) == ("v1", 5)  # the cache still holds the history
        assert (got.placement, got.drafter_address, got.failovers) == ("", "", 0)  # per turn
    assert "s1" in store.running()
    assert store.append("s1", [3], "c", expected_len=0) == 1
    store.finish("s1", FINISHED)
    assert store.begin_turn("s1", [1], {}, "coral").turns == 3
    with pytest.raises(KeyError):
        store.begin_turn("nope", [1], {}, "coral")


def test_release_holder_is_a_compare_and_set(store):
    store.create(_record())
    store.update("s1", holder="v1", cached_tokens=9)
    store.release_holder("s1", "v2")  # another verifier's eviction: not ours
    assert (store.get("s1").holder, store.get("s1").cached_tokens) == ("v1", 9)
    store.release_holder("s1", "v1")
    assert (store.get("s1").holder, store.get("s1").cached_tokens) == ("", 0)
    store.release_holder("s1", "")  # nothing to compare with
    store.release_holder("nope", "v1")  # unknown: ignored
    assert store.get("nope") is None


def test_request_cancel_and_cancel_requested(store):
    assert store.cancel_requested("nope") is False
    with pytest.raises(KeyError):
        store.request_cancel("nope")
    store.create(_record())
    assert store.cancel_requested("s1") is False
    assert store.request_cancel("s1") is True
    assert store.cancel_requested("s1") is True
    assert store.get("s1").state == RUNNING  # a request, not a state change
    store.finish("s1", CANCELLED)
    assert store.request_cancel("s1") is False


def test_running_lists_the_running_sessions(store):
    assert store.running() == []
    for sid in ("a", "b", "c"):
        store.create(_record(sid))
    store.finish("b", FINISHED)
    assert sorted(store.running()) == ["a", "c"]
    store.begin_turn("b", [1], {}, "coral")
    store.finish("a", FAILED)
    assert sorted(store.running()) == ["b", "c"]
    store.create(_record("d", state=FINISHED))  # created ended: not running
    assert sorted(store.running()) == ["b", "c"]


def test_records_expire_one_ttl_after_their_last_write(make_store):
    store = make_store(ttl_s=1.0)
    store.create(_record("kept"))
    store.create(_record("dropped"))
    store.create(_record("ended"))
    store.finish("ended", FINISHED, _summary())
    time.sleep(0.7)
    store.append("kept", [1], "a")  # a write in between keeps it alive
    time.sleep(0.7)
    assert store.get("kept") is not None
    assert store.get("dropped") is None and store.get("ended") is None
    assert store.running() == ["kept"]
    time.sleep(1.5)
    assert store.get("kept") is None
    assert store.running() == []
    assert store.cancel_requested("kept") is False
    with pytest.raises(KeyError):
        store.append("kept", [2], "b")


def test_memory_history_is_bounded():
    store = MemorySessionStore(history=2)
    for sid in ("a", "b", "c"):
        store.create(_record(sid))
        store.finish(sid, FINISHED)
    assert store.get("a") is None and store.get("b") and store.get("c")
    store.create(_record("live"))
    assert store.get("live") is not None  # running records do not count
    with pytest.raises(ValueError):
        MemorySessionStore(history=-1)
    with pytest.raises(ValueError):
        MemorySessionStore(ttl_s=0)


# Redis only: replicas, layout details, outages, AUTH, TLS


@pytest.mark.redis
def test_two_replicas_share_sessions(redis_url):
    prefix = _prefix()
    one = RedisSessionStore(redis_url, prefix=prefix)
    two = RedisSessionStore(redis_url, prefix=prefix)
    try:
        one.create(_record())
        assert two.get("s1").prompt_ids == [10, 11, 12]
        assert two.append("s1", [1], "a", expected_len=0) == 1
        assert one.running() == two.running() == ["s1"]
        assert two.request_cancel("s1") and one.cancel_requested("s1")
        one.finish("s1", CANCELLED, _summary(finish_reason="length"))
        got = two.get("s1")
        assert got.state == CANCELLED and got.summary.finish_reason == "length"
        assert got.token_ids == [1]
    finally:
        one.close()
        two.close()


@pytest.mark.redis
def test_racing_replicas_never_duplicate_or_skip_tokens(redis_url):
    prefix = _prefix()
    stores = [RedisSessionStore(redis_url, prefix=prefix) for _ in range(2)]
    stores[0].create(_record())
    rounds = 60
    barrier = threading.Barrier(2)
    wins: list[list[int]] = [[], []]
    conflicts = [0, 0]

    def writer(k: int) -> None:
        for r in range(rounds):
            barrier.wait()
            token = 1000 * (k + 1) + r
            try:
                stores[k].append("s1", [token], f"<{token}>", expected_len=r)
                wins[k].append(r)
            except SessionConflict as e:
                assert e.committed == r + 1
                conflicts[k] += 1

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(wins[0] + wins[1]) == list(range(rounds))  # exactly one winner per round
        assert sum(conflicts) == rounds
        got = stores[1].get("s1")
        assert len(got.token_ids) == rounds
        assert [t % 1000 for t in got.token_ids] == list(range(rounds))  # no gap, no duplicate
        assert got.text == "".join(f"<{t}>" for t in got.token_ids)  # text agrees with ids
    finally:
        for s in stores:
            s.close()


@pytest.mark.redis
def test_many_writers_retrying_on_conflict_commit_every_token_once(redis_url):
    prefix = _prefix()
    stores = [RedisSessionStore(redis_url, prefix=prefix) for _ in range(4)]
    stores[0].create(_record())
    per_writer = 25

    def writer(k: int) -> None:
        store = stores[k]
        for i in range(per_writer):
            token = 100 * k + i
            while True:
                n = len(store.get("s1").token_ids)
                try:
                    store.append("s1", [token], f"{token},", expected_len=n)
                    break
                except SessionConflict:
                    continue

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        got = stores[0].get("s1").token_ids
        assert sorted(got) == sorted(100 * k + i for k in range(4) for i in range(per_writer))
        for k in range(4):  # each writer's tokens in its own order
            mine = [t for t in got if t // 100 == k]
            assert mine == sorted(mine)
        assert stores[0].get("s1").text == "".join(f"{t}," for t in got)
    finally:
        for s in stores:
            s.close()


@pytest.mark.redis
def test_redis_layout_ttls_and_unknown_summary_keys(redis_url):
    prefix = _prefix()
    store = RedisSessionStore(redis_url, prefix=prefix, ttl_s=100.0)
    raw = redis.Redis.from_url(redis_url)
    try:
        store.create(_record())
        store.append("s1", [1, 258], "ab")
        base = f"{prefix}s1"
        assert raw.get(f"{base}:ids") == (1).to_bytes(4, "little") + (258).to_bytes(4, "little")
        assert raw.get(f"{base}:text") == b"ab"
        assert raw.hget(base, "state") == b'"running"'
        assert raw.smembers(f"{prefix}running") == {b"s1"}
        for key in (base, f"{base}:ids", f"{base}:text", f"{prefix}running"):
            assert 90_000 < raw.pttl(key) <= 100_000
        # a summary written by a newer version: unknown keys are ignored
        store.finish("s1", FINISHED, _summary())
        raw.hset(base, "summary", raw.hget(base, "summary")[:-1] + b', "future_field": 1}')
        raw.hset(base, "future_record_field", b'"x"')
        assert store.get("s1").summary == _summary()
        # a member whose hash is gone is pruned from the running set
        store.create(_record("gone"))
        raw.delete(f"{prefix}gone")
        assert store.running() == []
        assert raw.smembers(f"{prefix}running") == set()
    finally:
        store.close()
        raw.close()


def test_redact_url_hides_the_password():
    assert redact_url("redis://:secret@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://u:p%40ss@[::1]:6380/2?x=1") == "rediss://u:***@[::1]:6380/2?x=1"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.redis
def test_killed_redis_is_unavailable_fast_and_usable_again_after_restart(tmp_path):
    with own_redis(tmp_path, "--appendonly", "no") as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        store = RedisSessionStore(url, socket_timeout_s=1.0)
        try:
            store.create(_record())
            assert store.append("s1", [1, 2], "ab", expected_len=0) == 2
            server.kill9()
            for call in (
                lambda: store.append("s1", [3], "c", expected_len=2),
                lambda: store.get("s1"),
                store.running,
            ):
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable, match=f"127.0.0.1:{server.port}"):
                    call()
                assert time.monotonic() - t0 < 1.0  # within the socket timeout, not a hang
            server.start()  # same port, nothing was persisted
            assert store.get("s1") is None  # gone entirely, never half-written
            assert store.running() == []
            with pytest.raises(KeyError):
                store.append("s1", [3], "c")
            store.create(_record())  # the scripts are loaded again by themselves
            assert store.append("s1", [3], "c", expected_len=0) == 1
            server.kill9()
            server.start()  # restarted while the client was idle: its pooled socket is dead
            assert store.get("s1") is None
        finally:
            store.close()


@pytest.mark.redis
def test_a_hung_redis_times_out_within_the_socket_timeout(tmp_path):
    with own_redis(tmp_path, "--appendonly", "no") as server:
        store = RedisSessionStore(f"redis://127.0.0.1:{server.port}/0", socket_timeout_s=0.5)
        try:
            store.create(_record())
            server.proc.send_signal(signal.SIGSTOP)  # accepts nothing, answers nothing
            try:
                t0 = time.monotonic()
                with pytest.raises(StoreUnavailable, match="Timeout"):
                    store.get("s1")
                assert 0.4 < time.monotonic() - t0 < 1.5
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert store.get("s1").state == RUNNING  # and usable again
        finally:
            store.close()


@pytest.mark.redis
def test_redis_with_an_append_only_file_keeps_the_session_across_a_kill(tmp_path):
    aof = ("--appendonly", "yes", "--appendfsync", "always")
    with own_redis(tmp_path, *aof) as server:
        store = RedisSessionStore(f"redis://127.0.0.1:{server.port}/0", socket_timeout_s=1.0)
        try:
            store.create(_record())
            store.append("s1", [1, 2], "ab", expected_len=0)
            store.update("s1", holder="v1", cached_tokens=5)
            server.kill9()
            with pytest.raises(StoreUnavailable):
                store.get("s1")
            server.start()
            got = store.get("s1")
            assert got is not None and got.state == RUNNING
            assert (got.token_ids, got.text) == ([1, 2], "ab")
            assert (got.holder, got.cached_tokens) == ("v1", 5)
            assert store.running() == ["s1"]
            assert store.append("s1", [3], "c", expected_len=2) == 3
            with pytest.raises(SessionConflict):
                store.append("s1", [3], "c", expected_len=2)
            assert store.get("s1").token_ids == [1, 2, 3]
        finally:
            store.close()


@pytest.mark.redis
def test_auth_through_the_url(tmp_path):
    with own_redis(tmp_path, "--appendonly", "no", "--requirepass", "secret") as server:
        good = RedisSessionStore(f"redis://:secret@127.0.0.1:{server.port}/0")
        bad = RedisSessionStore(f"redis://:wrong@127.0.0.1:{server.port}/0")
        none = RedisSessionStore(f"redis://127.0.0.1:{server.port}/0")
        try:
            good.create(_record())
            assert good.append("s1", [1], "a") == 1
            for store in (bad, none):
                with pytest.raises(StoreUnavailable, match="authentication failed") as err:
                    store.get("s1")
                assert "secret" not in str(err.value) and "wrong" not in str(err.value)
            with pytest.raises(StoreUnavailable, match=r"redis://:\*\*\*@127\.0\.0\.1"):
                bad.running()
        finally:
            for store in (good, bad, none):
                store.close()


def _tls_files(folder: Path) -> dict[str, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1, made with openssl."""
    files = {n: folder / f"{n}" for n in ("ca.key", "ca.crt", "server.key", "server.csr")}
    files["server.crt"] = folder / "server.crt"
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def openssl(*args: str | Path) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
            "-keyout", files["ca.key"], "-out", files["ca.crt"])  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", files["server.key"], "-out", files["server.csr"])  # fmt: skip
    openssl("x509", "-req", "-in", files["server.csr"], "-CA", files["ca.crt"],
            "-CAkey", files["ca.key"], "-CAcreateserial", "-days", "1",
            "-out", files["server.crt"], "-extfile", ext)  # fmt: skip
    return files


@pytest.mark.redis
def test_tls_through_a_rediss_url(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("TLS test needs the openssl command (not installed)")
    files = _tls_files(tmp_path)
    tls_args = (
        "--appendonly", "no", "--tls-auth-clients", "no",
        "--tls-cert-file", str(files["server.crt"]), "--tls-key-file", str(files["server.key"]),
        "--tls-ca-cert-file", str(files["ca.crt"]),
    )  # fmt: skip
    server = OwnRedis(tmp_path, *tls_args, tls=True)
    server.probe_url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={files['ca.crt']}"
    try:
        server.start()
    except RuntimeError as e:
        if "tls" in str(e).lower():
            pytest.skip(f"this redis-server was built without TLS support: {e}")
        raise
    port = server.port
    verified = RedisSessionStore(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={files['ca.crt']}")
    unverified = RedisSessionStore(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    untrusted = RedisSessionStore(f"rediss://127.0.0.1:{port}/0", socket_timeout_s=1.0)
    plain = RedisSessionStore(f"redis://127.0.0.1:{port}/0", socket_timeout_s=1.0)
    try:
        verified.create(_record())
        assert verified.append("s1", [1, 2], "ab", expected_len=0) == 2
        assert unverified.get("s1").token_ids == [1, 2]
        with pytest.raises(StoreUnavailable, match="certificate verify failed"):
            untrusted.get("s1")  # the CA is not in the system store
        with pytest.raises(StoreUnavailable):
            plain.get("s1")  # plaintext to a TLS port
    finally:
        for store in (verified, unverified, untrusted, plain):
            store.close()
        server.stop()
