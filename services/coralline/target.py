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

Where the KV entries live is the runner's `kv` (the `KVCache` protocol below): `DynamicKV`, one
transformers DynamicCache per runner, is the readable reference; `batching.PooledKV` keeps them
in a slot of a preallocated pool shared by every session and gathers the forwards of all
sessions into one batched forward (batching/). The runner's logic (prefill with reuse, the
tree's features, commit, truncate) is the same over both, and tested the same.

Knows nothing about drafting or verification; it only runs forward passes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from coralline.sampling import SamplingParams, warp_params
from coralline.tree import TokenTree

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TargetConfig:
    model: str = "smollm2-135m-instruct"  # the built-in target; any local HF folder works
    dtype: str = "float32"  # fp32 on CPU (bf16 matmuls are ~4x slower there); bf16 on GPU
    device: str = "cpu"  # "cuda" on a GPU node
    cpu_linears: str = "auto"  # CPU fp32 only: the linear layers' kernel (cpu_linear.py):
    # "auto" (oneDNN where torch has it), "onednn", "transposed", "torch" (nn.Linear); tree
    # and batch forwards of 2-64 tokens cost far less than with nn.Linear (the weights take
    # twice the memory)

    def __post_init__(self) -> None:
        from coralline.cpu_linear import KINDS

        if self.cpu_linears != "auto" and self.cpu_linears not in KINDS:
            raise ValueError(
                f"cpu_linears must be 'auto' or one of {KINDS}, got {self.cpu_linears!r}"
            )
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


