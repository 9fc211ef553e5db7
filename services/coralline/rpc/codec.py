"""Messages <-> the core's dataclasses: tensors, trees, sparse rows, sampling, stats.

Every decoder validates what it reads and raises ValueError with a message a person can act
on (the servers map it to INVALID_ARGUMENT, or to a fallback round for a drafter's proposal).
Floats that decide sampling (temperature, top_p) are doubles on the wire, and features travel
as float32 bytes, so a split run computes exactly what the in-process engine computes.

Knows nothing about servers or sessions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from coralline.draft.base import DraftProposal
from coralline.engine import RoundStats, Summary
from coralline.rows import SparseRows
from coralline.rpc.protos import common_pb2, generation_pb2
from coralline.sampling import SamplingParams
from coralline.session import CANCELLED, FAILED, FINISHED, RUNNING, SessionRecord
from coralline.tree import TokenTree

DEFAULT_MAX_NEW_TOKENS = 256  # a chat-sized answer when the request sets no limit

_DTYPES = {
    common_pb2.DTYPE_FLOAT32: (torch.float32, 4),
    common_pb2.DTYPE_FLOAT16: (torch.float16, 2),
    common_pb2.DTYPE_BFLOAT16: (torch.bfloat16, 2),
}
_DTYPE_OF = {t: code for code, (t, _) in _DTYPES.items()}

FINISH = {
    "eos": common_pb2.FINISH_REASON_EOS,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "context": common_pb2.FINISH_REASON_CONTEXT,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
}
FINISH_NAME = {v: k for k, v in FINISH.items()}


# ---------------------------------------------------------------------- tensors
def tensor_to_pb(t: torch.Tensor, out: common_pb2.Tensor | None = None) -> common_pb2.Tensor:
    """A dense tensor as row-major little-endian bytes (float32 / float16 / bfloat16)."""
    msg = out if out is not None else common_pb2.Tensor()
    t = t.detach()
    if t.dtype not in _DTYPE_OF:
        t = t.float()
    t = t.contiguous().cpu()
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
    msg.data = raw.numpy().tobytes()
    msg.dtype = _DTYPE_OF[t.dtype]
    msg.shape[:] = list(t.shape)
    return msg


def tensor_from_pb(
    msg: common_pb2.Tensor,
    *,
    name: str = "tensor",
    rows: int | None = None,  # the expected first dimension, when known
    cols: int | None = None,  # the expected second dimension, when known
) -> torch.Tensor:  # float32, [rows, cols]
    if msg.dtype not in _DTYPES:
        raise ValueError(f"{name}: unknown dtype {msg.dtype} (use DTYPE_FLOAT32/16 or BFLOAT16)")
    dtype, size = _DTYPES[msg.dtype]
    shape = list(msg.shape)
    if len(shape) != 2 or any(s < 0 for s in shape):
        raise ValueError(f"{name}: expected a 2-D shape [m, d], got {shape}")
    if rows is not None and shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows, got {shape[0]}")
    if cols is not None and shape[1] != cols:
        raise ValueError(f"{name}: expected {cols} columns (the hidden size), got {shape[1]}")
    if len(msg.data) != math.prod(shape) * size:
        raise ValueError(
            f"{name}: shape {shape} needs {math.prod(shape) * size} bytes, got {len(msg.data)}"
        )
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype, np.int16)
    arr = np.frombuffer(msg.data, dtype=np.dtype(np_dtype).newbyteorder("<")).reshape(shape)
    t = torch.from_numpy(arr.copy())
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


# ---------------------------------------------------------------------- trees and rows
def tree_to_pb(tree: TokenTree, out: common_pb2.TokenTree | None = None) -> common_pb2.TokenTree:
    msg = out if out is not None else common_pb2.TokenTree()
    msg.tokens[:] = tree.token_list
    msg.parents[:] = tree.parent_list
    return msg


def tree_from_pb(msg: common_pb2.TokenTree, vocab_size: int | None = None) -> TokenTree:
    return TokenTree.from_parents(list(msg.tokens), list(msg.parents), vocab_size)


def rows_to_pb(rows: SparseRows, out: common_pb2.SparseRows | None = None) -> common_pb2.SparseRows:
    msg = out if out is not None else common_pb2.SparseRows()
    n, k = rows.indices.shape
    msg.num_rows, msg.width, msg.vocab_size = int(n), int(k), int(rows.vocab_size)
    msg.indices[:] = rows.indices.flatten().tolist()
    msg.values[:] = rows.values.float().flatten().tolist()
    return msg


def rows_from_pb(msg: common_pb2.SparseRows) -> SparseRows:
    n, k = msg.num_rows, msg.width
    if n <= 0 or k <= 0:
        raise ValueError(f"sparse rows need num_rows > 0 and width > 0, got {n} x {k}")
    if len(msg.indices) != n * k or len(msg.values) != n * k:
        raise ValueError(
            f"sparse rows of {n} x {k} need {n * k} indices and values, got "
            f"{len(msg.indices)} and {len(msg.values)}"
        )
    idx = torch.tensor(np.asarray(msg.indices, dtype=np.int64)).view(n, k)
    val = torch.tensor(np.asarray(msg.values, dtype=np.float32)).view(n, k)
    return SparseRows(idx, val, int(msg.vocab_size))


def proposal_from_pb(msg, vocab_size: int) -> DraftProposal:
    """A drafter's Proposal message -> DraftProposal (ValueError when malformed)."""
    tree = tree_from_pb(msg.tree, vocab_size)
    rows = rows_from_pb(msg.rows) if msg.HasField("rows") else None
    return DraftProposal(tree, rows)


