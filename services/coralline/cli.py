"""The `coralline` command. Thin: parses arguments, calls library functions, prints results.

Input errors end with a one-line message on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_demo(args: argparse.Namespace) -> int:
    from coralline.eval import toy

    toy.run()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "verifiers":
        from coralline.eval import verifier_bench

        verifier_bench.main(args.out)
        return 0
    raise ValueError(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coralline", description="Distributed, lossless speculative decoding."
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="exact expected acceptance of every verifier on toy models")
    d.set_defaults(fn=_cmd_demo)
    b = sub.add_parser("bench", help="benchmarks (JSON + a printed table)")
    b.add_argument("what", choices=["verifiers"], help="which benchmark")
    b.add_argument("--out", default=None, help="write the JSON report here")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"coralline: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
