"""CORAL head, grouped head, checkpoints, training, CSRA, and the drafter on tiny models."""

import pytest
import torch
from transformers import DynamicCache

from coralline.draft.base import DraftInput
from coralline.draft.coral import CoralHead, config_for_target
from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig
from coralline.engine import Engine, generate_ids
from coralline.sampling import SamplingParams
from coralline.target import TargetRunner
from coralline.train.trainer import (
    TrainConfig,
    csra_loss,
    evaluate_loss,
    fit,
    train_router,
    warm_start,
)

from ..tiny import tiny_llama


def _head(vocab=16, seed=0, **kw):
    target = tiny_llama(vocab, seed=seed, scale=3.0)
    head = CoralHead(config_for_target(target, "tiny", num_groups=4, active_groups=2, **kw))
    head.attach(target).init_groups()
    return target, head


def test_head_shapes_and_cache_equals_full_forward():
    _target, head = _head()
    d, t = head.config.hidden_size, 7
    ids = torch.randint(0, 16, (1, t))
    feats = torch.randn(1, t, d)
    pos = torch.arange(t)[None]
    causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
    full = head(ids, feats, pos, causal)
    assert full.shape == (1, t, d)
    assert head.full_logits(full[0]).shape == (t, 16)
    cache = DynamicCache(config=head.config.llama_config())
    first = head(ids[:, :4], feats[:, :4], pos[:, :4], causal[..., :4, :4], cache)
    rest = head(ids[:, 4:], feats[:, 4:], pos[:, 4:], causal[..., 4:, :], cache)
    assert cache.get_seq_length() == t
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_grouped_logits_are_the_full_logits_on_the_selected_groups():
    _, head = _head()
    feats = torch.randn(5, head.config.hidden_size)
    ids, logits = head.grouped_logits(feats)
    full = head.full_logits(feats)
    r = head.config.group_size
    assert ids.shape == logits.shape == (5, 2 * r)
    assert torch.allclose(logits, full.gather(1, ids), atol=1e-5)
    top = head.router_logits(feats).topk(2, dim=-1).indices
    for n in range(5):
        assert set(ids[n].tolist()) == set(head.group_tokens[top[n]].flatten().tolist())
    groups = head.group_tokens.flatten()
    assert sorted(groups.tolist()) == list(range(16))  # a partition of the vocabulary
    of = head.token_groups()
    for g in range(head.config.num_groups):
        assert (of[head.group_tokens[g]] == g).all()


def test_checkpoint_round_trip_and_wrong_target(tmp_path):
    target, head = _head()
    head.save(tmp_path / "ckpt")
    loaded = CoralHead.load(tmp_path / "ckpt").attach(target)
    assert loaded.config == head.config
    assert torch.equal(loaded.group_tokens, head.group_tokens)
    for (k, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-2), k  # fp16 on disk
    other = tiny_llama(16, seed=99)
    with pytest.raises(ValueError, match="trained for target 'tiny'"):
        CoralHead.load(tmp_path / "ckpt").attach(other)
    with pytest.raises(ValueError, match="not a CORAL checkpoint"):
        CoralHead.load(tmp_path)


def test_warm_start_loads_a_previous_head_and_refuses_another_target(tmp_path):
    _target, head = _head()
    with torch.no_grad():
        head.fc.weight.add_(1.0)
    head.save(tmp_path / "prev")
    _, fresh = _head()  # same target, new random weights
    fresh.grouped_logits(torch.randn(2, fresh.config.hidden_size))  # builds the permuted rows
    warm_start(fresh, tmp_path / "prev", log=lambda *_: None)
    assert torch.allclose(fresh.fc.weight, head.fc.weight, atol=1e-2)  # fp16 on disk
    feats = torch.randn(3, head.config.hidden_size)
    ids_a, logits_a = fresh.grouped_logits(feats)
    ids_b, logits_b = head.grouped_logits(feats)
    assert torch.equal(ids_a, ids_b) and torch.allclose(logits_a, logits_b, atol=5e-2)
    # a run folder: fp32 weights from train_state.pt, except the router (trained after its save)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    state["fc.weight"] += 0.5
    state["router.0.weight"] += 100.0  # stale: must not be used
    torch.save({"head": state}, tmp_path / "prev" / "train_state.pt")
    warm_start(fresh, tmp_path / "prev", log=lambda *_: None)
    assert torch.equal(fresh.fc.weight, state["fc.weight"])  # exact fp32
    assert torch.allclose(fresh.router[0].weight, head.router[0].weight, atol=1e-2)
    other = tiny_llama(16, seed=99)
    stranger = CoralHead(config_for_target(other, "other", num_groups=4, active_groups=2))
    with pytest.raises(ValueError, match="was trained for tiny"):
        warm_start(stranger.attach(other), tmp_path / "prev", log=lambda *_: None)


