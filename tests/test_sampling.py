"""Sampling: greedy, temperature, top-k, top-p, min-p, penalties, seeds, logprobs; parameter
validation; and property tests that no parameter in range and no logits row can make it fail."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sp_serve.engine.sampling import (
    GREEDY_TEMPERATURE,
    SamplingParams,
    TokenCounts,
    distribution,
    greedy_tokens,
    make_generator,
    plain_greedy,
    sample,
)

LOGITS = torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0])


def _draws(params, n=200, logits=LOGITS, counts=None):
    gen = make_generator(params, torch.device("cpu"))
    return [sample(logits, params, gen, counts).token_id for _ in range(n)]


def test_greedy_and_top_k_1():
    assert sample(LOGITS, SamplingParams(temperature=0.0), None).token_id == 1
    assert set(_draws(SamplingParams(top_k=1, seed=0), 20)) == {1}


def test_top_k_and_top_p_restrict_support():
    assert set(_draws(SamplingParams(top_k=2, temperature=1.0, seed=1))) <= {1, 2}
    probs = torch.softmax(LOGITS, -1)  # p(1) ~ .53, p(2) ~ .32: top_p .6 keeps exactly {1, 2}
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert set(_draws(SamplingParams(top_p=0.6, seed=2))) == {1, 2}


def test_min_p_keeps_tokens_near_the_top():
    # p(2)/p(1) = exp(-0.5) ~ .61, p(4)/p(1) = exp(-2) ~ .14: min_p .5 keeps exactly {1, 2}
    assert set(_draws(SamplingParams(min_p=0.5, seed=4))) == {1, 2}
    assert set(_draws(SamplingParams(min_p=1.0, seed=4), 20)) == {1}


def test_temperature_sharpens():
    hot = _draws(SamplingParams(temperature=2.0, seed=3), 400)
    cold = _draws(SamplingParams(temperature=0.3, seed=3), 400)
    assert cold.count(1) > hot.count(1)


def test_temperature_below_the_floor_is_greedy():
    """vLLM's rule; below it, logits / temperature overflow float32 (the issue's 1e-40)."""
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).greedy
    assert set(_draws(SamplingParams(temperature=1e-40, seed=0), 20)) == {1}
    # Just above the floor the scaled logits overflow to -inf for all but the top: still fine.
    assert set(_draws(SamplingParams(temperature=GREEDY_TEMPERATURE, seed=0), 20)) == {1}


def test_top_p_that_rounds_to_zero_keeps_the_top_token():
    """The fuzzer's top_p=5e-324 is 0 in float32: the top token must still be kept."""
    assert set(_draws(SamplingParams(top_p=5e-324, seed=0), 20)) == {1}


def test_penalties_follow_vllm():
    counts = TokenCounts([1], vocab_size=5, device=torch.device("cpu"))
    counts.add(2)
    counts.add(2)
    # repetition 4: token 1 (prompt, 3.0) -> 0.75 and token 2 (generated, 2.5) -> 0.625; token 4
    # (1.0, unseen) is now the top.
    r = sample(LOGITS, SamplingParams(temperature=0, repetition_penalty=4.0), None, counts)
    assert r.token_id == 4
    # frequency 1: token 2 -> 2.5 - 2 = 0.5; presence 2: 2.5 - 2 = 0.5; token 1 stays the top,
    # and the penalties change nothing else.
    for params in (SamplingParams(frequency_penalty=1.0), SamplingParams(presence_penalty=2.0)):
        probs = _empirical(_draws(params, 2000, counts=counts))
        expected = torch.softmax(torch.tensor([0.0, 3.0, 0.5, -1.0, 1.0]), -1)
        assert torch.allclose(probs, expected, atol=0.04), (params, probs)
    # Negative penalties favour repeats.
    r = sample(LOGITS, SamplingParams(temperature=0, presence_penalty=-2.0), None, counts)
    assert r.token_id == 2


def _empirical(draws: list[int], vocab: int = 5) -> torch.Tensor:
    return torch.bincount(torch.tensor(draws), minlength=vocab).float() / len(draws)


def test_same_seed_same_tokens_different_seed_different():
    a = _draws(SamplingParams(seed=7), 50)
    assert a == _draws(SamplingParams(seed=7), 50)
    assert a != _draws(SamplingParams(seed=8), 50)


def test_logprobs():
    r = sample(LOGITS, SamplingParams(temperature=0.0, logprobs=3), None)
    ref = torch.log_softmax(LOGITS, -1)
    assert r.logprob == pytest.approx(float(ref[1]))
    assert [t for t, _ in r.top] == [1, 2, 4]


