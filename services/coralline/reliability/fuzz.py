"""Fuzzing the three gRPC APIs with generated messages (`coralline reliability`).

APIs and what is sent (every case from a seeded RNG, so a failure replays):
  public    Generation/Generate, GetSession, CancelSession on the public port
  verifier  VerifierService/Generate, Cancel, Info on a verifier; and, through `FuzzDrafter`,
            the Proposals a verifier receives: malformed trees, NaN / inf / negative / unnormalised
            rows, wrong rounds, huge trees, tokens outside the vocabulary
  drafter   DrafterService/Draft streams (Open, Commits, Close in random orders and values:
            features of wrong shapes, NaN, absurd dimensions; wrong rounds and lengths), Info
Fields take random and boundary values: empty and huge prompts, negative and huge ids, NaN / inf
sampling, Chinese and emoji text, stop strings, unknown names, and whole messages that do not
parse (random bytes, invalid UTF-8 in a string field, sent as raw bytes on the wire).

Checks, per answer: a status from the API's expected set, with a message when it is an error
(never INTERNAL, UNKNOWN or UNAVAILABLE: those mean a bug or a server down); a greedy request
whose drafter sent garbage still gets the target's own greedy output. After each API: the server
answers its health check and holds no session (its Info; the caller also checks the session
store).

Knows the protos and gRPC; nothing about how the servers work inside.
"""

from __future__ import annotations

import math
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coralline.rpc.protos import (
    common_pb2,
    drafter_pb2,
    drafter_pb2_grpc,
    generation_pb2,
    verifier_pb2,
)

# what a well-behaved server may answer to garbage
EXPECTED = frozenset({
    "OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "ALREADY_EXISTS", "OUT_OF_RANGE", "CANCELLED",
})  # fmt: skip

TEXTS = [
    "Write a haiku about the sea.",
    "请用三句话介绍一下长城。",
    "把下面这句话翻译成英文：我今天很高兴见到你。",
    "Emoji 🐙🌊 and accents: café, naïve, Ångström.",
    "",
    " ",
    "\x00\x01\x02 control characters \x7f",
    "a" * 3000,
    "长" * 2000,
]
FLOATS = [0.0, 0.7, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 1e-9]
INTS = [0, 1, 2, 3, -1, -(2**31), 2**31 - 1, 100_000]
NAMES = ["", "none", "coral", "ngram", "nope", "x" * 500, "coral\x00", "长城"]
VERIFIERS = ["", "traversal", "token", "greedy", "nope", "Traversal"]


@dataclass
class Tally:
    """Outcomes of one API's cases."""

    api: str
    messages: int = 0  # messages sent (a stream counts each of its messages)
    codes: Counter = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)  # unexpected answers (first 20 kept)
    bad_count: int = 0
    seconds: float = 0.0

    def record(self, code: str, details: str, case: str, messages: int = 1) -> None:
        self.messages += messages
        self.codes[code] += 1
        if code not in EXPECTED or (code != "OK" and not details):
            self.fail(f"{case}: {code} {details[:200]!r}")

    def fail(self, why: str) -> None:
        self.bad_count += 1
        if len(self.bad) < 20:
            self.bad.append(why)

    def as_dict(self) -> dict:
        return {
            "api": self.api,
            "messages": self.messages,
            "codes": dict(sorted(self.codes.items())),
            "unexpected": self.bad_count,
            "examples": self.bad,
            "seconds": round(self.seconds, 1),
        }


# ---------------------------------------------------------------------- field values
def _ids(rng: random.Random, vocab: int, cheap: bool = True) -> list[int]:
    r = rng.random()
    if r < 0.55:
        return [rng.randrange(vocab) for _ in range(rng.randint(1, 24))]
    if r < 0.65:
        return []
    if r < 0.8:
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        ids[rng.randrange(len(ids))] = rng.choice([-1, vocab, 2**31 - 1, -(2**31), vocab + 7])
        return ids
    if r < 0.9 or cheap:
        return [vocab - 1, 0] * rng.randint(1, 4)
    return [rng.randrange(vocab) for _ in range(rng.choice([5000, 20000]))]


