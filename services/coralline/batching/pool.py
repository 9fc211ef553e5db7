"""The KV pool: preallocated key / value buffers shared by the sessions of one target, a slot per
session and a position pointer (`lengths[slot]`) per slot.

Layout per layer: keys / values [slots, kv_heads, slot_tokens, head_dim] in the model's dtype on
its device. A session's entries are the first `lengths[slot]` positions of its slot, so its
attention reads a view (no gather, no copy); committing an accepted path copies only the entries
that move (none for a chain-shaped acceptance) and moves the pointer; rejecting moves the pointer
back. Nothing is allocated after start-up. On the CPU the buffers are reserved address space:
pages are touched (become resident) only as slots fill.

Knows nothing about models beyond the cache's shape, nor about who owns a slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PoolFull(RuntimeError):
    """Every slot of the pool holds a session."""


class KVPool:
    def __init__(
        self,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        slot_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if min(num_layers, kv_heads, head_dim, slots, slot_tokens) < 1:
            raise ValueError("every dimension of a KV pool must be >= 1")
        shape = (slots, kv_heads, slot_tokens, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots = slots
        self.slot_tokens = slot_tokens
        self.lengths = [0] * slots  # the position pointer of each slot
        self.finite = [0] * slots  # entries below this were written or zeroed (never garbage)
        self._free = list(range(slots - 1, -1, -1))  # a stack: the lowest slot first

    @classmethod
    def for_model(cls, model, slots: int, slot_tokens: int) -> KVPool:
        cfg = model.config
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        p = next(model.parameters())
        return cls(
            int(cfg.num_hidden_layers),
            int(getattr(cfg, "num_key_value_heads", None) or heads),
            head_dim,
            slots,
            slot_tokens,
            p.dtype,
            p.device,
        )

    @property
    def bytes_per_token(self) -> int:
        k = self.keys[0]
        return 2 * len(self.keys) * k.shape[1] * k.shape[3] * k.element_size()

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise PoolFull(f"all {self.slots} KV slots hold a session")
        slot = self._free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot in self._free or not 0 <= slot < self.slots:
            raise ValueError(f"slot {slot} is not held")
        self.lengths[slot] = 0
        self._free.append(slot)

    def write_many(
        self,
        layer: int,
        slots: torch.Tensor,  # [T] int64: the slot of each token
        positions: torch.Tensor,  # [T] int64: its position in the slot
        keys: torch.Tensor,  # [kv_heads, T, head_dim]
        values: torch.Tensor,  # [kv_heads, T, head_dim]
    ) -> None:
        """Write T tokens of several slots at once (one indexed copy per buffer)."""
        self.keys[layer][slots, :, positions] = keys.transpose(0, 1)  # [T, kv_heads, head_dim]
        self.values[layer][slots, :, positions] = values.transpose(0, 1)

    def cover(self, slot: int, written: int, needed: int, ahead: int = 64) -> None:
        """Make entries below `needed` finite: those below `written` are (or are being) written;
        the rest, if never written, are zeroed, with `ahead` more (so it rarely recurs). Padded
        attention reads past a slot's length with a mask, and 0 x NaN would still be NaN."""
        self.finite[slot] = max(self.finite[slot], written)
        lo = self.finite[slot]
        if lo >= needed:
            return
        hi = min(self.slot_tokens, needed + ahead)
        for buf in (*self.keys, *self.values):
            buf[slot, :, lo:hi].zero_()
        self.finite[slot] = hi

    def view(
        self, layer: int, slot: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [kv_heads, length, head_dim] x 2, views
        return self.keys[layer][slot, :, :length], self.values[layer][slot, :, :length]

    @torch.inference_mode()
    def keep(self, slot: int, start: int, accepted: Sequence[int]) -> None:
        """Keep entries start + a (a in accepted, root first) at start, start + 1, ...; the
        pointer moves to start + len(accepted)."""
        moves = [(start + j, start + a) for j, a in enumerate(accepted) if a != j]
        if moves:
            dev = self.keys[0].device
            dst = torch.tensor([d for d, _ in moves], device=dev)
            src = torch.tensor([s for _, s in moves], device=dev)
            for buf in (*self.keys, *self.values):
                row = buf[slot]  # [kv_heads, slot_tokens, head_dim] view
                row.index_copy_(1, dst, row.index_select(1, src))
        self.lengths[slot] = start + len(accepted)