def _reference_probs(logits, params, prompt, output, eos):
    """vLLM's sampler written out plainly in float64, one token at a time: logit_bias, min_tokens
    (stop tokens at -inf while the output is short), repetition / frequency / presence
    penalties, then greedy, or temperature -> min-p -> top-k -> top-p."""
    x = [float(v) for v in logits]
    for t, b in (params.logit_bias or {}).items():
        x[t] += b
    if len(output) < params.min_tokens:
        for t in set(params.stop_token_ids) | ({eos} if not params.ignore_eos else set()):
            x[t] = -math.inf
    for t in range(len(x)):
        n = output.count(t)
        if t in prompt or n:
            rp = params.repetition_penalty
            x[t] = x[t] / rp if x[t] > 0 else x[t] * rp
        x[t] -= params.frequency_penalty * n + params.presence_penalty * (n > 0)
    if params.greedy:
        best = max(range(len(x)), key=lambda t: (x[t], -t))
        return [float(t == best) for t in range(len(x))]
    top = max(x)
    x = [(v - top) / params.temperature for v in x]
    if params.min_p > 0:
        x = [v if v >= math.log(params.min_p) else -math.inf for v in x]
    if 0 < params.top_k < len(x):
        kth = sorted(x, reverse=True)[params.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    z = sum(math.exp(v) for v in x)
    p = [math.exp(v) / z for v in x]
    if params.top_p < 1:
        order = sorted(range(len(x)), key=lambda t: -p[t])
        mass, keep = 0.0, set()
        for t in order:
            if mass >= params.top_p and keep:
                break
            keep.add(t)
            mass += p[t]
        z = sum(p[t] for t in keep)
        p = [p[t] / z if t in keep else 0.0 for t in range(len(x))]
    return p


@pytest.mark.parametrize("seed", range(40))
def test_every_sampling_control_matches_a_plain_reference(seed):
    """logit_bias, min_tokens, the three penalties, temperature, min-p, top-k and top-p, each
    drawn at random (or off), against the plain float64 reference: the same distribution."""
    g = torch.Generator().manual_seed(seed)
    vocab, eos = 12, 11
    logits = torch.randn(vocab, generator=g) * 2
    r = torch.rand(10, generator=g).tolist()
    prompt = torch.randint(0, vocab, (4,), generator=g).tolist()
    output = torch.randint(0, vocab, (int(r[0] * 4),), generator=g).tolist()
    params = SamplingParams(
        max_tokens=8, temperature=[0.0, 0.5, 1.0, 1.7][int(r[1] * 4)],
        top_p=1.0 if r[2] < 0.5 else 0.3 + r[2] * 0.6, top_k=[-1, 3, 6][int(r[3] * 3)],
        min_p=0.0 if r[4] < 0.5 else r[4] * 0.3, presence_penalty=r[5] * 2 - 1,
        frequency_penalty=(r[6] * 2 - 1) if r[6] > 0.3 else 0.0,
        repetition_penalty=1.0 if r[7] < 0.3 else 0.5 + r[7],
        logit_bias={int(r[8] * vocab): r[8] * 10 - 5, 2: -100.0} if r[8] > 0.2 else None,
        min_tokens=int(r[9] * 6), stop_token_ids=[3], ignore_eos=r[9] > 0.8)
    counts = TokenCounts(prompt, vocab, torch.device("cpu")) if params.has_penalties else None
    for t in output if counts is not None else []:
        counts.add(t)
    banned = None
    if len(output) < params.min_tokens:  # what LLMEngine._banned passes
        banned = [3] + ([] if params.ignore_eos else [eos])
    got = distribution(logits, params, counts, banned)
    want = torch.tensor(_reference_probs(logits.tolist(), params, prompt, output, eos),
                        dtype=torch.float64)
    assert torch.allclose(got.double(), want, atol=1e-5), (params, got, want)
    if banned:
        assert float(got[banned].sum()) == 0.0


def test_min_tokens_and_logit_bias_in_the_sampler():
    # eos (4) is the most likely token, banned while the output is too short
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5, 9.0])
    assert sample(logits, SamplingParams(temperature=0), None, banned=[4]).token_id == 2
    assert sample(logits, SamplingParams(temperature=0, logit_bias={"0": 100}), None).token_id == 0
    # logprobs stay those of the raw logits (vLLM's default)
    r = sample(logits, SamplingParams(temperature=0, logprobs=1, logit_bias={0: 100}), None)
    assert r.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0]))
    assert r.rank == 5


@pytest.mark.parametrize("kwargs", [
    dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4), dict(logit_bias={1: 101.0}),
    dict(logit_bias={"x": 1.0}), dict(logit_bias={-1: 1.0}), dict(prompt_logprobs=21),
    dict(logit_bias={1: math.nan}), dict(include_stop_str_in_output=1),
])
def test_bad_new_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
    dict(n=0), dict(logprobs=21), dict(stop_token_ids=[-1]), dict(stop=[""]),
    dict(temperature=math.nan), dict(temperature=math.inf), dict(top_p=math.nan),
    dict(min_p=-0.1), dict(min_p=1.5), dict(min_p=math.nan), dict(presence_penalty=2.5),
    dict(frequency_penalty=-math.inf), dict(repetition_penalty=0.0),
    dict(repetition_penalty=math.nan), dict(seed=2**64), dict(seed=1.5), dict(temperature=True),
])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# ---- properties: nothing in range fails -------------------------------------------------------
# Extreme but valid values: subnormals, values that round to 0 or overflow in float32, bounds.
_TINY = [5e-324, 1e-320, 1e-40, 1e-38, GREEDY_TEMPERATURE / 2, GREEDY_TEMPERATURE,
         GREEDY_TEMPERATURE * (1 + 1e-12)]