def _sampling(rng: random.Random, msg: common_pb2.SamplingParams) -> None:
    if rng.random() < 0.5:
        msg.temperature = 0.0  # the common, valid case
    else:
        msg.temperature = rng.choice(FLOATS)
    if rng.random() < 0.3:
        msg.top_k = rng.choice(INTS)
    if rng.random() < 0.3:
        msg.top_p = rng.choice([0.9, 1.0, 0.0, -0.5, 1.5, math.nan, math.inf])
    if rng.random() < 0.4:
        msg.seed = rng.choice([0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1])


def _max_new(rng: random.Random) -> int | None:
    r = rng.random()
    if r < 0.7:
        return rng.randint(1, 4)  # valid and cheap
    if r < 0.8:
        return None  # the default (256): only with a prompt a limit refuses, see below
    return rng.choice([0, -1, -(2**31), 2**31 - 1, 100_000, 5000])


def _stop(rng: random.Random) -> list[str]:
    if rng.random() < 0.8:
        return []
    return rng.sample(["", ".", "\n", "x" * 10_000, "\x00", "长城", "the"], rng.randint(1, 3))


def _unparsable(rng: random.Random, valid: bytes, marker: bytes | None) -> bytes:
    """A message that does not parse: invalid UTF-8 in place of `marker` (same length, so the
    framing stays right), else random bytes."""
    if marker is not None and marker in valid and rng.random() < 0.6:
        bad = bytes([0xFF, 0xFE, 0xC0]) + rng.randbytes(max(0, len(marker) - 3))
        return valid.replace(marker, bad[: len(marker)], 1)
    return rng.randbytes(rng.randint(1, 64))


MARKER = "MARKER-" + "m" * 9  # 16 ASCII bytes replaced by invalid UTF-8


# ---------------------------------------------------------------------- the public API
def public_case(rng: random.Random, vocab: int) -> tuple[str, bytes]:
    """(method, request bytes) for the Generation service."""
    r = rng.random()
    if r < 0.08:
        req = generation_pb2.GetSessionRequest(session_id=rng.choice([*NAMES, "a" * 10_000]))
        return "/coralline.v1.Generation/GetSession", req.SerializeToString()
    if r < 0.14:
        req = generation_pb2.CancelSessionRequest(session_id=rng.choice(NAMES))
        return "/coralline.v1.Generation/CancelSession", req.SerializeToString()
    req = generation_pb2.GenerateRequest()
    marker = None
    if rng.random() < 0.5:
        req.token_ids.ids[:] = _ids(rng, vocab)
    elif rng.random() < 0.1:
        req.text, marker = MARKER, MARKER.encode()
    else:
        req.text = rng.choice(TEXTS)
    if rng.random() < 0.2:
        req.chat_template = rng.random() < 0.5
    _sampling(rng, req.sampling)
    n = _max_new(rng)
    if n is not None:
        req.max_new_tokens = n
    req.stop[:] = _stop(rng)
    if rng.random() < 0.2:
        req.drafter = rng.choice(NAMES)
    if rng.random() < 0.15:
        req.verifier = rng.choice(VERIFIERS)
    if rng.random() < 0.2:
        req.session_id = rng.choice(["", "fuzz-" + str(rng.randrange(50)), "x" * 3000, "长城"])
    if rng.random() < 0.1:
        req.continue_session = True
    data = req.SerializeToString()
    if rng.random() < 0.06:
        data = _unparsable(rng, data, marker)
    return "/coralline.v1.Generation/Generate", data


