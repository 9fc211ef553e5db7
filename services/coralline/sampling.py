"""Sampling: logits -> warped probabilities, and the rules for every random draw.

One warping function serves the target and the draft: verification is exact only when Mb and
Ms are both computed AFTER the same temperature / top-k / top-p warping that sampling uses.

RNG rules: every random draw goes through an explicit `torch.Generator` (CPU, seeded) or a
`Coins` object that wraps one. Nothing here touches the global RNG, so a seed reproduces a
generation in any process. Verifiers draw through `Coins` (bernoulli + categorical) so an exact
enumerator can replace the coins and integrate them out (see verification/exact.py).

Randomness is keyed, not streamed (`keyed_generator`): a round's draft draws come from
(seed, DRAFT, committed length) and its verification coins from (seed, VERIFY, committed
length), two separate key domains. No generator object ever crosses a process boundary: a
drafter in another process, or a session moved to another worker, draws exactly the same
numbers from the seed and the position alone.

Knows nothing about trees, models or verification.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
from dataclasses import dataclass
from typing import Protocol

import torch

MIN_TEMPERATURE = 1e-6  # below it, logits / T overflows float32: use 0 for greedy decoding


@dataclass(frozen=True)
class SamplingParams:
    """How to turn the target's logits into tokens, and when to stop. Validated on construction."""

    temperature: float = 0.0  # 0 = greedy: deterministic, and what evaluations compare against
    top_k: int = 0  # 0 = off: keep the whole vocabulary
    top_p: float = 1.0  # 1 = off: keep the whole distribution
    seed: int | None = None  # None = fresh entropy; an int reproduces the generation exactly
    max_new_tokens: int = 256  # a chat-sized answer; the context window still bounds it
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text (not included)
    ignore_eos: bool = False  # True: an end-of-sequence token is emitted like any other and the
    # generation goes on (to max_new_tokens, a stop string or the context window); the law of
    # every token is unchanged. What benchmarks use so every request does the same work (vLLM's
    # `ignore_eos`)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if 0 < t < MIN_TEMPERATURE:  # logits / t would overflow to inf (NaN probabilities)
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got {t!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, int | float) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"max_new_tokens must be an integer > 0, got {n!r}")
        stop = tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def warp(
    logits: torch.Tensor,  # [..., V]
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:  # [..., V] float32 probabilities, each row sums to 1
    """Temperature, then top-k, then top-p (the order of Hugging Face's warpers).

    temperature == 0 gives a one-hot row at the argmax (the first index on ties). top-k keeps
    every token tied with the k-th largest logit. top-p keeps the smallest set of most likely
    tokens whose mass reaches top_p (at least one token).
    """
    SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)  # validates
    logits = logits.float()
    if temperature == 0.0:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    scores = logits / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= top_p  # the first token always has mass_before = 0
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def warp_params(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:  # [..., V]
    return warp(logits, params.temperature, params.top_k, params.top_p)


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator: seeded when seed is given, else from fresh OS entropy."""
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


DRAFT, VERIFY = 1, 2  # key domains: a draft draw and a verifier coin never share a stream


def keyed_seed(seed: int, domain: int, index: int) -> int:
    """A 63-bit seed derived from (seed, domain, index) by BLAKE2b: distinct keys give
    unrelated streams, and the same key gives the same stream in any process."""
    for name, v in (("seed", seed), ("domain", domain), ("index", index)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {v!r}")
    digest = hashlib.blake2b(
        struct.pack("<QQQ", seed, domain, index), digest_size=8, person=b"coralline-rng"
    ).digest()
    return int.from_bytes(digest, "little") >> 1


def keyed_generator(seed: int, domain: int, index: int) -> torch.Generator:
    """The CPU generator of one key: DRAFT or VERIFY draws of the round whose root sits at
    committed length `index` (prompt + generated tokens so far, the root being the last)."""
    return make_generator(keyed_seed(seed, domain, index))


def fresh_seed() -> int:
    """A seed from OS entropy, for requests that give none (it is reported back)."""
    return secrets.randbits(63)


def categorical(probs: torch.Tensor, u: float) -> int:  # probs [V], non-negative, sum > 0
    """Inverse-CDF draw with one uniform u in [0, 1): never returns a zero-probability token."""
    cdf = torch.cumsum(probs.double(), dim=0)
    total = float(cdf[-1])
    if not total > 0.0:
        raise ValueError("cannot sample from a row with no probability mass")
    idx = int(torch.searchsorted(cdf, torch.tensor([u * total], dtype=cdf.dtype), right=True))
    if idx >= probs.numel() or float(probs[idx]) <= 0.0:
        # u * total rounded up onto the last step of the cdf: take the last token with mass
        idx = int(torch.nonzero(probs > 0)[-1])
    return idx


def sample_without_replacement(
    probs: torch.Tensor,  # [V], non-negative
    k: int,
    generator: torch.Generator,
) -> torch.Tensor:  # [min(k, support)] int64, in SWOR order
    """Gumbel-top-k: the first k tokens of a sequential draw without replacement from probs.

    topk(log p + Gumbel) is distributed exactly like drawing x1 ~ p, x2 ~ p without x1
    (renormalised), ...; the returned order IS the draw order. Tokens with zero mass are never
    returned, so fewer than k come back when the support is smaller than k.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    support = int((probs > 0).sum())
    k = min(k, support)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    u = torch.rand(probs.shape, generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    keys = torch.log(probs.double()) + gumbel  # -inf where probs == 0
    return torch.topk(keys, k).indices


class Coins(Protocol):
    """The two kinds of random decision a verifier makes."""

    def bernoulli(self, p: float) -> bool:
        """True with probability p (p is clipped to [0, 1])."""
        ...

    def categorical(self, probs: torch.Tensor) -> int:  # probs [V], non-negative
        """A token drawn from probs (normalised by the callee)."""
        ...


class TorchCoins:
    """Coins from a torch.Generator; uniforms are drawn in blocks to keep per-draw cost low."""

    _BLOCK = 64

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._buf: list[float] = []

    def uniform(self) -> float:
        if not self._buf:
            block = torch.rand(self._BLOCK, generator=self.generator, dtype=torch.float64)
            self._buf = block.tolist()[::-1]
        return self._buf.pop()

    def bernoulli(self, p: float) -> bool:
        return self.uniform() < p

    def categorical(self, probs: torch.Tensor) -> int:
        return categorical(probs, self.uniform())


def as_coins(rng: torch.Generator | Coins) -> Coins:
    return TorchCoins(rng) if isinstance(rng, torch.Generator) else rng
