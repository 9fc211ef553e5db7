"""One forward over the pending work of many sessions: a ragged batch.

Each item is one session's tree (or prefill chunk) after the entries its slot already holds: its
token ids, absolute positions and the attention pattern among its own nodes (a tree's ancestor
mask, or causal for a chunk of a prompt). The items' tokens are concatenated into one [T, d]
activation, so every linear layer (QKV, O, the MLP, the LM head) runs once over all T tokens:
that is where batching pays. Attention runs per item over a view of its slot (no padding, no
gather): the item's keys / values are written at positions start..start + n of the slot, and
its queries attend to the slot's first start + n entries with the item's mask.

The model must be Llama-shaped (Llama, SmolLM, Mistral without a sliding window, Qwen2):
decoder layers with input / post-attention norms, q / k / v / o projections, rotary embeddings
and no per-head norms. `unsupported(model)` says why another one is not.

Knows nothing about sessions, scheduling or verification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coralline.batching.pool import KVPool


@dataclass(frozen=True)
class Item:
    slot: int
    start: int  # entries the slot holds before this item (its cached length)
    ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64 absolute positions
    mask: torch.Tensor | None  # [n, n] bool, mask[i, j]: node i may attend to node j (its
    # ancestors and itself); None = causal
    logits: bool  # also compute the LM head's rows

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def unsupported(model) -> str | None:
    """Why the ragged forward cannot run `model` (None: it can)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if inner is None or layers is None or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} is not a Llama-shaped decoder (model.model.layers)"
    attn = layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not hasattr(attn, name):
            return f"its attention has no {name}"
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        return "its attention normalises queries / keys per head (not supported yet)"
    cfg = model.config
    qwen2 = getattr(cfg, "model_type", "") == "qwen2"  # its sliding_window is off by default
    window = (
        getattr(cfg, "use_sliding_window", False) if qwen2 else getattr(cfg, "sliding_window", None)
    )
    if window:
        return "it uses sliding-window attention"
    return None


def _mask(item: Item, device) -> torch.Tensor:  # [n, start + n] bool
    n, start = item.size, item.start
    out = torch.ones(n, start + n, dtype=torch.bool)
    tail = item.mask if item.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
    out[:, start:] = tail
    return out.to(device)


@torch.inference_mode()
def ragged_forward(
    model, pool: KVPool, items: Sequence[Item]
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run every item in one pass; -> per item (hidden [n, d] after the final norm, on the
    model's device; logits [n, V] float32 on the CPU or None). Writes each item's keys / values
    into its slot at start..start + n; the caller moves the slots' pointers."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if not items:
        return []
    inner = model.model
    dev = next(model.parameters()).device
    sizes = [it.size for it in items]
    bounds = [0]
    for n in sizes:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    ids = torch.cat([it.ids for it in items]).to(dev)  # [T]
    pos = torch.cat([it.positions for it in items]).to(dev)  # [T]
    x = inner.embed_tokens(ids)[None]  # [1, T, d]
    cos, sin = inner.rotary_emb(x, pos[None])  # [1, T, head_dim] each
    masks = [_mask(it, dev) for it in items]
    for it in items:
        if it.start + it.size > pool.slot_tokens:
            raise ValueError(f"{it.start + it.size} tokens do not fit a slot of {pool.slot_tokens}")
    slot_of = torch.cat([torch.full((it.size,), it.slot) for it in items]).to(dev)  # [T]
    at = torch.cat([torch.arange(it.start, it.start + it.size) for it in items]).to(dev)  # [T]
    for li, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        attn = layer.self_attn
        hd = attn.head_dim
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, H, T, hd]
        k = attn.k_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, T, hd]
        v = attn.v_proj(h).view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, T, hd]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        pool.write_many(li, slot_of, at, k[0], v[0])
        outs = []
        for it, a, b, m in zip(items, bounds, bounds[1:], masks, strict=False):
            keys, values = pool.view(li, it.slot, it.start + it.size)  # [kvH, L, hd]
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, a:b],
                    keys[None],
                    values[None],
                    attn_mask=m,
                    scale=attn.scaling,
                    enable_gqa=True,
                )
            )  # [1, H, n, hd]
        o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, total, -1)  # [1, T, H * hd]
        x = x + attn.o_proj(o)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hidden = inner.norm(x)[0]  # [T, d]
    want = [i for i, it in enumerate(items) if it.logits]
    rows = {}
    if want:
        sel = torch.cat([hidden[bounds[i] : bounds[i + 1]] for i in want])  # [sum n, d]
        logits = model.lm_head(sel).float().cpu()  # [sum n, V]
        at = 0
        for i in want:
            rows[i] = logits[at : at + sizes[i]]
            at += sizes[i]
    return [(hidden[bounds[i] : bounds[i + 1]], rows.get(i)) for i in range(len(items))]