# ---------------------------------------------------------------------- sampling
def sampling_to_pb(
    params: SamplingParams, out: common_pb2.SamplingParams | None = None
) -> common_pb2.SamplingParams:
    msg = out if out is not None else common_pb2.SamplingParams()
    msg.temperature = float(params.temperature)
    msg.top_k = int(params.top_k)
    if params.top_p != 1.0:
        msg.top_p = float(params.top_p)
    if params.seed is not None:
        msg.seed = int(params.seed)
    msg.ignore_eos = bool(params.ignore_eos)
    return msg


def sampling_from_pb(
    msg: common_pb2.SamplingParams,
    max_new_tokens: int | None = None,  # None: the default
    stop=(),
) -> SamplingParams:
    """SamplingParams from the wire (ValueError with the field's name when out of range)."""
    seed = msg.seed if msg.HasField("seed") else None
    if seed is not None and seed >= 2**63:
        raise ValueError(f"seed must be below 2**63, got {seed}")
    return SamplingParams(
        temperature=float(msg.temperature),
        top_k=int(msg.top_k),
        top_p=float(msg.top_p) if msg.HasField("top_p") else 1.0,
        seed=seed,
        max_new_tokens=DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens),
        stop=tuple(stop),
        ignore_eos=bool(msg.ignore_eos),
    )


# ---------------------------------------------------------------------- stats
def stats_to_pb(
    stats: RoundStats,
    out: common_pb2.RoundStats | None = None,
    bytes_to: int = 0,
    bytes_from: int = 0,
    drafter_ns: int = 0,
) -> common_pb2.RoundStats:
    msg = out if out is not None else common_pb2.RoundStats()
    msg.round = stats.round
    msg.tree_nodes = stats.tree_nodes
    msg.accepted = stats.accepted
    msg.draft_ns = int(stats.draft_ms * 1e6)
    msg.verify_ns = int(stats.verify_ms * 1e6)
    msg.fallback = stats.fallback or ""
    msg.bytes_to_drafter = bytes_to
    msg.bytes_from_drafter = bytes_from
    msg.forward_ns = int(stats.forward_ms * 1e6)
    msg.accept_ns = int(stats.accept_ms * 1e6)
    msg.commit_ns = int(stats.commit_ms * 1e6)
    msg.drafter_ns = drafter_ns
    msg.tree_depth = stats.tree_depth
    msg.plain = stats.plain
    return msg


def summary_to_pb(
    s: Summary, out: common_pb2.Summary | None = None, reconnects: int = 0
) -> common_pb2.Summary:
    msg = out if out is not None else common_pb2.Summary()
    msg.tokens = s.tokens
    msg.rounds = s.rounds
    msg.acceptance_length = s.acceptance_length
    msg.tokens_per_second = s.tokens_per_second
    msg.prefill_ns = int(s.prefill_ms * 1e6)
    msg.draft_ns = int(s.draft_ms * 1e6)
    msg.verify_ns = int(s.verify_ms * 1e6)
    msg.finish_reason = FINISH[s.finish_reason]
    msg.verifier = s.verifier
    msg.drafter = s.drafter
    msg.seed = s.seed
    msg.prompt_tokens = s.prompt_tokens
    msg.fallback_rounds = s.fallback_rounds
    msg.drafter_reconnects = reconnects
    msg.cached_prompt_tokens = s.cached_prompt_tokens
    msg.plain_rounds = s.plain_rounds
    return msg


_FINISH_NAME = {v: k for k, v in FINISH.items()}


def summary_from_pb(msg: common_pb2.Summary) -> Summary:
    """The engine's Summary of a wire Summary (what a router records; reconnects and failovers
    are wire-only counters)."""
    values = {
        "tokens": msg.tokens,
        "rounds": msg.rounds,
        "acceptance_length": msg.acceptance_length,
        "tokens_per_second": msg.tokens_per_second,
        "prefill_ms": msg.prefill_ns / 1e6,
        "draft_ms": msg.draft_ns / 1e6,
        "verify_ms": msg.verify_ns / 1e6,
        "finish_reason": _FINISH_NAME.get(msg.finish_reason, "length"),
        "verifier": msg.verifier,
        "drafter": msg.drafter,
        "seed": msg.seed,
        "prompt_tokens": msg.prompt_tokens,
        "fallback_rounds": msg.fallback_rounds,
        "cached_prompt_tokens": msg.cached_prompt_tokens,
        "plain_rounds": msg.plain_rounds,
    }
    return Summary(**values)


# ---------------------------------------------------------------------- sessions
_STATE = {
    RUNNING: generation_pb2.SESSION_STATE_RUNNING,
    FINISHED: generation_pb2.SESSION_STATE_FINISHED,
    CANCELLED: generation_pb2.SESSION_STATE_CANCELLED,
    FAILED: generation_pb2.SESSION_STATE_FAILED,
}


def session_to_pb(rec: SessionRecord) -> generation_pb2.Session:
    out = generation_pb2.Session(
        session_id=rec.session_id,
        state=_STATE[rec.state],
        prompt_tokens=rec.prompt_tokens,
        token_ids=rec.token_ids,
        text=rec.text,
        drafter=rec.drafter,
        verifier=rec.summary.verifier if rec.summary is not None else rec.verifier,
        created_unix_ns=rec.created_unix_ns,
        error=rec.error,
        turns=rec.turns,
        placement=rec.placement,
        failovers=rec.failovers,
        updated_unix_ns=rec.updated_unix_ns,
    )
    if rec.summary is not None:
        summary_to_pb(rec.summary, out.summary)
        out.summary.failovers = rec.failovers
    return out
