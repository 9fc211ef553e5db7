"""`coralline bench kernels`: what each of coralline's CPU kernels buys inside the batched forward,
measured side by side in one process on the real target (a speed bench, not a quality one).

Two A/Bs, each over one ragged forward of k one-token sessions (k = 1, 4, 8, 16 by default),
each session after its own cached context (`context` + 7 j tokens, so the lengths differ as they
do in serving), run on the calling thread with the machine's torch threads:

- attention: the shared decode attention on PyTorch's SDPA vs on coralline's CPU kernel
  (batching/cpu_attention.py); k = 1 has no shared call (a lone item attends alone);
- pack: every oneDNN weight (the model's linear layers, the fused q / k / v and gate / up
  copies, the LM head) as a plain `to_mkldnn()` copy vs reordered into oneDNN's blocked layout
  (cpu_linear.onednn_pack), both with the kernel attention.

The variants alternate forward by forward (`repeats` times each), so a neighbour's burst of work
on the machine falls on both; figures are medians. Each A/B also compares the variants' logits:
the largest absolute difference and whether every row's argmax agrees.

Knows nothing about services or sessions beyond the batched forward.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class KernelBenchConfig:
    model: str = "smollm2-135m-instruct"
    sessions: tuple[int, ...] = (1, 4, 8, 16)
    context: int = 150  # cached tokens of the first session (the others: + 7 per session)
    repeats: int = 8  # forwards per variant and point, alternating
    threads: int = 0  # torch threads (0: the machine's CPUs)

    def __post_init__(self) -> None:
        if not self.sessions or min(self.sessions) < 1 or self.repeats < 1 or self.context < 1:
            raise ValueError("sessions, repeats and context must be >= 1")

    @classmethod
    def quick(cls, **kw) -> KernelBenchConfig:
        base = {"sessions": (1, 4), "repeats": 2, "context": 32}
        base.update(kw)
        return cls(**base)


def _log(msg: str) -> None:
    print(f"bench kernels: {msg}", file=sys.stderr, flush=True)


class _Packs:
    """Both packs of every oneDNN weight of the model and its fused projections; `use(layout)`
    puts one of them in place."""

    def __init__(self, model, proj) -> None:
        from coralline import cpu_linear
        from coralline.batching.forward import Projections

        self.modules = [m for m in model.modules() if isinstance(m, cpu_linear.OneDnnLinear)]
        self.blocked = {id(m): m._packed for m in self.modules}
        self.proj = {"blocked": proj}
        real = cpu_linear.onednn_pack
        cpu_linear.onednn_pack = lambda w: (w.detach().contiguous().to_mkldnn(), "plain")
        try:
            self.plain = {id(m): cpu_linear.onednn_pack(m.weight)[0] for m in self.modules}
            self.proj["plain"] = Projections(model)
        finally:
            cpu_linear.onednn_pack = real
        self.available = bool(self.modules) and self.modules[0].layout == "blocked"

    def use(self, layout: str):
        packs = self.blocked if layout == "blocked" else self.plain
        for m in self.modules:
            m._packed = packs[id(m)]
        return self.proj[layout]


def _sessions(model, pool, proj, k: int, context: int):
    """k slots holding context + 7 j cached tokens each; -> the one-token items of a step."""
    from coralline.batching.forward import Item, ragged_forward

    vocab = int(model.get_output_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(k)
    items = []
    for j in range(k):
        slot, n = pool.acquire(), context + 7 * j
        ids = torch.randint(0, vocab, (n,), generator=g)
        ragged_forward(model, pool, [Item(slot, 0, ids, torch.arange(n), None, False)], proj)
        pool.lengths[slot] = n
        tok = torch.randint(0, vocab, (1,), generator=g)
        items.append(Item(slot, n, tok, torch.tensor([n]), None, True))
    return items


def _ab(run_a, run_b, repeats: int) -> dict:
    """Alternate a and b `repeats` times each; -> medians and how their logits compare."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    logits: dict[str, torch.Tensor] = {}
    for r in range(repeats):
        for name, fn in (
            (("a", run_a), ("b", run_b)) if r % 2 == 0 else (("b", run_b), ("a", run_a))
        ):
            t0 = time.perf_counter()
            out = fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
            logits[name] = torch.cat([rows for _, rows in out])  # [k, V]
    a, b = logits["a"], logits["b"]
    return {
        "a_ms": statistics.median(times["a"]),
        "b_ms": statistics.median(times["b"]),
        "max_abs_diff": float((a - b).abs().max()),
        "bitwise_equal": bool(torch.equal(a, b)),
        "argmax_equal": bool(torch.equal(a.argmax(-1), b.argmax(-1))),
    }


@contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: KernelBenchConfig, command: str = "") -> dict:
    import os

    from coralline.batching import cpu_attention
    from coralline.batching.forward import Projections, ragged_forward
    from coralline.batching.pool import KVPool
    from coralline.bench.pipeline import _machine
    from coralline.target import TargetConfig, TargetRunner

    threads = cfg.threads or os.cpu_count() or 1
    with _threads(threads), torch.inference_mode():
        runner = TargetRunner.load(TargetConfig(model=cfg.model))
        model = runner.model
        proj = Projections(model)
        kernel = cpu_attention.usable(next(model.parameters()))
        packs = _Packs(model, proj)
        pool = KVPool.for_model(model, max(cfg.sessions), cfg.context + 7 * max(cfg.sessions) + 8)
        rows = []
        for k in cfg.sessions:
            _log(f"{k} sessions")
            items = _sessions(model, pool, packs.use("blocked"), k, cfg.context)
            point: dict = {"sessions": k}

            def variant(layout: str, attention: bool, items=items):
                return lambda: ragged_forward(model, pool, items, packs.use(layout), attention)

            if kernel and k >= 2:
                ab = _ab(variant("blocked", False), variant("blocked", True), cfg.repeats)
                point["attention"] = {"sdpa_ms": ab.pop("a_ms"), "kernel_ms": ab.pop("b_ms"), **ab}
            if packs.available:
                ab = _ab(variant("plain", kernel), variant("blocked", kernel), cfg.repeats)
                point["pack"] = {"plain_ms": ab.pop("a_ms"), "blocked_ms": ab.pop("b_ms"), **ab}
            packs.use("blocked")
            for it in items:
                pool.release(it.slot)
            rows.append(point)
    notes = []
    if not kernel:
        notes.append(f"no attention A/B: the CPU kernel is unavailable ({cpu_attention.error()})")
    if not packs.available:
        notes.append("no pack A/B: this torch has no blocked oneDNN pack (or no oneDNN layers)")
    return {
        "bench": "kernels",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": {**_machine(), "threads": threads},
        "config": {
            "model": cfg.model,
            "sessions": list(cfg.sessions),
            "context": cfg.context,
            "repeats": cfg.repeats,
        },
        "points": rows,
        "notes": notes,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# CPU kernels in the batched forward ({report['date']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m['threads']} threads. Command: `{report['command']}`",
        "",
        "One-token sessions after "
        f"{report['config']['context']} + 7 j cached tokens; median ms of "
        f"{report['config']['repeats']} alternating forwards per variant.",
        "",
        "| sessions | attention: SDPA | kernel | speed-up | pack: plain | blocked | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        a, k = p.get("attention"), p.get("pack")
        cells = [str(p["sessions"])]
        cells += (
            [
                f"{a['sdpa_ms']:.1f}",
                f"{a['kernel_ms']:.1f}",
                f"{a['sdpa_ms'] / a['kernel_ms']:.2f}x",
            ]
            if a
            else ["-", "-", "-"]
        )
        cells += (
            [
                f"{k['plain_ms']:.1f}",
                f"{k['blocked_ms']:.1f}",
                f"{k['plain_ms'] / k['blocked_ms']:.2f}x",
            ]
            if k
            else ["-", "-", "-"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for p in report["points"]:
        for name in ("attention", "pack"):
            if name in p:
                d = p[name]
                k = p["sessions"]
                lines.append(
                    f"- {k} session{'s' if k != 1 else ''}, {name}: logits max |diff| "
                    f"{d['max_abs_diff']:.1e}"
                    f", bitwise equal {d['bitwise_equal']}, argmax equal {d['argmax_equal']}"
                )
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    series = [
        ("attention", "sdpa_ms", "SDPA attention", "--"),
        ("attention", "kernel_ms", "kernel attention", "-"),
        ("pack", "plain_ms", "plain oneDNN pack", ":"),
        ("pack", "blocked_ms", "blocked oneDNN pack", "-."),
    ]
    for ab, key, label, style in series:
        pts = [(p["sessions"], p[ab][key]) for p in report["points"] if ab in p]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=label)
    ax.set_xlabel("one-token sessions in the forward")
    ax.set_ylabel("ms per forward (median)")
    ax.set_title(f"CPU kernels in the batched forward ({report['date']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(out: str | Path, cfg: KernelBenchConfig, command: str = "") -> list[Path]:
    report = run(cfg, command)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    md = out.with_suffix(".md")
    md.write_text(markdown(report))
    png = plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return [out, md, png]
