"""`coralline bench pipeline`: the split verifier / drafter pipeline against the in-process engine.

Three modes on the same prompts, seeds and drafter, in ONE run, interleaved prompt by prompt
(the order rotates from prompt to prompt, so slow drift of the machine touches every mode alike):
  in_process     the engine (engine.py) with the drafter in this process, torch single-threaded
  split          `coralline drafter` and `coralline verifier` as separate OS processes on
                 loopback (CORALLINE_THREADS=1 each); this process is the client and calls the
                 verifier's Generation.Generate with token ids, so every side sees the same ids
  split_delayed  the same with `delay_ms` added per direction on the verifier <-> drafter link:
                 a second verifier whose drafter endpoint is a DelayProxy in this process
Per mode: tokens/s at the client (generated tokens / wall time of the generations, prefill
included), tau, mean tree nodes, draft wait and verify time per round, bytes on the drafter link
per round each way (RoundStats), the split modes' ratio to in-process, and whether each prompt's
tokens equal the in-process ones. Encode / decode cost per round is measured here by timing the
codec (rpc/codec.py) on the messages of the in-process run's rounds: the Open / Commit requests
(ids + [m, d] float32 features) and the Proposals (tree + draft rows) the link would carry.

Output: a JSON report (`main(out=...)`) and a markdown table on stdout. Figures come only from
this run; paths are written with report.display_path.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from coralline.bench.proxy import DelayProxy
from coralline.bench.report import display_path
from coralline.bench.wire import codec_costs
from coralline.rpc import codec
from coralline.rpc.process import ServerProcess
from coralline.rpc.protos import generation_pb2, generation_pb2_grpc
from coralline.sampling import SamplingParams

MODES = ("in_process", "split", "split_delayed")


@dataclass(frozen=True)
class PipelineConfig:
    model: str = "smollm2-135m-instruct"
    checkpoint: str | None = None  # CORAL head folder (default: the one shipped for the model)
    drafter: str = "coral"  # the same drafter in every mode
    prompts: int = 6
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy by default: every mode must give the same tokens
    delay_ms: float = 2.0  # split_delayed: added per direction on the drafter link
    seed: int = 0  # prompt i uses seed + i in every mode
    startup_timeout_s: float = 180.0  # per server process

    def __post_init__(self) -> None:
        from coralline.draft.registry import DRAFTERS

        if self.prompts < 1 or self.max_new_tokens < 1:
            raise ValueError("prompts and max_new_tokens must be >= 1")
        if self.temperature < 0 or self.delay_ms < 0:
            raise ValueError("temperature and delay_ms must be >= 0")
        if self.drafter not in DRAFTERS or self.drafter == "none":
            raise ValueError(
                f"drafter must be one of {', '.join(d for d in DRAFTERS if d != 'none')}"
            )

    @classmethod
    def quick(cls, **kw) -> PipelineConfig:
        """What the test runs: 2 prompts x 24 tokens."""
        return cls(**{"prompts": 2, "max_new_tokens": 24, **kw})


# ---------------------------------------------------------------------- one generation per mode
def _round(tree_nodes, accepted, draft_ms, verify_ms, fallback, bytes_to=None, bytes_from=None):
    return {
        "tree_nodes": int(tree_nodes),
        "accepted": int(accepted),
        "draft_ms": float(draft_ms),
        "verify_ms": float(verify_ms),
        "fallback": bool(fallback),
        "bytes_to": bytes_to,
        "bytes_from": bytes_from,
    }


def _engine_runner(engine) -> Callable[[list[int], SamplingParams], dict]:
    """The in-process engine; keeps each round's tree and draft rows for the codec timing."""
    trees: list = []
    engine.on_round = lambda tree, rows, draft_rows: trees.append((tree, draft_rows))

    def run(ids: list[int], params: SamplingParams) -> dict:
        trees.clear()
        t0 = time.perf_counter()
        out, rounds, summary = [], [], None
        for chunk in engine.generate(ids, params):
            out.extend(chunk.token_ids)
            s = chunk.stats
            rounds.append(_round(s.tree_nodes, s.accepted, s.draft_ms, s.verify_ms, s.fallback))
            summary = chunk.summary or summary
        seconds = time.perf_counter() - t0
        if summary is None:
            raise RuntimeError("the engine ended without a summary")
        return {
            "ids": out,
            "seconds": seconds,
            "rounds": rounds,
            "prefill_ms": summary.prefill_ms,
            "reconnects": 0,
            "messages": [(t, r, x["accepted"]) for (t, r), x in zip(trees, rounds, strict=True)],
        }

    return run


