"""CORAL benchmark on held-out ShareGPT prompts (never used in training), one process, one thread:

- T = 0: plain decoding vs the CORAL drafter with EAGLE-2's 60-node tree (full LM head; the
  head alone, then sharing the nodes with prompt lookup), with the budget chooser (grouped head
  without lookup; full head; grouped head = the default drafter): tau, tokens/s, speedup over
  plain measured side by side, draft LM-head ms per round, and whether every output equals
  plain greedy decoding;
- T = 1: sampled trees verified by traversal vs RRSw (same prompts, same seeds): tau each; and
  every verifier scored on the very same trees (paired_verifier_tau): the chooser's trees, the
  fixed 60-node template, chains;
- the router's hit rate: share of held-out assistant positions whose target argmax token lies in
  the groups the router selects from the head's own step-1 feature;
- optional ablations: the same T = 0 figures for other checkpoints (EAGLE / +HASS / +CSRA ...).
Knows nothing about services; every figure comes from this run.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from coralline.bench.report import display_path
from coralline.engine import timed_generate


def heldout_prompts(tokenizer, n: int, max_prompt_tokens: int = 160) -> list[str]:
    from coralline.train.data import conversations

    out = []
    for conv in conversations("heldout"):
        first = conv["messages"][0]
        if first["role"] != "user":
            continue
        text = first["content"].strip()
        if len(tokenizer(text)["input_ids"]) > max_prompt_tokens or len(text) < 20:
            continue
        out.append(text)
        if len(out) == n:
            break
    return out


def router_hit_rate(head, runner, prompts_ids: list[list[int]]) -> float:
    """Share of positions whose target argmax lies in the router's selected groups."""
    hits = total = 0
    groups = head.token_groups()  # [V]
    with torch.inference_mode():
        for ids in prompts_ids:
            t = torch.tensor([ids])
            f = runner.model.model(input_ids=t).last_hidden_state[0]  # [T, d]
            target_next = runner.model.lm_head(f).argmax(-1)  # [T] argmax after position t
            n = f.shape[0] - 1  # positions 0..T-2: the head's output g_t predicts f_{t+1}
            pos = torch.arange(n)
            causal = torch.full((n, n), torch.finfo(torch.float32).min).triu(1)[None, None]
            g = head(t[:, 1:], f[None, :-1], pos[None], causal)[0]  # [n, d]
            top = head.router_logits(g).topk(head.config.active_groups, -1).indices  # [n, k]
            want = groups[target_next[1:]]  # group of the target's argmax after position t+1
            hits += int((top == want[:, None]).any(-1).sum())
            total += n
    return hits / max(1, total)


def paired_verifier_tau(
    engine,
    prompts_ids: list[list[int]],
    verifiers: list[str],
    seeds: int,
    n_tokens: int,
    draws: int = 32,
) -> dict[str, dict]:
    """Expected tau of each verifier on the SAME draft trees (T = 1).

    The engine (its own verifier drives the trajectory) generates; at every round each listed
    verifier is run `draws` times on that round's tree, target rows and draft rows with fresh
    coins, and its mean accepted length is recorded. Averaging over rounds gives each
    verifier's tau on one common distribution of trees, without the noise of separate
    trajectories (the gap between verifiers is a few percent; separate runs cannot resolve it).
    """
    from coralline.sampling import SamplingParams
    from coralline.verification import get_verifier

    fns = {v: get_verifier(v).fn for v in verifiers}
    sums = dict.fromkeys(verifiers, 0.0)
    rounds = 0
    coins = torch.Generator().manual_seed(12345)

    def score(tree, rows, draft_rows):
        nonlocal rounds
        rounds += 1
        for v, fn in fns.items():
            total = 0
            for _ in range(draws):
                total += fn(tree, rows, draft_rows, coins, check=False).num_accepted
            sums[v] += total / draws

    engine.on_round = score
    try:
        for ids in prompts_ids:
            for seed in range(seeds):
                p = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=n_tokens)
                timed_generate(engine, ids, p)
    finally:
        engine.on_round = None
    return {v: {"tau": 1 + sums[v] / max(1, rounds), "rounds": rounds} for v in verifiers}


def _drafted(s) -> tuple[int, int]:
    """(accepted drafts, drafted rounds) of one generation's Summary. The engine decodes the
    first token in the prompt's own forward (EngineConfig.fused_first_round) without asking
    the drafter, so the drafter's rounds are all but that one: tau here is the drafter's, over
    the rounds it drafted (as EAGLE reports it), and does not move with answer length."""
    return round((s.acceptance_length - 1) * s.rounds), s.rounds - 1


