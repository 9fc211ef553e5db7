"""The CORAL drafter: a trained CoralHead turned into token trees.

State: the head's KV cache over the committed context (inputs: target features of committed
tokens and the next token's embedding, see draft/coral.py). Each round:
  sync    the tokens committed since the last round and their target features go through the
          head once (causal); its output at the last position predicts the root's children
          (feature j pairs with the committed token j + 1: draft/base.py states the contract)
  expand  layer by layer, a batch of frontier nodes goes through the head with a tree mask
          (cached prefix + own ancestors); node input = (its token, its parent's head output)
  shape   T = 0: EAGLE-2 dynamic tree (expand the top_k best candidates per layer, auto_top_k
          with the budget chooser, keep the budget best by cumulative draft log-probability:
          deterministic, verified greedily or by EAGLE's verifier at T > 0 when asked)
          T > 0: a template fixed BEFORE drawing (draft/trees.py), children drawn without
          replacement from each node's warped draft row truncated to draft_top_k tokens, sent as
          SparseRows: Traversal Verification / RRSw verify it losslessly
  lookup  T = 0, when `lookup` is set: the prompt-lookup continuation (draft/ngram.py: what
          followed the latest earlier occurrence of the context's last 2-3 tokens) joins the
          candidates before the tree is chosen. Its k-th token is worth rate^k (rate = the
          measured acceptance of lookup tokens, LookupRate); where the head proposed the same
          token the candidate keeps the higher value. Lookup nodes need no head forward, so
          they are nearly free to draft; they compete with the head's for the same budget.
          Why: the head alone reaches tau ~3.1 with 60 nodes on held-out prompts, and
          answers often repeat their prompt or themselves (names, code, lists), where a copy
          is right more often than a one-layer head. At T = 0 any tree is lossless (greedy
          verification); T > 0 trees stay the head's SWOR draws (no lookup: the draws must be
          a prefix of the draft row's SWOR order).
  budget  the tree size maximising expected tokens per second under the cost table (measured
          once, then fixed) and the acceptance statistics of this sequence (draft/trees.py):
          both are deterministic given the history, so a seed reproduces a generation
  rollback the draft nodes leave the head's cache
  pipeline (`pipeline`, for the drafter service's speculation cache, draft/pipeline.py): after
          each tree the drafter names the outcome it expects (`Guess`: along the path of most
          probable children, the stop and bonus token maximising reach probability x draft
          probability of a token that is not a child there) with its own head outputs at those
          nodes. When the next step commits exactly
          that outcome, the tokens are synced with those head outputs instead of the target's
          features (which are not known before the commit), and re-synced with the target's
          features one round later. The rule depends only on the committed ids and the
          history, so a tree drafted ahead of the Commit for the expected outcome IS the tree
          drafted after it: the cache changes when the work happens, never what it gives.
The LM head is the full target head, or the grouped head (router + active groups) when
`grouped` is set: the draft distribution then has the selected groups' rows as support.

Tensors live on the head's device (the shared embedding's); features may arrive on any device.
Knows nothing about verification beyond the accepted nodes it is told (`DraftInput.accepted`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from coralline.draft.base import DraftInput, DraftProposal, FeatureCount
from coralline.draft.batch import HeadCall
from coralline.draft.coral import CoralHead
from coralline.draft.ngram import NgramConfig, NgramDrafter
from coralline.draft.trees import (
    AcceptanceStats,
    CostModel,
    LookupRate,
    choose_budget,
    select_dynamic,
    template,
    template_values,
)
from coralline.rows import SparseRows
from coralline.sampling import (
    DRAFT,
    SamplingParams,
    keyed_generator,
    sample_without_replacement,
    warp,
)
from coralline.tree import TokenTree

DRAFT_HEAD, DRAFT_LM_HEAD = "head", "lm_head"  # timeline phase names


@dataclass(frozen=True)
class Guess:
    """The outcome a pipelined drafter expects for its last tree."""

    accepted: tuple[int, ...]  # nodes of the last tree on the expected path, root first
    new_ids: tuple[int, ...]  # the commit it would bring: those drafts' tokens + the bonus
    features: torch.Tensor  # [len(accepted), d] the head's outputs at those nodes (what it
    # syncs in place of the target's features when the guess comes true)

    def matches(self, step: DraftInput) -> bool:
        return step.accepted == self.accepted and tuple(step.new_ids) == self.new_ids


@dataclass(frozen=True)
class CoralDrafterConfig:
    depth: int = 6  # EAGLE-2's default
    top_k: int = 10  # EAGLE-2's default: children per expanded node and nodes expanded per layer
    max_nodes: int = 60  # EAGLE-2's default total (root included)
    budget: str = "auto"  # "auto" = the cost-model chooser; "max" = always max_nodes
    grouped: bool = False  # use the router + grouped LM head
    draft_top_k: int = 32  # support of sampled draft rows (SparseRows K)
    chain: bool = False  # one child per node (a single draft sequence): what the chain-only
    # verifiers (token_level, block) need; T = 0 keeps the best child, T > 0 draws one
    min_value: float = 0.5  # auto budget: stop expanding when no new node is expected to be
    # accepted with probability above this (calibrated path probability): a head forward per
    # layer costs more than such nodes return
    auto_top_k: int = 4  # auto budget at T = 0: children per node and nodes expanded per layer
    # (the chooser keeps a few nodes on a CPU: expanding 10 per layer only adds drafting time).
    # Measured on 8 held-out tuning prompts x 64 tokens, 2-core CPU, x plain in the same run:
    # head gpu2, no lookup: min_value 0.15 / 0.3 / 0.5 with width 10: 1.09 / 1.19 / 1.24; width
    # 4: 1.22 / 1.24 / 1.26. Head sd1 with lookup (two runs each, +-0.05): min_value 0.3 / 0.5 /
    # 0.7 / 0.9: 1.25 / 1.31 / 1.31 / 1.28; width 6 at 0.5 / 0.7: 1.30 / 1.31; no lookup 1.21
    lookup: bool = False  # T = 0: also offer the prompt-lookup continuation (draft/ngram.py)
    lookup_tokens: int = 8  # its length; its nodes compete with the head's by estimated value
    pipeline: bool = False  # name the expected outcome of each tree and draft the next round
    # from the head's own outputs when it comes true (see the module docstring)

    def registry_name(self) -> str:
        """The name draft/registry.py builds this configuration under."""
        if self.chain:
            return "coral-chain"
        if self.budget == "max":
            return "coral-eagle2-lookup" if self.lookup else "coral-eagle2"
        name = "coral" if self.grouped else "coral-full"
        return name if self.lookup else f"{name}-nolookup"

    def __post_init__(self) -> None:
        if min(self.depth, self.top_k, self.max_nodes, self.auto_top_k, self.lookup_tokens) < 1:
            raise ValueError("depth, top_k, auto_top_k, max_nodes and lookup_tokens must be >= 1")
        if self.budget not in ("auto", "max"):
            raise ValueError("budget must be 'auto' or 'max'")
        if self.chain and self.lookup:
            raise ValueError("lookup adds a branch beside the head's: it cannot draft a chain")


class CoralDrafter:
    tree_kind = "sampled_swor"

    def __init__(
        self,
        head: CoralHead,
        config: CoralDrafterConfig | None = None,
        cost: CostModel | None = None,
    ) -> None:
        self.head = head.eval()
        self.config = config or CoralDrafterConfig()
        self.cost = cost or CostModel()
        self._lookup = NgramDrafter(NgramConfig(num_tokens=self.config.lookup_tokens))
        self.shadow_full_head = False  # measurement only: also time the full LM head on the
        # grouped head's very nodes (full_lm_head_ms), for the paired grouped-vs-full figure
        self.chain_only = self.config.chain
        self.name = self.config.registry_name()
        self.batcher = None  # a draft/batch.py DraftBatcher: head forwards and LM-head calls
        # are batched with other sessions' (the drafter service sets it; None: run here)
        self.reset()

    def reset(self) -> None:
        """Start a sequence. The acceptance statistics restart too, so a generation depends only
        on its own history: the same seed gives the same tokens (the cost model is fixed)."""
        from transformers import DynamicCache

        self.stats = AcceptanceStats()
        self.features = FeatureCount()
        self._lookup.reset()
        self.lookup_rate = LookupRate()
        self.cache = DynamicCache(config=self.head.config.llama_config())
        self.num_cached = 0
        self.last_out: torch.Tensor | None = None  # [d] head output at the last position
        self._last: tuple[TokenTree, float | None] | None = None
        self._last_chain: list[int] = []  # the lookup continuation offered last round
        # telemetry: a list makes each head forward / LM-head call append
        # (DRAFT_HEAD or DRAFT_LM_HEAD, t0, t1) in perf_counter ns (the drafter service sets it)
        self.timeline: list[tuple[str, int, int]] | None = None
        self.guess: Guess | None = None  # pipeline: the expected outcome of the last tree
        self._guess_ctx: tuple | None = None  # pipeline: what naming it needs (the last tree's
        # nodes stay in the head's cache until then)
        self._lagged: tuple[tuple[int, ...], torch.Tensor | None] | None = None  # pipeline: the
        # last commit's ids and target features, synced with head outputs (a guess came true)
        self.lm_head_ms = 0.0  # time spent in LM-head matmuls (for the grouped-head figure)
        self.full_lm_head_ms = 0.0  # the full head on the same nodes (shadow_full_head)

    # ------------------------------------------------------------------ head calls
    def _dist(self, feats: torch.Tensor, params: SamplingParams):
        """Warped draft distributions for feats [n, d]: (token ids [n, S] or None for the full
        vocabulary, probs [n, S])."""
        t0 = time.perf_counter_ns()
        if self.batcher is not None:
            ids, logits = self.batcher.logits(self.head, self.config.grouped, feats)
        elif self.config.grouped:
            ids, logits = self.head.grouped_logits(feats)
        else:
            ids, logits = None, self.head.full_logits(feats)
        t1 = time.perf_counter_ns()
        self.lm_head_ms += (t1 - t0) / 1e6
        if self.timeline is not None:
            self.timeline.append((DRAFT_LM_HEAD, t0, t1))
        if self.config.grouped and self.shadow_full_head:
            t1 = time.perf_counter()
            self.head.full_logits(feats)
            self.full_lm_head_ms += (time.perf_counter() - t1) * 1e3
        temperature = params.temperature if params.temperature > 0 else 1.0
        probs = warp(logits, temperature, params.top_k, params.top_p)
        return ids, probs

    @property
    def device(self) -> torch.device:
        return self.head.fc.weight.device

    def _run(self, tokens, feats, positions, mask) -> torch.Tensor:  # [n, d]
        dev = self.device
        t0 = time.perf_counter_ns()
        if mask is not None:
            mask = mask.to(dev, self.head.fc.weight.dtype)
        if self.batcher is not None:
            call = HeadCall(tokens.to(dev), feats.to(dev), positions.to(dev), mask, self.cache)
            out = self.batcher.head(self.head, call)
        else:
            out = self.head(
                tokens[None].to(dev), feats[None].to(dev), positions[None].to(dev), mask, self.cache
            )[0]
        if self.timeline is not None:
            self.timeline.append((DRAFT_HEAD, t0, time.perf_counter_ns()))
        return out

    @torch.inference_mode()
    def _sync(self, new_ids: tuple[int, ...], new_features: torch.Tensor | None) -> None:
        if new_features is None or new_features.shape[0] == 0:
            if self.last_out is None:
                raise ValueError("the CORAL drafter needs the target features of the prompt")
            return
        m = new_features.shape[0]
        tokens = torch.tensor(new_ids[-m:], dtype=torch.int64)  # x_{t+1} for each new position
        positions = torch.arange(self.num_cached, self.num_cached + m)
        mask = None
        if m > 1:
            full = torch.full((m, self.num_cached + m), torch.finfo(torch.float32).min)
            full[:, : self.num_cached] = 0
            full[:, self.num_cached :].triu_(1)
            mask = full[None, None]
        dtype = self.head.fc.weight.dtype
        out = self._run(tokens, new_features.to(self.device, dtype), positions, mask)
        self.num_cached += m
        self.last_out = out[-1]

    def _observe(self, accepted: tuple[int, ...] | None) -> None:
        """Learn from the last round: the verifier tells which nodes of the last proposal were
        accepted (None: the proposal was not verified, so there is nothing to learn)."""
        last, chain = self._last, self._last_chain
        self._last, self._last_chain = None, []
        if last is None or accepted is None:
            return
        tree, predicted = last
        if accepted[-1] >= tree.num_nodes or any(
            tree.parent_list[b] != a for a, b in itertools.pairwise(accepted)
        ):
            raise ValueError(f"accepted nodes {accepted} are not a path of the last tree")
        path = list(accepted)
        self.stats.update(tree.children, path, predicted)
        if chain:
            self.lookup_rate.update(chain, tree, path)

    # ------------------------------------------------------------------ proposals
    @torch.inference_mode()
    def propose(self, step: DraftInput, params: SamplingParams) -> DraftProposal:
        self.finish_guess()
        self.features.advance(step)  # the contract: one feature per committed token but the root
        self._observe(step.accepted)
        self._lookup.context.extend(step.new_ids)
        if self.config.pipeline:
            self._resync_lagged()
            guess, self.guess = self.guess, None
            if guess is not None and step.features is not None and guess.matches(step):
                self._sync(step.new_ids, guess.features)
                self._lagged = (tuple(step.new_ids), step.features)
            else:
                self._sync(step.new_ids, step.features)
        else:
            self._sync(step.new_ids, step.features)
        root = step.new_ids[-1]
        keep = False
        try:
            if params.greedy:
                proposal = self._dynamic(root, params)
            else:
                if params.seed is None:
                    raise ValueError("sampled drafting needs params.seed (the engine resolves it)")
                gen = keyed_generator(params.seed, DRAFT, self.features.committed)
                proposal = self._sampled(root, params, gen)
            keep = self.config.pipeline  # the tree's nodes stay until the guess is named
            return proposal
        finally:
            if not keep:
                self.cache.crop(self.num_cached - self.cache.get_seq_length())  # rollback

    # ------------------------------------------------------------------ pipeline
    def _resync_lagged(self) -> None:
        """Redo the rows the last commit synced with head outputs, with the target's features."""
        if self._lagged is None:
            return
        ids, feats = self._lagged
        self._lagged = None
        if feats is None:
            raise RuntimeError("a guessed commit's target features were never given")
        m = feats.shape[0]
        self.num_cached -= m
        self.cache.crop(self.num_cached - self.cache.get_seq_length())
        self._sync(ids, feats)

    @torch.inference_mode()
    def finish_guess(self) -> None:
        """Name the expected outcome of the last tree (pipeline), then drop its nodes from the
        head's cache. Idempotent; the drafter service calls it right after a proposal is sent."""
        ctx, self._guess_ctx = self._guess_ctx, None
        if ctx is None:
            return
        try:
            tree, cand_of, tokens, parents, outs, depth_of, node_p, params = ctx
            path = [0]  # the most probable child at each node, down to a leaf
            while tree.children[path[-1]]:
                path.append(max(tree.children[path[-1]], key=lambda c: (node_p[c], -c)))
            for f in path[1:]:  # head outputs along the path (ancestors first)
                c = cand_of[f]
                if c not in outs:
                    outs[c] = self._forward_nodes([c], tokens, parents, outs, depth_of)[0]
            feats = torch.stack([outs[cand_of[f]] for f in path])  # [P, d]
            ids, probs = self._dist(feats, params)  # [P, S]
            # the outcome "accept the path down to path[k], then the bonus t" has probability
            # reach(path[k]) * q(t) under the draft, for t not among path[k]'s children (a
            # child's token would have been accepted): the most probable such outcome
            best, reach = (-1.0, 0, 0), 1.0
            for k, f in enumerate(path):
                row = probs[k].clone()
                for c in tree.children[f]:
                    tok = tree.token_list[c]
                    row[(ids[k] == tok) if ids is not None else tok] = -1.0
                j = int(row.argmax())
                score = reach * float(row[j])
                if score > best[0]:
                    best = (score, k, int(ids[k, j]) if ids is not None else j)
                if k + 1 < len(path):
                    reach *= node_p[path[k + 1]]
            _, k, bonus = best
            self.guess = Guess(
                tuple(path[: k + 1]),
                (*(tree.token_list[f] for f in path[1 : k + 1]), bonus),
                feats[: k + 1],
            )
        finally:
            self.cache.crop(self.num_cached - self.cache.get_seq_length())  # rollback

    def _keep_guess_ctx(self, tree, cand_of, tokens, parents, outs, depth_of, node_p, params):
        if self.config.pipeline:
            self._guess_ctx = (tree, cand_of, tokens, parents, outs, depth_of, node_p, params)

    def _forward_nodes(self, nodes, tokens, parents, outs, depth_of) -> torch.Tensor:
        """Run draft nodes (all of one depth) through the head with a tree mask."""
        tok = torch.tensor([tokens[i] for i in nodes], dtype=torch.int64)
        feats = torch.stack([outs[parents[i]] for i in nodes])
        pos = torch.tensor([self.num_cached + depth_of[i] - 1 for i in nodes])
        past = self.cache.get_seq_length()
        forwarded = self._forwarded  # draft nodes already in the cache, in cache order
        mask = torch.full((len(nodes), past + len(nodes)), torch.finfo(torch.float32).min)
        mask[:, : self.num_cached] = 0
        where = {n: self.num_cached + k for k, n in enumerate(forwarded)}
        for r, i in enumerate(nodes):
            a = parents[i]
            while a > 0:
                mask[r, where[a]] = 0
                a = parents[a]
            mask[r, past + r] = 0
        out = self._run(tok, feats, pos, mask[None, None])
        forwarded.extend(nodes)
        return out

    def _dynamic(self, root: int, params: SamplingParams) -> DraftProposal:
        """EAGLE-2 dynamic tree; node 0 = root; candidates carry cumulative log-probs."""
        cfg = self.config
        tokens, parents, scores, depth_of = [root], [-1], [0.0], [0]
        outs = {0: self.last_out}
        self._forwarded: list[int] = []
        frontier = [0]
        for depth in range(1, cfg.depth + 1):
            if depth > 1:
                out = self._forward_nodes(frontier, tokens, parents, outs, depth_of)
                for k, n in enumerate(frontier):
                    outs[n] = out[k]
            feats = torch.stack([outs[n] for n in frontier])
            ids, probs = self._dist(feats, params)
            per_layer = cfg.auto_top_k if cfg.budget == "auto" else cfg.top_k
            width = 1 if cfg.chain else per_layer
            top = torch.topk(probs, min(width, probs.shape[1]), dim=1)
            layer = []
            for f, n in enumerate(frontier):
                for v, j in zip(top.values[f].tolist(), top.indices[f].tolist(), strict=True):
                    if v <= 0:
                        continue
                    tok = int(ids[f, j]) if ids is not None else int(j)
                    tokens.append(tok)
                    parents.append(n)
                    scores.append(scores[n] + math.log(v))
                    depth_of.append(depth)
                    layer.append(len(tokens) - 1)
            layer.sort(key=lambda i: -scores[i])
            frontier = layer[:per_layer]
            if not frontier:
                break
            best = math.exp(scores[frontier[0]]) * self.stats.calibration
            if cfg.budget == "auto" and best < cfg.min_value:
                break  # deeper layers cannot pay for their head forwards
        if cfg.lookup:
            self._merge_lookup(tokens, parents, scores, depth_of)
        cand = list(range(1, len(tokens)))
        values = sorted((math.exp(scores[i]) for i in cand), reverse=True)
        budget = (
            cfg.max_nodes
            if cfg.budget == "max"
            else choose_budget(values, self.cost, self.stats.calibration, max_nodes=cfg.max_nodes)
        )
        cand_parents = [parents[i] - 1 if parents[i] > 0 else -1 for i in cand]
        keep = select_dynamic(cand_parents, [scores[i] for i in cand], budget)
        index = {0: 0}
        t_tokens, t_parents = [root], [-1]
        for c in keep:
            node = cand[c]
            index[node] = len(t_tokens)
            t_tokens.append(tokens[node])
            t_parents.append(index[parents[node]])
        tree = TokenTree.from_parents(t_tokens, t_parents)
        predicted = sum(math.exp(scores[cand[c]]) for c in keep)
        self._last = (tree, predicted)
        if self.config.pipeline:
            cand_of = [0] + [cand[c] for c in keep]  # tree node -> candidate node
            node_p = [1.0] + [
                math.exp(scores[cand[c]] - scores[parents[cand[c]]]) for c in keep
            ]  # tree node -> its draft probability given its parent
            self._keep_guess_ctx(tree, cand_of, tokens, parents, outs, depth_of, node_p, params)
        return DraftProposal(tree, None)

    def _merge_lookup(self, tokens, parents, scores, depth_of) -> None:
        """Add the prompt-lookup continuation to the candidates (in place). Each of its tokens
        gets the value rate^k (k = its depth, rate = the measured acceptance of lookup tokens);
        where the head proposed the same token the candidate keeps the higher value. Scores
        stay non-increasing along every path, so the selection is still a tree."""
        paths = self._lookup.paths()
        if not paths:
            return
        chain = self._last_chain = paths[0]
        children: dict[tuple[int, int], int] = {}
        for i in range(1, len(tokens)):
            children.setdefault((parents[i], tokens[i]), i)
        node, log_rate = 0, math.log(self.lookup_rate.rate)
        for k, tok in enumerate(chain, start=1):
            value = k * log_rate
            child = children.get((node, tok))
            if child is None:
                tokens.append(tok)
                parents.append(node)
                scores.append(value)
                depth_of.append(depth_of[node] + 1)
                child = len(tokens) - 1
            else:
                scores[child] = max(scores[child], value)
            node = child

    def _sampled(self, root: int, params: SamplingParams, gen: torch.Generator) -> DraftProposal:
        """A template fixed before drawing; SWOR children from truncated warped draft rows."""
        cfg = self.config
        alpha = self.stats.alpha[:1] if cfg.chain else self.stats.alpha
        full = template_values(alpha, cfg.max_nodes, cfg.depth)
        budget = (
            cfg.max_nodes
            if cfg.budget == "max"
            else choose_budget(sorted(full, reverse=True), self.cost, 1.0, max_nodes=cfg.max_nodes)
        )
        shape = template(alpha, budget, cfg.depth)  # template parents; a chain when cfg.chain
        kids: list[list[int]] = [[] for _ in shape]
        for i, p in enumerate(shape[1:], start=1):
            kids[p].append(i)
        vocab = self.head.config.vocab_size
        k_rows = min(cfg.draft_top_k, vocab)
        tokens, parents, depth_of = [root], [-1], [0]
        outs = {0: self.last_out}
        rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._forwarded = []
        frontier = [(0, 0)]  # (template node, tree node) of nodes whose children are drawn
        while frontier:
            need = [(t, n) for t, n in frontier if kids[t]]
            if not need:
                break
            fwd = [n for _, n in need if n not in outs]
            if fwd:
                out = self._forward_nodes(fwd, tokens, parents, outs, depth_of)
                for k, n in enumerate(fwd):
                    outs[n] = out[k]
            ids, probs = self._dist(torch.stack([outs[n] for _, n in need]), params)
            top = torch.topk(probs, min(k_rows, probs.shape[1]), dim=1)
            nxt = []
            for f, (t, n) in enumerate(need):
                vals = (top.values[f] / top.values[f].sum()).float().cpu()
                toks = (ids[f][top.indices[f]] if ids is not None else top.indices[f]).cpu()
                rows[n] = (toks, vals)
                # Gumbel-top-k on the K-token row: the same law as on the full row
                drawn = toks[sample_without_replacement(vals, len(kids[t]), gen)].tolist()
                for tk, tok in zip(kids[t], drawn, strict=False):
                    tokens.append(int(tok))
                    parents.append(n)
                    depth_of.append(depth_of[n] + 1)
                    nxt.append((tk, len(tokens) - 1))
            frontier = nxt
        tree = TokenTree.from_parents(tokens, parents)
        self._last = (tree, None)
        if self.config.pipeline:
            node_p = [1.0] * tree.num_nodes
            for i in range(1, tree.num_nodes):
                toks, vals = rows[parents[i]]
                hit = (toks == tokens[i]).nonzero()
                node_p[i] = float(vals[hit[0, 0]]) if hit.numel() else 0.0
            ident = list(range(tree.num_nodes))
            self._keep_guess_ctx(tree, ident, tokens, parents, outs, depth_of, node_p, params)
        return DraftProposal(tree, SparseRows.from_node_rows(tree.num_nodes, rows, k_rows, vocab))
