"""The sampler: counter-based uniforms are uniform, keyed and reproducible; draws follow softmax(logits / T) with
top-p; the CPU top-k shortcut draws exactly what a full sort would."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare, kstest

from selfalign.generation import SamplingParams
from selfalign.generation.base import sequence_seed
from selfalign.generation.sampling import _draw, _nucleus, counter_uniforms, sample_tokens


def test_counter_uniforms_are_uniform_over_keys_and_over_draws():
    keys = torch.tensor([sequence_seed(0, f"p{i}", 0) for i in range(20000)])
    across_keys = counter_uniforms(keys, torch.zeros_like(keys))
    one_key = counter_uniforms(keys[:1].expand(20000), torch.arange(20000))
    for u in (across_keys, one_key):
        assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
        assert kstest(u.double().numpy(), "uniform").pvalue > 0.001
        assert len(set(u.tolist())) > 19900  # 24-bit numbers: a few collisions at most
    # neighbouring draws of one stream are not correlated
    assert abs(float(torch.corrcoef(torch.stack([one_key[:-1], one_key[1:]]))[0, 1])) < 0.03


def test_counter_uniforms_depend_only_on_key_and_counter():
    keys = torch.tensor([sequence_seed(7, "a", 0), sequence_seed(7, "a", 1), 2**63 - 1, 0])
    counters = torch.tensor([0, 0, 5, 3])
    u = counter_uniforms(keys, counters)
    assert torch.equal(u, counter_uniforms(keys.flip(0), counters.flip(0)).flip(0))  # row order does not matter
    assert torch.equal(u[:1], counter_uniforms(keys[:1], counters[:1]))  # nor batch companions
    assert len(set(u.tolist())) == 4
    assert float(counter_uniforms(keys[:1], torch.tensor([1]))) != float(u[0])  # the next draw differs
    # the high half of the key matters too (keys differing only above bit 32)
    assert float(counter_uniforms(torch.tensor([1 << 40]), torch.tensor([0]))) != float(
        counter_uniforms(torch.tensor([1 << 41]), torch.tensor([0])))


def test_sampler_matches_the_target_distribution():
    # one fixed distribution, 6000 independent draws: chi-square against softmax(logits / T) with top-p applied
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.7, top_p=0.9)
    uniforms = counter_uniforms(torch.arange(6000), torch.zeros(6000, dtype=torch.long))
    draws = sample_tokens(logits.expand(6000, -1).contiguous(), params, uniforms)
    probs = torch.softmax(logits[0] / 0.7, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < 0.9
    target = torch.zeros_like(probs)
    target[order[keep]] = sorted_p[keep]
    target /= target.sum()
    counts = torch.bincount(draws, minlength=6).double()
    assert counts[target == 0].sum() == 0  # nothing outside the nucleus
    assert 1 < int(keep.sum()) < 6  # top-p really cuts here, and more than one token stays
    result = chisquare(counts[target > 0].numpy(), target[target > 0].double().numpy() * 6000)
    assert result.pvalue > 0.001, result


def test_top_k_shortcut_draws_what_a_full_sort_draws():
    # vocabulary-sized rows: peaked ones (nucleus inside the top 256) and flat ones (the shortcut falls back)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 49152, generator=gen)
    logits[:32] *= 12.0
    params = SamplingParams(temperature=0.7, top_p=0.9)
    uniforms = counter_uniforms(torch.arange(64), torch.zeros(64, dtype=torch.long))
    got = sample_tokens(logits, params, uniforms)
    probs = torch.softmax(logits / 0.7, dim=-1)
    p, order = probs.sort(dim=-1, descending=True)
    want = _draw(_nucleus(p, 0.9), order, uniforms)
    assert torch.equal(got, want)
    assert len(set(got[32:].tolist())) > 16  # the flat rows really drew from a wide nucleus


def test_draw_never_picks_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(3, -1)
    picked = _draw(probs, None, torch.tensor([0.0, 0.5, 1.0 - 2**-24]))
    assert picked.tolist() == [1, 3, 3]


def test_top_p_outside_its_range_is_refused():
    from selfalign.errors import ConfigError

    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ConfigError, match="top_p must be in"):
            SamplingParams(top_p=bad)