_temperatures = st.sampled_from([0.0, *_TINY, 0.5, 1.0, 2.0, 1e30, 1e38, 1e300]) | st.floats(
    0, 1e308)
_unit = st.sampled_from([*_TINY, 0.1, 0.5, 1 - 1e-16, 1.0]) | st.floats(5e-324, 1.0)
_penalty = st.sampled_from([-2.0, -1e-300, 0.0, 1e-300, 2.0]) | st.floats(-2.0, 2.0)
_repetition = st.sampled_from([5e-324, 1e-40, 0.5, 1.0, 2.0, 1e30, 1e300]) | st.floats(
    5e-324, 1e308)


@st.composite
def _logit_rows(draw) -> torch.Tensor:
    """Random rows, all-equal rows, rows with -inf masks (up to all of them), huge magnitudes,
    and the +inf/NaN a broken model could return."""
    vocab = draw(st.integers(1, 40))
    kind = draw(st.sampled_from(["random", "equal", "masked", "huge", "nonfinite"]))
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(draw(st.integers(0, 999))))
    if kind == "equal":
        row = torch.full((vocab,), draw(st.sampled_from([0.0, -1e38, 3e38, -math.inf])))
    elif kind == "huge":
        row = row * 3e38
    elif kind in ("masked", "nonfinite"):
        values = [-math.inf] if kind == "masked" else [-math.inf, math.inf, math.nan]
        for i in draw(st.lists(st.integers(0, vocab - 1), max_size=vocab)):
            row[i] = draw(st.sampled_from(values))
    return row


@st.composite
def _params(draw) -> SamplingParams:
    return SamplingParams(
        temperature=draw(_temperatures), top_p=draw(_unit),
        top_k=draw(st.sampled_from([-1, 0, 1, 2, 5, 10**9])),
        min_p=draw(st.sampled_from([0.0, 1.0]) | _unit),
        presence_penalty=draw(_penalty), frequency_penalty=draw(_penalty),
        repetition_penalty=draw(_repetition), seed=draw(st.integers(-2**63, 2**64 - 1)),
        logprobs=draw(st.sampled_from([None, 0, 3])))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits=_logit_rows(), params=_params(), history=st.lists(st.integers(0, 39), max_size=8))
def test_sampling_never_fails_and_picks_a_possible_token(logits, params, history):
    vocab = logits.shape[0]
    counts = TokenCounts([t % vocab for t in history[:3]], vocab, torch.device("cpu"))
    for t in history[3:]:
        counts.add(t % vocab)
    result = sample(logits, params, make_generator(params, torch.device("cpu")), counts)
    assert 0 <= result.token_id < vocab
    cleaned = logits.nan_to_num(nan=-math.inf)
    if not params.has_penalties and bool((cleaned > -math.inf).any()):
        assert cleaned[result.token_id] > -math.inf  # never an impossible token
    if not params.has_penalties and params.greedy:
        assert cleaned[result.token_id] == cleaned.max()
    if params.logprobs is not None:
        assert not math.isnan(result.logprob) and result.logprob <= 0
        assert len(result.top) == min(params.logprobs, vocab)
        assert all(not math.isnan(lp) for _, lp in result.top)


@settings(max_examples=150, deadline=None)
@given(top_p=_unit, seed=st.integers(0, 2**32))
def test_top_p_always_keeps_the_top_token(top_p, seed):
    logits = torch.randn(30, generator=torch.Generator().manual_seed(seed)) * 4
    draws = set(_draws(SamplingParams(top_p=top_p, seed=seed), 10, logits=logits))
    top_mass = float(torch.softmax(logits, -1).max())
    if top_p <= top_mass:  # the top token alone reaches top_p: only it can be drawn
        assert draws == {int(logits.argmax())}


def test_batched_greedy_tokens_equal_sample_row_by_row():
    """The engine samples plain greedy requests in one batch (one device sync): each token must
    be sample()'s, on rows with NaN, +-inf, ties and no finite logit at all."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(50, generator=g) for _ in range(4)]
    rows[1][7] = float("nan")
    rows[1][9] = float("inf")
    rows[2][:] = float("-inf")
    rows[3][[4, 11]] = 10.0  # a tie: the first one
    rows.append(torch.full((50,), float("nan")))
    params = SamplingParams(temperature=0.0, max_tokens=1)
    assert plain_greedy(params)
    expected = [sample(r, params, None).token_id for r in rows]
    assert greedy_tokens(rows) == expected
    assert expected[1] == 9 and expected[3] == 4
    for kwargs in ({"temperature": 1.0}, {"temperature": 0.0, "logprobs": 1},
                   {"temperature": 0.0, "logit_bias": {1: 5.0}},
                   {"temperature": 0.0, "repetition_penalty": 1.2},
                   {"temperature": 0.0, "min_tokens": 1}):
        assert not plain_greedy(SamplingParams(max_tokens=2, **kwargs)), kwargs
