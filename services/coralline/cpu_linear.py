"""Linear layers for small-batch fp32 inference on CPU: oneDNN, or stored transposed.

Which one pays depends on the CPU: MKL's fp32 GEMM, behind nn.Linear, is slow for the few rows
a tree or a batch of decode steps feeds, and how slow differs by vendor. `best_kind()` picks
oneDNN wherever torch has it (measured on the AMD EPYC machines; not yet on the Xeon, where
the transposed layout below was tuned: `TargetConfig(cpu_linears="transposed")` keeps it).

oneDNN (`OneDnnLinear`, the default where torch has it): the layer keeps a oneDNN copy of W,
reordered once into oneDNN's blocked layout (`onednn_pack`: a fifth to a third off a forward
of 1-12 sessions against the plain copy used before 2026-12-03), and calls
`torch.ops.mkldnn._linear_pointwise`. Measured with the plain copy on the 2-core AMD EPYC (2
threads, 2026-12-02), SmolLM2-135M target forward after 200 cached tokens, ms, n = 1 / 2 / 4 / 8
/ 16 / 32 / 64 nodes: nn.Linear 73 / 126 / 103 / 105 / 129 / 181 / 275; transposed (below) 68 /
103 / 120 / 93 / 113 / 146 / 201; oneDNN 48 / 52 / 60 / 66 / 84 / 116 / 169. The LM head alone
(49152 x 576) at M = 1 / 4 / 16 / 64 rows: 13 / 22 / 29 / 66 ms with nn.Linear, 5 / 10 / 12 / 24
with oneDNN.

Transposed (`TransposedLinear`, kept for CPUs where it wins and as the fallback):

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

`cpu_linears(module, kind)` swaps every nn.Linear inside `module` for the chosen kind.
`OneDnnLinear.weight` shares the original weight's storage (a tied embedding reads the same
memory), its state_dict is nn.Linear's, and its oneDNN copy follows a state_dict load.
`transpose_linears(module)` swaps every nn.Linear inside `module` for a TransposedLinear. Its
`.weight` is a view [out, in] of the transposed storage, and its state_dict keeps nn.Linear's
keys and layout, so code that reads weights (a tied LM head, fingerprints, a draft head sharing
the target's LM head) and checkpoints see nothing different. Inference only (no gradients).

`FusedLinear(layers)` runs linear layers that read the same input as one (a layer's q / k / v
projections: batching/forward.py), over its own copy of their weights in their kind.

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


def onednn_pack(weight: torch.Tensor) -> tuple[torch.Tensor, str]:
    """W [out, in] -> (oneDNN's copy of it, its layout). "blocked": reordered once into the
    layout its inner product kernels read (`mkldnn._reorder_linear_weight`, what inductor's
    oneDNN fusion uses). "plain", the fallback where torch lacks that op: a `to_mkldnn()`
    copy in the [out, in] layout, for which each call pays for a layout its kernel does not
    want. Measured on the 2-core AMD EPYC (2 threads, 2026-12-03), ms per call at M = 2 / 8 /
    32 rows, plain -> blocked: the LM head 49152 x 576 5.2 / 6.2 / 8.6 -> 4.0 / 3.8 / 6.8; an
    MLP's gate / up 3072 x 576 0.16 / 0.20 / 0.41 -> 0.08 / 0.11 / 0.32; level from ~512 rows.
    A whole SmolLM2 forward of 1 / 4 / 12 one-token sessions: 39 / 52 / 70 -> 29 / 35 / 54 ms.
    Outputs are bitwise the plain copy's from 2 rows on; at 1 row oneDNN takes another kernel
    (within ~4e-5 on SmolLM2's logits, the same argmax)."""
    w = weight.detach().contiguous()  # [out, in]
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if reorder is not None:
        try:
            return reorder(w, None), "blocked"
        except RuntimeError:  # a dtype or build the reorder does not take
            pass
    return w.to_mkldnn(), "plain"


class OneDnnLinear(nn.Module):
    """nn.Linear through oneDNN's fp32 inner product, with W reordered once (inference only)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)  # [out, in]
        # (the same storage as the original: a tied embedding still reads these values)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        )
        self._repack()

    def _repack(self) -> None:
        self._packed, self.layout = onednn_pack(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)  # [M, in]
        y = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._repack()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


KINDS = ("onednn", "transposed", "torch")


def best_kind() -> str:
    """The fastest kind this torch build offers: oneDNN where it is built in, else transposed."""
    return "onednn" if torch.backends.mkldnn.is_available() else "transposed"


def cpu_linears(module: nn.Module, kind: str = "auto") -> nn.Module:
    """Replace every nn.Linear inside `module` (in place) by the `kind` of layer ("auto":
    `best_kind()`; "torch": leave nn.Linear); -> module."""
    if kind == "auto":
        kind = best_kind()
    if kind not in KINDS:
        raise ValueError(f"cpu linears must be 'auto' or one of {KINDS}, got {kind!r}")
    if kind == "transposed":
        return transpose_linears(module, keep_original=True)
    if kind == "onednn":
        _swap(module)
    return module


def cpu_inference_linears(module: nn.Module, kind: str = "auto") -> nn.Module:
    """cpu_linears(module, kind) when its weights are fp32 on the CPU, the one case the kinds
    are for; else module unchanged. -> module. Where the target (target.py) and the drafter's
    CORAL head (draft/registry.py) get their layers."""
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cpu" and p.dtype == torch.float32:
        cpu_linears(module, kind)
    return module


def _swap(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, OneDnnLinear(child))
        else:
            _swap(child)


class FusedLinear(nn.Module):
    """Linear layers that read the same input, as one: forward(x) = cat([l(x) for l in layers],
    -1) [..., sum out], one GEMM instead of len(layers) (one pass over x, one call's overhead).
    A Llama layer's q / k / v projections fused, and its MLP's gate / up, make a SmolLM2-135M
    forward ~7-10% faster at 1-4 rows on the 2-core AMD EPYC (ms, 1 / 4 rows, after 200 cached
    tokens: 26.1 / 32.7 separate, 24.4 / 29.7 fused; batching/forward.py).

    It holds its own copy of the weights (the parts' weights concatenated), in the kind of
    `layers[0]`: a oneDNN pack for OneDnnLinear, W^T for TransposedLinear, W for nn.Linear (any
    device and dtype). A copy: weights loaded into the parts later do not reach it. Inference
    only. Parts with and without a bias mix (a missing bias counts as zeros)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("FusedLinear needs at least one layer")
        ins = {int(lin.in_features) for lin in layers}
        if len(ins) != 1:
            raise ValueError(f"fused layers must read the same input size, got {sorted(ins)}")
        self.in_features = ins.pop()
        self.sizes = [int(lin.out_features) for lin in layers]
        self.out_features = sum(self.sizes)
        with torch.no_grad():
            w = torch.cat([lin.weight.detach() for lin in layers])  # [sum out, in]
            biases = [getattr(lin, "bias", None) for lin in layers]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b.detach() if b is not None else w.new_zeros(n)
                        for b, n in zip(biases, self.sizes, strict=True)
                    ]
                )  # [sum out]
        self.bias = bias
        self.kind = (
            "onednn"
            if isinstance(layers[0], OneDnnLinear)
            else "transposed"
            if isinstance(layers[0], TransposedLinear)
            else "torch"
        )
        self._packed = onednn_pack(w)[0] if self.kind == "onednn" else None
        self._w_t = w.t().contiguous() if self.kind == "transposed" else None  # [in, sum out]
        self._w = w if self.kind == "torch" else None  # [sum out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., sum out]
        if self._packed is not None:
            flat = x.reshape(-1, self.in_features)  # [M, in]
            y = torch.ops.mkldnn._linear_pointwise(flat, self._packed, self.bias, "none", [], "")
            return y.reshape(*x.shape[:-1], self.out_features)
        if self._w_t is not None:
            y = x @ self._w_t
            return y if self.bias is None else y + self.bias
        return nn.functional.linear(x, self._w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, sizes={self.sizes}, {self.kind}"
