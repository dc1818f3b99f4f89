"""`sp-serve bench ...`: the benchmark commands: `serve`, a load generator, and `sweep`, which
starts a server per configuration and runs `serve`'s client against each."""

from __future__ import annotations

import argparse

from sp_serve.bench import serve, serve_cli, sweep


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Adds `serve` (and later benchmarks) under an existing `bench` subparsers action; each
    sets `func` so the top-level CLI can call `args.func(args)`."""
    serve_parser = subparsers.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (sp-serve, vLLM, SGLang)",
        description=serve.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve_cli.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve_cli.run, bench_command="serve")
    sweep_parser = subparsers.add_parser(
        "sweep",
        help="start sp-serve per SP degree x prompt length x rate x scheduler and bench each",
        description=sweep.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_arguments(sweep_parser)
    sweep_parser.set_defaults(func=sweep.run, bench_command="sweep")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `bench` command's own parser, for callers that wire commands this way."""
    add_subcommands(
        parser.add_subparsers(dest="bench_command", required=True, metavar="{serve,sweep}")
    )


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "serve":
        return serve_cli.run(args)
    if args.bench_command == "sweep":
        return sweep.run(args)
    raise AssertionError(f"unhandled bench command {args.bench_command!r}")
