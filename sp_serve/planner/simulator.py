"""What the engine would do with a workload on a cluster that need not exist: a discrete-event
simulation in which the engine's own Scheduler and BlockManager (imported, not re-implemented)
run against modelled step times on a fake clock.

Each simulated step does what LLMEngine.step does, minus the tensors:

    step = scheduler.schedule()                  # the real policy, clock = simulated time
    now += step_seconds(cost, step)              # instead of running the plan on the ranks
    prefill chunk ending at prefill_target       -> scheduler.prefill_done(seq), first token
    every decode entry                           -> one token
    output_len tokens                            -> finished, scheduler.remove(seq)

Requests join the scheduler at the first step boundary after they arrive plus the serving
path's per-request overhead (the async engine drains its inbox between steps); an idle engine
jumps to the next arrival. Step times can carry seeded log-normal noise (step_time_sigma, for
a step of step_time_sigma_at_s; longer steps average more of it out): on a real engine the
scheduler's step-time model (refit on measured steps, scaled by their noise) reacts to that
noise, and the simulated one, running on the simulated clock, reacts the same way. A request
whose prompt + output cannot fit in any rank's KV pool is rejected, as LLMEngine.check_prompt
does.

Step times come from one of two cost models:
  - calibrated: a CostModel JSON saved from a real engine (`CostModel.save`, see
    `calibrate_cost_model`): CostModel.step_s of the step's chunks and decode batch, which the
    worker runs in one forward pass.
  - analytic: sp_serve.planner.analytic's prefill_seconds / decode_step_seconds for a model and
    hardware preset, for any TP x SP layout (1/tp of the weights read per rank, the TP
    all-reduces of every step, the SP ring and merge over the rank's KV heads; SimConfig's
    tp_size and sp_size match the Deployment's); a step carrying both reads the weights once. The
    scheduler itself still sees a CostModel, as in the engine: one least-squares fitted to the
    analytic step times over the workload's range, as a calibration on that hardware would
    produce (its fit error is reported).

The results are keyed like `sp-serve bench serve` results (bench.metrics.compute_metrics runs on
the simulated requests), so a prediction and a measurement compare key by key.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sp_serve.bench.arrivals import arrival_times
from sp_serve.bench.client import RequestResult
from sp_serve.bench.datasets import sample_lengths
from sp_serve.bench.metrics import compute_metrics, summarize
from sp_serve.engine.cost_model import CostModel
from sp_serve.engine.sampling import SamplingParams
from sp_serve.engine.scheduler import ScheduledStep, Scheduler, SchedulerConfig
from sp_serve.engine.sequence import SeqStatus, Sequence
from sp_serve.jsonl import iter_jsonl_objects
from sp_serve.kv.block_manager import BlockManager
from sp_serve.planner.analytic import (
    Deployment,
    ModelShape,
    decode_step_breakdown,
    decode_step_seconds,
    free_kv_bytes_per_rank,
    kv_bytes_per_token_per_rank,
    prefill_seconds,
)
from sp_serve.planner.hardware import Hardware

TRACE_EXAMPLE = '{"arrival_time": 0.5, "prompt_len": 32768, "output_len": 128}'

# --- workloads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceRequest:
    arrival_time: float  # seconds from the start of the run
    prompt_len: int
    output_len: int
    is_long: bool | None = None  # long-doc workloads mark their long requests
    # prefix-repetition workloads: the prompt starts with shared prefix `prefix_id`, of
    # prefix_len tokens (the same document in several requests); the rest is its own
    prefix_id: int | None = None
    prefix_len: int = 0


def _check_request(req: TraceRequest, where: str) -> None:
    ok = (
        isinstance(req.prompt_len, int)
        and req.prompt_len >= 1
        and isinstance(req.output_len, int)
        and req.output_len >= 1
        and math.isfinite(req.arrival_time)
        and req.arrival_time >= 0
        and isinstance(req.prefix_len, int)
        and 0 <= req.prefix_len <= req.prompt_len
        and (req.prefix_id is None or isinstance(req.prefix_id, int))
    )
    if not ok:
        raise ValueError(
            f"{where}: need arrival_time >= 0 seconds, integer prompt_len, output_len >= 1 and "
            f"(optional) integer prefix_id with 0 <= prefix_len <= prompt_len; got {req}"
        )


def load_trace(path: str | Path) -> list[TraceRequest]:
    """A JSONL trace (one object per line: arrival_time in seconds, prompt_len, output_len,
    optional is_long), or a `sp-serve bench serve` result JSON (its measured requests: send
    times, prompt and output lengths). Arrival times are shifted so the first is at 0."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--trace {str(path)!r} is not a file")
    text = path.read_text(encoding="utf-8")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "input_lens" in whole:
        return trace_from_bench_result(whole)
    trace = []
    for where, obj in iter_jsonl_objects(text.splitlines(), path, TRACE_EXAMPLE):
        keys = {"arrival_time", "prompt_len", "output_len"}
        if not keys <= obj.keys():
            raise ValueError(f"{where}: each line needs arrival_time, prompt_len and output_len, "
                             f"like {TRACE_EXAMPLE}")
        req = TraceRequest(float(obj["arrival_time"]), obj["prompt_len"], obj["output_len"],
                           obj.get("is_long"), obj.get("prefix_id"), obj.get("prefix_len", 0))
        _check_request(req, where)
        trace.append(req)
    if not trace:
        raise ValueError(
            f"{path} holds no requests; write one JSON object per line like {TRACE_EXAMPLE}")
    return _from_zero(trace)


