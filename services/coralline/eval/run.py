"""`coralline eval`: generate answers with the engine and score them.

  followeval  the bundled bilingual suite (or --data FILE): accuracy per language x dimension
  ifeval      IFEval prompts (--data input_data.jsonl): prompt/instruction, strict/loose
  lossless    greedy speculation vs plain decoding on the same prompts: the identical-output
              rate (must be 100%) and both runs' FollowEval and IFEval scores side by side
Greedy decoding (T = 0) throughout, so every figure is reproducible. Progress goes to stderr.
Knows nothing about services.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from coralline.engine import Engine, timed_generate
from coralline.sampling import SamplingParams


def _answers(engine: Engine, prompts: list[str], max_new_tokens: int, desc: str):
    """(texts, token id lists, seconds) for each prompt, chat template applied."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    texts, ids_out, secs = [], [], 0.0
    for prompt in tqdm(prompts, desc=desc, file=sys.stderr, unit="prompt"):
        ids, s, _ = timed_generate(engine, engine.target.encode(prompt), params)
        texts.append(engine.target.tokenizer.decode(ids, skip_special_tokens=True))
        ids_out.append(ids)
        secs += s
    return texts, ids_out, secs


def _engines(drafter_name: str | None, model: str):
    from coralline.draft.registry import check_name, default_drafter, make_drafter
    from coralline.target import TargetConfig, TargetRunner

    target = TargetRunner.load(TargetConfig(model=model))
    name = drafter_name or default_drafter(model)
    check_name(name)
    return target, name, make_drafter(name, target)


def followeval(
    data: str | None, drafter: str | None, model: str, max_new_tokens: int, limit: int
) -> dict:
    from coralline.eval import followeval as fe

    items = fe.load(data) if data else fe.bundled_suite()
    items = items[:limit] if limit else items
    target, name, d = _engines(drafter, model)
    texts, _, secs = _answers(
        Engine(target, d), [i.instruction for i in items], max_new_tokens, f"followeval ({name})"
    )
    report = {"drafter": name, "seconds": secs, **fe.score(items, texts)}
    print(f"FollowEval accuracy {report['accuracy']:.3f} on {len(items)} items ({name})")
    for cell, v in report["by_language_dimension"].items():
        print(f"  {cell:<34}{v['accuracy']:>7.3f}  ({v['items']} items)")
    return report


def ifeval(
    data: str,
    drafter: str | None,
    model: str,
    max_new_tokens: int,
    limit: int,
    backend: str = "engine",
    batch_size: int = 32,
) -> dict:
    """backend "engine": the engine with the drafter (speculation); "hf-batched": the target
    alone through batched HF greedy generation (fast for the whole set; see hf_batch.py)."""
    from coralline.eval import ifeval as ife

    if backend not in ("engine", "hf-batched"):
        raise ValueError("backend must be 'engine' or 'hf-batched'")
    prompts = ife.load_prompts(data)
    prompts = prompts[:limit] if limit else prompts
    if backend == "engine":
        target, name, d = _engines(drafter, model)
        texts, _, secs = _answers(
            Engine(target, d), [p.prompt for p in prompts], max_new_tokens, f"ifeval ({name})"
        )
    else:
        from coralline.hf_batch import greedy_batches
        from coralline.target import TargetConfig, TargetRunner

        target = TargetRunner.load(TargetConfig(model=model))
        name = f"none (HF generate, batches of {batch_size})"
        t0 = time.perf_counter()
        encoded = [target.encode(p.prompt) for p in prompts]
        answers = [
            a
            for batch in greedy_batches(
                target.model, encoded, max_new_tokens, batch_size, desc="ifeval (hf-batched)"
            )
            for a in batch
        ]
        texts = [target.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        secs = time.perf_counter() - t0
    report = {
        "drafter": name,
        "backend": backend,
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "seconds": secs,
        **ife.score(prompts, texts),
        "responses": [{"key": p.key, "response": t} for p, t in zip(prompts, texts, strict=True)],
    }
    print(
        f"IFEval on {len(prompts)} prompts ({name}): "
        + ", ".join(
            f"{k}={v:.3f}" for k, v in report.items() if isinstance(v, float) and k != "seconds"
        )
    )
    return report


def lossless(
    ifeval_data: str | None,
    drafter: str | None,
    model: str,
    max_new_tokens: int,
    limit: int,
    ifeval_limit: int,
) -> dict:
    from coralline.eval import followeval as fe
    from coralline.eval import ifeval as ife

    target, name, d = _engines(drafter, model)
    items = fe.bundled_suite()
    items = items[:limit] if limit else items
    prompts = ife.load_prompts(ifeval_data)[:ifeval_limit] if ifeval_data else []
    report: dict = {"drafter": name, "max_new_tokens": max_new_tokens}
    texts = {}
    for label, engine in (("plain", Engine(target)), ("speculative", Engine(target, d))):
        fe_texts, fe_ids, fe_s = _answers(
            engine, [i.instruction for i in items], max_new_tokens, f"followeval {label}"
        )
        if_texts, if_ids, if_s = _answers(
            engine, [p.prompt for p in prompts], max_new_tokens, f"ifeval {label}"
        )
        texts[label] = fe_ids + if_ids
        report[label] = {
            "followeval_accuracy": fe.score(items, fe_texts)["accuracy"],
            "seconds": fe_s + if_s,
            "tokens": sum(len(x) for x in fe_ids + if_ids),
        }
        if prompts:
            report[label]["ifeval"] = ife.score(prompts, if_texts)
    same = sum(a == b for a, b in zip(texts["plain"], texts["speculative"], strict=True))
    report["identical_rate"] = same / max(1, len(texts["plain"]))
    report["speedup"] = report["plain"]["seconds"] / report["speculative"]["seconds"]
    print(
        f"identical outputs: {same}/{len(texts['plain'])} "
        f"({100 * report['identical_rate']:.1f}%), speedup {report['speedup']:.2f}x"
    )
    for label in ("plain", "speculative"):
        r = report[label]
        extra = ""
        if "ifeval" in r:
            extra = f", IFEval avg strict {r['ifeval']['average_strict']:.3f}"
        print(
            f"  {label:<12} FollowEval {r['followeval_accuracy']:.3f}{extra}, "
            f"{r['tokens'] / r['seconds']:.1f} tok/s"
        )
    return report


def save(report: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        report = {**report, "date": time.strftime("%Y-%m-%d")}
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"wrote {out}")
