"""Sample store: empirical distribution vs supp^alpha (chi-square), store mechanics, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from gru4rec.train.sampler import SampleStore


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_empirical_distribution_follows_supp_power_alpha(alpha):
    supp = np.array([1, 2, 3, 5, 8, 13, 40, 100, 7, 1, 0.0 + 4, 60], dtype=np.float64)
    store = SampleStore(
        torch.tensor(supp), n_sample=500, alpha=alpha, store_size=200_000, device="cpu", seed=5
    )
    draws = store.store.flatten().numpy()
    expected = supp**alpha / (supp**alpha).sum() * draws.size
    observed = np.bincount(draws, minlength=len(supp))
    assert observed.sum() == draws.size
    stat, p = chisquare(observed, expected)
    assert p > 1e-3, (stat, p)
    # and a clearly wrong exponent is rejected by the same test (the test can fail)
    wrong = supp ** (alpha + 0.5) / (supp ** (alpha + 0.5)).sum() * draws.size
    assert chisquare(observed, wrong).pvalue < 1e-6


def test_store_rows_served_in_order_then_redrawn():
    supp = torch.arange(1, 51, dtype=torch.float64)
    store = SampleStore(supp, n_sample=10, alpha=0.5, store_size=35, device="cpu", seed=1)
    assert store.n_rows == 3  # floor(store_size / n_sample)
    first = store.store.clone()
    rows = [store.next_row().clone() for _ in range(3)]
    for k in range(3):
        assert torch.equal(rows[k], first[k])
    fourth = store.next_row()  # exhausted: whole store redrawn, first row of the new one served
    assert store.pos == 1
    assert not torch.equal(store.store, first)
    assert torch.equal(fourth, store.store[0])
    assert int(store.store.min()) >= 0 and int(store.store.max()) < 50


def test_state_dict_rebuilds_identical_store_and_position():
    supp = torch.arange(1, 101, dtype=torch.float64)
    a = SampleStore(supp, n_sample=8, alpha=0.75, store_size=40, device="cpu", seed=9)
    for _ in range(13):  # crosses two redraws
        a.next_row()
    b = SampleStore(supp, n_sample=8, alpha=0.75, store_size=40, device="cpu", seed=123)
    b.load_state_dict(a.state_dict())
    assert b.pos == a.pos
    assert torch.equal(a.store, b.store)
    for _ in range(12):
        assert torch.equal(a.next_row(), b.next_row())