def test_csra_scores_aligned_pairs_higher():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 32, generator=g)
    aligned = csra_loss([a, a + 0.05 * torch.randn(64, 32, generator=g)], 0.1)
    shuffled = csra_loss([a, a[torch.randperm(64, generator=g)]], 0.1)
    assert aligned < 0.1 < shuffled


def _convs(target, n=6, length=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            ids = torch.randint(0, target.config.vocab_size, (length,), generator=g)
            f = target.model(input_ids=ids[None]).last_hidden_state[0]
            mask = torch.ones(length, dtype=torch.bool)
            out.append({"input_ids": ids, "loss_mask": mask, "features": f.half()})
    return out


@pytest.mark.parametrize("steps", [1, 3])
def test_short_training_lowers_the_loss(steps):
    target, head = _head(seed=3)
    convs = _convs(target)
    cfg = TrainConfig(
        features="",
        out="",
        steps=steps,
        csra=steps > 1,
        epochs=6,
        distill_epochs=1,
        accumulate=2,
        warmup=2,
        lr=3e-3,
        checkpoint_every=1,
    )
    before = evaluate_loss(head, convs, cfg)
    fit(head, convs, cfg, None, log=lambda *_: None)
    after = evaluate_loss(head, convs, cfg)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after[f"ce{steps}"] < before[f"ce{steps}"]


def test_greedy_coral_equals_target_greedy_on_a_tiny_model():
    target, head = _head(seed=5)
    runner = TargetRunner(target, None)
    ids = [1, 3, 5, 7]
    ref = target.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)[0, 4:].tolist()
    for grouped, lookup in ((False, False), (True, False), (True, True)):
        cfg = CoralDrafterConfig(depth=3, top_k=3, max_nodes=10, grouped=grouped, lookup=lookup)
        drafter = CoralDrafter(head, cfg)
        assert generate_ids(Engine(runner, drafter), ids, SamplingParams(max_new_tokens=20)) == ref


@pytest.mark.parametrize("budget", ["max", "auto"])
def test_lookup_puts_the_earlier_continuation_into_the_tree(budget):
    """The context ends with (4, 5), seen before followed by 6 7 8 9: that continuation is a
    path from the root, merged with the head's nodes where they agree; values fall along
    every path, so the chosen set is a tree."""
    target, head = _head(vocab=16, seed=5)
    runner = TargetRunner(target, None)
    ids = [1, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5]
    feats = runner.prefill(ids)
    cfg = CoralDrafterConfig(depth=2, top_k=3, max_nodes=12, budget=budget, lookup=True)
    drafter = CoralDrafter(head, cfg)
    drafter.lookup_rate.rate = 0.95  # as if lookup had been right: the chooser keeps its nodes
    params = SamplingParams(max_new_tokens=8)
    tree = drafter.propose(DraftInput(ids, feats), params).tree
    node, path = 0, []
    for tok in (6, 7, 8, 9):
        node = next(c for c in tree.children[node] if tree.token_list[c] == tok)
        path.append(node)
    assert len(path) == 4  # deeper than the head's depth 2: lookup nodes need no forward
    siblings = [tree.token_list[c] for c in tree.children[0]]
    assert len(siblings) == len(set(siblings))  # merged, not duplicated
    assert drafter._last_chain == [6, 7, 8, 9, 2, 3, 4, 5][: cfg.lookup_tokens]
    # the next round learns from the outcome: 6 and 7 accepted, then the target said 1
    before = drafter.lookup_rate.rate
    feats = runner.prefill([*ids, 6, 7, 1])[-3:]  # the previous root 5, then 6 and 7
    drafter.propose(DraftInput((6, 7, 1), feats, accepted=(0, path[0], path[1])), params)
    assert drafter.lookup_rate.rate != before


