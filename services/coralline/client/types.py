"""The SDK's result types: frozen dataclasses, plain Python values only.

Knows the shape of what the Generation service returns (durations already converted from the
wire's integer nanoseconds to float milliseconds, enums to lower-case strings). Knows nothing
about gRPC, protobuf or how the values were fetched: converting messages lives in _common.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RoundStats:
    """Statistics of one speculation round (one target forward over one token tree)."""

    round: int  # 1-based round number within the session
    tree_nodes: int  # nodes verified, root included (1 = plain decoding)
    accepted: int  # accepted draft tokens
    draft_ms: float  # waiting for the proposal (drafting + network), as the verifier saw it
    verify_ms: float  # target forward + warping + verification + KV commit
    fallback: str | None  # why the proposal was replaced by the root alone; None when it was not
    bytes_to_drafter: int
    bytes_from_drafter: int
    # verify_ms by phase, and the drafter's own time (draft_ms - drafter_ms: network, queueing)
    forward_ms: float = 0.0  # the target's forward over the tree
    accept_ms: float = 0.0  # warping + verification
    commit_ms: float = 0.0  # keeping the accepted path in the KV cache
    drafter_ms: float = 0.0  # drafting inside the drafter (0: no proposal this round)
    tree_depth: int = 0  # the deepest node of the tree (0 = the root alone)
    plain: bool = False  # speculation was off this round (the verifier's load): not a fallback


@dataclass(frozen=True)
class Summary:
    """The end of a generation."""

    tokens: int  # generated tokens
    rounds: int  # target forwards after the prefill
    acceptance_length: float  # tau = 1 + accepted drafts / rounds
    tokens_per_second: float  # at the verifier, prefill included
    prefill_ms: float
    draft_ms: float
    verify_ms: float
    finish_reason: str  # "eos", "length", "stop", "context" or "cancelled"
    verifier: str
    drafter: str  # "none": plain decoding
    seed: int  # the seed used (drawn by the server when the request gave none)
    prompt_tokens: int
    fallback_rounds: int
    drafter_reconnects: int
    cached_prompt_tokens: int = 0  # prompt tokens found in a retained KV cache (not prefilled)
    failovers: int = 0  # times the router moved the session to another verifier
    plain_rounds: int = 0  # rounds decoded plainly because speculation did not pay under load


@dataclass(frozen=True)
class Chunk:
    """One streamed response: the text delta and token ids of one round."""

    session_id: str
    text: str
    token_ids: tuple[int, ...]
    stats: RoundStats | None
    summary: Summary | None  # set on the last chunk only


@dataclass(frozen=True)
class GenerationResult:
    """A whole generation, collected from its stream."""

    session_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    summary: Summary
    chunks: int  # responses received

    @property
    def stats(self) -> dict[str, Any]:
        """The statistics as the CLI's `generate --json` prints them (same keys and rounding)."""
        s = self.summary
        return {
            "rounds": s.rounds,
            "tokens": s.tokens,
            "acceptance_length": round(s.acceptance_length, 4),
            "tokens_per_second": round(s.tokens_per_second, 3),
            "draft_ms": round(s.draft_ms, 1),
            "verify_ms": round(s.verify_ms, 1),
            "prefill_ms": round(s.prefill_ms, 1),
            "finish_reason": s.finish_reason,
            "verifier": s.verifier,
            "drafter": s.drafter,
        }


@dataclass(frozen=True)
class SessionInfo:
    """A session's state and output so far (GetSession)."""

    session_id: str
    state: str  # "running", "finished", "cancelled" or "failed"
    prompt_tokens: int
    token_ids: tuple[int, ...]  # generated so far
    text: str  # generated so far
    drafter: str
    verifier: str
    summary: Summary | None  # set once finished
    created_unix_ns: int  # a wall-clock timestamp, kept in ns as the wire sends it
    error: str | None  # set when failed
    turns: int = 1  # requests in this conversation
    placement: str = ""  # the verifier address serving it ("" when unknown)
    failovers: int = 0
    updated_unix_ns: int = 0


__all__ = ["Chunk", "GenerationResult", "RoundStats", "SessionInfo", "Summary"]
