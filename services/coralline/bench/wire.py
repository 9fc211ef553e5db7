"""What the drafter link's messages cost to build and parse: `codec_costs` times the codec
(rpc/codec.py) on the Open / Commit requests (ids + [m, d] float32 features) and Proposals
(tree + draft rows) of a run's actual rounds. Used by `coralline bench pipeline`.

Knows nothing about servers: it only encodes and decodes messages.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from coralline.rpc import codec
from coralline.rpc.protos import drafter_pb2
from coralline.sampling import SamplingParams


def _median_ns(fn: Callable[..., object], *args, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn(*args)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times)


def _encode_request(r: int, ids: list[int], feats: torch.Tensor, committed: int, drafter: str):
    """Round 1: the Open (prompt + its features); later rounds: a Commit. -> wire bytes."""

    req = drafter_pb2.DraftRequest()
    if r == 1:
        o = req.open
        o.session_id = "0" * 32
        o.drafter = drafter
        codec.sampling_to_pb(SamplingParams(seed=0), o.sampling)
        o.prompt_ids[:] = ids
        if feats.shape[0] > 0:
            codec.tensor_to_pb(feats, o.features)
        o.target_fingerprint = "0" * 16
        o.round = 1
        o.max_nodes = 256
    else:
        c = req.commit
        c.round = r
        c.new_ids[:] = ids
        codec.tensor_to_pb(feats, c.features)
        c.accepted[:] = list(range(len(ids)))
        c.committed_len = committed
    return req.SerializeToString()


def _decode_request(wire: bytes, hidden: int) -> list[int]:

    req = drafter_pb2.DraftRequest.FromString(wire)
    msg = req.open if req.WhichOneof("kind") == "open" else req.commit
    ids = [int(t) for t in (msg.prompt_ids if req.WhichOneof("kind") == "open" else msg.new_ids)]
    if msg.HasField("features"):
        rows = len(ids) - 1 if req.WhichOneof("kind") == "open" else len(ids)
        codec.tensor_from_pb(msg.features, rows=rows, cols=hidden)
    if req.WhichOneof("kind") == "commit":
        tuple(int(a) for a in msg.accepted)
    return ids


def _encode_proposal(r: int, tree, rows) -> bytes:

    resp = drafter_pb2.DraftResponse()
    p = resp.proposal
    p.round = r
    codec.tree_to_pb(tree, p.tree)
    if rows is not None:
        codec.rows_to_pb(rows, p.rows)
    p.draft_ns = 1_000_000
    p.tree_kind = "sampled_swor"
    return resp.SerializeToString()


def _decode_proposal(wire: bytes, vocab_size: int | None) -> None:

    p = drafter_pb2.DraftResponse.FromString(wire).proposal
    codec.tree_from_pb(p.tree, vocab_size)
    if p.HasField("rows"):
        codec.rows_from_pb(p.rows)


def codec_costs(
    generations: list[dict],
    hidden: int,
    drafter: str,
    vocab_size: int | None = None,
    reps: int = 3,
) -> dict:
    """Encode / decode ms per round each way, timed on the messages the drafter link carries.

    `generations`: [{"prompt": ids, "messages": [(tree, draft rows, accepted), ...]}] from the
    in-process run. Round 1 sends Open (the prompt and [len - 1, d] features), later rounds a
    Commit (the accepted + bonus ids and their [accepted + 1, d] features); every round returns
    a Proposal (the tree, and the draft rows when the drafter sent them). Encode = building the
    message with the codec + SerializeToString; decode = ParseFromString + the codec's readers
    (tensor_from_pb; tree_from_pb / rows_from_pb). Features are random float32 of the real size
    (the values do not change the cost)."""
    to_rows, from_rows = [], []  # per round: (encode ns, decode ns, bytes, steady)
    feature_rows, tree_nodes = [], []
    for gen in generations:
        prompt, committed = gen["prompt"], len(gen["prompt"])
        prev_accepted, prev_tokens = 0, []
        for k, (tree, rows, accepted) in enumerate(gen["messages"]):
            r = k + 1
            m = len(prompt) - 1 if r == 1 else prev_accepted + 1
            ids = prompt if r == 1 else [int(t) for t in (prev_tokens + prompt)[:m]]
            feats = torch.randn(m, hidden, dtype=torch.float32)
            args = (r, ids, feats, committed, drafter)
            wire = _encode_request(*args)
            back = _encode_proposal(r, tree, rows)
            to_rows.append(
                (
                    _median_ns(_encode_request, *args, reps=reps),
                    _median_ns(_decode_request, wire, hidden, reps=reps),
                    len(wire),
                    r > 1,
                )
            )
            from_rows.append(
                (
                    _median_ns(_encode_proposal, r, tree, rows, reps=reps),
                    _median_ns(_decode_proposal, back, vocab_size, reps=reps),
                    len(back),
                    r > 1,
                )
            )
            feature_rows.append(m)
            tree_nodes.append(tree.num_nodes)
            committed += accepted + 1
            prev_accepted, prev_tokens = accepted, list(tree.token_list)

    def side(rows: list[tuple]) -> dict:
        steady = [x for x in rows if x[3]] or rows
        return {
            "encode_ms_per_round": statistics.fmean(x[0] for x in rows) / 1e6,
            "decode_ms_per_round": statistics.fmean(x[1] for x in rows) / 1e6,
            "bytes_per_round": statistics.fmean(x[2] for x in rows),
            "steady_encode_ms_per_round": statistics.fmean(x[0] for x in steady) / 1e6,
            "steady_decode_ms_per_round": statistics.fmean(x[1] for x in steady) / 1e6,
            "steady_bytes_per_round": statistics.fmean(x[2] for x in steady),
        }

    if not to_rows:
        return {}
    return {
        "rounds_timed": len(to_rows),
        "hidden_size": hidden,
        "mean_feature_rows": statistics.fmean(feature_rows),
        "mean_tree_nodes": statistics.fmean(tree_nodes),
        "to_drafter": side(to_rows),
        "from_drafter": side(from_rows),
        "note": "codec functions timed here on the in-process run's rounds (median of "
        f"{reps} per message); 'steady' = Commit rounds only (round 1 is the Open with the "
        "whole prompt's features)",
    }