def test_registry_names_and_configs_agree():
    from coralline.draft.registry import DRAFTERS, coral_config

    for name in (n for n in DRAFTERS if n.startswith("coral")):
        assert coral_config(name).registry_name() == name
    with pytest.raises(ValueError, match="unknown CORAL drafter"):
        coral_config("coral-nonsense")
    assert coral_config("coral").lookup and not coral_config("coral-eagle2").lookup
    with pytest.raises(ValueError, match="cannot draft a chain"):
        CoralDrafterConfig(chain=True, lookup=True)
    with pytest.raises(ValueError, match="lookup_tokens must be >= 1"):
        CoralDrafterConfig(lookup=True, lookup_tokens=0)


def test_router_stage_learns_where_the_heads_mass_lies():
    """After the router stage, the selected groups hold more of the head's own distribution's
    mass (what the grouped head then samples from) than before."""
    target, head = _head(vocab=64, seed=3)
    convs = _convs(target, n=8, length=32)
    cfg = TrainConfig(features="", out="", steps=2, csra=False, router_epochs=20, router_lr=1e-2)
    groups = head.token_groups()

    def covered() -> float:
        from coralline.train.trainer import _step_outputs, pad_batch

        with torch.no_grad():
            shares = []
            for conv in convs:
                _, outs = _step_outputs(head, pad_batch([conv]), cfg.steps)
                feats = torch.cat([g[ok] for g, ok in outs])
                q = torch.softmax(head.full_logits(feats), -1)
                top = head.router_logits(feats).topk(head.config.active_groups, -1).indices
                picked = (groups[None, :, None] == top[:, None, :]).any(-1)  # [n, V]
                shares.append((q * picked).sum(-1).mean())
            return float(torch.stack(shares).mean())

    before = covered()
    train_router(head, convs, cfg, log=lambda *_: None)
    after = covered()
    assert after > before + 0.05, (before, after)
    assert not any(p.requires_grad for n, p in head.named_parameters() if "router" not in n)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chain_drafter_proposes_single_paths(temperature):
    target, head = _head(seed=5)
    runner = TargetRunner(target, None)
    drafter = CoralDrafter(head, CoralDrafterConfig(depth=4, max_nodes=10, chain=True))
    assert drafter.chain_only and drafter.name == "coral-chain"
    ids = [1, 3, 5, 7]
    feats = runner.prefill(ids)  # [3, d]: features of the committed tokens before the root
    params = SamplingParams(temperature=temperature, max_new_tokens=8, seed=0)
    prop = drafter.propose(DraftInput(ids, feats), params)
    assert prop.tree.num_nodes > 1
    assert all(len(c) <= 1 for c in prop.tree.children)  # a chain
    assert (prop.rows is None) == (temperature == 0.0)


def test_paired_verifier_tau_scores_every_round_of_the_run():
    from coralline.bench.coral import paired_verifier_tau
    from coralline.engine import EngineConfig

    target, head = _head(seed=5)
    runner = TargetRunner(target, None)
    drafter = CoralDrafter(head, CoralDrafterConfig(depth=3, max_nodes=8, budget="max"))
    engine = Engine(runner, drafter, EngineConfig(verifier="traversal"))
    seen = []
    engine.on_round = lambda tree, rows, draft: seen.append(tree.num_nodes)
    generate_ids(engine, [1, 3, 5, 7], SamplingParams(temperature=1.0, seed=0, max_new_tokens=12))
    res = paired_verifier_tau(engine, [[1, 3, 5, 7]], ["traversal", "rrsw"], 1, 12, draws=8)
    assert engine.on_round is None  # the hook is removed afterwards
    assert res["traversal"]["rounds"] == res["rrsw"]["rounds"] == len(seen)  # same seed, same run
    for v in ("traversal", "rrsw"):
        assert 1.0 <= res[v]["tau"] <= 1 + 3
