"""The target model runner: prefill, tree forward, KV commit of the accepted path, reset.

State is one sequence: a KV cache holding the committed tokens EXCEPT the last one (the root of
the next tree), `num_cached`, the position pointer, and alongside it the ids of those cached
tokens (`ids`) and their features (`cached_features()`). Each round feeds the whole tree, root
included, in one forward with a float additive tree mask and explicit positions
(num_cached + depth); row i of the output is the target's distribution after node i's path.
`commit(accepted)` then keeps the KV entries (and the ids and features) of the accepted path
and drops the rest.

Multi-turn reuse: `prefill(prompt, reuse=True)` keeps the longest common prefix of the cached
ids and the prompt's cached part and forwards only the rest (`reused` says how many were kept).
After a generation the cache holds the committed tokens but the last, so a next turn whose
prompt extends prompt + output forwards only its new tokens. The KV entries and features of the
kept prefix came from the earlier rounds' forwards, not from one causal prefill: equal up to
floating-point rounding, as the rounds of one generation already are.

Cache strategy (measured in `coralline bench target`): transformers' DynamicCache, compacted in
place. The accepted nodes' KV entries are copied down to the positions right after the cached
prefix (only entries that move are copied: none for a chain-shaped acceptance) and the tail is
cropped. Copying the whole cache with index_select instead costs O(context) per round.

Sessions: `fork()` gives another runner over the same weights with its own cache (one per
session in the verifier service); forks share one lock that serialises forward passes, so
several sessions can be open while one round at a time uses the model. Features stay on the
model's device; logits come back on the CPU, where the verifiers run.

Knows nothing about drafting or verification; it only runs forward passes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from coralline.sampling import SamplingParams, warp_params
from coralline.tree import TokenTree

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TargetConfig:
    model: str = "smollm2-135m-instruct"  # the built-in target; any local HF folder works
    dtype: str = "float32"  # fp32 on CPU (bf16 matmuls are ~4x slower there); bf16 on GPU
    device: str = "cpu"  # "cuda" on a GPU node
    transposed_linears: bool = True  # CPU fp32 only: linear layers stored transposed (and
    # as-is for <= 3 rows) so tree forwards of 4-16 nodes cost far less (cpu_linear.py; the
    # weights take twice the memory)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty name or path")


@dataclass(frozen=True)
class TreeOutput:
    logits: torch.Tensor  # [N, V] float32 raw logits after each node's path
    features: torch.Tensor  # [N, d] last hidden state (after the final norm) of each node,
    # on the model's device

    def probs(self, params: SamplingParams) -> torch.Tensor:  # [N, V]
        return warp_params(self.logits, params)


class TargetRunner:
    """Runs the target model over one sequence at a time (one session per runner)."""

    def __init__(
        self,
        model,
        tokenizer,
        config: TargetConfig | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model = model
        self.lock = lock or threading.Lock()  # serialises forwards across forks
        self.tokenizer = tokenizer
        self.config = config or TargetConfig()
        cfg = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.hidden_size = int(cfg.hidden_size)
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048))
        eos = getattr(model.generation_config, "eos_token_id", None) or cfg.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(int(e) for e in eos_ids)
        self.device = next(model.parameters()).device
        self.reset()

    @classmethod
    def load(cls, config: TargetConfig | None = None) -> TargetRunner:
        from coralline import models

        config = config or TargetConfig()
        model, tok = models.load(config.model, _DTYPES[config.dtype], config.device)
        if config.transposed_linears and config.device == "cpu" and config.dtype == "float32":
            from coralline.cpu_linear import transpose_linears

            transpose_linears(model, keep_original=True)
        return cls(model, tok, config)

    def fork(self) -> TargetRunner:
        """Another runner over the same model (no copy) with an empty cache of its own."""
        return TargetRunner(self.model, self.tokenizer, self.config, self.lock)

    @property
    def fingerprint(self) -> str:
        """The target's identity as draft heads record it (draft/coral.py)."""
        from coralline.draft.coral import target_fingerprint

        if not hasattr(self, "_fingerprint"):
            self._fingerprint = target_fingerprint(self.model)
        return self._fingerprint

    # ------------------------------------------------------------------ prompts
    def encode(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of a prompt; chat=True applies the model's chat template (user turn)."""
        from coralline.conversation import prompt_ids

        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: pass token ids instead")
        return prompt_ids(self.tokenizer, prompt, chat)

    # ------------------------------------------------------------------ sequence state
    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.num_cached = 0
        self.ids: list[int] = []  # [num_cached] the cached (committed) token ids
        self._features: torch.Tensor | None = None  # [capacity, d] model dtype, on the
        # model's device; rows < num_cached are the cached tokens' features
        self._fed: tuple[list[int], torch.Tensor] | None = None  # the last tree's tokens [N]
        # and features [N, d] until commit() or rollback()
        self.reused = 0  # prompt tokens the last prefill() found in the cache

    def cached_features(self) -> torch.Tensor:  # [num_cached, d] float32 copy
        """The features of the cached tokens (row j: the target's state at ids[j])."""
        if self._features is None or not self.num_cached:
            return torch.empty(0, self.hidden_size, device=self.device)
        return self._features[: self.num_cached].to(torch.float32, copy=True)

    def _keep_features(self, start: int, feats: torch.Tensor) -> None:
        """Store feats [m, d] as the features of cached positions start..start + m."""
        end = start + feats.shape[0]
        buf = self._features
        if buf is None or buf.shape[0] < end or buf.dtype != feats.dtype:
            old = 0 if buf is None else buf.shape[0]
            cap = max(end, min(max(64, 2 * old), self.max_context))
            grown = torch.empty(cap, feats.shape[1], dtype=feats.dtype, device=feats.device)
            if buf is not None and start:
                grown[:start] = buf[:start]
            self._features = buf = grown
        buf[start:end] = feats

    @torch.inference_mode()
    def _forward(
        self,
        ids: torch.Tensor,  # [n] int64
        positions: torch.Tensor,  # [n] int64
        mask: torch.Tensor | None,  # [n, num_cached + n] float additive, or None = causal
    ) -> torch.Tensor:  # [n, d]
        dev = self.device
        kwargs = {}
        if mask is not None:
            dtype = next(self.model.parameters()).dtype
            kwargs["attention_mask"] = mask.to(dev, dtype)[None, None]
        with self.lock:
            out = self.model.model(
                input_ids=ids.to(dev)[None],
                position_ids=positions.to(dev)[None],
                cache=self.cache,
                use_cache=True,
                **kwargs,
            )
        return out.last_hidden_state[0]

    @torch.inference_mode()
    def prefill(
        self, prompt_ids: Sequence[int], reuse: bool = False
    ) -> torch.Tensor:  # [len(prompt) - 1, d] float32
        """Start a sequence: cache every prompt token but the last (the first tree's root).

        Returns the features of all the cached tokens (a drafter's context). reuse=False starts
        from an empty cache; reuse=True keeps the longest common prefix of the cached ids and
        prompt_ids[:-1] and forwards only the rest. `reused` is set to the kept count."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if n >= self.max_context:
            raise ValueError(
                f"the prompt has {n} tokens; the model's context window is {self.max_context}"
            )
        ids = [int(t) for t in prompt_ids[:-1]]  # [n - 1] what the cache must hold
        keep = _common_prefix(self.ids, ids) if reuse else 0
        if keep:
            self.truncate(keep)  # drops any uncommitted tree and the cached tail past the prefix
        else:
            self.reset()
        self.reused = keep
        if n == 1:
            return torch.empty(0, self.hidden_size, device=self.device)
        if keep == n - 1:  # every prompt token is cached already
            return self.cached_features()
        new = torch.tensor(ids[keep:], dtype=torch.int64)  # [n - 1 - keep]
        feats = self._forward(new, torch.arange(keep, n - 1), None)  # [n - 1 - keep, d]
        self._keep_features(keep, feats)
        self.ids.extend(ids[keep:])
        self.num_cached = n - 1
        return feats.float() if keep == 0 else self.cached_features()

    @torch.inference_mode()
    def tree_forward(self, tree: TokenTree) -> TreeOutput:
        """One forward over all N nodes (root first) after the cached prefix."""
        p = self.num_cached
        if p + tree.num_nodes > self.max_context:
            raise ValueError(
                f"the tree ({tree.num_nodes} nodes) does not fit after {p} cached tokens in the "
                f"context window of {self.max_context}"
            )
        if self.cache.get_seq_length() != p:
            raise RuntimeError("commit() must follow every tree_forward()")
        mask = None if tree.is_chain else tree.attention_mask(p)
        hidden = self._forward(tree.tokens, tree.position_ids(p), mask)  # [N, d]
        self._fed = ([int(t) for t in tree.tokens.tolist()], hidden)
        with self.lock:
            logits = self.model.lm_head(hidden).float()
        return TreeOutput(logits.cpu(), hidden.float())

    @torch.inference_mode()
    def commit(self, accepted: Sequence[int]) -> None:
        """Keep the KV entries of the accepted nodes (root first) and drop the rest of the tree."""
        p = self.num_cached
        fed = self.cache.get_seq_length() - p
        acc = [int(a) for a in accepted]
        if not acc or acc[0] != 0 or any(not 0 <= a < fed for a in acc):
            raise ValueError(f"accepted must start at the root and index the {fed} fed nodes")
        if self._fed is None or len(self._fed[0]) != fed:
            raise RuntimeError("commit() must follow the tree_forward() of the fed nodes")
        fed_ids, fed_features = self._fed  # [fed], [fed, d]
        self._fed = None
        self.ids.extend(fed_ids[a] for a in acc)
        self._keep_features(p, fed_features[acc])
        moves = [(p + j, p + a) for j, a in enumerate(acc) if a != j]
        if moves:
            dst = torch.tensor([d for d, _ in moves], device=self.device)
            src = torch.tensor([s for _, s in moves], device=self.device)
            for layer in self.cache.layers:
                layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
                layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
        drop = fed - len(acc)
        if drop:
            self.cache.crop(-drop)
        self.num_cached = p + len(acc)

    def truncate(self, num_cached: int) -> None:
        """Forget committed tokens beyond the first `num_cached` (the engine cut a round short)."""
        if not 0 <= num_cached <= self.num_cached:
            raise ValueError(f"cannot truncate {self.num_cached} cached tokens to {num_cached}")
        self.rollback()
        if num_cached < self.num_cached:
            self.cache.crop(num_cached - self.num_cached)
            self.num_cached = num_cached
            del self.ids[num_cached:]  # feature rows past num_cached are simply unused

    def rollback(self) -> None:
        """Drop every node fed since the last commit (a drafter's scratch tree)."""
        fed = self.cache.get_seq_length() - self.num_cached
        if fed:
            self.cache.crop(-fed)
        self._fed = None

    def forward_costs(
        self,
        sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
        context: int = 200,
        repeats: int = 5,
        shape: str = "tree",
    ) -> dict[int, float]:
        """Median ms of one forward over n nodes after `context` cached tokens: the cost model
        t(n) of this machine (resets the runner's sequence). shape "tree": every node has up to
        4 children, breadth first (4D mask path); "chain": one path (causal path)."""
        import statistics
        import time

        if shape not in ("tree", "chain"):
            raise ValueError(f"shape must be 'tree' or 'chain', got {shape!r}")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self.vocab_size, (context + 1,), generator=g).tolist()
        self.prefill(ids)
        out = {}
        for n in sizes:
            if shape == "chain":
                tree = TokenTree.chain(ids[-1], ids[: n - 1])
            else:
                tree = TokenTree.from_parents(
                    ids[-1:] + ids[: n - 1], [-1] + [(i - 1) // 4 for i in range(1, n)]
                )
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                self.tree_forward(tree)
                self.rollback()
                times.append((time.perf_counter() - t0) * 1e3)
            out[n] = statistics.median(times)
        self.reset()
        return out

    @torch.inference_mode()
    def full_forward_logits(self, ids: Sequence[int]) -> torch.Tensor:  # [V]
        """Next-token logits after `ids` by a fresh causal forward (tests and debugging)."""
        ids_t = torch.tensor(list(ids), dtype=torch.int64, device=self.device)[None]
        return self.model(input_ids=ids_t).logits[0, -1].float().cpu()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
