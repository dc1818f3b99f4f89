"""Sampling: greedy, temperature, top-k, top-p, seeds, logprobs; and parameter validation."""
from __future__ import annotations

import pytest
import torch

from sp_serve.engine.sampling import SamplingParams, make_generator, sample

LOGITS = torch.tensor([0.0, 3.0, 2.5, -1.0, 1.0])


def _draws(params, n=200):
    gen = make_generator(params, torch.device("cpu"))
    return [sample(LOGITS, params, gen).token_id for _ in range(n)]


def test_greedy_and_top_k_1():
    assert sample(LOGITS, SamplingParams(temperature=0.0), None).token_id == 1
    assert set(_draws(SamplingParams(top_k=1, seed=0), 20)) == {1}


def test_top_k_and_top_p_restrict_support():
    assert set(_draws(SamplingParams(top_k=2, temperature=1.0, seed=1))) <= {1, 2}
    probs = torch.softmax(LOGITS, -1)  # p(1) ~ .53, p(2) ~ .32: top_p .6 keeps exactly {1, 2}
    assert probs[1] < 0.6 < probs[1] + probs[2]
    assert set(_draws(SamplingParams(top_p=0.6, seed=2))) == {1, 2}


def test_temperature_sharpens():
    hot = _draws(SamplingParams(temperature=2.0, seed=3), 400)
    cold = _draws(SamplingParams(temperature=0.3, seed=3), 400)
    assert cold.count(1) > hot.count(1)


def test_same_seed_same_tokens_different_seed_different():
    a = _draws(SamplingParams(seed=7), 50)
    assert a == _draws(SamplingParams(seed=7), 50)
    assert a != _draws(SamplingParams(seed=8), 50)


def test_logprobs():
    r = sample(LOGITS, SamplingParams(temperature=0.0, logprobs=3), None)
    ref = torch.log_softmax(LOGITS, -1)
    assert r.logprob == pytest.approx(float(ref[1]))
    assert [t for t, _ in r.top] == [1, 2, 4]


@pytest.mark.parametrize("kwargs", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0),
                                    dict(top_p=1.5), dict(top_k=-2), dict(n=0), dict(logprobs=21),
                                    dict(stop_token_ids=[-1]), dict(stop=[""])])
def test_bad_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
