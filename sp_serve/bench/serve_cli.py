"""The flags of `sp-serve bench serve` (vLLM's `bench serve` names) and the command itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any

from sp_serve.bench import serve
from sp_serve.bench.config import ServeBenchConfig
from sp_serve.bench.datasets import DATASETS, PROMPT_FORMATS
from sp_serve.bench.metrics import METRICS, parse_goodput, parse_percentiles
from sp_serve.bench.report import print_summary, result_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default=None, help="default http://HOST:PORT")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default="/v1/completions", help="or /v1/chat/completions")
    server.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    server.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer dir for exact prompt lengths and output counts (default: the model's "
        "dir when local; without one, prompts go as token ids and counts come from usage)",
    )
    server.add_argument(
        "--backend", default=None, help="label for the result (default: from --endpoint)"
    )
    server.add_argument("--label", default=None, help="prefix of the result file name")
    server.add_argument(
        "--header", nargs="*", default=[], metavar="KEY=VALUE", help="extra HTTP headers"
    )
    server.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds per request (600)"
    )

    data = parser.add_argument_group("dataset")
    data.add_argument("--dataset-name", default="random", choices=DATASETS)
    data.add_argument(
        "--dataset-path", default=None, help='jsonl: one {"prompt", "output_len"} per line'
    )
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--input-len", type=int, default=None, help="sets --random-input-len")
    data.add_argument("--output-len", type=int, default=None, help="sets --random-output-len")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument(
        "--random-output-len",
        type=int,
        default=128,
        help="also the output length of long-doc requests and of jsonl lines without output_len",
    )
    data.add_argument(
        "--random-range-ratio", type=float, default=0.0, help="lengths drawn in len x [1-r, 1+r]"
    )
    data.add_argument(
        "--long-fraction", type=float, default=0.1, help="long-doc: share of long requests"
    )
    data.add_argument("--long-input-len", type=int, default=32768)
    data.add_argument("--short-input-len", type=int, default=512)
    data.add_argument("--prefix-repetition-prefix-len", type=int, default=256,
                      help="prefix-repetition: tokens of each shared prefix (document)")
    data.add_argument("--prefix-repetition-suffix-len", type=int, default=256,
                      help="prefix-repetition: tokens of each request's own suffix (question)")
    data.add_argument("--prefix-repetition-num-prefixes", type=int, default=10,
                      help="prefix-repetition: documents; --num-prompts / this = questions each")
    data.add_argument("--prefix-repetition-output-len", type=int, default=128)
    data.add_argument(
        "--prompt-format",
        default="auto",
        choices=PROMPT_FORMATS,
        help="random/long-doc prompts as text or as token-id lists (auto: text with a tokenizer)",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--request-rate", type=float, default=math.inf, help="req/s; inf sends all at once"
    )
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1.0 = Poisson")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true")
    load.add_argument("--temperature", type=float, default=None)
    load.add_argument(
        "--extra-body",
        type=_json_object,
        default=None,
        help="JSON object merged into every request",
    )

    report = parser.add_argument_group("report")
    report.add_argument("--metric-percentiles", default="50,90,99")
    report.add_argument(
        "--percentile-metrics", default=",".join(METRICS), help="which the table shows"
    )
    report.add_argument(
        "--goodput", nargs="+", default=None, metavar="KEY:MS", help="e.g. ttft:500 tpot:50"
    )
    report.add_argument("--save-result", action="store_true")
    report.add_argument("--save-detailed", action="store_true", help="also save generated texts")
    report.add_argument("--result-dir", default=None)
    report.add_argument("--result-filename", default=None)
    report.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    report.add_argument(
        "--disable-tqdm", "--disable-progress", dest="disable_progress", action="store_true"
    )
    report.add_argument("--sp-size", type=int, default=None, help="tag (default: from the server)")
    report.add_argument("--tp-size", "--tensor-parallel-size", dest="tp_size", type=int,
                        default=None, help="tag (default: from the server)")
    report.add_argument("--attn-backend", default=None, help="tag (default: from the server)")
    report.add_argument("--scheduler", default=None, help="tag (default: from the server)")
    report.add_argument("--device", default=None, help="tag (default: from the server)")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object; write e.g. '{{\"top_k\": 1}}'"
        )
    return value


def _key_values(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: write KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def config_from_args(args: argparse.Namespace) -> ServeBenchConfig:
    return ServeBenchConfig(
        base_url=(args.base_url or f"http://{args.host}:{args.port}").rstrip("/"),
        endpoint=args.endpoint,
        model=args.model,
        tokenizer=args.tokenizer,
        dataset_name=args.dataset_name,
        dataset_path=args.dataset_path,
        num_prompts=args.num_prompts,
        random_input_len=args.input_len or args.random_input_len,
        random_output_len=args.output_len or args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        long_fraction=args.long_fraction,
        long_input_len=args.long_input_len,
        short_input_len=args.short_input_len,
        prefix_repetition_prefix_len=args.prefix_repetition_prefix_len,
        prefix_repetition_suffix_len=args.prefix_repetition_suffix_len,
        prefix_repetition_num_prefixes=args.prefix_repetition_num_prefixes,
        prefix_repetition_output_len=args.prefix_repetition_output_len,
        prompt_format=args.prompt_format,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        num_warmups=args.num_warmups,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        temperature=args.temperature,
        extra_body=args.extra_body or {},
        headers=_key_values(args.header, "--header"),
        request_timeout_s=args.request_timeout,
        percentiles=parse_percentiles(args.metric_percentiles),
        percentile_metrics=[m.strip() for m in args.percentile_metrics.split(",") if m.strip()],
        goodput_slos_ms=parse_goodput(args.goodput),
        backend=args.backend,
        label=args.label,
        save_result=args.save_result,
        save_detailed=args.save_detailed,
        result_dir=args.result_dir,
        result_filename=args.result_filename,
        metadata=_key_values(args.metadata, "--metadata"),
        show_progress=not args.disable_progress,
        sp_size=args.sp_size,
        tp_size=args.tp_size,
        attn_backend=args.attn_backend,
        scheduler=args.scheduler,
        device=args.device,
    )


def run(args: argparse.Namespace) -> int:
    """0 when at least one request completed, 1 when all failed, 2 on a usage error."""
    try:
        config = config_from_args(args)
        result = asyncio.run(serve.run_benchmark(config))
    except ValueError as exc:
        print(f"sp-serve bench serve: {exc}", file=sys.stderr)
        return 2
    print_summary(result, config)
    if config.save_result:
        path = result_path(config, result)
        path.write_text(json.dumps(result))
        print(f"result saved to {path}")
    return 0 if result["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires `sp-serve bench serve`."""
    parser = argparse.ArgumentParser(
        prog="sp-serve bench serve",
        description=serve.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
