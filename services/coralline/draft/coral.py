"""The CORAL draft head (Weng et al., ACL 2025), as we reconstruct it, and its checkpoint format.

Head (EAGLE-style, sized from the target's config):
    x_t = concat(E[token_{t+1}], f_t)        E: the target's frozen embedding, f_t: a feature
    h_t = Linear(2d -> d)(x_t)                (with bias, as EAGLE)
    g_t = one decoder layer shaped like the target's, WITHOUT its input RMSNorm (EAGLE), with
          its own KV cache and rotary positions, then an RMSNorm initialised from the target's
          final norm (our choice: the target's features are post-norm, so g_t starts on their
          scale and the LM head's logits on the target's)
    g_t approximates the target feature f_{t+1}; logits = frozen target LM head (g_t).
At inference f_t is the target's feature for committed tokens and the head's own output along a
draft path.

Grouped LM head (CORAL's weight grouping; our choices): the V LM-head rows are split into G
equal groups by spherical k-means on the L2-normalised rows (similar tokens share a group), then
balanced by sorting tokens by (cluster, similarity to its centroid) and cutting the order into G
equal chunks. A router MLP d -> 256 -> G on g_t picks the top `active_groups` groups; logits are
computed only over their rows, stored contiguously in group order (a permuted copy of the LM head,
made once) so each selected group is one small matmul reading only its rows. The draft
distribution is the softmax over the selected rows, zero elsewhere: exactly what the verifier
receives, so verification stays lossless.

Checkpoint: `head.safetensors` (fc, layer, router weights, group order; never the shared
embedding or LM head) + `config.json` (shapes, target identity and shape hash, groups, training
recipe, data hash). Loading a head for another target is a clear error.

Knows nothing about trees or verification.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CoralConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    target: str  # the target's name (e.g. smollm2-135m-instruct)
    target_hash: str  # hash of the target's shape and LM-head weights (see target_fingerprint)
    num_groups: int = 64  # 768 rows per group for a 49152 vocabulary
    active_groups: int = 8  # 1/8 of the LM head per step: the LM head dominates draft latency
    router_hidden: int = 256  # a router this small costs ~0.1 ms
    feature_norm: bool = True  # RMSNorm on the input feature: the target's features have a few
    # massive dimensions (|f| up to ~50 on SmolLM2) that otherwise swamp the fused input
    recipe: dict = field(default_factory=dict)  # training flags and hyper-parameters
    data_hash: str = ""  # hash of the training data selection

    def __post_init__(self) -> None:
        if self.vocab_size % self.num_groups:
            raise ValueError(
                f"num_groups ({self.num_groups}) must divide the vocabulary ({self.vocab_size})"
            )
        if not 1 <= self.active_groups <= self.num_groups:
            raise ValueError("active_groups must be in [1, num_groups]")

    @property
    def group_size(self) -> int:
        return self.vocab_size // self.num_groups

    def llama_config(self):
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_position_embeddings,
        )
        cfg._attn_implementation = "sdpa"
        return cfg


def fingerprint(
    hidden_size: int,
    num_hidden_layers: int,
    vocab_size: int,
    num_attention_heads: int,
    lm_head: torch.Tensor,  # [V, d] the target's LM-head rows
) -> str:
    """A short hash of a target's shape and a sample of its LM-head weights: what a head
    records as `target_hash`, computable from the full model or from its LM head alone."""
    h = hashlib.sha256()
    h.update(json.dumps([hidden_size, num_hidden_layers, vocab_size, num_attention_heads]).encode())
    sample = lm_head[:: max(1, lm_head.shape[0] // 64), :16]
    h.update(sample.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def target_fingerprint(model) -> str:
    """The fingerprint of a loaded target model."""
    cfg = model.config
    w = model.get_output_embeddings().weight
    return fingerprint(
        cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.num_attention_heads, w
    )


def config_for_target(model, name: str, **overrides) -> CoralConfig:
    cfg = model.config
    rope = getattr(cfg, "rope_theta", None) or (getattr(cfg, "rope_parameters", None) or {}).get(
        "rope_theta", 10000.0
    )
    return CoralConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=float(rope),
        max_position_embeddings=cfg.max_position_embeddings,
        target=name,
        target_hash=target_fingerprint(model),
        **overrides,
    )


def balanced_groups(weight: torch.Tensor, num_groups: int, iters: int = 8, seed: int = 0):
    """Token ids in group order [G, V/G]: spherical k-means, then equal-size chunks."""
    x = F.normalize(weight.detach().float().cpu(), dim=1)  # [V, d] (CPU: same on any device)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=g)[:num_groups]].clone()  # [G, d]
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)  # [V]
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = torch.bincount(assign, minlength=num_groups) == 0
        sums[empty] = x[torch.randperm(x.shape[0], generator=g)[: int(empty.sum())]]
        centroids = F.normalize(sums, dim=1)
    sim = x @ centroids.T
    assign = sim.argmax(dim=1)
    own = sim.gather(1, assign[:, None])[:, 0]
    order = sorted(range(x.shape[0]), key=lambda i: (int(assign[i]), -float(own[i])))
    return torch.tensor(order, dtype=torch.int64).view(num_groups, -1)


class CoralHead(nn.Module):
    def __init__(self, config: CoralConfig) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        self.config = config
        d = config.hidden_size
        llama = config.llama_config()
        self.fc = nn.Linear(2 * d, d, bias=True)
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as _Norm

        self.feature_in = (
            _Norm(d, eps=config.rms_norm_eps) if config.feature_norm else nn.Identity()
        )
        self.layer = LlamaDecoderLayer(llama, layer_idx=0)
        self.layer.input_layernorm = nn.Identity()  # EAGLE: no norm on the fused input
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(d, eps=config.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(llama)
        self.router = nn.Sequential(
            nn.Linear(d, config.router_hidden),
            nn.SiLU(),
            nn.Linear(config.router_hidden, config.num_groups),
        )
        # [G, V/G] token ids in group order; set by init_groups() or a checkpoint
        self.register_buffer(
            "group_tokens",
            torch.arange(config.vocab_size).view(config.num_groups, -1),
            persistent=True,
        )
        self._embed: torch.Tensor | None = None  # [V, d] the target's, shared, frozen
        self._lm_head: torch.Tensor | None = None  # [V, d] the target's, shared, frozen
        self._grouped_rows: torch.Tensor | None = None  # [G, V/G, d] lm_head rows, group order

    # ------------------------------------------------------------------ shared weights
    def attach(self, target_model) -> CoralHead:
        """Share the target's embedding and LM head (no copy), after checking its identity."""
        return self.attach_weights(
            target_model.get_input_embeddings().weight,
            target_model.get_output_embeddings().weight,
            target_fingerprint(target_model),
        )

    def attach_weights(
        self,
        embed: torch.Tensor,  # [V, d] the target's input embedding
        lm_head: torch.Tensor,  # [V, d] the target's LM-head rows (the same tensor when tied)
        target_hash: str,  # the target's fingerprint (see `fingerprint`)
    ) -> CoralHead:
        """Share the target's token weights without its layers (what the drafter service
        loads), after checking that they belong to the target this head was trained for."""
        if target_hash != self.config.target_hash:
            raise ValueError(
                f"this draft head was trained for target {self.config.target!r} "
                f"(fingerprint {self.config.target_hash}); the given target's fingerprint is "
                f"{target_hash}: train a head for it with `coralline train-draft`"
            )
        self._embed = embed.detach()
        self._lm_head = lm_head.detach()
        self._grouped_rows = None
        return self

    def init_groups(self, seed: int = 0) -> None:
        """Group the LM-head rows (spherical k-means, balanced); needs attach() first."""
        self.group_tokens.copy_(
            balanced_groups(self._need(self._lm_head), self.config.num_groups, seed=seed)
        )
        self._grouped_rows = None

    def token_groups(self) -> torch.Tensor:  # [V] int64: the group of every token id
        dev = self.group_tokens.device
        groups = torch.empty(self.config.vocab_size, dtype=torch.int64, device=dev)
        groups[self.group_tokens.flatten()] = torch.arange(
            self.config.num_groups, device=dev
        ).repeat_interleave(self.config.group_size)
        return groups

    @staticmethod
    def _need(t: torch.Tensor | None) -> torch.Tensor:
        if t is None:
            raise RuntimeError("call attach(target_model) first")
        return t

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] token_{t+1}
        features: torch.Tensor,  # [B, T, d] f_t
        position_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor | None = None,  # [B, 1, T, past + T] float additive
        cache=None,  # a DynamicCache of one layer, or None
    ) -> torch.Tensor:  # [B, T, d] draft features g_t
        emb = F.embedding(input_ids, self._need(self._embed))
        h = self.fc(torch.cat([emb.to(features.dtype), self.feature_in(features)], dim=-1))
        cos_sin = self.rotary(h, position_ids)
        out = self.layer(
            h,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
            position_embeddings=cos_sin,
        )
        return self.norm(out)

    def full_logits(self, feats: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V]
        return feats @ self._need(self._lm_head).T.to(feats.dtype)

    def router_logits(self, feats: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., G]
        return self.router(feats)

    def prepare_grouped(self) -> None:
        """Make the LM head's rows in group order (a permuted copy, once: ~0.4 s for SmolLM2 on
        one CPU core), so the first draft round does not pay for it."""
        if self._grouped_rows is None:
            self._grouped_rows = self._need(self._lm_head)[self.group_tokens].contiguous()

    def grouped_logits(
        self, feats: torch.Tensor, active: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over the rows of each node's top `active` groups.

        feats [n, d] -> (token ids [n, k * R], logits [n, k * R]). One small matmul per selected
        group over the nodes that chose it: the rows are contiguous in group order, so no
        weight is copied and only k/G of the LM head is read (for n = 10 rows on one CPU core:
        ~1.2 ms for 8 of 64 groups vs ~37 ms for the full head)."""
        k = active or self.config.active_groups
        self.prepare_grouped()
        top = self.router_logits(feats).topk(k, dim=-1).indices  # [n, k]
        r = self.config.group_size
        logits = torch.empty(feats.shape[0], k, r, dtype=feats.dtype, device=feats.device)
        for g in torch.unique(top).tolist():
            node, slot = (top == g).nonzero(as_tuple=True)
            logits[node, slot] = F.linear(feats[node], self._grouped_rows[g].to(feats.dtype))
        return self.group_tokens[top].flatten(1), logits.flatten(1)

    # ------------------------------------------------------------------ checkpoints
    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().cpu().to(torch.float16) if v.is_floating_point() else v.detach().cpu()
            for k, v in self.state_dict().items()
        }
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "head.safetensors"))
        meta = {"format_version": FORMAT_VERSION, **asdict(self.config)}
        (folder / "config.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> CoralHead:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "config.json").exists() or not (folder / "head.safetensors").exists():
            raise ValueError(f"{folder} is not a CORAL checkpoint (config.json + head.safetensors)")
        meta = json.loads((folder / "config.json").read_text())
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"checkpoint format {version} is not supported ({FORMAT_VERSION})")
        head = cls(CoralConfig(**meta))
        state = load_file(str(folder / "head.safetensors"))
        head.load_state_dict(
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        )
        return head.to(dtype).eval()