class KVCache(Protocol):
    """One sequence's KV entries: the committed prefix, then the nodes fed since the last keep."""

    lock: object  # a context manager serialising forwards across the forks of one model
    max_context: int  # the most tokens this cache can hold

    def length(self) -> int: ...  # entries held (committed + fed)

    def forward(
        self,
        ids: torch.Tensor,  # [n] int64
        positions: torch.Tensor,  # [n] int64
        tree: TokenTree | None,  # the n nodes' tree (ancestor mask), or None = causal
        logits: bool,  # also return the LM head's rows
        logits_from: int = 0,  # ... of rows logits_from.. only
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append the n entries; -> hidden [n, d] (after the final norm, on the model's device)
        and logits [n - logits_from, V] (float32, on the CPU) or None."""
        ...

    def keep(self, start: int, accepted: Sequence[int]) -> None:
        """Keep the entries at start + a for each a in accepted (root first) at start,
        start + 1, ...; drop the rest."""
        ...

    def crop(self, length: int) -> None:
        """Keep the first `length` entries."""
        ...

    def clear(self) -> None:
        """Hold nothing (a pooled cache gives its slot back)."""
        ...

    def fork(self) -> KVCache:
        """An empty cache over the same model and lock."""
        ...


class DynamicKV:
    """The reference cache: a transformers DynamicCache per sequence, compacted in place."""

    def __init__(self, model, lock=None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.lock = lock or threading.Lock()
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        self.cache = DynamicCache(config=model.config)

    def fork(self) -> DynamicKV:
        return DynamicKV(self.model, self.lock)

    def length(self) -> int:
        return self.cache.get_seq_length()

    @torch.inference_mode()
    def forward(self, ids, positions, tree, logits, logits_from=0):
        dev = next(self.model.parameters()).device
        kwargs = {}
        if tree is not None and not tree.is_chain:
            dtype = next(self.model.parameters()).dtype
            mask = tree.attention_mask(self.length())  # [n, cached + n]
            kwargs["attention_mask"] = mask.to(dev, dtype)[None, None]
        with self.lock:
            out = self.model.model(
                input_ids=ids.to(dev)[None],
                position_ids=positions.to(dev)[None],
                cache=self.cache,
                use_cache=True,
                **kwargs,
            )
            hidden = out.last_hidden_state[0]  # [n, d]
            rows = self.model.lm_head(hidden[logits_from:]).float().cpu() if logits else None
        return hidden, rows

    @torch.inference_mode()
    def keep(self, start: int, accepted: Sequence[int]) -> None:
        moves = [(start + j, start + a) for j, a in enumerate(accepted) if a != j]
        if moves:
            dev = self.cache.layers[0].keys.device
            dst = torch.tensor([d for d, _ in moves], device=dev)
            src = torch.tensor([s for _, s in moves], device=dev)
            for layer in self.cache.layers:
                layer.keys.index_copy_(2, dst, layer.keys.index_select(2, src))
                layer.values.index_copy_(2, dst, layer.values.index_select(2, src))
        self.crop(start + len(accepted))

    def crop(self, length: int) -> None:
        drop = self.length() - length
        if drop > 0:
            self.cache.crop(-drop)

    def clear(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)


class TargetRunner:
    """Runs the target model over one sequence at a time (one session per runner)."""

    def __init__(
        self,
        model,
        tokenizer,
        config: TargetConfig | None = None,
        lock: threading.Lock | None = None,
        kv: KVCache | None = None,
    ) -> None:
        self.model = model
        self.kv: KVCache = kv if kv is not None else DynamicKV(model, lock)
        self.tokenizer = tokenizer
        self.config = config or TargetConfig()
        cfg = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.hidden_size = int(cfg.hidden_size)
        self.max_context = min(
            int(getattr(cfg, "max_position_embeddings", 2048)), self.kv.max_context
        )
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
        from coralline.cpu_linear import cpu_inference_linears

        cpu_inference_linears(model, config.cpu_linears)
        return cls(model, tok, config)

    def fork(self) -> TargetRunner:
        """Another runner over the same model (no copy) with an empty cache of its own (of the
        same kind: a pooled runner's fork takes a slot of the same pool)."""
        return TargetRunner(self.model, self.tokenizer, self.config, kv=self.kv.fork())

    @property
    def lock(self):
        """The lock serialising forward passes across forks (the cache's)."""
        return self.kv.lock

    @lock.setter
    def lock(self, value) -> None:
        self.kv.lock = value

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
        self.kv.clear()
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
    def prefill(
        self, prompt_ids: Sequence[int], reuse: bool = False
    ) -> torch.Tensor:  # [len(prompt) - 1, d] float32
        """Start a sequence: cache every prompt token but the last (the first tree's root).

        Returns the features of all the cached tokens (a drafter's context). reuse=False starts
        from an empty cache; reuse=True keeps the longest common prefix of the cached ids and
        prompt_ids[:-1] and forwards only the rest. `reused` is set to the kept count."""
        return self._prefill(prompt_ids, reuse, root=False)[0]

    @torch.inference_mode()
    def prefill_root(
        self, prompt_ids: Sequence[int], reuse: bool = False
    ) -> tuple[torch.Tensor, TreeOutput]:  # [len(prompt) - 1, d], the root's output
        """prefill(), then tree_forward(TokenTree.root_only(prompt_ids[-1])), in one forward:
        the prompt's last token rides with the rest of the prompt (the LM head runs on its row
        alone), so the first token costs no forward of its own. The root is fed, not
        committed: commit([0]) follows, as after tree_forward."""
        return self._prefill(prompt_ids, reuse, root=True)

    def _prefill(self, prompt_ids, reuse: bool, root: bool):
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
        last = int(prompt_ids[-1])
        fed = ids[keep:] + ([last] if root else [])  # [m] the tokens this forward feeds
        if fed:
            new = torch.tensor(fed, dtype=torch.int64)  # [m]
            # [m, d], and [1, V] for the root's row
            feats, rows = self.kv.forward(
                new, torch.arange(keep, keep + len(fed)), None, root, len(fed) - 1
            )
        cached = n - 1 - keep  # of the fed rows, those the cache keeps
        if cached:
            self._keep_features(keep, feats[:cached])
            self.ids.extend(ids[keep:])
        self.num_cached = n - 1
        if n == 1:
            out = torch.empty(0, self.hidden_size, device=self.device)
        elif keep == 0:
            out = feats[:cached].float()
        else:
            out = self.cached_features()
        if not root:
            return out, None
        self._fed = ([last], feats[cached:])
        return out, TreeOutput(rows, feats[cached:].float())

    @torch.inference_mode()
    def tree_forward(self, tree: TokenTree) -> TreeOutput:
        """One forward over all N nodes (root first) after the cached prefix."""
        p = self.num_cached
        if p + tree.num_nodes > self.max_context:
            raise ValueError(
                f"the tree ({tree.num_nodes} nodes) does not fit after {p} cached tokens in the "
                f"context window of {self.max_context}"
            )
        if self.kv.length() != p:
            raise RuntimeError("commit() must follow every tree_forward()")
        hidden, logits = self.kv.forward(tree.tokens, tree.position_ids(p), tree, True)  # [N, d]
        self._fed = ([int(t) for t in tree.tokens.tolist()], hidden)
        return TreeOutput(logits, hidden.float())

    @torch.inference_mode()
    def commit(self, accepted: Sequence[int]) -> None:
        """Keep the KV entries of the accepted nodes (root first) and drop the rest of the tree."""
        p = self.num_cached
        fed = self.kv.length() - p
        acc = [int(a) for a in accepted]
        if not acc or acc[0] != 0 or any(not 0 <= a < fed for a in acc):
            raise ValueError(f"accepted must start at the root and index the {fed} fed nodes")
        if self._fed is None or len(self._fed[0]) != fed:
            raise RuntimeError("commit() must follow the tree_forward() of the fed nodes")
        fed_ids, fed_features = self._fed  # [fed], [fed, d]
        self._fed = None
        self.ids.extend(fed_ids[a] for a in acc)
        self._keep_features(p, take_rows(fed_features, acc))
        self.kv.keep(p, acc)
        self.num_cached = p + len(acc)

    def truncate(self, num_cached: int) -> None:
        """Forget committed tokens beyond the first `num_cached` (the engine cut a round short)."""
        if not 0 <= num_cached <= self.num_cached:
            raise ValueError(f"cannot truncate {self.num_cached} cached tokens to {num_cached}")
        self.rollback()
        if num_cached < self.num_cached:
            self.kv.crop(num_cached)
            self.num_cached = num_cached
            del self.ids[num_cached:]  # feature rows past num_cached are simply unused

    def rollback(self) -> None:
        """Drop every node fed since the last commit (a drafter's scratch tree)."""
        self.kv.crop(self.num_cached)
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


def take_rows(x: torch.Tensor, index: Sequence[int]) -> torch.Tensor:  # [len(index), ...]
    """x[list(index)], as a view when index is 0, 1, ..., k - 1 (a chain-shaped acceptance,
    every plain round): indexing with a list costs tens of microseconds, a slice next to none."""
    if all(a == j for j, a in enumerate(index)):
        return x[: len(index)]
    return x[list(index)]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