def measure_t0(runner, drafter, encoded, params, reference=None) -> dict:
    """Greedy generation of every prompt with one drafter (None = plain): tau, tokens/s,
    draft/verify/LM-head ms, and whether each output equals `reference` (when given)."""
    from coralline.engine import Engine

    r = {
        "tokens": 0,
        "seconds": 0.0,
        "rounds": 0,
        "accepted": 0,
        "draft_ms": 0.0,
        "verify_ms": 0.0,
        "lm_head_ms": 0.0,
        "identical": True,
        "outputs": [],
    }
    for i, ids in enumerate(encoded):
        out, secs, s = timed_generate(Engine(runner, drafter), ids, params)
        r["outputs"].append(out)
        if reference is not None:
            r["identical"] &= out == reference[i]
        r["tokens"] += len(out)
        r["seconds"] += secs
        accepted, drafted = _drafted(s)
        r["rounds"] += drafted
        r["accepted"] += accepted
        r["draft_ms"] += s.draft_ms
        r["verify_ms"] += s.verify_ms
        if drafter is not None:
            r["lm_head_ms"] += drafter.lm_head_ms  # the drafter restarts it per sequence
    r["tau"] = 1 + r["accepted"] / max(1, r["rounds"])
    r["tokens_per_second"] = r["tokens"] / r["seconds"]
    r["draft_lm_head_ms_per_round"] = r["lm_head_ms"] / max(1, r["rounds"])
    return r


def lm_head_paired(runner, head, encoded, params) -> dict:
    """Grouped vs full LM head on the very same draft nodes: the shipped drafter (chooser +
    grouped head + lookup) generates every prompt while the full head is also timed on each
    batch of nodes the grouped head scores (its output unused; tokens/s of this pass is not
    reported)."""
    from coralline.draft.coral_drafter import CoralDrafter
    from coralline.draft.registry import coral_config
    from coralline.engine import Engine

    drafter = CoralDrafter(head, coral_config("coral"))
    drafter.shadow_full_head = True
    grouped = full = 0.0
    rounds = 0
    for ids in encoded:
        _, _, s = timed_generate(Engine(runner, drafter), ids, params)
        grouped += drafter.lm_head_ms  # both restart per sequence
        full += drafter.full_lm_head_ms
        rounds += _drafted(s)[1]
    return {
        "rounds": rounds,
        "grouped_ms_per_round": grouped / max(1, rounds),
        "full_ms_per_round": full / max(1, rounds),
        "ratio": full / grouped,
    }


def ablation_rows(runner, paths: list[str], encoded, params, reference=None) -> list[dict]:
    """Per checkpoint: tau and tokens/s with EAGLE-2's 60-node tree (full LM head: the head's
    quality) and with the budget chooser + grouped head (needs a trained router); both without
    prompt lookup, so the rows compare heads only."""
    from coralline.draft.coral import CoralHead
    from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig

    rows = []
    for path in paths:
        h = CoralHead.load(path).attach(runner.model)
        row = {"checkpoint": display_path(path), "recipe": h.config.recipe}
        for label, cfg in (
            ("tree60_full", CoralDrafterConfig(budget="max", grouped=False)),
            ("auto_grouped", CoralDrafterConfig(grouped=True)),
        ):
            m = measure_t0(runner, CoralDrafter(h, cfg), encoded, params, reference)
            row[label] = {k: m[k] for k in ("tau", "tokens_per_second", "identical")}
        rows.append(row)
        print(f"  ablation {path} done", file=sys.stderr, flush=True)
    return rows


def tau_by_prompt_set(runner, head, n_prompts: int, n_tokens: int = 64) -> dict:
    """60-node EAGLE-2 tau (full LM head), the head alone and sharing the nodes with prompt
    lookup, on the first n_prompts held-out prompts, split as the benches use them: "bench"
    (the first 6, `coralline bench coral`'s), "tuning" (the next 8, where budgets were tuned)
    and "others"; "all" pools them. tau = 1 + accepted drafts / drafted rounds, summed over
    prompts."""
    from coralline.draft.coral_drafter import CoralDrafter
    from coralline.draft.registry import coral_config
    from coralline.sampling import SamplingParams

    prompts = heldout_prompts(runner.tokenizer, n_prompts)
    sets = {"bench": prompts[:6], "tuning": prompts[6:14], "others": prompts[14:]}
    params = SamplingParams(max_new_tokens=n_tokens)
    out: dict[str, dict] = {}
    for name in ("coral-eagle2", "coral-eagle2-lookup"):
        drafter = CoralDrafter(head, coral_config(name))
        row, acc_all, rounds_all = {}, 0, 0
        for set_name, texts in sets.items():
            if not texts:
                continue
            m = measure_t0(runner, drafter, [runner.encode(t) for t in texts], params)
            row[set_name] = {"prompts": len(texts), "rounds": m["rounds"], "tau": m["tau"]}
            acc_all, rounds_all = acc_all + m["accepted"], rounds_all + m["rounds"]
        tau_all = 1 + acc_all / rounds_all
        row["all"] = {"prompts": len(prompts), "rounds": rounds_all, "tau": tau_all}
        out[name] = row
        print(f"  {name} done", file=sys.stderr, flush=True)
    return out


