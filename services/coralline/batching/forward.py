"""One forward over the pending work of many sessions: a ragged batch.

Each item is one session's tree (or prefill chunk) after the entries its slot already holds: its
token ids, absolute positions and the attention pattern among its own nodes (a tree's ancestor
mask, or causal for a chunk of a prompt). The items' tokens are concatenated into one [T, d]
activation, so every linear layer (QKV, O, the MLP, the LM head) runs once over all T tokens:
that is where batching pays. Attention runs per item over a view of its slot (no padding, no
gather): the item's keys / values are written at positions start..start + n of the slot, and
its queries attend to the slot's first start + n entries with the item's mask.

Small items (trees and decode steps, <= SHARED_ATTENTION_MAX tokens) share one attention call
when there are two or more of them (`_SharedAttention`): their slots' first L entries (L the
longest) are read as [k, kv_heads, L, head_dim], a view when the slots are consecutive (the
usual case) and gathered otherwise; entries past an item's own length are masked out (and kept
finite by `KVPool.cover`); queries are padded to the largest item; one masked SDPA runs over
all k. That saves k - 1 kernel launches per layer (~50 us each on a CPU: a SmolLM2 forward of
16 one-token sessions went from ~120 to ~80 ms). The per-item path is the reference it is
tested against, and what prompt chunks (and a lone item) use. With `cpu_kernel` on a CPU
float32 pool, the items of at most cpu_attention.KERNEL_MAX_NODES tokens (decode steps, tiny
trees) share one call of coralline's own kernel instead (cpu_attention.cpp), and the larger
small items one SDPA call of their own, so one session's tree does not send every decode step
to SDPA. The kernel reads each slot's own entries once for all of a kv head's queries, where
SDPA pays per (item, head) overheads (SmolLM2 here: a 16-session decode forward 97 -> 82 ms).

Given `Projections` (the scheduler builds one), each layer's q / k / v projections run as one
fused linear, and its MLP's gate / up as another (cpu_linear.FusedLinear: ~7-10% off a SmolLM2
forward at 1-4 tokens here). Without, the model's own modules run: the reference.

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

from coralline.batching import cpu_attention
from coralline.batching.pool import KVPool
from coralline.cpu_linear import FusedLinear


@dataclass(frozen=True)
class Item:
    slot: int
    start: int  # entries the slot holds before this item (its cached length)
    ids: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] int64 absolute positions
    mask: torch.Tensor | None  # [n, n] bool, mask[i, j]: node i may attend to node j (its
    # ancestors and itself); None = causal
    logits: bool  # also compute the LM head's rows
    logits_from: int = 0  # ... of rows logits_from.. only (a prompt's last row: its first token)

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


class Projections:
    """Per decoder layer, q / k / v as one FusedLinear [T, d] -> [T, (H + 2 kvH) hd], and the
    MLP's gate / up as one [T, d] -> [T, 2 I] (None for an MLP that is not gate / up / down /
    act_fn: it runs as the model's module). A copy of those weights, in the kind of the model's
    linear layers: +(H + 2 kvH) hd + 2 I rows of d per layer (~280 MB fp32 for SmolLM2-135M,
    half its weights); the model's own layers stay for its other callers."""

    def __init__(self, model) -> None:
        layers = model.model.layers[: model.config.num_hidden_layers]
        self.qkv: list[FusedLinear] = []
        self.gate_up: list[FusedLinear | None] = []
        for layer in layers:
            a, mlp = layer.self_attn, layer.mlp
            self.qkv.append(FusedLinear([a.q_proj, a.k_proj, a.v_proj]))
            mlp_ok = all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            self.gate_up.append(FusedLinear([mlp.gate_proj, mlp.up_proj]) if mlp_ok else None)


SHARED_ATTENTION_MAX = 64  # items up to this many tokens share one attention call


