"""Engine benchmark on the real target, one process, one thread, same prompts for everyone:

1. HF `generate` greedy vs the engine's plain decoding (same code path as speculation);
2. HF prompt-lookup decoding vs the engine with the n-gram drafter (chain and tree);
3. the hardware cost table t(n)/t(1) of one target forward over n tree nodes after a cached
   prompt, for chain-shaped (causal) and tree-shaped (4D mask) inputs: the budget chooser's
   cost model;
4. the KV commit strategy: in-place compaction (what the runner does) vs copying the whole
   cache with index_select;
5. the fused first round (the first token from the prompt's own forward) against the reference
   first round (a round like the others): time to the first token and the whole answer,
   plain and with the CORAL drafter, interleaved per prompt.
Every configuration's greedy output is compared with HF greedy (it must be identical).
Knows nothing about services; figures come only from this run.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from coralline.engine import timed_generate

PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Copy this list exactly and then sort it alphabetically: pear, apple, fig, kiwi, banana, "
    "cherry, grape, lemon.",
    "Write a Python function that checks whether a string is a palindrome, with a docstring.",
    "Summarise the following text in one sentence: The city council met on Tuesday to discuss "
    "the new park. The council agreed that the park will open next spring, and that it will "
    "have a playground, a pond and a small cafe.",
    "请用三句话介绍一下长城。",
    "把下面这句话翻译成英文：我今天很高兴见到你，我们一起去公园散步吧。",
]


def _time_hf(model, ids, n, **kw):
    t0 = time.perf_counter()
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=n, do_sample=False, attention_mask=None, **kw
    )
    return out[0, len(ids) :].tolist(), time.perf_counter() - t0


def cost_table(runner, context: int = 200, sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)):
    """t(n)/t(1) for chain- and tree-shaped inputs (TargetRunner.forward_costs)."""
    rows = []
    for shape in ("chain", "tree"):
        ms = runner.forward_costs(sizes, context=context, shape=shape)
        rows += [
            {"shape": shape, "n": n, "ms": t, "ratio": round(t / ms[min(ms)], 3)}
            for n, t in ms.items()
        ]
    return rows


def kv_strategy(runner, contexts=(256, 1024), nodes: int = 16, accepted=(0, 2, 5, 9, 12)):
    """Median ms of one commit: in-place compaction vs index_select of the whole cache."""
    from coralline.tree import TokenTree

    out = []
    for ctx in contexts:
        ids = [int(t) for t in torch.randint(100, 20000, (ctx + 1,))]
        tree = TokenTree.from_parents(
            [ids[-1]] + [7] * (nodes - 1), [-1] + [(i - 1) // 3 for i in range(1, nodes)]
        )
        acc = [a for a in accepted if a < nodes]
        # compaction (the runner's strategy)
        runner.prefill(ids)
        times = []
        for _ in range(7):
            runner.tree_forward(tree)
            t0 = time.perf_counter()
            runner.commit(acc)
            times.append(time.perf_counter() - t0)
            runner.truncate(runner.num_cached - len(acc))
        compaction = statistics.median(times) * 1e3
        # index_select of the whole cache
        times = []
        for _ in range(7):
            runner.tree_forward(tree)
            p = runner.num_cached
            keep = torch.tensor(list(range(p)) + [p + a for a in acc])
            t0 = time.perf_counter()
            for layer in runner.kv.cache.layers:
                layer.keys = layer.keys.index_select(2, keep)
                layer.values = layer.values.index_select(2, keep)
            times.append(time.perf_counter() - t0)
            for layer in runner.kv.cache.layers:
                layer.keys = layer.keys[:, :, :p]
                layer.values = layer.values[:, :, :p]
        out.append(
            {
                "context": ctx,
                "tree_nodes": nodes,
                "accepted": len(acc),
                "compaction_ms": round(compaction, 3),
                "index_select_ms": round(statistics.median(times) * 1e3, 3),
            }
        )
    return out


def first_round(runner, encoded, params, drafters: dict, passes: int = 2) -> dict:
    """TTFT and whole-answer time of the fused first round (EngineConfig.fused_first_round)
    against the reference first round, for each drafter in `drafters` (name -> Drafter or None),
    the two interleaved per prompt (the order flips each pass, so drift hits both alike).
    -> {drafter: {"fused" | "reference": {ttft_ms_p50, answer_s, tokens, rounds}, "identical"}}"""
    from coralline.bench.load import chunks_request
    from coralline.engine import Engine, EngineConfig

    out = {}
    for name, drafter in drafters.items():
        engines = {
            mode: Engine(runner, drafter, EngineConfig(fused_first_round=mode == "fused"))
            for mode in ("fused", "reference")
        }
        got = {
            m: {"ttft": [], "seconds": 0.0, "tokens": 0, "rounds": 0, "outs": []} for m in engines
        }
        for k in range(passes):
            for ids in encoded:
                for mode in ("fused", "reference") if k % 2 == 0 else ("reference", "fused"):
                    r, summary = chunks_request(0, engines[mode].generate(ids, params))
                    g = got[mode]
                    g["seconds"] += time.perf_counter() - r.start
                    g["ttft"].append((r.token_times[0] - r.start) * 1e3)
                    g["tokens"] += len(r.token_ids)
                    g["rounds"] += summary.rounds
                    g["outs"].append(r.token_ids)
        out[name] = {
            mode: {
                "ttft_ms_p50": round(statistics.median(g["ttft"]), 2),
                "answer_s": round(g["seconds"], 3),
                "tokens": g["tokens"],
                "rounds": g["rounds"],
            }
            for mode, g in got.items()
        }
        out[name]["identical"] = got["fused"]["outs"] == got["reference"]["outs"]
    return out


def run(quick: bool = False, print_fn=print) -> dict:
    from coralline.draft.ngram import NgramConfig, NgramDrafter
    from coralline.draft.registry import make_drafter
    from coralline.engine import Engine
    from coralline.sampling import SamplingParams
    from coralline.target import TargetRunner

    torch.set_num_threads(1)
    prompts = PROMPTS[:2] if quick else PROMPTS
    n = 32 if quick else 96
    runner = TargetRunner.load()
    model = runner.model
    params = SamplingParams(max_new_tokens=n)
    configs = {
        "hf_generate": lambda ids: _time_hf(model, ids, n),
        "hf_prompt_lookup": lambda ids: _time_hf(model, ids, n, prompt_lookup_num_tokens=5),
        "engine_plain": lambda ids: timed_generate(Engine(runner), ids, params),
        "engine_ngram": lambda ids: timed_generate(Engine(runner, NgramDrafter()), ids, params),
        "engine_ngram_tree": lambda ids: timed_generate(
            Engine(runner, NgramDrafter(NgramConfig(max_paths=3))), ids, params
        ),
    }
    per = {k: {"seconds": 0.0, "tokens": 0, "rounds": 0, "identical": True} for k in configs}
    encoded = [runner.encode(p) for p in prompts]
    _time_hf(model, encoded[0], 4)  # warm-up
    for i, ids in enumerate(encoded):
        reference = None
        for name, fn in configs.items():
            res = fn(ids)
            out, secs = res[0], res[1]
            if reference is None:
                reference = out
            per[name]["seconds"] += secs
            per[name]["tokens"] += len(out)
            per[name]["identical"] &= out == reference
            if len(res) == 3:
                per[name]["rounds"] += res[2].rounds
        print(f"  prompt {i + 1}/{len(encoded)} done", file=sys.stderr, flush=True)
    base = per["hf_generate"]["tokens"] / per["hf_generate"]["seconds"]
    for r in per.values():
        r["tokens_per_second"] = round(r["tokens"] / r["seconds"], 2)
        r["speedup_vs_hf_generate"] = round(r["tokens_per_second"] / base, 3)
        if r["rounds"]:
            r["acceptance_length"] = round(r["tokens"] / r["rounds"], 3)
        r["seconds"] = round(r["seconds"], 3)
    costs = cost_table(
        runner, sizes=(1, 2, 4, 8, 16) if quick else (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    )
    kv = kv_strategy(runner, contexts=(256,) if quick else (256, 1024))
    first_drafters = {"none": None, "coral": make_drafter("coral", runner)}  # the shipped head
    first = first_round(runner, encoded, params, first_drafters, passes=1 if quick else 2)
    report = {
        "what": "engine vs Hugging Face, greedy, SmolLM2-135M-Instruct fp32",
        "config": {"prompts": len(prompts), "max_new_tokens": n, "quick": quick},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "generation": per,
        "cost_table": costs,
        "kv_commit": kv,
        "first_round": first,
    }
    print_fn(
        f"{'configuration':<20}{'tokens':>8}{'seconds':>9}{'tok/s':>8}{'vs HF':>8}"
        f"{'tau':>7}  identical"
    )
    for name, r in per.items():
        tau = f"{r['acceptance_length']:>7.2f}" if "acceptance_length" in r else f"{'-':>7}"
        print_fn(
            f"{name:<20}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_second']:>8.1f}"
            f"{r['speedup_vs_hf_generate']:>8.2f}{tau}  {r['identical']}"
        )
    print_fn("\ncost of one target forward over n nodes (ms, and t(n)/t(1)):")
    for shape in ("chain", "tree"):
        cells = [f"{r['n']}:{r['ms']:.0f}({r['ratio']:.2f})" for r in costs if r["shape"] == shape]
        print_fn(f"  {shape:<6}" + " ".join(cells))
    print_fn("\nKV commit (ms): in-place compaction vs index_select of the whole cache")
    for r in kv:
        c, i = r["compaction_ms"], r["index_select_ms"]
        print_fn(f"  context {r['context']}: {c:.3f} vs {i:.3f}")
    print_fn("\nfirst round: fused with the prefill vs a round like the others (TTFT p50 ms, s)")
    for name, r in first.items():
        f, ref = r["fused"], r["reference"]
        print_fn(
            f"  {name:<6} TTFT {f['ttft_ms_p50']:.1f} vs {ref['ttft_ms_p50']:.1f}, answers "
            f"{f['answer_s']:.2f} vs {ref['answer_s']:.2f} s, identical {r['identical']}"
        )
    return report


def main(out: str | None, quick: bool = False) -> dict:
    report = run(quick=quick)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report
