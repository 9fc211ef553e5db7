"""The target model runner: prefill, tree forward, KV commit of the accepted path, reset.

State is one sequence: a KV cache holding the committed tokens EXCEPT the last one (the root of
the next tree), and `num_cached`, the position pointer. Each round feeds the whole tree, root
included, in one forward with a float additive tree mask and explicit positions
(num_cached + depth); row i of the output is the target's distribution after node i's path.
`commit(accepted)` then keeps the KV entries of the accepted path and drops the rest.

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
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the prompt is empty")
        if self.tokenizer is None:
            raise ValueError("this model folder has no tokenizer: pass token ids instead")
        if chat and getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        return [int(t) for t in ids]

    # ------------------------------------------------------------------ sequence state
    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        self.num_cached = 0

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
    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:  # [len(prompt) - 1, d]
        """Start a sequence: cache every prompt token but the last (the first tree's root).

        Returns the features of the cached tokens (a drafter's context)."""
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt has no tokens")
        if n >= self.max_context:
            raise ValueError(
                f"the prompt has {n} tokens; the model's context window is {self.max_context}"
            )
        self.reset()
        if n == 1:
            return torch.empty(0, self.hidden_size, device=self.device)
        ids = torch.tensor(list(prompt_ids[:-1]), dtype=torch.int64)
        feats = self._forward(ids, torch.arange(n - 1), None)
        self.num_cached = n - 1
        return feats.float()

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

    def rollback(self) -> None:
        """Drop every node fed since the last commit (a drafter's scratch tree)."""
        fed = self.cache.get_seq_length() - self.num_cached
        if fed:
            self.cache.crop(-fed)

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
