"""`coralline bench`: every decoding method on the same prompts, in one run, one process.

Prompt sets (the same for every method): the bundled FollowEval-style items (English and
Chinese alternating), IFEval prompts (from a path; skipped with a note when absent) and held-out
ShareGPT prompts (never used in draft training).

Methods, T = 0 (greedy; every output must equal HF greedy token for token):
  hf_generate        Hugging Face `generate` (the baseline of every speedup)
  hf_prompt_lookup   HF prompt-lookup decoding (5 tokens)
  hf_assisted        HF assisted generation with a smaller same-tokenizer model, when one is given
                     or known (none is for SmolLM2-135M: it is its family's smallest; the report
                     says so)
  engine_plain       the engine without a drafter (the same loop as speculation)
  ngram, ngram-tree  model-free n-gram drafting (chain; 4 paths)
  coral-full         CORAL head, full LM head, tree size from the budget chooser, + prompt lookup
  coral              CORAL head, grouped LM head + router, budget chooser, + prompt lookup (the
                     default drafter)
  coral-nolookup     the same without prompt lookup (the head's own trees)
  coral-eagle2       CORAL head, full LM head, EAGLE-2's fixed 60-node tree (tau reference)
Methods, T = 1 (seeded; speedup over HF sampling): hf_sample, engine_plain, the CORAL tree
verified by traversal / RRSw / EAGLE's verifier, and the CORAL chain verified by token-level
speculative sampling / block verification: the verifiers side by side on one drafter.

Per method: tokens/s, speedup over the HF baseline of its temperature, tau (1 + accepted drafts
per round), draft and verify ms per round, the share of rounds accepting at least d drafts for
d = 1..depth, and peak memory (see PeakMemory: on CPU the process's peak RSS and what the
method added to it; on CUDA peak allocated memory). Methods run interleaved prompt by prompt,
so slow drift of the machine touches every method alike.

Knows nothing about services. Output (JSON, plots, markdown) is written by bench/report.py.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from coralline.bench.report import display_path
from coralline.sampling import SamplingParams

# what HF assisted generation would need, per built-in target
KNOWN_ASSISTANTS: dict[str, str | None] = {"smollm2-135m-instruct": None}
NO_ASSISTANT_WHY = (
    "no smaller model with {model}'s tokenizer is available offline (SmolLM2-135M is the "
    "smallest of its family; the other packaged model, Gemma3-270M, is larger and has another "
    "tokenizer): pass --assistant to compare one"
)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "smollm2-135m-instruct"
    checkpoint: str | None = None  # CORAL head folder (default: the one shipped for the model)
    assistant: str | None = None  # HF assisted generation's draft model (same tokenizer)
    prompts_per_set: int = 3
    max_new_tokens: int = 96
    t1_seeds: int = 1  # seeds per prompt at T = 1
    ifeval_data: str | None = None  # default: ifeval.default_data_path()
    device: str = "cpu"
    threads: int = 1
    depth: int = 6  # acceptance is reported for depths 1..depth

    def __post_init__(self) -> None:
        if self.prompts_per_set < 1 or self.max_new_tokens < 1 or self.t1_seeds < 1:
            raise ValueError("prompts_per_set, max_new_tokens and t1_seeds must be >= 1")

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        """What CI runs: every method, one prompt per set, short answers."""
        return cls(**{"prompts_per_set": 1, "max_new_tokens": 24, **kw})


# BenchConfig fields that may hold a filesystem path (assistant: a built-in name or a folder)
_PATHS = ("checkpoint", "assistant", "ifeval_data")


@dataclass(frozen=True)
class Method:
    name: str
    temperature: float
    kind: str  # "hf" or "engine"
    drafter: str | None = None  # engine: registry name
    verifier: str | None = None  # engine: None = the default for the drafter
    hf: dict = field(default_factory=dict)  # hf: extra generate() arguments

    @property
    def label(self) -> str:
        return f"{self.name}/{self.verifier}" if self.verifier else self.name


def methods(assistant: bool) -> list[Method]:
    t0 = [
        Method("hf_generate", 0.0, "hf"),
        Method("hf_prompt_lookup", 0.0, "hf", hf={"prompt_lookup_num_tokens": 5}),
        *([Method("hf_assisted", 0.0, "hf", hf={"assistant": True})] if assistant else []),
        Method("engine_plain", 0.0, "engine"),
        Method("ngram", 0.0, "engine", "ngram"),
        Method("ngram-tree", 0.0, "engine", "ngram-tree"),
        Method("coral-full", 0.0, "engine", "coral-full"),
        Method("coral", 0.0, "engine", "coral"),
        Method("coral-nolookup", 0.0, "engine", "coral-nolookup"),
        Method("coral-eagle2", 0.0, "engine", "coral-eagle2"),
    ]
    t1 = [
        Method("hf_sample", 1.0, "hf"),
        Method("engine_plain", 1.0, "engine"),
        *(Method("coral", 1.0, "engine", "coral", v) for v in ("traversal", "rrsw", "eagle")),
        *(Method("coral-chain", 1.0, "engine", "coral-chain", v) for v in ("token_level", "block")),
    ]
    return t0 + t1


def prompt_sets(tokenizer, cfg: BenchConfig) -> tuple[dict[str, list[str]], list[str]]:
    """{set name: prompts} and notes on sets that could not be built."""
    from coralline.bench.coral import heldout_prompts
    from coralline.eval import followeval, ifeval

    n, notes = cfg.prompts_per_set, []
    items = followeval.bundled_suite()
    en = [i.instruction for i in items if i.lang == "en"]
    zh = [i.instruction for i in items if i.lang == "zh"]
    mixed = [p for pair in zip(en, zh, strict=False) for p in pair]
    sets = {"followeval": mixed[:n]}
    path = Path(cfg.ifeval_data) if cfg.ifeval_data else ifeval.default_data_path()
    if path.is_file():
        sets["ifeval"] = [p.prompt for p in ifeval.load_prompts(path)[:n]]
    else:
        notes.append(f"IFEval prompts skipped: {display_path(path)} not found (pass --ifeval-data)")
    sets["sharegpt_heldout"] = heldout_prompts(tokenizer, n)
    return sets, notes


class PeakMemory:
    """Peak memory while a method runs (MB): (peak, peak minus the level at reset).

    CUDA: peak allocated tensor memory. CPU: the process's peak RSS (VmHWM), reset to the
    current RSS through /proc/self/clear_refs; memory freed earlier but still resident counts
    in both, so on CPU the second figure (what the method added) is the informative one."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.start = 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
            return
        # collect what earlier methods left behind first: memory released DURING the method
        # would lower the RSS the peak is measured against (seen in the test suite, where a
        # previous test's model was collected mid-measurement)
        gc.collect()
        # where not allowed (or not Linux) the peak is the process-lifetime peak
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
        self.start = self._status("VmRSS:")

    def read(self) -> tuple[float, float]:
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.cuda else self._status("VmHWM:")
        return peak, max(0.0, peak - self.start)

    @staticmethod
    def _status(key: str) -> float:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _engine_runner(runner, method: Method, drafters: dict, depth: int) -> Callable:
    from coralline.engine import Engine, EngineConfig

    engine = Engine(runner, drafters.get(method.drafter), EngineConfig(verifier=method.verifier))

    def run(ids: list[int], params: SamplingParams) -> dict:
        t0 = time.perf_counter()
        out, accepted, draft_ms, verify_ms = [], [], 0.0, 0.0
        for chunk in engine.generate(ids, params):
            out.extend(chunk.token_ids)
            accepted.append(chunk.stats.accepted)
            draft_ms += chunk.stats.draft_ms
            verify_ms += chunk.stats.verify_ms
        return {
            "ids": out,
            "seconds": time.perf_counter() - t0,
            "rounds": len(accepted),
            "accepted": sum(accepted),
            "at_least": [sum(a >= d for a in accepted) for d in range(1, depth + 1)],
            "draft_ms": draft_ms,
            "verify_ms": verify_ms,
        }

    return run