def run(
    quick: bool = False,
    ablations: list[str] | None = None,
    print_fn=print,
    checkpoint: str | None = None,
    ablation_only: bool = False,
    tau_prompts: int = 0,
) -> dict:
    from coralline.draft.coral import CoralHead
    from coralline.draft.coral_drafter import CoralDrafter, CoralDrafterConfig
    from coralline.draft.registry import coral_config, shipped_head
    from coralline.engine import Engine, EngineConfig
    from coralline.sampling import SamplingParams
    from coralline.target import TargetRunner

    if tau_prompts < 0:
        raise ValueError(f"--tau-prompts must be >= 0 (got {tau_prompts})")
    torch.set_num_threads(1)
    runner = TargetRunner.load()
    ckpt = checkpoint or shipped_head(runner.config.model)
    if ckpt is None:
        raise ValueError("no shipped CORAL head: train one first (coralline train-draft)")
    n_prompts, n_tokens, seeds = (2, 32, 2) if quick else (6, 64, 2)
    prompts = heldout_prompts(runner.tokenizer, n_prompts)
    encoded = [runner.encode(p) for p in prompts]
    head = CoralHead.load(str(ckpt)).attach(runner.model)
    greedy = SamplingParams(max_new_tokens=n_tokens)
    if tau_prompts:
        taus = tau_by_prompt_set(runner, head, tau_prompts, n_tokens)
        for name, row in taus.items():
            print_fn(f"{name}: " + ", ".join(f"{k} {v['tau']:.3f}" for k, v in row.items()))
        return {
            "what": "60-node tau by held-out prompt set, the head alone and with prompt lookup",
            "checkpoint": display_path(ckpt),
            "config": {"prompts": tau_prompts, "max_new_tokens": n_tokens},
            "date": time.strftime("%Y-%m-%d"),
            "tau": taus,
        }
    if ablation_only:
        plain = measure_t0(runner, None, encoded, greedy)
        abl = ablation_rows(runner, ablations or [], encoded, greedy, plain["outputs"])
        for row in abl:
            for label in ("tree60_full", "auto_grouped"):
                row[label]["speedup"] = row[label]["tokens_per_second"] / plain["tokens_per_second"]
            print_fn(
                f"{row['checkpoint']}: 60-node tree tau {row['tree60_full']['tau']:.2f}; chooser"
                f" + grouped tau {row['auto_grouped']['tau']:.2f}, "
                f"{row['auto_grouped']['speedup']:.2f}x plain"
            )
        return {
            "what": "CORAL ablations on held-out ShareGPT prompts",
            "config": {"prompts": len(encoded), "max_new_tokens": n_tokens},
            "date": time.strftime("%Y-%m-%d"),
            "plain_tokens_per_second": plain["tokens_per_second"],
            "ablations": abl,
        }
    configs = {  # the drafters by their registry names (draft/registry.py)
        "plain": None,
        "coral_eagle2_tree60_full": coral_config("coral-eagle2"),  # the head alone
        "coral_eagle2_tree60_lookup": coral_config("coral-eagle2-lookup"),
        "coral_auto_grouped_nolookup": coral_config("coral-nolookup"),
        "coral_auto_full": coral_config("coral-full"),
        "coral_auto_grouped": coral_config("coral"),  # what ships (the default drafter)
    }
    t0_results: dict[str, dict] = {}
    reference: list[list[int]] | None = None
    for name, cfg in configs.items():
        drafter = CoralDrafter(head, cfg) if cfg else None
        t0_results[name] = measure_t0(runner, drafter, encoded, greedy, reference)
        outputs = t0_results[name].pop("outputs")
        reference = outputs if reference is None else reference  # plain decoding runs first
        print(f"  {name} done", file=sys.stderr, flush=True)
    base = t0_results["plain"]["tokens_per_second"]
    for r in t0_results.values():
        r["speedup"] = r["tokens_per_second"] / base
    # T = 1: traversal vs RRSw on the same sampled trees' distribution
    t1 = {}
    for verifier in ("traversal", "rrsw"):
        drafter = CoralDrafter(head, CoralDrafterConfig(grouped=True))
        engine = Engine(runner, drafter, EngineConfig(verifier=verifier))
        acc = rounds = 0
        for ids in encoded:
            for seed in range(seeds):
                p = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=n_tokens)
                _, _, s = timed_generate(engine, ids, p)
                accepted, drafted = _drafted(s)
                acc, rounds = acc + accepted, rounds + drafted
        t1[verifier] = {"tau": 1 + acc / max(1, rounds), "rounds": rounds}
    t1["traversal_gain_percent"] = 100 * (t1["traversal"]["tau"] / t1["rrsw"]["tau"] - 1)
    # the same comparison on identical trees (paired): the chooser's trees (small on a CPU,
    # where the verifiers often coincide: a single draft is verified alike by all), the fixed
    # 60-node template, then chains
    paired_by_tree = {}
    for label, cfg in (
        ("chooser", CoralDrafterConfig(grouped=True)),
        ("tree60", CoralDrafterConfig(grouped=True, budget="max")),
    ):
        engine = Engine(runner, CoralDrafter(head, cfg), EngineConfig(verifier="traversal"))
        pv = paired_verifier_tau(engine, encoded, ["traversal", "rrsw", "eagle"], seeds, n_tokens)
        pv["traversal_gain_percent"] = 100 * (pv["traversal"]["tau"] / pv["rrsw"]["tau"] - 1)
        paired_by_tree[label] = pv
    paired = paired_by_tree["chooser"]
    chain_engine = Engine(
        runner,
        CoralDrafter(head, CoralDrafterConfig(grouped=True, chain=True)),
        EngineConfig(verifier="traversal"),
    )
    paired_chain = paired_verifier_tau(
        chain_engine, encoded, ["traversal", "block", "token_level"], seeds, n_tokens
    )
    hit = router_hit_rate(head, runner, encoded)
    lm_paired = lm_head_paired(runner, head, encoded, greedy)
    abl = ablation_rows(runner, ablations or [], encoded, greedy, reference)
    report = {
        "what": "CORAL drafter on held-out ShareGPT prompts, SmolLM2-135M-Instruct fp32",
        "checkpoint": display_path(ckpt),
        "config": {"prompts": len(encoded), "max_new_tokens": n_tokens, "t1_seeds": seeds},
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
        "date": time.strftime("%Y-%m-%d"),
        "t0": t0_results,
        "t1": t1,
        "t1_paired_trees": paired,
        "t1_paired_trees60": paired_by_tree["tree60"],
        "t1_paired_chains": paired_chain,
        "router_hit_rate": hit,
        "lm_head_paired": lm_paired,
        "ablations": abl,
    }
    print_fn(
        f"{'T = 0':<28}{'tau':>7}{'tok/s':>8}{'speedup':>9}{'LM head ms/round':>18}  identical"
    )
    for name, r in t0_results.items():
        print_fn(
            f"{name:<28}{r['tau']:>7.2f}{r['tokens_per_second']:>8.1f}{r['speedup']:>9.2f}"
            f"{r['draft_lm_head_ms_per_round']:>18.1f}  {r['identical']}"
        )
    print_fn(
        f"T = 1 tau: traversal {t1['traversal']['tau']:.3f}, RRSw {t1['rrsw']['tau']:.3f} "
        f"({t1['traversal_gain_percent']:+.1f}%)"
    )
    for label, pv in paired_by_tree.items():
        print_fn(
            f"T = 1 tau on identical trees (paired, {label}): "
            + ", ".join(f"{v} {pv[v]['tau']:.3f}" for v in ("traversal", "rrsw", "eagle"))
            + f" (traversal vs RRSw {pv['traversal_gain_percent']:+.1f}%, "
            f"{pv['traversal']['rounds']} rounds)"
        )
    print_fn(
        "T = 1 tau on identical chains (paired): "
        + ", ".join(
            f"{v} {paired_chain[v]['tau']:.3f}" for v in ("traversal", "block", "token_level")
        )
    )
    print_fn(f"router hit rate (target argmax in the selected groups): {hit:.3f}")
    print_fn(
        f"LM head on the same draft nodes: grouped {lm_paired['grouped_ms_per_round']:.2f} ms vs "
        f"full {lm_paired['full_ms_per_round']:.2f} ms per round ({lm_paired['ratio']:.1f}x, "
        f"{lm_paired['rounds']} rounds)"
    )
    for row in abl:
        a, b = row["tree60_full"], row["auto_grouped"]
        print_fn(
            f"ablation {row['checkpoint']}: 60-node tree tau {a['tau']:.2f} "
            f"({a['tokens_per_second']:.1f} tok/s); chooser + grouped tau {b['tau']:.2f} "
            f"({b['tokens_per_second']:.1f} tok/s)"
        )
    return report


def main(
    out: str | None,
    quick: bool = False,
    ablations: list[str] | None = None,
    checkpoint: str | None = None,
    ablation_only: bool = False,
    tau_prompts: int = 0,
) -> dict:
    report = run(
        quick=quick,
        ablations=ablations,
        checkpoint=checkpoint,
        ablation_only=ablation_only,
        tau_prompts=tau_prompts,
    )
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report