# ---------------------------------------------------------------------- the verifier API
def verifier_case(rng: random.Random, vocab: int, drafter: str) -> tuple[str, bytes]:
    """(method, request bytes) for VerifierService; `drafter`: a real drafter endpoint."""
    r = rng.random()
    if r < 0.06:
        info = verifier_pb2.VerifierInfoRequest()
        return "/coralline.v1.VerifierService/Info", info.SerializeToString()
    if r < 0.12:
        req = verifier_pb2.CancelRequest(session_id=rng.choice(NAMES))
        return "/coralline.v1.VerifierService/Cancel", req.SerializeToString()
    req = verifier_pb2.VerifyRequest()
    req.prompt_ids[:] = _ids(rng, vocab)
    _sampling(rng, req.sampling)
    n = _max_new(rng)
    if n is not None:
        req.max_new_tokens = n
    req.stop[:] = _stop(rng)
    req.drafter = rng.choice(["", "none", "none", "coral", "nope", "x" * 300])
    if rng.random() < 0.3:
        req.drafter_endpoint = rng.choice([drafter, "127.0.0.1:1", "::::", "x" * 300, ""])
    if rng.random() < 0.15:
        req.verifier = rng.choice(VERIFIERS)
    if rng.random() < 0.2:
        req.session_id = rng.choice(["", "fuzz-v" + str(rng.randrange(20)), "长城", "x" * 3000])
    req.retain = rng.random() < 0.1
    data = req.SerializeToString()
    if rng.random() < 0.05:
        data = _unparsable(rng, data, None)
    return "/coralline.v1.VerifierService/Generate", data


def bad_proposal(rng: random.Random, root: int, rnd: int, vocab: int) -> drafter_pb2.DraftResponse:
    """A Proposal for `rnd` that a verifier must not use as it is (or, one time in eight, a
    valid one): what a buggy or hostile drafter might send."""
    out = drafter_pb2.DraftResponse()
    p = out.proposal
    p.round, p.tree_kind = rnd, "sampled_swor"
    a, b = rng.randrange(vocab), rng.randrange(vocab)
    tokens, parents = [root, a, b], [-1, 0, 1]
    rows_idx, rows_val, width = [a, b], [0.5, 0.5], 2
    kind = rng.choice([
        "valid", "cycle", "parent_range", "parent_self", "nan", "inf", "negative",
        "unnormalised", "zero_mass", "rows_count", "width", "token_neg", "token_huge",
        "root", "empty", "huge", "stale", "future", "kind", "vocab", "no_rows", "dup_children",
    ])  # fmt: skip
    if kind == "cycle":
        parents = [-1, 2, 1]
    elif kind == "parent_range":
        parents = [-1, 0, 9]
    elif kind == "parent_self":
        parents = [-1, 1, 1]
    elif kind == "nan":
        rows_val = [math.nan, 0.5]
    elif kind == "inf":
        rows_val = [math.inf, 0.0]
    elif kind == "negative":
        rows_val = [1.5, -0.5]
    elif kind == "unnormalised":
        rows_val = [0.3, 0.2]
    elif kind == "zero_mass":
        rows_idx = [(a + 1) % vocab, (b + 1) % vocab]  # the drafted tokens have probability 0
    elif kind == "token_neg":
        tokens[1] = -5
    elif kind == "token_huge":
        tokens[2] = 2**31 - 1
    elif kind == "root":
        tokens[0] = (root + 1) % vocab
    elif kind == "empty":
        tokens, parents = [], []
    elif kind == "huge":
        tokens, parents = [root] + [a] * 20_000, list(range(-1, 20_000))
    elif kind == "stale":
        p.round = max(0, rnd - 1)
    elif kind == "future":
        p.round = rnd + 5
    elif kind == "kind":
        p.tree_kind = rng.choice(["sampled_iid", "deterministic", "", "nope"])
    elif kind == "dup_children":
        tokens, parents = [root, a, a], [-1, 0, 0]
    p.tree.tokens[:] = tokens
    p.tree.parents[:] = parents
    if kind == "no_rows":
        return out
    n = len(tokens) if kind != "rows_count" else len(tokens) + 3
    w = width if kind != "width" else width + 1
    p.rows.num_rows, p.rows.width = n, w
    p.rows.vocab_size = vocab if kind != "vocab" else vocab + 1
    p.rows.indices[:] = (rows_idx * n)[: n * w] if kind != "width" else rows_idx * n
    p.rows.values[:] = (rows_val * n)[: n * w] if kind != "width" else rows_val * n
    return out


