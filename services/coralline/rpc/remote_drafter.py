"""RemoteDrafter: the Drafter protocol over one DrafterService.Draft stream.

The engine's round loop runs unchanged in the verifier (in a worker thread); this object sends
the round's Open / Commit on the session's stream (which lives on the server's event loop) and
waits for the Proposal with a per-round deadline. A request never fails because of its drafter:
  - a proposal that fails validation (draft/check.py), names a wrong round or comes late is not
    used: the engine verifies the root alone that round (lossless) and counts the fallback;
  - a stream that breaks or times out is dropped; the next round re-Opens it from the committed
    ids and features (the drafter rebuilds its state), at most `max_reconnects` times per
    request; after that, or when the drafter refuses the session (wrong target, unknown name,
    full), the rest of the request decodes plainly.
The first fallback of a session is logged as a warning, later ones at debug level.

Knows nothing about targets or verification beyond the proposal checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from coralline.draft.base import DraftInput, DraftProposal
from coralline.draft.check import BadProposal, check_proposal
from coralline.draft.registry import drafter_kind
from coralline.rpc import codec
from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc
from coralline.sampling import SamplingParams
from coralline.tree import TokenTree

log = logging.getLogger("coralline.verifier")

_FINAL = (  # the drafter refused the session itself: re-opening would be refused again
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


@dataclass(frozen=True)
class RemoteDrafterConfig:
    name: str = "coral"  # the drafter the service builds for this session
    round_timeout_s: float = 2.0  # a proposal later than this is not waited for (the round
    # decodes plainly and the stream is re-opened): ~50x a CORAL round on a 2-core CPU
    open_timeout_s: float = 10.0  # the first proposal: the drafter syncs the whole prompt
    max_reconnects: int = 2  # re-Opens per request before the rest decodes plainly
    max_nodes: int = 256  # proposals above this many nodes (root included) are not used

    def __post_init__(self) -> None:
        drafter_kind(self.name)  # unknown names fail here
        if self.name == "none":
            raise ValueError("a remote drafter needs a drafter name other than 'none'")
        if not (self.round_timeout_s > 0 and self.open_timeout_s > 0):
            raise ValueError("timeouts must be > 0")
        if self.max_reconnects < 0 or self.max_nodes < 1:
            raise ValueError("max_reconnects must be >= 0 and max_nodes >= 1")


@dataclass
class WireStats:
    """What the verifier reports of the drafter link (RoundStats / Summary)."""

    bytes_to: int = 0  # this round's request
    bytes_from: int = 0  # this round's responses (stale ones included)
    drafter_ns: int = 0  # this round's drafting time inside the drafter (0: no proposal)
    reconnects: int = 0  # re-Opens in this request


class _StreamLost(Exception):
    pass


class RemoteDrafter:
    """A Drafter whose proposals come from a DrafterService over one bidi stream."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        loop: asyncio.AbstractEventLoop,
        config: RemoteDrafterConfig,
        *,
        session_id: str,
        target_fingerprint: str,
        vocab_size: int,
        metadata: tuple = (),
    ) -> None:
        self.config = config
        self.name = config.name
        self.tree_kind, self.chain_only = drafter_kind(config.name)
        self._stub = drafter_pb2_grpc.DrafterServiceStub(channel)
        self._loop = loop
        self.session_id = session_id
        self.fingerprint = target_fingerprint
        self.vocab_size = vocab_size
        self.metadata = metadata
        # W3C context of the verifier's current round span, sent in each Open / Commit (the
        # caller sets it before each round when tracing; empty = not traced)
        self.trace_context: dict[str, str] = {}
        # () -> [(nodes, ms)] or None: the round's cost under the verifier's load, sent with
        # each Open / Commit (the verifier sets it when it batches; batching/costs.py)
        self.cost_hint: Callable[[], list[tuple[int, float]] | None] | None = None
        self.reset()

    # ------------------------------------------------------------------ Drafter protocol
    def reset(self) -> None:
        self.close("reset")
        self.context: list[int] = []
        self._features: list[torch.Tensor] = []  # [m_i, d] CPU, one row per committed token
        # but the root: what a re-Open sends
        self._round = 0
        self._opened = False  # a stream was opened for this request (a new Open = a reconnect)
        self._call = None
        self._given_up: str | None = None  # why the rest of the request decodes plainly
        self._warned = False
        self.wire = WireStats()

    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal:
        self.context.extend(step.new_ids)
        if step.features is not None:
            self._features.append(step.features.detach().float().cpu())
        # the engine's round number when it tells it (gaps where it decoded without asking)
        self._round = step.round if step.round > self._round else self._round + 1
        self.wire.bytes_to = self.wire.bytes_from = self.wire.drafter_ns = 0
        root = self.context[-1]
        if self._given_up is not None:
            return self._fallback(root, self._given_up)
        if self._call is None:
            if self._opened:
                if self.wire.reconnects >= self.config.max_reconnects:
                    self._given_up = "drafter unavailable"
                    return self._fallback(root, self._given_up)
                self.wire.reconnects += 1
            req, timeout = self._open_request(params), self.config.open_timeout_s
            self._opened = True
        else:
            req, timeout = self._commit_request(step), self.config.round_timeout_s
        try:
            fut = asyncio.run_coroutine_threadsafe(self._exchange(req, timeout), self._loop)
            resp = fut.result(timeout + 1.0)
        except _StreamLost as e:
            return self._fallback(root, str(e))
        except Exception as e:  # a bug or an unexpected loop error: this round decodes plainly
            self._drop()
            return self._fallback(root, f"drafter link error: {type(e).__name__}: {e}")
        try:
            return self._decode(resp, root, params)
        except (BadProposal, ValueError) as e:
            return self._fallback(root, f"invalid proposal: {e}")

    # ------------------------------------------------------------------ messages
    def _open_request(self, params: SamplingParams) -> drafter_pb2.DraftRequest:
        req = drafter_pb2.DraftRequest()
        o = req.open
        o.session_id = self.session_id
        o.drafter = self.name
        codec.sampling_to_pb(params, o.sampling)
        o.prompt_ids[:] = self.context
        if self._features:
            codec.tensor_to_pb(torch.cat(self._features), o.features)
        o.target_fingerprint = self.fingerprint
        o.round = self._round
        o.max_nodes = self.config.max_nodes
        if self.trace_context:
            o.trace_context.update(self.trace_context)
        self._put_hint(o)
        return req

    def _put_hint(self, msg) -> None:
        """This round's cost under the verifier's load (batching/costs.py), when it has one."""
        hint = self.cost_hint() if self.cost_hint is not None else None
        if hint:
            msg.cost.nodes[:] = [n for n, _ in hint]
            msg.cost.ms[:] = [ms for _, ms in hint]

    def _commit_request(self, step: DraftInput) -> drafter_pb2.DraftRequest:
        req = drafter_pb2.DraftRequest()
        c = req.commit
        c.round = self._round
        c.new_ids[:] = step.new_ids
        if step.features is not None:
            codec.tensor_to_pb(step.features, c.features)
        if step.accepted is not None:
            c.accepted[:] = step.accepted
        c.committed_len = len(self.context)
        if self.trace_context:
            c.trace_context.update(self.trace_context)
        self._put_hint(c)
        return req

    def _decode(self, resp, root: int, params: SamplingParams) -> DraftProposal:
        if resp.WhichOneof("kind") != "proposal":
            raise BadProposal("the drafter answered without a proposal")
        msg = resp.proposal
        if msg.tree_kind and msg.tree_kind != self.tree_kind:
            raise BadProposal(f"tree kind {msg.tree_kind!r}, expected {self.tree_kind!r}")
        proposal = codec.proposal_from_pb(msg, self.vocab_size)
        self.wire.drafter_ns = max(int(msg.draft_ns), 0)
        check_proposal(
            proposal,
            root=root,
            vocab_size=self.vocab_size,
            max_nodes=self.config.max_nodes,
            tree_kind=self.tree_kind,
            chain_only=self.chain_only,
            needs_rows=not params.greedy and self.tree_kind != "deterministic",
        )
        return proposal

    def _fallback(self, root: int, why: str) -> DraftProposal:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "session %s round %d: plain round (%s)", self.session_id, self._round, why)
        return DraftProposal(TokenTree.root_only(root), None, fallback=why)

    # ------------------------------------------------------------------ the stream (event loop)
    async def _exchange(self, req, timeout: float):
        if self._call is None:
            self._call = self._stub.Draft(metadata=self.metadata)
        call = self._call
        try:
            await call.write(req)
            self.wire.bytes_to = req.ByteSize()
            deadline = self._loop.time() + timeout
            while True:
                left = deadline - self._loop.time()
                if left <= 0:
                    raise TimeoutError
                resp = await asyncio.wait_for(call.read(), left)
                if resp is grpc.aio.EOF:
                    raise _StreamLost("the drafter ended the stream")
                self.wire.bytes_from += resp.ByteSize()
                got = resp.proposal.round
                if got < self._round:
                    continue  # a stale proposal (e.g. a late answer): skip it
                if got > self._round:
                    raise _StreamLost(f"proposal for round {got}, expected {self._round}")
                return resp
        except TimeoutError:
            self._drop_now()
            raise _StreamLost(f"no proposal within {timeout:g} s") from None
        except grpc.aio.AioRpcError as e:
            self._drop_now()
            if e.code() in _FINAL:
                self._given_up = f"drafter refused the session: {e.code().name}: {e.details()}"
                raise _StreamLost(self._given_up) from None
            raise _StreamLost(f"drafter stream failed: {e.code().name}: {e.details()}") from None
        except _StreamLost:
            self._drop_now()
            raise

    def _drop_now(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = None

    def _drop(self) -> None:
        if self._call is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._drop_now)

    def close(self, reason: str = "done") -> None:
        """End the stream with Close (from any thread; never blocks on the network)."""
        call = getattr(self, "_call", None)
        if call is None:
            return
        self._call = None

        async def _close() -> None:
            try:
                req = drafter_pb2.DraftRequest()
                req.close.reason = reason
                await asyncio.wait_for(call.write(req), 1.0)
                await asyncio.wait_for(call.done_writing(), 1.0)
                await asyncio.wait_for(call.read(), 1.0)  # EOF once the drafter freed it
            except Exception:  # the stream may already be gone
                pass
            finally:
                call.cancel()

        if not self._loop.is_closed():
            asyncio.run_coroutine_threadsafe(_close(), self._loop)
