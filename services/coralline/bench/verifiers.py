"""Micro-benchmark of the verifiers: microseconds per call on a 64-node tree with V = 49152.

Inputs are synthetic but shaped like real serving: peaked target rows, a draft that resembles
the target (so paths get accepted and rejected), draft rows either truncated to their top-K
tokens (SparseRows, the wire format) or dense. Trees are drawn by Gumbel-top-k from the draft
rows, so every verifier's assumptions hold. Reports the median over many calls, with input
validation (check=True, the public default) and without (check=False, what the engine uses for
rows it computed itself). Knows nothing about real models.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from coralline.rows import SparseRows
from coralline.sampling import make_generator, sample_without_replacement, warp
from coralline.tree import TokenTree
from coralline.verification import VERIFIERS


def _rows(n: int, vocab: int, top_k: int, seed: int):
    g = make_generator(seed)
    logits = torch.randn(n, vocab, generator=g) * 3.0  # [N, V] peaked target rows
    target = warp(logits, 1.0)
    draft_logits = logits + torch.randn(n, vocab, generator=g) * 1.0  # [N, V] a close draft
    draft_sparse = SparseRows.from_dense(warp(draft_logits, 1.0, top_k=top_k))
    draft_dense = warp(draft_logits, 1.0)
    return target, draft_sparse, draft_dense


def _tree(draft: SparseRows, n: int, branching: list[int], seed: int, chain: bool) -> TokenTree:
    """Grow a tree breadth-first: node i's children are a SWOR draw from draft row i."""
    g = make_generator(seed)
    dense = draft.to_dense()
    tokens, parents = [0], [-1]
    frontier = [(0, 0)]  # (node, depth)
    while frontier and len(tokens) < n:
        node, depth = frontier.pop(0)
        k = 1 if chain else branching[min(depth, len(branching) - 1)]
        k = min(k, n - len(tokens))
        for tok in sample_without_replacement(dense[node], k, g).tolist():
            tokens.append(tok)
            parents.append(node)
            frontier.append((len(tokens) - 1, depth + 1))
    return TokenTree.from_parents(tokens, parents)


def _time(fn, calls: int) -> tuple[float, float]:
    """(median microseconds per call, mean tokens emitted per call)."""
    times, emitted = [], []
    for i in range(calls):
        g = make_generator(i)
        t0 = time.perf_counter()
        res = fn(g)
        times.append((time.perf_counter() - t0) * 1e6)
        emitted.append(res.num_emitted)
    return statistics.median(times), statistics.fmean(emitted)


def run(
    num_nodes: int = 64,
    vocab: int = 49152,
    top_k: int = 32,
    calls: int = 100,
    seed: int = 0,
    print_fn=print,
) -> dict:
    torch.set_num_threads(1)
    target, sparse, dense = _rows(num_nodes, vocab, top_k, seed)
    trees = {
        "chain64": _tree(sparse, num_nodes, [1], seed, chain=True),
        "tree64": _tree(sparse, num_nodes, [4, 3, 2, 2, 1], seed, chain=False),
    }
    results = []
    for tree_name, tree in trees.items():
        for name, spec in VERIFIERS.items():
            if spec.chain_only and not tree.is_chain:
                continue
            drafts = [("sparse", sparse), ("dense", dense)] if spec.needs_draft else [("-", None)]
            for draft_kind, draft in drafts:
                for check in (True, False):

                    def call(g, spec=spec, tree=tree, draft=draft, check=check):
                        return spec.fn(tree, target, draft, g, check=check)

                    call(make_generator(10_000))  # warm-up
                    us, tau = _time(call, calls)
                    results.append(
                        {
                            "tree": tree_name,
                            "verifier": name,
                            "draft_rows": draft_kind,
                            "check": check,
                            "us_per_call": round(us, 1),
                            "tokens_per_round": tau,
                        }
                    )

    def pick(tree, verifier, draft, check):
        for r in results:
            if (r["tree"], r["verifier"], r["draft_rows"], r["check"]) == (
                tree,
                verifier,
                draft,
                check,
            ):
                return r["us_per_call"]
        return None

    ratios = {
        f"traversal/token_level chain64 {d} check={c}": round(
            pick("chain64", "traversal", d, c) / pick("chain64", "token_level", d, c), 2
        )
        for d in ("sparse", "dense")
        for c in (True, False)
    }
    report = {
        "what": "verifier microseconds per call (median)",
        "config": {"num_nodes": num_nodes, "vocab": vocab, "draft_top_k": top_k, "calls": calls},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
        "ratios": ratios,
    }
    head = f"{'tree':<9}{'verifier':<13}{'draft rows':<12}{'check':<7}{'us/call':>10}{'tau':>8}"
    print_fn(head)
    print_fn("-" * len(head))
    for r in results:
        print_fn(
            f"{r['tree']:<9}{r['verifier']:<13}{r['draft_rows']:<12}{r['check']!s:<7}"
            f"{r['us_per_call']:>10.1f}{r['tokens_per_round']:>8.2f}"
        )
    for k, v in ratios.items():
        print_fn(f"{k}: {v}x")
    return report


def main(out: str | None) -> dict:
    report = run()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report
