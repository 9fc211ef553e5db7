"""The cost model of a batched forward, and the load-adaptive tree budget built on it.

`measure(scheduler)`: milliseconds of one ragged forward holding T tokens in total, for T in
TOTALS, on the verifier's own device: the T tokens are 8-node trees of ceil(T / 8) sessions
(T < 8: one session), each after `context` cached tokens, so the figure includes the
per-session attention and bookkeeping a real batch pays. Each figure is the fastest of a few
sweeps over the sizes, interleaved: a neighbour's burst of work slows a run, never speeds it up.
Cached per (target fingerprint, device, dtype, linear kernel, threads) under the coralline cache
(`costs/`). At each start a cached table is checked against a quick probe (PROBE sizes) and
measured again when it is off by more than DRIFT either way, so a table measured while the
machine was busy, or on other hardware under the same name, does not stay in the cache. (Seen
here: an install running beside the measurement made every figure 3-7x too slow, which shrank
the trees under load: tau 1.24 instead of 2.76 at 4 sessions, -20% tokens/s.)

`LoadPolicy.hint(sessions, max_nodes)`: the cost of one round with a tree of n nodes when
`sessions` sessions share the forward, assuming the others draft alike: t(sessions * n). The
drafter maximises expected tokens per round / (that cost + its drafting time) (draft/trees.py
`choose_budget`), which is the batch's throughput per session when every session does the same.
As sessions grow, t(sessions * n) / t(sessions) rises faster in n (the forward leaves its flat,
memory-bound region), so trees shrink, down to the root alone (plain decoding) where no draft
node pays for itself. One session: no hint (the drafter's own single-session model), so a
lone session's trees, and its sampled output for a seed, do not depend on this machine's table.

Knows nothing about gRPC or drafting; only forwards and numbers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from coralline.batching.forward import Item, ragged_forward

TOTALS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
PROBE = (1, 16)  # what each start checks a cached table against
DRIFT = 1.5  # a cached figure off by more than this factor either way is measured again
HINT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # the budget chooser's sizes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cache_file(model, fingerprint: str, fused: bool = True, cpu_kernel: bool = False) -> Path:
    from coralline.models import cache_dir

    p = next(model.parameters())
    head = model.get_output_embeddings()
    kernel = type(head).__name__  # the linear layers' kind (cpu_linear), and their pack's layout
    kernel += f"-{head.layout}" if hasattr(head, "layout") else ""
    kernel += "-fused" if fused else ""  # the scheduler's fused projections (forward.py)
    kernel += "-cpuattn" if cpu_kernel else ""  # decode attention on cpu_attention's kernel
    name = (
        f"{fingerprint[:16]}-{_device_name(p.device)}-{p.dtype}-{kernel}-{torch.get_num_threads()}t"
    )
    slug = "".join(c if c.isalnum() or c in "-." else "_" for c in name)
    return cache_dir() / "costs" / f"{slug}.json"


@torch.inference_mode()
def measure(
    scheduler, context: int = 200, repeats: int = 3, totals: tuple[int, ...] = TOTALS
) -> dict[int, float]:
    """Milliseconds of one batched forward per total token count (see the module docstring;
    the fastest of `repeats` interleaved sweeps below 128 tokens, one run from 128 on).
    Needs free slots; leaves the pool as it found it."""
    model, pool, proj = scheduler.model, scheduler.pool, scheduler.projections
    kern = getattr(scheduler, "cpu_kernel", False)  # the attention its batches run
    limit = scheduler.config.max_batch_tokens
    totals = [t for t in totals if t <= limit] or [min(totals)]
    context = min(context, pool.slot_tokens - 9)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(0)
    need = min(max(1, math.ceil(totals[-1] / 8)), scheduler.pool.free_slots)
    slots = [scheduler.acquire() for _ in range(need)]
    try:
        for s in slots:  # the context every session has cached
            ids = torch.randint(0, vocab, (context,), generator=g)
            item = Item(s, 0, ids, torch.arange(context), None, False)
            ragged_forward(model, pool, [item], proj, kern)
        parents = [-1] + [(i - 1) // 2 for i in range(1, 8)]  # a binary 8-node tree
        mask8 = torch.zeros(8, 8, dtype=torch.bool)
        for i, p in enumerate(parents):
            mask8[i] = mask8[p] if p >= 0 else mask8[i]
            mask8[i, i] = True
        depth8 = torch.tensor([0, 1, 1, 2, 2, 2, 2, 3])
        batches = {}
        for total in totals:
            k = min(len(slots), max(1, math.ceil(total / 8)))
            sizes = [total // k + (i < total % k) for i in range(k)]
            items = []
            for s, n in zip(slots, sizes, strict=False):
                ids = torch.randint(0, vocab, (n,), generator=g)
                mask = mask8[:n, :n] if n <= 8 else torch.ones(n, n, dtype=torch.bool).tril()
                pos = context + (depth8[:n] if n <= 8 else torch.arange(n))
                items.append(Item(s, context, ids, pos, mask, True))
            batches[total] = items
        times: dict[int, list[float]] = {t: [] for t in totals}
        for sweep in range(repeats):
            for total, items in batches.items():
                if sweep and total >= 128:  # the large ones vary little
                    continue
                t0 = time.perf_counter()
                ragged_forward(model, pool, items, proj, kern)
                times[total].append((time.perf_counter() - t0) * 1e3)
        return {t: min(ms) for t, ms in times.items()}
    finally:
        for s in slots:
            scheduler.release(s)


def load_or_measure(scheduler, fingerprint: str, log=None) -> dict[int, float]:
    """The cached table for this target and device when a quick probe agrees with it, else a
    fresh measurement (then cached). Both run on the scheduler's thread, where its batches
    run (what they cost on another thread can differ: threads.py)."""
    path = cache_file(
        scheduler.model,
        fingerprint,
        scheduler.projections is not None,
        getattr(scheduler, "cpu_kernel", False),
    )
    if path.exists() and not os.environ.get("CORALLINE_REMEASURE"):
        try:
            cached = {int(k): float(v) for k, v in json.loads(path.read_text())["ms"].items()}
        except (ValueError, KeyError, OSError):
            cached = None  # a damaged cache is measured again
        if cached:
            probe = tuple(t for t in PROBE if t in cached)
            drift = _drift(cached, scheduler.call(lambda: measure(scheduler, totals=probe)))
            if not drift:
                return cached
            if log is not None:
                log.warning(
                    "the cached cost table %s is off on this machine now (%s): measuring again",
                    path,
                    ", ".join(f"{t} tokens: {r:.2f}x" for t, r in drift.items()),
                )
    if log is not None:
        log.info("measuring the batched forward's cost on this device (cached in %s)", path)
    table = scheduler.call(lambda: measure(scheduler))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ms": table, "measured": time.time()}, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only cache (a container's): measured again next start
        if log is not None:
            log.warning("could not cache the cost table in %s: %s", path, e)
    return table


def _drift(cached: dict[int, float], probe: dict[int, float]) -> dict[int, float]:
    """{tokens: probe / cached} where they differ by more than DRIFT either way."""
    ratios = {t: ms / cached[t] for t, ms in probe.items() if t in cached}
    return {t: r for t, r in ratios.items() if not 1 / DRIFT <= r <= DRIFT}


class LoadPolicy:
    """Round costs under load from a measured table {total tokens: ms} (pure)."""

    def __init__(self, table: dict[int, float]) -> None:
        if not table or any(t < 1 or ms <= 0 for t, ms in table.items()):
            raise ValueError("a cost table maps token counts >= 1 to positive milliseconds")
        self.table = dict(sorted(table.items()))

    def cost(self, total: int) -> float:
        """ms of a forward over `total` tokens (linear between and beyond the measured sizes)."""
        keys = list(self.table)
        if total <= keys[0]:
            return self.table[keys[0]]
        for a, b in itertools.pairwise(keys):
            if total <= b:
                w = (total - a) / (b - a)
                return self.table[a] * (1 - w) + self.table[b] * w
        if len(keys) == 1:
            return self.table[keys[0]] * total / keys[0]
        a, b = keys[-2], keys[-1]
        slope = (self.table[b] - self.table[a]) / (b - a)
        return self.table[b] + slope * (total - b)

    def slowdown(self, batches) -> float:
        """How much slower than the table recent forwards ran: the median of measured / table
        over `batches` [(tokens, seconds)]; 1 when there are none."""
        ratios = [s * 1e3 / self.cost(t) for t, s in batches if t > 0]
        return statistics.median(ratios) if ratios else 1.0

    def hint(self, sessions: int, max_nodes: int) -> list[tuple[int, float]] | None:
        """[(n, ms of a round with n nodes)] when `sessions` (>= 2) share the forward; None for
        one session (the drafter's own model)."""
        if sessions < 2:
            return None
        return [(n, self.cost(sessions * n)) for n in HINT_SIZES if n <= max_nodes]
