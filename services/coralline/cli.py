"""The `coralline` command. Thin: parses arguments, calls library functions, prints results.

Input errors end with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from coralline.draft.registry import DRAFTERS

SPECULATION = ("budget", "measured", "adaptive", "always")  # coralline verifier --speculation


def _params(args: argparse.Namespace):
    from coralline.sampling import SamplingParams

    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )


def _engine(model: str, drafter: str | None, verifier: str | None, checkpoint: str | None):
    from coralline.draft.registry import check_name, default_drafter, make_drafter
    from coralline.engine import Engine, EngineConfig
    from coralline.target import TargetConfig, TargetRunner

    drafter = drafter or default_drafter(model)
    check_name(drafter)
    config = EngineConfig(verifier=verifier)  # validates the names before the model loads
    target = TargetRunner.load(TargetConfig(model=model))
    return Engine(target, make_drafter(drafter, target, checkpoint), config)


def _remote_chunks(args: argparse.Namespace):
    """Chunks from a running coralline server (the client SDK; no torch is imported)."""
    from coralline.client import Client, CorallineError

    if args.draft_checkpoint or args.model != "smollm2-135m-instruct":
        raise ValueError("--model and --draft-checkpoint belong to the servers with --endpoint")
    try:
        root = Path(args.ca).read_bytes() if args.ca else None
        client_cert = None
        if args.client_cert or args.client_key:
            if not (args.client_cert and args.client_key):
                raise ValueError("--client-cert and --client-key go together")
            client_cert = (Path(args.client_cert).read_bytes(), Path(args.client_key).read_bytes())
        token = os.environ.get("CORALLINE_TOKEN")
        with Client(
            args.endpoint, token=token, root_certificates=root, client_cert=client_cert
        ) as client:
            yield from client.stream(
                args.prompt,
                chat_template=not args.no_chat,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p if args.top_p != 1.0 else None,
                seed=args.seed,
                stop=tuple(args.stop or ()),
                drafter=args.drafter,
                verifier=args.verifier,
                ignore_eos=args.ignore_eos,
            )
    except CorallineError as e:
        raise ValueError(f"{args.endpoint}: {e}") from None


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.endpoint:
        chunks = _remote_chunks(args)
    else:
        params = _params(args)
        engine = _engine(args.model, args.drafter, args.verifier, args.draft_checkpoint)
        ids = engine.target.encode(args.prompt, chat=not args.no_chat)
        chunks = engine.generate(ids, params)
    token_ids, text, summary = [], [], None
    for chunk in chunks:
        token_ids.extend(chunk.token_ids)
        text.append(chunk.text)
        if not args.json:
            print(chunk.text, end="", flush=True)
        summary = chunk.summary or summary
    if summary is None:
        raise RuntimeError("the generation ended without a summary")
    stats = {
        "rounds": summary.rounds,
        "tokens": summary.tokens,
        "acceptance_length": round(summary.acceptance_length, 4),
        "tokens_per_second": round(summary.tokens_per_second, 3),
        "draft_ms": round(summary.draft_ms, 1),
        "verify_ms": round(summary.verify_ms, 1),
        "prefill_ms": round(summary.prefill_ms, 1),
        "finish_reason": summary.finish_reason,
        "verifier": summary.verifier,
        "drafter": summary.drafter,
    }
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids, "stats": stats}))
    else:
        print()
        print(" ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)
    return 0


def _serve(run) -> int:
    """Run a server coroutine; log one line per session event to stderr."""
    import asyncio

    import torch

    from coralline.threads import one_thread_here

    torch.set_num_threads(int(os.environ.get("CORALLINE_THREADS", "1")))
    one_thread_here()  # the event loop's thread: the compute runs elsewhere (threads.py)
    logging.basicConfig(
        level=os.environ.get("CORALLINE_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    asyncio.run(run(ready=lambda line: print(line, flush=True)))
    return 0


def _server_options(args: argparse.Namespace):
    from coralline.rpc.server import MiB, ServerOptions

    return ServerOptions(
        host=args.host,
        port=args.port,
        max_message_bytes=args.max_message_mb * MiB,
        registry=args.registry,
        advertise=args.advertise,
        tls=_tls(args),
        api_tokens=_tokens(args),
    )


def _tls(args: argparse.Namespace):
    """--tls-dir (the `coralline certs` layout) or --tls-cert / --tls-key [/ --tls-ca]."""
    from coralline.rpc.security import TlsConfig

    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if args.tls_dir:
        if any(files):
            raise ValueError("--tls-dir and --tls-cert / --tls-key / --tls-ca exclude each other")
        return TlsConfig.from_dir(args.tls_dir, "server", args.tls_server_name)
    if not any(files):
        return None
    if not (args.tls_cert and args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key (--tls-ca for mutual TLS)")
    return TlsConfig(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name)


def _tokens(args: argparse.Namespace) -> frozenset[str]:
    from coralline.rpc.security import load_tokens

    return load_tokens(getattr(args, "api_tokens_file", None))


def _cmd_drafter(args: argparse.Namespace) -> int:
    from functools import partial

    from coralline.rpc.drafter_server import DrafterServiceConfig, serve

    config = DrafterServiceConfig(
        model=args.model,
        default_drafter=args.drafter,
        checkpoint=args.draft_checkpoint,
        device=args.device,
        dtype=args.dtype,
        max_sessions=args.max_sessions,
        idle_timeout_s=args.idle_timeout,
        workers=args.workers,
        metrics_port=args.metrics_port,
        pipeline=args.pipeline,
        batch=not args.no_batch,
        batch_wait_ms=args.batch_wait_ms,
        server=_server_options(args),
    )
    return _serve(partial(serve, config))


def _cmd_verifier(args: argparse.Namespace) -> int:
    from functools import partial

    from coralline.rpc.verifier_server import VerifierServiceConfig, serve

    if args.no_drafter and args.drafter_endpoint:
        raise ValueError("--no-drafter and --drafter-endpoint exclude each other")
    if not args.no_drafter and not args.drafter_endpoint:
        raise ValueError("give --drafter-endpoint HOST:PORT, or --no-drafter for plain decoding")
    config = VerifierServiceConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        drafter_endpoint=args.drafter_endpoint,
        default_drafter="none" if args.no_drafter else args.drafter,
        max_sessions=args.max_sessions,
        max_tree_nodes=args.max_tree_nodes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        round_timeout_s=args.round_timeout,
        retain_sessions=args.retain_sessions,
        retain_tokens=args.retain_tokens,
        sessions_url=args.sessions,
        metrics_port=args.metrics_port,
        batching=None if args.no_batching else _batch_config(args),
        adaptive_budget=args.speculation != "always",
        plain_switch=args.speculation == "adaptive",
        measured_switch=args.speculation == "measured",
        server=_server_options(args),
    )
    return _serve(partial(serve, config))


def _batch_config(args: argparse.Namespace):
    from coralline.batching.scheduler import BatchConfig

    return BatchConfig(
        slots=args.kv_slots or args.max_sessions + args.retain_sessions,
        slot_tokens=args.kv_slot_tokens,
        max_batch_tokens=args.max_batch_tokens,
        prefill_chunk=args.prefill_chunk,
        max_wait_ms=args.batch_wait_ms,
        adaptive_wait=not args.fixed_batch_wait,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from coralline.router.stack import run

    logging.basicConfig(
        level=os.environ.get("CORALLINE_LOG", "WARNING"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return run(_stack_config(args), ready=lambda line: print(line, flush=True))


def _stack_config(args: argparse.Namespace):
    """The StackConfig of `coralline serve`'s arguments."""
    from coralline.router.app import ReplicaConfig
    from coralline.router.stack import StackConfig

    speculation = ("--speculation", args.speculation) if args.speculation else ()
    return StackConfig(
        port=args.port,
        host=args.host,
        drafters=args.drafters,
        verifiers=args.verifiers,
        redis=args.redis,
        model=args.model,
        draft_checkpoint=args.draft_checkpoint,
        device=args.device,
        max_sessions=args.max_sessions,
        verifier_threads=args.verifier_threads,
        ingress=args.ingress,
        replicas=ReplicaConfig(routers=args.routers, autoscale_max=args.autoscale_max),
        log_dir=args.log_dir,
        telemetry=not args.no_telemetry,
        dashboard_port=args.dashboard_port,
        trace_file=args.trace_file,
        tls_dir=args.tls_dir,
        api_tokens=_tokens(args),
        router_options=tuple(_key_value(o) for o in args.router_option or ()),
        http_port=None if args.http_port == -1 else args.http_port,
        verifier_extra=speculation,
    )