def _grpc_runner(address: str, drafter: str) -> tuple[Callable, Callable[[], None]]:
    """A client of the verifier's Generation service; returns (run, close)."""
    import grpc

    from coralline.rpc.server import channel_options

    channel = grpc.insecure_channel(address, options=channel_options())
    stub = generation_pb2_grpc.GenerationStub(channel)

    def run(ids: list[int], params: SamplingParams) -> dict:
        req = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=ids),
            max_new_tokens=params.max_new_tokens,
            drafter=drafter,
        )
        codec.sampling_to_pb(params, req.sampling)
        t0 = time.perf_counter()
        out, rounds, summary = [], [], None
        for resp in stub.Generate(req, timeout=600):
            out.extend(resp.token_ids)
            s = resp.stats
            rounds.append(
                _round(
                    s.tree_nodes,
                    s.accepted,
                    s.draft_ns / 1e6,
                    s.verify_ns / 1e6,
                    s.fallback,
                    s.bytes_to_drafter,
                    s.bytes_from_drafter,
                )
            )
            if resp.HasField("summary"):
                summary = resp.summary
        seconds = time.perf_counter() - t0
        if summary is None:
            raise RuntimeError(f"the verifier at {address} ended the stream without a summary")
        return {
            "ids": out,
            "seconds": seconds,
            "rounds": rounds,
            "prefill_ms": summary.prefill_ns / 1e6,
            "reconnects": summary.drafter_reconnects,
        }

    return run, channel.close


