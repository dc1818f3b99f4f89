"""What `sp-serve bench serve` runs: every option of a benchmark in one validated dataclass."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sp_serve.bench.datasets import DATASETS
from sp_serve.bench.metrics import METRICS

ENDPOINTS = {"/v1/completions": "openai", "/v1/chat/completions": "openai-chat"}
SP_SERVE_TAGS = ("sp_size", "tp_size", "attn_backend", "scheduler", "device")


@dataclass
class ServeBenchConfig:
    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first of GET /v1/models
    tokenizer: str | None = None  # None: the model's directory when it is local
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    long_fraction: float = 0.1
    long_input_len: int = 32768
    short_input_len: int = 512
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    prompt_format: str = "auto"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    ignore_eos: bool = False
    temperature: float | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 600.0
    percentiles: list[float] = field(default_factory=lambda: [50.0, 90.0, 99.0])
    percentile_metrics: list[str] = field(default_factory=lambda: list(METRICS))
    goodput_slos_ms: dict[str, float] = field(default_factory=dict)
    backend: str | None = None  # a label for the result; None: from the endpoint
    label: str | None = None
    save_result: bool = False
    save_detailed: bool = False
    result_dir: str | None = None
    result_filename: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    show_progress: bool = True
    # Tags for the result; None: what the server reports under `sp_serve` in /v1/models.
    sp_size: int | None = None
    tp_size: int | None = None
    attn_backend: str | None = None
    scheduler: str | None = None
    device: str | None = None

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name {self.dataset_name!r}; choose one of {DATASETS}")
        if (self.dataset_name == "jsonl") != (self.dataset_path is not None):
            raise ValueError("--dataset-path goes with --dataset-name jsonl, and only with it")
        if not self.endpoint.startswith("/") or not self.endpoint.endswith("completions"):
            raise ValueError(
                f"--endpoint {self.endpoint!r}: use /v1/completions or /v1/chat/completions"
            )
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be >= 1, got {self.num_prompts}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if not self.request_rate > 0:
            raise ValueError(
                f"--request-rate must be > 0 (inf sends all at once), got {self.request_rate}"
            )
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be > 0 (1.0 = Poisson), got {self.burstiness}")
        if self.num_warmups < 0:
            raise ValueError(f"--num-warmups must be >= 0, got {self.num_warmups}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be > 0 s, got {self.request_timeout_s}")
        unknown = [m for m in self.percentile_metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"--percentile-metrics {unknown}: choose from {list(METRICS)}")

    @property
    def chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")
