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
    make_generator,
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