def trace_from_bench_result(result: dict[str, Any]) -> list[TraceRequest]:
    """The requests a bench run completed, at the times it sent them (failed ones left out)."""
    is_long = result.get("is_long") or [None] * len(result["input_lens"])
    trace = [
        TraceRequest(float(t), int(n), int(m), long)
        for t, n, m, err, long in zip(result["start_times"], result["input_lens"],
                                      result["output_lens"], result["errors"], is_long)
        if not err and n and m
    ]
    if not trace:
        raise ValueError("the bench result holds no completed request to replay")
    return _from_zero(trace)


def _from_zero(trace: list[TraceRequest]) -> list[TraceRequest]:
    t0 = min(r.arrival_time for r in trace)
    return sorted((replace(r, arrival_time=r.arrival_time - t0) for r in trace),
                  key=lambda r: r.arrival_time)


def save_trace(trace: list[TraceRequest], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({k: v for k, v in asdict(r).items()
                        if v is not None and (k != "prefix_len" or v)}) + "\n" for r in trace)


def generate_trace(
    dataset: str = "random",
    num_prompts: int = 100,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    input_len: int = 1024,
    output_len: int = 128,
    range_ratio: float = 0.0,
    long_fraction: float = 0.1,
    long_input_len: int = 32768,
    short_input_len: int = 512,
    prefix_len: int = 256,
    suffix_len: int = 256,
    num_prefixes: int = 10,
) -> list[TraceRequest]:
    """A workload of the bench datasets' shapes without building prompts: `random` (input_len
    +- range_ratio), `long-doc` (exactly round(n x long_fraction) long requests at seeded
    positions), output_len +- range_ratio, or `prefix-repetition` (num_prefixes documents of
    prefix_len tokens, each asked num_prompts / num_prefixes questions of suffix_len tokens, in
    a seeded order; output_len each), sent at Poisson (gamma) arrival times."""
    if dataset not in ("random", "long-doc", "prefix-repetition"):
        raise ValueError(f"dataset {dataset!r}: the simulator generates random, long-doc or "
                         "prefix-repetition workloads; pass --trace FILE for anything else")
    if dataset == "prefix-repetition":
        for name, value in (("num-prompts", num_prompts),
                            ("prefix-repetition-prefix-len", prefix_len),
                            ("prefix-repetition-suffix-len", suffix_len),
                            ("prefix-repetition-num-prefixes", num_prefixes),
                            ("output-len", output_len)):
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if num_prompts % num_prefixes:
            raise ValueError(f"--num-prompts ({num_prompts}) must be a multiple of "
                             f"--prefix-repetition-num-prefixes ({num_prefixes})")
        rng = np.random.default_rng(seed)
        ids = [i // (num_prompts // num_prefixes) for i in range(num_prompts)]
        ids = [ids[i] for i in rng.permutation(num_prompts)]
        times = arrival_times(num_prompts, request_rate, burstiness,
                              np.random.default_rng([seed, 1]))
        return [TraceRequest(t, prefix_len + suffix_len, output_len, None, d, prefix_len)
                for t, d in zip(times, ids)]
    for name, value in (("num-prompts", num_prompts), ("input-len", input_len),
                        ("output-len", output_len), ("long-input-len", long_input_len),
                        ("short-input-len", short_input_len)):
        if value < 1:
            raise ValueError(f"--{name} must be >= 1, got {value}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"--long-fraction must be in [0, 1], got {long_fraction}")
    # The draws come in the bench datasets' order, so the same seed gives the workload that
    # `bench serve` sends: exactly for random; for long-doc when range_ratio is 0 (the bench
    # draws prompt tokens between the per-request lengths).
    rng = np.random.default_rng(seed)
    if dataset == "random":
        inputs = sample_lengths(input_len, range_ratio, num_prompts, rng)
        outputs = sample_lengths(output_len, range_ratio, num_prompts, rng)
        longs: list[bool | None] = [None] * num_prompts
    else:
        is_long = np.zeros(num_prompts, dtype=bool)
        is_long[rng.permutation(num_prompts)[: round(num_prompts * long_fraction)]] = True
        longs = is_long.tolist()
        outputs = sample_lengths(output_len, range_ratio, num_prompts, rng)
        inputs = [sample_lengths(long_input_len if x else short_input_len, range_ratio, 1, rng)[0]
                  for x in longs]
    times = arrival_times(num_prompts, request_rate, burstiness, np.random.default_rng([seed, 1]))
    return [TraceRequest(t, n, m, x) for t, n, m, x in zip(times, inputs, outputs, longs)]


# --- step costs -----------------------------------------------------------------------------------


class StepCost(Protocol):
    description: str

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float: ...

    def decode_s(self, context_lens: list[int]) -> float: ...

    def step_s(self, chunks: list[tuple[int, int]], context_lens: list[int]) -> float:
        """A step of prompt chunks [(new, cached)] and a decode batch (each sequence's context)."""
        ...

    def scheduler_cost(self, max_chunk: int, max_context: int) -> CostModel:
        """The CostModel the scheduler sizes chunks and orders prompts with."""
        ...


Step = tuple[list[tuple[int, int]], int, int, float]  # chunks [(new, cached)], batch, context, s


class CalibratedStepCost:
    """Step times from a CostModel calibrated on real hardware (per SP group, at the SP degree
    it was calibrated at). The scheduler decides with the same model unless scheduler_model is
    given: e.g. a server started with one calibration whose steps really take another's times.
    decode_batch_factor: per decode batch size, a factor on the model's decode time (measured
    in a step log, see StepLogFit; batch sizes not in it: 1)."""

    def __init__(self, model: CostModel, description: str = "calibrated cost model",
                 scheduler_model: CostModel | None = None,
                 decode_batch_factor: dict[int, float] | None = None):
        self.model, self.description = model, description
        self.scheduler_model = scheduler_model or model
        self.decode_batch_factor = decode_batch_factor or {}

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return self.model.prefill_s(new_tokens, cached_tokens)

    def decode_s(self, context_lens: list[int]) -> float:
        return self._step_s([], len(context_lens), sum(context_lens))

    def step_s(self, chunks: list[tuple[int, int]], context_lens: list[int]) -> float:
        return self._step_s(chunks, len(context_lens), sum(context_lens))

    def _step_s(self, chunks: list[tuple[int, int]], batch: int, context: int) -> float:
        factor = self.decode_batch_factor.get(batch, 1.0) if batch and not chunks else 1.0
        return self.model.step_s(chunks, batch, context) * factor

    def logged_step_s(self, step: Step) -> float:
        """The modelled seconds of a step as a step log records it (read_step_log)."""
        chunks, batch, context, _ = step
        return self._step_s(chunks, batch, context)

    def scheduler_cost(self, max_chunk: int, max_context: int) -> CostModel:
        return self.scheduler_model


@dataclass
class StepLogFit:
    model: CostModel
    # The log-normal noise around the model, as SimConfig.step_time_sigma(_at_s) take it,
    # fitted on log(measured / model) within each log: either the sigma of a step of
    # sigma_at_s seconds (the logged steps' median predicted time), longer steps less
    # (variance ~ 1 / length, as on a shared CPU), or, when that describes the log worse than
    # one sigma for every step (sigma_at_s = 0), that sigma.
    sigma: float
    sigma_at_s: float
    num_steps: int
    # Per log: its steps' mean measured / model. Logs of two runs on one machine can differ
    # (a shared CPU's speed drifts between runs): the model is of their pooled steps, and this
    # says how far each run was from it.
    run_speed: list[float]
    # Per decode batch size in the logs: the mean measured / model of its decode steps, shrunk
    # towards 1 by BATCH_FACTOR_PRIOR steps' worth (few steps: little correction). The model is
    # linear in the batch; on a CPU the real cost is not (the batch's matmuls are nearly free
    # next to the per-step work), and the workload's mix of batch sizes would carry that error.
    decode_batch_factor: dict[int, float]

    BATCH_FACTOR_PRIOR = 8

    def step_cost(self, description: str, scheduler_model: CostModel | None = None
                  ) -> CalibratedStepCost:
        """Step times as fitted: the model and its per-batch decode factors."""
        return CalibratedStepCost(self.model, description, scheduler_model,
                                  self.decode_batch_factor)


def fit_step_log(paths: str | Path | list[str] | list[Path]) -> StepLogFit:
    """Step times as a server measured them (`sp-serve serve --step-log FILE`): each step from
    one schedule() to the next, so sampling, streaming and whatever else shares the machine
    under that load are in. A CostModel fitted on every step of one or more logs, and the
    log-normal noise around it (SimConfig.step_time_sigma and _at_s)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return fit_steps([read_step_log(path) for path in paths], ", ".join(map(str, paths)))


STEP_LOG_EXAMPLE = '{"chunks": [[512, 0]], "decode": [0, 0], "measured_s": 0.1}'


def read_step_log(path: str | Path) -> list[Step]:
    """A server's step log (`sp-serve serve --step-log FILE`): (chunks [(new, cached)], decode
    batch, decode context, measured seconds) per step; a clear error for anything else, or for a
    log without a step measured."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--step-log {str(path)!r} is not a file; write one with "
                         "`sp-serve serve --step-log FILE`")
    steps: list[Step] = []
    for where, obj in iter_jsonl_objects(path.read_text(encoding="utf-8").splitlines(), path,
                                         STEP_LOG_EXAMPLE):
        try:
            chunks = [(int(n), int(c)) for n, c in obj["chunks"]]
            batch, context = (int(x) for x in obj["decode"])
            measured = float(obj["measured_s"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"{where}: not a step record; expected lines like {STEP_LOG_EXAMPLE}") from None
        steps.append((chunks, batch, context, measured))
    if not any(t > 0 for *_, t in steps):
        raise ValueError(f"--step-log {str(path)!r} has no step measured; expected lines "
                         f"like {STEP_LOG_EXAMPLE}")
    return steps


def fit_steps(logs: list[list[Step]], source: str) -> StepLogFit:
    """fit_step_log's fit on parsed steps, one list per log: (chunks [(new, cached)], decode
    batch, decode context, measured seconds); steps measured at 0 s or less are left out."""
    logs = [[s for s in steps if s[3] > 0] for steps in logs]
    if not all(logs):
        raise ValueError(f"{source}: a log without a step measured")
    steps = [s for log in logs for s in log]
    with_chunks = sum(1 for chunks, *_ in steps if chunks)
    decode = [(b, k, t) for chunks, b, k, t in steps if b and not chunks]
    if with_chunks < 3 or len(decode) < 3:
        raise ValueError(f"{source}: {with_chunks} steps with prompt chunks and {len(decode)} "
                         "decode-only steps; a fit needs at least 3 of each (log a longer run "
                         "with prompts and outputs)")
    model = CostModel.fit(steps)
    ratios: dict[int, list[float]] = {}
    for b, k, t in decode:
        if model.decode_s(b, k) > 0:
            ratios.setdefault(b, []).append(t / model.decode_s(b, k))
    prior = StepLogFit.BATCH_FACTOR_PRIOR
    factor = {b: (sum(r) + prior) / (len(r) + prior) for b, r in sorted(ratios.items())}
    fitted = CalibratedStepCost(model, decode_batch_factor=factor)

    def residuals(log: list[Step]) -> tuple[np.ndarray, np.ndarray]:
        predicted = np.array([fitted.logged_step_s(step) for step in log])
        measured = np.array([t for *_, t in log])
        keep = predicted > 0
        return predicted[keep], np.log(measured[keep] / predicted[keep])

    runs = [residuals(log) for log in logs]
    at_s = float(np.median(np.concatenate([p for p, _ in runs])))
    sigma, sigma_at_s = _fit_noise(runs, at_s)
    speed = [float(np.mean(np.exp(log_ratio))) for _, log_ratio in runs]
    return StepLogFit(model, sigma, sigma_at_s, len(steps), speed, factor)


def _fit_noise(runs: list[tuple[np.ndarray, np.ndarray]], at_s: float) -> tuple[float, float]:
    """(sigma, at_s) of the step noise, or (sigma, 0.0) for one sigma at every length, from
    each log's (predicted seconds, log(measured / predicted)), whichever describes the logs
    better (Gaussian likelihood of the log ratios). Each log keeps its own mean (its speed)."""
    n = sum(len(p) for p, _ in runs)
    dof = n / max(1, n - len(runs))  # one mean per log estimated
    # Flat: every log ratio has variance s2 (its mean shift -s2/2 is the same for all).
    a = np.concatenate([r - r.mean() for _, r in runs])
    flat = float(np.mean(a ** 2)) * dof
    # Length-scaled: log ratio ~ N(offset - v/2, v), v = s2 * at_s / t. With a = the centred
    # ratio and b = the centred at_s / t, the method of moments asks
    # s2 = mean(w (a + s2 b / 2)^2), w = t / at_s: C s2^2 + (B - 1) s2 + A = 0; the smaller
    # root (the larger one is an artefact of the v/2 term), or A when there is none.
    b = np.concatenate([at_s / p - np.mean(at_s / p) for p, _ in runs])
    w = np.concatenate([p / at_s for p, _ in runs])
    big_a, big_b, big_c = (float(np.mean(w * a * a)), float(np.mean(w * a * b)),
                           float(np.mean(w * b * b)) / 4)
    disc = (1 - big_b) ** 2 - 4 * big_a * big_c
    if big_c > 0 and disc >= 0 and big_b < 1:
        scaled = (1 - big_b - math.sqrt(disc)) / (2 * big_c)
    else:
        scaled = big_a
    scaled *= dof

    def log_likelihood(residual: np.ndarray, var: np.ndarray) -> float:
        var = np.maximum(var, 1e-12)
        return float(-0.5 * np.sum(np.log(var) + residual ** 2 / var))

    t = np.concatenate([p for p, _ in runs])
    if (log_likelihood(a + scaled * b / 2, scaled * at_s / t)
            > log_likelihood(a, np.full_like(t, flat))):
        return min(MAX_STEP_SIGMA, math.sqrt(max(scaled, 0.0))), at_s
    return min(MAX_STEP_SIGMA, math.sqrt(max(flat, 0.0))), 0.0


class AnalyticStepCost:
    """Step times from the planner's analytic model of a model on a hardware preset."""

    def __init__(self, shape: ModelShape, hw: Hardware, dep: Deployment):
        self.shape, self.hw, self.dep = shape, hw, dep
        self.description = (f"analytic: {shape.name} on {dep.sp_size * dep.tp_size} x {hw.name} "
                            f"(sp={dep.sp_size}, tp={dep.tp_size})")
        self.fit_max_rel_error: float | None = None

    def prefill_s(self, new_tokens: int, cached_tokens: int) -> float:
        return prefill_seconds(self.shape, self.hw, self.dep, new_tokens, cached_tokens)

    def decode_s(self, context_lens: list[int]) -> float:
        if not context_lens:
            return 0.0
        return decode_step_seconds(self.shape, self.hw, self.dep, context_lens)

    def step_s(self, chunks: list[tuple[int, int]], context_lens: list[int]) -> float:
        """The chunks' prefill times plus the decode batch's, less one read of the weights when
        both are there: the decode rows ride along the chunks' pass over the weights."""
        prefill = sum(self.prefill_s(n, c) for n, c in chunks)
        decode = self.decode_s(context_lens)
        if prefill and decode:
            b = decode_step_breakdown(self.shape, self.hw, self.dep, context_lens)
            weights_s = b.weight_bytes_per_rank / (self.hw.hbm_bandwidth * self.dep.bandwidth_efficiency)
            decode = max(decode - weights_s, b.merge_comm_s + b.tp_comm_s)
        return prefill + decode

    def scheduler_cost(self, max_chunk: int, max_context: int) -> CostModel:
        """CostModel.fit over a grid covering the workload: chunk sizes up to max_chunk over
        cached prefixes up to max_context, decode batches over contexts up to max_context,
        and decode batches carrying a chunk."""
        chunks = sorted({min(max_chunk, n) for n in (32, 128, 512, 2048, 8192, max_chunk)})
        prefixes = sorted({0, *(int(max_context * f) for f in (0.1, 0.25, 0.5, 0.9))})
        contexts = sorted({min(max_context, k) for k in (128, 1024, 8192)} | {max_context})
        shapes = [([(n, c)], []) for n in chunks for c in prefixes]
        shapes += [([], [k] * b) for b in (1, 4, 16, 64) for k in contexts]
        shapes += [([(n, 0)], [k] * 16) for n in chunks for k in contexts]
        samples = [(ch, len(ctx), sum(ctx), self.step_s(ch, ctx)) for ch, ctx in shapes]
        model = CostModel.fit(samples)
        self.fit_max_rel_error = max(abs(model.step_s(ch, b, k) / s - 1) for ch, b, k, s in samples)
        return model


def step_seconds(cost: StepCost, step: ScheduledStep) -> float:
    """One forward pass over the step's chunks and decode batch. The decode context counts each
    sequence's cached tokens including the one decoded now."""
    return cost.step_s([(end - start, start) for _, start, end in step.prefill],
                       [seq.num_cached for seq, _ in step.decode])


def kv_blocks_per_rank(kv_bytes_per_rank: float, kv_bytes_per_token_per_rank_: float,
                       block_size: int) -> int:
    """Blocks of one rank's pool; every token a rank stores costs all layers' K and V."""
    return int(kv_bytes_per_rank // (kv_bytes_per_token_per_rank_ * block_size))


def analytic_kv_blocks(shape: ModelShape, hw: Hardware, dep: Deployment, block_size: int,
                       kv_bytes_per_rank: float | None = None) -> int:
    """Blocks per rank: the given bytes, else the HBM left after the weights."""
    budget = kv_bytes_per_rank
    if budget is None:
        budget = free_kv_bytes_per_rank(shape, hw, dep)
    # kv_bytes_per_token_per_rank averages a token over the SP ranks; a rank storing a token
    # pays sp times that.
    per_token = kv_bytes_per_token_per_rank(shape, dep) * dep.sp_size
    return max(0, kv_blocks_per_rank(budget, per_token, block_size))


# --- the simulation -------------------------------------------------------------------------------


@dataclass
class SimConfig:
    sp_size: int = 1
    # Tensor-parallel ranks per SP rank (the world is tp x sp). The scheduler and block manager
    # work per SP rank, as in the engine (a TP group holds the same tokens, each rank its KV
    # heads); TP shows in the step cost (AnalyticStepCost's Deployment) and the pool
    # (analytic_kv_blocks: HBM left after 1/tp of the weights, over the rank's KV heads).
    tp_size: int = 1
    scheduler: str = "slo"
    ttft_slo_s: float = 2.0
    tbt_slo_s: float = 0.2
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int = 8192  # per rank
    step_overhead_s: float = 0.0  # per step, outside the modelled work (sampling, Python)
    # Per request: the serving path outside the engine's steps (HTTP, tokenization, the
    # hand-off to the engine loop, the first SSE event back), modelled as a delay before the
    # engine sees the request. It adds to TTFT and E2E, not to TBT. benchmarks/
    # validate_simulator.py measures it as a serving run's median TTFT beyond the simulated.
    request_overhead_s: float = 0.0
    # Step-to-step noise: each step's time is multiplied by a log-normal factor of mean 1
    # (seeded). A shared CPU has sigma ~0.1-0.3 on its short steps; a GPU ~0. It widens the TBT
    # tail and, as on a real engine, makes the scheduler's measured step-time scale shrink
    # chunks. With step_time_sigma_at_s > 0, step_time_sigma is the sigma of a step that long
    # and a step of t seconds gets step_time_sigma * sqrt(step_time_sigma_at_s / t) (at most
    # MAX_STEP_SIGMA): the noise's variance grows with the step's length, as when other work
    # on the same cores steals time slices at random, so a long prefill step averages some of
    # it out. With 0, every step gets step_time_sigma. fit_step_log picks either for a log.
    step_time_sigma: float = 0.0
    step_time_sigma_at_s: float = 0.0
    seed: int = 0
    # As the engine's --enable-prefix-caching; it matters only for requests with a prefix_id
    # (others share no tokens), which are then simulated with token ids.
    enable_prefix_caching: bool = True
    # Swap to host, as the engine's --kv-offloading-size / --preemption-mode: host blocks per
    # rank, and the seconds one rank takes to copy one block one way (added to the step that
    # swaps; the scheduler weighs it against a recompute).
    num_host_blocks: int = 0
    preemption_mode: str = "recompute"
    swap_s_per_block: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.sp_size >= 1, f"--sp-size must be >= 1, got {self.sp_size}"),
            (self.tp_size >= 1, f"--tp-size must be >= 1, got {self.tp_size}"),
            (self.scheduler in ("slo", "fcfs"),
             f"--scheduler must be slo or fcfs, got {self.scheduler!r}"),
            (self.ttft_slo_s > 0, f"--ttft-slo-ms must be > 0, got {self.ttft_slo_s * 1e3}"),
            (self.tbt_slo_s > 0, f"--tbt-slo-ms must be > 0, got {self.tbt_slo_s * 1e3}"),
            (self.max_num_seqs >= 1, f"--max-num-seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1,
             f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.block_size >= 1, f"--block-size must be >= 1, got {self.block_size}"),
            (self.num_kv_blocks >= 1,
             (f"no KV block fits per rank ({self.num_kv_blocks}): raise --kv-cache-memory, "
              "--tp-size or the HBM, or use a smaller model or --weight-dtype")),
            (self.step_overhead_s >= 0,
             f"--step-overhead-ms must be >= 0, got {self.step_overhead_s * 1e3}"),
            (self.request_overhead_s >= 0,
             f"--request-overhead-ms must be >= 0, got {self.request_overhead_s * 1e3}"),
            (0 <= self.step_time_sigma <= 2,
             f"--step-time-sigma must be in [0, 2], got {self.step_time_sigma}"),
            (self.step_time_sigma_at_s >= 0,
             f"--step-time-sigma-at-ms must be >= 0, got {self.step_time_sigma_at_s * 1e3}"),
            (self.num_host_blocks >= 0 and self.swap_s_per_block >= 0,
             "the host pool and its copy time must be >= 0"),
            (self.preemption_mode in ("swap", "recompute"),
             f"--preemption-mode must be swap or recompute, got {self.preemption_mode!r}"),
            (self.preemption_mode != "swap" or self.num_host_blocks > 0,
             "--preemption-mode swap needs --kv-offloading-size (host memory per rank)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


class _PromptLength:
    """Stands in for a prompt's token ids: the scheduler only asks a prompt for its length, and
    a million-token prompt need not hold a million ints. Anything else fails loudly."""

    __slots__ = ("n",)

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RequestRecord:
    arrival_time: float
    prompt_len: int
    output_len: int
    is_long: bool | None
    prefill_alone_s: float  # the prompt's prefill in one step on an idle engine: a TTFT floor
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0
    rejected: str = ""  # why the engine would refuse it (empty when accepted)
    cached_tokens: int | None = None  # found in the prefix cache (simulated caching only)

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival_time

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival_time


@dataclass
class StepRecord:
    start: float
    seconds: float
    prefill_tokens: int
    cached_tokens: int  # sum over the step's chunks of tokens already cached before them
    num_chunks: int
    decode_batch: int
    decode_context: int

    @property
    def kind(self) -> str:
        if self.num_chunks and self.decode_batch:
            return "mixed"
        return "prefill" if self.num_chunks else "decode"


@dataclass
class SimResult:
    config: SimConfig
    cost_description: str
    requests: list[RequestRecord]
    steps: list[StepRecord]
    duration_s: float
    num_preemptions: int
    peak_kv_usage: float
    peak_waiting: int
    scheduler_cost: CostModel
    scheduler_cost_fit_error: float | None = None
    kv_blocks_in_use_at_end: int = 0  # 0 unless the scheduler leaks blocks
    num_swapped_out: int = 0  # preemptions by a swap to host (the rest recomputed)

    def bench_results(self) -> list[RequestResult]:
        """The simulated requests as the bench client would have measured them."""
        out = []
        for r in self.requests:
            if r.rejected:
                out.append(RequestResult(success=False, prompt_len=r.prompt_len,
                                         start_time=r.arrival_time, error=r.rejected,
                                         is_long=r.is_long))
                continue
            out.append(RequestResult(
                success=True, prompt_len=r.prompt_len, output_tokens=len(r.token_times),
                num_text_chunks=len(r.token_times), ttft=r.ttft,
                itl=np.diff(r.token_times).tolist(), latency=r.e2e, start_time=r.arrival_time,
                is_long=r.is_long, cached_tokens=r.cached_tokens))
        return out

    def summary(self, percentiles: list[float] | None = None,
                goodput_slos_ms: dict[str, float] | None = None) -> dict[str, Any]:
        percentiles = percentiles or [50.0, 90.0, 99.0]
        results = self.bench_results()
        metrics = compute_metrics(results, max(self.duration_s, 1e-9), percentiles,
                                  goodput_slos_ms or None)
        metrics.pop("output_lens")
        completed = metrics["completed"]
        good = None
        if goodput_slos_ms:
            good = metrics["request_goodput"] * max(self.duration_s, 1e-9)
        errors = sorted({r.rejected for r in self.requests if r.rejected})
        return {
            "sp_size": self.config.sp_size,
            "tp_size": self.config.tp_size,
            "num_gpus": self.config.sp_size * self.config.tp_size,
            "scheduler": self.config.scheduler,
            "ttft_slo_ms": self.config.ttft_slo_s * 1e3,
            "tbt_slo_ms": self.config.tbt_slo_s * 1e3,
            "step_cost": self.cost_description,
            "step_time_sigma": self.config.step_time_sigma,
            "step_time_sigma_at_ms": self.config.step_time_sigma_at_s * 1e3,
            "scheduler_cost_model": asdict(self.scheduler_cost),
            "scheduler_cost_fit_max_rel_error": self.scheduler_cost_fit_error,
            "kv_blocks_per_rank": self.config.num_kv_blocks,
            "block_size": self.config.block_size,
            "num_requests": len(self.requests),
            "rejected": sum(1 for r in self.requests if r.rejected),
            "rejection_reasons": errors,
            "duration_s": self.duration_s,
            "goodput_slos_ms": goodput_slos_ms or None,
            "goodput_fraction": None if good is None else (good / completed if completed else 0.0),
            "num_preemptions": self.num_preemptions,
            "num_swapped_out": self.num_swapped_out,
            "peak_kv_usage": self.peak_kv_usage,
            "peak_waiting": self.peak_waiting,
            "kv_blocks_in_use_at_end": self.kv_blocks_in_use_at_end,
            "steps": self.step_stats(percentiles),
            # Keyed exactly as a `sp-serve bench serve` result: mean/median/std/pXX of
            # ttft, tpot, itl (TBT) and e2el in ms, throughputs, request_goodput, ...
            "metrics": metrics,
            # A scheduler bug check: no TTFT beats the prompt's prefill alone. Noisy step
            # times (step_time_sigma) can, so there it is not checked (None).
            "ttft_floor_violations": None if self.config.step_time_sigma else sum(
                1 for r in self.requests if not r.rejected and r.ttft < r.prefill_alone_s - 1e-9),
        }

    def step_stats(self, percentiles: list[float]) -> dict[str, Any]:
        busy = sum(s.seconds for s in self.steps)
        out: dict[str, Any] = {
            "num_steps": len(self.steps),
            "busy_s": busy,
            "busy_fraction": busy / self.duration_s if self.duration_s > 0 else 0.0,
        }
        for kind in ("prefill", "decode", "mixed"):
            times = [s.seconds for s in self.steps if s.kind == kind]
            out[kind] = {"count": len(times)}
            if times:
                out[kind].update(summarize(times, percentiles, "step"))
            if times:
                out[kind]["max_step_ms"] = max(times) * 1e3
        chunks = [s.prefill_tokens for s in self.steps if s.num_chunks]
        out["mean_prefill_tokens_per_step"] = float(np.mean(chunks)) if chunks else 0.0
        batches = [s.decode_batch for s in self.steps if s.decode_batch]
        out["mean_decode_batch"] = float(np.mean(batches)) if batches else 0.0
        return out


def _prompt_ids(i: int, req: TraceRequest) -> list[int]:
    """Token ids for simulated prefix caching: the shared prefix's ids name the prefix (equal
    across its requests), the rest are this request's own."""
    if req.prefix_id is None:
        return [-(i + 1)] * req.prompt_len  # a repeated token matches no other request's
    prefix = [(req.prefix_id << 32) + k for k in range(req.prefix_len)]
    return prefix + [-((i + 1) << 32) - k for k in range(req.prompt_len - req.prefix_len)]


def _rejection(blocks: BlockManager, req: TraceRequest) -> str:
    """LLMEngine.check_prompt's KV test: the whole request must fit in every rank's pool."""
    need = blocks.prefill_shares(req.prompt_len + req.output_len)
    per_rank = max(-(-t // blocks.block_size) for t in need)
    if per_rank > blocks.blocks_per_rank:
        return (f"needs {per_rank} KV blocks per rank but each rank has {blocks.blocks_per_rank}; "
                "raise --kv-cache-memory, --sp-size or --tp-size")
    return ""


MAX_STEP_SIGMA = 2.0


def step_sigma(sigma: float, at_s: float, seconds: float) -> float:
    """The log-normal sigma of a step of `seconds` (see SimConfig.step_time_sigma_at_s)."""
    if at_s <= 0 or sigma <= 0:
        return sigma
    return min(MAX_STEP_SIGMA, sigma * math.sqrt(at_s / max(seconds, 1e-9)))


def simulate(trace: list[TraceRequest], config: SimConfig, cost: StepCost,
             max_steps: int = 50_000_000) -> SimResult:
    """Runs the engine's scheduler over the trace; see the module docstring."""
    if not trace:
        raise ValueError("the workload is empty")
    dep = getattr(cost, "dep", None)
    if dep is not None and (dep.tp_size, dep.sp_size) != (config.tp_size, config.sp_size):
        raise ValueError(
            f"the step cost models tp x sp = {dep.tp_size} x {dep.sp_size} but the simulation "
            f"is of {config.tp_size} x {config.sp_size}: give both the same layout")
    clock = _Clock()
    caching = config.enable_prefix_caching and any(r.prefix_id is not None for r in trace)
    blocks = BlockManager(config.sp_size, config.num_kv_blocks, config.block_size, caching,
                          config.num_host_blocks)
    max_context = max(r.prompt_len + r.output_len for r in trace)
    sched_cost = cost.scheduler_cost(config.max_num_batched_tokens, max_context)
    scheduler = Scheduler(
        SchedulerConfig(config.scheduler, config.max_num_seqs, config.max_num_batched_tokens,
                        config.ttft_slo_s, config.tbt_slo_s,
                        preemption_mode=config.preemption_mode,
                        swap_s_per_token=config.swap_s_per_block / config.block_size),
        blocks, sched_cost, clock=clock)

    order = sorted(range(len(trace)), key=lambda i: trace[i].arrival_time)
    records = [RequestRecord(r.arrival_time, r.prompt_len, r.output_len, r.is_long,
                             cost.prefill_s(r.prompt_len, 0)) for r in trace]
    record_of: dict[int, RequestRecord] = {}
    steps: list[StepRecord] = []
    next_arrival, peak_usage, peak_waiting = 0, 0.0, 0

    delay = config.request_overhead_s
    noise = np.random.default_rng(config.seed)

    def admit_arrivals() -> None:
        nonlocal next_arrival
        while (next_arrival < len(order)
               and trace[order[next_arrival]].arrival_time + delay <= clock.now):
            i = order[next_arrival]
            next_arrival += 1
            req, rec = trace[i], records[i]
            rec.rejected = _rejection(blocks, req)
            if rec.rejected:
                continue
            prompt = _PromptLength(req.prompt_len) if not caching else _prompt_ids(i, req)
            seq = Sequence(i, str(i), prompt,  # type: ignore[arg-type]
                           SamplingParams(max_tokens=req.output_len, ignore_eos=True),
                           req.arrival_time + delay)
            record_of[seq.seq_id] = rec
            scheduler.add(seq)

    def emit_token(seq: Sequence) -> None:
        rec = record_of[seq.seq_id]
        seq.output_token_ids.append(0)
        seq.last_token_time = clock.now
        if not rec.token_times and caching:  # its TTFT floor: the prefill of what was not cached
            rec.cached_tokens = seq.num_cached_tokens
            rec.prefill_alone_s = cost.prefill_s(rec.prompt_len - rec.cached_tokens,
                                                 rec.cached_tokens)
        rec.token_times.append(clock.now)
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, "length"
            rec.num_preemptions = seq.num_preemptions
            scheduler.remove(seq)

    for _ in range(max_steps):
        admit_arrivals()
        if scheduler.num_unfinished == 0:
            if next_arrival == len(order):
                break
            clock.now = trace[order[next_arrival]].arrival_time + delay
            continue
        peak_waiting = max(peak_waiting, len(scheduler.waiting))
        copied = blocks.swapped_out_blocks + blocks.swapped_in_blocks
        step = scheduler.schedule()
        # blocks this step's swaps copy, over all ranks; each rank copies its own, in parallel
        copied = blocks.swapped_out_blocks + blocks.swapped_in_blocks - copied
        peak_usage = max(peak_usage, blocks.usage())
        if step.is_empty:
            # Nothing fits until something arrives (the real engine spins until then).
            if next_arrival == len(order):
                raise RuntimeError(
                    f"the scheduler made no progress at t={clock.now:.3f} s with "
                    f"{len(scheduler.waiting)} waiting and {len(scheduler.running)} running "
                    "and no arrival left (a scheduler bug, or a request the KV pool cannot hold)")
            clock.now = max(clock.now, trace[order[next_arrival]].arrival_time + delay)
            continue
        seconds = step_seconds(cost, step) + config.step_overhead_s
        seconds += copied / config.sp_size * config.swap_s_per_block
        if config.step_time_sigma:
            sigma = step_sigma(config.step_time_sigma, config.step_time_sigma_at_s, seconds)
            seconds *= math.exp(sigma * noise.standard_normal() - sigma * sigma / 2)
        steps.append(StepRecord(
            clock.now, seconds, sum(b - a for _, a, b in step.prefill),
            sum(a for _, a, _ in step.prefill), len(step.prefill), len(step.decode),
            sum(s.num_cached for s, _ in step.decode)))
        clock.now += seconds
        for seq, _, end in step.prefill:
            if end == seq.prefill_target:
                scheduler.prefill_done(seq)
                emit_token(seq)
        for seq, _ in step.decode:
            emit_token(seq)
    else:
        raise RuntimeError(f"the simulation did not finish within {max_steps} steps")

    return SimResult(
        config=config,
        cost_description=cost.description,
        requests=records,
        steps=steps,
        duration_s=clock.now,
        num_preemptions=scheduler.num_preemptions,
        num_swapped_out=blocks.num_swapped_out,
        peak_kv_usage=peak_usage,
        peak_waiting=peak_waiting,
        scheduler_cost=sched_cost,
        scheduler_cost_fit_error=getattr(cost, "fit_max_rel_error", None),
        kv_blocks_in_use_at_end=blocks.num_used_blocks(),
    )


# --- a calibration from this machine --------------------------------------------------------------


def calibrate_cost_model(model: str, out_path: str | Path, sp_size: int = 1,
                         tp_size: int = 1, **engine_args: Any) -> CostModel:
    """Starts a real engine (LLMEngine, tp_size x sp_size ranks) on `model`, lets it run its
    start-up calibration (LLMEngine.calibrate) and saves the fitted CostModel to out_path: the
    file `sp-serve serve --cost-model` and `sp-serve plan --simulate --cost-model` load. It
    holds for that layout."""
    from sp_serve.config import EngineConfig
    from sp_serve.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=model, sp_size=sp_size, tp_size=tp_size,
                                    scheduler="slo", **engine_args))
    try:
        cost = engine.scheduler.cost
        cost.save(str(out_path))
    finally:
        engine.shutdown()
    return cost
