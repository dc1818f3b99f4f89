"""`sp-serve bench ...`: the benchmark commands; for now `serve`, a load generator."""

from __future__ import annotations

import argparse

from sp_serve.bench import serve, serve_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="bench_command", required=True, metavar="{serve}")
    serve_parser = commands.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (sp-serve, vLLM, SGLang)",
        description=serve.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cli.add_arguments(serve_parser)


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return serve_cli.run(args)
    raise AssertionError(f"unhandled bench command {args.bench_command!r}")