def _hf_runner(model, method: Method, assistant) -> Callable:
    kw = dict(method.hf)
    if kw.pop("assistant", False):
        kw["assistant_model"] = assistant
    if method.temperature > 0:  # plain multinomial sampling: no top-k / top-p defaults
        kw.update(do_sample=True, temperature=method.temperature, top_k=0, top_p=1.0)
    else:
        kw.update(do_sample=False)

    def run(ids: list[int], params: SamplingParams) -> dict:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        t0 = time.perf_counter()
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=params.max_new_tokens,
            **kw,
        )
        return {"ids": out[0, len(ids) :].tolist(), "seconds": time.perf_counter() - t0}

    return run


def load_assistant(name: str, target_tokenizer, device: str):
    from coralline import models

    model, tok = models.load(name, device=device)
    if tok is None or tok.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(f"assistant {name!r} does not share the target's tokenizer")
    return model.eval()


def run(cfg: BenchConfig, command: str = "") -> dict:
    from coralline.draft.registry import make_drafter
    from coralline.target import TargetConfig, TargetRunner

    torch.set_num_threads(cfg.threads)
    runner = TargetRunner.load(TargetConfig(model=cfg.model, device=cfg.device))
    sets, notes = prompt_sets(runner.tokenizer, cfg)
    encoded = [runner.encode(p) for ps in sets.values() for p in ps]
    assistant_name = cfg.assistant or KNOWN_ASSISTANTS.get(cfg.model)
    assistant = None
    if assistant_name:
        assistant = load_assistant(assistant_name, runner.tokenizer, cfg.device)
    else:
        notes.append("hf_assisted skipped: " + NO_ASSISTANT_WHY.format(model=cfg.model))
    todo = methods(assistant is not None)
    names = {m.drafter for m in todo if m.drafter}
    drafters = {n: make_drafter(n, runner, cfg.checkpoint) for n in sorted(names)}
    runs = {
        (m.temperature, m.label): (
            _hf_runner(runner.model, m, assistant)
            if m.kind == "hf"
            else _engine_runner(runner, m, drafters, cfg.depth)
        )
        for m in todo
    }
    acc = {key: _empty() for key in runs}
    memory = PeakMemory(cfg.device)
    _hf_runner(runner.model, todo[0], None)(encoded[0], SamplingParams(max_new_tokens=4))  # warm
    total = len(encoded) * sum(1 if m.temperature == 0 else cfg.t1_seeds for m in todo)
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr)
    for i, ids in enumerate(encoded):
        reference = None
        for m in todo:
            key = (m.temperature, m.label)
            seeds = [None] if m.temperature == 0 else range(cfg.t1_seeds)
            for seed in seeds:
                params = SamplingParams(
                    temperature=m.temperature, seed=seed, max_new_tokens=cfg.max_new_tokens
                )
                bar.set_postfix_str(f"prompt {i + 1} {m.label} T={m.temperature:g}")
                memory.reset()
                res = runs[key](ids, params)
                peak, extra = memory.read()
                acc[key]["peak_memory_mb"] = max(acc[key]["peak_memory_mb"], peak)
                acc[key]["added_memory_mb"] = max(acc[key]["added_memory_mb"], extra)
                if m.temperature == 0:
                    reference = res["ids"] if reference is None else reference
                    acc[key]["identical"] &= res["ids"] == reference
                _add(acc[key], res)
                bar.update(1)
    bar.close()
    rows = [_finish(m, acc[(m.temperature, m.label)]) for m in todo]
    for t, base in ((0.0, "hf_generate"), (1.0, "hf_sample")):
        b = next(r for r in rows if r["temperature"] == t and r["method"] == base)
        for r in rows:
            if r["temperature"] == t:
                r["speedup"] = r["tokens_per_second"] / b["tokens_per_second"]
    return {
        "what": f"every decoding method on the same prompts, {cfg.model}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": machine(cfg),
        "config": {
            **asdict(cfg),
            **{k: display_path(getattr(cfg, k)) for k in _PATHS if getattr(cfg, k)},
        },
        "checkpoint": _ckpt(cfg, runner),
        "prompt_sets": {k: len(v) for k, v in sets.items()},
        "notes": notes,
        "results": rows,
    }


