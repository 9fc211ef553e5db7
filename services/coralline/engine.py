"""The in-process speculative loop: the reference behaviour the distributed pipeline reproduces.

    prefill(prompt[:-1]); root = prompt[-1]
    each round: drafter proposes a tree rooted at the last committed token
                target forwards the whole tree once -> warped rows [N, V] + features [N, d]
                the verifier picks the accepted path + bonus (at T = 0 straight from the
                raw logits: verify_greedy_logits, the same walk); the KV cache keeps that path
                accepted ids + features of the tokens that went through the target -> drafter
    stop on EOS (an EOS inside an accepted path truncates the round), max_new_tokens, a stop
    string, or a full context window.
Multi-turn: `generate(..., reuse_cache=True)` prefills only what the runner's cache does not
already hold (the longest common prefix of its cached ids and the prompt is kept); the output is
the same as with a fresh prefill. The summary reports the kept count (`cached_prompt_tokens`).
With no drafter every tree is the root alone: plain decoding through the same code, the fair
baseline. A proposal the drafter marks as a fallback (the remote drafter's stand-in for an
unusable or late proposal), or one that does not fit the context window, is replaced by the
root alone and verified plainly: lossless, counted in the stats, and the drafter is told its
proposal was not used (`DraftInput.accepted = None`).

Randomness is keyed (sampling.py): the round whose root sits at committed length L draws its
verifier coins from (seed, VERIFY, L) and the drafter its draws from (seed, DRAFT, L). A request
without a seed gets a fresh one, reported in the summary, so every generation can be replayed
exactly, in-process or across services.

Knows nothing about gRPC, Ray or sessions. Tokenization is used only for stop strings and the
text of each chunk, through the target's tokenizer, incrementally (detok.py: each round's cost
does not grow with the output).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from coralline.detok import TextStream
from coralline.draft.base import Drafter, DraftInput, DraftProposal, check_pair, default_verifier
from coralline.sampling import VERIFY, SamplingParams, fresh_seed, keyed_generator
from coralline.target import TargetRunner, TreeOutput, take_rows
from coralline.tree import TokenTree
from coralline.verification.greedy import verify_greedy_logits


@dataclass(frozen=True)
class EngineConfig:
    verifier: str | None = None  # None = the lossless default for the drafter and temperature
    check_inputs: bool = False  # rows are computed here, so validation is for debugging only
    # the first round decodes the prompt's last token in the prompt's own forward
    # (TargetRunner.prefill_root): a plain round that costs no forward and no drafting, so the
    # first token comes one round sooner; False: the first round is a round like the others
    # (the reference it is tested against)
    fused_first_round: bool = True

    def __post_init__(self) -> None:
        if self.verifier is not None:
            from coralline.verification import get_verifier

            get_verifier(self.verifier)  # unknown names fail at construction


@dataclass(frozen=True)
class RoundStats:
    round: int
    tree_nodes: int
    accepted: int  # accepted draft tokens (before any truncation)
    draft_ms: float  # drafter.propose
    verify_ms: float  # target forward + warping + verification + KV commit
    fallback: str | None = None  # why this round verified the root alone instead of the
    # drafter's proposal (None: it did not, or there is no drafter)
    # verify_ms split into its phases (telemetry: one span / histogram per hop)
    forward_ms: float = 0.0  # the target's forward over the tree
    accept_ms: float = 0.0  # warping + verification
    commit_ms: float = 0.0  # keeping the accepted path in the KV cache
    start_ns: int = 0  # the round's start (Unix epoch ns): the proposal is asked for then
    tree_depth: int = 0  # the tree's deepest node (0 = the root alone)
    prefill_ms: float = 0.0  # round 1 only: the prompt's forward pass just before it (the
    # fused first round's forward is that pass: its forward_ms is 0)
    plain: bool = False  # speculation was off this round (the `speculate` hook said so): the
    # drafter was not asked and the root was verified alone


@dataclass(frozen=True)
class Summary:
    tokens: int
    rounds: int
    acceptance_length: float  # tau = 1 + accepted drafts / rounds
    tokens_per_second: float  # generated tokens / (prefill + rounds) wall time
    prefill_ms: float
    draft_ms: float
    verify_ms: float
    finish_reason: str  # "eos", "length" (max_new_tokens), "stop" (a stop string), "context"
    verifier: str
    drafter: str
    seed: int = 0  # the seed the generation used (drawn fresh when the request gave none)
    prompt_tokens: int = 0
    fallback_rounds: int = 0  # rounds that verified the root alone in place of a proposal
    cached_prompt_tokens: int = 0  # prompt tokens found in the runner's cache (not forwarded;
    # prefill_ms covers only the others)
    plain_rounds: int = 0  # rounds decoded plainly because speculation was off (not fallbacks)


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]  # tokens committed this round (after truncation)
    text: str  # their text (held back while a multi-byte character is incomplete)
    stats: RoundStats
    summary: Summary | None = None  # set on the last chunk only


class Engine:
    def __init__(
        self,
        target: TargetRunner,
        drafter: Drafter | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.target = target
        self.drafter = drafter
        self.config = config or EngineConfig()
        # research hook: called each round as on_round(tree, target_rows [N, V], draft_rows)
        # just before verification (e.g. to score other verifiers on the very same trees)
        self.on_round: Callable[[TokenTree, torch.Tensor, object], None] | None = None
        # telemetry hook: called as on_round_start(round number) when a round starts, before
        # the proposal is asked for (the verifier starts the round's span there)
        self.on_round_start: Callable[[int], None] | None = None
        # load-adaptive speculation: called before each round with the previous round's stats
        # (None before the first); False = decode this round plainly without asking the drafter,
        # which is told the committed backlog at its next round (batching/switch.py)
        self.speculate: Callable[[RoundStats | None], bool] | None = None

    def generate(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        reuse_cache: bool = False,
    ) -> Iterator[Chunk]:
        """Stream chunks of generated tokens; the last chunk carries the summary.

        reuse_cache=True keeps what the target runner's cache holds of the prompt (a previous
        turn: its prompt + output but the last token) and prefills only the rest."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params must be a SamplingParams")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        vocab = self.target.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) >= self.target.max_context:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens; the context window is "
                f"{self.target.max_context}"
            )
        name = self.config.verifier or default_verifier(self.drafter, params)
        spec = check_pair(self.drafter, name, params)
        verifier = "greedy" if params.greedy else name
        if params.seed is None:
            params = replace(params, seed=fresh_seed())
        return self._run(prompt, params, spec, verifier, bool(reuse_cache))

    def _run(self, prompt, params, spec, verifier, reuse_cache) -> Iterator[Chunk]:
        target, drafter = self.target, self.drafter
        text = TextStream(target.tokenizer, params.stop) if target.tokenizer is not None else None
        plain = check_pair(None, default_verifier(None, params), params)
        t_start = time.perf_counter()
        first_out: TreeOutput | None = None  # the first round's output, when the prefill made it
        if self.config.fused_first_round:
            features, first_out = target.prefill_root(prompt, reuse=reuse_cache)  # [n - 1, d]
        else:
            features = target.prefill(prompt, reuse=reuse_cache)  # [len(prompt) - 1, d]
        cached = target.reused
        prefill_ms = (time.perf_counter() - t_start) * 1e3
        if drafter is not None:
            drafter.reset()
        new_ids, context = list(prompt), list(prompt)
        accepted_last: tuple[int, ...] | None = None  # the last proposal's accepted nodes
        generated = rounds = accepted_total = fallbacks = plain_rounds = 0
        draft_ms = verify_ms = 0.0
        stats: RoundStats | None = None
        # what the drafter has not been told (rounds it sat out): ids, and their features
        backlog_ids: list[int] = []
        backlog_features: list[torch.Tensor] = []
        while True:
            if self.on_round_start is not None:
                self.on_round_start(rounds + 1)
            t0, start_ns = time.perf_counter(), time.time_ns()
            first = first_out is not None  # the fused first round: its forward done, no draft
            plain_round = (  # speculation off this round (load-adaptive: RoundStats.plain)
                not first
                and drafter is not None
                and self.speculate is not None
                and not self.speculate(stats)
            )
            if drafter is not None and not (first or plain_round):
                if backlog_ids:  # one commit for every round it sat out, and this one's
                    new_ids = backlog_ids + list(new_ids)
                    features = torch.cat([*backlog_features, features])
                    accepted_last = None  # the last tree it saw was not verified
                    backlog_ids, backlog_features = [], []
                step = DraftInput(tuple(new_ids), features, accepted_last, round=rounds + 1)
                proposal = drafter.propose(step, params)
            else:
                if drafter is not None:
                    backlog_ids.extend(new_ids)
                    backlog_features.append(features)
                    plain_rounds += plain_round
                proposal = DraftProposal(TokenTree.root_only(context[-1]), None)
            fallback = proposal.fallback
            if (
                fallback is None
                and proposal.tree.num_nodes > target.max_context - target.num_cached
            ):
                fallback = "context"  # near the end of the window: decode plainly
            verify = plain.fn if first or plain_round else spec.fn
            if fallback is not None:
                # the root alone (a root-only tree needs no draft rows)
                proposal = DraftProposal(TokenTree.root_only(context[-1]), None)
                verify = plain.fn
                fallbacks += 1
            tree = proposal.tree
            t1 = time.perf_counter()
            if first:  # its forward was the prompt's: prefill_ms holds it
                out, first_out, tf = first_out, None, t1
            else:
                out = target.tree_forward(tree)
                tf = time.perf_counter()
            check = self.config.check_inputs
            if params.greedy and self.on_round is None:  # every verifier is greedy at T = 0:
                # the same walk on the raw logits (verify_greedy_logits), no rows, no coins
                result = verify_greedy_logits(tree, out.logits, check=check)
            else:
                rows = out.probs(params)  # [N, V]
                if self.on_round is not None:
                    self.on_round(tree, rows, proposal.rows)
                coins = keyed_generator(params.seed, VERIFY, len(context))
                result = verify(tree, rows, proposal.rows, coins, check=check)
            tv = time.perf_counter()
            target.commit(result.accepted)
            t2 = time.perf_counter()
            rounds += 1
            accepted_total += result.num_accepted
            accepted_last = None if fallback is not None else result.accepted
            draft_ms += (t1 - t0) * 1e3
            verify_ms += (t2 - t1) * 1e3
            new = result.emitted_tokens(tree)
            features = take_rows(out.features, result.accepted)  # [len(accepted), d]
            finish = None
            for k, tok in enumerate(new):
                if tok in target.eos_token_ids and not params.ignore_eos:
                    new, finish = new[: k + 1], "eos"
                    break
            left = params.max_new_tokens - generated
            if len(new) >= left:
                new, finish = new[:left], finish or "length"
            delta = ""
            if text is not None:
                delta, keep = text.add(new)
                if keep is not None:
                    new, finish = new[:keep], "stop"
            generated += len(new)
            context.extend(new)
            new_ids = new
            if finish is None and target.num_cached + 1 >= target.max_context:
                finish = "context"
            if finish is not None:  # the cache keeps exactly the committed tokens but the last
                target.truncate(len(context) - 1)
            stats = RoundStats(
                rounds,
                tree.num_nodes,
                result.num_accepted,
                (t1 - t0) * 1e3,
                (t2 - t1) * 1e3,
                fallback if drafter is not None else None,
                forward_ms=(tf - t1) * 1e3,
                accept_ms=(tv - tf) * 1e3,
                commit_ms=(t2 - tv) * 1e3,
                start_ns=start_ns,
                tree_depth=tree.max_depth,
                prefill_ms=prefill_ms if rounds == 1 else 0.0,
                plain=plain_round,
            )
            if finish is None:
                yield Chunk(new, delta, stats)
                continue
            if text is not None and finish != "stop":
                delta += text.flush()
            elapsed = time.perf_counter() - t_start
            summary = Summary(
                tokens=generated,
                rounds=rounds,
                acceptance_length=1.0 + accepted_total / rounds,
                tokens_per_second=generated / elapsed if elapsed > 0 else 0.0,
                prefill_ms=prefill_ms,
                draft_ms=draft_ms,
                verify_ms=verify_ms,
                finish_reason=finish,
                verifier=verifier,
                drafter=drafter.name if drafter is not None else "none",
                seed=params.seed,
                prompt_tokens=len(prompt),
                fallback_rounds=fallbacks if drafter is not None else 0,
                cached_prompt_tokens=cached,
                plain_rounds=plain_rounds,
            )
            yield Chunk(new, delta, stats, summary)
            return


def generate_ids(engine: Engine, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
    """All generated token ids (convenience for tests and benchmarks)."""
    return timed_generate(engine, prompt_ids, params)[0]


def timed_generate(
    engine: Engine, prompt_ids: Sequence[int], params: SamplingParams
) -> tuple[list[int], float, Summary]:
    """(generated ids, wall seconds including prefill, summary) of one generation."""
    t0 = time.perf_counter()
    out: list[int] = []
    summary = None
    for chunk in engine.generate(prompt_ids, params):
        out.extend(chunk.token_ids)
        summary = chunk.summary or summary
    if summary is None:
        raise RuntimeError("the engine ended without a summary")
    return out, time.perf_counter() - t0, summary