class FuzzDrafter(drafter_pb2_grpc.DrafterServiceServicer):
    """A DrafterService that answers every Open / Commit with `bad_proposal`: the verifier's
    half of the fuzz (a verifier must treat each as a fallback round and stay lossless)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.sent = 0

    async def Draft(self, request_iterator, context):
        ctx, rnd = [], 0
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "open":
                ctx, rnd = list(msg.open.prompt_ids), msg.open.round
            elif kind == "commit":
                ctx += list(msg.commit.new_ids)
                rnd = msg.commit.round
            else:
                return
            resp = bad_proposal(self.rng, ctx[-1] if ctx else 0, rnd, self.vocab)
            self.sent += 1
            yield resp
            while resp.proposal.round < rnd:  # a stale one is skipped: then one for the round
                resp = bad_proposal(self.rng, ctx[-1] if ctx else 0, rnd, self.vocab)
                self.sent += 1
                yield resp

    async def Info(self, request, context):
        return drafter_pb2.DrafterInfo(drafters=["coral"], default_drafter="coral")


# ---------------------------------------------------------------------- the drafter API
def _tensor(rng: random.Random, rows: int, d: int, msg: common_pb2.Tensor) -> None:
    r = rng.random()
    if r < 0.6:  # right shape, random values
        msg.dtype = common_pb2.DTYPE_FLOAT32
        msg.shape[:] = [rows, d]
        msg.data = struct.pack(f"<{rows * d}f", *(rng.gauss(0, 1) for _ in range(rows * d)))
        return
    kind = rng.choice(["nan", "shape", "dims", "dtype", "short", "absurd"])
    msg.dtype = common_pb2.DTYPE_FLOAT32
    msg.shape[:] = [rows, d]
    values = [rng.gauss(0, 1) for _ in range(rows * d)]
    if kind == "nan" and values:
        values[0] = math.nan
        values[-1] = math.inf
    elif kind == "shape":
        msg.shape[:] = [rows + 1, d]
    elif kind == "dims":
        msg.shape[:] = [rows, d, 1]
    elif kind == "dtype":
        msg.dtype = rng.choice([common_pb2.DTYPE_UNSPECIFIED, 99])
    elif kind == "absurd":
        msg.shape[:] = [2**40, d]
    msg.data = struct.pack(f"<{len(values)}f", *values)
    if kind == "short":
        msg.data = msg.data[: len(msg.data) // 2]


def drafter_stream(
    rng: random.Random, vocab: int, d: int, fingerprint: str
) -> tuple[list[bytes], str]:
    """(messages, case name) for one Draft stream: an Open, then Commits, maybe a Close."""
    msgs: list[bytes] = []
    req = drafter_pb2.DraftRequest()
    o = req.open
    o.session_id = rng.choice(["", f"fuzz-d{rng.randrange(1 << 30)}", "dup", "x" * 2000])
    o.drafter = rng.choice(["", "coral", "coral", "ngram", "nope"])
    _sampling(rng, o.sampling)
    if not o.sampling.HasField("seed"):
        o.sampling.seed = 7
    prompt = _ids(rng, vocab)
    o.prompt_ids[:] = prompt
    if prompt and rng.random() < 0.9:
        _tensor(rng, max(len(prompt) - 1, 0), d, o.features)
    o.target_fingerprint = fingerprint if rng.random() < 0.85 else rng.choice(["", "nope"])
    o.round = rng.choice([1, 1, 1, 0, 2**32 - 1])
    o.max_nodes = rng.choice([0, 1, 8, 64, 2**32 - 1])
    if rng.random() < 0.1:
        o.cost.nodes[:] = [1, 2, 4]
        o.cost.ms[:] = rng.choice([[1.0, 2.0, 3.0], [math.nan, 1.0, 1.0], [1.0], [-1.0, 0.0, 1.0]])
    first = req.SerializeToString()
    if rng.random() < 0.05:
        first = _unparsable(rng, first, None)
    msgs.append(first)
    committed, rnd = len(prompt), max(o.round, 1)
    for _ in range(rng.randint(0, 4)):
        c = drafter_pb2.DraftRequest()
        m = c.commit
        rnd += 1 if rng.random() < 0.85 else rng.choice([0, 2, -1 + 2**32])
        m.round = rnd % 2**32
        new = _ids(rng, vocab) if rng.random() < 0.3 else [rng.randrange(vocab)]
        m.new_ids[:] = new
        if new and rng.random() < 0.9:
            _tensor(rng, len(new), d, m.features)
        if rng.random() < 0.5:
            m.accepted[:] = rng.choice([[0], [0, 1], [0, 5], [1, 0], [0, 2**31 - 1]])
        committed += len(new)
        if rng.random() < 0.5:
            m.committed_len = committed if rng.random() < 0.8 else committed + 1
        msgs.append(c.SerializeToString())
    if rng.random() < 0.5:
        msgs.append(
            drafter_pb2.DraftRequest(close=drafter_pb2.Close(reason="fuzz")).SerializeToString()
        )
    if rng.random() < 0.05:  # a second Open on the stream
        msgs.insert(1, msgs[0])
    return msgs, f"draft stream of {len(msgs)}"


# ---------------------------------------------------------------------- runners
def _status(e: grpc.RpcError) -> tuple[str, str]:
    return e.code().name, e.details() or ""


def _call(channel, method: str, data: bytes, streaming: bool, timeout: float, metadata):
    fn = (channel.unary_stream if streaming else channel.unary_unary)(method)
    try:
        if streaming:
            for _ in fn(data, timeout=timeout, metadata=metadata):
                pass
        else:
            fn(data, timeout=timeout, metadata=metadata)
        return "OK", ""
    except grpc.RpcError as e:
        return _status(e)


def healthy(channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def run_unary_api(
    api: str,
    channel,
    make: Callable[[random.Random], tuple[str, bytes]],
    count: int,
    seed: int = 0,
    workers: int = 4,
    timeout: float = 60.0,
    metadata: tuple = (),
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """Send `count` generated requests (`make(rng)` -> (method, bytes)), `workers` at a time."""
    tally = Tally(api)
    rngs = [random.Random(f"{seed}:{api}:{i}") for i in range(count)]
    t0 = time.perf_counter()

    def one(i: int) -> None:
        method, data = make(rngs[i])
        streaming = method.endswith("/Generate")
        code, details = _call(channel, method, data, streaming, timeout, metadata)
        tally.record(code, details, f"case {i} {method.rsplit('/', 1)[1]}")
        if progress is not None:
            progress(1)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    tally.seconds = time.perf_counter() - t0
    if not healthy(channel):
        tally.fail("the server does not answer its health check after the fuzz")
    return tally


def run_drafter_api(
    channel,
    vocab: int,
    d: int,
    fingerprint: str,
    messages: int,
    seed: int = 0,
    workers: int = 4,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> Tally:
    """Draft streams until `messages` messages were sent; each stream's status is checked."""
    tally = Tally("drafter")
    rng = random.Random(f"{seed}:drafter")
    streams = []
    total = 0
    while total < messages:
        msgs, name = drafter_stream(rng, vocab, d, fingerprint)
        streams.append((msgs, name))
        total += len(msgs)
    draft = channel.stream_stream("/coralline.v1.DrafterService/Draft")
    t0 = time.perf_counter()

    def one(i: int) -> None:
        msgs, name = streams[i]
        try:
            for _ in draft(iter(msgs), timeout=timeout):
                pass
            code, details = "OK", ""
        except grpc.RpcError as e:
            code, details = _status(e)
        tally.record(code, details, f"stream {i} ({name})", messages=len(msgs))
        if progress is not None:
            progress(len(msgs))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(streams))))
    tally.seconds = time.perf_counter() - t0
    left = _drafter_sessions(channel)
    if left:
        tally.fail(f"{left} drafter sessions left after the fuzz")
    if not healthy(channel):
        tally.fail("the drafter does not answer after the fuzz")
    return tally


