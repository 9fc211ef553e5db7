"""Batched and online training: padding changes nothing, online features equal dumped ones,
a time budget stops and resumes a run, packs round-trip, and the CLI trains online end to end."""

import dataclasses
import json

import pytest
import torch

from coralline.draft.coral import CoralHead, config_for_target
from coralline.train.data import Example, load_pack, save_pack
from coralline.train.trainer import TrainConfig, _losses, _step_outputs, fit, pad_batch

from ..tiny import tiny_llama


def _setup(lengths=(9, 24, 15), vocab=32, seed=2):
    target = tiny_llama(vocab, seed=seed, scale=3.0)
    head = CoralHead(config_for_target(target, "tiny", num_groups=4, active_groups=2))
    head.attach(target).init_groups()
    g = torch.Generator().manual_seed(seed)
    convs = []
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, vocab, (n,), generator=g)
            mask = torch.rand(n, generator=g) < 0.7
            f = target.model(input_ids=ids[None]).last_hidden_state[0]
            convs.append({"input_ids": ids, "loss_mask": mask, "features": f})
    return target, head, convs


def test_a_padded_batch_gives_each_conversation_its_own_outputs():
    _, head, convs = _setup()
    with torch.no_grad():
        _, batched = _step_outputs(head, pad_batch(convs), 3)
        for b, conv in enumerate(convs):
            _, alone = _step_outputs(head, pad_batch([conv]), 3)
            n = alone[0][0].shape[1]
            for (g_b, ok_b), (g_1, ok_1) in zip(batched, alone, strict=True):
                assert torch.equal(ok_b[b, :n], ok_1[0]) and not ok_b[b, n:].any()
                assert torch.allclose(g_b[b, :n][ok_1[0]], g_1[0][ok_1[0]], atol=1e-5)


def test_batch_losses_are_token_weighted_means_of_the_conversations():
    _, head, convs = _setup()
    cfg = TrainConfig(features="", out="", steps=2, csra=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        both = _losses(head, pad_batch(convs[:2]), cfg, False, gen)[1]
        parts = [_losses(head, pad_batch([c]), cfg, False, gen)[1] for c in convs[:2]]
        _, outs = _step_outputs(head, pad_batch(convs[:2]), 2)
    counts = outs[0][1].sum(1).tolist()  # step-1 positions of each conversation
    expect = sum(p["ce1"] * c for p, c in zip(parts, counts, strict=True)) / sum(counts)
    assert both["ce1"] == pytest.approx(expect, rel=1e-4)


def test_online_features_equal_the_dumped_ones():
    target, _, convs = _setup()
    dumped = pad_batch(convs)
    bare = [{k: c[k] for k in ("input_ids", "loss_mask")} for c in convs]
    online = pad_batch(bare, target=target)
    for b, c in enumerate(convs):
        t = c["input_ids"].numel()
        assert torch.allclose(online["features"][b, :t], dumped["features"][b, :t], atol=1e-5)
    assert torch.equal(online["valid"], dumped["valid"])
    with pytest.raises(ValueError, match="need the target"):
        pad_batch(bare)


def test_a_time_budget_stops_training_annealed_and_a_longer_one_resumes(tmp_path):
    _, head, convs = _setup(lengths=(12,) * 8)
    cfg = TrainConfig(
        features="", out="", steps=2, csra=False, epochs=3, distill_epochs=0, batch=2,
        accumulate=1, warmup=1, time_limit_s=1e-6, checkpoint_every=100,
    )  # fmt: skip
    state = tmp_path / "train_state.pt"
    fit(head, convs, cfg, state, log=lambda *_: None)
    st = torch.load(state, weights_only=False)
    assert (st["step"], st["epoch"], st["conv"]) == (1, 0, 2)  # one optimizer step, then stop
    longer = dataclasses.replace(cfg, time_limit_s=0.0)
    fit(head, convs, longer, state, log=lambda *_: None)  # resumes (the budget may change)
    st = torch.load(state, weights_only=False)
    assert (st["step"], st["epoch"], st["conv"]) == (12, 3, 0)  # 3 epochs x 4 batches
    with pytest.raises(ValueError, match="another training config"):
        fit(head, convs, dataclasses.replace(cfg, lr=0.5), state, log=lambda *_: None)


def test_pack_round_trip(tmp_path):
    examples = [Example("a", [1, 2, 3, 65535], [0, 1, 1, 1]), Example("b", [7, 8], [1, 0])]
    path = save_pack(examples, tmp_path / "p.npz", {"max_tokens": 4})
    convs, meta = load_pack(path)
    assert meta == {"max_tokens": 4}
    assert [c["input_ids"].tolist() for c in convs] == [[1, 2, 3, 65535], [7, 8]]
    assert [c["loss_mask"].tolist() for c in convs] == [[0, 1, 1, 1], [1, 0]]
    with pytest.raises(ValueError, match="uint16"):
        save_pack([Example("c", [70000], [1])], tmp_path / "q.npz", {})


@pytest.mark.slow
def test_cli_writes_a_pack_and_trains_online_on_smollm2(tmp_path, smollm2):
    from coralline.cli import main

    pack = tmp_path / "train.npz"
    assert main(["train-draft", "--write-pack", str(pack), "--max-conversations", "3",
                 "--seq-tokens", "64"]) == 0  # fmt: skip
    convs, meta = load_pack(pack)
    assert len(convs) == 3 and meta["max_tokens"] == 64
    assert all(c["input_ids"].numel() <= 64 and c["loss_mask"].any() for c in convs)
    out = tmp_path / "head"
    args = ["train-draft", "--data", str(pack), "--out", str(out), "--epochs", "1",
            "--distill-epochs", "0", "--batch", "2", "--accumulate", "1",
            "--router-conversations", "2"]  # fmt: skip
    assert main(args) == 0
    head = CoralHead.load(out)
    assert head.config.recipe["data"] == str(pack) and head.config.recipe["batch"] == 2
    history = json.loads((out / "history.json").read_text())
    assert isinstance(history, list)
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2


@pytest.mark.slow
def test_online_sharegpt_conversations_match_a_pack_of_the_same_split(tmp_path, smollm2):
    from coralline.train.data import build_pack
    from coralline.train.trainer import load_conversations

    cfg = TrainConfig(features="", out="", data="sharegpt", max_tokens=48, max_conversations=3)
    convs = load_conversations(cfg, smollm2.tokenizer)
    pack = build_pack(smollm2.tokenizer, tmp_path / "p.npz", 48, max_conversations=3)
    packed = load_conversations(dataclasses.replace(cfg, data=str(pack)))
    assert len(convs) == len(packed) == 3
    for a, b in zip(convs, packed, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["loss_mask"], b["loss_mask"])
    with pytest.raises(ValueError, match="tokenizer"):
        load_conversations(cfg)
    with pytest.raises(ValueError, match="not both"):
        load_conversations(dataclasses.replace(cfg, features="x"))
