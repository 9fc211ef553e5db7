"""`coralline reliability` (`make reliability`): fuzzing, faults under load and a soak test on
the real stack on loopback; -> reliability.json and reliability.md (docs/reliability.md).

The stack: a Redis server of its own, `coralline serve`'s Stack with 2 drafters, 2 verifiers
and 2 router replicas (sessions in that Redis), limits set (prompts over 512 tokens refused).
Stages, in order (each bounded in time and count; every process on 127.0.0.1):
  fuzz     fuzz.py against the public port, one verifier (requests, and Proposals from a
           fuzzing drafter), one drafter; then no session left on any worker or in the store
  faults   under a closed-loop load of greedy requests: SIGKILL of a verifier, of a drafter,
           of a router replica; Redis killed and restarted; latency + jitter on a drafter link.
           Per fault: requests completed / failed, tokens lost or duplicated against the
           target's own greedy output (must be 0), time to recover
  soak     `soak_clients` streaming clients for `soak_s` seconds: error rate, latency p50 /
           p99, tokens/s, each process's memory before and after

Knows how to start and break the stack; the checks' details live in fuzz.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROMPTS = [
    "Write a haiku about the sea.",
    "List three uses of a paperclip, one per line.",
    "请用三句话介绍一下长城。",
    "Explain in two sentences why the sky is blue.",
    "Name five fruits and their colours.",
    "把下面这句话翻译成英文：我今天很高兴见到你。",
    "Give me a short tip for learning to cook.",
    "What is the capital of France? Answer in one word.",
]


@dataclass(frozen=True)
class ReliabilityConfig:
    model: str = "smollm2-135m-instruct"
    draft_checkpoint: str | None = None
    fuzz_messages: int = 2000  # per API (public, verifier, drafter) and Proposals to a verifier
    fault_clients: int = 4  # the load each fault is injected under
    fault_window_s: float = 8.0  # load after each fault before it is judged
    soak_clients: int = 16
    soak_s: float = 120.0
    max_new_tokens: int = 24  # each load request (greedy)
    stages: tuple[str, ...] = ("fuzz", "faults", "soak")
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in ("fuzz", "faults", "soak")]
        if bad:
            raise ValueError(f"unknown stages {bad}; choose from fuzz, faults, soak")
        if min(self.fuzz_messages, self.fault_clients, self.soak_clients) < 1:
            raise ValueError("fuzz_messages, fault_clients and soak_clients must be >= 1")
        if self.soak_s <= 0 or self.fault_window_s <= 0 or self.max_new_tokens < 1:
            raise ValueError("soak_s and fault_window_s must be > 0, max_new_tokens >= 1")

    @classmethod
    def quick(cls, **kw) -> ReliabilityConfig:
        """The CI subset: every stage, smaller and shorter."""
        base = {"fuzz_messages": 100, "fault_clients": 2, "fault_window_s": 3.0,
                "soak_clients": 4, "soak_s": 8.0, "max_new_tokens": 12}  # fmt: skip
        base.update(kw)
        return cls(**base)


def _log(msg: str) -> None:
    print(f"reliability: {msg}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server of the harness's own (127.0.0.1, no persistence) it can kill and restart
    on the same port."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make servers installs it)")
        self.port = _free_port()
        self.argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", str(folder)]  # fmt: skip
        self.log = folder / "redis.log"
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {self.log}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


# ---------------------------------------------------------------------- requests under load
@dataclass
class Outcome:
    prompt: int
    ok: bool
    code: str = "OK"
    tokens: list[int] = field(default_factory=list)
    started: float = 0.0
    first_token_s: float | None = None
    seconds: float = 0.0
    failovers: int = 0


def _one(client, prompt: int, max_new: int) -> Outcome:
    from coralline.client.errors import CorallineError

    out = Outcome(prompt, ok=False, started=time.perf_counter())
    try:
        for chunk in client.stream(PROMPTS[prompt], max_new_tokens=max_new):
            if out.first_token_s is None:
                out.first_token_s = time.perf_counter() - out.started
            out.tokens.extend(chunk.token_ids)
            if chunk.summary is not None:
                out.failovers = chunk.summary.failovers
        out.ok = True
    except CorallineError as e:
        out.code = e.code.name
    out.seconds = time.perf_counter() - out.started
    return out


class Load:
    """`clients` threads sending greedy requests (prompts in turn) until stopped."""

    def __init__(self, address: str, clients: int, max_new: int, token: str | None = None):
        from coralline.client import Client

        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients = [
            Client(address, token=token, timeout=120, retries=3) for _ in range(clients)
        ]
        self._threads = [
            threading.Thread(target=self._loop, args=(i, c, max_new), daemon=True)
            for i, c in enumerate(self._clients)
        ]

    def _loop(self, i: int, client, max_new: int) -> None:
        n = i
        while not self._stop.is_set():
            out = _one(client, n % len(PROMPTS), max_new)
            n += len(self._clients)
            with self._lock:
                self.outcomes.append(out)
            if not out.ok:
                time.sleep(0.2)  # a refused request backs off a little

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(180)
        for c in self._clients:
            c.close()
        return list(self.outcomes)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def _judge(outcomes: list[Outcome], reference: dict[int, list[int]]) -> dict:
    """Completed / failed requests and tokens lost / duplicated against the greedy reference
    (a completed request must carry exactly its reference tokens)."""
    done = [o for o in outcomes if o.ok]
    lost = dup = wrong = 0
    for o in done:
        ref = reference[o.prompt]
        if o.tokens == ref:
            continue
        if len(o.tokens) < len(ref) and ref[: len(o.tokens)] == o.tokens:
            lost += len(ref) - len(o.tokens)
        elif len(o.tokens) > len(ref) and o.tokens[: len(ref)] == ref:
            dup += len(o.tokens) - len(ref)
        else:
            wrong += 1
    codes: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            codes[o.code] = codes.get(o.code, 0) + 1
    return {
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "failed_codes": codes,
        "tokens_lost": lost,
        "tokens_duplicated": dup,
        "outputs_differing": wrong,
        "failovers": sum(o.failovers for o in done),
    }


# ---------------------------------------------------------------------- the harness
class Harness:
    def __init__(self, cfg: ReliabilityConfig, progress: Callable[[str], None] = _log) -> None:
        self.cfg = cfg
        self.log = progress
        self.folder = Path(tempfile.mkdtemp(prefix="coralline-reliability-"))
        self.redis = RedisServer(self.folder)
        self.stack = None
        self.reference: dict[int, list[int]] = {}

    def start(self) -> None:
        from coralline.router.app import ReplicaConfig
        from coralline.router.stack import Stack, StackConfig

        self.redis.start()
        cfg = self.cfg
        self.stack = Stack(
            StackConfig(
                port=0,
                http_port=0,
                drafters=2,
                verifiers=2,
                redis=self.redis.url,
                model=cfg.model,
                draft_checkpoint=cfg.draft_checkpoint,
                replicas=ReplicaConfig(routers=2),
                log_dir=str(self.folder),
                telemetry=False,
                # limits: the fuzz's huge prompts and default-length requests are refused
                router_options=(
                    ("max_prompt_tokens", 512),
                    ("max_new_tokens", 64),
                    ("queue_timeout_s", 30.0),
                ),
                verifier_extra=("--max-prompt-tokens", "512", "--max-new-tokens", "64"),
            )
        )
        t0 = time.perf_counter()
        self.stack.start()
        self.log(f"stack up in {time.perf_counter() - t0:.0f} s at {self.stack.address}")
        self._references()

    def _references(self) -> None:
        """Each prompt's greedy output through the healthy stack, plain decoding (the target's
        own greedy output: what every fault-time request must equal)."""
        from coralline.client import Client

        with Client(self.stack.address, timeout=300) as c:
            for i, p in enumerate(PROMPTS):
                r = c.generate(p, max_new_tokens=self.cfg.max_new_tokens, drafter="none")
                self.reference[i] = list(r.token_ids)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        self.redis.stop()

    # ------------------------------------------------------------------ fuzz
    def fuzz(self) -> dict:
        import asyncio

        import grpc

        from coralline.reliability import fuzz
        from coralline.rpc.protos import drafter_pb2, drafter_pb2_grpc, verifier_pb2
        from coralline.rpc.server import Server, ServerOptions, channel_options

        cfg, stack = self.cfg, self.stack
        n = cfg.fuzz_messages
        out = {}
        front = grpc.insecure_channel(stack.address, options=channel_options())
        verifier = grpc.insecure_channel(stack.verifiers[0].address, options=channel_options())
        drafter = grpc.insecure_channel(stack.drafters[0].address, options=channel_options())
        info = verifier_pb2.VerifierInfo.FromString(
            verifier.unary_unary("/coralline.v1.VerifierService/Info")(
                verifier_pb2.VerifierInfoRequest().SerializeToString(), timeout=10
            )
        )
        vocab = info.vocab_size
        dinfo = drafter_pb2.DrafterInfo.FromString(
            drafter.unary_unary("/coralline.v1.DrafterService/Info")(
                drafter_pb2.DrafterInfoRequest().SerializeToString(), timeout=10
            )
        )
        from coralline import models

        hidden = models.load_token_weights(cfg.model).hidden_size
        self.log(f"fuzz: {n} messages per API")
        out["public"] = fuzz.run_unary_api(
            "public", front, lambda r: fuzz.public_case(r, vocab), n, cfg.seed
        ).as_dict()
        self.log(f"fuzz public: {out['public']['codes']}")
        out["verifier"] = fuzz.run_unary_api(
            "verifier",
            verifier,
            lambda r: fuzz.verifier_case(r, vocab, stack.drafters[0].address),
            n,
            cfg.seed,
        ).as_dict()
        self.log(f"fuzz verifier: {out['verifier']['codes']}")
        out["drafter"] = fuzz.run_drafter_api(
            drafter, vocab, hidden, dinfo.target_fingerprint, n, cfg.seed
        ).as_dict()
        self.log(f"fuzz drafter: {out['drafter']['codes']}")

        # Proposals: a fuzzing drafter on its own loop; greedy sessions through verifier 0
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        servicer = fuzz.FuzzDrafter(vocab, cfg.seed)

        async def start():
            server = Server(ServerOptions(), ["coralline.v1.DrafterService"])
            drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server.server)
            await server.start()
            return server

        server = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        try:
            out["proposals"] = fuzz.run_proposals(verifier, server.address, servicer, n, cfg.seed)
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
        self.log(f"fuzz proposals: {out['proposals']}")
        # nothing left behind, everything still up
        sessions = 0
        for v in stack.verifiers:
            with grpc.insecure_channel(v.address) as ch:
                sessions += fuzz.verifier_sessions(ch)
        left = {
            "verifier_sessions": sessions,
            "running_records": len(self._store().running()),
            "all_up": all(p.alive() for p in [*stack.drafters, *stack.verifiers])
            and fuzz.healthy(front),
        }
        out["after"] = left
        for ch in (front, verifier, drafter):
            ch.close()
        return out

    def _store(self):
        from coralline.session_redis import RedisSessionStore

        return RedisSessionStore(self.redis.url)

    # ------------------------------------------------------------------ faults
    def faults(self) -> dict:
        from coralline.bench.proxy import DelayProxy
        from coralline.rpc.process import ServerProcess

        stack, cfg = self.stack, self.cfg
        results = {}

        def under_load(name: str, inject: Callable[[], None], recover=None) -> None:
            load = Load(stack.address, cfg.fault_clients, cfg.max_new_tokens).start()
            time.sleep(cfg.fault_window_s / 2)
            t_fault = time.perf_counter()
            inject()
            recovery = self._recovery(t_fault)
            time.sleep(cfg.fault_window_s / 2)
            outcomes = load.stop()
            res = _judge(outcomes, self.reference)
            res["recovery_s"] = recovery
            results[name] = res
            self.log(f"fault {name}: {res}")
            if recover is not None:
                recover()

        def kill_verifier() -> None:
            victim = stack.verifiers.pop(0)
            victim.kill()

        under_load("verifier SIGKILL", kill_verifier)

        def kill_drafter() -> None:
            stack.drafters[0].kill()

        under_load("drafter SIGKILL", kill_drafter)

        def kill_router() -> None:
            pids = sorted(_replica_pids().values())
            if not pids:
                raise RuntimeError("no router replica process found")
            os.kill(pids[0], signal.SIGKILL)

        under_load("router replica SIGKILL", kill_router)

        def kill_redis() -> None:
            self.redis.kill()
            time.sleep(1.0)
            self.redis.start()

        under_load("redis killed and restarted", kill_redis)

        # latency + jitter on a drafter link: a verifier of its own behind a proxy
        proxy = DelayProxy(0.02, stack.drafters[-1].address, jitter_s=0.03).start()
        solo = ServerProcess(
            "verifier",
            ["--model", cfg.model, "--drafter-endpoint", proxy.address],
            self.folder,
        )
        try:
            solo.wait_ready(300)
            load = Load(solo.address, cfg.fault_clients, cfg.max_new_tokens).start()
            time.sleep(cfg.fault_window_s)
            res = _judge(load.stop(), self.reference)
            res["delay_ms"], res["jitter_ms"] = 20, 30
            results["drafter link +20 ms, jitter 30 ms"] = res
            self.log(f"fault latency: {res}")
        finally:
            solo.stop()
            proxy.close()
        return results

    def _recovery(self, t_fault: float, limit_s: float = 60.0) -> float | None:
        """Seconds from the fault until a new request completes."""
        from coralline.client import Client

        with Client(self.stack.address, timeout=60, retries=0) as c:
            while time.perf_counter() - t_fault < limit_s:
                out = _one(c, 0, 4)
                if out.ok:
                    return round(time.perf_counter() - t_fault, 2)
                time.sleep(0.1)
        return None

    # ------------------------------------------------------------------ soak
    def soak(self) -> dict:
        cfg, stack = self.cfg, self.stack
        pids = {f"{p.kind} {p.address}": p.pid for p in [*stack.drafters, *stack.verifiers]}
        pids["front + driver"] = os.getpid()
        pids.update(_replica_pids())
        warm = Load(stack.address, cfg.soak_clients, cfg.max_new_tokens).start()
        time.sleep(min(10.0, cfg.soak_s / 4))  # warm-up: caches and pools reach their size
        warm.stop()
        start = _rss(pids)
        load = Load(stack.address, cfg.soak_clients, cfg.max_new_tokens).start()
        t0 = time.perf_counter()
        time.sleep(cfg.soak_s / 2)
        # the leak check runs over the second half: a verifier's KV pool is reserved address
        # space that becomes resident as sessions first touch its slots (24 slots, retained
        # caches rotating among them), which the first half brings to its working size
        before = _rss(pids)
        time.sleep(cfg.soak_s / 2)
        outcomes = load.stop()
        wall = time.perf_counter() - t0
        after = _rss(pids)
        ok = [o for o in outcomes if o.ok]
        latency = [o.seconds for o in ok]
        ttft = [o.first_token_s for o in ok if o.first_token_s is not None]
        memory = {
            k: {"start_mb": start.get(k), "before_mb": before[k], "after_mb": after.get(k),
                "growth": (after[k] - before[k]) / before[k] if after.get(k) else None}
            for k in before
        }  # fmt: skip
        res = _judge(outcomes, self.reference)
        res.update({
            "clients": cfg.soak_clients,
            "seconds": round(wall, 1),
            "error_rate": (len(outcomes) - len(ok)) / len(outcomes) if outcomes else None,
            "latency_p50_s": _percentile(latency, 0.5),
            "latency_p99_s": _percentile(latency, 0.99),
            "ttft_p50_s": _percentile(ttft, 0.5),
            "ttft_p99_s": _percentile(ttft, 0.99),
            "tokens_per_s": sum(len(o.tokens) for o in ok) / wall,
            "memory": memory,
            "max_growth": max((m["growth"] for m in memory.values() if m["growth"] is not None),
                              default=None),
        })  # fmt: skip
        self.log(f"soak: {res['completed']} requests, error rate {res['error_rate']}")
        return res


def _replica_pids() -> dict[str, int]:
    import psutil

    out = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "ServeReplica" in cmd and "Router" in cmd:
            out[f"router replica {p.info['pid']}"] = p.info["pid"]
    return out


def _rss(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            out[name] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
    return out


def run(cfg: ReliabilityConfig, command: str = "") -> dict:
    from coralline.bench.pipeline import _machine

    harness = Harness(cfg)
    report: dict = {
        "report": "reliability",
        "date": time.strftime("%Y-%m-%d"),
        "command": command,
        "machine": _machine(),
        "config": asdict(cfg),
    }
    t0 = time.perf_counter()
    try:
        harness.start()
        for stage in cfg.stages:
            t = time.perf_counter()
            report[stage] = getattr(harness, stage)()
            report[f"{stage}_seconds"] = round(time.perf_counter() - t, 1)
    finally:
        harness.stop()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> dict:
    """What must hold, each as a named boolean (all true: the run passed)."""
    checks = {}
    fz = report.get("fuzz")
    if fz:
        for api in ("public", "verifier", "drafter"):
            checks[f"fuzz {api}: every answer expected"] = fz[api]["unexpected"] == 0
            checks[f"fuzz {api}: >= messages asked"] = (
                fz[api]["messages"] >= report["config"]["fuzz_messages"]
            )
        p = fz["proposals"]
        checks["fuzz proposals: outputs equal plain decoding"] = (
            p["outputs_differing_from_plain"] == 0 and p["failed_sessions"] == 0
        )
        checks["fuzz: no session left, all up"] = (
            fz["after"]["verifier_sessions"] == 0
            and fz["after"]["running_records"] == 0
            and fz["after"]["all_up"]
        )
    for name, res in (report.get("faults") or {}).items():
        checks[f"fault {name}: no token lost or duplicated"] = (
            res["tokens_lost"] == 0 and res["tokens_duplicated"] == 0
            and res["outputs_differing"] == 0
        )  # fmt: skip
        checks[f"fault {name}: requests completed"] = res["completed"] > 0
    soak = report.get("soak")
    if soak:
        checks["soak: outputs exact"] = soak["tokens_lost"] == 0 and soak["outputs_differing"] == 0
        checks["soak: error rate 0"] = soak["error_rate"] == 0
        growth = soak["max_growth"]
        checks["soak: memory growth < 5%"] = growth is not None and growth < 0.05
    return {"passed": all(checks.values()), "checks": checks}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# Reliability ({report['date']})",
        "",
        f"Machine: {m.get('cpu', '?')}, {m.get('threads', '?')} threads. Command: "
        f"`{report.get('command') or 'coralline reliability'}`. Total {report['seconds']:.0f} s.",
        "",
        f"Verdict: **{'passed' if report['verdict']['passed'] else 'FAILED'}**",
        "",
        "| check | |",
        "|---|---|",
    ]
    lines += [
        f"| {k} | {'yes' if v else '**no**'} |" for k, v in report["verdict"]["checks"].items()
    ]
    fz = report.get("fuzz")
    if fz:
        lines += ["", "## Fuzzing", "", "| API | messages | answers by status | unexpected | s |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for api in ("public", "verifier", "drafter"):
            t = fz[api]
            codes = ", ".join(f"{k} {v}" for k, v in t["codes"].items())
            lines.append(
                f"| {api} | {t['messages']} | {codes} | {t['unexpected']} | {t['seconds']:.0f} |"
            )
        p = fz["proposals"]
        lines += [
            "",
            f"Proposals from a fuzzing drafter: {p['proposals']} in {p['sessions']} greedy "
            f"sessions; {p['fallback_rounds']} fallback rounds; outputs differing from plain "
            f"decoding: {p['outputs_differing_from_plain']}; failed sessions: "
            f"{p['failed_sessions']}.",
            f"After the fuzz: {fz['after']['verifier_sessions']} verifier sessions, "
            f"{fz['after']['running_records']} running records in the store, every process up: "
            f"{fz['after']['all_up']}.",
        ]
        for api in ("public", "verifier", "drafter"):
            for ex in fz[api]["examples"][:5]:
                lines.append(f"- unexpected ({api}): `{ex}`")
    faults = report.get("faults")
    if faults:
        lines += [
            "",
            "## Faults under load",
            "",
            "| fault | requests | completed | failed (codes) | tokens lost | duplicated | "
            "outputs differing | recovery s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in faults.items():
            codes = ", ".join(f"{k} {v}" for k, v in r["failed_codes"].items()) or "-"
            rec = r.get("recovery_s")
            lines.append(
                f"| {name} | {r['requests']} | {r['completed']} | {r['failed']} ({codes}) | "
                f"{r['tokens_lost']} | {r['tokens_duplicated']} | {r['outputs_differing']} | "
                f"{'-' if rec is None else rec} |"
            )
    soak = report.get("soak")
    if soak:
        lines += [
            "",
            "## Soak",
            "",
            f"{soak['clients']} streaming clients for {soak['seconds']:.0f} s: "
            f"{soak['requests']} requests, error rate {soak['error_rate']:.3f}, latency p50 "
            f"{_s(soak['latency_p50_s'])} / p99 {_s(soak['latency_p99_s'])}, TTFT p50 "
            f"{_s(soak['ttft_p50_s'])} / p99 {_s(soak['ttft_p99_s'])}, "
            f"{soak['tokens_per_s']:.1f} tokens/s.",
            "",
            "RSS at the soak's start, at half time and at the end; the leak check is the growth "
            "over the second half (the first half brings the verifiers' KV pools, reserved "
            "address space touched slot by slot, to their working size):",
            "",
            "| process | start MB | half time MB | end MB | growth, second half |",
            "|---|---|---|---|---|",
        ]
        for k, v in soak["memory"].items():
            g = v["growth"]
            lines.append(
                f"| {k} | {v.get('start_mb')} | {v['before_mb']} | {v['after_mb']} | "
                f"{'-' if g is None else f'{g:+.1%}'} |"
            )
    return "\n".join(lines) + "\n"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def save(report: dict, out: str | Path) -> tuple[Path, Path]:
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    j, md = out / "reliability.json", out / "reliability.md"
    j.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(markdown(report))
    return j, md