def _ckpt(cfg: BenchConfig, runner) -> str:
    from coralline.draft.registry import shipped_head

    return display_path(cfg.checkpoint or shipped_head(runner.config.model))


def _empty() -> dict:
    return {
        "tokens": 0,
        "seconds": 0.0,
        "runs": 0,
        "rounds": 0,
        "accepted": 0,
        "at_least": None,
        "draft_ms": 0.0,
        "verify_ms": 0.0,
        "peak_memory_mb": 0.0,
        "added_memory_mb": 0.0,
        "identical": True,
    }


def _add(a: dict, res: dict) -> None:
    a["tokens"] += len(res["ids"])
    a["seconds"] += res["seconds"]
    a["runs"] += 1
    if "rounds" in res:
        a["rounds"] += res["rounds"]
        a["accepted"] += res["accepted"]
        a["draft_ms"] += res["draft_ms"]
        a["verify_ms"] += res["verify_ms"]
        prev = a["at_least"] or [0] * len(res["at_least"])
        a["at_least"] = [x + y for x, y in zip(prev, res["at_least"], strict=True)]


def _finish(m: Method, a: dict) -> dict:
    row = {
        "method": m.name,
        "verifier": m.verifier,
        "label": m.label,
        "temperature": m.temperature,
        "kind": m.kind,
        "tokens": a["tokens"],
        "seconds": round(a["seconds"], 3),
        "tokens_per_second": a["tokens"] / a["seconds"],
        "peak_memory_mb": round(a["peak_memory_mb"], 1),
        "added_memory_mb": round(a["added_memory_mb"], 1),
        "tau": None,
        "draft_ms_per_round": None,
        "verify_ms_per_round": None,
        "acceptance_by_depth": None,
    }
    if m.temperature == 0:
        row["identical_to_hf_greedy"] = a["identical"]
    if a["rounds"]:
        r = a["rounds"]
        row.update(
            tau=1 + a["accepted"] / r,
            rounds=r,
            draft_ms_per_round=a["draft_ms"] / r,
            verify_ms_per_round=a["verify_ms"] / r,
            acceptance_by_depth=[x / r for x in a["at_least"]],
        )
    return row


def machine(cfg: BenchConfig) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": cfg.device,
    }
    if cfg.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info