class _SharedAttention:
    """The padded, masked attention of k >= 2 small items (built once per forward)."""

    def __init__(
        self,
        pool: KVPool,
        items: Sequence[Item],
        which: list[int],
        bounds: list[int],
        dev,
        kernel: bool = False,  # the CPU kernel serves this pool (ragged_forward checked it)
    ) -> None:
        which = sorted(which, key=lambda i: items[i].slot)
        self.which = which  # the items it attends for
        its = [items[i] for i in which]
        self.k = len(its)
        self.nmax = max(it.size for it in its)
        lens = [it.start + it.size for it in its]
        self.lmax = max(lens)
        self.slots = torch.tensor([it.slot for it in its], device=dev)  # [k]
        # the CPU kernel (cpu_attention.py) reads each slot's own entries only; SDPA reads
        # every slot's first lmax entries, masked
        self.kernel = kernel and self.nmax <= cpu_attention.KERNEL_MAX_NODES
        self.lens = torch.tensor(lens, device=dev)  # [k]
        first = its[0].slot  # consecutive slots (the usual case: the lowest free slot is taken
        # first) are read through a view, with no copy
        self.run = first if [it.slot for it in its] == list(range(first, first + self.k)) else None
        if not self.kernel:
            for it in its:  # entries past an item's own length are masked, but must be finite
                pool.cover(it.slot, it.start + it.size, self.lmax)
        mask = torch.zeros(self.k, 1, self.nmax, self.lmax, dtype=torch.bool)
        mask[:, :, :, 0] = True  # padded query rows attend somewhere (their output is dropped)
        flat, tokens = [], []
        for j, (i, it) in enumerate(zip(which, its, strict=True)):
            mask[j, 0, : it.size] = False
            mask[j, 0, : it.size, : lens[j]] = _mask(it, "cpu")
            flat.extend(j * self.nmax + r for r in range(it.size))
            tokens.extend(range(bounds[i], bounds[i + 1]))
        self.mask = mask.to(dev)  # [k, 1, nmax, lmax]
        self.mask3 = self.mask[:, 0]  # [k, nmax, lmax] (a contiguous view)
        self.flat = torch.tensor(flat, device=dev)  # [Tg] rows of the padded output, in order
        self.tokens = torch.tensor(tokens, device=dev)  # [Tg] their places in the batch
        q_rows = torch.zeros(self.k * self.nmax, dtype=torch.long)
        q_rows[torch.tensor(flat)] = torch.tensor(tokens)
        self.q_rows = q_rows.to(dev)  # [k * nmax] the batch token behind each padded row

    def __call__(self, pool: KVPool, layer: int, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [T, H, hd] (the whole batch) -> [Tg, H, hd] for the items' tokens, in order."""
        keys, values = pool.keys[layer], pool.values[layer]  # [slots, kvH, slot_tokens, hd]
        h, hd = q.shape[1], q.shape[2]
        qp = q.index_select(0, self.q_rows).view(self.k, self.nmax, h, hd).transpose(1, 2)
        if self.kernel:
            out = cpu_attention.kernel().pooled_attention(
                qp.contiguous(), keys, values, self.slots, self.lens, self.mask3, scale
            )  # [k, H, nmax, hd]
            return out.transpose(1, 2).reshape(self.k * self.nmax, h, hd).index_select(0, self.flat)
        if self.run is not None:  # [k, kvH, L, hd] views
            keys = keys[self.run : self.run + self.k, :, : self.lmax]
            values = values[self.run : self.run + self.k, :, : self.lmax]
        else:  # [k, kvH, L, hd] copies
            keys = keys[:, :, : self.lmax].index_select(0, self.slots)
            values = values[:, :, : self.lmax].index_select(0, self.slots)
        out = F.scaled_dot_product_attention(
            qp, keys, values, attn_mask=self.mask, scale=scale, enable_gqa=True
        )  # [k, H, nmax, hd]
        return out.transpose(1, 2).reshape(self.k * self.nmax, h, hd).index_select(0, self.flat)


def _mask(item: Item, device) -> torch.Tensor:  # [n, start + n] bool
    n, start = item.size, item.start
    out = torch.ones(n, start + n, dtype=torch.bool)
    tail = item.mask if item.mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
    out[:, start:] = tail
    return out.to(device)


@torch.inference_mode()
def ragged_forward(
    model,
    pool: KVPool,
    items: Sequence[Item],
    proj: Projections | None = None,
    cpu_kernel: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Run every item in one pass; -> per item (hidden [n, d] after the final norm, on the
    model's device; logits [n - logits_from, V] float32 on the CPU or None). Writes each item's
    keys / values into its slot at start..start + n; the caller moves the slots' pointers.
    `proj`: the fused projections (None: the model's own modules). `cpu_kernel`: the shared
    attention of items up to cpu_attention.KERNEL_MAX_NODES tokens runs on the CPU kernel where
    it is available (CPU, float32); else on SDPA."""
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
    for it in items:
        if it.start + it.size > pool.slot_tokens:
            raise ValueError(f"{it.start + it.size} tokens do not fit a slot of {pool.slot_tokens}")
        if not 0 <= it.logits_from < max(it.size, 1):
            raise ValueError(f"logits_from {it.logits_from} outside an item of {it.size} tokens")
    small = [i for i, it in enumerate(items) if it.size <= SHARED_ATTENTION_MAX]
    groups = [small]
    cpu_kernel = cpu_kernel and cpu_attention.usable(pool.keys[0])  # checked once per forward
    if cpu_kernel:
        # decode steps share the kernel's call; one session's larger tree must not send them
        # all to SDPA (the trees share a padded SDPA call of their own)
        tiny = [i for i in small if items[i].size <= cpu_attention.KERNEL_MAX_NODES]
        if len(tiny) >= 2:
            groups = [tiny, [i for i in small if items[i].size > cpu_attention.KERNEL_MAX_NODES]]
    shared = [
        _SharedAttention(pool, items, g, bounds, dev, cpu_kernel) for g in groups if len(g) >= 2
    ]
    together = {i for sa in shared for i in sa.which}
    masks = {i: _mask(it, dev) for i, it in enumerate(items) if i not in together}  # the rest
    slot_of = torch.cat([torch.full((it.size,), it.slot) for it in items]).to(dev)  # [T]
    at = torch.cat([torch.arange(it.start, it.start + it.size) for it in items]).to(dev)  # [T]
    for li, layer in enumerate(inner.layers[: model.config.num_hidden_layers]):
        attn = layer.self_attn
        hd = attn.head_dim
        h = layer.input_layernorm(x)  # [1, T, d]
        if proj is None:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        else:
            q, k, v = proj.qkv[li](h).split(proj.qkv[li].sizes, dim=-1)  # views of [1, T, *]
        q = q.view(1, total, -1, hd).transpose(1, 2)  # [1, H, T, hd]
        k = k.view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, T, hd]
        v = v.view(1, total, -1, hd).transpose(1, 2)  # [1, kvH, T, hd]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        pool.write_many(li, slot_of, at, k[0], v[0])
        o = torch.empty(total, q.shape[1], hd, dtype=q.dtype, device=dev)  # [T, H, hd]
        for sa in shared:
            o[sa.tokens] = sa(pool, li, q[0].transpose(0, 1), attn.scaling)
        for i, m in masks.items():  # the items attending alone
            it, a, b = items[i], bounds[i], bounds[i + 1]
            keys, values = pool.view(li, it.slot, it.start + it.size)  # [kvH, L, hd]
            o[a:b] = F.scaled_dot_product_attention(
                q[:, :, a:b],
                keys[None],
                values[None],
                attn_mask=m,
                scale=attn.scaling,
                enable_gqa=True,
            )[0].transpose(0, 1)  # [n, H, hd]
        o = o.reshape(1, total, -1)  # [1, T, H * hd]
        x = x + attn.o_proj(o)
        h = layer.post_attention_layernorm(x)
        fused = proj.gate_up[li] if proj is not None else None
        if fused is None:
            x = x + layer.mlp(h)
        else:
            gate, up = fused(h).split(fused.sizes, dim=-1)  # [1, T, I] each
            x = x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)
    hidden = inner.norm(x)[0]  # [T, d]
    want = [i for i, it in enumerate(items) if it.logits]
    rows = {}
    if want:
        first = {i: bounds[i] + items[i].logits_from for i in want}
        sel = torch.cat([hidden[first[i] : bounds[i + 1]] for i in want])  # [sum rows, d]
        logits = model.lm_head(sel).float().cpu()  # [sum rows, V]
        at = 0
        for i in want:
            n = bounds[i + 1] - first[i]
            rows[i] = logits[at : at + n]
            at += n
    return [(hidden[bounds[i] : bounds[i + 1]], rows.get(i)) for i in range(len(items))]
