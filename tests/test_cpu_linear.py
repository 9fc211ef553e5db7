"""CPU linear layers (oneDNN, transposed): same outputs, weights and checkpoints as nn.Linear."""

import pytest
import torch
from torch import nn

from coralline.cpu_linear import (
    FusedLinear,
    OneDnnLinear,
    TransposedLinear,
    best_kind,
    cpu_inference_linears,
    cpu_linears,
    onednn_pack,
    transpose_linears,
)

from .tiny import tiny_llama


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("keep_original", [True, False])
def test_outputs_weights_and_state_dict_match_nn_linear(bias, keep_original):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    t = TransposedLinear(lin, keep_original=keep_original)
    for shape in [(1, 24), (3, 24), (4, 24), (9, 24), (2, 5, 24)]:  # both paths, 3D input
        x = torch.randn(*shape)
        assert torch.allclose(t(x), lin(x), atol=1e-5)
    assert torch.equal(t.weight, lin.weight) and t.weight.shape == (40, 24)
    ref = lin.state_dict()
    got = t.state_dict()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sum(p.numel() for p in t.parameters()) == sum(p.numel() for p in lin.parameters())
    other = nn.Linear(24, 40, bias=bias)
    t.load_state_dict(other.state_dict())  # loads nn.Linear's layout, strict
    x = torch.randn(5, 24)
    assert torch.allclose(t(x), other(x), atol=1e-5)
    assert torch.allclose(t(x[:2]), other(x[:2]), atol=1e-5)  # the kept original follows


def test_a_transposed_model_gives_the_same_logits_and_keeps_its_tied_weights():
    model = tiny_llama(32, seed=4)
    ids = torch.randint(0, 32, (1, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        state = {k: v.clone() for k, v in model.state_dict().items()}
        transpose_linears(model, keep_original=True)
        got = model(input_ids=ids).logits
    assert isinstance(model.lm_head, TransposedLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert torch.allclose(got, ref, atol=1e-4)
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert torch.equal(model.get_output_embeddings().weight, state["lm_head.weight"])


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_outputs_weights_and_state_dict_match_nn_linear(bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias)
    d = OneDnnLinear(lin)
    for shape in [(1, 24), (3, 24), (17, 24), (2, 5, 24)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(d(x), lin(x), atol=1e-5)
    assert torch.equal(d.weight, lin.weight)
    ref, got = lin.state_dict(), d.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    other = nn.Linear(24, 40, bias=bias)
    d.load_state_dict(other.state_dict())  # strict, and the oneDNN copy follows the load
    x = torch.randn(5, 24)
    with torch.inference_mode():
        assert torch.allclose(d(x), other(x), atol=1e-5)


def test_only_fp32_modules_on_the_cpu_get_the_cpu_kinds():
    fp32 = cpu_inference_linears(nn.Sequential(nn.Linear(8, 4)), "onednn")
    assert isinstance(fp32[0], OneDnnLinear)
    bf16 = cpu_inference_linears(nn.Sequential(nn.Linear(8, 4)).to(torch.bfloat16), "onednn")
    assert type(bf16[0]) is nn.Linear


def test_the_blocked_onednn_pack_computes_what_the_plain_copy_does():
    """The reordered pack (the default) against oneDNN's plain [out, in] copy: bitwise from
    2 rows on, and within rounding at 1 row (where oneDNN takes another kernel)."""
    torch.manual_seed(0)
    w = torch.randn(200, 96)
    blocked, layout = onednn_pack(w)
    assert layout == "blocked"  # this torch has the reorder: the fallback is not what runs
    assert OneDnnLinear(nn.Linear(96, 200)).layout == "blocked"
    plain = w.to_mkldnn()
    with torch.inference_mode():
        for m in (1, 2, 5, 16, 64):
            x = torch.randn(m, 96)
            got = torch.ops.mkldnn._linear_pointwise(x, blocked, None, "none", [], "")
            want = torch.ops.mkldnn._linear_pointwise(x, plain, None, "none", [], "")
            assert torch.allclose(got, want, atol=1e-5)
            if m > 1:
                assert torch.equal(got, want), m


@pytest.mark.parametrize("kind", ["onednn", "transposed", "torch"])
def test_every_kind_gives_a_model_the_same_logits_and_keeps_its_tied_weights(kind):
    model = tiny_llama(32, seed=4)
    ids = torch.randint(0, 32, (1, 7))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        cpu_linears(model, kind)
        got = model(input_ids=ids).logits
    assert torch.allclose(got, ref, atol=1e-4)
    expect = {"onednn": OneDnnLinear, "transposed": TransposedLinear, "torch": nn.Linear}[kind]
    assert isinstance(model.lm_head, expect)
    assert (
        model.get_output_embeddings().weight.data_ptr()
        == (model.get_input_embeddings().weight.data_ptr())
        or kind == "transposed"
    )


@pytest.mark.parametrize("kind", ["onednn", "transposed", "torch"])
def test_a_fused_linear_equals_its_parts_side_by_side(kind):
    """q / k / v-like parts (different widths, one with a bias): the fused layer's output is
    the parts' outputs concatenated, in the parts' kind, for 1..17 rows and a 3-D input; it is a
    copy (a later load into a part does not reach it)."""
    torch.manual_seed(1)
    parts = nn.ModuleList(
        [nn.Linear(24, 40, bias=False), nn.Linear(24, 8), nn.Linear(24, 8, False)]
    )
    cpu_linears(parts, kind)
    fused = FusedLinear(list(parts))
    assert fused.kind == kind and fused.sizes == [40, 8, 8] and fused.out_features == 56
    with torch.inference_mode():
        for shape in [(1, 24), (4, 24), (17, 24), (2, 5, 24)]:
            x = torch.randn(*shape)
            want = torch.cat([p(x) for p in parts], -1)
            got = fused(x)
            assert got.shape == (*shape[:-1], 56)
            assert torch.allclose(got, want, atol=1e-5)
            pieces = got.split(fused.sizes, dim=-1)
            assert all(
                torch.allclose(a, p(x), atol=1e-5) for a, p in zip(pieces, parts, strict=True)
            )
        before = fused(x)
        parts[0].load_state_dict(nn.Linear(24, 40, bias=False).state_dict())
        assert torch.equal(fused(x), before)


def test_a_fused_linear_refuses_parts_that_do_not_share_an_input():
    with pytest.raises(ValueError, match="same input size"):
        FusedLinear([nn.Linear(24, 8), nn.Linear(12, 8)])
    with pytest.raises(ValueError, match="at least one"):
        FusedLinear([])


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="cpu linears must be"):
        cpu_linears(tiny_llama(32, seed=4), "fast")
    from coralline.target import TargetConfig

    with pytest.raises(ValueError, match="cpu_linears must be"):
        TargetConfig(cpu_linears="fast")


@pytest.mark.slow
def test_the_cpu_target_runs_the_best_linears_for_this_machine(smollm2):
    expect = OneDnnLinear if best_kind() == "onednn" else TransposedLinear
    assert isinstance(smollm2.model.lm_head, expect)
    assert smollm2.model.lm_head.weight.shape == (smollm2.vocab_size, smollm2.hidden_size)