def _active(channel, method: str, request, reply, wait_s: float) -> int:
    """A worker's active sessions (its Info), after waiting up to wait_s for ended calls to
    free theirs."""
    deadline = time.monotonic() + wait_s
    while True:
        raw = channel.unary_unary(method)(request.SerializeToString(), timeout=10)
        n = reply.FromString(raw).active_sessions
        if n == 0 or time.monotonic() > deadline:
            return n
        time.sleep(0.1)


def _drafter_sessions(channel, wait_s: float = 10.0) -> int:
    request, reply = drafter_pb2.DrafterInfoRequest(), drafter_pb2.DrafterInfo
    return _active(channel, "/coralline.v1.DrafterService/Info", request, reply, wait_s)


def verifier_sessions(channel, wait_s: float = 10.0) -> int:
    request, reply = verifier_pb2.VerifierInfoRequest(), verifier_pb2.VerifierInfo
    return _active(channel, "/coralline.v1.VerifierService/Info", request, reply, wait_s)


def run_proposals(
    verifier, fuzz_address: str, servicer: FuzzDrafter, n: int, seed: int = 0
) -> dict:
    """Greedy sessions on `verifier` whose drafter (`servicer`, at fuzz_address) sends
    `bad_proposal`s until it sent `n`: each output must equal the same request's plain
    decoding, and every session must complete."""
    call = verifier.unary_stream(
        "/coralline.v1.VerifierService/Generate",
        request_serializer=verifier_pb2.VerifyRequest.SerializeToString,
        response_deserializer=verifier_pb2.VerifyChunk.FromString,
    )
    rng = random.Random(f"{seed}:proposals")
    plain: dict[tuple[int, ...], list[int]] = {}
    sessions = differing = fallbacks = errors = 0
    examples: list[str] = []
    t0 = time.perf_counter()
    start = servicer.sent
    while servicer.sent - start < n and errors <= 20 and sessions <= n:
        prompt = tuple(rng.randrange(servicer.vocab) for _ in range(rng.randint(3, 12)))
        req = verifier_pb2.VerifyRequest(prompt_ids=list(prompt), max_new_tokens=16, drafter="none")
        try:
            if prompt not in plain:
                plain[prompt] = [t for c in call(req, timeout=120) for t in c.token_ids]
            req.drafter, req.drafter_endpoint = "coral", fuzz_address
            ids, summary = [], None
            for c in call(req, timeout=120):
                ids += c.token_ids
                if c.HasField("summary"):
                    summary = c.summary
        except grpc.RpcError as e:  # every session must complete: counted
            errors += 1
            if len(examples) < 5:
                examples.append(f"{e.code().name}: {e.details()}")
            continue
        sessions += 1
        differing += ids != plain[prompt]
        fallbacks += summary.fallback_rounds if summary is not None else 0
    return {
        "proposals": servicer.sent - start,
        "sessions": sessions,
        "outputs_differing_from_plain": differing,
        "fallback_rounds": fallbacks,
        "failed_sessions": errors,
        "examples": examples,
        "seconds": round(time.perf_counter() - t0, 1),
    }
