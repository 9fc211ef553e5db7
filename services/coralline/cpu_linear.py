"""Linear layers stored transposed, for small-batch inference on CPU.

nn.Linear keeps W as [out, in] and computes x @ W^T. For the handful of rows a draft tree or a
verification round feeds (M = 4..12), MKL's fp32 GEMM picks kernels that cost up to 2-3x more
than for M = 1..3; with the weight stored as W^T [in, out], contiguous, x @ W^T costs about the
same at M = 1 and far less at M = 4..16. Measured on the 2-core Xeon, one thread, ms per call:

    shape [out, in]    M:  1      3      4      8      12
    49152 x 576  W     7.2    8.7   15.0   24.9   33.8      (the LM head)
                 W^T   6.9    9.8   10.6   15.2   17.0
    1536 x 576   W     0.12   0.12   0.24   0.35   0.47     (an MLP projection)
                 W^T   0.13   0.15   0.15   0.17   0.22

At M = 2..3 the transposed layout is slower (0.15 vs 0.12 ms above): with `keep_original`, the
layer also keeps W [out, in] and uses it for up to `small_rows` rows (twice the weight memory,
for the best of both; SmolLM2-135M target forward, ms: n = 1 / 2 / 3 / 4 / 8 / 12 nodes
52 / 58 / 61 / 85 / 111 / 137 with nn.Linear, 50 / 65 / 67 / 70 / 88 / 96 transposed only,
51 / 56 / 60 / 69 / 87 / 95 with both). A tied LM head gets its own transposed copy.

`transpose_linears(module)` swaps every nn.Linear inside `module` for a TransposedLinear. Its
`.weight` is a view [out, in] of the transposed storage, and its state_dict keeps nn.Linear's
keys and layout, so code that reads weights (a tied LM head, fingerprints, a draft head sharing
the target's LM head) and checkpoints see nothing different. Inference only (no gradients).

Knows nothing about models beyond nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn


class TransposedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, keep_original: bool = False, small_rows: int = 3) -> None:
        super().__init__()
        self.small_rows = small_rows
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        # [out, in], not a parameter (state_dict and .parameters() see one weight)
        self._original = linear.weight.detach().contiguous() if keep_original else None

    @property
    def weight(self) -> torch.Tensor:  # [out, in] view, as nn.Linear's
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        if self._original is not None and x.numel() <= self.small_rows * self.in_features:
            return nn.functional.linear(x, self._original, self.bias)
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            with torch.no_grad():
                self.weight_t.copy_(state_dict.pop(key).t())
                if self._original is not None:
                    self._original.copy_(self.weight_t.t())
            state_dict[prefix + "weight_t"] = self.weight_t  # consumed below, no missing key
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, transposed"


def transpose_linears(module: nn.Module, keep_original: bool = False) -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by a TransposedLinear; -> module."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, TransposedLinear(child, keep_original))
        else:
            transpose_linears(child, keep_original)
    return module