def _key_value(option: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON when it parses (numbers, true/false), else a string."""
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise ValueError(f"--router-option takes KEY=VALUE, got {option!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _cmd_trace_report(args: argparse.Namespace) -> int:
    from coralline.telemetry import report

    return report.main(
        args.file, png=args.png, trace=args.trace, as_json=args.json, rounds=not args.no_rounds
    )


def _cmd_demo(args: argparse.Namespace) -> int:
    from coralline import demo

    run = demo.run_in_process if args.in_process else demo.run_stack
    run(args.prompt, args.max_new_tokens, args.drafter)
    return 0


def _cmd_exact(args: argparse.Namespace) -> int:
    from coralline.eval import toy

    toy.run()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "all":
        from coralline.bench import report
        from coralline.bench import side_by_side as bench

        cfg = (bench.BenchConfig.quick if args.quick else bench.BenchConfig)(
            **{
                k: v
                for k, v in {
                    "model": args.model,
                    "checkpoint": args.draft_checkpoint,
                    "assistant": args.assistant,
                    "prompts_per_set": args.prompts_per_set,
                    "max_new_tokens": args.max_new_tokens,
                    "t1_seeds": args.t1_seeds,
                    "ifeval_data": args.ifeval_data,
                    "device": args.device,
                    "threads": args.threads,
                }.items()
                if v is not None
            }
        )
        rep = bench.run(cfg, command="coralline " + " ".join(sys.argv[1:]))
        print(report.markdown(rep).split("\n![")[0])
        for path in report.write(rep, args.out or "bench/out"):
            print(f"wrote {path}")
    elif args.what == "verifiers":
        from coralline.bench import verifiers as verifier_bench

        verifier_bench.main(args.out)
    elif args.what == "engine":
        from coralline.bench import engine as engine_bench

        engine_bench.main(args.out, quick=args.quick)
    elif args.what == "coral":
        from coralline.bench import coral as coral_bench

        coral_bench.main(
            args.out,
            quick=args.quick,
            ablations=args.ablation,
            checkpoint=args.draft_checkpoint,
            ablation_only=args.ablation_only,
            tau_prompts=args.tau_prompts,
        )
    elif args.what == "pipeline":
        from coralline.bench import pipeline as pipeline_bench

        pipeline_bench.main(
            args.out,
            quick=args.quick,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            delay_ms=args.delay_ms,
            drafter=args.drafter,
            temperature=args.temperature,
            model=args.model,
            checkpoint=args.draft_checkpoint,
            command="coralline " + " ".join(sys.argv[1:]),
        )
    elif args.what == "router":
        from coralline.bench import router as router_bench

        router_bench.main(
            args.out or "bench/out/router.json",
            quick=args.quick,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            clients=args.clients,
            cancel_trials=args.cancel_trials,
            model=args.model,
            checkpoint=args.draft_checkpoint,
            command="coralline " + " ".join(sys.argv[1:]),
        )
    elif args.what == "load":
        from coralline.bench import load as load_bench

        load_bench.main(
            args.out or "bench/out/load.json",
            quick=args.quick,
            prompts=args.prompts,
            max_new_tokens=args.max_new_tokens,
            concurrency=args.concurrency,
            methods=args.methods,
            model=args.model,
            checkpoint=args.draft_checkpoint,
            threads=args.threads,
            repeats=args.repeats,
            command="coralline " + " ".join(sys.argv[1:]),
        )
    elif args.what == "kernels":
        from coralline.bench import kernels as kernels_bench

        kcfg = (
            kernels_bench.KernelBenchConfig.quick if args.quick else kernels_bench.KernelBenchConfig
        )
        kw: dict = {"model": args.model} if args.model else {}
        if args.concurrency:
            kw["sessions"] = args.concurrency
        if args.repeats:
            kw["repeats"] = args.repeats
        if args.threads:
            kw["threads"] = args.threads
        for path in kernels_bench.main(
            args.out or "bench/out/kernels.json",
            kcfg(**kw),
            command="coralline " + " ".join(sys.argv[1:]),
        ):
            print(f"wrote {path}")
    elif args.what == "telemetry":
        from coralline.bench import telemetry as telemetry_bench

        cfg = telemetry_bench.TelemetryBenchConfig
        over = {
            k: v
            for k, v in {
                "prompts": args.prompts,
                "repeats": args.repeats,
                "max_new_tokens": args.max_new_tokens,
                "model": args.model,
            }.items()
            if v is not None
        }
        telemetry_bench.main(
            args.out or "bench/out/telemetry.json",
            cfg.quick(**over) if args.quick else cfg(**over),
            command="coralline " + " ".join(sys.argv[1:]),
        )
    return 0


def _train_config(args: argparse.Namespace, features: str, data: str):
    from coralline.train.trainer import TrainConfig

    return TrainConfig(
        features=features,
        data=data,
        max_tokens=args.seq_tokens,
        out=args.out,
        model=args.model,
        device=args.device,
        batch=args.batch,
        accumulate=args.accumulate,
        time_limit_s=60.0 * args.time_limit,
        steps=1 if args.no_hass else args.steps,
        csra=not args.no_csra,
        csra_weight=args.csra_weight,
        csra_temperature=args.csra_temperature,
        epochs=args.epochs,
        distill_epochs=0 if args.no_distill else args.distill_epochs,
        router=not args.no_router,
        router_conversations=args.router_conversations,
        seed=args.seed,
        max_conversations=args.max_conversations,
        lr=args.lr,
        init=args.init or "",
    )


def _cmd_train_draft(args: argparse.Namespace) -> int:
    import torch

    from coralline import models
    from coralline.train.features import DumpConfig, dump, dumped_tokens
    from coralline.train.trainer import train

    torch.set_num_threads(args.threads)
    if args.write_pack:
        from coralline.train.data import build_pack

        _, tok = models.load(args.model)
        print(
            build_pack(
                tok, args.write_pack, args.seq_tokens, max_conversations=args.max_conversations
            )
        )
        return 0
    if not args.out:
        raise ValueError("--out is required (the checkpoint folder)")
    if args.data:  # online: the target computes features batch by batch, nothing is dumped
        out = train(_train_config(args, features="", data=args.data))
        print(f"checkpoint: {out}")
        return 0
    cache = models.cache_dir()
    sharegpt = args.features or str(cache / "features" / f"{args.model}-sharegpt")
    folders = [sharegpt] if args.max_tokens > 0 else []
    selfdistill = None
    if args.self_distill:
        selfdistill = cache / "selfdistill" / f"{args.model}-greedy.jsonl"
        folders.append(str(cache / "features" / f"{args.model}-selfdistill"))
    if not folders:
        raise ValueError("no training data: --max-tokens 0 needs --self-distill N")
    # validated before the long data steps start
    tcfg = _train_config(args, features=",".join(folders), data="")
    if args.max_tokens > 0 and dumped_tokens(sharegpt) < args.max_tokens:
        # absent, unfinished or smaller than asked: (re)dump; finished shards are kept
        dump(DumpConfig(out_dir=sharegpt, model=args.model, max_total_tokens=args.max_tokens))
    if selfdistill is not None:
        from coralline.train.selfdistill import SelfDistillConfig, generate

        sd = SelfDistillConfig(out=str(selfdistill), model=args.model, prompts=args.self_distill)
        generate(sd)
        sd_dump = DumpConfig(
            out_dir=folders[-1],
            model=args.model,
            max_tokens=448,  # prompt (<= 192) + answer (<= 256)
            max_total_tokens=10**9,  # the whole file
            data=str(selfdistill),
        )
        dump(sd_dump)
    out = train(tcfg)
    print(f"checkpoint: {out}")
    return 0


def _cmd_self_distill(args: argparse.Namespace) -> int:
    import torch

    from coralline.train.selfdistill import SelfDistillConfig, generate

    torch.set_num_threads(args.threads)
    cfg = SelfDistillConfig(
        out=args.out,
        model=args.model,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch,
        num_shards=args.num_shards,
        shard=args.shard,
    )
    print(generate(cfg))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from coralline.eval import run

    torch.set_num_threads(args.threads)
    if args.what == "followeval":
        report = run.followeval(
            args.data, args.drafter, args.model, args.max_new_tokens, args.limit
        )
    elif args.what == "ifeval":
        from coralline.eval.ifeval import default_data_path

        data = args.data or str(default_data_path())
        report = run.ifeval(
            data,
            args.drafter,
            args.model,
            args.max_new_tokens,
            args.limit,
            args.backend,
            args.batch_size,
        )
    else:
        report = run.lossless(
            args.data, args.drafter, args.model, args.max_new_tokens, args.limit, args.ifeval_limit
        )
    run.save(report, args.out)
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    """The standard gRPC health check of a running service (a container's HEALTHCHECK; the
    Kubernetes probes use the kubelet's native gRPC probe): exit 0 when SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from coralline.rpc.security import sync_channel

    with sync_channel(args.endpoint, _tls(args)) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{args.endpoint}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.endpoint} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _cmd_reliability(args: argparse.Namespace) -> int:
    from coralline.reliability.run import ReliabilityConfig, markdown, run, save

    kw = {"model": args.model, "draft_checkpoint": args.draft_checkpoint, "seed": args.seed}
    for key, value in (
        ("stages", args.stages),
        ("fuzz_messages", args.fuzz_messages),
        ("soak_s", args.soak_s),
        ("soak_clients", args.soak_clients),
    ):
        if value is not None:
            kw[key] = value
    cfg = ReliabilityConfig.quick(**kw) if args.quick else ReliabilityConfig(**kw)
    report = run(cfg, command="coralline " + " ".join(sys.argv[1:]))
    paths = save(report, args.out)
    print(markdown(report))
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0 if report["verdict"]["passed"] else 1


def _cmd_certs(args: argparse.Namespace) -> int:
    from coralline.rpc.certs import DEFAULT_HOSTS, make_dev_ca

    paths = make_dev_ca(args.out, tuple(args.host or DEFAULT_HOSTS), args.days)
    for name, path in paths.items():
        print(f"{name:10} {path}")
    print(
        f"serve with: coralline serve --tls-dir {args.out}  (clients: --ca {paths['ca']}); "
        f"keep {paths['ca-key']} private"
    )
    return 0


def _cmd_model(args: argparse.Namespace) -> int:
    from coralline import models

    print(models.resolve(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coralline", description="Distributed, lossless speculative decoding."
    )
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with speculative decoding")
    g.add_argument("prompt")
    g.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF folder")
    g.add_argument(
        "--drafter",
        default=None,
        help=f"one of {', '.join(DRAFTERS)} (default: coral when a head ships for the model)",
    )
    g.add_argument("--draft-checkpoint", default=None, help="a CORAL checkpoint folder")
    g.add_argument("--verifier", default=None, help="default: the lossless choice for the drafter")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="a stop string (repeatable)")
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help="go on past an end-of-sequence token to --max-new-tokens (benchmarks)",
    )
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    g.add_argument(
        "--endpoint",
        default=None,
        metavar="HOST:PORT",
        help="generate on a running server (coralline verifier / the router) through the client "
        "SDK instead of in this process; bearer token from $CORALLINE_TOKEN",
    )
    g.add_argument("--ca", default=None, metavar="PEM", help="--endpoint is TLS: its CA")
    g.add_argument("--client-cert", default=None, metavar="PEM", help="for a mutual-TLS port")
    g.add_argument("--client-key", default=None, metavar="PEM", help="the client cert's key")
    g.set_defaults(fn=_cmd_generate)

    def tls_args(sp) -> None:
        t = sp.add_argument_group("security (docs/security.md)")
        t.add_argument(
            "--tls-dir",
            default=None,
            metavar="DIR",
            help="mutual TLS with DIR/server.pem, DIR/server-key.pem and DIR/ca.pem (made by "
            "`coralline certs DIR`): on this port and on every link this process dials",
        )
        t.add_argument("--tls-cert", default=None, metavar="PEM", help="this process's certificate")
        t.add_argument("--tls-key", default=None, metavar="PEM", help="its private key")
        t.add_argument(
            "--tls-ca",
            default=None,
            metavar="PEM",
            help="the CA of the peers: the port then requires client certificates (mutual TLS)",
        )
        t.add_argument(
            "--tls-server-name",
            default=None,
            metavar="NAME",
            help="the name to check in the certificates of the servers this process dials "
            "(default: the host it dials)",
        )

    def server_args(sp, port: int) -> None:
        sp.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
        sp.add_argument("--port", type=int, default=port, help=f"0 = any free port ({port})")
        sp.add_argument("--model", default="smollm2-135m-instruct", help="the target")
        sp.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        sp.add_argument("--max-sessions", type=int, default=16 if port == 50051 else 64)
        sp.add_argument("--max-message-mb", type=int, default=64, help="gRPC message limit")
        sp.add_argument(
            "--registry",
            default=None,
            metavar="URL",
            help="redis://[user:pass@]host:port/db (rediss:// for TLS): register this server "
            "there with a TTL and its load, for routers to discover",
        )
        sp.add_argument(
            "--advertise", default=None, metavar="HOST:PORT", help="the address to register"
        )
        tls_args(sp)
        sp.add_argument(
            "--api-tokens-file",
            default=None,
            metavar="FILE",
            help="bearer tokens (one per line) the public Generation API accepts; also "
            "$CORALLINE_API_TOKENS (comma-separated). Unset: no auth",
        )
        sp.add_argument(
            "--metrics-port",
            type=int,
            default=None,
            metavar="PORT",
            help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = a free port, printed "
            "on the ready line); off by default. Tracing: the OTEL_* variables "
            "(docs/telemetry.md)",
        )

    dr = sub.add_parser("drafter", help="run the drafting gRPC service (CORAL head)")
    server_args(dr, 50052)
    dr.add_argument("--drafter", default="coral", help="default drafter for sessions")
    dr.add_argument("--draft-checkpoint", default=None, help="a CORAL checkpoint folder")
    dr.add_argument("--idle-timeout", type=float, default=300.0, help="seconds")
    dr.add_argument("--workers", type=int, default=2, help="drafting threads (with --no-batch)")
    dr.add_argument(
        "--no-batch",
        action="store_true",
        help="draft each session on its own instead of batching the head forwards and LM-head "
        "calls of the sessions drafting at once (docs/batching.md)",
    )
    dr.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="the longest a batched draft step waits for the other sessions' steps",
    )
    dr.add_argument(
        "--pipeline",
        action="store_true",
        help="pre-draft each session's next round while the verifier verifies (the speculation "
        "cache, docs/batching.md)",
    )
    dr.set_defaults(fn=_cmd_drafter)

    vr = sub.add_parser("verifier", help="run the verification gRPC service (target model)")
    server_args(vr, 50051)
    vr.add_argument("--drafter-endpoint", default=None, metavar="HOST:PORT")
    vr.add_argument("--no-drafter", action="store_true", help="plain decoding only")
    vr.add_argument("--drafter", default=None, help="default drafter name (default: coral)")
    vr.add_argument("--max-tree-nodes", type=int, default=256)
    vr.add_argument(
        "--max-prompt-tokens", type=int, default=0, help="refuse longer prompts (0: the window)"
    )
    vr.add_argument(
        "--max-new-tokens", type=int, default=4096, help="refuse requests asking for more"
    )
    vr.add_argument("--round-timeout", type=float, default=2.0, help="seconds per proposal")
    vr.add_argument(
        "--retain-sessions", type=int, default=8, help="idle KV caches kept for next turns"
    )
    vr.add_argument("--retain-tokens", type=int, default=8192, help="tokens across those caches")
    vr.add_argument(
        "--sessions",
        default=None,
        metavar="URL",
        help="redis://... the routers' session store: an evicted KV cache is cleared from its "
        "session record there",
    )
    bt = vr.add_argument_group("batching (docs/batching.md)")
    bt.add_argument(
        "--no-batching",
        action="store_true",
        help="one session's forward at a time, each with its own cache (the reference path)",
    )
    bt.add_argument(
        "--kv-slots",
        type=int,
        default=0,
        help="sessions the KV pool holds (default: --max-sessions + --retain-sessions)",
    )
    bt.add_argument(
        "--kv-slot-tokens",
        type=int,
        default=0,
        help="tokens per session's KV slot (default: the model's context window; on a GPU the "
        "pool is allocated up front: slots x slot tokens x the model's KV bytes per token)",
    )
    bt.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward")
    bt.add_argument(
        "--prefill-chunk", type=int, default=128, help="a prompt's tokens per batched forward"
    )
    bt.add_argument(
        "--batch-wait-ms",
        type=float,
        default=20.0,
        help="how long a round waits for the other sessions' rounds at least (longer for "
        "sessions that usually take longer to come back, up to one forward: docs/batching.md)",
    )
    bt.add_argument(
        "--fixed-batch-wait",
        action="store_true",
        help="wait --batch-wait-ms at most, whatever the sessions' usual resubmit gaps",
    )
    bt.add_argument(
        "--speculation",
        choices=SPECULATION,
        default="measured",
        help="under load (batching): 'measured' (default) has every session speculate or "
        "decode plainly together, whichever gave more tokens/s at this load when measured (one "
        "session always speculates), with trees sized as by 'budget'; 'budget' sizes each "
        "round's tree by the batch's cost, down to the root alone, and always asks the drafter; "
        "'adaptive' decodes a session plainly without asking the drafter while speculation is "
        "predicted slower (experimental: slower on the 2-core CPU measured, docs/batching.md); "
        "'always' leaves tree sizes to the drafter's own model",
    )
    vr.set_defaults(fn=_cmd_verifier)

    sv = sub.add_parser(
        "serve",
        help="the whole stack on this machine: drafters, verifiers, the Ray Serve router and "
        "the public Generation port (loopback); Ctrl-C stops everything",
    )
    sv.add_argument("--port", type=int, default=50051, help="public port (0 = any free one)")
    sv.add_argument(
        "--host", default="127.0.0.1", help="public bind address of the gRPC and HTTP APIs"
    )
    sv.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
        "/v1/models; docs/openai.md) on --host (0 = a free port, -1 = off)",
    )
    sv.add_argument("--drafters", type=int, default=1, help="drafter processes (0 = plain)")
    sv.add_argument("--verifiers", type=int, default=1, help="verifier processes")
    sv.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="redis://[user:pass@]host:port/db (rediss:// for TLS): the session store "
        "(default: in the router's memory)",
    )
    sv.add_argument("--routers", type=int, default=1, help="router replicas (>1 needs --redis)")
    sv.add_argument(
        "--autoscale-max", type=int, default=0, help="autoscale routers up to this (needs --redis)"
    )
    sv.add_argument(
        "--ingress",
        default="front",
        choices=["front", "proxy"],
        help="front: grpc.aio (and the HTTP API) on Serve handles (loopback, reliable cancel); "
        "proxy: Serve's own gRPC and HTTP proxies, as on Kubernetes (docs/router.md)",
    )
    sv.add_argument("--model", default="smollm2-135m-instruct", help="the target")
    sv.add_argument("--draft-checkpoint", default=None, help="a CORAL checkpoint folder")
    sv.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (workers)")
    sv.add_argument("--max-sessions", type=int, default=16, help="per verifier")
    sv.add_argument(
        "--verifier-threads",
        type=int,
        default=1,
        help="torch threads of each verifier (default 1: on one small box the drafter needs the "
        "other core)",
    )
    sv.add_argument(
        "--speculation",
        choices=SPECULATION,
        default=None,
        help="each verifier's --speculation (default: measured; see coralline verifier --help)",
    )
    sv.add_argument("--log-dir", default=None, help="worker logs (default: a temporary folder)")
    sv.add_argument(
        "--dashboard-port",
        type=int,
        default=8321,
        help="the live view (recent requests, round timelines across services), the router's "
        "/metrics and Prometheus service discovery at /prometheus/targets (0 = a free port)",
    )
    sv.add_argument(
        "--trace-file",
        default=None,
        metavar="FILE",
        help="also append every span to FILE as OTLP/JSON lines (for coralline trace-report)",
    )
    sv.add_argument(
        "--no-telemetry",
        action="store_true",
        help="no live view, no /metrics, no tracing (the OTEL_* variables still apply)",
    )
    sv.add_argument(
        "--router-option",
        action="append",
        metavar="KEY=VALUE",
        help="a RouterConfig field for the router replicas (repeatable), e.g. the limits: "
        "max_prompt_tokens, max_new_tokens (4096), max_request_s (600), max_queued (64), "
        "queue_timeout_s (10) (docs/security.md)",
    )
    sv.add_argument(
        "--tls-dir",
        default=None,
        metavar="DIR",
        help="a `coralline certs` folder: TLS on the public port (clients verify it with "
        "DIR/ca.pem) and mutual TLS between every service (docs/security.md)",
    )
    sv.add_argument(
        "--api-tokens-file",
        default=None,
        metavar="FILE",
        help="bearer tokens (one per line) the public port accepts; also $CORALLINE_API_TOKENS "
        "(comma-separated). Unset: no auth",
    )
    sv.set_defaults(fn=_cmd_serve)

    hc = sub.add_parser(
        "health",
        help="check a service's standard gRPC health (exit 0 when SERVING): a container "
        "HEALTHCHECK",
    )
    hc.add_argument("--endpoint", default="127.0.0.1:50051", metavar="HOST:PORT")
    hc.add_argument("--service", default="", help="a service name (default: the whole server)")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds")
    tls_args(hc)
    hc.set_defaults(fn=_cmd_health)

    ce = sub.add_parser(
        "certs",
        help="make a development CA and certificates for TLS / mutual TLS (`make certs`): "
        "ca.pem, server.pem, client.pem and their keys",
    )
    ce.add_argument("out", nargs="?", default="certs", help="the folder (default: certs)")
    ce.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or address in the service certificate (repeatable; default: localhost, "
        "127.0.0.1, ::1)",
    )
    ce.add_argument("--days", type=int, default=825, help="validity of the leaf certificates")
    ce.set_defaults(fn=_cmd_certs)

    rl = sub.add_parser(
        "reliability",
        help="fuzzing (>= 2000 generated messages per API), faults under load (SIGKILL of a "
        "verifier, a drafter, a router replica; Redis restart; drafter-link latency) and a soak "
        "test on the real stack on loopback -> OUT/reliability.json + .md (docs/reliability.md)",
    )
    rl.add_argument("--out", default="reports", help="the report folder (default: reports)")
    rl.add_argument("--quick", action="store_true", help="the CI subset: smaller and shorter")
    rl.add_argument(
        "--stages",
        type=lambda v: tuple(v.split(",")),
        default=None,
        help="comma-separated subset of fuzz,faults,soak (default: all)",
    )
    rl.add_argument("--fuzz-messages", type=int, default=None, help="per API (default 2000)")
    rl.add_argument("--soak-s", type=float, default=None, help="soak duration (default 120)")
    rl.add_argument("--soak-clients", type=int, default=None, help="default 16")
    rl.add_argument("--model", default="smollm2-135m-instruct", help="the target")
    rl.add_argument("--draft-checkpoint", default=None, help="a CORAL checkpoint folder")
    rl.add_argument("--seed", type=int, default=0, help="the fuzz's seed (a failure replays)")
    rl.set_defaults(fn=_cmd_reliability)

    tr = sub.add_parser(
        "trace-report",
        help="per-hop latency breakdown of coralline traces: one row per request and per "
        "speculative round (OTLP/JSON: the Collector's file exporter, the live view's download, "
        "serve --trace-file), optionally a PNG timeline",
    )
    tr.add_argument("file", help="OTLP/JSON traces: one ExportTraceServiceRequest, or one per line")
    tr.add_argument(
        "--png",
        default=None,
        metavar="OUT",
        help="write a timeline PNG of one trace to OUT (the --trace one, else the newest)",
    )
    tr.add_argument("--trace", default=None, help="only this trace (a unique id prefix is enough)")
    tr.add_argument(
        "--json", action="store_true", help='print {"requests": [...], "rounds": [...]} as JSON'
    )
    tr.add_argument("--no-rounds", action="store_true", help="only the per-request table")
    tr.set_defaults(fn=_cmd_trace_report)

    d = sub.add_parser(
        "demo", help="the stack up, speculation vs plain decoding through it (SmolLM2), stack down"
    )
    d.add_argument("--prompt", default=None)
    d.add_argument("--max-new-tokens", type=int, default=96)
    d.add_argument("--drafter", default=None, help="default: coral when shipped, else ngram")
    d.add_argument(
        "--in-process", action="store_true", help="the engine alone, no servers (the old demo)"
    )
    d.set_defaults(fn=_cmd_demo)

    e = sub.add_parser("exact", help="exact expected acceptance of every verifier (toy models)")
    e.set_defaults(fn=_cmd_exact)

    b = sub.add_parser(
        "bench",
        help="benchmarks: every method side by side (default), or one component",
        description="all (default): HF peers, engine, n-gram, CORAL and the verifiers at T = 0 "
        "and T = 1 on the same prompts -> OUT/bench.json, bench.md and PNG plots. verifiers / "
        "engine / coral: focused benchmarks -> a JSON file at --out. pipeline: drafter + "
        "verifier processes on loopback (also with --delay-ms on the drafter link) vs the "
        "in-process engine. router: the router's overhead per token, first chunk, concurrent "
        "clients and cancellation, front vs Serve's gRPC proxy (Ray on loopback). telemetry: "
        "tokens/s with tracing + metrics on vs off, same prompts, one run. load: concurrent "
        "sessions against vLLM's CPU build and HF batched decoding. kernels: the CPU kernels "
        "(attention, oneDNN weight pack) A/B inside one batched forward -> JSON, MD, PNG.",
    )
    b.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=[
            "all",
            "verifiers",
            "engine",
            "coral",
            "pipeline",
            "router",
            "telemetry",
            "load",
            "kernels",
        ],
    )
    b.add_argument("--out", default=None, help="all: a folder (bench/out); others: a JSON file")
    b.add_argument("--quick", action="store_true", help="fewer prompts and tokens (what CI runs)")
    b.add_argument("--ablation", action="append", help="coral: another checkpoint to compare")
    b.add_argument(
        "--ablation-only", action="store_true", help="coral: only plain + the --ablation heads"
    )
    b.add_argument(
        "--tau-prompts",
        type=int,
        default=0,
        help="coral: only the 60-node tau, head alone and with lookup, on N held-out prompts",
    )
    b.add_argument(
        "--model",
        default=None,
        help="all, pipeline, router, load, kernels: the target (default SmolLM2-135M)",
    )
    b.add_argument(
        "--draft-checkpoint",
        default=None,
        help="all, coral, pipeline, router: a CORAL head (default: shipped)",
    )
    b.add_argument("--assistant", default=None, help="all: HF assisted generation's draft model")
    b.add_argument("--prompts-per-set", type=int, default=None, help="all: default 3 (quick 1)")
    b.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="all: default 96 (quick 24); pipeline, router: default 64 (quick 24)",
    )
    b.add_argument(
        "--prompts", type=int, default=None, help="pipeline, router: default 6 (quick 2)"
    )
    b.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=None,
        help="router: concurrency levels through the front (default 1 2 4 8; quick 1 2)",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="router: runs per prompt and path in the overhead step (default 2; quick 1); "
        "load: passes over the methods, every other one in reverse order, medians reported "
        "(default 1); telemetry: passes over the prompts; kernels: forwards per variant and "
        "point (default 8)",
    )
    b.add_argument(
        "--cancel-trials",
        type=int,
        default=None,
        help="router: cancellation trials per ingress and way of cancelling (default 6; quick 2)",
    )
    b.add_argument(
        "--delay-ms",
        type=float,
        default=2.0,
        help="pipeline: delay added per direction on the drafter link of the delayed mode",
    )
    b.add_argument("--drafter", default="coral", help="pipeline: the drafter of every mode")
    b.add_argument(
        "--concurrency",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=None,
        help="load: concurrent sessions, comma-separated (default 1,2,4,8,16); kernels: "
        "one-token sessions per forward (default 1,4,8,16)",
    )
    b.add_argument(
        "--methods",
        type=lambda v: tuple(v.split(",")),
        default=None,
        help="load: comma-separated subset of vllm,vllm-ngram,hf-batched,engine-plain,"
        "verifier-coral,verifier-coral-switch,verifier-coral-pipelined,stack-coral (default: "
        "all; the vLLM peers "
        "need `make bench-peers`)",
    )
    b.add_argument("--temperature", type=float, default=0.0, help="pipeline: 0 = greedy")
    b.add_argument("--t1-seeds", type=int, default=None, help="all: seeds per prompt at T = 1")
    b.add_argument("--ifeval-data", default=None, help="all: IFEval input_data.jsonl")
    b.add_argument("--device", default=None, help="all: cpu (default) or cuda")
    b.add_argument(
        "--threads",
        type=int,
        default=None,
        help="all: torch threads (default 1); load: every method's threads (default 2); "
        "kernels: (default: the CPUs)",
    )
    b.set_defaults(fn=_cmd_bench)

    t = sub.add_parser(
        "train-draft",
        help="train a CORAL head on ShareGPT (dump features, train, router), resumable",
    )
    t.add_argument("--out", default=None, help="checkpoint folder (resumes when it exists)")
    t.add_argument("--model", default="smollm2-135m-instruct")
    t.add_argument(
        "--data",
        default=None,
        help="online training, no feature dump: comma-separated sources, each a pack file "
        "(--write-pack), 'sharegpt' or a self-distill .jsonl (coralline self-distill); the "
        "target computes each batch's features on --device",
    )
    t.add_argument(
        "--write-pack",
        default=None,
        metavar="FILE",
        help="render the ShareGPT training split into FILE (ids + masks, ~1 byte/token) and exit",
    )
    t.add_argument(
        "--seq-tokens",
        type=int,
        default=384,
        help="tokens per conversation (packs, online 'sharegpt' and .jsonl sources)",
    )
    t.add_argument("--device", default="cpu", help="cpu or cuda (head and online target)")
    t.add_argument("--batch", type=int, default=1, help="conversations per forward (right-padded)")
    t.add_argument("--accumulate", type=int, default=4, help="batches per optimizer step")
    t.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        metavar="MIN",
        help="stop training after MIN minutes, learning rate annealed on that clock (0 = none)",
    )
    t.add_argument("--router-conversations", type=int, default=800)
    t.add_argument("--features", default=None, help="ShareGPT feature dump folder (default: cache)")
    t.add_argument(
        "--max-tokens", type=int, default=300_000, help="tokens of ShareGPT data (0 = none)"
    )
    t.add_argument(
        "--self-distill",
        type=int,
        default=0,
        metavar="N",
        help="also train on the target's greedy answers to N ShareGPT training prompts",
    )
    t.add_argument("--epochs", type=int, default=2)
    t.add_argument("--distill-epochs", type=int, default=1)
    t.add_argument("--steps", type=int, default=3, help="HASS multi-step depth")
    t.add_argument("--no-hass", action="store_true", help="plain EAGLE training (1 step)")
    t.add_argument("--no-csra", action="store_true")
    t.add_argument("--csra-weight", type=float, default=0.2)
    t.add_argument("--csra-temperature", type=float, default=0.1)
    t.add_argument("--no-distill", action="store_true", help="skip the top-K distillation phase")
    t.add_argument("--no-router", action="store_true", help="skip the router stage")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-conversations", type=int, default=0, help="0 = all (for quick runs)")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--init", default=None, help="warm start from this checkpoint (same target)")
    t.set_defaults(fn=_cmd_train_draft)

    sd = sub.add_parser(
        "self-distill",
        help="the target's greedy answers to ShareGPT training prompts (train-draft --data)",
    )
    sd.add_argument("--out", required=True, help="JSONL file (appended; a rerun resumes)")
    sd.add_argument("--model", default="smollm2-135m-instruct")
    sd.add_argument("--prompts", type=int, default=1000, help="prompts of this shard")
    sd.add_argument("--max-new-tokens", type=int, default=256)
    sd.add_argument("--batch", type=int, default=32, help="prompts per generate batch")
    sd.add_argument("--num-shards", type=int, default=1, help="run one process per shard")
    sd.add_argument("--shard", type=int, default=0, help="prompt k goes to shard k %% shards")
    sd.add_argument("--threads", type=int, default=1)
    sd.set_defaults(fn=_cmd_self_distill)

    ev = sub.add_parser("eval", help="quality evaluation: followeval, ifeval, lossless")
    ev.add_argument("what", choices=["followeval", "ifeval", "lossless"])
    ev.add_argument(
        "--data",
        default=None,
        help="followeval: a FollowEval JSONL (default: the bundled suite); ifeval: an IFEval "
        "input_data.jsonl (default: $CORALLINE_IFEVAL_DATA, else the vendored IFEval prompts); "
        "lossless: IFEval prompts to add (default: none, the bundled FollowEval suite only)",
    )
    ev.add_argument("--model", default="smollm2-135m-instruct")
    ev.add_argument("--drafter", default=None, help="default: coral when shipped, else ngram")
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--limit", type=int, default=0, help="first N items only (0 = all)")
    ev.add_argument("--ifeval-limit", type=int, default=20, help="lossless: IFEval prompts")
    ev.add_argument(
        "--backend",
        choices=["engine", "hf-batched"],
        default="engine",
        help="ifeval: the engine with --drafter, or the target alone in HF batches (fast)",
    )
    ev.add_argument("--batch-size", type=int, default=32, help="ifeval --backend hf-batched")
    ev.add_argument("--threads", type=int, default=1)
    ev.add_argument("--out", default=None, help="write the JSON report here")
    ev.set_defaults(fn=_cmd_eval)

    m = sub.add_parser("model", help="model utilities")
    m.add_argument("action", choices=["prepare"], help="convert/cache a built-in model")
    m.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    m.set_defaults(fn=_cmd_model)
    return p


def main(argv: list[str] | None = None) -> int:
    from coralline.rpc.process import die_with_parent

    die_with_parent()  # a child of ServerProcess: dies with the process that started it
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"coralline: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