# ---------------------------------------------------------------------- aggregation
def _mode_stats(runs: list[dict]) -> dict:
    rounds = [r for run in runs for r in run["rounds"]]
    tokens = sum(len(run["ids"]) for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    n = max(len(rounds), 1)
    draft = sum(r["draft_ms"] for r in rounds)
    verify = sum(r["verify_ms"] for r in rounds)
    prefill = sum(run["prefill_ms"] for run in runs)
    out = {
        "generations": len(runs),
        "tokens": tokens,
        "seconds": round(seconds, 4),
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "rounds": len(rounds),
        "acceptance_length": 1.0 + sum(r["accepted"] for r in rounds) / n,
        "mean_tree_nodes": sum(r["tree_nodes"] for r in rounds) / n,
        "draft_ms_per_round": draft / n,  # split: waiting for the proposal (draft + network)
        "verify_ms_per_round": verify / n,
        "prefill_ms_per_generation": prefill / max(len(runs), 1),
        # client wall time that is neither prefill nor a round's draft / verify: streaming,
        # scheduling, detokenization
        "other_ms_per_round": (seconds * 1e3 - prefill - draft - verify) / n,
        "fallback_rounds": sum(r["fallback"] for r in rounds),
        "drafter_reconnects": sum(run["reconnects"] for run in runs),
        "bytes_to_drafter_per_round": None,
        "bytes_from_drafter_per_round": None,
        "steady_bytes_to_drafter_per_round": None,
        "steady_bytes_from_drafter_per_round": None,
    }
    if rounds and rounds[0]["bytes_to"] is not None:
        steady = [r for run in runs for r in run["rounds"][1:]] or rounds
        out.update(
            bytes_to_drafter_per_round=sum(r["bytes_to"] for r in rounds) / n,
            bytes_from_drafter_per_round=sum(r["bytes_from"] for r in rounds) / n,
            steady_bytes_to_drafter_per_round=statistics.fmean(r["bytes_to"] for r in steady),
            steady_bytes_from_drafter_per_round=statistics.fmean(r["bytes_from"] for r in steady),
        )
    return out


def _prompts(tokenizer, n: int) -> list[tuple[str, str]]:
    """(set, prompt) pairs: bench.py's prompt sets, taken round-robin across the sets."""
    from coralline.bench import side_by_side as bench

    sets, _ = bench.prompt_sets(tokenizer, bench.BenchConfig(prompts_per_set=n))
    out = []
    for i in range(n):
        out += [(name, ps[i]) for name, ps in sets.items() if i < len(ps)]
    return out[:n]


def _machine() -> dict:
    from coralline.bench import side_by_side as bench

    info = bench.machine(bench.BenchConfig())
    info.update(python=platform.python_version(), server_threads=1)
    return info


# ---------------------------------------------------------------------- the benchmark
def run(cfg: PipelineConfig, command: str = "") -> dict:
    from coralline.draft.registry import make_drafter, shipped_head
    from coralline.engine import Engine
    from coralline.target import TargetConfig, TargetRunner

    torch.set_num_threads(1)
    log_dir = Path(tempfile.mkdtemp(prefix="coralline-pipeline-"))
    servers: list[ServerProcess] = []
    closers: list[Callable[[], None]] = []
    proxy = DelayProxy(cfg.delay_ms / 1e3)
    common = ["--model", cfg.model]
    if cfg.checkpoint:
        common += ["--draft-checkpoint", cfg.checkpoint]
    try:
        proxy.start()
        drafter = ServerProcess("drafter", [*common, "--drafter", cfg.drafter], log_dir)
        servers.append(drafter)
        t_start = time.perf_counter()
        drafter_address = drafter.wait_ready(cfg.startup_timeout_s)
        proxy.upstream = drafter_address
        verifier_args = [
            "--model",
            cfg.model,
            "--drafter",
            cfg.drafter,
            "--drafter-endpoint",
        ]
        direct = ServerProcess("verifier", [*verifier_args, drafter_address], log_dir)
        servers.append(direct)
        delayed = ServerProcess("verifier", [*verifier_args, proxy.address], log_dir)
        servers.append(delayed)
        # the in-process side loads while the verifiers start
        runner = TargetRunner.load(TargetConfig(model=cfg.model))
        engine = Engine(runner, make_drafter(cfg.drafter, runner, cfg.checkpoint))
        prompts = _prompts(runner.tokenizer, cfg.prompts)
        encoded = [runner.encode(p) for _, p in prompts]
        addresses = {
            "split": direct.wait_ready(cfg.startup_timeout_s),
            "split_delayed": delayed.wait_ready(cfg.startup_timeout_s),
        }
        startup_s = time.perf_counter() - t_start
        runs: dict[str, Callable] = {"in_process": _engine_runner(engine)}
        for mode, address in addresses.items():
            runs[mode], close = _grpc_runner(address, cfg.drafter)
            closers.append(close)

        warm = SamplingParams(temperature=cfg.temperature, seed=cfg.seed, max_new_tokens=8)
        for mode in MODES:  # first-call costs (channels, drafter sessions) stay out of the figures
            runs[mode](encoded[0], warm)

        results: dict[str, list[dict]] = {m: [] for m in MODES}
        codec_input, per_prompt = [], []
        for i, ids in enumerate(encoded):
            params = SamplingParams(
                temperature=cfg.temperature, seed=cfg.seed + i, max_new_tokens=cfg.max_new_tokens
            )
            order = MODES[i % len(MODES) :] + MODES[: i % len(MODES)]
            for mode in order:
                results[mode].append(runs[mode](ids, params))
            ref = results["in_process"][-1]
            codec_input.append({"prompt": ids, "messages": ref.pop("messages")})
            row = {
                "set": prompts[i][0],
                "prompt_tokens": len(ids),
                "seed": params.seed,
                "tokens": len(ref["ids"]),
                "identical_split": results["split"][-1]["ids"] == ref["ids"],
                "identical_delayed": results["split_delayed"][-1]["ids"] == ref["ids"],
                **{f"{m}_tokens_per_second": _tps(results[m][-1]) for m in MODES},
            }
            per_prompt.append(row)
            print(
                f"pipeline bench: prompt {i + 1}/{len(encoded)} ({row['set']}, "
                f"{len(ids)} tokens): "
                + ", ".join(f"{m} {row[f'{m}_tokens_per_second']:.1f} tok/s" for m in MODES)
                + f"; identical {row['identical_split']} / {row['identical_delayed']}",
                file=sys.stderr,
                flush=True,
            )
        modes = {m: _mode_stats(results[m]) for m in MODES}
        base = modes["in_process"]["tokens_per_second"]
        ratios = {
            "split_over_in_process": modes["split"]["tokens_per_second"] / base,
            "delayed_over_in_process": modes["split_delayed"]["tokens_per_second"] / base,
        }
        hidden = int(runner.model.config.hidden_size)
        codec_report = codec_costs(codec_input, hidden, cfg.drafter, runner.vocab_size)
        proxy_stats = {
            "connections": proxy.connections,
            "bytes_to_drafter": proxy.bytes_up,
            "bytes_from_drafter": proxy.bytes_down,
        }
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()
        errors = []
        for server in reversed(servers):  # verifiers first, then the drafter
            code = server.stop()
            if code not in (0, None, -signal.SIGTERM):
                errors.append(f"{server.kind} exited with {code}: {server.stderr()[-1500:]}")
        proxy.close()
        shutil.rmtree(log_dir, ignore_errors=True)
    notes = [f"server exit: {e}" for e in errors]
    if cfg.temperature > 0:
        notes.append("T > 0: identical tokens are expected too (keyed randomness), not required")
    return {
        "what": f"split pipeline (drafter + verifier processes) vs in-process engine, {cfg.model}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": command,
        "machine": _machine(),
        "settings": {
            **asdict(cfg),
            "checkpoint": display_path(cfg.checkpoint or shipped_head(cfg.model) or ""),
            "modes": list(MODES),
            "server_startup_s": round(startup_s, 2),
        },
        "modes": modes,
        "ratios": ratios,
        "split_at_least_90_percent": ratios["split_over_in_process"] >= 0.9,
        "identical": {
            "split": [r["identical_split"] for r in per_prompt],
            "delayed": [r["identical_delayed"] for r in per_prompt],
            "all": all(r["identical_split"] and r["identical_delayed"] for r in per_prompt),
        },
        "codec": codec_report,
        "delay_proxy": proxy_stats,
        "per_prompt": per_prompt,
        "notes": notes,
    }


def _tps(res: dict) -> float:
    return len(res["ids"]) / res["seconds"] if res["seconds"] > 0 else 0.0


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    s, m, c = report["settings"], report["machine"], report["codec"]
    ident = report["identical"]
    lines = [
        f"# coralline bench pipeline: {report['what']}",
        "",
        f"- date: {report['date']}; command: `{report['command']}`",
        f"- machine: {m['cpu']} ({m['cores']} cores), torch {m['torch']}, 1 thread per "
        f"process; {m['platform']}",
        f"- {s['prompts']} prompts x {s['max_new_tokens']} new tokens, T = {s['temperature']:g}, "
        f"drafter {s['drafter']}, delay {s['delay_ms']:g} ms per direction (split_delayed)",
        "",
        "| mode | tokens/s | vs in-process | tau | tree nodes | draft ms/round "
        "| verify ms/round | other ms/round | bytes to / from drafter per round | identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = report["modes"]["in_process"]["tokens_per_second"]
    for mode, r in report["modes"].items():
        same = {"in_process": "-", "split": ident["split"], "split_delayed": ident["delayed"]}[mode]
        same = same if same == "-" else f"{sum(same)}/{len(same)}"
        wire = "-"
        if r["bytes_to_drafter_per_round"] is not None:
            wire = (
                f"{r['bytes_to_drafter_per_round']:.0f} / {r['bytes_from_drafter_per_round']:.0f}"
            )
        lines.append(
            f"| {mode} | {r['tokens_per_second']:.1f} | {r['tokens_per_second'] / base:.2f} "
            f"| {r['acceptance_length']:.2f} | {r['mean_tree_nodes']:.1f} "
            f"| {r['draft_ms_per_round']:.2f} | {r['verify_ms_per_round']:.2f} "
            f"| {r['other_ms_per_round']:.2f} | {wire} | {same} |"
        )
    if c:
        t, f = c["to_drafter"], c["from_drafter"]
        lines += [
            "",
            f"Codec per round (timed here, {c['rounds_timed']} rounds, mean "
            f"{c['mean_feature_rows']:.1f} feature rows x {c['hidden_size']}, "
            f"{c['mean_tree_nodes']:.1f} tree nodes): to drafter encode "
            f"{t['encode_ms_per_round']:.3f} / decode {t['decode_ms_per_round']:.3f} ms "
            f"(Commit only {t['steady_encode_ms_per_round']:.3f} / "
            f"{t['steady_decode_ms_per_round']:.3f}); from drafter encode "
            f"{f['encode_ms_per_round']:.3f} / decode {f['decode_ms_per_round']:.3f} ms.",
        ]
    lines += [
        "",
        "draft ms/round: split modes = waiting for the proposal (drafting + link). other: "
        "client wall time outside prefill and rounds (streaming, scheduling).",
    ]
    if report["notes"]:
        lines += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines)


def main(
    out: str | None,
    quick: bool = False,
    prompts: int | None = None,
    max_new_tokens: int | None = None,
    delay_ms: float = 2.0,
    drafter: str = "coral",
    temperature: float = 0.0,
    model: str | None = None,
    checkpoint: str | None = None,
    command: str = "",
) -> dict:
    given = {
        "prompts": prompts,
        "max_new_tokens": max_new_tokens,
        "model": model,
        "checkpoint": checkpoint,
    }
    kw = {k: v for k, v in given.items() if v is not None}
    kw.update(delay_ms=delay_ms, drafter=drafter, temperature=temperature)
    cfg = (PipelineConfig.quick if quick else PipelineConfig)(**kw)
    report = run(cfg, command=command)
    print(markdown(report))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
        print(f"wrote {display_path(Path(out).resolve())}")
    return report


__all__ = ["MODES", "DelayProxy", "PipelineConfig", "codec_costs", "main", "markdown", "run"]
